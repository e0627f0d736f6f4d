/* mg_server: the client side of the HTTP engine. Accepts connections, parses requests with
 * llhttp (built in strict mode, no lenient flag) plus the checks llhttp 8.1.0 lacks, enforces
 * the limits and timeouts, writes responses with back-pressure, and runs keep-alive and
 * pipelining: one request at a time per connection, so responses always leave in order.
 *
 * Reading model: received bytes are parsed straight from the worker's read buffer; whatever
 * the parser must not consume yet (the next pipelined request, a body the handler has not
 * asked for) is copied to conn->pending and parsed later. The parser pauses at two points:
 * after the head of a request with a body (the handler decides when to read it), and at the
 * end of every message. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "mg_log.h"
#include "mg_request.h"
#include "mg_write.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Body bytes queued to the client above which the handler should stop reading upstream. */
#define MG_PENDING_MAX (64 * 1024)

static llhttp_settings_t parser_settings;
static void conn_process(mg_conn_t *c);
static void conn_close(mg_conn_t *c);
static void conn_fail(mg_conn_t *c, mg_http_error_t err);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* ------------------------------------------------------------------------------------------
 * Timers: one per connection, its meaning depends on the state.
 * ---------------------------------------------------------------------------------------- */

/* Connections have no uv timer of their own (it would be the largest part of an idle
 * connection). Every timeout of one kind has the same duration, so a connection that enters a
 * timed state is appended to that kind's list and each list stays sorted by deadline: the
 * worker's one timer (w->conn_timer) fires for the earliest head, and expiry is O(1) per
 * connection. A connection changing state moves lists in O(1), with no timer system call. */
enum { TQ_NONE = 0, TQ_HEADER, TQ_KEEPALIVE, TQ_BODY, TQ_SEND, TQ_LINGER };

static void tq_unlink(mg_conn_t *c) {
  if (!c->tq_kind) return;
  mg_worker_t *w = c->w;
  if (c->tq_prev) c->tq_prev->tq_next = c->tq_next;
  else w->tq_head[c->tq_kind] = c->tq_next;
  if (c->tq_next) c->tq_next->tq_prev = c->tq_prev;
  else w->tq_tail[c->tq_kind] = c->tq_prev;
  c->tq_next = c->tq_prev = NULL;
  c->tq_kind = TQ_NONE;
  c->deadline = 0;
}

static void on_conn_timer(uv_timer_t *t);

/* Starts the worker's timer for the earliest deadline of all lists, if it is not set earlier. */
static void tq_schedule(mg_worker_t *w, uint64_t deadline) {
  if (w->conn_timer_due && w->conn_timer_due <= deadline) return;
  uint64_t now = mg_worker_now(w);
  w->conn_timer_due = deadline;
  uv_timer_start(&w->conn_timer, on_conn_timer, deadline > now ? deadline - now : 0, 0);
}

/* What a deadline means depends on the connection's state when it passes. */
static void conn_expire(mg_conn_t *c) {
  switch (c->state) {
    case MG_CONN_IDLE:
      conn_close(c);                         /* idle keep-alive, or a silent new connection */
      break;
    case MG_CONN_HEAD:
      conn_fail(c, MG_HTTP_E_REQUEST_TIMEOUT); /* total header deadline (slowloris) */
      break;
    case MG_CONN_BUSY:
      if (c->write_queued) {                 /* the client stopped reading our response */
        mg_log_info("client %s:%u: send timeout, closing", c->client_ip, c->client_port);
        mg_conn_abort(c);
      } else if (c->req && c->req->body_reading && !c->req->body_done && !c->body_paused) {
        conn_fail(c, MG_HTTP_E_REQUEST_TIMEOUT); /* body idle timeout */
      }
      break;
    default:
      conn_close(c);                         /* lingering close ran out */
      break;
  }
}

static void on_conn_timer(uv_timer_t *t) {
  mg_worker_t *w = t->data;
  w->conn_timer_due = 0;
  uint64_t now = mg_worker_now(w);
  for (int k = TQ_HEADER; k <= TQ_LINGER; k++) {
    mg_conn_t *c;
    while ((c = w->tq_head[k]) && c->deadline <= now) {
      tq_unlink(c);
      conn_expire(c);
    }
  }
  uint64_t next = 0;
  for (int k = TQ_HEADER; k <= TQ_LINGER; k++)
    if (w->tq_head[k] && (!next || w->tq_head[k]->deadline < next)) next = w->tq_head[k]->deadline;
  if (next) tq_schedule(w, next);
}

void mg_server_timers_init(mg_worker_t *w) {
  uv_timer_init(&w->loop, &w->conn_timer);
  w->conn_timer.data = w;
  uv_unref((uv_handle_t *)&w->conn_timer);
}

