/* mg_admin: the admin API, served by every worker on the admin listener (admin { ... } in
 * the config; loopback by default, a bearer token required when one is set):
 *
 *   GET  /status   version, master pid, uptime, generation, workers, last reload result
 *   POST /reload   reloads as SIGHUP does and answers once the master decided and every
 *                  worker serves the new generation (or with the reason it failed)
 *
 * Both read the status page (mg_status.h); POST /reload signals the master and polls the
 * page on a timer, so the worker never blocks. Errors are JSON, as everywhere. */
#include "mg_admin.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "mg_buf.h"
#include "mg_http.h"
#include "mg_log.h"
#include "mg_request.h"
#include "mg_status.h"

#define RELOAD_POLL_MS 2
#define RELOAD_WAIT_MS 30000

/* Appends S as a JSON string. */
static void json_str(mg_buf_t *b, const char *s) {
  mg_buf_append(b, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      mg_buf_append(b, "\\", 1);
      mg_buf_append(b, s, 1);
    } else if (c == '\n') {
      mg_buf_append(b, "\\n", 2);
    } else if (c < 0x20) {
      mg_buf_printf(b, "\\u%04x", c);
    } else {
      mg_buf_append(b, s, 1);
    }
  }
  mg_buf_append(b, "\"", 1);
}

static void answer_json(mg_request_t *req, int status, mg_buf_t *body) {
  mg_request_respond(req, status, "application/json", body->data ? body->data : "", body->len,
                     NULL, 0);
  mg_buf_dispose(body);
}

static void answer_error(mg_request_t *req, int status, const char *msg) {
  mg_buf_t b;
  mg_buf_init(&b);
  mg_buf_append(&b, "{\"error\":", 9);
  json_str(&b, msg);
  mg_buf_printf(&b, ",\"status\":%d}", status);
  answer_json(req, status, &b);
}

static void status_json(mg_buf_t *b, const mg_status_t *st) {
  mg_buf_printf(b, "{\"version\":\"%s\",\"master_pid\":%d,\"uptime\":%.3f,\"generation\":%llu,",
                MOONGATE_VERSION, st->master_pid, mg_http_wall_time() - st->started,
                (unsigned long long)mg_status_load(&st->generation));
  mg_buf_append(b, "\"workers\":[", 11);
  for (int i = 0; i < st->nworkers && i < MG_STATUS_MAX_WORKERS; i++) {
    const mg_status_worker_t *w = &st->workers[i];
    mg_buf_printf(b, "%s{\"slot\":%d,\"pid\":%d,\"generation\":%llu", i ? "," : "", i, w->pid,
                  (unsigned long long)mg_status_load(&w->generation));
    if (w->error[0]) {
      mg_buf_printf(b, ",\"failed_generation\":%llu,\"error\":",
                    (unsigned long long)mg_status_load(&w->failed_generation));
      json_str(b, w->error);
    }
    mg_buf_append(b, "}", 1);
  }
  mg_buf_printf(b, "],\"reloads\":%llu,\"reload_failures\":%llu,\"last_reload\":",
                (unsigned long long)mg_status_load(&st->reloads),
                (unsigned long long)mg_status_load(&st->reload_failures));
  if (mg_status_load(&st->reloads) == 0) {
    mg_buf_append(b, "null}", 5);
    return;
  }
  mg_buf_printf(b, "{\"ok\":%s,\"time\":%.3f", st->last_ok ? "true" : "false", st->last_time);
  if (!st->last_ok) {
    mg_buf_append(b, ",\"error\":", 9);
    json_str(b, st->last_error);
  }
  mg_buf_append(b, "}}", 2);
}

/* ---- POST /reload: wait for the verdict without blocking --------------------------------- */

typedef struct reload_wait {
  uv_timer_t timer;
  mg_request_t *req;            /* NULL once the client went away */
  uint64_t reloads_before;
  uint64_t waited_ms;
} reload_wait_t;

static void on_wait_closed(uv_handle_t *h) { free(h->data); }

static void reload_wait_end(reload_wait_t *rw) {
  if (rw->req) {
    rw->req->handler = NULL;
    rw->req->on_abort = NULL;
  }
  uv_timer_stop(&rw->timer);
  uv_close((uv_handle_t *)&rw->timer, on_wait_closed);
}

static void on_reload_abort(mg_request_t *req) {
  reload_wait_t *rw = req->handler;
  rw->req = NULL;
  req->handler = NULL;
  reload_wait_end(rw);
}

