/*
 * lifetime.c: a deterministic test of the core's lifetime protocol
 * (csrc/sf_core.h), next to the randomised stress test: what each status of
 * sf_acquire means, who holds a reference on a call, and when a record, its
 * key, its payload and its group are let go.
 *
 *   lifetime      runs every scenario, on every kind of group it applies to
 *                 (sf_group_new, sf_group_new(SF_SINGLE_THREAD),
 *                 sf_group_open); prints one line per scenario, and at the
 *                 first failed check says which and exits 1
 *
 * Single-threaded, but for the scenarios where a foreign waiter must block
 * in sf_wait until another thread ends its call. The program is linked
 * with -Wl,--wrap for malloc, calloc, aligned_alloc and free, so that the
 * core's blocks are counted: every scenario must end with all of them
 * freed, and the blocks of a call must go when its last holder lets go,
 * not before. The same wrappers fail chosen allocations, for the paths out
 * of memory. Under ASan or valgrind, a record freed while still held shows
 * as a read after free where the test reads its key. A wait that never
 * ends fails the run after 60 s.
 */
#define _POSIX_C_SOURCE 200809L

#include "sf_core.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- the core's allocations, counted (and failed on demand) ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_aligned_alloc(size_t align, size_t n);
void __real_free(void *p);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_aligned_alloc(size_t align, size_t n);
void __wrap_free(void *p);

static atomic_long live;      /* blocks allocated and not freed */
static atomic_int fail_after; /* > 0: the allocation that brings it to 0 fails */

static int inject(void) {
  int n = atomic_load(&fail_after);
  while (n > 0 && !atomic_compare_exchange_weak(&fail_after, &n, n - 1))
    ;
  return n == 1;
}

static void *counted(void *p) {
  if (p)
    atomic_fetch_add(&live, 1);
  return p;
}

void *__wrap_malloc(size_t n) {
  return inject() ? NULL : counted(__real_malloc(n));
}

void *__wrap_calloc(size_t n, size_t size) {
  return inject() ? NULL : counted(__real_calloc(n, size));
}

void *__wrap_aligned_alloc(size_t align, size_t n) {
  return inject() ? NULL : counted(__real_aligned_alloc(align, n));
}

void __wrap_free(void *p) {
  if (p)
    atomic_fetch_sub(&live, 1);
  __real_free(p);
}

/* ---- checks ---- */

enum { K_NEW, K_SINGLE, K_NAMED, NKINDS };
static const char *const kind_name[NKINDS] = {"new", "single-thread", "named"};
#define ALL_KINDS 7u
#define LOCKING_KINDS (1u << K_NEW | 1u << K_NAMED)

static const char *scenario;
static int kind;
static unsigned long nchecks;

