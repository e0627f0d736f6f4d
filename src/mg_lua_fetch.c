/* mg_lua_fetch: mg.fetch and mg.fetch_all on mg_fetch (see mg_lua_fetch.h for the Lua API).
 *
 * Both functions share one path: every call is read from its Lua arguments into a spec
 * (checked whole before anything starts), the specs become mg_fetch exchanges grouped in one
 * operation, and the task waits for the operation (mg_task_wait). When its last exchange
 * ends, the results are built and the task is woken with them.
 *
 * Memory. A Lua error can unwind through these functions at any allocation (the VM has a
 * memory cap), so what the parsing step holds outside Lua's heap (the buffers of each spec)
 * is kept by the process and reused by the next call (get_specs), so an unwound call leaks
 * nothing. The results are built on the VM's main state under lua_cpcall, so running out of
 * memory there is an ordinary error, and then moved onto the task's coroutine. Only those last pushes onto the suspended coroutine are unprotected,
 * as for every mg API function that wakes a task: they grow its stack only when a result
 * list is longer than the free room the stack already has (a long mg.fetch_all). */
#include "mg_lua_fetch.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "mg_buf.h"
#include "mg_fetch.h"
#include "mg_gen.h"
#include "mg_http.h"
#include "mg_lua_json.h"
#include "mg_task.h"
#include "mg_upstream.h"
#include "mg_worker.h"

/* The longest timeout accepted, in seconds (a day). */
#define MAX_TIMEOUT 86400.0

/* Registry keys (their addresses): the res metatable, the results being handed over. */
static const char res_mt_key;
static const char results_key;

/* ------------------------------------------------------------------------------------------
 * Specs: one call as read from Lua.
 * ---------------------------------------------------------------------------------------- */

typedef struct spec {
  mg_upstream_t *up;              /* a configured upstream, or NULL for a URL target */
  char host[MG_FETCH_MAX_HOST];   /* a URL target's host and port */
  int port;
  int early_err;                  /* known before starting (an https URL), else 0 */
  char prefix[300];               /* what errors start with: the name or host:port */
  char method[40];
  double timeout;                 /* seconds; 0 = none given */
  mg_buf_t path;                  /* NUL-terminated once read */
  mg_buf_t hdrs;                  /* "name\0value\0" per header */
  mg_buf_t body;
  const char **hv;                /* name, value pointers into hdrs (malloc'd) */
  size_t nh;
} spec_t;

/* The specs of the call being read: the process's own, reused. A call reads them, starts its
 * exchanges (mg_fetch_start copies what it needs) and is done with them before it waits or
 * returns, and nothing in between runs Lua code that could call mg.fetch again; an argument
 * error leaves them as they are and the next call resets them. So a fetch makes no Lua object
 * for them, and no allocation once their buffers have grown (up to SPEC_KEEP bytes each). */
#define SPEC_KEEP (64 * 1024)
static spec_t *specs;
static size_t nspecs;

/* N reset specs (the first N of the kept ones), or raises. */
static spec_t *get_specs(lua_State *L, size_t n) {
  if (n > nspecs) {
    spec_t *more = realloc(specs, n * sizeof *more);
    if (!more) {
      luaL_error(L, "out of memory");
      return NULL;
    }
    memset(more + nspecs, 0, (n - nspecs) * sizeof *more);
    specs = more;
    nspecs = n;
  }
  for (size_t i = 0; i < n; i++) {
    spec_t *sp = &specs[i];
    mg_buf_t path = sp->path, hdrs = sp->hdrs, body = sp->body;
    free(sp->hv);
    mg_buf_reset(&path, SPEC_KEEP);
    mg_buf_reset(&hdrs, SPEC_KEEP);
    mg_buf_reset(&body, SPEC_KEEP);
    sp->up = NULL;
    sp->host[0] = sp->prefix[0] = sp->method[0] = '\0';
    sp->port = sp->early_err = 0;
    sp->timeout = 0;
    sp->path = path;
    sp->hdrs = hdrs;
    sp->body = body;
    sp->hv = NULL;
    sp->nh = 0;
  }
  return specs;
}

