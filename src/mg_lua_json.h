/* mg_lua_json: the `mg.json` Lua module (encode, decode, null, array) on yajl, and the C entry
 * point the hot path uses to write a Lua value as JSON straight into a buffer.
 *
 * Mapping, both ways:
 *   nil, json.null          <-> null        (json.null is a unique light userdata)
 *   boolean                 <-> true/false
 *   number                  <-> number      (integers up to 2^53 print without a decimal
 *                                            point; others in the shortest form that reads
 *                                            back to the same double; NaN and Inf refuse)
 *   string (valid UTF-8)    <-> string
 *   table with keys 1..n    <-> array       (decoded arrays carry json.array_mt)
 *   other table             <-> object      (keys must be strings)
 *   empty table             ->  {} ; `[]` when it carries json.array_mt (json.array(t))
 * Integers beyond +-2^53 decode to a "bigint" userdata that keeps the digits: tostring gives
 * them, == compares them, and encode writes them back unchanged (ids survive a merge). Other
 * numbers that do not fit a double are refused. Containers nest at
 * most MG_JSON_MAX_DEPTH deep in either direction; a table that contains itself refuses. */
#ifndef MG_LUA_JSON_H
#define MG_LUA_JSON_H

#include <stddef.h>

#include <lua.h>

#include "mg_buf.h"

/* The deepest nesting of arrays and objects that encode and decode accept. */
#define MG_JSON_MAX_DEPTH 100

/* Pushes the module table: encode, decode, array, null, array_mt. Registers the array
 * metatable in the registry on first use, so every module table in one state shares it. */
int luaopen_mg_json(lua_State *L);

/* Appends the JSON text of the value at IDX to OUT. Returns 0, or -1 with a message in ERR
 * (always NUL-terminated when ERRLEN > 0) and OUT back at its old length. Reads tables with
 * raw access (no metamethods run) and leaves the Lua stack as it found it; like any Lua API
 * call it may raise a Lua error only when Lua itself is out of memory. The caller owns OUT. */
int mg_json_encode_value(lua_State *L, int idx, mg_buf_t *out, char *err, size_t errlen);

/* Pushes json.null, the sentinel that stands for JSON null (a light userdata). */
void mg_json_push_null(lua_State *L);

/* Checks TEXT (LEN bytes) as json.raw does and pushes the raw JSON value (its text, less the
 * whitespace around it); or returns -1 with "parse error at byte N: ..." in ERR and pushes
 * nothing. Raises only when Lua runs out of memory. */
int mg_json_push_raw(lua_State *L, const char *text, size_t len, char *err, size_t errlen);

#endif
