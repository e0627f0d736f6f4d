/* test_lua_json: mg.json driven through a real lua_State, as scripts will use it (the module is
 * a global `json`), plus mg_json_encode_value from C and behaviour under a memory cap. Each
 * test gets a fresh state, closed by RUN, so LeakSanitizer sees anything the module leaked. */

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "mg_buf.h"
#include "mg_lua_json.h"
#include "mg_test_lua.h"

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

static void open_state(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaopen_mg_json(L);
  lua_setglobal(L, "json");
}

/* ------------------------------------------------------------------------------------------
 * Encoding
 * ---------------------------------------------------------------------------------------- */

static void test_encode_scalars(void) {
  open_state();
  MG_CHECK_STR(str("json.encode(nil)"), "null");
  MG_CHECK_STR(str("json.encode()"), "null");
  MG_CHECK_STR(str("json.encode(json.null)"), "null");
  MG_CHECK_STR(str("json.encode(true)"), "true");
  MG_CHECK_STR(str("json.encode(false)"), "false");
  MG_CHECK_STR(str("json.encode('')"), "\"\"");
  MG_CHECK_STR(str("json.encode('hi')"), "\"hi\"");
  MG_CHECK_STR(error_of("json.encode(print)"), "t:1: cannot encode function");
  MG_CHECK_STR(error_of("json.encode(coroutine.create(print))"), "t:1: cannot encode thread");
  MG_CHECK_STR(error_of("json.encode(io.stdout)"), "t:1: cannot encode userdata");
}

static void test_encode_numbers(void) {
  open_state();
  MG_CHECK_STR(str("json.encode(1)"), "1");
  MG_CHECK_STR(str("json.encode(-1)"), "-1");
  MG_CHECK_STR(str("json.encode(0)"), "0");
  MG_CHECK_STR(str("json.encode(-0.0)"), "0");
  MG_CHECK_STR(str("json.encode(1.5)"), "1.5");
  MG_CHECK_STR(str("json.encode(0.1)"), "0.1");
  MG_CHECK_STR(str("json.encode(9.99)"), "9.99");
  MG_CHECK_STR(str("json.encode(1/3)"), "0.3333333333333333");
  MG_CHECK_STR(str("json.encode(1e300)"), "1e+300");
  MG_CHECK_STR(str("json.encode(-1e-7)"), "-1e-07");
  MG_CHECK_STR(str("json.encode(2^53)"), "9007199254740992");
  MG_CHECK_STR(str("json.encode(-2^53)"), "-9007199254740992");
  /* Past 2^53 an integral double is printed in its shortest exact form, not as %lld. */
  MG_CHECK_STR(str("json.encode(2^53 + 2)"), "9007199254740994");
  MG_CHECK_STR(str("json.encode(2^64)"), "1.8446744073709552e+19");
  MG_CHECK_STR(str("json.encode(123456789.125)"), "123456789.125");
  /* Every printed form reads back to the same double. */
  CHECK_TRUE("(function() for _, x in ipairs{0.1, 1/3, 2/3, 1e-300, 5e-324, 1.7976931348623157e308,"
             " 123.456, -9.87654321e-5} do if tonumber(json.encode(x)) ~= x then return x end end"
             " return true end)()");
  MG_CHECK_STR(error_of("json.encode(0/0)"), "t:1: cannot encode NaN");
  MG_CHECK_STR(error_of("json.encode(math.huge)"), "t:1: cannot encode Inf");
  MG_CHECK_STR(error_of("json.encode({x = -math.huge})"), "t:1: cannot encode Inf");
}

static void test_encode_strings(void) {
  open_state();
  MG_CHECK_STR(str("json.encode('a\"b\\\\c/d')"), "\"a\\\"b\\\\c/d\"");
  MG_CHECK_STR(str("json.encode('\\n\\r\\t\\b\\f')"), "\"\\n\\r\\t\\b\\f\"");
  MG_CHECK_STR(str("json.encode('\\0\\1\\31\\127')"), "\"\\u0000\\u0001\\u001F\x7f\"");
  /* Valid UTF-8 of every length passes through as is. */
  MG_CHECK_STR(str("json.encode('h\\195\\169 \\226\\152\\131 \\240\\159\\152\\128')"),
               "\"h\xc3\xa9 \xe2\x98\x83 \xf0\x9f\x98\x80\"");
  MG_CHECK_STR(str("json.encode({['k\\195\\169'] = 'v'})"), "{\"k\xc3\xa9\":\"v\"}");
}

static void test_encode_invalid_utf8(void) {
  open_state();
  MG_CHECK_STR(error_of("json.encode('ab\\255')"), "t:1: invalid UTF-8 at byte 3");
  MG_CHECK_STR(error_of("json.encode('\\128')"), "t:1: invalid UTF-8 at byte 1");
  MG_CHECK_STR(error_of("json.encode('ok \\192\\128')"), "t:1: invalid UTF-8 at byte 4");    /* overlong */
  MG_CHECK_STR(error_of("json.encode('\\224\\128\\128')"), "t:1: invalid UTF-8 at byte 1");  /* overlong */
  MG_CHECK_STR(error_of("json.encode('x\\237\\160\\128')"), "t:1: invalid UTF-8 at byte 2"); /* surrogate */
  MG_CHECK_STR(error_of("json.encode('\\244\\144\\128\\128')"), "t:1: invalid UTF-8 at byte 1"); /* > U+10FFFF */
  MG_CHECK_STR(error_of("json.encode('x\\226\\130')"), "t:1: invalid UTF-8 at byte 2");     /* truncated */
  MG_CHECK_STR(error_of("json.encode('\\226\\40\\161')"), "t:1: invalid UTF-8 at byte 1");  /* bad continuation */
  MG_CHECK_STR(error_of("json.encode({['k\\255'] = 1})"), "t:1: invalid UTF-8 at byte 2");
  MG_CHECK_STR(error_of("json.encode({{'ok', 'bad\\255'}})"), "t:1: invalid UTF-8 at byte 4");
}

