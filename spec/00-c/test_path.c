/* test_path: mg_path_normalize, rule by rule, then a seeded property test that checks random
 * paths against an independent model of the rules (split, decode, resolve with a stack). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mg_path.h"
#include "mg_test.h"

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

/* Normalises IN (LEN bytes) into a buffer of exactly LEN + 1 bytes, so that ASan sees any
 * write past the promised bound. Returns a static copy of the result, or NULL on -1. */
static const char *norm_n(const char *in, size_t len) {
  static char result[4096];
  char *out = malloc(len + 1);
  size_t outlen = (size_t)-1;
  int rc = mg_path_normalize(in, len, out, &outlen);
  if (rc == 0) {
    if (outlen > len || strlen(out) != outlen) {
      free(out);
      return "(bad length)";
    }
    memcpy(result, out, outlen + 1);
  }
  free(out);
  return rc == 0 ? result : NULL;
}

static const char *norm(const char *in) { return norm_n(in, strlen(in)); }

/* Checks that IN normalises to WANT, and that WANT is a fixed point (idempotence). */
#define CHECK_NORM(in, want)                                               \
  do {                                                                     \
    const char *got_ = norm(in);                                           \
    if (!got_) MG_FAIL("normalize(\"%s\") failed, expected \"%s\"", in, want); \
    MG_CHECK_STR(got_, want);                                              \
    char again_[4096];                                                     \
    strcpy(again_, got_);                                                  \
    MG_CHECK_STR(norm(again_), want);                                      \
  } while (0)

#define CHECK_BAD(in)                                                      \
  do {                                                                     \
    const char *got_ = norm(in);                                           \
    if (got_) MG_FAIL("normalize(\"%s\") == \"%s\", expected an error", in, got_); \
  } while (0)

/* ------------------------------------------------------------------------------------------
 * Rules
 * ---------------------------------------------------------------------------------------- */

static void test_plain_paths_unchanged(void) {
  CHECK_NORM("/", "/");
  CHECK_NORM("/a", "/a");
  CHECK_NORM("/users/42", "/users/42");
  CHECK_NORM("/a-b_c~d.e", "/a-b_c~d.e");
  CHECK_NORM("/:x/*/@!$&'()+,;=", "/:x/*/@!$&'()+,;=");
}

static void test_trailing_slash_kept(void) {
  CHECK_NORM("/a/", "/a/");
  CHECK_NORM("/a/b/", "/a/b/");
  CHECK_NORM("/a//", "/a/");
}

static void test_repeated_slashes_collapse(void) {
  CHECK_NORM("//admin", "/admin");
  CHECK_NORM("/a//b", "/a/b");
  CHECK_NORM("/a///b////c", "/a/b/c");
  CHECK_NORM("///", "/");
  CHECK_NORM("//", "/");
}

static void test_dot_segments(void) {
  CHECK_NORM("/public/../admin", "/admin");
  CHECK_NORM("/a/./b", "/a/b");
  CHECK_NORM("/./a", "/a");
  CHECK_NORM("/.", "/");
  CHECK_NORM("/a/.", "/a/");
  CHECK_NORM("/a/b/..", "/a/");
  CHECK_NORM("/a/..", "/");
  CHECK_NORM("/a/b/../../c", "/c");
  CHECK_NORM("/a/b/../c/./d/", "/a/c/d/");
  CHECK_NORM("/a//..//b", "/b");
  /* Not dot segments: only exactly "." and ".." are. */
  CHECK_NORM("/...", "/...");
  CHECK_NORM("/..a/a..", "/..a/a..");
  CHECK_NORM("/.hidden", "/.hidden");
}

static void test_above_root_is_error(void) {
  CHECK_BAD("/..");
  CHECK_BAD("/../admin");
  CHECK_BAD("/a/../..");
  CHECK_BAD("/a/../../b");
  CHECK_BAD("//..");
  CHECK_BAD("/./..");
}

static void test_unreserved_escapes_decoded(void) {
  CHECK_NORM("/%61dmin", "/admin");
  CHECK_NORM("/%41%5a%7e%2d%2e%5f%30%39", "/AZ~-._09");
  CHECK_NORM("/%7Euser", "/~user");
}

static void test_encoded_dots_resolved_after_decoding(void) {
  CHECK_NORM("/x/%2e%2e/admin", "/admin");
  CHECK_NORM("/x/%2E%2E/admin", "/admin");
  CHECK_NORM("/x/.%2e/admin", "/admin");
  CHECK_NORM("/a/%2e/b", "/a/b");
  CHECK_BAD("/%2e%2e/admin");
  CHECK_BAD("/%2e%2e");
}

