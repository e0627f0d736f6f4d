/* mg_lua_time: mg.now, mg.sleep, mg.timer and mg.log (see mg_lua_time.h for the Lua API).
 *
 * Delays. The loop's clock counts whole milliseconds and is cached at the start of each loop
 * turn, so a timer started from a long callback could fire early by the time the callback
 * took, and a timer of N ms can fire up to 1 ms short of N real milliseconds. A delay is
 * therefore counted from a refreshed loop clock (uv_update_time) and rounded up to whole
 * milliseconds plus one: a sleep is never shorter than asked. The +1 also keeps every delay
 * above zero, which matters in libuv 1.44: a 0 ms timer started from a timer callback runs
 * in the same pass over the timer heap, so a task woken by timers that kept sleeping 0 would
 * never let the loop poll for I/O. mg.sleep(0) uses an idle handle instead: it runs once on
 * the next loop turn, after a poll that does not block.
 *
 * Timers. mg.timer makes the timer's run at once and parks the function and its arguments on
 * the run's coroutine: a trampoline (Lua, so that fn may yield: a C function could not call
 * it and then yield) and the function with its arguments packed in a table, so that any
 * number of them fits in the three stack slots a fresh coroutine surely has. The trampoline
 * ends in a tail call, so tracebacks show the user's function at the bottom. When the uv
 * timer fires, the timer's embedded mg_task_t runs it like any hook; a timer is freed in its
 * handle's close callback, after the task has released its run and its generation. */
#include "mg_lua_time.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <uv.h>

#include "mg_gen.h"
#include "mg_log.h"
#include "mg_task.h"
#include "mg_worker.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Registry key (its address) of the timers' trampoline in each VM. */
static const char trampoline_key;

/* Calls f with the packed arguments; the tail call leaves no frame of its own. */
static const char trampoline_lua[] =
    "local unpack = ...\n"
    "return function(f, args) return f(unpack(args, 1, args.n)) end\n";

/* ------------------------------------------------------------------------------------------
 * Shared pieces
 * ---------------------------------------------------------------------------------------- */

/* The delay at IDX in seconds: a number from 0 to MG_TIME_DELAY_MAX. */
static double check_delay(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TNUMBER) {
    luaL_argerror(L, idx, lua_pushfstring(L, "a number of seconds expected, got %s",
                                          luaL_typename(L, idx)));
  }
  double s = (double)lua_tonumber(L, idx);
  if (!(s >= 0 && s <= MG_TIME_DELAY_MAX)) { /* NaN fails too */
    luaL_argerror(L, idx, lua_pushfstring(L, "seconds must be from 0 to 1e9, got %f",
                                          (lua_Number)s));
  }
  return s;
}

/* The loop timeout for a delay of SECONDS: see the top of the file for the rounding. */
static uint64_t delay_ms(uv_loop_t *loop, double seconds) {
  uv_update_time(loop);
  return (uint64_t)ceil(seconds * 1000.0) + 1;
}

static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)(ts.tv_nsec / 1000) / 1e6);
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * mg.sleep
 * ---------------------------------------------------------------------------------------- */

/* One sleep: a timer, or an idle handle for mg.sleep(0). Freed in the close callback. */
typedef struct sleep_op {
  union {
    uv_handle_t handle;
    uv_timer_t timer;
    uv_idle_t idle;
  } u;
  mg_task_t *task;
} sleep_op_t;

static void on_sleep_closed(uv_handle_t *h) { free(h->data); }

static void sleep_done(sleep_op_t *op) {
  mg_task_t *t = op->task;
  uv_close(&op->u.handle, on_sleep_closed);
  mg_task_wake(t, 0);
}

static void on_sleep_timer(uv_timer_t *h) { sleep_done(h->data); }

static void on_sleep_idle(uv_idle_t *h) { sleep_done(h->data); }

/* The task is abandoned: the handle stops now and the op goes with its close callback. */
static void cancel_sleep(void *p) {
  sleep_op_t *op = p;
  uv_close(&op->u.handle, on_sleep_closed);
}

