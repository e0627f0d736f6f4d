/* mg_lua_vm: the sandboxed LuaJIT state of a worker (see mg_lua_vm.h for the sandbox, the CPU
 * budget and the memory cap).
 *
 * Any Lua API call that allocates may raise "not enough memory", and a raise outside a
 * protected call ends in the panic handler (abort). The cap makes that a real case, so every
 * allocating step on the main state runs under lua_cpcall, and error reporting runs with
 * MG_LUA_MEM_RESERVE bytes of headroom above the cap. */
#include "mg_lua_vm.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>

#include "mg_asan.h"
#include "mg_lua_crypto.h"
#include "mg_lua_json.h"

/* The VM's small blocks are kept for reuse in free lists, one per 16-byte size class up to
 * SMALL_MAX: a request makes and drops a few hundred small objects (strings, tables, their
 * parts), and glibc's per-thread cache holds only seven of a size before each free takes its
 * slow path. What the lists hold is bounded by SMALL_KEEP and is not charged to the cap (it
 * is memory no script can reach). */
#define SMALL_STEP 16
#define SMALL_MAX 512
#define SMALL_CLASSES (SMALL_MAX / SMALL_STEP)
#define SMALL_KEEP (1u << 20) /* bytes kept in the lists at most */

typedef struct small_block {
  struct small_block *next;
} small_block_t;

struct mg_lua_vm_s {
  lua_State *L;
  small_block_t *small[SMALL_CLASSES]; /* free blocks of (class + 1) * SMALL_STEP bytes */
  size_t small_kept;                   /* bytes in those lists */
  size_t mem_limit;   /* 0: no cap */
  size_t used;        /* bytes handed out by on_alloc */
  int own_alloc;      /* 1: lua_newstate took on_alloc; 0: the luaL_newstate fallback */
  int reserve;        /* 1 while allocations may go MG_LUA_MEM_RESERVE over the cap: always,
                         except while a run is resumed (scripts meet the cap itself), so C
                         code that pushes values outside a protected call (the next hook's
                         arguments, an operation's results) or reports an error cannot fail
                         an allocation and abort when a script left the VM near its cap */
  uint64_t max_insns; /* per resume; 0: no limit */
  uint64_t max_us;    /* per resume; 0: no limit */
  int base_ref;       /* the shared base table (also the threads' globals) */
  int env_mt_ref;     /* {__index = base, __metatable = false} */
  int mg_ref;         /* the `mg` table */
  int trusted_ref;    /* the full globals (debug, os, real load): for moongate's own Lua */
  int dump_ref;       /* string.dump, kept out of the sandbox unless allowed */
  unsigned allowed;   /* MG_LUA_ALLOW_* the config opened */
  int gc_pause;       /* the collector's pause now (gc_tune) */
};

enum { RUN_NEW, RUN_YIELDED, RUN_DONE, RUN_FAILED };

struct mg_lua_run_s {
  mg_lua_vm_t *vm;
  lua_State *co;
  int ref;              /* registry anchor of co */
  int state;            /* RUN_* */
  int exceeded;         /* the budget ran out during the current resume */
  int counting;         /* the current resume's budget is kept by the count hook */
  uint64_t insns;       /* instructions charged during the current resume */
  uint64_t deadline_ns; /* CLOCK_MONOTONIC end of the current resume's budget */
  char *error;          /* malloc'd, after MG_LUA_ERROR */
  char *traceback;      /* malloc'd, after MG_LUA_ERROR */
  void *data;
};

/* The run being resumed on this thread. The count hook is global to the Lua state, so this
 * is how it finds whom to charge. */
static _Thread_local mg_lua_run_t *tls_run;

static const char budget_msg[] = "script exceeded its CPU budget";

/* The registry key (its address) under which the VM keeps a pointer to itself. */
static const char vm_key = 0;

/* Its address is the light userdata an I/O wait yields (mg_task_wait). */
static const char io_marker = 0;

/* coroutine.resume and coroutine.wrap for the sandbox: a coroutine that yields the I/O
 * marker is waiting for the event loop, not for its resumer, so the yield is passed up to
 * the caller's own coroutine (and on up to the task's) and the results come back down. */
static const char coroutine_lua[] =
    "local MARK, lib, error = ...\n"
    "local co_resume, co_yield, co_status, co_create = lib.resume, lib.yield, lib.status, lib.create\n"
    "local function relay(co, ok, first, ...)\n"
    "  if ok and first == MARK and co_status(co) == 'suspended' then\n"
    "    return relay(co, co_resume(co, co_yield(MARK)))\n"
    "  end\n"
    "  return ok, first, ...\n"
    "end\n"
    "local function unwrap(ok, ...)\n"
    "  if not ok then error((...), 0) end\n"
    "  return ...\n"
    "end\n"
    "local c = {}\n"
    "for k, v in pairs(lib) do c[k] = v end\n"
    "c.resume = function(co, ...) return relay(co, co_resume(co, ...)) end\n"
    "c.wrap = function(f)\n"
    "  local co = co_create(f)\n"
    "  return function(...) return unwrap(relay(co, co_resume(co, ...))) end\n"
    "end\n"
    "return c\n";

