/*
 * lsf.c: the Lua binding of the singleflight core, module singleflight.core.
 *
 * Groups (singleflight.Group) and the primitives the Lua layer drives one
 * call with: acquire, finish, wait and the rest. Each returns a status the
 * Lua layer acts on; none calls into the Lua layer. The holders of calls
 * are in lsf_hold.c, the value copier in lsf_copy.c.
 */
#include "lsf.h"

#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char lsf_group_tag = 0;

lsf_ctx *lsf_ctx_of(lua_State *L) {
  return (lsf_ctx *)lua_touserdata(L, UV_CTX);
}

int lsf_raise_nomem(lua_State *L) {
  lua_pushliteral(L, "singleflight: not enough memory");
  return lua_error(L);
}

/* ---- messages ---- */

/* Pushes s quoted for a message: printable bytes as they are, the rest
 * escaped, long strings cut short. */
void lsf_push_quoted(lua_State *L, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  luaL_Buffer b;
  size_t i, shown = len > 64 ? 64 : len;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '"');
  for (i = 0; i < shown; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\') {
      luaL_addchar(&b, '\\');
      luaL_addchar(&b, (char)ch);
    } else if (ch >= 32 && ch < 127) {
      luaL_addchar(&b, (char)ch);
    } else {
      char esc[4];
      esc[0] = '\\';
      esc[1] = 'x';
      esc[2] = hex[ch >> 4];
      esc[3] = hex[ch & 15];
      luaL_addlstring(&b, esc, 4);
    }
  }
  luaL_addchar(&b, '"');
  if (shown < len) {
    lua_pushfstring(L, "... (%d bytes)", (int)len);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
}

/* Raises "bad argument #arg to 'fname' (msg)", blaming the caller of the
 * Lua function that called us (level 2) or, for a method written here,
 * its own caller (level 1). arg 0 is the group, which the message calls
 * #1 as Lua's own checks do for a function called with a dot. */
static int arg_error(lua_State *L, int level, int arg, const char *fname,
                     const char *msg) {
  luaL_where(L, level);
  lua_pushfstring(L, "bad argument #%d to '%s' (%s)", arg ? arg : 1, fname,
                  msg);
  lua_concat(L, 2);
  return lua_error(L);
}

static int type_error(lua_State *L, int level, int idx, int arg,
                      const char *fname, const char *expected) {
  const char *msg = lua_pushfstring(L, "%s expected, got %s", expected,
                                    luaL_typename(L, idx));
  return arg_error(L, level, arg, fname, msg);
}

static lsf_group *test_group(lua_State *L, int idx) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
    int same = lua_rawequal(L, -1, UV_GROUP_MT) ||
               lua_rawequal(L, -1, UV_TIERED_MT);
    lua_pop(L, 1);
    if (same)
      return (lsf_group *)p;
  }
  return NULL;
}

/* The open group at idx; errors name fname and blame `level`. */
static sf_group *check_group(lua_State *L, int idx, int level,
                             const char *fname) {
  lsf_group *ug = test_group(L, idx);
  if (!ug)
    type_error(L, level, idx, 0, fname, GROUP_MT);
  if (!ug->g) {
    luaL_where(L, level);
    lua_pushfstring(L, "singleflight: attempt to use a closed group (in '%s')",
                    fname);
    lua_concat(L, 2);
    lua_error(L);
  }
  return ug->g;
}

/* ---- keys ---- */

/* A number as the shortest text that reads back as the same number; an
 * integral one as an integer, so that 1, 1.0 and "1" are one key; +-inf as
 * "1e9999" and "-1e9999", the literals Lua's own string.format("%q") writes
 * for them (tonumber reads them back as +-inf on every Lua; "inf" stays a
 * string of its own). NaN is no key, as it is no table index: 0 returned,
 * nothing pushed. */
static int push_number_key(lua_State *L, int idx) {
  char buf[64];
  lua_Number d;
#if LSF_HAVE_INTEGERS
  if (lua_isinteger(L, idx)) {
    lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, idx));
    return 1;
  }
#endif
  d = lua_tonumber(L, idx);
  if (d != d)
    return 0;
  if (d >= -9223372036854775808.0 && d < 9223372036854775808.0 &&
      d == (lua_Number)(long long)d) {
    snprintf(buf, sizeof buf, "%lld", (long long)d);
  } else if (d > DBL_MAX || d < -DBL_MAX) {
    snprintf(buf, sizeof buf, "%s", d > 0 ? "1e9999" : "-1e9999");
  } else {
    int prec;
    for (prec = 15; prec <= 17; prec++) {
      snprintf(buf, sizeof buf, "%.*g", prec, (double)d);
      if (strtod(buf, NULL) == (double)d)
        break;
    }
  }
  lua_pushstring(L, buf);
  return 1;
}

/* The key at idx as bytes; a number is replaced in place by its text. */
static const char *check_key(lua_State *L, int idx, size_t *len, int level,
                             int arg, const char *fname) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    return lua_tolstring(L, idx, len);
  case LUA_TNUMBER:
    if (!push_number_key(L, idx))
      arg_error(L, level, arg, fname, "key is NaN");
    lua_replace(L, idx);
    return lua_tolstring(L, idx, len);
  default:
    type_error(L, level, idx, arg, fname, "string or number");
    return NULL;
  }
}

/* A function, or a value whose __call is a function. */
static void check_fn(lua_State *L, int idx, int level, int arg,
                     const char *fname) {
  if (lua_type(L, idx) == LUA_TFUNCTION)
    return;
  if (luaL_getmetafield(L, idx, "__call")) {
    int ok = lua_type(L, -1) == LUA_TFUNCTION;
    lua_pop(L, 1);
    if (ok)
      return;
  }
  type_error(L, level, idx, arg, fname, "function or callable value");
}

/* ---- groups ---- */

/*
 * A named group holds some kilobytes of C memory behind a small handle.
 * The collector is told of those of handles left open, by the work it
 * would do had this state allocated them, so that handles dropped without
 * close are collected, and their groups freed, at the pace of their real
 * size: once GC_OWED_STEP are owed, in one step (a step of a few
 * kilobytes is worth next to nothing on Lua 5.2, and two in a row end its
 * work). A handle closed settles its share: opening and closing groups,
 * however many others live, asks the collector for nothing (a step costs
 * the more the larger the heap on Lua 5.1 and LuaJIT, whose step runs
 * until that much memory was freed).
 */
