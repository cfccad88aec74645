/*
 * lsf.c: the Lua binding of the singleflight core, module singleflight.core.
 *
 * The only file that includes lua.h. It owns three kinds of userdata:
 *
 *   singleflight.Group   a handle on a core group (private or process-wide);
 *   singleflight.Guard   one per coroutine that ever led a call: it keeps the
 *                        stack of calls the coroutine is running, and its
 *                        __gc (and, on 5.4, __close) abandons them when the
 *                        coroutine goes away without finishing;
 *   the context          one per lua_State: its address is the state's
 *                        domain in the core.
 *
 * Guards live in a weak-keyed table indexed by the coroutine, so nothing
 * here keeps a leader's coroutine alive. Waiting, backends and panics are
 * the Lua layer's (singleflight/init.lua), reached through hooks it sets.
 */
#include "sf_core.h"
#include "lsf_compat.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define GROUP_MT "singleflight.Group"
#define GUARD_MT "singleflight.Guard"

/* Upvalues shared by every C function of the module. */
#define UV_GUARDS lua_upvalueindex(1)
#define UV_HOOKS lua_upvalueindex(2)
#define UV_CTX lua_upvalueindex(3)
#define UV_GROUP_MT lua_upvalueindex(4)
#define UV_GUARD_MT lua_upvalueindex(5)
#define NUPVALUES 5

/* Slots of the hooks table. */
enum { HOOK_MSGH = 1, HOOK_JOIN, HOOK_LEADER, HOOK_ABANDON, HOOK_TOSTRING };

/* Status codes shared with the Lua layer. */
enum { ST_LEADER = 0, ST_JOINED = 1, ST_FOREIGN = 2 };

struct lsf_guard;

typedef struct lsf_ctx {
  uintptr_t next_id;
  struct lsf_guard *main_guard; /* the main thread's, once made */
  lua_State *main_L;            /* the main thread, once seen */
} lsf_ctx;

typedef struct lsf_group {
  const void *tag; /* &group_tag: a cheap type check for the fast path */
  sf_group *g;     /* NULL once closed */
  int named;
} lsf_group;

static const char group_tag = 0;

#define GUARD_INLINE 4

typedef struct lsf_guard {
  uintptr_t id;
  int height;    /* calls this coroutine is leading */
  int marks;     /* leader frames marked to-be-closed (5.4) */
  int cap;
  sf_call **stack;
  sf_call *inl[GUARD_INLINE];
} lsf_guard;

static uintptr_t domain_of(lua_State *L) {
  return (uintptr_t)lua_touserdata(L, UV_CTX);
}

/* ---- argument checks ---- */

/* The userdata at idx if its metatable is the one at upvalue mt, else NULL:
 * luaL_testudata without looking the name up in the registry. */
static void *test_udata(lua_State *L, int idx, int mt) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_getmetatable(L, idx)) {
    int same = lua_rawequal(L, -1, mt);
    lua_pop(L, 1);
    if (same)
      return p;
  }
  return NULL;
}

static lsf_group *to_group(lua_State *L, int idx) {
  lsf_group *ug = (lsf_group *)test_udata(L, idx, UV_GROUP_MT);
  return ug ? ug : (lsf_group *)luaL_checkudata(L, idx, GROUP_MT);
}

static lsf_guard *to_guard(lua_State *L, int idx) {
  lsf_guard *gd = (lsf_guard *)test_udata(L, idx, UV_GUARD_MT);
  return gd ? gd : (lsf_guard *)luaL_checkudata(L, idx, GUARD_MT);
}

static int arg_error(lua_State *L, int level, int arg, const char *fname,
                     const char *msg) {
  luaL_where(L, level);
  lua_pushfstring(L, "bad argument #%d to '%s' (%s)", arg, fname, msg);
  lua_concat(L, 2);
  return lua_error(L);
}

static int type_error(lua_State *L, int level, int idx, int arg,
                      const char *fname, const char *expected) {
  const char *msg = lua_pushfstring(L, "%s expected, got %s", expected,
                                    luaL_typename(L, idx));
  return arg_error(L, level, arg, fname, msg);
}

/* The group at idx, open. Errors name fname and blame `level`. */
static sf_group *check_group(lua_State *L, int idx, int level,
                             const char *fname) {
  lsf_group *ug = (lsf_group *)test_udata(L, idx, UV_GROUP_MT);
  if (!ug)
    type_error(L, level, idx, idx, fname, GROUP_MT);
  if (!ug->g) {
    luaL_where(L, level);
    lua_pushliteral(L, "singleflight: attempt to use a closed group");
    lua_concat(L, 2);
    lua_error(L);
  }
  return ug->g;
}

/* The key at idx as bytes; a number is replaced by its string, as
 * tostring would write it. */
static const char *check_key(lua_State *L, int idx, size_t *len, int level,
                             int arg, const char *fname) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    return lua_tolstring(L, idx, len);
  case LUA_TNUMBER:
    lua_pushvalue(L, idx);
    lua_tolstring(L, -1, len);
    lua_replace(L, idx);
    return lua_tolstring(L, idx, len);
  default:
    type_error(L, level, idx, arg, fname, "string or number");
    return NULL;
  }
}

static void check_fn(lua_State *L, int idx, int level, int arg,
                     const char *fname) {
  if (lua_type(L, idx) == LUA_TFUNCTION)
    return;
  if (luaL_getmetafield(L, idx, "__call")) {
    lua_pop(L, 1);
    return;
  }
  type_error(L, level, idx, arg, fname, "function or callable value");
}