/* Puts C on the list of its current state's timeout (or none). */
static void conn_arm_timer(mg_conn_t *c) {
  const mg_limits_conf_t *lim = &c->w->cfg->limits;
  uint64_t now = mg_worker_now(c->w);
  uint64_t deadline = 0;
  int kind = TQ_NONE;
  switch (c->state) {
    case MG_CONN_IDLE:
      kind = c->nrequests == 0 ? TQ_HEADER : TQ_KEEPALIVE;
      deadline = now + mg_ms(c->nrequests == 0 ? lim->header_timeout : lim->keepalive_timeout);
      break;
    case MG_CONN_HEAD:
      kind = TQ_HEADER;
      deadline = c->req ? c->req->header_deadline : now;
      break;
    case MG_CONN_BUSY:
      if (c->write_queued) {
        kind = TQ_SEND;
        deadline = now + mg_ms(lim->send_timeout);
      } else if (c->req && c->req->body_reading && !c->req->body_done && !c->body_paused) {
        kind = TQ_BODY;
        deadline = now + mg_ms(lim->body_timeout);
      }
      break;
    default:
      kind = TQ_LINGER;
      deadline = now + 2000;
      break;
  }
  if (kind == c->tq_kind && deadline == c->deadline) return;
  tq_unlink(c);
  if (kind == TQ_NONE) return;
  mg_worker_t *w = c->w;
  /* Same duration per kind, so appending keeps the list sorted (a HEAD deadline was fixed at
   * the request's first byte, when the connection was appended). */
  c->tq_kind = (uint8_t)kind;
  c->deadline = deadline;
  c->tq_prev = w->tq_tail[kind];
  if (c->tq_prev) c->tq_prev->tq_next = c;
  else w->tq_head[kind] = c;
  w->tq_tail[kind] = c;
  tq_schedule(w, deadline);
}

/* ------------------------------------------------------------------------------------------
 * Closing. A connection owns one handle (tcp) and is freed when it has closed.
 * ---------------------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) {
  mg_conn_t *c = h->data;
  mg_worker_t *w = c->w;
  mg_buf_dispose(&c->pending);
  free(c);
  mg_worker_conn_closed(w);
}

static void conn_close(mg_conn_t *c) {
  if (uv_is_closing((uv_handle_t *)&c->tcp)) return;
  if (c->in_execute) {                       /* the parser is running on req: close after it */
    c->close_pending = 1;
    return;
  }
  if (c->req && c->state == MG_CONN_IDLE) {  /* a parser waiting for a first byte */
    mg_request_free(c->req);
    c->req = NULL;
  } else if (c->req) {                       /* a request still attached: it ends here */
    mg_request_t *req = c->req;
    if (!req->done) {
      req->aborted = 1;
      if (req->on_abort) req->on_abort(req);
      if (!req->status) req->status = 499;
    }
    mg_request_log(req);
    mg_request_free(req);
    c->req = NULL;
  }
  c->state = MG_CONN_CLOSING;
  if (c->prev) c->prev->next = c->next;
  else c->w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
  tq_unlink(c);
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

void mg_conn_abort(mg_conn_t *c) {
  /* An abortive close: the client must see the response as cut, not as complete. */
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) {
    int fd;
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0) {
      struct linger lg = {1, 0};
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
  }
  conn_close(c);
}

/* After a response that ends the connection: flush, half-close, then read and discard what
 * the client still sends for a short while, so that its unread bytes do not turn our close
 * into a reset that destroys the response before the client reads it. */
static void on_linger_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  mg_conn_t *c = container_of(s, mg_conn_t, tcp);
  if (nread < 0) conn_close(c);
}

static void on_shutdown(uv_shutdown_t *r, int status) {
  mg_conn_t *c = container_of(r->handle, mg_conn_t, tcp);
  free(r);
  if (status == UV_ECANCELED) return;        /* closed meanwhile */
  if (status < 0 || c->eof) { conn_close(c); return; }
  uv_read_start((uv_stream_t *)&c->tcp, mg_worker_alloc_cb, on_linger_read);
  conn_arm_timer(c);                         /* CLOSING: a short while to read the rest */
}

