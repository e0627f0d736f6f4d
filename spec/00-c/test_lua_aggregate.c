/* test_lua_aggregate: mg.aggregate in a real sandboxed VM, as a handler sees it. Each helper
 * runs on realistic users / orders / reviews JSON made by mg.json.decode, and run() is driven
 * by a fake mg.fetch_all (a Lua function returning canned results), so what is tested here
 * is the combining logic: which backend counts as failed, the document, the status and the
 * X-Moongate-Completed header. The real fetch is tested with the fetch module.
 *
 * Lua orders an object's keys by hash, differently from one run to the next, so documents
 * are compared through E(v): the mg.json.encode text with the keys of every object sorted.
 * E checks that its text has the length of mg.json.encode's own, so the two agree on every
 * array / object decision (an empty array must print [] in both). Where a value has at most
 * one key per object, the tests compare mg.json.encode's output directly. */

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "mg_lua_aggregate.h"
#include "mg_lua_vm.h"
#include "mg_test.h"

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

static mg_lua_vm_t *vm;
static char err[1024];
static char result[1 << 13];

/* Runs a test, then frees its VM whether it passed or not (LeakSanitizer sees the rest). */
#define RUN(fn)                 \
  do {                          \
    MG_RUN(fn);                 \
    mg_lua_vm_free(vm);         \
    vm = NULL;                  \
  } while (0)

static void open_vm(void) {
  vm = mg_lua_vm_new(64u << 20, err, sizeof(err));
  if (vm == NULL) MG_FAIL("mg_lua_vm_new: %s", err);
  if (mg_lua_aggregate_register(vm) != 0) MG_FAIL("mg_lua_aggregate_register failed");
}

/* Put before every test chunk, on its first line, so that error positions read "t:1:". */
#define PRELUDE                                                                              \
  "local A, J, null, D = mg.aggregate, mg.json, mg.json.null, mg.json.decode "               \
  "local function canon(v) "                                                                 \
  "  if getmetatable(v) == 'raw json' then return canon(D(v)) end "                          \
  "  if type(v) ~= 'table' or next(v) == nil then return J.encode(v) end "                   \
  "  local parts = {} "                                                                      \
  "  if rawget(v, 1) ~= nil then "                                                           \
  "    for i = 1, #v do parts[i] = canon(v[i]) end "                                         \
  "    return '[' .. table.concat(parts, ',') .. ']' "                                       \
  "  end "                                                                                   \
  "  local keys = {} for k in pairs(v) do keys[#keys + 1] = k end table.sort(keys) "         \
  "  for i, k in ipairs(keys) do parts[i] = J.encode(k) .. ':' .. canon(v[k]) end "          \
  "  return '{' .. table.concat(parts, ',') .. '}' "                                         \
  "end "                                                                                     \
  "local function E(v) "                                                                     \
  "  local s, e = canon(v), J.encode(D(J.encode(v))) "                                      \
  "  if #s ~= #e then error('canon and encode disagree: ' .. s .. ' vs ' .. e) end "         \
  "  return s "                                                                              \
  "end "                                                                                     \
  /* What run() returned, as one line: status, header, document. */                          \
  "local function R(status, doc, h) "                                                        \
  "  local n = 0 for _ in pairs(h) do n = n + 1 end "                                        \
  "  if n ~= 1 then error('headers: ' .. n) end "                                            \
  "  return status .. ' ' .. h['X-Moongate-Completed'] .. ' ' .. E(doc) "                    \
  "end "                                                                                     \
  /* A response as mg.fetch returns it: json decoded on first use, json_error beside it. */   \
  "local function resp(status, body) "                                                       \
  "  return setmetatable({ status = status, headers = {}, body = body }, { __index = "        \
  "    function(t, k) "                                                                      \
  "      if k ~= 'json' and k ~= 'json_error' then return nil end "                          \
  "      local v, e = D(t.body) rawset(t, 'json', v) rawset(t, 'json_error', e) "            \
  "      if k == 'json' then return v end return e "                                         \
  "    end }) "                                                                              \
  "end "                                                                                     \
  /* fake(...) makes mg.fetch_all return these values; seen.calls is what it was given. */    \
  "local seen = { count = 0 } "                                                              \
  "local function fake(...) "                                                                \
  "  local ret = { n = select('#', ...), ... } "                                             \
  "  mg.fetch_all = function(calls) "                                                        \
  "    seen.calls, seen.count = calls, seen.count + 1 return unpack(ret, 1, ret.n) "         \
  "  end "                                                                                   \
  "end "                                                                                     \
  "local USER_BODY = '{\"id\":7,\"name\":\"Ada\",\"profile\":{\"email\":\"ada@example.com\"," \
  "\"city\":\"London\",\"tags\":[]},\"roles\":[\"admin\"],\"manager\":null}' "               \
  "local ORDERS_BODY = '[{\"id\":101,\"user_id\":7,\"status\":\"shipped\",\"total\":25.5,"   \
  "\"items\":[{\"sku\":\"A1\",\"qty\":2}]},{\"id\":102,\"user_id\":7,\"status\":\"pending\"," \
  "\"total\":12,\"items\":[]},{\"id\":103,\"user_id\":8,\"status\":\"shipped\",\"total\":3.25," \
  "\"items\":[{\"sku\":\"B2\",\"qty\":1}]}]' "                                               \
  "local REVIEWS_BODY = '[{\"id\":1,\"product\":\"A1\",\"stars\":5},{\"id\":2,"              \
  "\"product\":\"B2\",\"stars\":3},{\"id\":3,\"stars\":4,\"product\":null}]' "               \
  "local USER, ORDERS, REVIEWS = D(USER_BODY), D(ORDERS_BODY), D(REVIEWS_BODY) "             \
  "local USERS = D('[{\"id\":7,\"name\":\"Ada\",\"profile\":{\"email\":\"ada@example.com\"}}," \
  "{\"id\":8,\"name\":\"Bob\",\"profile\":null},{\"id\":9,\"name\":\"Cy\"}]') "

