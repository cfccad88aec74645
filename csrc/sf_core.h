/*
 * sf_core.h: duplicate-call suppression, the part that knows no Lua.
 *
 * A group maps keys to in-flight calls. The first caller of a key becomes
 * the leader and runs the work; callers that arrive while it runs join the
 * call. Joiners from the leader's own domain (for the binding: the same
 * lua_State) wait by their own means; joiners from other domains block on a
 * condition variable until the leader publishes an opaque payload.
 *
 * Every function is thread-safe unless the group was made with
 * SF_SINGLE_THREAD, in which case the caller promises that one thread at a
 * time touches it. No function calls back into user code while it holds a
 * lock.
 */
#ifndef SF_CORE_H
#define SF_CORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct sf_group sf_group;
typedef struct sf_call sf_call;

/* Frees a payload given to sf_publish once the last waiter released it. */
typedef void (*sf_free_fn)(void *payload);

/* Group creation flags. */
enum {
  SF_SINGLE_THREAD = 1 /* no locking: one thread uses the group at a time */
};

/* What sf_acquire made of the caller. */
enum {
  SF_ENOMEM = -1,  /* out of memory (or a key of 4 GiB or more): nothing changed */
  SF_LEADER = 0,   /* run the work, then sf_finish */
  SF_JOINED = 1,   /* joined a call led from the same domain */
  SF_FOREIGN = 2,  /* joined a call led from another domain: sf_wait */
  SF_RECURSIVE = 3, /* the owner asked again for the key it is running */
  SF_ABSENT = 4,    /* SF_ACQ_JOIN_ONLY and no call in flight: nothing done */
  SF_INFLIGHT = 5   /* SF_ACQ_LEAD_ONLY and a call in flight: nothing done */
};

/* How a foreign wait ended, and what sf_state says of a call. */
enum {
  SF_DONE = 0,      /* the leader published: see the payload */
  SF_TIMEDOUT = 1,  /* gave up; the call goes on without this waiter */
  SF_ABANDONED = 2, /* the leader went away, or the call expired (see
                       sf_expire): try sf_acquire again */
  SF_RUNNING = 3    /* sf_state only: no outcome yet */
};

/* Flags for sf_wait. */
enum {
  SF_WAIT_KEEP = 1  /* a timeout keeps the waiter joined (a future that may
                       wait again), and is not counted */
};

/* Counters kept per group, over every domain. */
enum {
  SF_STAT_CALLS,
  SF_STAT_EXECUTIONS,
  SF_STAT_SHARED,
  SF_STAT_PANICS,
  SF_STAT_TIMEOUTS,
  SF_STAT_ABANDONED,
  SF_STAT_FORGOTTEN,
  SF_STAT_COUNT
};

typedef struct sf_stats {
  size_t inflight;                 /* keys with a call running now */
  uint64_t count[SF_STAT_COUNT];   /* indexed by SF_STAT_* */
} sf_stats;

/* Flags for sf_acquire. */
enum {
  SF_ACQ_COUNT_CALL = 1, /* count this acquire in SF_STAT_CALLS */
  SF_ACQ_JOIN_ONLY = 2,  /* join a call in flight, but never lead one */
  SF_ACQ_LEAD_ONLY = 4   /* lead a new call, but never join one (nor count
                            the caller): a fast path that leaves the rest
                            to a slower one */
};

/* Groups. A new group has one reference, owned by the caller. */
sf_group *sf_group_new(unsigned flags);
/* The process-wide group `name`, made on first use; a new reference. The
 * registry is a hash table: opening costs the same however many groups
 * are alive. */
sf_group *sf_group_open(const char *name, size_t len);
void sf_group_release(sf_group *g);
/* Bytes of C memory the group holds whatever its calls (for the binding
 * to tell its garbage collector). */
size_t sf_group_footprint(const sf_group *g);
/* How many process-wide groups exist now. */
size_t sf_group_count(void);
/* The group's name (NULL for an unnamed group) and its length. */
const char *sf_group_name(const sf_group *g, size_t *len);

/*
 * Looks up `key` (any bytes) and either starts a call (SF_LEADER) or joins
 * the one in flight. `domain` says who is asking (the binding passes its
 * lua_State's identity); `owner` says which flow of control inside the
 * domain, and is used only to refuse recursion. *out is set for LEADER,
 * JOINED and FOREIGN (with a reference), and for RECURSIVE (without: the
 * caller's owner holds it).
 *
 * Every caller that gets a call holds one reference to it, whatever the
 * status: the record lives (and keeps its key) until the last holder lets
 * go. A LEADER gives its reference up by sf_finish (and sf_publish when
 * sf_finish returns non-zero) or by sf_abandon. A joiner, JOINED or
 * FOREIGN, gives it up by sf_release once it has its outcome, or by
 * sf_unjoin or sf_leave.
 */
int sf_acquire(sf_group *g, const char *key, size_t len, uintptr_t domain,
               uintptr_t owner, unsigned flags, sf_call **out);

