/* mg_request: a client connection (mg_conn_t) and the request being served on it
 * (mg_request_t), with the lifecycle that runs every request through fixed phases:
 *
 *   parse head (mg_server.c) -> REQUEST -> route -> ACCESS -> HANDLER -> RESPONSE -> LOG
 *
 * mg_server.c owns the socket side: accepting, parsing with llhttp (strict) plus the checks
 * llhttp lacks, limits and timeouts, writing with back-pressure, keep-alive, pipelining and
 * closing. mg_request.c owns the lifecycle: routing, the phases, fixed and error answers and
 * the access log. A handler (the proxy, a fixed response, a Lua handler) drives the response
 * through the mg_request_* and mg_conn_* calls below. Each phase is a step of a small state
 * machine, so a step may suspend (a Lua hook yielding) and be resumed from the loop. */
#ifndef MG_REQUEST_H
#define MG_REQUEST_H

#include <llhttp.h>
#include <stdint.h>
#include <uv.h>

#include "mg_buf.h"
#include "mg_http.h"
#include "mg_router.h"
#include "mg_worker.h"

typedef struct mg_conn mg_conn_t;
typedef struct mg_request mg_request_t;

/* The hooks a request runs through, in order (declared once; Lua hooks attach here). */
#define MG_PHASES(X) X(REQUEST, "request") X(ACCESS, "access") X(HANDLER, "handler") \
                     X(RESPONSE, "response") X(LOG, "log")
typedef enum {
#define MG_PHASE_ENUM(id, name) MG_PHASE_##id,
  MG_PHASES(MG_PHASE_ENUM)
#undef MG_PHASE_ENUM
  MG_PHASE_DONE
} mg_phase_t;

typedef struct mg_header {
  const char *name; size_t name_len;
  const char *value; size_t value_len;
  int id;                         /* mg_header_id_t: which special header this is */
} mg_header_t;

/* Byte offsets of one header inside req->head while the head is still being received. */
typedef struct mg_header_off { uint32_t name, name_len, value, value_len; } mg_header_off_t;

struct mg_request {
  mg_conn_t *conn;
  mg_worker_t *w;
  mg_phase_t phase;

  /* ---- parser state (the parser lives here, not in the connection, so an idle keep-alive
   * connection holds no parser) */
  llhttp_t parser;
  uint64_t header_deadline;       /* loop ms when the head must be complete */
  const char *parse_base;         /* start of the bytes given to the parser now */
  uint32_t cur_name, cur_name_len, cur_value, cur_value_len;
  int in_value;
  char last_byte;                 /* last byte of the previous read (obs-fold detection) */

  /* ---- the parsed head (all strings point into head, valid for the request's life) */
  mg_buf_t head;                  /* target, header names and values, normalised path */
  mg_buf_t offs;                  /* mg_header_off_t while parsing */
  mg_buf_t header_mem;            /* the memory of headers[] (kept when the request is reused) */
  mg_header_t *headers;
  size_t nheaders;
  const char *method_name; size_t method_len;
  unsigned method_bit;            /* MG_M_* */
  uint8_t method;                 /* llhttp_method_t */
  uint8_t http_major, http_minor;
  const char *target; size_t target_len;   /* as received */
  const char *path; size_t path_len;       /* normalised, NUL-terminated */
  const char *query; size_t query_len;     /* after '?', may be empty; NULL when absent */
  const char *host; size_t host_len;       /* lower-case, no port; NULL when absent */
  const char *host_header; size_t host_header_len; /* Host as received (with port) */
  int64_t content_length;         /* -1 when absent */
  unsigned chunked : 1;
  unsigned has_body : 1;          /* a body follows the head */
  unsigned expect_continue : 1;
  unsigned keepalive : 1;         /* the client may send another request after this one */
  unsigned body_reading : 1;      /* the handler asked for the body */
  unsigned body_done : 1;         /* the whole body was received */
  unsigned continue_sent : 1;
  unsigned head_sent : 1;         /* response head written: errors can no longer be answered */
  unsigned done : 1;              /* the handler finished the response */
  unsigned aborted : 1;
  unsigned version_seen : 1;
  unsigned connection_names : 1;  /* a Connection header names fields to drop upstream */
  unsigned request_hooks_ran : 1; /* the global request hooks have run */
  uint32_t hosts_seen;
  size_t url_bytes, header_bytes, chunk_ext_bytes;
  uint64_t body_received;
  size_t max_body;

  /* ---- routing and identity */
  mg_gen_t *gen;                  /* the config generation it runs on (held) */
  mg_listener_t *listener;
  const mg_route_conf_t *route;
  mg_route_match_t match;
  char id[33];
  uint64_t start_ns;              /* uv_hrtime at the first byte */
  double start_wall;

  /* ---- what was answered (for the access log) */
  int status;
  uint64_t bytes_in, bytes_out;
  const char *upstream_name;
  double upstream_time;           /* seconds, < 0 when not proxied */

  /* ---- Lua hooks (mg_hooks.c), NULL when none ran */
  void *hooks;