#define GC_OWED_STEP (16 * 1024)
/* How many kilobytes of a step are worth one owed: "the step 'size' is
 * controlled by data in a non-specified way" (the manual); Lua 5.2's
 * step takes off a fixed amount first, and falls behind without more. */
#if LUA_VERSION_NUM == 502
#define GC_STEP_KB 4
#else
#define GC_STEP_KB 1
#endif

static void gc_owe(lua_State *L, size_t bytes) {
  lsf_ctx *cx = lsf_ctx_of(L);
  cx->gc_owed += bytes;
  if (cx->gc_owed >= GC_OWED_STEP) {
    int kb = (int)(cx->gc_owed / 1024) * GC_STEP_KB;
    cx->gc_owed = 0;
    lua_gc(L, LUA_GCSTEP, kb);
  }
}

static void gc_settle(lua_State *L, size_t bytes) {
  lsf_ctx *cx = lsf_ctx_of(L);
  cx->gc_owed = cx->gc_owed > bytes ? cx->gc_owed - bytes : 0;
}

/* handle(group) -> the group's handle, protected: a memory error gives
 * the group back. */
static int push_group_protected(lua_State *L) {
  sf_group *g = (sf_group *)lua_touserdata(L, 1);
  lsf_group *ug = (lsf_group *)lua_newuserdata(L, sizeof *ug);
#if LUA_VERSION_NUM < 502
  lua_newtable(L); /* no options yet: on 5.1 an env must be a table */
#else
  lua_pushnil(L); /* no options yet */
#endif
  lsf_setuservalue(L, -2);
  ug->tag = &lsf_group_tag;
  ug->owed = 0;
  ug->g = NULL;
  luaL_getmetatable(L, GROUP_MT);
  lua_setmetatable(L, -2);
  ug->g = g;
  return 1;
}

static int push_group(lua_State *L, sf_group *g) {
  if (!g)
    return lsf_raise_nomem(L);
  lua_pushcfunction(L, push_group_protected);
  lua_pushlightuserdata(L, g);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    sf_group_release(g);
    return lua_error(L);
  }
  if (sf_group_name(g, NULL)) {
    lsf_group *ug = (lsf_group *)lua_touserdata(L, -1);
    ug->owed = sf_group_footprint(g);
    gc_owe(L, ug->owed);
  }
  return 1;
}

static int lsf_new(lua_State *L) {
  return push_group(L, sf_group_new(SF_SINGLE_THREAD));
}

static int lsf_open(lua_State *L) {
  size_t len;
  const char *name;
  if (lua_type(L, 1) != LUA_TSTRING)
    type_error(L, 2, 1, 1, "group", "string");
  name = lua_tolstring(L, 1, &len);
  return push_group(L, sf_group_open(name, len));
}

/* Lets go of the handle's group; `closed`: by close (or __close), not by
 * the collector, which was asked for the work of collecting it already. */
static int group_let_go(lua_State *L, int closed) {
  lsf_group *ug = test_group(L, 1);
  if (!ug)
    return type_error(L, 1, 1, 0, "close", GROUP_MT);
  if (ug->g) {
    sf_group *g = ug->g;
    ug->g = NULL;
    if (closed)
      gc_settle(L, ug->owed);
    sf_group_release(g);
  }
  return 0;
}

/*
 * joinable: the Lua layer's same-state duplicates meet in Lua, not here.
 * For a group private to this state, the Lua layer registers the flight
 * of a call that others wait on under the group's handle and the key
 * (UV_JOINABLE), and later duplicates of that key in this state wait in
 * it without crossing into C; the flight holds one joiner's reference on
 * the call for all of them, given back once the call is done or gone. A
 * forget of the key and the handle's close take the registration away
 * here, so that later callers come here again.
 */
static void unregister(lua_State *L, int handle, int key) {
  lua_pushvalue(L, handle);
  if (key) {
    lua_rawget(L, UV_JOINABLE);
    if (lua_istable(L, -1)) {
      lua_pushvalue(L, key);
      lua_pushnil(L);
      lua_rawset(L, -3); /* clearing a field never allocates */
    }
    lua_pop(L, 1);
  } else {
    lua_pushnil(L);
    lua_rawset(L, UV_JOINABLE);
  }
}

static int lsf__group_gc(lua_State *L) {
  return group_let_go(L, 0);
}

static int lsf__group_close(lua_State *L) {
  if (test_group(L, 1))
    unregister(L, 1, 0);
  return group_let_go(L, 1);
}

static int lsf__group_tostring(lua_State *L) {
  lsf_group *ug = test_group(L, 1);
  if (!ug)
    return type_error(L, 1, 1, 0, "__tostring", GROUP_MT);
  if (!ug->g) {
    lua_pushliteral(L, "singleflight.Group (closed)");
  } else {
    size_t len;
    const char *name = sf_group_name(ug->g, &len);
    if (name) {
      lua_pushliteral(L, "singleflight.Group ");
      lsf_push_quoted(L, name, len);
      lua_pushfstring(L, " (%p)", (void *)ug);
      lua_concat(L, 3);
    } else {
      lua_pushfstring(L, "singleflight.Group (%p)", (void *)ug);
    }
  }
  return 1;
}

static int lsf_forget(lua_State *L) {
  sf_group *g = check_group(L, 1, 1, "forget");
  size_t len;
  const char *key = check_key(L, 2, &len, 1, 1, "forget");
  unregister(L, 1, 2);
  lua_pushboolean(L, sf_forget(g, key, len));
  return 1;
}

/* current(g, key) -> the call in flight for key (a light userdata, only to
 * be compared: see flow.lua, answer), or nil. */
static int lsf_current(lua_State *L) {
  sf_group *g = check_group(L, 1, 1, "current");
  size_t len;
  const char *key = check_key(L, 2, &len, 1, 1, "current");
  sf_call *c = sf_find(g, key, len);
  if (c)
    lua_pushlightuserdata(L, c);
  else
    lua_pushnil(L);
  return 1;
}

/* tally(g, calls, shared): same-state duplicates that met in the Lua
 * layer, counted; nothing for a closed handle. Allocates nothing and never
 * raises (it runs in finalizers). */