static void test_encode_tables(void) {
  open_state();
  MG_CHECK_STR(str("json.encode({1, 2, 3})"), "[1,2,3]");
  MG_CHECK_STR(str("json.encode({'a', true, json.null, false})"), "[\"a\",true,null,false]");
  MG_CHECK_STR(str("json.encode({a = 1})"), "{\"a\":1}");
  MG_CHECK_STR(str("json.encode({a = {1, {b = json.null}}, })"), "{\"a\":[1,{\"b\":null}]}");
  /* Keys filled in any order still make an array. */
  MG_CHECK_STR(str("json.encode((function() local t = {} t[3] = 'c' t[1] = 'a' t[2] = 'b' return t end)())"),
               "[\"a\",\"b\",\"c\"]");
  /* Empty: an object unless marked. */
  MG_CHECK_STR(str("json.encode({})"), "{}");
  MG_CHECK_STR(str("json.encode(json.array({}))"), "[]");
  MG_CHECK_STR(str("json.encode(json.array())"), "[]");
  MG_CHECK_STR(str("json.encode(setmetatable({}, json.array_mt))"), "[]");
  CHECK_TRUE("json.encode({list = json.array(), map = {}}) == '{\"list\":[],\"map\":{}}' or "
             "json.encode({list = json.array(), map = {}}) == '{\"map\":{},\"list\":[]}'");
  /* The mark returns the same table and only matters while it is empty. */
  CHECK_TRUE("(function() local t = {} return json.array(t) == t end)()");
  MG_CHECK_STR(str("json.encode(json.array({7}))"), "[7]");
  MG_CHECK_STR(str("json.encode(json.array({x = 1}))"), "{\"x\":1}");
  MG_CHECK_STR(error_of("json.array(setmetatable({}, {}))"),
               "t:1: bad argument #1 to 'array' (table already has a metatable)");
  MG_CHECK_STR(error_of("json.array(1)"), "t:1: bad argument #1 to 'array' (table expected, got number)");
  /* Anything but keys 1..n is an object, and an object's keys must be strings. */
  MG_CHECK_STR(error_of("json.encode({1, nil, 3})"), "t:1: object key must be a string");
  MG_CHECK_STR(error_of("json.encode({1, 2, x = 3})"), "t:1: object key must be a string");
  MG_CHECK_STR(error_of("json.encode({[0] = 'zero'})"), "t:1: object key must be a string");
  MG_CHECK_STR(error_of("json.encode({[1.5] = 1})"), "t:1: object key must be a string");
  MG_CHECK_STR(error_of("json.encode({[true] = 1})"), "t:1: object key must be a string");
  MG_CHECK_STR(error_of("json.encode({[1] = 1, [2] = 2, [4] = 4})"), "t:1: object key must be a string");
  /* Metamethods are not consulted: the raw contents are what encodes. */
  MG_CHECK_STR(str("json.encode(setmetatable({}, {__index = function() return 1 end, __pairs = error}))"),
               "{}");
}

static void test_encode_cycles_and_depth(void) {
  open_state();
  MG_CHECK_STR(error_of("local t = {} t.self = t json.encode(t)"),
               "t:1: cannot encode a table that contains itself");
  MG_CHECK_STR(error_of("local a = {} local b = {a} a[1] = b json.encode({x = a})"),
               "t:1: cannot encode a table that contains itself");
  /* The same table twice side by side is not a cycle. */
  MG_CHECK_STR(str("(function() local s = {1} return json.encode({s, {s}}) end)()"), "[[1],[[1]]]");
  /* 100 levels encode; 101 do not. */
  MG_CHECK_STR(str("(function() local t = 1 for i = 1, 100 do t = {t} end"
                   " local s = json.encode(t) return s:sub(1, 3) .. #s end)()"),
               "[[[201");
  MG_CHECK_STR(error_of("local t = {} for i = 1, 100 do t = {t} end json.encode(t)"),
               "t:1: nesting deeper than 100");
  MG_CHECK_STR(error_of("local t = {} for i = 1, 1e5 do t = {a = t} end json.encode(t)"),
               "t:1: nesting deeper than 100");
  /* The state is usable after an error. */
  MG_CHECK_STR(str("json.encode({1})"), "[1]");
}

/* ------------------------------------------------------------------------------------------
 * Decoding
 * ---------------------------------------------------------------------------------------- */

static void test_decode_values(void) {
  open_state();
  CHECK_TRUE("json.decode('null') == json.null");
  CHECK_TRUE("json.decode('true') == true and json.decode('false') == false");
  CHECK_TRUE("json.decode(' \"x\" ') == 'x'");
  CHECK_TRUE("json.decode('42') == 42");
  run("t = json.decode('{\"a\": [1, \"two\", null, {\"b\": false}], \"c\": {}, \"d\": []}')");
  CHECK_TRUE("t.a[1] == 1 and t.a[2] == 'two' and t.a[3] == json.null and t.a[4].b == false");
  CHECK_TRUE("#t.a == 4 and next(t.c) == nil and next(t.d) == nil");
  /* Arrays carry the array metatable, objects none; so empty ones keep their kind. */
  CHECK_TRUE("getmetatable(t.a) == json.array_mt and getmetatable(t.d) == json.array_mt");
  CHECK_TRUE("getmetatable(t.c) == nil and getmetatable(t) == nil");
  MG_CHECK_STR(str("json.encode(json.decode('[]'))"), "[]");
  MG_CHECK_STR(str("json.encode(json.decode('{}'))"), "{}");
  MG_CHECK_STR(str("json.encode(json.decode('[[],{},[{}],null]'))"), "[[],{},[{}],null]");
  MG_CHECK_STR(str("json.encode(json.decode('{\"k\":null}'))"), "{\"k\":null}");
  /* A duplicate key keeps the last value. */
  CHECK_TRUE("json.decode('{\"a\":1,\"a\":2}').a == 2");
  /* json.null is one value, distinct from nil and from every other light userdata. */
  CHECK_TRUE("type(json.null) == 'userdata' and json.null ~= nil");
}

