/* Tests for mg_lua_time: mg.now, mg.sleep (elapsed time, sleep(0) turns, inside the script's
 * own coroutines, errors, cancellation), mg.timer (delay and arguments, yields inside, the
 * generation it holds, errors logged and contained, the cap, cancel-all) and mg.log (line
 * format, level filter, errors). Tasks are driven as a worker drives them: a uv loop, a
 * worker with the VM, an mg_task_t per hook run. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "mg_gen.h"
#include "mg_log.h"
#include "mg_lua_time.h"
#include "mg_lua_vm.h"
#include "mg_task.h"
#include "mg_test.h"
#include "mg_worker.h"

static char err[1024];
static mg_worker_t *w;     /* the worker: its loop and its VM */
static mg_lua_vm_t *vm;

/* ---------------------------------------------------------------------------------------
 * Harness */

static double mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* mg.test_hook(): the running task's hook name and its generation's refs (or -1). */
static int l_test_hook(lua_State *L) {
  mg_task_t *t = mg_task_current();
  lua_pushstring(L, t ? mg_hook_name(t->hook) : "none");
  lua_pushinteger(L, t && t->gen ? t->gen->refs : -1);
  return 2;
}

/* A fresh worker and VM for each test (MG_RUN runs fn, then finish() tears down). */
static void setup(void) {
  w = calloc(1, sizeof *w);
  if (w == NULL) MG_FAIL("calloc");
  uv_loop_init(&w->loop);
  w->loop.data = w;
  vm = mg_lua_vm_new(256u << 20, err, sizeof err);
  if (vm == NULL) MG_FAIL("mg_lua_vm_new: %s", err);
  w->vm = vm;
  MG_CHECK_INT(mg_lua_time_register(vm), 0);
  MG_CHECK_INT(mg_lua_vm_register(vm, "test_hook", l_test_hook), 0);
}

/* Cancels what a failed test left, lets the loop close every handle, checks none is left. */
static int teardown(void) {
  mg_lua_timers_cancel_all();
  uv_run(&w->loop, UV_RUN_DEFAULT);
  int busy = uv_loop_close(&w->loop);
  mg_lua_vm_free(vm);
  free(w);
  vm = NULL;
  w = NULL;
  return busy;
}