static sf_call *check_call(lua_State *L, int idx) {
  sf_call *c = (sf_call *)lua_touserdata(L, idx);
  luaL_argcheck(L, c != NULL && lua_islightuserdata(L, idx), idx,
                "call handle expected");
  return c;
}

/* Pushes the key quoted for a message: printable bytes as they are, the
 * rest escaped, long keys cut short. */
static void push_quoted_key(lua_State *L, const char *key, size_t len) {
  luaL_Buffer b;
  size_t i, shown = len > 64 ? 64 : len;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '"');
  for (i = 0; i < shown; i++) {
    unsigned char ch = (unsigned char)key[i];
    if (ch == '"' || ch == '\\') {
      luaL_addchar(&b, '\\');
      luaL_addchar(&b, (char)ch);
    } else if (ch >= 32 && ch < 127) {
      luaL_addchar(&b, (char)ch);
    } else {
      char esc[8];
      static const char hex[] = "0123456789abcdef";
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

static int raise_recursive(lua_State *L, const char *key, size_t len) {
  lua_pushliteral(L, "singleflight: recursive call for key ");
  push_quoted_key(L, key, len);
  lua_concat(L, 2);
  return lua_error(L);
}

static int raise_nomem(lua_State *L) {
  lua_pushliteral(L, "singleflight: not enough memory");
  return lua_error(L);
}

/* ---- guards ---- */

static void guard_abandon_from(lua_State *L, lsf_guard *gd, int from);

/* Pushes the guard of the running coroutine, making it on first use. */
/* Pushes the running coroutine's guard, or nil while it has none. */
static lsf_guard *guard_peek(lua_State *L) {
  lua_pushthread(L);
  lua_rawget(L, UV_GUARDS);
  return (lsf_guard *)lua_touserdata(L, -1);
}

/* The owner to give sf_acquire: the guard's id or, for a coroutine that has
 * led nothing yet, the id its guard will get if it leads now. Only leaders
 * get a guard: a stampede's duplicates make none. */
static uintptr_t owner_of(lua_State *L, const lsf_guard *gd) {
  return gd ? gd->id : ((lsf_ctx *)lua_touserdata(L, UV_CTX))->next_id + 1;
}

static lsf_guard *guard_push(lua_State *L) {
  lsf_guard *gd = guard_peek(L);
  if (gd)
    return gd;
  lua_pop(L, 1);
  gd = (lsf_guard *)lua_newuserdata(L, sizeof *gd);
  memset(gd, 0, sizeof *gd);
  gd->id = ++((lsf_ctx *)lua_touserdata(L, UV_CTX))->next_id;
  gd->stack = gd->inl;
  gd->cap = GUARD_INLINE;
  luaL_getmetatable(L, GUARD_MT);
  lua_setmetatable(L, -2);
  lua_pushthread(L);
  lua_pushvalue(L, -2);
  lua_rawset(L, UV_GUARDS);
  return gd;
}

static int guard_add(lsf_guard *gd, sf_call *c) {
  if (gd->height == gd->cap) {
    int ncap = gd->cap * 2;
    sf_call **ns;
    if (gd->stack == gd->inl) {
      ns = (sf_call **)malloc(sizeof *ns * (size_t)ncap);
      if (ns)
        memcpy(ns, gd->inl, sizeof gd->inl);
    } else {
      ns = (sf_call **)realloc(gd->stack, sizeof *ns * (size_t)ncap);
    }
    if (!ns)
      return -1;
    gd->stack = ns;
    gd->cap = ncap;
  }
  gd->stack[gd->height++] = c;
  return 0;
}

static void guard_remove(lsf_guard *gd, sf_call *c) {
  int i;
  for (i = gd->height - 1; i >= 0; i--) {
    if (gd->stack[i] == c) {
      memmove(&gd->stack[i], &gd->stack[i + 1],
              sizeof *gd->stack * (size_t)(gd->height - 1 - i));
      gd->height--;
      return;
    }
  }
}

/* Abandons the calls at stack[from..height), innermost first, then tells
 * the Lua layer so that same-state waiters wake. */
static void guard_abandon_from(lua_State *L, lsf_guard *gd, int from) {
  while (gd->height > from) {
    sf_call *c = gd->stack[--gd->height];
    sf_abandon(c);
    lua_rawgeti(L, UV_HOOKS, HOOK_ABANDON);
    if (lua_isfunction(L, -1)) {
      lua_pushlightuserdata(L, c);
      if (lua_pcall(L, 1, 0, 0) != 0)
        lua_pop(L, 1); /* a waiter's backend failed: nothing to do here */
    } else {
      lua_pop(L, 1);
    }
  }
}

static int lsf__guard_gc(lua_State *L) {
  lsf_guard *gd = to_guard(L, 1);
  lsf_ctx *cx = (lsf_ctx *)lua_touserdata(L, UV_CTX);
  if (cx->main_guard == gd)
    cx->main_guard = NULL;
  guard_abandon_from(L, gd, 0);
  gd->marks = 0;
  if (gd->stack != gd->inl) {
    free(gd->stack);
    gd->stack = gd->inl;
    gd->cap = GUARD_INLINE;
  }
  return 0;
}

#if LSF_HAVE_TOCLOSE
/* A leader frame goes out of scope. On a normal return its call was
 * finished and popped already; when the coroutine is closed while the
 * leader is suspended inside fn, it was not: abandon it, and anything it
 * started inside. */
static int lsf__guard_close(lua_State *L) {
  lsf_guard *gd = to_guard(L, 1);
  int mine = gd->marks;
  if (mine > 0) {
    gd->marks--;
    if (gd->height >= mine)
      guard_abandon_from(L, gd, mine - 1);
  }
  return 0;
}
#endif

static int lsf_current_guard(lua_State *L) {
  guard_push(L);
  return 1;
}

/* alias(co, guard): co runs fn on behalf of the guard's coroutine (5.1). */
static int lsf_alias(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  to_guard(L, 2);
  lua_settop(L, 2);
  lua_rawset(L, UV_GUARDS);
  return 0;
}

/* ---- groups ---- */

static void push_group(lua_State *L, sf_group *g, int named) {
  lsf_group *ug = (lsf_group *)lua_newuserdata(L, sizeof *ug);
  ug->tag = &group_tag;
  ug->g = g;
  ug->named = named;
  luaL_getmetatable(L, GROUP_MT);
  lua_setmetatable(L, -2);
}

static int lsf_new(lua_State *L) {
  sf_group *g = sf_group_new(SF_SINGLE_THREAD);
  if (!g)
    return raise_nomem(L);
  push_group(L, g, 0);
  return 1;
}

static int lsf_open(lua_State *L) {
  size_t len;
  const char *name;
  sf_group *g;
  if (lua_type(L, 1) != LUA_TSTRING)
    type_error(L, 1, 1, 1, "group", "string");
  name = lua_tolstring(L, 1, &len);
  g = sf_group_open(name, len);
  if (!g)
    return raise_nomem(L);
  push_group(L, g, 1);
  return 1;
}

static int lsf__group_gc(lua_State *L) {
  lsf_group *ug = to_group(L, 1);
  if (ug->g) {
    sf_group *g = ug->g;
    ug->g = NULL;
    sf_group_release(g);
  }
  return 0;
}

static int lsf__group_tostring(lua_State *L) {
  lsf_group *ug = to_group(L, 1);
  if (!ug->g) {
    lua_pushliteral(L, "singleflight.Group (closed)");
  } else {
    size_t len;
    const char *name = sf_group_name(ug->g, &len);
    if (name) {
      lua_pushliteral(L, "singleflight.Group ");
      push_quoted_key(L, name, len);
      lua_pushfstring(L, " (%p)", (void *)ug);
      lua_concat(L, 3);
    } else {
      lua_pushfstring(L, "singleflight.Group (%p)", (void *)ug);
    }
  }
  return 1;
}

static int lsf_closed(lua_State *L) {
  lsf_group *ug = to_group(L, 1);
  lua_pushboolean(L, ug->g == NULL);
  return 1;
}

static int lsf_forget(lua_State *L) {
  sf_group *g = check_group(L, 1, 1, "forget");
  size_t len;
  const char *key = check_key(L, 2, &len, 1, 1, "forget");
  lua_pushboolean(L, sf_forget(g, key, len));
  return 1;
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

/* count(g, name): one more event the core does not see by itself. */
static int lsf_count(lua_State *L) {
  lsf_group *ug = to_group(L, 1);
  const char *name = luaL_checkstring(L, 2);
  int k;
  for (k = 0; k < SF_STAT_COUNT; k++) {
    if (strcmp(name, stat_names[k]) == 0) {
      if (ug->g)
        sf_count(ug->g, k);
      return 0;
    }
  }
  return luaL_argerror(L, 2, "unknown counter");
}

/* ---- calls ---- */

/*
 * acquire(g, key, fn, count, joinonly) -> status, call, guard, key
 * (status nil: joinonly and nothing in flight)
 * The Lua layer's entry (Lua 5.1 and LuaJIT), and the way back in for a
 * waiter whose leader was abandoned. Errors blame the caller of `call`.
 */
static int lsf_acquire(lua_State *L) {
  sf_group *g = check_group(L, 1, 2, "call");
  size_t len;
  const char *key = check_key(L, 2, &len, 2, 1, "call");
  unsigned flags = (lua_toboolean(L, 4) ? SF_ACQ_COUNT_CALL : 0) |
                   (lua_toboolean(L, 5) ? SF_ACQ_JOIN_ONLY : 0);
  lsf_guard *gd;
  sf_call *c;
  int st;
  check_fn(L, 3, 2, 2, "call");
  lua_settop(L, 2);
  gd = guard_peek(L); /* 3: the guard, or nil */
  st = sf_acquire(g, key, len, domain_of(L), owner_of(L, gd), flags, &c);
  switch (st) {
  case SF_LEADER:
    if (!gd) {
      lua_pop(L, 1);
      gd = guard_push(L); /* 3, with the id acquire was given */
    }
    if (guard_add(gd, c) != 0) {
      int shared;
      unsigned nlocal;
      sf_finish(c, 0, &shared, &nlocal);
      return raise_nomem(L);
    }
    lua_pushinteger(L, ST_LEADER);
    lua_pushlightuserdata(L, c);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 2);
    return 4;
  case SF_JOINED:
  case SF_FOREIGN:
    lua_pushinteger(L, st == SF_JOINED ? ST_JOINED : ST_FOREIGN);
    lua_pushlightuserdata(L, c);
    lua_pushnil(L);
    lua_pushvalue(L, 2);
    return 4;
  case SF_RECURSIVE:
    return raise_recursive(L, key, len);
  case SF_ABSENT:
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushvalue(L, 2);
    return 4;
  default:
    return raise_nomem(L);
  }
}

/* Pushes the Lua layer's leader hook and its arguments (key, call, ok,
 * shared, nlocal, nforeign, v, err), v and err being the two values on top
 * of the stack: the leader finished and someone waits. Returns the number
 * of arguments. */
static int push_leader_hook(lua_State *L, int key, sf_call *c, int ok,
                            int shared, unsigned nlocal, unsigned nforeign) {
  int top = lua_gettop(L);
  lua_rawgeti(L, UV_HOOKS, HOOK_LEADER);
  lua_pushvalue(L, key);
  lua_pushlightuserdata(L, c);
  lua_pushboolean(L, ok);
  lua_pushboolean(L, shared);
  lua_pushinteger(L, (lua_Integer)nlocal);
  lua_pushinteger(L, (lua_Integer)nforeign);
  lua_pushvalue(L, top - 1);
  lua_pushvalue(L, top);
  return 8;
}

/*
 * finish(call, guard, key, ok, v, err) -> v, err, shared
 * The leader's fn returned (ok) or raised (v is the panic): ends the call
 * and, when someone waits, hands over to the Lua layer's leader hook, which
 * returns the results or raises the panic. Lua 5.1 and LuaJIT only; 5.2+
 * do this in lead_k.
 */
static int lsf_finish(lua_State *L) {
  sf_call *c = check_call(L, 1);
  lsf_guard *gd = to_guard(L, 2);
  int ok = lua_toboolean(L, 4);
  int shared;
  unsigned nlocal, nforeign;
  guard_remove(gd, c);
  nforeign = sf_finish(c, !ok, &shared, &nlocal);
  lua_settop(L, 6);
  if (ok && nlocal == 0 && nforeign == 0) {
    lua_pushboolean(L, shared);
    return 3;
  }
  lua_call(L, push_leader_hook(L, 3, c, ok, shared, nlocal, nforeign),
           LUA_MULTRET);
  return lua_gettop(L) - 6;
}

static int lsf_unjoin(lua_State *L) {
  sf_unjoin(check_call(L, 1));
  return 0;
}

static int lsf_leave(lua_State *L) {
  sf_leave(check_call(L, 1));
  return 0;
}

#if LSF_HAVE_PCALLK

/* Returns what a Lua hook returned: everything above ctx. */
LSF_KFUNC(results_k) {
  (void)status;
  return lua_gettop(L) - (int)ctx;
}

/*
 * The leader's frame, 5.2 and later, laid out as
 *   1 msgh, 2 key, [3 guard,] fn, args...
 * The guard's slot is there for a coroutine only (the main thread's guard
 * is cached in the context): on 5.4 it is to-be-closed. The continuation's
 * context is the guard (5.3+); its innermost call is this frame's, as the
 * calls made inside fn were finished or abandoned before fn returned.
 * fn runs under lua_pcallk, so it may yield; lead_k picks up after it with
 * fn's two results (or the panic) on top.
 */
#if LUA_VERSION_NUM >= 503
#define LEAD_CTX(gd, base) ((lua_KContext)(gd))
#define lead_guard(L, ctx) ((lsf_guard *)(ctx))
#else /* 5.2's context is an int: the base, to find the guard again */
#define LEAD_CTX(gd, base) (base)
static lsf_guard *lead_guard(lua_State *L, lua_KContext ctx) {
  if (ctx == 4)
    return (lsf_guard *)lua_touserdata(L, 3);
  return ((lsf_ctx *)lua_touserdata(L, UV_CTX))->main_guard;
}
#endif

LSF_KFUNC(lead_k) {
  int ok = status == LUA_OK || status == LUA_YIELD;
  lsf_guard *gd = lead_guard(L, ctx);
  sf_call *c = gd->stack[--gd->height];
  int shared, top;
  unsigned nlocal, nforeign;
  nforeign = sf_finish(c, !ok, &shared, &nlocal);
  if (ok && nlocal == 0 && nforeign == 0) {
    lua_pushboolean(L, shared);
    return 3;
  }
  if (!ok)
    lua_pushnil(L); /* the panic, nil */
  top = lua_gettop(L);
  lua_callk(L, push_leader_hook(L, 2, c, ok, shared, nlocal, nforeign),
            LUA_MULTRET, top, LSF_K(results_k));
  return LSF_KCALL(results_k, L, LUA_OK, top);
}

/* Runs fn (at base) and its arguments as the leader of gd's innermost
 * call; slot 1 is free for the message handler. */
static int lead_run(lua_State *L, lsf_guard *gd, int base) {
  lua_rawgeti(L, UV_HOOKS, HOOK_MSGH);
  lua_replace(L, 1);
#if LSF_HAVE_TOCLOSE
  if (base == 4) { /* a coroutine's guard in slot 3 */
    gd->marks++;
    lua_toclose(L, 3);
  }
#endif
  (void)gd;
  return LSF_KCALL(lead_k, L,
                   lua_pcallk(L, lua_gettop(L) - base, 2, 1,
                              LEAD_CTX(gd, base), LSF_K(lead_k)),
                   LEAD_CTX(gd, base));
}

/* lead(g, key, guard, call, fn, ...): run fn as the leader of call, the
 * innermost call of guard. */
static int lsf_lead(lua_State *L) {
  lsf_guard *gd = to_guard(L, 3);
  sf_call *c = check_call(L, 4);
  luaL_argcheck(L, gd->height > 0 && gd->stack[gd->height - 1] == c, 4,
                "not the guard's innermost call");
  lua_remove(L, 4); /* g key guard fn ... */
  return lead_run(L, gd, 4);
}

/*
 * g:call(key, fn, ...) for 5.2 and later, in C so that the uncontended
 * path is one trip into C: acquire, pcall fn, finish. Waiting is the Lua
 * layer's join hook.
 */
static int lsf_call(lua_State *L) {
  lsf_group *ug = (lsf_group *)lua_touserdata(L, 1);
  sf_group *g = ug && lua_rawlen(L, 1) == sizeof *ug && ug->tag == &group_tag
                && ug->g ? ug->g : check_group(L, 1, 1, "call");
  size_t len;
  /* a string, or a number turned into one in place, as check_key does */
  const char *key = lua_tolstring(L, 2, &len);
  if (!key)
    key = check_key(L, 2, &len, 1, 1, "call"); /* raises */
  lsf_ctx *cx = (lsf_ctx *)lua_touserdata(L, UV_CTX);
  lsf_guard *gd;
  sf_call *c;
  int st, main;
  check_fn(L, 3, 1, 2, "call");
  main = L == cx->main_L;
  if (!main) {
    main = lua_pushthread(L);
    lua_pop(L, 1);
    if (main)
      cx->main_L = L;
  }
  if (main) {
    /* the main thread lives as long as the state: its guard is cached */
    gd = cx->main_guard;
    if (!gd) {
      gd = cx->main_guard = guard_push(L);
      lua_pop(L, 1);
    }
  } else {
    gd = guard_peek(L); /* the guard, or nil */
  }
  st = sf_acquire(g, key, len, (uintptr_t)cx, owner_of(L, gd),
                  SF_ACQ_COUNT_CALL, &c);
  if (st == SF_LEADER) {
    if (!gd) {
      lua_pop(L, 1);
      gd = guard_push(L); /* with the id acquire was given */
    }
    if (guard_add(gd, c) != 0) {
      int shared;
      unsigned nlocal;
      sf_finish(c, 0, &shared, &nlocal);
      return raise_nomem(L);
    }
    if (main)
      return lead_run(L, gd, 3); /* msgh key fn args... */
    lua_insert(L, 3);           /* msgh key guard fn args... */
    return lead_run(L, gd, 4);
  }
  if (!main)
    lua_pop(L, 1); /* the guard */
  if (st == SF_RECURSIVE)
    return raise_recursive(L, key, len);
  if (st != SF_JOINED && st != SF_FOREIGN)
    return raise_nomem(L);
  /* join(g, status, call, key, fn, ...) */
  lua_pushinteger(L, st == SF_JOINED ? ST_JOINED : ST_FOREIGN);
  lua_pushlightuserdata(L, c);
  lsf_insertn(L, 2, 2);             /* g st call key fn args... */
  lua_rawgeti(L, UV_HOOKS, HOOK_JOIN);
  lua_insert(L, 1);
  lua_callk(L, lua_gettop(L) - 1, LUA_MULTRET, 0, LSF_K(results_k));
  return LSF_KCALL(results_k, L, LUA_OK, 0);
}

#endif /* LSF_HAVE_PCALLK */

/* ---- values that cross states ---- */

/*
 * A payload is a flat byte string written by the leader and read by each
 * foreign waiter into its own state. Tags, one byte each:
 *   n nil   f false   t true   i integer   d float   s string   l light
 *   userdata   T table (then key/value pairs, then e)   R a table met before
 * Metatables are not copied; cycles and shared subtables come out as such.
 */
enum { XF_RESULT, XF_PANIC, XF_FAIL };

#define XF_MAX_DEPTH 200

typedef struct lsf_payload {
  int kind;
  size_t len;
  unsigned char data[1];
} lsf_payload;

typedef struct xbuf {
  unsigned char *p;
  size_t len, cap;
  int nomem;
  const char *bad; /* type name of a value that can't cross */
  int seen;        /* stack index of the table -> id map, or 0 */
  uint32_t ntables;
} xbuf;

static void xput(xbuf *b, const void *src, size_t n) {
  if (b->nomem)
    return;
  if (b->len + n > b->cap) {
    size_t ncap = b->cap ? b->cap : 64;
    unsigned char *np;
    while (ncap < b->len + n)
      ncap *= 2;
    np = (unsigned char *)realloc(b->p, ncap);
    if (!np) {
      b->nomem = 1;
      return;
    }
    b->p = np;
    b->cap = ncap;
  }
  memcpy(b->p + b->len, src, n);
  b->len += n;
}

static void xtag(xbuf *b, char tag) {
  xput(b, &tag, 1);
}

static void xstring(xbuf *b, const char *s, size_t len) {
  xtag(b, 's');
  xput(b, &len, sizeof len);
  xput(b, s, len);
}

static void xencode(lua_State *L, xbuf *b, int idx, int depth) {
  if (b->bad || b->nomem)
    return;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
  case LUA_TNONE:
    xtag(b, 'n');
    break;
  case LUA_TBOOLEAN:
    xtag(b, lua_toboolean(L, idx) ? 't' : 'f');
    break;
  case LUA_TNUMBER:
#if LSF_HAVE_INTEGERS
    if (lua_isinteger(L, idx)) {
      lua_Integer i = lua_tointeger(L, idx);
      xtag(b, 'i');
      xput(b, &i, sizeof i);
      break;
    }
#endif
    {
      lua_Number d = lua_tonumber(L, idx);
      xtag(b, 'd');
      xput(b, &d, sizeof d);
    }
    break;
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    xstring(b, s, len);
    break;
  }
  case LUA_TLIGHTUSERDATA: {
    void *p = lua_touserdata(L, idx);
    xtag(b, 'l');
    xput(b, &p, sizeof p);
    break;
  }
  case LUA_TTABLE: {
    uint32_t id;
    if (depth >= XF_MAX_DEPTH) {
      b->bad = "table nested too deep";
      return;
    }
    if (!lua_checkstack(L, 4)) {
      b->nomem = 1;
      return;
    }
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    if (!b->seen) {
      lua_newtable(L);
      b->seen = lua_gettop(L);
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, b->seen);
    if (!lua_isnil(L, -1)) {
      id = (uint32_t)lua_tonumber(L, -1);
      lua_pop(L, 1);
      xtag(b, 'R');
      xput(b, &id, sizeof id);
      return;
    }
    lua_pop(L, 1);
    id = b->ntables++;
    lua_pushvalue(L, idx);
    lua_pushnumber(L, (lua_Number)id);
    lua_rawset(L, b->seen);
    xtag(b, 'T');
    xput(b, &id, sizeof id);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      xencode(L, b, -2, depth + 1);
      xencode(L, b, -1, depth + 1);
      lua_pop(L, 1);
      if (b->bad || b->nomem) {
        lua_pop(L, 1);
        return;
      }
    }
    xtag(b, 'e');
    break;
  }
  default:
    b->bad = luaL_typename(L, idx);
    break;
  }
}