static void failed(int line, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "lifetime: FAILED in \"%s\" (group: %s), lifetime.c:%d: ", scenario,
          kind_name[kind], line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

#define CHECK(cond)                                \
  do {                                             \
    nchecks++;                                     \
    if (!(cond))                                   \
      failed(__LINE__, "%s", #cond);               \
  } while (0)

#define EQ(got, want)                                                     \
  do {                                                                    \
    long long got_ = (long long)(got), want_ = (long long)(want);         \
    nchecks++;                                                            \
    if (got_ != want_)                                                    \
      failed(__LINE__, "%s is %lld, expected %lld (%s)", #got, got_, want_, \
             #want);                                                      \
  } while (0)

/* Domains (which Lua state asks) and owners (which flow inside it). */
#define D_LEAD ((uintptr_t)0x100)
#define D_OTHER ((uintptr_t)0x200)
#define D_THIRD ((uintptr_t)0x300)
#define O_1 ((uintptr_t)1)
#define O_2 ((uintptr_t)2)
#define O_3 ((uintptr_t)3)

/* Payloads are static: freeing one only counts. */
typedef struct payload {
  int freed;
} payload;

static payload pl[4];
static int null_frees;

static void pl_free(void *p) {
  if (!p)
    null_frees++;
  else
    ((payload *)p)->freed++;
}

static sf_group *new_group(void) {
  sf_group *g = NULL;
  char name[96];
  switch (kind) {
  case K_NEW:
    g = sf_group_new(0);
    break;
  case K_SINGLE:
    g = sf_group_new(SF_SINGLE_THREAD);
    break;
  default:
    snprintf(name, sizeof name, "lifetime: %s", scenario);
    g = sf_group_open(name, strlen(name));
    break;
  }
  if (!g)
    failed(__LINE__, "cannot make a group");
  return g;
}

static int acq(sf_group *g, const char *key, uintptr_t domain, uintptr_t owner,
               unsigned flags, sf_call **c) {
  *c = NULL;
  return sf_acquire(g, key, strlen(key), domain, owner, flags, c);
}

static uint64_t count_of(sf_group *g, int which) {
  sf_stats st;
  sf_stats_get(g, &st);
  return st.count[which];
}

static size_t inflight(sf_group *g) {
  sf_stats st;
  sf_stats_get(g, &st);
  return st.inflight;
}

static int key_is(sf_call *c, const char *key, size_t len) {
  size_t n;
  const char *k = sf_call_key(c, &n);
  return n == len && memcmp(k, key, len) == 0;
}

/* A leader's call, done: finish, and publish p when someone waits. */
static void finish_publish(sf_call *c, payload *p, unsigned want_foreign) {
  int shared;
  unsigned nlocal, foreign = sf_finish(c, 0, &shared, &nlocal);
  EQ(foreign, want_foreign);
  if (foreign)
    sf_publish(c, p, p ? pl_free : NULL);
}

/* A foreign joiner of a call that ended: its outcome, then its release. */
static void foreign_done(sf_call *c, int want, payload *want_payload) {
  void *got = NULL;
  EQ(sf_wait(c, -1, 0, &got), want);
  if (want == SF_DONE)
    CHECK(got == (void *)want_payload);
  sf_release(c);
}

/* ---- scenarios ---- */

static void statuses(void) {
  sf_group *g = new_group();
  sf_call *c, *d;
  int shared;
  unsigned nlocal;

  EQ(acq(g, "k", D_LEAD, O_1, SF_ACQ_COUNT_CALL, &c), SF_LEADER);
  CHECK(c != NULL && key_is(c, "k", 1) && sf_call_group(c) == g);
  EQ(sf_state(c), SF_RUNNING);
  CHECK(sf_age(c) >= 0 && sf_age(c) < 60);
  /* the owner asks again: no reference, the same call */
  EQ(acq(g, "k", D_LEAD, O_1, SF_ACQ_COUNT_CALL, &d), SF_RECURSIVE);
  CHECK(d == c);
  /* another flow of the same domain joins; another domain is foreign,
   * also when it only joins; the same owner value elsewhere is no owner */
  EQ(acq(g, "k", D_LEAD, O_2, SF_ACQ_COUNT_CALL, &d), SF_JOINED);
  CHECK(d == c);
  EQ(acq(g, "k", D_OTHER, O_3, 0, &d), SF_FOREIGN);
  CHECK(d == c);
  EQ(acq(g, "k", D_OTHER, O_1, SF_ACQ_JOIN_ONLY, &d), SF_FOREIGN);
  CHECK(d == c);
  EQ(acq(g, "k", D_LEAD, O_3, SF_ACQ_JOIN_ONLY, &d), SF_JOINED);
  /* lead-only on a key in flight: nothing done, nothing counted */
  EQ(acq(g, "k", D_LEAD, O_2, SF_ACQ_LEAD_ONLY | SF_ACQ_COUNT_CALL, &d),
     SF_INFLIGHT);
  EQ(acq(g, "k", D_LEAD, O_1, SF_ACQ_LEAD_ONLY, &d), SF_INFLIGHT);
  /* join-only on an idle key: nothing done, nothing counted */
  EQ(acq(g, "idle", D_LEAD, O_1, SF_ACQ_JOIN_ONLY, &d), SF_ABSENT);
  EQ(inflight(g), 1);
  EQ(count_of(g, SF_STAT_EXECUTIONS), 1);
  EQ(count_of(g, SF_STAT_CALLS), 3);
  EQ(count_of(g, SF_STAT_SHARED), 4);
  EQ(sf_finish(c, 0, &shared, &nlocal), 2);
  EQ(shared, 1);
  EQ(nlocal, 2);
  EQ(inflight(g), 0);
  sf_publish(c, &pl[0], pl_free);
  EQ(sf_state(c), SF_DONE);
  /* the key is free again while the old call is still held */
  EQ(acq(g, "k", D_OTHER, O_1, 0, &d), SF_LEADER);
  CHECK(d != c);
  finish_publish(d, NULL, 0);
  foreign_done(c, SF_DONE, &pl[0]);
  foreign_done(c, SF_DONE, &pl[0]);
  EQ(pl[0].freed, 0); /* the two that joined from its domain still hold it */
  sf_release(c);
  EQ(pl[0].freed, 0);
  sf_release(c);
  EQ(pl[0].freed, 1);
  sf_group_release(g);
}

/* Keys are bytes: empty, NULs, around the length kept in the record. */
static void keys(void) {
  static char big[1000];
  static const struct {
    const char *k;
    size_t len;
  } ks[] = {
      {"", 0},
      {"\0", 1},
      {"\0\0", 2},
      {"a", 1},
      {"a\0", 2},
      {"123456789012345678901234", 24},
      {"1234567890123456789012345", 25},
      {"12345678901234567890123", 23},
      {big, sizeof big},
      {big, sizeof big - 1},
  };
  enum { N = sizeof ks / sizeof ks[0] };
  sf_group *g = new_group();
  sf_call *c[N], *d;
  size_t i;

  memset(big, 'x', sizeof big);
  for (i = 0; i < N; i++) {
    EQ(sf_acquire(g, ks[i].k, ks[i].len, D_LEAD, O_1, 0, &c[i]), SF_LEADER);
    CHECK(key_is(c[i], ks[i].k, ks[i].len));
  }
  EQ(inflight(g), N);
  for (i = 0; i < N; i++) {
    EQ(sf_acquire(g, ks[i].k, ks[i].len, D_OTHER, O_1, 0, &d), SF_FOREIGN);
    CHECK(d == c[i]);
  }
  for (i = 0; i < N; i++) {
    int shared;
    unsigned nlocal;
    EQ(sf_finish(c[i], 0, &shared, &nlocal), 1);
    sf_publish(c[i], &pl[0], NULL);
    CHECK(key_is(c[i], ks[i].k, ks[i].len));
    foreign_done(c[i], SF_DONE, &pl[0]);
  }
  EQ(inflight(g), 0);
  sf_group_release(g);
}

/* How a joiner holds on, and how it lets go. */
enum {
  H_JOINED, H_FOREIGN, H_RETAINED, H_WATCHING, H_LEFT, H_LET_GO, H_UNJOINED_LOCAL,
  H_UNJOINED_FOREIGN
};

static const char *const holder_name[] = {
    "joined", "foreign", "retained", "watching", "left (gave up)", "let go",
    "unjoined", "foreign unjoined"};

static sf_call *hold(sf_group *g, const char *key, int how, sf_call *c) {
  sf_call *d = NULL;
  switch (how) {
  case H_JOINED:
  case H_LEFT:
  case H_LET_GO:
  case H_UNJOINED_LOCAL:
    EQ(acq(g, key, D_LEAD, O_2, 0, &d), SF_JOINED);
    break;
  case H_RETAINED:
  case H_WATCHING:
    sf_retain(c, how == H_WATCHING);
    d = c;
    break;
  default:
    EQ(acq(g, key, D_OTHER, O_1, 0, &d), SF_FOREIGN);
    break;
  }
  CHECK(d == c);
  if (how == H_LEFT)
    sf_leave(d);
  else if (how == H_LET_GO)
    sf_release_local(d);
  else if (how == H_UNJOINED_LOCAL)
    sf_unjoin(d, D_LEAD);
  else if (how == H_UNJOINED_FOREIGN)
    sf_unjoin(d, D_OTHER);
  return d;
}

/* Lets go of a holder that has not let go yet. */
static void let_go(int how, sf_call *c, payload *p) {
  if (how == H_FOREIGN)
    foreign_done(c, SF_DONE, p);
  else if (how == H_WATCHING)
    sf_release_local(c);
  else if (how == H_JOINED || how == H_RETAINED)
    sf_release(c);
}

static int lets_go_at_once(int how) {
  return how == H_LEFT || how == H_LET_GO || how == H_UNJOINED_LOCAL ||
         how == H_UNJOINED_FOREIGN;
}

/*
 * A record, its key and its payload live while anyone holds the call,
 * however many other calls come and go meanwhile, and go at the last
 * release. A key too long for the record is freed with it: the count of
 * blocks shows when. A short one's record goes back to its shard's free
 * list: no call gets it while it is held; the next ones on its shard do.
 */
static void references(void) {
  static const char *const long_key = "a key too long to be kept in the record itself";
  int how, shortkey;

  for (shortkey = 0; shortkey <= 1; shortkey++) {
    const char *key = shortkey ? "short" : long_key;
    for (how = H_JOINED; how <= H_UNJOINED_FOREIGN; how++) {
      sf_group *g = new_group();
      sf_call *c, *d;
      long before;
      int i, reused = 0, payload_too = how == H_FOREIGN;
      char churn[32];

      memset(pl, 0, sizeof pl);
      EQ(acq(g, key, D_LEAD, O_1, 0, &c), SF_LEADER);
      hold(g, key, how, c);
      before = atomic_load(&live);
      finish_publish(c, &pl[1], payload_too);
      if (lets_go_at_once(how)) {
        /* nothing holds it now: gone (or pooled) already */
        if (!shortkey)
          EQ(atomic_load(&live), before - 2);
        sf_group_release(g);
        continue;
      }
      EQ(atomic_load(&live), before); /* held: nothing freed */
      for (i = 0; i < 200; i++) {
        snprintf(churn, sizeof churn, "churn %d", i);
        EQ(acq(g, churn, D_LEAD, O_1, 0, &d), SF_LEADER);
        CHECK(d != c);
        finish_publish(d, NULL, 0);
      }
      CHECK(shortkey ? key_is(c, "short", 5) : key_is(c, long_key, strlen(long_key)));
      EQ(sf_state(c), SF_DONE);
      EQ(sf_expire(c), 0);
      EQ(pl[1].freed, 0);
      before = atomic_load(&live);
      let_go(how, c, &pl[1]);
      EQ(pl[1].freed, payload_too);
      /* a long key goes with its record; a record with a payload to free
       * is freed, not pooled */
      EQ(atomic_load(&live), before - (shortkey ? payload_too : 2));
      if (!shortkey || payload_too) {
        sf_group_release(g);
        continue;
      }
      for (i = 0; i < 256 && !reused; i++) {
        snprintf(churn, sizeof churn, "again %d", i);
        EQ(acq(g, churn, D_LEAD, O_1, 0, &d), SF_LEADER);
        reused = d == c;
        finish_publish(d, NULL, 0);
      }
      if (!reused)
        failed(__LINE__, "a record let go by its last holder (%s) was never reused",
               holder_name[how]);
      sf_group_release(g);
    }
  }
}

/*
 * sf_finish's report, one row per mix of joiners: shared (anyone joined,
 * one that gave up included), nlocal (joiners of the leader's domain still
 * waiting, watchers included) and the foreign waiters it returns.
 */
static void finish_results(void) {
  static const struct row {
    const char *what;
    /* the joiners: still waiting, unjoined, left (timed out), let go
     * (sf_release_local), foreign timed out, foreign kept (SF_WAIT_KEEP),
     * watchers and plain references (sf_retain), and a panic */
    int local, foreign, unjoined_local, unjoined_foreign, left, let_go,
        timedout, kept, watch, retain, panicked;
    /* what sf_finish and the counters say */
    int shared, nlocal, nforeign, timeouts, shared_stat;
    int locking; /* waits with a time limit: locking groups only */
  } rows[] = {
      {.what = "nobody joined"},
      {.what = "local joiners", .local = 2, .shared = 1, .nlocal = 2, .shared_stat = 2},
      {.what = "foreign joiners", .foreign = 3, .shared = 1, .nforeign = 3, .shared_stat = 3},
      {.what = "both, and a panic", .local = 1, .foreign = 1, .panicked = 1, .shared = 1,
       .nlocal = 1, .nforeign = 1, .shared_stat = 2},
      {.what = "all unjoined", .unjoined_local = 2, .unjoined_foreign = 1},
      {.what = "a local joiner left", .local = 1, .left = 1, .shared = 1, .nlocal = 1,
       .timeouts = 1, .shared_stat = 2},
      {.what = "a local joiner let go", .let_go = 1, .shared = 1, .shared_stat = 1},
      {.what = "a foreign waiter timed out", .foreign = 1, .timedout = 1, .shared = 1,
       .nforeign = 1, .timeouts = 1, .shared_stat = 2, .locking = 1},
      {.what = "a foreign waiter kept", .kept = 1, .shared = 1, .nforeign = 1,
       .shared_stat = 1, .locking = 1},
      {.what = "a watcher", .watch = 1, .nlocal = 1},
      {.what = "a plain reference", .retain = 1},
  };
  size_t r;

  for (r = 0; r < sizeof rows / sizeof rows[0]; r++) {
    const struct row *w = &rows[r];
    sf_group *g;
    sf_call *c, *d, *held[16];
    int nheld = 0, foreign_held = 0, i, shared = -1;
    unsigned nlocal = 99, nforeign;
    void *got;

    if (w->locking && !((1u << kind) & LOCKING_KINDS))
      continue;
    g = new_group();
    memset(pl, 0, sizeof pl);
    EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
    for (i = 0; i < w->local; i++) {
      EQ(acq(g, "k", D_LEAD, (uintptr_t)(10 + i), 0, &d), SF_JOINED);
      held[nheld++] = d;
    }
    for (i = 0; i < w->unjoined_local; i++) {
      EQ(acq(g, "k", D_LEAD, (uintptr_t)(20 + i), 0, &d), SF_JOINED);
      sf_unjoin(d, D_LEAD);
    }
    for (i = 0; i < w->unjoined_foreign; i++) {
      EQ(acq(g, "k", D_OTHER, O_1, 0, &d), SF_FOREIGN);
      sf_unjoin(d, D_OTHER);
    }
    for (i = 0; i < w->left; i++) {
      EQ(acq(g, "k", D_LEAD, (uintptr_t)(30 + i), 0, &d), SF_JOINED);
      sf_leave(d);
    }
    for (i = 0; i < w->let_go; i++) {
      EQ(acq(g, "k", D_LEAD, (uintptr_t)(40 + i), 0, &d), SF_JOINED);
      sf_release_local(d);
    }
    for (i = 0; i < w->watch; i++) {
      sf_retain(c, 1);
      held[nheld++] = c;
    }
    for (i = 0; i < w->retain; i++) {
      sf_retain(c, 0);
      held[nheld++] = c;
    }
    for (i = 0; i < w->foreign; i++) {
      EQ(acq(g, "k", D_THIRD, O_1, 0, &d), SF_FOREIGN);
      foreign_held++;
    }
    for (i = 0; i < w->timedout; i++) {
      /* gave up: no longer waiting, its reference still to give up */
      EQ(acq(g, "k", D_THIRD, O_3, 0, &d), SF_FOREIGN);
      EQ(sf_wait(d, 0, 0, &got), SF_TIMEDOUT);
    }
    for (i = 0; i < w->kept; i++) {
      EQ(acq(g, "k", D_THIRD, O_2, 0, &d), SF_FOREIGN);
      EQ(sf_wait(d, 0.01, SF_WAIT_KEEP, &got), SF_TIMEDOUT);
      foreign_held++;
    }
    /* sf_finish_alone finishes only when nobody waits, else changes
     * nothing: sf_finish then says the same as without it */
    if (w->nlocal == 0 && w->nforeign == 0) {
      EQ(sf_finish_alone(c, w->panicked, &shared), 0);
      nlocal = 0;
      nforeign = 0;
    } else {
      EQ(sf_finish_alone(c, w->panicked, &shared), -1);
      EQ(inflight(g), 1);
      EQ(count_of(g, SF_STAT_PANICS), 0);
      nforeign = sf_finish(c, w->panicked, &shared, &nlocal);
    }
    if (nforeign != (unsigned)w->nforeign || shared != w->shared ||
        nlocal != (unsigned)w->nlocal)
      failed(__LINE__, "%s: sf_finish says shared %d, nlocal %u, %u foreign; expected %d, %d, %d",
             w->what, shared, nlocal, nforeign, w->shared, w->nlocal, w->nforeign);
    EQ(count_of(g, SF_STAT_SHARED), w->shared_stat);
    EQ(count_of(g, SF_STAT_TIMEOUTS), w->timeouts);
    EQ(count_of(g, SF_STAT_PANICS), w->panicked);
    EQ(inflight(g), 0);
    if (nforeign)
      sf_publish(c, &pl[2], pl_free);
    /* the payload waits for the last holder, whoever it is */
    for (i = 0; i < foreign_held; i++) {
      CHECK(pl[2].freed == 0);
      foreign_done(c, SF_DONE, &pl[2]);
    }
    for (i = 0; i < w->timedout; i++) {
      CHECK(pl[2].freed == 0);
      sf_release(c);
    }
    for (i = 0; i < nheld; i++) {
      CHECK(pl[2].freed == 0);
      sf_release(held[i]);
    }
    EQ(pl[2].freed, nforeign ? 1 : 0);
    sf_group_release(g);
  }
}

/* A payload is freed once, at the last release; a NULL one never is. */
static void payloads(void) {
  sf_group *g = new_group();
  sf_call *c, *d;
  int i, shared;
  unsigned nlocal;

  memset(pl, 0, sizeof pl);
  null_frees = 0;
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  for (i = 0; i < 3; i++)
    EQ(acq(g, "k", D_OTHER, (uintptr_t)i, 0, &d), SF_FOREIGN);
  finish_publish(c, &pl[3], 3);
  for (i = 0; i < 3; i++) {
    void *got = NULL;
    EQ(sf_wait(c, -1, 0, &got), SF_DONE); /* each may read it still */
    CHECK(got == &pl[3]);
  }
  sf_release(c);
  sf_release(c);
  EQ(pl[3].freed, 0);
  sf_release(c);
  EQ(pl[3].freed, 1);

  /* NULL with a destructor, and a payload without one */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &d), SF_FOREIGN);
  EQ(sf_finish(c, 0, &shared, &nlocal), 1);
  sf_publish(c, NULL, pl_free);
  foreign_done(c, SF_DONE, NULL);
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &d), SF_FOREIGN);
  EQ(sf_finish(c, 0, &shared, &nlocal), 1);
  sf_publish(c, &pl[0], NULL);
  foreign_done(c, SF_DONE, &pl[0]);
  EQ(null_frees, 0);
  EQ(pl[0].freed, 0);
  sf_group_release(g);
}

