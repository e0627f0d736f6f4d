/* test_fetch: the HTTP client (mg_fetch) and mg.fetch / mg.fetch_all (mg_lua_fetch) on a real
 * libuv loop against a scripted upstream server on 127.0.0.1 that runs in the same loop. The
 * server answers by path: fixed responses, slow ones, cut ones, malformed ones; it counts
 * accepted connections, requests and closed connections, and keeps the last request's raw
 * bytes. The Lua side runs as a task (mg_task) in a sandboxed VM, as hooks will: each Lua test
 * is the body of a function that returns one string, which the test compares. Every test
 * builds a fresh worker, generation, server and VM and ends by closing the loop, which must
 * have no handle left (and LeakSanitizer sees the rest). Every wait is bounded. */
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "mg_buf.h"
#include "mg_fetch.h"
#include "mg_gen.h"
#include "mg_log.h"
#include "mg_lua_fetch.h"
#include "mg_task.h"
#include "mg_test.h"
#include "mg_upstream.h"
#include "mg_worker.h"

/* ------------------------------------------------------------------------------------------
 * The scripted upstream server.
 * ---------------------------------------------------------------------------------------- */

typedef struct sconn sconn_t;

typedef struct server {
  uv_tcp_t tcp;
  int port;
  int accepts;                    /* connections accepted */
  int requests;                   /* requests read */
  int closed;                     /* connections that ended (either side closed) */
  sconn_t *conns;
  mg_buf_t last;                  /* the last request, head and body */
} server_t;

struct sconn {
  uv_tcp_t tcp;
  uv_timer_t timer;               /* a delayed answer */
  sconn_t *next;
  server_t *s;
  mg_buf_t in;
  int nreq;                       /* requests on this connection */
  int closing;
  int handles;
  char *delayed;                  /* the delayed answer */
  size_t delayed_len;
};

typedef struct swrite {
  uv_write_t req;
  sconn_t *c;
  int close_after;
  char data[];
} swrite_t;

static server_t srv;

static void on_sconn_closed(uv_handle_t *h) {
  sconn_t *c = h->data;
  if (--c->handles) return;
  mg_buf_dispose(&c->in);
  free(c->delayed);
  free(c);
}

static void sconn_close(sconn_t *c) {
  if (c->closing) return;
  c->closing = 1;
  c->s->closed++;
  for (sconn_t **p = &c->s->conns; *p; p = &(*p)->next)
    if (*p == c) {
      *p = c->next;
      break;
    }
  uv_close((uv_handle_t *)&c->timer, on_sconn_closed);
  uv_close((uv_handle_t *)&c->tcp, on_sconn_closed);
}

static void on_swrite(uv_write_t *wr, int status) {
  swrite_t *w = (swrite_t *)wr;
  if (w->close_after) sconn_close(w->c);
  free(w);
}

static void ssend(sconn_t *c, const char *data, size_t len, int close_after) {
  if (c->closing) return;
  swrite_t *w = malloc(sizeof *w + len);
  memcpy(w->data, data, len);
  w->c = c;
  w->close_after = close_after;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_swrite) != 0) {
    free(w);
    sconn_close(c);
  }
}

static void ssend_str(sconn_t *c, const char *s, int close_after) {
  ssend(c, s, strlen(s), close_after);
}

static void on_delay(uv_timer_t *t) {
  sconn_t *c = t->data;
  ssend(c, c->delayed, c->delayed_len, 0);
  free(c->delayed);
  c->delayed = NULL;
}

/* Answers with a 200 and BODY after MS milliseconds. */
static void answer_later(sconn_t *c, const char *body, unsigned ms) {
  char buf[256];
  int n = snprintf(buf, sizeof buf, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(body), body);
  c->delayed = malloc((size_t)n);
  memcpy(c->delayed, buf, (size_t)n);
  c->delayed_len = (size_t)n;
  uv_timer_start(&c->timer, on_delay, ms, 0);
}

static void answer(sconn_t *c, const char *ctype, const char *body, size_t blen) {
  char head[256];
  snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %zu\r\n\r\n",
           ctype, blen);
  mg_buf_t b;
  mg_buf_init(&b);
  mg_buf_puts(&b, head);
  mg_buf_append(&b, body, blen);
  ssend(c, b.data, b.len, 0);
  mg_buf_dispose(&b);
}

