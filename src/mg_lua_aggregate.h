/* mg_lua_aggregate: installs `mg.aggregate`, the aggregation helpers (merge, pick, group, ...)
 * and the fetch-and-combine entry point, in a VM's sandbox. The helpers are written in Lua
 * (lua/moongate/aggregate.lua, which documents them) and embedded in the binary. */
#ifndef MG_LUA_AGGREGATE_H
#define MG_LUA_AGGREGATE_H

#include "mg_lua_vm.h"

/* Loads the module into VM (in a fresh sandbox environment, under the VM's budget) and sets
 * mg.aggregate to it. The module text comes from $MOONGATE_LUA_DIR/moongate/aggregate.lua
 * when that variable is set, else from the source tree's copy when it is readable, else from
 * the copy built into the binary. Returns 0, or -1 after logging why (the file cannot be
 * read, does not compile or fails, out of memory). */
int mg_lua_aggregate_register(mg_lua_vm_t *vm);

#endif
