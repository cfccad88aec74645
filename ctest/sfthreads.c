/*
 * sfthreads.c: a test-only Lua module (not installed) that runs Lua chunks
 * in new OS threads, each in a fresh lua_State, and gives them objects to
 * coordinate with across states.
 *
 *   sfthreads.spawn(src, ...) -> thread   src(...) in a new thread and state
 *     (luaL_openlibs, the caller's package.path and package.cpath)
 *   thread:join([timeout]) -> true, results... | false, message
 *     raises if the thread is still running after timeout seconds
 *   sfthreads.barrier(n)      b:wait([timeout]) -> true | false (timed out)
 *   sfthreads.cell([n])       c:get(), c:set(n), c:add(n) -> new value,
 *                             c:wait(n [, timeout]) -> true once value >= n
 *   sfthreads.channel()       ch:push(...), ch:pop([timeout]) -> true, ...
 *                             | false (timed out), ch:count()
 *   sfthreads.sleep(seconds)
 *   sfthreads.lightuserdata(n) -> the light userdata for address n
 *
 * With SINGLEFLIGHT_GC_TORTURE set when a thread is spawned, its state's
 * collector runs as spec/gc_torture.lua sets the spec run's.
 *
 * Values that cross (spawn arguments, join results, channel messages) are
 * copied: nil, booleans, numbers, strings, light userdata, tables of these
 * (trees: no cycles) and the shared objects above, which cross by
 * reference (refcounted).
 */
#define _GNU_SOURCE

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CELL_MT "sfthreads.Cell"
#define BARRIER_MT "sfthreads.Barrier"
#define CHANNEL_MT "sfthreads.Channel"
#define THREAD_MT "sfthreads.Thread"
#define MAX_DEPTH 64

LUALIB_API int luaopen_sfthreads(lua_State *L);

/* ---- compat ---- */

#if LUA_VERSION_NUM < 502
static void setfuncs(lua_State *L, const luaL_Reg *l) {
  for (; l->name; l++) {
    lua_pushcfunction(L, l->func);
    lua_setfield(L, -2, l->name);
  }
}
static void *testudata(lua_State *L, int idx, const char *mt) {
  void *p = lua_touserdata(L, idx);
  if (p && lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
    int same;
    luaL_getmetatable(L, mt);
    same = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (same)
      return p;
  }
  return NULL;
}
#else
#define setfuncs(L, l) luaL_setfuncs((L), (l), 0)
#define testudata(L, idx, mt) luaL_testudata((L), (idx), (mt))
#endif

/* ---- time ---- */

static void deadline_after(struct timespec *ts, double secs) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  if (secs > 1e6)
    secs = 1e6;
  ts->tv_sec += (time_t)secs;
  ts->tv_nsec += (long)((secs - (double)(time_t)secs) * 1e9);
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

static void cond_init(pthread_cond_t *cv) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(cv, &ca);
  pthread_condattr_destroy(&ca);
}

/* Waits on cv; returns 0 once the deadline (if any) passed. */
static int cond_wait(pthread_cond_t *cv, pthread_mutex_t *mu,
                     const struct timespec *deadline) {
  if (!deadline) {
    pthread_cond_wait(cv, mu);
    return 1;
  }
  return pthread_cond_timedwait(cv, mu, deadline) != ETIMEDOUT;
}

/* ---- byte buffers ---- */

typedef struct buf {
  char *p;
  size_t len, cap;
} buf;

static void buf_put(lua_State *L, buf *b, const void *src, size_t n) {
  if (b->len + n > b->cap) {
    size_t ncap = b->cap ? b->cap * 2 : 64;
    char *np;
    while (ncap < b->len + n)
      ncap *= 2;
    np = (char *)realloc(b->p, ncap);
    if (!np)
      luaL_error(L, "sfthreads: out of memory");
    b->p = np;
    b->cap = ncap;
  }
  memcpy(b->p + b->len, src, n);
  b->len += n;
}

/* ---- shared objects ---- */

enum { K_CELL, K_BARRIER, K_CHANNEL };
static const char *const kind_mt[] = {CELL_MT, BARRIER_MT, CHANNEL_MT};

typedef struct msg {
  struct msg *next;
  buf data;
} msg;

