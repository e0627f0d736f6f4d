/* mg_config: loads a config file into the C structs of mg_config.h.
 *
 * The checking is done in Lua (lua/moongate/config.lua): it runs the user's file in a minimal
 * environment, checks every declaration, and returns either the whole config, normalised
 * (defaults filled in, sizes in bytes, durations in seconds), or the text of every error.
 * This file only runs it in a fresh Lua state and copies the result into malloc'd structs, so
 * nothing of Lua outlives mg_config_load().
 *
 * Where config.lua comes from: $MOONGATE_LUA_DIR/moongate/config.lua when that variable is
 * set; else the source tree's copy (MG_LUA_DIR, set by the Makefile) when it is readable, so a
 * developer's edit takes effect even if this object was not rebuilt; else a copy embedded in
 * the binary at build time, so an installed binary needs no lua/ directory to check configs. */
#include "mg_config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "mg_log.h"
#include "mg_lua_aggregate.h"
#include "mg_lua_fetch.h"
#include "mg_lua_time.h"
#include "mg_lua_vm.h"

#define CONFIG_LUA "/moongate/config.lua"

#ifdef MG_LUA_DIR
/* The embedded copy. .incbin reads the file when this object is assembled; the Makefile
 * does not list config.lua as a prerequisite of this object, which is why a readable source
 * tree copy is preferred at run time (see above). */
__asm__(".pushsection .rodata\n"
        ".balign 16\n"
        ".globl mg_config_lua_start\n"
        ".hidden mg_config_lua_start\n"
        "mg_config_lua_start:\n"
        ".incbin \"" MG_LUA_DIR CONFIG_LUA "\"\n"
        ".globl mg_config_lua_end\n"
        ".hidden mg_config_lua_end\n"
        "mg_config_lua_end:\n"
        ".popsection\n");
extern const char mg_config_lua_start[] __attribute__((visibility("hidden")));
extern const char mg_config_lua_end[] __attribute__((visibility("hidden")));
#endif

/* ---------------------------------------------------------------------------------------- */
/* Copying values out of the Lua result. These run inside lua_pcall: on a missing or
 * mistyped field (a bug in config.lua) or when malloc fails they raise a Lua error, and the
 * caller frees whatever was filled in so far. Arrays are attached to the struct, with their
 * count, before their elements are filled, so the struct can be freed at any point. */
/* ---------------------------------------------------------------------------------------- */

static void *xcalloc(lua_State *L, size_t n, size_t size)
{
  void *p = calloc(n ? n : 1, size);
  if (!p) luaL_error(L, "out of memory");
  return p;
}

static char *xmemdup(lua_State *L, const char *s, size_t len)
{
  char *p = xcalloc(L, len + 1, 1);
  memcpy(p, s, len);
  return p;
}

/* Pushes T[KEY] and checks its type; nil is accepted when OPTIONAL. Returns 1 when a value
 * of type TYPE was pushed, 0 when nil was pushed. */
static int push_field(lua_State *L, int t, const char *key, int type, int optional)
{
  lua_getfield(L, t, key);
  if (lua_type(L, -1) == type) return 1;
  if (lua_isnil(L, -1) && optional) return 0;
  return luaL_error(L, "config field '%s' is %s, expected %s", key, luaL_typename(L, -1),
                    lua_typename(L, type));
}

/* A copy of the string T[KEY] (its length in *LEN when LEN is not NULL), or NULL when nil
 * and OPTIONAL. */
static char *get_lstr(lua_State *L, int t, const char *key, int optional, size_t *len)
{
  char *s = NULL;
  size_t n = 0;
  if (push_field(L, t, key, LUA_TSTRING, optional)) {
    const char *v = lua_tolstring(L, -1, &n);
    s = xmemdup(L, v, n);
  }
  lua_pop(L, 1);
  if (len) *len = n;
  return s;
}

static char *get_str(lua_State *L, int t, const char *key)
{
  return get_lstr(L, t, key, 0, NULL);
}

static char *get_opt_str(lua_State *L, int t, const char *key)
{
  return get_lstr(L, t, key, 1, NULL);
}

