/* Tests for mg_balancer: the exact smooth-WRR sequences and passive ejection. */
#include "mg_balancer.h"
#include "mg_test.h"

#include <stdlib.h>

/* Picks COUNT times at NOW with EXCLUDE and writes the picks as letters ('a' = peer 0, '-'
 * for -1) into OUT, so a whole sequence is checked in one comparison. */
static const char *picks(mg_balancer_t *b, int count, uint64_t now, uint64_t exclude,
                         char *out) {
  for (int i = 0; i < count; i++) {
    int p = mg_balancer_pick(b, now, exclude);
    out[i] = p < 0 ? '-' : (char)('a' + p);
  }
  out[count] = '\0';
  return out;
}

static void test_swrr_5_1_1(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){5, 1, 1}, 3, 0, 10), 0);
  MG_CHECK_STR(picks(&b, 7, 0, 0, seq), "aabacaa");
  /* The cycle repeats exactly: after 7 picks every running weight is back at 0. */
  MG_CHECK_STR(picks(&b, 14, 0, 0, seq), "aabacaaaabacaa");
  for (size_t i = 0; i < 3; i++) MG_CHECK_INT(b.peers[i].current, 0);
  mg_balancer_dispose(&b);
}

static void test_swrr_equal(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1, 1}, 3, 0, 10), 0);
  MG_CHECK_STR(picks(&b, 9, 0, 0, seq), "abcabcabc");
  mg_balancer_dispose(&b);
}

static void test_swrr_2_1(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){2, 1}, 2, 0, 10), 0);
  MG_CHECK_STR(picks(&b, 9, 0, 0, seq), "abaabaaba");
  mg_balancer_dispose(&b);
}

static void test_bad_weights_count_as_one(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){0, -3}, 2, 0, 10), 0);
  MG_CHECK_INT(b.peers[0].weight, 1);
  MG_CHECK_INT(b.peers[1].weight, 1);
  MG_CHECK_STR(picks(&b, 4, 0, 0, seq), "abab");
  mg_balancer_dispose(&b);
  /* NULL weights: all 1. */
  MG_CHECK_INT(mg_balancer_init(&b, NULL, 3, 0, 10), 0);
  MG_CHECK_STR(picks(&b, 3, 0, 0, seq), "abc");
  mg_balancer_dispose(&b);
}

static void test_empty(void) {
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, NULL, 0, 1, 10), 0);
  MG_CHECK_INT(mg_balancer_pick(&b, 0, 0), -1);
  mg_balancer_fail(&b, 0, 0); /* out of range: ignored, not a crash */
  mg_balancer_ok(&b, 5);
  mg_balancer_dispose(&b);
}

static void test_exclude(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){5, 1, 1}, 3, 0, 10), 0);
  /* A retry excludes the peer that just failed: only b and c share the picks. */
  MG_CHECK_STR(picks(&b, 4, 0, 1u << 0, seq), "bcbc");
  MG_CHECK_STR(picks(&b, 2, 0, (1u << 0) | (1u << 2), seq), "bb");
  MG_CHECK_STR(picks(&b, 1, 0, 7, seq), "-");
  /* Bits beyond the peers do not matter. */
  MG_CHECK_STR(picks(&b, 1, 0, ~(uint64_t)7, seq), "a");
  mg_balancer_dispose(&b);
}

static void test_eject_after_max_fails(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1, 1}, 3, 2, 10), 0);
  uint64_t now = 1000;
  mg_balancer_fail(&b, 1, now);
  MG_CHECK_INT(b.peers[1].fails, 1);
  MG_CHECK_INT(b.peers[1].ejected_until, 0);
  MG_CHECK_STR(picks(&b, 3, now, 0, seq), "abc"); /* one failure: still in service */
  mg_balancer_fail(&b, 1, now);
  MG_CHECK_INT(b.peers[1].ejected_until, now + 10000);
  MG_CHECK_STR(picks(&b, 6, now, 0, seq), "acacac");
  MG_CHECK_STR(picks(&b, 4, now + 9999, 0, seq), "acac");
  mg_balancer_dispose(&b);
}

static void test_ok_resets_fails(void) {
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1}, 2, 2, 10), 0);
  mg_balancer_fail(&b, 0, 0);
  mg_balancer_ok(&b, 0);
  MG_CHECK_INT(b.peers[0].fails, 0);
  mg_balancer_fail(&b, 0, 0); /* not consecutive with the first: no ejection */
  MG_CHECK_INT(b.peers[0].ejected_until, 0);
  mg_balancer_dispose(&b);
}