#define RUN(fn)                                                        \
  do {                                                                 \
    setup();                                                           \
    MG_RUN(fn);                                                        \
    if (teardown() != 0) {                                             \
      fprintf(stderr, "  FAIL %s: the loop still has handles\n", #fn); \
      mg_test_failed++;                                                \
    }                                                                  \
  } while (0)

/* Loads CODE as chunk "t" and returns the reference to its environment (its globals). */
static int chunk(const char *code) {
  int ref = mg_lua_vm_load(vm, "t", code, strlen(code), err, sizeof err);
  if (ref < 0) MG_FAIL("load: %s", err);
  return ref;
}

/* Loads CODE as chunk "t" while the config loads (no task); it must fail. Returns the error. */
static const char *load_error(const char *code) {
  int ref = mg_lua_vm_load(vm, "t", code, strlen(code), err, sizeof err);
  if (ref >= 0) {
    mg_lua_vm_unref(vm, ref);
    MG_FAIL("no error from: %s", code);
  }
  return err;
}

typedef struct test_task {
  mg_task_t t;
  int done;
  mg_lua_status_t st;
} test_task_t;

static void on_resumed(mg_task_t *t, mg_lua_status_t st) {
  test_task_t *tt = (test_task_t *)t;
  if (st != MG_LUA_YIELD) {
    tt->done = 1;
    tt->st = st;
  }
}

/* Starts the global function NAME of chunk REF in a task of hook HOOK, as the worker starts a
 * hook: the first resume is direct, later ones come from mg_task_wake. */
static void task_start(test_task_t *tt, int ref, const char *name, int hook, mg_gen_t *gen) {
  memset(tt, 0, sizeof *tt);
  tt->t.run = mg_lua_run_new(vm);
  MG_CHECK(tt->t.run != NULL);
  tt->t.w = w;
  tt->t.gen = gen;
  tt->t.hook = hook;
  tt->t.resumed = on_resumed;
  MG_CHECK_INT(mg_lua_run_push_ref(tt->t.run, ref, name), 0);
  mg_task_t *prev = mg_task_enter(&tt->t);
  mg_lua_status_t st = mg_lua_vm_resume(tt->t.run, 0);
  mg_task_enter(prev);
  on_resumed(&tt->t, st);
}

static int watchdog_fired;
static void on_watchdog(uv_timer_t *h) { watchdog_fired = 1; }

/* Runs the loop until *DONE is set or MS milliseconds pass. Returns *DONE. */
static int loop_until(const int *done, int ms) {
  uv_timer_t dog;
  uv_timer_init(&w->loop, &dog);
  watchdog_fired = 0;
  uv_timer_start(&dog, on_watchdog, (uint64_t)ms, 0);
  while (!*done && !watchdog_fired) uv_run(&w->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&dog, NULL);
  uv_run(&w->loop, UV_RUN_NOWAIT);
  return *done;
}

/* Runs the loop until no timer is left (or MS pass). */
static int no_timers;
static void on_poll_timers(uv_timer_t *h) { no_timers = mg_lua_timers_count() == 0; }
static void loop_until_no_timers(int ms) {
  uv_timer_t poll;
  uv_timer_init(&w->loop, &poll);
  no_timers = mg_lua_timers_count() == 0;
  uv_timer_start(&poll, on_poll_timers, 1, 1);
  loop_until(&no_timers, ms);
  uv_close((uv_handle_t *)&poll, NULL);
  uv_run(&w->loop, UV_RUN_NOWAIT);
  if (!no_timers) MG_FAIL("timers still pending after %d ms", ms);
}

/* The task's results after MG_LUA_DONE. */
static lua_State *results(test_task_t *tt) {
  if (!tt->done) MG_FAIL("the task did not finish");
  if (tt->st != MG_LUA_DONE) MG_FAIL("the task failed: %s", mg_lua_run_error(tt->t.run));
  return mg_lua_run_thread(tt->t.run);
}

/* Calls the global function NAME of chunk REF outside any task and returns its first result
 * as a string (a static copy). */
static const char *call(int ref, const char *name) {
  static char out[4096];
  mg_lua_run_t *run = mg_lua_run_new(vm);
  MG_CHECK(run != NULL);
  MG_CHECK_INT(mg_lua_run_push_ref(run, ref, name), 0);
  mg_lua_status_t st = mg_lua_vm_resume(run, 0);
  lua_State *co = mg_lua_run_thread(run);
  if (st != MG_LUA_DONE) {
    snprintf(out, sizeof out, "%s", mg_lua_run_error(run));
    mg_lua_run_free(run);
    MG_FAIL("%s failed: %s", name, out);
  }
  const char *s = lua_tostring(co, 1);
  snprintf(out, sizeof out, "%s", s ? s : "(not a string)");
  mg_lua_run_free(run);
  return out;
}

/* The error log goes to a temporary file while a test reads it. */
static char log_path[64];
static char log_buf[1 << 16];

static void log_to_file(int level) {
  strcpy(log_path, "/tmp/mg_test_lua_time_XXXXXX");
  int fd = mkstemp(log_path);
  if (fd < 0) MG_FAIL("mkstemp: %s", strerror(errno));
  close(fd);
  MG_CHECK_INT(mg_log_open(log_path, level), 0);
}

/* Puts the error log back on stderr and returns what the file got. */
static const char *log_read(void) {
  mg_log_open(NULL, MG_LOG_INFO);
  int fd = open(log_path, O_RDONLY);
  if (fd < 0) MG_FAIL("open %s: %s", log_path, strerror(errno));
  size_t len = 0;
  ssize_t n;
  while ((n = read(fd, log_buf + len, sizeof log_buf - 1 - len)) > 0) len += (size_t)n;
  close(fd);
  unlink(log_path);
  log_buf[len] = '\0';
  return log_buf;
}

/* ---------------------------------------------------------------------------------------
 * mg.now */

static void test_now(void) {
  int ref = chunk("function now() return string.format('%.6f', mg.now()) end\n"
                  "function step()\n"
                  "  local a = mg.now() local b\n"
                  "  repeat b = mg.now() until b ~= a\n"
                  "  return string.format('%.9f', b - a)\n"
                  "end\n");
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  double now = atof(call(ref, "now"));
  MG_CHECK(fabs(now - ((double)ts.tv_sec + (double)ts.tv_nsec / 1e9)) < 1.0);
  double step = atof(call(ref, "step")); /* the clock moves by microseconds, not seconds */
  MG_CHECK(step > 0 && step < 0.1);
  mg_lua_vm_unref(vm, ref);
}

/* ---------------------------------------------------------------------------------------
 * mg.sleep */

static void test_sleep_elapsed(void) {
  int ref = chunk("function f()\n"
                  "  local t0 = mg.now()\n"
                  "  local r = {mg.sleep(0.05)}\n"
                  "  return mg.now() - t0, #r\n"
                  "end\n");
  test_task_t tt;
  double t0 = mono();
  task_start(&tt, ref, "f", MG_HOOK_ACCESS, NULL);
  MG_CHECK(!tt.done); /* it waits on the loop, not in place */
  MG_CHECK(loop_until(&tt.done, 2000));
  double elapsed = mono() - t0;
  lua_State *co = results(&tt);
  double lua_elapsed = lua_tonumber(co, 1);
  MG_CHECK(elapsed >= 0.05 && elapsed < 1.05);
  MG_CHECK(lua_elapsed >= 0.05 && lua_elapsed < 1.05);
  MG_CHECK_INT(lua_tointeger(co, 2), 0); /* mg.sleep returns nothing */
  mg_lua_run_free(tt.t.run);
  mg_lua_vm_unref(vm, ref);
}

static void test_sleep_zero_takes_one_loop_turn(void) {
  int ref = chunk("trace = {}\n"
                  "function a() for i = 1, 3 do trace[#trace + 1] = 'a' .. i mg.sleep(0) end end\n"
                  "function b() for i = 1, 3 do trace[#trace + 1] = 'b' .. i mg.sleep(0) end end\n"
                  "function once() mg.sleep(0) return 'woke' end\n"
                  "function show()\n" /* the steps of each turn, in a fixed order */
                  "  local turns = {}\n"
                  "  for i = 1, #trace, 2 do\n"
                  "    local turn = {trace[i], trace[i + 1]}\n"
                  "    table.sort(turn)\n"
                  "    turns[#turns + 1] = table.concat(turn, ' ')\n"
                  "  end\n"
                  "  return table.concat(turns, ' | ')\n"
                  "end\n");
  test_task_t ta, tb, t1;
  task_start(&t1, ref, "once", MG_HOOK_HANDLER, NULL);
  MG_CHECK(!t1.done);
  uv_run(&w->loop, UV_RUN_NOWAIT); /* one turn */
  MG_CHECK(t1.done);
  MG_CHECK_STR(lua_tostring(results(&t1), 1), "woke");
  mg_lua_run_free(t1.t.run);

  /* Two tasks that sleep(0) take one step each per loop turn. */
  task_start(&ta, ref, "a", MG_HOOK_HANDLER, NULL);
  task_start(&tb, ref, "b", MG_HOOK_HANDLER, NULL);
  MG_CHECK(loop_until(&tb.done, 2000));
  MG_CHECK(ta.done);
  MG_CHECK_STR(call(ref, "show"), "a1 b1 | a2 b2 | a3 b3");
  mg_lua_run_free(ta.t.run);
  mg_lua_run_free(tb.t.run);
  mg_lua_vm_unref(vm, ref);
}

static int polls;
static void on_check(uv_check_t *h) { polls++; }

/* A timer task that loops on mg.sleep(0) for 100 ms must let the loop poll for I/O between
 * its steps (a 0 ms uv timer started from a timer callback runs in the same pass over the
 * timers in libuv 1.44, so the whole loop would stay inside that pass). A check handle counts
 * the turns that reached the poll. */
static void test_sleep_zero_lets_the_loop_poll(void) {
  int ref = chunk("spins = nil\n"
                  "function start()\n"
                  "  assert(mg.timer(0, function()\n"
                  "    local t0, n = mg.now(), 0\n"
                  "    while mg.now() - t0 < 0.1 do mg.sleep(0) n = n + 1 end\n"
                  "    spins = n\n"
                  "  end))\n"
                  "end\n"
                  "function show() return tostring(spins) end\n");
  test_task_t tt;
  task_start(&tt, ref, "start", MG_HOOK_REQUEST, NULL);
  MG_CHECK(tt.done && tt.st == MG_LUA_DONE);
  mg_lua_run_free(tt.t.run);
  uv_check_t check;
  uv_check_init(&w->loop, &check);
  uv_check_start(&check, on_check);
  polls = 0;
  loop_until_no_timers(3000);
  uv_close((uv_handle_t *)&check, NULL);
  uv_run(&w->loop, UV_RUN_NOWAIT); /* the handle lives on this stack frame */
  int spins = atoi(call(ref, "show"));
  MG_CHECK(spins > 10);
  MG_CHECK(polls >= spins); /* one poll per step at least */
  mg_lua_vm_unref(vm, ref);
}

static void test_sleep_in_user_coroutines(void) {
  int ref = chunk("function f()\n"
                  "  local t0 = mg.now()\n"
                  "  local g = coroutine.wrap(function(a)\n"
                  "    mg.sleep(0.02)\n"
                  "    local x = coroutine.yield(a + 1)\n"
                  "    mg.sleep(0)\n"
                  "    return x * 2\n"
                  "  end)\n"
                  "  local r1 = g(1)\n"
                  "  local r2 = g(10)\n"
                  "  local co = coroutine.create(function() mg.sleep(0.01) return 'inner' end)\n"
                  "  local ok, r3 = coroutine.resume(co)\n"
                  "  local pok, perr = pcall(mg.sleep, 0.01)\n"
                  "  return r1, r2, ok, r3, coroutine.status(co), mg.now() - t0, pok, perr\n"
                  "end\n");
  test_task_t tt;
  task_start(&tt, ref, "f", MG_HOOK_HANDLER, NULL);
  MG_CHECK(!tt.done);
  MG_CHECK(loop_until(&tt.done, 2000));
  lua_State *co = results(&tt);
  MG_CHECK_INT(lua_tointeger(co, 1), 2);
  MG_CHECK_INT(lua_tointeger(co, 2), 20);
  MG_CHECK(lua_toboolean(co, 3));
  MG_CHECK_STR(lua_tostring(co, 4), "inner");
  MG_CHECK_STR(lua_tostring(co, 5), "dead");
  MG_CHECK(lua_tonumber(co, 6) >= 0.04);
  MG_CHECK(lua_toboolean(co, 7)); /* inside pcall too */
  MG_CHECK(lua_isnil(co, 8));
  mg_lua_run_free(tt.t.run);
  mg_lua_vm_unref(vm, ref);
}

static void test_sleep_errors(void) {
  int ref = chunk("local function e(f, ...) local ok, m = pcall(f, ...) return m end\n"
                  "function f()\n"
                  "  return e(function() mg.sleep(-1) end),\n"
                  "         e(function() mg.sleep('1') end),\n"
                  "         e(function() mg.sleep() end),\n"
                  "         e(function() mg.sleep(0/0) end),\n"
                  "         e(function() mg.sleep(math.huge) end),\n"
                  "         e(function() table.sort({3, 2, 1}, function(a, b) mg.sleep(0.01)"
                  " return a < b end) end)\n"
                  "end\n");
  test_task_t tt;
  task_start(&tt, ref, "f", MG_HOOK_LOG, NULL);
  lua_State *co = results(&tt);
  MG_CHECK_STR(lua_tostring(co, 1),
               "t:3: bad argument #1 to 'sleep' (seconds must be from 0 to 1e9, got -1)");
  MG_CHECK_STR(lua_tostring(co, 2),
               "t:4: bad argument #1 to 'sleep' (a number of seconds expected, got string)");
  MG_CHECK_STR(lua_tostring(co, 3),
               "t:5: bad argument #1 to 'sleep' (a number of seconds expected, got no value)");
  MG_CHECK_STR(lua_tostring(co, 4),
               "t:6: bad argument #1 to 'sleep' (seconds must be from 0 to 1e9, got nan)");
  MG_CHECK_STR(lua_tostring(co, 5),
               "t:7: bad argument #1 to 'sleep' (seconds must be from 0 to 1e9, got inf)");
  MG_CHECK_STR(lua_tostring(co, 6),
               "t:8: mg.sleep cannot wait here: Lua cannot yield inside a metamethod, an "
               "iterator or a C function such as table.sort or string.gsub");
  mg_lua_run_free(tt.t.run);
  MG_CHECK(!uv_loop_alive(&w->loop)); /* none of them started a timer */

  /* Outside a task: while the config loads. */
  MG_CHECK_STR(load_error("mg.sleep(1)"), "t:1: mg.sleep can only be called from a hook or a timer, not while the "
                    "config loads");
  MG_CHECK_STR(load_error("mg.timer(1, tostring)"), "t:1: mg.timer can only be called from a hook or a timer, not while the "
                    "config loads");
  mg_lua_vm_unref(vm, ref);
}

static void test_cancel_sleeping_task(void) {
  int ref = chunk("function f() mg.sleep(10) return 'never' end\n"
                  "function g() mg.sleep(0) return 'never' end\n");
  test_task_t a, b;
  task_start(&a, ref, "f", MG_HOOK_HANDLER, NULL);
  task_start(&b, ref, "g", MG_HOOK_HANDLER, NULL);
  MG_CHECK(!a.done && a.t.op != NULL);
  MG_CHECK(!b.done && b.t.op != NULL);
  /* The client went away: the owner cancels and frees; the loop has nothing left to do. */
  mg_task_cancel(&a.t);
  mg_task_cancel(&b.t);
  MG_CHECK(a.t.op == NULL && b.t.op == NULL);
  mg_lua_run_free(a.t.run);
  mg_lua_run_free(b.t.run);
  double t0 = mono();
  uv_run(&w->loop, UV_RUN_DEFAULT);
  MG_CHECK(mono() - t0 < 0.5);
  MG_CHECK(!a.done && !b.done); /* never woken */
  MG_CHECK(!uv_loop_alive(&w->loop));
  mg_lua_vm_unref(vm, ref);
}

/* ---------------------------------------------------------------------------------------
 * mg.timer */

static void test_timer_runs_after_delay_with_arguments(void) {
  int ref = chunk("got = nil\n"
                  "function start()\n"
                  "  t0 = mg.now()\n"
                  "  return mg.timer(0.05, function(a, b, c, ...)\n"
                  "    local hook, refs = mg.test_hook()\n"
                  "    got = string.format('%s %s %s %d %s el=%s', a, b, tostring(c),\n"
                  "      select('#', ...), hook, tostring(mg.now() - t0 >= 0.05))\n"
                  "  end, 'x', 2, nil, nil)\n"
                  "end\n"
                  "function show() return tostring(got) end\n");
  test_task_t tt;
  double t0 = mono();
  task_start(&tt, ref, "start", MG_HOOK_ACCESS, NULL);
  lua_State *co = results(&tt);
  MG_CHECK(lua_isboolean(co, 1) && lua_toboolean(co, 1));
  mg_lua_run_free(tt.t.run);
  MG_CHECK_INT(mg_lua_timers_count(), 1);
  MG_CHECK_STR(call(ref, "show"), "nil"); /* not yet */
  loop_until_no_timers(2000);
  double elapsed = mono() - t0;
  MG_CHECK(elapsed >= 0.05 && elapsed < 1.05);
  MG_CHECK_STR(call(ref, "show"), "x 2 nil 1 timer el=true");
  mg_lua_vm_unref(vm, ref);
}

static void test_timer_yields_and_nests(void) {
  int ref = chunk("trace = {}\n"
                  "local function note(s) trace[#trace + 1] = s end\n"
                  "function start()\n"
                  "  mg.timer(0, function()\n"
                  "    note('outer')\n"
                  "    mg.sleep(0.02)\n"
                  "    note('slept')\n"
                  "    mg.timer(0.01, function(x) note('inner ' .. x) end, 'arg')\n"
                  "    mg.sleep(0)\n"
                  "    note('outer done')\n"
                  "  end)\n"
                  "  note('started')\n"
                  "end\n"
                  "function show() return table.concat(trace, ', ') end\n");
  test_task_t tt;
  task_start(&tt, ref, "start", MG_HOOK_HANDLER, NULL);
  MG_CHECK(tt.done && tt.st == MG_LUA_DONE);
  mg_lua_run_free(tt.t.run);
  loop_until_no_timers(2000);
  MG_CHECK_STR(call(ref, "show"), "started, outer, slept, outer done, inner arg");
  mg_lua_vm_unref(vm, ref);
}

static int gen_freed;
static void on_gen_unref(mg_gen_t *g) { gen_freed = 1; }

/* A generation the size of what a test needs: mg_gen_free copes with a zeroed one. */
static mg_gen_t *fake_gen(void) {
  mg_gen_t *g = calloc(1, sizeof *g);
  if (g == NULL) MG_FAIL("calloc");
  g->refs = 1;
  g->lua_ref = -1;
  g->lua_unref = on_gen_unref;
  gen_freed = 0;
  return g;
}

static void test_timer_holds_generation(void) {
  int ref = chunk("refs_inside = nil\n"
                  "function start()\n"
                  "  mg.timer(0.01, function()\n"
                  "    mg.sleep(0.01)\n"
                  "    local hook, refs = mg.test_hook()\n"
                  "    refs_inside = refs\n"
                  "  end)\n"
                  "end\n"
                  "function show() return tostring(refs_inside) end\n");
  mg_gen_t *g = fake_gen();
  test_task_t tt;
  task_start(&tt, ref, "start", MG_HOOK_HANDLER, g);
  MG_CHECK(tt.done && tt.st == MG_LUA_DONE);
  mg_lua_run_free(tt.t.run);
  MG_CHECK_INT(g->refs, 2); /* the request's and the timer's */
  /* The request ends (a reload replaced the generation): the timer keeps it alive. */
  mg_gen_release(g);
  MG_CHECK(!gen_freed);
  loop_until_no_timers(2000);
  MG_CHECK_STR(call(ref, "show"), "1");
  MG_CHECK(gen_freed); /* released when the timer ended */
  mg_lua_vm_unref(vm, ref);
}

static void test_timer_errors_are_logged_and_contained(void) {
  int ref = chunk("ok = false\n"
                  "function start()\n"
                  "  mg.timer(0, function()\n"
                  "    error('boom')\n"
                  "  end)\n"
                  "  mg.timer(0, function() coroutine.yield() ok = 'resumed?' end)\n"
                  "  mg.timer(0.02, function() ok = true end)\n"
                  "end\n"
                  "function show() return tostring(ok) end\n");
  log_to_file(MG_LOG_INFO);
  test_task_t tt;
  task_start(&tt, ref, "start", MG_HOOK_HANDLER, NULL);
  MG_CHECK(tt.done && tt.st == MG_LUA_DONE);
  mg_lua_run_free(tt.t.run);
  loop_until_no_timers(2000);
  const char *log = log_read();
  MG_CHECK_STR(call(ref, "show"), "true"); /* the worker went on */
  char expect[128];
  snprintf(expect, sizeof expect, " [error] pid=%ld timer: t:4: boom\nstack traceback:\n\t",
           (long)getpid());
  MG_CHECK(strstr(log, expect) != NULL);
  MG_CHECK(strstr(log, "\tt:4: in function <t:3>\n") != NULL);
  MG_CHECK(strstr(log, "timer: the function yielded outside an mg call (coroutine.yield at "
                       "its top level?) and was stopped\n") != NULL);
  mg_lua_vm_unref(vm, ref);
}

static void test_timer_arguments_checked(void) {
  int ref = chunk("local function e(f, ...) local ok, m = pcall(f, ...) return m end\n"
                  "function f()\n"
                  "  return e(function() mg.timer(-1, tostring) end),\n"
                  "         e(function() mg.timer(1) end),\n"
                  "         e(function() mg.timer('1', tostring) end)\n"
                  "end\n");
  test_task_t tt;
  task_start(&tt, ref, "f", MG_HOOK_HANDLER, NULL);
  lua_State *co = results(&tt);
  MG_CHECK_STR(lua_tostring(co, 1),
               "t:3: bad argument #1 to 'timer' (seconds must be from 0 to 1e9, got -1)");
  MG_CHECK_STR(lua_tostring(co, 2),
               "t:4: bad argument #2 to 'timer' (function expected, got no value)");
  MG_CHECK_STR(lua_tostring(co, 3),
               "t:5: bad argument #1 to 'timer' (a number of seconds expected, got string)");
  mg_lua_run_free(tt.t.run);
  MG_CHECK_INT(mg_lua_timers_count(), 0);
  mg_lua_vm_unref(vm, ref);
}

static void test_too_many_timers(void) {
  mg_lua_vm_set_budget(vm, 0, 0); /* ten thousand timers take a while under ASan */
  int ref = chunk("function f()\n"
                  "  local noop = function() end\n"
                  "  for i = 1, 20000 do\n"
                  "    local ok, e = mg.timer(100, noop, i)\n"
                  "    if not ok then return i, e end\n"
                  "  end\n"
                  "end\n");
  test_task_t tt;
  task_start(&tt, ref, "f", MG_HOOK_HANDLER, NULL);
  lua_State *co = results(&tt);
  MG_CHECK_INT(lua_tointeger(co, 1), MG_TIMERS_MAX + 1);
  MG_CHECK_STR(lua_tostring(co, 2), "too many pending timers");
  mg_lua_run_free(tt.t.run);
  MG_CHECK_INT(mg_lua_timers_count(), MG_TIMERS_MAX);
  mg_lua_timers_cancel_all();
  MG_CHECK_INT(mg_lua_timers_count(), 0);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  MG_CHECK(!uv_loop_alive(&w->loop));
  mg_lua_vm_unref(vm, ref);
}

static void test_cancel_all(void) {
  int ref = chunk("stage = 'none'\n"
                  "function start()\n"
                  "  for i = 1, 3 do mg.timer(10, function() stage = 'pending ran' end) end\n"
                  "  mg.timer(0, function() stage = 'sleeping' mg.sleep(10) stage = 'woke' end)\n"
                  "end\n"
                  "function show() return stage end\n");
  mg_gen_t *g = fake_gen();
  test_task_t tt;
  task_start(&tt, ref, "start", MG_HOOK_HANDLER, g);
  mg_lua_run_free(tt.t.run);
  MG_CHECK_INT(mg_lua_timers_count(), 4);
  MG_CHECK_INT(g->refs, 5);
  int never = 0;
  loop_until(&never, 30); /* the 0 s timer starts and sleeps */
  MG_CHECK_STR(call(ref, "show"), "sleeping");
  /* The worker stops. */
  mg_lua_timers_cancel_all();
  MG_CHECK_INT(mg_lua_timers_count(), 0);
  MG_CHECK_INT(g->refs, 1);
  double t0 = mono();
  uv_run(&w->loop, UV_RUN_DEFAULT);
  MG_CHECK(mono() - t0 < 0.5);
  MG_CHECK(!uv_loop_alive(&w->loop));
  MG_CHECK_STR(call(ref, "show"), "sleeping");
  mg_gen_release(g);
  MG_CHECK(gen_freed);
  mg_lua_vm_unref(vm, ref);
}

/* ---------------------------------------------------------------------------------------
 * mg.log */

static void test_log_format_and_filter(void) {
  log_to_file(MG_LOG_INFO);
  static const char code[] =
      "local obj = setmetatable({}, {__tostring = function() return 'obj' end})\n"
      "mg.log('info', 'hello', 42, nil, true, obj, 1.5)\n"
      "mg.log('debug', 'hidden')\n"
      "mg.log('warn')\n"
      "mg.log('error', 'two\\nlines')\n";
  int ref = mg_lua_vm_load(vm, "t", code, sizeof code - 1, err, sizeof err); /* at load time */
  if (ref < 0) {
    log_read();
    MG_FAIL("load: %s", err);
  }
  mg_lua_vm_unref(vm, ref);
  /* In a hook too: the position is the hook's. */
  ref = chunk("function f()\n  mg.log('info', 'from the hook')\nend\n");
  test_task_t tt;
  task_start(&tt, ref, "f", MG_HOOK_LOG, NULL);
  MG_CHECK(tt.done && tt.st == MG_LUA_DONE);
  mg_lua_run_free(tt.t.run);
  mg_lua_vm_unref(vm, ref);
  const char *log = log_read();

  char expect[512];
  long pid = (long)getpid();
  snprintf(expect, sizeof expect,
           " [info] pid=%ld [lua] t:2: hello 42 nil true obj 1.5\n", pid);
  MG_CHECK(strstr(log, expect) != NULL);
  snprintf(expect, sizeof expect, " [warn] pid=%ld [lua] t:4: \n", pid);
  MG_CHECK(strstr(log, expect) != NULL);
  snprintf(expect, sizeof expect, " [error] pid=%ld [lua] t:5: two\nlines\n", pid);
  MG_CHECK(strstr(log, expect) != NULL);
  snprintf(expect, sizeof expect, " [info] pid=%ld [lua] t:2: from the hook\n", pid);
  MG_CHECK(strstr(log, expect) != NULL);
  MG_CHECK(strstr(log, "hidden") == NULL);
  int lines = 0;
  for (const char *p = log; (p = strstr(p, " pid=")) != NULL; p++) lines++;
  MG_CHECK_INT(lines, 4);
}

static void test_log_debug_level_and_errors(void) {
  log_to_file(MG_LOG_DEBUG);
  static const char code[] = "mg.log('debug', 'shown now')";
  int ref = mg_lua_vm_load(vm, "t", code, sizeof code - 1, err, sizeof err);
  const char *log = log_read();
  if (ref < 0) MG_FAIL("load: %s", err);
  mg_lua_vm_unref(vm, ref);
  MG_CHECK(strstr(log, "[debug] pid=") != NULL);
  MG_CHECK(strstr(log, "[lua] t:1: shown now\n") != NULL);

  static const char *const bad[] = {"mg.log('fatal', 'x')", "mg.log('off', 'x')",
                                    "mg.log(3, 'x')", "mg.log()"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    MG_CHECK_STR(load_error(bad[i]), "t:1: bad argument #1 to 'log' (level must be \"debug\", \"info\", "
                      "\"warn\" or \"error\")");
  }
  static const char weird[] =
      "mg.log('info', setmetatable({}, {__tostring = function() return {} end}))";
  MG_CHECK(strstr(load_error(weird), "must return a string") != NULL);
}

int main(void) {
  RUN(test_now);
  RUN(test_sleep_elapsed);
  RUN(test_sleep_zero_takes_one_loop_turn);
  RUN(test_sleep_zero_lets_the_loop_poll);
  RUN(test_sleep_in_user_coroutines);
  RUN(test_sleep_errors);
  RUN(test_cancel_sleeping_task);
  RUN(test_timer_runs_after_delay_with_arguments);
  RUN(test_timer_yields_and_nests);
  RUN(test_timer_holds_generation);
  RUN(test_timer_errors_are_logged_and_contained);
  RUN(test_timer_arguments_checked);
  RUN(test_too_many_timers);
  RUN(test_cancel_all);
  RUN(test_log_format_and_filter);
  RUN(test_log_debug_level_and_errors);
  return mg_test_summary();
}