typedef struct shobj {
  atomic_int refs;
  int kind;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  lua_Number value;            /* cell */
  unsigned n, arrived, gen;    /* barrier */
  msg *head, *tail;            /* channel */
  unsigned count;
} shobj;

static void buf_release(buf *b);

static void obj_release(shobj *o) {
  msg *m, *next;
  if (atomic_fetch_sub(&o->refs, 1) != 1)
    return;
  for (m = o->head; m; m = next) {
    next = m->next;
    buf_release(&m->data);
    free(m);
  }
  pthread_cond_destroy(&o->cv);
  pthread_mutex_destroy(&o->mu);
  free(o);
}

static shobj **push_obj(lua_State *L, shobj *o) {
  shobj **box = (shobj **)lua_newuserdata(L, sizeof *box);
  *box = o;
  luaL_getmetatable(L, kind_mt[o->kind]);
  lua_setmetatable(L, -2);
  return box;
}

static shobj *new_obj(lua_State *L, int kind) {
  shobj *o = (shobj *)calloc(1, sizeof *o);
  if (!o)
    luaL_error(L, "sfthreads: out of memory");
  atomic_init(&o->refs, 1);
  o->kind = kind;
  pthread_mutex_init(&o->mu, NULL);
  cond_init(&o->cv);
  push_obj(L, o);
  return o;
}

static shobj *check_obj(lua_State *L, int idx, int kind) {
  return *(shobj **)luaL_checkudata(L, idx, kind_mt[kind]);
}

static int obj_gc(lua_State *L) {
  shobj **box = (shobj **)lua_touserdata(L, 1);
  if (box && *box) {
    obj_release(*box);
    *box = NULL;
  }
  return 0;
}

/* ---- copying values ---- */

/* Tags: n nil, f false, t true, i integer, d float, s string, l light
 * userdata, o shared object, T table (pairs, then e). */

static void enc(lua_State *L, buf *b, int idx, int depth) {
  shobj *o = NULL;
  int k;
  if (idx < 0)
    idx = lua_gettop(L) + idx + 1;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    buf_put(L, b, "n", 1);
    return;
  case LUA_TBOOLEAN:
    buf_put(L, b, lua_toboolean(L, idx) ? "t" : "f", 1);
    return;
  case LUA_TNUMBER: {
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx)) {
      lua_Integer i = lua_tointeger(L, idx);
      buf_put(L, b, "i", 1);
      buf_put(L, b, &i, sizeof i);
      return;
    }
#endif
    {
      lua_Number d = lua_tonumber(L, idx);
      buf_put(L, b, "d", 1);
      buf_put(L, b, &d, sizeof d);
    }
    return;
  }
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    buf_put(L, b, "s", 1);
    buf_put(L, b, &len, sizeof len);
    buf_put(L, b, s, len);
    return;
  }
  case LUA_TLIGHTUSERDATA: {
    void *p = lua_touserdata(L, idx);
    buf_put(L, b, "l", 1);
    buf_put(L, b, &p, sizeof p);
    return;
  }
  case LUA_TTABLE:
    if (depth >= MAX_DEPTH)
      luaL_error(L, "sfthreads: table too deep (or cyclic) to copy");
    luaL_checkstack(L, 3, "sfthreads: copy");
    buf_put(L, b, "T", 1);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      enc(L, b, -2, depth + 1);
      enc(L, b, -1, depth + 1);
      lua_pop(L, 1);
    }
    buf_put(L, b, "e", 1);
    return;
  case LUA_TUSERDATA:
    for (k = K_CELL; k <= K_CHANNEL && !o; k++) {
      shobj **box = (shobj **)testudata(L, idx, kind_mt[k]);
      if (box)
        o = *box;
    }
    if (o) {
      char rec[1 + sizeof o];
      rec[0] = 'o';
      memcpy(rec + 1, &o, sizeof o);
      buf_put(L, b, rec, sizeof rec); /* all or nothing, then the ref */
      atomic_fetch_add(&o->refs, 1);
      return;
    }
    break;
  default:
    break;
  }
  luaL_error(L, "sfthreads: cannot copy a %s", luaL_typename(L, idx));
}