static int lsf_tally(lua_State *L) {
  lsf_group *ug = test_group(L, 1);
  lua_Number calls = lua_tonumber(L, 2), shared = lua_tonumber(L, 3);
  if (ug && ug->g) {
    if (calls >= 1)
      sf_count_n(ug->g, SF_STAT_CALLS, (uint64_t)calls);
    if (shared >= 1)
      sf_count_n(ug->g, SF_STAT_SHARED, (uint64_t)shared);
  }
  return 0;
}

static const char *const stat_names[SF_STAT_COUNT] = {
  "calls", "executions", "shared", "panics",
  "timeouts", "abandoned", "forgotten"
};

static void push_count(lua_State *L, uint64_t n) {
#if LSF_HAVE_INTEGERS
  lua_pushinteger(L, (lua_Integer)n);
#else
  lua_pushnumber(L, (lua_Number)n);
#endif
}

static int lsf_stats(lua_State *L) {
  sf_group *g = check_group(L, 1, 1, "stats");
  sf_stats st;
  int k;
  sf_stats_get(g, &st);
  lua_createtable(L, 0, SF_STAT_COUNT + 1);
  push_count(L, st.inflight);
  lua_setfield(L, -2, "inflight");
  for (k = 0; k < SF_STAT_COUNT; k++) {
    push_count(L, st.count[k]);
    lua_setfield(L, -2, stat_names[k]);
  }
  return 1;
}

/* count(g, name): one more event the core does not see by itself (a
 * caller that gave up waiting and runs fn itself). */
static int lsf_count(lua_State *L) {
  sf_group *g = check_group(L, 1, 2, "count");
  const char *name = luaL_checkstring(L, 2);
  int k;
  for (k = 0; k < SF_STAT_COUNT; k++) {
    if (strcmp(name, stat_names[k]) == 0) {
      sf_count(g, k);
      return 0;
    }
  }
  return luaL_argerror(L, 2, "unknown counter");
}

/* ---- one call ---- */

/*
 * Statuses, as the Lua layer sees them:
 *   acquire(g, key, fn, fname, flags) -> status, ...
 *     LEADER    0, call, guard|false, key   the running coroutine leads
 *               (false: the main thread): run fn, then finish(call, ...)
 *     LEADER    0, call, ref, key, opts          (ACQ_DETACHED) the ref
 *               holds the leader's reference until a light thread adopts it
 *     JOINED    1, call, ref, key, opts   a same-state joiner's reference
 *     FOREIGN   2, call, ref, key, opts   led in another state: wait(ref)
 *     ABSENT    3, nil, nil, key    (ACQ_CHECK) the arguments are good
 *     RECURSIVE 5, call, guard|false, key, opts   the running coroutine
 *               leads the key already (unless that lead is stale: see
 *               flow.lua)
 *   opts: the handle's options table, or false (see options()).
 *   run(g, key, fn, ...), rerun(...) and lead(call, key, fn, ...) (5.2 and
 *   later: acquire, fn run protected, finish, in one trip) -> one of the
 *   above but LEADER, or
 *     DONE      0, v, err, shared    nobody in this state waits
 *     DELIVER   7, v, err, shared, call   same-state waiters to wake
 *     PANICKED  6, value, traceback, call|nil, key   fn raised; call is
 *               given when same-state waiters are to be told
 *     DONE_GONE 9, v, err, shared, call      the call had expired (max_age):
 *     PANICKED_GONE 10, value, traceback, call, key   the result is the
 *               leader's, and answers the waiters of the key's call now
 *               in flight; same-state waiters of this one take over (the
 *               call is given whether any is left or not)
 * Bad arguments (naming fname) and memory errors raise, having changed
 * nothing.
 */
enum {
  ST_LEADER = 0,
  ST_DONE = 0,
  ST_JOINED = 1,
  ST_FOREIGN = 2,
  ST_ABSENT = 3,
  ST_RECURSIVE = 5,
  ST_PANICKED = 6,
  ST_DELIVER = 7,
  ST_DONE_GONE = 9,
  ST_PANICKED_GONE = 10
};

/* The statuses by name: the module exports them as core.ST, which the Lua
 * layer reads (it writes no number of its own). */
static const struct {
  const char *name;
  int value;
} statuses[] = {
  {"LEADER", ST_LEADER},       {"DONE", ST_DONE},
  {"JOINED", ST_JOINED},       {"FOREIGN", ST_FOREIGN},
  {"ABSENT", ST_ABSENT},       {"RECURSIVE", ST_RECURSIVE},
  {"PANICKED", ST_PANICKED},   {"DELIVER", ST_DELIVER},
  {"DONE_GONE", ST_DONE_GONE},
  {"PANICKED_GONE", ST_PANICKED_GONE},
  {NULL, 0}
};

/* Pushes the options of the handle at idx (a group), or `none` (nil or
 * false). */
static void push_options(lua_State *L, int idx, int none) {
  lsf_getuservalue(L, idx);
  if (lua_type(L, -1) == LUA_TTABLE) {
#if LUA_VERSION_NUM < 502
    lua_pushnil(L);
    if (lua_next(L, -2)) { /* not empty (an empty one: the stand-in) */
      lua_pop(L, 2);
      return;
    }
#else
    return;
#endif
  }
  lua_pop(L, 1);
  if (none)
    lua_pushboolean(L, 0);
  else
    lua_pushnil(L);
}

/* The group at 1 on the fast path: a tag read instead of a metatable
 * compare; anything unusual goes the long way, for its message. */
static sf_group *fast_group(lua_State *L, const char *fname, int level) {
  lsf_group *ug = (lsf_group *)lua_touserdata(L, 1);
  if (!(ug && lua_type(L, 1) == LUA_TUSERDATA &&
        lsf_rawlen(L, 1) >= sizeof *ug && ug->tag == &lsf_group_tag &&
        ug->g)) {
    check_group(L, 1, level, fname); /* raises */
    ug = test_group(L, 1);
  }
  return ug->g;
}

/* The arguments of acquire and run: group, key (a number replaced by its
 * text), fn. */
static sf_group *check_call_args(lua_State *L, const char *fname,
                                 unsigned flags, const char **key,
                                 size_t *len) {
  int level = (flags & ACQ_DEEPER) ? 3 : 2; /* the caller of call */
  sf_group *g = fast_group(L, fname, level);
  if (lua_type(L, 2) == LUA_TSTRING)
    *key = lua_tolstring(L, 2, len);
  else
    *key = check_key(L, 2, len, level, 1, fname);
  if (lua_type(L, 3) != LUA_TFUNCTION)
    check_fn(L, 3, level, 2, fname);
  return g;
}