/* One complete request (head + body, REQ_LEN bytes, path P of PLEN bytes) arrived on C. */
static void handle(sconn_t *c, const char *req, size_t req_len, const char *p, size_t plen) {
  server_t *s = c->s;
  s->requests++;
  c->nreq++;
  s->last.len = 0;
  mg_buf_append(&s->last, req, req_len);
  mg_buf_append(&s->last, "", 1);
  s->last.len--;
  size_t q = 0;
  while (q < plen && p[q] != '?') q++;
#define IS(x) (q == strlen(x) && memcmp(p, x, q) == 0)
  if (IS("/hello")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Test: a\r\nX-Test: b\r\n"
                 "Content-Length: 11\r\n\r\nhello world", 0);
  } else if (IS("/echo")) {
    answer(c, "text/plain", req, req_len);
  } else if (IS("/json")) {
    answer(c, "application/json", "{\"a\":1,\"list\":[1,2,3],\"n\":null}", 31);
  } else if (IS("/notjson")) {
    answer(c, "text/html", "<html>", 6);
  } else if (IS("/slow")) {
    answer_later(c, "slow", 1000);
  } else if (IS("/close")) {
    sconn_close(c);
  } else if (IS("/bad")) {
    ssend_str(c, "HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", 0);
  } else if (IS("/extra")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", 0);
  } else if (IS("/fold")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok", 0);
  } else if (IS("/gzip")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 0);
  } else if (IS("/big")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Length: 9000000\r\n\r\nxxxxxxxx", 0);
  } else if (IS("/bigchunked")) {
    char chunk[1100];
    int n = snprintf(chunk, sizeof chunk, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    ssend(c, chunk, (size_t)n, 0);
    for (int i = 0; i < 3; i++) {             /* 3 x 500 bytes */
      n = snprintf(chunk, sizeof chunk, "1f4\r\n%0500d\r\n", 0);
      ssend(c, chunk, (size_t)n, 0);
    }
    ssend_str(c, "0\r\n\r\n", 0);
  } else if (IS("/chunked")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", 0);
  } else if (IS("/eof")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\n\r\nuntil close", 1);
  } else if (IS("/cut")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", 1);
  } else if (IS("/interim")) {
    ssend_str(c, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0);
  } else if (IS("/204")) {
    ssend_str(c, "HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", 0);
  } else if (IS("/head")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 0);
  } else if (IS("/conn-close")) {
    ssend_str(c, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 1);
  } else if (IS("/flaky")) {
    /* Answers the first request of a connection; drops the connection on the next one,
     * as an upstream does that closed an idle keep-alive connection just as it was reused. */
    if (c->nreq > 1) sconn_close(c);
    else ssend_str(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh", 0);
  } else if (IS("/status")) {
    ssend_str(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\nmissing", 0);
  } else {
    ssend_str(c, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", 0);
  }
#undef IS
}

/* Handles every complete request in C's input. */
static void sconn_parse(sconn_t *c) {
  for (;;) {
    mg_buf_t *in = &c->in;
    if (c->closing || in->len == 0) return;
    const char *end = memmem(in->data, in->len, "\r\n\r\n", 4);
    if (!end) return;
    size_t head_len = (size_t)(end - in->data) + 4;
    size_t body_len = 0;
    for (const char *h = in->data; h && h < end; h = memchr(h, '\n', (size_t)(end - h))) {
      h++;
      if (strncasecmp(h, "content-length:", 15) == 0) body_len = strtoul(h + 15, NULL, 10);
    }
    if (in->len < head_len + body_len) return;
    const char *p = memchr(in->data, ' ', head_len);
    const char *pe = p ? memchr(p + 1, ' ', head_len - (size_t)(p + 1 - in->data)) : NULL;
    if (!p || !pe) {
      sconn_close(c);
      return;
    }
    size_t poff = (size_t)(p + 1 - in->data), plen = (size_t)(pe - p - 1);
    size_t total = head_len + body_len;
    char *req = malloc(total);
    memcpy(req, in->data, total);
    mg_buf_consume(in, total);
    handle(c, req, total, req + poff, plen);
    free(req);
  }
}

static void on_salloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  static char buf[65536];
  b->base = buf;
  b->len = sizeof buf;
}

static void on_sread(uv_stream_t *st, ssize_t nread, const uv_buf_t *b) {
  sconn_t *c = st->data;
  if (nread < 0) {
    sconn_close(c);
    return;
  }
  mg_buf_append(&c->in, b->base, (size_t)nread);
  sconn_parse(c);
}

static void on_sconnection(uv_stream_t *l, int status) {
  server_t *s = l->data;
  if (status < 0) return;
  sconn_t *c = calloc(1, sizeof *c);
  c->s = s;
  uv_tcp_init(l->loop, &c->tcp);
  uv_timer_init(l->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles = 2;
  if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0) {
    c->closing = 1;
    uv_close((uv_handle_t *)&c->timer, on_sconn_closed);
    uv_close((uv_handle_t *)&c->tcp, on_sconn_closed);
    return;
  }
  s->accepts++;
  c->next = s->conns;
  s->conns = c;
  uv_read_start((uv_stream_t *)&c->tcp, on_salloc, on_sread);
}

/* A port on 127.0.0.1 where nothing listens (bound, then closed). */
static int dead_port(uv_loop_t *loop) {
  uv_tcp_t t;
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", 0, &a);
  uv_tcp_init(loop, &t);
  uv_tcp_bind(&t, (const struct sockaddr *)&a, 0);
  struct sockaddr_in got;
  int len = sizeof got;
  uv_tcp_getsockname(&t, (struct sockaddr *)&got, &len);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return ntohs(got.sin_port);
}

static void server_start(uv_loop_t *loop) {
  memset(&srv, 0, sizeof srv);
  struct sockaddr_in a;
  uv_ip4_addr("127.0.0.1", 0, &a);
  uv_tcp_init(loop, &srv.tcp);
  srv.tcp.data = &srv;
  uv_tcp_bind(&srv.tcp, (const struct sockaddr *)&a, 0);
  uv_listen((uv_stream_t *)&srv.tcp, 64, on_sconnection);
  struct sockaddr_in got;
  int len = sizeof got;
  uv_tcp_getsockname(&srv.tcp, (struct sockaddr *)&got, &len);
  srv.port = ntohs(got.sin_port);
}

static void server_stop(void) {
  while (srv.conns) sconn_close(srv.conns);
  if (!uv_is_closing((uv_handle_t *)&srv.tcp)) uv_close((uv_handle_t *)&srv.tcp, NULL);
  mg_buf_dispose(&srv.last);
}

/* ------------------------------------------------------------------------------------------
 * The worker, its generation and VM, built fresh for each test.
 * ---------------------------------------------------------------------------------------- */

static mg_worker_t *w;
static mg_gen_t *gen;
static mg_lua_vm_t *vm;
static int dport;                 /* a port where nothing listens */

static void add_upstream(mg_config_t *cfg, const char *name, const int *ports, size_t n,
                         int max_fails, double read_timeout) {
  mg_upstream_conf_t *u = &cfg->upstreams[cfg->nupstreams++];
  u->name = strdup(name);
  u->targets = calloc(n, sizeof *u->targets);
  u->ntargets = n;
  for (size_t i = 0; i < n; i++) {
    u->targets[i].host = strdup("127.0.0.1");
    u->targets[i].port = ports[i];
    u->targets[i].weight = 1;
  }
  u->connect_timeout = 5;
  u->send_timeout = 60;
  u->read_timeout = read_timeout;
  u->keepalive_max_idle = 32;
  u->keepalive_timeout = 60;
  u->keepalive_requests = 1000;
  u->max_fails = max_fails;
  u->fail_timeout = 10;
  u->dns_ttl = 30;
}

static void setup(void) {
  w = calloc(1, sizeof *w);
  uv_loop_init(&w->loop);
  w->loop.data = w;
  w->resolver = mg_resolver_new(&w->loop);
  server_start(&w->loop);
  dport = dead_port(&w->loop);
  mg_config_t cfg = {0};
  cfg.upstreams = calloc(8, sizeof *cfg.upstreams);
  add_upstream(&cfg, "backend", (int[]){srv.port}, 1, 0, 60);
  add_upstream(&cfg, "dead", (int[]){dport}, 1, 0, 60);
  add_upstream(&cfg, "fragile", (int[]){dport}, 1, 1, 60);
  add_upstream(&cfg, "pair", (int[]){dport, srv.port}, 2, 0, 60);
  add_upstream(&cfg, "short", (int[]){srv.port}, 1, 0, 0.15);
  char err[256] = "";
  gen = mg_gen_new(w, &cfg, 1, err, sizeof err);
  if (!gen) MG_FAIL("mg_gen_new: %s", err);
  w->gen = gen;
  vm = mg_lua_vm_new(0, err, sizeof err);
  if (!vm) MG_FAIL("mg_lua_vm_new: %s", err);
  MG_CHECK_INT(mg_lua_fetch_register(vm), 0);
  w->vm = vm;
}

/* The Lua run of the current test (see lua_start), kept here so teardown can cancel it. */
typedef struct lrun {
  mg_task_t t;
  mg_lua_run_t *run;
  int ended;                      /* the function returned or failed */
  int resumes;                    /* how often the task was woken */
  char out[8192];                 /* its string result, or "error: ..." */
} lrun_t;

static lrun_t cur;

/* Frees everything; returns uv_loop_close's answer (0: no handle was left open). */
static int teardown(void) {
  if (!w) return 0;
  if (cur.run) {
    mg_task_cancel(&cur.t);
    mg_lua_run_free(cur.run);
    cur.run = NULL;
  }
  mg_fetch_cache_free(w);
  w->gen = NULL;
  if (gen) mg_gen_release(gen);
  gen = NULL;
  server_stop();
  mg_resolver_free(w->resolver);
  if (vm) mg_lua_vm_free(vm);
  vm = NULL;
  for (int i = 0; i < 100 && uv_loop_alive(&w->loop); i++) uv_run(&w->loop, UV_RUN_NOWAIT);
  int rc = uv_loop_close(&w->loop);
  free(w);
  w = NULL;
  return rc;
}

/* Ends a test: everything must close cleanly. */
static void finish(void) { MG_CHECK_INT(teardown(), 0); }

/* Runs a test, then frees what a failed one left behind. */
#define RUN(fn)        \
  do {                 \
    MG_RUN(fn);        \
    teardown();        \
  } while (0)

static void on_guard(uv_timer_t *t) { *(int *)t->data = 1; }

/* Runs the loop until DONE(ARG) holds or MS milliseconds pass; returns whether it held. */
static int run_until(int (*done)(void *), void *arg, unsigned ms) {
  int expired = 0;
  uv_timer_t guard;
  uv_timer_init(&w->loop, &guard);
  guard.data = &expired;
  uv_timer_start(&guard, on_guard, ms, 0);
  while (!done(arg) && !expired) uv_run(&w->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&guard, NULL);
  uv_run(&w->loop, UV_RUN_NOWAIT);
  return done(arg);
}

static int never(void *arg) { return 0; }

typedef struct countwait {
  const int *counter;
  int value;
} countwait_t;

static int count_reached(void *a) {
  countwait_t *x = a;
  return *x->counter >= x->value;
}

/* Runs the loop until *COUNTER reaches VALUE (at most MS ms); returns whether it did. */
static int wait_count(const int *counter, int value, unsigned ms) {
  countwait_t x = {counter, value};
  return run_until(count_reached, &x, ms);
}

static double ms_since(uint64_t t0) { return (double)(uv_hrtime() - t0) / 1e6; }

/* ------------------------------------------------------------------------------------------
 * The C client.
 * ---------------------------------------------------------------------------------------- */

typedef struct got {
  int called;
  mg_fetch_t *f;
} got_t;

static void on_got(mg_fetch_t *f, void *data) {
  got_t *g = data;
  g->called++;
  g->f = f;
}

static int got_called(void *arg) { return ((got_t *)arg)->called > 0; }

/* Runs R against upstream UPNAME to the end; the callback must run once, from the loop. */
static mg_fetch_t *c_fetch(const char *upname, const mg_fetch_req_t *r) {
  got_t g = {0};
  mg_upstream_t *up = mg_gen_upstream(gen, upname);
  MG_CHECK(up != NULL);
  mg_fetch_t *f = mg_fetch_start(up, r, on_got, &g);
  MG_CHECK(f != NULL);
  MG_CHECK_INT(g.called, 0);                 /* never from inside the start */
  if (!run_until(got_called, &g, 5000)) {
    mg_fetch_cancel(f);
    MG_FAIL("no callback for %s %s", r->method ? r->method : "GET", r->path);
  }
  MG_CHECK_INT(g.called, 1);
  MG_CHECK(g.f == f);
  return f;
}

static mg_fetch_t *c_get(const char *upname, const char *path) {
  mg_fetch_req_t r = {.path = path};
  return c_fetch(upname, &r);
}

/* Fetches PATH from "backend" and checks the error it ends with (0: success). */
static void expect_error(const char *path, int err) {
  mg_fetch_t *f = c_get("backend", path);
  int got = mg_fetch_error(f);
  mg_fetch_free(f);
  if (got != err)
    MG_FAIL("%s: got \"%s\", expected \"%s\"", path, mg_fetch_strerror(got), mg_fetch_strerror(err));
}

static void check_body(mg_fetch_t *f, const char *want) {
  size_t len;
  const char *b = mg_fetch_body(f, &len);
  MG_CHECK_MEM(b, len, want);
}

static void test_c_get(void) {
  setup();
  mg_fetch_t *f = c_get("backend", "/hello");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  MG_CHECK_INT(mg_fetch_status(f), 200);
  check_body(f, "hello world");
  MG_CHECK_INT(mg_fetch_nheaders(f), 4);
  const char *n, *v;
  size_t nl, vl;
  mg_fetch_header(f, 1, &n, &nl, &v, &vl);
  MG_CHECK_MEM(n, nl, "X-Test");
  MG_CHECK_MEM(v, vl, "a");
  mg_fetch_header(f, 2, &n, &nl, &v, &vl);
  MG_CHECK_STR(v, "b");
  char target[64], want[256];
  snprintf(target, sizeof target, "127.0.0.1:%d", srv.port);
  MG_CHECK_STR(mg_fetch_target(f), target);
  MG_CHECK_INT(mg_fetch_reused(f), 0);
  mg_fetch_free(f);
  /* What went out: the request line, Host, User-Agent, nothing else for a bodiless GET. */
  snprintf(want, sizeof want, "GET /hello HTTP/1.1\r\nHost: %s\r\nUser-Agent: moongate\r\n\r\n",
           target);
  MG_CHECK_STR(srv.last.data, want);
  finish();
}

static void test_c_request_headers_and_body(void) {
  setup();
  const char *hs[] = {"X-A", " 1 ", "Host", "example.test", "User-Agent", "custom"};
  mg_fetch_req_t r = {.method = "POST", .path = "/echo?x=1", .headers = hs, .nheaders = 3,
                      .body = "abc", .body_len = 3};
  mg_fetch_t *f = c_fetch("backend", &r);
  MG_CHECK_INT(mg_fetch_error(f), 0);
  const char *want = "POST /echo?x=1 HTTP/1.1\r\nX-A: 1\r\nHost: example.test\r\n"
                     "User-Agent: custom\r\nContent-Length: 3\r\n\r\nabc";
  MG_CHECK_STR(srv.last.data, want);
  check_body(f, want);                       /* the echo came back whole */
  mg_fetch_free(f);
  /* A POST without a body still says so. */
  mg_fetch_req_t empty = {.method = "POST", .path = "/echo"};
  f = c_fetch("backend", &empty);
  MG_CHECK(strstr(srv.last.data, "\r\nContent-Length: 0\r\n\r\n") != NULL);
  mg_fetch_free(f);
  finish();
}

static void test_c_keepalive_reuse(void) {
  setup();
  mg_fetch_t *f = c_get("backend", "/hello");
  MG_CHECK_INT(mg_fetch_reused(f), 0);
  mg_fetch_free(f);
  f = c_get("backend", "/json");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  MG_CHECK_INT(mg_fetch_reused(f), 1);
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 1);
  MG_CHECK_INT(srv.requests, 2);
  MG_CHECK_INT(mg_gen_upstream(gen, "backend")->targets[0].nidle, 1);
  finish();
}