static int enc_values_p(lua_State *L) {
  buf *b = (buf *)lua_touserdata(L, 1);
  int i, n = lua_gettop(L);
  for (i = 2; i <= n; i++)
    enc(L, b, i, 0);
  return 0;
}

/* Copies the values at [from, to] into a fresh buffer. On failure gives
 * back the references taken so far, leaves the message on the stack and
 * returns -1. */
static int enc_values(lua_State *L, buf *b, int from, int to) {
  int i;
  memset(b, 0, sizeof *b);
  luaL_checkstack(L, to - from + 3, "sfthreads: copy");
  lua_pushcfunction(L, enc_values_p);
  lua_pushlightuserdata(L, b);
  for (i = from; i <= to; i++)
    lua_pushvalue(L, i);
  if (lua_pcall(L, to - from + 2, 0, 0) != 0) {
    buf_release(b);
    return -1;
  }
  return 0;
}

typedef struct reader {
  const char *p, *end;
} reader;

static int rd(reader *r, void *dst, size_t n) {
  if ((size_t)(r->end - r->p) < n)
    return -1;
  memcpy(dst, r->p, n);
  r->p += n;
  return 0;
}

/* Pushes one value; transfers the object references it meets. */
static int dec(lua_State *L, reader *r) {
  char tag;
  if (rd(r, &tag, 1) != 0 || !lua_checkstack(L, 3))
    return -1;
  switch (tag) {
  case 'n':
    lua_pushnil(L);
    return 0;
  case 'f':
  case 't':
    lua_pushboolean(L, tag == 't');
    return 0;
#if LUA_VERSION_NUM >= 503
  case 'i': {
    lua_Integer i;
    if (rd(r, &i, sizeof i) != 0)
      return -1;
    lua_pushinteger(L, i);
    return 0;
  }
#endif
  case 'd': {
    lua_Number d;
    if (rd(r, &d, sizeof d) != 0)
      return -1;
    lua_pushnumber(L, d);
    return 0;
  }
  case 's': {
    size_t len;
    if (rd(r, &len, sizeof len) != 0 || (size_t)(r->end - r->p) < len)
      return -1;
    lua_pushlstring(L, r->p, len);
    r->p += len;
    return 0;
  }
  case 'l': {
    void *p;
    if (rd(r, &p, sizeof p) != 0)
      return -1;
    lua_pushlightuserdata(L, p);
    return 0;
  }
  case 'o': {
    shobj *o;
    if (rd(r, &o, sizeof o) != 0)
      return -1;
    push_obj(L, o);
    return 0;
  }
  case 'T':
    lua_newtable(L);
    for (;;) {
      if (r->p < r->end && *r->p == 'e') {
        r->p++;
        return 0;
      }
      if (dec(L, r) != 0 || dec(L, r) != 0)
        return -1;
      lua_rawset(L, -3);
    }
  default:
    return -1;
  }
}

/* Gives back the object references of a buffer that won't be decoded. */
static void buf_release(buf *b) {
  reader r;
  r.p = b->p;
  r.end = b->p + b->len;
  while (r.p < r.end) {
    char tag = *r.p++;
    size_t len;
    shobj *o;
    if (tag == 'i' || tag == 'd') {
      if ((size_t)(r.end - r.p) < 8)
        break;
      r.p += 8;
    } else if (tag == 'l') {
      if ((size_t)(r.end - r.p) < sizeof(void *))
        break;
      r.p += sizeof(void *);
    } else if (tag == 's') {
      if (rd(&r, &len, sizeof len) != 0 || (size_t)(r.end - r.p) < len)
        break;
      r.p += len;
    } else if (tag == 'o') {
      if (rd(&r, &o, sizeof o) != 0)
        break;
      obj_release(o);
    }
  }
  free(b->p);
  memset(b, 0, sizeof *b);
}

/* Pushes every value of b; returns how many, or -1. Empties b. */
static int dec_all(lua_State *L, buf *b) {
  reader r;
  int n = 0;
  r.p = b->p;
  r.end = b->p + b->len;
  while (r.p < r.end) {
    if (dec(L, &r) != 0)
      return -1;
    n++;
  }
  free(b->p);
  memset(b, 0, sizeof *b);
  return n;
}

/* ---- cells ---- */