/* Loads PRELUDE + CODE as chunk "t" (which runs it) and returns the string it returned. */
static const char *eval(const char *code) {
  static char text[1 << 14];
  if ((size_t)snprintf(text, sizeof(text), "%s%s", PRELUDE, code) >= sizeof(text))
    MG_FAIL("test chunk too long");
  int ref = mg_lua_vm_load(vm, "t", text, strlen(text), err, sizeof(err));
  if (ref < 0) MG_FAIL("lua error: %s\n    in: %s", err, code);
  lua_State *L = mg_lua_vm_state(vm);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  size_t len = 0;
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
  if (s != NULL && len < sizeof(result)) memcpy(result, s, len + 1);
  lua_pop(L, 1);
  mg_lua_vm_unref(vm, ref);
  if (s == NULL) MG_FAIL("did not return a string: %s", code);
  if (len >= sizeof(result)) MG_FAIL("result too long: %s", code);
  return result;
}

/* Loads PRELUDE + CODE, which must raise; returns the message ("t:1: ..."). */
static const char *error_of(const char *code) {
  static char text[1 << 14];
  snprintf(text, sizeof(text), "%s%s", PRELUDE, code);
  int ref = mg_lua_vm_load(vm, "t", text, strlen(text), err, sizeof(err));
  if (ref >= 0) {
    mg_lua_vm_unref(vm, ref);
    MG_FAIL("no error from: %s", code);
  }
  snprintf(result, sizeof(result), "%s", err);
  return result;
}

/* ------------------------------------------------------------------------------------------
 * Loading
 * ---------------------------------------------------------------------------------------- */

static void test_installed(void) {
  open_vm();
  MG_CHECK_STR(eval("local names = {} for k, v in pairs(A) do names[#names + 1] = k .. ':' .. "
                    "type(v) end table.sort(names) return table.concat(names, ' ')"),
               "concat:function drop:function flatten:function group:function index:function "
               "merge:function merge_deep:function pick:function run:function");
  /* Callable, and the same table every chunk sees. */
  MG_CHECK_STR(eval("fake() return tostring(A({})) .. ' ' .. tostring(mg.aggregate == A)"),
               "200 true");
}

/* The copy built into the binary is the file of the source tree, byte for byte. */
extern const char mg_aggregate_lua_start[];
extern const char mg_aggregate_lua_end[];

static void test_embedded_copy(void) {
  FILE *f = fopen("lua/moongate/aggregate.lua", "rb");
  if (f == NULL) MG_FAIL("run the test from the repository root");
  static char file[1 << 16];
  size_t n = fread(file, 1, sizeof(file), f);
  fclose(f);
  MG_CHECK(n < sizeof(file));
  MG_CHECK_INT((size_t)(mg_aggregate_lua_end - mg_aggregate_lua_start), n);
  MG_CHECK(memcmp(mg_aggregate_lua_start, file, n) == 0);
}

static void write_module(const char *dir, const char *text) {
  char path[PATH_MAX];
  snprintf(path, sizeof(path), "%s/moongate", dir);
  mkdir(path, 0700);
  snprintf(path, sizeof(path), "%s/moongate/aggregate.lua", dir);
  FILE *f = fopen(path, "wb");
  if (f == NULL) MG_FAIL("cannot write %s", path);
  fputs(text, f);
  fclose(f);
}

/* MOONGATE_LUA_DIR replaces the module; a copy that is missing or broken fails the register
 * (and logs why) and leaves mg.aggregate unset. */
static void test_lua_dir_override(void) {
  char dir[] = "/tmp/mg-test-aggregate-XXXXXX";
  MG_CHECK(mkdtemp(dir) != NULL);
  char path[PATH_MAX], sub[PATH_MAX];
  snprintf(path, sizeof(path), "%s/moongate/aggregate.lua", dir);
  snprintf(sub, sizeof(sub), "%s/moongate", dir);
  write_module(dir, "return { marker = 'from ' .. type(mg.json) }");

  vm = mg_lua_vm_new(0, err, sizeof(err));
  MG_CHECK(vm != NULL);
  setenv("MOONGATE_LUA_DIR", dir, 1);
  int rc_custom = mg_lua_aggregate_register(vm);
  write_module(dir, "return {");
  int rc_broken = mg_lua_aggregate_register(vm);
  unlink(path);
  int rc_missing = mg_lua_aggregate_register(vm);
  unsetenv("MOONGATE_LUA_DIR");
  rmdir(sub);
  rmdir(dir);
  MG_CHECK_INT(rc_custom, 0);
  MG_CHECK_INT(rc_broken, -1);
  MG_CHECK_INT(rc_missing, -1);
  MG_CHECK_STR(eval("return mg.aggregate.marker"), "from table");

  mg_lua_vm_free(vm);
  vm = mg_lua_vm_new(0, err, sizeof(err));
  MG_CHECK(vm != NULL);
  setenv("MOONGATE_LUA_DIR", "/nonexistent-moongate", 1);
  int rc = mg_lua_aggregate_register(vm);
  unsetenv("MOONGATE_LUA_DIR");
  MG_CHECK_INT(rc, -1);
  MG_CHECK_STR(eval("return type(mg.aggregate)"), "nil");
}

