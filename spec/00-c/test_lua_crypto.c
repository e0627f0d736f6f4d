/* test_lua_crypto: mg.crypto driven through a real lua_State (the module is a global
 * `crypto`): published vectors (FIPS 180-2 SHA-256, RFC 4231 HMAC-SHA256, RFC 4648 base64),
 * round trips, strict decoding, argument errors. Each test gets a fresh state, closed by RUN. */

#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "mg_lua_crypto.h"
#include "mg_test_lua.h"

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

static void open_state(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaopen_mg_crypto(L);
  lua_setglobal(L, "crypto");
}

#define CHECK_FALSE(expr) \
  do { run("return " expr); if (lua_type(L, 1) != LUA_TBOOLEAN || lua_toboolean(L, 1)) MG_FAIL("not false: %s", expr); } while (0)

/* ------------------------------------------------------------------------------------------
 * Digests and MACs
 * ---------------------------------------------------------------------------------------- */

static void test_sha256(void) {
  open_state();
  MG_CHECK_STR(str("crypto.sha256_hex('')"),
               "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  MG_CHECK_STR(str("crypto.sha256_hex('abc')"),
               "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  MG_CHECK_STR(str("crypto.sha256_hex('\\0')"),
               "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
  MG_CHECK_STR(str("crypto.sha256_hex(('a'):rep(1e6))"),
               "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  /* The raw form is the 32 bytes the hex form spells. */
  str("crypto.sha256('abc')");
  MG_CHECK_INT(result_len, 32);
  MG_CHECK(memcmp(result, "\xba\x78\x16\xbf\x8f\x01\xcf\xea", 8) == 0);
  CHECK_TRUE("crypto.hex(crypto.sha256('abc')) == crypto.sha256_hex('abc')");
  /* Numbers are strings to Lua's string functions, and here too. */
  CHECK_TRUE("crypto.sha256(123) == crypto.sha256('123')");
  MG_CHECK_STR(error_of("crypto.sha256(nil)"),
               "t:1: bad argument #1 to 'sha256' (string expected, got nil)");
  MG_CHECK_STR(error_of("crypto.sha256_hex({})"),
               "t:1: bad argument #1 to 'sha256_hex' (string expected, got table)");
}

static void test_hmac_sha256(void) {
  open_state();
  /* RFC 4231 test cases 1, 2, 3 and 6 (a key longer than the block). */
  MG_CHECK_STR(str("crypto.hmac_sha256_hex(('\\11'):rep(20), 'Hi There')"),
               "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  MG_CHECK_STR(str("crypto.hmac_sha256_hex('Jefe', 'what do ya want for nothing?')"),
               "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  MG_CHECK_STR(str("crypto.hmac_sha256_hex(('\\170'):rep(20), ('\\221'):rep(50))"),
               "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
  MG_CHECK_STR(str("crypto.hmac_sha256_hex(('\\170'):rep(131),"
                   " 'Test Using Larger Than Block-Size Key - Hash Key First')"),
               "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  /* An empty key and message are allowed. */
  MG_CHECK_STR(str("crypto.hmac_sha256_hex('', '')"),
               "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
  str("crypto.hmac_sha256('Jefe', 'what do ya want for nothing?')");
  MG_CHECK_INT(result_len, 32);
  MG_CHECK(memcmp(result, "\x5b\xdc\xc1\x46", 4) == 0);
  MG_CHECK_STR(error_of("crypto.hmac_sha256('key')"),
               "t:1: bad argument #2 to 'hmac_sha256' (string expected, got no value)");
  MG_CHECK_STR(error_of("crypto.hmac_sha256_hex(nil, 'x')"),
               "t:1: bad argument #1 to 'hmac_sha256_hex' (string expected, got nil)");
}

/* ------------------------------------------------------------------------------------------
 * Base64
 * ---------------------------------------------------------------------------------------- */

static void test_base64_vectors(void) {
  static const char *vectors[][3] = { /* input, base64, base64url */
    {"", "", ""},
    {"f", "Zg==", "Zg"},
    {"fo", "Zm8=", "Zm8"},
    {"foo", "Zm9v", "Zm9v"},
    {"foob", "Zm9vYg==", "Zm9vYg"},
    {"fooba", "Zm9vYmE=", "Zm9vYmE"},
    {"foobar", "Zm9vYmFy", "Zm9vYmFy"},
  };
  char code[256];
  open_state();
  for (size_t i = 0; i < sizeof vectors / sizeof vectors[0]; i++) {
    snprintf(code, sizeof code, "crypto.base64_encode('%s')", vectors[i][0]);
    MG_CHECK_STR(str(code), vectors[i][1]);
    snprintf(code, sizeof code, "crypto.base64url_encode('%s')", vectors[i][0]);
    MG_CHECK_STR(str(code), vectors[i][2]);
    /* Both decoders take padded and unpadded input. */
    for (int j = 1; j <= 2; j++) {
      snprintf(code, sizeof code, "crypto.base64_decode('%s')", vectors[i][j]);
      MG_CHECK_STR(str(code), vectors[i][0]);
      snprintf(code, sizeof code, "crypto.base64url_decode('%s')", vectors[i][j]);
      MG_CHECK_STR(str(code), vectors[i][0]);
    }
  }
  /* The two alphabets differ in the last two characters: bytes fb ff. */
  MG_CHECK_STR(str("crypto.base64_encode('\\251\\255')"), "+/8=");
  MG_CHECK_STR(str("crypto.base64url_encode('\\251\\255')"), "-_8");
  CHECK_TRUE("crypto.base64_decode('+/8=') == '\\251\\255'");
  CHECK_TRUE("crypto.base64url_decode('-_8') == '\\251\\255'");
  CHECK_TRUE("crypto.base64url_decode('-_8=') == '\\251\\255'");
}

static void test_base64_round_trips(void) {
  open_state();
  /* Every byte value, at every length from 0 to 300 (so every tail and the switch from the
   * stack buffer to the scratch userdata are crossed). */
  CHECK_TRUE("(function()"
             "  local b = {} for i = 0, 299 do b[#b + 1] = string.char(i % 256) end"
             "  local all = table.concat(b)"
             "  for n = 0, #all do"
             "    local s = all:sub(1, n)"
             "    local e, u = crypto.base64_encode(s), crypto.base64url_encode(s)"
             "    if #e % 4 ~= 0 or e:find('[^A-Za-z0-9+/=]') or u:find('[^A-Za-z0-9_-]') then return n end"
             "    if crypto.base64_decode(e) ~= s or crypto.base64url_decode(u) ~= s then return n end"
             "    if u ~= e:gsub('+', '-'):gsub('/', '_'):gsub('=', '') then return n end"
             "  end"
             "  return true "
             "end)()");
  CHECK_TRUE("(function() local s = crypto.random_bytes(4096):rep(256)"
             " return crypto.base64_decode(crypto.base64_encode(s)) == s end)()");
}

static void test_base64_invalid(void) {
  open_state();
  MG_CHECK_STR(failure("crypto.base64_decode('Zm9v!')"), "invalid base64 at byte 5");
  MG_CHECK_STR(failure("crypto.base64_decode('Zm9v\\n')"), "invalid base64 at byte 5");
  MG_CHECK_STR(failure("crypto.base64_decode(' Zm9v')"), "invalid base64 at byte 1");
  MG_CHECK_STR(failure("crypto.base64_decode('Z')"), "invalid base64 length");
  MG_CHECK_STR(failure("crypto.base64_decode('Zm9vY')"), "invalid base64 length");
  /* Padding must be all there or not at all, and only at the end. */
  MG_CHECK_STR(failure("crypto.base64_decode('Zg=')"), "invalid base64 at byte 3");
  MG_CHECK_STR(failure("crypto.base64_decode('Zg===')"), "invalid base64 at byte 3");
  MG_CHECK_STR(failure("crypto.base64_decode('Zm9v====')"), "invalid base64 at byte 5");
  MG_CHECK_STR(failure("crypto.base64_decode('Zg==Zg==')"), "invalid base64 at byte 3");
  MG_CHECK_STR(failure("crypto.base64_decode('====')"), "invalid base64 at byte 1");
  /* Unused low bits must be zero, so each byte string has one encoding. */
  MG_CHECK_STR(failure("crypto.base64_decode('Zh==')"), "invalid base64 at byte 2");
  MG_CHECK_STR(failure("crypto.base64_decode('Zm9=')"), "invalid base64 at byte 3");
  /* Each decoder knows only its alphabet. */
  MG_CHECK_STR(failure("crypto.base64_decode('-_8=')"), "invalid base64 at byte 1");
  MG_CHECK_STR(failure("crypto.base64url_decode('+/8=')"), "invalid base64 at byte 1");
  MG_CHECK_STR(failure("crypto.base64url_decode('ab\\0d')"), "invalid base64 at byte 3");
  MG_CHECK_STR(error_of("crypto.base64_decode(nil)"),
               "t:1: bad argument #1 to 'base64_decode' (string expected, got nil)");
  MG_CHECK_STR(error_of("crypto.base64url_encode()"),
               "t:1: bad argument #1 to 'base64url_encode' (string expected, got no value)");
}

/* ------------------------------------------------------------------------------------------
 * Random bytes, compare, hex
 * ---------------------------------------------------------------------------------------- */

static void test_random_bytes(void) {
  open_state();
  CHECK_TRUE("#crypto.random_bytes(1) == 1 and #crypto.random_bytes(4096) == 4096");
  /* Two 32-byte draws collide with probability 2^-256; a broken generator would repeat. */
  CHECK_TRUE("crypto.random_bytes(32) ~= crypto.random_bytes(32)");
  /* Every byte value turns up in 64 KiB of output. */
  CHECK_TRUE("(function() local seen, n = {}, 0 for i = 1, 16 do"
             " for c in crypto.random_bytes(4096):gmatch('.') do"
             " if not seen[c] then seen[c] = true n = n + 1 end end end return n == 256 end)()");
  static const char *bad[] = {"0", "4097", "-1", "1.5", "0/0", "math.huge"};
  char code[64];
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf(code, sizeof code, "crypto.random_bytes(%s)", bad[i]);
    MG_CHECK_STR(error_of(code),
                 "t:1: bad argument #1 to 'random_bytes' (must be an integer from 1 to 4096)");
  }
  MG_CHECK_STR(error_of("crypto.random_bytes('x')"),
               "t:1: bad argument #1 to 'random_bytes' (number expected, got string)");
  MG_CHECK_STR(error_of("crypto.random_bytes()"),
               "t:1: bad argument #1 to 'random_bytes' (number expected, got no value)");
}

static void test_equal(void) {
  open_state();
  CHECK_TRUE("crypto.equal('', '')");
  CHECK_TRUE("crypto.equal('secret', 'secret')");
  CHECK_TRUE("crypto.equal('a\\0b', 'a\\0b')");
  CHECK_FALSE("crypto.equal('secret', 'secreT')");
  CHECK_FALSE("crypto.equal('secret', 'Secret')");
  CHECK_FALSE("crypto.equal('secret', 'secret2')");
  CHECK_FALSE("crypto.equal('a\\0b', 'a\\0c')");
  CHECK_FALSE("crypto.equal('', 'x')");
  CHECK_TRUE("(function() local s = crypto.random_bytes(4096)"
             " return crypto.equal(s, s .. '') and not crypto.equal(s, s:sub(1, -2) .. 'x') end)()");
  MG_CHECK_STR(error_of("crypto.equal('a')"),
               "t:1: bad argument #2 to 'equal' (string expected, got no value)");
  MG_CHECK_STR(error_of("crypto.equal(nil, 'a')"),
               "t:1: bad argument #1 to 'equal' (string expected, got nil)");
}

static void test_hex(void) {
  open_state();
  MG_CHECK_STR(str("crypto.hex('')"), "");
  MG_CHECK_STR(str("crypto.hex('\\0\\1\\127\\128\\255')"), "00017f80ff");
  MG_CHECK_STR(str("crypto.hex('Hi')"), "4869");
  CHECK_TRUE("crypto.hex(('\\171'):rep(1e5)) == ('ab'):rep(1e5)");
  MG_CHECK_STR(error_of("crypto.hex(true)"),
               "t:1: bad argument #1 to 'hex' (string expected, got boolean)");
}

static void test_module_table(void) {
  static const char *names[] = {"sha256", "sha256_hex", "hmac_sha256", "hmac_sha256_hex",
                                "base64_encode", "base64_decode", "base64url_encode",
                                "base64url_decode", "random_bytes", "equal", "hex"};
  open_state();
  int top = lua_gettop(L);
  MG_CHECK_INT(luaopen_mg_crypto(L), 1);
  MG_CHECK_INT(lua_gettop(L), top + 1);
  size_t n = 0;
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    lua_getfield(L, -1, names[i]);
    if (!lua_iscfunction(L, -1)) MG_FAIL("crypto.%s is missing", names[i]);
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    n++;
    lua_pop(L, 1);
  }
  MG_CHECK_INT(n, sizeof names / sizeof names[0]);
}

int main(void) {
  RUN(test_sha256);
  RUN(test_hmac_sha256);
  RUN(test_base64_vectors);
  RUN(test_base64_round_trips);
  RUN(test_base64_invalid);
  RUN(test_random_bytes);
  RUN(test_equal);
  RUN(test_hex);
  RUN(test_module_table);
  return mg_test_summary();
}