static void test_return_after_fail_timeout(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1}, 2, 1, 0.5), 0);
  mg_balancer_fail(&b, 0, 100);
  MG_CHECK_INT(b.peers[0].ejected_until, 600);
  MG_CHECK_STR(picks(&b, 3, 599, 0, seq), "bbb");
  /* At 600 the ejection has run out: the peer is back with its failures forgotten. */
  MG_CHECK_INT(mg_balancer_pick(&b, 600, 0), 0);
  MG_CHECK_INT(b.peers[0].ejected_until, 0);
  MG_CHECK_INT(b.peers[0].fails, 0);
  MG_CHECK_STR(picks(&b, 4, 600, 0, seq), "baba");
  mg_balancer_dispose(&b);
}

static void test_all_ejected(void) {
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){3, 1}, 2, 1, 1), 0);
  mg_balancer_fail(&b, 0, 0);
  mg_balancer_fail(&b, 1, 500);
  MG_CHECK_INT(mg_balancer_pick(&b, 999, 0), -1);
  MG_CHECK_INT(mg_balancer_pick(&b, 1000, 0), 0); /* peer 0 returns first */
  MG_CHECK_INT(mg_balancer_pick(&b, 1000, 1), -1); /* ... and may still be excluded */
  MG_CHECK_INT(mg_balancer_pick(&b, 1500, 1), 1);
  mg_balancer_dispose(&b);
}

static void test_fail_while_ejected_extends(void) {
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1}, 2, 1, 1), 0);
  mg_balancer_fail(&b, 0, 0);
  mg_balancer_fail(&b, 0, 700);
  MG_CHECK_INT(b.peers[0].ejected_until, 1700);
  MG_CHECK_INT(mg_balancer_pick(&b, 1000, 2), -1);
  mg_balancer_dispose(&b);
}

static void test_max_fails_zero_never_ejects(void) {
  mg_balancer_t b;
  char seq[64];
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1, 1}, 2, 0, 10), 0);
  for (int i = 0; i < 1000; i++) mg_balancer_fail(&b, 0, 0);
  MG_CHECK_INT(b.peers[0].fails, 1000);
  MG_CHECK_INT(b.peers[0].ejected_until, 0);
  MG_CHECK_STR(picks(&b, 4, 0, 0, seq), "abab");
  mg_balancer_dispose(&b);
}

static void test_fail_timeout_zero_never_ejects(void) {
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){1}, 1, 1, 0), 0);
  mg_balancer_fail(&b, 0, 50);
  MG_CHECK_INT(mg_balancer_pick(&b, 50, 0), 0);
  mg_balancer_dispose(&b);
}

static void test_distribution(void) {
  /* Over many picks each peer gets exactly its share, and no heavy peer gets a long burst. */
  mg_balancer_t b;
  MG_CHECK_INT(mg_balancer_init(&b, (const int[]){7, 3, 2, 1}, 4, 0, 10), 0);
  int count[4] = {0}, run = 0, longest = 0, last = -1;
  for (int i = 0; i < 13 * 100; i++) {
    int p = mg_balancer_pick(&b, 0, 0);
    MG_CHECK(p >= 0 && p < 4);
    count[p]++;
    run = p == last ? run + 1 : 1;
    last = p;
    if (run > longest) longest = run;
  }
  MG_CHECK_INT(count[0], 700);
  MG_CHECK_INT(count[1], 300);
  MG_CHECK_INT(count[2], 200);
  MG_CHECK_INT(count[3], 100);
  MG_CHECK(longest <= 2);
  mg_balancer_dispose(&b);
}

int main(void) {
  MG_RUN(test_swrr_5_1_1);
  MG_RUN(test_swrr_equal);
  MG_RUN(test_swrr_2_1);
  MG_RUN(test_bad_weights_count_as_one);
  MG_RUN(test_empty);
  MG_RUN(test_exclude);
  MG_RUN(test_eject_after_max_fails);
  MG_RUN(test_ok_resets_fails);
  MG_RUN(test_return_after_fail_timeout);
  MG_RUN(test_all_ejected);
  MG_RUN(test_fail_while_ejected_extends);
  MG_RUN(test_max_fails_zero_never_ejects);
  MG_RUN(test_fail_timeout_zero_never_ejects);
  MG_RUN(test_distribution);
  return mg_test_summary();
}