static void on_reload_poll(uv_timer_t *t) {
  reload_wait_t *rw = t->data;
  const mg_status_t *st = mg_worker_status();
  mg_request_t *req = rw->req;
  rw->waited_ms += RELOAD_POLL_MS;
  if (mg_status_load(&st->reloads) == rw->reloads_before) {
    if (rw->waited_ms < RELOAD_WAIT_MS) return;
    reload_wait_end(rw);
    answer_error(req, 504, "the master did not answer the reload");
    return;
  }
  mg_buf_t b;
  mg_buf_init(&b);
  if (!st->last_ok) {
    reload_wait_end(rw);
    mg_buf_append(&b, "{\"ok\":false,\"error\":", 20);
    json_str(&b, st->last_error);
    mg_buf_printf(&b, ",\"generation\":%llu}", (unsigned long long)mg_status_load(&st->generation));
    answer_json(req, 422, &b);
    return;
  }
  uint64_t gen = mg_status_load(&st->generation);
  int pending = 0;
  for (int i = 0; i < st->nworkers && i < MG_STATUS_MAX_WORKERS; i++) {
    const mg_status_worker_t *w = &st->workers[i];
    if (mg_status_load(&w->failed_generation) == gen) {
      reload_wait_end(rw);
      mg_buf_printf(&b, "{\"ok\":false,\"generation\":%llu,\"error\":", (unsigned long long)gen);
      json_str(&b, w->error);
      mg_buf_append(&b, "}", 1);
      answer_json(req, 422, &b);
      return;
    }
    if (mg_status_load(&w->generation) < gen) pending = 1;
  }
  if (pending && rw->waited_ms < RELOAD_WAIT_MS) return;
  reload_wait_end(rw);
  if (pending) {
    answer_error(req, 504, "the workers did not switch in time");
    return;
  }
  mg_buf_printf(&b, "{\"ok\":true,\"generation\":%llu}", (unsigned long long)gen);
  answer_json(req, 200, &b);
}

static void start_reload(mg_request_t *req) {
  const mg_status_t *st = mg_worker_status();
  reload_wait_t *rw = calloc(1, sizeof *rw);
  if (!rw) {
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  rw->req = req;
  rw->reloads_before = mg_status_load(&st->reloads);
  if (kill(st->master_pid, SIGHUP) != 0) {
    free(rw);
    answer_error(req, 500, "cannot signal the master");
    return;
  }
  uv_timer_init(&req->w->loop, &rw->timer);
  rw->timer.data = rw;
  uv_timer_start(&rw->timer, on_reload_poll, RELOAD_POLL_MS, RELOAD_POLL_MS);
  req->handler = rw;
  req->on_abort = on_reload_abort;
}

/* ---- entry --------------------------------------------------------------------------------- */

static int authorized(const mg_request_t *req) {
  const char *token = req->w->cfg->admin_token;
  if (!token) return 1;
  const mg_header_t *h = mg_request_header(req, "authorization");
  if (!h || h->value_len < 7 || !mg_http_ieq(h->value, 7, "bearer ")) return 0;
  const char *v = h->value + 7;
  size_t vl = h->value_len - 7;
  size_t tl = strlen(token);
  return vl == tl && CRYPTO_memcmp(v, token, tl) == 0;
}

void mg_admin_handle(mg_request_t *req) {
  const mg_status_t *st = mg_worker_status();
  if (!authorized(req)) {
    answer_error(req, 401, "a bearer token is required");
    return;
  }
  int is_get = req->method == HTTP_GET || req->method == HTTP_HEAD;
  if (req->path_len == 7 && memcmp(req->path, "/status", 7) == 0) {
    if (!is_get) {
      answer_error(req, 405, "method not allowed");
      return;
    }
    if (!st) {
      answer_error(req, 503, "no status page");
      return;
    }
    mg_buf_t b;
    mg_buf_init(&b);
    status_json(&b, st);
    answer_json(req, 200, &b);
    return;
  }
  if (req->path_len == 7 && memcmp(req->path, "/reload", 7) == 0) {
    if (req->method != HTTP_POST) {
      answer_error(req, 405, "method not allowed");
      return;
    }
    if (!st) {
      answer_error(req, 503, "no status page");
      return;
    }
    start_reload(req);
    return;
  }
  answer_error(req, 404, "no such admin endpoint (GET /status, POST /reload)");
}
