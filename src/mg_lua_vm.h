/* mg_lua_vm: one sandboxed LuaJIT state per worker, which loads user chunks and runs hooks in
 * coroutines under a CPU budget and a memory cap.
 *
 * Sandbox. Only base (an allow-list of it), string, table, math, bit and coroutine are open,
 * plus os.time/os.clock/os.date and a global `mg` with `mg.json` and `mg.crypto`. There is no
 * io, debug, ffi, jit, package/require, print, getfenv/setfenv, dofile/loadfile (filesystem
 * reads would block the event loop and read files the gateway may hold), string.dump, and
 * collectgarbage answers only "count". `load` and `loadstring` accept source text only
 * (a chunk starting with "\27" is refused) and give the new function its caller's
 * environment. Each loaded chunk gets a fresh environment table whose __index is the shared
 * base table (metatable locked), so globals of one chunk never leak into another. The library
 * tables themselves (string, table, ...) are shared between chunks and not frozen: chunks
 * come from one operator, so this isolates mistakes, not tenants.
 *
 * CPU budget. LuaJIT does not run hooks inside compiled traces (it would need a build with
 * LUAJIT_ENABLE_CHECKHOOK), so a loop that got hot before a hook was armed runs forever. The
 * JIT compiler is therefore switched off for the whole VM at creation
 * (luaJIT_setmode(LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF)) and the user cannot turn it back on
 * (no `jit` module). Cost: user Lua runs in LuaJIT's interpreter, which is still fast (a few
 * times slower than traces on tight numeric loops, about the same on table/string-heavy glue
 * code); the heavy lifting (JSON, crypto, I/O) is C anyway. In LuaJIT the hook, its mask and
 * its counter live in the global state, not per coroutine (lua_sethook on any thread sets it
 * for the whole VM; verified by spec/00-c/test_lua_vm.c). The budget is a CLOCK_MONOTONIC
 * deadline per resume (and, if set, a count of VM instructions per resume). A clock-only
 * budget is kept by a watchdog: a per-thread timer ticks every 10 ms (a quarter of the budget
 * if less, at least 1 ms) while runs are resumed, and a tick that finds the run past its
 * deadline sets a count hook for the next instruction; so scripts run with no hook at all
 * until then (a hook costs the interpreter a check on every instruction). An instruction
 * budget, or the memory check of the luaL_newstate fallback, uses a count hook every
 * MG_LUA_HOOK_STEP instructions instead. Over budget, the hook raises "script exceeded its
 * CPU budget" and re-fires on every instruction, and the run ends as MG_LUA_ERROR even if the
 * script caught the error with pcall. A single long call into C (a pathological string.find,
 * say) cannot be interrupted; the memory cap bounds the worst of these (string.rep). The
 * watchdog uses SIGALRM (with SA_RESTART): nothing else in the process may.
 *
 * Memory cap. The state is made with lua_newstate and an allocator that refuses to grow past
 * the cap (verified: this LuaJIT, 2.1 OpenResty on x86-64 in GC64 mode, accepts a custom
 * allocator). A refused allocation raises "not enough memory" in the script; the run ends as
 * MG_LUA_ERROR and its memory comes back once the run is freed and the GC runs. Should
 * lua_newstate ever refuse (a non-GC64 build), mg_lua_vm_new falls back to luaL_newstate and
 * the hook compares lua_gc(LUA_GCCOUNT) with the cap instead (coarser: checked every
 * MG_LUA_HOOK_STEP instructions). Error reporting may use MG_LUA_MEM_RESERVE bytes above the
 * cap, so a traceback can always be built.
 *
 * One VM belongs to one thread; nothing here is thread-safe. */
#ifndef MG_LUA_VM_H
#define MG_LUA_VM_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

/* How many VM instructions run between two checks of the count hook (instruction budgets). */
#define MG_LUA_HOOK_STEP 1000

/* Bytes above the memory cap that error reporting (message, traceback) may use. */
#define MG_LUA_MEM_RESERVE (256 * 1024)

/* The wall-clock budget per resume that a new VM starts with, in microseconds. */
#define MG_LUA_DEFAULT_BUDGET_US 100000

/* What mg_lua_vm_resume returns. */
typedef enum {
  MG_LUA_ERROR = -1, /* the run failed: mg_lua_run_error and mg_lua_run_traceback say why */
  MG_LUA_DONE = 0,   /* the function returned: its results are on the coroutine's stack */
  MG_LUA_YIELD = 1   /* a C function yielded: its values are on the coroutine's stack */
} mg_lua_status_t;

/* A sandboxed Lua state (opaque). */
typedef struct mg_lua_vm_s mg_lua_vm_t;

/* One coroutine running one function (opaque). */
typedef struct mg_lua_run_s mg_lua_run_t;

/* Makes a VM whose Lua allocations may total MEM_LIMIT bytes (0: no cap). Returns NULL with a
 * message in ERR when the state cannot be made. The caller frees it with mg_lua_vm_free. */
mg_lua_vm_t *mg_lua_vm_new(size_t mem_limit, char *err, size_t errlen);

/* Closes the Lua state and frees the VM. Every run must have been freed before. */
void mg_lua_vm_free(mg_lua_vm_t *vm);

/* The main Lua state, for C setup that runs no user code. Runs must not use it. */
lua_State *mg_lua_vm_state(mg_lua_vm_t *vm);

