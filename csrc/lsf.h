/*
 * lsf.h: what the files of the Lua binding (module singleflight.core)
 * share. Not installed.
 *
 *   lsf.c        the module: groups and the call primitives the Lua layer
 *                drives (acquire, finish, wait, ...)
 *   lsf_hold.c   the holders of calls: guards (the calls a coroutine
 *                leads) and refs (one joiner's, or a future's, reference)
 *   lsf_copy.c   the value copier: values that cross Lua states
 *   lsf_fast.c   the leader's fast path, for LuaJIT's FFI
 *
 * The binding never calls the Lua layer: it returns statuses that the Lua
 * layer acts on. The Lua layer runs fn; the only user code run from here
 * is a __tostring, for a panic value that must cross states as its text.
 * The holders' finalizers are set by the Lua layer on the metatables made
 * here (C ones stand in until then), so that it can wake the same-state
 * waiters of what a finalizer abandons.
 */
#ifndef LSF_H
#define LSF_H

#include "sf_core.h"
#include "lsf_compat.h"

#define LSF_VERSION "0.3.1-dev"

#define GROUP_MT "singleflight.Group"
#define GUARD_MT "singleflight.Guard"
#define REF_MT "singleflight.Ref"

/* Flags of acquire. */
enum {
  ACQ_COUNT = 1,    /* a new call (not a take-over): count it */
  ACQ_DETACHED = 4, /* lead on behalf of a light thread to come (start):
                       a fresh owner, the reference in a ref */
  ACQ_CHECK = 8,    /* check the arguments, acquire nothing */
  ACQ_DEEPER = 32   /* errors blame one level further up */
};

/* Upvalues shared by every C function of the module. */
#define UV_GUARDS lua_upvalueindex(1) /* coroutine -> guard, weak keys */
#define UV_CTX lua_upvalueindex(2)    /* the state's lsf_ctx */
#define UV_GROUP_MT lua_upvalueindex(3)
#define UV_GUARD_MT lua_upvalueindex(4)
#define UV_REF_MT lua_upvalueindex(5)
#define UV_SPARES lua_upvalueindex(6) /* {guard, ref} made ahead of need */
#define UV_JOINS lua_upvalueindex(7)  /* call -> its same-state joiners' ref */
#define UV_CLOSED lua_upvalueindex(8) /* a guard's stand-in (see lsf.c) */
#define UV_TRACKED lua_upvalueindex(9) /* guard -> true: see lsf_hold.c,
                                          anchors */
#define UV_OWNERS lua_upvalueindex(10) /* guard id -> guard, weak values */
#define UV_JOINABLE lua_upvalueindex(11) /* handle -> {key -> the Lua
                                            layer's flight}, weak keys:
                                            see lsf.c, joinable */
#define UV_TRACKED_CO lua_upvalueindex(12) /* tracked guard -> its
                                              coroutine, weak values */
#define UV_TIERED_MT lua_upvalueindex(13) /* a tiered group's metatable:
                                             see tier() in lsf.c */
#define LSF_NUPVALUES 13

/* Slots of the spares table. */
enum { SPARE_GUARD = 1, SPARE_REF = 2, SPARE_MSGH = 3 /* see lsf.c */ };

struct lsf_guard;

/* One per lua_State: its address is the state's domain in the core. */
typedef struct lsf_ctx {
  uintptr_t next_id;             /* owner ids given so far */
  struct lsf_guard *main_guard;  /* the main thread's, once made */
  lua_State *main_L;             /* the main thread, once seen */
  struct lsf_guard *spare_guard; /* UV_SPARES[1], or NULL */
  struct lsf_ref *spare_ref;     /* UV_SPARES[2], or NULL */
  size_t gc_owed;                /* C memory the collector was not told
                                    of yet (see lsf.c, gc_owe) */
  void *anchors;                 /* the registry key of nginx's table of
                                    running coroutines, or NULL (see
                                    lsf_hold.c, anchors) */
  int ntracked, prune_at;        /* UV_TRACKED's size, and the size at
                                    which installing a guard prunes it */
  int tracebacks;                /* tracebacks the leaders' message
                                    handler left for their lead_done (see
                                    lsf.c, lead_msgh) */
} lsf_ctx;

