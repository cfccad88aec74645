/*
 * lsf_hold.c: the holders of in-flight calls.
 *
 *   singleflight.Guard  one per coroutine that leads calls: the stack of
 *                       calls it leads, each with the leader's reference.
 *                       Found through a weak-keyed table indexed by the
 *                       coroutine, so nothing here keeps a coroutine alive;
 *                       when the coroutine goes away (collected, or closed
 *                       on 5.4) the guard's finalizer abandons its calls.
 *   singleflight.Ref    one reference on one call for one party: a
 *                       same-state or foreign joiner, a future.
 *
 * A holder is made before the reference it will hold: acquire takes a
 * spare guard and a spare ref (made ahead, when none is left) so that no
 * allocation can fail between the core handing out a reference and the
 * holder receiving it.
 *
 * Inside nginx, a guard also notes where nginx's Lua module keeps its
 * coroutine (see anchors below): a sure sign, read in constant time, that
 * a leader's light thread was killed or its request ended.
 */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include "lsf.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- anchors ----
 *
 * nginx's Lua module (ngx_lua, OpenResty) keeps every coroutine it runs
 * for nginx (a request's entry thread, a light thread, a timer's) in a
 * table of the registry, at an integer index of its own, and takes it out
 * when the coroutine is killed (ngx.thread.kill, ngx.exit, a client that
 * went away) or its request ends. The table's registry key is the address
 * of a global variable of the module, which nginx loads with its symbols
 * visible to the modules loaded after it. A coroutine that was there when
 * it first led and is there no longer was let go by nginx: whatever still
 * holds it (a light thread's handle in a local, say), nginx will never
 * resume it. Coroutines made by the application (coroutine.create) are
 * never there, and are judged by other means.
 */

static const char *const anchor_symbols[] = {
  "ngx_http_lua_coroutines_key", "ngx_stream_lua_coroutines_key", NULL
};

/* Pushes nginx's table of running coroutines, or nil. */
static void push_anchors(lua_State *L, const lsf_ctx *cx) {
  if (!cx->anchors) {
    lua_pushnil(L);
    return;
  }
  lua_pushlightuserdata(L, cx->anchors);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* The registry key of nginx's table of running coroutines in this state,
 * or NULL outside nginx. Light userdata hold 47 bits on LuaJIT's 64-bit
 * builds: ngx_lua masks its keys the same way. */
void *lsf_anchors_find(lua_State *L) {
  int i;
  for (i = 0; anchor_symbols[i]; i++) {
    void *sym = dlsym(RTLD_DEFAULT, anchor_symbols[i]);
    if (sym) {
      void *key = (void *)((uintptr_t)sym & (((uintptr_t)1 << 47) - 1));
      int found;
      lua_pushlightuserdata(L, key);
      lua_rawget(L, LUA_REGISTRYINDEX);
      found = lua_istable(L, -1);
      lua_pop(L, 1);
      if (found)
        return key;
    }
  }
  return NULL;
}

/* Where nginx keeps the running coroutine, or 0. One walk of the table:
 * done once per coroutine, when it first leads. Allocates nothing. */
static int anchor_of_running(lua_State *L, const lsf_ctx *cx) {
  int slot = 0;
  if (!cx->anchors || !lua_checkstack(L, 4))
    return 0;
  push_anchors(L, cx);
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_tothread(L, -1) == L && lua_type(L, -2) == LUA_TNUMBER) {
        slot = (int)lua_tointeger(L, -2);
        lua_pop(L, 2);
        break;
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  return slot;
}

/* Is the guard at index g's coroutine still where nginx kept it? t: the
 * index of nginx's table. The coroutine is the one UV_TRACKED_CO holds
 * weakly: one collected since is gone (the table would have kept it), and
 * a live one is compared as an object, never by an address that a new
 * coroutine could reuse. */
static int still_anchored(lua_State *L, int t, int g) {
  const lsf_guard *gd = (const lsf_guard *)lua_touserdata(L, g);
  int there;
  lua_pushvalue(L, g);
  lua_rawget(L, UV_TRACKED_CO);
  lua_rawgeti(L, t, gd->anchor);
  there = lua_type(L, -2) == LUA_TTHREAD && lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return there;
}

/*
 * The guards of coroutines that nginx kept are tracked (UV_TRACKED holds
 * them, not their coroutines), so that a sweep finds the calls of one that
 * nginx let go even after the collector took the coroutine and before the
 * guard's finalizer runs (a cycle later, on LuaJIT). A guard leaves the
 * set when the sweep finds its coroutine let go (orphans), or, leading
 * nothing, when the set is pruned: installing a guard prunes it once it
 * has doubled since the last prune, so the set stays as large as the
 * coroutines nginx keeps that have led.
 */
static void anchors_prune(lua_State *L, lsf_ctx *cx) {
  int n = 0, t;
  push_anchors(L, cx);
  t = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, UV_TRACKED)) { /* guard, true */
    const lsf_guard *gd = (const lsf_guard *)lua_touserdata(L, -2);
    lua_pop(L, 1);
    if (gd->height == 0 && (!lua_istable(L, t) || !still_anchored(L, t, lua_gettop(L)))) {
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, UV_TRACKED); /* clearing a field never allocates */
    } else {
      n++;
    }
  }
  lua_settop(L, t - 1);
  cx->ntracked = n;
  cx->prune_at = 2 * n + 64;
}