static void conn_close_gracefully(mg_conn_t *c) {
  if (c->lingering || uv_is_closing((uv_handle_t *)&c->tcp)) return;
  c->lingering = 1;
  c->state = MG_CONN_CLOSING;
  uv_read_stop((uv_stream_t *)&c->tcp);
  conn_arm_timer(c);                         /* CLOSING: bounded, even if the flush hangs */
  uv_shutdown_t *r = malloc(sizeof *r);
  if (!r || uv_shutdown(r, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    free(r);
    conn_close(c);
  }
}

/* ------------------------------------------------------------------------------------------
 * Writing. uv_try_write first; what is left is copied into a write request.
 * ---------------------------------------------------------------------------------------- */

static void conn_request_finished(mg_conn_t *c);

static void on_write(uv_write_t *wr, int status) {
  mg_write_t *w = container_of(wr, mg_write_t, req);
  mg_conn_t *c = w->owner;
  c->write_queued -= w->len;
  free(w);
  if (status < 0) {
    if (status != UV_ECANCELED) mg_conn_abort(c);
    return;
  }
  if (c->state == MG_CONN_CLOSING) return;
  mg_request_t *req = c->req;
  if (c->write_queued == 0 && c->finishing) {
    conn_request_finished(c);
    return;
  }
  if (c->state == MG_CONN_BUSY) conn_arm_timer(c);
  if (req && req->on_drain && c->write_queued < MG_PENDING_MAX / 2) req->on_drain(req);
}

int mg_conn_write(mg_conn_t *c, const char *data, size_t len) {
  if (c->state == MG_CONN_CLOSING || uv_is_closing((uv_handle_t *)&c->tcp)) return -1;
  if (c->req) c->req->bytes_out += len;
  ssize_t queued = mg_write((uv_stream_t *)&c->tcp, data, len, c->write_queued, on_write, c);
  if (queued < 0) return -1;
  if (queued == 0) return 0;
  c->write_queued += (size_t)queued;
  if (c->state == MG_CONN_BUSY) conn_arm_timer(c);
  return 0;
}

/* ------------------------------------------------------------------------------------------
 * The request lifecycle's side of the connection.
 * ---------------------------------------------------------------------------------------- */

/* The handler is done and every byte is written: log, then serve the next request or close. */
static void conn_request_finished(mg_conn_t *c) {
  mg_request_t *req = c->req;
  c->finishing = 0;
  if (req) {
    /* A body the handler never read leaves the stream out of sync: close afterwards. */
    if (req->has_body && !req->body_done) c->close_after = 1;
    mg_request_log(req);
    mg_request_free(req);
    c->req = NULL;
  }
  c->nrequests++;
  if (c->close_after || c->w->stopping ||
      c->nrequests >= c->w->cfg->limits.keepalive_requests) {
    conn_close_gracefully(c);
    return;
  }
  c->state = MG_CONN_IDLE;
  c->body_paused = 0;
  conn_arm_timer(c);
  if (!c->reading && !c->eof) {
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, mg_worker_alloc_cb, on_read);
  }
  if (c->pending.len) conn_process(c);
  else if (c->eof) conn_close(c);
}


void mg_request_done(mg_request_t *req) {
  mg_conn_t *c = req->conn;
  req->done = 1;
  req->on_body = NULL;
  req->on_body_done = NULL;
  req->on_drain = NULL;
  req->on_abort = NULL;
  if (c->write_queued == 0 && !c->in_execute) conn_request_finished(c);
  else c->finishing = 1;
}

void mg_conn_read_body(mg_conn_t *c) {
  mg_request_t *req = c->req;
  if (!req || req->body_done || c->state != MG_CONN_BUSY) return;
  req->body_reading = 1;
  c->body_paused = 0;
  /* "100 Continue" once, and only if the client is waiting for it: nothing of the body
   * arrived yet and no response has started. Decided at the first call, never later. */
  if (req->expect_continue && !req->continue_sent) {
    req->continue_sent = 1;
    if (c->pending.len == 0 && req->body_received == 0 && !req->head_sent) {
      static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
      uint64_t out = req->bytes_out;
      mg_conn_write(c, cont, sizeof cont - 1);
      req->bytes_out = out;                   /* interim responses are not the response */
    }
  }
  if (!c->reading && !c->eof) {
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, mg_worker_alloc_cb, on_read);
  }
  conn_arm_timer(c);
  if (c->pending.len && !c->in_execute) conn_process(c);
}

void mg_conn_pause_body(mg_conn_t *c) {
  c->body_paused = 1;
  if (c->reading) {
    c->reading = 0;
    uv_read_stop((uv_stream_t *)&c->tcp);
  }
  conn_arm_timer(c);
}

/* A request that cannot be parsed or violates a limit: answer and close. */
static void conn_fail(mg_conn_t *c, mg_http_error_t err) {
  if (c->state == MG_CONN_CLOSING) return;
  c->close_after = 1;
  if (!c->req || c->state == MG_CONN_IDLE) {
    /* Nothing seen of a request yet (e.g. a timeout before the first byte): just close. */
    if (err == MG_HTTP_E_REQUEST_TIMEOUT || !c->req) { conn_close(c); return; }
  }
  if (!c->req->start_ns) {
    c->req->start_ns = uv_hrtime();
    c->req->start_wall = mg_http_wall_time();
  }
  c->state = MG_CONN_BUSY;
  mg_request_error(c->req, err);
}

/* ------------------------------------------------------------------------------------------
 * Parser callbacks (request side).
 * ---------------------------------------------------------------------------------------- */

#define CONN(p) ((mg_conn_t *)(p)->data)

static int fail_cb(mg_conn_t *c, mg_http_error_t err) {
  if (!c->error) c->error = err;
  return -1;
}

static int on_message_begin(llhttp_t *p) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  c->state = MG_CONN_HEAD;
  req->start_ns = uv_hrtime();
  req->start_wall = mg_http_wall_time();
  req->header_deadline = mg_worker_now(c->w) + mg_ms(c->w->cfg->limits.header_timeout);
  conn_arm_timer(c);
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  req->url_bytes += len;
  if (req->url_bytes > c->w->cfg->limits.uri_bytes) return fail_cb(c, MG_HTTP_E_URI_TOO_LONG);
  if (mg_buf_append(&req->head, at, len) != 0) return fail_cb(c, MG_HTTP_E_INTERNAL);
  return 0;
}