static void test_reserved_escapes_kept_upper_case(void) {
  CHECK_NORM("/a%2Fb", "/a%2Fb");
  CHECK_NORM("/a%2fb", "/a%2Fb");
  CHECK_NORM("/%3a%40%3F%23", "/%3A%40%3F%23");
  CHECK_NORM("/%25", "/%25");
  CHECK_NORM("/%2541", "/%2541");  /* a literal "%41", not a second decode */
  CHECK_NORM("/%c3%a9", "/%C3%A9");
  CHECK_NORM("/%20", "/%20");
  /* An encoded slash does not separate, so "%2F.." is one ordinary segment. */
  CHECK_NORM("/a/%2f..", "/a/%2F..");
  CHECK_NORM("/a/..%2f", "/a/..%2F");
  CHECK_NORM("/a/%2e%2e%2f", "/a/..%2F");
}

static void test_backslash_is_literal(void) {
  CHECK_NORM("/a\\..\\b", "/a\\..\\b");
  CHECK_NORM("/a/..\\b", "/a/..\\b");
  CHECK_NORM("/\\\\admin", "/\\\\admin");
  CHECK_NORM("/%5c", "/%5C");
}

static void test_malformed_escapes(void) {
  CHECK_BAD("/%zz");
  CHECK_BAD("/%4");
  CHECK_BAD("/%");
  CHECK_BAD("/a%g0");
  CHECK_BAD("/%%41");
  CHECK_BAD("/%4g");
  CHECK_BAD("/a/%");
}

static void test_control_bytes_rejected(void) {
  CHECK_BAD("/%00");
  CHECK_BAD("/a%00b");
  CHECK_BAD("/%0a");
  CHECK_BAD("/%0D%0A");
  CHECK_BAD("/%1f");
  CHECK_BAD("/%7F");
  CHECK_BAD("/a\tb");
  CHECK_BAD("/a\rb");
  CHECK_BAD("/a\x7f");
  MG_CHECK(norm_n("/a\0b", 4) == NULL);  /* a raw NUL inside the length */
}

static void test_high_bytes_copied(void) {
  CHECK_NORM("/caf\xc3\xa9", "/caf\xc3\xa9");
  CHECK_NORM("/\xff/", "/\xff/");
}

static void test_invalid_start(void) {
  CHECK_BAD("");
  CHECK_BAD("a/b");
  CHECK_BAD("%2Fa");
  CHECK_BAD("*");
  CHECK_BAD("http://x/a");
  char out[4];
  size_t n;
  MG_CHECK_INT(mg_path_normalize(NULL, 0, out, &n), -1);
  MG_CHECK_INT(mg_path_normalize("/a", 2, NULL, &n), -1);
}

static void test_length_and_terminator(void) {
  /* Normalises a prefix of a longer buffer: bytes past LEN must not be read. */
  const char *in = "/a/b/../c/%2e%2e/dEXTRA";
  char out[64];
  size_t n = 0;
  memset(out, 'x', sizeof out);
  MG_CHECK_INT(mg_path_normalize(in, 17, out, &n), 0);
  MG_CHECK_INT(n, 3);
  MG_CHECK_STR(out, "/a/");
  /* The result may be written over the same buffer shape the caller promised: len + 1. */
  MG_CHECK_INT(mg_path_normalize("/%61", 4, out, &n), 0);
  MG_CHECK_INT(n, 2);
  MG_CHECK_STR(out, "/a");
  /* outlen is optional. */
  MG_CHECK_INT(mg_path_normalize("/b", 2, out, NULL), 0);
  MG_CHECK_STR(out, "/b");
}

/* ------------------------------------------------------------------------------------------
 * Property test
 * ---------------------------------------------------------------------------------------- */

static uint64_t prng_state;

static uint32_t prng(void) {
  /* xorshift64*: deterministic, so a failure reproduces from the seed. */
  prng_state ^= prng_state >> 12;
  prng_state ^= prng_state << 25;
  prng_state ^= prng_state >> 27;
  return (uint32_t)((prng_state * 2685821657736338717ull) >> 32);
}

