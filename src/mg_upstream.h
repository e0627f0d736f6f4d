/* mg_upstream: where upstream sockets come from. Per worker, each configured upstream has its
 * targets, a balancer (mg_balancer) and per target a bounded keep-alive pool of idle
 * connections. A connection goes back to the pool only when the proxy has checked that the
 * exchange was complete and cleanly framed (mg_proxy does that; see its checklist). */
#ifndef MG_UPSTREAM_H
#define MG_UPSTREAM_H

#include <llhttp.h>
#include <stdint.h>
#include <uv.h>

#include "mg_balancer.h"
#include "mg_config.h"

struct mg_worker;
typedef struct mg_upconn mg_upconn_t;

typedef struct mg_target {
  const mg_target_conf_t *conf;
  struct mg_upstream *up;
  size_t index;                 /* index in the balancer */
  char name[280];               /* "host:port", as logged */
  mg_upconn_t *idle;            /* idle keep-alive connections, most recent first */
  size_t nidle;
} mg_target_t;

typedef struct mg_upstream {
  const mg_upstream_conf_t *conf;
  struct mg_worker *w;
  struct mg_gen *gen;           /* the generation it belongs to */
  mg_target_t *targets;
  size_t ntargets;
  mg_balancer_t balancer;
} mg_upstream_t;

/* Called when a fresh connection is established (status 0) or failed (a libuv error:
 * UV_ECONNREFUSED, UV_ETIMEDOUT for the connect timeout, a resolver error). On failure the
 * connection is already closing: do not touch it again. */
typedef void (*mg_upconn_connect_cb)(mg_upconn_t *c, int status, void *data);

/* The owner's read callback while the connection is busy (libuv's nread/buf semantics). */
typedef void (*mg_upconn_read_cb)(mg_upconn_t *c, ssize_t nread, const uv_buf_t *buf);

enum { MG_UPCONN_CONNECTING = 1, MG_UPCONN_BUSY, MG_UPCONN_IDLE, MG_UPCONN_CLOSING };

struct mg_upconn {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  uv_timer_t timer;             /* connect timeout, then the owner's send/read timeouts */
  mg_target_t *target;
  struct mg_worker *w;
  llhttp_t parser;              /* response parser, owned by the proxy while busy */
  mg_upconn_t *next, *prev;     /* idle list links */
  int state;
  int requests;                 /* exchanges completed on this connection */
  int handles;                  /* open uv handles; freed when the last one closed */
  size_t write_queued;          /* request bytes handed to uv_write, not yet written */
  int fail_status;              /* a connect failure reported from the timer (deferred) */
  void *resolve_pending;
  mg_upconn_connect_cb connect_cb;
  mg_upconn_read_cb read_cb;    /* the owner's, while busy */
  void (*deadline_cb)(mg_upconn_t *c); /* what happens at the deadline */
  uint64_t deadline;            /* loop ms; 0 = none (see mg_upconn_set_deadline) */
  uint64_t timer_due;           /* when the uv timer is set to fire; 0 = not set */
  int reading;                  /* uv_read_start is in effect */
  void *data;                   /* the owner (a proxy exchange) while busy */
};

/* Builds the runtime for every upstream of CFG (an array of cfg->nupstreams) in worker W.
 * Returns NULL when out of memory. */
mg_upstream_t *mg_upstreams_new(struct mg_worker *w, const mg_config_t *cfg);

/* Closes every idle connection of the N upstreams UPS and frees them (busy connections are
 * closed or handed on by their owners first). */
void mg_upstreams_free(mg_upstream_t *ups, size_t n);

/* Picks a target by weight, skipping ejected targets and those in EXCLUDE (bit per index).
 * Returns NULL when none is available (503). */
mg_target_t *mg_upstream_pick(mg_upstream_t *u, uint64_t exclude);

/* Takes an idle keep-alive connection to T, or NULL when the pool is empty. The caller owns
 * it (state BUSY) and must read from it with its own callbacks. */
mg_upconn_t *mg_pool_acquire(mg_target_t *t);

/* Opens a fresh connection to T: resolves the host (cached), connects with the upstream's
 * connect timeout, sets TCP_NODELAY; calls CB(c, status, DATA) once. */
mg_upconn_t *mg_upconn_connect(mg_target_t *t, mg_upconn_connect_cb cb, void *data);

/* Calls CB at loop time DEADLINE (ms; 0 clears it). Lazy: the uv timer is restarted only
 * when the deadline moves earlier, so moving it later on every read costs nothing. */
void mg_upconn_set_deadline(mg_upconn_t *c, uint64_t deadline, void (*cb)(mg_upconn_t *c));

/* Delivers what the upstream sends to CB (the owner's) until the connection is released.
 * Reading continues across pool transitions, so this costs no system call on a pooled one. */
void mg_upconn_read_start(mg_upconn_t *c, mg_upconn_read_cb cb);

/* Stops reading (back-pressure); mg_upconn_read_start resumes. */
void mg_upconn_read_stop(mg_upconn_t *c);

/* Returns a connection whose exchange was complete and clean to its target's pool (or
 * closes it when the pool is full or it served keepalive_requests exchanges). */
void mg_pool_release(mg_upconn_t *c);

/* Closes a connection for good (error, bad framing, unread bytes). Safe in any state. */
void mg_upconn_close(mg_upconn_t *c);

/* Records the outcome of an exchange with T for passive ejection. */
void mg_upstream_report(mg_target_t *t, int ok);

#endif
