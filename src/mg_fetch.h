/* mg_fetch: a non-blocking HTTP/1.1 client over the gateway's upstream pools, the C half of
 * mg.fetch and mg.fetch_all (the Lua half is mg_lua_fetch).
 *
 *   mg_fetch_start -> pick a target -> pooled connection or fresh connect -> write the request
 *   -> parse the response (llhttp, strict, as the proxy does) -> callback -> mg_fetch_free
 *
 * The whole exchange runs under one deadline (connect + send + response). The response is
 * buffered whole, up to a body limit. Outcomes are reported to the upstream's balancer as the
 * proxy reports them. A connection goes back to the pool only after the proxy's checklist: a
 * complete, cleanly framed response with keep-alive, no byte after it, the request written
 * whole, no error or timeout; anything else closes it. A pooled connection that breaks
 * before the first response byte is retried once on a fresh connection when the method is
 * idempotent (the upstream closed an idle keep-alive connection as we reused it).
 *
 * Targets: a configured upstream (mg_gen_upstream), or a URL's host:port through
 * mg_fetch_start_url, which keeps a small per-worker cache of ad-hoc upstreams (one target,
 * the defaults of the config's upstream block, never ejected).
 *
 * The callback runs exactly once, always from the event loop (never from inside
 * mg_fetch_start), unless the fetch is cancelled first. One thread, one loop: nothing here is
 * thread-safe. */
#ifndef MG_FETCH_H
#define MG_FETCH_H

#include <stddef.h>
#include <stdint.h>

struct mg_upstream;
struct mg_worker;

/* The default limit of a response body, in bytes. */
#define MG_FETCH_DEFAULT_MAX_BODY (8u * 1024 * 1024)

/* The deadline of an exchange when neither the call nor the upstream gives one, in ms. */
#define MG_FETCH_DEFAULT_TIMEOUT_MS 60000u

/* The largest response head (status line and header fields) accepted, and its field count. */
#define MG_FETCH_MAX_HEAD (64 * 1024)
#define MG_FETCH_MAX_HEADERS 256

/* Room for a URL target's host name, with its NUL. */
#define MG_FETCH_MAX_HOST 256

/* Every way a fetch can fail: name and message (mg_fetch_strerror). */
#define MG_FETCH_ERRORS(X)                                   \
  X(TIMEOUT, "timeout")                                      \
  X(REFUSED, "connection refused")                           \
  X(CONNECT_TIMEOUT, "connect timeout")                      \
  X(CONNECT, "cannot connect")                               \
  X(RESOLVE, "cannot resolve host")                          \
  X(CLOSED, "connection closed")                             \
  X(RESET, "connection reset")                               \
  X(MALFORMED, "malformed response")                         \
  X(HEAD_TOO_LARGE, "response head too large")               \
  X(TOO_LARGE, "response body too large")                    \
  X(NO_TARGET, "no healthy target")                          \
  X(HTTPS, "https is not supported yet")                     \
  X(BAD_URL, "invalid url")                                  \
  X(INVALID, "invalid request")                              \
  X(NOMEM, "out of memory")

/* Error codes are negative; 0 is success. */
typedef enum {
  MG_FETCH_OK = 0,
#define MG_FETCH_ERR_ENUM(name, msg) MG_FETCH_E_##name,
  MG_FETCH_E_FIRST_ = -1000,
  MG_FETCH_ERRORS(MG_FETCH_ERR_ENUM)
#undef MG_FETCH_ERR_ENUM
  MG_FETCH_E_LAST_
} mg_fetch_error_t;

/* What to send. Every string is copied by mg_fetch_start: none needs to outlive the call. */
typedef struct mg_fetch_req {
  const char *method;            /* a token, e.g. "GET"; NULL = "GET" */
  const char *path;              /* origin form, with the query: "/users/1?x=y"; NULL = "/" */
  const char *const *headers;    /* name, value, name, value, ... */
  size_t nheaders;               /* number of pairs */
  const char *body;              /* may be NULL when body_len is 0 */
  size_t body_len;
  uint64_t timeout_ms;           /* total deadline; 0 = the upstream's read_timeout */
  size_t max_body;               /* response body limit; 0 = MG_FETCH_DEFAULT_MAX_BODY */
} mg_fetch_req_t;

typedef struct mg_fetch mg_fetch_t;