/*
 * Acquires the key for the running coroutine. Expects group and key at 1
 * and 2. LEADER: *gdp is the guard, pushed at slot *gslot when it is not
 * the main thread's (else *gslot is 0), and *nret 0; otherwise the values
 * to return are on top, *nret of them.
 */
static int acquire_for(lua_State *L, sf_group *g, const char *key,
                       size_t len, unsigned flags, sf_call **cp,
                       lsf_guard **gdp, int *gslot, int *nret) {
  lsf_ctx *cx = lsf_ctx_of(L);
  lsf_guard *gd;
  sf_call *c = NULL;
  int st, spare, joined = 0, top = lua_gettop(L);

  *nret = 0;
  if (!cx->spare_guard || !cx->spare_ref)
    lsf_ensure_spares(L, cx);
  gd = lsf_guard_for_acquire(L, cx, &spare); /* pushed unless the main's */
  *gslot = lua_gettop(L) > top ? lua_gettop(L) : 0;
  st = sf_acquire(g, key, len, (uintptr_t)cx, gd->id,
                  (flags & ACQ_COUNT) ? SF_ACQ_COUNT_CALL : 0, &c);
  *cp = c;
  *gdp = gd;
  switch (st) {
  case SF_LEADER:
    if (flags & ACQ_DETACHED) { /* the light thread's, once it adopts it */
      lsf_ref *ref;
      sf_set_owner(c, ++cx->next_id);
      ref = lsf_ref_take_spare(L);
      ref->c = c;
      ref->kind = REF_LEADER;
      break;
    }
    if (spare && lsf_guard_install(L, gd) != 0) {
      sf_abandon(c); /* nobody here saw it; other states retry */
      lsf_raise_nomem(L);
    }
    lsf_guard_push(gd, c);
    *nret = 0;
    return SF_LEADER;
  case SF_JOINED:
    lsf_ref_join(L, c);
    joined = 1;
    break;
  case SF_FOREIGN: {
    lsf_ref *ref = lsf_ref_take_spare(L);
    ref->c = c;
    ref->kind = REF_FOREIGN;
    break;
  }
  case SF_RECURSIVE:
    if (*gslot)
      lua_pushvalue(L, *gslot);
    else
      lua_pushboolean(L, 0);
    break;
  default:
    return lsf_raise_nomem(L);
  }
  /* the holder (or its stand-in) on top: status, call, holder, key,
   * options (which the waiter needs next) */
  lua_pushinteger(L, st == SF_LEADER    ? ST_LEADER
                     : st == SF_JOINED  ? ST_JOINED
                     : st == SF_FOREIGN ? ST_FOREIGN
                                        : ST_RECURSIVE);
  lua_pushlightuserdata(L, c);
  lua_pushvalue(L, -3);
  lua_pushvalue(L, 2);
  push_options(L, 1, 1);
  *nret = 5;
  if (joined && !sf_group_name(g, NULL)) {
    /* the leader's owner id, while its guard lives, which the Lua
     * layer's duplicates that meet in the call's flight tell apart from
     * their own guard's (a recursion comes here): a group private to this
     * state only. An id, not the guard: a flight must not keep its
     * leader's guard alive, and ids are never given twice. */
    lua_Integer id = (lua_Integer)sf_call_owner(c);
    lua_rawgeti(L, UV_OWNERS, id);
    if (!lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushinteger(L, id);
    }
    *nret = 6;
  }
  return st;
}

/* acquire(g, key, fn, fname, flags) -> status, ... (see above) */
static int lsf_acquire(lua_State *L) {
  const char *fname = lua_tostring(L, 4);
  unsigned flags = (unsigned)lua_tointeger(L, 5);
  const char *key;
  size_t len;
  sf_group *g;
  sf_call *c;
  lsf_guard *gd;
  int gslot, nret;

  if (!fname)
    fname = "call";
  g = check_call_args(L, fname, flags, &key, &len);
  lua_settop(L, 3);
  if (flags & ACQ_CHECK) {
    lua_pushinteger(L, ST_ABSENT);
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushvalue(L, 2);
    return 4;
  }
  if (acquire_for(L, g, key, len, flags, &c, &gd, &gslot, &nret) !=
          SF_LEADER ||
      nret > 0)
    return nret;
  (void)gd;
  lua_pushinteger(L, ST_LEADER);
  lua_pushlightuserdata(L, c);
  if (gslot)
    lua_pushvalue(L, gslot);
  else
    lua_pushboolean(L, 0);
  lua_pushvalue(L, 2);
  return 4;
}

/* enter(g, key, fn, ...): acquire(g, key, fn, "call", COUNT), the extra
 * arguments ignored: what g:call does first where fn runs in Lua (LuaJIT,
 * 5.1), from a frame that passes on its own arguments as they are. */
static int lsf_enter(lua_State *L) {
  lua_settop(L, 3);
  lua_pushliteral(L, "call");
  lua_pushinteger(L, ACQ_COUNT);
  return lsf_acquire(L);
}

typedef struct publish_job {
  sf_call *c;
  int ok;
  void *payload;
} publish_job;

/* encode(job, a, b), protected: a memory error while copying must not
 * keep the waiters from being told. */
static int encode_protected(lua_State *L) {
  publish_job *j = (publish_job *)lua_touserdata(L, 1);
  size_t klen;
  const char *key = sf_call_key(j->c, &klen);
  j->payload = lsf_encode_payload(L, j->ok, 2, 3, key, klen);
  return 0;
}

/*
 * The leader's fn returned a, b (ok) or raised the value a with the
 * traceback b (stack indices): ends the call in the core and hands the
 * foreign waiters their copy. The caller holds c through the running
 * coroutine's guard, which gives it up here.
 */
