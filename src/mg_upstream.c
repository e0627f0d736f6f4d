/* mg_upstream: where upstream sockets come from. Per worker: the runtime of each configured
 * upstream (targets, balancer), fresh connections (resolve through mg_resolver, connect with
 * a timeout) and the keep-alive pool per target. An idle pooled connection keeps reading: any
 * byte or EOF from the upstream while idle means it is no longer usable, so it is closed
 * (nginx's keepalive module does the same). Connections are freed when both their handles
 * (tcp, timer) have closed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg_gen.h"
#include "mg_log.h"
#include "mg_upstream.h"
#include "mg_worker.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* ------------------------------------------------------------------------------------------
 * Runtime per upstream.
 * ---------------------------------------------------------------------------------------- */

mg_upstream_t *mg_upstreams_new(mg_worker_t *w, const mg_config_t *cfg) {
  mg_upstream_t *ups = calloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(mg_upstream_t));
  if (!ups) return NULL;
  for (size_t i = 0; i < cfg->nupstreams; i++) {
    const mg_upstream_conf_t *uc = &cfg->upstreams[i];
    mg_upstream_t *u = &ups[i];
    u->conf = uc;
    u->w = w;
    u->ntargets = uc->ntargets;
    u->targets = calloc(uc->ntargets ? uc->ntargets : 1, sizeof(mg_target_t));
    int *weights = calloc(uc->ntargets ? uc->ntargets : 1, sizeof(int));
    if (!u->targets || !weights) {
      free(weights);
      mg_upstreams_free(ups, i + 1);
      return NULL;
    }
    for (size_t j = 0; j < uc->ntargets; j++) {
      mg_target_t *t = &u->targets[j];
      t->conf = &uc->targets[j];
      t->up = u;
      t->index = j;
      if (strchr(t->conf->host, ':'))       /* an IPv6 literal */
        snprintf(t->name, sizeof t->name, "[%s]:%d", t->conf->host, t->conf->port);
      else
        snprintf(t->name, sizeof t->name, "%s:%d", t->conf->host, t->conf->port);
      weights[j] = t->conf->weight > 0 ? t->conf->weight : 1;
    }
    int rc = mg_balancer_init(&u->balancer, weights, uc->ntargets, uc->max_fails, uc->fail_timeout);
    free(weights);
    if (rc != 0) {
      mg_upstreams_free(ups, i + 1);
      return NULL;
    }
  }
  return ups;
}

void mg_upstreams_free(mg_upstream_t *ups, size_t n) {
  if (!ups) return;
  for (size_t i = 0; i < n; i++) {
    mg_upstream_t *u = &ups[i];
    if (u->targets)
      for (size_t j = 0; j < u->ntargets; j++)
        while (u->targets[j].idle) mg_upconn_close(u->targets[j].idle);
    free(u->targets);
    mg_balancer_dispose(&u->balancer);
  }
  free(ups);
}

mg_target_t *mg_upstream_pick(mg_upstream_t *u, uint64_t exclude) {
  int i = mg_balancer_pick(&u->balancer, mg_worker_now(u->w), exclude);
  return i < 0 ? NULL : &u->targets[i];
}

void mg_upstream_report(mg_target_t *t, int ok) {
  mg_upstream_t *u = t->up;
  if (ok) {
    mg_balancer_ok(&u->balancer, t->index);
    return;
  }
  mg_balancer_fail(&u->balancer, t->index, mg_worker_now(u->w));
  if (u->balancer.max_fails > 0 && u->balancer.peers[t->index].ejected_until)
    mg_log_warn("upstream %s: target %s ejected for %.1fs after %d failures", u->conf->name,
                t->name, u->conf->fail_timeout, u->balancer.max_fails);
}

/* ------------------------------------------------------------------------------------------
 * Connections.
 * ---------------------------------------------------------------------------------------- */

static void on_upconn_closed(uv_handle_t *h) {
  mg_upconn_t *c = h->data;
  if (--c->handles == 0) free(c);
}

static void idle_unlink(mg_upconn_t *c) {
  mg_target_t *t = c->target;
  if (c->prev) c->prev->next = c->next;
  else t->idle = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
  t->nidle--;
}

void mg_upconn_close(mg_upconn_t *c) {
  if (c->state == MG_UPCONN_CLOSING) return;
  if (c->state == MG_UPCONN_IDLE) idle_unlink(c);
  if (c->resolve_pending) {
    mg_resolver_cancel(c->w->resolver, c->resolve_pending);
    c->resolve_pending = NULL;
  }
  c->state = MG_UPCONN_CLOSING;
  c->data = NULL;
  uv_close((uv_handle_t *)&c->timer, on_upconn_closed);
  uv_close((uv_handle_t *)&c->tcp, on_upconn_closed);
}

/* Reports a failed connect to the owner; the connection is closed first. */
static void upconn_fail(mg_upconn_t *c, int status) {
  mg_upconn_connect_cb cb = c->connect_cb;
  void *data = c->data;
  c->connect_cb = NULL;
  mg_upconn_close(c);
  if (cb) cb(c, status, data);
}

static void on_upconn_timer(uv_timer_t *t) {
  mg_upconn_t *c = container_of(t, mg_upconn_t, timer);
  c->timer_due = 0;
  if (!c->deadline || !c->deadline_cb) return;
  uint64_t now = mg_worker_now(c->w);
  if (now < c->deadline) {                   /* moved on since: wait for the rest */
    c->timer_due = c->deadline;
    uv_timer_start(&c->timer, on_upconn_timer, c->deadline - now, 0);
    return;
  }
  c->deadline = 0;
  c->deadline_cb(c);
}