void mg_lua_fetch_free_specs(void) {
  for (size_t i = 0; i < nspecs; i++) {
    mg_buf_dispose(&specs[i].path);
    mg_buf_dispose(&specs[i].hdrs);
    mg_buf_dispose(&specs[i].body);
    free(specs[i].hv);
  }
  free(specs);
  specs = NULL;
  nspecs = 0;
}

/* Where an argument error is raised from: "mg.fetch: ..." or "mg.fetch_all: call #2: ...". */
typedef struct ctx {
  lua_State *L;
  mg_task_t *t;
  const char *fname;
  int callno;                     /* 0 for mg.fetch */
} ctx_t;

__attribute__((format(printf, 2, 3)))
static int arg_error(const ctx_t *c, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (c->callno) return luaL_error(c->L, "%s: call #%d: %s", c->fname, c->callno, msg);
  return luaL_error(c->L, "%s: %s", c->fname, msg);
}

/* Reads a timeout in seconds at IDX (nil: 0). */
static double check_timeout(const ctx_t *c, int idx, const char *what) {
  int ty = lua_type(c->L, idx);
  if (ty == LUA_TNIL || ty == LUA_TNONE) return 0;
  double d = ty == LUA_TNUMBER ? lua_tonumber(c->L, idx) : -1;
  if (!(d > 0) || d > MAX_TIMEOUT)
    arg_error(c, "%s must be a positive number of seconds (at most %g)", what, MAX_TIMEOUT);
  return d;
}

static int is_unreserved(unsigned char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
         ch == '-' || ch == '.' || ch == '_' || ch == '~';
}

/* Appends S percent-encoded (RFC 3986: unreserved bytes stay). */
static int append_encoded(mg_buf_t *b, const char *s, size_t len) {
  static const char hex[] = "0123456789ABCDEF";
  int rc = 0;
  for (size_t i = 0; i < len && rc == 0; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (is_unreserved(ch)) {
      rc = mg_buf_append(b, s + i, 1);
    } else {
      char e[3] = {'%', hex[ch >> 4], hex[ch & 15]};
      rc = mg_buf_append(b, e, 3);
    }
  }
  return rc;
}

typedef struct qkey {
  const char *s;
  size_t len;
} qkey_t;

static int qkey_cmp(const void *a, const void *b) {
  const qkey_t *x = a, *y = b;
  size_t n = x->len < y->len ? x->len : y->len;
  int c = memcmp(x->s, y->s, n);
  return c ? c : (x->len > y->len) - (x->len < y->len);
}

static void oom(const ctx_t *c, int rc) {
  if (rc) arg_error(c, "out of memory");
}

/* Appends the query table at Q (absolute index) to the path, keys sorted. */
static void read_query(const ctx_t *c, spec_t *sp, int q) {
  lua_State *L = c->L;
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, q)) {
    int vt = lua_type(L, -1);
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) arg_error(c, "query keys must be strings");
    if (vt != LUA_TSTRING && vt != LUA_TNUMBER && vt != LUA_TBOOLEAN)
      arg_error(c, "query value of \"%.60s\" must be a string, number or boolean",
            lua_tostring(L, -1));
    n++;
  }
  if (n == 0) return;
  /* The keys stay alive in the query table, which the caller's stack holds. */
  qkey_t *keys = lua_newuserdata(L, n * sizeof *keys);
  size_t i = 0;
  lua_pushnil(L);
  while (lua_next(L, q)) {
    lua_pop(L, 1);
    keys[i].s = lua_tolstring(L, -1, &keys[i].len);
    i++;
  }
  qsort(keys, n, sizeof *keys, qkey_cmp);
  mg_buf_t *b = &sp->path;
  const char *qm = memchr(b->data, '?', b->len);
  char last = b->data[b->len - 1];
  if (!qm) oom(c, mg_buf_append(b, "?", 1));
  else if (last != '?' && last != '&') oom(c, mg_buf_append(b, "&", 1));
  for (i = 0; i < n; i++) {
    if (i) oom(c, mg_buf_append(b, "&", 1));
    oom(c, append_encoded(b, keys[i].s, keys[i].len));
    oom(c, mg_buf_append(b, "=", 1));
    lua_pushlstring(L, keys[i].s, keys[i].len);
    lua_rawget(L, q);
    size_t vl;
    const char *v;
    if (lua_type(L, -1) == LUA_TBOOLEAN) {
      v = lua_toboolean(L, -1) ? "true" : "false";
      vl = strlen(v);
    } else {
      v = lua_tolstring(L, -1, &vl);         /* a number converts on this stack copy */
    }
    oom(c, append_encoded(b, v, vl));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);                             /* the keys */
}

