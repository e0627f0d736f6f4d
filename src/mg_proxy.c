/* mg_proxy: the default handler. Sends the request to a target of the route's upstream and
 * streams the answer back.
 *
 *   pick target -> pooled connection or fresh connect -> write the re-serialised head ->
 *   stream the body (re-framed, back-pressured) -> parse the response (llhttp, strict) ->
 *   RESPONSE phase -> stream the body to the client (back-pressured) -> release or discard
 *
 * Rules kept here: the upstream never sees raw client header bytes (the head is rebuilt,
 * hop-by-hop and Connection-named fields removed before the gateway adds its own); bodies
 * are re-framed (one Content-Length or chunked without extensions or trailers); a response
 * that is malformed is a 502 and its connection is discarded; a body cut by the upstream
 * reaches the client cut (the client connection is closed, never padded).
 * A connection returns to the pool only after this checklist: the response was complete and
 * cleanly framed, no byte followed it, the request was sent whole, the upstream did not ask
 * to close, no timeout or error happened (mg_pool_release adds max requests and pool size). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg_hooks.h"
#include "mg_log.h"
#include "mg_proxy.h"
#include "mg_write.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Above this many bytes queued towards a peer, stop reading from the other side. */
#define MG_PROXY_HIGH_WATER (64 * 1024)
#define MG_PROXY_MAX_RESPONSE_HEAD (64 * 1024)
#define MG_PROXY_MAX_RESPONSE_HEADERS 256

typedef struct mg_proxy {
  mg_request_t *req;
  mg_upstream_t *up;
  mg_target_t *target;
  mg_upconn_t *uc;
  uint64_t tried;                 /* targets that failed this request (bit per index) */
  uint64_t start_ns;
  int last_error;                 /* mg_http_error_t of the last failed attempt */
  unsigned reused : 1;            /* uc came from the pool */
  unsigned retried : 1;           /* the one retry on a fresh connection was used */
  unsigned fresh_only : 1;
  unsigned body_started : 1;      /* body bytes went upstream: no replay possible */
  unsigned request_sent : 1;      /* head and whole body written to uc */
  unsigned response_began : 1;    /* a response byte arrived */
  unsigned interim : 1;           /* the message being parsed is a 1xx */
  unsigned head_built : 1;        /* the client's response head is in out (or written) */
  unsigned head_flushed : 1;
  unsigned no_body : 1;
  unsigned client_chunked : 1;
  unsigned upstream_done : 1;
  unsigned upstream_paused : 1;
  unsigned body_paused : 1;
  unsigned failed : 1;
  unsigned head_written : 1;      /* the request head went to uc: body bytes may follow */
  unsigned write_failed : 1;      /* a write to uc failed; the failure is reported from the loop */
  /* response hooks (the route has some): the head waits until they finish */
  unsigned hooked : 1;            /* status and headers went to the hooks, not to the client */
  unsigned hooks_started : 1;
  unsigned collecting : 1;        /* res:body(): the whole body is being read */
  unsigned collect_too_large : 1;
  int64_t upstream_cl;            /* the upstream's Content-Length, -1 when none */
  mg_buf_t collected;             /* body bytes received before the head could go out */
  mg_hook_response_t hresp;
  mg_header_t *hheaders;          /* the end-to-end headers the hooks see */
  int attempts;                   /* connections tried for this request */
  int status;
  mg_buf_t out;                   /* bytes for the client, written after each upstream read */
  mg_buf_t reqhead;               /* the request head rebuilt for the upstream */
  mg_buf_t rhead;                 /* response header names and values */
  mg_buf_t roffs;                 /* mg_header_off_t per response header */
  uint32_t cur_name, cur_name_len, cur_value, cur_value_len;
  int in_value;
  const char *parse_base;
  char last_byte;
} mg_proxy_t;

static llhttp_settings_t response_settings;

static void proxy_connect(mg_proxy_t *p);
static void proxy_fail(mg_proxy_t *p, mg_http_error_t err);
static void on_upstream_read(mg_upconn_t *uc, ssize_t nread, const uv_buf_t *buf);
static void proxy_hooked_read(mg_proxy_t *p);

/* Appends "<hex size>\r\n", the head of a chunk (printf is measurably slow here). */
static void append_chunk_size(mg_buf_t *b, size_t n) {
  char tmp[24];
  int i = (int)sizeof tmp;
  tmp[--i] = '\n';
  tmp[--i] = '\r';
  do { tmp[--i] = "0123456789abcdef"[n & 15]; n >>= 4; } while (n);
  mg_buf_append(b, tmp + i, sizeof tmp - (size_t)i);
}

static void append_status_line(mg_buf_t *b, int status) {
  char line[16] = "HTTP/1.1 000 ";
  line[9] = (char)('0' + status / 100 % 10);
  line[10] = (char)('0' + status / 10 % 10);
  line[11] = (char)('0' + status % 10);
  mg_buf_append(b, line, 13);
  mg_buf_puts(b, mg_http_reason(status));
  mg_buf_append(b, "\r\n", 2);
}

static int idempotent(const mg_request_t *req) {
  switch (req->method) {
    case HTTP_GET: case HTTP_HEAD: case HTTP_PUT: case HTTP_DELETE: case HTTP_OPTIONS:
    case HTTP_TRACE:
      return 1;
    default:
      return 0;
  }
}

/* ------------------------------------------------------------------------------------------
 * Ending an exchange.
 * ---------------------------------------------------------------------------------------- */

/* Lets go of the upstream connection: back to the pool when REUSABLE, closed otherwise. */
static void proxy_drop_upconn(mg_proxy_t *p, int reusable) {
  mg_upconn_t *uc = p->uc;
  if (!uc) return;
  p->uc = NULL;
  if (uc->state == MG_UPCONN_CONNECTING) {   /* a connect still in flight: cancel it */
    uc->connect_cb = NULL;
    mg_upconn_close(uc);
    return;
  }
  uc->data = NULL;
  if (reusable) mg_pool_release(uc);
  else mg_upconn_close(uc);
}