static void test_decode_numbers(void) {
  open_state();
  CHECK_TRUE("json.decode('1') == 1 and json.decode('-1') == -1");
  CHECK_TRUE("json.decode('1.5') == 1.5 and json.decode('1e300') == 1e300");
  CHECK_TRUE("json.decode('-0') == 0 and json.decode('2.5E-3') == 0.0025");
  CHECK_TRUE("json.decode('9007199254740992') == 2^53");
  /* Beyond 2^53 an integer is a bigint: its digits are kept, so it encodes back unchanged
   * (an id must survive a gateway that merges documents); a double would round it. */
  MG_CHECK_STR(str("json.encode(json.decode('[9007199254740993]'))"), "[9007199254740993]");
  MG_CHECK_STR(str("json.encode(json.decode('{\"id\":-123456789012345678901234567890}'))"),
               "{\"id\":-123456789012345678901234567890}");
  MG_CHECK_STR(str("tostring(json.decode('9007199254740993'))"), "9007199254740993");
  MG_CHECK_STR(str("'id ' .. json.decode('9007199254740993')"), "id 9007199254740993");
  CHECK_TRUE("json.decode('9007199254740993') == json.decode(' 9007199254740993')");
  CHECK_TRUE("json.decode('9007199254740993') ~= json.decode('9007199254740995')");
  CHECK_TRUE("tonumber(tostring(json.decode('123456789012345678901234567890'))) == 1.2345678901234568e29");
  /* Non-integers stay doubles whatever their size. */
  CHECK_TRUE("json.decode('1.5e20') == 1.5e20");
  CHECK_TRUE("json.decode('1e-400') == 0");
  /* A number that does not fit in a double is refused rather than turned into Inf. */
  run("return json.decode('[1, 1e400]')");
  MG_CHECK(lua_isnil(L, 1));
  MG_CHECK_STR(lua_tostring(L, 2), "parse error at byte 9: number out of range");
  /* A long number (past the decoder's small buffer) reads right. */
  CHECK_TRUE("json.decode('0.' .. ('0'):rep(100) .. '1e101') == 1");
}

static void test_decode_strings(void) {
  open_state();
  CHECK_TRUE("json.decode('\"a\\\\u0000b\"') == 'a\\0b'");
  CHECK_TRUE("#json.decode('\"\\\\u0000\"') == 1");
  CHECK_TRUE("json.decode('\"\\\\u00e9\\\\u2603\"') == '\\195\\169\\226\\152\\131'");
  CHECK_TRUE("json.decode('\"\\\\ud83d\\\\ude00\"') == '\\240\\159\\152\\128'");
  CHECK_TRUE("json.decode('\"\\\\\"\\\\\\\\\\\\/\\\\b\\\\f\\\\n\\\\r\\\\t\"') == '\"\\\\/\\b\\f\\n\\r\\t'");
  CHECK_TRUE("json.decode('\"h\\195\\169\"') == 'h\\195\\169'");
  /* Round trip of every byte value that is valid UTF-8 on its own, i.e. 0..127. */
  CHECK_TRUE("(function() local b = {} for i = 0, 127 do b[#b + 1] = string.char(i) end"
             " local s = table.concat(b) return json.decode(json.encode(s)) == s end)()");
  run("return json.decode('[\"ok\", \"\\255\"]')");
  MG_CHECK(lua_isnil(L, 1));
  MG_CHECK_STR(lua_tostring(L, 2), "parse error at byte 9: invalid bytes in UTF8 string.");
}

static void test_decode_errors(void) {
  static const struct { const char *text, *err; } cases[] = {
    {"", "parse error at byte 0: premature EOF"},
    {"   ", "parse error at byte 3: premature EOF"},
    {"[1", "parse error at byte 2: premature EOF"},
    {"[1,]", "parse error at byte 4: unallowed token at this point in JSON text"},
    {"{\"a\" 1}", "parse error at byte 6: object key and value must be separated by a colon (':')"},
    {"{\"a\":1,}", "parse error at byte 8: invalid object key (must be a string)"},
    {"[1] x", "parse error at byte 5: trailing garbage"},
    {"[1] [2]", "parse error at byte 5: trailing garbage"},
    {"[tru]", "parse error at byte 4: invalid string in json text."},
    {"[1.]", "parse error at byte 3: malformed number, a digit is required after the decimal point."},
    {"{a:1}", "parse error at byte 2: invalid char in json text."},
    {"[1] // comment", "parse error at byte 4: trailing garbage"},
    {"['x']", "parse error at byte 2: invalid char in json text."},
  };
  open_state();
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    lua_settop(L, 0);
    lua_getglobal(L, "json");
    lua_getfield(L, -1, "decode");
    lua_pushstring(L, cases[i].text);
    lua_call(L, 1, LUA_MULTRET);
    MG_CHECK_INT(lua_gettop(L), 3);
    if (!lua_isnil(L, 2)) MG_FAIL("decode(%s) succeeded", cases[i].text);
    MG_CHECK_STR(lua_tostring(L, 3), cases[i].err);
  }
  MG_CHECK_STR(error_of("json.decode(nil)"), "t:1: bad argument #1 to 'decode' (string expected, got nil)");
  MG_CHECK_STR(error_of("json.decode({})"), "t:1: bad argument #1 to 'decode' (string expected, got table)");
}

