/* Unit tests for mg_lua_vm: the sandbox, chunk isolation, errors with places and tracebacks,
 * yield/resume, the CPU budget (also for loops that would be hot under the JIT) and the
 * memory cap. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "mg_lua_vm.h"
#include "mg_test.h"

static char err[512];

static mg_lua_vm_t *vm_new(size_t mem_limit) {
  mg_lua_vm_t *vm = mg_lua_vm_new(mem_limit, err, sizeof(err));
  if (vm == NULL) MG_FAIL("mg_lua_vm_new: %s", err);
  return vm;
}

static int load(mg_lua_vm_t *vm, const char *name, const char *code) {
  int ref = mg_lua_vm_load(vm, name, code, strlen(code), err, sizeof(err));
  if (ref < 0) MG_FAIL("load %s: %s", name, err);
  return ref;
}

/* Starts a run of the function REF with one optional string argument. */
static mg_lua_run_t *start(mg_lua_vm_t *vm, int ref, const char *arg, mg_lua_status_t *st) {
  mg_lua_run_t *run = mg_lua_run_new(vm);
  MG_CHECK(run != NULL);
  MG_CHECK_INT(mg_lua_run_push_ref(run, ref, NULL), 0);
  if (arg != NULL) lua_pushstring(mg_lua_run_thread(run), arg);
  *st = mg_lua_vm_resume(run, arg != NULL ? 1 : 0);
  return run;
}

static double ms_since(const struct timespec *t0) {
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

static void test_sandbox(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int ref = load(vm, "sb.lua",
                 "return function()\n"
                 "  local _, gc = pcall(collectgarbage, 'collect')\n"
                 "  local f, bc = loadstring('\\27LJ\\2 junk')\n"
                 "  local _, lf = pcall(load, function() return nil end)\n"
                 "  return type(io), type(debug), type(ffi), type(jit), type(require),\n"
                 "    type(os.execute), type(string.dump), type(('').dump), type(dofile),\n"
                 "    type(loadfile), type(print), type(getfenv), type(os.time()),\n"
                 "    type(os.clock()), f, bc, gc, type(collectgarbage('count')),\n"
                 "    loadstring('return 1 + 1')(), getmetatable(_G), lf\n"
                 "end\n");
  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, NULL, &st);
  lua_State *co = mg_lua_run_thread(run);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_gettop(co), 21);
  for (int i = 1; i <= 12; i++) MG_CHECK_STR(lua_tostring(co, i), "nil");
  MG_CHECK_STR(lua_tostring(co, 13), "number");
  MG_CHECK_STR(lua_tostring(co, 14), "number");
  MG_CHECK(lua_isnil(co, 15));
  MG_CHECK_STR(lua_tostring(co, 16), "bytecode chunks are not allowed in the sandbox");
  MG_CHECK(strstr(lua_tostring(co, 17), "collectgarbage(\"collect\") is not available") != NULL);
  MG_CHECK_STR(lua_tostring(co, 18), "number");
  MG_CHECK_INT(lua_tointeger(co, 19), 2);
  MG_CHECK(lua_isboolean(co, 20) && !lua_toboolean(co, 20));
  MG_CHECK(strstr(lua_tostring(co, 21), "only strings are accepted") != NULL);
  mg_lua_run_free(run);

  /* Bytecode given to the loader itself is refused before Lua sees it. */
  MG_CHECK_INT(mg_lua_vm_load(vm, "bc.lua", "\033LJ\002xx", 6, err, sizeof(err)), -1);
  MG_CHECK_STR(err, "bc.lua: bytecode chunks are not allowed");
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

static void test_env_isolation(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int a = load(vm, "a.lua", "shared = 42\nstring_seen = type(string)\nreturn function() return shared end");
  int b = load(vm, "b.lua", "return function() return shared, _G.shared, string_seen end");
  mg_lua_status_t st;
  mg_lua_run_t *ra = start(vm, a, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(ra), 1), 42);
  mg_lua_run_t *rb = start(vm, b, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_gettop(mg_lua_run_thread(rb)), 3);
  MG_CHECK(lua_isnil(mg_lua_run_thread(rb), 1));
  MG_CHECK(lua_isnil(mg_lua_run_thread(rb), 2));
  MG_CHECK(lua_isnil(mg_lua_run_thread(rb), 3));
  mg_lua_run_free(ra);
  mg_lua_run_free(rb);

  /* A chunk that returns nothing yields its environment: its global functions are hooks. */
  int c = load(vm, "c.lua", "function access(x) return x .. '!' end");
  mg_lua_run_t *rc = mg_lua_run_new(vm);
  MG_CHECK_INT(mg_lua_run_push_ref(rc, c, "access"), 0);
  MG_CHECK_INT(mg_lua_run_push_ref(rc, c, "missing"), -1);
  lua_pushstring(mg_lua_run_thread(rc), "hi");
  MG_CHECK_INT(mg_lua_vm_resume(rc, 1), MG_LUA_DONE);
  MG_CHECK_STR(lua_tostring(mg_lua_run_thread(rc), 1), "hi!");
  mg_lua_run_free(rc);
  mg_lua_vm_unref(vm, a);
  mg_lua_vm_unref(vm, b);
  mg_lua_vm_unref(vm, c);
  mg_lua_vm_free(vm);
}