static void finish_call(lua_State *L, lsf_guard *gd, sf_call *c, int ok,
                        int a, int b, int *shared, unsigned *nlocal,
                        int *expired) {
  unsigned nforeign;
  if (!gd || !lsf_guard_pop(gd, c))
    luaL_error(L, "singleflight: finish of a call this coroutine does not lead");
  nforeign = sf_finish_ex(c, !ok, shared, nlocal, expired);
  if (nforeign > 0) {
    publish_job j;
    j.c = c;
    j.ok = ok;
    j.payload = NULL;
    a = lua_absindex(L, a);
    b = lua_absindex(L, b);
    lua_pushcfunction(L, encode_protected);
    lua_pushlightuserdata(L, &j);
    lua_pushvalue(L, a);
    lua_pushvalue(L, b);
    if (lua_pcall(L, 3, 0, 0) != 0)
      lua_pop(L, 1); /* no payload: the waiters are told so */
    sf_publish(c, j.payload, lsf_free_payload);
  }
}

/*
 * finish(call, ok, a, b) -> shared, nlocal, expired
 * The running coroutine's lead of call ends with fn's results a, b (ok) or
 * its panic's value a and traceback b: says whether anyone joined, how
 * many same-state waiters to tell, and whether the call had expired (they
 * then take over instead of sharing the result).
 */
static int lsf_finish(lua_State *L) {
  sf_call *c = (sf_call *)lua_touserdata(L, 1);
  int shared, expired;
  unsigned nlocal;
  luaL_argcheck(L, c && lua_islightuserdata(L, 1), 1, "call expected");
  lua_settop(L, 4);
  finish_call(L, lsf_guard_running(L, lsf_ctx_of(L)), c, lua_toboolean(L, 2),
              3, 4, &shared, &nlocal, &expired);
  lua_pushboolean(L, shared);
  lua_pushinteger(L, (lua_Integer)nlocal);
  lua_pushboolean(L, expired);
  return 3;
}

#if LSF_HAVE_PCALLK

/*
 * The leader's frame, 5.2 and later: fn runs under lua_pcallk, so it may
 * yield, with the frame laid out as
 *   1 call, 2 key, 3 message handler, [4 guard,] fn, args...
 * The guard's slot is there for a coroutine (on 5.4 it is to-be-closed:
 * coroutine.close of a leader suspended in fn abandons its call); the main
 * thread's guard is cached. The continuation finds everything there.
 */

/*
 * Where the message handler leaves tracebacks: a table in the registry,
 * one entry per failed fn whose lead has not read it yet, the newest last
 * (cx->tracebacks of them). A lead notes how many there were when it
 * began (its continuation's context) and takes the one after: a lead run
 * by a to-be-closed variable's __close while a failed fn unwinds (5.4)
 * fails and reads its own traceback before the outer lead reads its.
 */
static const char traceback_slot = 0;

static void push_tracebacks(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &traceback_slot);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &traceback_slot);
  }
}

/* The message handler: notes the traceback beside the value, untouched. */
static int lead_msgh(lua_State *L) {
  lsf_ctx *cx = lsf_ctx_of(L);
  push_tracebacks(L);
  luaL_traceback(L, L, NULL, 1);
  lua_rawseti(L, -2, ++cx->tracebacks);
  lua_pop(L, 1);
  return 1;
}

/* Pushes the traceback of the lead that began with `before` of them
 * pending (or ""), and drops it and any left above it. */
static void take_traceback(lua_State *L, int before) {
  lsf_ctx *cx = lsf_ctx_of(L);
  int i;
  push_tracebacks(L);
  lua_rawgeti(L, -1, before + 1);
  if (lua_type(L, -1) != LUA_TSTRING) { /* the handler itself failed */
    lua_pop(L, 1);
    lua_pushliteral(L, "");
  }
  for (i = cx->tracebacks; i > before; i--) {
    lua_pushnil(L);
    lua_rawseti(L, -3, i); /* clearing a field never allocates */
  }
  if (cx->tracebacks > before)
    cx->tracebacks = before;
  lua_remove(L, -2);
}

static int lead_done(lua_State *L, int status, int before) {
  sf_call *c = (sf_call *)lua_touserdata(L, 1);
  lsf_ctx *cx = lsf_ctx_of(L);
  /* a coroutine's guard is in its slot; the main thread's is cached */
  lsf_guard *gd = L == cx->main_L ? cx->main_guard
                                  : (lsf_guard *)lua_touserdata(L, 4);
  int shared, expired, top = lua_gettop(L);
  unsigned nlocal;
#if LSF_HAVE_TOCLOSE
  /* fn came back: this frame no longer needs its guard closed (only a
   * coroutine.close of fn suspended does), so its mark is given back here
   * and the to-be-closed slot gets a stand-in whose __close does nothing,
   * in C, where the guard's would call the Lua layer's for nothing. Lua
   * closes the value the slot holds when the frame ends (lua_toclose:
   * "the value at that slot in the stack will be closed"). */
  if (gd && lua_touserdata(L, 4) == (void *)gd && gd->marks > 0) {
    gd->marks--;
    lua_pushvalue(L, UV_CLOSED);
    lua_replace(L, 4);
  }
#endif
  if (status == LUA_OK || status == LUA_YIELD) { /* v, err on top */
    finish_call(L, gd, c, 1, top - 1, top, &shared, &nlocal, &expired);
    lua_pushinteger(L, expired ? ST_DONE_GONE : !nlocal ? ST_DONE : ST_DELIVER);
    lua_pushvalue(L, top - 1);
    lua_pushvalue(L, top);
    lua_pushboolean(L, shared);
    if (!nlocal && !expired)
      return 4;
    lua_pushlightuserdata(L, c);
    return 5;
  }
  /* the panic's value on top, its traceback where the handler put it */
  take_traceback(L, before);
  finish_call(L, gd, c, 0, top, top + 1, &shared, &nlocal, &expired);
  lua_pushinteger(L, expired ? ST_PANICKED_GONE : ST_PANICKED);
  lua_pushvalue(L, top);
  lua_pushvalue(L, top + 1);
  if (nlocal || expired)
    lua_pushlightuserdata(L, c);
  else
    lua_pushnil(L);
  lua_pushvalue(L, 2);
  return 5;
}

#if LUA_VERSION_NUM >= 503
static int lead_k(lua_State *L, int status, lua_KContext ctx) {
  return lead_done(L, status, (int)ctx);
}
#else
static int lead_k(lua_State *L) {
  int ctx = 0;
  int status = lua_getctx(L, &ctx);
  return lead_done(L, status, ctx);
}
#endif

