/* mg_request: the request lifecycle. A request whose head is complete and valid enters
 * mg_request_start and runs through the phases of MG_PHASES in order: REQUEST (global hooks,
 * before routing), routing, ACCESS (hooks), HANDLER (a fixed response, a Lua handler or the
 * proxy), RESPONSE (hooks on the answer, or inside the proxy as the upstream's head arrives)
 * and LOG (the access log and the log hooks, after the last byte is written). Each phase is a
 * step of request_run's state machine: a phase whose hooks run (mg_hooks.c) returns, and
 * mg_request_continue resumes the machine when they finish without answering. The admin
 * listener's requests go to mg_admin.c instead. Also here: the gateway's own answers (fixed
 * responses, JSON errors) and the access log. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg_admin.h"
#include "mg_hooks.h"
#include "mg_log.h"
#include "mg_proxy.h"
#include "mg_request.h"
#include "mg_upstream.h"

/* Finished requests are kept (up to this many per worker) with their buffers, so a busy
 * worker serves requests without calling malloc for them. */
#define MG_SPARE_REQUESTS 64
#define MG_SPARE_BUF_MAX (16 * 1024)
#define MG_MAX_ANSWER_HEADERS 128

static void hex16(char *out, uint64_t v) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 15; i >= 0; i--, v >>= 4) out[i] = digits[v & 15];
}

mg_request_t *mg_request_new(mg_conn_t *c) {
  mg_worker_t *w = c->w;
  mg_request_t *req = w->spare;
  if (req) {
    w->spare = req->handler;
    w->nspare--;
    mg_buf_t head = req->head, offs = req->offs, header_mem = req->header_mem;
    memset(req, 0, sizeof *req);
    req->head = head;
    req->offs = offs;
    req->header_mem = header_mem;
  } else {
    req = calloc(1, sizeof *req);
    if (!req) return NULL;
  }
  req->conn = c;
  req->w = w;
  req->listener = c->listener;
  req->content_length = -1;
  req->upstream_time = -1;
  memcpy(req->id, w->id_prefix, 16);
  hex16(req->id + 16, ++w->requests);
  req->id[32] = '\0';
  return req;
}

void mg_request_free(mg_request_t *req) {
  mg_worker_t *w = req->w;
  req->headers = NULL;
  if (req->hooks) mg_hooks_request_free(req);
  if (req->gen) {
    mg_gen_release(req->gen);
    req->gen = NULL;
  }
  if (w && w->nspare < MG_SPARE_REQUESTS && !w->stopping) {
    mg_buf_reset(&req->head, MG_SPARE_BUF_MAX);
    mg_buf_reset(&req->offs, MG_SPARE_BUF_MAX);
    mg_buf_reset(&req->header_mem, MG_SPARE_BUF_MAX);
    req->handler = w->spare;
    w->spare = req;
    w->nspare++;
    return;
  }
  mg_buf_dispose(&req->head);
  mg_buf_dispose(&req->offs);
  mg_buf_dispose(&req->header_mem);
  free(req);
}

void mg_request_free_spares(mg_worker_t *w) {
  while (w->spare) {
    mg_request_t *req = w->spare;
    w->spare = req->handler;
    mg_buf_dispose(&req->head);
    mg_buf_dispose(&req->offs);
    mg_buf_dispose(&req->header_mem);
    free(req);
  }
  w->nspare = 0;
}

const mg_header_t *mg_request_header(const mg_request_t *req, const char *lower_name) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (mg_http_ieq(req->headers[i].name, req->headers[i].name_len, lower_name))
      return &req->headers[i];
  return NULL;
}

/* ------------------------------------------------------------------------------------------
 * Answers made by the gateway itself.
 * ---------------------------------------------------------------------------------------- */

void mg_request_common_headers(mg_request_t *req, mg_buf_t *out) {
  mg_conn_t *c = req->conn;
  if (c->w->stopping || c->nrequests + 1 >= c->w->cfg->limits.keepalive_requests)
    c->close_after = 1;
  mg_buf_append(out, "X-Request-Id: ", 14);
  mg_buf_append(out, req->id, strlen(req->id));
  if (c->close_after) mg_buf_append(out, "\r\nConnection: close\r\n", 21);
  else if (req->http_major == 1 && req->http_minor == 0)
    mg_buf_append(out, "\r\nConnection: keep-alive\r\n", 26);
  else mg_buf_append(out, "\r\n", 2);
}