void mg_lua_vm_push_io_marker(lua_State *L) { lua_pushlightuserdata(L, (void *)&io_marker); }

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((format(printf, 3, 4)))
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* ---- allocator and budget hook ------------------------------------------------------- */

/* Grows refuse past the cap; shrinks and frees always succeed (Lua requires it). */
/* The size class of a small block of N (1..SMALL_MAX) bytes. */
static unsigned small_class(size_t n) { return (unsigned)((n - 1) / SMALL_STEP); }

static void *small_get(mg_lua_vm_t *vm, size_t n) {
  unsigned c = small_class(n);
  small_block_t *b = vm->small[c];
  if (b == NULL) return malloc((size_t)(c + 1) * SMALL_STEP);
  MG_ASAN_UNPOISON(b, (size_t)(c + 1) * SMALL_STEP);
  vm->small[c] = b->next;
  vm->small_kept -= (size_t)(c + 1) * SMALL_STEP;
  return b;
}

static void small_put(mg_lua_vm_t *vm, void *p, size_t n) {
  unsigned c = small_class(n);
  size_t size = (size_t)(c + 1) * SMALL_STEP;
  if (vm->small_kept + size > SMALL_KEEP) {
    free(p);
    return;
  }
  small_block_t *b = p;
  b->next = vm->small[c];
  vm->small[c] = b;
  vm->small_kept += size;
  MG_ASAN_POISON(b, size);
}

static void small_drain(mg_lua_vm_t *vm) {
  for (unsigned c = 0; c < SMALL_CLASSES; c++) {
    while (vm->small[c]) {
      small_block_t *b = vm->small[c];
      MG_ASAN_UNPOISON(b, (size_t)(c + 1) * SMALL_STEP);
      vm->small[c] = b->next;
      free(b);
    }
  }
  vm->small_kept = 0;
}

/* ---- the collector's pause -----------------------------------------------------------
 *
 * LuaJIT starts a collection cycle when the heap reaches pause % of what the last cycle left
 * live (LuaJIT's default: 200). A request makes and drops a few hundred small objects, so with
 * the small live heap of a typical gateway config a cycle runs every few dozen requests; a
 * pause of 400 halves those cycles (about 5 % of an aggregation request's instructions). But
 * LuaJIT does not collect when an allocation is refused, so the heap must be able to reach
 * the next cycle's start under the cap. The long pause is therefore kept only while the VM
 * uses at most an eighth of its cap: on_alloc goes back to the default the moment the VM
 * grows past that (so a cycle that ends later sets its threshold with the default pause), and
 * a run that ends with the VM back under an eighth sets the long pause again (gc_tune). A
 * cycle's threshold is so never above what the default pause would give, or half the cap. */

#define GC_PAUSE_DEFAULT 200
#define GC_PAUSE_LONG 400

static void gc_set_pause(mg_lua_vm_t *vm, int pause) {
  lua_gc(vm->L, LUA_GCSETPAUSE, pause);   /* sets a field: safe inside the allocator too */
  vm->gc_pause = pause;
}

static void gc_tune(mg_lua_vm_t *vm) {
  if (vm->gc_pause != GC_PAUSE_LONG && (vm->mem_limit == 0 || vm->used <= vm->mem_limit / 8))
    gc_set_pause(vm, GC_PAUSE_LONG);
}

/* Lua's allocator: OSIZE is the size the block was asked for (Lua always knows it), so a
 * small block's class follows from it; larger blocks go to glibc as they are. */
static void *on_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  mg_lua_vm_t *vm = ud;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    if (ptr) {
      if (osize <= SMALL_MAX) small_put(vm, ptr, osize);
      else free(ptr);
    }
    vm->used -= osize;
    return NULL;
  }
  if (nsize > osize && vm->mem_limit > 0) {
    size_t limit = vm->mem_limit + (vm->reserve ? MG_LUA_MEM_RESERVE : 0);
    if (vm->used - osize + nsize > limit) return NULL;
    if (vm->gc_pause != GC_PAUSE_DEFAULT && vm->used > vm->mem_limit / 8)
      gc_set_pause(vm, GC_PAUSE_DEFAULT);
  }
  void *p;
  if (ptr && osize > SMALL_MAX && nsize > SMALL_MAX) {
    p = realloc(ptr, nsize);
    if (p == NULL) return NULL;
  } else if (ptr && small_class(osize) == small_class(nsize) && nsize <= SMALL_MAX) {
    p = ptr; /* the block already has room */
  } else {
    p = nsize <= SMALL_MAX ? small_get(vm, nsize) : malloc(nsize);
    if (p == NULL) return NULL;
    if (ptr) {
      memcpy(p, ptr, osize < nsize ? osize : nsize);
      if (osize <= SMALL_MAX) small_put(vm, ptr, osize);
      else free(ptr);
    }
  }
  vm->used = vm->used - osize + nsize;
  return p;
}