/* Responses that end their connection, or that the checklist keeps out of the pool. */
static void test_c_not_pooled(void) {
  setup();
  mg_fetch_t *f = c_get("backend", "/conn-close");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "ok");
  mg_fetch_free(f);
  f = c_get("backend", "/eof");              /* close-delimited */
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "until close");
  MG_CHECK_INT(mg_fetch_reused(f), 0);
  mg_fetch_free(f);
  f = c_get("backend", "/hello");
  MG_CHECK_INT(mg_fetch_reused(f), 0);
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 3);
  finish();
}

static void test_c_framings(void) {
  setup();
  mg_fetch_t *f = c_get("backend", "/chunked");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "hello world");
  MG_CHECK_INT(mg_fetch_nheaders(f), 1);     /* the trailer is dropped */
  mg_fetch_free(f);
  f = c_get("backend", "/interim");          /* a 100 before the answer */
  MG_CHECK_INT(mg_fetch_status(f), 200);
  check_body(f, "ok");
  MG_CHECK_INT(mg_fetch_nheaders(f), 1);
  mg_fetch_free(f);
  f = c_get("backend", "/204");
  MG_CHECK_INT(mg_fetch_status(f), 204);
  check_body(f, "");
  mg_fetch_free(f);
  mg_fetch_req_t head = {.method = "HEAD", .path = "/head"};
  f = c_fetch("backend", &head);             /* Content-Length without a body */
  MG_CHECK_INT(mg_fetch_error(f), 0);
  MG_CHECK_INT(mg_fetch_status(f), 200);
  check_body(f, "");
  mg_fetch_free(f);
  f = c_get("backend", "/status");           /* an error status is a response, not a failure */
  MG_CHECK_INT(mg_fetch_error(f), 0);
  MG_CHECK_INT(mg_fetch_status(f), 404);
  check_body(f, "missing");
  MG_CHECK_INT(mg_fetch_reused(f), 1);
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 1);              /* every one of them kept the connection */
  finish();
}

