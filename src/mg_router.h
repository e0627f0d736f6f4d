/* mg_router: picks the route for a request from method, host and normalised path.
 * Compiled once per config generation from the route table; read-only afterwards.
 *
 * Path patterns: "/a/b" (exact), "/a/:id/b" (`:name` matches one non-empty segment),
 * "/a/*" (prefix: matches "/a" and everything below it; the rest is captured as "*").
 * Precedence, most specific first (documented in README.md):
 *   1. host: exact host routes, then wildcard hosts (longer suffix first), then any-host routes;
 *   2. path, compared segment by segment from the left: a literal segment beats `:param`,
 *      which beats `*`; so an exact path beats a param path, which beats a prefix, and a
 *      longer prefix beats a shorter one;
 *   3. among routes with the same pattern, one that names the method beats one for any method.
 * If the path matches under some route but no route accepts the method: MG_ROUTE_NO_METHOD
 * (405 with Allow). Nothing matches: MG_ROUTE_NOT_FOUND (404). */
#ifndef MG_ROUTER_H
#define MG_ROUTER_H

#include <stddef.h>
#include "mg_config.h"

#define MG_ROUTER_MAX_PARAMS 16

typedef struct mg_router mg_router_t;

typedef struct mg_route_param {
  const char *name; size_t name_len;   /* points into the router ("*" for the rest) */
  const char *value; size_t value_len; /* points into the path passed to match */
} mg_route_param_t;

typedef enum { MG_ROUTE_FOUND = 0, MG_ROUTE_NOT_FOUND = -1, MG_ROUTE_NO_METHOD = -2 } mg_route_result_t;

typedef struct mg_route_match {
  const mg_route_conf_t *route;        /* set when MG_ROUTE_FOUND */
  size_t route_index;                  /* index into the route array given to mg_router_new */
  mg_route_param_t params[MG_ROUTER_MAX_PARAMS];
  size_t nparams;
  unsigned allowed_methods;            /* MG_M_* bits the path accepts (for 405's Allow) */
  const char *rest; size_t rest_len;   /* the part matched by a trailing "*", if any */
} mg_route_match_t;

/* Builds a router for the routes that serve listener LISTEN (NULL = the default listener);
 * ROUTES must outlive the router. Returns NULL and writes a message to ERR (ERRLEN bytes)
 * on a bad pattern (the config validator reports these with file:line first). */
mg_router_t *mg_router_new(const mg_route_conf_t *routes, size_t nroutes, const char *listen,
                           char *err, size_t errlen);

/* Frees the router. */
void mg_router_free(mg_router_t *r);

/* Matches METHOD (MG_M_* bit), HOST (lower-case, no port; may be NULL) and PATH (normalised,
 * PATH_LEN bytes). Fills *m. No allocation; safe to call from any worker concurrently. */
mg_route_result_t mg_router_match(const mg_router_t *r, unsigned method, const char *host,
                                  size_t host_len, const char *path, size_t path_len,
                                  mg_route_match_t *m);

/* Returns the MG_M_* bit for a method name (e.g. "GET"), MG_M_OTHER for other valid tokens. */
unsigned mg_router_method_bit(const char *name, size_t len);

#endif