static size_t gc_bytes(lua_State *L) {
  return (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024u + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
}

/* Whether the VM's budget is kept by the watchdog (a timer, no hook while scripts run) rather
 * than by a count hook every MG_LUA_HOOK_STEP instructions: an instruction budget needs the
 * count, and so does the memory check of the luaL_newstate fallback. */
static int watched(const mg_lua_vm_t *vm) { return vm->own_alloc && vm->max_insns == 0; }

static void hook_every(lua_State *L, int count);

/* The budget hook. Counting mode: fires every MG_LUA_HOOK_STEP instructions, charges them to
 * the current run and checks the count and the deadline. Watchdog mode: fires only once the
 * watchdog found the run past its deadline (or, left over, after it ended: then it takes
 * itself off). Once over budget, the hook fires on every instruction, so a script that
 * catches the error with pcall is stopped again at its next instruction outside the pcall. */
static void on_hook(lua_State *L, lua_Debug *ar) {
  mg_lua_run_t *run = tls_run;
  if (run == NULL) return;
  mg_lua_vm_t *vm = run->vm;
  if (!run->exceeded) {
    if (!run->counting) {
      if (vm->max_us == 0 || now_ns() <= run->deadline_ns) {
        hook_every(L, 0);
        return;
      }
      run->exceeded = 1;
    } else {
      run->insns += MG_LUA_HOOK_STEP;
      if (vm->max_insns > 0 && run->insns > vm->max_insns) run->exceeded = 1;
      else if (vm->max_us > 0 && now_ns() > run->deadline_ns) run->exceeded = 1;
      if (!run->exceeded) {
        if (!vm->own_alloc && vm->mem_limit > 0 && gc_bytes(L) > vm->mem_limit) {
          luaL_error(L, "not enough memory");
        }
        return;
      }
    }
    hook_every(L, 1);
  }
  /* No frame is pushed for a hook in LuaJIT: level 0 is the interrupted Lua function. */
  luaL_where(L, 0);
  lua_pushstring(L, budget_msg);
  lua_concat(L, 2);
  lua_error(L);
}

/* Sets the budget hook to fire every COUNT instructions (0: takes it off). */
static void hook_every(lua_State *L, int count) {
  if (count > 0) lua_sethook(L, on_hook, LUA_MASKCOUNT, count);
  else lua_sethook(L, NULL, 0, 0);
}

/* ---- the watchdog -----------------------------------------------------------------------
 *
 * A count hook makes LuaJIT's interpreter go through its hook check on every instruction
 * (about 5 % of an aggregation request's instructions). So where only the wall clock is
 * budgeted, no hook is set while scripts run: a per-thread POSIX timer (CLOCK_MONOTONIC,
 * SIGALRM to this thread) ticks every WATCH_TICK_US (a quarter of the budget when that is
 * less) while runs are being resumed. A tick that finds the run being resumed past its
 * deadline sets the count hook to fire at the next instruction (lua_sethook may be called
 * from a signal handler: LuaJIT's own interpreter does it on SIGINT), and on_hook stops the
 * run. A tick during a run re-arms the timer; a tick between runs lets it stop, and the next
 * resume arms it again, so an idle worker gets no ticks. A run is so stopped at most one tick
 * after its deadline. Where the timer cannot be made, resumes fall back to the count hook. */

#define WATCH_TICK_US 10000
#define WATCH_MIN_TICK_US 1000

static _Thread_local struct {
  int made;                        /* the timer exists (in this process: see watch_at_fork) */
  int failed;                      /* timer_create refused: this thread counts instead */
  timer_t timer;
  volatile sig_atomic_t tick_us;   /* its period while armed; 0: not armed */
} watch;

static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static int watch_ok;                /* the handler and the fork hook are installed */

static void watch_set(long us) {
  struct itimerspec it = {{0, 0}, {us / 1000000, (us % 1000000) * 1000}};
  timer_settime(watch.timer, 0, &it, NULL);   /* async-signal-safe */
}

static void on_watch_tick(int sig) {
  (void)sig;
  int saved = errno;
  mg_lua_run_t *run = tls_run;
  if (run == NULL) {
    watch.tick_us = 0;                         /* between runs: stop until the next resume */
  } else {
    if (run->vm->max_us > 0 && now_ns() > run->deadline_ns)
      lua_sethook(run->co, on_hook, LUA_MASKCOUNT, 1);
    watch_set(watch.tick_us);
  }
  errno = saved;
}

/* A forked child has no timers: its threads make their own. */
static void watch_at_fork(void) {
  watch.made = 0;
  watch.failed = 0;
  watch.tick_us = 0;
}

static void watch_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_watch_tick;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  watch_ok = sigaction(SIGALRM, &sa, NULL) == 0 && pthread_atfork(NULL, NULL, watch_at_fork) == 0;
}

