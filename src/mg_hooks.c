/* mg_hooks: the Lua hooks of a request (see mg_hooks.h).
 *
 * How a step runs. The request's coroutine runs a small driver (driver_lua below) that calls
 * one function per step and yields END followed by that function's results; C pushes the
 * next step's function and arguments and resumes. A step that waits for I/O yields the I/O
 * marker instead (mg_task.h) and is resumed by the operation, so from C's point of view a
 * step always finishes in step_finished(), called either at once or later from the loop.
 *
 * The req object is a small userdata (req_obj_t) whose fields (method, path, headers, ...)
 * are computed on demand by req_index from the C request. The keys a script sets and the
 * tables it has read (headers, args, params, ctx) live in the object's environment table,
 * made on first use, so a request whose hooks only call methods makes one Lua object. When
 * the request is freed the object's pointer is cleared, so a script that kept `req` gets a
 * clear error instead of reading freed memory. Before the log hooks run, the fields are copied
 * into the environment table, so they outlive the request. */
#include "mg_hooks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "mg_gen.h"
#include "mg_http.h"
#include "mg_log.h"
#include "mg_lua_json.h"
#include "mg_path.h"
#include "mg_request.h"
#include "mg_task.h"

/* The driver and the step helpers: trusted code, compiled once per VM. */
static const char driver_lua[] =
    "local yield, type, error = coroutine.yield, type, error\n"
    "local END = {}\n"
    "local function run_list(list, req, arg)\n"
    "  for i = 1, #list do\n"
    "    local s, b, h = list[i](req, arg)\n"
    "    if s ~= nil then return s, b, h end\n"
    "  end\n"
    "end\n"
    "local function run_filters(list, chunk, eof)\n"
    "  for i = 1, #list do\n"
    "    local out = list[i](chunk, eof)\n"
    "    if out == nil then out = '' end\n"
    "    if type(out) ~= 'string' then\n"
    "      error('a body filter must return a string or nil, got a ' .. type(out) .. ' value', 0)\n"
    "    end\n"
    "    chunk = out\n"
    "  end\n"
    "  return chunk\n"
    "end\n"
    "local function json(req)\n"
    "  local body, err = req:body()\n"
    "  if body == nil then return nil, err end\n"
    "  return mg.json.decode(body)\n"
    "end\n"
    "local function driver(f, a, b, c)\n"
    "  while true do\n"
    "    f, a, b, c = yield(END, f(a, b, c))\n"
    "  end\n"
    "end\n"
    "return { END = END, driver = driver, run_list = run_list, run_filters = run_filters,\n"
    "         json = json }\n";

/* Registry references, per process (one VM per worker process). */
static struct {
  mg_lua_vm_t *vm;
  int helpers;      /* the table driver_lua returned */
  int end_marker;
  int driver, run_list, run_filters;
  int req_mt;       /* metatable of req objects */
  const void *req_mt_ptr;  /* the same table, to recognise req objects */
  int res_mt;       /* metatable of res tables */
} H = {NULL, -1, -1, -1, -1, -1, -1, NULL, -1};

/* The key (its address, as a light userdata) under which a res table keeps its list of body
 * filters. */
static const char filters_key = 0;

/* A req object. REQ is NULL once the request is freed; HAS_FIELDS says that the object's
 * environment table is its own (a fresh userdata's is the globals table of its maker). */
typedef struct req_obj {
  mg_request_t *req;
  int has_fields;
} req_obj_t;

/* What a request's hooks hold. */
typedef struct hookrun {
  mg_task_t task;
  mg_request_t *req;
  req_obj_t *obj;               /* the req object, or NULL before the first step */
  int req_slot;                 /* registry slot that holds it (0: none yet); kept by spares */
  int res_ref;                  /* the res table of the response hooks, or -1 */
  int started;                  /* the driver is on the coroutine */
  int step;                     /* MG_HOOK_* of the running step */
  int in_sync;                  /* inside a C call that may complete an operation at once */
  /* req:body() */
  mg_buf_t body;
  unsigned body_read : 1, body_waiting : 1, body_too_large : 1, body_sync_done : 1;
  /* response hooks */
  mg_hook_response_t *resp;
  mg_buf_t resp_body;           /* the body read (res:body) or set (res:set_body, an answer) */
  unsigned resp_body_known : 1, resp_body_waiting : 1, resp_replaced : 1;
  int resp_status;              /* of a replacing answer */
  mg_buf_t resp_head;           /* header lines of a replacing answer */
  int nfilters;
  char *path;                   /* set by req:set_path */
  mg_header_edit_t *edits;
  size_t nedits;
} hookrun_t;

static void step_finished(hookrun_t *h, mg_lua_status_t st);

/* ------------------------------------------------------------------------------------------
 * Small helpers.
 * ---------------------------------------------------------------------------------------- */

static hookrun_t *hookrun_of(const mg_request_t *req) { return req->hooks; }

/* The req object at IDX; raises when the value there is not one. */
static req_obj_t *to_req_obj(lua_State *L, int idx) {
  req_obj_t *o = lua_touserdata(L, idx);
  if (o && lua_getmetatable(L, idx)) {
    int ours = lua_topointer(L, -1) == H.req_mt_ptr;
    lua_pop(L, 1);
    if (ours) return o;
  }
  luaL_error(L, "expected a request object (call it as req:method(...))");
  return NULL;
}

/* The request of the req object at IDX; raises when it is not one or the request is gone
 * (unless GONE_OK, then returns NULL for a finished request). */
static mg_request_t *check_req(lua_State *L, int idx, int gone_ok) {
  req_obj_t *o = to_req_obj(L, idx);
  if (!o->req && !gone_ok) luaL_error(L, "the request has finished");
  return o->req;
}

/* Pushes the environment table of the req object at IDX (an absolute index) and returns 1;
 * makes it when CREATE, else pushes nothing and returns 0 when there is none. */
static int push_req_fields(lua_State *L, int idx, int create) {
  req_obj_t *o = lua_touserdata(L, idx);
  if (o->has_fields) {
    lua_getfenv(L, idx);
    return 1;
  }
  if (!create) return 0;
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -1);
  lua_setfenv(L, idx);
  o->has_fields = 1;
  return 1;
}

/* Pushes key K of the req object's own fields at IDX, or nil. */
static void push_req_own(lua_State *L, int idx, const char *k) {
  if (!push_req_fields(L, idx, 0)) {
    lua_pushnil(L);
    return;
  }
  lua_getfield(L, -1, k);
  lua_replace(L, -2);
}

/* A header name must be a token; a value must not hold CR, LF or NUL. */
static int header_name_ok(const char *s, size_t n) { return n > 0 && mg_http_is_token(s, n); }

static int header_value_ok(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 0;
  return 1;
}

/* The gateway frames every message itself. */
static int framing_header(const char *s, size_t n) {
  return mg_http_ieq(s, n, "content-length") || mg_http_ieq(s, n, "transfer-encoding") ||
         mg_http_ieq(s, n, "connection");
}