static lsf_payload *xfinish(xbuf *b, int kind) {
  lsf_payload *p;
  if (b->nomem) {
    free(b->p);
    return NULL;
  }
  p = (lsf_payload *)malloc(sizeof *p + b->len);
  if (p) {
    p->kind = kind;
    p->len = b->len;
    if (b->len)
      memcpy(p->data, b->p, b->len);
  }
  free(b->p);
  return p;
}

static void xinit(xbuf *b) {
  memset(b, 0, sizeof *b);
}

static lsf_payload *xfail(lua_State *L, const char *what, const char *key,
                          size_t klen, const char *type) {
  xbuf b;
  size_t len;
  const char *msg;
  int top = lua_gettop(L);
  lua_pushfstring(L, "singleflight: %s for key ", what);
  push_quoted_key(L, key, klen);
  lua_pushfstring(L, " cannot cross Lua states (%s)", type);
  lua_concat(L, 3);
  msg = lua_tolstring(L, -1, &len);
  xinit(&b);
  xput(&b, msg, len);
  lua_settop(L, top);
  return xfinish(&b, XF_FAIL);
}

static lsf_payload *xfer_encode_result(lua_State *L, int v, int err,
                                       const char *key, size_t klen) {
  xbuf b;
  int top = lua_gettop(L);
  xinit(&b);
  xencode(L, &b, v, 0);
  xencode(L, &b, err, 0);
  lua_settop(L, top);
  if (b.bad) {
    const char *type = b.bad;
    free(b.p);
    return xfail(L, "result", key, klen, type);
  }
  return xfinish(&b, XF_RESULT);
}