/* Makes sure the watchdog ticks for a run with a budget of MAX_US; 0 when it does. */
static int watch_arm(uint64_t max_us) {
  long tick = max_us / 4 < WATCH_TICK_US ? (long)(max_us / 4) : WATCH_TICK_US;
  if (tick < WATCH_MIN_TICK_US) tick = WATCH_MIN_TICK_US;
  if (watch.tick_us != 0 && watch.tick_us <= tick) return 0;
  if (!watch.made) {
    pthread_once(&watch_once, watch_install);
    if (!watch_ok || watch.failed) return -1;
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGALRM;
    ev._sigev_un._tid = gettid();
    if (timer_create(CLOCK_MONOTONIC, &ev, &watch.timer) != 0) {
      watch.failed = 1;                        /* not again on every resume */
      return -1;
    }
    watch.made = 1;
  }
  watch.tick_us = tick;
  watch_set(tick);
  return 0;
}

/* ---- sandbox ------------------------------------------------------------------------- */

/* Pushes a fresh chunk environment: its own table, globals read through to the base. */
static void push_new_env(lua_State *L, mg_lua_vm_t *vm) {
  lua_createtable(L, 0, 4);
  lua_rawgeti(L, LUA_REGISTRYINDEX, vm->env_mt_ref);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "_G");
}

static mg_lua_vm_t *vm_of(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&vm_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  mg_lua_vm_t *vm = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return vm;
}

/* Compiles source text and gives it the environment of the Lua function that called load
 * (a fresh chunk environment when the caller is C, e.g. pcall(load, s)), never the base. */
static int load_text(lua_State *L, const char *s, size_t len, const char *name) {
  if (len > 0 && s[0] == '\033' && !(vm_of(L)->allowed & MG_LUA_ALLOW_BYTECODE)) {
    lua_pushnil(L);
    lua_pushliteral(L, "bytecode chunks are not allowed in the sandbox");
    return 2;
  }
  if (luaL_loadbufferx(L, s, len, name,
                       vm_of(L)->allowed & MG_LUA_ALLOW_BYTECODE ? "bt" : "t") != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  lua_Debug ar;
  if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sf", &ar) && strcmp(ar.what, "C") != 0) {
    lua_getfenv(L, -1);
    lua_remove(L, -2);
  } else {
    if (lua_getstack(L, 1, &ar)) lua_pop(L, 1); /* the function lua_getinfo pushed */
    push_new_env(L, vm_of(L));
  }
  lua_setfenv(L, -2);
  return 1;
}

static int l_loadstring(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *name = luaL_optstring(L, 2, s);
  return load_text(L, s, len, name);
}

static int l_load(lua_State *L) {
  if (lua_type(L, 1) != LUA_TSTRING) {
    return luaL_error(L, "bad argument #1 to 'load' (only strings are accepted in the sandbox)");
  }
  size_t len;
  const char *s = lua_tolstring(L, 1, &len);
  return load_text(L, s, len, luaL_optstring(L, 2, "=(load)"));
}

static int l_collectgarbage(lua_State *L) {
  const char *opt = luaL_optstring(L, 1, "collect");
  if (strcmp(opt, "count") != 0) {
    return luaL_error(L, "collectgarbage(\"%s\") is not available in the sandbox (only \"count\")",
                      opt);
  }
  lua_pushnumber(L, (lua_Number)lua_gc(L, LUA_GCCOUNT, 0) +
                        (lua_Number)lua_gc(L, LUA_GCCOUNTB, 0) / 1024.0);
  return 1;
}

static void open_lib(lua_State *L, lua_CFunction open, const char *name) {
  lua_pushcfunction(L, open);
  lua_pushstring(L, name);
  lua_call(L, 1, 0);
}

