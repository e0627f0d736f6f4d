/* Tests for mg_shdict: every operation, TTLs on an injected clock, LRU eviction order,
 * consistency under random churn, exact counts from four processes at once, and recovery
 * after a process is killed while it holds the lock. */
#include "mg_shdict.h"
#include "mg_test.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------
 * Helpers */

static uint64_t fake_now = 1000000;
static uint64_t fake_clock(void) { return fake_now; }

static mg_shdict_t *make(const char *name, size_t bytes) {
  mg_shdict_t *d = mg_shdict_create(name, bytes);
  if (!d) MG_FAIL("mg_shdict_create(%s, %zu) failed: errno %d", name, bytes, errno);
  mg_shdict_set_clock(d, fake_clock);
  return d;
}

static int set_str(mg_shdict_t *d, const char *key, const char *val, double ttl) {
  mg_shdict_value_t v = {.type = MG_SHDICT_STRING, .str = val, .len = strlen(val)};
  return mg_shdict_set(d, key, strlen(key), &v, ttl);
}

static int set_num(mg_shdict_t *d, const char *key, double num, double ttl) {
  mg_shdict_value_t v = {.type = MG_SHDICT_NUMBER, .num = num};
  return mg_shdict_set(d, key, strlen(key), &v, ttl);
}

/* The string under KEY, NUL-terminated in BUF; NULL when absent or not a string. */
static const char *get_str(mg_shdict_t *d, const char *key, char *buf, size_t cap) {
  mg_shdict_value_t v;
  int rc = mg_shdict_get(d, key, strlen(key), &v, buf, cap - 1);
  if (rc != 1 || v.type != MG_SHDICT_STRING) return NULL;
  buf[v.len] = '\0';
  return buf;
}

/* The number under KEY, or NAN when absent or not a number. */
static double get_num(mg_shdict_t *d, const char *key) {
  mg_shdict_value_t v;
  int rc = mg_shdict_get(d, key, strlen(key), &v, NULL, 0);
  return rc == 1 && v.type == MG_SHDICT_NUMBER ? v.num : NAN;
}

static int present(mg_shdict_t *d, const char *key) {
  mg_shdict_value_t v;
  char buf[16];
  int rc = mg_shdict_get(d, key, strlen(key), &v, buf, sizeof buf);
  return rc == 1 || rc == MG_SHDICT_E_BUFFER;
}

static mg_shdict_stats_t stats(mg_shdict_t *d) {
  mg_shdict_stats_t s;
  if (mg_shdict_stats(d, &s) != 0) MG_FAIL("mg_shdict_stats failed");
  return s;
}

