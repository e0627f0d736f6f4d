/* mg_path: normalises a request path before routing. The router compares bytes, so every
 * spelling of one path must reach it as the same bytes, and no spelling may climb out of the
 * directory it names: `/public/../admin`, `//admin`, `/%61dmin` and `/x/%2e%2e/admin` all
 * become `/admin`. The work is one left-to-right pass that writes into the caller's buffer,
 * decoding a segment first and only then deciding whether it is a dot segment, so that an
 * encoded dot is treated exactly like a plain one. */

#include "mg_path.h"

/* ------------------------------------------------------------------------------------------
 * Byte classes
 * ---------------------------------------------------------------------------------------- */

static const char hex_upper[] = "0123456789ABCDEF";

static int hex_value(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* RFC 3986 section 2.3: these mean the same whether encoded or not, so decoding them never
 * changes what the path names, and it makes `/%61dmin` the same bytes as `/admin`. */
static int is_unreserved(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '.' || c == '_' || c == '~';
}

/* NUL and the other control bytes have no business in a path. Refusing them, raw or encoded,
 * keeps them out of logs, upstream request lines and every C string made from the path. */
static int is_control(unsigned char c) {
  return c < 0x20 || c == 0x7f;
}

/* ------------------------------------------------------------------------------------------
 * Normalisation
 * ---------------------------------------------------------------------------------------- */

/* Copies one segment (up to the next '/' or the end) from IN[*I] to OUT[*O], decoding the
 * unreserved escapes and upper-casing the others. Returns 0, or -1 on a bad byte or escape. */
static int copy_segment(const unsigned char *in, size_t len, size_t *i, char *out, size_t *o) {
  size_t ii = *i, oo = *o;
  while (ii < len && in[ii] != '/') {
    unsigned char c = in[ii];
    if (c == '%') {
      if (len - ii < 3) return -1;
      int hi = hex_value(in[ii + 1]), lo = hex_value(in[ii + 2]);
      if (hi < 0 || lo < 0) return -1;
      unsigned char v = (unsigned char)(hi * 16 + lo);
      if (is_control(v)) return -1;
      if (is_unreserved(v)) {
        out[oo++] = (char)v;
      } else {
        /* Reserved characters keep their escape: %2F must stay data, never a separator. */
        out[oo++] = '%';
        out[oo++] = hex_upper[hi];
        out[oo++] = hex_upper[lo];
      }
      ii += 3;
    } else if (is_control(c)) {
      return -1;
    } else {
      /* Everything else is kept as it came, backslash included: it is not a separator here,
       * and an upstream that thinks otherwise must not be reached through a rewrite of ours. */
      out[oo++] = (char)c;
      ii++;
    }
  }
  *i = ii;
  *o = oo;
  return 0;
}

int mg_path_normalize(const char *in, size_t len, char *out, size_t *outlen) {
  const unsigned char *p = (const unsigned char *)in;
  if (!in || !out || len == 0 || p[0] != '/') return -1;

  /* Invariant at the top of each round: OUT[0..o) ends with '/', and I is the first byte of
   * the next input segment. Every input byte yields at most one output byte (an escape of
   * three yields three or one), so OUT never outgrows LEN + 1. */
  size_t i = 1, o = 1;
  out[0] = '/';
  while (i <= len) {
    size_t seg = o;
    if (copy_segment(p, len, &i, out, &o) < 0) return -1;
    size_t n = o - seg;
    int more = i < len; /* copy_segment stopped on a '/' */

    if (n == 1 && out[seg] == '.') {
      o = seg; /* "." names the directory we are in: drop it, keep the slash before it */
    } else if (n == 2 && out[seg] == '.' && out[seg + 1] == '.') {
      if (seg == 1) return -1; /* above the root: refuse rather than clamp, it is an attack */
      o = seg - 1;             /* back onto the slash that ends the parent segment ... */
      while (out[o - 1] != '/') o--; /* ... and over the parent, keeping the slash before it */
    } else if (n > 0 && more) {
      out[o++] = '/';
    }
    /* An empty segment (from "//" or a trailing '/') writes nothing: OUT already ends in '/'.
     * A trailing dot segment leaves its slash behind, as RFC 3986 section 5.2.4 does. */
    i++;
  }
  out[o] = '\0';
  if (outlen) *outlen = o;
  return 0;
}