/* Builds the sandbox; runs under lua_cpcall with the VM as its argument. */
static int setup_cb(lua_State *L) {
  static const char *const base_names[] = {
    "assert", "error", "ipairs", "pairs", "next", "pcall", "xpcall", "select", "tonumber",
    "tostring", "type", "unpack", "rawequal", "rawget", "rawset", "getmetatable",
    "setmetatable", "_VERSION", "string", "table", "math", "bit", "coroutine", NULL,
  };
  static const char *const os_names[] = {"time", "clock", "date", NULL};
  mg_lua_vm_t *vm = lua_touserdata(L, 1);

  open_lib(L, luaopen_base, "");
  open_lib(L, luaopen_string, LUA_STRLIBNAME);
  open_lib(L, luaopen_table, LUA_TABLIBNAME);
  open_lib(L, luaopen_math, LUA_MATHLIBNAME);
  open_lib(L, luaopen_bit, LUA_BITLIBNAME);
  open_lib(L, luaopen_os, LUA_OSLIBNAME);
  open_lib(L, luaopen_debug, LUA_DBLIBNAME);

  lua_getglobal(L, LUA_STRLIBNAME); /* the string metatable's __index: drop dump there */
  lua_getfield(L, -1, "dump");
  vm->dump_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushnil(L);
  lua_setfield(L, -2, "dump");
  lua_pop(L, 1);

  lua_newtable(L); /* base */
  for (int i = 0; base_names[i] != NULL; i++) {
    lua_getglobal(L, base_names[i]);
    lua_setfield(L, -2, base_names[i]);
  }
  lua_newtable(L);
  lua_getglobal(L, LUA_OSLIBNAME);
  for (int i = 0; os_names[i] != NULL; i++) {
    lua_getfield(L, -1, os_names[i]);
    lua_setfield(L, -3, os_names[i]);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "os");
  lua_pushcfunction(L, l_load);
  lua_setfield(L, -2, "load");
  lua_pushcfunction(L, l_loadstring);
  lua_setfield(L, -2, "loadstring");
  lua_pushcfunction(L, l_collectgarbage);
  lua_setfield(L, -2, "collectgarbage");
  if (luaL_loadbuffer(L, coroutine_lua, sizeof coroutine_lua - 1, "=coroutine") != 0)
    return lua_error(L);
  lua_pushlightuserdata(L, (void *)&io_marker);
  lua_getglobal(L, LUA_COLIBNAME);
  lua_getglobal(L, "error");
  lua_call(L, 3, 1);
  lua_setfield(L, -2, LUA_COLIBNAME);

  lua_newtable(L); /* mg */
  lua_pushcfunction(L, luaopen_mg_json);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "json");
  lua_pushcfunction(L, luaopen_mg_crypto);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "crypto");
  lua_pushvalue(L, -1);
  vm->mg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_setfield(L, -2, "mg");

  lua_createtable(L, 0, 2); /* the chunk environments' metatable */
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__index");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  vm->env_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  /* The full _G the library openers filled (os.execute, debug, ...) stays reachable only
   * from the registry, for moongate's own trusted Lua (the config loader); it gets `mg` too. */
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  lua_rawgeti(L, LUA_REGISTRYINDEX, vm->mg_ref);
  lua_setfield(L, -2, "mg");
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "sandbox");
  vm->trusted_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  /* The base becomes the globals of every thread, so user code cannot reach the full _G. */
  lua_pushvalue(L, -1);
  lua_replace(L, LUA_GLOBALSINDEX);
  vm->base_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  lua_pushlightuserdata(L, (void *)&vm_key); /* registry[&vm_key] = vm, for vm_of */
  lua_pushlightuserdata(L, vm);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

/* ---- VM ---------------------------------------------------------------------------------- */

mg_lua_vm_t *mg_lua_vm_new(size_t mem_limit, char *err, size_t errlen) {
  mg_lua_vm_t *vm = calloc(1, sizeof(*vm));
  if (vm == NULL) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  vm->mem_limit = mem_limit;
  vm->max_us = MG_LUA_DEFAULT_BUDGET_US;
  vm->gc_pause = GC_PAUSE_DEFAULT;
  vm->own_alloc = 1;
  vm->L = lua_newstate(on_alloc, vm);
  if (vm->L == NULL) {
    vm->own_alloc = 0;
    vm->L = luaL_newstate();
  }
  if (vm->L == NULL) {
    set_err(err, errlen, "cannot create a Lua state");
    free(vm);
    return NULL;
  }
  /* See the header: hooks do not fire in traces, so no traces at all. */
  luaJIT_setmode(vm->L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  if (lua_cpcall(vm->L, setup_cb, vm) != 0) {
    set_err(err, errlen, "cannot set up the Lua sandbox: %s", lua_tostring(vm->L, -1));
    lua_close(vm->L);
    small_drain(vm);
    free(vm);
    return NULL;
  }
  vm->reserve = 1;                          /* see the struct: off only while a run runs */
  return vm;
}

void mg_lua_vm_free(mg_lua_vm_t *vm) {
  if (vm == NULL) return;
  lua_close(vm->L);
  small_drain(vm);
  free(vm);
}

lua_State *mg_lua_vm_state(mg_lua_vm_t *vm) { return vm->L; }

void mg_lua_vm_set_budget(mg_lua_vm_t *vm, uint64_t max_insns, uint64_t max_us) {
  vm->max_insns = max_insns;
  vm->max_us = max_us;
}

size_t mg_lua_vm_mem_used(mg_lua_vm_t *vm) {
  return vm->own_alloc ? vm->used : gc_bytes(vm->L);
}

struct reg_ctx {
  mg_lua_vm_t *vm;
  const char *name;
  lua_CFunction fn;
};

static int register_cb(lua_State *L) {
  struct reg_ctx *c = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->vm->mg_ref);
  lua_pushcfunction(L, c->fn);
  lua_setfield(L, -2, c->name);
  return 0;
}

