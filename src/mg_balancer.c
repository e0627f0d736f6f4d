/* mg_balancer: smooth weighted round robin over the targets of one upstream, with passive
 * ejection. The algorithm is nginx's (ngx_http_upstream_round_robin.c): on every pick each
 * eligible peer's running weight grows by its configured weight, the peer with the largest
 * running weight wins, and the winner pays back the total weight of the eligible peers. Over
 * a full cycle every peer is picked in proportion to its weight, and heavy peers are spread
 * out instead of being picked in a burst (5,1,1 gives a a b a c a a, not a a a a a b c). */
#include "mg_balancer.h"

#include <limits.h>
#include <stdlib.h>

enum { MG_BALANCER_MAX_WEIGHT = 1000000 };

int mg_balancer_init(mg_balancer_t *b, const int *weights, size_t n, int max_fails,
                     double fail_timeout) {
  b->peers = NULL;
  b->npeers = 0;
  b->max_fails = max_fails > 0 ? max_fails : 0;
  /* The config layer validates the timeout; a negative or NaN one here means "no timeout"
   * rather than an undefined conversion. */
  if (!(fail_timeout > 0))
    b->fail_timeout_ms = 0;
  else if (fail_timeout > 1e12) /* ~30,000 years; also keeps the conversion defined */
    b->fail_timeout_ms = (uint64_t)1e15;
  else
    b->fail_timeout_ms = (uint64_t)(fail_timeout * 1000.0 + 0.5);
  if (n == 0) return 0;
  b->peers = calloc(n, sizeof(*b->peers));
  if (!b->peers) return -1;
  for (size_t i = 0; i < n; i++) {
    /* A weight below 1 would never be picked (or would pick backwards); treat it as 1. The
     * cap keeps the running sums of a large upstream far from int overflow. */
    int w = weights ? weights[i] : 1;
    b->peers[i].weight = w < 1 ? 1 : w > MG_BALANCER_MAX_WEIGHT ? MG_BALANCER_MAX_WEIGHT : w;
  }
  b->npeers = n;
  return 0;
}

void mg_balancer_dispose(mg_balancer_t *b) {
  free(b->peers);
  b->peers = NULL;
  b->npeers = 0;
}

int mg_balancer_pick(mg_balancer_t *b, uint64_t now_ms, uint64_t exclude) {
  mg_balancer_peer_t *best = NULL;
  int total = 0;
  size_t best_i = 0;

  for (size_t i = 0; i < b->npeers; i++) {
    mg_balancer_peer_t *p = &b->peers[i];
    if (p->ejected_until != 0) {
      if (now_ms < p->ejected_until) continue;
      /* The ejection has run out: the peer gets a fresh start, as if it had never failed. */
      p->ejected_until = 0;
      p->fails = 0;
    }
    if (i < 64 && (exclude >> i) & 1u) continue;
    p->current += p->weight;
    total += p->weight;
    /* Strictly greater: on a tie the first peer wins, which is what makes the sequence for
     * equal weights a plain round robin starting at peer 0. */
    if (!best || p->current > best->current) {
      best = p;
      best_i = i;
    }
  }
  if (!best) return -1;
  best->current -= total;
  return (int)best_i;
}

int mg_balancer_available(const mg_balancer_t *b, uint64_t now_ms, uint64_t exclude) {
  int n = 0;
  for (size_t i = 0; i < b->npeers; i++) {
    const mg_balancer_peer_t *p = &b->peers[i];
    if (p->ejected_until != 0 && now_ms < p->ejected_until) continue;
    if (i < 64 && (exclude >> i) & 1u) continue;
    n++;
  }
  return n;
}

void mg_balancer_fail(mg_balancer_t *b, size_t i, uint64_t now_ms) {
  if (i >= b->npeers) return;
  mg_balancer_peer_t *p = &b->peers[i];
  if (p->fails < INT_MAX) p->fails++;
  /* An ejection of 0 ms would end before the next pick, so fail_timeout 0 never ejects. */
  if (b->max_fails > 0 && b->fail_timeout_ms > 0 && p->fails >= b->max_fails) {
    /* A failure seen while already ejected (a request that was in flight when the peer went
     * out) pushes the return back: the peer has just shown it is still failing. */
    uint64_t until = now_ms + b->fail_timeout_ms;
    p->ejected_until = until < now_ms ? UINT64_MAX : until;
  }
}

void mg_balancer_ok(mg_balancer_t *b, size_t i) {
  /* A success does not end an ejection early: it may come from a request that started before
   * the peer went out, and the peer comes back by itself after fail_timeout anyway. */
  if (i < b->npeers) b->peers[i].fails = 0;
}