static void test_c_malformed(void) {
  setup();
  expect_error("/bad", MG_FETCH_E_MALFORMED);      /* status "2x0" */
  expect_error("/extra", MG_FETCH_E_MALFORMED);    /* bytes after the response */
  expect_error("/fold", MG_FETCH_E_MALFORMED);     /* obs-fold */
  expect_error("/gzip", MG_FETCH_E_MALFORMED);     /* a coding the client cannot undo */
  MG_CHECK(wait_count(&srv.closed, 4, 2000));      /* each connection was closed */
  MG_CHECK_INT(srv.accepts, 4);
  finish();
}

static void test_c_body_limit(void) {
  setup();
  expect_error("/big", MG_FETCH_E_TOO_LARGE);      /* Content-Length over the default 8 MiB */
  mg_fetch_req_t r = {.path = "/bigchunked", .max_body = 1000};
  mg_fetch_t *f = c_fetch("backend", &r);          /* chunked: caught while reading */
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_TOO_LARGE);
  size_t len;
  mg_fetch_body(f, &len);
  MG_CHECK_INT(len, 0);
  MG_CHECK_INT(mg_fetch_status(f), 0);
  mg_fetch_free(f);
  r.max_body = 1500;                               /* exactly at the limit */
  f = c_fetch("backend", &r);
  MG_CHECK_INT(mg_fetch_error(f), 0);
  mg_fetch_body(f, &len);
  MG_CHECK_INT(len, 1500);
  mg_fetch_free(f);
  finish();
}

static void test_c_timeout(void) {
  setup();
  uint64_t t0 = uv_hrtime();
  mg_fetch_req_t r = {.path = "/slow", .timeout_ms = 100};
  mg_fetch_t *f = c_fetch("backend", &r);
  double ms = ms_since(t0);
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_TIMEOUT);
  MG_CHECK_STR(mg_fetch_strerror(mg_fetch_error(f)), "timeout");
  MG_CHECK_INT(mg_fetch_timeout(f), 100);
  if (ms < 95 || ms > 800) MG_FAIL("timed out after %.0f ms", ms);
  mg_fetch_free(f);
  MG_CHECK(wait_count(&srv.closed, 1, 2000));      /* the connection is not kept */
  MG_CHECK_INT(mg_gen_upstream(gen, "backend")->targets[0].nidle, 0);
  /* Without a timeout of its own a call runs under the upstream's read_timeout. */
  f = c_get("short", "/slow");
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_TIMEOUT);
  MG_CHECK_INT(mg_fetch_timeout(f), 150);
  mg_fetch_free(f);
  finish();
}

static void test_c_connect_failures(void) {
  setup();
  mg_fetch_t *f = c_get("dead", "/x");
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_REFUSED);
  mg_fetch_free(f);
  /* max_fails = 1: the refusal ejects the only target. */
  f = c_get("fragile", "/x");
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_REFUSED);
  mg_fetch_free(f);
  f = c_get("fragile", "/x");
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_NO_TARGET);
  mg_fetch_free(f);
  /* Nothing was sent when a connect fails: the other target takes the call. */
  f = c_get("pair", "/hello");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "hello world");
  mg_fetch_free(f);
  mg_upstream_t *pair = mg_gen_upstream(gen, "pair");
  MG_CHECK_INT(pair->balancer.peers[0].fails, 1);
  MG_CHECK_INT(pair->balancer.peers[1].fails, 0);
  finish();
}

static void test_c_cut(void) {
  setup();
  expect_error("/cut", MG_FETCH_E_CLOSED);          /* Content-Length 10, 5 bytes, EOF */
  expect_error("/close", MG_FETCH_E_CLOSED);        /* no answer at all */
  MG_CHECK_INT(srv.accepts, 2);
  finish();
}

/* A pooled connection the upstream drops as it is reused: GET is retried once on a fresh
 * connection; POST is not (it may have been processed). */
static void test_c_retry_stale_connection(void) {
  setup();
  expect_error("/flaky", 0);
  mg_fetch_t *f = c_get("backend", "/flaky");
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "fresh");
  MG_CHECK_INT(mg_fetch_reused(f), 0);       /* answered on the fresh connection */
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 2);
  MG_CHECK_INT(srv.requests, 3);
  mg_fetch_req_t post = {.method = "POST", .path = "/flaky"};
  f = c_fetch("backend", &post);             /* reuses the fresh one, which drops it */
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_CLOSED);
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 2);
  finish();
}

static void test_c_cancel(void) {
  setup();
  got_t g = {0};
  mg_fetch_req_t r = {.path = "/slow"};
  mg_upstream_t *up = mg_gen_upstream(gen, "backend");
  /* In flight: the request reached the server, no answer yet. */
  mg_fetch_t *f = mg_fetch_start(up, &r, on_got, &g);
  MG_CHECK(wait_count(&srv.requests, 1, 2000));
  mg_fetch_cancel(f);
  MG_CHECK(wait_count(&srv.closed, 1, 2000));      /* closed, not pooled */
  MG_CHECK_INT(up->targets[0].nidle, 0);
  /* Still connecting. */
  f = mg_fetch_start(up, &r, on_got, &g);
  mg_fetch_cancel(f);
  /* A failure known at the start, delivered from the loop: cancelled before it is. */
  mg_fetch_req_t bad = {.path = "no-slash"};
  f = mg_fetch_start(up, &bad, on_got, &g);
  mg_fetch_cancel(f);
  run_until(never, NULL, 100);
  MG_CHECK_INT(g.called, 0);
  MG_CHECK_INT(srv.requests, 1);
  finish();
}

static void test_c_invalid_requests(void) {
  setup();
  char err[160];
  mg_fetch_req_t ok = {.method = "PATCH", .path = "/a/b?c=d"};
  MG_CHECK_INT(mg_fetch_check_req(&ok, err, sizeof err), 0);
  mg_fetch_req_t r = {.method = "G T"};
  MG_CHECK_INT(mg_fetch_check_req(&r, err, sizeof err), -1);
  MG_CHECK_STR(err, "invalid method \"G T\"");
  r = (mg_fetch_req_t){.path = "x"};
  mg_fetch_check_req(&r, err, sizeof err);
  MG_CHECK_STR(err, "the path must start with '/'");
  r = (mg_fetch_req_t){.path = "/a b"};
  mg_fetch_check_req(&r, err, sizeof err);
  MG_CHECK_STR(err, "invalid byte 0x20 in the path (encode it)");
  const char *h1[] = {"Bad Name", "v"};
  r = (mg_fetch_req_t){.headers = h1, .nheaders = 1};
  mg_fetch_check_req(&r, err, sizeof err);
  MG_CHECK_STR(err, "invalid header name \"Bad Name\"");
  const char *h2[] = {"X-Ok", "a\r\nInjected: 1"};
  r = (mg_fetch_req_t){.headers = h2, .nheaders = 1};
  mg_fetch_check_req(&r, err, sizeof err);
  MG_CHECK_STR(err, "the value of header \"X-Ok\" contains CR or LF");
  const char *h3[] = {"transfer-encoding", "chunked"};
  r = (mg_fetch_req_t){.headers = h3, .nheaders = 1};
  mg_fetch_check_req(&r, err, sizeof err);
  MG_CHECK_STR(err, "header \"transfer-encoding\" is set by the client itself");
  const char *h4[] = {"Content-Length", "5"};
  r = (mg_fetch_req_t){.headers = h4, .nheaders = 1};
  MG_CHECK_INT(mg_fetch_check_req(&r, err, sizeof err), -1);
  /* Started anyway: fails from the loop, nothing is sent. */
  mg_fetch_t *f = c_fetch("backend", &r);
  MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_INVALID);
  MG_CHECK_STR(mg_fetch_target(f), "");
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 0);
  finish();
}

