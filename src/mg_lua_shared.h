/* mg_lua_shared: `mg.shared.NAME`, the Lua face of the shared-memory dictionaries
 * (mg_shdict.h). The master creates the dictionaries before it forks; each worker registers
 * the same handles in its VM, so every worker reads and writes the same memory.
 *
 * Lua API (every method is a colon call on a dictionary object; all of them work in every
 * hook, in timers and while the config loads, and none of them yields):
 *   mg.shared.NAME                 the dictionary; an unknown NAME raises
 *                                  `no shared dictionary "NAME" (declare it with shared "NAME"
 *                                  { size = "1m" })`; mg.shared cannot be assigned to
 *   d:get(key)                     the value (string, number or boolean, as stored) or nil
 *   d:set(key, value[, ttl])       true, or nil, "no memory" (larger than the whole
 *                                  dictionary even after evicting); a nil value deletes
 *   d:add(key, value[, ttl])       like set, but nil, "exists" when the key is live
 *   d:incr(key[, n[, init[, ttl]]]) the new number: adds N (default 1); a missing key starts
 *                                  at INIT (default 0) and gets TTL; an existing key keeps
 *                                  its TTL; nil, "not a number" when the value is a string or
 *                                  a boolean
 *   d:ttl(key)                     seconds left (a float), 0 when it never expires, nil when
 *                                  absent
 *   d:delete(key)                  true when a live entry was removed, false when none was
 * TTLs are seconds (0 or absent: never expires), at most MG_SHDICT_TTL_MAX. Runtime failures
 * return nil and a short message (also "lock failed"); misuse raises: a key that is not a
 * string of 1 to MG_SHDICT_KEY_MAX bytes, a value that is not a string, number, boolean (or
 * nil for set), a TTL that is not a non-negative number, N or INIT not finite numbers, or a
 * method called with a dot instead of a colon. Listing keys is not offered: mg_shdict has no
 * walk over its entries. */
#ifndef MG_LUA_SHARED_H
#define MG_LUA_SHARED_H

#include <stddef.h>

#include "mg_lua_vm.h"
#include "mg_shdict.h"

/* Sets mg.shared in VM to a read-only table of the N dictionaries DICTS, each under its
 * mg_shdict_name. The dictionaries stay the caller's and must outlive the VM. Calling it
 * again replaces mg.shared. Returns 0, or -1 when Lua is out of memory. */
int mg_lua_shared_register(mg_lua_vm_t *vm, mg_shdict_t *const *dicts, size_t n);

#endif
