/*
 * lsf_fast.c: the leader's fast path, for LuaJIT's FFI.
 *
 * LuaJIT compiles calls through the FFI into its traces, not calls of
 * lua_CFunctions. The Lua layer reaches the lead through a table of
 * function pointers (core.fast(), a light userdata), so that the module
 * still exports only luaopen_singleflight_core; it takes the payloads of
 * the group's handle and of the running coroutine's guard, which the Lua
 * frame that calls it holds. The finish comes after fn, whose own work
 * (I/O) ends the trace: it runs in the interpreter, where a classic call
 * costs less than an FFI one, so it is a classic function. Anything
 * unusual (a call in flight, a closed group, a guard out of
 * room, out of memory, somebody waiting at the end) is declined with
 * nothing changed, and the Lua layer goes the classic way, which handles
 * it and says what went wrong.
 */
#include "lsf.h"

/*
 * Leads key for the guard's coroutine if no call for it is in flight:
 * the call goes on the guard (which holds the leader's reference) and its
 * address into *addr; returns 0. Otherwise returns -1, nothing done.
 */
static int fast_lead(const lsf_group *ug, const char *key, size_t len,
                     lsf_guard *gd, unsigned flags, uintptr_t *addr) {
  sf_call *c;
  if (ug->tag != &lsf_group_tag || !ug->g || gd->height == gd->cap)
    return -1;
  flags = (flags & ACQ_COUNT) ? SF_ACQ_COUNT_CALL : 0;
  if (sf_acquire(ug->g, key, len, gd->domain, gd->id,
                 flags | SF_ACQ_LEAD_ONLY, &c) != SF_LEADER)
    return -1;
  lsf_guard_push(gd, c);
  *addr = (uintptr_t)c;
  return 0;
}

/*
 * The guard's lead of the call at addr ends with fn's results, nobody
 * waiting: returns whether anyone joined (0 or 1), the call finished and
 * off the guard. -1: somebody waits (or the call is not on the guard),
 * nothing done. The address is only compared with the guard's calls,
 * never followed unless it is one of them.
 */
static int fast_finish(lsf_guard *gd, uintptr_t addr) {
  int i = lsf_guard_find(gd, addr), shared;
  if (i < 0 || sf_finish_alone(gd->stack[i], 0, &shared) != 0)
    return -1;
  lsf_guard_pop(gd, gd->stack[i]);
  return shared;
}

static lsf_fast_api fast_api = {fast_lead};

/* fast() -> the API (a light userdata), the guards table, the groups'
 * metatable: what the FFI path needs to reach and to check. */
static int lsf_fast(lua_State *L) {
  lua_pushlightuserdata(L, &fast_api);
  lua_pushvalue(L, UV_GUARDS);
  lua_pushvalue(L, UV_GROUP_MT);
  return 3;
}

/* call_at(addr) -> the call at addr (a light userdata) that the running
 * coroutine leads, for the classic calls that go on from the fast path. */
static int lsf_call_at(lua_State *L) {
  uintptr_t addr = (uintptr_t)luaL_checknumber(L, 1);
  lsf_guard *gd = lsf_guard_running(L, lsf_ctx_of(L));
  int i = gd ? lsf_guard_find(gd, addr) : -1;
  if (i < 0)
    return luaL_error(L, "singleflight: finish of a call this coroutine does not lead");
  lua_pushlightuserdata(L, gd->stack[i]);
  return 1;
}

/* fast_finish(guard, addr) -> fast_finish's result: the same step as a
 * classic call, which costs LuaJIT's interpreter less than an FFI call
 * (what follows fn often runs interpreted: fn's own I/O ends the trace). */
static int lsf_fast_finish(lua_State *L) {
  lsf_guard *gd = lsf_check_guard(L, 1);
  uintptr_t addr = (uintptr_t)luaL_checknumber(L, 2);
  lua_pushinteger(L, fast_finish(gd, addr));
  return 1;
}

/* own_guard() -> the running coroutine's guard, made if it has none: what
 * the fast path leads with. */
static int lsf_own_guard(lua_State *L) {
  lsf_ctx *cx = lsf_ctx_of(L);
  lsf_guard *gd;
  int spare;
  lua_settop(L, 0);
  lsf_ensure_spares(L, cx);
  gd = lsf_guard_for_acquire(L, cx, &spare); /* pushed unless the main's */
  if (spare && lsf_guard_install(L, gd) != 0)
    return lsf_raise_nomem(L);
  lua_settop(L, 0);
  lua_pushthread(L);
  lua_rawget(L, UV_GUARDS);
  return 1;
}

const luaL_Reg lsf_fast_functions[] = {
  {"own_guard", lsf_own_guard},
  {"fast_finish", lsf_fast_finish},
  {"fast", lsf_fast},
  {"call_at", lsf_call_at},
  {NULL, NULL}
};
