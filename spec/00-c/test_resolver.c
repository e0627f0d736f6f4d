/* Tests for mg_resolver on a real loop: literals, the cache, shared lookups, failures,
 * cancellation, and freeing the resolver while lookups are in flight. "localhost" comes from
 * /etc/hosts, and "nonexistent.invalid" fails with or without a network, so no test depends
 * on outside DNS. Every wait is bounded by a guard timer. */
#include "mg_resolver.h"
#include "mg_test.h"

#include <arpa/inet.h>
#include <stdlib.h>

static uv_loop_t loop;

typedef struct result {
  int called;     /* how many times the callback ran */
  int order;      /* the value of `sequence` when it ran */
  int status;
  int family;
  int port;
  char ip[INET6_ADDRSTRLEN];
  /* optional actions run from inside the callback */
  void **cancel_this;
  mg_resolver_t *resolver;
  int free_resolver;
  int again_rc;   /* mg_resolver_resolve of the same name from inside the callback */
  struct result *again;
} result_t;

static int sequence;

static void on_result(void *data, int status, const struct sockaddr *sa) {
  result_t *res = data;
  res->called++;
  res->order = ++sequence;
  res->status = status;
  if (status == 0) {
    if (!sa) {
      res->status = 999; /* reported as a mismatch by the checks */
      return;
    }
    res->family = sa->sa_family;
    if (sa->sa_family == AF_INET) {
      const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
      inet_ntop(AF_INET, &in->sin_addr, res->ip, sizeof(res->ip));
      res->port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
      const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
      inet_ntop(AF_INET6, &in6->sin6_addr, res->ip, sizeof(res->ip));
      res->port = ntohs(in6->sin6_port);
    }
  } else if (sa) {
    res->status = 998;
  }
  if (res->cancel_this) mg_resolver_cancel(res->resolver, *res->cancel_this);
  if (res->again)
    res->again_rc = mg_resolver_resolve(res->resolver, "localhost", res->port, 60, on_result,
                                        res->again, NULL);
  if (res->free_resolver) mg_resolver_free(res->resolver);
}

/* ---- running the loop, bounded ------------------------------------------------------- */

static void on_guard(uv_timer_t *t) { *(int *)t->data = 1; }

/* Runs the loop until DONE(ARG) holds or MS milliseconds pass; returns whether it held. */
static int run_until(int (*done)(void *), void *arg, unsigned ms) {
  int expired = 0;
  uv_timer_t guard;
  uv_timer_init(&loop, &guard);
  guard.data = &expired;
  uv_timer_start(&guard, on_guard, ms, 0);
  while (!done(arg) && !expired) uv_run(&loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&guard, NULL);
  uv_run(&loop, UV_RUN_NOWAIT); /* runs the close, so the stack handle can go */
  return done(arg);
}

static int called(void *arg) { return ((result_t *)arg)->called > 0; }
static int no_requests(void *arg) { return loop.active_reqs.count == 0; }

static int is_loopback(const result_t *res) {
  return (res->family == AF_INET && strncmp(res->ip, "127.", 4) == 0) ||
         (res->family == AF_INET6 && strcmp(res->ip, "::1") == 0);
}

/* ---- tests --------------------------------------------------------------------------- */

static void test_ipv4_literal_is_synchronous(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0};
  void *pending = &res;
  MG_CHECK_INT(mg_resolver_resolve(r, "127.0.0.1", 8080, 60, on_result, &res, &pending), 1);
  MG_CHECK_INT(res.called, 1);
  MG_CHECK_INT(res.status, 0);
  MG_CHECK_INT(res.family, AF_INET);
  MG_CHECK_STR(res.ip, "127.0.0.1");
  MG_CHECK_INT(res.port, 8080);
  MG_CHECK(pending == NULL);
  MG_CHECK_INT(loop.active_reqs.count, 0);
  mg_resolver_free(r);
}

