/* mg_router: picks the route for a request from method, host and normalised path.
 * Compiled once per config generation from the route table; read-only afterwards.
 *
 * Path patterns, compared segment by segment with the path given to match:
 *   "/a/b"      exact; the trailing slash counts ("/a/b" does not match "/a/b/");
 *   "/a/:id/b"  `:name` matches one non-empty segment (the name is the rest of the segment);
 *   "/a/" "*"   (one string: a C comment cannot hold slash-star) prefix: matches "/a",
 *               "/a/" and everything below "/a/"; the part after "/a/" is captured as
 *               param "*" and in m->rest ("" for "/a" and "/a/").
 * Literal segments of a pattern are normalised like request paths ("%7e" is "~").
 * Pattern errors (mg_router_new returns NULL): not starting with '/', '*' anywhere but as the
 * whole last segment, an empty `:` name, a duplicate param name, more than
 * MG_ROUTER_MAX_PARAMS captures, an empty segment ("//"), a "." or ".." segment, a bad escape.
 * Hosts: "api.example.com" (exact, case-insensitive), "*.example.com" (one or more labels
 * before ".example.com", not "example.com" itself), "*" (any host, as when none is named).
 *
 * Precedence, most specific first (documented in README.md):
 *   1. host: exact host routes, then wildcard hosts (longer suffix first), then any-host routes;
 *   2. path, compared segment by segment from the left: a literal segment beats `:param`,
 *      which beats `*`; so an exact path beats a param path, which beats a prefix, and a
 *      longer prefix beats a shorter one; a branch that dead-ends later is backtracked
 *      ("/a/:x/c" serves "/a/b/c" even though "/a/b/d" exists);
 *   3. among routes with the same pattern, one that names the method beats one for any method;
 *      between equals, the first declared wins.
 * A route that does not accept the request's method is skipped, so the search goes on to the
 * next candidate in this order (another pattern, then a less specific host tier).
 * If the path matches under some route but no route accepts the method: MG_ROUTE_NO_METHOD
 * (405), with allowed_methods = the methods of every route of the most specific host tier
 * in which the path matched. Nothing matches: MG_ROUTE_NOT_FOUND (404). */
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
  unsigned allowed_methods;            /* MG_ROUTE_NO_METHOD: MG_M_* bits the path accepts (for
                                        * 405's Allow); MG_ROUTE_FOUND: the route's methods */
  const char *rest; size_t rest_len;   /* the part matched by a trailing "*", if any (no
                                        * leading '/'); NULL when the route has no "*" */
} mg_route_match_t;

/* Builds a router for the routes that serve listener LISTEN (NULL = the default listener:
 * routes whose listen is NULL); ROUTES must outlive the router. A route whose methods is 0 is
 * read as MG_METHOD_ANY. Returns NULL and writes a message to ERR (ERRLEN bytes)
 * on a bad pattern (the config validator reports these with file:line first). */
mg_router_t *mg_router_new(const mg_route_conf_t *routes, size_t nroutes, const char *listen,
                           char *err, size_t errlen);

/* Frees the router. */
void mg_router_free(mg_router_t *r);

/* Matches METHOD (MG_M_* bit), HOST (no port; may be NULL; compared case-insensitively) and
 * PATH (normalised by mg_path_normalize, PATH_LEN bytes). Fills *m; its params point into
 * PATH and into the router. No allocation; safe to call from any worker concurrently. */
mg_route_result_t mg_router_match(const mg_router_t *r, unsigned method, const char *host,
                                  size_t host_len, const char *path, size_t path_len,
                                  mg_route_match_t *m);

/* Returns the MG_M_* bit for a method name (e.g. "GET"; case-sensitive), MG_M_OTHER for other
 * valid tokens, 0 for an empty or invalid one. */
unsigned mg_router_method_bit(const char *name, size_t len);

#endif