/* Finished exchanges are kept (with their buffers) for the next request: the worker is
 * single-threaded, so a plain free list per process does. */
#define MG_SPARE_PROXIES 64
#define MG_SPARE_PROXY_BUF (64 * 1024)
static mg_proxy_t *spare_proxies;
static size_t nspare_proxies;

static mg_proxy_t *proxy_alloc(void) {
  mg_proxy_t *p = spare_proxies;
  if (!p) return calloc(1, sizeof *p);
  spare_proxies = (mg_proxy_t *)p->req;
  nspare_proxies--;
  mg_buf_t out = p->out, rhead = p->rhead, roffs = p->roffs, reqhead = p->reqhead;
  memset(p, 0, sizeof *p);
  p->out = out;
  p->rhead = rhead;
  p->roffs = roffs;
  p->reqhead = reqhead;
  return p;
}

static void proxy_free(mg_proxy_t *p) {
  proxy_drop_upconn(p, 0);
  mg_buf_dispose(&p->collected);
  free(p->hheaders);
  p->hheaders = NULL;
  if (p->req) p->req->handler = NULL;
  if (nspare_proxies < MG_SPARE_PROXIES) {
    mg_buf_reset(&p->out, MG_SPARE_PROXY_BUF);
    mg_buf_reset(&p->rhead, MG_SPARE_PROXY_BUF);
    mg_buf_reset(&p->roffs, MG_SPARE_PROXY_BUF);
    mg_buf_reset(&p->reqhead, MG_SPARE_PROXY_BUF);
    p->req = (mg_request_t *)(void *)spare_proxies;   /* the free-list link */
    spare_proxies = p;
    nspare_proxies++;
    return;
  }
  mg_buf_dispose(&p->out);
  mg_buf_dispose(&p->rhead);
  mg_buf_dispose(&p->roffs);
  mg_buf_dispose(&p->reqhead);
  free(p);
}

void mg_proxy_free_spares(void) {
  while (spare_proxies) {
    mg_proxy_t *p = spare_proxies;
    spare_proxies = (mg_proxy_t *)p->req;
    p->req = NULL;
    nspare_proxies = 0;
    mg_buf_dispose(&p->out);
    mg_buf_dispose(&p->rhead);
    mg_buf_dispose(&p->roffs);
    mg_buf_dispose(&p->reqhead);
    free(p);
  }
}

/* The request ends without us (client gone, client-side error): discard everything. */
static void proxy_on_abort(mg_request_t *req) {
  mg_proxy_t *p = req->handler;
  if (!p) return;
  if (p->start_ns && req->upstream_time < 0)
    req->upstream_time = (double)(uv_hrtime() - p->start_ns) / 1e9;
  req->handler = NULL;
  p->req = NULL;
  proxy_free(p);
}

static void proxy_fail(mg_proxy_t *p, mg_http_error_t err) {
  mg_request_t *req = p->req;
  p->failed = 1;
  if (p->start_ns) req->upstream_time = (double)(uv_hrtime() - p->start_ns) / 1e9;
  p->out.len = 0;
  mg_request_error(req, err);                /* calls proxy_on_abort, which frees p */
}

/* The response is complete: release the connection by the checklist and finish. */
static void proxy_finish(mg_proxy_t *p, int extra_bytes) {
  mg_request_t *req = p->req;
  mg_upconn_t *uc = p->uc;
  req->upstream_time = (double)(uv_hrtime() - p->start_ns) / 1e9;
  int reusable = uc && !extra_bytes && p->request_sent && uc->write_queued == 0 &&
                 llhttp_should_keep_alive(&uc->parser) && !req->conn->w->stopping;
  mg_upstream_report(p->target, 1);
  proxy_drop_upconn(p, reusable);
  req->on_abort = NULL;
  req->handler = NULL;
  p->req = NULL;
  proxy_free(p);
  mg_request_done(req);
}

/* ------------------------------------------------------------------------------------------
 * Writing to the upstream.
 * ---------------------------------------------------------------------------------------- */

static void proxy_arm_timer(mg_proxy_t *p);

static void on_upstream_write(uv_write_t *wr, int status) {
  mg_write_t *w = container_of(wr, mg_write_t, req);
  mg_upconn_t *uc = w->owner;
  uc->write_queued -= w->len;
  free(w);
  mg_proxy_t *p = uc->data;
  if (!p || uc->state == MG_UPCONN_CLOSING) return;
  if (status < 0) return;                    /* the read side reports the broken connection */
  proxy_arm_timer(p);
  if (p->body_paused && uc->write_queued < MG_PROXY_HIGH_WATER / 2) {
    p->body_paused = 0;
    mg_conn_read_body(p->req->conn);
  }
}

static int upstream_write(mg_proxy_t *p, const char *data, size_t len) {
  mg_upconn_t *uc = p->uc;
  ssize_t queued = mg_write((uv_stream_t *)&uc->tcp, data, len, uc->write_queued,
                            on_upstream_write, uc);
  if (queued < 0) return (int)queued;
  uc->write_queued += (size_t)queued;
  return 0;
}

/* ------------------------------------------------------------------------------------------
 * Timeouts: send while request bytes are queued, read while waiting for the upstream.
 * ---------------------------------------------------------------------------------------- */

static void on_proxy_timeout(mg_upconn_t *uc) {
  mg_proxy_t *p = uc->data;
  if (!p) return;
  mg_log_warn("upstream %s: %s timed out (request %s)", p->target->name,
              uc->write_queued ? "send" : "read", p->req->id);
  mg_upstream_report(p->target, 0);
  if (p->head_flushed) {                     /* mid-body: the client sees it cut */
    mg_request_t *req = p->req;
    req->upstream_time = (double)(uv_hrtime() - p->start_ns) / 1e9;
    mg_conn_abort(req->conn);
    return;
  }
  proxy_fail(p, MG_HTTP_E_GATEWAY_TIMEOUT);
}