static void test_ipv6_literal_is_synchronous(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0};
  MG_CHECK_INT(mg_resolver_resolve(r, "::1", 443, 0, on_result, &res, NULL), 1);
  MG_CHECK_INT(res.called, 1);
  MG_CHECK_INT(res.status, 0);
  MG_CHECK_INT(res.family, AF_INET6);
  MG_CHECK_STR(res.ip, "::1");
  MG_CHECK_INT(res.port, 443);
  MG_CHECK_INT(mg_resolver_resolve(r, "[2001:db8::7]", 0, 0, on_result, &res2, NULL), 1);
  MG_CHECK_INT(res2.status, 0);
  MG_CHECK_STR(res2.ip, "2001:db8::7");
  MG_CHECK_INT(loop.active_reqs.count, 0);
  mg_resolver_free(r);
}

static void test_invalid_arguments(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0};
  void *pending = &res;
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", -1, 1, on_result, &res, &pending),
               UV_EINVAL);
  MG_CHECK(pending == NULL);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 65536, 1, on_result, &res, NULL),
               UV_EINVAL);
  MG_CHECK_INT(mg_resolver_resolve(r, "", 80, 1, on_result, &res, NULL), UV_EINVAL);
  MG_CHECK_INT(mg_resolver_resolve(r, NULL, 80, 1, on_result, &res, NULL), UV_EINVAL);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 80, 1, NULL, &res, NULL), UV_EINVAL);
  char long_name[400];
  memset(long_name, 'a', sizeof(long_name) - 1);
  long_name[sizeof(long_name) - 1] = '\0';
  MG_CHECK_INT(mg_resolver_resolve(r, long_name, 80, 1, on_result, &res, NULL), UV_EINVAL);
  MG_CHECK_INT(res.called, 0);
  mg_resolver_cancel(r, NULL); /* harmless */
  mg_resolver_free(r);
  mg_resolver_free(NULL);
}

static void test_name_async_then_cached(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0}, res3 = {0};
  void *pending = NULL;
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9001, 60, on_result, &res, &pending), 0);
  MG_CHECK(pending != NULL);
  MG_CHECK_INT(res.called, 0); /* not before the loop runs */
  MG_CHECK(run_until(called, &res, 10000));
  MG_CHECK_INT(res.called, 1);
  MG_CHECK_INT(res.status, 0);
  MG_CHECK(is_loopback(&res));
  MG_CHECK_INT(res.port, 9001);

  /* The second call is answered from the cache, before it returns. */
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9001, 60, on_result, &res2, &pending), 1);
  MG_CHECK(pending == NULL);
  MG_CHECK_INT(res2.called, 1);
  MG_CHECK_STR(res2.ip, res.ip);
  MG_CHECK_INT(res2.port, 9001);
  MG_CHECK_INT(loop.active_reqs.count, 0);

  /* The cache is per port, and a TTL of 0 always asks again. */
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9002, 60, on_result, &res3, NULL), 0);
  MG_CHECK(run_until(called, &res3, 10000));
  MG_CHECK_INT(res3.port, 9002);
  memset(&res3, 0, sizeof(res3));
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9001, 0, on_result, &res3, NULL), 0);
  MG_CHECK(run_until(called, &res3, 10000));
  MG_CHECK_INT(res3.status, 0);
  MG_CHECK_INT(res3.port, 9001);
  mg_resolver_free(r);
}

static int all_called(void *arg) {
  result_t *res = arg;
  for (; res->port >= 0; res++) {
    if (!res->called) return 0;
  }
  return 1;
}

static void test_concurrent_lookups_share_one_call(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res[4] = {{0}, {0}, {0}, {.port = -1}};
  for (int i = 0; i < 3; i++)
    MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9010, 60, on_result, &res[i], NULL), 0);
  MG_CHECK_INT(loop.active_reqs.count, 1);
  MG_CHECK(run_until(all_called, res, 10000));
  for (int i = 0; i < 3; i++) {
    MG_CHECK_INT(res[i].called, 1);
    MG_CHECK_INT(res[i].status, 0);
    MG_CHECK_INT(res[i].port, 9010);
    MG_CHECK_STR(res[i].ip, res[0].ip);
  }
  /* Waiters are answered in the order they asked. */
  MG_CHECK(res[0].order < res[1].order && res[1].order < res[2].order);
  mg_resolver_free(r);
}