int mg_lua_vm_register(mg_lua_vm_t *vm, const char *name, lua_CFunction fn) {
  struct reg_ctx c = {vm, name, fn};
  if (lua_cpcall(vm->L, register_cb, &c) != 0) {
    lua_pop(vm->L, 1);
    return -1;
  }
  return 0;
}

void mg_lua_vm_unref(mg_lua_vm_t *vm, int ref) { luaL_unref(vm->L, LUA_REGISTRYINDEX, ref); }

/* ---- runs ------------------------------------------------------------------------------ */

static int run_new_cb(lua_State *L) {
  mg_lua_run_t *run = lua_touserdata(L, 1);
  run->co = lua_newthread(L);
  run->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

mg_lua_run_t *mg_lua_run_new(mg_lua_vm_t *vm) {
  mg_lua_run_t *run = calloc(1, sizeof(*run));
  if (run == NULL) return NULL;
  run->vm = vm;
  run->ref = LUA_NOREF;
  if (lua_cpcall(vm->L, run_new_cb, run) != 0) {
    lua_pop(vm->L, 1);
    free(run);
    return NULL;
  }
  return run;
}

lua_State *mg_lua_run_thread(mg_lua_run_t *run) { return run->co; }

struct push_ctx {
  mg_lua_run_t *run;
  int ref;
  const char *key;
  int ok;
};

static int push_ref_cb(lua_State *L) {
  struct push_ctx *c = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  if (c->key != NULL) {
    if (!lua_istable(L, -1)) return 0;
    lua_pushstring(L, c->key);
    lua_rawget(L, -2);
  }
  if (!lua_isfunction(L, -1)) return 0;
  c->ok = 1;
  lua_xmove(L, c->run->co, 1);
  return 0;
}

int mg_lua_run_push_ref(mg_lua_run_t *run, int ref, const char *key) {
  struct push_ctx c = {run, ref, key, 0};
  if (lua_cpcall(run->vm->L, push_ref_cb, &c) != 0) {
    lua_pop(run->vm->L, 1);
    return -1;
  }
  return c.ok ? 0 : -1;
}

static char *dup_str(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d != NULL) {
    memcpy(d, s, n);
    d[n] = '\0';
  }
  return d;
}

static int traceback_cb(lua_State *L) {
  mg_lua_run_t *run = lua_touserdata(L, 1);
  luaL_traceback(L, run->co, NULL, 0);
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  run->traceback = dup_str(s, n);
  return 0;
}

/* Turns the coroutine's failure (or a budget overrun it swallowed) into error + traceback. */
static void record_failure(mg_lua_run_t *run, int rc) {
  lua_State *co = run->co;
  char buf[160];
  const char *msg = buf;
  size_t n;
  if (rc == 0 || rc == LUA_YIELD) {
    msg = budget_msg; /* over budget, but the script caught the error and went on */
  } else if (lua_type(co, -1) == LUA_TSTRING) {
    msg = lua_tolstring(co, -1, &n);
    if (run->exceeded && strstr(msg, budget_msg) == NULL) msg = budget_msg;
  } else if (lua_type(co, -1) == LUA_TNUMBER) {
    snprintf(buf, sizeof(buf), "%.14g", (double)lua_tonumber(co, -1));
  } else {
    snprintf(buf, sizeof(buf), "(error object is a %s value)", luaL_typename(co, -1));
  }
  free(run->error);
  free(run->traceback);
  run->error = dup_str(msg, strlen(msg));
  run->traceback = NULL;
  int reserve = run->vm->reserve;
  run->vm->reserve = 1;
  if (lua_cpcall(run->vm->L, traceback_cb, run) != 0) lua_pop(run->vm->L, 1);
  run->vm->reserve = reserve;
  run->state = RUN_FAILED;
}

