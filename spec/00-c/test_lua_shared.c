/* Tests for mg_lua_shared: mg.shared.NAME as scripts see it in the sandboxed VM: values keep
 * their type, TTLs expire (on an injected clock and on the real one), LRU eviction, the errors
 * and their messages, two VMs on one dictionary, and exact counts when four processes (as
 * four workers) incr the same key at once. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "mg_lua_shared.h"
#include "mg_lua_vm.h"
#include "mg_shdict.h"
#include "mg_test.h"

static char err[1024];
static char out[1 << 12];

/* Every chunk starts with this, on its first line, so error positions read "t:1:".
 * show(...) lists values ("%q" for strings); r(...) keeps all the results of a call that is
 * not the last argument, shown in parentheses. */
static const char prelude[] =
    "local d = mg.shared.test "
    "local R = {} "
    "local function r(...) return setmetatable({n = select('#', ...), ...}, R) end "
    "local function show(...) "
    "  local t = {} "
    "  for i = 1, select('#', ...) do "
    "    local v = select(i, ...) "
    "    if type(v) == 'string' then t[i] = string.format('%q', v) "
    "    elseif getmetatable(v) == R then t[i] = '(' .. show(unpack(v, 1, v.n)) .. ')' "
    "    else t[i] = tostring(v) end "
    "  end "
    "  return table.concat(t, ',') "
    "end ";

static uint64_t fake_now = 5000000;
static uint64_t fake_clock(void) { return fake_now; }

static mg_shdict_t *dict(const char *name, size_t size) {
  mg_shdict_t *d = mg_shdict_create(name, size);
  if (d == NULL) MG_FAIL("mg_shdict_create(%s): errno %d", name, errno);
  return d;
}

/* A VM with mg.shared over the N dictionaries. */
static mg_lua_vm_t *vm_with(mg_shdict_t **dicts, size_t n) {
  mg_lua_vm_t *vm = mg_lua_vm_new(64u << 20, err, sizeof err);
  if (vm == NULL) MG_FAIL("mg_lua_vm_new: %s", err);
  MG_CHECK_INT(mg_lua_shared_register(vm, dicts, n), 0);
  return vm;
}

/* Runs the prelude and CODE as chunk "t" (as the config loader would) and returns the
 * string it returns. */
static const char *eval(mg_lua_vm_t *vm, const char *code) {
  static char chunk[8192];
  snprintf(chunk, sizeof chunk, "%s%s", prelude, code);
  int ref = mg_lua_vm_load(vm, "t", chunk, strlen(chunk), err, sizeof err);
  if (ref < 0) MG_FAIL("lua error: %s\n    in: %s", err, code);
  lua_State *L = mg_lua_vm_state(vm);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  int is_string = lua_type(L, -1) == LUA_TSTRING;
  if (is_string) snprintf(out, sizeof out, "%s", lua_tostring(L, -1));
  lua_pop(L, 1);
  mg_lua_vm_unref(vm, ref);
  if (!is_string) MG_FAIL("did not return a string: %s", code);
  return out;
}

/* Runs CODE, which must raise; returns the message. */
static const char *error_of(mg_lua_vm_t *vm, const char *code) {
  static char chunk[8192];
  snprintf(chunk, sizeof chunk, "%s%s", prelude, code);
  int ref = mg_lua_vm_load(vm, "t", chunk, strlen(chunk), err, sizeof err);
  if (ref >= 0) {
    mg_lua_vm_unref(vm, ref);
    MG_FAIL("no error from: %s", code);
  }
  return err;
}

/* ---------------------------------------------------------------------------------------- */