/* The leader goes away: the key is free, foreign waiters are told. */
static void abandon(void) {
  sf_group *g = new_group();
  sf_call *c, *d, *j;
  int shared;
  unsigned nlocal;

  memset(pl, 0, sizeof pl);
  EQ(acq(g, "k", D_LEAD, O_1, SF_ACQ_COUNT_CALL, &c), SF_LEADER);
  EQ(acq(g, "k", D_LEAD, O_2, SF_ACQ_COUNT_CALL, &j), SF_JOINED);
  EQ(acq(g, "k", D_OTHER, O_1, SF_ACQ_COUNT_CALL, &d), SF_FOREIGN);
  EQ(acq(g, "k", D_THIRD, O_1, SF_ACQ_COUNT_CALL, &d), SF_FOREIGN);
  sf_abandon(c);
  EQ(sf_state(c), SF_ABANDONED);
  EQ(inflight(g), 0);
  EQ(count_of(g, SF_STAT_ABANDONED), 1);
  foreign_done(c, SF_ABANDONED, NULL);
  /* a waiter takes over: a new call, while the old one is still held */
  EQ(acq(g, "k", D_THIRD, O_1, SF_ACQ_COUNT_CALL, &d), SF_LEADER);
  CHECK(d != c);
  foreign_done(c, SF_ABANDONED, NULL); /* it was the other foreign holder */
  EQ(sf_state(j), SF_ABANDONED);
  EQ(sf_expire(j), 0);
  sf_release(j);
  EQ(sf_finish(d, 0, &shared, &nlocal), 0);
  EQ(shared, 0);
  EQ(count_of(g, SF_STAT_CALLS), 5);
  EQ(count_of(g, SF_STAT_EXECUTIONS), 2);
  EQ(count_of(g, SF_STAT_ABANDONED), 1);
  /* nobody joined: the record goes at once */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  sf_abandon(c);
  EQ(count_of(g, SF_STAT_ABANDONED), 2);
  EQ(inflight(g), 0);
  sf_group_release(g);
}