/* ------------------------------------------------------------------------------------------
 * merge, merge_deep
 * ---------------------------------------------------------------------------------------- */

static void test_merge(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.merge({ id = 7, name = 'Ada' }, nil, { name = 'Ada L.' }, null))"),
               "{\"id\":7,\"name\":\"Ada L.\"}");
  /* Shallow: the later profile replaces the whole earlier one; a null value is a value. */
  MG_CHECK_STR(eval("return E(A.merge(USER, D('{\"profile\":{\"city\":\"Paris\"},"
                    "\"manager\":{\"id\":1},\"roles\":null}')))"),
               "{\"id\":7,\"manager\":{\"id\":1},\"name\":\"Ada\",\"profile\":{\"city\":"
               "\"Paris\"},\"roles\":null}");
  /* A new table; the inputs are untouched; empty arrays inside stay arrays. */
  MG_CHECK_STR(eval("local m = A.merge(USER, { extra = true }) "
                    "return tostring(m ~= USER) .. ' ' .. tostring(USER.extra) .. ' ' .. "
                    "J.encode(m.profile.tags)"),
               "true nil []");
  MG_CHECK_STR(eval("return J.encode(A.merge())"), "{}");
  MG_CHECK_STR(eval("return J.encode(A.merge(nil, null, D('{}')))"), "{}");
  MG_CHECK_STR(error_of("A.merge(USER, ORDERS)"),
               "t:1: merge: bad argument #2 (object expected, got array)");
  MG_CHECK_STR(error_of("A.merge('x')"),
               "t:1: merge: bad argument #1 (object expected, got string)");
  MG_CHECK_STR(error_of("A.merge({}, {}, J.array())"),
               "t:1: merge: bad argument #3 (object expected, got array)");
}

static void test_merge_deep(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.merge_deep(USER, D('{\"profile\":{\"city\":\"Paris\","
                    "\"tags\":[\"vip\"]},\"roles\":[]}'), nil, { profile = { phone = '1' } }))"),
               "{\"id\":7,\"manager\":null,\"name\":\"Ada\",\"profile\":{\"city\":\"Paris\","
               "\"email\":\"ada@example.com\",\"phone\":\"1\",\"tags\":[\"vip\"]},\"roles\":[]}");
  /* The inputs' nested objects are copied before they are written to. */
  MG_CHECK_STR(eval("A.merge_deep(USER, { profile = { city = 'Rome' } }) "
                    "return USER.profile.city"),
               "London");
  /* An object meets a non-object: replaced both ways. */
  MG_CHECK_STR(eval("return E(A.merge_deep({ a = { x = 1 }, b = 1 }, { a = null, b = { y = 2 } }))"),
               "{\"a\":null,\"b\":{\"y\":2}}");
  /* Arrays replace arrays, even an empty one. */
  MG_CHECK_STR(eval("return E(A.merge_deep({ l = D('[1,2]') }, { l = D('[]') }))"),
               "{\"l\":[]}");
  MG_CHECK_STR(error_of("A.merge_deep({}, 3)"),
               "t:1: merge_deep: bad argument #2 (object expected, got number)");
}

/* ------------------------------------------------------------------------------------------
 * pick, drop
 * ---------------------------------------------------------------------------------------- */