static void test_c_parse_url(void) {
  char host[64];
  int port;
  const char *path;
  size_t plen;
  MG_CHECK_INT(mg_fetch_parse_url("http://Example.COM/a?b#frag", host, sizeof host, &port,
                                  &path, &plen), 0);
  MG_CHECK_STR(host, "example.com");
  MG_CHECK_INT(port, 80);
  MG_CHECK_MEM(path, plen, "/a?b");
  MG_CHECK_INT(mg_fetch_parse_url("HTTP://10.0.0.1:8080", host, sizeof host, &port, &path,
                                  &plen), 0);
  MG_CHECK_STR(host, "10.0.0.1");
  MG_CHECK_INT(port, 8080);
  MG_CHECK_INT(plen, 0);
  MG_CHECK_INT(mg_fetch_parse_url("http://[::1]:81?q", host, sizeof host, &port, &path, &plen), 0);
  MG_CHECK_STR(host, "::1");
  MG_CHECK_INT(port, 81);
  MG_CHECK_MEM(path, plen, "?q");
  MG_CHECK_INT(mg_fetch_parse_url("https://x/", host, sizeof host, &port, &path, &plen),
               MG_FETCH_E_HTTPS);
  const char *bad[] = {"ftp://x/", "http://", "http://:80/", "http://u@x/", "http://x:0/",
                       "http://x:65536/", "http://x:8a/", "http://[::1/", "http://a b/", NULL};
  for (size_t i = 0; bad[i]; i++)
    if (mg_fetch_parse_url(bad[i], host, sizeof host, &port, &path, &plen) != MG_FETCH_E_BAD_URL)
      MG_FAIL("accepted %s", bad[i]);
  char tiny[4];
  MG_CHECK_INT(mg_fetch_parse_url("http://toolong/", tiny, sizeof tiny, &port, &path, &plen),
               MG_FETCH_E_BAD_URL);
  MG_CHECK_STR(mg_fetch_strerror(MG_FETCH_E_HTTPS), "https is not supported yet");
  MG_CHECK_STR(mg_fetch_strerror(0), "ok");
  MG_CHECK_STR(mg_fetch_strerror(-1), "unknown error");
}

static void test_c_url_targets(void) {
  setup();
  got_t g = {0};
  mg_fetch_req_t r = {.path = "/hello"};
  mg_fetch_t *f = mg_fetch_start_url(w, "127.0.0.1", srv.port, &r, on_got, &g);
  MG_CHECK(run_until(got_called, &g, 5000));
  MG_CHECK_INT(mg_fetch_error(f), 0);
  check_body(f, "hello world");
  mg_fetch_free(f);
  /* The second call to the same host:port reuses the cached upstream and its pool. */
  g.called = 0;
  f = mg_fetch_start_url(w, "127.0.0.1", srv.port, &r, on_got, &g);
  MG_CHECK(run_until(got_called, &g, 5000));
  MG_CHECK_INT(mg_fetch_reused(f), 1);
  mg_fetch_free(f);
  MG_CHECK_INT(srv.accepts, 1);
  /* A URL target is never ejected: refused stays refused. */
  for (int i = 0; i < 4; i++) {
    g.called = 0;
    f = mg_fetch_start_url(w, "127.0.0.1", dport, &r, on_got, &g);
    MG_CHECK(run_until(got_called, &g, 5000));
    MG_CHECK_INT(mg_fetch_error(f), MG_FETCH_E_REFUSED);
    mg_fetch_free(f);
  }
  /* Freeing the cache while a fetch holds its upstream: the fetch finishes first. */
  g.called = 0;
  f = mg_fetch_start_url(w, "127.0.0.1", srv.port, &r, on_got, &g);
  mg_fetch_cache_free(w);
  MG_CHECK(run_until(got_called, &g, 5000));
  MG_CHECK_INT(mg_fetch_error(f), 0);
  mg_fetch_free(f);
  finish();
}

/* More URL targets than the cache holds, all in flight at once: entries evicted while a
 * fetch still uses them are freed by that fetch (127.0.0.2 and up refuse: the server listens
 * on 127.0.0.1 only). */
static void test_c_url_cache_eviction(void) {
  setup();
  enum { N = 40 };
  got_t g[N];
  mg_fetch_t *f[N];
  memset(g, 0, sizeof g);
  mg_fetch_req_t r = {.path = "/"};
  for (int i = 0; i < N; i++) {
    char host[32];
    snprintf(host, sizeof host, "127.0.0.%d", i + 2);
    f[i] = mg_fetch_start_url(w, host, srv.port, &r, on_got, &g[i]);
    MG_CHECK(f[i] != NULL);
  }
  for (int i = 0; i < N; i++) {
    MG_CHECK(run_until(got_called, &g[i], 5000));
    MG_CHECK_INT(mg_fetch_error(f[i]), MG_FETCH_E_REFUSED);
    char name[32];
    snprintf(name, sizeof name, "127.0.0.%d:%d", i + 2, srv.port);
    MG_CHECK_STR(mg_fetch_target(f[i]), name);
  }
  for (int i = 0; i < N; i++) mg_fetch_free(f[i]);
  /* And once more, now that the evicted entries are gone. */
  g[0].called = 0;
  f[0] = mg_fetch_start_url(w, "127.0.0.2", srv.port, &r, on_got, &g[0]);
  MG_CHECK(run_until(got_called, &g[0], 5000));
  MG_CHECK_INT(mg_fetch_error(f[0]), MG_FETCH_E_REFUSED);
  mg_fetch_free(f[0]);
  finish();
}

/* ------------------------------------------------------------------------------------------
 * The Lua API, driven through a task as hooks will drive it.
 * ---------------------------------------------------------------------------------------- */

static void record(lrun_t *r, mg_lua_status_t st) {
  lua_State *co = mg_lua_run_thread(r->run);
  r->ended = 1;
  if (st == MG_LUA_DONE) {
    size_t n = 0;
    const char *s = lua_gettop(co) >= 1 ? lua_tolstring(co, 1, &n) : NULL;
    if (s) snprintf(r->out, sizeof r->out, "%.*s", (int)n, s);
    else snprintf(r->out, sizeof r->out, "(no string returned)");
  } else if (st == MG_LUA_ERROR) {
    snprintf(r->out, sizeof r->out, "error: %s", mg_lua_run_error(r->run));
  } else {
    snprintf(r->out, sizeof r->out, "yielded, not for I/O");
  }
}

static void on_resumed(mg_task_t *t, mg_lua_status_t st) {
  lrun_t *r = t->data;
  r->resumes++;
  if (st == MG_LUA_YIELD && t->op) return;   /* waiting again */
  record(r, st);
}