static void proxy_arm_timer(mg_proxy_t *p) {
  mg_upconn_t *uc = p->uc;
  if (!uc || p->write_failed) return;
  const mg_upstream_conf_t *conf = p->up->conf;
  /* Send timeout while request bytes wait; read timeout once the request is out (or the
   * upstream answered early). While the client is still uploading, the client's own body
   * timeout applies, not the upstream's read timeout. */
  uint64_t t = 0;
  if (uc->write_queued) t = mg_ms(conf->send_timeout);
  else if (p->request_sent || p->response_began) t = mg_ms(conf->read_timeout);
  /* While the client holds us back (upstream reads paused) the upstream is not late. */
  if (p->upstream_paused || !t) mg_upconn_set_deadline(uc, 0, NULL);
  else mg_upconn_set_deadline(uc, mg_worker_now(uc->w) + t, on_proxy_timeout);
}

/* ------------------------------------------------------------------------------------------
 * The request head, rebuilt for the upstream.
 * ---------------------------------------------------------------------------------------- */

/* True when NAME is listed in one of the request's Connection headers. */
static int named_in_connection(const mg_header_t *hs, size_t n, const char *name, size_t len) {
  for (size_t i = 0; i < n; i++)
    if (hs[i].id == MG_HDR_CONNECTION &&
        mg_http_connection_lists(hs[i].value, hs[i].value_len, name, len))
      return 1;
  return 0;
}

/* Appends the path to send: rewritten, prefix-stripped or as normalised. */
static void append_upstream_path(mg_buf_t *b, const mg_request_t *req) {
  const mg_route_conf_t *r = req->route;
  const char *path = req->path;
  size_t len = req->path_len;
  if (r->rewrite) {
    for (const char *s = r->rewrite; *s;) {
      if (*s == ':' || *s == '*') {
        const char *name = s + (*s == ':');
        size_t nlen = 0;
        if (*s == '*') nlen = 0;
        else while (name[nlen] && name[nlen] != '/' && name[nlen] != '.' && name[nlen] != '?') nlen++;
        const mg_route_match_t *m = &req->match;
        int found = 0;
        for (size_t i = 0; i < m->nparams; i++) {
          const mg_route_param_t *pa = &m->params[i];
          int is_rest = *s == '*' && pa->name_len == 1 && pa->name[0] == '*';
          int is_named = *s == ':' && pa->name_len == nlen && memcmp(pa->name, name, nlen) == 0;
          if (is_rest || is_named) {
            mg_buf_append(b, pa->value, pa->value_len);
            found = 1;
            break;
          }
        }
        if (!found && *s == ':') mg_buf_append(b, s, nlen + 1);
        s = *s == '*' ? s + 1 : name + nlen;
        continue;
      }
      mg_buf_append(b, s, 1);
      s++;
    }
  } else {
    if (r->strip_prefix) {
      size_t pl = strlen(r->strip_prefix);
      while (pl && r->strip_prefix[pl - 1] == '/') pl--;
      if (len >= pl && memcmp(path, r->strip_prefix, pl) == 0 &&
          (len == pl || path[pl] == '/')) {
        path += pl;
        len -= pl;
      }
    }
    if (len == 0) mg_buf_append(b, "/", 1);
    else mg_buf_append(b, path, len);
  }
  if (req->query) {
    mg_buf_append(b, "?", 1);
    mg_buf_append(b, req->query, req->query_len);
  }
}

/* Whether a hook set or removed the field NAME (req:set_header). */
static int edited(const mg_header_edit_t *e, size_t n, const char *name, size_t len) {
  for (size_t i = 0; i < n; i++)
    if (mg_http_ieq_n(e[i].name, strlen(e[i].name), name, len)) return 1;
  return 0;
}

