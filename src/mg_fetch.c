/* mg_fetch: the HTTP/1.1 client behind mg.fetch (see mg_fetch.h).
 *
 * One exchange is one mg_fetch_t. Its uv timer carries the total deadline, and also delivers
 * a result that was known while mg_fetch_start was still running (a bad request, no target),
 * so the callback never runs inside the start. The request is serialised once without its
 * Host line, which depends on the target and is added per attempt. The response is parsed
 * with the llhttp parser that lives in each upstream connection, with this module's own
 * callbacks, and kept whole: header fields in one buffer ("name\0value\0" ...) with offsets
 * beside it, the body in another. */
#include "mg_fetch.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mg_asan.h"
#include "mg_buf.h"
#include "mg_http.h"
#include "mg_log.h"
#include "mg_upstream.h"
#include "mg_worker.h"
#include "mg_write.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Ad-hoc upstreams (URL targets) kept per process, most recently used first. */
#define MG_FETCH_CACHE_MAX 32

typedef struct adhoc adhoc_t;

/* Where a header field sits in the fetch's header buffer. */
typedef struct header_off {
  uint32_t name, name_len, value, value_len;
} header_off_t;

struct mg_fetch {
  /* Everything up to `timer` starts zeroed for each exchange. */
  mg_upstream_t *up;
  mg_worker_t *w;
  adhoc_t *adhoc;                 /* the cache entry UP belongs to (a reference), or NULL */
  mg_target_t *target;            /* the target of the current (or last) attempt */
  mg_upconn_t *uc;                /* the connection of the current attempt, or NULL */
  mg_fetch_cb cb;
  void *data;
  uint64_t timeout_ms;
  size_t max_body;
  uint64_t tried;                 /* targets whose connect failed (bit per index) */
  int attempts;                   /* targets picked so far */
  int err;                        /* MG_FETCH_E_* once ended with an error */
  int last_err;                   /* the error of the last failed connect */
  int parse_err;                  /* why a parser callback stopped the parse */
  int status;
  unsigned idempotent : 1;        /* the method may be replayed on a fresh connection */
  unsigned head_method : 1;       /* HEAD: the response has no body */
  unsigned has_host : 1;          /* the caller gave its own Host */
  unsigned in_start : 1;          /* inside mg_fetch_start: results are delivered later */
  unsigned ended : 1;             /* the result is final */
  unsigned reused : 1;            /* the current connection came from the pool */
  unsigned retried : 1;           /* the one retry on a fresh connection was used */
  unsigned fresh_only : 1;
  unsigned response_began : 1;    /* a response byte arrived on the current connection */
  unsigned write_failed : 1;
  unsigned interim : 1;           /* parsing a 1xx */
  unsigned head_done : 1;         /* the final response's head is parsed (later fields:
                                     trailers, dropped) */
  unsigned complete : 1;          /* the final response is complete */
  size_t pre_len;                 /* req[0, pre_len) is the request line */
  uint32_t cur_name, cur_value;   /* offsets in hbuf of the field being parsed */
  const char *parse_base;         /* the buffer being parsed and the byte before it */
  char last_byte;
  /* Kept when a finished exchange waits in the spares for the next one: the timer stays
   * initialised, the buffers keep their memory (emptied). */
  uv_timer_t timer;               /* the deadline; then the deferred delivery */
  mg_buf_t req;                   /* request line, then the fields after Host and the body */
  mg_buf_t out;                   /* the request as written on the current attempt */
  mg_buf_t hbuf;                  /* response header names and values, NUL-terminated */
  mg_buf_t hoffs;                 /* header_off_t per response field */
  mg_buf_t body;
  mg_fetch_t *next_spare;
  mg_worker_t *spare_of;          /* the worker whose loop the timer belongs to */
};

/* Finished exchanges kept for reuse, per process (a worker is one process): starting a fetch
 * then costs no allocation, and no timer set-up. At most SPARES_MAX are kept, and only
 * buffers of at most SPARE_BUF_MAX bytes. */
#define SPARES_MAX 64
#define SPARE_BUF_MAX 8192
static mg_fetch_t *spares;
static size_t nspares;

static llhttp_settings_t settings;
static int settings_ready;

static void fetch_connect(mg_fetch_t *f);
static void adhoc_release(adhoc_t *a);

