/* mg_lua_crypto: the `mg.crypto` Lua module on OpenSSL 3: SHA-256, HMAC-SHA256, base64 and
 * base64url, hex, random bytes and a constant-time compare.
 *
 * Digests and MACs return raw bytes; the _hex forms return lowercase hex. Encoders always
 * succeed; decoders return nil, "invalid base64 at byte N" (or "invalid base64 length") for
 * input that is not strictly base64, so a script can tell bad client input from a bug.
 * Wrong argument types and out-of-range sizes raise errors naming the argument. */
#ifndef MG_LUA_CRYPTO_H
#define MG_LUA_CRYPTO_H

#include <lua.h>

/* The most bytes crypto.random_bytes returns in one call. */
#define MG_CRYPTO_MAX_RANDOM 4096

/* Pushes the module table: sha256, sha256_hex, hmac_sha256, hmac_sha256_hex, base64_encode,
 * base64_decode, base64url_encode, base64url_decode, random_bytes, equal, hex. */
int luaopen_mg_crypto(lua_State *L);

#endif
