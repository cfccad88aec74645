/*
 * sf_core.c: the in-flight call table. See sf_core.h.
 *
 * A group is split into shards, each a mutex, a condition variable for the
 * foreign waiters of its calls, a chained hash table and a free list of call
 * records, so that the fast path (acquire + finish, nobody waiting) takes
 * two short critical sections and no malloc once the free list is warm.
 * Shards sit on cache lines of their own, and the fast path writes nothing
 * outside its shard: calls keep their group alive through their shard,
 * which takes one reference on the group when it gets its first live
 * record and keeps it until the group has no handle left (see "group
 * lifetime" below), so threads on different shards share no written line.
 * Process-wide groups are found by name in a registry, a hash table with
 * its own lock.
 *
 * Every holder of a call (its leader, each joiner of any domain) holds one
 * reference on the record: a record is reused or freed only once nobody
 * can touch it any more.
 */
#define _POSIX_C_SOURCE 200809L

#include "sf_core.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SF_INLINE_KEY 24       /* keys up to this many bytes live in the record */
#define SF_NAMED_SHARDS 16     /* shards of a process-wide group */
#define SF_FREE_MAX 64         /* records kept on each shard's free list */
#define SF_MIN_BUCKETS 8
#define SF_CACHE_LINE 64
#define SF_REG_MIN 64          /* buckets of the registry, at least */

/* 104 bytes on LP64 (a 112-byte malloc chunk), the key included when it
 * fits in the record. */
struct sf_call {
  sf_call *next;         /* bucket chain, or free list */
  sf_group *group;
  uintptr_t domain;      /* the leader's */
  uintptr_t owner;       /* the leader's */
  void *payload;
  sf_free_fn freefn;
  uint32_t started;      /* coarse milliseconds at acquire (wrapping) */
  uint32_t len;          /* keys of 4 GiB and more are refused */
  uint32_t hash;         /* picks the shard (top bits) and the bucket */
  uint32_t refs;         /* leader + every joiner */
  uint32_t dups;         /* joiners, every domain */
  uint32_t nlocal;       /* joiners from the leader's domain */
  uint32_t foreign;      /* foreign joiners still waiting */
  uint8_t state;         /* SF_RUNNING, SF_DONE or SF_ABANDONED */
  uint8_t linked;        /* in its shard's table */
  uint8_t expired;       /* see sf_expire */
  union {
    char inl[SF_INLINE_KEY]; /* len <= SF_INLINE_KEY */
    char *heap;              /* otherwise */
  } k;
};

typedef struct sf_shard {
  _Alignas(SF_CACHE_LINE) pthread_mutex_t mu;
  pthread_cond_t cv;
  sf_call **buckets;
  size_t nbuckets;
  size_t count;          /* calls in the table */
  size_t live;           /* records in use (not on the free list) */
  sf_call *freelist;
  unsigned nfree;
  int holds_ref;         /* this shard holds a reference on its group */
  uint64_t stats[SF_STAT_COUNT];
  sf_call *inl[SF_MIN_BUCKETS]; /* the buckets until the table grows */
} sf_shard;

struct sf_group {
  atomic_uint refs;      /* handles + shards that hold a reference */
  atomic_uint handles;   /* references given by new, open and retain */
  unsigned flags;
  unsigned nshards;      /* a power of two, at most 256 */
  char *name;            /* NULL unless process-wide */
  size_t namelen;
  uint32_t namehash;
  sf_group *reg_next;    /* registry bucket chain */
  sf_shard *shards;
};

/* ---- the registry of process-wide groups ---- */

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static sf_group **registry;     /* buckets, a power of two of them */
static size_t registry_nbuckets;
static size_t registry_count;
/* Process-wide groups freed while others live, kept for the next opens
 * (opening and closing names would otherwise allocate and initialise a
 * block of shards each time); freed with the registry. */
#define SF_SPARE_GROUPS 4
static sf_group *spare_groups[SF_SPARE_GROUPS];
static unsigned nspare_groups;