/* Called once when the exchange has ended, either way (mg_fetch_error tells). The callee
 * owns F from then on and frees it with mg_fetch_free (it may do so inside the callback). */
typedef void (*mg_fetch_cb)(mg_fetch_t *f, void *data);

/* The message of an error code ("timeout"); "ok" for 0, "unknown error" otherwise. */
const char *mg_fetch_strerror(int err);

/* Checks R before anything starts: the method is a token, the path starts with '/' and has
 * no space, control byte or '#', header names are tokens, values hold no CR, LF or NUL, and
 * no header is one the client sets itself (Content-Length, Transfer-Encoding, Connection and
 * the other hop-by-hop fields). Returns 0, or -1 with a message in ERR. Host and User-Agent
 * may be given: they replace the defaults (the target's host:port, "moongate"). */
int mg_fetch_check_req(const mg_fetch_req_t *r, char *err, size_t errlen);

/* Starts a request to upstream UP (a configured one: the caller keeps it alive until the
 * callback or the cancel). Sends Host (the target's host:port), User-Agent: moongate, the
 * caller's headers, Content-Length when there is a body (or the method is POST, PUT or
 * PATCH), then the body. A request that fails mg_fetch_check_req ends with
 * MG_FETCH_E_INVALID. Returns NULL only when out of memory (no callback then). */
mg_fetch_t *mg_fetch_start(struct mg_upstream *up, const mg_fetch_req_t *r, mg_fetch_cb cb,
                           void *data);

/* Splits an "http://host[:port][/path][?query][#fragment]" URL (scheme case-insensitive):
 * the host, lower-cased (an IPv6 literal in brackets is stored without them), into HOST; the
 * port (80 when absent) into *PORT; *PATH points into URL at what follows the authority (a
 * path, or a query when it starts with '?', or "") and *PATH_LEN stops before a fragment.
 * Returns 0, MG_FETCH_E_HTTPS for an https:// URL, or MG_FETCH_E_BAD_URL (another scheme,
 * user info, a bad host or port). */
int mg_fetch_parse_url(const char *url, char *host, size_t hostlen, int *port,
                       const char **path, size_t *path_len);

/* As mg_fetch_start, to HOST:PORT through the worker's cache of ad-hoc upstreams (HOST as
 * mg_fetch_parse_url gives it). Returns NULL when out of memory or when HOST is
 * MG_FETCH_MAX_HOST bytes or longer. */
mg_fetch_t *mg_fetch_start_url(struct mg_worker *w, const char *host, int port,
                               const mg_fetch_req_t *r, mg_fetch_cb cb, void *data);

/* Frees the ad-hoc upstreams of worker W that no fetch uses (their idle connections are
 * closed); those still in use are freed when their last fetch is. Call before closing the
 * loop. */
void mg_fetch_cache_free(struct mg_worker *w);

/* Stops the exchange if it is still running (its connection is closed, never pooled; the
 * callback never runs) and frees F. */
void mg_fetch_cancel(mg_fetch_t *f);

/* Frees F after its callback ran (the same as mg_fetch_cancel, which is safe at any time). */
void mg_fetch_free(mg_fetch_t *f);

/* After the callback: 0 when the exchange succeeded, else a negative MG_FETCH_E_* code. */
int mg_fetch_error(const mg_fetch_t *f);

/* The deadline the exchange ran under, in ms (the one that passed for MG_FETCH_E_TIMEOUT). */
uint64_t mg_fetch_timeout(const mg_fetch_t *f);

/* The "host:port" of the target that answered (or was tried last); "" when none was. */
const char *mg_fetch_target(const mg_fetch_t *f);

/* The response status (0 before or without a response). */
int mg_fetch_status(const mg_fetch_t *f);

/* The number of response header fields. */
size_t mg_fetch_nheaders(const mg_fetch_t *f);

/* Header field I (0-based, in the order received): name and value (trailing whitespace
 * trimmed) as they came, NUL-terminated, valid until mg_fetch_free. */
void mg_fetch_header(const mg_fetch_t *f, size_t i, const char **name, size_t *name_len,
                     const char **value, size_t *value_len);

/* The response body (dechunked), valid until mg_fetch_free; *LEN gets its length. Never
 * NULL. */
const char *mg_fetch_body(const mg_fetch_t *f, size_t *len);

/* Whether the exchange used a pooled connection at the end (for tests and logs). */
int mg_fetch_reused(const mg_fetch_t *f);

#endif