const char *mg_fetch_strerror(int err) {
  static const char *const msgs[] = {
#define MG_FETCH_ERR_MSG(name, msg) msg,
    MG_FETCH_ERRORS(MG_FETCH_ERR_MSG)
#undef MG_FETCH_ERR_MSG
  };
  if (err == 0) return "ok";
  int i = err - MG_FETCH_E_FIRST_ - 1;
  if (i < 0 || i >= (int)(sizeof msgs / sizeof msgs[0])) return "unknown error";
  return msgs[i];
}

/* ------------------------------------------------------------------------------------------
 * Checking and serialising the request.
 * ---------------------------------------------------------------------------------------- */

__attribute__((format(printf, 3, 4)))
static int check_fail(char *err, size_t errlen, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return -1;
}

int mg_fetch_check_req(const mg_fetch_req_t *r, char *err, size_t errlen) {
  const char *m = r->method ? r->method : "GET";
  if (!mg_http_is_token(m, strlen(m)))
    return check_fail(err, errlen, "invalid method \"%.40s\"", m);
  const char *p = r->path ? r->path : "/";
  if (p[0] != '/') return check_fail(err, errlen, "the path must start with '/'");
  for (const unsigned char *s = (const unsigned char *)p; *s; s++)
    if (*s <= 0x20 || *s == 0x7f || *s == '#')
      return check_fail(err, errlen, "invalid byte 0x%02x in the path (encode it)", *s);
  for (size_t i = 0; i < r->nheaders; i++) {
    const char *n = r->headers[2 * i], *v = r->headers[2 * i + 1];
    if (!n || !v) return check_fail(err, errlen, "header %zu has no name or value", i + 1);
    size_t nl = strlen(n);
    if (!mg_http_is_token(n, nl))
      return check_fail(err, errlen, "invalid header name \"%.60s\"", n);
    if (strpbrk(v, "\r\n"))
      return check_fail(err, errlen, "the value of header \"%.60s\" contains CR or LF", n);
    int id = (int)mg_http_header_id(n, nl);
    if (mg_http_id_is_hop_by_hop(id) || id == MG_HDR_CONTENT_LENGTH)
      return check_fail(err, errlen, "header \"%.60s\" is set by the client itself", n);
  }
  return 0;
}

static int method_is(const char *m, const char *name) { return strcmp(m, name) == 0; }

/* Serialises R into f->req: the request line (pre_len bytes), then every field but Host
 * (added per attempt), the blank line and the body. */