/* A panic's value crosses as it is or, when it can't, as its text. */
static lsf_payload *xfer_encode_panic(lua_State *L, int v, int tb,
                                      const char *key, size_t klen) {
  xbuf b;
  int top = lua_gettop(L);
  size_t len;
  const char *s;
  (void)key;
  (void)klen;
  xinit(&b);
  xencode(L, &b, v, 0);
  if (b.bad) {
    free(b.p);
    xinit(&b);
    lua_rawgeti(L, UV_HOOKS, HOOK_TOSTRING); /* a tostring that can't raise */
    if (lua_isfunction(L, -1)) {
      lua_pushvalue(L, v);
      if (lua_pcall(L, 1, 1, 0) != 0 || !lua_isstring(L, -1)) {
        lua_pop(L, 1);
        lua_pushstring(L, luaL_typename(L, v));
      }
    } else {
      lua_pop(L, 1);
      lua_pushstring(L, luaL_typename(L, v));
    }
    s = lua_tolstring(L, -1, &len);
    xstring(&b, s, len);
  }
  s = lua_tolstring(L, tb, &len);
  if (s)
    xstring(&b, s, len);
  else
    xtag(&b, 'n');
  lua_settop(L, top);
  return xfinish(&b, XF_PANIC);
}

static void xfer_free(void *p) {
  free(p);
}