static void test_decode_depth(void) {
  open_state();
  CHECK_TRUE("#json.encode(json.decode(('['):rep(100) .. (']'):rep(100))) == 200");
  CHECK_TRUE("json.decode(('{\"a\":'):rep(99) .. '[]' .. ('}'):rep(99)).a.a ~= nil");
  run("return json.decode(('['):rep(101) .. (']'):rep(101))");
  MG_CHECK(lua_isnil(L, 1));
  MG_CHECK_STR(lua_tostring(L, 2), "parse error at byte 101: nesting deeper than 100");
  /* A hostile document nested a million deep stops at the limit, quickly. */
  run("return json.decode(('['):rep(1e6))");
  MG_CHECK(lua_isnil(L, 1));
  MG_CHECK_STR(lua_tostring(L, 2), "parse error at byte 101: nesting deeper than 100");
}

/* Items wait on the stack and move into their table DECODE_BATCH (32) at a time: sizes on
 * either side of each batch boundary, repeated keys across batches, batches waiting at many
 * levels at once, and the deepest document with the most items waiting at every level. Each
 * check returns 'ok' or what went wrong. */
static void test_decode_batches(void) {
  open_state();
  /* arr(n): [1,2,...,n]; keys(n, p): "p1":1,...,"pn":n; deep(n, a, b): n objects nested
   * through "c", each with a keys before the child and b after it, 0 innermost. */
  run("function arr(n) local p = {} for i = 1, n do p[i] = i end"
      "  return '[' .. table.concat(p, ',') .. ']' end "
      "function keys(n, p) local q = {} for i = 1, n do q[i] = '\"' .. (p or 'k') .. i .. '\":' .. i end"
      "  return table.concat(q, ',') end "
      "function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end "
      "function deep(n, a, b)"
      "  local pre = '{' .. keys(a) .. (a > 0 and ',' or '') .. '\"c\":'"
      "  local post = (b > 0 and ',' or '') .. keys(b, 'j') .. '}'"
      "  return pre:rep(n) .. '0' .. post:rep(n), #pre end");
  /* Arrays: every element, in order, with the array metatable. */
  MG_CHECK_STR(str("(function() for _, n in ipairs{1, 31, 32, 33, 63, 64, 65, 1000} do"
                   " local t = json.decode(arr(n)) local sum = 0"
                   " for i = 1, n do if t[i] ~= i then return n .. ': t[' .. i .. '] = ' .. tostring(t[i]) end"
                   "   sum = sum + t[i] end"
                   " if #t ~= n or count(t) ~= n or t[1] ~= 1 or t[n] ~= n or sum ~= n * (n + 1) / 2"
                   "   or getmetatable(t) ~= json.array_mt then return 'array of ' .. n end"
                   " end return 'ok' end)()"),
               "ok");
  /* Objects: every key with its value, no metatable. */
  MG_CHECK_STR(str("(function() for _, n in ipairs{1, 31, 32, 33, 64, 65, 1000} do"
                   " local t = json.decode('{' .. keys(n) .. '}')"
                   " if count(t) ~= n or getmetatable(t) ~= nil then return 'object of ' .. n end"
                   " for i = 1, n do if t['k' .. i] ~= i then return n .. ': k' .. i end end"
                   " end return 'ok' end)()"),
               "ok");
  /* A repeated key keeps its last value: in one batch, in the next batch, on either side of
   * a boundary, three batches apart, and whatever the kinds of the values. */
  CHECK_TRUE("(function() local t = json.decode('{\"a\":1,' .. keys(5) .. ',\"a\":2}')"
             " return t.a == 2 and count(t) == 6 end)()");
  CHECK_TRUE("(function() local t = json.decode('{\"a\":1,' .. keys(40) .. ',\"a\":2}')"
             " return t.a == 2 and count(t) == 41 and t.k40 == 40 end)()");
  CHECK_TRUE("(function() local t = json.decode('{' .. keys(31) .. ',\"a\":1,\"a\":2}')"
             " return t.a == 2 and count(t) == 32 end)()");
  CHECK_TRUE("(function() local t = json.decode('{' .. keys(32) .. ',\"a\":1,' .. keys(31, 'j') .. ',\"a\":2}')"
             " return t.a == 2 and count(t) == 64 end)()");
  CHECK_TRUE("(function() local t = json.decode('{\"a\":1,' .. keys(70) .. ',\"a\":2,' .. keys(70, 'j')"
             " .. ',\"a\":3,\"k1\":\"last\"}') return t.a == 3 and t.k1 == 'last' and t.k70 == 70"
             " and count(t) == 141 end)()");
  CHECK_TRUE("(function() local t = json.decode('{\"a\":[1],' .. keys(40) .. ',\"a\":null,\"b\":null,'"
             " .. keys(40, 'j') .. ',\"b\":{\"x\":[]}}') return t.a == json.null and t.b.x ~= nil"
             " and getmetatable(t.b.x) == json.array_mt and count(t) == 82 end)()");
  /* 40 objects of 40 keys in an array, and 40 arrays of 40 in an object: batches waiting
   * and flushing at two levels at once. */
  MG_CHECK_STR(str("(function() local p = {} for i = 1, 40 do local q = {}"
                   "   for j = 1, 40 do q[j] = '\"k' .. j .. '\":' .. (i * 100 + j) end"
                   "   p[i] = '{' .. table.concat(q, ',') .. '}' end"
                   " local t = json.decode('[' .. table.concat(p, ',') .. ']')"
                   " if #t ~= 40 or count(t) ~= 40 then return 'outer ' .. #t end"
                   " for i = 1, 40 do if count(t[i]) ~= 40 or getmetatable(t[i]) ~= nil then return 'object ' .. i end"
                   "   for j = 1, 40 do if t[i]['k' .. j] ~= i * 100 + j then return i .. '.k' .. j end end end"
                   " return 'ok' end)()"),
               "ok");
  MG_CHECK_STR(str("(function() local p = {} for i = 1, 40 do local q = {}"
                   "   for j = 1, 40 do q[j] = i * 100 + j end"
                   "   p[i] = '\"a' .. i .. '\":[' .. table.concat(q, ',') .. ']' end"
                   " local t = json.decode('{' .. table.concat(p, ',') .. '}')"
                   " if count(t) ~= 40 then return 'outer' end"
                   " for i = 1, 40 do local a = t['a' .. i]"
                   "   if #a ~= 40 or getmetatable(a) ~= json.array_mt then return 'array ' .. i end"
                   "   for j = 1, 40 do if a[j] ~= i * 100 + j then return i .. '[' .. j .. ']' end end end"
                   " return 'ok' end)()"),
               "ok");
  /* 100 levels of objects with 40 keys besides the child: with 31 keys before it, 63 items
   * wait at every level (the most there can be). All decode; 101 levels are refused. */
  MG_CHECK_STR(str("(function() for _, a in ipairs{0, 31, 32, 40} do"
                   " local t = json.decode((deep(100, a, 40 - a)))"
                   " for lv = 1, 100 do"
                   "   if type(t) ~= 'table' or count(t) ~= 41 then return a .. ': level ' .. lv end"
                   "   if a > 0 and t['k' .. a] ~= a or a < 40 and t['j' .. (40 - a)] ~= 40 - a then"
                   "     return a .. ': values at level ' .. lv end"
                   "   t = t.c end"
                   " if t ~= 0 then return a .. ': innermost ' .. tostring(t) end"
                   " end return 'ok' end)()"),
               "ok");
  CHECK_TRUE("(function() local s = deep(100, 31, 9) return json.encode(json.decode(s)):len() == #s end)()");
  CHECK_TRUE("(function() local s, pre = deep(101, 31, 9) local v, err = json.decode(s)"
             " return v == nil and err == 'parse error at byte ' .. (100 * pre + 1)"
             " .. ': nesting deeper than 100' end)()");
  CHECK_TRUE("(function() local s, pre = deep(101, 40, 0) local v, err = json.decode(s)"
             " return v == nil and err == 'parse error at byte ' .. (100 * pre + 1)"
             " .. ': nesting deeper than 100' end)()");
  /* Arrays nested 100 deep with 31 items before the child, then 101. */
  CHECK_TRUE("(function() local pre = '[' .. ('1,'):rep(31) local s = pre:rep(100) .. '2' .. (']'):rep(100)"
             " local t = json.decode(s) for lv = 1, 99 do if #t ~= 32 or t[31] ~= 1 then return false end"
             " t = t[32] end return #t == 32 and t[32] == 2 and json.encode(json.decode(s)) == s end)()");
  run("return json.decode(('[' .. ('1,'):rep(31)):rep(101) .. '2' .. (']'):rep(101))");
  MG_CHECK(lua_isnil(L, 1));
  MG_CHECK_STR(lua_tostring(L, 2), "parse error at byte 6301: nesting deeper than 100");
  /* An empty array at any depth, or after a batch, is an empty table marked as an array. */
  run("s = ('{\"a\":'):rep(99) .. '[]' .. ('}'):rep(99) t = json.decode(s)"
      " for i = 1, 99 do t = t.a end");
  CHECK_TRUE("type(t) == 'table' and next(t) == nil and getmetatable(t) == json.array_mt");
  MG_CHECK_STR(str("json.encode(t)"), "[]");
  CHECK_TRUE("json.encode(json.decode(s)) == s");
  run("t = json.decode(('['):rep(100) .. (']'):rep(100)) for i = 1, 99 do t = t[1] end");
  CHECK_TRUE("type(t) == 'table' and next(t) == nil and getmetatable(t) == json.array_mt");
  run("t = json.decode('[' .. ('0,'):rep(32) .. '[],{}]')");
  CHECK_TRUE("#t == 34 and next(t[33]) == nil and getmetatable(t[33]) == json.array_mt"
             " and next(t[34]) == nil and getmetatable(t[34]) == nil");
  MG_CHECK_STR(str("json.encode({t[33], t[34]})"), "[[],{}]");
  run("t = json.decode('{' .. keys(32) .. ',\"e\":[],\"o\":{}}')");
  CHECK_TRUE("count(t) == 34 and getmetatable(t.e) == json.array_mt and getmetatable(t.o) == nil");
  /* A 1000-item array of every kind of value (objects of one key, so the order of keys is
   * fixed) encodes back to the text it was decoded from. */
  run("local kinds = {"
      "  function(i) return tostring(i) end, function(i) return '-' .. i .. '.5' end,"
      "  function(i) return '\"s' .. i .. '\"' end, function() return 'true' end,"
      "  function() return 'false' end, function() return 'null' end,"
      "  function(i) return '{\"k' .. i .. '\":' .. i .. '}' end,"
      "  function(i) return '[' .. i .. ',\"x\",null]' end,"
      "  function() return '[]' end, function() return '{}' end,"
      "  function(i) return '12345678901234567' .. i end,"
      "  function(i) return '{\"a\":' .. arr(i % 70) .. '}' end }"
      " local p = {} for i = 1, 1000 do p[i] = kinds[i % #kinds + 1](i) end"
      " mixed = '[' .. table.concat(p, ',') .. ']'");
  CHECK_TRUE("#json.decode(mixed) == 1000");
  CHECK_TRUE("json.encode(json.decode(mixed)) == mixed");
  CHECK_TRUE("json.encode(json.decode('{\"m\":' .. mixed .. '}')) == '{\"m\":' .. mixed .. '}'");
}