  /* ---- the handler that produces the response (the proxy) */
  void *handler;
  void (*on_body)(mg_request_t *req, const char *data, size_t len); /* body bytes */
  void (*on_body_done)(mg_request_t *req);    /* the body is complete (trailers dropped) */
  void (*on_drain)(mg_request_t *req);        /* the client's write queue went low */
  void (*on_abort)(mg_request_t *req);        /* client gone or timeout: release everything */
};

enum { MG_CONN_IDLE = 0, MG_CONN_HEAD, MG_CONN_BUSY, MG_CONN_CLOSING };

/* A client connection. Kept small: an idle keep-alive connection costs this struct and its
 * socket, nothing else (the parser and every buffer belong to the request). */
struct mg_conn {
  uv_tcp_t tcp;
  mg_worker_t *w;
  mg_listener_t *listener;
  mg_conn_t *next, *prev;         /* the worker's list of connections */
  mg_buf_t pending;               /* received bytes not parsed yet (pipelining, paused body) */
  mg_request_t *req;              /* the request being received or served, or NULL */
  int state;
  int nrequests;
  size_t write_queued;            /* bytes handed to uv_write and not yet written */
  uint64_t deadline;              /* loop ms when the current state times out; 0 = never */
  mg_conn_t *tq_next, *tq_prev;   /* the worker's list for this kind of timeout */
  uint8_t tq_kind;                /* which list (0 = none) */
  unsigned reading : 1;
  unsigned eof : 1;               /* the client half-closed */
  unsigned close_after : 1;       /* close once the current response is written */
  unsigned parse_paused : 1;
  unsigned in_execute : 1;
  unsigned lingering : 1;
  unsigned body_paused : 1;       /* the handler asked to stop reading the body */
  unsigned finishing : 1;         /* the handler is done; waiting for the writes to drain */
  unsigned in_process : 1;        /* conn_process is running (no re-entry) */
  unsigned close_pending : 1;     /* conn_close was asked while the parser ran */
  mg_http_error_t error;          /* set by a parser callback to fail the request */
  uint16_t client_port;
  char client_ip[46];             /* the peer address, as text */
};

/* ---- mg_server.c: sockets */

/* Sets up the request parser's callbacks (once per process, before serving). */
void mg_server_init_parser_settings(void);

/* The listeners' connection callback: accepts one client connection (uv_listen's cb). */
void mg_server_on_connection(uv_stream_t *server, int status);

/* Writes LEN bytes to the client (copies what cannot be written at once). Returns 0, or -1
 * when the connection is already broken. */
int mg_conn_write(mg_conn_t *c, const char *data, size_t len);

/* Starts (or resumes) delivering the request body through req->on_body / on_body_done;
 * sends "100 Continue" first when the client asked for it. */
void mg_conn_read_body(mg_conn_t *c);

/* Stops reading the body until mg_conn_read_body is called again (back-pressure). */
void mg_conn_pause_body(mg_conn_t *c);

/* Closes the connection at once (truncated response, broken client). */
void mg_conn_abort(mg_conn_t *c);

/* Closes every idle connection and makes busy ones close after their response (drain). */
void mg_server_drain(mg_worker_t *w);

/* Sets up the worker's one timer for all its connections' timeouts. */
void mg_server_timers_init(mg_worker_t *w);

/* Bytes the client still has to read from us. */
static inline size_t mg_conn_write_queue(const mg_conn_t *c) { return c->write_queued; }

/* ---- mg_request.c: lifecycle */

/* Called by the server when the request head is complete and valid: routes and runs the
 * phases. */
void mg_request_start(mg_request_t *req);

/* Starts a new request on C (first byte seen). Returns NULL when out of memory. */
mg_request_t *mg_request_new(mg_conn_t *c);

/* Frees a request (after the LOG phase); it may be kept for reuse by the worker. */
void mg_request_free(mg_request_t *req);

/* Frees the requests a worker kept for reuse (at exit). */
void mg_request_free_spares(mg_worker_t *w);

/* The handler finished the response: once the writes drain, the LOG phase runs and the
 * connection serves the next request or closes. */
void mg_request_done(mg_request_t *req);

/* Goes on with the phases after a hook step finished without answering. */
void mg_request_continue(mg_request_t *req);

/* A Lua handler answered and the route has response hooks: runs them on the answer, then
 * sends it. */
void mg_request_handler_answer(mg_request_t *req, int status, const char *content_type,
                               const char *body, size_t body_len, const char *headers,
                               size_t headers_len);

/* Answers a gateway error as JSON ({"error","status","request_id"}); if the response head was
 * already sent, the connection is aborted instead (the client sees a truncated response). */
void mg_request_error(mg_request_t *req, mg_http_error_t err);

/* Answers STATUS with BODY and optional extra HEADERS (pre-formatted "Name: value\r\n" lines). */
void mg_request_respond(mg_request_t *req, int status, const char *content_type,
                        const char *body, size_t body_len, const char *headers,
                        size_t headers_len);

/* Appends the common response header lines (X-Request-Id, Connection) to OUT; marks the
 * connection to close when the request cannot keep it alive. */
void mg_request_common_headers(mg_request_t *req, mg_buf_t *out);

/* Looks up a request header (case-insensitive, first occurrence), or NULL. */
const mg_header_t *mg_request_header(const mg_request_t *req, const char *lower_name);

/* Runs the LOG phase and writes the access-log line. */
void mg_request_log(mg_request_t *req);

#endif
