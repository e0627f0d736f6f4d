/* mg_lua_aggregate: loads lua/moongate/aggregate.lua into a VM and sets mg.aggregate.
 *
 * The module is trusted code but it runs in the sandbox like a user's script: it is loaded
 * with mg_lua_vm_load, so it gets a fresh environment whose globals read through to the
 * sandbox base (where `mg` lives) and its functions run under the budget of the hook that
 * calls them. It looks mg.fetch_all up at call time, so the order in which the mg API is
 * registered does not matter.
 *
 * Where the text comes from, as for config.lua (src/mg_config.c): $MOONGATE_LUA_DIR when that
 * variable is set; else the source tree's copy (MG_LUA_DIR, set by the Makefile) when it is
 * readable, so a developer's edit takes effect without a rebuild; else the copy embedded in
 * the binary at build time. Reading a file here blocks, which is fine: this runs once per VM,
 * while the worker starts, before its loop serves anything. */
#include "mg_lua_aggregate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "mg_log.h"
#include "mg_lua_fetch.h"
#include "mg_request.h"
#include "mg_task.h"

#define AGGREGATE_LUA "/moongate/aggregate.lua"

/* The chunk name, as it appears in error messages and tracebacks. */
#define AGGREGATE_CHUNK "moongate/aggregate.lua"

/* The largest module file read from disk; the real one is about 20 KiB. */
#define AGGREGATE_MAX_SIZE (1024 * 1024)

#ifdef MG_LUA_DIR
/* The embedded copy. .incbin reads the file when this object is assembled; the Makefile
 * makes this object depend on aggregate.lua, so an edit rebuilds it. */
__asm__(".pushsection .rodata\n"
        ".balign 16\n"
        ".globl mg_aggregate_lua_start\n"
        ".hidden mg_aggregate_lua_start\n"
        "mg_aggregate_lua_start:\n"
        ".incbin \"" MG_LUA_DIR AGGREGATE_LUA "\"\n"
        ".globl mg_aggregate_lua_end\n"
        ".hidden mg_aggregate_lua_end\n"
        "mg_aggregate_lua_end:\n"
        ".popsection\n");
extern const char mg_aggregate_lua_start[] __attribute__((visibility("hidden")));
extern const char mg_aggregate_lua_end[] __attribute__((visibility("hidden")));
#endif

/* Reads PATH into a malloc'd buffer (the caller frees it) and sets *LEN. Returns NULL with a
 * message in ERR when it cannot be read or is larger than AGGREGATE_MAX_SIZE. */
static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    snprintf(err, errlen, "cannot open %s", path);
    return NULL;
  }
  char *buf = malloc(AGGREGATE_MAX_SIZE + 1);
  size_t n = buf != NULL ? fread(buf, 1, AGGREGATE_MAX_SIZE + 1, f) : 0;
  int failed = buf == NULL || ferror(f) || n > AGGREGATE_MAX_SIZE;
  fclose(f);
  if (failed) {
    snprintf(err, errlen, "cannot read %s%s", path,
             buf != NULL && n > AGGREGATE_MAX_SIZE ? " (larger than 1 MiB)" : "");
    free(buf);
    return NULL;
  }
  *len = n;
  return buf;
}

/* current_request_id() -> the id of the request whose hook is running, or nil. */
static int l_current_request_id(lua_State *L) {
  mg_task_t *t = mg_task_current();
  if (t == NULL || t->req == NULL) return 0;
  lua_pushstring(L, t->req->id);
  return 1;
}

/* mg.aggregate = the value of registry reference *REF; runs under lua_cpcall. The main
 * state's globals are the sandbox base (mg_lua_vm.c), where `mg` lives. The module's own
 * environment (that of M.run) gets current_request_id, for the gateway's error shape, and
 * fetch_raw_for (mg_lua_fetch.h), for the pass-through of nest mode. */
static int set_field_cb(lua_State *L) {
  const int *ref = lua_touserdata(L, 1);
  lua_getfield(L, LUA_GLOBALSINDEX, "mg");
  if (!lua_istable(L, -1)) return luaL_error(L, "the sandbox has no mg table");
  lua_rawgeti(L, LUA_REGISTRYINDEX, *ref);
  lua_getfield(L, -1, "run");
  if (lua_isfunction(L, -1)) {
    lua_getfenv(L, -1);
    lua_pushliteral(L, "current_request_id");
    lua_pushcfunction(L, l_current_request_id);
    lua_rawset(L, -3);
    lua_pushliteral(L, "fetch_raw_for");
    lua_pushcfunction(L, mg_lua_fetch_raw_for);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "aggregate");
  return 0;
}

/* Loads TEXT as the module and sets mg.aggregate. Returns 0, or -1 with a message in ERR. */
static int install(mg_lua_vm_t *vm, const char *text, size_t len, char *err, size_t errlen) {
  int ref = mg_lua_vm_load(vm, AGGREGATE_CHUNK, text, len, err, errlen);
  if (ref < 0) return -1;
  lua_State *L = mg_lua_vm_state(vm);
  int rc = 0;
  if (lua_cpcall(L, set_field_cb, &ref) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    rc = -1;
  }
  /* mg.aggregate now holds the module; the reference is no longer needed. */
  mg_lua_vm_unref(vm, ref);
  return rc;
}

int mg_lua_aggregate_register(mg_lua_vm_t *vm) {
  char path[4096];
  char err[sizeof(path) + 256]; /* room for a whole path in a message */
  err[0] = '\0';
  const char *file = NULL;
  const char *dir = getenv("MOONGATE_LUA_DIR");
  if (dir != NULL && *dir != '\0') {
    if ((size_t)snprintf(path, sizeof(path), "%s" AGGREGATE_LUA, dir) >= sizeof(path)) {
      mg_log_error("mg.aggregate: MOONGATE_LUA_DIR is too long");
      return -1;
    }
    file = path;
  }
#ifdef MG_LUA_DIR
  else if (access(MG_LUA_DIR AGGREGATE_LUA, R_OK) == 0) {
    file = MG_LUA_DIR AGGREGATE_LUA;
  }
#endif

  int rc;
  if (file != NULL) {
    size_t len = 0;
    char *text = read_file(file, &len, err, sizeof(err));
    rc = text != NULL ? install(vm, text, len, err, sizeof(err)) : -1;
    free(text);
  } else {
#ifdef MG_LUA_DIR
    rc = install(vm, mg_aggregate_lua_start,
                 (size_t)(mg_aggregate_lua_end - mg_aggregate_lua_start), err, sizeof(err));
#else
    snprintf(err, sizeof(err), "MOONGATE_LUA_DIR is not set and no copy is built in");
    rc = -1;
#endif
  }
  if (rc != 0) mg_log_error("mg.aggregate: %s", err);
  return rc;
}