static int l_sleep(lua_State *L) {
  mg_task_t *t = mg_task_check(L, "mg.sleep", MG_HOOKS_ANY);
  double s = check_delay(L, 1);
  /* A yield that Lua refuses would raise after the wait was recorded, and the timer would
   * later wake a task that is doing something else: refuse before starting anything. */
  if (!lua_isyieldable(L)) {
    return luaL_error(L, "mg.sleep cannot wait here: Lua cannot yield inside a metamethod, an "
                         "iterator or a C function such as table.sort or string.gsub");
  }
  sleep_op_t *op = malloc(sizeof *op);
  if (op == NULL) return luaL_error(L, "mg.sleep: out of memory");
  op->task = t;
  uv_loop_t *loop = &t->w->loop;
  if (s == 0) {
    uv_idle_init(loop, &op->u.idle);
    op->u.handle.data = op;
    uv_idle_start(&op->u.idle, on_sleep_idle);
  } else {
    uv_timer_init(loop, &op->u.timer);
    op->u.handle.data = op;
    uv_timer_start(&op->u.timer, on_sleep_timer, delay_ms(loop, s), 0);
  }
  return mg_task_wait(L, t, op, cancel_sleep);
}

/* ------------------------------------------------------------------------------------------
 * mg.timer
 * ---------------------------------------------------------------------------------------- */

enum { TIMER_PENDING, TIMER_RUNNING };

typedef struct mg_timer {
  uv_timer_t handle;             /* counts the delay down; closed when the timer ends */
  mg_task_t task;                /* run (owned), w, gen (a reference, or NULL), data = self */
  struct mg_timer *prev, *next;  /* every live timer of the process */
  int state;                     /* TIMER_* */
  int cancelled;                 /* cancelled while its code was running: end at the yield */
} mg_timer_t;

static mg_timer_t *timers;
static size_t ntimers;

static void on_timer_closed(uv_handle_t *h) { free(container_of(h, mg_timer_t, handle)); }

/* Drops the timer: off the list, its run and generation released, freed once closed. */
static void timer_end(mg_timer_t *tm) {
  if (tm->prev) tm->prev->next = tm->next;
  else timers = tm->next;
  if (tm->next) tm->next->prev = tm->prev;
  ntimers--;
  mg_lua_run_free(tm->task.run);
  tm->task.run = NULL;
  if (tm->task.gen) mg_gen_release(tm->task.gen);
  tm->task.gen = NULL;
  uv_close((uv_handle_t *)&tm->handle, on_timer_closed);
}

/* After each resume of a timer's run (the first one, and every mg_task_wake). */
static void on_timer_resumed(mg_task_t *t, mg_lua_status_t st) {
  mg_timer_t *tm = t->data;
  if (st == MG_LUA_YIELD) {
    if (t->op != NULL && !tm->cancelled) return; /* waits for its operation */
    if (t->op == NULL) {
      /* Nothing would ever resume it: a bare coroutine.yield at the function's top level. */
      mg_log_error("timer: the function yielded outside an mg call (coroutine.yield at its "
                   "top level?) and was stopped");
    }
    mg_task_cancel(t);
  } else if (st == MG_LUA_ERROR) {
    mg_log_error("timer: %s\n%s", mg_lua_run_error(t->run), mg_lua_run_traceback(t->run));
  }
  timer_end(tm);
}

static void on_timer_fire(uv_timer_t *h) {
  mg_timer_t *tm = container_of(h, mg_timer_t, handle);
  tm->state = TIMER_RUNNING;
  mg_task_t *prev = mg_task_enter(&tm->task);
  mg_lua_status_t st = mg_lua_vm_resume(tm->task.run, 2); /* trampoline(fn, args) */
  mg_task_enter(prev);
  on_timer_resumed(&tm->task, st);
}

