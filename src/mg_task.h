/* mg_task: a Lua coroutine that the C loop drives: a request's hooks, a log hook that outlives
 * its request, or an mg.timer callback. It is the bridge between the mg API's C functions and
 * the event loop (the cosocket model): a C function that must wait for I/O starts the
 * operation, records it with mg_task_wait and yields; when the operation completes (in a libuv
 * callback) it pushes its results on the task's coroutine and calls mg_task_wake, which
 * resumes the coroutine and then hands the outcome to the task's owner.
 *
 *   static int l_sleep(lua_State *L) {
 *     mg_task_t *t = mg_task_check(L, "mg.sleep", MG_HOOKS_ANY);
 *     op = start_timer(..., t);                 // its callback: push nothing, mg_task_wake(t, 0)
 *     return mg_task_wait(L, t, op, cancel_timer);
 *   }
 *
 * A task that is abandoned while it waits (the client went away, the worker stops) calls the
 * operation's cancel function; the operation must then never wake the task.
 *
 * Yields inside a user's own coroutines. mg_task_wait yields a marker (mg_task_io_marker).
 * The sandbox's coroutine.resume / coroutine.wrap pass such a yield up to the task's own
 * coroutine and hand the results back down (mg_lua_vm.c), so I/O works inside user
 * coroutines too. */
#ifndef MG_TASK_H
#define MG_TASK_H

#include <lua.h>

#include "mg_lua_vm.h"

struct mg_worker;
struct mg_request;
struct mg_gen;

/* The hook a task is running: the request phases (as mg_phase_t numbers them) and the others.
 * API functions name the hooks they allow as a mask of 1 << MG_HOOK_*. */
enum {
  MG_HOOK_REQUEST = 0, MG_HOOK_ACCESS, MG_HOOK_HANDLER, MG_HOOK_RESPONSE, MG_HOOK_LOG,
  MG_HOOK_TIMER, MG_HOOK_FILTER, MG_HOOK_COUNT
};
#define MG_HOOKS_ANY ((1u << MG_HOOK_COUNT) - 1)
#define MG_HOOKS_REQUEST_SIDE ((1u << MG_HOOK_REQUEST) | (1u << MG_HOOK_ACCESS) | \
                               (1u << MG_HOOK_HANDLER))

typedef struct mg_task mg_task_t;

struct mg_task {
  mg_lua_run_t *run;
  struct mg_worker *w;
  struct mg_gen *gen;           /* the config generation the task runs on (a reference) */
  struct mg_request *req;       /* the request, while the task serves one; else NULL */
  int hook;                     /* MG_HOOK_* running now */
  void *op;                     /* the operation the coroutine waits for, or NULL */
  void (*cancel)(void *op);     /* stops OP without waking the task */
  /* Called after every resume that mg_task_wake made: the run yielded again (st ==
   * MG_LUA_YIELD: the task may be waiting again, or the step finished) or ended. */
  void (*resumed)(mg_task_t *t, mg_lua_status_t st);
  void *data;                   /* the owner's */
};

/* The name of a hook ("access"), for messages. */
const char *mg_hook_name(int hook);

/* The task whose coroutine is running now, or NULL (the config loading, plain C). */
mg_task_t *mg_task_current(void);

/* For an mg API function named FNAME: returns the running task, or raises a Lua error when
 * there is none ("FNAME can only be called from a hook or a timer, not while the config
 * loads") or its hook is not in ALLOWED ("FNAME cannot be called in the log hook"). */
mg_task_t *mg_task_check(lua_State *L, const char *fname, unsigned allowed);

/* Records that T waits for OP and yields the coroutine: `return mg_task_wait(L, t, op, c);`
 * at the end of a C function. The values the operation later pushes become the function's
 * results. */
int mg_task_wait(lua_State *L, mg_task_t *t, void *op, void (*cancel)(void *op));

/* From the operation's completion callback: NRESULTS values were pushed on
 * mg_lua_run_thread(t->run). Resumes the coroutine and calls t->resumed. The task may be
 * freed by its owner inside that call: do not touch T afterwards. */
void mg_task_wake(mg_task_t *t, int nresults);

/* Cancels the operation T waits for, if any (the owner is abandoning the task). */
void mg_task_cancel(mg_task_t *t);

/* Whether the values the coroutine yielded (on top of its stack, NVALUES of them) are an I/O
 * wait made by mg_task_wait. */
int mg_task_is_io_yield(lua_State *co, int nvalues);

/* Sets the task that mg_task_current returns while the owner resumes it directly. Returns the
 * previous one, to restore afterwards. */
mg_task_t *mg_task_enter(mg_task_t *t);

#endif