mg_lua_status_t mg_lua_vm_resume(mg_lua_run_t *run, int nargs) {
  lua_State *co = run->co;
  if (run->state == RUN_YIELDED) {
    for (int drop = lua_gettop(co) - nargs; drop > 0; drop--) lua_remove(co, 1);
  } else if (run->state != RUN_NEW || nargs < 0 || lua_gettop(co) < nargs + 1 ||
             !lua_isfunction(co, -(nargs + 1))) {
    const char *why = run->state == RUN_NEW ? "no function to run" : "the run has finished";
    free(run->error);
    free(run->traceback);
    run->error = dup_str(why, strlen(why));
    run->traceback = dup_str("", 0);
    return MG_LUA_ERROR;
  }
  mg_lua_vm_t *vm = run->vm;
  mg_lua_run_t *prev = tls_run;
  int headroom = vm->reserve;
  vm->reserve = 0;                          /* scripts meet the cap itself */
  run->insns = 0;
  run->exceeded = 0;
  run->deadline_ns = now_ns() + vm->max_us * 1000u;
  /* The watchdog's handler reads tls_run and its deadline: set both before it is armed. */
  tls_run = run;
  atomic_signal_fence(memory_order_seq_cst);
  run->counting = !watched(vm) || (vm->max_us > 0 && watch_arm(vm->max_us) != 0);
  if (run->counting) hook_every(co, MG_LUA_HOOK_STEP);
  int rc = lua_resume(co, nargs);
  atomic_signal_fence(memory_order_seq_cst);
  tls_run = prev;
  vm->reserve = headroom;
  /* LuaJIT does not collect when an allocation is refused, so a script that ran into the cap
   * would leave its garbage for the next ones to trip over: collect once the VM is past
   * three quarters of its cap after a run. Not after a failed run: its dead coroutine is
   * still referenced here, and walking the frames of one that died of "not enough memory"
   * crashed the collector now and then (a reload near lua.memory, test_reload.py);
   * mg_lua_run_free collects once the coroutine is let go. */
  int failed = (rc != 0 && rc != LUA_YIELD) || run->exceeded;
  if (!failed && vm->own_alloc && vm->mem_limit && vm->used > vm->mem_limit / 4 * 3)
    lua_gc(vm->L, LUA_GCCOLLECT, 0);
  if (vm->own_alloc) gc_tune(vm);
  if (run->exceeded) hook_every(co, run->counting ? MG_LUA_HOOK_STEP : 0);
  if (rc == LUA_YIELD && !run->exceeded) {
    run->state = RUN_YIELDED;
    return MG_LUA_YIELD;
  }
  if (rc == 0 && !run->exceeded) {
    run->state = RUN_DONE;
    return MG_LUA_DONE;
  }
  record_failure(run, rc);
  return MG_LUA_ERROR;
}

const char *mg_lua_run_error(const mg_lua_run_t *run) {
  return run->error != NULL ? run->error : "";
}

const char *mg_lua_run_traceback(const mg_lua_run_t *run) {
  return run->traceback != NULL ? run->traceback : "";
}

void mg_lua_run_set_data(mg_lua_run_t *run, void *data) { run->data = data; }

void *mg_lua_run_data(const mg_lua_run_t *run) { return run->data; }

mg_lua_run_t *mg_lua_run_current(void) { return tls_run; }

void mg_lua_run_free(mg_lua_run_t *run) {
  if (run == NULL) return;
  mg_lua_vm_t *vm = run->vm;
  int failed = run->state == RUN_FAILED;
  if (run->ref != LUA_NOREF) luaL_unref(vm->L, LUA_REGISTRYINDEX, run->ref);
  free(run->error);
  free(run->traceback);
  free(run);
  /* A run that failed near the cap held its garbage on its stack until now. */
  if (failed && vm->own_alloc && vm->mem_limit && vm->used > vm->mem_limit / 4 * 3)
    lua_gc(vm->L, LUA_GCCOLLECT, 0);
}

/* ---- loading chunks ---------------------------------------------------------------------- */

struct load_ctx {
  mg_lua_vm_t *vm;
  lua_State *co;
  const char *name;
  const char *code;
  size_t len;
  int env_ref;
  int ref;
  int trusted;
};

/* Compiles the chunk on the main state, gives it a fresh environment, moves it to the run. */
static int load_cb(lua_State *L) {
  struct load_ctx *c = lua_touserdata(L, 1);
  char name[LUA_IDSIZE + 2];
  snprintf(name, sizeof(name), "=%s", c->name);
  if (luaL_loadbufferx(L, c->code, c->len, name, "t") != 0) return lua_error(L);
  if (c->trusted) lua_rawgeti(L, LUA_REGISTRYINDEX, c->vm->trusted_ref);
  else push_new_env(L, c->vm);
  lua_pushvalue(L, -1);
  c->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_setfenv(L, -2);
  lua_xmove(L, c->co, 1);
  return 0;
}

