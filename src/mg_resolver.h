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

/* Cancels pending lookups (their callbacks are not called) and frees the resolver. */
void mg_resolver_free(mg_resolver_t *r);

/* Resolves HOST:PORT (IPv4 or IPv6). A cached answer younger than TTL seconds, or an IP
 * literal, calls CB before returning and the function returns 1. Otherwise the lookup starts,
 * CB is called later from the loop, and the function returns 0 and stores a handle in
 * *PENDING (may be NULL) that mg_resolver_cancel accepts. Concurrent lookups of one name share
 * one getaddrinfo call. Returns a negative libuv error if the lookup could not start. */
int mg_resolver_resolve(mg_resolver_t *r, const char *host, int port, double ttl,
                        mg_resolve_cb cb, void *data, void **pending);

/* Cancels a pending lookup's callback (the request that waited for it went away). */
void mg_resolver_cancel(mg_resolver_t *r, void *pending);

#endif