static int on_version(llhttp_t *p, const char *at, size_t len) {
  CONN(p)->req->version_seen = 1;            /* "GET /" alone (HTTP/0.9 style) has none */
  return 0;
}

static int count_header_bytes(mg_conn_t *c, size_t len) {
  mg_request_t *req = c->req;
  req->header_bytes += len;
  if (req->header_bytes > c->w->cfg->limits.header_bytes) return -1;
  return 0;
}

static int store_header(mg_conn_t *c) {
  mg_request_t *req = c->req;
  if (c->req->cur_name_len == 0) return fail_cb(c, MG_HTTP_E_BAD_REQUEST); /* ": value" */
  size_t n = req->offs.len / sizeof(mg_header_off_t);
  if (n + 1 > c->w->cfg->limits.header_count) return fail_cb(c, MG_HTTP_E_HEADERS_TOO_LARGE);
  mg_header_off_t o = {c->req->cur_name, c->req->cur_name_len, c->req->cur_value, c->req->cur_value_len};
  if (mg_buf_append(&req->offs, &o, sizeof o) != 0) return fail_cb(c, MG_HTTP_E_INTERNAL);
  c->req->cur_name_len = c->req->cur_value_len = 0;
  c->req->in_value = 0;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  if (count_header_bytes(c, len) != 0) return fail_cb(c, MG_HTTP_E_HEADERS_TOO_LARGE);
  /* After the head (req->headers is set) these are trailer fields: counted against the
   * header limit, never stored (the head's pointers into req->head must not move) and never
   * forwarded. */
  if (req->headers) return 0;
  if (c->req->in_value && store_header(c) != 0) return -1;
  if (c->req->cur_name_len == 0) c->req->cur_name = (uint32_t)req->head.len;
  c->req->cur_name_len += (uint32_t)len;
  c->req->cur_value = (uint32_t)req->head.len + (uint32_t)len;
  c->req->cur_value_len = 0;
  return mg_buf_append(&req->head, at, len) == 0 ? 0 : fail_cb(c, MG_HTTP_E_INTERNAL);
}

static int on_header_field_complete(llhttp_t *p) {
  mg_conn_t *c = CONN(p);
  if (c->req->headers) return 0;             /* a trailer */
  if (c->req->cur_name_len == 0) return fail_cb(c, MG_HTTP_E_BAD_REQUEST);
  c->req->in_value = 1;
  c->req->cur_value = (uint32_t)c->req->head.len;
  c->req->cur_value_len = 0;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  /* llhttp strips the whitespace before a value, so a value piece that starts right after a
   * line feed can only be an obs-fold continuation line (RFC 9112 §5.2): reject it. The
   * piece may start the read buffer; then the previous read's last byte tells. */
  char before = at == c->req->parse_base ? c->req->last_byte : at[-1];
  if (before == '\n') return fail_cb(c, MG_HTTP_E_BAD_REQUEST);
  if (count_header_bytes(c, len) != 0) return fail_cb(c, MG_HTTP_E_HEADERS_TOO_LARGE);
  if (req->headers) return 0;                /* a trailer */
  c->req->in_value = 1;
  c->req->cur_value_len += (uint32_t)len;
  return mg_buf_append(&req->head, at, len) == 0 ? 0 : fail_cb(c, MG_HTTP_E_INTERNAL);
}

static int on_header_value_complete(llhttp_t *p) {
  mg_conn_t *c = CONN(p);
  if (c->req->headers) return 0;             /* a trailer: counted, dropped */
  return store_header(c);
}

static int on_chunk_extension(llhttp_t *p, const char *at, size_t len) {
  mg_conn_t *c = CONN(p);
  c->req->chunk_ext_bytes += len;
  if (c->req->chunk_ext_bytes > c->w->cfg->limits.chunk_ext_bytes)
    return fail_cb(c, MG_HTTP_E_BAD_REQUEST);
  return 0;
}

/* Validates the complete head; returns MG_HTTP_OK or the error to answer. */
static mg_http_error_t check_head(mg_conn_t *c, llhttp_t *p);

static int on_headers_complete(llhttp_t *p) {
  mg_conn_t *c = CONN(p);
  if (c->req->in_value && store_header(c) != 0) return -1;
  mg_http_error_t err = check_head(c, p);
  if (err) return fail_cb(c, err);
  mg_request_t *req = c->req;
  if (req->has_body) return HPE_PAUSED;      /* the handler decides when to read it */
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  req->body_received += len;
  if (req->body_received > req->max_body) return fail_cb(c, MG_HTTP_E_BODY_TOO_LARGE);
  if (req->on_body) req->on_body(req, at, len);
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  mg_conn_t *c = CONN(p);
  mg_request_t *req = c->req;
  req->body_done = 1;
  return HPE_PAUSED;                         /* one request at a time */
}

