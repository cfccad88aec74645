/*
 * lsf_copy.c: values that cross Lua states, copied through C memory.
 *
 * A payload is a flat byte string written in one state and read into
 * another: the leader's result (v, err) or its panic (value, traceback).
 * Tags, one byte each:
 *   n nil   f false   t true   i integer   d float   s string   l light
 *   userdata   T table (then key/value pairs, then e)   R a table met before
 * Metatables are not copied; cycles and shared subtables come out as such.
 * A value that cannot cross (function, full userdata, coroutine) makes the
 * payload an error naming the key and the type, except a panic's value,
 * which then crosses as its text.
 *
 * The same bytes serve encode/decode, for the Lua layer's other carriers
 * (an nginx shared dictionary).
 */
#include "lsf.h"

#include <stdlib.h>
#include <string.h>

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
  lsf_push_quoted(L, key, klen);
  lua_pushfstring(L, " cannot cross Lua states (%s)", type);
  lua_concat(L, 3);
  msg = lua_tolstring(L, -1, &len);
  xinit(&b);
  xput(&b, msg, len);
  lua_settop(L, top);
  return xfinish(&b, XF_FAIL);
}

typedef struct xreader {
  const unsigned char *p, *end;
  int refs;          /* stack index of id -> table */
  uint32_t ntables;  /* tables made so far: ids come in order */
} xreader;

static int xget(xreader *r, void *dst, size_t n) {
  if ((size_t)(r->end - r->p) < n)
    return -1;
  memcpy(dst, r->p, n);
  r->p += n;
  return 0;
}

static int xdecode(lua_State *L, xreader *r, int depth) {
  char tag;
  if (depth > XF_MAX_DEPTH + 1 || xget(r, &tag, 1) != 0 ||
      !lua_checkstack(L, 4))
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
    if (xget(r, &id, sizeof id) != 0 || !r->refs || id >= r->ntables)
      return -1;
    lua_rawgeti(L, r->refs, (int)id + 1);
    return 0;
  }
  case 'T': {
    uint32_t id;
    int t;
    if (xget(r, &id, sizeof id) != 0 || id != r->ntables)
      return -1;
    r->ntables++;
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
      if (xdecode(L, r, depth + 1) != 0 || xdecode(L, r, depth + 1) != 0)
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


static void xfree_payload(xbuf *b) {
  free(b->p);
  b->p = NULL;
}

/* tostring(v), protected: the user's __tostring may raise. */
static int tostring_protected(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* Encodes (ok, a, b) into b: ok, the result a, b; otherwise the panic's
 * value a (as its text if it cannot cross) and traceback b. Returns the
 * kind, or XF_FAIL with b->bad set. */
static int xencode_outcome(lua_State *L, xbuf *b, int ok, int a, int bi) {
  int top = lua_gettop(L);
  size_t start = b->len; /* what the caller put before: kept */
  xencode(L, b, a, 0);
  if (b->bad && !ok) {
    size_t len;
    const char *s;
    b->len = start; /* the value again, as its text */
    b->bad = NULL;
    b->seen = 0;
    b->ntables = 0;
    lua_pushcfunction(L, tostring_protected);
    lua_pushvalue(L, a);
    if (lua_pcall(L, 1, 1, 0) != 0 || lua_type(L, -1) != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushfstring(L, "(%s value, __tostring failed)", luaL_typename(L, a));
    }
    s = lua_tolstring(L, -1, &len);
    xstring(b, s, len);
  }
  xencode(L, b, bi, 0);
  lua_settop(L, top);
  return b->bad ? XF_FAIL : ok ? XF_RESULT : XF_PANIC;
}

void *lsf_encode_payload(lua_State *L, int ok, int a, int bi, const char *key,
                         size_t klen) {
  xbuf b;
  int kind;
  xinit(&b);
  kind = xencode_outcome(L, &b, ok, a, bi);
  if (kind == XF_FAIL) {
    const char *type = b.bad;
    xfree_payload(&b);
    return xfail(L, "result", key, klen, type);
  }
  return xfinish(&b, kind);
}

void lsf_free_payload(void *p) {
  free(p);
}

/* Pushes "done", ok, a, b from the bytes of a payload of kind `kind`, or
 * "error", message. */
static int push_decoded(lua_State *L, int kind, const unsigned char *data,
                        size_t len) {
  xreader r;
  int top = lua_gettop(L), ok;
  if (kind == XF_FAIL) {
    lua_pushliteral(L, "error");
    lua_pushlstring(L, (const char *)data, len);
    return 2;
  }
  r.p = data;
  r.end = data + len;
  r.refs = 0;
  r.ntables = 0;
  lua_pushliteral(L, "done");
  lua_pushboolean(L, kind == XF_RESULT);
  /* one table of refs for both values: b may refer to a table of a */
  ok = xdecode(L, &r, 0) == 0 && xdecode(L, &r, 0) == 0 && r.p == r.end;
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

int lsf_push_payload(lua_State *L, const void *p) {
  const lsf_payload *pl = (const lsf_payload *)p;
  if (!pl) {
    lua_pushliteral(L, "error");
    lua_pushliteral(L, "singleflight: not enough memory to copy the result");
    return 2;
  }
  return push_decoded(L, pl->kind, pl->data, pl->len);
}

/*
 * encode(ok, a, b) -> bytes | nil, type
 * The outcome as a string another state (or process) decodes: ok true for a
 * result a, b; false for a panic's value a and traceback b.
 */
int lsf_encode(lua_State *L) {
  xbuf b;
  int kind;
  unsigned char k;
  lua_settop(L, 3);
  xinit(&b);
  k = 0;
  xput(&b, &k, 1); /* the kind's byte, set below */
  kind = xencode_outcome(L, &b, lua_toboolean(L, 1), 2, 3);
  if (kind == XF_FAIL || b.nomem) {
    const char *type = b.nomem ? "not enough memory" : b.bad;
    xfree_payload(&b);
    lua_pushnil(L);
    lua_pushstring(L, type);
    return 2;
  }
  b.p[0] = (unsigned char)kind;
  lua_pushlstring(L, (const char *)b.p, b.len);
  xfree_payload(&b);
  return 1;
}

static int decode_protected(lua_State *L) {
  size_t len;
  const unsigned char *s = (const unsigned char *)lua_tolstring(L, 1, &len);
  if (len < 1 || (s[0] != XF_RESULT && s[0] != XF_PANIC))
    return luaL_error(L, "singleflight: corrupt payload");
  return push_decoded(L, s[0], s + 1, len - 1);
}

/* decode(bytes) -> ok, a, b, from what encode made; raises on bytes it did
 * not make. */
int lsf_decode(lua_State *L) {
  int n;
  luaL_checktype(L, 1, LUA_TSTRING);
  lua_settop(L, 1);
  lua_pushcfunction(L, decode_protected);
  lua_pushvalue(L, 1);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0)
    return lua_error(L);
  n = lua_gettop(L) - 1;
  if (n < 1 || lua_type(L, 2) != LUA_TSTRING || lua_tostring(L, 2)[0] != 'd')
    return luaL_error(L, "singleflight: corrupt payload");
  return n - 1; /* without "done" */
}