typedef struct xreader {
  const unsigned char *p, *end;
  int refs; /* stack index of id -> table */
} xreader;

static int xget(xreader *r, void *dst, size_t n) {
  if ((size_t)(r->end - r->p) < n)
    return -1;
  memcpy(dst, r->p, n);
  r->p += n;
  return 0;
}

static int xdecode(lua_State *L, xreader *r) {
  char tag;
  if (xget(r, &tag, 1) != 0 || !lua_checkstack(L, 4))
    return -1;
  switch (tag) {
  case 'n':
    lua_pushnil(L);
    return 0;
  case 'f':
    lua_pushboolean(L, 0);
    return 0;
  case 't':
    lua_pushboolean(L, 1);
    return 0;
#if LSF_HAVE_INTEGERS
  case 'i': {
    lua_Integer i;
    if (xget(r, &i, sizeof i) != 0)
      return -1;
    lua_pushinteger(L, i);
    return 0;
  }
#endif
  case 'd': {
    lua_Number d;
    if (xget(r, &d, sizeof d) != 0)
      return -1;
    lua_pushnumber(L, d);
    return 0;
  }
  case 's': {
    size_t len;
    if (xget(r, &len, sizeof len) != 0 || (size_t)(r->end - r->p) < len)
      return -1;
    lua_pushlstring(L, (const char *)r->p, len);
    r->p += len;
    return 0;
  }
  case 'l': {
    void *ptr;
    if (xget(r, &ptr, sizeof ptr) != 0)
      return -1;
    lua_pushlightuserdata(L, ptr);
    return 0;
  }
  case 'R': {
    uint32_t id;
    if (xget(r, &id, sizeof id) != 0 || !r->refs)
      return -1;
    lua_rawgeti(L, r->refs, (int)id + 1);
    return 0;
  }
  case 'T': {
    uint32_t id;
    int t;
    if (xget(r, &id, sizeof id) != 0)
      return -1;
    if (!r->refs) {
      lua_newtable(L);
      r->refs = lua_gettop(L);
    }
    lua_newtable(L);
    t = lua_gettop(L);
    lua_pushvalue(L, t);
    lua_rawseti(L, r->refs, (int)id + 1);
    for (;;) {
      if (r->p < r->end && *r->p == 'e') {
        r->p++;
        return 0;
      }
      if (xdecode(L, r) != 0 || xdecode(L, r) != 0)
        return -1;
      if (lua_isnil(L, -2)) { /* can't happen from xencode */
        lua_pop(L, 2);
        continue;
      }
      lua_rawset(L, t);
    }
  }
  default:
    return -1;
  }
}