static int cell_new(lua_State *L) {
  shobj *o = new_obj(L, K_CELL);
  o->value = luaL_optnumber(L, 1, 0);
  return 1;
}

static void push_cell_value(lua_State *L, lua_Number v) {
  if (v == (lua_Number)(lua_Integer)v)
    lua_pushinteger(L, (lua_Integer)v);
  else
    lua_pushnumber(L, v);
}

static int cell_get(lua_State *L) {
  shobj *o = check_obj(L, 1, K_CELL);
  lua_Number v;
  pthread_mutex_lock(&o->mu);
  v = o->value;
  pthread_mutex_unlock(&o->mu);
  push_cell_value(L, v);
  return 1;
}

static int cell_update(lua_State *L, int add) {
  shobj *o = check_obj(L, 1, K_CELL);
  lua_Number d = luaL_checknumber(L, 2), v;
  pthread_mutex_lock(&o->mu);
  o->value = add ? o->value + d : d;
  v = o->value;
  pthread_cond_broadcast(&o->cv);
  pthread_mutex_unlock(&o->mu);
  push_cell_value(L, v);
  return 1;
}

static int cell_set(lua_State *L) {
  return cell_update(L, 0);
}

static int cell_add(lua_State *L) {
  return cell_update(L, 1);
}

/* c:wait(n [, timeout]) -> true once the value is at least n */
static int cell_wait(lua_State *L) {
  shobj *o = check_obj(L, 1, K_CELL);
  lua_Number n = luaL_checknumber(L, 2);
  struct timespec ts;
  int has = !lua_isnoneornil(L, 3), ok = 1;
  if (has)
    deadline_after(&ts, luaL_checknumber(L, 3));
  pthread_mutex_lock(&o->mu);
  while (o->value < n && ok)
    ok = cond_wait(&o->cv, &o->mu, has ? &ts : NULL);
  ok = o->value >= n;
  pthread_mutex_unlock(&o->mu);
  lua_pushboolean(L, ok);
  return 1;
}

/* ---- barriers ---- */

static int barrier_new(lua_State *L) {
  lua_Number n = luaL_checknumber(L, 1);
  shobj *o;
  luaL_argcheck(L, n >= 1, 1, "at least one party expected");
  o = new_obj(L, K_BARRIER);
  o->n = (unsigned)n;
  return 1;
}

/* b:wait([timeout]) -> true when all n arrived, false on time out (the
 * caller is then no longer counted). */
static int barrier_wait(lua_State *L) {
  shobj *o = check_obj(L, 1, K_BARRIER);
  struct timespec ts;
  int has = !lua_isnoneornil(L, 2), ok = 1;
  unsigned gen;
  if (has)
    deadline_after(&ts, luaL_checknumber(L, 2));
  pthread_mutex_lock(&o->mu);
  gen = o->gen;
  if (++o->arrived == o->n) {
    o->arrived = 0;
    o->gen++;
    pthread_cond_broadcast(&o->cv);
  } else {
    while (gen == o->gen && ok)
      ok = cond_wait(&o->cv, &o->mu, has ? &ts : NULL);
    ok = gen != o->gen;
    if (!ok)
      o->arrived--;
  }
  pthread_mutex_unlock(&o->mu);
  lua_pushboolean(L, ok);
  return 1;
}

/* ---- channels ---- */

static int channel_new(lua_State *L) {
  new_obj(L, K_CHANNEL);
  return 1;
}

static int channel_push(lua_State *L) {
  shobj *o = check_obj(L, 1, K_CHANNEL);
  msg *m = (msg *)calloc(1, sizeof *m);
  if (!m)
    return luaL_error(L, "sfthreads: out of memory");
  if (enc_values(L, &m->data, 2, lua_gettop(L)) != 0) {
    free(m);
    return lua_error(L);
  }
  pthread_mutex_lock(&o->mu);
  if (o->tail)
    o->tail->next = m;
  else
    o->head = m;
  o->tail = m;
  o->count++;
  pthread_cond_broadcast(&o->cv);
  pthread_mutex_unlock(&o->mu);
  return 0;
}