/* ---- helpers ---- */

static int locking(const sf_group *g) {
  return !(g->flags & SF_SINGLE_THREAD);
}

static void shard_lock(const sf_group *g, sf_shard *sh) {
  if (locking(g))
    pthread_mutex_lock(&sh->mu);
}

static void shard_unlock(const sf_group *g, sf_shard *sh) {
  if (locking(g))
    pthread_mutex_unlock(&sh->mu);
}

static char *call_key(sf_call *c) {
  return c->len > SF_INLINE_KEY ? c->k.heap : c->k.inl;
}

/* The coarse clock in milliseconds, modulo 2^32 (ages up to 49 days). */
static uint32_t coarse_ms(void) {
  return (uint32_t)(uint64_t)(sf_coarse_now() * 1000.0);
}

static uint64_t rotl64(uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

/* The last len (< 8) bytes at p as one word: two overlapping loads, or
 * three bytes, rather than a memcpy of variable length (a libc call). */
static uint64_t read_tail(const char *p, size_t len) {
  const unsigned char *u = (const unsigned char *)p;
  uint32_t lo, hi;
  if (len >= 4) {
    memcpy(&hi, p, 4);
    memcpy(&lo, p + len - 4, 4);
    return (uint64_t)hi << 32 | lo;
  }
  if (len == 0)
    return 0;
  return (uint64_t)u[0] << 16 | (uint64_t)u[len >> 1] << 8 | u[len - 1];
}

/* A word-at-a-time multiplicative hash with a final avalanche, folded to
 * 32 bits. The length is mixed in first, so the tail's overlapping loads
 * cannot make two keys of different lengths collide by construction. */
static uint32_t hash_bytes(const char *p, size_t len) {
  const uint64_t k1 = 0x9E3779B97F4A7C15ULL, k2 = 0xC2B2AE3D27D4EB4FULL;
  uint64_t h = 0x27D4EB2F165667C5ULL ^ (len * k1);
  uint64_t w;
  while (len >= 8) {
    memcpy(&w, p, 8);
    h = rotl64(h ^ (w * k2), 31) * k1;
    p += 8;
    len -= 8;
  }
  w = read_tail(p, len);
  h = rotl64(h ^ (w * k2), 31) * k1;
  h ^= h >> 33;
  h *= k2;
  h ^= h >> 29;
  return (uint32_t)(h ^ (h >> 32));
}

static sf_shard *shard_of(const sf_group *g, uint32_t hash) {
  return &g->shards[(hash >> 24) & (g->nshards - 1)];
}

static sf_shard *call_shard(const sf_call *c) {
  return shard_of(c->group, c->hash);
}

static void stat_add(sf_shard *sh, int which) {
  sh->stats[which]++;
}

static int shard_init(sf_shard *sh) {
  pthread_condattr_t ca;
  memset(sh, 0, sizeof *sh);
  sh->buckets = sh->inl;
  sh->nbuckets = SF_MIN_BUCKETS;
  if (pthread_mutex_init(&sh->mu, NULL) != 0)
    return -1;
  if (pthread_condattr_init(&ca) != 0)
    goto fail_mutex;
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  if (pthread_cond_init(&sh->cv, &ca) != 0) {
    pthread_condattr_destroy(&ca);
    goto fail_mutex;
  }
  pthread_condattr_destroy(&ca);
  return 0;
fail_mutex:
  pthread_mutex_destroy(&sh->mu);
  return -1;
}

static void record_free(sf_call *c) {
  if (c->len > SF_INLINE_KEY)
    free(c->k.heap);
  free(c);
}

static void shard_destroy(sf_shard *sh) {
  sf_call *c, *next;
  for (c = sh->freelist; c; c = next) {
    next = c->next;
    record_free(c);
  }
  /* A group is destroyed only when no call refers to it: the table is empty. */
  if (sh->buckets != sh->inl)
    free(sh->buckets);
  pthread_cond_destroy(&sh->cv);
  pthread_mutex_destroy(&sh->mu);
}

/* A group and its shards are one block: the shards first, at the block's
 * alignment (sizeof(sf_shard) is a multiple of a cache line), the group
 * after them. Opening a group is one allocation, whatever else lives. */
static sf_group *group_alloc(unsigned flags, unsigned nshards) {
  size_t shards = nshards * sizeof(sf_shard);
  size_t size = shards + sizeof(sf_group);
  sf_shard *sh;
  sf_group *g;
  unsigned i;
  size = (size + SF_CACHE_LINE - 1) / SF_CACHE_LINE * SF_CACHE_LINE;
  sh = aligned_alloc(SF_CACHE_LINE, size);
  if (!sh)
    return NULL;
  g = (sf_group *)(void *)((char *)sh + shards);
  memset(g, 0, sizeof *g);
  g->shards = sh;
  for (i = 0; i < nshards; i++) {
    if (shard_init(&g->shards[i]) != 0) {
      while (i-- > 0)
        shard_destroy(&g->shards[i]);
      free(sh);
      return NULL;
    }
  }
  atomic_init(&g->refs, 1);
  atomic_init(&g->handles, 1);
  g->flags = flags;
  g->nshards = nshards;
  return g;
}

static void group_destroy(sf_group *g) {
  unsigned i;
  for (i = 0; i < g->nshards; i++)
    shard_destroy(&g->shards[i]);
  free(g->name);
  free(g->shards); /* the block that holds g too */
}

/*
 * ---- group lifetime ----
 *
 * g->handles counts the references given out (new, open, retain); g->refs
 * counts those plus one for each shard with holds_ref set. A shard sets
 * holds_ref, under its lock, when a record goes live and it holds none; it
 * clears it, under its lock, when it has no live record and the group no
 * handle: either the last record dies after the last handle went (the
 * record's disposer sees handles == 0), or the last handle goes after the
 * last record died (the release sweeps the shards). Whoever brings refs
 * to zero destroys the group. While a handle lives, a shard keeps its
 * reference from one call to the next, so the fast path never touches the
 * group's counters.
 */

/* A process-wide group nobody refers to any more, made as new for the
 * next open: its name freed, its tables back to their inline buckets
 * (empty: no call refers to it), its counters zero. Its locks stay. */
static void group_recycle(sf_group *g) {
  unsigned i;
  free(g->name);
  g->name = NULL;
  g->namelen = 0;
  g->reg_next = NULL;
  for (i = 0; i < g->nshards; i++) {
    sf_shard *sh = &g->shards[i];
    if (sh->buckets != sh->inl) {
      free(sh->buckets);
      sh->buckets = sh->inl;
      sh->nbuckets = SF_MIN_BUCKETS;
    }
    sh->holds_ref = 0;
    memset(sh->stats, 0, sizeof sh->stats);
  }
}

static void group_unref(sf_group *g, unsigned n) {
  sf_group *spares[SF_SPARE_GROUPS];
  unsigned nspares = 0;
  if (atomic_fetch_sub_explicit(&g->refs, n, memory_order_acq_rel) != n)
    return;
  if (g->name) {
    sf_group **p;
    pthread_mutex_lock(&registry_mu);
    p = &registry[g->namehash & (registry_nbuckets - 1)];
    for (; *p; p = &(*p)->reg_next) {
      if (*p == g) {
        *p = g->reg_next;
        registry_count--;
        break;
      }
    }
    if (registry_count == 0) { /* no named group left: nothing to keep */
      free(registry);
      registry = NULL;
      registry_nbuckets = 0;
      nspares = nspare_groups;
      memcpy(spares, spare_groups, sizeof spares);
      nspare_groups = 0;
    } else if (nspare_groups < SF_SPARE_GROUPS) {
      group_recycle(g);
      spare_groups[nspare_groups++] = g;
      g = NULL;
    }
    pthread_mutex_unlock(&registry_mu);
  }
  while (nspares > 0)
    group_destroy(spares[--nspares]);
  if (g)
    group_destroy(g);
}

/* ---- groups ---- */

sf_group *sf_group_new(unsigned flags) {
  return group_alloc(flags & SF_SINGLE_THREAD, 1);
}

/* Doubles the registry's buckets, under its lock; a failed allocation
 * leaves longer chains. */
static void registry_grow(void) {
  size_t n = registry_nbuckets ? registry_nbuckets * 2 : SF_REG_MIN, i;
  sf_group **nb = calloc(n, sizeof *nb);
  if (!nb)
    return;
  for (i = 0; i < registry_nbuckets; i++) {
    sf_group *g = registry[i], *next;
    for (; g; g = next) {
      next = g->reg_next;
      g->reg_next = nb[g->namehash & (n - 1)];
      nb[g->namehash & (n - 1)] = g;
    }
  }
  free(registry);
  registry = nb;
  registry_nbuckets = n;
}

sf_group *sf_group_open(const char *name, size_t len) {
  sf_group *g;
  uint32_t hash = hash_bytes(name, len);
  pthread_mutex_lock(&registry_mu);
  if (registry_count >= registry_nbuckets)
    registry_grow();
  if (!registry) {
    pthread_mutex_unlock(&registry_mu);
    return NULL;
  }
  for (g = registry[hash & (registry_nbuckets - 1)]; g; g = g->reg_next) {
    if (g->namehash == hash && g->namelen == len &&
        memcmp(g->name, name, len) == 0) {
      /* A group whose count reached zero is on its way out: skip it. One
       * with calls in flight and no handle lives on: take it back. */
      unsigned r = atomic_load(&g->refs);
      while (r != 0 && !atomic_compare_exchange_weak(&g->refs, &r, r + 1))
        ;
      if (r != 0) {
        atomic_fetch_add(&g->handles, 1);
        pthread_mutex_unlock(&registry_mu);
        return g;
      }
    }
  }
  if (nspare_groups > 0) {
    g = spare_groups[--nspare_groups];
    atomic_store(&g->refs, 1);
    atomic_store(&g->handles, 1);
  } else {
    g = group_alloc(0, SF_NAMED_SHARDS);
  }
  if (g) {
    g->name = malloc(len + 1);
    if (!g->name) {
      group_destroy(g);
      g = NULL;
    } else {
      sf_group **b = &registry[hash & (registry_nbuckets - 1)];
      memcpy(g->name, name, len);
      g->name[len] = '\0';
      g->namelen = len;
      g->namehash = hash;
      g->reg_next = *b;
      *b = g;
      registry_count++;
    }
  }
  pthread_mutex_unlock(&registry_mu);
  return g;
}

void sf_group_release(sf_group *g) {
  unsigned i, drop = 0;
  if (atomic_fetch_sub(&g->handles, 1) == 1) {
    /* the last handle: idle shards let go of the group now, busy ones
     * when their last record dies */
    for (i = 0; i < g->nshards; i++) {
      sf_shard *sh = &g->shards[i];
      shard_lock(g, sh);
      if (sh->holds_ref && sh->live == 0) {
        sh->holds_ref = 0;
        drop++;
      }
      shard_unlock(g, sh);
    }
  }
  group_unref(g, 1 + drop);
}

size_t sf_group_count(void) {
  size_t n;
  pthread_mutex_lock(&registry_mu);
  n = registry_count;
  pthread_mutex_unlock(&registry_mu);
  return n;
}

size_t sf_group_footprint(const sf_group *g) {
  size_t n = sizeof *g + g->namelen + 1, i;
  for (i = 0; i < g->nshards; i++) {
    n += sizeof g->shards[i];
    if (g->shards[i].buckets != g->shards[i].inl)
      n += g->shards[i].nbuckets * sizeof(sf_call *);
  }
  return n;
}

const char *sf_group_name(const sf_group *g, size_t *len) {
  if (len)
    *len = g->namelen;
  return g->name;
}

/* ---- the table ---- */

static sf_call **bucket_of(sf_shard *sh, uint32_t hash) {
  return &sh->buckets[hash & (sh->nbuckets - 1)];
}

static void table_grow(sf_shard *sh) {
  size_t n = sh->nbuckets * 2, i;
  sf_call **nb = calloc(n, sizeof *nb);
  if (!nb)
    return; /* longer chains, still correct */
  for (i = 0; i < sh->nbuckets; i++) {
    sf_call *c = sh->buckets[i], *next;
    for (; c; c = next) {
      next = c->next;
      c->next = nb[c->hash & (n - 1)];
      nb[c->hash & (n - 1)] = c;
    }
  }
  if (sh->buckets != sh->inl)
    free(sh->buckets);
  sh->buckets = nb;
  sh->nbuckets = n;
}

static void table_unlink(sf_shard *sh, sf_call *c) {
  sf_call **p = bucket_of(sh, c->hash);
  for (; *p; p = &(*p)->next) {
    if (*p == c) {
      *p = c->next;
      c->next = NULL;
      c->linked = 0;
      sh->count--;
      return;
    }
  }
}

static sf_call *table_find(sf_shard *sh, uint32_t hash, const char *key,
                           size_t len) {
  sf_call *c = *bucket_of(sh, hash);
  for (; c; c = c->next)
    if (c->hash == hash && c->len == len &&
        memcmp(call_key(c), key, len) == 0)
      return c;
  return NULL;
}

/* Drops one reference; the caller holds the shard lock. Returns 1 when it
 * was the last and something is left to do outside the lock: *dead is a
 * record to free (NULL when it went back to the free list) and *unref
 * whether the shard let go of its group. */
static int call_unref_locked(const sf_group *g, sf_shard *sh, sf_call *c,
                             sf_call **dead, int *unref) {
  *dead = NULL;
  *unref = 0;
  if (--c->refs != 0)
    return 0;
  if (--sh->live == 0 && sh->holds_ref &&
      atomic_load_explicit(&g->handles, memory_order_relaxed) == 0) {
    sh->holds_ref = 0;
    *unref = 1;
  }
  if (!(c->freefn && c->payload) && sh->nfree < SF_FREE_MAX &&
      c->len <= SF_INLINE_KEY) {
    c->next = sh->freelist;
    sh->freelist = c;
    sh->nfree++;
    return *unref;
  }
  *dead = c; /* a payload's destructor runs outside the lock */
  return 1;
}

/* Finishes dropping the last reference outside the lock: frees what must
 * be freed and, when the shard let go of it, unrefs the group. */
static void call_dispose(sf_group *g, sf_call *dead, int unref) {
  if (dead) {
    if (dead->freefn && dead->payload)
      dead->freefn(dead->payload);
    record_free(dead);
  }
  if (unref)
    group_unref(g, 1);
}

/* ---- calls ---- */

int sf_acquire(sf_group *g, const char *key, size_t len, uintptr_t domain,
               uintptr_t owner, unsigned flags, sf_call **out) {
  uint32_t hash;
  sf_shard *sh;
  sf_call *c;
  int status;

  if (len > UINT32_MAX)
    return SF_ENOMEM;
  hash = hash_bytes(key, len);
  sh = shard_of(g, hash);
  shard_lock(g, sh);
  c = table_find(sh, hash, key, len);
  if (c && (flags & SF_ACQ_LEAD_ONLY)) {
    shard_unlock(g, sh);
    return SF_INFLIGHT;
  }
  /* counted unless out of memory below, where nothing changes */
  if ((c || (flags & SF_ACQ_JOIN_ONLY)) && (flags & SF_ACQ_COUNT_CALL))
    stat_add(sh, SF_STAT_CALLS);
  if (!c && (flags & SF_ACQ_JOIN_ONLY)) {
    shard_unlock(g, sh);
    return SF_ABSENT;
  }
  if (c) {
    if (c->domain == domain && c->owner == owner) {
      shard_unlock(g, sh);
      *out = c;
      return SF_RECURSIVE;
    }
    c->dups++;
    c->refs++;
    stat_add(sh, SF_STAT_SHARED);
    if (c->domain == domain) {
      c->nlocal++;
      status = SF_JOINED;
    } else {
      c->foreign++;
      status = SF_FOREIGN;
    }
    shard_unlock(g, sh);
    *out = c;
    return status;
  }

  c = sh->freelist;
  if (c && len <= SF_INLINE_KEY) {
    sh->freelist = c->next;
    sh->nfree--;
  } else {
    /* malloc under the lock only when the free list can't serve */
    c = malloc(sizeof *c);
    if (!c) {
      shard_unlock(g, sh);
      return SF_ENOMEM;
    }
    if (len > SF_INLINE_KEY) {
      c->k.heap = malloc(len);
      if (!c->k.heap) {
        free(c);
        shard_unlock(g, sh);
        return SF_ENOMEM;
      }
    }
  }
  c->len = (uint32_t)len;
  memcpy(call_key(c), key, len);
  c->group = g;
  c->hash = hash;
  c->domain = domain;
  c->owner = owner;
  c->payload = NULL;
  c->freefn = NULL;
  c->started = coarse_ms();
  c->refs = 1;
  c->dups = c->nlocal = c->foreign = 0;
  c->state = SF_RUNNING;
  c->linked = 1;
  if (flags & SF_ACQ_COUNT_CALL)
    stat_add(sh, SF_STAT_CALLS);
  c->expired = 0;
  c->next = *bucket_of(sh, hash);
  *bucket_of(sh, hash) = c;
  if (++sh->count > sh->nbuckets)
    table_grow(sh);
  stat_add(sh, SF_STAT_EXECUTIONS);
  sh->live++;
  if (!sh->holds_ref) { /* the caller's handle keeps refs above zero */
    sh->holds_ref = 1;
    atomic_fetch_add(&g->refs, 1);
  }
  shard_unlock(g, sh);
  *out = c;
  return SF_LEADER;
}

/* How a holder lets go (call_release). */
enum {
  REL_PLAIN,   /* it had its outcome */
  REL_LOCAL,   /* a holder counted in nlocal: no longer waiting */
  REL_UNJOIN,  /* a joiner that never waited: as if it had not joined */
  REL_TIMEOUT  /* a JOINED caller gave up waiting */
};

/* Drops a reference under the shard lock, taken here, then disposes of
 * what must go outside it. domain: the holder's (for REL_UNJOIN). */
static void call_release(sf_call *c, int how, uintptr_t domain) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  sf_call *dead;
  int last, unref, local;

  shard_lock(g, sh);
  local = how == REL_LOCAL || how == REL_TIMEOUT ||
          (how == REL_UNJOIN && domain == c->domain);
  if (how == REL_UNJOIN) {
    c->dups--;
    sh->stats[SF_STAT_SHARED]--;
    if (!local && c->foreign > 0)
      c->foreign--;
  }
  if (local && c->nlocal > 0)
    c->nlocal--;
  if (how == REL_TIMEOUT)
    stat_add(sh, SF_STAT_TIMEOUTS);
  last = call_unref_locked(g, sh, c, &dead, &unref);
  shard_unlock(g, sh);
  if (last)
    call_dispose(g, dead, unref);
}