/* Starts BODY (the body of a Lua function, one line: errors read "t:1: ...") as a task
 * running hook HOOK; ENTER = 0 runs it with no current task. */
static void lua_start_hook(const char *body, int hook, int enter) {
  char code[8192], err[256];
  snprintf(code, sizeof code, "return function() %s end", body);
  int ref = mg_lua_vm_load(vm, "t", code, strlen(code), err, sizeof err);
  if (ref < 0) MG_FAIL("load: %s", err);
  memset(&cur, 0, sizeof cur);
  cur.run = mg_lua_run_new(vm);
  MG_CHECK(cur.run != NULL);
  MG_CHECK_INT(mg_lua_run_push_ref(cur.run, ref, NULL), 0);
  mg_lua_vm_unref(vm, ref);
  cur.t = (mg_task_t){.run = cur.run, .w = w, .gen = gen, .hook = hook,
                      .resumed = on_resumed, .data = &cur};
  mg_task_t *prev = mg_task_enter(enter ? &cur.t : NULL);
  mg_lua_status_t st = mg_lua_vm_resume(cur.run, 0);
  mg_task_enter(prev);
  lua_State *co = mg_lua_run_thread(cur.run);
  if (st == MG_LUA_YIELD && mg_task_is_io_yield(co, lua_gettop(co))) return;
  record(&cur, st);
}

static void lua_start(const char *body) { lua_start_hook(body, MG_HOOK_HANDLER, 1); }

static int lua_ended(void *arg) { return cur.ended; }

/* Waits for the current run to end and frees it; returns its result (a static copy). */
static const char *lua_finish(void) {
  static char out[8192];
  int ok = run_until(lua_ended, NULL, 5000);
  if (!ok) MG_FAIL("the Lua run did not end");
  memcpy(out, cur.out, sizeof out);
  mg_lua_run_free(cur.run);
  cur.run = NULL;
  return out;
}

/* Runs BODY to its end; returns its string result or "error: ...". */
static const char *lua(const char *body) {
  lua_start(body);
  return lua_finish();
}

