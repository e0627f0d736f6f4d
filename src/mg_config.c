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

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "mg_log.h"

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

/* Pushes the config.lua chunk (see the top of this file for where it comes from). */
static int load_checker(lua_State *L)
{
  const char *dir = getenv("MOONGATE_LUA_DIR");
  if (dir && *dir) {
    lua_pushfstring(L, "%s" CONFIG_LUA, dir);
    const char *path = lua_tostring(L, -1);
    int rc = luaL_loadfile(L, path);
    lua_remove(L, -2);
    return rc;
  }
#ifdef MG_LUA_DIR
  if (access(MG_LUA_DIR CONFIG_LUA, R_OK) == 0) return luaL_loadfile(L, MG_LUA_DIR CONFIG_LUA);
  return luaL_loadbuffer(L, mg_config_lua_start,
                         (size_t)(mg_config_lua_end - mg_config_lua_start),
                         "=moongate/config.lua (built in)");
#else
  lua_pushliteral(L, "MOONGATE_LUA_DIR is not set and no copy of config.lua is built in");
  return LUA_ERRFILE;
#endif
}

int mg_config_load(const char *file, mg_config_t *cfg, char **errors)
{
  memset(cfg, 0, sizeof *cfg);
  if (errors) *errors = NULL;

  lua_State *L = luaL_newstate();
  if (!L) {
    set_error(errors, file, "cannot check the config", "out of memory");
    return -1;
  }
  luaL_openlibs(L);
  char *abs = realpath(file, NULL);
  int rc = -1;

  if (load_checker(L) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
    set_error(errors, file, "cannot load the config checker", lua_tostring(L, -1));
    goto done;
  }
  lua_getfield(L, -1, "load");
  lua_pushstring(L, file);
  lua_pushstring(L, abs ? abs : file);
  if (lua_pcall(L, 2, 2, 0) != 0) {
    set_error(errors, file, "internal error while checking the config", lua_tostring(L, -1));
    goto done;
  }
  if (lua_isnil(L, -2)) {
    const char *text = lua_tostring(L, -1);
    if (errors && text) *errors = strdup(text);
    goto done;
  }
  lua_pushcfunction(L, read_config);
  lua_pushlightuserdata(L, cfg);
  lua_pushvalue(L, -4);
  if (lua_pcall(L, 2, 0, 0) != 0) {
    set_error(errors, file, "internal error while reading the config", lua_tostring(L, -1));
    mg_config_free(cfg);
    goto done;
  }
  rc = 0;

done:
  free(abs);
  lua_close(L);
  return rc;
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
  memset(cfg, 0, sizeof *cfg);
}

const mg_upstream_conf_t *mg_config_upstream(const mg_config_t *cfg, const char *name)
{
  for (size_t i = 0; i < cfg->nupstreams; i++)
    if (strcmp(cfg->upstreams[i].name, name) == 0) return &cfg->upstreams[i];
  return NULL;
}
