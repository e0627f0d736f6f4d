/* mg_proxy: the default handler: proxies a request to its route's upstream and streams the
 * response back, with back-pressure both ways, timeouts, one safe retry and passive ejection.
 * Upstream connections come from mg_upstream (pool or fresh connect). */
#ifndef MG_PROXY_H
#define MG_PROXY_H

#include "mg_request.h"
#include "mg_upstream.h"

/* Starts proxying REQ to UP; the proxy answers (or fails) the request itself. */
void mg_proxy_start(mg_request_t *req, mg_upstream_t *up);

/* Sets up the response parser settings (once per process). */
void mg_proxy_init(void);

/* Frees the exchanges kept for reuse (at worker exit). */
void mg_proxy_free_spares(void);

#endif