/* Reads the headers table at H (absolute index). Returns whether it named a Content-Type. */
static int read_headers(const ctx_t *c, spec_t *sp, int h) {
  lua_State *L = c->L;
  int has_ct = 0;
  lua_pushnil(L);
  while (lua_next(L, h)) {
    if (lua_type(L, -2) != LUA_TSTRING) arg_error(c, "header names must be strings");
    size_t nl, vl;
    const char *n = lua_tolstring(L, -2, &nl);
    int vt = lua_type(L, -1);
    if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
      arg_error(c, "the value of header \"%.60s\" must be a string or a number, got %s", n,
            luaL_typename(L, -1));
    lua_pushvalue(L, -1);                    /* a number converts on this copy, not the table */
    const char *v = lua_tolstring(L, -1, &vl);
    if (!mg_http_is_token(n, nl)) arg_error(c, "invalid header name \"%.60s\"", n);
    if (memchr(v, '\0', vl) || memchr(v, '\r', vl) || memchr(v, '\n', vl))
      arg_error(c, "the value of header \"%.60s\" contains CR, LF or NUL", n);
    if (nl == 12 && strncasecmp(n, "content-type", 12) == 0) has_ct = 1;
    oom(c, mg_buf_append(&sp->hdrs, n, nl + 1) || mg_buf_append(&sp->hdrs, v, vl + 1));
    sp->nh++;
    lua_pop(L, 2);
  }
  return has_ct;
}

static const char *const option_names[] = {"path", "method", "headers", "body", "query",
                                           "timeout", NULL};

/* Raises when the table at T has a key other than NAMES (or 1..NPOS when NPOS > 0). */
static void check_keys(const ctx_t *c, int t, const char *const *names, size_t npos,
                       const char *what) {
  lua_State *L = c->L;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TNUMBER) {
      double k = lua_tonumber(L, -1);
      if (npos && k >= 1 && k <= (double)npos && k == floor(k)) continue;
      arg_error(c, "unknown %s key %g", what, k);
    }
    if (lua_type(L, -1) != LUA_TSTRING) arg_error(c, "unknown %s key (a %s)", what, luaL_typename(L, -1));
    const char *k = lua_tostring(L, -1);
    int known = 0;
    for (size_t i = 0; names[i]; i++) known |= strcmp(names[i], k) == 0;
    if (!known) arg_error(c, "unknown %s \"%.60s\"", what, k);
  }
}

/* Pushes T[KEY] (raw). */
static int rawfield(lua_State *L, int t, const char *key) {
  lua_pushstring(L, key);
  lua_rawget(L, t);
  return lua_type(L, -1);
}

/* Reads one call: the target at TI, path-or-options at OI (absolute indexes), ENTRY_TIMEOUT
 * given beside them (mg.fetch_all). Raises on any bad argument; leaves the stack as it was. */