static int track_protected(lua_State *L) {
  /* 1: the guard, 2: the tracked set, 3: guard -> coroutine (weak) */
  lua_pushvalue(L, 1);
  lua_pushthread(L);
  lua_rawset(L, 3);
  lua_pushvalue(L, 1);
  lua_pushboolean(L, 1);
  lua_rawset(L, 2);
  return 0;
}

/* Tracks the running coroutine's guard, just installed. Untracked if
 * memory runs out: anchored() still sees its coroutine let go. */
static void anchors_track(lua_State *L, lsf_ctx *cx) {
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 6))
    return;
  if (cx->ntracked >= cx->prune_at)
    anchors_prune(L, cx);
  lua_pushcfunction(L, track_protected);
  lua_pushthread(L);
  lua_rawget(L, UV_GUARDS);
  lua_pushvalue(L, UV_TRACKED);
  lua_pushvalue(L, UV_TRACKED_CO);
  if (lua_pcall(L, 3, 0, 0) == 0)
    cx->ntracked++;
  lua_settop(L, top);
}

/* orphans() -> guard, ...: the tracked guards that still lead calls and
 * whose coroutine nginx let go (killed, its request ended, or collected
 * since). They are tracked no longer: the caller abandons their calls. */
static int lsf_orphans(lua_State *L) {
  lsf_ctx *cx = lsf_ctx_of(L);
  int n = 0, i;
  lua_settop(L, 0);
  lua_newtable(L); /* 1: the list */
  push_anchors(L, cx); /* 2 */
  if (!lua_istable(L, 2))
    return 0;
  lua_pushnil(L);
  while (lua_next(L, UV_TRACKED)) { /* 3: guard, 4: true */
    const lsf_guard *gd = (const lsf_guard *)lua_touserdata(L, 3);
    lua_pop(L, 1);
    if (!still_anchored(L, 2, 3)) {
      if (gd->height > 0) {
        lua_pushvalue(L, 3);
        lua_rawseti(L, 1, ++n);
      }
      lua_pushvalue(L, 3);
      lua_pushnil(L);
      lua_rawset(L, UV_TRACKED);
      cx->ntracked--;
    }
  }
  luaL_checkstack(L, n, "too many orphans");
  for (i = 1; i <= n; i++)
    lua_rawgeti(L, 1, i);
  return n;
}

/* anchored(co) -> true if nginx still keeps co where it kept it when co
 * first led, false if it no longer does (co was let go), nil if there is
 * nothing to go by (outside nginx, co never led, or nginx never kept it). */
