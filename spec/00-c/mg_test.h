/* mg_test: the smallest unit-test harness that does the job. A test file defines
 * `static void test_x(void)` functions, lists them in main with MG_RUN(test_x), and ends with
 * `return mg_test_summary();`, which prints "<file>: N passed, N failed" (scripts/test.sh
 * adds these up) and returns non-zero on failure. A failed check reports file:line and the
 * two values, and ends the current test (later tests still run). */
#ifndef MG_TEST_H
#define MG_TEST_H

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

static int mg_test_passed, mg_test_failed;
static jmp_buf mg_test_jmp;
static const char *mg_test_name;

#define MG_FAIL(...)                                                           \
  do {                                                                         \
    fprintf(stderr, "  FAIL %s (%s:%d): ", mg_test_name, __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__);                                              \
    fputc('\n', stderr);                                                       \
    longjmp(mg_test_jmp, 1);                                                   \
  } while (0)

#define MG_CHECK(cond) do { if (!(cond)) MG_FAIL("%s", #cond); } while (0)
#define MG_CHECK_INT(a, b)                                                      \
  do { long long a_ = (long long)(a), b_ = (long long)(b);                      \
       if (a_ != b_) MG_FAIL("%s == %lld, expected %lld", #a, a_, b_); } while (0)
#define MG_CHECK_STR(a, b)                                                      \
  do { const char *a_ = (a), *b_ = (b);                                         \
       if (!a_ || !b_ || strcmp(a_, b_) != 0)                                   \
         MG_FAIL("%s == \"%s\", expected \"%s\"", #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); \
  } while (0)
#define MG_CHECK_MEM(a, alen, b)                                                \
  do { const char *a_ = (a), *b_ = (b); size_t al_ = (alen);                    \
       if (al_ != strlen(b_) || memcmp(a_, b_, al_) != 0)                       \
         MG_FAIL("%s == \"%.*s\", expected \"%s\"", #a, (int)al_, a_, b_); } while (0)

#define MG_RUN(fn)                                                             \
  do {                                                                         \
    mg_test_name = #fn;                                                        \
    if (setjmp(mg_test_jmp) == 0) {                                            \
      fn();                                                                    \
      mg_test_passed++;                                                        \
      fprintf(stderr, "  ok   %s\n", #fn);                                     \
    } else {                                                                   \
      mg_test_failed++;                                                        \
    }                                                                          \
  } while (0)

static inline int mg_test_summary(void) {
  printf("%s: %d passed, %d failed\n", __BASE_FILE__, mg_test_passed, mg_test_failed);
  return mg_test_failed ? 1 : 0;
}

#endif
