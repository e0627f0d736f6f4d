/* mg_http: the HTTP vocabulary shared by the server and the proxy side: the gateway's own
 * error answers (one X-macro table: status and message), reason phrases, hop-by-hop header
 * names and small case-insensitive string helpers. No I/O here. */
#ifndef MG_HTTP_H
#define MG_HTTP_H

#include <stddef.h>
#include <stdint.h>

/* Every error the gateway answers itself: name, status, message (the JSON "error" field). */
#define MG_HTTP_ERRORS(X)                                              \
  X(BAD_REQUEST, 400, "bad request")                                   \
  X(NOT_FOUND, 404, "no route")                                        \
  X(METHOD_NOT_ALLOWED, 405, "method not allowed")                     \
  X(REQUEST_TIMEOUT, 408, "request timeout")                           \
  X(BODY_TOO_LARGE, 413, "request body too large")                     \
  X(URI_TOO_LONG, 414, "uri too long")                                 \
  X(EXPECTATION_FAILED, 417, "expectation not supported")              \
  X(HEADERS_TOO_LARGE, 431, "request header fields too large")         \
  X(INTERNAL, 500, "internal error")                                   \
  X(SCRIPT_ERROR, 500, "script error")                                 \
  X(NOT_IMPLEMENTED, 501, "transfer coding not implemented")           \
  X(BAD_GATEWAY, 502, "upstream failed")                               \
  X(NO_UPSTREAM, 503, "no healthy upstream")                           \
  X(OVERLOADED, 503, "overloaded")                                     \
  X(GATEWAY_TIMEOUT, 504, "upstream timeout")                          \
  X(VERSION_NOT_SUPPORTED, 505, "http version not supported")

typedef enum {
  MG_HTTP_OK = 0,
#define MG_HTTP_ERR_ENUM(name, status, msg) MG_HTTP_E_##name,
  MG_HTTP_ERRORS(MG_HTTP_ERR_ENUM)
#undef MG_HTTP_ERR_ENUM
  MG_HTTP_E_MAX
} mg_http_error_t;

/* Status code of a gateway error. */
int mg_http_error_status(mg_http_error_t e);

/* The JSON "error" message of a gateway error. */
const char *mg_http_error_message(mg_http_error_t e);

/* Standard reason phrase for STATUS ("OK"), or "Unknown". */
const char *mg_http_reason(int status);

/* Header names the engine treats specially, recognised once per header (mg_http_header_id)
 * so that the per-header checks on the hot path are integer compares. The hop-by-hop ones
 * form one range. */
typedef enum {
  MG_HDR_OTHER = 0,
  MG_HDR_CONNECTION, MG_HDR_KEEP_ALIVE, MG_HDR_PROXY_CONNECTION, MG_HDR_TE, MG_HDR_TRAILER,
  MG_HDR_TRANSFER_ENCODING, MG_HDR_UPGRADE,          /* hop-by-hop: never forwarded */
  MG_HDR_HOST, MG_HDR_CONTENT_LENGTH, MG_HDR_EXPECT, MG_HDR_X_FORWARDED_FOR,
  MG_HDR_X_FORWARDED_PROTO, MG_HDR_X_FORWARDED_HOST, MG_HDR_X_REQUEST_ID, MG_HDR_USER_AGENT,
  MG_HDR_AUTHORIZATION, MG_HDR_PROXY_AUTHORIZATION, MG_HDR_COOKIE
} mg_header_id_t;

/* Recognises NAME (LEN bytes, any case); MG_HDR_OTHER for every other name. */
mg_header_id_t mg_http_header_id(const char *name, size_t len);

/* True for the hop-by-hop ids (Connection .. Upgrade). */
static inline int mg_http_id_is_hop_by_hop(int id) {
  return id >= MG_HDR_CONNECTION && id <= MG_HDR_UPGRADE;
}

/* True when the Connection value V (LEN bytes) names a field other than close, keep-alive
 * and upgrade, i.e. when header fields must be checked against it. */
int mg_http_connection_names_fields(const char *v, size_t len);

/* True when NAME is one of the fields listed in the Connection value V (LEN bytes). */
int mg_http_connection_lists(const char *v, size_t len, const char *name, size_t name_len);

/* Case-insensitive equality of A (ALEN bytes) and the NUL-terminated lower-case B. */
int mg_http_ieq(const char *a, size_t alen, const char *b);

/* Whether A and B (lengths given) are equal ignoring ASCII case. */
int mg_http_ieq_n(const char *a, size_t alen, const char *b, size_t blen);

/* True when S (LEN bytes) is a non-empty RFC 9110 token. */
int mg_http_is_token(const char *s, size_t len);

/* Trims optional whitespace (SP, HTAB) at both ends of *S / *LEN. */
void mg_http_trim(const char **s, size_t *len);

/* Walks a comma-separated list: returns the next trimmed element of [*S, *S + *LEN) in
 * *ITEM / *ITEM_LEN and advances; returns 0 when the list is done. Empty elements are skipped. */
int mg_http_list_next(const char **s, size_t *len, const char **item, size_t *item_len);

/* Current wall-clock time in seconds since the epoch (with sub-second precision). */
double mg_http_wall_time(void);

#endif
