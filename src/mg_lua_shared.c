/* mg_lua_shared: `mg.shared.NAME` over mg_shdict (see mg_lua_shared.h for the Lua API).
 *
 * A dictionary object is a full userdata holding the mg_shdict_t pointer, with one metatable
 * per Lua state whose __index is the method table (locked with __metatable, so a chunk cannot
 * swap a method under the other chunks); each method holds that metatable as its upvalue,
 * which is how it recognises a dictionary (check_dict). mg.shared is an empty proxy whose __index is the
 * table of dictionaries: a known name costs two table lookups and no C call; only a miss
 * reaches C, to raise the error that says how to declare the dictionary.
 *
 * Every method checks all of its arguments before it touches the dictionary, so a misuse
 * raises without having changed anything. None of them allocates outside Lua's heap: a
 * string too long for the stack buffer is read into a Lua userdata, which an error (out of
 * memory, say) cannot leak. */
#include "mg_lua_shared.h"

#include <math.h>
#include <string.h>

#include <lauxlib.h>

/* Registry key (its address) of the dictionaries' metatable. */
static const char dict_mt_key;

/* Strings up to this size are read into a buffer on the C stack. */
#define GET_STACK_BUF 4096

/* ------------------------------------------------------------------------------------------
 * Argument checks
 * ---------------------------------------------------------------------------------------- */

static void push_dict_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&dict_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* The dictionary a method was called on (argument 1), or raises: the usual mistake is
 * d.get(key), which passes the key as the dictionary. */
static mg_shdict_t *check_dict(lua_State *L, const char *method) {
  mg_shdict_t **p = lua_touserdata(L, 1);
  if (p != NULL && lua_getmetatable(L, 1)) {
    /* Each method holds the metatable as its upvalue (push_or_make_dict_mt). */
    int ours = lua_topointer(L, -1) == lua_topointer(L, lua_upvalueindex(1));
    lua_pop(L, 1);
    if (ours) return *p;
  }
  luaL_argerror(L, 1, lua_pushfstring(L, "not a shared dictionary: call it with a colon, "
                                          "dict:%s(...)", method));
  return NULL;
}

/* The key at IDX: a string of 1 to MG_SHDICT_KEY_MAX bytes (any bytes, NUL included). */
static const char *check_key(lua_State *L, int idx, size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING) {
    luaL_argerror(L, idx,
                  lua_pushfstring(L, "key must be a string, got %s", luaL_typename(L, idx)));
  }
  const char *key = lua_tolstring(L, idx, len);
  if (*len == 0) luaL_argerror(L, idx, "key must not be empty");
  if (*len > MG_SHDICT_KEY_MAX) {
    luaL_argerror(L, idx, lua_pushfstring(L, "key is longer than %d bytes", MG_SHDICT_KEY_MAX));
  }
  return key;
}

/* Fills V from the value at IDX. A nil is accepted only when NIL_OK (set: it deletes);
 * V->type is then MG_SHDICT_NIL. Strings are taken as they are: no number coercion. */
static void check_value(lua_State *L, int idx, int nil_ok, mg_shdict_value_t *v) {
  memset(v, 0, sizeof *v);
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    v->type = MG_SHDICT_STRING;
    v->str = lua_tolstring(L, idx, &v->len);
    return;
  case LUA_TNUMBER:
    v->type = MG_SHDICT_NUMBER;
    v->num = (double)lua_tonumber(L, idx);
    return;
  case LUA_TBOOLEAN:
    v->type = MG_SHDICT_BOOLEAN;
    v->num = lua_toboolean(L, idx) ? 1 : 0;
    return;
  case LUA_TNIL:
  case LUA_TNONE:
    if (nil_ok) {
      v->type = MG_SHDICT_NIL;
      return;
    }
    break;
  default:
    break;
  }
  luaL_argerror(L, idx,
                lua_pushfstring(L, "value must be a string, number or boolean%s, got %s",
                                nil_ok ? " (or nil to delete)" : "", luaL_typename(L, idx)));
}