/* Runs fn at 3 (its arguments above it) as the leader of c, with the
 * coroutine's guard on top when gslot is set: lays the frame out as
 *   1 call, 2 key, 3 message handler, [4 guard,] fn, args...  */
static int lead_frame(lua_State *L, sf_call *c, int gslot) {
  int base = gslot ? 5 : 4, before;
  lua_pushlightuserdata(L, c);
  lua_replace(L, 1);
  if (gslot)
    lua_insert(L, 3);
  lua_rawgeti(L, UV_SPARES, SPARE_MSGH); /* lead_msgh, with the upvalues */
  lua_insert(L, 3);
#if LSF_HAVE_TOCLOSE
  if (gslot) {
    ((lsf_guard *)lua_touserdata(L, 4))->marks++;
    lua_toclose(L, 4);
  }
#endif
  before = lsf_ctx_of(L)->tracebacks;
  return lead_done(L, lua_pcallk(L, lua_gettop(L) - base, 2, 3, before, lead_k), before);
}

static int run_with(lua_State *L, unsigned flags) {
  const char *key;
  size_t len;
  sf_call *c;
  lsf_guard *gd;
  int gslot, nret;
  sf_group *g = check_call_args(L, "call", flags, &key, &len);
  if (acquire_for(L, g, key, len, flags, &c, &gd, &gslot, &nret) != SF_LEADER ||
      nret > 0)
    return nret;
  return lead_frame(L, c, gslot);
}

/* run(g, key, fn, ...): a new call; rerun: a waiter's take-over. */
static int lsf_run(lua_State *L) {
  return run_with(L, ACQ_COUNT);
}

static int lsf_rerun(lua_State *L) {
  return run_with(L, 0);
}

/* lead(call, key, fn, ...): runs fn for a call the running coroutine
 * leads already (adopted from a future). */
static int lsf_lead(lua_State *L) {
  sf_call *c = (sf_call *)lua_touserdata(L, 1);
  lsf_ctx *cx = lsf_ctx_of(L);
  int gslot = 0;
  luaL_argcheck(L, c && lua_islightuserdata(L, 1), 1, "call expected");
  if (L != cx->main_L) {
    lua_pushthread(L);
    lua_rawget(L, UV_GUARDS);
    if (!lua_touserdata(L, -1)) /* never adopted it */
      return luaL_error(L, "singleflight: lead of a call this coroutine does not lead");
    gslot = lua_gettop(L);
  }
  return lead_frame(L, c, gslot);
}

#endif /* LSF_HAVE_PCALLK */

/* decode(payload), protected: the reference is released whatever
 * happens. */
static int decode_protected(lua_State *L) {
  const void *p = lua_touserdata(L, 1);
  lua_pop(L, 1);
  return lsf_push_payload(L, p);
}

/*
 * wait(ref, timeout [, keep]) -> "done", ok, a, b | "timeout" | "abandoned"
 *                              | "error", message
 * A foreign joiner blocks its OS thread until the leader publishes, at most
 * timeout seconds (negative: no limit). ok false: a is the panic's value and
 * b its traceback. The ref is spent once this returns, but for a timeout
 * with keep (a future that may wait again).
 */
static int lsf_wait(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  int keep = lua_toboolean(L, 3);
  void *payload = NULL;
  sf_call *c = r->c;
  int st, top, status;
  luaL_argcheck(L, c && r->kind == REF_FOREIGN, 1, "foreign joiner expected");
  lua_settop(L, 1);
  st = sf_wait(c, timeout, keep ? SF_WAIT_KEEP : 0, &payload);
  if (st == SF_TIMEDOUT && keep) {
    lua_pushliteral(L, "timeout");
    return 1;
  }
  r->c = NULL;
  r->kind = REF_EMPTY;
  if (st != SF_DONE) {
    sf_release(c);
    if (st == SF_TIMEDOUT)
      lua_pushliteral(L, "timeout");
    else
      lua_pushliteral(L, "abandoned");
    return 1;
  }
  top = lua_gettop(L);
  lua_pushcfunction(L, decode_protected);
  lua_pushlightuserdata(L, payload);
  status = lua_pcall(L, 1, LUA_MULTRET, 0);
  sf_release(c); /* the payload goes with the last reference */
  if (status != 0)
    return lua_error(L);
  return lua_gettop(L) - top;
}

static int lsf_state(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  int st;
  if (!r->c) {
    lua_pushliteral(L, "released");
    return 1;
  }
  st = sf_state(r->c);
  if (st == SF_DONE)
    lua_pushliteral(L, "done");
  else if (st == SF_ABANDONED)
    lua_pushliteral(L, "abandoned");
  else
    lua_pushliteral(L, "running");
  return 1;
}

/* unjoin(ref): a joiner that won't wait after all. */
static int lsf_unjoin(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  if (r->kind == REF_LOCAL || r->kind == REF_FOREIGN)
    lsf_ref_drop(L, r, DROP_UNJOIN);
  return 0;
}

/* leave(ref): a same-state joiner gave up waiting (a timeout). */
static int lsf_leave(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  if (r->kind == REF_LOCAL)
    lsf_ref_drop(L, r, DROP_LEAVE);
  return 0;
}

/* expire(ref, max_age) -> true if the call was older and is now expired. */
static int lsf_expire(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  double max_age = luaL_checknumber(L, 2);
  lua_pushboolean(L, r->c && sf_age(r->c) >= max_age && sf_expire(r->c));
  return 1;
}

/* age(ref) -> seconds since the call started (nil once released). */
static int lsf_age(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  if (!r->c)
    return 0;
  lua_pushnumber(L, (lua_Number)sf_age(r->c));
  return 1;
}

/*
 * adopt(ref) -> call
 * The light thread started for a detached leader takes the leader's
 * reference from the ref into its own guard: it is the owner from now on.
 */
static int lsf_adopt(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  lsf_guard *gd;
  sf_call *c = r->c;
  int spare;
  luaL_argcheck(L, r->kind == REF_LEADER, 1, "a started call expected");
  lua_settop(L, 1);
  lsf_ensure_spares(L, lsf_ctx_of(L));
  gd = lsf_guard_for_acquire(L, lsf_ctx_of(L), &spare);
  if (spare && lsf_guard_install(L, gd) != 0)
    return lsf_raise_nomem(L); /* the ref still leads */
  lsf_guard_push(gd, c);
  r->c = NULL;
  r->kind = REF_EMPTY;
  r->n = 0;
  sf_set_owner(c, gd->id);
  lua_pushlightuserdata(L, c);
  return 1;
}