static void push_lower(lua_State *L, const char *s, size_t n) {
  char small[128] = "";
  char *buf = n <= sizeof small ? small : malloc(n);
  if (!buf) {
    lua_pushlstring(L, s, n);
    return;
  }
  for (size_t i = 0; i < n; i++) buf[i] = (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
  lua_pushlstring(L, buf, n);
  if (buf != small) free(buf);
}

/* Logs a failed hook: the message ("file:line: ...") and the coroutine's traceback. */
static void log_script_error(const mg_request_t *req, const char *hook, const char *msg,
                             const char *tb) {
  if (req) mg_log_error("request %s: %s hook failed: %s%s%s", req->id, hook, msg, *tb ? "\n" : "", tb);
  else mg_log_error("%s hook failed: %s%s%s", hook, msg, *tb ? "\n" : "", tb);
}

/* ------------------------------------------------------------------------------------------
 * The req object.
 * ---------------------------------------------------------------------------------------- */

/* Pushes the value of header NAME (case-insensitive; repeated fields joined with ", "), after
 * the hooks' own edits, or nil. */
static void push_header(lua_State *L, const mg_request_t *req, const char *name, size_t nlen) {
  hookrun_t *h = hookrun_of(req);
  if (h)
    for (size_t i = h->nedits; i-- > 0;)
      if (mg_http_ieq_n(h->edits[i].name, strlen(h->edits[i].name), name, nlen)) {
        if (h->edits[i].value) lua_pushstring(L, h->edits[i].value);
        else lua_pushnil(L);
        return;
      }
  size_t first = req->nheaders, found = 0;
  for (size_t i = 0; i < req->nheaders; i++) {
    const mg_header_t *hd = &req->headers[i];
    if (!mg_http_ieq_n(hd->name, hd->name_len, name, nlen)) continue;
    if (found++ == 0) first = i;
  }
  if (found == 0) {
    lua_pushnil(L);
    return;
  }
  if (found == 1) {                          /* the usual case: no joining */
    lua_pushlstring(L, req->headers[first].value, req->headers[first].value_len);
    return;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = first, n = 0; i < req->nheaders; i++) {
    const mg_header_t *hd = &req->headers[i];
    if (!mg_http_ieq_n(hd->name, hd->name_len, name, nlen)) continue;
    if (n++) luaL_addlstring(&b, ", ", 2);
    luaL_addlstring(&b, hd->value, hd->value_len);
  }
  luaL_pushresult(&b);
}

/* req.headers: a table of lower-case names; reading it is case-insensitive. */
static int headers_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  size_t n;
  const char *k = lua_tolstring(L, 2, &n);
  push_lower(L, k, n);
  lua_rawget(L, 1);
  return 1;
}

static void push_headers_table(lua_State *L, const mg_request_t *req) {
  lua_createtable(L, 0, (int)req->nheaders);
  int t = lua_gettop(L);
  for (size_t i = 0; i < req->nheaders; i++) {
    const mg_header_t *hd = &req->headers[i];
    push_lower(L, hd->name, hd->name_len);
    push_header(L, req, hd->name, hd->name_len);
    lua_rawset(L, t);
  }
  hookrun_t *h = hookrun_of(req);
  for (size_t i = 0; h && i < h->nedits; i++) {
    push_lower(L, h->edits[i].name, strlen(h->edits[i].name));
    if (h->edits[i].value) lua_pushstring(L, h->edits[i].value);
    else lua_pushnil(L);
    lua_rawset(L, t);
  }
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, headers_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, t);
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Pushes S percent-decoded ('+' is a space in a query). */
static void push_unescaped(lua_State *L, const char *s, size_t n) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == '+') c = ' ';
    else if (c == '%' && i + 2 < n + 0 && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
      c = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
      i += 2;
    }
    luaL_addchar(&b, c);
  }
  luaL_pushresult(&b);
}

/* req.args: the query's parameters, decoded; a repeated one is a list of its values. */
static void push_args(lua_State *L, const char *q, size_t n) {
  lua_newtable(L);
  int t = lua_gettop(L);
  size_t i = 0;
  while (q && i < n) {
    size_t start = i;
    while (i < n && q[i] != '&') i++;
    size_t end = i++;
    if (end == start) continue;
    size_t eq = start;
    while (eq < end && q[eq] != '=') eq++;
    push_unescaped(L, q + start, eq - start);
    if (eq < end) push_unescaped(L, q + eq + 1, end - eq - 1);
    else lua_pushboolean(L, 1);
    lua_pushvalue(L, -2);
    lua_rawget(L, t);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_rawset(L, t);
    } else if (lua_istable(L, -1)) {
      lua_insert(L, -2);
      lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
      lua_pop(L, 2);
    } else {
      lua_createtable(L, 2, 0);
      lua_insert(L, -2);
      lua_rawseti(L, -2, 1);
      lua_insert(L, -2);
      lua_rawseti(L, -2, 2);
      lua_rawset(L, t);
    }
  }
}

static void push_params(lua_State *L, const mg_request_t *req) {
  const mg_route_match_t *m = &req->match;
  lua_createtable(L, 0, (int)m->nparams);
  if (!req->route) return;
  for (size_t i = 0; i < m->nparams; i++) {
    lua_pushlstring(L, m->params[i].name, m->params[i].name_len);
    lua_pushlstring(L, m->params[i].value, m->params[i].value_len);
    lua_rawset(L, -3);
  }
}

/* Pushes field K of REQ; returns 0 when K is not a field. Tables are cached in the req
 * table T by the caller. */
static int push_field(lua_State *L, const mg_request_t *req, const char *k, int *cache) {
  *cache = 0;
  switch (k[0]) {
    case 'm':
      if (strcmp(k, "method") == 0) { lua_pushlstring(L, req->method_name, req->method_len); return 1; }
      break;
    case 'p':
      if (strcmp(k, "path") == 0) { lua_pushlstring(L, req->path, req->path_len); return 1; }
      if (strcmp(k, "params") == 0) {          /* before routing: {}, not kept */
        push_params(L, req);
        *cache = req->route != NULL;
        return 1;
      }
      break;
    case 'q':
      if (strcmp(k, "query") == 0) {
        lua_pushlstring(L, req->query ? req->query : "", req->query ? req->query_len : 0);
        return 1;
      }
      break;
    case 'a':
      if (strcmp(k, "args") == 0) { push_args(L, req->query, req->query_len); *cache = 1; return 1; }
      break;
    case 'h':
      if (strcmp(k, "headers") == 0) { push_headers_table(L, req); *cache = 1; return 1; }
      if (strcmp(k, "host") == 0) {
        if (req->host) lua_pushlstring(L, req->host, req->host_len);
        else lua_pushnil(L);
        return 1;
      }
      break;
    case 'c':
      if (strcmp(k, "client") == 0) { lua_pushstring(L, req->conn->client_ip); return 1; }
      if (strcmp(k, "ctx") == 0) { lua_newtable(L); *cache = 1; return 1; }
      break;
    case 'i':
      if (strcmp(k, "id") == 0) { lua_pushstring(L, req->id); return 1; }
      break;
    case 'r':
      if (strcmp(k, "route") == 0) {
        if (req->route) lua_pushstring(L, req->route->name ? req->route->name : req->route->spec);
        else lua_pushnil(L);
        return 1;
      }
      break;
    case 't':
      if (strcmp(k, "target") == 0) { lua_pushlstring(L, req->target, req->target_len); return 1; }
      break;
    case 'v':
      if (strcmp(k, "version") == 0) {
        lua_pushnumber(L, req->http_major + req->http_minor / 10.0);
        return 1;
      }
      break;
    default:
      break;
  }
  return 0;
}

static const char *const req_fields[] = {"method", "path", "query", "args", "params", "headers",
                                         "host", "client", "ctx", "id", "route", "target",
                                         "version", NULL};

/* __index of req objects: the script's own keys and cached tables, methods (upvalue 1),
 * then fields. */