static void test_pick(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.pick(USER, { 'id', 'profile.email', 'manager', 'nope', "
                    "'nope.deeper', 'name.len', 'profile.zip' }))"),
               "{\"id\":7,\"manager\":null,\"profile\":{\"email\":\"ada@example.com\"}}");
  /* A path missing at its end makes no empty parent. */
  MG_CHECK_STR(eval("return J.encode(A.pick(USER, { 'profile.zip', 'manager.name' }))"), "{}");
  /* A whole object and one of its fields: the whole object, in either order. */
  MG_CHECK_STR(eval("return E(A.pick(USER, { 'profile.city', 'profile' }))"),
               "{\"profile\":{\"city\":\"London\",\"email\":\"ada@example.com\",\"tags\":[]}}");
  MG_CHECK_STR(eval("return E(A.pick(USER, { 'profile', 'profile.city' }))"),
               "{\"profile\":{\"city\":\"London\",\"email\":\"ada@example.com\",\"tags\":[]}}");
  /* On an array of objects: each element, in order; null profiles stay out of the path. */
  MG_CHECK_STR(eval("return E(A.pick(USERS, { 'id', 'profile.email' }))"),
               "[{\"id\":7,\"profile\":{\"email\":\"ada@example.com\"}},{\"id\":8},{\"id\":9}]");
  MG_CHECK_STR(eval("return E(A.pick(ORDERS, { 'id', 'items' }))"),
               "[{\"id\":101,\"items\":[{\"qty\":2,\"sku\":\"A1\"}]},{\"id\":102,\"items\":[]},"
               "{\"id\":103,\"items\":[{\"qty\":1,\"sku\":\"B2\"}]}]");
  /* Empty arrays stay arrays; elements that are not objects stay as they are. */
  MG_CHECK_STR(eval("return J.encode(A.pick(D('[]'), { 'id' }))"), "[]");
  MG_CHECK_STR(eval("return J.encode(A.pick(D('[{\"id\":1,\"x\":2},null,3,[4]]'), { 'id' }))"),
               "[{\"id\":1},null,3,[4]]");
  /* Missing data passes through. */
  MG_CHECK_STR(eval("return tostring(A.pick(null, { 'id' }) == null) .. ' ' .. "
                    "tostring(A.pick(nil, { 'id' }))"),
               "true nil");
  MG_CHECK_STR(eval("A.pick(USER, { 'id' }) return tostring(USER.name)"), "Ada");
  MG_CHECK_STR(error_of("A.pick(USER, 'id')"),
               "t:1: pick: fields must be a list of names, got string");
  MG_CHECK_STR(error_of("A.pick(USER, { 'id', 2 })"),
               "t:1: pick: field #2 must be a non-empty string, got number");
}

static void test_drop(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.drop(USER, { 'roles', 'profile.city', 'profile.tags', "
                    "'nope', 'manager.id', 'name.len' }))"),
               "{\"id\":7,\"manager\":null,\"name\":\"Ada\",\"profile\":{\"email\":"
               "\"ada@example.com\"}}");
  /* Copy on write: the input keeps every field. */
  MG_CHECK_STR(eval("A.drop(USER, { 'profile.city', 'roles' }) "
                    "return USER.profile.city .. ' ' .. USER.roles[1]"),
               "London admin");
  MG_CHECK_STR(eval("return E(A.drop(ORDERS, { 'items', 'user_id', 'status' }))"),
               "[{\"id\":101,\"total\":25.5},{\"id\":102,\"total\":12},{\"id\":103,\"total\":3.25}]");
  /* Paths do not walk arrays: items.qty drops nothing. */
  MG_CHECK_STR(eval("return E(A.drop(A.pick(ORDERS[1], { 'items' }), { 'items.qty' }))"),
               "{\"items\":[{\"qty\":2,\"sku\":\"A1\"}]}");
  MG_CHECK_STR(eval("return J.encode(A.drop(D('{\"a\":[]}'), { 'b' }))"), "{\"a\":[]}");
  MG_CHECK_STR(eval("return J.encode(A.drop(D('[]'), { 'id' }))"), "[]");
  MG_CHECK_STR(eval("return J.encode(A.drop(D('{\"id\":1}'), { 'id' }))"), "{}");
  MG_CHECK_STR(error_of("A.drop(USER, { '' })"),
               "t:1: drop: field #1 must be a non-empty string, got string");
}

/* ------------------------------------------------------------------------------------------
 * group, index, flatten, concat
 * ---------------------------------------------------------------------------------------- */

static void test_group(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.group(A.pick(ORDERS, { 'id', 'status' }), 'status'))"),
               "{\"pending\":[{\"id\":102,\"status\":\"pending\"}],\"shipped\":[{\"id\":101,"
               "\"status\":\"shipped\"},{\"id\":103,\"status\":\"shipped\"}]}");
  /* Numbers key without a decimal point, order inside a group is kept. */
  MG_CHECK_STR(eval("local g = A.group(ORDERS, 'user_id') "
                    "return E({ A.pick(g['7'], { 'id' }), A.pick(g['8'], { 'id' }) })"),
               "[[{\"id\":101},{\"id\":102}],[{\"id\":103}]]");
  /* Missing, null and non-scalar fields go under _none, or elsewhere, or nowhere. */
  MG_CHECK_STR(eval("return E(A.group(A.pick(REVIEWS, { 'id', 'product' }), 'product'))"),
               "{\"A1\":[{\"id\":1,\"product\":\"A1\"}],\"B2\":[{\"id\":2,\"product\":\"B2\"}],"
               "\"_none\":[{\"id\":3,\"product\":null}]}");
  MG_CHECK_STR(eval("return E(A.pick(A.group(REVIEWS, 'product', false), { '_none', 'B2' }))"),
               "{\"B2\":[{\"id\":2,\"product\":\"B2\",\"stars\":3}]}");
  MG_CHECK_STR(eval("return E(A.group(D('[{\"k\":{\"x\":1}},{\"k\":[1]},null,5,{\"k\":true},"
                    "{\"k\":2.5},{\"k\":9007199254740993}]'), 'k', 'other'))"),
               "{\"2.5\":[{\"k\":2.5}],\"9007199254740993\":[{\"k\":9007199254740993}],"
               "\"other\":[{\"k\":{\"x\":1}},{\"k\":[1]},null,5],\"true\":[{\"k\":true}]}");
  /* A dotted path. */
  MG_CHECK_STR(eval("return E(A.group(A.pick(USERS, { 'id', 'profile.email' }), 'profile.email'))"),
               "{\"_none\":[{\"id\":8},{\"id\":9}],\"ada@example.com\":[{\"id\":7,\"profile\":"
               "{\"email\":\"ada@example.com\"}}]}");
  /* Groups are arrays; no elements, no groups; missing data groups to nothing. */
  MG_CHECK_STR(eval("return J.encode(A.group(D('[]'), 'id'))"), "{}");
  MG_CHECK_STR(eval("return J.encode(A.group(null, 'id')) .. J.encode(A.group(nil, 'id'))"),
               "{}{}");
  MG_CHECK_STR(eval("return J.encode(A.group(D('[{\"t\":\"a\"}]'), 't'))"),
               "{\"a\":[{\"t\":\"a\"}]}");
  MG_CHECK_STR(error_of("A.group(USER, 'id')"),
               "t:1: group: bad argument #1 (array expected, got object)");
  MG_CHECK_STR(error_of("A.group(ORDERS)"),
               "t:1: group: bad argument #2 (field name expected, got nil)");
  MG_CHECK_STR(error_of("A.group(ORDERS, 'id', 1)"),
               "t:1: group: bad argument #3 (string or false expected, got number)");
}