/* The TTL at IDX in seconds: absent or nil is 0 (never expires). */
static double check_ttl(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return 0;
  if (lua_type(L, idx) != LUA_TNUMBER) {
    luaL_argerror(L, idx, lua_pushfstring(L, "ttl must be a number of seconds, got %s",
                                          luaL_typename(L, idx)));
  }
  double ttl = (double)lua_tonumber(L, idx);
  if (!(ttl >= 0 && ttl <= MG_SHDICT_TTL_MAX)) { /* NaN fails too */
    luaL_argerror(L, idx, "ttl must be a number of seconds from 0 to 1e9");
  }
  return ttl;
}

/* The finite number at IDX named WHAT, or DEF when absent or nil. */
static double opt_finite(lua_State *L, int idx, double def, const char *what) {
  if (lua_isnoneornil(L, idx)) return def;
  if (lua_type(L, idx) != LUA_TNUMBER) {
    luaL_argerror(L, idx,
                  lua_pushfstring(L, "%s must be a number, got %s", what, luaL_typename(L, idx)));
  }
  double x = (double)lua_tonumber(L, idx);
  if (!isfinite(x)) luaL_argerror(L, idx, lua_pushfstring(L, "%s must be a finite number", what));
  return x;
}

/* ------------------------------------------------------------------------------------------
 * Results
 * ---------------------------------------------------------------------------------------- */

/* `nil, "message"` for a negative MG_SHDICT_E_* code. */
static int push_failure(lua_State *L, int rc) {
  lua_pushnil(L);
  lua_pushstring(L, mg_shdict_strerror(rc));
  return 2;
}

static void push_value(lua_State *L, const mg_shdict_value_t *v) {
  switch (v->type) {
  case MG_SHDICT_STRING:
    lua_pushlstring(L, v->str, v->len);
    break;
  case MG_SHDICT_NUMBER:
    lua_pushnumber(L, (lua_Number)v->num);
    break;
  case MG_SHDICT_BOOLEAN:
    lua_pushboolean(L, v->num != 0);
    break;
  default:
    lua_pushnil(L);
    break;
  }
}

/* ------------------------------------------------------------------------------------------
 * Methods
 * ---------------------------------------------------------------------------------------- */

static int l_get(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "get");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  lua_settop(L, 2); /* the key stays anchored below any buffer pushed next */
  char small[GET_STACK_BUF];
  mg_shdict_value_t v;
  int rc = mg_shdict_get(d, key, klen, &v, small, sizeof small);
  /* Too long for the stack: read it again into a buffer of the size it had. Another worker
   * may grow the value in between, so this repeats until the buffer is large enough. */
  while (rc == MG_SHDICT_E_BUFFER) {
    lua_settop(L, 2);
    size_t cap = v.len;
    char *buf = lua_newuserdata(L, cap);
    rc = mg_shdict_get(d, key, klen, &v, buf, cap);
  }
  if (rc < 0) return push_failure(L, rc);
  if (rc == 0) {
    lua_pushnil(L);
    return 1;
  }
  push_value(L, &v);
  return 1;
}

static int l_set(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "set");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  mg_shdict_value_t v;
  check_value(L, 3, 1, &v);
  double ttl = check_ttl(L, 4);
  int rc = v.type == MG_SHDICT_NIL ? mg_shdict_delete(d, key, klen)
                                   : mg_shdict_set(d, key, klen, &v, ttl);
  if (rc < 0) return push_failure(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_add(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "add");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  mg_shdict_value_t v;
  check_value(L, 3, 0, &v);
  double ttl = check_ttl(L, 4);
  int rc = mg_shdict_add(d, key, klen, &v, ttl);
  if (rc < 0) return push_failure(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_incr(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "incr");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  double n = opt_finite(L, 3, 1, "n");
  double init = opt_finite(L, 4, 0, "init");
  double ttl = check_ttl(L, 5);
  double out = 0;
  int rc = mg_shdict_incr(d, key, klen, n, &init, ttl, &out);
  if (rc < 0) return push_failure(L, rc);
  lua_pushnumber(L, (lua_Number)out);
  return 1;
}

static int l_ttl(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "ttl");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  double remaining = 0;
  int rc = mg_shdict_ttl(d, key, klen, &remaining);
  if (rc < 0) return push_failure(L, rc);
  if (rc == 0) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushnumber(L, (lua_Number)remaining);
  return 1;
}