/* Waits up to MS for PID; returns its wait status, or -1 after killing it on timeout. */
static int wait_child(pid_t pid, int ms) {
  int status;
  for (int waited = 0; waited < ms; waited += 5) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0) return -1;
    usleep(5000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

/* ---------------------------------------------------------------------------------------
 * Basic operations */

static void test_create_checks_arguments(void) {
  char longname[MG_SHDICT_NAME_MAX + 2];
  memset(longname, 'n', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  errno = 0;
  MG_CHECK(mg_shdict_create(NULL, 65536) == NULL && errno == EINVAL);
  MG_CHECK(mg_shdict_create("", 65536) == NULL && errno == EINVAL);
  MG_CHECK(mg_shdict_create(longname, 65536) == NULL && errno == EINVAL);
  MG_CHECK(mg_shdict_create("small", MG_SHDICT_MIN_SIZE - 1) == NULL && errno == EINVAL);
  MG_CHECK(mg_shdict_create("huge", (size_t)MG_SHDICT_MAX_SIZE + 1) == NULL && errno == EINVAL);
  mg_shdict_t *d = make("limits", MG_SHDICT_MIN_SIZE);
  MG_CHECK_STR(mg_shdict_name(d), "limits");
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.entries, 0);
  MG_CHECK(s.capacity > 4096 && s.capacity < MG_SHDICT_MIN_SIZE);
  MG_CHECK_INT(s.bytes_free, s.capacity);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_set_get_each_type(void) {
  mg_shdict_t *d = make("types", 65536);
  char buf[64];
  mg_shdict_value_t v;
  MG_CHECK_INT(set_str(d, "s", "hello", 0), 0);
  MG_CHECK_INT(set_str(d, "empty", "", 0), 0);
  MG_CHECK_INT(set_num(d, "n", -2.5, 0), 0);
  mg_shdict_value_t t = {.type = MG_SHDICT_BOOLEAN, .num = 7};
  MG_CHECK_INT(mg_shdict_set(d, "b", 1, &t, 0), 0);
  /* Keys are bytes: a NUL inside is part of the key. */
  mg_shdict_value_t bin = {.type = MG_SHDICT_STRING, .str = "x\0y", .len = 3};
  MG_CHECK_INT(mg_shdict_set(d, "k\0a", 3, &bin, 0), 0);

  MG_CHECK_STR(get_str(d, "s", buf, sizeof buf), "hello");
  MG_CHECK_INT(mg_shdict_get(d, "empty", 5, &v, buf, sizeof buf), 1);
  MG_CHECK_INT(v.type, MG_SHDICT_STRING);
  MG_CHECK_INT(v.len, 0);
  MG_CHECK(get_num(d, "n") == -2.5);
  MG_CHECK_INT(mg_shdict_get(d, "b", 1, &v, NULL, 0), 1);
  MG_CHECK_INT(v.type, MG_SHDICT_BOOLEAN);
  MG_CHECK(v.num == 1); /* booleans are stored as 0 or 1 */
  MG_CHECK_INT(mg_shdict_get(d, "k\0a", 3, &v, buf, sizeof buf), 1);
  MG_CHECK_INT(v.len, 3);
  MG_CHECK(memcmp(v.str, "x\0y", 3) == 0);
  MG_CHECK_INT(mg_shdict_get(d, "k", 1, &v, buf, sizeof buf), 0);
  MG_CHECK_INT(mg_shdict_get(d, "k\0b", 3, &v, buf, sizeof buf), 0);
  MG_CHECK_INT(v.type, MG_SHDICT_NIL);

  /* Overwriting changes the type, and a same-size overwrite happens in place. */
  MG_CHECK_INT(set_num(d, "s", 42, 0), 0);
  MG_CHECK(get_num(d, "s") == 42);
  MG_CHECK_INT(set_str(d, "n", "now a string, longer than the number was", 0), 0);
  MG_CHECK_STR(get_str(d, "n", buf, sizeof buf), "now a string, longer than the number was");
  MG_CHECK_INT(set_num(d, "s", 43, 0), 0);
  MG_CHECK(get_num(d, "s") == 43);
  MG_CHECK_INT(stats(d).entries, 5);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_get_small_buffer(void) {
  mg_shdict_t *d = make("buffer", 65536);
  char buf[8];
  mg_shdict_value_t v;
  MG_CHECK_INT(set_str(d, "k", "0123456789", 0), 0);
  MG_CHECK_INT(mg_shdict_get(d, "k", 1, &v, buf, sizeof buf), MG_SHDICT_E_BUFFER);
  MG_CHECK_INT(v.len, 10); /* the length the caller must make room for */
  char big[10];
  MG_CHECK_INT(mg_shdict_get(d, "k", 1, &v, big, sizeof big), 1);
  MG_CHECK(memcmp(v.str, "0123456789", 10) == 0);
  mg_shdict_destroy(d);
}

static void test_add_and_replace(void) {
  mg_shdict_t *d = make("add", 65536);
  char buf[32];
  mg_shdict_value_t a = {.type = MG_SHDICT_STRING, .str = "first", .len = 5};
  mg_shdict_value_t b = {.type = MG_SHDICT_STRING, .str = "second", .len = 6};
  MG_CHECK_INT(mg_shdict_replace(d, "k", 1, &a, 0), MG_SHDICT_E_NOT_FOUND);
  MG_CHECK(!present(d, "k"));
  MG_CHECK_INT(mg_shdict_add(d, "k", 1, &a, 1), 0);
  MG_CHECK_INT(mg_shdict_add(d, "k", 1, &b, 0), MG_SHDICT_E_EXISTS);
  MG_CHECK_STR(get_str(d, "k", buf, sizeof buf), "first");
  /* Once expired, the key counts as absent for add and replace. */
  fake_now += 1000;
  MG_CHECK_INT(mg_shdict_replace(d, "k", 1, &b, 0), MG_SHDICT_E_NOT_FOUND);
  MG_CHECK_INT(mg_shdict_add(d, "k", 1, &b, 0), 0);
  MG_CHECK_STR(get_str(d, "k", buf, sizeof buf), "second");
  MG_CHECK_INT(mg_shdict_replace(d, "k", 1, &a, 0), 0);
  MG_CHECK_STR(get_str(d, "k", buf, sizeof buf), "first");
  MG_CHECK_INT(stats(d).entries, 1);
  mg_shdict_destroy(d);
}

static void test_delete_and_flush_all(void) {
  mg_shdict_t *d = make("delete", 65536);
  MG_CHECK_INT(set_str(d, "a", "1", 0), 0);
  MG_CHECK_INT(set_str(d, "b", "2", 0), 0);
  MG_CHECK_INT(set_num(d, "c", 3, 0), 0);
  MG_CHECK_INT(mg_shdict_delete(d, "a", 1), 1);
  MG_CHECK_INT(mg_shdict_delete(d, "a", 1), 0);
  MG_CHECK(!present(d, "a") && present(d, "b"));
  MG_CHECK_INT(stats(d).entries, 2);
  MG_CHECK_INT(mg_shdict_flush_all(d), 0);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.entries, 0);
  MG_CHECK_INT(s.bytes_free, s.capacity);
  MG_CHECK(!present(d, "b") && !present(d, "c"));
  MG_CHECK_INT(set_str(d, "b", "again", 0), 0);
  MG_CHECK(present(d, "b"));
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_bad_arguments_change_nothing(void) {
  mg_shdict_t *d = make("args", 262144);
  mg_shdict_value_t v = {.type = MG_SHDICT_STRING, .str = "v", .len = 1};
  mg_shdict_value_t nil = {.type = MG_SHDICT_NIL};
  mg_shdict_value_t nostr = {.type = MG_SHDICT_STRING, .str = NULL, .len = 3};
  double out = 0, one = 1;
  MG_CHECK_INT(mg_shdict_set(d, NULL, 1, &v, 0), MG_SHDICT_E_BAD_KEY);
  MG_CHECK_INT(mg_shdict_set(d, "", 0, &v, 0), MG_SHDICT_E_BAD_KEY);
  static char key[MG_SHDICT_KEY_MAX + 1];
  memset(key, 'k', sizeof key);
  MG_CHECK_INT(mg_shdict_set(d, key, sizeof key, &v, 0), MG_SHDICT_E_BAD_KEY);
  MG_CHECK_INT(mg_shdict_get(d, key, sizeof key, &v, NULL, 0), MG_SHDICT_E_BAD_KEY);
  MG_CHECK_INT(mg_shdict_delete(d, "", 0), MG_SHDICT_E_BAD_KEY);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &v, -1), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &v, NAN), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &v, INFINITY), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &v, 2e9), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, NULL, 0), MG_SHDICT_E_BAD_VALUE);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &nil, 0), MG_SHDICT_E_BAD_VALUE);
  MG_CHECK_INT(mg_shdict_set(d, "k", 1, &nostr, 0), MG_SHDICT_E_BAD_VALUE);
  MG_CHECK_INT(mg_shdict_incr(d, "k", 1, NAN, &one, 0, &out), MG_SHDICT_E_BAD_VALUE);
  MG_CHECK_INT(mg_shdict_incr(d, "k", 1, 1, &(double){INFINITY}, 0, &out),
               MG_SHDICT_E_BAD_VALUE);
  MG_CHECK_INT(mg_shdict_incr(d, "k", 1, 1, &one, -5, &out), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(mg_shdict_expire(d, "k", 1, NAN), MG_SHDICT_E_BAD_TTL);
  MG_CHECK_INT(stats(d).entries, 0);
  /* The longest key is fine. */
  MG_CHECK_INT(mg_shdict_set(d, key, MG_SHDICT_KEY_MAX, &v, 0), 0);
  MG_CHECK_INT(mg_shdict_get(d, key, MG_SHDICT_KEY_MAX, &v, NULL, 0), MG_SHDICT_E_BUFFER);
  MG_CHECK_INT(mg_shdict_delete(d, key, MG_SHDICT_KEY_MAX), 1);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_error_table(void) {
  MG_CHECK_STR(mg_shdict_strerror(MG_SHDICT_E_NO_MEMORY), "no memory");
  MG_CHECK_STR(mg_shdict_strerror(MG_SHDICT_E_NOT_NUMBER), "not a number");
  MG_CHECK_STR(mg_shdict_strerror(MG_SHDICT_E_EXISTS), "exists");
  MG_CHECK_STR(mg_shdict_errname(MG_SHDICT_E_NOT_FOUND), "NOT_FOUND");
  MG_CHECK_STR(mg_shdict_errname(MG_SHDICT_E_LOCK), "LOCK");
  MG_CHECK_STR(mg_shdict_strerror(0), "unknown error");
  MG_CHECK_STR(mg_shdict_errname(-1000), "UNKNOWN");
}

/* ---------------------------------------------------------------------------------------
 * TTL and incr */

static void test_ttl_expiry(void) {
  mg_shdict_t *d = make("ttl", 65536);
  double left = -1;
  MG_CHECK_INT(set_str(d, "short", "v", 1.5), 0);
  MG_CHECK_INT(set_str(d, "forever", "v", 0), 0);
  MG_CHECK_INT(mg_shdict_ttl(d, "short", 5, &left), 1);
  MG_CHECK(left == 1.5);
  MG_CHECK_INT(mg_shdict_ttl(d, "forever", 7, &left), 1);
  MG_CHECK(left == 0);
  MG_CHECK_INT(mg_shdict_ttl(d, "none", 4, &left), 0);
  fake_now += 1000;
  MG_CHECK_INT(mg_shdict_ttl(d, "short", 5, &left), 1);
  MG_CHECK(left == 0.5);
  MG_CHECK(present(d, "short"));
  fake_now += 499;
  MG_CHECK(present(d, "short"));
  fake_now += 1; /* exactly at the deadline it is gone */
  MG_CHECK(!present(d, "short"));
  MG_CHECK_INT(mg_shdict_ttl(d, "short", 5, &left), 0);
  MG_CHECK(present(d, "forever"));
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.entries, 1); /* the expired entry was reclaimed when it was looked up */
  MG_CHECK_INT(s.expirations, 1);

  /* expire gives a new TTL; 0 makes it permanent; a set replaces the TTL. */
  MG_CHECK_INT(mg_shdict_expire(d, "forever", 7, 2), 0);
  MG_CHECK_INT(mg_shdict_ttl(d, "forever", 7, &left), 1);
  MG_CHECK(left == 2);
  MG_CHECK_INT(mg_shdict_expire(d, "forever", 7, 0), 0);
  fake_now += 5000;
  MG_CHECK(present(d, "forever"));
  MG_CHECK_INT(mg_shdict_expire(d, "missing", 7, 1), MG_SHDICT_E_NOT_FOUND);
  MG_CHECK_INT(set_str(d, "x", "v", 1), 0);
  MG_CHECK_INT(set_str(d, "x", "w", 0), 0);
  fake_now += 2000;
  MG_CHECK(present(d, "x"));
  /* A sub-millisecond TTL still lives one millisecond, never zero. */
  MG_CHECK_INT(set_str(d, "tiny", "v", 0.0001), 0);
  MG_CHECK(present(d, "tiny"));
  fake_now += 1;
  MG_CHECK(!present(d, "tiny"));
  mg_shdict_destroy(d);
}

