/* mg_task: Lua coroutines driven by the C loop (see mg_task.h). */
#include "mg_task.h"

#include <lauxlib.h>

static mg_task_t *current_task;

const char *mg_hook_name(int hook) {
  static const char *const names[MG_HOOK_COUNT] = {"request", "access", "handler", "response",
                                                   "log", "timer", "body filter"};
  return hook >= 0 && hook < MG_HOOK_COUNT ? names[hook] : "?";
}

mg_task_t *mg_task_current(void) { return current_task; }

mg_task_t *mg_task_enter(mg_task_t *t) {
  mg_task_t *prev = current_task;
  current_task = t;
  return prev;
}

mg_task_t *mg_task_check(lua_State *L, const char *fname, unsigned allowed) {
  mg_task_t *t = current_task;
  if (t == NULL) {
    luaL_error(L, "%s can only be called from a hook or a timer, not while the config loads",
               fname);
    return NULL;
  }
  if (!(allowed & (1u << t->hook))) {
    luaL_error(L, "%s cannot be called in the %s hook", fname, mg_hook_name(t->hook));
    return NULL;
  }
  return t;
}

int mg_task_is_io_yield(lua_State *co, int nvalues) {
  if (nvalues != 1 || lua_type(co, -1) != LUA_TLIGHTUSERDATA) return 0;
  mg_lua_vm_push_io_marker(co);
  int same = lua_rawequal(co, -1, -2);
  lua_pop(co, 1);
  return same;
}

int mg_task_wait(lua_State *L, mg_task_t *t, void *op, void (*cancel)(void *op)) {
  if (!lua_isyieldable(L)) {
    /* Inside a metamethod, an iterator or table.sort's comparator Lua cannot yield: stop
     * the operation rather than leave it to wake a task that went on. */
    if (cancel) cancel(op);
    return luaL_error(L, "cannot wait for I/O here (inside a metamethod, an iterator or a "
                         "table.sort comparator)");
  }
  t->op = op;
  t->cancel = cancel;
  mg_lua_vm_push_io_marker(L);
  return lua_yield(L, 1);
}

void mg_task_wake(mg_task_t *t, int nresults) {
  t->op = NULL;
  t->cancel = NULL;
  mg_task_t *prev = mg_task_enter(t);
  mg_lua_status_t st = mg_lua_vm_resume(t->run, nresults);
  mg_task_enter(prev);
  t->resumed(t, st);
}

void mg_task_cancel(mg_task_t *t) {
  if (t->op == NULL) return;
  void *op = t->op;
  void (*cancel)(void *) = t->cancel;
  t->op = NULL;
  t->cancel = NULL;
  if (cancel) cancel(op);
}