static int l_delete(lua_State *L) {
  mg_shdict_t *d = check_dict(L, "delete");
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  int rc = mg_shdict_delete(d, key, klen);
  if (rc < 0) return push_failure(L, rc);
  lua_pushboolean(L, rc == 1);
  return 1;
}

static int l_tostring(lua_State *L) {
  mg_shdict_t **p = lua_touserdata(L, 1);
  lua_pushfstring(L, "shared dictionary \"%s\"", mg_shdict_name(*p));
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * mg.shared itself
 * ---------------------------------------------------------------------------------------- */

/* __index of the dictionaries table: only names that were not declared get here. */
static int on_unknown(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) {
    return luaL_error(L, "no shared dictionary under a %s key (names are strings)",
                      luaL_typename(L, 2));
  }
  const char *name = lua_tostring(L, 2);
  return luaL_error(L,
                    "no shared dictionary \"%s\" (declare it with shared \"%s\" { size = \"1m\" })",
                    name, name);
}

static int on_assign(lua_State *L) {
  return luaL_error(L, "mg.shared is read-only (declare dictionaries with shared \"NAME\" "
                       "{ size = ... } in the config)");
}

/* Pushes the dictionaries' metatable, making it the first time in this state. */
static void push_or_make_dict_mt(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"get", l_get}, {"set", l_set}, {"add", l_add}, {"incr", l_incr},
    {"ttl", l_ttl}, {"delete", l_delete}, {NULL, NULL},
  };
  push_dict_mt(L);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 3);
  lua_newtable(L);
  for (const luaL_Reg *m = methods; m->name; m++) {  /* check_dict finds the metatable here */
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, m->func, 1);
    lua_setfield(L, -2, m->name);
  }
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_pushlightuserdata(L, (void *)&dict_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

struct reg_ctx {
  mg_shdict_t *const *dicts;
  size_t n;
};

/* Builds mg.shared on the main state; runs under lua_cpcall (any allocation may raise). */
static int register_cb(lua_State *L) {
  struct reg_ctx *c = lua_touserdata(L, 1);
  push_or_make_dict_mt(L);                             /* 2: dictionary metatable */
  lua_createtable(L, 0, (int)c->n);                    /* 3: the dictionaries by name */
  for (size_t i = 0; i < c->n; i++) {
    mg_shdict_t **p = lua_newuserdata(L, sizeof *p);
    *p = c->dicts[i];
    lua_pushvalue(L, 2);
    lua_setmetatable(L, -2);
    lua_setfield(L, 3, mg_shdict_name(c->dicts[i]));
  }
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, on_unknown);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, 3);
  lua_newtable(L);                                     /* 4: mg.shared, an empty proxy */
  lua_createtable(L, 0, 3);
  lua_pushvalue(L, 3);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, on_assign);
  lua_setfield(L, -2, "__newindex");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_setmetatable(L, 4);
  lua_getglobal(L, "mg"); /* the main state's globals are the sandbox's base table */
  if (!lua_istable(L, -1)) return luaL_error(L, "no mg table in the VM");
  lua_pushvalue(L, 4);
  lua_setfield(L, -2, "shared");
  return 0;
}

int mg_lua_shared_register(mg_lua_vm_t *vm, mg_shdict_t *const *dicts, size_t n) {
  lua_State *L = mg_lua_vm_state(vm);
  struct reg_ctx c = {dicts, n};
  if (lua_cpcall(L, register_cb, &c) != 0) {
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}