static void test_index(void) {
  open_vm();
  MG_CHECK_STR(eval("return E(A.index(USERS, 'id'))"),
               "{\"7\":{\"id\":7,\"name\":\"Ada\",\"profile\":{\"email\":\"ada@example.com\"}},"
               "\"8\":{\"id\":8,\"name\":\"Bob\",\"profile\":null},\"9\":{\"id\":9,\"name\":\"Cy\"}}");
  /* The last wins; elements without a key are left out. */
  MG_CHECK_STR(eval("return E(A.pick(A.index(ORDERS, 'user_id'), { '7.id', '8.id' }))"),
               "{\"7\":{\"id\":102},\"8\":{\"id\":103}}");
  MG_CHECK_STR(eval("return E(A.index(A.pick(REVIEWS, { 'id', 'product' }), 'product'))"),
               "{\"A1\":{\"id\":1,\"product\":\"A1\"},\"B2\":{\"id\":2,\"product\":\"B2\"}}");
  MG_CHECK_STR(eval("return J.encode(A.index(D('[]'), 'id')) .. J.encode(A.index(null, 'id'))"),
               "{}{}");
  MG_CHECK_STR(error_of("A.index(5, 'id')"),
               "t:1: index: bad argument #1 (array expected, got number)");
}

static void test_flatten_concat(void) {
  open_vm();
  MG_CHECK_STR(eval("return J.encode(A.flatten({ D('[1,2]'), null, D('[]'), D('[[3]]'), 4, "
                    "{ 5 } }))"),
               "[1,2,[3],4,5]");
  MG_CHECK_STR(eval("return E(A.flatten({ A.pick(ORDERS, { 'id' }), D('[{\"id\":201}]') }))"),
               "[{\"id\":101},{\"id\":102},{\"id\":103},{\"id\":201}]");
  MG_CHECK_STR(eval("return J.encode(A.flatten({ D('[]'), J.array() }))"), "[]");
  MG_CHECK_STR(eval("return J.encode(A.flatten(D('[]'))) .. J.encode(A.flatten(null))"), "[][]");
  MG_CHECK_STR(eval("return J.encode(A.concat(D('[1]'), nil, null, D('[]'), { 2, 3 }))"),
               "[1,2,3]");
  MG_CHECK_STR(eval("return J.encode(A.concat()) .. J.encode(A.concat(D('[]'), {}))"), "[][]");
  MG_CHECK_STR(eval("local a = D('[1]') A.concat(a, { 2 }) return J.encode(a)"), "[1]");
  MG_CHECK_STR(error_of("A.concat(ORDERS, USER)"),
               "t:1: concat: bad argument #2 (array expected, got object)");
  MG_CHECK_STR(error_of("A.flatten('x')"),
               "t:1: flatten: bad argument #1 (array expected, got string)");
}

/* ------------------------------------------------------------------------------------------
 * run
 * ---------------------------------------------------------------------------------------- */

/* The three backends of the usual summary page; the macro adds options to REVIEWS. */
#define SPEC3(reviews_opts)                                                       \
  "{ { 'users', '/users/7', key = 'user', timeout = 0.5 }, "                      \
  "  { 'orders', { path = '/orders', query = { user = 7 } } }, "                  \
  "  { 'http://reviews.internal:8080', '/reviews?user=7', key = 'reviews' "       \
  reviews_opts " }, timeout = 2 }"