static void test_load_errors(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  const char *syntax = "local x = 1\nlocal y = x +\n";
  MG_CHECK_INT(mg_lua_vm_load(vm, "bad.lua", syntax, strlen(syntax), err, sizeof(err)), -1);
  MG_CHECK(strncmp(err, "bad.lua:3: unexpected symbol", 28) == 0);
  const char *runtime = "local a = nil\nlocal b = a.x\n";
  MG_CHECK_INT(mg_lua_vm_load(vm, "rt.lua", runtime, strlen(runtime), err, sizeof(err)), -1);
  MG_CHECK_STR(err, "rt.lua:2: attempt to index local 'a' (a nil value)");
  const char *spin = "while true do end";
  MG_CHECK_INT(mg_lua_vm_load(vm, "spin.lua", spin, strlen(spin), err, sizeof(err)), -1);
  MG_CHECK_STR(err, "spin.lua:1: script exceeded its CPU budget");
  mg_lua_vm_free(vm);
}

static void test_hook_returns_values(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int ref = load(vm, "h.lua", "return function(a, b) return a + b, a .. b, {x = 1} end");
  mg_lua_run_t *run = mg_lua_run_new(vm);
  lua_State *co = mg_lua_run_thread(run);
  MG_CHECK_INT(mg_lua_run_push_ref(run, ref, NULL), 0);
  lua_pushinteger(co, 40);
  lua_pushinteger(co, 2);
  MG_CHECK_INT(mg_lua_vm_resume(run, 2), MG_LUA_DONE);
  MG_CHECK_INT(lua_gettop(co), 3);
  MG_CHECK_INT(lua_tointeger(co, 1), 42);
  MG_CHECK_STR(lua_tostring(co, 2), "402");
  lua_getfield(co, 3, "x");
  MG_CHECK_INT(lua_tointeger(co, -1), 1);
  /* A finished run cannot be resumed. */
  MG_CHECK_INT(mg_lua_vm_resume(run, 0), MG_LUA_ERROR);
  MG_CHECK_STR(mg_lua_run_error(run), "the run has finished");
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

static void test_error_traceback(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int ref = load(vm, "svc.lua",
                 "local function inner() error('boom') end\n"
                 "return function() inner() return 1 end\n");
  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_ERROR);
  MG_CHECK_STR(mg_lua_run_error(run), "svc.lua:1: boom");
  const char *tb = mg_lua_run_traceback(run);
  MG_CHECK(strncmp(tb, "stack traceback:", 16) == 0);
  MG_CHECK(strstr(tb, "svc.lua:1:") != NULL);
  MG_CHECK(strstr(tb, "svc.lua:2:") != NULL);
  mg_lua_run_free(run);

  int tref = load(vm, "tbl.lua", "return function() error({}) end");
  run = start(vm, tref, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_ERROR);
  MG_CHECK_STR(mg_lua_run_error(run), "(error object is a table value)");
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_unref(vm, tref);
  mg_lua_vm_free(vm);
}

static mg_lua_run_t *seen_run;

/* mg.test_yield(...): yields its arguments to C. */
static int l_test_yield(lua_State *L) {
  seen_run = mg_lua_run_current();
  return lua_yield(L, lua_gettop(L));
}