static int hexdig(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* The model: split on '/', decode each segment on its own, resolve with a stack of segments,
 * then join; a path whose last segment was "", "." or ".." keeps a trailing slash. Written
 * independently of mg_path.c's in-place pass, so agreement means something. */
static int model(const char *in, size_t len, char *out) {
  static char segs[256][256];
  size_t nsegs = 0, i = 1;
  int trailing = 0;
  if (len == 0 || in[0] != '/') return -1;
  for (;;) {
    char seg[256];
    size_t n = 0;
    while (i < len && in[i] != '/') {
      unsigned char c = (unsigned char)in[i];
      if (c < 0x20 || c == 0x7f) return -1;
      if (c == '%') {
        if (i + 2 >= len || hexdig(in[i + 1]) < 0 || hexdig(in[i + 2]) < 0) return -1;
        int v = hexdig(in[i + 1]) * 16 + hexdig(in[i + 2]);
        if (v < 0x20 || v == 0x7f) return -1;
        if (strchr("-._~", v) || (v >= 'a' && v <= 'z') || (v >= 'A' && v <= 'Z') ||
            (v >= '0' && v <= '9')) {
          seg[n++] = (char)v;
        } else {
          n += (size_t)sprintf(seg + n, "%%%02X", v);
        }
        i += 3;
      } else {
        seg[n++] = (char)c;
        i++;
      }
    }
    seg[n] = '\0';
    int last = i >= len;
    trailing = last && (n == 0 || !strcmp(seg, ".") || !strcmp(seg, ".."));
    if (!strcmp(seg, "..")) {
      if (nsegs == 0) return -1;
      nsegs--;
    } else if (n > 0 && strcmp(seg, ".") != 0) {
      strcpy(segs[nsegs++], seg);
    }
    if (last) break;
    i++;
  }
  size_t o = 0;
  out[o++] = '/';
  for (size_t k = 0; k < nsegs; k++) {
    o += (size_t)sprintf(out + o, "%s", segs[k]);
    if (k + 1 < nsegs || trailing) out[o++] = '/';
  }
  out[o] = '\0';
  return 0;
}

static void test_property_random_paths(void) {
  static const char *tokens[] = {
    "/", "/", "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%41", "%7e", "%25",
    "a", "b", "~", "\\", "%3a", ":", "*", "\xc3\xa9", "%zz", "%00", "%4", "x.y",
  };
  const size_t ntok = sizeof tokens / sizeof tokens[0];
  size_t ok = 0, errors = 0;
  prng_state = 0x6d6f6f6e67617465ull; /* "moongate" */
  for (int iter = 0; iter < 20000; iter++) {
    char in[256], want[512];
    size_t len = 0;
    in[len++] = '/';
    size_t ntokens = 1 + prng() % 12;
    for (size_t t = 0; t < ntokens; t++) {
      /* The malformed tokens are the last three: pick them rarely, or most paths fail. */
      size_t k = prng() % (ntok * 8);
      k = k < (ntok - 3) * 8 ? k / 8 : ntok - 3 + k % 3;
      size_t tl = strlen(tokens[k]);
      memcpy(in + len, tokens[k], tl);
      len += tl;
    }
    in[len] = '\0';
    const char *got = norm_n(in, len);
    int want_rc = model(in, len, want);
    if (!got) {
      if (want_rc == 0) MG_FAIL("\"%s\": error, model says \"%s\"", in, want);
      errors++;
      continue;
    }
    ok++;
    if (want_rc != 0) MG_FAIL("\"%s\" -> \"%s\", model says error", in, got);
    if (strcmp(got, want) != 0) MG_FAIL("\"%s\" -> \"%s\", model says \"%s\"", in, got, want);

    char out[256];
    strcpy(out, got);
    size_t olen = strlen(out);
    MG_CHECK(out[0] == '/');
    MG_CHECK(olen <= len);
    MG_CHECK(strstr(out, "//") == NULL);
    MG_CHECK(strstr(out, "/./") == NULL);
    MG_CHECK(strstr(out, "/../") == NULL);
    MG_CHECK(!(olen >= 2 && strcmp(out + olen - 2, "/.") == 0));
    MG_CHECK(!(olen >= 3 && strcmp(out + olen - 3, "/..") == 0));
    /* An encoded slash never becomes a separator: the output has no more slashes than the
     * input had raw ones. And every escape left is two upper-case hex digits. */
    size_t in_slashes = 0, out_slashes = 0;
    for (size_t k = 0; k < len; k++) in_slashes += in[k] == '/';
    for (size_t k = 0; k < olen; k++) {
      out_slashes += out[k] == '/';
      if (out[k] == '%') {
        MG_CHECK(k + 2 < olen);
        MG_CHECK(strchr("0123456789ABCDEF", out[k + 1]) && out[k + 1]);
        MG_CHECK(strchr("0123456789ABCDEF", out[k + 2]) && out[k + 2]);
      }
    }
    MG_CHECK(out_slashes <= in_slashes);
    const char *again = norm(out);
    MG_CHECK(again != NULL);
    MG_CHECK_STR(again, out);
  }
  /* The generator must exercise both outcomes, or the test proves little. */
  MG_CHECK(ok > 5000);
  MG_CHECK(errors > 1000);
}

int main(void) {
  MG_RUN(test_plain_paths_unchanged);
  MG_RUN(test_trailing_slash_kept);
  MG_RUN(test_repeated_slashes_collapse);
  MG_RUN(test_dot_segments);
  MG_RUN(test_above_root_is_error);
  MG_RUN(test_unreserved_escapes_decoded);
  MG_RUN(test_encoded_dots_resolved_after_decoding);
  MG_RUN(test_reserved_escapes_kept_upper_case);
  MG_RUN(test_backslash_is_literal);
  MG_RUN(test_malformed_escapes);
  MG_RUN(test_control_bytes_rejected);
  MG_RUN(test_high_bytes_copied);
  MG_RUN(test_invalid_start);
  MG_RUN(test_length_and_terminator);
  MG_RUN(test_property_random_paths);
  return mg_test_summary();
}
