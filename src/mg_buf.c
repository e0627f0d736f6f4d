/* mg_buf: a growable byte buffer (see mg_buf.h). Growth doubles, starting at 256 bytes. */
#include "mg_buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void mg_buf_init(mg_buf_t *b) { b->data = NULL; b->len = b->cap = 0; }

void mg_buf_dispose(mg_buf_t *b) {
  free(b->data);
  mg_buf_init(b);
}

int mg_buf_reserve(mg_buf_t *b, size_t n) {
  if (b->cap - b->len >= n) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < n) {
    if (cap > ((size_t)-1) / 2) return -1;
    cap *= 2;
  }
  char *p = realloc(b->data, cap);
  if (!p) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

int mg_buf_append_grow(mg_buf_t *b, const void *p, size_t n) {
  if (n == 0) return 0;
  if (mg_buf_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

int mg_buf_puts(mg_buf_t *b, const char *s) { return mg_buf_append(b, s, strlen(s)); }

int mg_buf_printf(mg_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || mg_buf_reserve(b, (size_t)n + 1) != 0) return -1;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
  return 0;
}

void mg_buf_consume(mg_buf_t *b, size_t n) {
  if (n >= b->len) { b->len = 0; return; }
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

void mg_buf_reset(mg_buf_t *b, size_t keep) {
  if (b->cap > keep) mg_buf_dispose(b);
  else b->len = 0;
}

int mg_buf_append_uint(mg_buf_t *b, unsigned long long v) {
  char tmp[24];
  size_t n = sizeof tmp;
  do tmp[--n] = (char)('0' + v % 10); while ((v /= 10) != 0);
  return mg_buf_append(b, tmp + n, sizeof tmp - n);
}
