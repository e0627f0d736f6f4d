/* mg_balancer: picks a target of an upstream by smooth weighted round robin (the sequence
 * nginx made popular: for weights 5,1,1 it yields a a b a c a a) and ejects a target
 * passively after max_fails consecutive failures, for fail_timeout seconds. State is per
 * worker: each worker ejects on what it saw itself. */
#ifndef MG_BALANCER_H
#define MG_BALANCER_H

#include <stddef.h>
#include <stdint.h>

typedef struct mg_balancer_peer {
  int weight;            /* configured weight (>= 1) */
  int current;           /* smooth-WRR running weight */
  int fails;             /* consecutive failures */
  uint64_t ejected_until;/* ms timestamp (mg_balancer_* "now" clock); 0 = in service */
} mg_balancer_peer_t;

typedef struct mg_balancer {
  mg_balancer_peer_t *peers;
  size_t npeers;
  int max_fails;         /* 0 = never eject */
  uint64_t fail_timeout_ms;
} mg_balancer_t;

/* Initialises B for N peers with WEIGHTS; returns 0 or -1 (out of memory). */
int mg_balancer_init(mg_balancer_t *b, const int *weights, size_t n, int max_fails,
                     double fail_timeout);

/* Frees the peers array. */
void mg_balancer_dispose(mg_balancer_t *b);

/* Picks a peer in service at NOW_MS, skipping the peers whose bit is set in EXCLUDE (bit i =
 * peer i; peers beyond 63 cannot be excluded). A peer whose ejection has expired is back in
 * service. Returns the peer index, or -1 when every peer is ejected or excluded (503). */
int mg_balancer_pick(mg_balancer_t *b, uint64_t now_ms, uint64_t exclude);

/* How many peers mg_balancer_pick could choose from now (nothing changes: the smooth
 * round-robin state only moves when a peer is picked). */
int mg_balancer_available(const mg_balancer_t *b, uint64_t now_ms, uint64_t exclude);

/* Records a failed exchange with peer I (refused, reset, timeout); ejects it at max_fails. */
void mg_balancer_fail(mg_balancer_t *b, size_t i, uint64_t now_ms);

/* Records a successful exchange with peer I (resets its failure count). */
void mg_balancer_ok(mg_balancer_t *b, size_t i);

#endif