/*
 * sf_expire: the call leaves its key though its leader goes on. Waiters are
 * told abandoned, a new caller leads, the old leader's finish reaches no one
 * (and takes nothing from its successor), counted once as abandoned.
 */
static void expire(void) {
  sf_group *g = new_group();
  sf_call *c, *j, *f, *n, *d;
  int shared, expired;
  unsigned nlocal;

  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_LEAD, O_2, 0, &j), SF_JOINED);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  EQ(sf_expire(c), 1);
  EQ(sf_expire(c), 0);
  EQ(sf_state(c), SF_ABANDONED);
  EQ(count_of(g, SF_STAT_ABANDONED), 1);
  EQ(inflight(g), 0);
  foreign_done(f, SF_ABANDONED, NULL);
  CHECK(sf_find(g, "k", 1) == NULL);
  EQ(acq(g, "k", D_THIRD, O_1, 0, &n), SF_LEADER);
  CHECK(n != c);
  /* the key's call now: the successor, which the old leader's outcome
   * may answer (sf_find only points at it) */
  CHECK(sf_find(g, "k", 1) == n);
  EQ(acq(g, "k", D_LEAD, O_2, SF_ACQ_JOIN_ONLY, &d), SF_FOREIGN);
  CHECK(d == n);
  /* an expired call is never finished alone: its outcome has somewhere
   * to go (the leader goes on with sf_finish_ex) */
  EQ(sf_finish_alone(c, 0, &shared), -1);
  EQ(sf_state(c), SF_ABANDONED);
  /* the old leader finishes: no foreign waiter to publish to (they went
   * to the successor); its own domain's joiner still waiting is reported,
   * to be told to take over; the new call stays */
  EQ(sf_finish_ex(c, 0, &shared, &nlocal, &expired), 0);
  EQ(expired, 1);
  EQ(nlocal, 1);
  EQ(shared, 1); /* callers did join it */
  EQ(inflight(g), 1);
  EQ(sf_state(n), SF_RUNNING);
  EQ(sf_state(c), SF_ABANDONED); /* still, for its last holder */
  sf_release_local(j);
  finish_publish(n, &pl[0], 1);
  foreign_done(d, SF_DONE, &pl[0]);
  /* expired, then abandoned: counted once */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(sf_expire(c), 1);
  sf_abandon(c);
  EQ(count_of(g, SF_STAT_ABANDONED), 2);
  /* a finished call does not expire */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_LEAD, O_2, 0, &j), SF_JOINED);
  EQ(sf_finish_ex(c, 0, &shared, &nlocal, &expired), 0);
  EQ(expired, 0);
  EQ(sf_expire(j), 0);
  EQ(sf_state(j), SF_DONE);
  sf_release(j);
  EQ(count_of(g, SF_STAT_ABANDONED), 2);
  sf_group_release(g);
}