/* Anchors the chunk's first result (on top of the run's stack) in the registry. */
static int keep_cb(lua_State *L) {
  struct load_ctx *c = lua_touserdata(L, 1);
  lua_xmove(c->co, L, 1);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static int vm_load(mg_lua_vm_t *vm, const char *chunkname, const char *code, size_t len,
                   int trusted, char *err, size_t errlen) {
  if (len > 0 && code[0] == '\033') {
    set_err(err, errlen, "%s: %s", chunkname, "bytecode chunks are not allowed");
    return -1;
  }
  mg_lua_run_t *run = mg_lua_run_new(vm);
  if (run == NULL) {
    set_err(err, errlen, "%s: %s", chunkname, "not enough memory");
    return -1;
  }
  struct load_ctx c = {vm, run->co, chunkname, code, len, LUA_NOREF, LUA_NOREF, trusted};
  if (lua_cpcall(vm->L, load_cb, &c) != 0) {
    set_err(err, errlen, "%s", lua_tostring(vm->L, -1));
    lua_pop(vm->L, 1);
    mg_lua_run_free(run);
    return -1;
  }
  int ref = -1;
  mg_lua_status_t st = mg_lua_vm_resume(run, 0);
  if (st == MG_LUA_DONE) {
    lua_settop(run->co, 1);
    if (lua_isnil(run->co, 1)) {
      ref = c.env_ref;
      c.env_ref = LUA_NOREF;
    } else if (lua_cpcall(vm->L, keep_cb, &c) == 0) {
      ref = c.ref;
    } else {
      lua_pop(vm->L, 1);
      set_err(err, errlen, "%s: %s", chunkname, "not enough memory");
    }
  } else if (st == MG_LUA_YIELD) {
    set_err(err, errlen, "%s: %s", chunkname, "the chunk yielded while loading");
  } else {
    set_err(err, errlen, "%s", mg_lua_run_error(run));
  }
  if (c.env_ref != LUA_NOREF) luaL_unref(vm->L, LUA_REGISTRYINDEX, c.env_ref);
  mg_lua_run_free(run);
  return ref;
}

int mg_lua_vm_load(mg_lua_vm_t *vm, const char *chunkname, const char *code, size_t len,
                   char *err, size_t errlen) {
  return vm_load(vm, chunkname, code, len, 0, err, errlen);
}

int mg_lua_vm_load_trusted(mg_lua_vm_t *vm, const char *chunkname, const char *code,
                           size_t len, char *err, size_t errlen) {
  return vm_load(vm, chunkname, code, len, 1, err, errlen);
}

/* ---- opening the sandbox (lua { allow = ... }) ------------------------------------------ */

static int allow_cb(lua_State *L) {
  mg_lua_vm_t *vm = lua_touserdata(L, 1);
  unsigned what = vm->allowed;
  lua_rawgeti(L, LUA_REGISTRYINDEX, vm->base_ref);
  int base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, vm->trusted_ref);
  int trusted = lua_gettop(L);
  if (what & MG_LUA_ALLOW_OS) {
    lua_getfield(L, trusted, LUA_OSLIBNAME);
    lua_setfield(L, base, LUA_OSLIBNAME);
  }
  if (what & MG_LUA_ALLOW_IO) {
    open_lib(L, luaopen_io, LUA_IOLIBNAME);
    lua_getfield(L, LUA_GLOBALSINDEX, LUA_IOLIBNAME);
    lua_setfield(L, base, LUA_IOLIBNAME);
  }
  if (what & MG_LUA_ALLOW_DEBUG) {
    lua_getfield(L, trusted, LUA_DBLIBNAME);
    lua_setfield(L, base, LUA_DBLIBNAME);
  }
  if (what & MG_LUA_ALLOW_FFI) {
    open_lib(L, luaopen_ffi, LUA_FFILIBNAME);
    lua_getfield(L, LUA_GLOBALSINDEX, LUA_FFILIBNAME);
    lua_setfield(L, base, LUA_FFILIBNAME);
  }
  if (what & MG_LUA_ALLOW_DUMP) {
    lua_getfield(L, base, LUA_STRLIBNAME);
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->dump_ref);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
  }
  return 0;
}

int mg_lua_vm_allow(mg_lua_vm_t *vm, unsigned what) {
  vm->allowed |= what;
  if (lua_cpcall(vm->L, allow_cb, vm) != 0) {
    lua_pop(vm->L, 1);
    return -1;
  }
  return 0;
}