typedef struct lsf_group {
  const void *tag; /* &lsf_group_tag: a cheap check on the fast path */
  sf_group *g;     /* NULL once closed */
  size_t owed;     /* C memory the collector was told of (see gc_owe) */
} lsf_group;

extern const char lsf_group_tag;

#define GUARD_INLINE 4

/* The calls one coroutine leads, innermost last; one core reference each. */
typedef struct lsf_guard {
  uintptr_t id;     /* the owner the core sees */
  uintptr_t domain; /* and the domain: the state's lsf_ctx */
  int height;
  int marks;     /* leader frames that close the guard (5.4) */
  int anchor;    /* where nginx's table of running coroutines held the
                    guard's coroutine when it got the guard; 0: nowhere */
  int cap;
  sf_call **stack;
  sf_call *inl[GUARD_INLINE];
} lsf_guard;

/* What a ref holds. */
enum {
  REF_EMPTY,   /* nothing (a spare, or released) */
  REF_LOCAL,   /* a same-state joiner's reference */
  REF_FOREIGN, /* a joiner's reference on a call led in another state */
  REF_LEADER,  /* the leader's reference of a call started for a light
                  thread that has not adopted it yet (g:start) */
  REF_WATCH    /* a future's own reference on the call it started */
};

/* The same-state joiners of a call share one ref: it holds n references,
 * one per joiner, each given back by the joiner's release (or leave, or
 * unjoin), all of them by the finalizer. */
typedef struct lsf_ref {
  sf_call *c; /* NULL once all given up */
  int kind;
  unsigned n; /* references held */
} lsf_ref;

/* How a holder gives up one reference. */
enum { DROP_RELEASE, DROP_UNJOIN, DROP_LEAVE };

/* The FFI's view of lsf_fast.c (flow.lua declares the same). */
typedef struct lsf_fast_api {
  int (*lead)(const lsf_group *ug, const char *key, size_t len, lsf_guard *gd,
              unsigned flags, uintptr_t *addr);
} lsf_fast_api;

/* lsf.c */
lsf_ctx *lsf_ctx_of(lua_State *L);
int lsf_raise_nomem(lua_State *L);
void lsf_push_quoted(lua_State *L, const char *s, size_t len);

/* lsf_hold.c */
extern const luaL_Reg lsf_holder_functions[];
extern const luaL_Reg lsf_guard_metamethods[];
extern const luaL_Reg lsf_ref_metamethods[];
lsf_guard *lsf_guard_for_acquire(lua_State *L, lsf_ctx *cx, int *spare);
lsf_guard *lsf_guard_running(lua_State *L, lsf_ctx *cx);
int lsf_guard_install(lua_State *L, lsf_guard *gd);
void lsf_guard_push(lsf_guard *gd, sf_call *c);
int lsf_guard_find(const lsf_guard *gd, uintptr_t addr);
int lsf_guard_pop(lsf_guard *gd, sf_call *c);
lsf_ref *lsf_ref_take_spare(lua_State *L);
lsf_ref *lsf_ref_join(lua_State *L, sf_call *c);
void lsf_ref_drop(lua_State *L, lsf_ref *r, int how);
lsf_ref *lsf_check_ref(lua_State *L, int idx);
lsf_guard *lsf_check_guard(lua_State *L, int idx);
void *lsf_anchors_find(lua_State *L);
void lsf_ensure_spares(lua_State *L, lsf_ctx *cx);

/* lsf_copy.c: payloads for sf_publish, and strings for encode/decode */
void *lsf_encode_payload(lua_State *L, int ok, int a, int b, const char *key,
                         size_t klen);
void lsf_free_payload(void *p);
int lsf_push_payload(lua_State *L, const void *p);
int lsf_encode(lua_State *L);
int lsf_decode(lua_State *L);

/* lsf_fast.c */
extern const luaL_Reg lsf_fast_functions[];

#endif