/*
 * sf_forget detaches a call from its key. A forgotten call that ends,
 * finished or abandoned, must not take its successor off the key (Go's
 * singleflight had that bug, golang/go#31420); its own joiners still get
 * its outcome.
 */
static void forget(void) {
  sf_group *g = new_group();
  sf_call *c, *f, *n, *d;
  int shared;
  unsigned nlocal;
  int ends;

  EQ(sf_forget(g, "k", 1), 0);
  for (ends = 0; ends < 2; ends++) {
    memset(pl, 0, sizeof pl);
    EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
    EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
    EQ(sf_forget(g, "k", 1), 1);
    EQ(sf_forget(g, "k", 1), 0);
    EQ(inflight(g), 0);
    EQ(acq(g, "k", D_LEAD, O_2, 0, &n), SF_LEADER);
    CHECK(n != c);
    if (ends == 0) {
      finish_publish(c, &pl[0], 1);
      foreign_done(f, SF_DONE, &pl[0]);
    } else {
      sf_abandon(c);
      foreign_done(f, SF_ABANDONED, NULL);
    }
    EQ(inflight(g), 1);
    EQ(acq(g, "k", D_THIRD, O_1, SF_ACQ_JOIN_ONLY, &d), SF_FOREIGN);
    CHECK(d == n);
    EQ(sf_finish(n, 0, &shared, &nlocal), 1);
    sf_publish(n, &pl[1], pl_free);
    foreign_done(d, SF_DONE, &pl[1]);
    EQ(pl[0].freed, ends == 0);
    EQ(pl[1].freed, 1);
  }
  EQ(count_of(g, SF_STAT_FORGOTTEN), 2);
  EQ(inflight(g), 0);
  sf_group_release(g);
}