void sf_unjoin(sf_call *c, uintptr_t domain) {
  call_release(c, REL_UNJOIN, domain);
}

void sf_leave(sf_call *c) {
  call_release(c, REL_TIMEOUT, 0);
}

void sf_release(sf_call *c) {
  call_release(c, REL_PLAIN, 0);
}

void sf_release_local(sf_call *c) {
  call_release(c, REL_LOCAL, 0);
}

void sf_retain(sf_call *c, int watch) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  shard_lock(g, sh);
  c->refs++;
  if (watch)
    c->nlocal++;
  shard_unlock(g, sh);
}

int sf_state(sf_call *c) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  int st;
  shard_lock(g, sh);
  st = c->expired ? SF_ABANDONED : c->state;
  shard_unlock(g, sh);
  return st;
}

double sf_age(sf_call *c) {
  /* set once, before any joiner; unsigned arithmetic survives the wrap */
  return (double)(uint32_t)(coarse_ms() - c->started) * 1e-3;
}

void sf_set_owner(sf_call *c, uintptr_t owner) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  shard_lock(g, sh);
  c->owner = owner;
  shard_unlock(g, sh);
}

uintptr_t sf_call_owner(sf_call *c) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  uintptr_t owner;
  shard_lock(g, sh);
  owner = c->owner;
  shard_unlock(g, sh);
  return owner;
}

