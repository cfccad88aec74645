/*
 * core_bench.c: the C core alone, no Lua.
 *
 *   core_bench [scale]
 *
 * Prints one line per measurement, "core <name> <value>", each the median of
 * several rounds. scale (default 1) multiplies the operation counts; the
 * smoke run passes a small fraction.
 *
 *   acquire_ns     acquire + finish on one key, one thread, nobody waiting
 *   private_ns     the same on a group made with SF_SINGLE_THREAD (no locks),
 *                  as the binding's private groups are
 *   par_ops        2 threads on 1024 keys, operations per second (total)
 *   same_ops       2 threads on one key, operations per second (total)
 *   same_execs     executions per 100 calls in the same-key run
 *   waves          2 threads x N waves of callers on one key: waves run
 *   waves_execs    ... and executions (equal when every wave was shared)
 *   named_10_ns    open + release of a fresh process-wide group's name, with
 *                  10 others open; named_many_ns: with named_many open
 *   inflight_bytes heap bytes per in-flight call (8-byte key), measured
 *   footprint      sf_call_footprint(8), the record alone
 */
#define _GNU_SOURCE

#include "sf_core.h"

#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 5
#define NKEYS 1024

static double scale = 1.0;

static long scaled(long n) {
  long s = (long)((double)n * scale);
  return s < 1 ? 1 : s;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void die(const char *what) {
  fprintf(stderr, "core_bench: %s\n", what);
  exit(1);
}

/* The work: counts its runs in the caller's own counter and returns at
 * once. Kept out of line, as Go's closure is. */
__attribute__((noinline)) static void *work(void *arg) {
  ++*(volatile long *)arg;
  return arg;
}

/* One call as the Go Do does it: lead and run the work, or wait for the
 * leader in flight. Returns 1 when this caller ran the work. */
static int do_call(sf_group *g, const char *key, size_t len, uintptr_t self,
                   void *(*fn)(void *), void *arg) {
  for (;;) {
    sf_call *c;
    void *payload;
    int shared, st;
    unsigned nlocal;
    st = sf_acquire(g, key, len, self, self, SF_ACQ_COUNT_CALL, &c);
    if (st == SF_LEADER) {
      void *r = fn(arg);
      if (sf_finish(c, 0, &shared, &nlocal) > 0)
        sf_publish(c, r, NULL);
      return 1;
    }
    if (st != SF_FOREIGN)
      die("unexpected acquire status");
    st = sf_wait(c, -1, 0, &payload);
    sf_release(c);
    if (st == SF_DONE)
      return 0;
  }
}

/* ---- uncontended ---- */

static double bench_acquire(long n, int private_group) {
  sf_group *g = private_group ? sf_group_new(SF_SINGLE_THREAD)
                              : sf_group_open("bench.acquire", 13);
  long runs = 0, i;
  double t0, t;
  if (!g)
    die("out of memory");
  for (i = 0; i < 1000; i++) /* warm the free list */
    do_call(g, "key", 3, 1, work, &runs);
  t0 = now();
  for (i = 0; i < n; i++)
    do_call(g, "key", 3, 1, work, &runs);
  t = now() - t0;
  sf_group_release(g);
  if (runs != n + 1000)
    die("the work did not run on every call");
  return t / (double)n * 1e9;
}

/* ---- two threads ---- */

typedef struct worker {
  _Alignas(64) pthread_t th; /* a cache line each: no false sharing */
  sf_group *g;
  pthread_barrier_t *start;
  int id;
  long ops;
  int same_key;
  long executions;
  long runs; /* the work's counter */
} worker;

static char keys[NKEYS][16];
static size_t keylens[NKEYS];

static void *worker_main(void *arg) {
  worker *w = (worker *)arg;
  long i, execs = 0;
  uintptr_t self = (uintptr_t)w->id + 1;
  unsigned k = (unsigned)w->id * (NKEYS / 2);
  pthread_barrier_wait(w->start);
  for (i = 0; i < w->ops; i++) {
    if (w->same_key)
      execs += do_call(w->g, "key", 3, self, work, &w->runs);
    else
      execs += do_call(w->g, keys[k], keylens[k], self, work, &w->runs);
    k = (k + 1) & (NKEYS - 1);
  }
  w->executions = execs;
  if (w->runs != execs)
    die("executions and runs of the work differ");
  return NULL;
}

/* Two threads, ops each; returns total ops/s, *execs the executions. */
static double bench_two(long ops, int same_key, long *execs) {
  sf_group *g = sf_group_open("bench.two", 9);
  pthread_barrier_t start;
  worker w[2];
  double t0, t;
  int i;
  if (!g)
    die("out of memory");
  pthread_barrier_init(&start, NULL, 3);
  for (i = 0; i < 2; i++) {
    memset(&w[i], 0, sizeof w[i]);
    w[i].g = g;
    w[i].start = &start;
    w[i].id = i;
    w[i].ops = ops;
    w[i].same_key = same_key;
    if (pthread_create(&w[i].th, NULL, worker_main, &w[i]) != 0)
      die("pthread_create");
  }
  pthread_barrier_wait(&start);
  t0 = now();
  for (i = 0; i < 2; i++)
    pthread_join(w[i].th, NULL);
  t = now() - t0;
  pthread_barrier_destroy(&start);
  sf_group_release(g);
  *execs = w[0].executions + w[1].executions;
  return (double)(2 * ops) / t;
}

/*
 * ---- waves: both threads call one key at once ----
 *
 * The work lasts until the group has seen the other caller join, or
 * 100 ms, as Go's own duplicate-suppression test holds its leader until
 * the others have called: the count is then the core's doing, not the
 * scheduler's. A caller that leads instead of joining makes one more
 * execution (and a 100 ms wait).
 */

typedef struct wave {
  sf_group *g;
  uint64_t joins; /* the group's shared count before the wave */
} wave;

static uint64_t shared_count(sf_group *g) {
  sf_stats st;
  sf_stats_get(g, &st);
  return st.count[SF_STAT_SHARED];
}

static void *wave_work(void *arg) {
  wave *wv = (wave *)arg;
  struct timespec ts = {0, 50000L};
  double deadline = now() + 0.1;
  while (shared_count(wv->g) == wv->joins && now() < deadline)
    nanosleep(&ts, NULL);
  return arg;
}

typedef struct waver {
  _Alignas(64) pthread_t th;
  wave *wv;
  pthread_barrier_t *bar;
  int id;
  long waves;
  long executions;
} waver;

static void *waver_main(void *arg) {
  waver *w = (waver *)arg;
  long i;
  char key[32];
  for (i = 0; i < w->waves; i++) {
    int len = snprintf(key, sizeof key, "wave:%ld", i);
    if (w->id == 0)
      w->wv->joins = shared_count(w->wv->g);
    pthread_barrier_wait(w->bar);
    w->executions += do_call(w->wv->g, key, (size_t)len,
                             (uintptr_t)w->id + 1, wave_work, w->wv);
    pthread_barrier_wait(w->bar);
  }
  return NULL;
}

static long bench_waves(long waves) {
  wave wv;
  pthread_barrier_t bar;
  waver w[2];
  int i;
  wv.g = sf_group_open("bench.waves", 11);
  if (!wv.g)
    die("out of memory");
  pthread_barrier_init(&bar, NULL, 2);
  for (i = 0; i < 2; i++) {
    memset(&w[i], 0, sizeof w[i]);
    w[i].wv = &wv;
    w[i].bar = &bar;
    w[i].id = i;
    w[i].waves = waves;
    if (pthread_create(&w[i].th, NULL, waver_main, &w[i]) != 0)
      die("pthread_create");
  }
  for (i = 0; i < 2; i++)
    pthread_join(w[i].th, NULL);
  pthread_barrier_destroy(&bar);
  sf_group_release(wv.g);
  return w[0].executions + w[1].executions;
}

/* ---- opening process-wide groups among others ---- */

/* ns per open and release of a fresh name, with `alive` other groups open
 * (the C core alone: the registry and the groups' memory). */
static double bench_named(long alive, long n) {
  sf_group **held = malloc(sizeof *held * (size_t)(alive > 0 ? alive : 1));
  char name[40];
  double t, per;
  long i;
  static long probes;
  if (!held)
    die("out of memory");
  for (i = 0; i < alive; i++) {
    int len = snprintf(name, sizeof name, "alive:%ld:%ld", alive, i);
    if (!(held[i] = sf_group_open(name, (size_t)len)))
      die("out of memory");
  }
  t = now();
  for (i = 0; i < n; i++) {
    int len = snprintf(name, sizeof name, "probe:%ld", probes++);
    sf_group *g = sf_group_open(name, (size_t)len);
    if (!g)
      die("out of memory");
    sf_group_release(g);
  }
  per = (now() - t) / (double)n * 1e9;
  for (i = 0; i < alive; i++)
    sf_group_release(held[i]);
  free(held);
  return per;
}

/* ---- memory per in-flight call ---- */

static double bench_inflight(long n) {
  sf_group *g = sf_group_open("bench.mem", 9);
  sf_call **calls = malloc(sizeof *calls * (size_t)n);
  struct mallinfo2 before, after;
  char key[32];
  long i;
  int shared;
  unsigned nlocal;
  if (!g || !calls)
    die("out of memory");
  before = mallinfo2();
  for (i = 0; i < n; i++) {
    snprintf(key, sizeof key, "%08lx", (unsigned long)i); /* 8 bytes */
    if (sf_acquire(g, key, 8, 1, 1, 0, &calls[i]) != SF_LEADER)
      die("expected to lead");
  }
  after = mallinfo2();
  for (i = 0; i < n; i++)
    sf_finish(calls[i], 0, &shared, &nlocal);
  sf_group_release(g);
  free(calls);
  return (double)(after.uordblks - before.uordblks) / (double)n;
}

int main(int argc, char **argv) {
  double v[ROUNDS], par[ROUNDS], same[ROUNDS], se[ROUNDS];
  long acq_n, par_n, i, execs, waves, wave_execs;
  int r;

  if (argc > 1)
    scale = atof(argv[1]);
  if (!(scale > 0))
    die("scale must be a positive number");
  for (i = 0; i < NKEYS; i++) {
    int len = snprintf(keys[i], sizeof keys[i], "key:%ld", i);
    keylens[i] = (size_t)len;
  }
  acq_n = scaled(5000000);
  par_n = scaled(2000000);

  for (r = 0; r < ROUNDS; r++)
    v[r] = bench_acquire(acq_n, 0);
  printf("core acquire_ns %.2f\n", median(v, ROUNDS));
  for (r = 0; r < ROUNDS; r++)
    v[r] = bench_acquire(acq_n, 1);
  printf("core private_ns %.2f\n", median(v, ROUNDS));

  for (r = 0; r < ROUNDS; r++) {
    par[r] = bench_two(par_n, 0, &execs);
    same[r] = bench_two(par_n, 1, &execs);
    se[r] = 100.0 * (double)execs / (double)(2 * par_n);
  }
  printf("core par_ops %.0f\n", median(par, ROUNDS));
  printf("core same_ops %.0f\n", median(same, ROUNDS));
  printf("core same_execs %.2f\n", median(se, ROUNDS));

  waves = scaled(1000);
  wave_execs = bench_waves(waves);
  printf("core waves %ld\n", waves);
  printf("core waves_execs %ld\n", wave_execs);

  for (r = 0; r < ROUNDS; r++) {
    v[r] = bench_named(10, scaled(20000));
    par[r] = bench_named(scaled(100000), scaled(20000));
  }
  printf("core named_10_ns %.1f\n", median(v, ROUNDS));
  printf("core named_many_ns %.1f\n", median(par, ROUNDS));
  printf("core named_many %ld\n", scaled(100000));

  printf("core inflight_bytes %.1f\n", bench_inflight(scaled(100000)));
  printf("core footprint %zu\n", sf_call_footprint(8));
  return 0;
}