/* Pushes what a foreign waiter returns from wait (see lsf_wait). */
static int xfer_decode(lua_State *L, const lsf_payload *p) {
  xreader r;
  int top = lua_gettop(L), ok;
  if (!p) {
    lua_pushliteral(L, "error");
    lua_pushliteral(L, "singleflight: not enough memory to copy the result");
    return 2;
  }
  if (p->kind == XF_FAIL) {
    lua_pushliteral(L, "error");
    lua_pushlstring(L, (const char *)p->data, p->len);
    return 2;
  }
  r.p = p->data;
  r.end = p->data + p->len;
  r.refs = 0;
  lua_pushliteral(L, "done");
  lua_pushboolean(L, p->kind == XF_RESULT);
  /* one table of refs for both values: err may refer to a table of v */
  ok = xdecode(L, &r) == 0 && xdecode(L, &r) == 0;
  if (ok && r.refs) /* keep it out of the results */
    lua_remove(L, r.refs);
  if (!ok) {
    lua_settop(L, top);
    lua_pushliteral(L, "error");
    lua_pushliteral(L, "singleflight: corrupt payload");
    return 2;
  }
  return lua_gettop(L) - top;
}

/*
 * publish(call, ok, v, err, traceback): gives the foreign waiters their
 * copy. ok false: v is the panic's value and err its traceback.
 */
