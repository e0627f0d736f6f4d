/* mg_lua_time: the clock, sleeping, timers and logging of the mg Lua API.
 *
 *   mg.now()               wall-clock seconds since the epoch, a float with microsecond
 *                          precision. Allowed everywhere, also while the config loads.
 *   mg.sleep(seconds)      suspends the calling task for at least SECONDS (a uv timer; the
 *                          worker serves others meanwhile); mg.sleep(0) yields once to the
 *                          loop (the task resumes at the loop's next turn, after I/O was
 *                          polled). Returns nothing. Allowed in every hook and in timers, also
 *                          inside the script's own coroutines; raises outside a task ("mg.sleep
 *                          can only be called from a hook or a timer, not while the config
 *                          loads"), for an argument that is not a number from 0 to
 *                          MG_TIME_DELAY_MAX, and where Lua cannot yield (inside a metamethod,
 *                          an iterator or a C function such as table.sort).
 *   mg.timer(delay, fn, ...) runs fn(...) once, at least DELAY seconds from now, in a task of
 *                          its own (hook "timer") on the worker's VM; the task holds the
 *                          caller's config generation until it ends and may yield (mg.sleep,
 *                          I/O). Returns true, or nil, "too many pending timers" (more than
 *                          MG_TIMERS_MAX alive in the worker) or nil, "no memory". An error in
 *                          fn is logged as "timer: FILE:LINE: message\n<traceback>" and the
 *                          worker goes on. Allowed in every hook and in timers, not while the
 *                          config loads (there is no worker yet).
 *   mg.log(level, ...)     writes one error-log line at LEVEL ("debug", "info", "warn",
 *                          "error"): "[lua] FILE:LINE: " (the calling script's position) and
 *                          the other arguments, each through tostring, joined by spaces (a NUL
 *                          byte ends the message). Lines below the configured level are
 *                          dropped. Raises for another level name. Allowed everywhere.
 *
 * Timers are per process (a worker is one process with one loop): every timer alive, pending
 * or running, is on one list so that a stopping worker can cancel them all. */
#ifndef MG_LUA_TIME_H
#define MG_LUA_TIME_H

#include <stddef.h>

#include "mg_lua_vm.h"

/* Most timers alive (pending or running) in one process; mg.timer refuses beyond it. */
#define MG_TIMERS_MAX 10000

/* Longest delay mg.sleep and mg.timer accept, in seconds (about 31 years). */
#define MG_TIME_DELAY_MAX 1e9

/* Registers mg.now, mg.sleep, mg.timer and mg.log in VM. Returns 0, or -1 when Lua is out of
 * memory. */
int mg_lua_time_register(mg_lua_vm_t *vm);

/* Cancels every timer of this process: pending ones never run, running ones stop waiting
 * (their operation is cancelled) and are dropped, and each releases its generation. Handles
 * are closed on their loop: run it once more before closing it. Call before the VM is freed.
 * A timer whose code is running right now is dropped as soon as it yields or ends. */
void mg_lua_timers_cancel_all(void);

/* How many timers of this process are alive (pending or running). */
size_t mg_lua_timers_count(void);

#endif