static void test_types_round_trip(void) {
  mg_shdict_t *d = dict("test", 1 << 20);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "return show(d:set('s', 'hello'), d:set('e', ''), d:set('z', 'a\\0b'),"
                        " d:set('i', 42), d:set('f', -2.5), d:set('t', true), d:set('F', false),"
                        " d:set('big', 2^53), d:set('inf', -math.huge))"),
               "true,true,true,true,true,true,true,true,true");
  MG_CHECK_STR(eval(vm, "return show(d:get('s'), d:get('e'), d:get('z'), d:get('i'), d:get('f'),"
                        " d:get('t'), d:get('F'), d:get('big') == 2^53, d:get('inf'),"
                        " d:get('nope'))"),
               "\"hello\",\"\",\"a\\0b\",42,-2.5,true,false,true,-inf,nil");
  MG_CHECK_STR(eval(vm, "return show(type(d:get('i')), type(d:get('t')), type(d:get('s')))"),
               "\"number\",\"boolean\",\"string\"");
  /* A string is never coerced: "42" stays a string, 42 stays a number. */
  MG_CHECK_STR(eval(vm, "d:set('n', '42') local a = d:get('n') d:set('n', 42)"
                        " return show(type(a), type(d:get('n')))"),
               "\"string\",\"number\"");
  /* Longer than the stack buffer of get, and binary. */
  MG_CHECK_STR(eval(vm, "local s = string.rep('x\\0y', 40000) .. 'end' d:set('long', s)"
                        " local g = d:get('long') return show(g == s, #g)"),
               "true,120003");
  /* Keys are bytes too. */
  MG_CHECK_STR(eval(vm, "d:set('k\\0a', 1) d:set('k\\0b', 2)"
                        " return show(d:get('k\\0a'), d:get('k\\0b'), d:get('k'))"),
               "1,2,nil");
  MG_CHECK_STR(eval(vm, "return show(tostring(d), getmetatable(d), getmetatable(mg.shared))"),
               "\"shared dictionary \\\"test\\\"\",false,false");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_two_vms_one_dict(void) {
  mg_shdict_t *dicts[2] = {dict("test", 65536), dict("other", 65536)};
  mg_lua_vm_t *a = vm_with(dicts, 2);
  mg_lua_vm_t *b = vm_with(dicts, 2);
  MG_CHECK_STR(eval(a, "d:set('k', 'from a') mg.shared.other:set('k', 7) return 'ok'"), "ok");
  MG_CHECK_STR(eval(b, "return show(d:get('k'), mg.shared.other:get('k'))"), "\"from a\",7");
  MG_CHECK_STR(eval(b, "d:set('k', 'from b') return 'ok'"), "ok");
  MG_CHECK_STR(eval(a, "return d:get('k')"), "from b");
  mg_lua_vm_free(a);
  mg_lua_vm_free(b);
  mg_shdict_destroy(dicts[0]);
  mg_shdict_destroy(dicts[1]);
}