typedef struct encode_job {
  int ok;
  const char *key;
  size_t klen;
  lsf_payload *p;
} encode_job;

/* encode(job, v, err, traceback), protected: a memory error while copying
 * must not keep the call from being published. */
static int encode_protected(lua_State *L) {
  encode_job *j = (encode_job *)lua_touserdata(L, 1);
  j->p = j->ok ? xfer_encode_result(L, 2, 3, j->key, j->klen)
               : xfer_encode_panic(L, 2, 4, j->key, j->klen);
  return 0;
}

static int lsf_publish(lua_State *L) {
  sf_call *c = check_call(L, 1);
  encode_job j;
  int i;
  j.ok = lua_toboolean(L, 2);
  j.key = sf_call_key(c, &j.klen);
  j.p = NULL;
  lua_settop(L, 5);
  for (i = 1; i <= NUPVALUES; i++)
    lua_pushvalue(L, lua_upvalueindex(i));
  lua_pushcclosure(L, encode_protected, NUPVALUES);
  lua_pushlightuserdata(L, &j);
  lua_pushvalue(L, 3);
  lua_pushvalue(L, 4);
  lua_pushvalue(L, 5);
  if (lua_pcall(L, 4, 0, 0) != 0)
    lua_pop(L, 1); /* no payload: the waiters are told it could not be copied */
  sf_publish(c, j.p, xfer_free);
  return 0;
}

/* decode(payload), protected: the call is released whatever happens. */
static int decode_protected(lua_State *L) {
  const lsf_payload *p = (const lsf_payload *)lua_touserdata(L, 1);
  lua_pop(L, 1);
  return xfer_decode(L, p);
}

/*
 * wait(call, timeout) -> "done", ok, v, err, traceback
 *                      | "timeout" | "abandoned" | "error", message
 * A foreign waiter blocks its thread until the leader publishes.
 */
static int lsf_wait(lua_State *L) {
  sf_call *c = check_call(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  void *payload = NULL;
  int st = sf_wait(c, timeout, &payload);
  int n;
  switch (st) {
  case SF_DONE: {
    int top = lua_gettop(L), status;
    lua_pushcfunction(L, decode_protected);
    lua_pushlightuserdata(L, payload);
    status = lua_pcall(L, 1, LUA_MULTRET, 0);
    sf_release(c); /* the payload goes with the last reference */
    if (status != 0)
      return lua_error(L);
    n = lua_gettop(L) - top;
    return n;
  }
  case SF_TIMEDOUT:
    sf_release(c);
    lua_pushliteral(L, "timeout");
    return 1;
  default:
    sf_release(c);
    lua_pushliteral(L, "abandoned");
    return 1;
  }
}

/* ---- odds and ends ---- */

static int lsf_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)sf_now());
  return 1;
}