static void test_yield_resume(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  MG_CHECK_INT(mg_lua_vm_register(vm, "test_yield", l_test_yield), 0);
  int ref = load(vm, "y.lua",
                 "return function(x)\n"
                 "  local a, b = mg.test_yield(x, 'y')\n"
                 "  local c = mg.test_yield(a + 1)\n"
                 "  return a * 2, b .. '!', c\n"
                 "end\n");
  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, "5", &st);
  lua_State *co = mg_lua_run_thread(run);
  MG_CHECK_INT(st, MG_LUA_YIELD);
  MG_CHECK(seen_run == run);
  MG_CHECK(mg_lua_run_current() == NULL);
  MG_CHECK_INT(lua_gettop(co), 2);
  MG_CHECK_STR(lua_tostring(co, 1), "5");
  MG_CHECK_STR(lua_tostring(co, 2), "y");
  lua_pushinteger(co, 21);
  lua_pushstring(co, "ok");
  MG_CHECK_INT(mg_lua_vm_resume(run, 2), MG_LUA_YIELD);
  MG_CHECK_INT(lua_gettop(co), 1);
  MG_CHECK_INT(lua_tointeger(co, 1), 22);
  lua_pushstring(co, "third");
  MG_CHECK_INT(mg_lua_vm_resume(run, 1), MG_LUA_DONE);
  MG_CHECK_INT(lua_gettop(co), 3);
  MG_CHECK_INT(lua_tointeger(co, 1), 42);
  MG_CHECK_STR(lua_tostring(co, 2), "ok!");
  MG_CHECK_STR(lua_tostring(co, 3), "third");
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

/* Runs REF(ARG), expects it to be stopped by the budget, and returns how long it took. */
static double expect_stopped(mg_lua_vm_t *vm, int ref, const char *arg) {
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, arg, &st);
  double ms = ms_since(&t0);
  MG_CHECK_INT(st, MG_LUA_ERROR);
  if (strstr(mg_lua_run_error(run), "script exceeded its CPU budget") == NULL) {
    MG_FAIL("error was \"%s\"", mg_lua_run_error(run));
  }
  mg_lua_run_free(run);
  return ms;
}

static void test_runaway_stopped(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  mg_lua_vm_set_budget(vm, 0, 100000); /* 100 ms */
  int ref = load(vm, "loop.lua",
                 "local function spin(n)\n"
                 "  local i = 0\n"
                 "  while n == 0 or i < n do i = i + 1 end\n"
                 "  return i\n"
                 "end\n"
                 "return function(mode)\n"
                 "  if mode == 'fresh' then while true do end end\n"
                 "  if mode == 'warm' then\n"
                 "    local t = 0\n"
                 "    for _ = 1, 10000 do t = t + spin(10) end\n"
                 "    return t\n"
                 "  end\n"
                 "  if mode == 'pcall' then\n"
                 "    while true do pcall(function() while true do end end) end\n"
                 "  end\n"
                 "  return spin(0)\n"
                 "end\n");
  double ms = expect_stopped(vm, ref, "fresh");
  MG_CHECK(ms >= 90 && ms < 200);

  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, "warm", &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 100000);
  mg_lua_run_free(run);
  ms = expect_stopped(vm, ref, "hot"); /* spin() ran 10,000 times: a trace, were the JIT on */
  MG_CHECK(ms >= 90 && ms < 200);
  ms = expect_stopped(vm, ref, "pcall"); /* catching the budget error does not help */
  MG_CHECK(ms < 200);

  /* An instruction budget stops it too, and the VM goes on serving. */
  mg_lua_vm_set_budget(vm, 1000000, 0);
  expect_stopped(vm, ref, "fresh");
  run = start(vm, ref, "warm", &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 100000);
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

static void dummy_hook(lua_State *L, lua_Debug *ar) { (void)L, (void)ar; }

static void test_hook_is_global(void) {
  /* What the budget design relies on: in LuaJIT a hook set on one coroutine is the VM's. */
  mg_lua_vm_t *vm = vm_new(32u << 20);
  mg_lua_run_t *run = mg_lua_run_new(vm);
  lua_State *L = mg_lua_vm_state(vm);
  lua_sethook(L, dummy_hook, LUA_MASKCOUNT, 1000);
  lua_sethook(mg_lua_run_thread(run), dummy_hook, LUA_MASKCOUNT, 7);
  MG_CHECK_INT(lua_gethookcount(L), 7);
  lua_sethook(L, NULL, 0, 0);
  MG_CHECK_INT(lua_gethookmask(mg_lua_run_thread(run)), 0);
  mg_lua_run_free(run);
  mg_lua_vm_free(vm);
}

/* Runs BODY(VM, REF) in a forked child and returns the child's exit code: BODY's result, or
 * 10 when a check failed in the child (which then ends there instead of running the rest of
 * the suite). Fails the test if the child runs for more than 5 s or dies of a signal. */