static int req_index(lua_State *L) {
  req_obj_t *o = to_req_obj(L, 1);
  if (o->has_fields) {
    lua_getfenv(L, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) return 1;
    lua_settop(L, 2);
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  if (!lua_isnil(L, -1)) return 1;
  lua_settop(L, 2);
  if (!o->req || lua_type(L, 2) != LUA_TSTRING) return 0;   /* finished: fields were copied */
  int cache;
  if (!push_field(L, o->req, lua_tostring(L, 2), &cache)) return 0;
  if (cache) {
    push_req_fields(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -3);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  return 1;
}

/* __newindex: fields are read-only; other keys (consumer, anything) are the script's. */
static int req_newindex(lua_State *L) {
  to_req_obj(L, 1);
  if (lua_type(L, 2) == LUA_TSTRING) {
    const char *k = lua_tostring(L, 2);
    for (int i = 0; req_fields[i]; i++)
      if (strcmp(k, req_fields[i]) == 0 && strcmp(k, "ctx") != 0)
        return luaL_error(L, "req.%s is read-only%s", k,
                          strcmp(k, "path") == 0 ? " (use req:set_path in a request hook)"
                          : strcmp(k, "headers") == 0 ? " (use req:set_header)" : "");
  }
  push_req_fields(L, 1, 1);
  lua_insert(L, 2);
  lua_rawset(L, 2);
  return 0;
}

static int l_req_header(lua_State *L) {
  mg_request_t *req = check_req(L, 1, 1);
  size_t n;
  const char *name = luaL_checklstring(L, 2, &n);
  if (!req) {                                /* after the request: the copied headers */
    push_req_own(L, 1, "headers");
    if (!lua_istable(L, -1)) return 1;       /* nil: never read during the request */
    push_lower(L, name, n);
    lua_rawget(L, -2);
    return 1;
  }
  push_header(L, req, name, n);
  return 1;
}

static int l_req_set_header(lua_State *L) {
  mg_task_check(L, "req:set_header", MG_HOOK_BIT(MG_HOOK_REQUEST) | MG_HOOK_BIT(MG_HOOK_ACCESS));
  mg_request_t *req = check_req(L, 1, 0);
  hookrun_t *h = hookrun_of(req);
  size_t nl, vl = 0;
  const char *name = luaL_checklstring(L, 2, &nl);
  const char *value = NULL;
  if (!lua_isnil(L, 3)) {
    if (lua_type(L, 3) != LUA_TSTRING && lua_type(L, 3) != LUA_TNUMBER)
      return luaL_error(L, "req:set_header: the value of %s must be a string, a number or nil",
                        name);
    value = lua_tolstring(L, 3, &vl);
  }
  if (!header_name_ok(name, nl)) return luaL_error(L, "req:set_header: invalid header name %q", name);
  if (value && !header_value_ok(value, vl))
    return luaL_error(L, "req:set_header: the value of %s contains CR, LF or NUL", name);
  if (framing_header(name, nl) || mg_http_ieq(name, nl, "host"))
    return luaL_error(L, "req:set_header: %s is set by the gateway", name);
  mg_header_edit_t *more = realloc(h->edits, (h->nedits + 1) * sizeof *more);
  if (!more) return luaL_error(L, "not enough memory");
  h->edits = more;
  mg_header_edit_t *e = &h->edits[h->nedits];
  e->name = strndup(name, nl);
  e->value = value ? strndup(value, vl) : NULL;
  if (!e->name || (value && !e->value)) {
    free(e->name);
    free(e->value);
    return luaL_error(L, "not enough memory");
  }
  h->nedits++;
  /* Keep a cached req.headers in step. */
  push_req_own(L, 1, "headers");
  if (lua_istable(L, -1)) {
    push_lower(L, name, nl);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
  }
  return 0;
}

static int l_req_set_path(lua_State *L) {
  mg_task_check(L, "req:set_path", MG_HOOK_BIT(MG_HOOK_REQUEST));
  mg_request_t *req = check_req(L, 1, 0);
  hookrun_t *h = hookrun_of(req);
  size_t n;
  const char *p = luaL_checklstring(L, 2, &n);
  if (n == 0 || p[0] != '/') return luaL_error(L, "req:set_path: the path must start with /");
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f || p[i] == '#')
      return luaL_error(L, "req:set_path: the path holds a space, a control character or #");
  /* Stored as "<normalised path>\0<query>": routing sees what it would see from a client. */
  const char *q = memchr(p, '?', n);
  size_t plen = q ? (size_t)(q - p) : n;
  char *copy = malloc(n + 2);
  if (!copy) return luaL_error(L, "not enough memory");
  size_t outlen = 0;
  if (mg_path_normalize(p, plen, copy, &outlen) != 0) {
    free(copy);
    return luaL_error(L, "req:set_path: invalid path (bad %%-escape, control byte or .. above /)");
  }
  free(h->path);
  h->path = copy;
  req->path = copy;
  req->path_len = outlen;
  if (q) {
    memcpy(copy + outlen + 1, q + 1, n - plen - 1);
    copy[outlen + 1 + (n - plen - 1)] = '\0';
    req->query = copy + outlen + 1;
    req->query_len = n - plen - 1;
  }
  if (push_req_fields(L, 1, 0)) {            /* a cached req.args is stale now */
    lua_pushliteral(L, "args");
    lua_pushnil(L);
    lua_rawset(L, -3);
  }
  return 0;
}

/* ---- req:body() -------------------------------------------------------------------------- */

static void body_wake(hookrun_t *h) {
  lua_State *co = mg_lua_run_thread(h->task.run);
  h->body_waiting = 0;
  if (h->body_too_large) {
    lua_pushnil(co);
    lua_pushfstring(co, "request body too large (limit %d bytes)", (int)h->req->max_body);
    mg_task_wake(&h->task, 2);
  } else {
    lua_pushlstring(co, h->body.data ? h->body.data : "", h->body.len);
    mg_task_wake(&h->task, 1);
  }
}

static void hooks_on_body(mg_request_t *req, const char *data, size_t len) {
  hookrun_t *h = hookrun_of(req);
  if (h->body_too_large) return;
  if (h->body.len + len > req->max_body || mg_buf_append(&h->body, data, len) != 0) {
    h->body_too_large = 1;
    mg_conn_pause_body(req->conn);
    req->on_body = NULL;
    req->on_body_done = NULL;
    if (h->in_sync) h->body_sync_done = 1;
    else body_wake(h);
  }
}

static void hooks_on_body_done(mg_request_t *req) {
  hookrun_t *h = hookrun_of(req);
  req->on_body = NULL;
  req->on_body_done = NULL;
  h->body_read = 1;
  if (h->in_sync) h->body_sync_done = 1;
  else body_wake(h);
}

static void body_cancel(void *op) {
  hookrun_t *h = op;
  h->body_waiting = 0;
  if (h->req) {
    h->req->on_body = NULL;
    h->req->on_body_done = NULL;
  }
}

static int push_body_result(lua_State *L, hookrun_t *h) {
  if (h->body_too_large) {
    lua_pushnil(L);
    lua_pushfstring(L, "request body too large (limit %d bytes)", (int)h->req->max_body);
    return 2;
  }
  lua_pushlstring(L, h->body.data ? h->body.data : "", h->body.len);
  return 1;
}

static int l_req_body(lua_State *L) {
  mg_task_t *t = mg_task_check(L, "req:body", MG_HOOKS_REQUEST_SIDE);
  mg_request_t *req = check_req(L, 1, 0);
  hookrun_t *h = hookrun_of(req);
  if (h->body_read || h->body_too_large) return push_body_result(L, h);
  if (!req->has_body || req->body_done) {
    h->body_read = 1;
    return push_body_result(L, h);
  }
  if (req->content_length > 0 && (uint64_t)req->content_length > req->max_body) {
    h->body_too_large = 1;
    return push_body_result(L, h);
  }
  req->on_body = hooks_on_body;
  req->on_body_done = hooks_on_body_done;
  h->in_sync = 1;
  h->body_sync_done = 0;
  mg_conn_read_body(req->conn);
  h->in_sync = 0;
  if (h->body_sync_done) return push_body_result(L, h);
  h->body_waiting = 1;
  return mg_task_wait(L, t, h, body_cancel);
}

/* ------------------------------------------------------------------------------------------
 * The res object of the response hooks.
 * ---------------------------------------------------------------------------------------- */

static hookrun_t *res_run(lua_State *L, const char *fname) {
  mg_task_t *t = mg_task_check(L, fname, MG_HOOK_BIT(MG_HOOK_RESPONSE));
  hookrun_t *h = t->data;
  if (!h || !h->resp) luaL_error(L, "%s: no response is being produced", fname);
  return h;
}

static int l_res_header(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t n;
  const char *name = luaL_checklstring(L, 2, &n);
  lua_getfield(L, 1, "headers");
  if (!lua_istable(L, -1)) return 0;
  push_lower(L, name, n);
  lua_rawget(L, -2);
  return 1;
}

static int l_res_set_header(lua_State *L) {
  res_run(L, "res:set_header");
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t n;
  const char *name = luaL_checklstring(L, 2, &n);
  if (!lua_isnil(L, 3) && lua_type(L, 3) != LUA_TSTRING && lua_type(L, 3) != LUA_TNUMBER)
    return luaL_error(L, "res:set_header: the value of %s must be a string, a number or nil", name);
  if (!header_name_ok(name, n)) return luaL_error(L, "res:set_header: invalid header name %q", name);
  if (lua_type(L, 3) == LUA_TSTRING) {
    size_t vl;
    const char *v = lua_tolstring(L, 3, &vl);
    if (!header_value_ok(v, vl))
      return luaL_error(L, "res:set_header: the value of %s contains CR, LF or NUL", name);
  }
  lua_getfield(L, 1, "headers");
  push_lower(L, name, n);
  lua_pushvalue(L, 3);
  lua_rawset(L, -3);
  return 0;
}

static int l_res_set_body(lua_State *L) {
  hookrun_t *h = res_run(L, "res:set_body");
  luaL_checktype(L, 1, LUA_TTABLE);
  h->resp_body.len = 0;
  if (lua_type(L, 2) == LUA_TTABLE) {
    char err[256];
    if (mg_json_encode_value(L, 2, &h->resp_body, err, sizeof err) != 0)
      return luaL_error(L, "res:set_body: %s", err);
    lua_getfield(L, 1, "headers");
    lua_pushliteral(L, "application/json");
    lua_setfield(L, -2, "content-type");
  } else {
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (mg_buf_append(&h->resp_body, s, n) != 0) return luaL_error(L, "not enough memory");
  }
  h->resp_body_known = 1;
  return 0;
}

static void res_body_cancel(void *op) {
  hookrun_t *h = op;
  h->resp_body_waiting = 0;
}

static int l_res_body(lua_State *L) {
  hookrun_t *h = res_run(L, "res:body");
  if (h->resp_body_known) {
    lua_pushlstring(L, h->resp_body.data ? h->resp_body.data : "", h->resp_body.len);
    return 1;
  }
  if (h->resp->body || !h->resp->want_body) {
    mg_buf_append(&h->resp_body, h->resp->body ? h->resp->body : "", h->resp->body_len);
    h->resp_body_known = 1;
    lua_pushlstring(L, h->resp->body ? h->resp->body : "", h->resp->body_len);
    return 1;
  }
  h->resp_body_waiting = 1;
  h->resp->want_body(h->req);
  return mg_task_wait(L, &h->task, h, res_body_cancel);
}

static int l_res_filter(lua_State *L) {
  hookrun_t *h = res_run(L, "res:filter");
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushlightuserdata(L, (void *)&filters_key);
  lua_rawget(L, 1);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, (void *)&filters_key);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
  }
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
  h->nfilters++;
  return 0;
}