static void read_call(const ctx_t *c, spec_t *sp, int ti, int oi, double entry_timeout) {
  lua_State *L = c->L;
  int top = lua_gettop(L);
  /* The target. */
  if (lua_type(L, ti) != LUA_TSTRING)
    arg_error(c, "the target must be an upstream name or an http:// URL, got %s",
          luaL_typename(L, ti));
  size_t tl;
  const char *target = lua_tolstring(L, ti, &tl);
  if (strlen(target) != tl) arg_error(c, "the target contains a NUL byte");
  int is_url = strncasecmp(target, "http://", 7) == 0 || strncasecmp(target, "https://", 8) == 0;
  const char *upath = "";
  size_t upath_len = 0;
  if (is_url) {
    int rc = mg_fetch_parse_url(target, sp->host, sizeof sp->host, &sp->port, &upath, &upath_len);
    if (rc == MG_FETCH_E_HTTPS) {
      sp->early_err = rc;
      snprintf(sp->prefix, sizeof sp->prefix, "%.200s", target);
    } else if (rc != 0) {
      arg_error(c, "invalid URL \"%.100s\" (expected http://host[:port][/path])", target);
    } else if (strchr(sp->host, ':')) {
      snprintf(sp->prefix, sizeof sp->prefix, "[%s]:%d", sp->host, sp->port);
    } else {
      snprintf(sp->prefix, sizeof sp->prefix, "%s:%d", sp->host, sp->port);
    }
  } else {
    mg_gen_t *g = c->t->gen ? c->t->gen : c->t->w->gen;
    sp->up = g ? mg_gen_upstream(g, target) : NULL;
    if (!sp->up) arg_error(c, "unknown upstream \"%.100s\"", target);
    size_t tl = strlen(target);              /* an upstream name: short, checked above */
    if (tl >= sizeof sp->prefix) tl = sizeof sp->prefix - 1;
    memcpy(sp->prefix, target, tl);
    sp->prefix[tl] = '\0';
  }

  /* The path, or the options. */
  int ot = lua_type(L, oi);
  const char *path = NULL;
  size_t plen = 0;
  int opts = ot == LUA_TTABLE;
  if (ot == LUA_TSTRING) {
    if (is_url) arg_error(c, "with a URL target the second argument must be an options table");
    path = lua_tolstring(L, oi, &plen);
  } else if (!opts && ot != LUA_TNIL && ot != LUA_TNONE) {
    arg_error(c, "the second argument must be a path or an options table, got %s",
          luaL_typename(L, oi));
  }
  if (opts) {
    check_keys(c, oi, option_names, 0, "option");
    int ty = rawfield(L, oi, "path");
    if (ty == LUA_TSTRING) path = lua_tolstring(L, -1, &plen);   /* held by the options */
    else if (ty != LUA_TNIL) arg_error(c, "path must be a string, got %s", luaL_typename(L, -1));
    lua_pop(L, 1);
  }
  if (is_url && path && upath_len) arg_error(c, "give the path in the URL or in the options, not both");
  if (path && (plen == 0 || path[0] != '/')) arg_error(c, "the path must start with '/'");
  if (path && strlen(path) != plen) arg_error(c, "the path contains a NUL byte");
  if (!path && upath_len && upath[0] == '/') {
    path = upath;
    plen = upath_len;
  } else if (!path) {                        /* "/" (and a URL's "?query" after it) */
    oom(c, mg_buf_append(&sp->path, "/", 1));
    path = upath;
    plen = upath_len;
  }
  oom(c, mg_buf_append(&sp->path, path, plen));

  strcpy(sp->method, "GET");
  double opt_timeout = 0;
  int has_ct = 0, json_body = 0;
  if (opts) {
    int ty = rawfield(L, oi, "query");
    if (ty == LUA_TTABLE) read_query(c, sp, lua_gettop(L));
    else if (ty != LUA_TNIL) arg_error(c, "query must be a table, got %s", luaL_typename(L, -1));
    lua_pop(L, 1);

    ty = rawfield(L, oi, "method");
    if (ty == LUA_TSTRING) {
      size_t ml;
      const char *m = lua_tolstring(L, -1, &ml);
      if (ml == 0 || ml >= sizeof sp->method || !mg_http_is_token(m, ml))
        arg_error(c, "invalid method \"%.40s\"", m);
      for (size_t i = 0; i <= ml; i++)
        sp->method[i] = (char)(m[i] >= 'a' && m[i] <= 'z' ? m[i] - 32 : m[i]);
    } else if (ty != LUA_TNIL) {
      arg_error(c, "method must be a string, got %s", luaL_typename(L, -1));
    }
    lua_pop(L, 1);

    ty = rawfield(L, oi, "headers");
    if (ty == LUA_TTABLE) has_ct = read_headers(c, sp, lua_gettop(L));
    else if (ty != LUA_TNIL) arg_error(c, "headers must be a table, got %s", luaL_typename(L, -1));
    lua_pop(L, 1);

    ty = rawfield(L, oi, "body");
    if (ty == LUA_TSTRING) {
      size_t bl;
      const char *b = lua_tolstring(L, -1, &bl);
      oom(c, mg_buf_append(&sp->body, b, bl));
    } else if (ty == LUA_TTABLE) {
      char err[128];
      if (mg_json_encode_value(L, -1, &sp->body, err, sizeof err) != 0)
        arg_error(c, "body: %s", err);
      json_body = 1;
    } else if (ty != LUA_TNIL) {
      arg_error(c, "body must be a string or a table, got %s", luaL_typename(L, -1));
    }
    lua_pop(L, 1);

    rawfield(L, oi, "timeout");
    opt_timeout = check_timeout(c, lua_gettop(L), "timeout");
    lua_pop(L, 1);
  }
  if (opt_timeout > 0 && entry_timeout > 0)
    arg_error(c, "timeout is given both beside the call and in its options");
  sp->timeout = opt_timeout > 0 ? opt_timeout : entry_timeout;
  if (json_body && !has_ct) {
    static const char ct[] = "Content-Type\0application/json";
    oom(c, mg_buf_append(&sp->hdrs, ct, sizeof ct));
    sp->nh++;
  }
  oom(c, mg_buf_append(&sp->path, "", 1));

  /* Header pointers, now that the buffer no longer moves; then the client's own checks. */
  if (sp->nh) {
    sp->hv = malloc(2 * sp->nh * sizeof *sp->hv);
    if (!sp->hv) arg_error(c, "out of memory");
    const char *p = sp->hdrs.data;
    for (size_t i = 0; i < 2 * sp->nh; i++) {
      sp->hv[i] = p;
      p += strlen(p) + 1;
    }
  }
  mg_fetch_req_t req = {.method = sp->method, .path = sp->path.data, .headers = sp->hv,
                        .nheaders = sp->nh};
  char err[160];
  if (mg_fetch_check_req(&req, err, sizeof err) != 0) arg_error(c, "%s", err);
  lua_settop(L, top);
}