static void test_round_trip(void) {
  open_state();
  run("function same(a, b)"
      "  if type(a) ~= type(b) then return false end"
      "  if type(a) ~= 'table' then return a == b end"
      "  if getmetatable(a) ~= getmetatable(b) then return false end"
      "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end"
      "  for k in pairs(b) do if a[k] == nil then return false end end"
      "  return true "
      "end");
  run("doc = json.decode('{\"id\": 7, \"name\": \"Zo\\\\u00eb \\\\\"Z\\\\\"\", \"tags\": [\"a\", \"b\"],"
      " \"none\": null, \"empty_list\": [], \"empty_map\": {}, \"ratio\": 0.25, \"neg\": -3e-5,"
      " \"nested\": {\"deeper\": [[1, 2], [3, [4, {\"k\": true}]]]}}')");
  CHECK_TRUE("same(doc, json.decode(json.encode(doc)))");
  /* Object keys come out in table order, which differs between two equal tables: compare
   * the structure (above) and the length, not the text. */
  CHECK_TRUE("#json.encode(doc) == #json.encode(json.decode(json.encode(doc)))");
  CHECK_TRUE("doc.name == 'Zo\\195\\171 \"Z\"' and doc.ratio == 0.25");
}

static void test_big_inputs(void) {
  open_state();
  clock_t start = clock();
  /* A 1 MiB array of numbers: decode, count, re-encode to the same text. */
  run("local parts = {} for i = 1, 131072 do parts[i] = '1234567' end"
      " big = '[' .. table.concat(parts, ',') .. ']'");
  CHECK_TRUE("#big == 1048577");
  CHECK_TRUE("#json.decode(big) == 131072");
  CHECK_TRUE("json.encode(json.decode(big)) == big");
  /* A 1 MiB string full of characters that need escaping. */
  CHECK_TRUE("(function() local s = ('\"\\n\\0a'):rep(262144) local e = json.encode(s)"
             " return #e == 2 + 262144 * 11 and json.decode(e) == s end)()");
  /* An object with 100,000 keys. */
  CHECK_TRUE("(function() local t = {} for i = 1, 1e5 do t['k' .. i] = i end"
             " local d = json.decode(json.encode(t)) return d.k1 == 1 and d.k100000 == 1e5 end)()");
  double secs = (double)(clock() - start) / CLOCKS_PER_SEC;
  if (secs > 20) MG_FAIL("big inputs took %.1f s", secs);
}

