/* mg_config: the gateway's configuration, evaluated from a Lua file and validated completely
 * before use. The Lua half (lua/moongate/config.lua) runs the user's file in a minimal
 * environment and checks it against a schema; this module turns the checked table into the
 * plain C structs below, which the master and the workers read (never write) after loading.
 * All strings and arrays are owned by the mg_config_t and freed by mg_config_free(). */
#ifndef MG_CONFIG_H
#define MG_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* Bit per HTTP method a route accepts; MG_METHOD_ANY = no method named. */
enum {
  MG_M_GET = 1 << 0, MG_M_HEAD = 1 << 1, MG_M_POST = 1 << 2, MG_M_PUT = 1 << 3,
  MG_M_DELETE = 1 << 4, MG_M_PATCH = 1 << 5, MG_M_OPTIONS = 1 << 6, MG_M_TRACE = 1 << 7,
  MG_M_CONNECT = 1 << 8, MG_M_OTHER = 1 << 9, MG_METHOD_ANY = 0x3ff
};

/* A listening address. name is NULL for the default listener (routes that name none). */
typedef struct mg_listen_conf {
  char *name;       /* "demo", or NULL for the default listener */
  char *host;       /* IP literal, default "0.0.0.0"; IPv6 without [brackets];
                       "localhost" is stored as "127.0.0.1" */
  int port;
  int backlog;      /* default 511 */
  int admin;        /* 1: the admin API listener (admin { ... }); name is "(admin)" */
} mg_listen_conf_t;

/* A shared-memory dictionary: mg.shared.NAME. */
typedef struct mg_shared_conf {
  char *name;
  size_t size;      /* bytes */
} mg_shared_conf_t;

/* One target of an upstream: host may be an IP literal or a DNS name. */
typedef struct mg_target_conf {
  char *host;       /* IPv6 without its [brackets] */
  int port;
  int weight;       /* default 1 */
} mg_target_conf_t;

typedef struct mg_upstream_conf {
  char *name;
  mg_target_conf_t *targets;
  size_t ntargets;
  double connect_timeout;   /* seconds, default 5 */
  double send_timeout;      /* seconds, default 60 */
  double read_timeout;      /* seconds, default 60 ("timeout = N" sets this one) */
  int keepalive_max_idle;   /* idle connections kept per target per worker, default 32 */
  double keepalive_timeout; /* idle seconds before an idle connection is closed, default 60 */
  int keepalive_requests;   /* requests per connection before it is retired, default 1000 */
  int max_fails;            /* consecutive failures that eject a target, default 3; 0 = never */
  double fail_timeout;      /* seconds a target stays ejected, default 10 */
  double dns_ttl;           /* seconds a resolved name is cached, default 30 */
  char *file; int line;     /* where it was declared */
} mg_upstream_conf_t;

/* What a route does with the Host header it sends upstream. */
typedef enum { MG_HOST_PASS = 0, MG_HOST_UPSTREAM, MG_HOST_FIXED } mg_host_policy_t;

typedef struct mg_header_conf { char *name; char *value; } mg_header_conf_t;

typedef struct mg_route_conf {
  char *file; int line;       /* where `route "..."` was written */
  char *spec;                 /* the route string as written, e.g. "GET /users/:id" */
  unsigned methods;           /* MG_M_* bits, MG_METHOD_ANY when none was named */
  char *path;                 /* "/users/:id", "/static/" + "*", "/" */
  char **hosts;               /* exact "api.example.com" or wildcard "*.example.com";
                                 lower-case, without port */
  size_t nhosts;              /* 0 = any host */
  char *listen;               /* listener name, NULL = the default listener */
  char *name;                 /* name for logs, default = spec */
  /* proxy action */
  char *upstream;             /* upstream name, or NULL when the route responds itself */
  char *strip_prefix;         /* removed from the start of the path before proxying
                                 (`strip_prefix = true` was resolved to the pattern's literal
                                 part without its trailing slash: "/static/" "*" -> "/static") */
  char *rewrite;              /* replaces the matched path; may use :param and * */
  mg_host_policy_t host_policy;
  char *host_value;           /* for MG_HOST_FIXED */
  /* fixed-response action */
  int respond_status;         /* 0 = not a fixed-response route */
  char *respond_body;         /* body bytes (a table body was encoded as JSON); never NULL on
                                 a fixed-response route ("" when no body was given) */
  size_t respond_body_len;
  mg_header_conf_t *respond_headers; /* sorted by name; Content-Type added when the config
                                 gave none and there is a body (JSON / text/plain) */
  size_t nrespond_headers;
  size_t max_body;            /* request body limit for this route, default limits.body */
  /* Lua: which hooks the route runs (global ones included), bit per MG_HOOK_* (mg_task.h).
   * The functions themselves live in the VM that evaluated the config. */
  unsigned hooks;
} mg_route_conf_t;

