/* mg_worker: one worker process: a libuv loop serving the listening sockets it inherited from
 * the master, with the routers, upstream pools and resolver of the current config. Nothing on
 * the request path takes a lock; workers share nothing but the listening ports. */
#ifndef MG_WORKER_H
#define MG_WORKER_H

#include <stdint.h>
#include <uv.h>

#include "mg_config.h"
#include "mg_gen.h"
#include "mg_lua_vm.h"
#include "mg_resolver.h"
#include "mg_router.h"

struct mg_conn;
struct mg_upstream;
struct mg_shdict;

/* Size of the worker's shared read buffer: every socket read lands here first. */
#define MG_READ_BUF_SIZE (64 * 1024)

typedef struct mg_listener {
  uv_tcp_t handle;
  const mg_listen_conf_t *conf;
  size_t index;                 /* in the worker's listeners (and each generation's routers) */
  struct mg_worker *w;
  int fd;                       /* inherited listening socket */
  int paused;                   /* accepting stopped at max_connections */
} mg_listener_t;

typedef struct mg_worker {
  uv_loop_t loop;
  const mg_config_t *cfg;       /* the config the worker started with: listeners, limits, logs */
  mg_gen_t *gen;                /* the current generation: routes, upstreams, hooks */
  mg_lua_vm_t *vm;              /* the worker's Lua VM (every generation's scripts live here) */
  struct mg_shdict *const *dicts; /* mg.shared: made by the master before fork */
  size_t ndicts;
  int slot;                     /* the master's worker slot (its line on the status page) */
  mg_listener_t *listeners;
  size_t nlisteners;
  mg_resolver_t *resolver;
  struct mg_conn *conns;        /* every open client connection (intrusive list) */
  size_t nconns;
  int stopping;                 /* SIGTERM seen: draining */
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_timer_t drain_timer;
  uint64_t requests;            /* requests started (request ids) */
  char id_prefix[17];           /* random per worker: request ids are prefix + counter */
  uv_timer_t conn_timer;        /* fires for the earliest connection deadline (mg_server.c) */
  uint64_t conn_timer_due;
  struct mg_conn *tq_head[6], *tq_tail[6];  /* connections by kind of timeout, by deadline */
  uv_tcp_t reject;              /* accepts (and closes) a connection when memory runs out */
  int reject_busy;
  mg_listener_t *reject_waiting;
  struct mg_request *spare;     /* finished requests kept for reuse (their buffers too) */
  size_t nspare;
  char readbuf[MG_READ_BUF_SIZE];
} mg_worker_t;

/* Runs a worker on CFG with the listening sockets FDS (one per cfg->listens entry) and the
 * shared dictionaries DICTS until it has drained after SIGTERM/SIGINT. Returns the process
 * exit code. */
int mg_worker_run(const mg_config_t *cfg, const int *fds, struct mg_shdict *const *dicts,
                  size_t ndicts, int slot);

struct mg_status;
/* The status page the workers report to (set by the master before forking; NULL in tests). */
void mg_worker_set_status(struct mg_status *st);
struct mg_status *mg_worker_status(void);


/* Evaluates the config file in W's VM and builds generation ID from it. Returns NULL with
 * the errors (malloc'd, one "file:line: message" per line) in *ERRORS. */
mg_gen_t *mg_worker_load_gen(mg_worker_t *w, uint64_t id, char **errors);

/* libuv allocation callback handing out the worker's shared read buffer (handle->loop->data
 * is the worker). The read callback must consume or copy the bytes before returning. */
void mg_worker_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);

/* Called by the server when a connection closes: updates accounting, resumes accepting
 * below the cap and finishes draining when the last connection is gone. */
void mg_worker_conn_closed(mg_worker_t *w);

/* A configured duration in seconds as loop milliseconds (0 or less: 0, meaning "none"). */
static inline uint64_t mg_ms(double seconds) {
  return seconds <= 0 ? 0 : (uint64_t)(seconds * 1000.0 + 0.5);
}

/* Milliseconds on the loop's clock. */
static inline uint64_t mg_worker_now(mg_worker_t *w) { return uv_now(&w->loop); }

#endif