/* Sets the budget of each resume: at most MAX_INSNS VM instructions (0: no count limit) and
 * MAX_US microseconds of wall-clock time (0: no time limit). Applies to later resumes. */
void mg_lua_vm_set_budget(mg_lua_vm_t *vm, uint64_t max_insns, uint64_t max_us);

/* Bytes the Lua state holds now. */
size_t mg_lua_vm_mem_used(mg_lua_vm_t *vm);

/* Sets mg.NAME = FN in the sandbox, for the C functions of the mg API. Returns 0, or -1 when
 * out of memory. FN may yield (return lua_yield(L, n)) when called from a run. */
int mg_lua_vm_register(mg_lua_vm_t *vm, const char *name, lua_CFunction fn);

/* Compiles CODE (source text only) as chunk CHUNKNAME in a fresh environment and runs it once
 * under the budget. Returns a registry reference to what the chunk returned (its first
 * value), or to its environment table when it returned nothing or nil, so functions it
 * defined as globals can be found. Returns -1 with "CHUNKNAME:LINE: message" in ERR when it
 * does not compile, fails, yields, or runs out of budget. Release with mg_lua_vm_unref. */
int mg_lua_vm_load(mg_lua_vm_t *vm, const char *chunkname, const char *code, size_t len,
                   char *err, size_t errlen);

/* Like mg_lua_vm_load, for moongate's own Lua code (the config loader): the chunk runs with
 * the full standard globals (debug, os, a `load` that takes an environment) plus `mg` and
 * `sandbox` (the base table user chunks read their globals from). The same budget applies. */
int mg_lua_vm_load_trusted(mg_lua_vm_t *vm, const char *chunkname, const char *code,
                           size_t len, char *err, size_t errlen);

/* Pushes the light userdata that an I/O wait yields (see mg_task.h). The sandbox's
 * coroutine.resume/wrap pass a yield of this value up to the enclosing coroutine. */
void mg_lua_vm_push_io_marker(lua_State *L);

/* What a config may open in the sandbox (lua { allow = { ... } }). */
enum {
  MG_LUA_ALLOW_OS = 1 << 0,       /* the whole os library (execute, exit, remove, ...) */
  MG_LUA_ALLOW_IO = 1 << 1,       /* the io library (blocking file I/O!) */
  MG_LUA_ALLOW_DEBUG = 1 << 2,    /* debug (can escape the sandbox and the budget) */
  MG_LUA_ALLOW_FFI = 1 << 3,      /* ffi (C calls: no budget, no memory cap) */
  MG_LUA_ALLOW_DUMP = 1 << 4,     /* string.dump */
  MG_LUA_ALLOW_BYTECODE = 1 << 5  /* load() of precompiled chunks */
};

/* Opens what WHAT names (MG_LUA_ALLOW_* bits) to every user chunk. Returns 0 or -1. */
int mg_lua_vm_allow(mg_lua_vm_t *vm, unsigned what);

/* Releases a reference returned by mg_lua_vm_load. */
void mg_lua_vm_unref(mg_lua_vm_t *vm, int ref);

/* Makes a run: a new coroutine, anchored in the registry until mg_lua_run_free. Returns NULL
 * when out of memory. Push the function and its arguments on mg_lua_run_thread, then resume. */
mg_lua_run_t *mg_lua_run_new(mg_lua_vm_t *vm);

/* The run's coroutine: push the function and arguments here, read results and yielded values
 * here. Pushing more than LUA_MINSTACK values needs lua_checkstack first. */
lua_State *mg_lua_run_thread(mg_lua_run_t *run);

/* Pushes the registry value REF (from mg_lua_vm_load) onto the run's coroutine. When KEY is
 * not NULL, pushes REF[KEY] instead (a hook in a returned table or environment). Returns 0,
 * or -1 with nothing pushed when that value is not a function. */
int mg_lua_run_push_ref(mg_lua_run_t *run, int ref, const char *key);

/* Starts the run (the coroutine stack holds the function and NARGS arguments above it) or
 * continues it after MG_LUA_YIELD (the NARGS values on top become the results of the yield;
 * the values yielded before are dropped). The budget starts afresh. */
mg_lua_status_t mg_lua_vm_resume(mg_lua_run_t *run, int nargs);

/* After MG_LUA_ERROR: the message, as "chunk:line: message" where Lua knows the place. The
 * run owns the string. */
const char *mg_lua_run_error(const mg_lua_run_t *run);

/* After MG_LUA_ERROR: the coroutine's traceback ("stack traceback:\n\t..."), or "". The run
 * owns the string. */
const char *mg_lua_run_traceback(const mg_lua_run_t *run);

/* Attaches caller data (a request, say) that C functions find through mg_lua_run_current. */
void mg_lua_run_set_data(mg_lua_run_t *run, void *data);

/* The data set with mg_lua_run_set_data, or NULL. */
void *mg_lua_run_data(const mg_lua_run_t *run);

/* The run this thread is resuming now (for a C function called from Lua), or NULL. */
mg_lua_run_t *mg_lua_run_current(void);

/* Drops the coroutine (the GC reclaims it) and frees the run. Not from inside its resume. */
void mg_lua_run_free(mg_lua_run_t *run);

#endif