/* ------------------------------------------------------------------------------------------
 * VM setup.
 * ---------------------------------------------------------------------------------------- */

static int setup_cb(lua_State *L) {
  int helpers = *(int *)lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, helpers);
  int t = lua_gettop(L);
  const char *names[] = {"END", "driver", "run_list", "run_filters"};
  int *refs[] = {&H.end_marker, &H.driver, &H.run_list, &H.run_filters};
  for (int i = 0; i < 4; i++) {
    lua_getfield(L, t, names[i]);
    *refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  /* req: a userdata with this metatable; the methods are __index's upvalue. */
  lua_createtable(L, 0, 4);
  lua_createtable(L, 0, 6);
  const luaL_Reg req_methods[] = {{"header", l_req_header}, {"set_header", l_req_set_header},
                                  {"set_path", l_req_set_path}, {"body", l_req_body},
                                  {NULL, NULL}};
  for (const luaL_Reg *r = req_methods; r->name; r++) {
    lua_pushcfunction(L, r->func);
    lua_setfield(L, -2, r->name);
  }
  lua_getfield(L, t, "json");                /* req:json(): req:body() then mg.json.decode */
  lua_setfield(L, -2, "json");
  lua_pushcclosure(L, req_index, 1);         /* the methods, as its upvalue */
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, req_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  H.req_mt_ptr = lua_topointer(L, -1);
  H.req_mt = luaL_ref(L, LUA_REGISTRYINDEX);

  lua_createtable(L, 0, 2);
  lua_createtable(L, 0, 6);
  const luaL_Reg res_methods[] = {{"header", l_res_header}, {"set_header", l_res_set_header},
                                  {"set_body", l_res_set_body}, {"body", l_res_body},
                                  {"filter", l_res_filter}, {NULL, NULL}};
  for (const luaL_Reg *r = res_methods; r->name; r++) {
    lua_pushcfunction(L, r->func);
    lua_setfield(L, -2, r->name);
  }
  lua_setfield(L, -2, "__index");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  H.res_mt = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int mg_hooks_vm_init(mg_lua_vm_t *vm, char *err, size_t errlen) {
  H.vm = vm;
  H.helpers = mg_lua_vm_load_trusted(vm, "moongate/hooks", driver_lua, sizeof driver_lua - 1,
                                     err, errlen);
  if (H.helpers < 0) return -1;
  if (lua_cpcall(mg_lua_vm_state(vm), setup_cb, &H.helpers) != 0) {
    snprintf(err, errlen, "cannot set up the hooks: %s", lua_tostring(mg_lua_vm_state(vm), -1));
    lua_pop(mg_lua_vm_state(vm), 1);
    return -1;
  }
  return 0;
}

/* The hook lists of a generation, found once: registry references, by slot (0: the global
 * request list; then four per route: access, handler, response, log). 0 is "not looked up
 * yet"; LUA_REFNIL stands for a route without that hook. Kept in mg_gen_t.hooks. */
typedef struct gen_lists {
  size_t n;
  int refs[];
} gen_lists_t;

void mg_hooks_gen_unref(mg_gen_t *g) {
  gen_lists_t *gl = g->hooks;
  if (gl) {
    for (size_t i = 0; i < gl->n; i++)
      if (gl->refs[i] > 0 && H.vm) mg_lua_vm_unref(H.vm, gl->refs[i]);
    free(gl);
    g->hooks = NULL;
  }
  if (g->lua_ref >= 0 && H.vm) mg_lua_vm_unref(H.vm, g->lua_ref);
  g->lua_ref = -1;
}

/* ------------------------------------------------------------------------------------------
 * Steps.
 * ---------------------------------------------------------------------------------------- */

static void on_task_resumed(mg_task_t *t, mg_lua_status_t st) { step_finished(t->data, st); }

/* The request's hook state, made on first use with its coroutine and req table. */
/* Finished requests leave their hook state here with its coroutine, whose driver waits for
 * the next step: a busy worker runs hooks without making a coroutine per request. */
#define MG_SPARE_HOOKRUNS 64
static hookrun_t *spare_runs[MG_SPARE_HOOKRUNS];
static size_t nspare_runs;

static hookrun_t *hookrun_get(mg_request_t *req) {
  if (req->hooks) return req->hooks;
  hookrun_t *h;
  if (nspare_runs) {
    h = spare_runs[--nspare_runs];
  } else {
    h = calloc(1, sizeof *h);
    if (!h) return NULL;
  }
  h->req = req;
  h->res_ref = -1;
  h->task.w = req->w;
  h->task.gen = req->gen;
  h->task.req = req;
  h->task.resumed = on_task_resumed;
  h->task.data = h;
  req->hooks = h;
  return h;
}

/* Makes the coroutine and the req object when there are none. The object is kept in the
 * hook state's registry slot, which a spare keeps for its next request (a slot is let go as
 * `false`, never nil, so that luaL_ref cannot hand it out again). Returns 0 or -1. */
static int hookrun_ready(hookrun_t *h) {
  if (!h->task.run) {
    h->task.run = mg_lua_run_new(H.vm);
    if (!h->task.run) return -1;
    h->started = 0;
  }
  if (h->obj) return 0;
  lua_State *co = mg_lua_run_thread(h->task.run);
  req_obj_t *o = lua_newuserdata(co, sizeof *o);
  o->req = h->req;
  o->has_fields = 0;
  lua_rawgeti(co, LUA_REGISTRYINDEX, H.req_mt);
  lua_setmetatable(co, -2);
  if (h->req_slot > 0) lua_rawseti(co, LUA_REGISTRYINDEX, h->req_slot);
  else h->req_slot = luaL_ref(co, LUA_REGISTRYINDEX);
  h->obj = o;
  return 0;
}

/* Lets go of the req object (and, when FOREVER, of the registry slot that held it). */
static void hookrun_drop_obj(hookrun_t *h, int forever) {
  lua_State *L = mg_lua_vm_state(H.vm);
  if (h->obj) h->obj->req = NULL;
  h->obj = NULL;
  if (h->req_slot <= 0) return;
  if (forever) {
    luaL_unref(L, LUA_REGISTRYINDEX, h->req_slot);
    h->req_slot = 0;
  } else {
    lua_pushboolean(L, 0);
    lua_rawseti(L, LUA_REGISTRYINDEX, h->req_slot);
  }
}

/* Drops the coroutine (after an error, or a yield that was not ours). */
static void hookrun_drop_run(hookrun_t *h) {
  mg_task_cancel(&h->task);
  mg_lua_run_free(h->task.run);
  h->task.run = NULL;
  h->started = 0;
}

static const char *const route_hook_keys[] = {"access", "handler", "response", "log"};

static int list_slot(const mg_request_t *req, const char *key) {
  if (strcmp(key, "request") == 0) return 0;
  int k = 0;
  while (strcmp(route_hook_keys[k], key) != 0) k++;
  return 1 + (int)(req->route - req->gen->cfg.routes) * 4 + k;
}

/* Pushes list KEY ("access", ...) of the route, or the global request list. */
static void push_hook_value(lua_State *co, const mg_request_t *req, const char *key) {
  mg_gen_t *g = req->gen;
  gen_lists_t *gl = g->hooks;
  if (gl == NULL) {
    size_t n = 1 + g->cfg.nroutes * 4;
    gl = calloc(1, sizeof *gl + n * sizeof gl->refs[0]);
    if (gl) gl->n = n;
    g->hooks = gl;
  }
  int slot = list_slot(req, key);
  if (gl && gl->refs[slot] != 0) {
    if (gl->refs[slot] == LUA_REFNIL) lua_pushnil(co);
    else lua_rawgeti(co, LUA_REGISTRYINDEX, gl->refs[slot]);
    return;
  }
  lua_rawgeti(co, LUA_REGISTRYINDEX, g->lua_ref);
  if (slot == 0) {
    lua_getfield(co, -1, "request");
  } else {
    lua_getfield(co, -1, "routes");
    lua_rawgeti(co, -1, (int)(req->route - g->cfg.routes) + 1);
    lua_getfield(co, -1, key);
    lua_replace(co, -3);
    lua_pop(co, 1);
  }
  lua_replace(co, -2);
  if (gl) {
    lua_pushvalue(co, -1);
    gl->refs[slot] = luaL_ref(co, LUA_REGISTRYINDEX);   /* LUA_REFNIL for nil */
  }
}

/* Starts a step: the values F, A, B, C are on the coroutine's stack. */
static void step_go(hookrun_t *h, int hook) {
  lua_State *co = mg_lua_run_thread(h->task.run);
  h->step = hook;
  h->task.hook = hook;
  if (!h->started) {
    lua_rawgeti(co, LUA_REGISTRYINDEX, H.driver);
    lua_insert(co, -5);
    h->started = 1;
  }
  mg_task_t *prev = mg_task_enter(&h->task);
  mg_lua_status_t st = mg_lua_vm_resume(h->task.run, 4);
  mg_task_enter(prev);
  step_finished(h, st);
}

/* Pushes run_list, the list, req, ARG (nil unless given), for step_go; for a list of one
 * function, that function, req, ARG and nil (the same results, one Lua call fewer). */
static void push_list_step(hookrun_t *h, const char *key, int arg_ref) {
  lua_State *co = mg_lua_run_thread(h->task.run);
  push_hook_value(co, h->req, key);
  int lone = lua_type(co, -1) == LUA_TTABLE && lua_objlen(co, -1) == 1;
  if (lone) {
    lua_rawgeti(co, -1, 1);
    lua_replace(co, -2);
  } else {
    lua_rawgeti(co, LUA_REGISTRYINDEX, H.run_list);
    lua_insert(co, -2);
  }
  lua_rawgeti(co, LUA_REGISTRYINDEX, h->req_slot);
  if (arg_ref >= 0) lua_rawgeti(co, LUA_REGISTRYINDEX, arg_ref);
  else lua_pushnil(co);
  if (lone) lua_pushnil(co);
}

/* ---- answers from Lua ------------------------------------------------------------------- */

typedef struct answer {
  int status;
  const char *ctype;
  char ctype_buf[256];
  mg_buf_t body;
  mg_buf_t head;               /* "Name: value\r\n" lines */
} answer_t;

static void answer_dispose(answer_t *a) {
  mg_buf_dispose(&a->body);
  mg_buf_dispose(&a->head);
}

/* Appends one checked header line; returns 0 or -1 with ERR. */
static int add_header_line(mg_buf_t *out, const char *name, size_t nl, const char *v, size_t vl,
                           char *err, size_t errlen) {
  if (!header_name_ok(name, nl)) {
    snprintf(err, errlen, "invalid header name \"%.*s\"", (int)(nl > 64 ? 64 : nl), name);
    return -1;
  }
  if (!header_value_ok(v, vl)) {
    snprintf(err, errlen, "the value of header %.*s contains CR, LF or NUL",
             (int)(nl > 64 ? 64 : nl), name);
    return -1;
  }
  /* res.headers keys are lower-case: such a name goes out in the usual form
   * ("content-type" -> "Content-Type"); a name written with capitals is kept as written. */
  int lower = 1;
  for (size_t i = 0; i < nl && lower; i++) lower = !(name[i] >= 'A' && name[i] <= 'Z');
  size_t at = out->len;
  mg_buf_append(out, name, nl);
  if (lower && out->len == at + nl)
    for (size_t i = 0; i < nl; i++) {
      char *c = out->data + at + i;
      if ((i == 0 || c[-1] == '-') && *c >= 'a' && *c <= 'z') *c = (char)(*c - 32);
    }
  mg_buf_append(out, ": ", 2);
  mg_buf_append(out, v, vl);
  mg_buf_append(out, "\r\n", 2);
  return 0;
}

/* Reads a headers table at IDX into A's head (content-type goes to a->ctype). */
static int read_headers(lua_State *L, int idx, answer_t *a, char *err, size_t errlen) {
  if (lua_isnil(L, idx)) return 0;
  if (!lua_istable(L, idx)) {
    snprintf(err, errlen, "headers must be a table of name = value, got a %s value",
             luaL_typename(L, idx));
    return -1;
  }
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      lua_pop(L, 2);
      snprintf(err, errlen, "header names must be strings");
      return -1;
    }
    size_t nl;
    const char *name = lua_tolstring(L, -2, &nl);
    if (framing_header(name, nl)) {          /* the gateway frames the message */
      lua_pop(L, 1);
      continue;
    }
    int vt = lua_type(L, -1);
    if (vt == LUA_TTABLE) {                  /* a list: one field per value */
      for (int i = 1;; i++) {
        lua_rawgeti(L, -1, i);
        if (lua_isnil(L, -1)) { lua_pop(L, 1); break; }
        size_t vl;
        const char *v = lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER
                            ? lua_tolstring(L, -1, &vl) : NULL;
        if (!v) {
          lua_pop(L, 3);
          snprintf(err, errlen, "header %.*s: values must be strings", (int)nl, name);
          return -1;
        }
        if (add_header_line(&a->head, name, nl, v, vl, err, errlen) != 0) { lua_pop(L, 3); return -1; }
        lua_pop(L, 1);
      }
    } else if (vt == LUA_TSTRING || vt == LUA_TNUMBER || vt == LUA_TBOOLEAN) {
      size_t vl;
      const char *v = vt == LUA_TBOOLEAN ? (lua_toboolean(L, -1) ? "true" : "false")
                                         : lua_tolstring(L, -1, &vl);
      if (vt == LUA_TBOOLEAN) vl = strlen(v);
      if (mg_http_ieq(name, nl, "content-type")) {
        if (!header_value_ok(v, vl) || vl >= sizeof a->ctype_buf) {
          lua_pop(L, 2);
          snprintf(err, errlen, "the value of header Content-Type is invalid");
          return -1;
        }
        memcpy(a->ctype_buf, v, vl);
        a->ctype_buf[vl] = '\0';
        a->ctype = a->ctype_buf;
      } else if (add_header_line(&a->head, name, nl, v, vl, err, errlen) != 0) {
        lua_pop(L, 2);
        return -1;
      }
    } else {
      lua_pop(L, 2);
      snprintf(err, errlen, "header %.*s: the value must be a string, got a %s value", (int)nl,
               name, lua_typename(L, vt));
      return -1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* Reads "status, body[, headers]" at IDX.. into A. Returns 0 or -1 with ERR. */
static int read_answer(lua_State *L, int idx, int n, answer_t *a, char *err, size_t errlen) {
  memset(a, 0, sizeof *a);
  lua_Number s = lua_tonumber(L, idx);
  if (lua_type(L, idx) != LUA_TNUMBER || s != (int)s || s < 200 || s > 599) {
    snprintf(err, errlen, "the status must be an integer from 200 to 599, got %s",
             lua_type(L, idx) == LUA_TNUMBER ? lua_tostring(L, idx) : luaL_typename(L, idx));
    return -1;
  }
  a->status = (int)s;
  int bi = idx + 1, hi = idx + 2;
  if (n >= 2 && lua_type(L, bi) == LUA_TTABLE) {
    mg_buf_reserve(&a->body, 4096);          /* one allocation for the usual document */
    if (mg_json_encode_value(L, bi, &a->body, err, errlen) != 0) return -1;
    a->ctype = "application/json";
  } else if (n >= 2 && (lua_type(L, bi) == LUA_TSTRING || lua_type(L, bi) == LUA_TNUMBER)) {
    size_t bl;
    const char *b = lua_tolstring(L, bi, &bl);
    mg_buf_append(&a->body, b, bl);
    a->ctype = "text/plain; charset=utf-8";
  } else if (n >= 2 && !lua_isnil(L, bi)) {
    snprintf(err, errlen, "the body must be a string or a table, got a %s value",
             luaL_typename(L, bi));
    return -1;
  }
  if (n >= 3 && read_headers(L, hi, a, err, errlen) != 0) return -1;
  return 0;
}

/* Sends A as the response. */
static void send_answer(mg_request_t *req, answer_t *a) {
  mg_request_respond(req, a->status, a->body.len || a->ctype ? a->ctype : NULL,
                     a->body.data ? a->body.data : "", a->body.len, a->head.data, a->head.len);
}

/* A hook failed: log it, answer 500 (or cut a response already under way). */
static void hook_failed(hookrun_t *h, const char *hook, const char *msg, const char *tb) {
  mg_request_t *req = h->req;
  log_script_error(req, hook, msg, tb);
  hookrun_drop_run(h);
  mg_request_error(req, MG_HTTP_E_SCRIPT_ERROR);
}

/* ---- response hooks ---------------------------------------------------------------------- */

static void push_res_table(lua_State *L, const mg_hook_response_t *r) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, r->status);
  lua_setfield(L, -2, "status");
  lua_createtable(L, 0, (int)r->nheaders);
  for (size_t i = 0; i < r->nheaders; i++) {
    const mg_header_t *hd = &r->headers[i];
    push_lower(L, hd->name, hd->name_len);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    int cookie = mg_http_ieq_n(hd->name, hd->name_len, "set-cookie", 10);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, hd->value, hd->value_len);
      if (cookie) {                          /* Set-Cookie is never joined: a list */
        lua_createtable(L, 1, 0);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
      }
    } else if (cookie) {
      lua_pushlstring(L, hd->value, hd->value_len);
      lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
    } else {                                 /* repeated: joined with ", " (RFC 9110) */
      lua_pushlstring(L, ", ", 2);
      lua_pushlstring(L, hd->value, hd->value_len);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, headers_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "headers");
  lua_rawgeti(L, LUA_REGISTRYINDEX, H.res_mt);
  lua_setmetatable(L, -2);
}

