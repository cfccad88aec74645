/*
 * stress.c: the singleflight core alone under many threads, checked as it
 * goes.
 *
 *   stress [seconds [threads [seed]]]    (or STRESS_SECONDS, STRESS_THREADS,
 *                                          STRESS_SEED in the environment)
 *
 * Every thread is a domain of its own and loops over random operations on
 * random keys of two groups (one private, one process-wide): calls that
 * lead (and then finish, panic or abandon, sometimes with nested calls,
 * recursion and same-domain joins inside), calls that wait as foreign
 * joiners with or without a timeout, forgets, counters and churn on
 * short-lived named groups. A shadow model per key, kept under a per-key
 * lock that brackets acquire, forget, finish and abandon (never the waits
 * or the publishing), checks:
 *   - at most one current (not forgotten) leader per key, and acquire
 *     returns what the model says (leader, the current call, recursion);
 *   - forget reports exactly whether a current call existed;
 *   - every foreign joiner comes back from sf_wait exactly once, with the
 *     payload its leader published, or timed out, or told of abandonment;
 *   - every payload is freed exactly once, the counters of sf_stats_get
 *     equal the events seen, and every group, record and payload is freed
 *     at the end (run it under valgrind or ASan to see that).
 * Exits 0 when all held; prints its seed, so a failure can be replayed
 * (thread interleavings aside).
 */
#define _POSIX_C_SOURCE 200809L

#include "sf_core.h"

#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NGROUPS 2
#define NKEYS 24
#define NCHURN 4
#define PAYLOAD_MAGIC 0x5346504159ULL
#define MAX_THREADS 64

static uint64_t seed;

static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "stress: FAILED (seed %llu): ", (unsigned long long)seed);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  abort();
}

#define CHECK(cond, ...)  \
  do {                    \
    if (!(cond))          \
      fail(__VA_ARGS__);  \
  } while (0)

/* ---- random numbers: xorshift64* ---- */

