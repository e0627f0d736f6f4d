/* mg_test_lua: helpers for C tests that drive a Lua module through a real lua_State, as
 * scripts use it. A test file defines `static void open_state(void)` (a fresh state with its
 * module as a global) and runs each test with RUN(fn), which closes the state afterwards so
 * LeakSanitizer sees anything a module leaked. Chunks are named "t", so errors raised by a
 * module carry the script position of the call ("t:1: ..."), as users see them. */
#ifndef MG_TEST_LUA_H
#define MG_TEST_LUA_H

#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "mg_test.h"

static lua_State *L;
static char result[1 << 12];
static size_t result_len;

/* Runs a test, then closes its state whether it passed or not. */
#define RUN(fn)                 \
  do {                          \
    MG_RUN(fn);                 \
    if (L) lua_close(L);        \
    L = NULL;                   \
  } while (0)

/* Runs CODE and leaves its results on an emptied stack; fails the test on a Lua error. */
static inline void run(const char *code) {
  lua_settop(L, 0);
  if (luaL_loadbuffer(L, code, strlen(code), "=t") || lua_pcall(L, 0, LUA_MULTRET, 0))
    MG_FAIL("lua error: %s\n    in: %s", lua_tostring(L, -1), code);
}

/* Evaluates EXPR and returns its first result, which must be a string (a static copy). */
static inline const char *str(const char *expr) {
  char code[4096];
  snprintf(code, sizeof code, "return %s", expr);
  run(code);
  if (lua_type(L, 1) != LUA_TSTRING)
    MG_FAIL("%s returned a %s, not a string", expr, luaL_typename(L, 1));
  const char *s = lua_tolstring(L, 1, &result_len);
  if (result_len >= sizeof result) MG_FAIL("%s: result too long for the helper", expr);
  memcpy(result, s, result_len + 1);
  return result;
}

/* Evaluates EXPR, which must return nil and a message; returns the message. */
static inline const char *failure(const char *expr) {
  char code[4096];
  snprintf(code, sizeof code, "return %s", expr);
  run(code);
  if (lua_gettop(L) != 2 || !lua_isnil(L, 1) || lua_type(L, 2) != LUA_TSTRING)
    MG_FAIL("%s did not return nil, err", expr);
  snprintf(result, sizeof result, "%s", lua_tostring(L, 2));
  return result;
}

/* Evaluates EXPR and returns whether its first result is true (not just truthy). */
static inline int is_true(const char *expr) {
  char code[4096];
  snprintf(code, sizeof code, "return %s", expr);
  run(code);
  return lua_type(L, 1) == LUA_TBOOLEAN && lua_toboolean(L, 1);
}

/* Runs CODE, which must raise; returns the error message. */
static inline const char *error_of(const char *code) {
  lua_settop(L, 0);
  if (luaL_loadbuffer(L, code, strlen(code), "=t")) MG_FAIL("syntax: %s", lua_tostring(L, -1));
  if (lua_pcall(L, 0, 0, 0) == 0) MG_FAIL("no error from: %s", code);
  const char *s = lua_tostring(L, -1);
  snprintf(result, sizeof result, "%s", s ? s : "(not a string)");
  return result;
}

#define CHECK_TRUE(expr) \
  do { if (!is_true(expr)) MG_FAIL("not true: %s", expr); } while (0)

#endif