void mg_hooks_run_response(mg_request_t *req, mg_hook_response_t *resp) {
  hookrun_t *h = hookrun_get(req);
  if (!h || hookrun_ready(h) != 0) {
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  h->resp = resp;
  h->resp_body.len = 0;
  h->resp_body_known = 0;
  h->resp_replaced = 0;
  h->nfilters = 0;
  lua_State *co = mg_lua_run_thread(h->task.run);
  push_res_table(co, resp);
  if (h->res_ref >= 0) luaL_unref(co, LUA_REGISTRYINDEX, h->res_ref);
  h->res_ref = luaL_ref(co, LUA_REGISTRYINDEX);
  push_list_step(h, "response", h->res_ref);
  step_go(h, MG_HOOK_RESPONSE);
}

void mg_hooks_body_ready(mg_request_t *req, const char *data, size_t len) {
  hookrun_t *h = hookrun_of(req);
  if (!h || !h->resp_body_waiting) return;
  h->resp_body_waiting = 0;
  lua_State *co = mg_lua_run_thread(h->task.run);
  if (!data) {
    lua_pushnil(co);
    lua_pushliteral(co, "the upstream body could not be read");
    mg_task_wake(&h->task, 2);
    return;
  }
  h->resp_body.len = 0;
  mg_buf_append(&h->resp_body, data, len);
  h->resp_body_known = 1;
  lua_pushlstring(co, data, len);
  mg_task_wake(&h->task, 1);
}

int mg_hooks_response_replaced(const mg_request_t *req) {
  const hookrun_t *h = hookrun_of(req);
  return h && h->resp_replaced;
}

int mg_hooks_response_head(mg_request_t *req, mg_buf_t *out) {
  hookrun_t *h = hookrun_of(req);
  if (h->resp_replaced) {
    mg_buf_append(out, h->resp_head.data, h->resp_head.len);
    return h->resp_status;
  }
  lua_State *L = mg_lua_run_thread(h->task.run ? h->task.run : NULL);
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->res_ref);
  int status = h->resp->status;
  lua_getfield(L, -1, "status");
  lua_Number s = lua_tonumber(L, -1);
  if (lua_type(L, -1) == LUA_TNUMBER && s == (int)s && s >= 200 && s <= 599) status = (int)s;
  else mg_log_error("request %s: response hook set an invalid res.status; keeping %d", req->id,
                    status);
  lua_pop(L, 1);
  lua_getfield(L, -1, "headers");
  answer_t a;
  memset(&a, 0, sizeof a);
  char err[256];
  if (read_headers(L, lua_gettop(L), &a, err, sizeof err) != 0) {
    mg_log_error("request %s: response hook: %s; the upstream's headers are sent", req->id, err);
    for (size_t i = 0; i < h->resp->nheaders; i++) {
      const mg_header_t *hd = &h->resp->headers[i];
      add_header_line(out, hd->name, hd->name_len, hd->value, hd->value_len, err, sizeof err);
    }
  } else {
    if (a.ctype) mg_buf_printf(out, "Content-Type: %s\r\n", a.ctype);
    mg_buf_append(out, a.head.data, a.head.len);
  }
  answer_dispose(&a);
  lua_settop(L, top);
  return status;
}