/* Protective limits and timeouts (DESIGN.md "Defaults that protect it"). */
typedef struct mg_limits_conf {
  size_t header_bytes;        /* whole request head, default 16 KiB -> 431 */
  size_t header_count;        /* default 100 -> 431 */
  size_t uri_bytes;           /* default 8 KiB -> 414 */
  size_t body_bytes;          /* default 1 MiB -> 413 */
  size_t chunk_ext_bytes;     /* chunk-extension bytes per request, default 4 KiB -> 400 */
  double header_timeout;      /* total seconds to receive a request head, default 10 -> 408 */
  double body_timeout;        /* idle seconds between body reads, default 30 -> 408 */
  double keepalive_timeout;   /* idle keep-alive seconds, default 60 */
  int keepalive_requests;     /* requests per client connection, default 1000 */
  double send_timeout;        /* seconds a write to the client may stall, default 60 */
  int max_connections;        /* per worker, default 10000 */
} mg_limits_conf_t;

typedef struct mg_config {
  char *file;                 /* absolute path of the config file */
  int workers;                /* 0 = one per core ("auto") */
  char *pid_file;             /* default "/tmp/moongate.pid" */
  double drain_timeout;       /* seconds to finish in-flight requests on stop, default 10 */
  char *access_log;           /* path or "stdout" (default); NULL when "off" */
  char *error_log;            /* path or "stderr" (default) */
  int log_level;              /* MG_LOG_* from mg_log.h, default info */
  char **redact_query;        /* query parameter names redacted in logs */
  size_t nredact_query;
  mg_limits_conf_t limits;
  mg_listen_conf_t *listens; size_t nlistens;
  mg_upstream_conf_t *upstreams; size_t nupstreams;
  mg_route_conf_t *routes; size_t nroutes;
  mg_shared_conf_t *shared; size_t nshared;
  char *admin_token;          /* bearer token of the admin API, NULL when none */
  int has_request_hooks;      /* global `request` hooks exist */
  size_t lua_memory;          /* bytes a worker's Lua VM may allocate, default 128 MiB */
  double lua_budget;          /* seconds a hook may run between two waits, default 0.1 */
  unsigned lua_allow;         /* MG_LUA_ALLOW_* bits (mg_lua_vm.h) the config opened */
  char **files;               /* every file the config loaded (itself first), absolute */
  size_t nfiles;
} mg_config_t;

/* Loads and validates FILE. On success returns 0 and fills *cfg (cfg->file and every
 * route's and upstream's file are absolute). On failure returns -1, leaves *cfg zeroed and
 * sets *errors to a malloc'd text of one "file:line: message\n" line per problem, sorted by
 * line, FILE written as given (caller frees; NULL only when out of memory). Each call uses
 * its own Lua state, so a reload may call it while an older config is still in use. */
int mg_config_load(const char *file, mg_config_t *cfg, char **errors);

/* Loads FILE as mg_config_load does, inside VM (a worker's: the hooks the config defines stay
 * in it). On success also sets *REF (when not NULL) to a registry reference of the config's
 * Lua values: { request = {fn...}, routes = { [i] = { access = {fn...}, handler = fn,
 * response = {fn...}, log = {fn...} } } } (route i = cfg->routes[i - 1]). The VM's budget is
 * left at the config's lua.budget. */
struct mg_lua_vm_s;
int mg_config_load_vm(struct mg_lua_vm_s *vm, const char *file, mg_config_t *cfg,
                      char **errors, int *ref);

/* The files a config loads, as the master accepted them. The master records what each load
 * reads (RECORD before loading, then COMMIT when it accepted the result, or OFF); a worker
 * it forks inherits the committed copy and loads its first generation from it (REPLAY, then
 * FREE), so a worker respawned after someone saved a broken file still starts on the
 * generation that is serving. For a reload the master writes the committed copy to a file
 * (mg_config_snapshot_write) before it signals the workers, and each worker loads the new
 * generation from that file (mg_config_snapshot_read, REPLAY), not from the files as they
 * are by then. FREE releases the copies. */
enum { MG_SNAPSHOT_OFF = 0, MG_SNAPSHOT_RECORD, MG_SNAPSHOT_COMMIT, MG_SNAPSHOT_REPLAY,
       MG_SNAPSHOT_FREE };
void mg_config_snapshot(int mode);

/* Writes the committed copy, tagged with generation GEN, to PATH (through PATH.tmp and a
 * rename, so a reader sees the old file or the new one whole). 0, or -1 with errno. */
int mg_config_snapshot_write(const char *path, uint64_t gen);

/* Makes the copy in PATH the committed one and returns its generation; 0 (and no copy) when
 * there is no such file or it is not whole. */
uint64_t mg_config_snapshot_read(const char *path);

/* Frees everything the config owns (safe on a zeroed struct). */
void mg_config_free(mg_config_t *cfg);

/* Finds an upstream by name, or NULL. */
const mg_upstream_conf_t *mg_config_upstream(const mg_config_t *cfg, const char *name);

#endif