static void test_set_nil_and_delete(void) {
  mg_shdict_t *d = dict("test", 65536);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "d:set('a', 1) d:set('b', 2)"
                        " return show(d:set('a', nil), d:get('a'), d:delete('b'), d:get('b'),"
                        " d:delete('b'), d:set('never', nil))"),
               "true,nil,true,nil,false,true");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_add(void) {
  mg_shdict_t *d = dict("test", 65536);
  mg_shdict_set_clock(d, fake_clock);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "return show(d:add('k', 'first', 10), r(d:add('k', 'second')), d:get('k'))"),
               "true,(nil,\"exists\"),\"first\"");
  fake_now += 10001; /* expired: add may take the key again */
  MG_CHECK_STR(eval(vm, "return show(d:add('k', false), d:get('k'), d:ttl('k'))"),
               "true,false,0");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_incr(void) {
  mg_shdict_t *d = dict("test", 65536);
  mg_shdict_set_clock(d, fake_clock);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "return show(d:incr('c'), d:incr('c'), d:incr('c', 5), d:incr('c', -0.5),"
                        " d:get('c'))"),
               "1,2,7,6.5,6.5");
  /* A missing key starts at init; the TTL applies only when the key is created. */
  MG_CHECK_STR(eval(vm, "return show(d:incr('w', 1, 100, 60), d:ttl('w'), d:incr('w', 1, 0, 5),"
                        " d:ttl('w'))"),
               "101,60,102,60");
  fake_now += 60000;
  MG_CHECK_STR(eval(vm, "return show(d:get('w'), d:incr('w', 2), d:ttl('w'))"), "nil,2,0");
  MG_CHECK_STR(eval(vm, "d:set('s', 'text') d:set('b', true)"
                        " return show(r(d:incr('s')), r(d:incr('b', 1)), d:get('s'), d:get('b'))"),
               "(nil,\"not a number\"),(nil,\"not a number\"),\"text\",true");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_ttl_on_fake_clock(void) {
  mg_shdict_t *d = dict("test", 65536);
  mg_shdict_set_clock(d, fake_clock);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "return show(d:set('t', 'v', 10), d:ttl('t'), d:set('forever', 1),"
                        " d:ttl('forever'), d:ttl('absent'), d:set('half', 1, 0.25),"
                        " d:ttl('half'))"),
               "true,10,true,0,nil,true,0.25");
  fake_now += 4000;
  MG_CHECK_STR(eval(vm, "return show(d:get('t'), d:ttl('t'), d:get('half'), d:ttl('half'))"),
               "\"v\",6,nil,nil");
  fake_now += 6000;
  MG_CHECK_STR(eval(vm, "return show(d:get('t'), d:ttl('t'), d:get('forever'))"), "nil,nil,1");
  /* set replaces the TTL too. */
  MG_CHECK_STR(eval(vm, "d:set('r', 1, 5) d:set('r', 2) return show(d:ttl('r'))"), "0");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

/* Sleeps MS milliseconds of the monotonic clock: a signal (the Lua watchdog's SIGALRM, one
 * tick after the last run) cuts nanosleep short, so it sleeps again for what is left. */
static void sleep_ms(long ms) {
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_sec += ms / 1000;
  until.tv_nsec += (ms % 1000) * 1000000;
  if (until.tv_nsec >= 1000000000) until.tv_sec++, until.tv_nsec -= 1000000000;
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
  }
}