/* ------------------------------------------------------------------------------------------
 * Raw JSON
 * ---------------------------------------------------------------------------------------- */

static void test_raw(void) {
  open_state();
  /* Every kind of document encodes back as it was written. */
  MG_CHECK_STR(str("json.encode(json.raw('{\"a\":[1,2]}'))"), "{\"a\":[1,2]}");
  MG_CHECK_STR(str("json.encode(json.raw('[1, \"two\", null]'))"), "[1, \"two\", null]");
  MG_CHECK_STR(str("json.encode(json.raw('\"caf\\195\\169\"'))"), "\"caf\xc3\xa9\"");
  MG_CHECK_STR(str("json.encode(json.raw('-0.50'))"), "-0.50");
  MG_CHECK_STR(str("json.encode(json.raw('true'))"), "true");
  MG_CHECK_STR(str("json.encode(json.raw('null'))"), "null");
  /* Escapes are kept as written, not re-escaped the encoder's way. */
  MG_CHECK_STR(str("json.encode(json.raw('\"\\\\u00e9\\\\/\"'))"), "\"\\u00e9\\/\"");
  /* JSON whitespace around the document is trimmed; inside it is kept. */
  MG_CHECK_STR(str("json.encode(json.raw('  {\"a\":1}\\n'))"), "{\"a\":1}");
  MG_CHECK_STR(str("json.encode(json.raw('\\r\\n\\t[1, 2] \\t\\r\\n'))"), "[1, 2]");
  /* Inside arrays and objects, with the separators the position needs. */
  MG_CHECK_STR(str("json.encode({1, json.raw('[2,3]'), json.raw('{\"x\":1.50}')})"),
               "[1,[2,3],{\"x\":1.50}]");
  MG_CHECK_STR(str("json.encode({json.raw('{}'), json.raw('[]'), json.raw('\"s\"'), 4})"),
               "[{},[],\"s\",4]");
  MG_CHECK_STR(str("json.encode({user = json.raw(' {\"b\":1,\"a\":1e2} ')})"),
               "{\"user\":{\"b\":1,\"a\":1e2}}");
  MG_CHECK_STR(str("json.encode({a = {json.raw('1E+2'), {b = json.raw('null')}}})"),
               "{\"a\":[1E+2,{\"b\":null}]}");
  /* Key order and number spelling survive (decode and encode would lose both). */
  MG_CHECK_STR(str("json.encode(json.raw('{\"b\":1,\"a\":1e2}'))"), "{\"b\":1,\"a\":1e2}");
  MG_CHECK_STR(str("json.encode(json.raw('{\"z\":1.0,\"m\":0.10,\"a\":-0}'))"),
               "{\"z\":1.0,\"m\":0.10,\"a\":-0}");
  /* Integers of any length are kept digit for digit. */
  MG_CHECK_STR(str("json.encode(json.raw('12345678901234567890'))"), "12345678901234567890");
  MG_CHECK_STR(str("json.encode({id = json.raw('-123456789012345678901234567890')})"),
               "{\"id\":-123456789012345678901234567890}");
  /* A document nested 100 deep is accepted and written back whole. */
  CHECK_TRUE("(function() local s = ('['):rep(100) .. (']'):rep(100)"
             " return json.encode(json.raw(s)) == s end)()");
  /* tostring gives the (trimmed) text; the metatable is protected. */
  MG_CHECK_STR(str("tostring(json.raw(' [1, 2] '))"), "[1, 2]");
  CHECK_TRUE("type(json.raw('1')) == 'userdata'");
  CHECK_TRUE("getmetatable(json.raw('{}')) == 'raw json'");
  /* A raw value given to raw is the same value; decode reads its text. */
  CHECK_TRUE("(function() local v = json.raw('[1]') return rawequal(json.raw(v), v) end)()");
  run("t = json.decode(json.raw(' {\"a\":[1,{\"b\":\"c\"}],\"n\":null} '))");
  CHECK_TRUE("type(t) == 'table' and t.a[1] == 1 and t.a[2].b == 'c' and t.n == json.null");
  CHECK_TRUE("getmetatable(t.a) == json.array_mt");
  CHECK_TRUE("json.decode(json.raw('42')) == 42");
  /* A number argument is turned into its string by the Lua API, so it is valid JSON. */
  MG_CHECK_STR(str("tostring(json.raw(42))"), "42");
  MG_CHECK_STR(str("json.encode({json.raw(42), json.raw(0.5)})"), "[42,0.5]");
  MG_CHECK_STR(failure("json.raw(math.huge)"), "parse error at byte 1: invalid char in json text.");
  /* Long escaped strings (yajl buffers them: past the checker's 16 KiB arena, into the heap),
   * one after another and in many values, come back whole. */
  run("long = '\"' .. ('\\\\n\\\\u00e9'):rep(20000) .. '\"'");
  CHECK_TRUE("json.encode(json.raw(long)) == long");
  CHECK_TRUE("json.decode(json.raw(long)) == ('\\n\\195\\169'):rep(20000)");
  run("many = '[' .. ('\"a\\\\tb\",'):rep(5000) .. '1]'");
  CHECK_TRUE("tostring(json.raw(many)) == many");
  CHECK_TRUE("json.raw(long .. 'x') == nil");
  CHECK_TRUE("tostring(json.raw(long)) == long");
  /* A bigint (a decoded integer beyond 2^53) gives its digits. */
  run("big = json.decode('[123456789012345678901]')[1]");
  MG_CHECK_STR(str("json.encode({n = json.raw(big)})"), "{\"n\":123456789012345678901}");
  CHECK_TRUE("getmetatable(json.raw(big)) == 'raw json'");
  /* .. joins a raw value's text (and a bigint's digits) with strings and numbers. */
  MG_CHECK_STR(str("'id=' .. json.raw(' [1, 2] ') .. ';'"), "id=[1, 2];");
  MG_CHECK_STR(str("json.raw('{}') .. 1"), "{}1");
  MG_CHECK_STR(str("json.raw('\"a\"') .. big"), "\"a\"123456789012345678901");
  MG_CHECK_STR(str("big .. json.raw('0')"), "1234567890123456789010");
  MG_CHECK_STR(error_of("return json.raw('1') .. {}"), "t:1: attempt to concatenate a table value");
  MG_CHECK_STR(error_of("return big .. true"), "t:1: attempt to concatenate a boolean value");
  /* Anything else that is not a string raises. */
  MG_CHECK_STR(error_of("json.raw({})"), "t:1: bad argument #1 to 'raw' (string expected, got table)");
  MG_CHECK_STR(error_of("json.raw()"), "t:1: bad argument #1 to 'raw' (string expected, got no value)");
  MG_CHECK_STR(error_of("json.raw(true)"), "t:1: bad argument #1 to 'raw' (string expected, got boolean)");
  /* A raw value is not a string and cannot be an object key. */
  MG_CHECK_STR(error_of("json.encode({[json.raw('\"k\"')] = 1})"), "t:1: object key must be a string");
}