void mg_server_init_parser_settings(void) {
  llhttp_settings_init(&parser_settings);
  parser_settings.on_message_begin = on_message_begin;
  parser_settings.on_url = on_url;
  parser_settings.on_version = on_version;
  parser_settings.on_header_field = on_header_field;
  parser_settings.on_header_field_complete = on_header_field_complete;
  parser_settings.on_header_value = on_header_value;
  parser_settings.on_header_value_complete = on_header_value_complete;
  parser_settings.on_chunk_extension_name = on_chunk_extension;
  parser_settings.on_chunk_extension_value = on_chunk_extension;
  parser_settings.on_headers_complete = on_headers_complete;
  parser_settings.on_body = on_body;
  parser_settings.on_message_complete = on_message_complete;
}

/* ------------------------------------------------------------------------------------------
 * Head validation: what llhttp 8.1.0 does not check (reliability-anchors.md §3.4).
 * ---------------------------------------------------------------------------------------- */

#include "mg_path.h"

static int host_char_ok(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '-' || ch == '.' || ch == '_' || ch == '[' || ch == ']' || ch == ':';
}

/* Validates HOST (LEN bytes, may carry ":port") and stores its lower-case name without port. */
static int set_host(mg_request_t *req, const char *h, size_t len) {
  if (len == 0) return -1;
  size_t name_len = len;
  if (h[0] == '[') {                         /* IPv6 literal */
    const char *end = memchr(h, ']', len);
    if (!end) return -1;
    name_len = (size_t)(end - h) + 1;
  } else {
    const char *colon = memchr(h, ':', len);
    if (colon) name_len = (size_t)(colon - h);
  }
  if (name_len < len) {                      /* the port: digits only, 1..65535 */
    if (h[name_len] != ':' || name_len + 1 == len || len - name_len - 1 > 5) return -1;
    long port = 0;
    for (size_t i = name_len + 1; i < len; i++) {
      if (h[i] < '0' || h[i] > '9') return -1;
      port = port * 10 + (h[i] - '0');
    }
    if (port < 1 || port > 65535) return -1;
  }
  for (size_t i = 0; i < name_len; i++)
    if (!host_char_ok((unsigned char)h[i])) return -1;
  if (name_len >= 2 && memmem(h, name_len, "..", 2)) return -1;
  while (name_len > 1 && h[name_len - 1] == '.') name_len--;   /* "example.com." */
  size_t off = req->head.len;
  if (mg_buf_append(&req->head, h, name_len) != 0 || mg_buf_append(&req->head, "", 1) != 0)
    return -1;
  char *lower = req->head.data + off;
  for (size_t i = 0; i < name_len; i++)
    if (lower[i] >= 'A' && lower[i] <= 'Z') lower[i] = (char)(lower[i] + 32);
  req->host = (const char *)(uintptr_t)off;  /* an offset until the head is final */
  req->host_len = name_len;
  return 0;
}

