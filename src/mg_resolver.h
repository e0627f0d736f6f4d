/* mg_resolver: resolves upstream host names without blocking the loop (uv_getaddrinfo on
 * libuv's thread pool) and caches each answer for a TTL. IP literals resolve synchronously.
 * One resolver per worker loop. */
#ifndef MG_RESOLVER_H
#define MG_RESOLVER_H

#include <uv.h>

typedef struct mg_resolver mg_resolver_t;

/* Called with status 0 and the address (valid only during the call), or a negative libuv
 * error (UV_EAI_NONAME, ...) and NULL. */
typedef void (*mg_resolve_cb)(void *data, int status, const struct sockaddr *addr);

/* Creates a resolver on LOOP. */
mg_resolver_t *mg_resolver_new(uv_loop_t *loop);

/* Cancels pending lookups (their callbacks are not called) and frees the resolver. Safe
 * from inside a resolve callback. A getaddrinfo still running finishes on the loop and frees
 * itself there, so run the loop before uv_loop_close. */
void mg_resolver_free(mg_resolver_t *r);

/* Resolves HOST:PORT (IPv4 or IPv6; the first address getaddrinfo returns). A cached answer
 * younger than TTL seconds (a failure: younger than TTL and 1 s; TTL <= 0: not from the
 * cache), or an IP literal ("[::1]" too), calls CB before returning and the function
 * returns 1. Otherwise the lookup starts, CB is called later from the loop, and the function
 * returns 0 and stores a handle in *PENDING (may be NULL) that mg_resolver_cancel accepts.
 * Concurrent lookups of one name share one getaddrinfo call. Returns a negative libuv error
 * (UV_EINVAL for a bad argument) if the lookup could not start. */
int mg_resolver_resolve(mg_resolver_t *r, const char *host, int port, double ttl,
                        mg_resolve_cb cb, void *data, void **pending);

/* Cancels a pending lookup's callback (the request that waited for it went away). PENDING
 * is valid until its callback has been called or it is cancelled; NULL is ignored. The
 * getaddrinfo itself goes on and fills the cache. */
void mg_resolver_cancel(mg_resolver_t *r, void *pending);

#endif