static double get_num(lua_State *L, int t, const char *key)
{
  push_field(L, t, key, LUA_TNUMBER, 0);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* An integer in MIN..MAX (config.lua has checked the range; this is the type's guard). */
static long long get_int(lua_State *L, int t, const char *key, long long min, long long max)
{
  double v = get_num(L, t, key);
  if (!(v >= (double)min && v <= (double)max) || v != (double)(long long)v)
    return luaL_error(L, "config field '%s' is out of range", key);
  return (long long)v;
}

static int get_cint(lua_State *L, int t, const char *key)
{
  return (int)get_int(L, t, key, INT_MIN, INT_MAX);
}

static size_t get_size(lua_State *L, int t, const char *key)
{
  /* config.lua keeps sizes at most 2^53 (exact in a double); a 32-bit size_t is smaller. */
  long long max = (long long)1 << 53;
  if ((unsigned long long)SIZE_MAX < (unsigned long long)max) max = (long long)SIZE_MAX;
  return (size_t)get_int(L, t, key, 0, max);
}

/* Pushes the array T[KEY] and returns its length (0 and nil pushed when nil and OPTIONAL). */
static size_t push_array(lua_State *L, int t, const char *key, int optional)
{
  if (!push_field(L, t, key, LUA_TTABLE, optional)) return 0;
  return lua_objlen(L, -1);
}

/* Copies the array of strings T[KEY] into *OUT / *N. */
static void get_strv(lua_State *L, int t, const char *key, char ***out, size_t *n)
{
  size_t len = push_array(L, t, key, 0);
  int a = lua_gettop(L);
  *out = xcalloc(L, len, sizeof **out);
  *n = len;
  for (size_t i = 0; i < len; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "config field '%s' holds a non-string", key);
    size_t sl;
    const char *s = lua_tolstring(L, -1, &sl);
    (*out)[i] = xmemdup(L, s, sl);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* ---------------------------------------------------------------------------------------- */
/* Names that the two halves share: the Lua side speaks in names, the C side in the enums
 * of mg_config.h and mg_log.h, and each enum is spelt out only here. */
/* ---------------------------------------------------------------------------------------- */

static const struct { const char *name; int value; } log_levels[] = {
  { "debug", MG_LOG_DEBUG }, { "info", MG_LOG_INFO }, { "warn", MG_LOG_WARN },
  { "error", MG_LOG_ERROR }, { "off", MG_LOG_OFF },
};

static const struct { const char *name; unsigned bit; } methods[] = {
  { "GET", MG_M_GET }, { "HEAD", MG_M_HEAD }, { "POST", MG_M_POST }, { "PUT", MG_M_PUT },
  { "DELETE", MG_M_DELETE }, { "PATCH", MG_M_PATCH }, { "OPTIONS", MG_M_OPTIONS },
  { "TRACE", MG_M_TRACE }, { "CONNECT", MG_M_CONNECT },
};

static int get_log_level(lua_State *L, int t, const char *key)
{
  push_field(L, t, key, LUA_TSTRING, 0);
  const char *name = lua_tostring(L, -1);
  for (size_t i = 0; i < sizeof log_levels / sizeof log_levels[0]; i++) {
    if (strcmp(name, log_levels[i].name) == 0) {
      lua_pop(L, 1);
      return log_levels[i].value;
    }
  }
  return luaL_error(L, "config field '%s' has an unknown level", key);
}

/* The MG_M_* bits of the method names in T.methods; MG_METHOD_ANY when there are none. */
static unsigned get_methods(lua_State *L, int t)
{
  size_t n = push_array(L, t, "methods", 1);
  int a = lua_gettop(L);
  unsigned bits = n ? 0 : MG_METHOD_ANY;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    const char *m = lua_tostring(L, -1);
    unsigned bit = MG_M_OTHER;
    for (size_t j = 0; m && j < sizeof methods / sizeof methods[0]; j++)
      if (strcmp(m, methods[j].name) == 0) bit = methods[j].bit;
    bits |= bit;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return bits;
}

static mg_host_policy_t get_host_policy(lua_State *L, int t)
{
  push_field(L, t, "host_policy", LUA_TSTRING, 0);
  const char *p = lua_tostring(L, -1);
  mg_host_policy_t v = MG_HOST_PASS;
  if (strcmp(p, "upstream") == 0) v = MG_HOST_UPSTREAM;
  else if (strcmp(p, "fixed") == 0) v = MG_HOST_FIXED;
  else if (strcmp(p, "pass") != 0) luaL_error(L, "config field 'host_policy' is unknown");
  lua_pop(L, 1);
  return v;
}

/* ---------------------------------------------------------------------------------------- */
/* The sections */
/* ---------------------------------------------------------------------------------------- */

static void read_limits(lua_State *L, int t, mg_limits_conf_t *l)
{
  l->header_bytes = get_size(L, t, "header_bytes");
  l->header_count = get_size(L, t, "header_count");
  l->uri_bytes = get_size(L, t, "uri_bytes");
  l->body_bytes = get_size(L, t, "body_bytes");
  l->chunk_ext_bytes = get_size(L, t, "chunk_ext_bytes");
  l->header_timeout = get_num(L, t, "header_timeout");
  l->body_timeout = get_num(L, t, "body_timeout");
  l->keepalive_timeout = get_num(L, t, "keepalive_timeout");
  l->keepalive_requests = get_cint(L, t, "keepalive_requests");
  l->send_timeout = get_num(L, t, "send_timeout");
  l->max_connections = get_cint(L, t, "max_connections");
}

static void read_listen(lua_State *L, int t, mg_listen_conf_t *l)
{
  l->name = get_opt_str(L, t, "name");
  l->host = get_str(L, t, "host");
  l->port = get_cint(L, t, "port");
  l->backlog = get_cint(L, t, "backlog");
}

/* Bits of the hooks a route runs: hooks = { access = {...}, handler = fn, ... }. */
static unsigned read_route_hooks(lua_State *L, int t)
{
  static const char *const names[] = {"request", "access", "handler", "response", "log"};
  unsigned bits = 0;
  if (lua_type(L, t) != LUA_TTABLE) return 0;
  for (unsigned i = 0; i < 5; i++) {
    lua_getfield(L, t, names[i]);
    if (lua_isfunction(L, -1) || (lua_istable(L, -1) && lua_objlen(L, -1) > 0)) bits |= 1u << i;
    lua_pop(L, 1);
  }
  return bits;
}

static void read_upstream(lua_State *L, int t, mg_upstream_conf_t *u)
{
  u->name = get_str(L, t, "name");
  u->file = get_str(L, t, "file");
  u->line = get_cint(L, t, "line");
  u->connect_timeout = get_num(L, t, "connect_timeout");
  u->send_timeout = get_num(L, t, "send_timeout");
  u->read_timeout = get_num(L, t, "read_timeout");
  u->keepalive_max_idle = get_cint(L, t, "keepalive");
  u->keepalive_timeout = get_num(L, t, "keepalive_timeout");
  u->keepalive_requests = get_cint(L, t, "keepalive_requests");
  u->max_fails = get_cint(L, t, "max_fails");
  u->fail_timeout = get_num(L, t, "fail_timeout");
  u->dns_ttl = get_num(L, t, "dns_ttl");

  size_t n = push_array(L, t, "targets", 0);
  int a = lua_gettop(L);
  u->targets = xcalloc(L, n, sizeof *u->targets);
  u->ntargets = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    int e = lua_gettop(L);
    u->targets[i].host = get_str(L, e, "host");
    u->targets[i].port = get_cint(L, e, "port");
    u->targets[i].weight = get_cint(L, e, "weight");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static void read_route(lua_State *L, int t, mg_route_conf_t *r)
{
  r->file = get_str(L, t, "file");
  r->line = get_cint(L, t, "line");
  r->spec = get_str(L, t, "spec");
  r->methods = get_methods(L, t);
  r->path = get_str(L, t, "path");
  get_strv(L, t, "hosts", &r->hosts, &r->nhosts);
  r->listen = get_opt_str(L, t, "listen");
  r->name = get_str(L, t, "name");
  r->upstream = get_opt_str(L, t, "upstream");
  r->strip_prefix = get_opt_str(L, t, "strip_prefix");
  r->rewrite = get_opt_str(L, t, "rewrite");
  r->host_policy = get_host_policy(L, t);
  r->host_value = get_opt_str(L, t, "host_value");
  r->max_body = get_size(L, t, "max_body");

  lua_getfield(L, t, "respond_status");
  int responds = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!responds) return;
  r->respond_status = get_cint(L, t, "respond_status");
  r->respond_body = get_lstr(L, t, "respond_body", 0, &r->respond_body_len);
  size_t n = push_array(L, t, "respond_headers", 0);
  int a = lua_gettop(L);
  r->respond_headers = xcalloc(L, n, sizeof *r->respond_headers);
  r->nrespond_headers = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    int e = lua_gettop(L);
    r->respond_headers[i].name = get_str(L, e, "name");
    r->respond_headers[i].value = get_str(L, e, "value");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Runs under lua_pcall: (lightuserdata cfg, result table). */
static int read_config(lua_State *L)
{
  mg_config_t *cfg = lua_touserdata(L, 1);
  int t = 2;
  luaL_checktype(L, t, LUA_TTABLE);

  cfg->file = get_str(L, t, "file");
  cfg->workers = get_cint(L, t, "workers");
  cfg->pid_file = get_str(L, t, "pid_file");
  cfg->drain_timeout = get_num(L, t, "drain_timeout");
  cfg->access_log = get_opt_str(L, t, "access_log");
  cfg->error_log = get_str(L, t, "error_log");
  cfg->log_level = get_log_level(L, t, "log_level");
  get_strv(L, t, "redact_query", &cfg->redact_query, &cfg->nredact_query);

  push_field(L, t, "limits", LUA_TTABLE, 0);
  read_limits(L, lua_gettop(L), &cfg->limits);
  lua_pop(L, 1);

  size_t n = push_array(L, t, "listens", 0);
  int a = lua_gettop(L);
  cfg->listens = xcalloc(L, n, sizeof *cfg->listens);
  cfg->nlistens = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    read_listen(L, lua_gettop(L), &cfg->listens[i]);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  n = push_array(L, t, "upstreams", 0);
  a = lua_gettop(L);
  cfg->upstreams = xcalloc(L, n, sizeof *cfg->upstreams);
  cfg->nupstreams = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    read_upstream(L, lua_gettop(L), &cfg->upstreams[i]);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  n = push_array(L, t, "routes", 0);
  a = lua_gettop(L);
  cfg->routes = xcalloc(L, n, sizeof *cfg->routes);
  cfg->nroutes = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    read_route(L, lua_gettop(L), &cfg->routes[i]);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  push_field(L, t, "hooks", LUA_TTABLE, 0);
  int h = lua_gettop(L);
  lua_getfield(L, h, "request");
  cfg->has_request_hooks = lua_istable(L, -1) && lua_objlen(L, -1) > 0;
  lua_pop(L, 1);
  lua_getfield(L, h, "routes");
  for (size_t i = 0; i < cfg->nroutes; i++) {
    lua_rawgeti(L, -1, (int)i + 1);
    cfg->routes[i].hooks = read_route_hooks(L, lua_gettop(L));
    lua_pop(L, 1);
  }
  lua_pop(L, 2);

  n = push_array(L, t, "shared", 0);
  a = lua_gettop(L);
  cfg->shared = xcalloc(L, n, sizeof *cfg->shared);
  cfg->nshared = n;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, a, (int)i + 1);
    cfg->shared[i].name = get_str(L, lua_gettop(L), "name");
    cfg->shared[i].size = get_size(L, lua_gettop(L), "size");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  push_field(L, t, "lua", LUA_TTABLE, 0);
  cfg->lua_memory = get_size(L, lua_gettop(L), "memory");
  cfg->lua_budget = get_num(L, lua_gettop(L), "budget");
  static const struct { const char *name; unsigned bit; } allow[] = {
    {"os", MG_LUA_ALLOW_OS}, {"io", MG_LUA_ALLOW_IO}, {"debug", MG_LUA_ALLOW_DEBUG},
    {"ffi", MG_LUA_ALLOW_FFI}, {"string.dump", MG_LUA_ALLOW_DUMP},
    {"bytecode", MG_LUA_ALLOW_BYTECODE}};
  lua_getfield(L, -1, "allow");
  for (int i = 1; lua_istable(L, -1); i++) {
    lua_rawgeti(L, -1, i);
    const char *name = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (!name) break;
    for (size_t k = 0; k < sizeof allow / sizeof allow[0]; k++)
      if (strcmp(name, allow[k].name) == 0) cfg->lua_allow |= allow[k].bit;
  }
  lua_pop(L, 2);

  get_strv(L, t, "files", &cfg->files, &cfg->nfiles);

  /* The admin API listens like any listener, as the last one. */
  if (push_field(L, t, "admin", LUA_TTABLE, 1)) {
    int ad = lua_gettop(L);
    mg_listen_conf_t *more = realloc(cfg->listens, (cfg->nlistens + 1) * sizeof *more);
    if (!more) return luaL_error(L, "out of memory");
    cfg->listens = more;
    mg_listen_conf_t *l = &cfg->listens[cfg->nlistens++];
    memset(l, 0, sizeof *l);
    l->admin = 1;
    l->name = xmemdup(L, "(admin)", 7);
    l->host = get_str(L, ad, "host");
    l->port = get_cint(L, ad, "port");
    l->backlog = 128;
    cfg->admin_token = get_opt_str(L, ad, "token");
  }
  lua_pop(L, 1);
  return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Loading */
/* ---------------------------------------------------------------------------------------- */

/* Sets *ERRORS to "FILE: WHAT: DETAIL\n" (for failures that are not the config's fault). */
static void set_error(char **errors, const char *file, const char *what, const char *detail)
{
  if (!errors) return;
  if (!detail) detail = "(no message)";
  size_t len = strlen(file) + strlen(what) + strlen(detail) + 6;
  *errors = malloc(len);
  if (*errors) snprintf(*errors, len, "%s: %s: %s\n", file, what, detail);
}

/* Reads a whole file into a malloc'd buffer (at most MAX_FILE bytes). Returns NULL with
 * errno set (EFBIG when too large). */
#define MAX_FILE (16u << 20)
static char *slurp(const char *path, size_t *len)
{
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 8192, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    size_t got = fread(buf + n, 1, cap - n, f);
    n += got;
    if (n < cap) break;
    if (cap >= MAX_FILE) {
      free(buf);
      buf = NULL;
      errno = EFBIG;
      break;
    }
    char *more = realloc(buf, cap * 2);
    if (!more) { free(buf); buf = NULL; break; }
    buf = more;
    cap *= 2;
  }
  int failed = buf && ferror(f);
  int e = errno;
  fclose(f);
  if (failed) {
    free(buf);
    errno = e ? e : EIO;
    return NULL;
  }
  *len = n;
  return buf;
}

/* The files of the last generation the master accepted (see mg_config_snapshot). */
typedef struct snap_file { char *path; char *text; size_t len; } snap_file_t;
typedef struct snapshot { snap_file_t *files; size_t n; } snapshot_t;
static snapshot_t snap_current, snap_pending;
static int snap_mode;           /* 0 off, 1 recording, 2 replaying */

static void snapshot_clear(snapshot_t *s)
{
  for (size_t i = 0; i < s->n; i++) {
    free(s->files[i].path);
    free(s->files[i].text);
  }
  free(s->files);
  memset(s, 0, sizeof *s);
}

/* Adds PATH and TEXT (LEN bytes), both malloc'd, to S, which takes them over (frees them on
 * failure). Returns 0 or -1. */
static int snapshot_take(snapshot_t *s, char *path, char *text, size_t len)
{
  snap_file_t *more = realloc(s->files, (s->n + 1) * sizeof *more);
  if (!more) {
    free(path);
    free(text);
    return -1;
  }
  s->files = more;
  s->files[s->n++] = (snap_file_t){path, text, len};
  return 0;
}

static void snapshot_add(snapshot_t *s, const char *path, const char *text, size_t len)
{
  snap_file_t *more = realloc(s->files, (s->n + 1) * sizeof *more);
  if (!more) return;
  s->files = more;
  snap_file_t *f = &s->files[s->n];
  f->path = strdup(path);
  f->text = malloc(len ? len : 1);
  f->len = len;
  if (!f->path || !f->text) {
    free(f->path);
    free(f->text);
    return;
  }
  memcpy(f->text, text, len);
  s->n++;
}

void mg_config_snapshot(int mode)
{
  if (mode == MG_SNAPSHOT_COMMIT) {
    snapshot_clear(&snap_current);
    snap_current = snap_pending;
    memset(&snap_pending, 0, sizeof snap_pending);
    snap_mode = 0;
  } else if (mode == MG_SNAPSHOT_RECORD) {
    snapshot_clear(&snap_pending);
    snap_mode = 1;
  } else if (mode == MG_SNAPSHOT_REPLAY) {
    snap_mode = 2;
  } else if (mode == MG_SNAPSHOT_FREE) {
    snapshot_clear(&snap_current);
    snapshot_clear(&snap_pending);
    snap_mode = 0;
  } else {
    snapshot_clear(&snap_pending);
    snap_mode = 0;
  }
}

/* The committed copy in one file, for the workers of a reload: "MGSNAP1\n", the generation,
 * the number of files, then each path and text with their lengths (u64, this machine's byte
 * order: only this machine's workers read it), then "END\n". */
static const char snap_magic[8] = "MGSNAP1\n", snap_end[4] = "END\n";

static int put_u64(FILE *f, uint64_t v) { return fwrite(&v, sizeof v, 1, f) == 1 ? 0 : -1; }

int mg_config_snapshot_write(const char *path, uint64_t gen)
{
  char tmp[4200];
  if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp) {
    errno = ENAMETOOLONG;
    return -1;
  }
  /* Owner-only: the scripts may hold keys their own files keep private. */
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  FILE *f = fd >= 0 ? fdopen(fd, "wb") : NULL;
  if (!f) {
    int e = errno;
    if (fd >= 0) close(fd);
    errno = e;
    return -1;
  }
  int bad = fwrite(snap_magic, sizeof snap_magic, 1, f) != 1 || put_u64(f, gen) ||
            put_u64(f, snap_current.n);
  for (size_t i = 0; !bad && i < snap_current.n; i++) {
    const snap_file_t *sf = &snap_current.files[i];
    size_t pl = strlen(sf->path);
    bad = put_u64(f, pl) || fwrite(sf->path, 1, pl, f) != pl || put_u64(f, sf->len) ||
          fwrite(sf->text, 1, sf->len, f) != sf->len;
  }
  bad = bad || fwrite(snap_end, sizeof snap_end, 1, f) != 1;
  int e = errno;
  if (fclose(f) != 0 && !bad) {
    bad = 1;
    e = errno;
  }
  if (!bad && rename(tmp, path) == 0) return 0;
  if (!bad) e = errno;
  unlink(tmp);
  errno = e ? e : EIO;
  return -1;
}

/* Reads N bytes of F into a new buffer (with a NUL after them), or NULL. */
static char *get_bytes(FILE *f, uint64_t n)
{
  if (n > (uint64_t)1 << 40) return NULL;
  char *b = malloc((size_t)n + 1);
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
    free(b);
    return NULL;
  }
  if (b) b[n] = '\0';
  return b;
}

uint64_t mg_config_snapshot_read(const char *path)
{
  snapshot_clear(&snap_current);
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  char magic[sizeof snap_magic], end[sizeof snap_end];
  uint64_t gen = 0, n = 0;
  int bad = fread(magic, sizeof magic, 1, f) != 1 || memcmp(magic, snap_magic, sizeof magic) ||
            fread(&gen, sizeof gen, 1, f) != 1 || fread(&n, sizeof n, 1, f) != 1;
  for (uint64_t i = 0; !bad && i < n; i++) {
    uint64_t pl = 0, tl = 0;
    char *p = NULL, *t = NULL;
    bad = fread(&pl, sizeof pl, 1, f) != 1 || !(p = get_bytes(f, pl)) ||
          fread(&tl, sizeof tl, 1, f) != 1 || !(t = get_bytes(f, tl));
    if (bad) {
      free(p);
      free(t);
    } else {
      bad = snapshot_take(&snap_current, p, t, (size_t)tl) != 0;
    }
  }
  bad = bad || fread(end, sizeof end, 1, f) != 1 || memcmp(end, snap_end, sizeof end);
  fclose(f);
  if (bad) {
    snapshot_clear(&snap_current);
    return 0;
  }
  return gen;
}

/* host.read_file(path) for config.lua: the file's text, or nil and why. */
static int l_read_file(lua_State *L)
{
  const char *path = luaL_checkstring(L, 1);
  if (snap_mode == 2)
    for (size_t i = 0; i < snap_current.n; i++)
      if (strcmp(snap_current.files[i].path, path) == 0) {
        lua_pushlstring(L, snap_current.files[i].text, snap_current.files[i].len);
        return 1;
      }
  size_t len = 0;
  char *text = slurp(path, &len);
  if (text && snap_mode == 1) snapshot_add(&snap_pending, path, text, len);
  if (!text) {
    lua_pushnil(L);
    lua_pushstring(L, errno == EISDIR ? "is a directory" : strerror(errno));
    return 2;
  }
  lua_pushlstring(L, text, len);
  free(text);
  return 1;
}

/* The text of config.lua (see the top of this file for where it comes from). Sets *FREE_IT
 * when the caller must free it. */
static const char *checker_source(size_t *len, int *free_it, char *name, size_t namelen,
                                  char *err, size_t errlen)
{
  char path[PATH_MAX];
  const char *dir = getenv("MOONGATE_LUA_DIR");
  *free_it = 0;
  if (dir && *dir) {
    snprintf(path, sizeof path, "%s" CONFIG_LUA, dir);
  } else {
#ifdef MG_LUA_DIR
    snprintf(path, sizeof path, "%s", MG_LUA_DIR CONFIG_LUA);
    if (access(path, R_OK) != 0) {
      snprintf(name, namelen, "moongate/config.lua (built in)");
      *len = (size_t)(mg_config_lua_end - mg_config_lua_start);
      return mg_config_lua_start;
    }
#else
    snprintf(err, errlen, "MOONGATE_LUA_DIR is not set and no copy of config.lua is built in");
    return NULL;
#endif
  }
  snprintf(name, namelen, "moongate/config.lua");
  char *text = slurp(path, len);
  *free_it = text != NULL;
  if (!text) snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
  return text;
}

/* The text of an error that ended the load outside config.lua's own handling (out of memory,
 * the VM's time budget): "FILE: message" (a message that names its place is kept as is). */
static char *config_error_text(const char *display, const char *msg)
{
  size_t dl = strlen(display);
  size_t len = dl + strlen(msg) + 64;
  char *out = malloc(len);
  if (!out) return NULL;
  if (strncmp(msg, display, dl) == 0 && msg[dl] == ':') snprintf(out, len, "%s\n", msg);
  else snprintf(out, len, "%s: %s\n", display, msg);
  char *p = strstr(out, "script exceeded its CPU budget");
  if (p) snprintf(p, len - (size_t)(p - out), "the config file ran too long (an endless loop?)\n");
  return out;
}

struct read_ctx { mg_config_t *cfg; lua_State *from; int ref; int keep; };

/* Runs under lua_cpcall: copies the result table (on top of FROM) into the C config. */
static int read_cb(lua_State *L)
{
  struct read_ctx *c = lua_touserdata(L, 1);
  lua_xmove(c->from, L, 1);
  int t = lua_gettop(L);
  lua_pushcfunction(L, read_config);
  lua_pushlightuserdata(L, c->cfg);
  lua_pushvalue(L, t);
  lua_call(L, 2, 0);
  if (c->keep) {
    lua_getfield(L, t, "hooks");
    c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return 0;
}

int mg_config_load_vm(mg_lua_vm_t *vm, const char *file, mg_config_t *cfg, char **errors,
                      int *ref)
{
  memset(cfg, 0, sizeof *cfg);
  if (errors) *errors = NULL;
  if (ref) *ref = -1;
  char name[64], err[PATH_MAX + 256];
  size_t len = 0;
  int free_src = 0;
  const char *src = checker_source(&len, &free_src, name, sizeof name, err, sizeof err);
  if (!src) {
    set_error(errors, file, "cannot load the config checker", err);
    return -1;
  }
  int mod = mg_lua_vm_load_trusted(vm, name, src, len, err, sizeof err);
  if (free_src) free((char *)src);
  if (mod < 0) {
    set_error(errors, file, "cannot load the config checker", err);
    return -1;
  }
  char *abs = realpath(file, NULL);
  int rc = -1;
  mg_lua_run_t *run = mg_lua_run_new(vm);
  if (!run || mg_lua_run_push_ref(run, mod, "load") != 0) {
    set_error(errors, file, "cannot load the config checker", "out of memory");
    goto done;
  }
  lua_State *co = mg_lua_run_thread(run);
  lua_pushstring(co, file);
  lua_pushstring(co, abs ? abs : file);
  lua_createtable(co, 0, 3);
  lua_pushcfunction(co, l_read_file);
  lua_setfield(co, -2, "read_file");
  /* config.lua counts the file's steps itself (with a precise line when it stops an endless
   * loop); the VM's time budget is a backstop. */
  mg_lua_vm_set_budget(vm, 0, 30 * 1000 * 1000);
  mg_lua_status_t st = mg_lua_vm_resume(run, 3);
  if (st == MG_LUA_ERROR) {
    if (errors) *errors = config_error_text(file, mg_lua_run_error(run));
    goto done;
  }
  if (st != MG_LUA_DONE) {
    set_error(errors, file, "cannot load the config", "the config file waited for I/O while loading");
    goto done;
  }
  if (lua_isnil(co, 1)) {
    const char *text = lua_tostring(co, 2);
    if (errors) *errors = strdup(text ? text : "the config checker failed\n");
    goto done;
  }
  lua_settop(co, 1);
  struct read_ctx c = {cfg, co, -1, ref != NULL};
  if (lua_cpcall(mg_lua_vm_state(vm), read_cb, &c) != 0) {
    lua_State *L = mg_lua_vm_state(vm);
    set_error(errors, file, "internal error while reading the config", lua_tostring(L, -1));
    lua_pop(L, 1);
    mg_config_free(cfg);
    goto done;
  }
  if (ref) *ref = c.ref;
  mg_lua_vm_set_budget(vm, 0, (uint64_t)(cfg->lua_budget * 1e6));
  rc = 0;

done:
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, mod);
  free(abs);
  return rc;
}

/* One evaluation in a fresh VM with the memory cap MEM (0: none) and the libraries ALLOW. */
static int load_checked(const char *file, size_t mem, unsigned allow, mg_config_t *cfg,
                        char **errors)
{
  char err[256];
  mg_lua_vm_t *vm = mg_lua_vm_new(mem, err, sizeof err);
  if (!vm || (allow && mg_lua_vm_allow(vm, allow) != 0)) {
    mg_lua_vm_free(vm);
    memset(cfg, 0, sizeof *cfg);
    set_error(errors, file, "cannot check the config", vm ? "cannot open lua.allow" : err);
    return -1;
  }
  /* The mg API of a worker, except the shared dictionaries, which do not exist yet: a
   * config may look one up at load time (local d = mg.shared.limits); using it waits for a
   * worker. */
  static const char lenient_shared[] =
      "mg.shared = setmetatable({}, { __index = function(_, name)\n"
      "  return setmetatable({}, { __index = function(_, method)\n"
      "    return function()\n"
      "      error('mg.shared.' .. tostring(name) .. ':' .. tostring(method) ..\n"
      "            ' can only be used in hooks (the dictionaries are made when the gateway starts)', 2)\n"
      "    end\n"
      "  end })\n"
      "end })\n";
  int ref = -1;
  /* mg.aggregate is there when its module loads (a missing one is logged, not fatal here). */
  mg_lua_aggregate_register(vm);
  if (mg_lua_time_register(vm) != 0 || mg_lua_fetch_register(vm) != 0 ||
      (ref = mg_lua_vm_load_trusted(vm, "moongate/shared", lenient_shared,
                                    sizeof lenient_shared - 1, err, sizeof err)) < 0) {
    mg_lua_vm_free(vm);
    memset(cfg, 0, sizeof *cfg);
    set_error(errors, file, "cannot check the config", "cannot set up the mg API");
    return -1;
  }
  mg_lua_vm_unref(vm, ref);
  int rc = mg_config_load_vm(vm, file, cfg, errors, NULL);
  mg_lua_vm_free(vm);
  return rc;
}

int mg_config_load(const char *file, mg_config_t *cfg, char **errors)
{
  /* The config says which memory cap and libraries its workers' VMs have; a second
   * evaluation under those makes the check match what the workers will do (a config that
   * only fits without the cap, or that uses an allowed library while loading). */
  if (load_checked(file, 0, 0, cfg, errors) != 0) return -1;
  size_t mem = cfg->lua_memory;
  unsigned allow = cfg->lua_allow;
  mg_config_free(cfg);
  if (snap_mode == 1) snapshot_clear(&snap_pending);   /* record the pass that counts */
  return load_checked(file, mem, allow, cfg, errors);
}

void mg_config_free(mg_config_t *cfg)
{
  free(cfg->file);
  free(cfg->pid_file);
  free(cfg->access_log);
  free(cfg->error_log);
  for (size_t i = 0; i < cfg->nredact_query; i++) free(cfg->redact_query[i]);
  free(cfg->redact_query);

  for (size_t i = 0; i < cfg->nlistens; i++) {
    free(cfg->listens[i].name);
    free(cfg->listens[i].host);
  }
  free(cfg->listens);

  for (size_t i = 0; i < cfg->nupstreams; i++) {
    mg_upstream_conf_t *u = &cfg->upstreams[i];
    free(u->name);
    free(u->file);
    for (size_t j = 0; j < u->ntargets; j++) free(u->targets[j].host);
    free(u->targets);
  }
  free(cfg->upstreams);

  for (size_t i = 0; i < cfg->nroutes; i++) {
    mg_route_conf_t *r = &cfg->routes[i];
    free(r->file);
    free(r->spec);
    free(r->path);
    for (size_t j = 0; j < r->nhosts; j++) free(r->hosts[j]);
    free(r->hosts);
    free(r->listen);
    free(r->name);
    free(r->upstream);
    free(r->strip_prefix);
    free(r->rewrite);
    free(r->host_value);
    free(r->respond_body);
    for (size_t j = 0; j < r->nrespond_headers; j++) {
      free(r->respond_headers[j].name);
      free(r->respond_headers[j].value);
    }
    free(r->respond_headers);
  }
  free(cfg->routes);
  for (size_t i = 0; i < cfg->nshared; i++) free(cfg->shared[i].name);
  free(cfg->shared);
  free(cfg->admin_token);
  for (size_t i = 0; i < cfg->nfiles; i++) free(cfg->files[i]);
  free(cfg->files);
  memset(cfg, 0, sizeof *cfg);
}

const mg_upstream_conf_t *mg_config_upstream(const mg_config_t *cfg, const char *name)
{
  for (size_t i = 0; i < cfg->nupstreams; i++)
    if (strcmp(cfg->upstreams[i].name, name) == 0) return &cfg->upstreams[i];
  return NULL;
}