static uint64_t rnd(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

static unsigned below(uint64_t *s, unsigned n) {
  return (unsigned)(rnd(s) >> 33) % n;
}

/* ---- the shadow model ---- */

typedef struct payload {
  uint64_t magic;
  struct exec *e;
} payload;

typedef struct exec {
  atomic_int refs;
  sf_call *call;
  uintptr_t domain, owner;
  int gi, ki;
  /* under the key's lock */
  int forgotten, abandoned;
  int joined;             /* foreign joiners */
  int patient;            /* foreign joiners that wait with no time limit */
  int nlocal;             /* same-domain joiners still waiting */
  int gaveup;             /* same-domain joiners that gave up waiting */
  /* set before sf_publish or sf_abandon, read by the joiners after */
  payload *published;
  atomic_int done, timedout, told_abandoned;
} exec;

typedef struct keyslot {
  pthread_mutex_t mu;
  exec *current;
  char key[64];
  size_t len;
} keyslot;

typedef struct counters {
  atomic_ullong c[SF_STAT_COUNT];
} counters;

static sf_group *groups[NGROUPS];
static keyslot slots[NGROUPS][NKEYS];
static counters expect[NGROUPS];
static atomic_ullong payloads_made, payloads_freed, waits_done, waits_timedout,
    waits_abandoned;
static atomic_int stop;

static void count(int gi, int which, int delta) {
  atomic_fetch_add(&expect[gi].c[which], (unsigned long long)(long long)delta);
}

static exec *exec_new(sf_call *c, uintptr_t domain, uintptr_t owner, int gi,
                      int ki) {
  exec *e = (exec *)calloc(1, sizeof *e);
  CHECK(e, "out of memory");
  atomic_init(&e->refs, 1);
  e->call = c;
  e->domain = domain;
  e->owner = owner;
  e->gi = gi;
  e->ki = ki;
  return e;
}

static void exec_release(exec *e) {
  int done, timedout, told;
  if (atomic_fetch_sub(&e->refs, 1) != 1)
    return;
  done = atomic_load(&e->done);
  timedout = atomic_load(&e->timedout);
  told = atomic_load(&e->told_abandoned);
  /* every joiner came back exactly once, one way */
  CHECK(done + timedout + told == e->joined,
        "key %s: %d joiners, %d done + %d timed out + %d abandoned",
        slots[e->gi][e->ki].key, e->joined, done, timedout, told);
  if (e->abandoned)
    CHECK(done == 0, "a waiter of an abandoned call got a result");
  else
    CHECK(told == 0, "a waiter of a finished call was told it was abandoned");
  free(e);
}

static void payload_free(void *p) {
  payload *pl = (payload *)p;
  CHECK(pl->magic == PAYLOAD_MAGIC, "payload freed twice or corrupt");
  pl->magic = 0;
  free(pl);
  atomic_fetch_add(&payloads_freed, 1);
}

/* ---- the operations ---- */

typedef struct worker {
  int index;
  uintptr_t domain;
  uintptr_t next_owner;
  uint64_t rng;
  unsigned long ops;
  pthread_t tid;
} worker;

static void spin(worker *w) {
  unsigned n = below(&w->rng, 100);
  if (n < 60) {
    static atomic_uint sink;
    unsigned i, x = 0, iters = below(&w->rng, 2000);
    for (i = 0; i < iters; i++)
      x += i * i;
    atomic_fetch_add_explicit(&sink, x, memory_order_relaxed);
  } else if (n < 90) {
    sched_yield();
  } else {
    struct timespec ts = {0, (long)(10000 + below(&w->rng, 90000))};
    nanosleep(&ts, NULL);
  }
}

static double pick_timeout(worker *w, int nested) {
  unsigned n = below(&w->rng, 100);
  if (!nested && n < 50)
    return -1;              /* no limit */
  if (n < 60)
    return 0;
  return (double)below(&w->rng, 2000) * 1e-6;
}

static void call_op(worker *w, int gi, int ki, uintptr_t owner, int nested);
static void forget_op(worker *w, int gi, int ki);

/* The leader's side: work, maybe nested calls, then finish or abandon. */
static void lead(worker *w, exec *e, int nested) {
  keyslot *ks = &slots[e->gi][e->ki];
  int shared, panicked, gave_up;
  unsigned nforeign, nlocal;
  spin(w);
  if (!nested) {
    unsigned n = below(&w->rng, 100);
    if (n < 15) { /* ask again for the key being led */
      call_op(w, e->gi, e->ki, below(&w->rng, 2) ? e->owner : w->next_owner++, 1);
    } else if (n < 25) { /* another key, maybe led elsewhere */
      call_op(w, e->gi, (int)below(&w->rng, NKEYS), w->next_owner++, 1);
    } else if (n < 28) {
      forget_op(w, e->gi, e->ki);
    }
    spin(w);
  }

  pthread_mutex_lock(&ks->mu);
  if (ks->current == e)
    ks->current = NULL;
  if (below(&w->rng, 100) < 6) {
    e->abandoned = 1;
    count(e->gi, SF_STAT_ABANDONED, 1);
    sf_abandon(e->call);
    pthread_mutex_unlock(&ks->mu);
    exec_release(e);
    return;
  }
  panicked = below(&w->rng, 100) < 20;
  if (panicked)
    count(e->gi, SF_STAT_PANICS, 1);
  gave_up = atomic_load(&e->timedout); /* before: more may give up during */
  nforeign = sf_finish(e->call, panicked, &shared, &nlocal);
  CHECK(nlocal == (unsigned)e->nlocal, "sf_finish: nlocal %u, expected %d",
        nlocal, e->nlocal);
  /* a joiner seen timed out before sf_finish is not among them */
  CHECK(nforeign + (unsigned)gave_up <= (unsigned)e->joined,
        "sf_finish: %u foreign waiters of %d, %d timed out before", nforeign,
        e->joined, gave_up);
  if (e->joined == 0 && e->nlocal == 0 && e->gaveup == 0)
    CHECK(!shared, "sf_finish: shared with nobody");
  if (e->patient > 0)
    CHECK(shared, "sf_finish: not shared, with a waiter that cannot give up");
  pthread_mutex_unlock(&ks->mu);
  if (nforeign > 0) {
    payload *p = NULL;
    if (below(&w->rng, 100) < 85) {
      p = (payload *)malloc(sizeof *p);
      CHECK(p, "out of memory");
      p->magic = PAYLOAD_MAGIC;
      p->e = e;
      atomic_fetch_add(&payloads_made, 1);
    }
    e->published = p;
    sf_publish(e->call, p, payload_free);
  }
  exec_release(e);
}

static void call_op(worker *w, int gi, int ki, uintptr_t owner, int nested) {
  keyslot *ks = &slots[gi][ki];
  sf_group *g = groups[gi];
  unsigned flags = SF_ACQ_COUNT_CALL;
  double timeout = pick_timeout(w, nested);

  for (;;) {
    sf_call *c = NULL;
    exec *cur, *e;
    int st, rc;
    void *p = NULL;

    pthread_mutex_lock(&ks->mu);
    cur = ks->current;
    st = sf_acquire(g, ks->key, ks->len, w->domain, owner, flags, &c);
    if (flags)
      count(gi, SF_STAT_CALLS, 1);
    flags = 0; /* a retry after abandonment is the same call */
    if (!cur) {
      CHECK(st == SF_LEADER, "key %s: no call in flight, acquire gave %d",
            ks->key, st);
      e = exec_new(c, w->domain, owner, gi, ki);
      ks->current = e;
      count(gi, SF_STAT_EXECUTIONS, 1);
      pthread_mutex_unlock(&ks->mu);
      lead(w, e, nested);
      return;
    }
    if (cur->domain == w->domain && cur->owner == owner) {
      CHECK(st == SF_RECURSIVE, "key %s: recursion gave %d", ks->key, st);
      pthread_mutex_unlock(&ks->mu);
      return;
    }
    CHECK(c == cur->call, "key %s: joined a call that is not the current one",
          ks->key);
    count(gi, SF_STAT_SHARED, 1);
    if (cur->domain == w->domain) {
      CHECK(st == SF_JOINED, "key %s: same domain, acquire gave %d", ks->key, st);
      cur->nlocal++;
      if (below(&w->rng, 2)) {
        sf_unjoin(c, w->domain);
        cur->nlocal--;
        count(gi, SF_STAT_SHARED, -1);
      } else { /* gave up waiting: no longer among the leader's waiters */
        sf_leave(c);
        cur->nlocal--;
        cur->gaveup++;
        count(gi, SF_STAT_TIMEOUTS, 1);
      }
      pthread_mutex_unlock(&ks->mu);
      return;
    }
    CHECK(st == SF_FOREIGN, "key %s: another domain's call, acquire gave %d",
          ks->key, st);
    e = cur;
    e->joined++;
    if (timeout < 0)
      e->patient++;
    atomic_fetch_add(&e->refs, 1);
    pthread_mutex_unlock(&ks->mu);

    rc = sf_wait(c, timeout, 0, &p);
    switch (rc) {
    case SF_DONE:
      CHECK(p == e->published, "key %s: a waiter got another call's payload",
            ks->key);
      CHECK(!p || (((payload *)p)->magic == PAYLOAD_MAGIC &&
                   ((payload *)p)->e == e),
            "key %s: payload corrupt", ks->key);
      atomic_fetch_add(&e->done, 1);
      atomic_fetch_add(&waits_done, 1);
      break;
    case SF_TIMEDOUT:
      CHECK(timeout >= 0, "key %s: timed out without a timeout", ks->key);
      atomic_fetch_add(&e->timedout, 1);
      atomic_fetch_add(&waits_timedout, 1);
      count(gi, SF_STAT_TIMEOUTS, 1);
      break;
    case SF_ABANDONED:
      CHECK(e->abandoned, "key %s: told of an abandonment that did not happen",
            ks->key);
      atomic_fetch_add(&e->told_abandoned, 1);
      atomic_fetch_add(&waits_abandoned, 1);
      break;
    default:
      fail("sf_wait gave %d", rc);
    }
    sf_release(c);
    exec_release(e);
    if (rc != SF_ABANDONED)
      return;
    /* the leader went away: try again, maybe as the new leader */
  }
}

static void forget_op(worker *w, int gi, int ki) {
  keyslot *ks = &slots[gi][ki];
  int r;
  (void)w;
  pthread_mutex_lock(&ks->mu);
  r = sf_forget(groups[gi], ks->key, ks->len);
  CHECK(r == (ks->current != NULL), "key %s: forget gave %d", ks->key, r);
  if (ks->current) {
    ks->current->forgotten = 1;
    ks->current = NULL;
    count(gi, SF_STAT_FORGOTTEN, 1);
  }
  pthread_mutex_unlock(&ks->mu);
}

/* Named groups that come and go while others use them; half the time the
 * handle goes before the call it made is over (the call keeps the group). */
static void churn_op(worker *w) {
  char name[32];
  int n = snprintf(name, sizeof name, "stress-churn-%u", below(&w->rng, NCHURN));
  sf_group *g = sf_group_open(name, (size_t)n);
  sf_call *c;
  int st, early = below(&w->rng, 2);
  char key[2] = {(char)('a' + below(&w->rng, 3)), 0};
  CHECK(g, "sf_group_open failed");
  st = sf_acquire(g, key, 1, w->domain, w->next_owner++, 0, &c);
  CHECK(sf_call_group(c) == g, "churn: a call of another group");
  if (early)
    sf_group_release(g);
  if (st == SF_LEADER) {
    int shared;
    unsigned nlocal;
    spin(w);
    if (below(&w->rng, 10) == 0) {
      sf_abandon(c);
    } else if (sf_finish(c, 0, &shared, &nlocal) > 0) {
      payload *p = (payload *)malloc(sizeof *p);
      CHECK(p, "out of memory");
      p->magic = PAYLOAD_MAGIC;
      p->e = NULL;
      atomic_fetch_add(&payloads_made, 1);
      sf_publish(c, p, payload_free);
    }
  } else if (st == SF_FOREIGN) {
    void *p = NULL;
    if (sf_wait(c, below(&w->rng, 2) ? -1 : 0.001, 0, &p) == SF_DONE)
      CHECK(((payload *)p)->magic == PAYLOAD_MAGIC, "churn: payload corrupt");
    sf_release(c);
  } else {
    fail("churn: acquire gave %d", st);
  }
  if (!early)
    sf_group_release(g);
}

static void *worker_main(void *arg) {
  worker *w = (worker *)arg;
  sf_group *mine = sf_group_open("stress", 6);
  CHECK(mine == groups[1], "sf_group_open gave another group for one name");
  while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
    int gi = (int)below(&w->rng, NGROUPS), ki = (int)below(&w->rng, NKEYS);
    unsigned n = below(&w->rng, 1000);
    if (n < 850) {
      call_op(w, gi, ki, w->next_owner++, 0);
    } else if (n < 950) {
      forget_op(w, gi, ki);
    } else if (n < 970) {
      churn_op(w);
    } else if (n < 990) {
      sf_stats st;
      sf_stats_get(groups[gi], &st);
      CHECK(st.inflight <= NKEYS, "inflight %zu", st.inflight);
    } else {
      int which = (int)below(&w->rng, SF_STAT_COUNT);
      count(gi, which, 1);
      sf_count(groups[gi], which);
    }
    w->ops++;
  }
  sf_group_release(mine);
  return NULL;
}