/* ------------------------------------------------------------------------------------------
 * Results.
 * ---------------------------------------------------------------------------------------- */

/* The key (its address) under which a res table keeps its raw header block until
 * res.headers is first read. */
static const char raw_headers_key = 0;

/* res.headers from the raw block: "name\0value\0" per field, names already lower-case. */
static int build_headers(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&raw_headers_key);
  lua_rawget(L, 1);
  size_t len;
  const char *p = lua_tolstring(L, -1, &len), *end = p + len;
  lua_newtable(L);
  int t = lua_gettop(L);
  while (p && p < end) {
    size_t nl = strlen(p);
    const char *v = p + nl + 1;
    size_t vl = strlen(v);
    lua_pushlstring(L, p, nl);
    lua_pushvalue(L, -1);
    lua_rawget(L, t);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, v, vl);
    } else {                                 /* a repeated field: joined as RFC 9110 allows */
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, v, vl);
      lua_concat(L, 3);
    }
    lua_rawset(L, t);
    p = v + vl + 1;
  }
  lua_pushliteral(L, "headers");
  lua_pushvalue(L, t);
  lua_rawset(L, 1);
  lua_pushlightuserdata(L, (void *)&raw_headers_key);
  lua_pushnil(L);
  lua_rawset(L, 1);
  return 1;
}

/* res.headers, res.json and res.json_error, made on first use (upvalue 1: mg.json.decode). */
static int res_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  const char *k = lua_tostring(L, 2);
  if (strcmp(k, "headers") == 0) {
    lua_settop(L, 2);
    return build_headers(L);
  }
  int want_json = strcmp(k, "json") == 0;
  if (!want_json && strcmp(k, "json_error") != 0) return 0;
  lua_settop(L, 2);
  if (rawfield(L, 1, "json") != LUA_TNIL) return want_json ? 1 : 0;   /* decoded fine */
  if (rawfield(L, 1, "json_error") != LUA_TNIL) return want_json ? 0 : 1;
  lua_settop(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1));
  if (rawfield(L, 1, "body") != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "");
  }
  lua_call(L, 1, 2);                         /* value, or nil and the message */
  int ok = !lua_isnil(L, -2);
  lua_pushstring(L, ok ? "json" : "json_error");
  lua_pushvalue(L, ok ? -3 : -2);
  lua_rawset(L, 1);
  if (ok == want_json) {
    lua_pop(L, ok ? 1 : 0);
    return 1;
  }
  return 0;
}