static mg_http_error_t check_head(mg_conn_t *c, llhttp_t *p) {
  mg_request_t *req = c->req;
  const mg_limits_conf_t *lim = &c->w->cfg->limits;
  req->http_major = llhttp_get_http_major(p);
  req->http_minor = llhttp_get_http_minor(p);
  if (!req->version_seen) return MG_HTTP_E_BAD_REQUEST;
  if (req->http_major != 1 || req->http_minor > 1) return MG_HTTP_E_VERSION_NOT_SUPPORTED;
  req->method = llhttp_get_method(p);
  req->method_name = llhttp_method_name((llhttp_method_t)req->method);
  req->method_len = strlen(req->method_name);
  req->method_bit = mg_router_method_bit(req->method_name, req->method_len);
  if (req->method == HTTP_CONNECT) return MG_HTTP_E_METHOD_NOT_ALLOWED;

  /* The head is complete: turn offsets into pointers. The target is at offset 0. */
  size_t url_len = req->url_bytes;
  size_t nh = req->offs.len / sizeof(mg_header_off_t);
  req->header_mem.len = 0;
  if (mg_buf_reserve(&req->header_mem, (nh ? nh : 1) * sizeof(mg_header_t)) != 0)
    return MG_HTTP_E_INTERNAL;
  req->headers = (mg_header_t *)(void *)req->header_mem.data;
  const mg_header_off_t *o = (const mg_header_off_t *)req->offs.data;
  /* Reserve room now for what is appended below (the normalised path, at most the target's
   * length, and the lower-case host, at most a header value's length), so that neither the
   * pointers taken next nor the source of those appends can move. */
  if (mg_buf_reserve(&req->head, url_len + req->head.len + 16) != 0) return MG_HTTP_E_INTERNAL;
  const char *base = req->head.data;
  req->nheaders = nh;
  int connection_close = 0, connection_keepalive = 0, te_seen = 0;
  const mg_header_t *host_hdr = NULL;
  for (size_t i = 0; i < nh; i++) {
    mg_header_t *h = &req->headers[i];
    h->name = base + o[i].name;
    h->name_len = o[i].name_len;
    h->value = base + o[i].value;
    h->value_len = o[i].value_len;
    while (h->value_len && (h->value[h->value_len - 1] == ' ' || h->value[h->value_len - 1] == '\t'))
      h->value_len--;
    h->id = (int)mg_http_header_id(h->name, h->name_len);
    switch (h->id) {
      case MG_HDR_HOST:
        if (++req->hosts_seen > 1) return MG_HTTP_E_BAD_REQUEST;
        host_hdr = h;
        break;
      case MG_HDR_TRANSFER_ENCODING: {
        /* Only "chunked", once and last, is a coding this gateway knows (RFC 9112 §6.1). */
        const char *s = h->value, *item;
        size_t len = h->value_len, item_len, items = 0;
        while (mg_http_list_next(&s, &len, &item, &item_len)) {
          items++;
          if (!mg_http_is_token(item, item_len)) return MG_HTTP_E_BAD_REQUEST;
          if (!mg_http_ieq(item, item_len, "chunked")) return MG_HTTP_E_NOT_IMPLEMENTED;
        }
        if (items != 1 || te_seen++) return MG_HTTP_E_BAD_REQUEST;
        break;
      }
      case MG_HDR_EXPECT:
        if (!mg_http_ieq(h->value, h->value_len, "100-continue"))
          return MG_HTTP_E_EXPECTATION_FAILED;
        if (req->http_minor == 1) req->expect_continue = 1;   /* ignored from HTTP/1.0 */
        break;
      case MG_HDR_CONNECTION: {
        const char *s = h->value, *item;
        size_t len = h->value_len, item_len;
        while (mg_http_list_next(&s, &len, &item, &item_len)) {
          if (mg_http_ieq(item, item_len, "close")) connection_close = 1;
          else if (mg_http_ieq(item, item_len, "keep-alive")) connection_keepalive = 1;
        }
        if (mg_http_connection_names_fields(h->value, h->value_len)) req->connection_names = 1;
        break;
      }
      default:
        break;
    }
  }
  uint64_t flags = p->flags;
  int chunked = (flags & F_CHUNKED) != 0;
  int has_te = (flags & F_TRANSFER_ENCODING) != 0 || te_seen;
  if (has_te && req->http_minor == 0) return MG_HTTP_E_BAD_REQUEST;   /* §6.1 */
  if (has_te && !chunked) return MG_HTTP_E_NOT_IMPLEMENTED;
  if (req->http_minor == 1 && !host_hdr) return MG_HTTP_E_BAD_REQUEST;

  /* The target: origin-form, or absolute-form whose authority replaces Host (§3.2.2). */
  const char *t = base;
  size_t tlen = url_len;
  req->target = t;
  req->target_len = tlen;
  if (memchr(t, '#', tlen)) return MG_HTTP_E_BAD_REQUEST;
  const char *authority = NULL;
  size_t authority_len = 0;
  if (tlen && t[0] != '/') {
    size_t skip = 0;
    if (tlen > 7 && mg_http_ieq(t, 7, "http://")) skip = 7;
    else if (tlen > 8 && mg_http_ieq(t, 8, "https://")) skip = 8;
    else return MG_HTTP_E_BAD_REQUEST;        /* "*", authority-form, garbage */
    const char *slash = memchr(t + skip, '/', tlen - skip);
    const char *qm = memchr(t + skip, '?', tlen - skip);
    const char *end = slash ? slash : (qm ? qm : t + tlen);
    if (qm && qm < end) end = qm;
    authority = t + skip;
    authority_len = (size_t)(end - authority);
    if (authority_len == 0 || memchr(authority, '@', authority_len)) return MG_HTTP_E_BAD_REQUEST;
    t = end;
    tlen = url_len - (size_t)(end - base);
  }
  const char *qm = memchr(t, '?', tlen);
  size_t plen = qm ? (size_t)(qm - t) : tlen;
  if (qm) { req->query = qm + 1; req->query_len = tlen - plen - 1; }
  if (plen == 0) {                           /* "http://host" or "http://host?x": path "/" */
    t = "/";
    plen = 1;
  }
  size_t path_off = req->head.len;
  char *out = req->head.data + path_off;
  size_t out_len = 0;
  if (mg_path_normalize(t, plen, out, &out_len) != 0) return MG_HTTP_E_BAD_REQUEST;
  req->head.len += out_len + 1;
  req->path = out;
  req->path_len = out_len;

  if (host_hdr) {
    req->host_header = host_hdr->value;
    req->host_header_len = host_hdr->value_len;
  }
  const char *hv = authority ? authority : (host_hdr ? host_hdr->value : NULL);
  size_t hlen = authority ? authority_len : (host_hdr ? host_hdr->value_len : 0);
  if (authority) { req->host_header = authority; req->host_header_len = authority_len; }
  if (hv) {
    if (set_host(req, hv, hlen) != 0) return MG_HTTP_E_BAD_REQUEST;
    req->host = req->head.data + (uintptr_t)req->host;
  }

  /* Framing and keep-alive. */
  req->chunked = (unsigned)chunked;
  if ((flags & F_CONTENT_LENGTH) && p->content_length > (uint64_t)INT64_MAX)
    return MG_HTTP_E_BAD_REQUEST;            /* llhttp takes up to 2^64-1; we never do */
  req->content_length = (flags & F_CONTENT_LENGTH) ? (int64_t)p->content_length : -1;
  req->has_body = chunked || req->content_length > 0;
  req->max_body = lim->body_bytes;
  if (req->http_minor == 1) req->keepalive = !connection_close;
  else req->keepalive = connection_keepalive && !connection_close;
  if (llhttp_get_upgrade(p) || (flags & F_CONNECTION_UPGRADE)) req->keepalive = 0;
  if (!req->keepalive) c->close_after = 1;
  return MG_HTTP_OK;
}