static int build_request(mg_fetch_t *f, const mg_fetch_req_t *r) {
  const char *m = r->method ? r->method : "GET";
  const char *p = r->path ? r->path : "/";
  mg_buf_t *b = &f->req;
  int rc = 0, has_ua = 0;
  rc |= mg_buf_puts(b, m);
  rc |= mg_buf_append(b, " ", 1);
  rc |= mg_buf_puts(b, p);
  rc |= mg_buf_append(b, " HTTP/1.1\r\n", 11);
  f->pre_len = b->len;
  for (size_t i = 0; i < r->nheaders; i++) {
    const char *n = r->headers[2 * i], *v = r->headers[2 * i + 1];
    int id = (int)mg_http_header_id(n, strlen(n));
    if (id == MG_HDR_HOST) f->has_host = 1;
    if (id == MG_HDR_USER_AGENT) has_ua = 1;
    /* Values go out without the optional whitespace around them. */
    const char *val = v;
    size_t vl = strlen(v);
    mg_http_trim(&val, &vl);
    rc |= mg_buf_puts(b, n);
    rc |= mg_buf_append(b, ": ", 2);
    rc |= mg_buf_append(b, val, vl);
    rc |= mg_buf_append(b, "\r\n", 2);
  }
  if (!has_ua) rc |= mg_buf_puts(b, "User-Agent: moongate\r\n");
  if (r->body_len > 0 || method_is(m, "POST") || method_is(m, "PUT") || method_is(m, "PATCH"))
  {
    rc |= mg_buf_append(b, "Content-Length: ", 16);
    rc |= mg_buf_append_uint(b, r->body_len);
    rc |= mg_buf_append(b, "\r\n", 2);
  }
  rc |= mg_buf_append(b, "\r\n", 2);
  if (r->body_len) rc |= mg_buf_append(b, r->body, r->body_len);
  f->idempotent = method_is(m, "GET") || method_is(m, "HEAD") || method_is(m, "PUT") ||
                  method_is(m, "DELETE") || method_is(m, "OPTIONS") || method_is(m, "TRACE");
  f->head_method = method_is(m, "HEAD");
  return rc ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------
 * Ending an exchange.
 * ---------------------------------------------------------------------------------------- */

/* Lets go of the current connection: back to the pool when REUSABLE, closed otherwise. */
static void drop_conn(mg_fetch_t *f, int reusable) {
  mg_upconn_t *uc = f->uc;
  if (!uc) return;
  f->uc = NULL;
  if (uc->state == MG_UPCONN_CONNECTING) {   /* a connect in flight: it never reports */
    uc->connect_cb = NULL;
    mg_upconn_close(uc);
    return;
  }
  uc->data = NULL;
  if (reusable) mg_pool_release(uc);
  else mg_upconn_close(uc);
}

static void deliver(mg_fetch_t *f) { f->cb(f, f->data); }

static void on_deliver(uv_timer_t *t) { deliver(container_of(t, mg_fetch_t, timer)); }

/* The result is final (the connection was dealt with before). Calls back now, or from the
 * loop when still inside mg_fetch_start. The callback may free F: nothing may follow. */
static void fetch_end(mg_fetch_t *f, int err) {
  f->err = err;
  f->ended = 1;
  uv_timer_stop(&f->timer);
  if (f->in_start) {
    uv_timer_start(&f->timer, on_deliver, 0, 0);
    return;
  }
  deliver(f);
}

/* The exchange failed at its target: closes the connection, tells the balancer, ends. */
static void fetch_fail(mg_fetch_t *f, int err, int report) {
  if (report && f->target) mg_upstream_report(f->target, 0);
  drop_conn(f, 0);
  fetch_end(f, err);
}

/* The response is complete and clean: release the connection by the checklist. */
static void fetch_finish(mg_fetch_t *f, int may_reuse) {
  mg_upconn_t *uc = f->uc;
  int reusable = may_reuse && !f->write_failed && uc->write_queued == 0 &&
                 llhttp_should_keep_alive(&uc->parser) && !f->w->stopping;
  mg_upstream_report(f->target, 1);
  drop_conn(f, reusable);
  fetch_end(f, 0);
}

static void on_deadline(uv_timer_t *t) {
  mg_fetch_t *f = container_of(t, mg_fetch_t, timer);
  mg_log_warn("fetch %s: timed out after %llu ms", f->target ? f->target->name : f->up->conf->name,
              (unsigned long long)f->timeout_ms);
  fetch_fail(f, MG_FETCH_E_TIMEOUT, 1);
}

/* The connection broke (EOF or an error) before the response was complete. */
static void fetch_broken(mg_fetch_t *f, int status) {
  if (!f->response_began && f->reused && !f->retried && f->idempotent) {
    /* A pooled connection the upstream had closed: one retry on a fresh connection. */
    f->retried = 1;
    f->fresh_only = 1;
    drop_conn(f, 0);
    fetch_connect(f);
    return;
  }
  mg_log_warn("fetch %s: %s before the response was complete", f->target->name,
              status == UV_EOF ? "connection closed" : uv_strerror(status));
  fetch_fail(f, status == UV_EOF ? MG_FETCH_E_CLOSED : MG_FETCH_E_RESET, 1);
}

/* ------------------------------------------------------------------------------------------
 * The response.
 * ---------------------------------------------------------------------------------------- */

#define FETCH(parser) ((mg_fetch_t *)(parser)->data)

static int parse_stop(mg_fetch_t *f, int err) {
  f->parse_err = err;
  return -1;
}

static int r_on_message_begin(llhttp_t *parser) {
  mg_fetch_t *f = FETCH(parser);
  f->hbuf.len = 0;
  f->hoffs.len = 0;
  f->body.len = 0;
  f->cur_name = 0;
  return 0;
}

static int r_on_header_field(llhttp_t *parser, const char *at, size_t len) {
  mg_fetch_t *f = FETCH(parser);
  if (f->head_done) return 0;                /* trailers: dropped */
  if (f->hbuf.len + len + 2 > MG_FETCH_MAX_HEAD) return parse_stop(f, MG_FETCH_E_HEAD_TOO_LARGE);
  return mg_buf_append(&f->hbuf, at, len) ? parse_stop(f, MG_FETCH_E_NOMEM) : 0;
}

static int r_on_header_field_complete(llhttp_t *parser) {
  mg_fetch_t *f = FETCH(parser);
  if (f->head_done) return 0;
  if (mg_buf_append(&f->hbuf, "", 1)) return parse_stop(f, MG_FETCH_E_NOMEM);
  f->cur_value = (uint32_t)f->hbuf.len;
  return 0;
}

static int r_on_header_value(llhttp_t *parser, const char *at, size_t len) {
  mg_fetch_t *f = FETCH(parser);
  if (f->head_done) return 0;
  char before = at == f->parse_base ? f->last_byte : at[-1];
  if (before == '\n') return parse_stop(f, MG_FETCH_E_MALFORMED);   /* obs-fold */
  if (f->hbuf.len + len + 1 > MG_FETCH_MAX_HEAD) return parse_stop(f, MG_FETCH_E_HEAD_TOO_LARGE);
  return mg_buf_append(&f->hbuf, at, len) ? parse_stop(f, MG_FETCH_E_NOMEM) : 0;
}

static int r_on_header_value_complete(llhttp_t *parser) {
  mg_fetch_t *f = FETCH(parser);
  if (f->head_done) return 0;
  if (f->hoffs.len / sizeof(header_off_t) >= MG_FETCH_MAX_HEADERS)
    return parse_stop(f, MG_FETCH_E_HEAD_TOO_LARGE);
  size_t vlen = f->hbuf.len - f->cur_value;
  while (vlen && (f->hbuf.data[f->cur_value + vlen - 1] == ' ' ||
                  f->hbuf.data[f->cur_value + vlen - 1] == '\t'))
    vlen--;
  f->hbuf.len = f->cur_value + vlen;
  if (mg_buf_append(&f->hbuf, "", 1)) return parse_stop(f, MG_FETCH_E_NOMEM);
  header_off_t o = {f->cur_name, f->cur_value - 1 - f->cur_name, f->cur_value, (uint32_t)vlen};
  f->cur_name = (uint32_t)f->hbuf.len;
  return mg_buf_append(&f->hoffs, &o, sizeof o) ? parse_stop(f, MG_FETCH_E_NOMEM) : 0;
}

static int r_on_headers_complete(llhttp_t *parser) {
  mg_fetch_t *f = FETCH(parser);
  int status = llhttp_get_status_code(parser);
  if (status == 101) return parse_stop(f, MG_FETCH_E_MALFORMED);   /* never asked for */
  if (status < 200) {                        /* 100 / 102 / 103: the real one follows */
    f->interim = 1;
    return 1;
  }
  if (parser->http_major != 1) return parse_stop(f, MG_FETCH_E_MALFORMED);
  /* The only transfer coding this client can undo is chunked. */
  size_t n = f->hoffs.len / sizeof(header_off_t);
  const header_off_t *o = (const header_off_t *)f->hoffs.data;
  for (size_t i = 0; i < n; i++) {
    const char *name = f->hbuf.data + o[i].name;
    if (mg_http_header_id(name, o[i].name_len) != MG_HDR_TRANSFER_ENCODING) continue;
    const char *v = f->hbuf.data + o[i].value, *item;
    size_t vl = o[i].value_len, il;
    while (mg_http_list_next(&v, &vl, &item, &il))
      if (!mg_http_ieq(item, il, "chunked")) return parse_stop(f, MG_FETCH_E_MALFORMED);
  }
  f->status = status;
  f->head_done = 1;
  int no_body = f->head_method || status == 204 || status == 304;
  if (!no_body && (parser->flags & F_CONTENT_LENGTH) && parser->content_length > f->max_body)
    return parse_stop(f, MG_FETCH_E_TOO_LARGE);
  return no_body ? 1 : 0;
}

static int r_on_body(llhttp_t *parser, const char *at, size_t len) {
  mg_fetch_t *f = FETCH(parser);
  if (f->interim || len == 0) return 0;
  if (len > f->max_body - f->body.len) return parse_stop(f, MG_FETCH_E_TOO_LARGE);
  return mg_buf_append(&f->body, at, len) ? parse_stop(f, MG_FETCH_E_NOMEM) : 0;
}

static int r_on_message_complete(llhttp_t *parser) {
  mg_fetch_t *f = FETCH(parser);
  if (f->interim) {
    f->interim = 0;
    return 0;
  }
  f->complete = 1;
  return HPE_PAUSED;                         /* anything after it is looked at by on_read */
}

static void settings_init(void) {
  if (settings_ready) return;
  llhttp_settings_init(&settings);
  settings.on_message_begin = r_on_message_begin;
  settings.on_header_field = r_on_header_field;
  settings.on_header_field_complete = r_on_header_field_complete;
  settings.on_header_value = r_on_header_value;
  settings.on_header_value_complete = r_on_header_value_complete;
  settings.on_headers_complete = r_on_headers_complete;
  settings.on_body = r_on_body;
  settings.on_message_complete = r_on_message_complete;
  settings_ready = 1;
}

static void on_read(mg_upconn_t *uc, ssize_t nread, const uv_buf_t *buf) {
  mg_fetch_t *f = uc->data;
  if (!f || nread == 0) return;
  if (nread < 0) {
    if (nread == UV_EOF && f->response_began && llhttp_message_needs_eof(&uc->parser)) {
      llhttp_finish(&uc->parser);            /* a close-delimited body ends here */
      if (f->complete) {
        fetch_finish(f, 0);
        return;
      }
    }
    fetch_broken(f, (int)nread);
    return;
  }
  f->response_began = 1;
  f->parse_base = buf->base;
  enum llhttp_errno e = llhttp_execute(&uc->parser, buf->base, (size_t)nread);
  size_t used = (size_t)nread;
  if (e == HPE_PAUSED) {
    used = (size_t)(llhttp_get_error_pos(&uc->parser) - buf->base);
  } else if (e != HPE_OK) {
    int err = f->parse_err ? f->parse_err : MG_FETCH_E_MALFORMED;
    if (err == MG_FETCH_E_MALFORMED || err == MG_FETCH_E_HEAD_TOO_LARGE)
      mg_log_warn("fetch %s: %s (%s: %s)", f->target->name, mg_fetch_strerror(err),
                  llhttp_errno_name(e), llhttp_get_error_reason(&uc->parser));
    /* A body over the caller's limit is not the target's fault. */
    fetch_fail(f, err, err != MG_FETCH_E_TOO_LARGE && err != MG_FETCH_E_NOMEM);
    return;
  }
  if (!f->complete) {
    if (used) f->last_byte = buf->base[used - 1];
    return;
  }
  if (used < (size_t)nread) {
    /* Bytes after a complete response: the framing cannot be trusted, so neither can it. */
    mg_log_warn("fetch %s: %zu bytes after a complete response", f->target->name,
                (size_t)nread - used);
    fetch_fail(f, MG_FETCH_E_MALFORMED, 1);
    return;
  }
  fetch_finish(f, 1);
}

/* ------------------------------------------------------------------------------------------
 * Sending.
 * ---------------------------------------------------------------------------------------- */

static void on_write(uv_write_t *wr, int status) {
  mg_write_t *w = container_of(wr, mg_write_t, req);
  mg_upconn_t *uc = w->owner;
  uc->write_queued -= w->len;
  free(w);
  mg_fetch_t *f = uc->data;
  if (!f || uc->state == MG_UPCONN_CLOSING) return;
  /* The read side sees the broken connection (or the deadline passes); never reuse it. */
  if (status < 0) f->write_failed = 1;
}

static void fetch_send(mg_fetch_t *f) {
  mg_upconn_t *uc = f->uc;
  uc->data = f;
  llhttp_init(&uc->parser, HTTP_RESPONSE, &settings);
  uc->parser.data = f;
  f->response_began = f->complete = f->head_done = f->interim = f->write_failed = 0;
  f->parse_err = 0;
  f->status = 0;
  f->last_byte = 0;

  mg_buf_t *o = &f->out;
  o->len = 0;
  int rc = mg_buf_append(o, f->req.data, f->pre_len);
  if (!f->has_host) {
    rc |= mg_buf_append(o, "Host: ", 6);
    rc |= mg_buf_puts(o, f->target->name);
    rc |= mg_buf_append(o, "\r\n", 2);
  }
  rc |= mg_buf_append(o, f->req.data + f->pre_len, f->req.len - f->pre_len);
  if (rc) {
    fetch_fail(f, MG_FETCH_E_NOMEM, 0);
    return;
  }
  ssize_t queued = mg_write((uv_stream_t *)&uc->tcp, o->data, o->len, uc->write_queued,
                            on_write, uc);
  mg_buf_reset(o, 4096);
  if (queued < 0) {
    fetch_broken(f, (int)queued);            /* a pooled connection is retried */
    return;
  }
  uc->write_queued += (size_t)queued;
  mg_upconn_read_start(uc, on_read);
}

static int connect_error(int status) {
  switch (status) {
    case UV_ECONNREFUSED: return MG_FETCH_E_REFUSED;
    case UV_ETIMEDOUT: return MG_FETCH_E_CONNECT_TIMEOUT;
    case UV_EAI_NONAME: case UV_EAI_AGAIN: case UV_EAI_FAIL: case UV_EAI_NODATA:
    case UV_EAI_FAMILY: case UV_EAI_SERVICE: case UV_EAI_ADDRFAMILY:
      return MG_FETCH_E_RESOLVE;
    case UV_ENOMEM: return MG_FETCH_E_NOMEM;
    default: return MG_FETCH_E_CONNECT;
  }
}

static void on_connected(mg_upconn_t *uc, int status, void *data) {
  mg_fetch_t *f = data;
  if (status < 0) {
    f->uc = NULL;                            /* already closing */
    mg_log_warn("fetch %s: connect to %s failed: %s", f->up->conf->name, f->target->name,
                uv_strerror(status));
    mg_upstream_report(f->target, 0);
    if (f->target->index < 64) f->tried |= (uint64_t)1 << f->target->index;
    f->last_err = connect_error(status);
    /* Nothing was sent: another target may take it. */
    if (f->up->ntargets > 1 &&
        mg_balancer_available(&f->up->balancer, mg_worker_now(f->w), f->tried) > 0) {
      fetch_connect(f);
      return;
    }
    fetch_end(f, f->last_err);
    return;
  }
  fetch_send(f);
}

static void fetch_connect(mg_fetch_t *f) {
  /* Each target at most once, plus the one retry of a reused connection. */
  size_t cap = (f->up->ntargets < 64 ? f->up->ntargets : 64) + 1;
  mg_target_t *t = ++f->attempts <= (int)cap ? mg_upstream_pick(f->up, f->tried) : NULL;
  if (!t) {
    fetch_end(f, f->last_err ? f->last_err : MG_FETCH_E_NO_TARGET);
    return;
  }
  f->target = t;
  mg_upconn_t *uc = f->fresh_only ? NULL : mg_pool_acquire(t);
  if (uc) {
    f->reused = 1;
    f->uc = uc;
    fetch_send(f);
    return;
  }
  f->reused = 0;
  f->uc = mg_upconn_connect(t, on_connected, f);
  if (!f->uc) fetch_end(f, MG_FETCH_E_NOMEM);
}

/* ------------------------------------------------------------------------------------------
 * Starting and freeing.
 * ---------------------------------------------------------------------------------------- */

/* A fetch for worker W: a spare one of W's loop, emptied, or a new one. */
static mg_fetch_t *fetch_new(mg_worker_t *w) {
  mg_fetch_t **pp = &spares;
  while (*pp && (*pp)->spare_of != w) pp = &(*pp)->next_spare;
  mg_fetch_t *f = *pp;
  if (f) {
    *pp = f->next_spare;
    nspares--;
    MG_ASAN_UNPOISON(f, offsetof(mg_fetch_t, timer));
    memset(f, 0, offsetof(mg_fetch_t, timer));
    f->next_spare = NULL;
    return f;
  }
  f = calloc(1, sizeof *f);
  if (f) uv_timer_init(&w->loop, &f->timer);
  return f;
}

mg_fetch_t *mg_fetch_start(mg_upstream_t *up, const mg_fetch_req_t *r, mg_fetch_cb cb,
                           void *data) {
  settings_init();
  mg_fetch_t *f = fetch_new(up->w);
  if (!f) return NULL;
  f->up = up;
  f->w = up->w;
  f->cb = cb;
  f->data = data;
  f->max_body = r->max_body ? r->max_body : MG_FETCH_DEFAULT_MAX_BODY;
  f->timeout_ms = r->timeout_ms ? r->timeout_ms : mg_ms(up->conf->read_timeout);
  if (!f->timeout_ms) f->timeout_ms = MG_FETCH_DEFAULT_TIMEOUT_MS;
  f->in_start = 1;
  uv_timer_start(&f->timer, on_deadline, f->timeout_ms, 0);
  if (mg_fetch_check_req(r, NULL, 0) != 0) fetch_end(f, MG_FETCH_E_INVALID);
  else if (build_request(f, r) != 0) fetch_end(f, MG_FETCH_E_NOMEM);
  else fetch_connect(f);
  f->in_start = 0;
  return f;
}

static void on_timer_closed(uv_handle_t *h) { free(container_of(h, mg_fetch_t, timer)); }

static void buf_empty(mg_buf_t *b) {
  if (b->cap > SPARE_BUF_MAX) mg_buf_dispose(b);
  else b->len = 0;
}

static void fetch_destroy(mg_fetch_t *f) {
  mg_buf_dispose(&f->req);
  mg_buf_dispose(&f->out);
  mg_buf_dispose(&f->hbuf);
  mg_buf_dispose(&f->hoffs);
  mg_buf_dispose(&f->body);
  uv_close((uv_handle_t *)&f->timer, on_timer_closed);
}

void mg_fetch_cancel(mg_fetch_t *f) {
  if (!f) return;
  drop_conn(f, 0);                           /* still running: never pooled */
  if (f->adhoc) adhoc_release(f->adhoc);
  f->adhoc = NULL;
  if (nspares >= SPARES_MAX || f->w->stopping || uv_is_closing((uv_handle_t *)&f->timer)) {
    fetch_destroy(f);
    return;
  }
  uv_timer_stop(&f->timer);
  buf_empty(&f->req);
  buf_empty(&f->out);
  buf_empty(&f->hbuf);
  buf_empty(&f->hoffs);
  buf_empty(&f->body);
  f->next_spare = spares;
  f->spare_of = f->w;
  spares = f;
  nspares++;
  /* The part a new exchange zeroes; the timer stays linked in the loop. */
  MG_ASAN_POISON(f, offsetof(mg_fetch_t, timer));
}

void mg_fetch_free(mg_fetch_t *f) { mg_fetch_cancel(f); }

/* ------------------------------------------------------------------------------------------
 * Results.
 * ---------------------------------------------------------------------------------------- */

int mg_fetch_error(const mg_fetch_t *f) { return f->err; }

uint64_t mg_fetch_timeout(const mg_fetch_t *f) { return f->timeout_ms; }

const char *mg_fetch_target(const mg_fetch_t *f) { return f->target ? f->target->name : ""; }

int mg_fetch_status(const mg_fetch_t *f) { return f->err ? 0 : f->status; }

size_t mg_fetch_nheaders(const mg_fetch_t *f) {
  return f->err ? 0 : f->hoffs.len / sizeof(header_off_t);
}

void mg_fetch_header(const mg_fetch_t *f, size_t i, const char **name, size_t *name_len,
                     const char **value, size_t *value_len) {
  const header_off_t *o = (const header_off_t *)f->hoffs.data + i;
  *name = f->hbuf.data + o->name;
  *name_len = o->name_len;
  *value = f->hbuf.data + o->value;
  *value_len = o->value_len;
}

const char *mg_fetch_body(const mg_fetch_t *f, size_t *len) {
  *len = f->err ? 0 : f->body.len;
  return f->err || !f->body.data ? "" : f->body.data;
}

int mg_fetch_reused(const mg_fetch_t *f) { return f->reused; }

/* ------------------------------------------------------------------------------------------
 * URL targets: parsing, and the cache of ad-hoc upstreams.
 * ---------------------------------------------------------------------------------------- */

static int prefix_ieq(const char *s, const char *prefix) {
  return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

int mg_fetch_parse_url(const char *url, char *host, size_t hostlen, int *port,
                       const char **path, size_t *path_len) {
  if (prefix_ieq(url, "https://")) return MG_FETCH_E_HTTPS;
  if (!prefix_ieq(url, "http://")) return MG_FETCH_E_BAD_URL;
  const char *s = url + 7, *h, *he;
  if (*s == '[') {                           /* an IPv6 literal */
    h = ++s;
    while (*s && (isxdigit((unsigned char)*s) || *s == ':' || *s == '.')) s++;
    if (*s != ']' || s == h) return MG_FETCH_E_BAD_URL;
    he = s++;
  } else {
    h = s;
    while (*s && (isalnum((unsigned char)*s) || *s == '-' || *s == '.' || *s == '_')) s++;
    he = s;
    if (he == h) return MG_FETCH_E_BAD_URL;
  }
  if ((size_t)(he - h) >= hostlen) return MG_FETCH_E_BAD_URL;
  for (size_t i = 0; i < (size_t)(he - h); i++) host[i] = (char)tolower((unsigned char)h[i]);
  host[he - h] = '\0';
  *port = 80;
  if (*s == ':') {
    long p = 0;
    const char *d = ++s;
    while (*s >= '0' && *s <= '9' && s - d < 6) p = p * 10 + (*s++ - '0');
    if (s == d || p < 1 || p > 65535) return MG_FETCH_E_BAD_URL;
    *port = (int)p;
  }
  if (*s && *s != '/' && *s != '?' && *s != '#') return MG_FETCH_E_BAD_URL;  /* '@', ... */
  *path = s;
  *path_len = strcspn(s, "#");
  return 0;
}

struct adhoc {
  adhoc_t *next, *prev;           /* the cache list, while cached */
  mg_worker_t *w;
  int refs;                       /* fetches using it */
  int cached;
  mg_upstream_t *up;
  mg_config_t cfg;                /* points at the two structs below; never freed as such */
  mg_upstream_conf_t uconf;
  mg_target_conf_t tconf;
  char host[MG_FETCH_MAX_HOST];
  char name[MG_FETCH_MAX_HOST + 16];
};

static adhoc_t *cache;
static size_t cache_len;

static void adhoc_unlink(adhoc_t *a) {
  if (a->prev) a->prev->next = a->next;
  else cache = a->next;
  if (a->next) a->next->prev = a->prev;
  a->next = a->prev = NULL;
  a->cached = 0;
  cache_len--;
}

static void adhoc_free(adhoc_t *a) {
  mg_upstreams_free(a->up, 1);
  free(a);
}

static void adhoc_release(adhoc_t *a) {
  if (--a->refs == 0 && !a->cached) adhoc_free(a);
}

/* Makes the upstream for HOST:PORT: one target, the config's upstream defaults, except that
 * the target is never ejected (a URL names one address; ejecting it would only turn its
 * real errors into "no healthy target"). */
static adhoc_t *adhoc_new(mg_worker_t *w, const char *host, int port) {
  adhoc_t *a = calloc(1, sizeof *a);
  if (!a) return NULL;
  a->w = w;
  snprintf(a->host, sizeof a->host, "%s", host);
  if (strchr(host, ':')) snprintf(a->name, sizeof a->name, "[%s]:%d", host, port);
  else snprintf(a->name, sizeof a->name, "%s:%d", host, port);
  a->tconf = (mg_target_conf_t){.host = a->host, .port = port, .weight = 1};
  a->uconf = (mg_upstream_conf_t){
    .name = a->name, .targets = &a->tconf, .ntargets = 1, .connect_timeout = 5,
    .send_timeout = 60, .read_timeout = 60, .keepalive_max_idle = 32, .keepalive_timeout = 60,
    .keepalive_requests = 1000, .max_fails = 0, .fail_timeout = 10, .dns_ttl = 30};
  a->cfg.upstreams = &a->uconf;
  a->cfg.nupstreams = 1;
  a->up = mg_upstreams_new(w, &a->cfg);
  if (!a->up) {
    free(a);
    return NULL;
  }
  return a;
}

/* The cached upstream for HOST:PORT in W, made when missing (evicting the least recently
 * used). Returns it with a reference taken, or NULL when out of memory. */
static adhoc_t *adhoc_get(mg_worker_t *w, const char *host, int port) {
  adhoc_t *a;
  for (a = cache; a; a = a->next)
    if (a->w == w && a->tconf.port == port && strcmp(a->host, host) == 0) break;
  if (a) {
    adhoc_unlink(a);
  } else {
    if (cache_len >= MG_FETCH_CACHE_MAX) {
      adhoc_t *last = cache;
      while (last->next) last = last->next;
      adhoc_unlink(last);
      if (last->refs == 0) adhoc_free(last);   /* else freed by its last fetch */
    }
    a = adhoc_new(w, host, port);
    if (!a) return NULL;
  }
  a->next = cache;
  if (cache) cache->prev = a;
  cache = a;
  a->cached = 1;
  cache_len++;
  a->refs++;
  return a;
}

mg_fetch_t *mg_fetch_start_url(mg_worker_t *w, const char *host, int port,
                               const mg_fetch_req_t *r, mg_fetch_cb cb, void *data) {
  if (strlen(host) >= MG_FETCH_MAX_HOST) return NULL;
  adhoc_t *a = adhoc_get(w, host, port);
  if (!a) return NULL;
  mg_fetch_t *f = mg_fetch_start(a->up, r, cb, data);
  if (!f) {
    adhoc_release(a);
    return NULL;
  }
  f->adhoc = a;
  return f;
}

void mg_fetch_cache_free(mg_worker_t *w) {
  mg_fetch_t **pp = &spares;
  while (*pp) {
    mg_fetch_t *f = *pp;
    if (f->spare_of == w) {
      *pp = f->next_spare;
      nspares--;
      MG_ASAN_UNPOISON(f, offsetof(mg_fetch_t, timer));
      fetch_destroy(f);
    } else {
      pp = &f->next_spare;
    }
  }
  adhoc_t *a = cache;
  while (a) {
    adhoc_t *next = a->next;
    if (a->w == w) {
      adhoc_unlink(a);
      if (a->refs == 0) adhoc_free(a);
    }
    a = next;
  }
}