/* Formats BODY (a printf format) and runs it. */
__attribute__((format(printf, 1, 2)))
static const char *luaf(const char *fmt, ...) {
  char body[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(body, sizeof body, fmt, ap);
  va_end(ap);
  return lua(body);
}

static void test_lua_get(void) {
  setup();
  MG_CHECK_STR(lua("local r = mg.fetch('backend', '/hello')"
                   " return r.status .. '|' .. r.headers['x-test'] .. '|' .."
                   " r.headers['content-type'] .. '|' .. r.headers['content-length'] .. '|' .."
                   " tostring(r.headers['X-Test']) .. '|' .. r.body"),
               "200|a, b|text/plain|11|nil|hello world");
  /* An error status is a response; no path at all means "/". */
  MG_CHECK_STR(lua("local r, e = mg.fetch('backend', '/status')"
                   " return r.status .. ' ' .. r.body .. ' ' .. tostring(e)"),
               "404 missing nil");
  MG_CHECK_STR(lua("local r = mg.fetch('backend') return r.status"), "500");
  MG_CHECK(strstr(srv.last.data, "GET / HTTP/1.1\r\n") == srv.last.data);
  finish();
}

static void test_lua_request_options(void) {
  setup();
  MG_CHECK_STR(lua("local r = mg.fetch('backend', { path = '/echo?x=1', method = 'put',"
                   " headers = { ['X-Custom'] = 'v', ['X-Num'] = 42, Host = 'api.test' },"
                   " query = { b = 'x y&z', a = 1, ok = true }, body = 'raw' })"
                   " return r.status .. ''"),
               "200");
  const char *req = srv.last.data;
  MG_CHECK(strstr(req, "PUT /echo?x=1&a=1&b=x%20y%26z&ok=true HTTP/1.1\r\n") == req);
  MG_CHECK(strstr(req, "\r\nX-Custom: v\r\n") != NULL);
  MG_CHECK(strstr(req, "\r\nX-Num: 42\r\n") != NULL);
  MG_CHECK(strstr(req, "\r\nHost: api.test\r\n") != NULL);
  MG_CHECK(strstr(req, "\r\nHost: 127.0.0.1") == NULL);
  MG_CHECK(strstr(req, "\r\nUser-Agent: moongate\r\n") != NULL);
  MG_CHECK(strstr(req, "\r\nContent-Length: 3\r\n\r\nraw") != NULL);
  /* Without Host among the headers, Host is the target's host:port. */
  lua("return mg.fetch('backend', { path = '/echo', query = {} }).status .. ''");
  char host[64];
  snprintf(host, sizeof host, "\r\nHost: 127.0.0.1:%d\r\n", srv.port);
  MG_CHECK(strstr(srv.last.data, "GET /echo HTTP/1.1\r\n") == srv.last.data);
  MG_CHECK(strstr(srv.last.data, host) != NULL);
  finish();
}

static void test_lua_post_json(void) {
  setup();
  MG_CHECK_STR(lua("local r = mg.fetch('backend', { path = '/echo', method = 'POST',"
                   " body = { items = { 1, 'two', mg.json.null, mg.json.array() } } })"
                   " return r.body:match('\\r\\n\\r\\n(.*)$')"),
               "{\"items\":[1,\"two\",null,[]]}");
  MG_CHECK(strstr(srv.last.data, "POST /echo HTTP/1.1\r\n") == srv.last.data);
  MG_CHECK(strstr(srv.last.data, "\r\nContent-Type: application/json\r\n") != NULL);
  MG_CHECK(strstr(srv.last.data, "\r\nContent-Length: 27\r\n") != NULL);
  /* A Content-Type of the caller's own is kept. */
  lua("return mg.fetch('backend', { path = '/echo', method = 'POST', body = { 1, 2 },"
      " headers = { ['content-type'] = 'application/vnd.x+json' } }).status .. ''");
  MG_CHECK(strstr(srv.last.data, "\r\ncontent-type: application/vnd.x+json\r\n") != NULL);
  MG_CHECK(strstr(srv.last.data, "application/json") == NULL);
  MG_CHECK(strstr(srv.last.data, "\r\n\r\n[1,2]") != NULL);
  finish();
}

static void test_lua_json(void) {
  setup();
  MG_CHECK_STR(lua("local r = mg.fetch('backend', '/json')"
                   " local j = r.json"
                   " return j.a .. ' ' .. #j.list .. ' ' .. j.list[3] .. ' ' .."
                   " tostring(j.n == mg.json.null) .. ' ' .. tostring(r.json_error) .. ' ' .."
                   " tostring(rawequal(r.json, j))"),
               "1 3 3 true nil true");
  /* json_error first also decodes. */
  MG_CHECK_STR(lua("local r = mg.fetch('backend', '/json')"
                   " return tostring(r.json_error) .. ' ' .. r.json.a"),
               "nil 1");
  MG_CHECK_STR(lua("local r = mg.fetch('backend', '/notjson')"
                   " return tostring(r.json) .. ' | ' .. r.json_error .. ' | ' .. tostring(r.json)"),
               "nil | parse error at byte 1: invalid char in json text. | nil");
  /* A field the response lacks is plain nil. */
  MG_CHECK_STR(lua("local r = mg.fetch('backend', '/json') return tostring(r.other)"), "nil");
  finish();
}

static void test_lua_keepalive(void) {
  setup();
  MG_CHECK_STR(lua("local a = mg.fetch('backend', '/hello') local b = mg.fetch('backend', '/json')"
                   " local c = mg.fetch('backend', '/hello')"
                   " return a.status .. b.status .. c.status"),
               "200200200");
  MG_CHECK_INT(srv.accepts, 1);
  MG_CHECK_INT(srv.requests, 3);
  finish();
}

static void test_lua_failures(void) {
  setup();
  MG_CHECK_STR(lua("local r, e = mg.fetch('backend', { path = '/slow', timeout = 0.1 })"
                   " return tostring(r) .. ' ' .. e"),
               "nil backend: timeout after 0.1s");
  MG_CHECK_STR(lua("local r, e = mg.fetch('short', '/slow') return e"),
               "short: timeout after 0.15s");
  MG_CHECK_STR(lua("local r, e = mg.fetch('dead', '/x') return tostring(r) .. ' ' .. e"),
               "nil dead: connection refused");
  MG_CHECK_STR(lua("local r, e = mg.fetch('backend', '/bad') return e"),
               "backend: malformed response");
  MG_CHECK_STR(lua("local r, e = mg.fetch('backend', '/big') return e"),
               "backend: response body too large");
  MG_CHECK_STR(lua("local r, e = mg.fetch('backend', '/cut') return e"),
               "backend: connection closed");
  MG_CHECK_STR(lua("mg.fetch('fragile', '/') local r, e = mg.fetch('fragile', '/') return e"),
               "fragile: no healthy target");
  /* The timed-out connection was not pooled: the next call opened a new one. */
  MG_CHECK(srv.accepts >= 3);
  finish();
}

static void test_lua_fetch_all(void) {
  setup();
  MG_CHECK_STR(lua("local a, b, c, errs = mg.fetch_all {"
                   "  { 'backend', '/hello' }, { 'backend', { path = '/json' } },"
                   "  { 'backend', '/status' } }"
                   " return a.body .. ' ' .. b.json.a .. ' ' .. c.status .. ' ' .."
                   " type(errs) .. ' ' .. tostring(next(errs))"),
               "hello world 1 404 table nil");
  MG_CHECK_INT(srv.accepts, 3);              /* in parallel: one connection each */
  /* Results in order: a slow call over its timeout, a failing one, a fast one. */
  uint64_t t0 = uv_hrtime();
  MG_CHECK_STR(lua("local a, b, c, errs = mg.fetch_all {"
                   "  { 'backend', '/slow', timeout = 0.2 }, { 'dead', '/x' },"
                   "  { 'backend', '/hello' } }"
                   " return tostring(a) .. ' ' .. tostring(b) .. ' ' .. c.body .. ' | ' .."
                   " errs[1] .. ' | ' .. errs[2] .. ' | ' .. tostring(errs[3])"),
               "nil nil hello world | backend: timeout after 0.2s | dead: connection refused | nil");
  double ms = ms_since(t0);
  if (ms < 190 || ms > 900) MG_FAIL("fetch_all took %.0f ms", ms);
  /* No calls: just the (empty) errors table. */
  MG_CHECK_STR(lua("local errs, extra = mg.fetch_all {}"
                   " return type(errs) .. ' ' .. tostring(next(errs)) .. ' ' .. tostring(extra)"),
               "table nil nil");
  finish();
}

static void test_lua_fetch_all_deadline(void) {
  setup();
  uint64_t t0 = uv_hrtime();
  MG_CHECK_STR(lua("local a, b, c, errs = mg.fetch_all {"
                   "  { 'backend', '/slow' }, { 'backend', '/hello' },"
                   "  { 'backend', { path = '/slow', timeout = 0.05 } }, timeout = 0.2 }"
                   " return tostring(a) .. ' ' .. b.status .. ' ' .. tostring(c) .. ' | ' .."
                   " errs[1] .. ' | ' .. errs[3]"),
               "nil 200 nil | backend: timeout after 0.2s | backend: timeout after 0.05s");
  double ms = ms_since(t0);
  if (ms < 190 || ms > 900) MG_FAIL("fetch_all took %.0f ms", ms);
  /* The calls cut by the deadline closed their connections; the finished one is pooled. */
  MG_CHECK(wait_count(&srv.closed, 2, 2000));
  MG_CHECK_INT(mg_gen_upstream(gen, "backend")->targets[0].nidle, 1);
  finish();
}

static void test_lua_cancel(void) {
  setup();
  /* mg.fetch: the task is abandoned while the request waits for its answer. */
  lua_start("local r = mg.fetch('backend', '/slow') return 'resumed'");
  MG_CHECK(!cur.ended);
  MG_CHECK(wait_count(&srv.requests, 1, 2000));
  mg_task_cancel(&cur.t);
  MG_CHECK(wait_count(&srv.closed, 1, 2000));
  run_until(never, NULL, 50);
  MG_CHECK_INT(cur.resumes, 0);
  mg_lua_run_free(cur.run);
  cur.run = NULL;
  /* mg.fetch_all: one call complete (its connection stays pooled), two in flight. */
  lua_start("mg.fetch_all { { 'backend', '/slow' }, { 'backend', '/hello' },"
            " { 'backend', '/slow' } } return 'resumed'");
  MG_CHECK(wait_count(&srv.requests, 4, 2000));
  run_until(never, NULL, 20);
  mg_task_cancel(&cur.t);
  MG_CHECK(wait_count(&srv.closed, 3, 2000));
  run_until(never, NULL, 50);
  MG_CHECK_INT(cur.resumes, 0);
  MG_CHECK_INT(srv.closed, 3);
  MG_CHECK_INT(mg_gen_upstream(gen, "backend")->targets[0].nidle, 1);
  mg_lua_run_free(cur.run);
  cur.run = NULL;
  finish();
}

static void test_lua_urls(void) {
  setup();
  MG_CHECK_STR(luaf("local r = mg.fetch('http://127.0.0.1:%d/hello') return r.body", srv.port),
               "hello world");
  MG_CHECK_STR(luaf("local r = mg.fetch('http://127.0.0.1:%d', { path = '/echo', query = { q = 1 } })"
                    " return r.status .. ''", srv.port),
               "200");
  MG_CHECK(strstr(srv.last.data, "GET /echo?q=1 HTTP/1.1\r\n") == srv.last.data);
  MG_CHECK_STR(luaf("local r = mg.fetch('http://127.0.0.1:%d/echo?a=b#frag') return r.status .. ''",
                    srv.port), "200");
  MG_CHECK(strstr(srv.last.data, "GET /echo?a=b HTTP/1.1\r\n") == srv.last.data);
  MG_CHECK_INT(srv.accepts, 1);              /* one cached upstream, one pooled connection */
  char want[64];
  snprintf(want, sizeof want, "127.0.0.1:%d: connection refused", dport);
  MG_CHECK_STR(luaf("local r, e = mg.fetch('http://127.0.0.1:%d/x') return e", dport), want);
  MG_CHECK_STR(lua("local r, e = mg.fetch('https://example.com/x') return tostring(r) .. ' ' .. e"),
               "nil https://example.com/x: https is not supported yet");
  MG_CHECK_STR(lua("local a, b, errs = mg.fetch_all { { 'https://example.com/' }, { 'backend', '/hello' } }"
                   " return tostring(a) .. ' ' .. b.status .. ' ' .. errs[1]"),
               "nil 200 https://example.com/: https is not supported yet");
  MG_CHECK_STR(lua("local a, errs = mg.fetch_all { { 'https://example.com/' } } return errs[1]"),
               "https://example.com/: https is not supported yet");
  finish();
}

/* Misuse raises an error naming the function and the argument; nothing starts. */
static void test_lua_bad_arguments(void) {
  setup();
  static const char *const cases[][2] = {
    {"mg.fetch(42)",
     "mg.fetch: the target must be an upstream name or an http:// URL, got number"},
    {"mg.fetch('nope', '/')", "mg.fetch: unknown upstream \"nope\""},
    {"mg.fetch('backend', 42)",
     "mg.fetch: the second argument must be a path or an options table, got number"},
    {"mg.fetch('backend', 'x')", "mg.fetch: the path must start with '/'"},
    {"mg.fetch('backend', '/a b')", "mg.fetch: invalid byte 0x20 in the path (encode it)"},
    {"mg.fetch('backend', { pth = '/' })", "mg.fetch: unknown option \"pth\""},
    {"mg.fetch('backend', { [1] = '/' })", "mg.fetch: unknown option key 1"},
    {"mg.fetch('backend', { path = 5 })", "mg.fetch: path must be a string, got number"},
    {"mg.fetch('backend', { method = 'G T' })", "mg.fetch: invalid method \"G T\""},
    {"mg.fetch('backend', { method = true })", "mg.fetch: method must be a string, got boolean"},
    {"mg.fetch('backend', { headers = { ['Bad Name'] = 'x' } })",
     "mg.fetch: invalid header name \"Bad Name\""},
    {"mg.fetch('backend', { headers = { X = 'a\\nb' } })",
     "mg.fetch: the value of header \"X\" contains CR, LF or NUL"},
    {"mg.fetch('backend', { headers = { X = 'a\\0b' } })",
     "mg.fetch: the value of header \"X\" contains CR, LF or NUL"},
    {"mg.fetch('backend', { headers = { Connection = 'close' } })",
     "mg.fetch: header \"Connection\" is set by the client itself"},
    {"mg.fetch('backend', { headers = { ['content-length'] = 1 } })",
     "mg.fetch: header \"content-length\" is set by the client itself"},
    {"mg.fetch('backend', { headers = { X = {} } })",
     "mg.fetch: the value of header \"X\" must be a string or a number, got table"},
    {"mg.fetch('backend', { headers = 'x' })", "mg.fetch: headers must be a table, got string"},
    {"mg.fetch('backend', { body = true })",
     "mg.fetch: body must be a string or a table, got boolean"},
    {"mg.fetch('backend', { body = { f = type } })", "mg.fetch: body: cannot encode function"},
    {"mg.fetch('backend', { query = { k = {} } })",
     "mg.fetch: query value of \"k\" must be a string, number or boolean"},
    {"mg.fetch('backend', { query = { 'v' } })", "mg.fetch: query keys must be strings"},
    {"mg.fetch('backend', { timeout = 0 })",
     "mg.fetch: timeout must be a positive number of seconds (at most 86400)"},
    {"mg.fetch('backend', { timeout = '1' })",
     "mg.fetch: timeout must be a positive number of seconds (at most 86400)"},
    {"mg.fetch('http://x', '/p')",
     "mg.fetch: with a URL target the second argument must be an options table"},
    {"mg.fetch('http://x/a', { path = '/b' })",
     "mg.fetch: give the path in the URL or in the options, not both"},
    {"mg.fetch('http://a b/')",
     "mg.fetch: invalid URL \"http://a b/\" (expected http://host[:port][/path])"},
    {"mg.fetch('ftp://x/')", "mg.fetch: unknown upstream \"ftp://x/\""},
    {"mg.fetch_all('x')",
     "mg.fetch_all: expects a table of calls { {target, path_or_opts}, ..., timeout = s }, got string"},
    {"mg.fetch_all { { 'backend', '/' }, 'x' }",
     "mg.fetch_all: call #2: must be a table { target, path_or_opts, timeout = s }, got string"},
    {"mg.fetch_all { { 'backend', { timeout = 1 }, timeout = 2 } }",
     "mg.fetch_all: call #1: timeout is given both beside the call and in its options"},
    {"mg.fetch_all { { 'backend', '/', tmeout = 2 } }", "mg.fetch_all: call #1: unknown key \"tmeout\""},
    {"mg.fetch_all { { 'backend', '/hello' }, { 'nope' } }",
     "mg.fetch_all: call #2: unknown upstream \"nope\""},
    {"mg.fetch_all { timeout = -1 }",
     "mg.fetch_all: timeout must be a positive number of seconds (at most 86400)"},
    {"mg.fetch_all { foo = 1 }", "mg.fetch_all: unknown key \"foo\""},
    {"local t = {} for i = 1, 65 do t[i] = { 'backend', '/' } end mg.fetch_all(t)",
     "mg.fetch_all: at most 64 calls"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char want[512];
    snprintf(want, sizeof want, "error: t:1: %s", cases[i][1]);
    MG_CHECK_STR(lua(cases[i][0]), want);
  }
  MG_CHECK_INT(srv.accepts, 0);
  /* Outside a task (the config loading, plain C). */
  lua_start_hook("mg.fetch('backend', '/')", MG_HOOK_HANDLER, 0);
  MG_CHECK_STR(lua_finish(),
               "error: t:1: mg.fetch can only be called from a hook or a timer, not while the "
               "config loads");
  finish();
}

/* Allowed in every hook; works inside user coroutines and pcall. */
static void test_lua_hooks_and_coroutines(void) {
  setup();
  lua_start_hook("return mg.fetch('backend', '/hello').status .. ''", MG_HOOK_LOG, 1);
  MG_CHECK_STR(lua_finish(), "200");
  lua_start_hook("return mg.fetch('backend', '/hello').status .. ''", MG_HOOK_TIMER, 1);
  MG_CHECK_STR(lua_finish(), "200");
  MG_CHECK_STR(lua("local f = coroutine.wrap(function() return mg.fetch('backend', '/hello').body end)"
                   " return f()"),
               "hello world");
  MG_CHECK_STR(lua("local ok, r = pcall(mg.fetch, 'backend', '/json') return tostring(ok) .. r.json.a"),
               "true1");
  finish();
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  mg_log_open(NULL, MG_LOG_ERROR);
  RUN(test_c_get);
  RUN(test_c_request_headers_and_body);
  RUN(test_c_keepalive_reuse);
  RUN(test_c_not_pooled);
  RUN(test_c_framings);
  RUN(test_c_malformed);
  RUN(test_c_body_limit);
  RUN(test_c_timeout);
  RUN(test_c_connect_failures);
  RUN(test_c_cut);
  RUN(test_c_retry_stale_connection);
  RUN(test_c_cancel);
  RUN(test_c_invalid_requests);
  RUN(test_c_parse_url);
  RUN(test_c_url_targets);
  RUN(test_c_url_cache_eviction);
  RUN(test_lua_get);
  RUN(test_lua_request_options);
  RUN(test_lua_post_json);
  RUN(test_lua_json);
  RUN(test_lua_keepalive);
  RUN(test_lua_failures);
  RUN(test_lua_fetch_all);
  RUN(test_lua_fetch_all_deadline);
  RUN(test_lua_cancel);
  RUN(test_lua_urls);
  RUN(test_lua_bad_arguments);
  RUN(test_lua_hooks_and_coroutines);
  return mg_test_summary();
}