static int lsf_anchored(lua_State *L) {
  const lsf_ctx *cx = lsf_ctx_of(L);
  lua_State *co;
  lsf_guard *gd;
  luaL_checktype(L, 1, LUA_TTHREAD);
  co = lua_tothread(L, 1);
  lua_settop(L, 1);
  lua_rawget(L, UV_GUARDS); /* 1: the guard */
  gd = (lsf_guard *)lua_touserdata(L, 1);
  if (!gd || gd->anchor <= 0 || !cx->anchors) {
    lua_pushnil(L);
    return 1;
  }
  push_anchors(L, cx);
  if (!lua_istable(L, -1)) {
    lua_pushnil(L);
    return 1;
  }
  lua_rawgeti(L, -1, gd->anchor);
  lua_pushboolean(L, lua_tothread(L, -1) == co);
  return 1;
}

/* anchors() -> whether nginx's table of running coroutines was found. */
static int lsf_anchors(lua_State *L) {
  lua_pushboolean(L, lsf_ctx_of(L)->anchors != NULL);
  return 1;
}

/* ---- guards ---- */

/* The holder at idx if its metatable is the one at mt (an upvalue): a
 * compare where luaL_checkudata would look the name up in the registry;
 * anything else raises luaL_checkudata's error. */
static void *check_holder(lua_State *L, int idx, int mt, const char *name) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_getmetatable(L, idx)) {
    int same = lua_rawequal(L, -1, mt);
    lua_pop(L, 1);
    if (same)
      return p;
  }
  return luaL_checkudata(L, idx, name);
}

lsf_guard *lsf_check_guard(lua_State *L, int idx) {
  return (lsf_guard *)check_holder(L, idx, UV_GUARD_MT, GUARD_MT);
}

static lsf_guard *guard_new(lua_State *L) {
  lsf_guard *gd = (lsf_guard *)lua_newuserdata(L, sizeof *gd);
  memset(gd, 0, sizeof *gd);
  gd->stack = gd->inl;
  gd->cap = GUARD_INLINE;
  lua_pushvalue(L, UV_GUARD_MT);
  lua_setmetatable(L, -2);
  return gd;
}

static lsf_ref *ref_new(lua_State *L) {
  lsf_ref *r = (lsf_ref *)lua_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  lua_pushvalue(L, UV_REF_MT);
  lua_setmetatable(L, -2);
  return r;
}

/* Makes the spares that are missing; raises on a memory error, before
 * anything was acquired. */
void lsf_ensure_spares(lua_State *L, lsf_ctx *cx) {
  if (!cx->spare_guard) {
    lsf_guard *gd = guard_new(L);
    gd->id = ++cx->next_id;
    gd->domain = (uintptr_t)cx;
    lua_rawseti(L, UV_SPARES, SPARE_GUARD);
    cx->spare_guard = gd;
  }
  if (!cx->spare_ref) {
    lsf_ref *r = ref_new(L);
    lua_rawseti(L, UV_SPARES, SPARE_REF);
    cx->spare_ref = r;
  }
}

/* Room for one more call, before acquiring: raises if there is none. */
static void guard_reserve(lua_State *L, lsf_guard *gd) {
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
      lsf_raise_nomem(L);
    gd->stack = ns;
    gd->cap = ncap;
  }
}

/*
 * The running coroutine's guard, or the spare guard when it has none yet
 * (*spare = 1): its id is what the core compares for recursion. Either has
 * room for one more call. The main thread's is cached and not pushed;
 * a coroutine's is pushed (it is the leader frame's to close, on 5.4).
 * Spares must exist.
 */
lsf_guard *lsf_guard_for_acquire(lua_State *L, lsf_ctx *cx, int *spare) {
  lsf_guard *gd;
  *spare = 0;
  if (L == cx->main_L && cx->main_guard) {
    gd = cx->main_guard;
  } else {
    if (lua_pushthread(L)) {
      cx->main_L = L;
      lua_rawget(L, UV_GUARDS);
      gd = (lsf_guard *)lua_touserdata(L, -1);
      lua_pop(L, 1);
      if (gd) {
        cx->main_guard = gd;
      } else {
        gd = cx->spare_guard;
        *spare = 1;
      }
    } else {
      lua_rawget(L, UV_GUARDS);
      gd = (lsf_guard *)lua_touserdata(L, -1);
      if (!gd) {
        lua_pop(L, 1);
        lua_rawgeti(L, UV_SPARES, SPARE_GUARD);
        gd = cx->spare_guard;
        *spare = 1;
      }
    }
  }
  guard_reserve(L, gd);
  return gd;
}