int sf_expire(sf_call *c) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  int done = 0;
  shard_lock(g, sh);
  if (c->state == SF_RUNNING && c->linked && !c->expired) {
    table_unlink(sh, c);
    c->expired = 1;
    stat_add(sh, SF_STAT_ABANDONED);
    if (locking(g))
      pthread_cond_broadcast(&sh->cv);
    done = 1;
  }
  shard_unlock(g, sh);
  return done;
}

unsigned sf_finish(sf_call *c, int panicked, int *shared, unsigned *nlocal) {
  int expired;
  return sf_finish_ex(c, panicked, shared, nlocal, &expired);
}

/* sf_finish_ex's work; with `alone`, only if nobody waits in any domain:
 * otherwise nothing is done and -1 returned. */
static int call_finish(sf_call *c, int panicked, int alone, int *shared,
                       unsigned *nlocal, int *expired) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  sf_call *dead = NULL;
  unsigned foreign;
  int last = 0, unref = 0;

  shard_lock(g, sh);
  /* an expired call's foreign waiters were sent to its successor */
  foreign = c->expired ? 0 : c->foreign;
  if (alone && (c->nlocal > 0 || foreign > 0 || c->expired)) {
    shard_unlock(g, sh);
    return -1;
  }
  if (c->linked)
    table_unlink(sh, c);
  if (panicked)
    stat_add(sh, SF_STAT_PANICS);
  *shared = c->dups > 0;
  *expired = c->expired;
  *nlocal = c->nlocal;
  if (foreign == 0) {
    c->state = SF_DONE;
    last = call_unref_locked(g, sh, c, &dead, &unref);
  }
  shard_unlock(g, sh);
  if (last)
    call_dispose(g, dead, unref);
  return (int)foreign;
}