int mg_hooks_response_body(mg_request_t *req, const char **data, size_t *len) {
  hookrun_t *h = hookrun_of(req);
  if (!h || !h->resp_body_known) return 0;
  *data = h->resp_body.data ? h->resp_body.data : "";
  *len = h->resp_body.len;
  return 1;
}

int mg_hooks_has_filters(mg_request_t *req) {
  hookrun_t *h = hookrun_of(req);
  return h && h->nfilters > 0 && h->task.run;
}

int mg_hooks_filter(mg_request_t *req, const char *data, size_t len, int eof, mg_buf_t *out) {
  hookrun_t *h = hookrun_of(req);
  lua_State *co = mg_lua_run_thread(h->task.run);
  lua_rawgeti(co, LUA_REGISTRYINDEX, H.run_filters);
  lua_rawgeti(co, LUA_REGISTRYINDEX, h->res_ref);
  lua_pushlightuserdata(co, (void *)&filters_key);
  lua_rawget(co, -2);
  lua_replace(co, -2);
  lua_pushlstring(co, data, len);
  lua_pushboolean(co, eof);
  h->task.hook = MG_HOOK_FILTER;
  mg_task_t *prev = mg_task_enter(&h->task);
  mg_lua_status_t st = mg_lua_vm_resume(h->task.run, 4);
  mg_task_enter(prev);
  int n = lua_gettop(co);
  if (st == MG_LUA_YIELD && n == 2) {
    lua_rawgeti(co, LUA_REGISTRYINDEX, H.end_marker);
    int ended = lua_rawequal(co, 1, -1);
    lua_pop(co, 1);
    if (ended && lua_type(co, 2) == LUA_TSTRING) {
      size_t ol;
      const char *o = lua_tolstring(co, 2, &ol);
      mg_buf_append(out, o, ol);
      lua_settop(co, 0);
      return 0;
    }
  }
  if (st == MG_LUA_ERROR) log_script_error(req, "body filter", mg_lua_run_error(h->task.run),
                                           mg_lua_run_traceback(h->task.run));
  else log_script_error(req, "body filter", "a body filter cannot wait for I/O", "");
  hookrun_drop_run(h);
  h->nfilters = 0;
  return -1;
}