/* ------------------------------------------------------------------------------------------
 * Feeding the parser.
 * ---------------------------------------------------------------------------------------- */

/* May the parser consume more bytes now? */
static int conn_may_parse(const mg_conn_t *c) {
  if (c->state == MG_CONN_IDLE || c->state == MG_CONN_HEAD) return 1;
  if (c->state != MG_CONN_BUSY || !c->req) return 0;
  return c->req->body_reading && !c->req->body_done && !c->body_paused && !c->req->done;
}

/* Runs the parser over DATA; returns the bytes consumed (less than LEN when it paused), or
 * (size_t)-1 when the connection failed. */
static size_t conn_parse(mg_conn_t *c, const char *data, size_t len) {
  if (!c->req) {                             /* bytes of a new request: it starts here */
    c->req = mg_request_new(c);
    if (!c->req) { conn_close(c); return (size_t)-1; }
    llhttp_init(&c->req->parser, HTTP_REQUEST, &parser_settings);
    c->req->parser.data = c;
  }
  c->error = MG_HTTP_OK;
  c->req->parse_base = data;
  c->in_execute = 1;
  enum llhttp_errno e = llhttp_execute(&c->req->parser, data, len);
  c->in_execute = 0;
  if (c->close_pending) {                    /* a callback closed the connection */
    c->close_pending = 0;
    conn_close(c);
    return (size_t)-1;
  }
  size_t used = len;
  if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
    used = (size_t)(llhttp_get_error_pos(&c->req->parser) - data);
    if (e == HPE_PAUSED) llhttp_resume(&c->req->parser);
    else c->close_after = 1;                 /* no tunnelling: answer, then close */
  } else if (e != HPE_OK) {
    mg_http_error_t err = c->error;
    if (!err) {
      switch (e) {
        case HPE_INVALID_VERSION: {
          /* A well-formed version we do not speak is 505; a malformed line is 400. */
          const char *why = llhttp_get_error_reason(&c->req->parser);
          err = why && strstr(why, "Invalid") ? MG_HTTP_E_VERSION_NOT_SUPPORTED
                                              : MG_HTTP_E_BAD_REQUEST;
          break;
        }
        case HPE_CB_HEADERS_COMPLETE: case HPE_USER: err = MG_HTTP_E_BAD_REQUEST; break;
        default: err = MG_HTTP_E_BAD_REQUEST; break;
      }
    }
    if (c->state == MG_CONN_CLOSING) return (size_t)-1;
    if (c->req && c->req->head_sent) { mg_conn_abort(c); return (size_t)-1; }
    conn_fail(c, err);
    return (size_t)-1;
  }
  if (used) c->req->last_byte = data[used - 1];
  if (c->req) {
    c->req->bytes_in += used;
    if (c->state == MG_CONN_BUSY && c->req->body_reading) conn_arm_timer(c); /* idle, per read */
  }
  return used;
}

/* What to do after the parser stopped: start a request whose head is complete, or tell the
 * handler its body is complete. */
static void conn_after_parse(mg_conn_t *c) {
  mg_request_t *req = c->req;
  if (!req || c->state == MG_CONN_CLOSING) return;
  if (c->finishing) {                        /* done from inside a parser callback */
    if (c->write_queued == 0) conn_request_finished(c);
    return;
  }
  if (c->state == MG_CONN_HEAD && req->headers) {
    c->state = MG_CONN_BUSY;
    conn_arm_timer(c);                       /* no deadline of its own until body or writes */
    mg_request_start(req);
    return;
  }
  if (req->body_done && req->body_reading && req->on_body_done) {
    req->body_reading = 0;
    conn_arm_timer(c);
    req->on_body_done(req);
  }
}