void mg_upconn_set_deadline(mg_upconn_t *c, uint64_t deadline, void (*cb)(mg_upconn_t *c)) {
  c->deadline = deadline;
  c->deadline_cb = cb;
  if (!deadline || (c->timer_due && c->timer_due <= deadline)) return;
  uint64_t now = mg_worker_now(c->w);
  c->timer_due = deadline;
  uv_timer_start(&c->timer, on_upconn_timer, deadline > now ? deadline - now : 0, 0);
}

static void on_connect_timeout(mg_upconn_t *c) {
  upconn_fail(c, c->fail_status ? c->fail_status : UV_ETIMEDOUT);
}

/* Fails from the next loop iteration, never from inside mg_upconn_connect. */
static void upconn_fail_later(mg_upconn_t *c, int status) {
  c->fail_status = status;
  mg_upconn_set_deadline(c, mg_worker_now(c->w), on_connect_timeout);
}

static void on_connect(uv_connect_t *r, int status) {
  mg_upconn_t *c = container_of(r, mg_upconn_t, connect_req);
  if (c->state != MG_UPCONN_CONNECTING) return;   /* closed meanwhile (ECANCELED) */
  c->deadline = 0;
  if (status < 0) {
    upconn_fail(c, status);
    return;
  }
  c->state = MG_UPCONN_BUSY;
  uv_tcp_nodelay(&c->tcp, 1);
  mg_upconn_connect_cb cb = c->connect_cb;
  c->connect_cb = NULL;
  cb(c, 0, c->data);
}

static void on_resolved(void *data, int status, const struct sockaddr *addr) {
  mg_upconn_t *c = data;
  c->resolve_pending = NULL;
  if (status < 0) {
    mg_log_warn("upstream %s: cannot resolve %s: %s", c->target->up->conf->name,
                c->target->conf->host, uv_strerror(status));
    upconn_fail_later(c, status);
    return;
  }
  int rc = uv_tcp_connect(&c->connect_req, &c->tcp, addr, on_connect);
  if (rc != 0) upconn_fail_later(c, rc);
}

mg_upconn_t *mg_upconn_connect(mg_target_t *t, mg_upconn_connect_cb cb, void *data) {
  mg_worker_t *w = t->up->w;
  mg_upconn_t *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->w = w;
  c->target = t;
  c->state = MG_UPCONN_CONNECTING;
  c->connect_cb = cb;
  c->data = data;
  uv_tcp_init(&w->loop, &c->tcp);
  uv_timer_init(&w->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles = 2;
  uint64_t timeout = mg_ms(t->up->conf->connect_timeout);
  mg_upconn_set_deadline(c, mg_worker_now(w) + (timeout ? timeout : 1), on_connect_timeout);
  int rc = mg_resolver_resolve(w->resolver, t->conf->host, t->conf->port, t->up->conf->dns_ttl,
                               on_resolved, c, &c->resolve_pending);
  if (rc < 0) upconn_fail_later(c, rc);
  return c;
}

/* ------------------------------------------------------------------------------------------
 * The keep-alive pool.
 * ---------------------------------------------------------------------------------------- */

/* The one read callback of every upstream connection: the owner's callback while busy;
 * while idle, bytes from the upstream were never asked for and EOF means it closed. Either
 * way an idle connection can no longer carry a clean exchange. */
static void on_upconn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  mg_upconn_t *c = container_of(s, mg_upconn_t, tcp);
  if (c->state == MG_UPCONN_BUSY && c->read_cb) {
    c->read_cb(c, nread, buf);
    return;
  }
  if (nread != 0) mg_upconn_close(c);
}

void mg_upconn_read_start(mg_upconn_t *c, mg_upconn_read_cb cb) {
  c->read_cb = cb;
  if (!c->reading) {
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, mg_worker_alloc_cb, on_upconn_read);
  }
}

void mg_upconn_read_stop(mg_upconn_t *c) {
  if (c->reading) {
    c->reading = 0;
    uv_read_stop((uv_stream_t *)&c->tcp);
  }
}

static void on_idle_timeout(mg_upconn_t *c) { mg_upconn_close(c); }

mg_upconn_t *mg_pool_acquire(mg_target_t *t) {
  mg_upconn_t *c = t->idle;
  if (!c) return NULL;
  idle_unlink(c);
  c->deadline = 0;
  c->read_cb = NULL;                         /* still reading: see on_upconn_read */
  c->state = MG_UPCONN_BUSY;
  return c;
}

void mg_pool_release(mg_upconn_t *c) {
  mg_target_t *t = c->target;
  if (t->up->gen && c->w->gen && t->up->gen != c->w->gen) {
    /* A reload replaced this connection's generation while it was busy: it joins the same
     * target's pool in the current one, or closes when that target is gone. */
    mg_target_t *now = mg_gen_same_target(c->w->gen, t);
    if (!now) {
      mg_upconn_close(c);
      return;
    }
    c->target = t = now;
  }
  const mg_upstream_conf_t *uc = t->up->conf;
  c->requests++;
  c->data = NULL;
  c->read_cb = NULL;
  c->deadline = 0;
  if (c->w->stopping || uc->keepalive_max_idle <= 0 || c->requests >= uc->keepalive_requests ||
      t->nidle >= (size_t)uc->keepalive_max_idle || c->write_queued) {
    mg_upconn_close(c);
    return;
  }
  c->state = MG_UPCONN_IDLE;
  c->prev = NULL;
  c->next = t->idle;
  if (t->idle) t->idle->prev = c;
  t->idle = c;
  t->nidle++;
  mg_upconn_read_start(c, NULL);             /* an idle connection keeps listening */
  uint64_t timeout = mg_ms(uc->keepalive_timeout);
  mg_upconn_set_deadline(c, mg_worker_now(c->w) + (timeout ? timeout : 1), on_idle_timeout);
}