/* The running coroutine's guard, or NULL; pushes nothing. */
lsf_guard *lsf_guard_running(lua_State *L, lsf_ctx *cx) {
  lsf_guard *gd;
  if (L == cx->main_L)
    return cx->main_guard;
  lua_pushthread(L);
  lua_rawget(L, UV_GUARDS);
  gd = (lsf_guard *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  return gd;
}

static int install_protected(lua_State *L) {
  /* 1: the guard, 2: the guards table, 3: the owners table */
  const lsf_guard *gd = (const lsf_guard *)lua_touserdata(L, 1);
  lua_pushthread(L);
  lua_pushvalue(L, 1);
  lua_rawset(L, 2);
  lua_pushvalue(L, 1);
  lua_rawseti(L, 3, (lua_Integer)gd->id);
  return 0;
}

/*
 * The spare guard becomes the running coroutine's. Returns 0, or -1 on a
 * memory error (the guard stays the spare).
 */
int lsf_guard_install(lua_State *L, lsf_guard *gd) {
  lsf_ctx *cx = lsf_ctx_of(L);
  int top = lua_gettop(L);
  lua_pushcfunction(L, install_protected);
  lua_rawgeti(L, UV_SPARES, SPARE_GUARD);
  lua_pushvalue(L, UV_GUARDS);
  lua_pushvalue(L, UV_OWNERS);
  if (lua_pcall(L, 3, 0, 0) != 0) {
    lua_settop(L, top);
    return -1;
  }
  cx->spare_guard = NULL;
  lua_pushnil(L);
  lua_rawseti(L, UV_SPARES, SPARE_GUARD); /* a nil store never allocates */
  if (L == cx->main_L) {
    cx->main_guard = gd;
  } else if ((gd->anchor = anchor_of_running(L, cx)) > 0) {
    anchors_track(L, cx);
  }
  return 0;
}

void lsf_guard_push(lsf_guard *gd, sf_call *c) {
  gd->stack[gd->height++] = c; /* room was reserved */
}

/* Where the call at address addr is on the guard (innermost first), or -1.
 * The address is only compared, never followed. */
int lsf_guard_find(const lsf_guard *gd, uintptr_t addr) {
  int i;
  for (i = gd->height - 1; i >= 0; i--) {
    if ((uintptr_t)gd->stack[i] == addr)
      return i;
  }
  return -1;
}

/* Takes the call at stack[i] off the guard. */
static void guard_remove(lsf_guard *gd, int i) {
  memmove(&gd->stack[i], &gd->stack[i + 1],
          sizeof *gd->stack * (size_t)(gd->height - 1 - i));
  gd->height--;
}

/* Takes c off the guard; 0 if it was not there. The calls above it on
 * the guard were acquired by the same coroutine inside c's lead and never
 * finished (an error between their acquire and their fn, as a stack
 * overflow raised by the protected call that was to run fn): nothing can
 * have joined them in this state meanwhile, and they are abandoned, so
 * that their keys are free. */
int lsf_guard_pop(lsf_guard *gd, sf_call *c) {
  int i = lsf_guard_find(gd, (uintptr_t)c);
  if (i < 0)
    return 0;
  while (gd->height > i + 1)
    sf_abandon(gd->stack[--gd->height]);
  guard_remove(gd, i);
  return 1;
}

/* Abandons the calls at stack[from..height), innermost first, and pushes
 * each as a light userdata (the Lua layer wakes their same-state waiters;
 * those hold references, so the address stays theirs while they wait).
 * Returns how many. */
static int guard_abandon_from(lua_State *L, lsf_guard *gd, int from) {
  int n = 0;
  if (from < 0)
    from = 0;
  while (gd->height > from) {
    sf_call *c = gd->stack[--gd->height];
    sf_abandon(c);
    if (lua_checkstack(L, 1)) {
      lua_pushlightuserdata(L, c);
      n++;
    }
  }
  return n;
}

/* abandon(guard) -> calls...: the guard's coroutine went away (collected:
 * every call). abandon(guard, true) -> {calls} | nothing: a leader frame of
 * it was closed (5.4: the calls from that frame's up; on every normal
 * return, none). */
static int lsf_abandon(lua_State *L) {
  lsf_guard *gd = lsf_check_guard(L, 1);
  int closing = lua_toboolean(L, 2);
  lua_settop(L, 0);
  if (closing) {
    int mine = gd->marks, n, i;
    if (mine <= 0)
      return 0;
    gd->marks--;
    if (gd->height <= mine - 1)
      return 0;
    lua_createtable(L, gd->height - (mine - 1), 0);
    n = guard_abandon_from(L, gd, mine - 1);
    for (i = n; i >= 1; i--)
      lua_rawseti(L, 1, i);
    return 1;
  }
  gd->marks = 0;
  if (lsf_ctx_of(L)->main_guard == gd)
    lsf_ctx_of(L)->main_guard = NULL;
  {
    int n = guard_abandon_from(L, gd, 0);
    if (gd->stack != gd->inl) {
      free(gd->stack);
      gd->stack = gd->inl;
      gd->cap = GUARD_INLINE;
    }
    return n;
  }
}

/* leaders() -> coroutine, guard, ...: every coroutine of this state that
 * leads calls now, with its guard. */
static int lsf_leaders(lua_State *L) {
  int n = 0, i;
  lua_settop(L, 0);
  lua_newtable(L); /* 1: co, guard, co, guard, ... */
  lua_pushnil(L);
  while (lua_next(L, UV_GUARDS)) { /* 2: co, 3: guard */
    lsf_guard *gd = (lsf_guard *)lua_touserdata(L, 3);
    if (gd && gd->height > 0) {
      lua_pushvalue(L, 2);
      lua_rawseti(L, 1, ++n);
      lua_rawseti(L, 1, ++n);
    } else {
      lua_pop(L, 1);
    }
  }
  luaL_checkstack(L, n, "too many leaders");
  for (i = 1; i <= n; i++)
    lua_rawgeti(L, 1, i);
  return n;
}

/* calls(guard) -> the calls it leads, outermost first. */
static int lsf_calls(lua_State *L) {
  lsf_guard *gd = lsf_check_guard(L, 1);
  int i;
  luaL_checkstack(L, gd->height, "too many calls");
  for (i = 0; i < gd->height; i++)
    lua_pushlightuserdata(L, gd->stack[i]);
  return gd->height;
}

/* abandon_call(guard, call) -> true if the guard led it and now has
 * abandoned it (its leader is known to be gone). */
static int lsf_abandon_call(lua_State *L) {
  lsf_guard *gd = lsf_check_guard(L, 1);
  sf_call *c = (sf_call *)lua_touserdata(L, 2);
  int found = c && lua_islightuserdata(L, 2) && lsf_guard_pop(gd, c);
  if (found)
    sf_abandon(c);
  lua_pushboolean(L, found);
  return 1;
}

/* The stand-in finalizer, until the Lua layer sets its own. */
static int lsf__guard_gc(lua_State *L) {
  lsf_abandon(L);
  return 0;
}

/* ---- refs ---- */

lsf_ref *lsf_check_ref(lua_State *L, int idx) {
  return (lsf_ref *)check_holder(L, idx, UV_REF_MT, REF_MT);
}

/* Pushes the spare ref, no longer spare (spares must exist). */
lsf_ref *lsf_ref_take_spare(lua_State *L) {
  lsf_ctx *cx = lsf_ctx_of(L);
  lsf_ref *r = cx->spare_ref;
  r->n = 1;
  lua_rawgeti(L, UV_SPARES, SPARE_REF);
  cx->spare_ref = NULL;
  lua_pushnil(L);
  lua_rawseti(L, UV_SPARES, SPARE_REF);
  return r;
}

/*
 * Pushes the ref of the same-state joiners of c, now holding one more
 * reference (the one sf_acquire just gave): the ref of the joiners before,
 * or the spare. (Spares must exist.)
 */
lsf_ref *lsf_ref_join(lua_State *L, sf_call *c) {
  lsf_ref *r;
  lua_pushlightuserdata(L, c);
  lua_rawget(L, UV_JOINS);
  r = (lsf_ref *)lua_touserdata(L, -1);
  if (r && (r->c == c || r->c == NULL)) { /* while n > 0, c is its call */
    if (r->c == c) {
      r->n++;
    } else {
      r->c = c;
      r->kind = REF_LOCAL;
      r->n = 1;
    }
    return r;
  }
  lua_pop(L, 1);
  r = lsf_ref_take_spare(L);
  r->c = c;
  r->kind = REF_LOCAL;
  r->n = 1;
  /* found by the next joiner; a memory error here leaves the ref to its
   * finalizer, which gives the reference back */
  lua_pushlightuserdata(L, c);
  lua_pushvalue(L, -2);
  lua_rawset(L, UV_JOINS);
  return r;
}

/* Gives up one of the references r holds, as `how` says. */
void lsf_ref_drop(lua_State *L, lsf_ref *r, int how) {
  sf_call *c = r->c;
  int r_local = r->kind == REF_LOCAL || r->kind == REF_WATCH;
  if (!c)
    return;
  if (r->n > 1) {
    r->n--;
  } else {
    r->c = NULL;
    r->kind = REF_EMPTY;
    r->n = 0;
  }
  if (how == DROP_UNJOIN)
    sf_unjoin(c, (uintptr_t)lsf_ctx_of(L));
  else if (how == DROP_LEAVE)
    sf_leave(c);
  else if (r_local)
    sf_release_local(c); /* no longer among the leader's state's waiters */
  else
    sf_release(c);
}

/* release(ref [, all]) -> call, abandoned | nothing: gives up one of the
 * references the ref holds (all of them with all: its finalizer). A
 * leader's reference not adopted yet abandons the call: the call's light
 * userdata and true come back, so that the Lua layer wakes its same-state
 * waiters. */
static int lsf_release(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  sf_call *c = r->c;
  int all = lua_toboolean(L, 2);
  if (!c)
    return 0;
  if (r->kind == REF_LEADER) {
    r->c = NULL;
    r->kind = REF_EMPTY;
    r->n = 0;
    sf_abandon(c);
    lua_pushlightuserdata(L, c);
    lua_pushboolean(L, 1);
    return 2;
  }
  /* a foreign ref that never waited (wait spends it): undo the join */
  do
    lsf_ref_drop(L, r, r->kind == REF_FOREIGN ? DROP_UNJOIN : DROP_RELEASE);
  while (all && r->c);
  return 0;
}

static int lsf__ref_gc(lua_State *L) {
  lua_settop(L, 1);
  lua_pushboolean(L, 1);
  lsf_release(L);
  return 0;
}

static int lsf__ref_tostring(lua_State *L) {
  lsf_ref *r = lsf_check_ref(L, 1);
  static const char *const kinds[] = {"empty", "local", "foreign", "leader",
                                      "watch"};
  lua_pushfstring(L, "singleflight.Ref (%s x%d, %p)", kinds[r->kind], (int)r->n,
                  (void *)r);
  return 1;
}

/* alias(co, guard): co runs fn for the guard's coroutine (the helper
 * coroutines of Lua 5.1, where fn can't yield across a pcall). */
static int lsf_alias(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  lsf_check_guard(L, 2);
  lua_settop(L, 2);
  lua_rawset(L, UV_GUARDS);
  return 0;
}

const luaL_Reg lsf_holder_functions[] = {
  {"alias", lsf_alias},
  {"anchored", lsf_anchored},
  {"anchors", lsf_anchors},
  {"orphans", lsf_orphans},
  {"abandon", lsf_abandon},
  {"abandon_call", lsf_abandon_call},
  {"leaders", lsf_leaders},
  {"calls", lsf_calls},
  {"release", lsf_release},
  {NULL, NULL}
};

const luaL_Reg lsf_guard_metamethods[] = {
  {"__gc", lsf__guard_gc},
  {NULL, NULL}
};

const luaL_Reg lsf_ref_metamethods[] = {
  {"__gc", lsf__ref_gc},
  {"__tostring", lsf__ref_tostring},
  {NULL, NULL}
};