void mg_request_respond(mg_request_t *req, int status, const char *content_type,
                        const char *body, size_t body_len, const char *headers,
                        size_t headers_len) {
  mg_conn_t *c = req->conn;
  if (req->has_body && !req->body_done) c->close_after = 1;  /* unread body: stream unusable */
  mg_buf_t out;
  mg_buf_init(&out);
  int no_body = req->method == HTTP_HEAD || status == 204 || status == 304 || status < 200;
  mg_buf_append(&out, "HTTP/1.1 ", 9);
  mg_buf_append_uint(&out, (unsigned)status);
  mg_buf_append(&out, " ", 1);
  mg_buf_puts(&out, mg_http_reason(status));
  mg_buf_append(&out, "\r\nServer: moongate\r\n", 20);
  if (content_type) {
    mg_buf_append(&out, "Content-Type: ", 14);
    mg_buf_puts(&out, content_type);
    mg_buf_append(&out, "\r\n", 2);
  }
  if (status != 204 && status != 304) {
    mg_buf_append(&out, "Content-Length: ", 16);
    mg_buf_append_uint(&out, body_len);
    mg_buf_append(&out, "\r\n", 2);
  }
  if (headers_len) mg_buf_append(&out, headers, headers_len);
  mg_request_common_headers(req, &out);
  mg_buf_append(&out, "\r\n", 2);
  if (!no_body) mg_buf_append(&out, body, body_len);
  req->status = status;
  req->head_sent = 1;
  mg_conn_write(c, out.data, out.len);
  mg_buf_dispose(&out);
  mg_request_done(req);
}

void mg_request_error(mg_request_t *req, mg_http_error_t err) {
  mg_conn_t *c = req->conn;
  if (req->on_abort) {
    void (*abort_cb)(mg_request_t *) = req->on_abort;
    req->on_abort = NULL;
    abort_cb(req);
  }
  req->on_body = NULL;
  req->on_body_done = NULL;
  req->on_drain = NULL;
  int status = mg_http_error_status(err);
  if (req->head_sent) {                      /* too late for an answer: cut the response */
    mg_conn_abort(c);
    return;
  }
  switch (status) {                          /* framing in doubt: answer, then close */
    case 400: case 408: case 413: case 414: case 417: case 431: case 501: case 505:
      c->close_after = 1;
      break;
    default:
      break;
  }
  char body[256];
  int n = snprintf(body, sizeof body, "{\"error\":\"%s\",\"status\":%d,\"request_id\":\"%s\"}",
                   mg_http_error_message(err), status, req->id);
  char extra[128];
  size_t extra_len = 0;
  if (status == 405) {
    unsigned allowed = req->match.allowed_methods;
    static const struct { unsigned bit; const char *name; } names[] = {
      {MG_M_GET, "GET"}, {MG_M_HEAD, "HEAD"}, {MG_M_POST, "POST"}, {MG_M_PUT, "PUT"},
      {MG_M_DELETE, "DELETE"}, {MG_M_PATCH, "PATCH"}, {MG_M_OPTIONS, "OPTIONS"},
      {MG_M_TRACE, "TRACE"}};
    if (allowed & MG_M_GET) allowed |= MG_M_HEAD;
    extra_len = (size_t)snprintf(extra, sizeof extra, "Allow: ");
    int first = 1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
      if (!(allowed & names[i].bit)) continue;
      extra_len += (size_t)snprintf(extra + extra_len, sizeof extra - extra_len, "%s%s",
                                    first ? "" : ", ", names[i].name);
      first = 0;
    }
    extra_len += (size_t)snprintf(extra + extra_len, sizeof extra - extra_len, "\r\n");
  }
  mg_request_respond(req, status, "application/json", body, (size_t)n, extra, extra_len);
}

/* ------------------------------------------------------------------------------------------
 * The phases.
 * ---------------------------------------------------------------------------------------- */

/* Picks the route; answers 404/405 itself. Returns 0 when a route was found. */
static int request_route(mg_request_t *req) {
  const mg_router_t *router = req->gen->routers[req->listener->index];
  mg_route_result_t r = router ? mg_router_match(router, req->method_bit, req->host,
                                                 req->host_len, req->path, req->path_len,
                                                 &req->match)
                               : MG_ROUTE_NOT_FOUND;
  if (r == MG_ROUTE_NO_METHOD && req->method == HTTP_HEAD && (req->match.allowed_methods & MG_M_GET))
    r = mg_router_match(router, MG_M_GET, req->host, req->host_len, req->path, req->path_len,
                        &req->match);       /* HEAD is GET without the body */
  if (r == MG_ROUTE_FOUND) {
    req->route = req->match.route;
    if (req->route->max_body) req->max_body = req->route->max_body;
    return 0;
  }
  mg_request_error(req, r == MG_ROUTE_NO_METHOD ? MG_HTTP_E_METHOD_NOT_ALLOWED
                                                : MG_HTTP_E_NOT_FOUND);
  return -1;
}