/*
 * watch(ref) -> ref
 * A new ref on the call `ref` holds, counted among the leader's state's
 * waiters: a future's own hold on the call it started.
 */
static int lsf_watch(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1), *w;
  luaL_argcheck(L, r->c != NULL, 1, "a held call expected");
  lsf_ensure_spares(L, lsf_ctx_of(L));
  w = lsf_ref_take_spare(L);
  sf_retain(r->c, 1);
  w->c = r->c;
  w->kind = REF_WATCH;
  return 1;
}

/* guard() -> the running coroutine's guard, or nil. */
static int lsf_running_guard(lua_State *L) {
  lua_pushthread(L);
  lua_rawget(L, UV_GUARDS);
  return 1;
}

#if LUA_VERSION_NUM >= 503
/* meets(id) -> true when the running coroutine may wait on a call that
 * the guard of owner id leads, with a bare yield: it can yield, and it is
 * not that call's leader (whose own call of the key is a recursion). Both
 * looks in one crossing, for the duplicates that meet in Lua (flow.lua). */
static int lsf_meets(lua_State *L) {
  int meets = 0;
  if (lua_isyieldable(L)) {
    const lsf_guard *gd;
    lua_pushthread(L);
    lua_rawget(L, UV_GUARDS); /* its guard, if it has one */
    gd = (const lsf_guard *)lua_touserdata(L, -1);
    meets = !gd || (lua_Integer)gd->id != lua_tointeger(L, 1);
  }
  lua_pushboolean(L, meets);
  return 1;
}
#endif

/* options(g) -> the handle's options, or nil; options(g, t) sets them.
 * They live in the handle (its user value), not in a weak table the
 * collector would walk at every cycle. */
static int lsf_options(lua_State *L) {
  if (!test_group(L, 1))
    return 0;
  if (lua_gettop(L) >= 2) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    lsf_setuservalue(L, 1);
    return 0;
  }
  push_options(L, 1, 0);
  return 1;
}

/* tier(g): g, an open group, becomes a tiered one: a group whose calls go
 * through a tier above this state (singleflight.shm). It is a
 * singleflight.Group all the same, whose methods are the tier's: its
 * metatable is the tiered groups' (the same metamethods; __index, the
 * methods the tier put in with interpose). Nothing in C tells the two
 * apart but the methods a handle has. */
static int lsf_tier(lua_State *L) {
  lsf_group *ug = test_group(L, 1);
  luaL_argcheck(L, ug != NULL && ug->g != NULL, 1, "an open singleflight.Group expected");
  lua_settop(L, 1);
  lua_pushvalue(L, UV_TIERED_MT);
  lua_setmetatable(L, 1);
  return 0;
}

/* ---- odds and ends ---- */

static int lsf_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)sf_now());
  return 1;
}

/* named() -> how many process-wide groups exist now, in the process. */
static int lsf_named(lua_State *L) {
  lua_pushnumber(L, (lua_Number)sf_group_count());
  return 1;
}

static int lsf_footprint(lua_State *L) {
  lua_Number len = luaL_optnumber(L, 1, 0);
  lua_pushnumber(L, (lua_Number)sf_call_footprint((size_t)len));
  return 1;
}

/* interpose(what, name, fn) -> the value fn replaces: the one way the Lua
 * layer puts its functions into the binding's tables. what is "methods"
 * (a group's methods: call, stats, ...), "tiered" (a tiered group's: see
 * tier), "Guard" or "Ref" (the holders' metatables: their finalizers,
 * which hand a call that lost its holder to the Lua layer). */
static int lsf_interpose(lua_State *L) {
  static const char *const whats[] = {"methods", "tiered", "Guard", "Ref", NULL};
  int what = luaL_checkoption(L, 1, NULL, whats);
  luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  if (what <= 1) {
    lua_getfield(L, what == 0 ? UV_GROUP_MT : UV_TIERED_MT, "__index");
  } else {
    const char *name = lua_tostring(L, 2);
    luaL_argcheck(L, !strcmp(name, "__gc") || !strcmp(name, "__close"), 2,
                  "a holder's __gc or __close expected");
    lua_pushvalue(L, what == 2 ? UV_GUARD_MT : UV_REF_MT);
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, -2); /* the old one */
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  lua_rawset(L, -4);
  return 1;
}

/* quote(s): s as the module's messages show keys. */
static int lsf_quote(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lsf_push_quoted(L, s, len);
  return 1;
}

static const luaL_Reg functions[] = {
  {"new", lsf_new},
  {"open", lsf_open},
  {"acquire", lsf_acquire},
  {"enter", lsf_enter},
  {"finish", lsf_finish},
  {"wait", lsf_wait},
  {"state", lsf_state},
  {"unjoin", lsf_unjoin},
  {"leave", lsf_leave},
  {"expire", lsf_expire},
  {"age", lsf_age},
  {"adopt", lsf_adopt},
  {"watch", lsf_watch},
  {"guard", lsf_running_guard},
#if LUA_VERSION_NUM >= 503
  {"meets", lsf_meets},
#endif
  {"tier", lsf_tier},
  {"options", lsf_options},
#if LSF_HAVE_PCALLK
  {"run", lsf_run},
  {"rerun", lsf_rerun},
  {"lead", lsf_lead},
#endif
  {"count", lsf_count},
  {"encode", lsf_encode},
  {"decode", lsf_decode},
  {"now", lsf_now},
  {"footprint", lsf_footprint},
  {"named", lsf_named},
  {"quote", lsf_quote},
  {"interpose", lsf_interpose},
  {"tally", lsf_tally},
  {"current", lsf_current},
  {NULL, NULL}
};

static const luaL_Reg methods[] = {
  {"forget", lsf_forget},
  {"stats", lsf_stats},
  {"close", lsf__group_close},
  {NULL, NULL}
};

static const luaL_Reg group_metamethods[] = {
  {"__gc", lsf__group_gc},
#if LSF_HAVE_TOCLOSE
  {"__close", lsf__group_close},
#endif
  {"__tostring", lsf__group_tostring},
  {NULL, NULL}
};

static int closed_close(lua_State *L) {
  (void)L;
  return 0;
}