static int lsf_footprint(lua_State *L) {
  lua_Number len = luaL_optnumber(L, 1, 0);
  lua_pushnumber(L, (lua_Number)sf_call_footprint((size_t)len));
  return 1;
}

/* quote(key): the key as the module's messages show it. */
static int lsf_quote(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  push_quoted_key(L, s, len);
  return 1;
}

/* set_hooks{msgh=, join=, leader=, abandon=} */
static int lsf_set_hooks(lua_State *L) {
  static const char *const names[] = {"msgh", "join", "leader", "abandon",
                                      "tostring"};
  int i;
  luaL_checktype(L, 1, LUA_TTABLE);
  for (i = 0; i < 5; i++) {
    lua_getfield(L, 1, names[i]);
    luaL_argcheck(L, lua_isfunction(L, -1), 1, names[i]);
    lua_rawseti(L, UV_HOOKS, HOOK_MSGH + i);
  }
  return 0;
}

static const luaL_Reg functions[] = {
  {"new", lsf_new},
  {"open", lsf_open},
  {"acquire", lsf_acquire},
  {"finish", lsf_finish},
  {"unjoin", lsf_unjoin},
  {"leave", lsf_leave},
  {"publish", lsf_publish},
  {"wait", lsf_wait},
  {"count", lsf_count},
  {"closed", lsf_closed},
  {"guard", lsf_current_guard},
  {"alias", lsf_alias},
  {"now", lsf_now},
  {"footprint", lsf_footprint},
  {"quote", lsf_quote},
  {"set_hooks", lsf_set_hooks},
#if LSF_HAVE_PCALLK
  {"call", lsf_call},
  {"lead", lsf_lead},
#endif
  {NULL, NULL}
};

static const luaL_Reg methods[] = {
  {"forget", lsf_forget},
  {"stats", lsf_stats},
  {"close", lsf__group_gc},
  {NULL, NULL}
};

static const luaL_Reg group_metamethods[] = {
  {"__gc", lsf__group_gc},
#if LSF_HAVE_TOCLOSE
  {"__close", lsf__group_gc},
#endif
  {"__tostring", lsf__group_tostring},
  {NULL, NULL}
};

static const luaL_Reg guard_metamethods[] = {
  {"__gc", lsf__guard_gc},
#if LSF_HAVE_TOCLOSE
  {"__close", lsf__guard_close},
#endif
  {NULL, NULL}
};

static void push_upvalues(lua_State *L, int guards, int hooks, int ctx,
                          int group_mt, int guard_mt) {
  lua_pushvalue(L, guards);
  lua_pushvalue(L, hooks);
  lua_pushvalue(L, ctx);
  lua_pushvalue(L, group_mt);
  lua_pushvalue(L, guard_mt);
}

LUALIB_API int luaopen_singleflight_core(lua_State *L);

LUALIB_API int luaopen_singleflight_core(lua_State *L) {
  int guards, hooks, ctx, group_mt, guard_mt;
  lsf_ctx *cx;

  lua_newtable(L); /* guards: coroutine -> guard, weak keys */
  guards = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, guards);
  lua_createtable(L, 4, 0); /* hooks */
  hooks = lua_gettop(L);
  cx = (lsf_ctx *)lua_newuserdata(L, sizeof *cx);
  memset(cx, 0, sizeof *cx);
  ctx = lua_gettop(L);
  luaL_newmetatable(L, GROUP_MT);
  group_mt = lua_gettop(L);
  luaL_newmetatable(L, GUARD_MT);
  guard_mt = lua_gettop(L);

  push_upvalues(L, guards, hooks, ctx, group_mt, guard_mt);
  luaL_setfuncs(L, guard_metamethods, NUPVALUES);
  lua_pushliteral(L, GUARD_MT);
  lua_setfield(L, guard_mt, "__name");

  push_upvalues(L, guards, hooks, ctx, group_mt, guard_mt);
  lua_pushvalue(L, group_mt);
  lua_insert(L, -(NUPVALUES + 1));
  luaL_setfuncs(L, group_metamethods, NUPVALUES);
  lua_pop(L, 1);
  lua_pushliteral(L, GROUP_MT);
  lua_setfield(L, group_mt, "__name");
  lua_createtable(L, 0, 8); /* methods */
  push_upvalues(L, guards, hooks, ctx, group_mt, guard_mt);
  luaL_setfuncs(L, methods, NUPVALUES);
  lua_pushvalue(L, -1);
  lua_setfield(L, group_mt, "__index");

  lua_createtable(L, 0, 24); /* the module */
  lua_insert(L, -2);
  lua_setfield(L, -2, "methods");
  push_upvalues(L, guards, hooks, ctx, group_mt, guard_mt);
  luaL_setfuncs(L, functions, NUPVALUES);
  lua_pushboolean(L, LSF_HAVE_PCALLK);
  lua_setfield(L, -2, "has_c_call");
  lua_pushboolean(L, LSF_HAVE_TOCLOSE);
  lua_setfield(L, -2, "has_close");
  return 1;
}