static int in_child(int (*body)(mg_lua_vm_t *, int), mg_lua_vm_t *vm, int ref) {
  fflush(NULL);
  pid_t pid = fork();
  MG_CHECK(pid >= 0);
  if (pid == 0) {
    if (setjmp(mg_test_jmp)) _exit(10);
    _exit(body(vm, ref));
  }
  int status = 0;
  for (int i = 0; i < 500 && waitpid(pid, &status, WNOHANG) == 0; i++) {
    struct timespec ten = {0, 10 * 1000 * 1000};
    nanosleep(&ten, NULL);
  }
  if (waitpid(pid, &status, WNOHANG) == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    MG_FAIL("the forked child did not exit within 5 s");
  }
  if (!WIFEXITED(status)) MG_FAIL("the forked child died of signal %d", WTERMSIG(status));
  return WEXITSTATUS(status);
}

/* In a forked child: 0 when the runaway is stopped by its budget within 500 ms, else 3. */
static int child_runaway_stopped(mg_lua_vm_t *vm, int ref) {
  return expect_stopped(vm, ref, "forever") < 500 ? 0 : 3;
}

static const char spin_lua[] =
    "return function(mode)\n"
    "  if mode == 'forever' then while true do end end\n"
    "  local t = 0\n"
    "  for i = 1, 200000 do t = t + i % 7 end\n"
    "  return t\n"
    "end\n";

/* The wall-clock budget is kept by the watchdog timer: scripts run with no hook set, a
 * leftover hook takes itself off, and a runaway is stopped within a tick of its deadline,
 * also with a budget smaller than the tick, also in a forked child. */
static void test_watchdog(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  lua_State *L = mg_lua_vm_state(vm);
  int ref = load(vm, "spin.lua", spin_lua);
  mg_lua_status_t st;

  mg_lua_vm_set_budget(vm, 0, 100000);
  mg_lua_run_t *run = start(vm, ref, "count", &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 599997);
  MG_CHECK_INT(lua_gethookmask(L), 0);
  mg_lua_run_free(run);

  /* An instruction budget counts with the hook; back on the clock, the hook goes. */
  mg_lua_vm_set_budget(vm, 100000000, 0);
  run = start(vm, ref, "count", &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_gethookmask(L), LUA_MASKCOUNT);
  mg_lua_run_free(run);
  mg_lua_vm_set_budget(vm, 0, 100000);
  run = start(vm, ref, "count", &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 599997);
  MG_CHECK_INT(lua_gethookmask(L), 0);
  mg_lua_run_free(run);

  /* A 5 ms budget: the watchdog ticks every millisecond for it. */
  mg_lua_vm_set_budget(vm, 0, 5000);
  double ms = expect_stopped(vm, ref, "forever");
  MG_CHECK(ms >= 4.5 && ms < 60);
  MG_CHECK_INT(lua_gethookmask(L), 0);
  run = start(vm, ref, "count", &st);     /* the VM serves on */
  MG_CHECK_INT(st, MG_LUA_DONE);
  mg_lua_run_free(run);

  /* This process has its timer now; a forked child must make its own. */
  mg_lua_vm_set_budget(vm, 0, 50000);
  MG_CHECK_INT(in_child(child_runaway_stopped, vm, ref), 0);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

/* In a child without the watchdog's timer: 0 when runs count with the hook and the runaway is
 * stopped by its budget. 4: setrlimit failed; 5: timer_create worked anyway; 6: a run failed;
 * 7: no count hook; 8: the runaway was stopped, but not within 45-500 ms; 10 (in_child): it
 * was not stopped by the budget error. */
static int child_without_timer(mg_lua_vm_t *vm, int ref) {
  struct rlimit none = {0, 0};
  timer_t probe;
  struct sigevent ev = {.sigev_notify = SIGEV_NONE};
  if (setrlimit(RLIMIT_SIGPENDING, &none) != 0) return 4;
  if (timer_create(CLOCK_MONOTONIC, &ev, &probe) == 0) return 5;   /* the limit did not bite */
  mg_lua_status_t st;
  mg_lua_run_t *r = start(vm, ref, "count", &st);
  if (st != MG_LUA_DONE || lua_tointeger(mg_lua_run_thread(r), 1) != 599997) return 6;
  if (lua_gethookmask(mg_lua_vm_state(vm)) != LUA_MASKCOUNT) return 7; /* counted, not watched */
  mg_lua_run_free(r);
  double ms = expect_stopped(vm, ref, "forever");
  return ms >= 45 && ms < 500 ? 0 : 8;
}

/* Where the watchdog's timer cannot be made, runs fall back to the count hook and a runaway
 * is still stopped. A forked child with RLIMIT_SIGPENDING 0: a POSIX timer needs a queued
 * signal of its own, so timer_create fails there (EAGAIN). */
static void test_watchdog_fallback(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int ref = load(vm, "spin.lua", spin_lua);
  mg_lua_vm_set_budget(vm, 0, 50000);
  MG_CHECK_INT(in_child(child_without_timer, vm, ref), 0);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

static void test_memory_cap(void) {
  mg_lua_vm_t *vm = vm_new(16u << 20);
  mg_lua_vm_set_budget(vm, 0, 5000000);
  int hog = load(vm, "hog.lua",
                 "return function()\n"
                 "  local t = {}\n"
                 "  while true do t[#t + 1] = ('x'):rep(1e5) .. #t end\n"
                 "end\n");
  int ok = load(vm, "ok.lua", "return function() return #('y'):rep(1e6) end");
  lua_gc(mg_lua_vm_state(vm), LUA_GCCOLLECT, 0);
  size_t before = mg_lua_vm_mem_used(vm);
  MG_CHECK(before > 0 && before < (1u << 20));

  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, hog, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_ERROR);
  MG_CHECK_STR(mg_lua_run_error(run), "not enough memory");
  MG_CHECK(mg_lua_vm_mem_used(vm) > (12u << 20));
  mg_lua_run_free(run);
  lua_gc(mg_lua_vm_state(vm), LUA_GCCOLLECT, 0);
  MG_CHECK(mg_lua_vm_mem_used(vm) < before + (256u << 10));

  run = start(vm, ok, NULL, &st);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 1000000);
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, hog);
  mg_lua_vm_unref(vm, ok);
  mg_lua_vm_free(vm);
}