/* ---- main ---- */

static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static int finished;

static void *joiner_main(void *arg) {
  worker *ws = (worker *)arg;
  int i, n = ws[0].index; /* the count rides in slot 0's index field */
  for (i = 1; i <= n; i++)
    pthread_join(ws[i].tid, NULL);
  pthread_mutex_lock(&done_mu);
  finished = 1;
  pthread_cond_signal(&done_cv);
  pthread_mutex_unlock(&done_mu);
  return NULL;
}

static const char *const stat_names[SF_STAT_COUNT] = {
  "calls", "executions", "shared", "panics", "timeouts", "abandoned",
  "forgotten"
};

static long env_or(const char *name, long dflt) {
  const char *s = getenv(name);
  return s && *s ? strtol(s, NULL, 10) : dflt;
}

int main(int argc, char **argv) {
  double seconds = (double)env_or("STRESS_SECONDS", 3);
  int nthreads = (int)env_or("STRESS_THREADS", 8), i, k, gi;
  worker ws[MAX_THREADS + 1];
  pthread_t joiner;
  struct timespec ts;
  unsigned long ops = 0;
  int rc = 0;

  seed = (uint64_t)env_or("STRESS_SEED", 0);
  if (argc > 1)
    seconds = atof(argv[1]);
  if (argc > 2)
    nthreads = atoi(argv[2]);
  if (argc > 3)
    seed = strtoull(argv[3], NULL, 10);
  if (!seed) {
    clock_gettime(CLOCK_REALTIME, &ts);
    seed = ((uint64_t)ts.tv_sec * 1000003u) ^ (uint64_t)ts.tv_nsec;
    seed = seed % 1000000007u + 1;
  }
  if (nthreads < 1 || nthreads > MAX_THREADS)
    nthreads = 8;
  printf("stress: seed %llu, %d threads, %.1f s (STRESS_SEED=%llu to replay)\n",
         (unsigned long long)seed, nthreads, seconds, (unsigned long long)seed);
  fflush(stdout);

  groups[0] = sf_group_new(0);
  groups[1] = sf_group_open("stress", 6);
  CHECK(groups[0] && groups[1], "cannot make the groups");
  for (gi = 0; gi < NGROUPS; gi++) {
    for (k = 0; k < NKEYS; k++) {
      keyslot *ks = &slots[gi][k];
      pthread_mutex_init(&ks->mu, NULL);
      /* every fourth key is too long to live inside the record */
      ks->len = (size_t)snprintf(ks->key, sizeof ks->key,
                                 k % 4 ? "key-%d" : "a-long-key-kept-on-the-heap-%d", k);
    }
  }

  for (i = 1; i <= nthreads; i++) {
    worker *w = &ws[i];
    memset(w, 0, sizeof *w);
    w->index = i;
    w->domain = (uintptr_t)i;
    w->next_owner = 1;
    w->rng = seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 0xBF58476D1CE4E5B9ULL;
    if (!w->rng)
      w->rng = 1;
    CHECK(pthread_create(&w->tid, NULL, worker_main, w) == 0, "pthread_create");
  }
  ws[0].index = nthreads;
  CHECK(pthread_create(&joiner, NULL, joiner_main, ws) == 0, "pthread_create");

  ts.tv_sec = (time_t)seconds;
  ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
  nanosleep(&ts, NULL);
  atomic_store(&stop, 1);

  /* a hang guard: the workers must all stop within a minute */
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += (time_t)env_or("STRESS_HANG_GUARD", 60);
  pthread_mutex_lock(&done_mu);
  while (!finished)
    if (pthread_cond_timedwait(&done_cv, &done_mu, &ts) != 0)
      break;
  pthread_mutex_unlock(&done_mu);
  CHECK(finished, "the workers did not stop: a waiter was never woken?");
  pthread_join(joiner, NULL);

  for (i = 1; i <= nthreads; i++)
    ops += ws[i].ops;

  for (gi = 0; gi < NGROUPS; gi++) {
    sf_stats st;
    sf_stats_get(groups[gi], &st);
    CHECK(st.inflight == 0, "group %d: %zu calls still in flight", gi, st.inflight);
    for (k = 0; k < SF_STAT_COUNT; k++) {
      unsigned long long want = atomic_load(&expect[gi].c[k]);
      if (st.count[k] != want) {
        fprintf(stderr, "stress: group %d: %s %llu, expected %llu\n", gi,
                stat_names[k], (unsigned long long)st.count[k], want);
        rc = 1;
      }
    }
    for (k = 0; k < NKEYS; k++)
      CHECK(slots[gi][k].current == NULL, "a key still has a current call");
  }
  printf("stress: %lu operations, %llu executions, %llu waits done, "
         "%llu timed out, %llu told of abandonment, %llu abandoned, "
         "%llu forgotten, %llu payloads\n",
         ops,
         atomic_load(&expect[0].c[SF_STAT_EXECUTIONS]) +
             atomic_load(&expect[1].c[SF_STAT_EXECUTIONS]),
         atomic_load(&waits_done), atomic_load(&waits_timedout),
         atomic_load(&waits_abandoned),
         atomic_load(&expect[0].c[SF_STAT_ABANDONED]) +
             atomic_load(&expect[1].c[SF_STAT_ABANDONED]),
         atomic_load(&expect[0].c[SF_STAT_FORGOTTEN]) +
             atomic_load(&expect[1].c[SF_STAT_FORGOTTEN]),
         atomic_load(&payloads_made));

  sf_group_release(groups[0]);
  sf_group_release(groups[1]);
  CHECK(atomic_load(&payloads_made) == atomic_load(&payloads_freed),
        "%llu payloads made, %llu freed", atomic_load(&payloads_made),
        atomic_load(&payloads_freed));

  /* every named group let go of is gone: the names open fresh groups */
  for (k = -1; k < NCHURN; k++) {
    char name[32];
    int n = k < 0 ? snprintf(name, sizeof name, "stress")
                  : snprintf(name, sizeof name, "stress-churn-%d", k);
    sf_group *g = sf_group_open(name, (size_t)n);
    sf_stats st;
    sf_stats_get(g, &st);
    CHECK(st.count[SF_STAT_CALLS] == 0 && st.count[SF_STAT_EXECUTIONS] == 0,
          "group %s outlived its last reference", name);
    sf_group_release(g);
  }
  for (gi = 0; gi < NGROUPS; gi++)
    for (k = 0; k < NKEYS; k++)
      pthread_mutex_destroy(&slots[gi][k].mu);
  if (rc)
    fail("counters differ");
  printf("stress: ok\n");
  return 0;
}