static int l_timer(lua_State *L) {
  mg_task_t *t = mg_task_check(L, "mg.timer", MG_HOOKS_ANY);
  double delay = check_delay(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  int nargs = lua_gettop(L) - 2;
  if (ntimers >= MG_TIMERS_MAX) {
    lua_pushnil(L);
    lua_pushliteral(L, "too many pending timers");
    return 2;
  }
  /* Everything that may raise (Lua allocations) happens before the C allocations. */
  lua_createtable(L, nargs, 1);
  for (int i = 1; i <= nargs; i++) {
    lua_pushvalue(L, 2 + i);
    lua_rawseti(L, -2, i);
  }
  lua_pushinteger(L, nargs);
  lua_setfield(L, -2, "n");
  lua_pushlightuserdata(L, (void *)&trampoline_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -3); /* stack: ..., args, trampoline, fn, args */

  mg_timer_t *tm = calloc(1, sizeof *tm);
  mg_lua_run_t *run = tm != NULL ? mg_lua_run_new(t->w->vm) : NULL;
  if (run == NULL) {
    free(tm);
    lua_pushnil(L);
    lua_pushliteral(L, "no memory");
    return 2;
  }
  lua_xmove(L, mg_lua_run_thread(run), 3); /* a fresh coroutine has room for three */
  tm->task.run = run;
  tm->task.w = t->w;
  tm->task.gen = t->gen != NULL ? mg_gen_hold(t->gen) : NULL;
  tm->task.hook = MG_HOOK_TIMER;
  tm->task.resumed = on_timer_resumed;
  tm->task.data = tm;
  tm->state = TIMER_PENDING;
  uv_timer_init(&t->w->loop, &tm->handle);
  uv_timer_start(&tm->handle, on_timer_fire, delay_ms(&t->w->loop, delay), 0);
  tm->next = timers;
  if (timers) timers->prev = tm;
  timers = tm;
  ntimers++;
  lua_pushboolean(L, 1);
  return 1;
}

void mg_lua_timers_cancel_all(void) {
  mg_task_t *running = mg_task_current();
  mg_timer_t *next;
  for (mg_timer_t *tm = timers; tm != NULL; tm = next) {
    next = tm->next;
    if (&tm->task == running) { /* its resume is on the C stack: on_timer_resumed ends it */
      tm->cancelled = 1;
      continue;
    }
    if (tm->state == TIMER_RUNNING) mg_task_cancel(&tm->task);
    timer_end(tm); /* closing a pending timer's handle stops it */
  }
}

size_t mg_lua_timers_count(void) { return ntimers; }

/* ------------------------------------------------------------------------------------------
 * mg.log
 * ---------------------------------------------------------------------------------------- */

static int l_log(lua_State *L) {
  int level = lua_type(L, 1) == LUA_TSTRING ? mg_log_level_parse(lua_tostring(L, 1)) : -1;
  if (level < 0 || level >= MG_LOG_OFF) {
    luaL_argerror(L, 1, "level must be \"debug\", \"info\", \"warn\" or \"error\"");
  }
  int n = lua_gettop(L);
  lua_getglobal(L, "tostring"); /* n + 1 */
  luaL_where(L, 1);             /* n + 2: "file:line: " of the calling script, or "" */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 2; i <= n; i++) {
    if (i > 2) luaL_addchar(&b, ' ');
    lua_pushvalue(L, n + 1);
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    if (!lua_isstring(L, -1)) return luaL_error(L, "'tostring' must return a string to 'log'");
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  mg_log(level, "[lua] %s%s", lua_tostring(L, n + 2), lua_tostring(L, -1));
  return 0;
}

/* ------------------------------------------------------------------------------------------
 * Registration
 * ---------------------------------------------------------------------------------------- */

/* Compiles the trampoline on the main state; runs under lua_cpcall. */
static int register_cb(lua_State *L) {
  if (luaL_loadbuffer(L, trampoline_lua, sizeof trampoline_lua - 1, "=mg.timer") != 0)
    return lua_error(L);
  lua_getglobal(L, "unpack");
  lua_call(L, 1, 1);
  lua_pushlightuserdata(L, (void *)&trampoline_key);
  lua_insert(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

int mg_lua_time_register(mg_lua_vm_t *vm) {
  lua_State *L = mg_lua_vm_state(vm);
  if (lua_cpcall(L, register_cb, NULL) != 0) {
    lua_pop(L, 1);
    return -1;
  }
  if (mg_lua_vm_register(vm, "now", l_now) != 0 || mg_lua_vm_register(vm, "sleep", l_sleep) != 0 ||
      mg_lua_vm_register(vm, "timer", l_timer) != 0 || mg_lua_vm_register(vm, "log", l_log) != 0)
    return -1;
  return 0;
}
