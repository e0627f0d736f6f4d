/* mg_buf: a growable byte buffer, the one container the HTTP engine builds heads and bodies in.
 * The struct is embedded by its owner (mg_buf_init / mg_buf_dispose); memory comes from malloc. */
#ifndef MG_BUF_H
#define MG_BUF_H

#include <stddef.h>
#include <string.h>

typedef struct mg_buf {
  char *data;
  size_t len;
  size_t cap;
} mg_buf_t;

/* Starts an empty buffer (no allocation). */
void mg_buf_init(mg_buf_t *b);

/* Appends the decimal digits of V; returns 0 or -1 (out of memory). No printf: it is on the
 * path of every response. */
int mg_buf_append_uint(mg_buf_t *b, unsigned long long v);

/* Frees the memory and leaves an empty buffer. */
void mg_buf_dispose(mg_buf_t *b);

/* Makes room for N more bytes; returns 0, or -1 when out of memory (the buffer is unchanged). */
int mg_buf_reserve(mg_buf_t *b, size_t n);

/* Appends N bytes when they do not fit yet (the slow path of mg_buf_append). */
int mg_buf_append_grow(mg_buf_t *b, const void *p, size_t n);

/* Appends N bytes; returns 0 or -1 (out of memory). Inline: the HTTP engine appends a few
 * dozen short pieces per request, and the common case is a memcpy into spare room. */
static inline int mg_buf_append(mg_buf_t *b, const void *p, size_t n) {
  if (b->cap - b->len >= n && n) {
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
  }
  return mg_buf_append_grow(b, p, n);
}

/* Appends a NUL-terminated string. */
int mg_buf_puts(mg_buf_t *b, const char *s);

/* Appends printf-formatted text. */
int mg_buf_printf(mg_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Removes the first N bytes (N <= len). */
void mg_buf_consume(mg_buf_t *b, size_t n);

/* Empties the buffer; frees its memory if it grew beyond KEEP bytes. */
void mg_buf_reset(mg_buf_t *b, size_t keep);

#endif