/* ---- finishing a step --------------------------------------------------------------------- */

/* A response hook failed: logged; the response becomes the gateway's JSON 500 (the producer
 * sends it, or cuts a response already under way). */
static void response_hook_failed(hookrun_t *h, const char *msg, const char *tb) {
  mg_request_t *req = h->req;
  log_script_error(req, "response", msg, tb);
  hookrun_drop_run(h);
  h->resp_replaced = 1;
  h->resp_status = 500;
  h->resp_head.len = 0;
  mg_buf_puts(&h->resp_head, "Content-Type: application/json\r\n");
  h->resp_body.len = 0;
  mg_buf_printf(&h->resp_body, "{\"error\":\"script error\",\"status\":500,\"request_id\":\"%s\"}",
                req->id);
  h->resp_body_known = 1;
  h->nfilters = 0;
  h->resp->done(req);
}

/* The step of the request phases finished with the results at 2..N of the stack. */
static void phase_finished(hookrun_t *h, lua_State *co, int n) {
  mg_request_t *req = h->req;
  int hook = h->step;
  h->step = -1;
  int has_answer = n >= 2 && !lua_isnil(co, 2);
  char err[300];
  answer_t a;

  if (hook == MG_HOOK_RESPONSE) {
    mg_hook_response_t *resp = h->resp;
    if (has_answer) {
      if (read_answer(co, 2, n - 1, &a, err, sizeof err) != 0) {
        lua_settop(co, 0);
        answer_dispose(&a);
        response_hook_failed(h, err, "");
        return;
      }
      h->resp_replaced = 1;
      h->resp_status = a.status;
      h->resp_head.len = 0;
      if (a.ctype) mg_buf_printf(&h->resp_head, "Content-Type: %s\r\n", a.ctype);
      mg_buf_append(&h->resp_head, a.head.data, a.head.len);
      h->resp_body.len = 0;
      mg_buf_append(&h->resp_body, a.body.data, a.body.len);
      h->resp_body_known = 1;
      h->nfilters = 0;
      answer_dispose(&a);
    }
    lua_settop(co, 0);
    resp->done(req);
    return;
  }

  if (!has_answer) {
    lua_settop(co, 0);
    if (hook == MG_HOOK_HANDLER) {
      log_script_error(req, "handler", "the handler returned no status (return status, body)", "");
      mg_request_error(req, MG_HTTP_E_SCRIPT_ERROR);
      return;
    }
    mg_request_continue(req);
    return;
  }
  if (read_answer(co, 2, n - 1, &a, err, sizeof err) != 0) {
    lua_settop(co, 0);
    answer_dispose(&a);
    char msg[400];
    snprintf(msg, sizeof msg, "bad answer: %s", err);
    hook_failed(h, mg_hook_name(hook), msg, "");
    return;
  }
  lua_settop(co, 0);
  if (hook == MG_HOOK_HANDLER && (req->route->hooks & MG_HOOK_BIT(MG_HOOK_RESPONSE))) {
    mg_request_handler_answer(req, a.status, a.ctype, a.body.data ? a.body.data : "", a.body.len,
                              a.head.data, a.head.len);
    answer_dispose(&a);
    return;
  }
  send_answer(req, &a);
  answer_dispose(&a);
}

static void step_finished(hookrun_t *h, mg_lua_status_t st) {
  int hook = h->step;
  lua_State *co = mg_lua_run_thread(h->task.run);
  if (st == MG_LUA_YIELD) {
    int n = lua_gettop(co);
    if (mg_task_is_io_yield(co, n)) return;  /* waiting: the operation wakes the task */
    lua_rawgeti(co, LUA_REGISTRYINDEX, H.end_marker);
    int ended = n >= 1 && lua_rawequal(co, 1, -1);
    lua_pop(co, 1);
    if (ended) {
      phase_finished(h, co, n);
      return;
    }
    h->step = -1;
    if (hook == MG_HOOK_RESPONSE) {
      response_hook_failed(h, "coroutine.yield called outside a coroutine", "");
      return;
    }
    hook_failed(h, mg_hook_name(hook), "coroutine.yield called outside a coroutine", "");
    return;
  }
  h->step = -1;
  const char *msg = st == MG_LUA_DONE ? "the hook driver ended" : mg_lua_run_error(h->task.run);
  const char *tb = st == MG_LUA_DONE ? "" : mg_lua_run_traceback(h->task.run);
  if (hook == MG_HOOK_RESPONSE) {
    response_hook_failed(h, msg, tb);
    return;
  }
  hook_failed(h, mg_hook_name(hook), msg, tb);
}