static void test_run_all_ok(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, USER_BODY), resp(200, ORDERS_BODY), resp(203, REVIEWS_BODY), {}) "
                    "return R(A(" SPEC3("") "))"),
               "200 true {\"orders\":[{\"id\":101,\"items\":[{\"qty\":2,\"sku\":\"A1\"}],"
               "\"status\":\"shipped\",\"total\":25.5,\"user_id\":7},{\"id\":102,\"items\":[],"
               "\"status\":\"pending\",\"total\":12,\"user_id\":7},{\"id\":103,\"items\":[{"
               "\"qty\":1,\"sku\":\"B2\"}],\"status\":\"shipped\",\"total\":3.25,\"user_id\":8}],"
               "\"reviews\":[{\"id\":1,\"product\":\"A1\",\"stars\":5},{\"id\":2,\"product\":"
               "\"B2\",\"stars\":3},{\"id\":3,\"product\":null,\"stars\":4}],\"user\":{\"id\":7,"
               "\"manager\":null,\"name\":\"Ada\",\"profile\":{\"city\":\"London\",\"email\":\"ada@example.com\",\"tags\":[]},"
               "\"roles\":[\"admin\"]}}");
  /* What fetch_all was given: the calls in order with their timeouts, the overall deadline. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), resp(200, '{}')) A.run(" SPEC3("") ") "
                    "local c = seen.calls "
                    "return #c .. ' ' .. c.timeout .. ' ' .. c[1][1] .. c[1][2] .. ' ' .. "
                    "c[1].timeout .. ' ' .. c[2][1] .. c[2][2].path .. c[2][2].query.user .. "
                    "' ' .. tostring(c[2].timeout) .. ' ' .. c[3][1] .. c[3][2] .. ' ' .. seen.count"),
               "3 2 users/users/7 0.5 orders/orders7 nil http://reviews.internal:8080/reviews?user=7 1");
  /* Empty documents stay what they were: [] and {}. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), resp(200, '[]')) "
                    "return R(A(" SPEC3("") "))"),
               "200 true {\"orders\":[],\"reviews\":[],\"user\":{}}");
  /* Without a key, an upstream name is the key; a body that is JSON null is a success. */
  MG_CHECK_STR(eval("fake(resp(200, 'null'), {}) return R(A{ { 'users', '/u' } })"),
               "200 true {\"users\":null}");
}

static void test_run_timeout(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, USER_BODY), resp(200, '[]'), nil, { [3] = 'timeout' }) "
                    "return R(A(" SPEC3("") "))"),
               "200 false {\"_errors\":[{\"backend\":\"reviews\",\"error\":\"timeout\",\"target\":"
               "\"http://reviews.internal:8080\"}],\"orders\":[],\"reviews\":null,\"user\":{"
               "\"id\":7,\"manager\":null,\"name\":\"Ada\",\"profile\":{\"city\":\"London\",\"email\":"
               "\"ada@example.com\",\"tags\":[]},\"roles\":[\"admin\"]}}");
  /* No message from fetch_all: still a failure, with a generic reason. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), nil, {}) "
                    "local _, doc = A(" SPEC3("") ") "
                    "return E(doc._errors)"),
               "[{\"backend\":\"reviews\",\"error\":\"failed\",\"target\":"
               "\"http://reviews.internal:8080\"}]");
}

static void test_run_status(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, '{\"id\":7}'), resp(200, '[]'), resp(503, '{\"error\":"
                    "\"down\"}'), {}) return R(A(" SPEC3("") "))"),
               "200 false {\"_errors\":[{\"backend\":\"reviews\",\"error\":\"status 503\","
               "\"target\":\"http://reviews.internal:8080\"}],\"orders\":[],\"reviews\":null,"
               "\"user\":{\"id\":7}}");
  /* Not 2xx means 1xx and 3xx too. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(304, ''), resp(200, '[]'), {}) "
                    "local _, doc = A(" SPEC3("") ") return E(doc._errors)"),
               "[{\"backend\":\"orders\",\"error\":\"status 304\",\"target\":\"orders\"}]");
}

static void test_run_invalid_json(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), resp(200, '<html>oops</html>'), {}) "
                    "return R(A(" SPEC3("") "))"),
               "200 false {\"_errors\":[{\"backend\":\"reviews\",\"error\":\"invalid JSON: parse "
               "error at byte 1: invalid char in json text.\",\"target\":"
               "\"http://reviews.internal:8080\"}],\"orders\":[],\"reviews\":null,\"user\":{}}");
}

static void test_run_all_failed(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(nil, resp(500, 'x'), nil, { [1] = 'connection refused', [3] = 'timeout' }) "
                    "return R(A(" SPEC3("") "))"),
               "502 false {\"_errors\":[{\"backend\":\"user\",\"error\":\"connection refused\","
               "\"target\":\"users\"},{\"backend\":\"orders\",\"error\":\"status 500\",\"target\":"
               "\"orders\"},{\"backend\":\"reviews\",\"error\":\"timeout\",\"target\":"
               "\"http://reviews.internal:8080\"}],\"error\":\"every backend failed\",\"status\":502}");
  /* A single backend that failed: still 502, nothing to show. */
  MG_CHECK_STR(eval("fake(nil, { [1] = 'timeout' }) "
                    "return R(A{ { 'users', '/u' } })"),
               "502 false {\"_errors\":[{\"backend\":\"users\",\"error\":\"timeout\",\"target\":"
               "\"users\"}],\"error\":\"every backend failed\",\"status\":502}");
}