static int cache_expired;
static void on_wait(uv_timer_t *t) { cache_expired = 1; }
static int waited(void *arg) { return cache_expired; }

static void test_unknown_name_fails(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0}, res3 = {0};
  int rc = mg_resolver_resolve(r, "nonexistent.invalid", 80, 60, on_result, &res, NULL);
  MG_CHECK_INT(rc, 0);
  MG_CHECK(run_until(called, &res, 20000));
  MG_CHECK_INT(res.called, 1);
  MG_CHECK(res.status < 0); /* UV_EAI_NONAME, or UV_EAI_AGAIN without a network */

  /* The failure is remembered for a moment (a storm of requests does not become a storm of
   * lookups) ... */
  MG_CHECK_INT(mg_resolver_resolve(r, "nonexistent.invalid", 80, 60, on_result, &res2, NULL),
               1);
  MG_CHECK_INT(res2.status, res.status);

  /* ... but for no more than a second, whatever TTL the caller asked for. */
  static uv_timer_t wait; /* static: the loop may still hold it if a check fails */
  cache_expired = 0;
  uv_timer_init(&loop, &wait);
  uv_timer_start(&wait, on_wait, 1001, 0);
  MG_CHECK(run_until(waited, NULL, 5000));
  uv_close((uv_handle_t *)&wait, NULL);
  MG_CHECK_INT(mg_resolver_resolve(r, "nonexistent.invalid", 80, 60, on_result, &res3, NULL),
               0);
  MG_CHECK(run_until(called, &res3, 20000));
  MG_CHECK(res3.status < 0);
  mg_resolver_free(r);
}

static void test_cancel(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0}, res3 = {0};
  void *p1 = NULL, *p2 = NULL;
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9020, 60, on_result, &res, &p1), 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9020, 60, on_result, &res2, &p2), 0);
  MG_CHECK(p1 && p2 && p1 != p2);
  mg_resolver_cancel(r, p1);
  MG_CHECK(run_until(called, &res2, 10000));
  MG_CHECK_INT(res2.status, 0);
  MG_CHECK_INT(res.called, 0);

  /* Cancelling the waiter in the middle of three. */
  result_t w[3] = {{0}, {0}, {0}};
  void *pw[3];
  for (int i = 0; i < 3; i++)
    MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9022, 0, on_result, &w[i], &pw[i]), 0);
  mg_resolver_cancel(r, pw[1]);
  MG_CHECK(run_until(no_requests, NULL, 10000));
  MG_CHECK_INT(w[0].called, 1);
  MG_CHECK_INT(w[1].called, 0);
  MG_CHECK_INT(w[2].called, 1);

  /* Cancelling the only waiter: the lookup still finishes and fills the cache. */
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9021, 60, on_result, &res, &p1), 0);
  mg_resolver_cancel(r, p1);
  MG_CHECK(run_until(no_requests, NULL, 10000));
  MG_CHECK_INT(res.called, 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9021, 60, on_result, &res3, NULL), 1);
  MG_CHECK_INT(res3.status, 0);
  MG_CHECK_INT(res3.port, 9021);
  mg_resolver_free(r);
}

static void test_cancel_from_a_callback(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0};
  void *p2 = NULL;
  res.resolver = r;
  res.cancel_this = &p2; /* the first callback cancels the second waiter */
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9030, 60, on_result, &res, NULL), 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9030, 60, on_result, &res2, &p2), 0);
  MG_CHECK(run_until(no_requests, NULL, 10000));
  MG_CHECK_INT(res.called, 1);
  MG_CHECK_INT(res2.called, 0);
  mg_resolver_free(r);
}