static void request_handler(mg_request_t *req) {
  const mg_route_conf_t *route = req->route;
  if (route->respond_status) {
    mg_buf_t hdrs;
    mg_buf_init(&hdrs);
    const char *ctype = NULL;
    for (size_t i = 0; i < route->nrespond_headers; i++) {
      const mg_header_conf_t *h = &route->respond_headers[i];
      if (mg_http_ieq(h->name, strlen(h->name), "content-type")) { ctype = h->value; continue; }
      mg_buf_printf(&hdrs, "%s: %s\r\n", h->name, h->value);
    }
    if (route->hooks & MG_HOOK_BIT(MG_HOOK_RESPONSE))
      mg_request_handler_answer(req, route->respond_status, ctype, route->respond_body,
                                route->respond_body_len, hdrs.data, hdrs.len);
    else
      mg_request_respond(req, route->respond_status, ctype, route->respond_body,
                         route->respond_body_len, hdrs.data, hdrs.len);
    mg_buf_dispose(&hdrs);
    return;
  }
  mg_upstream_t *up = mg_gen_upstream(req->gen, route->upstream);
  if (!up) {
    mg_log_error("route %s: upstream %s is missing", route->spec, route->upstream);
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  mg_proxy_start(req, up);
}

/* Runs the phases from req->phase on. The body and response phases are driven by the
 * handler; a phase that must wait returns here and is resumed by calling request_run. */
static void request_run(mg_request_t *req) {
  for (;;) {
    switch (req->phase) {
      case MG_PHASE_REQUEST:
        if (req->listener->conf->admin) {    /* the admin API: no routes, no hooks */
          req->phase = MG_PHASE_RESPONSE;
          mg_admin_handle(req);
          return;
        }
        /* Global `request` hooks (they may change the path), then the route is picked. */
        if (req->gen->cfg.has_request_hooks && !req->request_hooks_ran) {
          req->request_hooks_ran = 1;
          mg_hooks_run(req, MG_HOOK_REQUEST);  /* goes on with mg_request_continue */
          return;
        }
        req->phase = MG_PHASE_ACCESS;
        if (request_route(req) != 0) return;
        break;
      case MG_PHASE_ACCESS:
        req->phase = MG_PHASE_HANDLER;
        if (req->route->hooks & MG_HOOK_BIT(MG_HOOK_ACCESS)) {
          mg_hooks_run(req, MG_HOOK_ACCESS);
          return;
        }
        break;
      case MG_PHASE_HANDLER:
        req->phase = MG_PHASE_RESPONSE;
        if (req->route->hooks & MG_HOOK_BIT(MG_HOOK_HANDLER)) {
          mg_hooks_run(req, MG_HOOK_HANDLER);
          return;
        }
        request_handler(req);
        return;
      default:
        return;
    }
  }
}

void mg_request_continue(mg_request_t *req) { request_run(req); }

/* A Lua handler's answer going through the response hooks. */
typedef struct handler_answer {
  mg_hook_response_t resp;
  mg_buf_t lines;                 /* "Name: value\r\n" */
  mg_buf_t body;
  mg_header_t headers[MG_MAX_ANSWER_HEADERS];
} handler_answer_t;

static void handler_answer_abort(mg_request_t *req) {
  handler_answer_t *a = req->handler;
  req->handler = NULL;
  mg_buf_dispose(&a->lines);
  mg_buf_dispose(&a->body);
  free(a);
}

static void handler_answer_done(mg_request_t *req) {
  handler_answer_t *a = req->handler;
  req->handler = NULL;
  req->on_abort = NULL;
  mg_buf_t head;
  mg_buf_init(&head);
  int status = mg_hooks_response_head(req, &head);
  const char *body = a->body.data ? a->body.data : "";
  size_t len = a->body.len;
  mg_hooks_response_body(req, &body, &len);
  mg_buf_t filtered;
  mg_buf_init(&filtered);
  if (mg_hooks_has_filters(req)) {
    if (mg_hooks_filter(req, body, len, 1, &filtered) == 0) {
      body = filtered.data ? filtered.data : "";
      len = filtered.len;
    } else {
      status = 0;
    }
  }
  if (status) mg_request_respond(req, status, NULL, body, len, head.data, head.len);
  else mg_request_error(req, MG_HTTP_E_SCRIPT_ERROR);
  mg_buf_dispose(&filtered);
  mg_buf_dispose(&head);
  mg_buf_dispose(&a->lines);
  mg_buf_dispose(&a->body);
  free(a);
}

void mg_request_handler_answer(mg_request_t *req, int status, const char *content_type,
                               const char *body, size_t body_len, const char *headers,
                               size_t headers_len) {
  handler_answer_t *a = calloc(1, sizeof *a);
  if (!a) {
    mg_request_error(req, MG_HTTP_E_INTERNAL);
    return;
  }
  if (content_type) mg_buf_printf(&a->lines, "Content-Type: %s\r\n", content_type);
  mg_buf_append(&a->lines, headers, headers_len);
  mg_buf_append(&a->body, body, body_len);
  /* Split the lines (checked when they were made) into name/value pairs. */
  size_t n = 0;
  const char *s = a->lines.data, *end = s ? s + a->lines.len : NULL;
  while (s && s < end && n < MG_MAX_ANSWER_HEADERS) {
    const char *eol = memchr(s, '\r', (size_t)(end - s));
    const char *colon = memchr(s, ':', (size_t)(end - s));
    if (!eol || !colon || colon > eol) break;
    a->headers[n].name = s;
    a->headers[n].name_len = (size_t)(colon - s);
    a->headers[n].value = colon + 2;
    a->headers[n].value_len = (size_t)(eol - colon - 2);
    n++;
    s = eol + 2;
  }
  a->resp.status = status;
  a->resp.headers = a->headers;
  a->resp.nheaders = n;
  a->resp.body = a->body.data ? a->body.data : "";
  a->resp.body_len = a->body.len;
  a->resp.done = handler_answer_done;
  req->handler = a;
  req->on_abort = handler_answer_abort;
  mg_hooks_run_response(req, &a->resp);
}

void mg_request_start(mg_request_t *req) {
  req->phase = MG_PHASE_REQUEST;
  req->gen = mg_gen_hold(req->w->gen);
  request_run(req);
}

/* ------------------------------------------------------------------------------------------
 * LOG phase: the access-log line.
 * ---------------------------------------------------------------------------------------- */

void mg_request_log(mg_request_t *req) {
  req->phase = MG_PHASE_LOG;
  mg_hooks_run_log(req);                     /* on their own task: the client is not held */
  if (!mg_access_log_enabled()) {
    req->phase = MG_PHASE_DONE;
    return;
  }
  mg_access_entry_t e;
  memset(&e, 0, sizeof e);
  mg_conn_t *c = req->conn;
  e.time = req->start_wall;
  char client[64];
  int n = snprintf(client, sizeof client, strchr(c->client_ip, ':') ? "[%s]:%u" : "%s:%u",
                   c->client_ip, c->client_port);
  e.client = client;
  e.client_len = n > 0 ? (size_t)n : 0;
  if (req->headers) {
    e.method = req->method_name;
    e.method_len = req->method_len;
    e.target = req->target;
    e.target_len = req->target_len;
    for (size_t i = 0; i < req->nheaders; i++) {
      const mg_header_t *h = &req->headers[i];
      if (h->id == MG_HDR_USER_AGENT && !e.user_agent) {
        e.user_agent = h->value;
        e.user_agent_len = h->value_len;
      } else if (h->id == MG_HDR_AUTHORIZATION || h->id == MG_HDR_PROXY_AUTHORIZATION) {
        e.authorization_present = 1;
      } else if (h->id == MG_HDR_COOKIE) {
        e.cookie_present = 1;
      }
    }
  } else if (req->url_bytes && req->head.len >= req->url_bytes) {
    e.target = req->head.data;
    e.target_len = req->url_bytes;
  }
  if (req->route) {
    const char *name = req->route->name ? req->route->name : req->route->spec;
    e.route = name;
    e.route_len = name ? strlen(name) : 0;
  }
  e.status = req->status;
  e.bytes_in = req->bytes_in;
  e.bytes_out = req->bytes_out;
  if (req->upstream_name) {
    e.upstream = req->upstream_name;
    e.upstream_len = strlen(req->upstream_name);
  }
  e.upstream_time = req->upstream_time;
  e.total_time = (double)(uv_hrtime() - req->start_ns) / 1e9;
  e.request_id = req->id;
  e.request_id_len = strlen(req->id);
  mg_access_log_write(&e);
  req->phase = MG_PHASE_DONE;
}
