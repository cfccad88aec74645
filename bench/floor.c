/*
 * floor.c: what a C implementation of g:call costs at the least, step by
 * step (Lua 5.3 and later). A test-only module, not installed: its
 * "groups" are bare userdata with a metatable of their own, and each
 * method does one more of the things g:call must do before it runs fn
 * with lua_pcallk:
 *
 *   g:pcallk(key, fn)  a C method that runs fn under lua_pcallk with a
 *                      message handler in slot 1, and returns v, err, false
 *   g:group(key, fn)   + checks that g is one of its userdata (metatable)
 *   g:args(key, fn)    + checks the key (string) and fn (function)
 *   g:thread(key, fn)  + tells the main thread from a coroutine
 *   g:core(key, fn)    + acquire and finish on a private core group
 *
 * bench/lua_bench.lua (mode "floor") times each against pcall(fn).
 */
#include "lua.h"
#include "lauxlib.h"
#include "sf_core.h"

#include <stdint.h>

#if LUA_VERSION_NUM >= 503

enum { STEP_GROUP = 1, STEP_ARGS = 2, STEP_THREAD = 4, STEP_CORE = 8 };

#define UV_MSGH lua_upvalueindex(1)
#define UV_MT lua_upvalueindex(2)
#define UV_CORE lua_upvalueindex(3)

/* After fn: finishes the call riding in the context, if any. */
static int done_k(lua_State *L, int status, lua_KContext ctx) {
  sf_call *c = (sf_call *)ctx;
  (void)status;
  if (c) {
    int shared;
    unsigned nlocal;
    sf_finish(c, 0, &shared, &nlocal);
  }
  lua_pushboolean(L, 0);
  return 3;
}

static int run(lua_State *L, int steps) {
  const char *key = "key";
  size_t len = 3;
  uintptr_t owner = 1;
  sf_call *c = NULL;
  if (steps & STEP_GROUP) {
    int same = 0;
    if (lua_touserdata(L, 1) && lua_getmetatable(L, 1)) {
      same = lua_rawequal(L, -1, UV_MT);
      lua_pop(L, 1);
    }
    if (!same)
      return luaL_argerror(L, 1, "group expected");
  }
  if (steps & STEP_ARGS) {
    if (lua_type(L, 2) != LUA_TSTRING)
      return luaL_argerror(L, 2, "string expected");
    key = lua_tolstring(L, 2, &len);
    if (lua_type(L, 3) != LUA_TFUNCTION)
      return luaL_argerror(L, 3, "function expected");
  }
  if (steps & STEP_THREAD) {
    owner = lua_pushthread(L) ? 1 : 2;
    lua_pop(L, 1);
  }
  if (steps & STEP_CORE) {
    sf_group *g = *(sf_group **)lua_touserdata(L, UV_CORE);
    if (sf_acquire(g, key, len, 1, owner, SF_ACQ_COUNT_CALL, &c) != SF_LEADER)
      return luaL_error(L, "expected to lead");
  }
  lua_pushvalue(L, UV_MSGH);
  lua_replace(L, 1);
  return done_k(L,
                lua_pcallk(L, lua_gettop(L) - 3, 2, 1, (lua_KContext)c, done_k),
                (lua_KContext)c);
}

static int f_pcallk(lua_State *L) { return run(L, 0); }
static int f_group(lua_State *L) { return run(L, STEP_GROUP); }
static int f_args(lua_State *L) { return run(L, STEP_GROUP | STEP_ARGS); }
static int f_thread(lua_State *L) {
  return run(L, STEP_GROUP | STEP_ARGS | STEP_THREAD);
}
static int f_core(lua_State *L) {
  return run(L, STEP_GROUP | STEP_ARGS | STEP_THREAD | STEP_CORE);
}

static int f_new(lua_State *L) {
  lua_newuserdata(L, sizeof(void *));
  lua_pushvalue(L, UV_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* The message handler: never called here (fn does not raise); only its
 * place in slot 1 costs. */
static int f_msgh(lua_State *L) {
  (void)L;
  return 1;
}

static int f_gc(lua_State *L) {
  sf_group **pg = (sf_group **)lua_touserdata(L, 1);
  if (*pg) {
    sf_group_release(*pg);
    *pg = NULL;
  }
  return 0;
}

LUALIB_API int luaopen_floor(lua_State *L);

LUALIB_API int luaopen_floor(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"pcallk", f_pcallk}, {"group", f_group}, {"args", f_args},
    {"thread", f_thread}, {"core", f_core}, {"new", f_new}, {NULL, NULL}
  };
  sf_group **pg;
  lua_settop(L, 0);
  lua_pushcfunction(L, f_msgh); /* 1 */
  lua_newtable(L); /* 2: the metatable, also the method table */
  pg = (sf_group **)lua_newuserdata(L, sizeof *pg); /* 3: the core group */
  *pg = sf_group_new(SF_SINGLE_THREAD);
  if (!*pg)
    return luaL_error(L, "not enough memory");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, f_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, 3);
  lua_pushvalue(L, 2); /* 4: the table to fill */
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  luaL_setfuncs(L, methods, 3);
  lua_pushvalue(L, 2);
  lua_setfield(L, 2, "__index");
  return 1;
}

#else /* no lua_pcallk (5.1), or an int context (5.2) */

LUALIB_API int luaopen_floor(lua_State *L);

LUALIB_API int luaopen_floor(lua_State *L) {
  return luaL_error(L, "floor needs Lua 5.3 or later");
}

#endif