static int channel_pop(lua_State *L) {
  shobj *o = check_obj(L, 1, K_CHANNEL);
  struct timespec ts;
  int has = !lua_isnoneornil(L, 2), ok = 1, n;
  msg *m;
  if (has)
    deadline_after(&ts, luaL_checknumber(L, 2));
  pthread_mutex_lock(&o->mu);
  while (!o->head && ok)
    ok = cond_wait(&o->cv, &o->mu, has ? &ts : NULL);
  m = o->head;
  if (m) {
    o->head = m->next;
    if (!o->head)
      o->tail = NULL;
    o->count--;
  }
  pthread_mutex_unlock(&o->mu);
  if (!m) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, 1);
  n = dec_all(L, &m->data);
  free(m);
  if (n < 0)
    return luaL_error(L, "sfthreads: corrupt message");
  return n + 1;
}

static int channel_count(lua_State *L) {
  shobj *o = check_obj(L, 1, K_CHANNEL);
  unsigned n;
  pthread_mutex_lock(&o->mu);
  n = o->count;
  pthread_mutex_unlock(&o->mu);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

/* ---- threads ---- */

typedef struct sft_thread {
  atomic_int refs;             /* the handle and the running thread */
  pthread_t tid;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done, ok;
  int gc_mode;                 /* GC_* */
  char *src, *path, *cpath;
  size_t srclen;
  buf args, out;
} sft_thread;

typedef struct thread_box {
  sft_thread *t;
  int joined;
} thread_box;

static void thread_release(sft_thread *t) {
  if (atomic_fetch_sub(&t->refs, 1) != 1)
    return;
  buf_release(&t->args);
  buf_release(&t->out);
  free(t->src);
  free(t->path);
  free(t->cpath);
  pthread_cond_destroy(&t->cv);
  pthread_mutex_destroy(&t->mu);
  free(t);
}

static char *dup_bytes(const char *s, size_t len) {
  char *p = (char *)malloc(len + 1);
  if (p) {
    memcpy(p, s, len);
    p[len] = '\0';
  }
  return p;
}

/* Sets package[field] from a C string. */
static void set_package_field(lua_State *L, const char *field, const char *v) {
  lua_getglobal(L, "package");
  lua_pushstring(L, v);
  lua_setfield(L, -2, field);
  lua_pop(L, 1);
}

/* The chunk's message handler: strings get a traceback. */
static int thread_msgh(lua_State *L) {
  if (lua_type(L, 1) != LUA_TSTRING)
    return 1;
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_pushvalue(L, 1);
  lua_pushinteger(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

/* The collector's modes; the numbers are spec/gc_torture.lua's, which says
 * what they do and why they are these. */
enum { GC_NORMAL, GC_TORTURE, GC_FULL };

static int gc_mode_from_env(void) {
  const char *m = getenv("SINGLEFLIGHT_GC_TORTURE");
  if (!m || !*m || strcmp(m, "0") == 0)
    return GC_NORMAL;
  return strcmp(m, "full") == 0 ? GC_FULL : GC_TORTURE;
}

/* Sets L's collector for mode (after luaL_openlibs: LuaJIT is told from
 * its jit library). */
static void gc_apply(lua_State *L, int mode) {
  if (mode == GC_NORMAL)
    return;
#if LUA_VERSION_NUM >= 504
  lua_gc(L, LUA_GCINC, 0, 0, mode == GC_FULL ? 100 : 1);
  lua_gc(L, LUA_GCSETPAUSE, 0);
  lua_gc(L, LUA_GCSETSTEPMUL, 1023);
#else
  {
    int jit;
    lua_getglobal(L, "jit");
    jit = lua_istable(L, -1);
    lua_gc(L, LUA_GCSETPAUSE, 0);
    if (mode == GC_FULL) {
      lua_gc(L, LUA_GCSETSTEPMUL, jit ? 0 : 1000000000);
      if (jit) { /* jit.off(): see spec/gc_torture.lua */
        lua_getfield(L, -1, "off");
        lua_call(L, 0, 0);
      }
    } else {
      lua_gc(L, LUA_GCSETSTEPMUL, jit ? 300 : 1000);
    }
    lua_pop(L, 1);
  }
#endif
}

/* Runs the chunk in L; leaves ok and the results (or the message) in
 * t->out. */
static void thread_run(lua_State *L, sft_thread *t) {
  int base, nargs, rc;
  luaL_openlibs(L);
  gc_apply(L, t->gc_mode);
  set_package_field(L, "path", t->path);
  set_package_field(L, "cpath", t->cpath);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_pushcfunction(L, luaopen_sfthreads);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "sfthreads");
  lua_pop(L, 2);
  lua_pushcfunction(L, thread_msgh);
  base = lua_gettop(L);
  if (luaL_loadbuffer(L, t->src, t->srclen, "=thread") != 0) {
    t->ok = 0;
  } else {
    nargs = dec_all(L, &t->args);
    if (nargs < 0) {
      lua_settop(L, base);
      lua_pushliteral(L, "sfthreads: corrupt arguments");
      t->ok = 0;
    } else {
      rc = lua_pcall(L, nargs, LUA_MULTRET, base);
      t->ok = rc == 0;
    }
  }
  if (!t->ok) {
    if (lua_type(L, -1) != LUA_TSTRING) {
      lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, -1));
      lua_remove(L, -2);
    }
    lua_settop(L, base + 1);
  }
  if (enc_values(L, &t->out, base + 1, lua_gettop(L)) != 0) {
    t->ok = 0;
    lua_pushfstring(L, "sfthreads: results: %s", lua_tostring(L, -1));
    enc_values(L, &t->out, lua_gettop(L), lua_gettop(L));
  }
}