/* Pushes the metatable of res tables, made on first use in this Lua state. */
static void push_res_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&res_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, luaopen_mg_json);
  lua_call(L, 0, 1);
  lua_getfield(L, -1, "decode");
  lua_remove(L, -2);
  lua_pushcclosure(L, res_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pushlightuserdata(L, (void *)&res_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Pushes res for the successful exchange F. */
static void push_res(lua_State *L, const mg_fetch_t *f) {
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, mg_fetch_status(f));
  lua_setfield(L, -2, "status");
  /* The header fields as one string; res.headers is built from it when a script reads it
   * (most aggregation code only reads status and json). NUL cannot occur in a field. */
  size_t n = mg_fetch_nheaders(f);
  luaL_Buffer b;
  lua_pushlightuserdata(L, (void *)&raw_headers_key);
  luaL_buffinit(L, &b);
  for (size_t i = 0; i < n; i++) {
    const char *name, *value;
    size_t nl, vl;
    mg_fetch_header(f, i, &name, &nl, &value, &vl);
    for (size_t j = 0; j < nl; j++)
      luaL_addchar(&b, name[j] >= 'A' && name[j] <= 'Z' ? name[j] + 32 : name[j]);
    luaL_addchar(&b, '\0');
    luaL_addlstring(&b, value, vl);
    luaL_addchar(&b, '\0');
  }
  luaL_pushresult(&b);
  lua_rawset(L, -3);
  size_t bl;
  const char *body = mg_fetch_body(f, &bl);
  lua_pushlstring(L, body, bl);
  lua_setfield(L, -2, "body");
  push_res_mt(L);
  lua_setmetatable(L, -2);
}

/* ------------------------------------------------------------------------------------------
 * Operations: the exchanges one task waits for.
 * ---------------------------------------------------------------------------------------- */

typedef struct op op_t;

typedef struct call {
  op_t *op;
  mg_fetch_t *f;                  /* NULL when the call failed before starting */
  int err;                        /* that failure */
  char prefix[300];
} call_t;

struct op {
  mg_task_t *t;
  int all;                        /* mg.fetch_all: n results and the errors table */
  int raw;                        /* mg_lua_fetch_raw_all: 2n results and the errors table */
  size_t n, pending;
  int nresults;
  call_t calls[];
};

static int call_ok(const call_t *c) { return c->f && mg_fetch_error(c->f) == 0; }

static void push_call_error(lua_State *L, const call_t *c) {
  int err = c->f ? mg_fetch_error(c->f) : c->err;
  if (err == MG_FETCH_E_TIMEOUT) {
    char secs[32];
    snprintf(secs, sizeof secs, "%g", (double)mg_fetch_timeout(c->f) / 1000.0);
    lua_pushfstring(L, "%s: timeout after %ss", c->prefix, secs);
  } else {
    lua_pushfstring(L, "%s: %s", c->prefix, mg_fetch_strerror(err));
  }
}

/* For call I of a raw op (results table at -3): its status at 2I+1 and, for a 2xx, at 2I+2
 * the body as a raw JSON value or why it is not JSON ("parse error at byte N: ..."). */
static void set_raw_result(lua_State *L, const call_t *c, size_t i) {
  int status = mg_fetch_status(c->f);
  lua_pushinteger(L, status);
  lua_rawseti(L, -3, 2 * (int)i + 1);
  if (status < 200 || status > 299) return;
  size_t bl;
  const char *body = mg_fetch_body(c->f, &bl);
  char msg[200];
  if (mg_json_push_raw(L, body, bl, msg, sizeof msg) != 0) lua_pushstring(L, msg);
  lua_rawseti(L, -3, 2 * (int)i + 2);
}

/* The number of values the Lua function returns for OP. */
static int result_count(const op_t *op) {
  return op->raw ? 2 * (int)op->n + 1 : op->all ? (int)op->n + 1 : 2;
}

/* Pushes a table holding the values the Lua function returns; returns how many there are. */
static int build_results(lua_State *L, const op_t *op) {
  lua_createtable(L, result_count(op), 0);
  if (!op->all) {
    const call_t *c = &op->calls[0];
    if (call_ok(c)) {
      push_res(L, c->f);
      lua_rawseti(L, -2, 1);
      return 1;
    }
    push_call_error(L, c);
    lua_rawseti(L, -2, 2);
    return 2;
  }
  lua_newtable(L);                           /* the errors */
  for (size_t i = 0; i < op->n; i++) {
    const call_t *c = &op->calls[i];
    if (call_ok(c) && op->raw) {
      set_raw_result(L, c, i);
    } else if (call_ok(c)) {
      push_res(L, c->f);
      lua_rawseti(L, -3, (int)i + 1);
    } else {
      push_call_error(L, c);
      lua_rawseti(L, -2, (int)i + 1);
    }
  }
  lua_rawseti(L, -2, result_count(op));
  return result_count(op);
}

/* Replaces the results table on top of L by its COUNT values. */
static void unpack_results(lua_State *L, int count) {
  int r = lua_gettop(L);
  for (int i = 1; i <= count; i++) lua_rawgeti(L, r, i);
  lua_remove(L, r);
}

static int results_cb(lua_State *L) {
  op_t *op = lua_touserdata(L, 1);
  op->nresults = build_results(L, op);
  lua_pushlightuserdata(L, (void *)&results_key);
  lua_insert(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Frees OP: the exchanges still running are cancelled (their connections closed). */
static void op_free(void *p) {
  op_t *op = p;
  for (size_t i = 0; i < op->n; i++)
    if (op->calls[i].f) mg_fetch_cancel(op->calls[i].f);
  free(op);
}

/* Every exchange of OP has ended: hand the results to the task and wake it. */
static void op_complete(op_t *op) {
  mg_task_t *t = op->t;
  lua_State *co = mg_lua_run_thread(t->run);
  lua_State *L = mg_lua_vm_state(t->w->vm);
  int count;
  if (lua_cpcall(L, results_cb, op) == 0) {
    count = op->nresults;
    lua_pushlightuserdata(L, (void *)&results_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, (void *)&results_key);
    lua_pushnil(L);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_xmove(L, co, 1);
    unpack_results(co, count);
  } else {
    /* Out of memory: nil for every result, then the message. */
    count = result_count(op);
    for (int i = 0; i < count - 1; i++) lua_pushnil(co);
    lua_xmove(L, co, 1);
  }
  op_free(op);
  mg_task_wake(t, count);
}

static void on_call_done(mg_fetch_t *f, void *data) {
  call_t *c = data;
  op_t *op = c->op;
  if (--op->pending == 0) op_complete(op);
}

/* The timeout a call runs under: its own, capped by the overall one (0: the default). */
static uint64_t call_timeout_ms(const spec_t *sp, double overall) {
  uint64_t ms = sp->timeout > 0 ? mg_ms(sp->timeout) : 0;
  if (sp->timeout > 0 && ms == 0) ms = 1;
  if (overall > 0) {
    uint64_t o = mg_ms(overall), d = ms;
    if (o == 0) o = 1;
    if (!d && sp->up) d = mg_ms(sp->up->conf->read_timeout);
    if (!d) d = MG_FETCH_DEFAULT_TIMEOUT_MS;
    ms = d < o ? d : o;
  }
  return ms;
}

/* Starts the calls read into S and waits for them (or returns at once when none could
 * start). */
static int start_op(const ctx_t *c, spec_t *sps, size_t n, int all, int raw, double overall) {
  lua_State *L = c->L;
  size_t runnable = 0;
  for (size_t i = 0; i < n; i++) runnable += sps[i].early_err == 0;
  size_t size = sizeof(op_t) + n * sizeof(call_t);
  /* With nothing to wait for, the operation lives on the Lua heap, so building the results
   * may raise without leaking it. */
  op_t *op = runnable ? calloc(1, size) : lua_newuserdata(L, size);
  if (!op) return luaL_error(L, "%s: out of memory", c->fname);
  memset(op, 0, size);
  op->t = c->t;
  op->all = all;
  op->raw = raw;
  op->n = n;
  for (size_t i = 0; i < n; i++) {
    spec_t *sp = &sps[i];
    call_t *call = &op->calls[i];
    call->op = op;
    memcpy(call->prefix, sp->prefix, sizeof call->prefix);
    if (sp->early_err) {
      call->err = sp->early_err;
      continue;
    }
    mg_fetch_req_t req = {.method = sp->method, .path = sp->path.data, .headers = sp->hv,
                          .nheaders = sp->nh, .body = sp->body.data, .body_len = sp->body.len,
                          .timeout_ms = call_timeout_ms(sp, overall)};
    call->f = sp->up ? mg_fetch_start(sp->up, &req, on_call_done, call)
                     : mg_fetch_start_url(c->t->w, sp->host, sp->port, &req, on_call_done, call);
    if (!call->f) {
      op_free(op);
      return luaL_error(L, "%s: out of memory", c->fname);
    }
    op->pending++;
  }
  if (!runnable) {
    unpack_results(L, build_results(L, op));
    return result_count(op);
  }
  /* Room for the results on this coroutine's stack, while raising is still safe. */
  if (!lua_checkstack(L, result_count(op) + 4)) {
    op_free(op);
    return luaL_error(L, "%s: stack overflow", c->fname);
  }
  return mg_task_wait(L, c->t, op, op_free);
}

/* ------------------------------------------------------------------------------------------
 * The Lua functions.
 * ---------------------------------------------------------------------------------------- */

/* mg.fetch(target, path_or_opts) -> res | nil, err */
static int l_fetch(lua_State *L) {
  ctx_t c = {L, mg_task_check(L, "mg.fetch", MG_HOOKS_ANY), "mg.fetch", 0};
  lua_settop(L, 2);
  spec_t *sps = get_specs(L, 1);
  read_call(&c, &sps[0], 1, 2, 0);
  return start_op(&c, sps, 1, 0, 0, 0);
}

static const char *const fetch_all_keys[] = {"timeout", NULL};
static const char *const entry_keys[] = {"timeout", NULL};

/* mg.fetch_all { {target, path_or_opts, timeout = s}, ..., timeout = s } -> r1, ..., rn, errs;
 * with RAW, mg_lua_fetch_raw_all's results. */
static int fetch_all(lua_State *L, int raw) {
  ctx_t c = {L, mg_task_check(L, "mg.fetch_all", MG_HOOKS_ANY), "mg.fetch_all", 0};
  if (lua_type(L, 1) != LUA_TTABLE)
    arg_error(&c, "expects a table of calls { {target, path_or_opts}, ..., timeout = s }, got %s",
          luaL_typename(L, 1));
  lua_settop(L, 1);
  size_t n = lua_objlen(L, 1);
  if (n > MG_LUA_FETCH_MAX_CALLS) arg_error(&c, "at most %d calls", MG_LUA_FETCH_MAX_CALLS);
  check_keys(&c, 1, fetch_all_keys, n, "key");
  rawfield(L, 1, "timeout");
  double overall = check_timeout(&c, 2, "timeout");
  lua_settop(L, 1);
  spec_t *sps = get_specs(L, n);
  for (size_t i = 0; i < n; i++) {
    c.callno = (int)i + 1;
    lua_rawgeti(L, 1, (int)i + 1);           /* 2: the call */
    if (lua_type(L, 2) != LUA_TTABLE)
      arg_error(&c, "must be a table { target, path_or_opts, timeout = s }, got %s",
            luaL_typename(L, 2));
    check_keys(&c, 2, entry_keys, 2, "key");
    lua_rawgeti(L, 2, 1);                    /* 3: target */
    lua_rawgeti(L, 2, 2);                    /* 4: path or options */
    rawfield(L, 2, "timeout");               /* 5 */
    double timeout = check_timeout(&c, 5, "timeout");
    read_call(&c, &sps[i], 3, 4, timeout);
    lua_settop(L, 1);
  }
  c.callno = 0;
  return start_op(&c, sps, n, 1, raw, overall);
}

static int l_fetch_all(lua_State *L) { return fetch_all(L, 0); }

int mg_lua_fetch_raw_all(lua_State *L) { return fetch_all(L, 1); }

int mg_lua_fetch_raw_for(lua_State *L) {
  if (lua_tocfunction(L, 1) != l_fetch_all) return 0;
  lua_pushcfunction(L, mg_lua_fetch_raw_all);
  return 1;
}

int mg_lua_fetch_register(mg_lua_vm_t *vm) {
  if (mg_lua_vm_register(vm, "fetch", l_fetch) != 0) return -1;
  return mg_lua_vm_register(vm, "fetch_all", l_fetch_all);
}
