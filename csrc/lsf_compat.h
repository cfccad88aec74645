/*
 * lsf_compat.h: the differences between Lua 5.1 (and LuaJIT), 5.2, 5.3 and
 * 5.4 that the binding meets, in one place.
 */
#ifndef LSF_COMPAT_H
#define LSF_COMPAT_H

#include "lua.h"
#include "lauxlib.h"

#if LUA_VERSION_NUM < 502
/* 5.1 and LuaJIT */
#define LSF_HAVE_PCALLK 0
#define lua_rawlen(L, i) lua_objlen((L), (i))
#define lua_setuservalue(L, i) lua_setfenv((L), (i))
#define lua_getuservalue(L, i) lua_getfenv((L), (i))
static void lsf_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  luaL_checkstack(L, nup, "too many upvalues");
  for (; l->name; l++) {
    int i;
    for (i = 0; i < nup; i++)
      lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
#define luaL_setfuncs(L, l, n) lsf_setfuncs((L), (l), (n))
#else
#define LSF_HAVE_PCALLK 1
#endif

#if LUA_VERSION_NUM == 502
typedef int lua_KContext;
#define LSF_KFUNC(name) \
  static int name##_(lua_State *L, int status, lua_KContext ctx); \
  static int name(lua_State *L) { \
    int ctx = 0; \
    int status = lua_getctx(L, &ctx); \
    return name##_(L, status, ctx); \
  } \
  static int name##_(lua_State *L, int status, lua_KContext ctx)
#define LSF_K(name) name
#define LSF_KCALL(name, L, status, ctx) name##_((L), (status), (ctx))
#elif LUA_VERSION_NUM >= 503
#define LSF_KFUNC(name) static int name(lua_State *L, int status, lua_KContext ctx)
#define LSF_K(name) name
#define LSF_KCALL(name, L, status, ctx) name((L), (status), (ctx))
#endif

#if LUA_VERSION_NUM >= 503
#define LSF_HAVE_INTEGERS 1
#else
#define LSF_HAVE_INTEGERS 0
#endif

#if LUA_VERSION_NUM >= 504
#define LSF_HAVE_TOCLOSE 1
#else
#define LSF_HAVE_TOCLOSE 0
#endif

#if LSF_HAVE_PCALLK
/* Moves the top n values to index idx, shifting the rest up. */
static void lsf_insertn(lua_State *L, int idx, int n) {
#if LUA_VERSION_NUM >= 503
  lua_rotate(L, idx, n);
#else
  int i;
  for (i = 0; i < n; i++) /* each insert puts the next one in front */
    lua_insert(L, idx);
#endif
}
#endif

#endif