/* Threads not finished yet, process-wide: the process waits for them
 * (10 s at most) as it exits, so that none is closing its Lua state when
 * the sanitizers look for leaks. */
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t live_cv; /* monotonic: made once, in pin_self */
static int live_threads = 0;

static void live_add(int n) {
  pthread_mutex_lock(&live_mu);
  live_threads += n;
  pthread_cond_broadcast(&live_cv);
  pthread_mutex_unlock(&live_mu);
}

static void wait_live_threads(void) {
  struct timespec ts;
  deadline_after(&ts, 10);
  pthread_mutex_lock(&live_mu);
  while (live_threads > 0)
    if (pthread_cond_timedwait(&live_cv, &live_mu, &ts) == ETIMEDOUT)
      break;
  pthread_mutex_unlock(&live_mu);
}

static void *thread_main(void *arg) {
  sft_thread *t = (sft_thread *)arg;
  lua_State *L = luaL_newstate();
  if (L) {
    thread_run(L, t);
    lua_close(L); /* its finalizers run here, in this thread */
  } else {
    t->ok = 0;
  }
  pthread_mutex_lock(&t->mu);
  t->done = 1;
  pthread_cond_broadcast(&t->cv);
  pthread_mutex_unlock(&t->mu);
  thread_release(t);
  live_add(-1);
  return NULL;
}

static const char *package_string(lua_State *L, const char *field) {
  const char *s;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, field);
  s = lua_tostring(L, -1);
  lua_pop(L, 2); /* the string stays alive in package */
  return s ? s : "";
}

/* spawn(src, ...) -> thread */
static int thread_spawn(lua_State *L) {
  size_t len;
  const char *src = luaL_checklstring(L, 1, &len);
  sft_thread *t = (sft_thread *)calloc(1, sizeof *t);
  thread_box *box;
  if (!t)
    return luaL_error(L, "sfthreads: out of memory");
  atomic_init(&t->refs, 1);
  t->gc_mode = gc_mode_from_env();
  pthread_mutex_init(&t->mu, NULL);
  cond_init(&t->cv);
  box = (thread_box *)lua_newuserdata(L, sizeof *box);
  box->t = t;
  box->joined = 1; /* nothing to join until the thread exists */
  luaL_getmetatable(L, THREAD_MT);
  lua_setmetatable(L, -2);
  t->src = dup_bytes(src, len);
  t->srclen = len;
  t->path = dup_bytes(package_string(L, "path"), strlen(package_string(L, "path")));
  t->cpath = dup_bytes(package_string(L, "cpath"), strlen(package_string(L, "cpath")));
  if (!t->src || !t->path || !t->cpath)
    return luaL_error(L, "sfthreads: out of memory");
  if (enc_values(L, &t->args, 2, lua_gettop(L) - 1) != 0)
    return lua_error(L);
  atomic_fetch_add(&t->refs, 1);
  live_add(1);
  if (pthread_create(&t->tid, NULL, thread_main, t) != 0) {
    live_add(-1);
    atomic_fetch_sub(&t->refs, 1);
    return luaL_error(L, "sfthreads: cannot create a thread");
  }
  box->joined = 0;
  return 1;
}