/* Pushes the stand-in for a guard in a leader frame's to-be-closed slot
 * once fn came back (see lead_done): closing it does nothing. On Lua
 * versions without to-be-closed slots, an unused placeholder. */
static void lsf_push_closed(lua_State *L) {
  lua_newuserdata(L, 1);
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, closed_close);
  lua_setfield(L, -2, "__close");
  lua_pushliteral(L, "singleflight.Closed");
  lua_setfield(L, -2, "__name");
  lua_setmetatable(L, -2);
}

/* Pushes the upvalues every function gets, from their stack slots. */
static void push_upvalues(lua_State *L, const int *slots) {
  int i;
  /* a C function is given LUA_MINSTACK slots, fewer than luaopen's
   * slots and a set of upvalues above them */
  luaL_checkstack(L, LSF_NUPVALUES + 2, "singleflight: loading the module");
  for (i = 0; i < LSF_NUPVALUES; i++)
    lua_pushvalue(L, slots[i]);
}

/* Sets the functions of l into the table at idx, with the upvalues. */
static void set_functions(lua_State *L, int idx, const luaL_Reg *l,
                          const int *slots) {
  lua_pushvalue(L, idx);
  push_upvalues(L, slots);
  luaL_setfuncs(L, l, LSF_NUPVALUES);
  lua_pop(L, 1);
}

/* The flags of acquire, as the module exports them. */
static const struct {
  const char *name;
  int value;
} acquire_flags[] = {
  {"COUNT", ACQ_COUNT},   {"DETACHED", ACQ_DETACHED},
  {"CHECK", ACQ_CHECK},
  {"DEEPER", ACQ_DEEPER},
  {NULL, 0}
};

LUALIB_API int luaopen_singleflight_core(lua_State *L);

LUALIB_API int luaopen_singleflight_core(lua_State *L) {
  int slots[LSF_NUPVALUES], module, methods_t, i;
  lsf_ctx *cx;

  luaL_checkstack(L, LSF_NUPVALUES + 8, "singleflight: loading the module");
  lua_newtable(L); /* guards: coroutine -> guard, weak keys */
  slots[0] = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, slots[0]);
  cx = (lsf_ctx *)lua_newuserdata(L, sizeof *cx);
  memset(cx, 0, sizeof *cx);
  cx->anchors = lsf_anchors_find(L);
  slots[1] = lua_gettop(L);
  luaL_newmetatable(L, GROUP_MT);
  slots[2] = lua_gettop(L);
  luaL_newmetatable(L, GUARD_MT);
  slots[3] = lua_gettop(L);
  luaL_newmetatable(L, REF_MT);
  slots[4] = lua_gettop(L);
  lua_createtable(L, 3, 0); /* spares, and the leaders' message handler */
  slots[5] = lua_gettop(L);
  lua_newtable(L); /* joins: call -> ref, weak values */
  slots[6] = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, slots[6]);

  lsf_push_closed(L); /* the guards' stand-in */
  slots[7] = lua_gettop(L);
  lua_newtable(L); /* tracked guards */
  slots[8] = lua_gettop(L);
  lua_newtable(L); /* owners: guard id -> guard, weak values */
  slots[9] = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, slots[9]);
  lua_newtable(L); /* joinable: handle -> {key -> flight}, weak keys */
  slots[10] = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, slots[10]);
  lua_newtable(L); /* tracked guard -> its coroutine, weak values */
  slots[11] = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, slots[11]);
  lua_createtable(L, 0, 8); /* the tiered groups' metatable (see tier) */
  slots[12] = lua_gettop(L);

#if LSF_HAVE_PCALLK
  push_upvalues(L, slots); /* the leaders' message handler, made once */
  lua_pushcclosure(L, lead_msgh, LSF_NUPVALUES);
  lua_rawseti(L, slots[5], SPARE_MSGH);
#endif

  lua_pushliteral(L, GROUP_MT);
  lua_setfield(L, slots[2], "__name");
  lua_pushliteral(L, GROUP_MT); /* a singleflight.Group too */
  lua_setfield(L, slots[12], "__name");
  lua_pushliteral(L, GUARD_MT);
  lua_setfield(L, slots[3], "__name");
  lua_pushliteral(L, REF_MT);
  lua_setfield(L, slots[4], "__name");
  set_functions(L, slots[2], group_metamethods, slots);
  set_functions(L, slots[12], group_metamethods, slots);
  set_functions(L, slots[3], lsf_guard_metamethods, slots);
  set_functions(L, slots[4], lsf_ref_metamethods, slots);

  lua_createtable(L, 0, 4); /* methods */
  methods_t = lua_gettop(L);
  set_functions(L, methods_t, methods, slots);
  lua_pushvalue(L, methods_t);
  lua_setfield(L, slots[2], "__index");
  lua_createtable(L, 0, 8); /* a tiered group's methods: the same to start */
  set_functions(L, lua_gettop(L), methods, slots);
  lua_setfield(L, slots[12], "__index");

  lua_createtable(L, 0, 32); /* the module */
  module = lua_gettop(L);
  set_functions(L, module, functions, slots);
  set_functions(L, module, lsf_holder_functions, slots);
  set_functions(L, module, lsf_fast_functions, slots);
  lua_pushvalue(L, methods_t);
  lua_setfield(L, module, "methods");
  lua_pushvalue(L, slots[3]);
  lua_setfield(L, module, "Guard");
  lua_pushvalue(L, slots[4]);
  lua_setfield(L, module, "Ref");
  lua_pushvalue(L, slots[10]);
  lua_setfield(L, module, "joinable");
  lua_pushvalue(L, slots[9]);
  lua_setfield(L, module, "owners");
  lua_pushliteral(L, LSF_VERSION);
  lua_setfield(L, module, "_VERSION");
  for (i = 0; acquire_flags[i].name; i++) {
    lua_pushinteger(L, acquire_flags[i].value);
    lua_setfield(L, module, acquire_flags[i].name);
  }
  lua_createtable(L, 0, 11);
  for (i = 0; statuses[i].name; i++) {
    lua_pushinteger(L, statuses[i].value);
    lua_setfield(L, -2, statuses[i].name);
  }
  lua_setfield(L, module, "ST");
  lua_pushboolean(L, LSF_HAVE_TOCLOSE);
  lua_setfield(L, module, "closes");
  return 1;
}