unsigned sf_finish_ex(sf_call *c, int panicked, int *shared, unsigned *nlocal,
                      int *expired) {
  return (unsigned)call_finish(c, panicked, 0, shared, nlocal, expired);
}

int sf_finish_alone(sf_call *c, int panicked, int *shared) {
  unsigned nlocal;
  int expired;
  return call_finish(c, panicked, 1, shared, &nlocal, &expired) < 0 ? -1 : 0;
}

void sf_publish(sf_call *c, void *payload, sf_free_fn freefn) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  sf_call *dead;
  int last, unref;

  shard_lock(g, sh);
  c->payload = payload;
  c->freefn = freefn;
  c->state = SF_DONE;
  if (locking(g))
    pthread_cond_broadcast(&sh->cv);
  last = call_unref_locked(g, sh, c, &dead, &unref);
  shard_unlock(g, sh);
  if (last)
    call_dispose(g, dead, unref);
}

void sf_abandon(sf_call *c) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  sf_call *dead;
  int last, unref;

  shard_lock(g, sh);
  if (c->linked)
    table_unlink(sh, c);
  if (!c->expired) /* counted when it expired */
    stat_add(sh, SF_STAT_ABANDONED);
  c->state = SF_ABANDONED;
  if (locking(g))
    pthread_cond_broadcast(&sh->cv);
  last = call_unref_locked(g, sh, c, &dead, &unref);
  shard_unlock(g, sh);
  if (last)
    call_dispose(g, dead, unref);
}