static void test_callback_sees_the_cache(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, inner = {0};
  res.resolver = r;
  res.again = &inner; /* the callback asks for the same name: answered from the cache */
  res.again_rc = -12345;
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9040, 60, on_result, &res, NULL), 0);
  MG_CHECK(run_until(called, &res, 10000));
  MG_CHECK_INT(res.again_rc, 1);
  MG_CHECK_INT(inner.called, 1);
  MG_CHECK_INT(inner.port, 9040);
  MG_CHECK_INT(loop.active_reqs.count, 0);
  mg_resolver_free(r);
}

static void test_free_with_lookup_in_flight(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0};
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9050, 60, on_result, &res, NULL), 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "nonexistent.invalid", 9050, 60, on_result, &res2,
                                   NULL), 0);
  MG_CHECK_INT(loop.active_reqs.count, 2);
  mg_resolver_free(r);
  /* The lookups end (or are cancelled) on the loop and free themselves; nobody is called. */
  MG_CHECK(run_until(no_requests, NULL, 20000));
  MG_CHECK_INT(res.called, 0);
  MG_CHECK_INT(res2.called, 0);
}

static void test_free_from_a_callback(void) {
  mg_resolver_t *r = mg_resolver_new(&loop);
  result_t res = {0}, res2 = {0}, res3 = {0};
  res.resolver = r;
  res.free_resolver = 1;
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9060, 60, on_result, &res, NULL), 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 9060, 60, on_result, &res2, NULL), 0);
  MG_CHECK_INT(mg_resolver_resolve(r, "nonexistent.invalid", 9060, 60, on_result, &res3,
                                   NULL), 0);
  MG_CHECK(run_until(no_requests, NULL, 20000));
  /* Only the first waiter is called: the resolver was freed in its callback. The other
   * lookup may have finished first, so res3 may or may not have been called. */
  MG_CHECK_INT(res.called, 1);
  MG_CHECK_INT(res2.called, 0);
  MG_CHECK(res3.called <= 1);
}

static int count_done;
static void on_count(void *data, int status, const struct sockaddr *sa) {
  if (status == 0 && sa) count_done++;
}
static int counted(void *arg) { return count_done >= *(int *)arg; }

static void test_many_names(void) {
  /* More names than the cache holds (1,024): first the answers that ran out make room (the
   * first batch lives 1 ms), then any idle ones. Nothing leaks, every lookup is answered. */
  mg_resolver_t *r = mg_resolver_new(&loop);
  count_done = 0;
  int want = 0;
  for (int batch = 0; batch < 7; batch++) {
    for (int i = 0; i < 200; i++) {
      int rc = mg_resolver_resolve(r, "localhost", 10000 + batch * 200 + i,
                                   batch == 0 ? 0.001 : 60, on_count, NULL, NULL);
      MG_CHECK_INT(rc, 0);
      want++;
    }
    MG_CHECK(run_until(counted, &want, 20000));
  }
  MG_CHECK_INT(count_done, 1400);
  result_t res = {0};
  MG_CHECK_INT(mg_resolver_resolve(r, "localhost", 11399, 60, on_result, &res, NULL), 1);
  MG_CHECK_INT(res.port, 11399); /* the newest answer is still cached */
  mg_resolver_free(r);
}

int main(void) {
  uv_loop_init(&loop);
  MG_RUN(test_ipv4_literal_is_synchronous);
  MG_RUN(test_ipv6_literal_is_synchronous);
  MG_RUN(test_invalid_arguments);
  MG_RUN(test_name_async_then_cached);
  MG_RUN(test_concurrent_lookups_share_one_call);
  MG_RUN(test_unknown_name_fails);
  MG_RUN(test_cancel);
  MG_RUN(test_cancel_from_a_callback);
  MG_RUN(test_callback_sees_the_cache);
  MG_RUN(test_free_with_lookup_in_flight);
  MG_RUN(test_free_from_a_callback);
  MG_RUN(test_many_names);
  /* A failed test may leave lookups in flight: let them end before closing the loop. */
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) {
    fprintf(stderr, "  FAIL the loop still has handles or requests\n");
    mg_test_failed++;
  }
  return mg_test_summary();
}
