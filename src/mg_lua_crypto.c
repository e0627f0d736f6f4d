/* mg_lua_crypto: `mg.crypto` (see mg_lua_crypto.h). Hashing, MACs and randomness come from
 * OpenSSL 3's non-deprecated one-shot calls (EVP_Digest, HMAC, RAND_bytes, CRYPTO_memcmp).
 * Base64 is written here instead of using EVP_EncodeBlock / EVP_DecodeBlock: those know only
 * the standard alphabet, and the decoder skips whitespace and cannot tell where the input went
 * wrong, while scripts need the URL alphabet, optional padding and a precise error.
 *
 * Output larger than a small stack buffer is built in a Lua userdata used as scratch space,
 * so an out-of-memory error raised while pushing the result leaks nothing. */
#include "mg_lua_crypto.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#define SHA256_LEN 32

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

/* Returns room for N bytes: SMALL when it fits, else a fresh userdata left on the stack
 * (the garbage collector frees it). */
static unsigned char *scratch(lua_State *L, unsigned char *small, size_t small_len, size_t n) {
  return n <= small_len ? small : lua_newuserdata(L, n ? n : 1);
}

static void push_hex(lua_State *L, const unsigned char *s, size_t len) {
  static const char digits[] = "0123456789abcdef";
  unsigned char small[256];
  if (len > (SIZE_MAX - 1) / 2) luaL_error(L, "string too long");
  unsigned char *out = scratch(L, small, sizeof small, 2 * len);
  for (size_t i = 0; i < len; i++) {
    out[2 * i] = (unsigned char)digits[s[i] >> 4];
    out[2 * i + 1] = (unsigned char)digits[s[i] & 15];
  }
  lua_pushlstring(L, (const char *)out, 2 * len);
}

/* ------------------------------------------------------------------------------------------
 * Digests and MACs
 * ---------------------------------------------------------------------------------------- */

static void sha256(lua_State *L, unsigned char out[SHA256_LEN]) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned int outlen = 0;
  if (!EVP_Digest(s, len, out, &outlen, EVP_sha256(), NULL) || outlen != SHA256_LEN)
    luaL_error(L, "sha256 failed");
}

static void hmac_sha256(lua_State *L, unsigned char out[SHA256_LEN]) {
  size_t keylen, len;
  const char *key = luaL_checklstring(L, 1, &keylen);
  const char *s = luaL_checklstring(L, 2, &len);
  unsigned int outlen = 0;
  if (keylen > INT32_MAX) luaL_argerror(L, 1, "key too long");
  if (!HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)s, len, out, &outlen) ||
      outlen != SHA256_LEN)
    luaL_error(L, "hmac_sha256 failed");
}

/* crypto.sha256(s) -> 32 raw bytes */
static int l_sha256(lua_State *L) {
  unsigned char md[SHA256_LEN];
  sha256(L, md);
  lua_pushlstring(L, (const char *)md, sizeof md);
  return 1;
}

/* crypto.sha256_hex(s) -> 64 lowercase hex digits */
static int l_sha256_hex(lua_State *L) {
  unsigned char md[SHA256_LEN];
  sha256(L, md);
  push_hex(L, md, sizeof md);
  return 1;
}

/* crypto.hmac_sha256(key, s) -> 32 raw bytes */
static int l_hmac_sha256(lua_State *L) {
  unsigned char mac[SHA256_LEN];
  hmac_sha256(L, mac);
  lua_pushlstring(L, (const char *)mac, sizeof mac);
  return 1;
}

/* crypto.hmac_sha256_hex(key, s) -> 64 lowercase hex digits */
static int l_hmac_sha256_hex(lua_State *L) {
  unsigned char mac[SHA256_LEN];
  hmac_sha256(L, mac);
  push_hex(L, mac, sizeof mac);
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * Base64 (RFC 4648 sections 4 and 5)
 * ---------------------------------------------------------------------------------------- */

static const char b64_std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char b64_url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* The 6-bit value of C in the alphabet (URL or standard), or -1. */
static int b64_value(unsigned char c, int url) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == (url ? '-' : '+')) return 62;
  if (c == (url ? '_' : '/')) return 63;
  return -1;
}

static int b64_encode(lua_State *L, int url) {
  size_t len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  const char *abc = url ? b64_url : b64_std;
  unsigned char small[256];
  if (len > SIZE_MAX / 4 * 3 - 3) return luaL_error(L, "string too long");
  unsigned char *out = scratch(L, small, sizeof small, (len + 2) / 3 * 4);
  size_t o = 0, i = 0;
  for (; len - i >= 3; i += 3) {
    uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
    out[o++] = (unsigned char)abc[v >> 18];
    out[o++] = (unsigned char)abc[(v >> 12) & 63];
    out[o++] = (unsigned char)abc[(v >> 6) & 63];
    out[o++] = (unsigned char)abc[v & 63];
  }
  if (len - i > 0) {
    uint32_t v = (uint32_t)s[i] << 16 | (len - i == 2 ? (uint32_t)s[i + 1] << 8 : 0);
    out[o++] = (unsigned char)abc[v >> 18];
    out[o++] = (unsigned char)abc[(v >> 12) & 63];
    if (len - i == 2) out[o++] = (unsigned char)abc[(v >> 6) & 63];
    if (!url) {
      if (len - i == 1) out[o++] = '=';
      out[o++] = '=';
    }
  }
  lua_pushlstring(L, (const char *)out, o);
  return 1;
}

