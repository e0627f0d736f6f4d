/* mg_write: try_write first, then a copied write request for the rest (see mg_write.h). */
#include "mg_write.h"

#include <stdlib.h>
#include <string.h>

ssize_t mg_write(uv_stream_t *s, const char *data, size_t len, size_t queued, uv_write_cb cb,
                 void *owner) {
  if (queued == 0) {
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    int n = uv_try_write(s, &b, 1);
    if (n == (int)len) return 0;
    if (n < 0 && n != UV_EAGAIN) return n;
    if (n > 0) {
      data += n;
      len -= (size_t)n;
    }
  }
  mg_write_t *w = malloc(sizeof *w + len);
  if (!w) return UV_ENOMEM;
  memcpy(w->data, data, len);
  w->owner = owner;
  w->len = len;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
  int rc = uv_write(&w->req, s, &b, 1, cb);
  if (rc != 0) {
    free(w);
    return rc;
  }
  return (ssize_t)len;
}