static void conn_process(mg_conn_t *c) {
  if (c->in_process) return;                 /* the outer loop goes on */
  c->in_process = 1;
  while (c->pending.len && conn_may_parse(c) && c->state != MG_CONN_CLOSING) {
    size_t used = conn_parse(c, c->pending.data, c->pending.len);
    if (used == (size_t)-1) { c->in_process = 0; return; }  /* the connection failed */
    mg_buf_consume(&c->pending, used);
    conn_after_parse(c);
    if (used == 0 && !conn_may_parse(c)) break;
  }
  c->in_process = 0;
  if (c->pending.len == 0) {
    mg_buf_reset(&c->pending, 4096);
    if (c->eof && c->state == MG_CONN_IDLE) conn_close(c);
    else if (c->eof && c->state == MG_CONN_BUSY && c->req && c->req->has_body &&
             !c->req->body_done && conn_may_parse(c))
      conn_close(c);                         /* half-closed with the body incomplete */
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  mg_conn_t *c = container_of(s, mg_conn_t, tcp);
  if (nread == 0) return;
  if (nread < 0) {
    if (nread != UV_EOF) { conn_close(c); return; }
    c->eof = 1;
    c->reading = 0;
    uv_read_stop(s);
    if (c->state == MG_CONN_IDLE && c->pending.len == 0) { conn_close(c); return; }
    if (c->state == MG_CONN_HEAD) { conn_close(c); return; }   /* half a head, then gone */
    if (c->state == MG_CONN_BUSY && c->req && c->req->has_body && !c->req->body_done &&
        c->pending.len == 0) {
      conn_close(c);                         /* the body will never complete */
      return;
    }
    return;                                  /* answer what was asked, then close */
  }
  const char *data = buf->base;
  size_t len = (size_t)nread;
  if (c->pending.len || !conn_may_parse(c)) {
    if (mg_buf_append(&c->pending, data, len) != 0) { conn_close(c); return; }
    if (!conn_may_parse(c)) {
      /* Not parsing now: keep the bytes (the next pipelined request) but stop reading once
       * a head's worth is buffered. */
      if (c->pending.len > c->w->cfg->limits.header_bytes + MG_PENDING_MAX) {
        c->reading = 0;
        uv_read_stop(s);
      }
      return;
    }
    conn_process(c);
    return;
  }
  while (len && conn_may_parse(c)) {
    size_t used = conn_parse(c, data, len);
    if (used == (size_t)-1) return;
    data += used;
    len -= used;
    conn_after_parse(c);
    if (c->state == MG_CONN_CLOSING) return;
    if (used == 0) break;
  }
  if (len && mg_buf_append(&c->pending, data, len) != 0) conn_close(c);
  else if (c->pending.len && conn_may_parse(c)) conn_process(c);
}

/* ------------------------------------------------------------------------------------------
 * Accepting.
 * ---------------------------------------------------------------------------------------- */

/* Out of memory for a connection: it must still be accepted (libuv stops watching a listener
 * whose pending connection was not taken), so it goes into the worker's one spare handle and
 * is closed at once. While that handle is closing, the listener waits and is retried. */
static void on_reject_closed(uv_handle_t *h) {
  mg_worker_t *w = h->data;
  w->reject_busy = 0;
  mg_listener_t *l = w->reject_waiting;
  w->reject_waiting = NULL;
  if (l && !w->stopping) mg_server_on_connection((uv_stream_t *)&l->handle, 0);
}

static void reject_connection(mg_listener_t *l) {
  mg_worker_t *w = l->w;
  if (w->reject_busy) {
    w->reject_waiting = l;
    return;
  }
  w->reject_busy = 1;
  uv_tcp_init(&w->loop, &w->reject);
  w->reject.data = w;
  uv_accept((uv_stream_t *)&l->handle, (uv_stream_t *)&w->reject);
  uv_close((uv_handle_t *)&w->reject, on_reject_closed);
  mg_log_error("out of memory: refused a connection on port %d", l->conf->port);
}

void mg_server_on_connection(uv_stream_t *server, int status) {
  mg_listener_t *l = container_of(server, mg_listener_t, handle);
  mg_worker_t *w = l->w;
  if (status < 0) {
    mg_log_warn("accept on port %d: %s", l->conf->port, uv_strerror(status));
    return;
  }
  mg_conn_t *c = calloc(1, sizeof *c);
  if (!c) {
    reject_connection(l);
    return;
  }
  uv_tcp_init(&w->loop, &c->tcp);
  c->tcp.data = c;
  c->w = w;
  c->listener = l;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  w->nconns++;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) { conn_close(c); return; }
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET) {
      uv_ip4_name((struct sockaddr_in *)&ss, c->client_ip, sizeof c->client_ip);
      c->client_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, c->client_ip, sizeof c->client_ip);
      c->client_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
  }
  if (w->stopping || w->nconns > (size_t)w->cfg->limits.max_connections) {
    /* Over the cap: a clear answer beats a silent hang in the backlog. */
    static const char body[] = "{\"error\":\"overloaded\",\"status\":503}";
    char busy[256];
    int n = snprintf(busy, sizeof busy,
                     "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                     sizeof body - 1, body);
    uv_buf_t b = uv_buf_init(busy, (unsigned)n);
    uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    mg_log_warn("max_connections (%d) reached: refusing %s:%u", w->cfg->limits.max_connections,
                c->client_ip, c->client_port);
    conn_close_gracefully(c);
    return;
  }
  c->state = MG_CONN_IDLE;
  c->reading = 1;
  conn_arm_timer(c);
  uv_read_start((uv_stream_t *)&c->tcp, mg_worker_alloc_cb, on_read);
}

void mg_server_drain(mg_worker_t *w) {
  mg_conn_t *c = w->conns, *next;
  for (; c; c = next) {
    next = c->next;
    if (c->state == MG_CONN_IDLE && c->pending.len == 0) conn_close(c);
    else c->close_after = 1;
  }
}