static thread_box *check_thread(lua_State *L) {
  return (thread_box *)luaL_checkudata(L, 1, THREAD_MT);
}

/* t:join([timeout]) -> true, results... | false, message */
static int thread_join(lua_State *L) {
  thread_box *box = check_thread(L);
  sft_thread *t = box->t;
  struct timespec ts;
  int has = !lua_isnoneornil(L, 2), ok = 1, n;
  if (box->joined)
    return luaL_error(L, "sfthreads: thread already joined");
  if (has)
    deadline_after(&ts, luaL_checknumber(L, 2));
  pthread_mutex_lock(&t->mu);
  while (!t->done && ok)
    ok = cond_wait(&t->cv, &t->mu, has ? &ts : NULL);
  ok = t->done;
  pthread_mutex_unlock(&t->mu);
  if (!ok)
    return luaL_error(L, "sfthreads: thread still running after %f s",
                      luaL_checknumber(L, 2));
  pthread_join(t->tid, NULL);
  box->joined = 1;
  lua_settop(L, 1);
  lua_pushboolean(L, t->ok);
  n = dec_all(L, &t->out);
  if (n < 0)
    return luaL_error(L, "sfthreads: corrupt results");
  return n + 1;
}

static int thread_gc(lua_State *L) {
  thread_box *box = check_thread(L);
  if (!box->t)
    return 0;
  if (!box->joined) {
    int done;
    pthread_mutex_lock(&box->t->mu);
    done = box->t->done;
    pthread_mutex_unlock(&box->t->mu);
    if (done)
      pthread_join(box->t->tid, NULL);
    else
      pthread_detach(box->t->tid); /* a hung thread: let it be */
    box->joined = 1;
  }
  thread_release(box->t);
  box->t = NULL;
  return 0;
}

/* ---- odds and ends ---- */

static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  struct timespec ts;
  if (s < 0)
    s = 0;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
    ;
  return 0;
}

static int l_lightuserdata(lua_State *L) {
  lua_pushlightuserdata(L, (void *)(uintptr_t)luaL_checknumber(L, 1));
  return 1;
}

/* Keeps this library loaded for as long as the process runs: a thread may
 * still be inside it when the state that loaded it closes. */
static void pin_self(void) {
  Dl_info info;
  cond_init(&live_cv);
  atexit(wait_live_threads);
  if (dladdr((void *)(uintptr_t)luaopen_sfthreads, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
}

static const luaL_Reg cell_methods[] = {
  {"get", cell_get}, {"set", cell_set}, {"add", cell_add},
  {"wait", cell_wait}, {NULL, NULL}
};
static const luaL_Reg barrier_methods[] = {
  {"wait", barrier_wait}, {NULL, NULL}
};
static const luaL_Reg channel_methods[] = {
  {"push", channel_push}, {"pop", channel_pop}, {"count", channel_count},
  {NULL, NULL}
};
static const luaL_Reg thread_methods[] = {
  {"join", thread_join}, {NULL, NULL}
};
static const luaL_Reg functions[] = {
  {"spawn", thread_spawn}, {"cell", cell_new}, {"barrier", barrier_new},
  {"channel", channel_new}, {"sleep", l_sleep},
  {"lightuserdata", l_lightuserdata}, {NULL, NULL}
};

static void new_type(lua_State *L, const char *name, const luaL_Reg *methods,
                     lua_CFunction gc) {
  if (luaL_newmetatable(L, name)) {
    lua_newtable(L);
    setfuncs(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
}

LUALIB_API int luaopen_sfthreads(lua_State *L) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, pin_self);
  new_type(L, CELL_MT, cell_methods, obj_gc);
  new_type(L, BARRIER_MT, barrier_methods, obj_gc);
  new_type(L, CHANNEL_MT, channel_methods, obj_gc);
  new_type(L, THREAD_MT, thread_methods, thread_gc);
  lua_newtable(L);
  setfuncs(L, functions);
  return 1;
}