static void test_flush_expired(void) {
  mg_shdict_t *d = make("sweep", 65536);
  char key[16];
  for (int i = 0; i < 10; i++) {
    snprintf(key, sizeof key, "k%d", i);
    MG_CHECK_INT(set_num(d, key, i, i % 2 ? 1 : 0), 0);
  }
  MG_CHECK_INT(mg_shdict_flush_expired(d, 0), 0);
  fake_now += 1000;
  MG_CHECK_INT(stats(d).entries, 10); /* nothing looked them up yet */
  MG_CHECK_INT(mg_shdict_flush_expired(d, 2), 2);
  MG_CHECK_INT(mg_shdict_flush_expired(d, 0), 3);
  MG_CHECK_INT(stats(d).entries, 5);
  MG_CHECK(get_num(d, "k4") == 4);
  MG_CHECK(isnan(get_num(d, "k5")));
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_incr(void) {
  mg_shdict_t *d = make("incr", 65536);
  double out = 0, zero = 0, ten = 10, left = 0;
  MG_CHECK_INT(mg_shdict_incr(d, "n", 1, 1, NULL, 0, &out), MG_SHDICT_E_NOT_FOUND);
  MG_CHECK(!present(d, "n"));
  MG_CHECK_INT(mg_shdict_incr(d, "n", 1, 5, &ten, 2, &out), 0);
  MG_CHECK(out == 15);
  MG_CHECK_INT(mg_shdict_ttl(d, "n", 1, &left), 1);
  MG_CHECK(left == 2); /* INIT_TTL applies to the entry incr created */
  fake_now += 500;
  MG_CHECK_INT(mg_shdict_incr(d, "n", 1, -0.25, &zero, 60, &out), 0);
  MG_CHECK(out == 14.75);
  MG_CHECK_INT(mg_shdict_ttl(d, "n", 1, &left), 1);
  MG_CHECK(left == 1.5); /* an existing entry keeps its TTL */
  fake_now += 1500;
  MG_CHECK_INT(mg_shdict_incr(d, "n", 1, 1, NULL, 0, &out), MG_SHDICT_E_NOT_FOUND);
  MG_CHECK_INT(mg_shdict_incr(d, "n", 1, 1, &zero, 0, &out), 0);
  MG_CHECK(out == 1);
  MG_CHECK(get_num(d, "n") == 1);

  /* Only numbers can be incremented, and a failed incr leaves the value. */
  char buf[16];
  MG_CHECK_INT(set_str(d, "s", "12", 0), 0);
  MG_CHECK_INT(mg_shdict_incr(d, "s", 1, 1, &zero, 0, &out), MG_SHDICT_E_NOT_NUMBER);
  MG_CHECK_STR(get_str(d, "s", buf, sizeof buf), "12");
  mg_shdict_value_t t = {.type = MG_SHDICT_BOOLEAN, .num = 1};
  MG_CHECK_INT(mg_shdict_set(d, "b", 1, &t, 0), 0);
  MG_CHECK_INT(mg_shdict_incr(d, "b", 1, 1, NULL, 0, &out), MG_SHDICT_E_NOT_NUMBER);
  MG_CHECK_INT(set_num(d, "big", 9007199254740992.0, 0), 0); /* 2^53 */
  MG_CHECK_INT(mg_shdict_incr(d, "big", 3, -1, NULL, 0, &out), 0);
  MG_CHECK(out == 9007199254740991.0);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

/* ---------------------------------------------------------------------------------------
 * Bounded size and eviction */

static char value100[101];

static void fill_value100(void) {
  memset(value100, 'v', 100);
  value100[100] = '\0';
}

static void test_lru_eviction_order(void) {
  mg_shdict_t *d = make("lru", 8192);
  char key[16], buf[128];
  fill_value100();
  /* Equal entries until the first store that must evict: it evicts exactly k000. */
  int i, rc = 0;
  for (i = 0; i < 1000 && rc == 0; i++) {
    snprintf(key, sizeof key, "k%03d", i);
    rc = set_str(d, key, value100, 0);
  }
  MG_CHECK_INT(rc, 1);
  int n = i; /* keys k000..k(n-1) were stored */
  MG_CHECK(n > 20);
  MG_CHECK_INT(stats(d).evictions, 1);
  MG_CHECK(!present(d, "k000"));
  MG_CHECK(present(d, "k002")); /* checks run oldest first, so each get refreshes in order */
  /* k002 was refreshed by the check above and k001 is refreshed now, so the next store
   * evicts k003, the least recently used. */
  MG_CHECK_STR(get_str(d, "k001", buf, sizeof buf), value100);
  MG_CHECK_INT(set_str(d, "new1", value100, 0), 1);
  MG_CHECK(!present(d, "k003"));
  MG_CHECK(present(d, "k001") && present(d, "k002") && present(d, "k004"));
  /* A larger entry needs two neighbouring holes: k005 and k006 go, in LRU order. */
  MG_CHECK_INT(set_str(d, "wider", "0123456789012345678901234567890123456789"
                                   "0123456789012345678901234567890123456789"
                                   "0123456789012345678901234567890123456789", 0), 1);
  MG_CHECK(!present(d, "k005") && !present(d, "k006"));
  MG_CHECK(present(d, "k007") && present(d, "new1") && present(d, "wider"));
  MG_CHECK_INT(stats(d).evictions, 4);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_expired_evicted_first(void) {
  mg_shdict_t *d = make("expfirst", 8192);
  char key[16];
  fill_value100();
  /* k000 is the least recently used; five entries in the middle carry a 1 s TTL. */
  int i;
  for (i = 0; stats(d).bytes_free >= 200; i++) {
    snprintf(key, sizeof key, i >= 10 && i < 15 ? "x%03d" : "k%03d", i);
    MG_CHECK_INT(set_str(d, key, value100, i >= 10 && i < 15 ? 1 : 0), 0);
  }
  MG_CHECK(i > 20);
  size_t before = stats(d).entries;
  fake_now += 2000;
  /* The store needs room: the expired entries go, k000 stays, nothing is forcibly evicted. */
  MG_CHECK_INT(set_str(d, "big", "0123456789012345678901234567890123456789"
                                 "0123456789012345678901234567890123456789"
                                 "0123456789012345678901234567890123456789"
                                 "0123456789012345678901234567890123456789"
                                 "0123456789012345678901234567890123456789",
                       0),
               0);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.evictions, 0);
  MG_CHECK_INT(s.expirations, 5);
  MG_CHECK_INT(s.entries, before - 5 + 1);
  MG_CHECK(present(d, "k000") && present(d, "k001") && present(d, "big"));
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static void test_values_that_cannot_fit(void) {
  mg_shdict_t *d = make("fit", 8192);
  char buf[16];
  size_t cap = stats(d).capacity;
  char *big = malloc(cap + 1);
  MG_CHECK(big != NULL);
  memset(big, 'b', cap + 1);
  MG_CHECK_INT(set_str(d, "a", "old", 0), 0);
  MG_CHECK_INT(set_str(d, "c", "other", 0), 0);
  /* Larger than the whole arena: refused, and nothing changes, not even the old value. */
  mg_shdict_value_t v = {.type = MG_SHDICT_STRING, .str = big, .len = cap};
  MG_CHECK_INT(mg_shdict_set(d, "a", 1, &v, 0), MG_SHDICT_E_NO_MEMORY);
  v.len = cap - 50; /* the entry header and key push it over */
  MG_CHECK_INT(mg_shdict_set(d, "a", 1, &v, 0), MG_SHDICT_E_NO_MEMORY);
  v.len = (size_t)1 << 40;
  MG_CHECK_INT(mg_shdict_add(d, "z", 1, &v, 0), MG_SHDICT_E_NO_MEMORY);
  MG_CHECK_STR(get_str(d, "a", buf, sizeof buf), "old");
  MG_CHECK_INT(stats(d).entries, 2);
  /* Exactly the arena with its header: it fits once everything else is evicted. */
  v.len = cap - 64;
  MG_CHECK_INT(mg_shdict_set(d, "big", 3, &v, 0), 1);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.entries, 1);
  MG_CHECK_INT(s.bytes_free, 0);
  mg_shdict_value_t out;
  MG_CHECK_INT(mg_shdict_get(d, "big", 3, &out, big, cap), 1);
  MG_CHECK_INT(out.len, cap - 64);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  /* And a small entry evicts it again. */
  MG_CHECK_INT(set_str(d, "a", "new", 0), 1);
  MG_CHECK(!present(d, "big"));
  MG_CHECK_STR(get_str(d, "a", buf, sizeof buf), "new");
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  free(big);
  mg_shdict_destroy(d);
}

/* A model of what each key should hold: a value found must be the last one stored; a key
 * deleted or expired must be absent; a key just stored must be present. */
typedef struct model {
  int state; /* 0 absent, 1 string, 2 number */
  unsigned ver;
  size_t len;
  double num;
  uint64_t expires;
} model_t;

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static void fill_pattern(char *p, size_t len, int k, unsigned ver) {
  for (size_t j = 0; j < len; j++) p[j] = (char)((unsigned)k * 31u + ver * 7u + (unsigned)j);
}

#define NKEYS 300
#define NSTR 200 /* keys 0..199 hold strings, 200..299 numbers */

static void test_random_churn_stays_consistent(void) {
  mg_shdict_t *d = make("churn", 65536);
  static model_t m[NKEYS];
  static char val[9000], got[9000];
  memset(m, 0, sizeof m);
  char key[16];
  for (int op = 0; op < 30000; op++) {
    int k = (int)(rnd() % NKEYS), r = (int)(rnd() % 100);
    snprintf(key, sizeof key, "key%d", k);
    size_t klen = strlen(key);
    mg_shdict_value_t v;
    if (r < 5) {
      fake_now += rnd() % 1000;
    } else if (r < 45 && k < NSTR) {
      size_t len = rnd() % 10 == 0 ? rnd() % 9000 : rnd() % 300;
      unsigned ver = m[k].ver + 1;
      double ttl = rnd() % 5 == 0 ? (double)(1 + rnd() % 5) : 0;
      fill_pattern(val, len, k, ver);
      v = (mg_shdict_value_t){.type = MG_SHDICT_STRING, .str = val, .len = len};
      int rc = mg_shdict_set(d, key, klen, &v, ttl);
      if (rc != 0 && rc != 1) MG_FAIL("set %s len %zu: %d", key, len, rc);
      m[k] = (model_t){1, ver, len, 0, ttl > 0 ? fake_now + (uint64_t)(ttl * 1000) : 0};
      if (mg_shdict_get(d, key, klen, &v, got, sizeof got) != 1)
        MG_FAIL("%s missing right after its set", key);
    } else if (r < 45) {
      double out, zero = 0, delta = (double)((int)(rnd() % 11) - 5);
      int rc = mg_shdict_incr(d, key, klen, delta, &zero, 0, &out);
      if (rc != 0 && rc != 1) MG_FAIL("incr %s: %d", key, rc);
      if (m[k].state == 2 && rc == 0 && out != m[k].num + delta && out != delta)
        MG_FAIL("incr %s gave %g, model %g + %g", key, out, m[k].num, delta);
      m[k] = (model_t){2, 0, 0, out, 0};
    } else if (r < 55) {
      int rc = mg_shdict_delete(d, key, klen);
      if (rc < 0) MG_FAIL("delete %s: %d", key, rc);
      m[k].state = 0;
    } else {
      int rc = mg_shdict_get(d, key, klen, &v, got, sizeof got);
      int live = m[k].state && (m[k].expires == 0 || fake_now < m[k].expires);
      if (rc < 0) MG_FAIL("get %s: %d", key, rc);
      if (rc == 1 && !live) MG_FAIL("get %s found a deleted or expired key", key);
      if (rc == 1 && m[k].state == 1) {
        fill_pattern(val, m[k].len, k, m[k].ver);
        if (v.type != MG_SHDICT_STRING || v.len != m[k].len || memcmp(got, val, v.len))
          MG_FAIL("get %s: wrong string (len %zu, model %zu)", key, v.len, m[k].len);
      }
      if (rc == 1 && m[k].state == 2 && (v.type != MG_SHDICT_NUMBER || v.num != m[k].num))
        MG_FAIL("get %s: %g, model %g", key, v.num, m[k].num);
    }
    if (op % 500 == 0) MG_CHECK_INT(mg_shdict_verify(d), 0);
  }
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK(s.evictions > 100); /* the dict was full for most of the run */
  MG_CHECK(s.expirations > 0);
  MG_CHECK(s.entries > 0 && s.bytes_free < s.capacity);
  mg_shdict_destroy(d);
}

/* ---------------------------------------------------------------------------------------
 * Several processes */

#define CHILDREN 4
#define ROUNDS 20000

static void test_incr_exact_across_processes(void) {
  mg_shdict_t *d = mg_shdict_create("procs", 1 << 20);
  MG_CHECK(d != NULL);
  MG_CHECK_INT(set_str(d, "bystander", "kept", 0), 0);
  pid_t pids[CHILDREN];
  for (int c = 0; c < CHILDREN; c++) {
    pids[c] = fork();
    MG_CHECK(pids[c] >= 0);
    if (pids[c] == 0) {
      alarm(90); /* every child bounds itself: an orphan must not outlive a failed run */
      char own[16];
      snprintf(own, sizeof own, "own%d", c);
      double out, zero = 0;
      int bad = 0;
      for (int i = 0; i < ROUNDS; i++) {
        bad |= mg_shdict_incr(d, "hits", 4, 1, &zero, 0, &out) < 0;
        bad |= mg_shdict_incr(d, own, strlen(own), 1, &zero, 0, &out) < 0;
        bad |= mg_shdict_incr(d, "half", 4, 0.5, &zero, 0, &out) < 0;
        if (i % 1000 == 0) bad |= mg_shdict_flush_expired(d, 0) < 0;
      }
      _exit(bad);
    }
  }
  for (int c = 0; c < CHILDREN; c++) {
    int status = wait_child(pids[c], 60000);
    MG_CHECK(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  char buf[16], own[16];
  MG_CHECK(get_num(d, "hits") == CHILDREN * ROUNDS);
  MG_CHECK(get_num(d, "half") == CHILDREN * ROUNDS / 2);
  for (int c = 0; c < CHILDREN; c++) {
    snprintf(own, sizeof own, "own%d", c);
    MG_CHECK(get_num(d, own) == ROUNDS);
  }
  MG_CHECK_STR(get_str(d, "bystander", buf, sizeof buf), "kept");
  MG_CHECK_INT(stats(d).owner_deaths, 0);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

static int hook_fd = -1;

/* Child side: tell the parent the lock is held, then wait to be killed. */
static void hold_lock_hook(mg_shdict_t *d, int stage) {
  if (stage != MG_SHDICT_HOOK_LOCKED) return;
  if (write(hook_fd, "L", 1) != 1) _exit(3);
  for (;;) pause();
}

static void die_mid_change_hook(mg_shdict_t *d, int stage) {
  if (stage == MG_SHDICT_HOOK_DIRTY) raise(SIGKILL);
}

/* A worker killed while it holds the lock (before changing anything): a second worker that
 * was waiting gets the lock, the parent too, and no data is lost. */
static void test_killed_holder_clean(void) {
  mg_shdict_t *d = mg_shdict_create("killed", 65536);
  MG_CHECK(d != NULL);
  MG_CHECK_INT(set_str(d, "keep", "v", 0), 0);
  int p[2];
  MG_CHECK_INT(pipe(p), 0);
  pid_t holder = fork();
  MG_CHECK(holder >= 0);
  if (holder == 0) {
    alarm(30);
    close(p[0]);
    hook_fd = p[1];
    mg_shdict_set_hook(d, hold_lock_hook);
    char buf[8];
    get_str(d, "keep", buf, sizeof buf);
    _exit(4); /* unreachable: the hook never returns */
  }
  close(p[1]);
  struct pollfd pfd = {.fd = p[0], .events = POLLIN};
  char c = 0;
  MG_CHECK_INT(poll(&pfd, 1, 10000), 1);
  MG_CHECK_INT(read(p[0], &c, 1), 1);
  close(p[0]);
  MG_CHECK_INT(c, 'L');
  pid_t waiter = fork();
  MG_CHECK(waiter >= 0);
  if (waiter == 0) {
    alarm(30);
    double out, zero = 0;
    _exit(mg_shdict_incr(d, "n", 1, 1, &zero, 0, &out) == 0 && out == 1 ? 0 : 1);
  }
  usleep(50000); /* let the waiter block on the lock */
  MG_CHECK_INT(waitpid(waiter, NULL, WNOHANG), 0);
  kill(holder, SIGKILL);
  int status = wait_child(holder, 10000);
  MG_CHECK(status != -1 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  status = wait_child(waiter, 10000);
  MG_CHECK(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  char buf[8];
  MG_CHECK_STR(get_str(d, "keep", buf, sizeof buf), "v");
  MG_CHECK(get_num(d, "n") == 1);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.owner_deaths, 1);
  MG_CHECK_INT(s.torn_flushes, 0);
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

/* A worker killed in the middle of a change: the dictionary is flushed (its lists cannot be
 * trusted) and keeps working. */
static void test_killed_holder_mid_change_flushes(void) {
  mg_shdict_t *d = mg_shdict_create("torn", 65536);
  MG_CHECK(d != NULL);
  MG_CHECK_INT(set_str(d, "a", "1", 0), 0);
  MG_CHECK_INT(set_num(d, "b", 2, 0), 0);
  pid_t pid = fork();
  MG_CHECK(pid >= 0);
  if (pid == 0) {
    alarm(30);
    mg_shdict_set_hook(d, die_mid_change_hook);
    set_str(d, "c", "3", 0);
    _exit(4);
  }
  int status = wait_child(pid, 10000);
  MG_CHECK(status != -1 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  mg_shdict_stats_t s = stats(d);
  MG_CHECK_INT(s.owner_deaths, 1);
  MG_CHECK_INT(s.torn_flushes, 1);
  MG_CHECK_INT(s.entries, 0);
  MG_CHECK_INT(s.bytes_free, s.capacity);
  MG_CHECK(!present(d, "a"));
  MG_CHECK_INT(set_str(d, "a", "again", 0), 0);
  char buf[8];
  MG_CHECK_STR(get_str(d, "a", buf, sizeof buf), "again");
  MG_CHECK_INT(mg_shdict_verify(d), 0);
  mg_shdict_destroy(d);
}

/* Leak check for what ASan cannot see: destroy gives the mapping back. */
static int count_mappings(void) {
  FILE *f = fopen("/proc/self/maps", "r");
  if (!f) return -1;
  int n = 0, ch;
  while ((ch = fgetc(f)) != EOF) n += ch == '\n';
  fclose(f);
  return n;
}

static void test_destroy_unmaps(void) {
  mg_shdict_destroy(mg_shdict_create("warm", 65536));
  int before = count_mappings();
  for (int i = 0; i < 8; i++) mg_shdict_destroy(mg_shdict_create("tmp", 65536 + 4096 * i));
  MG_CHECK(before > 0);
  MG_CHECK_INT(count_mappings(), before);
  mg_shdict_destroy(NULL);
}

int main(void) {
  alarm(120); /* a deadlock fails the run instead of hanging it */
  MG_RUN(test_create_checks_arguments);
  MG_RUN(test_set_get_each_type);
  MG_RUN(test_get_small_buffer);
  MG_RUN(test_add_and_replace);
  MG_RUN(test_delete_and_flush_all);
  MG_RUN(test_bad_arguments_change_nothing);
  MG_RUN(test_error_table);
  MG_RUN(test_ttl_expiry);
  MG_RUN(test_flush_expired);
  MG_RUN(test_incr);
  MG_RUN(test_lru_eviction_order);
  MG_RUN(test_expired_evicted_first);
  MG_RUN(test_values_that_cannot_fit);
  MG_RUN(test_random_churn_stays_consistent);
  MG_RUN(test_incr_exact_across_processes);
  MG_RUN(test_killed_holder_clean);
  MG_RUN(test_killed_holder_mid_change_flushes);
  MG_RUN(test_destroy_unmaps);
  return mg_test_summary();
}