/* A timed-out wait with SF_WAIT_KEEP keeps the waiter, uncounted. */
static void wait_keep(void) {
  sf_group *g = new_group();
  sf_call *c, *f;
  void *got = NULL;
  int i;

  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  for (i = 0; i < 3; i++)
    EQ(sf_wait(f, 0.001, SF_WAIT_KEEP, &got), SF_TIMEDOUT);
  EQ(count_of(g, SF_STAT_TIMEOUTS), 0);
  finish_publish(c, &pl[0], 1);
  EQ(sf_wait(f, 0, SF_WAIT_KEEP, &got), SF_DONE);
  CHECK(got == &pl[0]);
  sf_release(f);
  /* without it, the first time out ends the wait, and counts */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  EQ(sf_wait(f, 0, 0, &got), SF_TIMEDOUT);
  EQ(count_of(g, SF_STAT_TIMEOUTS), 1);
  finish_publish(c, NULL, 0);
  sf_release(f);
  sf_group_release(g);
}

/* The owner's own key is a recursion; sf_set_owner moves it. */
static void owners(void) {
  sf_group *g = new_group();
  sf_call *c, *d, *j, *f;
  int shared;
  unsigned nlocal;

  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(sf_call_owner(c), O_1);
  EQ(acq(g, "k", D_LEAD, O_1, 0, &d), SF_RECURSIVE);
  CHECK(d == c);
  sf_set_owner(c, O_2);
  EQ(sf_call_owner(c), O_2);
  EQ(acq(g, "k", D_LEAD, O_2, 0, &d), SF_RECURSIVE);
  CHECK(d == c);
  EQ(acq(g, "k", D_LEAD, O_1, 0, &j), SF_JOINED); /* the old owner joins */
  EQ(acq(g, "k", D_OTHER, O_2, 0, &f), SF_FOREIGN); /* the owner, elsewhere */
  EQ(sf_finish(c, 0, &shared, &nlocal), 1);
  EQ(shared, 1);
  EQ(nlocal, 1); /* recursions are no joiners */
  sf_publish(c, NULL, NULL);
  foreign_done(f, SF_DONE, NULL);
  sf_release(j); /* and held nothing: the count of blocks shows it */
  EQ(count_of(g, SF_STAT_SHARED), 2);
  sf_group_release(g);
}

/* Counters the core can't see, added by the caller. */
static void counters(void) {
  sf_group *g = new_group();
  int k;

  for (k = 0; k < SF_STAT_COUNT; k++)
    sf_count(g, k);
  sf_count(g, -1);
  sf_count(g, SF_STAT_COUNT);
  for (k = 0; k < SF_STAT_COUNT; k++)
    EQ(count_of(g, k), 1);
  /* n at once: the duplicates a binding deduplicated on its own */
  sf_count_n(g, SF_STAT_CALLS, 41);
  sf_count_n(g, SF_STAT_SHARED, 0);
  sf_count_n(g, SF_STAT_COUNT, 5);
  EQ(count_of(g, SF_STAT_CALLS), 42);
  EQ(count_of(g, SF_STAT_SHARED), 1);
  EQ(inflight(g), 0);
  sf_group_release(g);
}

/*
 * Out of memory: sf_acquire fails with SF_ENOMEM and changes nothing,
 * whichever allocation fails (the record, or the key kept beside it); so
 * do group constructors.
 */
static void out_of_memory(void) {
  static const char *const long_key = "a key too long to be kept in the record itself";
  sf_group *g;
  sf_call *c;
  int n;

  for (n = 1; n <= 2; n++) {
    g = new_group();
    atomic_store(&fail_after, n);
    EQ(acq(g, long_key, D_LEAD, O_1, SF_ACQ_COUNT_CALL, &c), SF_ENOMEM);
    EQ(atomic_load(&fail_after), 0);
    EQ(inflight(g), 0);
    EQ(count_of(g, SF_STAT_EXECUTIONS), 0);
    EQ(count_of(g, SF_STAT_CALLS), 0); /* nothing changed */
    EQ(acq(g, long_key, D_LEAD, O_1, 0, &c), SF_LEADER);
    finish_publish(c, NULL, 0);
    sf_group_release(g);
  }
  /* every allocation of a new group failing in turn, until one more
   * allocation than the group makes: then it is made */
  for (n = 1;; n++) {
    atomic_store(&fail_after, n);
    g = kind == K_NAMED ? sf_group_open("lifetime: oom", 13)
                        : sf_group_new(kind == K_SINGLE ? SF_SINGLE_THREAD : 0);
    if (atomic_load(&fail_after) != 0) { /* nothing failed: all were made */
      atomic_store(&fail_after, 0);
      CHECK(g != NULL && n > 1);
      sf_group_release(g);
      break;
    }
    CHECK(g == NULL);
    CHECK(n < 16);
  }
  g = new_group();
  sf_group_release(g);
}