static void test_run_required(void) {
  open_vm();
  /* A required backend failed: 502 naming it, even though the others answered. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), nil, { [3] = 'timeout' }) "
                    "return R(A(" SPEC3(", required = true") "))"),
               "502 false {\"_errors\":[{\"backend\":\"reviews\",\"error\":\"timeout\",\"target\":"
               "\"http://reviews.internal:8080\"}],\"error\":\"backend \\\"reviews\\\" failed\",\"status\":502}");
  /* The same failure of reviews, not required: a partial answer. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), nil, { [3] = 'timeout' }) "
                    "local status, doc = A(" SPEC3("") ") return status .. ' ' .. doc._errors[1].backend"),
               "200 reviews");
  /* required = false is the default, said out loud. */
  MG_CHECK_STR(eval("fake(resp(200, '{}'), resp(200, '[]'), nil, { [3] = 'timeout' }) "
                    "return tostring((A(" SPEC3(", required = false") ")))"),
               "200");
  /* Two backends down, one up: a partial 200 listing both. */
  MG_CHECK_STR(eval("fake(resp(200, '{\"id\":7}'), nil, resp(502, ''), { [2] = 'reset' }) "
                    "return R(A{ { 'users', '/u', key = 'user', required = true }, "
                    "{ 'orders', '/o' }, { 'reviews', '/r' } })"),
               "200 false {\"_errors\":[{\"backend\":\"orders\",\"error\":\"reset\",\"target\":"
               "\"orders\"},{\"backend\":\"reviews\",\"error\":\"status 502\",\"target\":"
               "\"reviews\"}],\"orders\":null,\"reviews\":null,\"user\":{\"id\":7}}");
}

static void test_run_transform(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, USER_BODY), resp(200, ORDERS_BODY), resp(200, REVIEWS_BODY), {}) "
                    "local got "
                    "return R(A{ { 'users', '/users/7', key = 'user', "
                    "    transform = function(u, res) got = res.status return A.pick(u, { 'id', 'name' }) end }, "
                    "  { 'orders', '/orders', transform = function(o) "
                    "    return A.group(A.pick(o, { 'id', 'status' }), 'status') end }, "
                    "  { 'reviews', '/reviews', transform = function() end } }) .. ' ' .. got"),
               "200 true {\"orders\":{\"pending\":[{\"id\":102,\"status\":\"pending\"}],\"shipped\":"
               "[{\"id\":101,\"status\":\"shipped\"},{\"id\":103,\"status\":\"shipped\"}]},"
               "\"reviews\":null,\"user\":{\"id\":7,\"name\":\"Ada\"}} 200");
  /* Transforms run only on successes. */
  MG_CHECK_STR(eval("fake(resp(500, '{}'), resp(200, '[]'), {}) local ran = 0 "
                    "local t = function(v) ran = ran + 1 return v end "
                    "local s = R(A{ { 'users', '/u', transform = t }, "
                    "{ 'orders', '/o', transform = t } }) return s .. ' ' .. ran"),
               "200 false {\"_errors\":[{\"backend\":\"users\",\"error\":\"status 500\",\"target\":"
               "\"users\"}],\"orders\":[],\"users\":null} 1");
  /* An error in a transform is the script's bug: it propagates. */
  MG_CHECK_STR(error_of("fake(resp(200, '{}'), {}) "
                        "A{ { 'users', '/u', transform = function() error('boom') end } }"),
               "t:1: boom");
}

static void test_run_merge_mode(void) {
  open_vm();
  MG_CHECK_STR(eval("fake(resp(200, '{\"id\":7,\"name\":\"Ada\",\"plan\":\"free\"}'), "
                    "resp(200, '{\"plan\":\"gold\",\"credits\":3}'), {}) "
                    "return R(A{ { 'users', '/u' }, { 'billing', '/b' }, merge = 'merge' })"),
               "200 true {\"credits\":3,\"id\":7,\"name\":\"Ada\",\"plan\":\"gold\"}");
  /* An array (or other non-object) cannot be merged: that backend failed. A transform can
   * make it an object first. */
  MG_CHECK_STR(eval("fake(resp(200, '{\"id\":7}'), resp(200, ORDERS_BODY), "
                    "resp(200, REVIEWS_BODY), nil, { [4] = 'timeout' }) "
                    "return R(A{ { 'users', '/u' }, { 'orders', '/o' }, "
                    "{ 'reviews', '/r', transform = function(r) return { review_count = #r } end }, "
                    "{ 'extra', '/e' }, merge = 'merge' })"),
               "200 false {\"_errors\":[{\"backend\":\"orders\",\"error\":\"not a JSON object\","
               "\"target\":\"orders\"},{\"backend\":\"extra\",\"error\":\"timeout\",\"target\":"
               "\"extra\"}],\"id\":7,\"review_count\":3}");
  MG_CHECK_STR(eval("fake(resp(200, '{}'), {}) return R(A{ { 'users', '/u' }, merge = 'merge' })"),
               "200 true {}");
}

