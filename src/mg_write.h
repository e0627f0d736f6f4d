/* mg_write: writes to a libuv stream without a queue when it can. uv_try_write goes first;
 * only the bytes the socket did not take are copied into a write request. The client side
 * (mg_server) and the upstream side (mg_proxy) both write this way. */
#ifndef MG_WRITE_H
#define MG_WRITE_H

#include <sys/types.h>
#include <uv.h>

/* A queued write; the callback recovers it with container_of(req, mg_write_t, req), reads
 * OWNER and LEN, and frees it with free(). */
typedef struct mg_write {
  uv_write_t req;
  void *owner;          /* the connection the bytes belong to */
  size_t len;           /* bytes queued by this write */
  char data[];
} mg_write_t;

/* Writes LEN bytes of DATA to S. QUEUED is what the owner already has queued on S: while it
 * is non-zero nothing is tried at once, so bytes keep their order. Returns the number of
 * bytes queued for later (0 when the socket took everything), or a negative libuv error.
 * When bytes were queued, CB runs once they are written or failed. */
ssize_t mg_write(uv_stream_t *s, const char *data, size_t len, size_t queued, uv_write_cb cb,
                 void *owner);

#endif
