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
#define lsf_rawlen(L, i) lua_objlen((L), (i))
#define lsf_setuservalue(L, i) lua_setfenv((L), (i))
#define lsf_getuservalue(L, i) lua_getfenv((L), (i))
#define LSF_HAVE_PCALLK 0
#define lua_absindex(L, i) \
  ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
static inline void lsf_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
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
/* tostring(v) as 5.2's luaL_tolstring: __tostring, or a default text */
static inline const char *lsf_tolstring(lua_State *L, int idx, size_t *len) {
  if (!luaL_callmeta(L, idx, "__tostring")) {
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
    case LUA_TSTRING:
      lua_pushvalue(L, idx);
      break;
    case LUA_TBOOLEAN:
      lua_pushstring(L, lua_toboolean(L, idx) ? "true" : "false");
      break;
    case LUA_TNIL:
      lua_pushliteral(L, "nil");
      break;
    default:
      lua_pushfstring(L, "%s: %p", luaL_typename(L, idx),
                      lua_topointer(L, idx));
      break;
    }
  }
  return lua_tolstring(L, -1, len);
}
#define luaL_tolstring(L, i, len) lsf_tolstring((L), (i), (len))
#endif

#if LUA_VERSION_NUM >= 504
#define lsf_setuservalue(L, i) lua_setiuservalue((L), (i), 1)
#define lsf_getuservalue(L, i) lua_getiuservalue((L), (i), 1)
#elif LUA_VERSION_NUM >= 502
#define lsf_setuservalue(L, i) lua_setuservalue((L), (i))
#define lsf_getuservalue(L, i) lua_getuservalue((L), (i))
#endif

#if LUA_VERSION_NUM >= 502
#define lsf_rawlen(L, i) lua_rawlen((L), (i))
#define LSF_HAVE_PCALLK 1
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


#endif