/* A joiner from `domain` that won't wait after all: undoes the join and
 * gives up its reference. */
void sf_unjoin(sf_call *c, uintptr_t domain);
/* A JOINED caller that gave up waiting (counted as a timeout); gives up its
 * reference. */
void sf_leave(sf_call *c);

/* One more reference on a call held already; `watch` also counts the new
 * holder among the leader's domain's waiters (the nlocal of sf_finish). */
void sf_retain(sf_call *c, int watch);
/* The call's outcome so far: SF_RUNNING, SF_DONE or SF_ABANDONED. */
int sf_state(sf_call *c);
/* Seconds since the call's leader acquired it (a coarse clock). */
double sf_age(sf_call *c);
/* The leader's flow of control changes (a call started on behalf of a
 * light thread that now runs it): recursion is judged against `owner`. */
void sf_set_owner(sf_call *c, uintptr_t owner);
/* The leader's flow of control, as sf_acquire or sf_set_owner last gave
 * it. */
uintptr_t sf_call_owner(sf_call *c);
/*
 * A call still running is taken from its key as if abandoned, though its
 * leader goes on: waiters are told SF_ABANDONED (and take over), later
 * callers start afresh, and what the leader finishes with reaches no one
 * but itself: sf_finish_ex then reports no foreign waiters and says the
 * call expired (the same-state waiters it reports in nlocal are to take
 * over). Counted as abandoned.
 * Returns 1 if it did so, 0 if the call had ended or expired already.
 */
int sf_expire(sf_call *c);

/*
 * The leader's work is done. Removes the key unless it was forgotten, so
 * that later callers start afresh. *shared is set to whether any caller
 * joined (Go's `shared`; one that gave up waiting counts too), *nlocal to
 * the number of JOINED callers still waiting (of an expired call too: they
 * must be told to take over, see sf_finish_ex).
 * Returns the number of foreign waiters: when it is 0 the call is complete
 * and the leader's reference is gone; otherwise the leader must call
 * sf_publish.
 */
unsigned sf_finish(sf_call *c, int panicked, int *shared, unsigned *nlocal);
/* The same, also saying whether the call had expired (read with the rest,
 * before the leader's reference goes). */
unsigned sf_finish_ex(sf_call *c, int panicked, int *shared, unsigned *nlocal,
                      int *expired);

/* The leader's work is done and nobody waits for it, in any domain: the
 * same as sf_finish, which then returns 0 with *nlocal 0, and 0 is
 * returned here. If anyone waits, or the call expired (its leader's
 * outcome may answer the waiters of its successor), nothing is done and
 * -1 is returned (the leader goes on with sf_finish_ex). */
int sf_finish_alone(sf_call *c, int panicked, int *shared);

/* Hands the foreign waiters their payload (may be NULL), wakes them and
 * drops the leader's reference. `freefn` frees the payload at the end. */
void sf_publish(sf_call *c, void *payload, sf_free_fn freefn);

/* The leader will never finish: removes the key, wakes the foreign waiters
 * with SF_ABANDONED and drops the leader's reference. */
void sf_abandon(sf_call *c);

/*
 * A FOREIGN joiner waits at most `timeout` seconds (negative: no limit).
 * On SF_DONE, *payload is the published payload, valid until sf_release.
 * After SF_DONE or SF_ABANDONED (or SF_TIMEDOUT without SF_WAIT_KEEP) the
 * joiner is no longer waiting: only sf_release is left to do.
 */
int sf_wait(sf_call *c, double timeout, unsigned flags, void **payload);
/* Gives up a FOREIGN joiner's reference. */
void sf_release(sf_call *c);
/* Gives up the reference of a holder from the leader's domain counted in
 * nlocal (a JOINED caller, a watcher): it no longer waits. */
void sf_release_local(sf_call *c);

/* Detaches the call for `key`, if any: later callers start a new one.
 * Returns 1 if a call was in flight. */
int sf_forget(sf_group *g, const char *key, size_t len);

/* The call in flight for `key`, or NULL. No reference is taken: the
 * address may only be compared with those of calls the caller holds. */
sf_call *sf_find(sf_group *g, const char *key, size_t len);

/* Adds one to a counter (for events the core can't see, such as a
 * timed-out caller that runs the work itself). */
void sf_count(sf_group *g, int which);
/* Adds n to a counter (callers that a binding deduplicated on its own). */
void sf_count_n(sf_group *g, int which, uint64_t n);
void sf_stats_get(sf_group *g, sf_stats *st);

/* Introspection for tests and the binding. */
const char *sf_call_key(const sf_call *c, size_t *len);
sf_group *sf_call_group(const sf_call *c);
/* Bytes the core allocates for one in-flight call with a key of `len`. */
size_t sf_call_footprint(size_t len);

/* Monotonic clock, seconds; the coarse one costs less and moves in steps
 * of a few milliseconds. */
double sf_now(void);
double sf_coarse_now(void);

#endif