/* The collector's long pause (400) holds only while the VM is small next to its cap: a VM
 * whose live data grows to a third of its cap, within one run and then across runs, while it
 * makes garbage, still gets its collections before an allocation would be refused. */
static void test_gc_pause_under_cap(void) {
  mg_lua_vm_t *vm = vm_new(16u << 20);
  mg_lua_vm_set_budget(vm, 0, 20000000);
  int ref = load(vm, "grow.lua",
                 "local keep = {}\n"
                 "return function(mode)\n"
                 "  local n = 0\n"
                 "  if mode == 'grow' then\n"
                 "    for i = 1, 6000 do\n"
                 "      keep[i] = ('k'):rep(800) .. i\n"
                 "      for j = 1, 20 do n = n + #(('g'):rep(300) .. i .. j) end\n"
                 "    end\n"
                 "  else\n"
                 "    for i = 1, 200000 do n = n + #(('g'):rep(300) .. i) end\n"
                 "  end\n"
                 "  return #keep\n"
                 "end\n");
  mg_lua_status_t st;
  for (int round = 0; round < 3; round++) {
    mg_lua_run_t *run = start(vm, ref, round == 0 ? "grow" : "churn", &st);
    if (st != MG_LUA_DONE) MG_FAIL("round %d: %s", round, mg_lua_run_error(run));
    MG_CHECK_INT(lua_tointeger(mg_lua_run_thread(run), 1), 6000);
    mg_lua_run_free(run);
  }
  MG_CHECK(mg_lua_vm_mem_used(vm) > (4u << 20));   /* KEEP is still there */
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

static void test_mg_modules(void) {
  mg_lua_vm_t *vm = vm_new(32u << 20);
  int ref = load(vm, "mg.lua",
                 "return function()\n"
                 "  return mg.json.encode({a = 1}), mg.json.decode('[1,2]')[2],\n"
                 "    mg.crypto.sha256_hex('')\n"
                 "end\n");
  mg_lua_status_t st;
  mg_lua_run_t *run = start(vm, ref, NULL, &st);
  lua_State *co = mg_lua_run_thread(run);
  MG_CHECK_INT(st, MG_LUA_DONE);
  MG_CHECK_STR(lua_tostring(co, 1), "{\"a\":1}");
  MG_CHECK_INT(lua_tointeger(co, 2), 2);
  MG_CHECK_STR(lua_tostring(co, 3),
               "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  mg_lua_run_free(run);
  mg_lua_vm_unref(vm, ref);
  mg_lua_vm_free(vm);
}

int main(void) {
  MG_RUN(test_sandbox);
  MG_RUN(test_env_isolation);
  MG_RUN(test_load_errors);
  MG_RUN(test_hook_returns_values);
  MG_RUN(test_error_traceback);
  MG_RUN(test_yield_resume);
  MG_RUN(test_runaway_stopped);
  MG_RUN(test_hook_is_global);
  MG_RUN(test_watchdog);
  MG_RUN(test_watchdog_fallback);
  MG_RUN(test_memory_cap);
  MG_RUN(test_gc_pause_under_cap);
  MG_RUN(test_mg_modules);
  return mg_test_summary();
}
