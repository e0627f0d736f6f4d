/* mg_hooks: runs the Lua hooks of a request (DESIGN.md "Hooks"). Each request that has hooks
 * gets one coroutine (an mg_task) on the worker's VM; its phases run on it in order as
 * "steps": request (global, before routing), access, handler (a Lua function that answers),
 * response (sees and may change the response), and log (after the response is sent, on a
 * task of its own so the connection can move on). A step may wait for I/O at any point; the
 * request's state machine (mg_request.c) is suspended until the step finishes.
 *
 * A hook answers by returning status, body[, headers] (a table body is sent as JSON). An
 * error in a hook answers a JSON 500 carrying the request id and logs file:line with a
 * traceback. Header names and values that come from Lua are checked (names are tokens,
 * values hold no CR, LF or NUL) before anything is written. */
#ifndef MG_HOOKS_H
#define MG_HOOKS_H

#include <stddef.h>

#include "mg_buf.h"
#include "mg_lua_vm.h"
#include "mg_task.h"

struct mg_request;
struct mg_header;
struct mg_gen;

#define MG_HOOK_BIT(h) (1u << (h))

/* Sets up a worker's VM for hooks (the coroutine driver, the req and res objects) and
 * registers the mg API functions that live in C. Returns 0, or -1 with a message in ERR. */
int mg_hooks_vm_init(mg_lua_vm_t *vm, char *err, size_t errlen);

/* Releases the Lua values of generation G (its lua_unref). */
void mg_hooks_gen_unref(struct mg_gen *g);

/* Runs the REQUEST, ACCESS or HANDLER hooks of REQ. When they finish the request has been
 * answered (by a hook, or with a 500), or the request goes on with mg_request_continue. */
void mg_hooks_run(struct mg_request *req, int hook);

/* The response that the response hooks see and may change. */
typedef struct mg_hook_response {
  int status;
  const struct mg_header *headers;   /* as the producer would send them (no framing fields) */
  size_t nheaders;
  const char *body;                  /* the whole body when the producer has it, else NULL */
  size_t body_len;
  /* res:body() was called on a streamed response: collect the whole body, then call
   * mg_hooks_body_ready. NULL when the body is already known. */
  void (*want_body)(struct mg_request *req);
  /* The hooks finished; the outcome is read with mg_hooks_response_head and _body. */
  void (*done)(struct mg_request *req);
} mg_hook_response_t;

/* Runs the response hooks on RESP (which must stay valid until done is called). */
void mg_hooks_run_response(struct mg_request *req, mg_hook_response_t *resp);

/* The whole upstream body asked for with want_body is here (or failed: DATA NULL). */
void mg_hooks_body_ready(struct mg_request *req, const char *data, size_t len);

/* After done: appends the response's header lines ("Name: value\r\n", checked) to OUT and
 * returns the status. Framing fields (Content-Length, Transfer-Encoding, Connection) set by
 * a hook are ignored; the producer frames the body. */
int mg_hooks_response_head(struct mg_request *req, mg_buf_t *out);

/* After done: whether a hook answered (or failed and the answer became the gateway's 500), so
 * that the head is the gateway's own, not the upstream's. */
int mg_hooks_response_replaced(const struct mg_request *req);

/* After done: whether the hooks replaced or read the whole body; if so sets *DATA and *LEN to it
 * (valid until the request is freed). */
int mg_hooks_response_body(struct mg_request *req, const char **data, size_t *len);

/* Whether body filters (res:filter) were registered. */
int mg_hooks_has_filters(struct mg_request *req);

/* Runs the body filters on one chunk (EOF: the last call, DATA may be empty) and appends
 * what they return to OUT. Returns 0, or -1 when a filter failed (logged). */
int mg_hooks_filter(struct mg_request *req, const char *data, size_t len, int eof, mg_buf_t *out);

/* Starts the log hooks of a finished request on their own task. */
void mg_hooks_run_log(struct mg_request *req);

/* Header fields set by req:set_header for the upstream request. */
typedef struct mg_header_edit {
  char *name;                        /* as given */
  char *value;                       /* NULL: removed */
} mg_header_edit_t;

/* The edits REQ's hooks made to its request headers (NULL, 0 when none). */
const mg_header_edit_t *mg_hooks_header_edits(const struct mg_request *req, size_t *n);

/* Whether a hook read the whole request body (req:body()); if so sets *DATA and *LEN to it. The
 * proxy then sends it with a Content-Length. */
int mg_hooks_request_body(const struct mg_request *req, const char **data, size_t *len);

/* Frees the hook states kept for reuse (before the VM is freed). */
void mg_hooks_free_spares(void);

/* Frees what the request's hooks hold (cancels a pending operation). */
void mg_hooks_request_free(struct mg_request *req);

#endif