/* Decodes strictly: only the alphabet's characters, then either no padding or exactly the
 * padding that makes the length a multiple of 4; unused low bits of the last character must
 * be zero, so every byte string has one encoding. No whitespace is skipped. */
static int b64_decode(lua_State *L, int url) {
  size_t len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  size_t n = len;
  if (n % 4 == 0 && n > 0 && s[n - 1] == '=') n -= (s[n - 2] == '=') ? 2 : 1;
  unsigned char small[256];
  unsigned char *out = scratch(L, small, sizeof small, n / 4 * 3 + 2);
  size_t o = 0;
  uint32_t acc = 0;
  for (size_t i = 0; i < n; i++) {
    int v = b64_value(s[i], url);
    if (v < 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "invalid base64 at byte %d", (int)(i + 1));
      return 2;
    }
    acc = acc << 6 | (uint32_t)v;
    if (i % 4 == 3) {
      out[o++] = (unsigned char)(acc >> 16);
      out[o++] = (unsigned char)(acc >> 8);
      out[o++] = (unsigned char)acc;
      acc = 0;
    }
  }
  switch (n % 4) {
  case 1:
    lua_pushnil(L);
    lua_pushliteral(L, "invalid base64 length");
    return 2;
  case 2: /* 12 bits: one byte and 4 unused bits */
    if (acc & 0xF) goto bad_tail;
    out[o++] = (unsigned char)(acc >> 4);
    break;
  case 3: /* 18 bits: two bytes and 2 unused bits */
    if (acc & 0x3) goto bad_tail;
    out[o++] = (unsigned char)(acc >> 10);
    out[o++] = (unsigned char)(acc >> 2);
    break;
  }
  lua_pushlstring(L, (const char *)out, o);
  return 1;

bad_tail:
  lua_pushnil(L);
  lua_pushfstring(L, "invalid base64 at byte %d", (int)n);
  return 2;
}

/* crypto.base64_encode(s) -> standard alphabet, padded */
static int l_base64_encode(lua_State *L) { return b64_encode(L, 0); }
/* crypto.base64_decode(s) -> bytes, or nil, err; padding optional */
static int l_base64_decode(lua_State *L) { return b64_decode(L, 0); }
/* crypto.base64url_encode(s) -> URL alphabet, no padding */
static int l_base64url_encode(lua_State *L) { return b64_encode(L, 1); }
/* crypto.base64url_decode(s) -> bytes, or nil, err; padding optional */
static int l_base64url_decode(lua_State *L) { return b64_decode(L, 1); }

/* ------------------------------------------------------------------------------------------
 * The rest
 * ---------------------------------------------------------------------------------------- */

/* crypto.random_bytes(n) -> N bytes from the OpenSSL CSPRNG, 1 <= N <= 4096; nil, err if the
 * generator fails (it is not seeded, say). */
static int l_random_bytes(lua_State *L) {
  lua_Number n = luaL_checknumber(L, 1);
  if (n != floor(n) || n < 1 || n > MG_CRYPTO_MAX_RANDOM)
    return luaL_argerror(L, 1, "must be an integer from 1 to 4096");
  unsigned char buf[MG_CRYPTO_MAX_RANDOM];
  if (RAND_bytes(buf, (int)n) != 1) {
    lua_pushnil(L);
    lua_pushliteral(L, "random generator failed");
    return 2;
  }
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  OPENSSL_cleanse(buf, (size_t)n);
  return 1;
}

/* crypto.equal(a, b) -> whether the strings are equal, in time that depends only on their
 * lengths (strings of different lengths are unequal at once: lengths are not secret). */
static int l_equal(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
  return 1;
}

/* crypto.hex(s) -> lowercase hex */
static int l_hex(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  push_hex(L, (const unsigned char *)s, len);
  return 1;
}

int luaopen_mg_crypto(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"sha256", l_sha256},
    {"sha256_hex", l_sha256_hex},
    {"hmac_sha256", l_hmac_sha256},
    {"hmac_sha256_hex", l_hmac_sha256_hex},
    {"base64_encode", l_base64_encode},
    {"base64_decode", l_base64_decode},
    {"base64url_encode", l_base64url_encode},
    {"base64url_decode", l_base64url_decode},
    {"random_bytes", l_random_bytes},
    {"equal", l_equal},
    {"hex", l_hex},
    {NULL, NULL},
  };
  lua_createtable(L, 0, 11);
  luaL_register(L, NULL, funcs);
  return 1;
}