static void build_request_head(mg_proxy_t *p, mg_buf_t *b) {
  const mg_request_t *req = p->req;
  const mg_route_conf_t *r = req->route;
  mg_buf_append(b, req->method_name, req->method_len);
  mg_buf_append(b, " ", 1);
  append_upstream_path(b, req);
  mg_buf_append(b, " HTTP/1.1\r\nHost: ", 17);
  if (r->host_policy == MG_HOST_FIXED && r->host_value) mg_buf_puts(b, r->host_value);
  else if (r->host_policy == MG_HOST_PASS && req->host_header_len)
    mg_buf_append(b, req->host_header, req->host_header_len);
  else mg_buf_puts(b, p->target->name);
  mg_buf_append(b, "\r\n", 2);
  int conn_names = req->connection_names;
  size_t nedits = 0;
  const mg_header_edit_t *edits = req->hooks ? mg_hooks_header_edits(req, &nedits) : NULL;
  for (size_t i = 0; i < req->nheaders; i++) {
    const mg_header_t *h = &req->headers[i];
    const char *n = h->name;
    size_t nl = h->name_len;
    if (nedits && edited(edits, nedits, n, nl)) continue;
    switch (h->id) {
      case MG_HDR_OTHER: case MG_HDR_USER_AGENT: case MG_HDR_AUTHORIZATION:
      case MG_HDR_PROXY_AUTHORIZATION: case MG_HDR_COOKIE:
        break;
      default:
        continue;   /* hop-by-hop, or set by the gateway itself below (XFF is merged) */
    }
    if (conn_names && named_in_connection(req->headers, req->nheaders, n, nl)) continue;
    mg_buf_append(b, n, nl);
    mg_buf_append(b, ": ", 2);
    mg_buf_append(b, h->value, h->value_len);
    mg_buf_append(b, "\r\n", 2);
  }
  /* Fields a hook set (the last value set for a name wins; nil removed it). */
  for (size_t i = 0; i < nedits; i++) {
    size_t len = strlen(edits[i].name);
    int later = 0;
    for (size_t j = i + 1; j < nedits && !later; j++)
      later = mg_http_ieq_n(edits[j].name, strlen(edits[j].name), edits[i].name, len);
    if (later || !edits[i].value) continue;
    mg_buf_printf(b, "%s: %s\r\n", edits[i].name, edits[i].value);
  }
  mg_conn_t *c = req->conn;
  /* X-Forwarded-For: every incoming value (unless Connection named it), then the client. */
  mg_buf_append(b, "X-Forwarded-For: ", 17);
  for (size_t i = 0; i < req->nheaders; i++) {
    const mg_header_t *h = &req->headers[i];
    if (h->id != MG_HDR_X_FORWARDED_FOR || h->value_len == 0) continue;
    if (conn_names && named_in_connection(req->headers, req->nheaders, h->name, h->name_len))
      break;
    mg_buf_append(b, h->value, h->value_len);
    mg_buf_append(b, ", ", 2);
  }
  mg_buf_puts(b, c->client_ip);
  mg_buf_append(b, "\r\nX-Forwarded-Proto: http\r\n", 27);
  if (req->host_header_len) {
    mg_buf_append(b, "X-Forwarded-Host: ", 18);
    mg_buf_append(b, req->host_header, req->host_header_len);
    mg_buf_append(b, "\r\n", 2);
  }
  mg_buf_append(b, "X-Request-Id: ", 14);
  mg_buf_puts(b, req->id);
  mg_buf_append(b, "\r\n", 2);
  const char *body;
  size_t body_len;
  if (req->hooks && mg_hooks_request_body(req, &body, &body_len))  /* read whole by a hook */
    mg_buf_printf(b, "Content-Length: %zu\r\n", body_len);
  else if (req->chunked) mg_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
  else if (req->content_length >= 0 && (req->content_length > 0 || req->method == HTTP_POST ||
                                        req->method == HTTP_PUT || req->method == HTTP_PATCH))
    mg_buf_printf(b, "Content-Length: %lld\r\n", (long long)req->content_length);
  mg_buf_append(b, "\r\n", 2);
}

/* ------------------------------------------------------------------------------------------
 * The request body, streamed to the upstream.
 * ---------------------------------------------------------------------------------------- */

/* A write to the upstream failed (not just "later"): the exchange cannot go on. It is
 * reported from the loop, never from inside the client's parser callbacks. */
static void proxy_upstream_broken(mg_proxy_t *p, int status);

static void on_write_failed(mg_upconn_t *uc) {
  mg_proxy_t *p = uc->data;
  if (p) proxy_upstream_broken(p, UV_EPIPE);
}

static void proxy_write_failed(mg_proxy_t *p) {
  if (p->write_failed || !p->uc) return;
  p->write_failed = 1;
  mg_upconn_set_deadline(p->uc, mg_worker_now(p->uc->w), on_write_failed);
}

static void proxy_on_body(mg_request_t *req, const char *data, size_t len) {
  mg_proxy_t *p = req->handler;
  if (len == 0 || p->failed || p->write_failed) return;
  p->body_started = 1;                       /* from here on the request cannot be replayed */
  if (!p->uc || !p->head_written) {          /* never body bytes before the head */
    proxy_write_failed(p);
    return;
  }
  int rc = 0;
  if (req->chunked) {
    /* One write per chunk: size line, data and CRLF together. */
    mg_buf_t chunk;
    mg_buf_init(&chunk);
    append_chunk_size(&chunk, len);
    mg_buf_append(&chunk, data, len);
    mg_buf_append(&chunk, "\r\n", 2);
    rc = upstream_write(p, chunk.data, chunk.len);
    mg_buf_dispose(&chunk);
  } else {
    rc = upstream_write(p, data, len);
  }
  if (rc != 0) {
    proxy_write_failed(p);
    return;
  }
  proxy_arm_timer(p);
  if (p->uc->write_queued > MG_PROXY_HIGH_WATER && !p->body_paused) {
    p->body_paused = 1;
    mg_conn_pause_body(req->conn);
  }
}

static void proxy_on_body_done(mg_request_t *req) {
  mg_proxy_t *p = req->handler;
  if (!p->uc || p->failed || p->write_failed || !p->head_written) return;
  if (req->chunked && upstream_write(p, "0\r\n\r\n", 5) != 0) {
    proxy_write_failed(p);
    return;
  }
  p->request_sent = 1;
  proxy_arm_timer(p);
}

/* ------------------------------------------------------------------------------------------
 * Sending the request once a connection is ready.
 * ---------------------------------------------------------------------------------------- */