static void test_run_spec_errors(void) {
  open_vm();
  /* Mistakes raise at the script's call, through mg.aggregate() or run(), before any fetch. */
  MG_CHECK_STR(error_of("fake() A(nil)"), "t:1: mg.aggregate: the spec must be a table, got nil");
  MG_CHECK_STR(error_of("fake() A.run{ 'users' }"),
               "t:1: mg.aggregate: call #1 must be a table, got string");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, { 'users', '/v' } }"),
               "t:1: mg.aggregate: call #2: the key \"users\" is used twice");
  MG_CHECK_STR(error_of("fake() A{ { 'http://x/y', '/u' } }"),
               "t:1: mg.aggregate: call #1: a key is needed (the target is not an upstream name)");
  MG_CHECK_STR(error_of("fake() A{ { nil, '/u', key = 'k' } }"),
               "t:1: mg.aggregate: call #1: the target (first element) must be a non-empty "
               "string, got nil");
  MG_CHECK_STR(error_of("fake() A{ { 'users', 5 } }"),
               "t:1: mg.aggregate: call #1: the path (second element) must be a string or a "
               "table, got number");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', key = '_errors' } }"),
               "t:1: mg.aggregate: call #1: the key \"_errors\" is reserved");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', requird = true } }"),
               "t:1: mg.aggregate: call #1: unknown field requird");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', timeout = 0 } }"),
               "t:1: mg.aggregate: call #1: timeout must be a positive number of seconds, got number");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', required = 'yes' } }"),
               "t:1: mg.aggregate: call #1: required must be a boolean, got string");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', transform = {} } }"),
               "t:1: mg.aggregate: call #1: transform must be a function, got object");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, timeout = 'soon' }"),
               "t:1: mg.aggregate: timeout must be a positive number of seconds, got string");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, merge = 'deep' }"),
               "t:1: mg.aggregate: merge must be \"nest\" or \"merge\", got \"deep\"");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, deadline = 1 }"),
               "t:1: mg.aggregate: unknown field deadline in the spec");
  /* Keys of other kinds are named as tostring names them; whole numbers past the calls and
   * fractions are not calls. */
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, [3] = { 'x' } }"),
               "t:1: mg.aggregate: unknown field 3 in the spec");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, [1.5] = 1 }"),
               "t:1: mg.aggregate: unknown field 1.5 in the spec");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, [true] = 1 }"),
               "t:1: mg.aggregate: unknown field true in the spec");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', '/v' } }"),
               "t:1: mg.aggregate: call #1: unknown field 3");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', ['key\\0x'] = 1 } }"),
               "t:1: mg.aggregate: call #1: unknown field key");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, merge = 'a\\nb' }"),
               "t:1: mg.aggregate: merge must be \"nest\" or \"merge\", got \"a\\\nb\"");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u' }, merge = mg.json.null }"),
               "t:1: mg.aggregate: merge must be \"nest\" or \"merge\", got null");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', key = {} } }"),
               "t:1: mg.aggregate: call #1: key must be a non-empty string, got object");
  MG_CHECK_STR(error_of("fake() A{ { 'a:b' } }"),
               "t:1: mg.aggregate: call #1: a key is needed (the target is not an upstream name)");
  MG_CHECK_STR(error_of("fake() A{ { 'users', '/u', timeout = 0/0 } }"),
               "t:1: mg.aggregate: call #1: timeout must be a positive number of seconds, got number");
  MG_CHECK_STR(error_of("fake() A{ { 'users', {1} } , { 'users', '/v', key = 'u2' }, "
                        "{ 'orders', '/o', key = 'users' } }"),
               "t:1: mg.aggregate: call #3: the key \"users\" is used twice");
  MG_CHECK_STR(error_of("mg.fetch_all = nil A{ { 'users', '/u' } }"),
               "t:1: mg.aggregate: mg.fetch_all is not available");
  /* None of these reached fetch_all. */
  MG_CHECK_STR(eval("fake() pcall(A, { { 'users', '/u', key = 1 } }) return tostring(seen.count)"),
               "0");
}

/* No calls: an empty object, and nothing fetched. */
static void test_run_empty(void) {
  open_vm();
  MG_CHECK_STR(eval("fake() local s = R(A{ timeout = 1 }) return s .. ' ' .. seen.count"),
               "200 true {} 0");
  MG_CHECK_STR(eval("fake() local s = R(A{ merge = 'merge' }) return s"), "200 true {}");
}

/* mg.fetch_all yields (the real one waits for I/O); run and the __call entry let it. */
static void test_run_yields(void) {
  open_vm();
  MG_CHECK_STR(eval("mg.fetch_all = function(calls) "
                    "  local a, b = coroutine.yield(#calls) return a, b, {} end "
                    "local co = coroutine.create(function() "
                    "  return R(A{ { 'users', '/u' }, { 'orders', '/o' } }) end) "
                    "local _, n = coroutine.resume(co) "
                    "local _, s = coroutine.resume(co, resp(200, '{\"id\":7}'), resp(200, '[]')) "
                    "return n .. ' ' .. s"),
               "2 200 true {\"orders\":[],\"users\":{\"id\":7}}");
}

int main(void) {
  /* The source tree's copy of the module, not a developer's override. */
  unsetenv("MOONGATE_LUA_DIR");
  RUN(test_installed);
  RUN(test_embedded_copy);
  RUN(test_lua_dir_override);
  RUN(test_merge);
  RUN(test_merge_deep);
  RUN(test_pick);
  RUN(test_drop);
  RUN(test_group);
  RUN(test_index);
  RUN(test_flatten_concat);
  RUN(test_run_all_ok);
  RUN(test_run_timeout);
  RUN(test_run_status);
  RUN(test_run_invalid_json);
  RUN(test_run_all_failed);
  RUN(test_run_required);
  RUN(test_run_transform);
  RUN(test_run_merge_mode);
  RUN(test_run_spec_errors);
  RUN(test_run_empty);
  RUN(test_run_yields);
  return mg_test_summary();
}