/* ---- the request phases ----------------------------------------------------------------- */

void mg_hooks_run(mg_request_t *req, int hook) {
  hookrun_t *h = hookrun_get(req);
  if (!h || hookrun_ready(h) != 0) {
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  lua_State *co = mg_lua_run_thread(h->task.run);
  if (hook == MG_HOOK_HANDLER) {
    push_hook_value(co, req, "handler");
    lua_rawgeti(co, LUA_REGISTRYINDEX, h->req_slot);
    lua_pushnil(co);
    lua_pushnil(co);
  } else {
    push_list_step(h, hook == MG_HOOK_REQUEST ? "request" : "access", -1);
  }
  step_go(h, hook);
}

const mg_header_edit_t *mg_hooks_header_edits(const mg_request_t *req, size_t *n) {
  hookrun_t *h = hookrun_of(req);
  *n = h ? h->nedits : 0;
  return h ? h->edits : NULL;
}

int mg_hooks_request_body(const mg_request_t *req, const char **data, size_t *len) {
  hookrun_t *h = hookrun_of(req);
  if (!h || !h->body_read) return 0;
  *data = h->body.data ? h->body.data : "";
  *len = h->body.len;
  return 1;
}

/* ---- log hooks ------------------------------------------------------------------------------ */

typedef struct logtask {
  mg_task_t task;
  mg_request_t *req_for_errors;   /* NULL once the request is gone */
  char id[33];
} logtask_t;

static void logtask_free(logtask_t *lt) {
  mg_lua_run_free(lt->task.run);
  if (lt->task.gen) mg_gen_release(lt->task.gen);
  free(lt);
}

static void log_resumed(mg_task_t *t, mg_lua_status_t st) {
  logtask_t *lt = t->data;
  lua_State *co = mg_lua_run_thread(t->run);
  if (st == MG_LUA_YIELD && mg_task_is_io_yield(co, lua_gettop(co))) return;
  if (st == MG_LUA_ERROR) {
    mg_log_error("request %s: log hook failed: %s\n%s", lt->id, mg_lua_run_error(t->run),
                 mg_lua_run_traceback(t->run));
  } else if (st == MG_LUA_YIELD) {
    mg_log_error("request %s: log hook failed: coroutine.yield called outside a coroutine",
                 lt->id);
  }
  logtask_free(lt);
}

/* Copies the req fields into the environment table of the req object at OBJ, so they outlive
 * the request. */
static void snapshot_req(lua_State *L, int obj, mg_request_t *req) {
  push_req_fields(L, obj, 1);
  int t = lua_gettop(L);
  for (int i = 0; req_fields[i]; i++) {
    lua_pushstring(L, req_fields[i]);
    lua_rawget(L, t);
    int cached = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (cached) continue;
    int cache;
    if (push_field(L, req, req_fields[i], &cache)) {   /* raw: the fields are read-only */
      lua_pushstring(L, req_fields[i]);
      lua_insert(L, -2);
      lua_rawset(L, t);
    }
  }
  lua_pop(L, 1);
}

void mg_hooks_run_log(mg_request_t *req) {
  if (!req->route || !req->gen || !(req->route->hooks & MG_HOOK_BIT(MG_HOOK_LOG))) return;
  hookrun_t *h = hookrun_get(req);
  if (!h || hookrun_ready(h) != 0) return;
  logtask_t *lt = calloc(1, sizeof *lt);
  if (!lt) return;
  lt->task.run = mg_lua_run_new(H.vm);
  if (!lt->task.run) {
    free(lt);
    return;
  }
  memcpy(lt->id, req->id, sizeof lt->id);
  lt->task.w = req->w;
  lt->task.gen = mg_gen_hold(req->gen);
  lt->task.hook = MG_HOOK_LOG;
  lt->task.resumed = log_resumed;
  lt->task.data = lt;
  lua_State *co = mg_lua_run_thread(lt->task.run);
  lua_rawgeti(co, LUA_REGISTRYINDEX, H.run_list);
  push_hook_value(co, req, "log");
  lua_rawgeti(co, LUA_REGISTRYINDEX, h->req_slot);
  snapshot_req(co, lua_gettop(co), req);
  /* res: what was answered. */
  lua_createtable(co, 0, 6);
  lua_pushinteger(co, req->status);
  lua_setfield(co, -2, "status");
  lua_pushnumber(co, (double)req->bytes_out);
  lua_setfield(co, -2, "bytes_sent");
  lua_pushnumber(co, (double)req->bytes_in);
  lua_setfield(co, -2, "bytes_received");
  lua_pushnumber(co, (double)(uv_hrtime() - req->start_ns) / 1e9);
  lua_setfield(co, -2, "duration");
  if (req->upstream_name) {
    if (req->route->upstream) {
      lua_pushstring(co, req->route->upstream);
      lua_setfield(co, -2, "upstream");
    }
    lua_pushstring(co, req->upstream_name);     /* the target, "host:port" */
    lua_setfield(co, -2, "target");
    lua_pushnumber(co, req->upstream_time);
    lua_setfield(co, -2, "upstream_time");
  }
  mg_task_t *prev = mg_task_enter(&lt->task);
  mg_lua_status_t st = mg_lua_vm_resume(lt->task.run, 3);
  mg_task_enter(prev);
  log_resumed(&lt->task, st);
}

/* ---- freeing -------------------------------------------------------------------------------- */

void mg_hooks_request_free(mg_request_t *req) {
  hookrun_t *h = hookrun_of(req);
  if (!h) return;
  req->hooks = NULL;
  mg_task_cancel(&h->task);
  lua_State *L = mg_lua_vm_state(H.vm);
  if (h->res_ref >= 0) luaL_unref(L, LUA_REGISTRYINDEX, h->res_ref);
  for (size_t i = 0; i < h->nedits; i++) {
    free(h->edits[i].name);
    free(h->edits[i].value);
  }
  free(h->edits);
  free(h->path);
  /* A coroutine whose driver waits at the end of a step is kept for the next request. */
  int idle = h->task.run && h->started && h->step == -1 && !h->resp_body_waiting &&
             !h->body_waiting;
  int keep = idle && nspare_runs < MG_SPARE_HOOKRUNS && !req->w->stopping;
  hookrun_drop_obj(h, !keep);
  if (keep) {
    lua_settop(mg_lua_run_thread(h->task.run), 0);
    mg_lua_run_t *run = h->task.run;
    int slot = h->req_slot;
    mg_buf_t body = h->body, resp_body = h->resp_body, resp_head = h->resp_head;
    mg_buf_reset(&body, 16 * 1024);
    mg_buf_reset(&resp_body, 16 * 1024);
    mg_buf_reset(&resp_head, 4 * 1024);
    memset(h, 0, sizeof *h);
    h->task.run = run;
    h->req_slot = slot;
    h->started = 1;
    h->step = -1;
    h->body = body;
    h->resp_body = resp_body;
    h->resp_head = resp_head;
    spare_runs[nspare_runs++] = h;
    return;
  }
  mg_lua_run_free(h->task.run);
  mg_buf_dispose(&h->body);
  mg_buf_dispose(&h->resp_body);
  mg_buf_dispose(&h->resp_head);
  free(h);
}

void mg_hooks_free_spares(void) {
  while (nspare_runs) {
    hookrun_t *h = spare_runs[--nspare_runs];
    hookrun_drop_obj(h, 1);
    mg_lua_run_free(h->task.run);
    mg_buf_dispose(&h->body);
    mg_buf_dispose(&h->resp_body);
    mg_buf_dispose(&h->resp_head);
    free(h);
  }
}