static void test_ttl_on_real_clock(void) {
  mg_shdict_t *d = dict("test", 65536);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(eval(vm, "d:set('short', 'v', 0.05) local t = d:ttl('short')"
                        " return show(d:get('short'), t > 0.03 and t <= 0.05)"),
               "\"v\",true");
  sleep_ms(80);
  MG_CHECK_STR(eval(vm, "return show(d:get('short'), d:ttl('short'))"), "nil,nil");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_lru_eviction_and_no_memory(void) {
  mg_shdict_t *d = dict("test", MG_SHDICT_MIN_SIZE);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  /* Far more than fits: every set succeeds by evicting the least recently used. */
  MG_CHECK_STR(eval(vm, "local v = string.rep('v', 100) d:set('keep', 'me')"
                        " for i = 1, 200 do"
                        "   assert(d:set('k' .. i, v) == true) d:get('keep')"
                        " end"
                        " return show(d:get('k1'), d:get('k200') == v, d:get('keep'))"),
               "nil,true,\"me\"");
  /* Larger than the whole dictionary: nil, "no memory", and the old value stays. */
  MG_CHECK_STR(eval(vm, "d:set('x', 'old') return show(r(d:set('x', string.rep('y', 20000))),"
                        " r(d:add('y', string.rep('y', 20000))), d:get('x'))"),
               "(nil,\"no memory\"),(nil,\"no memory\"),\"old\"");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_errors(void) {
  mg_shdict_t *d = dict("test", 1 << 20);
  mg_lua_vm_t *vm = vm_with(&d, 1);
  MG_CHECK_STR(error_of(vm, "local v = mg.shared.unknown"),
               "t:1: no shared dictionary \"unknown\" (declare it with shared \"unknown\" "
               "{ size = \"1m\" })");
  MG_CHECK_STR(error_of(vm, "local v = mg.shared[1]"),
               "t:1: no shared dictionary under a number key (names are strings)");
  MG_CHECK_STR(error_of(vm, "mg.shared.x = d"),
               "t:1: mg.shared is read-only (declare dictionaries with shared \"NAME\" "
               "{ size = ... } in the config)");
  MG_CHECK_STR(error_of(vm, "local v = d.get('k')"),
               "t:1: bad argument #1 to 'get' (not a shared dictionary: call it with a colon, "
               "dict:get(...))");
  MG_CHECK_STR(error_of(vm, "local v = d.set(d, 'k', 1) v = d.set('k', 1)"),
               "t:1: bad argument #1 to 'set' (not a shared dictionary: call it with a colon, "
               "dict:set(...))");
  MG_CHECK_STR(error_of(vm, "local v = d:get('')"),
               "t:1: bad argument #1 to 'get' (key must not be empty)");
  MG_CHECK_STR(error_of(vm, "local v = d:get(7)"),
               "t:1: bad argument #1 to 'get' (key must be a string, got number)");
  MG_CHECK_STR(error_of(vm, "local v = d:ttl()"),
               "t:1: bad argument #1 to 'ttl' (key must be a string, got no value)");
  MG_CHECK_STR(error_of(vm, "local v = d:delete(string.rep('k', 65536))"),
               "t:1: bad argument #1 to 'delete' (key is longer than 65535 bytes)");
  MG_CHECK_STR(eval(vm, "return show(d:set(string.rep('k', 65535), 1))"), "true");
  MG_CHECK_STR(error_of(vm, "local v = d:set('k', {})"),
               "t:1: bad argument #2 to 'set' (value must be a string, number or boolean "
               "(or nil to delete), got table)");
  MG_CHECK_STR(error_of(vm, "local v = d:add('k')"),
               "t:1: bad argument #2 to 'add' (value must be a string, number or boolean, "
               "got no value)");
  MG_CHECK_STR(error_of(vm, "local v = d:set('k', 1, -1)"),
               "t:1: bad argument #3 to 'set' (ttl must be a number of seconds from 0 to 1e9)");
  MG_CHECK_STR(error_of(vm, "local v = d:set('k', 1, 0/0)"),
               "t:1: bad argument #3 to 'set' (ttl must be a number of seconds from 0 to 1e9)");
  MG_CHECK_STR(error_of(vm, "local v = d:add('k', 1, '10')"),
               "t:1: bad argument #3 to 'add' (ttl must be a number of seconds, got string)");
  MG_CHECK_STR(error_of(vm, "local v = d:incr('k', '1')"),
               "t:1: bad argument #2 to 'incr' (n must be a number, got string)");
  MG_CHECK_STR(error_of(vm, "local v = d:incr('k', 1, math.huge)"),
               "t:1: bad argument #3 to 'incr' (init must be a finite number)");
  MG_CHECK_STR(error_of(vm, "local v = d:incr('k', 1, 0, 2e9)"),
               "t:1: bad argument #4 to 'incr' (ttl must be a number of seconds from 0 to 1e9)");
  /* A call that raises has changed nothing. */
  MG_CHECK_STR(eval(vm, "d:set('k', 'kept', 100)"
                        " local ok = pcall(d.set, d, 'k', 'new', -1)"
                        " local ok2 = pcall(d.incr, d, 'fresh', 1, 0, -5)"
                        " local ttl = d:ttl('k')"
                        " return show(ok, ok2, d:get('k'), ttl > 99 and ttl <= 100, d:get('fresh'))"),
               "false,false,\"kept\",true,nil");
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

static void test_no_dictionaries(void) {
  mg_lua_vm_t *vm = mg_lua_vm_new(0, err, sizeof err);
  MG_CHECK(vm != NULL);
  MG_CHECK_INT(mg_lua_shared_register(vm, NULL, 0), 0);
  int ref = mg_lua_vm_load(vm, "t", "return mg.shared.limits", 23, err, sizeof err);
  MG_CHECK_INT(ref, -1);
  MG_CHECK_STR(err, "t:1: no shared dictionary \"limits\" (declare it with shared \"limits\" "
                    "{ size = \"1m\" })");
  mg_lua_vm_free(vm);
}

/* ---------------------------------------------------------------------------------------- */

#define CHILDREN 4
#define ROUNDS 5000

/* One "worker": its own VM on the inherited dictionary. Exits 0 when every incr returned a
 * number. Runs in a child, so it must not use the MG_ macros (they would jump into the
 * parent's copy of the test runner). */
static void child_incr(mg_shdict_t *d, int id) {
  alarm(60); /* an orphan must not outlive a failed run */
  char e[256], code[512];
  mg_lua_vm_t *vm = mg_lua_vm_new(0, e, sizeof e);
  if (vm == NULL || mg_lua_shared_register(vm, &d, 1) != 0) _exit(2);
  mg_lua_vm_set_budget(vm, 0, 0);
  snprintf(code, sizeof code,
           "local d = mg.shared.procs\n"
           "for i = 1, %d do\n"
           "  assert(type(d:incr('hits')) == 'number')\n"
           "  assert(type(d:incr('half', 0.5)) == 'number')\n"
           "  assert(type(d:incr('own%d', 1, 1000)) == 'number')\n"
           "end\n"
           "return 'done'\n",
           ROUNDS, id);
  int ref = mg_lua_vm_load(vm, "child", code, strlen(code), e, sizeof e);
  if (ref < 0) {
    fprintf(stderr, "child %d: %s\n", id, e);
    _exit(1);
  }
  _exit(0);
}

static void test_incr_exact_across_processes(void) {
  mg_shdict_t *d = dict("procs", 1 << 20);
  mg_lua_vm_t *vm = mg_lua_vm_new(0, err, sizeof err);
  MG_CHECK(vm != NULL);
  MG_CHECK_INT(mg_lua_shared_register(vm, &d, 1), 0);
  pid_t pids[CHILDREN];
  for (int c = 0; c < CHILDREN; c++) {
    fflush(NULL);
    pids[c] = fork();
    MG_CHECK(pids[c] >= 0);
    if (pids[c] == 0) child_incr(d, c);
  }
  int ok = 0;
  for (int c = 0; c < CHILDREN; c++) {
    int status;
    if (waitpid(pids[c], &status, 0) == pids[c] && WIFEXITED(status) &&
        WEXITSTATUS(status) == 0)
      ok++;
  }
  MG_CHECK_INT(ok, CHILDREN);
  static const char totals[] =
      "local d = mg.shared.procs\n"
      "return string.format('%d %g %d %d %d %d', d:get('hits'), d:get('half'),\n"
      "  d:get('own0'), d:get('own1'), d:get('own2'), d:get('own3'))\n";
  int ref = mg_lua_vm_load(vm, "t", totals, strlen(totals), err, sizeof err);
  if (ref < 0) MG_FAIL("%s", err);
  lua_State *L = mg_lua_vm_state(vm);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  snprintf(out, sizeof out, "%s", lua_tostring(L, -1));
  lua_pop(L, 1);
  mg_lua_vm_unref(vm, ref);
  char expect[128];
  snprintf(expect, sizeof expect, "%d %g %d %d %d %d", CHILDREN * ROUNDS,
           CHILDREN * ROUNDS * 0.5, 1000 + ROUNDS, 1000 + ROUNDS, 1000 + ROUNDS, 1000 + ROUNDS);
  MG_CHECK_STR(out, expect);
  mg_lua_vm_free(vm);
  mg_shdict_destroy(d);
}

int main(void) {
  MG_RUN(test_types_round_trip);
  MG_RUN(test_two_vms_one_dict);
  MG_RUN(test_set_nil_and_delete);
  MG_RUN(test_add);
  MG_RUN(test_incr);
  MG_RUN(test_ttl_on_fake_clock);
  MG_RUN(test_ttl_on_real_clock);
  MG_RUN(test_lru_eviction_and_no_memory);
  MG_RUN(test_errors);
  MG_RUN(test_no_dictionaries);
  MG_RUN(test_incr_exact_across_processes);
  return mg_test_summary();
}