static void test_raw_invalid(void) {
  open_state();
  /* What decode refuses, raw refuses with the same message. */
  MG_CHECK_STR(failure("json.raw('')"), "parse error at byte 0: premature EOF");
  MG_CHECK_STR(failure("json.raw(' \\n ')"), "parse error at byte 3: premature EOF");
  MG_CHECK_STR(failure("json.raw('{\"a\":')"), "parse error at byte 5: premature EOF");
  MG_CHECK_STR(failure("json.raw('{} x')"), "parse error at byte 4: trailing garbage");
  MG_CHECK_STR(failure("json.raw('[1] [2]')"), "parse error at byte 5: trailing garbage");
  MG_CHECK_STR(failure("json.raw('[1,]')"),
               "parse error at byte 4: unallowed token at this point in JSON text");
  MG_CHECK_STR(failure("json.raw(\"{'a':1}\")"), "parse error at byte 2: invalid char in json text.");
  MG_CHECK_STR(failure("json.raw('\"\\255\"')"), "parse error at byte 2: invalid bytes in UTF8 string.");
  MG_CHECK_STR(failure("json.raw('[\"ok\", \"\\255\"]')"),
               "parse error at byte 9: invalid bytes in UTF8 string.");
  MG_CHECK_STR(failure("json.raw('\"a\\tb\"')"), "parse error at byte 2: invalid character inside string.");
  MG_CHECK_STR(failure("json.raw('[1] // comment')"), "parse error at byte 4: trailing garbage");
  /* Nesting: 101 levels are refused, and a hostile million stops at the limit. */
  MG_CHECK_STR(failure("json.raw(('['):rep(101) .. (']'):rep(101))"),
               "parse error at byte 101: nesting deeper than 100");
  MG_CHECK_STR(failure("json.raw(('{\"a\":'):rep(101) .. '1' .. ('}'):rep(101))"),
               "parse error at byte 501: nesting deeper than 100");
  MG_CHECK_STR(failure("json.raw(('['):rep(1e6))"), "parse error at byte 101: nesting deeper than 100");
  /* A number with a fraction or an exponent that does not fit in a double. */
  MG_CHECK_STR(failure("json.raw('1e400')"), "parse error at byte 5: number out of range");
  MG_CHECK_STR(failure("json.raw('{\"n\":-1.5E309}')"), "parse error at byte 13: number out of range");
  MG_CHECK_STR(failure("json.raw('1' .. ('0'):rep(400) .. '.5')"),
               "parse error at byte 403: number out of range");
  /* ... while long ones that fit are fine, as in decode. */
  MG_CHECK_STR(str("tostring(json.raw('1e-400'))"), "1e-400");
  CHECK_TRUE("(function() local s = '0.' .. ('0'):rep(100) .. '1e101'"
             " return tostring(json.raw(s)) == s end)()");
  CHECK_TRUE("(function() local s = '[' .. ('9'):rep(299) .. '.5]'"
             " return tostring(json.raw(s)) == s end)()");
  CHECK_TRUE("(function() local s = '0.' .. ('0'):rep(100) .. '1e500'"
             " local v, err = json.raw(s) return v == nil and err == 'parse error at byte ' .. #s"
             " .. ': number out of range' end)()");
  /* The state carries on after refusals. */
  MG_CHECK_STR(str("json.encode({json.raw('[1]')})"), "[[1]]");
}

