/* mg_lua_fetch: mg.fetch and mg.fetch_all, the Lua half of the HTTP client (mg_fetch).
 *
 *   local res, err = mg.fetch(target, path_or_opts)
 *
 * TARGET is an upstream name of the task's config generation, or an "http://host[:port]/path"
 * URL (port 80 by default; "https://" fails with "https is not supported yet"). With a URL
 * the second argument may be omitted or be an options table. PATH_OR_OPTS is a path ("/x?y")
 * or a table:
 *   path     the path, with or without a query (default "/"; with a URL: the URL's path,
 *            and giving both is an error)
 *   method   default "GET"; upper-cased; must be a token
 *   headers  { name = value } (string or number values); names must be tokens, values may
 *            not hold CR, LF or NUL; Content-Length, Transfer-Encoding, Connection and the
 *            other hop-by-hop fields are the client's own; Host and User-Agent replace the
 *            defaults (the target's host:port, "moongate")
 *   body     a string, or a table sent as JSON (Content-Type: application/json unless the
 *            headers name a Content-Type)
 *   query    { k = v } (string, number or boolean values) appended to the path, keys sorted,
 *            both URL-encoded (RFC 3986 unreserved bytes kept)
 *   timeout  seconds for the whole exchange (default: the upstream's read_timeout; 60 s for
 *            URL targets)
 * Returns res = { status = n, headers = { ["lower-case name"] = value }, body = string }
 * (repeated header fields joined with ", "); res.json decodes the body on first use with
 * mg.json.decode (JSON null is mg.json.null): when the body is not JSON, res.json is nil and
 * res.json_error holds the parser's message. On failure returns nil and "<name>: <error>",
 * where <name> is the upstream's name or the URL's host:port and <error> one of
 * mg_fetch.h's messages ("timeout after 0.5s", "connection refused", "malformed response",
 * "response body too large", "no healthy target", ...). Arguments that make no sense (a
 * non-string target, an unknown upstream, a bad URL, header or option) raise an error that
 * names the argument. Allowed in every hook.
 *
 *   local a, b, c, errs = mg.fetch_all { {target, path_or_opts, timeout = s}, ..., timeout = s }
 *
 * Runs the calls (at most MG_LUA_FETCH_MAX_CALLS) in parallel and returns when all have
 * ended or the overall timeout passed (each call runs under the smaller of its own timeout
 * and the overall one; an unfinished call then fails with "timeout after Xs" and its
 * connection is closed). Returns one value per call in order (res, or nil when that call
 * failed), then a table mapping the index of each failed call to its error (empty when all
 * succeeded). Every call is checked before any starts.
 *
 * A task abandoned while it waits cancels every exchange still running (their connections are
 * closed, never pooled) and frees everything; its coroutine is never resumed. */
#ifndef MG_LUA_FETCH_H
#define MG_LUA_FETCH_H

#include "mg_lua_vm.h"

/* The most calls one mg.fetch_all may make. */
#define MG_LUA_FETCH_MAX_CALLS 64

/* Registers mg.fetch and mg.fetch_all in VM. Returns 0, or -1 when out of memory. */
int mg_lua_fetch_register(mg_lua_vm_t *vm);

/* Frees the kept call specs (a stopping worker, after its last fetch). */
void mg_lua_fetch_free_specs(void);

/* mg.fetch_all for mg.aggregate's pass-through (a lua_CFunction, not in the mg table): the
 * same argument and the same errors table last, but two values per call instead of its
 * result: the status (nil when the call failed), then, for a 2xx status, the body as a raw
 * JSON value (mg.json.raw) or, when it is not JSON, why ("parse error at byte N: ..."). No
 * result table, header string or body string is made. */
int mg_lua_fetch_raw_all(lua_State *L);

/* fetch_raw_for(f) -> mg_lua_fetch_raw_all when F is mg.fetch_all's own function, else
 * nothing (a stand-in for mg.fetch_all, as in the aggregate unit tests, is used as it is). */
int mg_lua_fetch_raw_for(lua_State *L);

#endif