static void deadline_after(struct timespec *ts, double seconds) {
  double whole;
  clock_gettime(CLOCK_MONOTONIC, ts);
  if (seconds > 1e9)
    seconds = 1e9;
  whole = (double)(time_t)seconds;
  ts->tv_sec += (time_t)whole;
  ts->tv_nsec += (long)((seconds - whole) * 1e9);
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

int sf_wait(sf_call *c, double timeout, unsigned flags, void **payload) {
  sf_group *g = c->group;
  sf_shard *sh = call_shard(c);
  struct timespec ts;
  int status;

  if (timeout >= 0)
    deadline_after(&ts, timeout);
  shard_lock(g, sh);
  while (c->state == SF_RUNNING && !c->expired) {
    int rc = timeout >= 0 ? pthread_cond_timedwait(&sh->cv, &sh->mu, &ts)
                          : pthread_cond_wait(&sh->cv, &sh->mu);
    if (rc == ETIMEDOUT && c->state == SF_RUNNING && !c->expired) {
      if (!(flags & SF_WAIT_KEEP)) {
        c->foreign--;
        stat_add(sh, SF_STAT_TIMEOUTS);
      }
      shard_unlock(g, sh);
      return SF_TIMEDOUT;
    }
  }
  if (c->state == SF_DONE && !c->expired) {
    *payload = c->payload;
    status = SF_DONE;
  } else {
    status = SF_ABANDONED;
  }
  c->foreign--;
  shard_unlock(g, sh);
  return status;
}

int sf_forget(sf_group *g, const char *key, size_t len) {
  uint32_t hash = hash_bytes(key, len);
  sf_shard *sh = shard_of(g, hash);
  sf_call *c;

  shard_lock(g, sh);
  c = table_find(sh, hash, key, len);
  if (c) {
    table_unlink(sh, c);
    stat_add(sh, SF_STAT_FORGOTTEN);
  }
  shard_unlock(g, sh);
  return c != NULL;
}

sf_call *sf_find(sf_group *g, const char *key, size_t len) {
  uint32_t hash = hash_bytes(key, len);
  sf_shard *sh = shard_of(g, hash);
  sf_call *c;

  shard_lock(g, sh);
  c = table_find(sh, hash, key, len);
  shard_unlock(g, sh);
  return c;
}

void sf_count(sf_group *g, int which) {
  sf_count_n(g, which, 1);
}

void sf_count_n(sf_group *g, int which, uint64_t n) {
  sf_shard *sh = &g->shards[0];
  if (which < 0 || which >= SF_STAT_COUNT)
    return;
  shard_lock(g, sh);
  sh->stats[which] += n;
  shard_unlock(g, sh);
}

void sf_stats_get(sf_group *g, sf_stats *st) {
  unsigned i;
  int k;
  memset(st, 0, sizeof *st);
  for (i = 0; i < g->nshards; i++) {
    sf_shard *sh = &g->shards[i];
    shard_lock(g, sh);
    st->inflight += sh->count;
    for (k = 0; k < SF_STAT_COUNT; k++)
      st->count[k] += sh->stats[k];
    shard_unlock(g, sh);
  }
}

const char *sf_call_key(const sf_call *c, size_t *len) {
  if (len)
    *len = c->len;
  return c->len > SF_INLINE_KEY ? c->k.heap : c->k.inl;
}

sf_group *sf_call_group(const sf_call *c) {
  return c->group;
}

size_t sf_call_footprint(size_t len) {
  return sizeof(sf_call) + (len > SF_INLINE_KEY ? len : 0);
}

double sf_coarse_now(void) {
  struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
  clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double sf_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