/* ------------------------------------------------------------------------------------------
 * From C, and under a memory cap
 * ---------------------------------------------------------------------------------------- */

static void test_c_encode_value(void) {
  open_state();
  mg_buf_t buf;
  char err[64];
  mg_buf_init(&buf);
  mg_buf_puts(&buf, "body=");
  run("return {a = {1, 2, json.array()}}, 0/0, 'x'");
  MG_CHECK_INT(mg_json_encode_value(L, 1, &buf, err, sizeof err), 0);
  MG_CHECK_MEM(buf.data, buf.len, "body={\"a\":[1,2,[]]}");
  MG_CHECK_INT(lua_gettop(L), 3);
  /* A negative index, appended after what is there. */
  MG_CHECK_INT(mg_json_encode_value(L, -1, &buf, err, sizeof err), 0);
  MG_CHECK_MEM(buf.data, buf.len, "body={\"a\":[1,2,[]]}\"x\"");
  MG_CHECK_STR(err, "");
  /* A failure leaves the buffer and the stack as they were. */
  size_t len = buf.len;
  MG_CHECK_INT(mg_json_encode_value(L, 2, &buf, err, sizeof err), -1);
  MG_CHECK_STR(err, "cannot encode NaN");
  MG_CHECK_INT(buf.len, len);
  MG_CHECK_INT(lua_gettop(L), 3);
  run("local t = {1, 2, {3, {}}} t[3][2][1] = t return t");
  MG_CHECK_INT(mg_json_encode_value(L, 1, &buf, err, sizeof err), -1);
  MG_CHECK_STR(err, "cannot encode a table that contains itself");
  MG_CHECK_INT(buf.len, len);
  MG_CHECK_INT(lua_gettop(L), 1);
  /* A short error buffer truncates, still terminated. */
  char tiny[8];
  MG_CHECK_INT(mg_json_encode_value(L, 1, &buf, tiny, sizeof tiny), -1);
  MG_CHECK_STR(tiny, "cannot ");
  mg_buf_dispose(&buf);
}

static size_t cap_used, cap_limit;

/* An allocator that refuses to go past cap_limit bytes, like the worker's per-VM cap. */
static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  if (nsize == 0) {
    free(ptr);
    cap_used -= ptr ? osize : 0;
    return NULL;
  }
  size_t old = ptr ? osize : 0;
  if (nsize > old && cap_used + (nsize - old) > cap_limit) return NULL;
  void *p = realloc(ptr, nsize);
  if (p) cap_used = cap_used - old + nsize;
  return p;
}

static void test_memory_cap(void) {
  cap_used = 0;
  cap_limit = 24 << 20;
  L = lua_newstate(capped_alloc, NULL);
  MG_CHECK(L != NULL);
  luaL_openlibs(L);
  luaopen_mg_json(L);
  lua_setglobal(L, "json");
  /* Decoding a document whose Lua form exceeds the cap raises "not enough memory" from
   * inside the parser; the yajl handle is freed by the guard (LeakSanitizer checks). */
  run("text = '[' .. ('{\"k\":[1,2,3]},'):rep(300000) .. '0]'");
  MG_CHECK_STR(error_of("json.decode(text)"), "not enough memory");
  /* The half-built document is garbage once the error is caught; the worker collects it
   * when it drops the request. Then the state carries on. */
  lua_settop(L, 0);
  lua_pushnil(L);
  lua_setglobal(L, "text");
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (cap_used > (2 << 20)) MG_FAIL("%zu bytes in use after a full GC", cap_used);
  /* Encoding output that does not fit in a Lua string raises the same way. */
  run("t = {} for i = 1, 14 do t[i] = ('x'):rep(2^20 + i) end");
  const char *e = error_of("json.encode(t)");
  MG_CHECK_STR(e, "not enough memory");
  run("t = nil collectgarbage()");
  MG_CHECK_STR(str("json.encode(json.decode('[1,{}]'))"), "[1,{}]");
}

int main(void) {
  RUN(test_encode_scalars);
  RUN(test_encode_numbers);
  RUN(test_encode_strings);
  RUN(test_encode_invalid_utf8);
  RUN(test_encode_tables);
  RUN(test_encode_cycles_and_depth);
  RUN(test_decode_values);
  RUN(test_decode_numbers);
  RUN(test_decode_strings);
  RUN(test_decode_errors);
  RUN(test_decode_depth);
  RUN(test_decode_batches);
  RUN(test_round_trip);
  RUN(test_raw);
  RUN(test_raw_invalid);
  RUN(test_big_inputs);
  RUN(test_c_encode_value);
  RUN(test_memory_cap);
  return mg_test_summary();
}