static void proxy_send(mg_proxy_t *p) {
  mg_request_t *req = p->req;
  mg_upconn_t *uc = p->uc;
  uc->data = p;
  llhttp_init(&uc->parser, HTTP_RESPONSE, &response_settings);
  uc->parser.data = p;
  if (req->method == HTTP_HEAD) p->no_body = 1;
  p->reqhead.len = 0;
  build_request_head(p, &p->reqhead);
  const char *body;
  size_t body_len;
  if (req->hooks && mg_hooks_request_body(req, &body, &body_len))
    mg_buf_append(&p->reqhead, body, body_len);   /* one write: head and the body a hook read */
  int rc = upstream_write(p, p->reqhead.data, p->reqhead.len);
  if (rc != 0 && !p->reused) {
    mg_upstream_report(p->target, 0);
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  /* A pooled connection that fails this write is noticed by its read side (and retried). */
  p->head_written = rc == 0;
  mg_upconn_read_start(uc, on_upstream_read);
  if (req->has_body && !req->body_done) {
    proxy_arm_timer(p);
    req->on_body = proxy_on_body;
    req->on_body_done = proxy_on_body_done;
    mg_conn_read_body(req->conn);
  } else {
    p->request_sent = 1;
    proxy_arm_timer(p);
  }
}

static void on_upstream_connected(mg_upconn_t *uc, int status, void *data) {
  mg_proxy_t *p = data;
  if (status < 0) {
    p->uc = NULL;
    mg_log_warn("upstream %s: connect to %s failed: %s", p->up->conf->name, p->target->name,
                uv_strerror(status));
    mg_upstream_report(p->target, 0);
    p->tried |= p->target->index < 64 ? (uint64_t)1 << p->target->index : 0;
    p->last_error = status == UV_ETIMEDOUT ? MG_HTTP_E_GATEWAY_TIMEOUT : MG_HTTP_E_BAD_GATEWAY;
    /* Nothing was sent: another target may take it. */
    if (p->up->ntargets > 1 &&
        mg_balancer_available(&p->up->balancer, mg_worker_now(p->up->w), p->tried) > 0) {
      proxy_connect(p);
      return;
    }
    proxy_fail(p, (mg_http_error_t)p->last_error);
    return;
  }
  proxy_send(p);
}

static void proxy_connect(mg_proxy_t *p) {
  mg_request_t *req = p->req;
  /* Each target at most once, plus the one retry of a reused connection. */
  size_t cap = (p->up->ntargets < 64 ? p->up->ntargets : 64) + 1;
  mg_target_t *t = ++p->attempts <= (int)cap ? mg_upstream_pick(p->up, p->tried) : NULL;
  if (!t) {
    proxy_fail(p, p->last_error ? (mg_http_error_t)p->last_error : MG_HTTP_E_NO_UPSTREAM);
    return;
  }
  p->target = t;
  req->upstream_name = t->name;
  mg_upconn_t *uc = p->fresh_only ? NULL : mg_pool_acquire(t);
  if (uc) {
    p->reused = 1;
    p->uc = uc;
    proxy_send(p);
    return;
  }
  p->reused = 0;
  p->uc = mg_upconn_connect(t, on_upstream_connected, p);
  if (!p->uc) proxy_fail(p, MG_HTTP_E_INTERNAL);
}

/* The upstream connection broke (EOF or error) before the response was complete. */
static void proxy_upstream_broken(mg_proxy_t *p, int status) {
  mg_request_t *req = p->req;
  if (!p->response_began && !p->head_flushed) {
    if (p->reused && !p->retried && idempotent(req) && !p->body_started) {
      /* A pooled connection the upstream had closed: one retry on a fresh connection. No
       * body byte may reach the new connection before its head: the client's body is held
       * (and stays unread) until proxy_send asks for it again. */
      p->retried = 1;
      p->fresh_only = 1;
      p->head_written = 0;
      p->write_failed = 0;
      req->on_body = NULL;
      req->on_body_done = NULL;
      if (req->has_body && !req->body_done) mg_conn_pause_body(req->conn);
      proxy_drop_upconn(p, 0);
      proxy_connect(p);
      return;
    }
    mg_log_warn("upstream %s: %s before the response (request %s)", p->target->name,
                status == UV_EOF ? "connection closed" : uv_strerror(status), req->id);
    mg_upstream_report(p->target, 0);
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  /* Mid-response: what was received goes out, then the client connection is cut. */
  mg_log_warn("upstream %s: %s mid-response, truncating (request %s)", p->target->name,
              status == UV_EOF ? "connection closed" : uv_strerror(status), req->id);
  mg_upstream_report(p->target, 0);
  if ((p->head_built && !p->head_flushed) || (p->hooked && !p->head_built)) {
    /* head parsed but not yet sent: nothing sent */
    req->head_sent = 0;
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  if (p->out.len) mg_conn_write(req->conn, p->out.data, p->out.len);
  p->out.len = 0;
  req->upstream_time = (double)(uv_hrtime() - p->start_ns) / 1e9;
  mg_conn_abort(req->conn);
}

/* ------------------------------------------------------------------------------------------
 * The response, parsed and streamed to the client.
 * ---------------------------------------------------------------------------------------- */

#define PROXY(parser) ((mg_proxy_t *)(parser)->data)

static int r_on_message_begin(llhttp_t *parser) {
  mg_proxy_t *p = PROXY(parser);
  p->rhead.len = 0;
  p->roffs.len = 0;
  p->cur_name_len = p->cur_value_len = 0;
  p->in_value = 0;
  return 0;
}

static int r_store_header(mg_proxy_t *p) {
  if (p->head_built) return 0;               /* trailers: dropped */
  if (p->roffs.len / sizeof(mg_header_off_t) >= MG_PROXY_MAX_RESPONSE_HEADERS) return -1;
  mg_header_off_t o = {p->cur_name, p->cur_name_len, p->cur_value, p->cur_value_len};
  p->cur_name_len = p->cur_value_len = 0;
  p->in_value = 0;
  return mg_buf_append(&p->roffs, &o, sizeof o);
}

static int r_on_header_field(llhttp_t *parser, const char *at, size_t len) {
  mg_proxy_t *p = PROXY(parser);
  if (p->in_value && r_store_header(p) != 0) return -1;
  if (p->rhead.len + len > MG_PROXY_MAX_RESPONSE_HEAD) return -1;
  if (p->cur_name_len == 0) p->cur_name = (uint32_t)p->rhead.len;
  p->cur_name_len += (uint32_t)len;
  return mg_buf_append(&p->rhead, at, len);
}

static int r_on_header_field_complete(llhttp_t *parser) {
  mg_proxy_t *p = PROXY(parser);
  if (p->cur_name_len == 0) return -1;
  p->in_value = 1;
  p->cur_value = (uint32_t)p->rhead.len;
  p->cur_value_len = 0;
  return 0;
}

static int r_on_header_value(llhttp_t *parser, const char *at, size_t len) {
  mg_proxy_t *p = PROXY(parser);
  char before = at == p->parse_base ? p->last_byte : at[-1];
  if (before == '\n') return -1;             /* obs-fold in a response: 502 */
  if (p->rhead.len + len > MG_PROXY_MAX_RESPONSE_HEAD) return -1;
  p->cur_value_len += (uint32_t)len;
  return mg_buf_append(&p->rhead, at, len);
}

static int r_on_header_value_complete(llhttp_t *parser) {
  return r_store_header(PROXY(parser)) == 0 ? 0 : -1;
}

static int r_on_headers_complete(llhttp_t *parser) {
  mg_proxy_t *p = PROXY(parser);
  mg_request_t *req = p->req;
  mg_conn_t *c = req->conn;
  if (p->in_value && r_store_header(p) != 0) return -1;
  int status = llhttp_get_status_code(parser);
  if (status == 101) return -1;              /* we never asked for an upgrade */
  if (status < 200) {                        /* 100 / 102 / 103: interim, not forwarded */
    p->interim = 1;
    return 1;
  }
  if (parser->http_major != 1) return -1;
  p->status = status;
  int no_body = p->no_body || status == 204 || status == 304;
  p->no_body = (unsigned)no_body;
  int has_cl = (parser->flags & F_CONTENT_LENGTH) != 0;

  size_t n = p->roffs.len / sizeof(mg_header_off_t);
  mg_header_t hs[MG_PROXY_MAX_RESPONSE_HEADERS];
  const mg_header_off_t *o = (const mg_header_off_t *)p->roffs.data;
  for (size_t i = 0; i < n; i++) {
    hs[i].name = p->rhead.data + o[i].name;
    hs[i].name_len = o[i].name_len;
    hs[i].value = p->rhead.data + o[i].value;
    hs[i].value_len = o[i].value_len;
    while (hs[i].value_len && (hs[i].value[hs[i].value_len - 1] == ' ' ||
                               hs[i].value[hs[i].value_len - 1] == '\t'))
      hs[i].value_len--;
    hs[i].id = (int)mg_http_header_id(hs[i].name, hs[i].name_len);
  }

  /* How the client gets the body: as framed upstream when the length is known; chunked for
   * HTTP/1.1 clients otherwise; close-delimited for HTTP/1.0 clients. */
  int client_11 = req->http_minor == 1;
  if (!no_body && !has_cl) {
    if (client_11) p->client_chunked = 1;
    else c->close_after = 1;
  }

  /* The only transfer coding this gateway can undo is chunked: a response with another one
   * (gzip, ...) would reach the client encoded without saying so. */
  int conn_names = 0;
  for (size_t i = 0; i < n; i++) {
    if (hs[i].id == MG_HDR_CONNECTION && !conn_names)
      conn_names = mg_http_connection_names_fields(hs[i].value, hs[i].value_len);
    if (hs[i].id != MG_HDR_TRANSFER_ENCODING) continue;
    const char *v = hs[i].value, *item;
    size_t vl = hs[i].value_len, il;
    while (mg_http_list_next(&v, &vl, &item, &il))
      if (!mg_http_ieq(item, il, "chunked")) return -1;
  }


  if (req->route->hooks & MG_HOOK_BIT(MG_HOOK_RESPONSE)) {
    /* The response hooks see status and end-to-end headers first (proxy_hooks_start). */
    p->hheaders = malloc((n ? n : 1) * sizeof *p->hheaders);
    if (!p->hheaders) return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
      int id = hs[i].id;
      if (mg_http_id_is_hop_by_hop(id) || id == MG_HDR_X_REQUEST_ID ||
          id == MG_HDR_CONTENT_LENGTH)
        continue;
      if (conn_names && named_in_connection(hs, n, hs[i].name, hs[i].name_len)) continue;
      p->hheaders[k++] = hs[i];
    }
    p->hooked = 1;
    p->upstream_cl = has_cl ? (int64_t)parser->content_length : -1;
    p->client_chunked = 0;
    p->hresp.status = status;
    p->hresp.headers = p->hheaders;
    p->hresp.nheaders = k;
    req->status = status;
    return no_body ? 1 : 0;
  }

  mg_buf_t *b = &p->out;
  append_status_line(b, status);
  for (size_t i = 0; i < n; i++) {
    const char *nm = hs[i].name;
    size_t nl = hs[i].name_len;
    int id = hs[i].id;
    if (mg_http_id_is_hop_by_hop(id) || id == MG_HDR_X_REQUEST_ID) continue;
    if (id == MG_HDR_CONTENT_LENGTH && (status == 204 || !has_cl)) continue;
    /* Fields named in Connection (beyond close/keep-alive) are dropped too. */
    if (conn_names && named_in_connection(hs, n, nm, nl)) continue;
    mg_buf_append(b, nm, nl);
    mg_buf_append(b, ": ", 2);
    mg_buf_append(b, hs[i].value, hs[i].value_len);
    mg_buf_append(b, "\r\n", 2);
  }
  if (p->client_chunked) mg_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
  /* The RESPONSE phase (Lua `response` hooks) runs here, before the head leaves. */
  mg_request_common_headers(req, b);
  mg_buf_append(b, "\r\n", 2);
  p->head_built = 1;
  req->status = status;
  req->head_sent = 1;
  return no_body ? 1 : 0;
}

/* Appends body bytes for the client: through the body filters, chunk-framed if needed. */
static int emit_body(mg_proxy_t *p, const char *at, size_t len, int eof) {
  mg_buf_t filtered;
  mg_buf_init(&filtered);
  if (p->hooked && mg_hooks_has_filters(p->req)) {
    if (mg_hooks_filter(p->req, at, len, eof, &filtered) != 0) {
      mg_buf_dispose(&filtered);
      return -1;
    }
    at = filtered.data ? filtered.data : "";
    len = filtered.len;
  }
  if (len) {
    if (p->client_chunked) append_chunk_size(&p->out, len);
    mg_buf_append(&p->out, at, len);
    if (p->client_chunked) mg_buf_append(&p->out, "\r\n", 2);
  }
  mg_buf_dispose(&filtered);
  return 0;
}

#define MG_PROXY_MAX_COLLECT (8 * 1024 * 1024)

static int r_on_body(llhttp_t *parser, const char *at, size_t len) {
  mg_proxy_t *p = PROXY(parser);
  if (p->interim || len == 0) return 0;
  if (p->hooked && !p->head_built) {         /* the hooks have not decided yet: keep it */
    if (p->collected.len + len > MG_PROXY_MAX_COLLECT) {
      p->collect_too_large = 1;
      return 0;
    }
    return mg_buf_append(&p->collected, at, len) == 0 ? 0 : -1;
  }
  return emit_body(p, at, len, 0);
}

static int r_on_message_complete(llhttp_t *parser) {
  mg_proxy_t *p = PROXY(parser);
  if (p->interim) {                          /* a 1xx: the real response follows */
    p->interim = 0;
    return 0;
  }
  if (p->hooked && p->head_built && mg_hooks_has_filters(p->req) && emit_body(p, "", 0, 1) != 0)
    return -1;
  if (p->client_chunked) mg_buf_append(&p->out, "0\r\n\r\n", 5);
  p->upstream_done = 1;
  return HPE_PAUSED;
}

void mg_proxy_init(void) {
  llhttp_settings_init(&response_settings);
  response_settings.on_message_begin = r_on_message_begin;
  response_settings.on_header_field = r_on_header_field;
  response_settings.on_header_field_complete = r_on_header_field_complete;
  response_settings.on_header_value = r_on_header_value;
  response_settings.on_header_value_complete = r_on_header_value_complete;
  response_settings.on_headers_complete = r_on_headers_complete;
  response_settings.on_body = r_on_body;
  response_settings.on_message_complete = r_on_message_complete;
}

/* ------------------------------------------------------------------------------------------
 * Response hooks: the upstream's status and headers go to the hooks first; what they decide
 * is sent when they finish. Until then body bytes are kept (bounded) and reading stops,
 * unless a hook asked for the whole body (res:body()).
 * ---------------------------------------------------------------------------------------- */

static int proxy_flush(mg_proxy_t *p);

static void proxy_want_body(mg_request_t *req) {
  mg_proxy_t *p = req->handler;
  p->collecting = 1;
  p->upstream_paused = 0;
  mg_upconn_read_start(p->uc, on_upstream_read);
  proxy_arm_timer(p);
}

/* The hooks finished: send the head they decided, then the body. */
static void proxy_hooks_done(mg_request_t *req) {
  mg_proxy_t *p = req->handler;
  mg_buf_t *b = &p->out;
  b->len = 0;
  mg_buf_t lines;
  mg_buf_init(&lines);
  int status = mg_hooks_response_head(req, &lines);
  const char *body = NULL;
  size_t len = 0;
  int known = mg_hooks_response_body(req, &body, &len);
  int replaced = known;                      /* a hook set or replaced the body */
  int nob = p->no_body || status == 204 || status == 304;
  if (!known && (p->upstream_done || nob)) {
    body = nob ? "" : p->collected.data ? p->collected.data : "";
    len = nob ? 0 : p->collected.len;
    known = 1;
  }
  append_status_line(b, status);
  if (mg_hooks_response_replaced(req)) mg_buf_append(b, "Server: moongate\r\n", 18);
  mg_buf_append(b, lines.data, lines.len);
  mg_buf_dispose(&lines);
  p->head_built = 1;
  req->head_sent = 1;
  req->status = status;
  if (known) {                               /* the whole body: one Content-Length answer */
    mg_buf_t filtered;
    mg_buf_init(&filtered);
    if (mg_hooks_has_filters(req)) {
      if (mg_hooks_filter(req, body, len, 1, &filtered) != 0) {
        mg_buf_dispose(&filtered);
        req->head_sent = 0;
        b->len = 0;
        proxy_fail(p, MG_HTTP_E_SCRIPT_ERROR);
        return;
      }
      body = filtered.data ? filtered.data : "";
      len = filtered.len;
    }
    if (req->method == HTTP_HEAD && !replaced && p->upstream_cl >= 0)   /* the GET's length */
      mg_buf_printf(b, "Content-Length: %lld\r\n", (long long)p->upstream_cl);
    else if (status != 204 && status != 304)
      mg_buf_printf(b, "Content-Length: %zu\r\n", len);
    mg_request_common_headers(req, b);
    mg_buf_append(b, "\r\n", 2);
    if (!(req->method == HTTP_HEAD || status == 204 || status == 304)) mg_buf_append(b, body, len);
    mg_buf_dispose(&filtered);
    if (proxy_flush(p) != 0) {
      mg_conn_abort(req->conn);
      return;
    }
    /* A body the upstream had not finished sending: that connection cannot be reused. */
    proxy_finish(p, !p->upstream_done);
    return;
  }
  if (!mg_hooks_has_filters(req) && p->upstream_cl >= 0) {
    mg_buf_printf(b, "Content-Length: %lld\r\n", (long long)p->upstream_cl);
  } else if (req->http_minor == 1) {
    p->client_chunked = 1;
    mg_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
  } else {
    req->conn->close_after = 1;
  }
  mg_request_common_headers(req, b);
  mg_buf_append(b, "\r\n", 2);
  if (p->collected.len && emit_body(p, p->collected.data, p->collected.len, 0) != 0) {
    b->len = 0;
    req->head_sent = 0;
    proxy_fail(p, MG_HTTP_E_SCRIPT_ERROR);
    return;
  }
  p->collected.len = 0;
  if (proxy_flush(p) != 0) {
    mg_conn_abort(req->conn);
    return;
  }
  p->upstream_paused = 0;
  mg_upconn_read_start(p->uc, on_upstream_read);
  proxy_arm_timer(p);
}

/* A read arrived while the head waits for the hooks. */
static void proxy_hooked_read(mg_proxy_t *p) {
  mg_request_t *req = p->req;
  if (p->collect_too_large) {
    mg_log_warn("upstream %s: response body over %d bytes for a response hook (request %s)",
                p->target->name, MG_PROXY_MAX_COLLECT, req->id);
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  if (!p->hooks_started) {
    p->hooks_started = 1;
    if (p->upstream_done) {                  /* all of it is here: res:body() needs no wait */
      p->hresp.body = p->collected.data ? p->collected.data : "";
      p->hresp.body_len = p->collected.len;
    } else {
      p->hresp.want_body = proxy_want_body;
      p->upstream_paused = 1;
      mg_upconn_read_stop(p->uc);
    }
    p->hresp.done = proxy_hooks_done;
    proxy_arm_timer(p);
    mg_hooks_run_response(req, &p->hresp);   /* may finish at once; p may be gone after */
    return;
  }
  if (p->collecting && p->upstream_done) {
    p->collecting = 0;
    mg_hooks_body_ready(req, p->collected.data ? p->collected.data : "", p->collected.len);
    return;
  }
  proxy_arm_timer(p);
}

/* Writes what the last read produced to the client; applies back-pressure. */
static int proxy_flush(mg_proxy_t *p) {
  mg_request_t *req = p->req;
  if (p->out.len) {
    int rc = mg_conn_write(req->conn, p->out.data, p->out.len);
    p->out.len = 0;
    if (p->head_built) p->head_flushed = 1;
    if (rc != 0) return -1;
  }
  mg_buf_reset(&p->out, 64 * 1024);
  if (mg_conn_write_queue(req->conn) > MG_PROXY_HIGH_WATER && p->uc && !p->upstream_paused) {
    p->upstream_paused = 1;
    mg_upconn_read_stop(p->uc);
    proxy_arm_timer(p);
  }
  return 0;
}

static void proxy_on_drain(mg_request_t *req) {
  mg_proxy_t *p = req->handler;
  if (!p || !p->upstream_paused || !p->uc) return;
  p->upstream_paused = 0;
  mg_upconn_read_start(p->uc, on_upstream_read);
  proxy_arm_timer(p);
}

static void on_upstream_read(mg_upconn_t *uc, ssize_t nread, const uv_buf_t *buf) {
  mg_proxy_t *p = uc->data;
  if (!p || nread == 0) return;
  if (nread < 0) {
    if (nread == UV_EOF && p->response_began && llhttp_message_needs_eof(&uc->parser)) {
      /* A close-delimited body ends here. */
      if (llhttp_finish(&uc->parser) == HPE_OK || p->upstream_done) {
        p->request_sent = 0;                 /* never reuse a closed connection */
        if (p->hooked && !p->head_built) {
          p->upstream_done = 1;
          proxy_hooked_read(p);
          return;
        }
        if (proxy_flush(p) != 0) { mg_conn_abort(p->req->conn); return; }
        proxy_finish(p, 1);
        return;
      }
    }
    proxy_upstream_broken(p, (int)nread);
    return;
  }
  p->response_began = 1;
  p->parse_base = buf->base;
  enum llhttp_errno e = llhttp_execute(&uc->parser, buf->base, (size_t)nread);
  size_t used = (size_t)nread;
  if (e == HPE_PAUSED) used = (size_t)(llhttp_get_error_pos(&uc->parser) - buf->base);
  else if (e != HPE_OK) {
    mg_log_warn("upstream %s: malformed response (%s: %s), request %s", p->target->name,
                llhttp_errno_name(e), llhttp_get_error_reason(&uc->parser), p->req->id);
    mg_upstream_report(p->target, 0);
    if (p->head_flushed) {                   /* mid-body: cut */
      p->out.len = 0;
      mg_conn_abort(p->req->conn);
      return;
    }
    p->req->head_sent = 0;
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  if (used) p->last_byte = buf->base[used - 1];
  int extra = p->upstream_done && used < (size_t)nread;
  if (extra && !p->head_flushed) {
    /* Bytes after a complete response, seen before anything left for the client: the
     * upstream's framing cannot be trusted, so neither can this response. */
    mg_log_warn("upstream %s: %zu bytes after a complete response, request %s",
                p->target->name, (size_t)nread - used, p->req->id);
    mg_upstream_report(p->target, 0);
    p->req->head_sent = 0;
    proxy_fail(p, MG_HTTP_E_BAD_GATEWAY);
    return;
  }
  if (p->hooked && !p->head_built) {
    proxy_hooked_read(p);
    return;
  }
  if (!p->upstream_done) proxy_arm_timer(p);
  if (proxy_flush(p) != 0) {
    mg_conn_abort(p->req->conn);
    return;
  }
  if (p->upstream_done) proxy_finish(p, extra);
}

/* ------------------------------------------------------------------------------------------
 * Entry.
 * ---------------------------------------------------------------------------------------- */

void mg_proxy_start(mg_request_t *req, mg_upstream_t *up) {
  mg_proxy_t *p = proxy_alloc();
  if (!p) {
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  p->req = req;
  p->up = up;
  p->start_ns = uv_hrtime();
  req->handler = p;
  req->on_abort = proxy_on_abort;
  req->on_drain = proxy_on_drain;
  if (req->content_length > 0 && (uint64_t)req->content_length > req->max_body) {
    mg_request_error(req, MG_HTTP_E_BODY_TOO_LARGE);   /* answered before reading the body */
    return;
  }
  proxy_connect(p);
}