/*
 * Named groups: one per name, found again by name however many there are,
 * freed when the last handle and the last call are gone; a name whose
 * group still has a call in flight opens that group.
 */
enum { NNAMES = 10000 };
static sf_group *named[NNAMES];

static void named_groups(void) {
  sf_group *a, *b, *c2;
  sf_call *c, *f;
  const char *name;
  size_t len;
  char buf[32];
  int i;

  EQ(sf_group_count(), 0);
  a = sf_group_open("alpha", 5);
  b = sf_group_open("alpha", 5);
  CHECK(a && a == b);
  EQ(sf_group_count(), 1);
  name = sf_group_name(a, &len);
  CHECK(len == 5 && memcmp(name, "alpha", 5) == 0);
  CHECK(sf_group_name(a, NULL) == name);
  sf_group_release(b); /* one handle of two */
  c2 = sf_group_open("alpha\0beta", 10);
  CHECK(c2 && c2 != a);
  b = sf_group_open("alpha\0beta", 10);
  CHECK(b == c2);
  name = sf_group_name(c2, &len);
  CHECK(len == 10 && memcmp(name, "alpha\0beta", 10) == 0);
  sf_group_release(b);
  sf_group_release(c2);
  CHECK(atomic_load(&live) > 0); /* "alpha" has a handle left */
  sf_group_release(a);
  EQ(atomic_load(&live), 0); /* no named group left, nor their registry */
  a = sf_group_open("", 0);
  b = sf_group_open("", 0);
  CHECK(a && a == b);
  sf_group_release(a);
  sf_group_release(b);
  EQ(atomic_load(&live), 0);

  /* a call outlives the last handle, and keeps its group */
  a = sf_group_open("beta", 4);
  sf_count(a, SF_STAT_PANICS);
  EQ(acq(a, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  sf_group_release(a);
  CHECK(sf_call_group(c) == a);
  CHECK(sf_group_footprint(a) > 0);
  EQ(sf_state(c), SF_RUNNING);
  b = sf_group_open("beta", 4); /* taken back: the same group, counters and all */
  CHECK(b == a);
  EQ(count_of(b, SF_STAT_PANICS), 1);
  EQ(acq(b, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  sf_group_release(b);
  finish_publish(c, &pl[0], 1);
  CHECK(atomic_load(&live) > 0);
  EQ(sf_group_count(), 1);
  foreign_done(f, SF_DONE, &pl[0]);
  EQ(sf_group_count(), 0);
  EQ(atomic_load(&live), 0); /* the last call went: the group with it */

  /* many names */
  for (i = 0; i < NNAMES; i++) {
    snprintf(buf, sizeof buf, "name %d", i);
    named[i] = sf_group_open(buf, strlen(buf));
    CHECK(named[i] != NULL);
  }
  EQ(sf_group_count(), NNAMES);
  for (i = 0; i < NNAMES; i++) {
    snprintf(buf, sizeof buf, "name %d", i);
    b = sf_group_open(buf, strlen(buf));
    if (b != named[i])
      failed(__LINE__, "\"%s\" opened again is another group", buf);
    name = sf_group_name(b, &len);
    CHECK(len == strlen(buf) && memcmp(name, buf, len) == 0);
    sf_group_release(b);
  }
  nchecks += 2 * NNAMES;
  /* a group freed while others live is made anew for another name: its
   * name, counters and table those of a new group */
  a = sf_group_open("gamma", 5);
  sf_count(a, SF_STAT_PANICS);
  EQ(acq(a, "k", D_LEAD, O_1, SF_ACQ_COUNT_CALL, &c), SF_LEADER);
  finish_publish(c, NULL, 0);
  sf_group_release(a);
  EQ(sf_group_count(), NNAMES);
  b = sf_group_open("delta", 5);
  name = sf_group_name(b, &len);
  CHECK(len == 5 && memcmp(name, "delta", 5) == 0);
  EQ(count_of(b, SF_STAT_PANICS), 0);
  EQ(count_of(b, SF_STAT_CALLS), 0);
  EQ(inflight(b), 0);
  EQ(acq(b, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  c2 = sf_group_open("gamma", 5); /* not the group that was gamma's */
  CHECK(c2 != b);
  EQ(count_of(c2, SF_STAT_PANICS), 0);
  sf_group_release(c2);
  finish_publish(c, NULL, 0);
  sf_group_release(b);
  for (i = 0; i < NNAMES; i++)
    sf_group_release(named[i]);
  EQ(sf_group_count(), 0);
  EQ(atomic_load(&live), 0); /* the groups kept for reuse went with the last */
}

/* ---- with a second thread: a foreign waiter that blocks ---- */

typedef struct waiter {
  pthread_t tid;
  sf_call *c;
  double timeout;
  atomic_int status; /* -1 while it waits */
  void *payload;
} waiter;

static void *wait_main(void *arg) {
  waiter *w = (waiter *)arg;
  void *p = NULL;
  int st = sf_wait(w->c, w->timeout, 0, &p);
  w->payload = p;
  atomic_store(&w->status, st);
  return NULL;
}

static void start_waiter(waiter *w, sf_call *c, double timeout) {
  w->c = c;
  w->timeout = timeout;
  w->payload = NULL;
  atomic_store(&w->status, -1);
  if (pthread_create(&w->tid, NULL, wait_main, w) != 0)
    failed(__LINE__, "cannot create a thread");
}

static int end_waiter(waiter *w) {
  pthread_join(w->tid, NULL);
  return atomic_load(&w->status);
}

/* Gives the waiter time to block (what it gets does not depend on it). */
static void pause_ms(int ms) {
  struct timespec ts = {0, ms * 1000000L};
  nanosleep(&ts, NULL);
}

static void blocking(void) {
  sf_group *g = new_group();
  sf_call *c, *f, *n, *d;
  waiter w;
  int how, shared;
  unsigned nlocal;

  /* woken by the leader's publish, abandon, or the call's expiry */
  for (how = 0; how < 3; how++) {
    memset(pl, 0, sizeof pl);
    EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
    EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
    start_waiter(&w, f, -1);
    pause_ms(20);
    if (how == 0) {
      finish_publish(c, &pl[0], 1);
      EQ(end_waiter(&w), SF_DONE);
      CHECK(w.payload == &pl[0]);
    } else if (how == 1) {
      sf_abandon(c);
      EQ(end_waiter(&w), SF_ABANDONED);
    } else {
      EQ(sf_expire(c), 1);
      EQ(end_waiter(&w), SF_ABANDONED);
      EQ(sf_finish(c, 0, &shared, &nlocal), 0);
    }
    EQ(pl[0].freed, 0);
    sf_release(f);
    EQ(pl[0].freed, how == 0);
  }

  /* a forgotten call's waiter is not woken by its successor's end (which
   * wakes the successor's own waiters, on the same condition variable) */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  start_waiter(&w, f, -1);
  EQ(sf_forget(g, "k", 1), 1);
  EQ(acq(g, "k", D_LEAD, O_2, 0, &n), SF_LEADER);
  EQ(acq(g, "k", D_THIRD, O_1, 0, &d), SF_FOREIGN);
  CHECK(d == n);
  pause_ms(20);
  finish_publish(n, &pl[2], 1);
  foreign_done(d, SF_DONE, &pl[2]);
  pause_ms(20);
  EQ(atomic_load(&w.status), -1);
  finish_publish(c, &pl[1], 1);
  EQ(end_waiter(&w), SF_DONE);
  CHECK(w.payload == &pl[1]);
  sf_release(f);

  /* a wait with a time limit ends on it */
  EQ(acq(g, "k", D_LEAD, O_1, 0, &c), SF_LEADER);
  EQ(acq(g, "k", D_OTHER, O_1, 0, &f), SF_FOREIGN);
  start_waiter(&w, f, 0.05);
  EQ(end_waiter(&w), SF_TIMEDOUT);
  finish_publish(c, NULL, 0);
  sf_release(f);
  EQ(count_of(g, SF_STAT_TIMEOUTS), 1);
  sf_group_release(g);
}

/* A wait that never ends fails the run rather than hanging it. */
static void hung(int sig) {
  static const char msg[] = "lifetime: FAILED: still running after 60 s (a wait that never ends?)\n";
  (void)sig;
  if (write(2, msg, sizeof msg - 1) < 0)
    _exit(2);
  _exit(1);
}

/* ---- the table ---- */

static const struct {
  const char *name;
  void (*run)(void);
  unsigned kinds;
} scenarios[] = {
    {"statuses: leader, recursive, joined, foreign, join-only, absent, lead-only", statuses, ALL_KINDS},
    {"keys are bytes: empty, NULs, inline and heap lengths", keys, ALL_KINDS},
    {"each holder keeps record, key and payload until it lets go", references, ALL_KINDS},
    {"sf_finish reports shared, nlocal and foreign waiters", finish_results, ALL_KINDS},
    {"a payload is freed once, after the last release", payloads, ALL_KINDS},
    {"sf_abandon frees the key and tells foreign waiters", abandon, ALL_KINDS},
    {"sf_expire hands the key on; sf_find points at the successor", expire, ALL_KINDS},
    {"a forgotten call's end leaves its successor in place", forget, ALL_KINDS},
    {"SF_WAIT_KEEP keeps a timed-out waiter joined", wait_keep, LOCKING_KINDS},
    {"recursion is per owner; sf_set_owner moves it, sf_call_owner says it", owners,
     ALL_KINDS},
    {"sf_count and sf_count_n add to each counter, ignore others", counters, ALL_KINDS},
    {"out of memory changes nothing", out_of_memory, ALL_KINDS},
    {"named groups: found by name, freed with the last handle and call",
     named_groups, 1u << K_NAMED},
    {"blocked waiters woken by publish, abandon, expiry; not by a successor",
     blocking, LOCKING_KINDS},
};

int main(void) {
  size_t i;
  int nscen = 0, nruns = 0;
  struct sigaction sa;

  memset(&sa, 0, sizeof sa);
  sa.sa_handler = hung;
  sigaction(SIGALRM, &sa, NULL);
  alarm(60);

  for (i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
    char kinds[64] = "";
    scenario = scenarios[i].name;
    for (kind = 0; kind < NKINDS; kind++) {
      if (!(scenarios[i].kinds & (1u << kind)))
        continue;
      memset(pl, 0, sizeof pl);
      null_frees = 0;
      if (atomic_load(&live) != 0)
        failed(__LINE__, "%ld blocks of the core alive before the scenario",
               atomic_load(&live));
      scenarios[i].run();
      if (atomic_load(&live) != 0)
        failed(__LINE__, "%ld blocks of the core still alive after it",
               atomic_load(&live));
      nchecks++;
      if (pl[0].freed > 1 || pl[1].freed > 1 || pl[2].freed > 1 || pl[3].freed > 1)
        failed(__LINE__, "a payload freed more than once");
      strcat(kinds, *kinds ? ", " : "");
      strcat(kinds, kind_name[kind]);
      nruns++;
    }
    kind = 0;
    nscen++;
    printf("lifetime: ok  %s (%s)\n", scenario, kinds);
  }
  printf("lifetime: %d scenarios, %d runs, %lu checks passed\n", nscen, nruns, nchecks);
  return 0;
}
