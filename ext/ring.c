/* ring.c - FIFO of 64-bit entries or esize-byte records in shared memory, crash-safe
 * (see ring.h). */
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "lock.h"
#include "proc.h"

#define likely(x)     __builtin_expect(!!(x), 1)
#define unlikely(x)   __builtin_expect(!!(x), 0)
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Waiting for a side's lock: spin this many times while the owner (probably)
 * runs on another CPU, then yield a few times (on a busy 2-core machine it may
 * have been preempted and cannot finish while we spin), then sleep on the
 * side's lock futex in slices of LOCK_SLEEP_NS, checking after each slice that
 * slept through whether the owner is still alive. */
#define LOCK_SPINS    128u
#define LOCK_YIELDS   4u
#define LOCK_SLEEP_NS 2000000u /* 2 ms: a dead owner is noticed within ~2 slices */

enum {
    BULK = 0,
    BURST = 1
};

/* --- geometry ------------------------------------------------------------- */

static int geometry(uint32_t count, uint32_t esize, uint32_t flags, uint32_t *size,
                    uint32_t *capacity)
{
    /* DPDK (rte_ring_get_memsize_elem): esize a multiple of 4, slots a power of
     * two <= RTE_RING_SZ_MASK (so at most 2^30). */
    if ((flags & ~MEMD_RING_F_ALL) || count == 0 || esize == 0 || esize % 4)
        return -EINVAL;
    if (flags & MEMD_RING_F_EXACT_SZ) {
        if (count >= MEMD_RING_SZ_MASK / 2 + 1) /* the slots would exceed 2^30 */
            return -EINVAL;
        uint32_t s = 2;
        while (s < count + 1) /* count + 1 <= 2^30, so s stops at 2^30 at most */
            s <<= 1;
        *size = s;
        *capacity = count;
    } else {
        if (count < 2 || (count & (count - 1)) || count > MEMD_RING_SZ_MASK)
            return -EINVAL;
        *size = count;
        *capacity = count - 1;
    }
    return 0;
}

static uint64_t memsize_of(uint32_t size, uint32_t esize)
{
    return sizeof(struct memd_ring) + (uint64_t)size * esize; /* <= 2^30 * 2^32: no overflow */
}

int64_t memd_ring_memsize(uint32_t count, uint32_t esize, uint32_t flags)
{
    uint32_t size, capacity;
    int rc = geometry(count, esize, flags, &size, &capacity);
    if (rc < 0)
        return rc;
    return (int64_t)memsize_of(size, esize);
}

uint64_t memd_new_tag(void)
{
    uint64_t t = MEMD_TAG_FREED;
    while (t == MEMD_TAG_FREED) {
        if (getrandom(&t, sizeof(t), 0) != (ssize_t)sizeof(t)) {
            /* no entropy call (seccomp?): time, pid and a counter still differ per ring */
            static _Atomic uint64_t n;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            t = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                ((uint64_t)getpid() << 40) ^
                (atomic_fetch_add_explicit(&n, 1, memory_order_relaxed) * 0x9e3779b97f4a7c15ull);
        }
    }
    return t;
}

int memd_ring_init(struct memd_ring *r, const char *name, uint32_t count, uint32_t esize,
                   uint32_t flags, uint64_t tag)
{
    uint32_t size, capacity;
    int rc = geometry(count, esize, flags, &size, &capacity);
    if (rc < 0)
        return rc;
    if (name != NULL && strnlen(name, MEMD_NAMESIZE) >= MEMD_NAMESIZE)
        return -EINVAL;
    /* relaxed: nobody may use the ring until the magic is stored below. */
    atomic_store_explicit(&r->magic, 0, memory_order_relaxed);
    memset((char *)r + sizeof(r->magic), 0, sizeof(*r) - sizeof(r->magic));
    if (name != NULL)
        memcpy(r->name, name, strlen(name));
    r->flags = flags;
    r->size = size;
    r->mask = size - 1;
    r->capacity = capacity;
    r->esize = esize;
    r->memsize = memsize_of(size, esize);
    r->prod.single = (flags & MEMD_RING_F_SP_ENQ) ? 1 : 0;
    r->cons.single = (flags & MEMD_RING_F_SC_DEQ) ? 1 : 0;
    r->not_empty.want = r->not_full.want = UINT32_MAX; /* nobody waits yet */
    if (tag == MEMD_TAG_FREED)
        tag = memd_new_tag();
    atomic_store_explicit(&r->prod.tag, tag, memory_order_relaxed);
    atomic_store_explicit(&r->cons.tag, tag, memory_order_relaxed);
    /* The slots need no clearing: a slot is read only after a producer wrote it. */
    /* release: pairs with the acquire load in memd_ring_check; whoever sees the
     * magic sees every field above. */
    atomic_store_explicit(&r->magic, MEMD_RING_MAGIC, memory_order_release);
    return 0;
}

int memd_ring_check(const struct memd_ring *r, uint64_t avail)
{
    if (avail < sizeof(*r))
        return -EINVAL;
    /* acquire: pairs with the release store of the magic in memd_ring_init. */
    if (atomic_load_explicit(&r->magic, memory_order_acquire) != MEMD_RING_MAGIC)
        return -EINVAL;
    uint32_t size = r->size, esize = r->esize;
    if (size < 2 || (size & (size - 1)) || size > MEMD_RING_SZ_MASK || r->mask != size - 1 ||
        r->capacity == 0 || r->capacity >= size || (r->flags & ~MEMD_RING_F_ALL) || esize == 0 ||
        esize % 4 || r->memsize != memsize_of(size, esize) || r->memsize > avail)
        return -EINVAL;
    uint64_t tag = atomic_load_explicit(&r->prod.tag, memory_order_relaxed);
    if (tag == MEMD_TAG_FREED || atomic_load_explicit(&r->cons.tag, memory_order_relaxed) != tag)
        return -EINVAL;
    /* tails claiming more entries than the capacity: every operation would refuse */
    if (memd_ring_entries(r, memd_ring_geom_of(r)) < 0)
        return -EINVAL;
    return 0;
}

static void wake_all(struct memd_ring_wait *w);

void memd_ring_poison(struct memd_ring *r)
{
    atomic_store_explicit(&r->magic, 0, memory_order_relaxed);
    atomic_store_explicit(&r->prod.tag, MEMD_TAG_FREED, memory_order_relaxed);
    atomic_store_explicit(&r->cons.tag, MEMD_TAG_FREED, memory_order_relaxed);
    /* sleepers see the tag at once, not at their next 100 ms check */
    atomic_thread_fence(memory_order_seq_cst);
    wake_all(&r->not_empty);
    wake_all(&r->not_full);
    wake_all(&r->prod.lock_wait);
    wake_all(&r->cons.lock_wait);
}

/* --- waking and sleeping --------------------------------------------------- */

static long futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    /* No FUTEX_PRIVATE_FLAG: waiters and wakers are different processes. */
    return syscall(SYS_futex, (void *)addr, op, val, ts, NULL, 0);
}

static __attribute__((noinline)) void wake_slow(struct memd_ring_wait *w)
{
    /* Only the first waker after a waiter armed the futex pays the system
     * call; until the woken process runs and withdraws, later tail moves see
     * armed == 0 and stay on the fast path.  relaxed: a pre-check only. */
    if (atomic_load_explicit(&w->armed, memory_order_relaxed) == 0)
        return;
    /* acq_rel: the acquire half pairs with the release store of armed in
     * memd_ring_wait_prepare, so that waiter's read of seq happens before our
     * bump below: it cannot have read the bumped value and then sleep through
     * this wake. */
    if (atomic_exchange_explicit(&w->armed, 0, memory_order_acq_rel) == 0)
        return;
    /* Everyone asleep wakes and announces what it wants anew.  relaxed: ordered
     * before the bump below, after which a waiter reads seq before its want. */
    atomic_store_explicit(&w->want, UINT32_MAX, memory_order_relaxed);
    /* release: a waiter that sees the new seq (futex compare) sees our tail. */
    atomic_fetch_add_explicit(&w->seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&w->wakes, 1, memory_order_relaxed); /* stats only */
    futex(&w->seq, FUTEX_WAKE, INT_MAX, NULL);
}

/* Wake w's sleepers if it has any.  The caller has stored what they wait for
 * (a tail, or the lock word 0) and then issued a seq_cst fence, which pairs with
 * the one in memd_ring_wait_prepare (store-buffering: either the waiter's retry
 * sees our store, or we see its count here and wake it). */
static ALWAYS_INLINE void wake_if_waiting(struct memd_ring_wait *w)
{
    if (likely(atomic_load_explicit(&w->waiters, memory_order_relaxed) == 0))
        return;
    wake_slow(w);
}

/* Wake w's sleepers if it has any and `avail` (entries or free slots now, at
 * least: a stale read of the other side's tail only overstates it) is at least
 * what one of them wants: a bulk waiter is not woken for every smaller move.
 * Fenced as wake_if_waiting; the want a waiter stored before its fence is seen
 * here whenever its count is. */
static ALWAYS_INLINE void wake_if_enough(struct memd_ring_wait *w, uint32_t avail)
{
    if (likely(atomic_load_explicit(&w->waiters, memory_order_relaxed) == 0))
        return;
    if (avail < atomic_load_explicit(&w->want, memory_order_relaxed))
        return;
    wake_slow(w);
}

static void wake_all(struct memd_ring_wait *w)
{
    atomic_store_explicit(&w->want, UINT32_MAX, memory_order_relaxed);
    atomic_fetch_add_explicit(&w->seq, 1, memory_order_release);
    futex(&w->seq, FUTEX_WAKE, INT_MAX, NULL);
}

uint32_t memd_ring_wait_prepare(struct memd_ring_wait *w, uint32_t want)
{
    /* acquire: pairs with the release bump in wake_slow (read seq first, then
     * announce: a wake after our announcement changes what we read here). */
    uint32_t seq = atomic_load_explicit(&w->seq, memory_order_acquire);
    /* relaxed: ordered before the retry by the fence below.  The smallest want
     * of all waiters stands, so none is skipped. */
    uint32_t cur = atomic_load_explicit(&w->want, memory_order_relaxed);
    while (want < cur && !atomic_compare_exchange_weak_explicit(
                             &w->want, &cur, want, memory_order_relaxed, memory_order_relaxed))
        ;
    atomic_fetch_add_explicit(&w->waiters, 1, memory_order_relaxed);
    /* release: pairs with the exchange in wake_slow (see there). */
    atomic_store_explicit(&w->armed, 1, memory_order_release);
    /* seq_cst fence: pairs with the one before wake_if_waiting; orders the count and
     * the flag above before the caller's retry reads the other side's tail, so
     * either the retry sees the new tail or the waker sees both. */
    atomic_thread_fence(memory_order_seq_cst);
    return seq;
}

int memd_ring_wait_sleep(struct memd_ring_wait *w, uint32_t seq, uint64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns != UINT64_MAX) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000u);
        ts.tv_nsec = (long)(timeout_ns % 1000000000u);
        tsp = &ts;
    }
    atomic_fetch_add_explicit(&w->sleeps, 1, memory_order_relaxed); /* stats only */
    /* FUTEX_WAIT sleeps only if seq still holds the value we read before the
     * retry; the kernel checks that under its own lock, so a wake that bumped
     * seq in between makes this return at once (EAGAIN). */
    if (futex(&w->seq, FUTEX_WAIT, seq, tsp) == 0)
        return 0;
    if (errno == EAGAIN)
        return 0;
    return -errno;
}

void memd_ring_wait_done(struct memd_ring_wait *w)
{
    /* relaxed: the count only gates wakes; a stale non-zero costs one syscall. */
    atomic_fetch_sub_explicit(&w->waiters, 1, memory_order_relaxed);
}

/* --- crash injection (tests) ---------------------------------------------- */

/* < 0: off.  Read once per operation (a hot, never written global): only when
 * armed does an operation take the slow copy with step points.  Only test builds
 * can arm it (memd_ring_crash_after). */
static int crash_after = -1;
static int crash_stops; /* the step raises SIGSTOP instead (memd_ring_stop_after) */

#ifdef MEMD_TEST_HOOKS
int memd_ring_crash_after(int k)
{
    int old = crash_after;
    crash_after = k < 0 ? -1 : k;
    crash_stops = 0;
    return old;
}

int memd_ring_stop_after(int k)
{
    int old = memd_ring_crash_after(k);
    crash_stops = k >= 0;
    return old;
}
#endif

static __attribute__((noinline, cold)) void crash_step(void)
{
    if (crash_after-- == 0) {
        if (!crash_stops)
            _exit(77);
        crash_stops = 0;
        raise(SIGSTOP); /* stopped with the lock held; SIGCONT goes on */
    }
}

/* --- owners: who holds a side's lock, and is it still alive ---------------- */

/* This process's lock word, computed once per process: 0 means "not yet";
 * a forked child forgets the parent's (pthread_atfork below).  relaxed: every
 * thread computes the same value. */
static _Atomic uint64_t self_word;
static pthread_once_t self_word_once = PTHREAD_ONCE_INIT;

static void forget_self_word(void) { atomic_store_explicit(&self_word, 0, memory_order_relaxed); }

static void register_forget(void) { pthread_atfork(NULL, NULL, forget_self_word); }

static __attribute__((noinline)) uint64_t compute_self_word(void)
{
    pthread_once(&self_word_once, register_forget);
    pid_t pid = memd_self_pid();
    char state;
    long threads;
    uint64_t start = 0;
    if (memd_proc_stat(pid, &state, &threads, &start) < 0)
        start = 0; /* no /proc: owners are then told apart by pid alone */
    uint64_t w = (uint64_t)(uint32_t)pid | ((start & 0xffffffffu) << 32);
    atomic_store_explicit(&self_word, w, memory_order_relaxed);
    return w;
}

static ALWAYS_INLINE uint64_t owner_word(void)
{
    uint64_t w = atomic_load_explicit(&self_word, memory_order_relaxed);
    return likely(w != 0) ? w : compute_self_word();
}

int memd_ring_owner_dead(uint64_t owner)
{
    uint32_t start = MEMD_RING_LOCK_START(owner);
    return !memd_process_alive(MEMD_RING_LOCK_PID(owner), start, start ? 0xffffffffu : 0);
}

/* --- a side's lock --------------------------------------------------------- */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The lock is held: waiting slow path.  0 once this process owns it.  With
 * may_sleep 0 it returns -EBUSY instead of sleeping once the spins and yields are
 * spent and the owner still lives: the caller sleeps (without the GIL, say) and
 * retries. */
static __attribute__((noinline)) int
lock_slow(struct memd_ring_headtail *ht, _Atomic uint32_t *recoveries, uint64_t me, int may_sleep)
{
    unsigned spins = 0;
    uint64_t seen = 0, since = 0; /* the owner word we wait behind, and since when */
    for (;;) {
        /* relaxed: a hint; the CAS below is what synchronises. */
        uint64_t cur = atomic_load_explicit(&ht->lock, memory_order_relaxed);
        if (cur == 0) {
            uint64_t expect = 0;
            /* acquire: pairs with the release store of 0 in side_unlock, so the
             * previous owner's tail, other_tail and slot writes are visible. */
            if (atomic_compare_exchange_weak_explicit(&ht->lock, &expect, me, memory_order_acquire,
                                                      memory_order_relaxed))
                return 0;
            continue;
        }
        if (spins < LOCK_SPINS) {
            spins++;
            memd_cpu_relax();
            continue;
        }
        if (spins < LOCK_SPINS + LOCK_YIELDS) {
            spins++;
            sched_yield();
            continue;
        }
        /* Check the owner once it has held the lock (or kept taking it back)
         * for a whole slice, or before giving up without sleeping: the check
         * costs a kill() and a /proc read.  A thread of this process is alive by
         * definition. */
        uint64_t t = mono_ns();
        if (cur != seen && may_sleep) {
            seen = cur;
            since = t;
        } else if ((t - since >= LOCK_SLEEP_NS || !may_sleep) && cur != me) {
            since = t;
            if (memd_ring_owner_dead(cur)) {
                uint64_t expect = cur;
                /* acquire: as above.  Only one waiter's CAS from the dead
                 * owner's word succeeds; the others see the new owner and wait
                 * on.  The dead owner made its stores before it died, long
                 * before kill() or /proc could tell us so. */
                if (atomic_compare_exchange_strong_explicit(
                        &ht->lock, &expect, me, memory_order_acquire, memory_order_relaxed)) {
                    atomic_fetch_add_explicit(recoveries, 1, memory_order_relaxed);
                    return 0;
                }
                continue;
            }
        }
        if (!may_sleep)
            return -EBUSY;
        uint32_t seq = memd_ring_wait_prepare(&ht->lock_wait, 0);
        /* relaxed: ordered after our waiter count by the fence in prepare; pairs
         * with side_unlock's store and the fence after it (wake_if_waiting). */
        if (atomic_load_explicit(&ht->lock, memory_order_relaxed) == cur)
            memd_ring_wait_sleep(&ht->lock_wait, seq, LOCK_SLEEP_NS);
        memd_ring_wait_done(&ht->lock_wait);
    }
}

static ALWAYS_INLINE int side_lock(struct memd_ring_headtail *ht, _Atomic uint32_t *recoveries,
                                   int may_sleep)
{
    uint64_t me = owner_word();
    uint64_t expect = 0;
    /* acquire: pairs with the release store in side_unlock (see lock_slow). */
    if (likely(atomic_compare_exchange_weak_explicit(&ht->lock, &expect, me, memory_order_acquire,
                                                     memory_order_relaxed)))
        return 0;
    return lock_slow(ht, recoveries, me, may_sleep);
}

/* Release a side's lock; the caller then issues a seq_cst fence and calls
 * wake_if_waiting(&ht->lock_wait). */
static ALWAYS_INLINE void side_unlock(struct memd_ring_headtail *ht)
{
    /* release: pairs with the acquire CAS of the next owner. */
    atomic_store_explicit(&ht->lock, 0, memory_order_release);
}

/* --- enqueue / dequeue ---------------------------------------------------- */

/* A step point for crash injection; compiled out of the normal copies. */
#define STEP()            \
    do {                  \
        if (crashy)       \
            crash_step(); \
    } while (0)

/* Copy n entries of esize bytes between the caller's array and the slots from
 * counter `from`, wrapping at the end; crashy copies go one slot at a time with a
 * step after each.  Inlined with a constant esize (8: the uint64 ring), the
 * memcpy calls become plain moves. */
static ALWAYS_INLINE void copy_in(struct memd_ring *r, struct memd_ring_geom g, size_t esize,
                                  uint32_t from, const void *v, unsigned n, int crashy)
{
    const uint32_t size = g.size, mask = size - 1, idx = from & mask;
    char *slots = (char *)r->slots;
    const char *src = v;
    if (crashy) {
        for (unsigned i = 0; i < n; i++) {
            memcpy(slots + (size_t)((from + i) & mask) * esize, src + (size_t)i * esize, esize);
            STEP();
        }
    } else if (likely(n == 1)) {
        memcpy(slots + (size_t)idx * esize, src, esize);
    } else if (likely(idx + n <= size)) {
        memcpy(slots + (size_t)idx * esize, src, (size_t)n * esize);
    } else {
        uint32_t first = size - idx;
        memcpy(slots + (size_t)idx * esize, src, (size_t)first * esize);
        memcpy(slots, src + (size_t)first * esize, (size_t)(n - first) * esize);
    }
}

static ALWAYS_INLINE void copy_out(const struct memd_ring *r, struct memd_ring_geom g, size_t esize,
                                   uint32_t from, void *v, unsigned n, int crashy)
{
    const uint32_t size = g.size, mask = size - 1, idx = from & mask;
    const char *slots = (const char *)r->slots;
    char *dst = v;
    if (crashy) {
        for (unsigned i = 0; i < n; i++) {
            memcpy(dst + (size_t)i * esize, slots + (size_t)((from + i) & mask) * esize, esize);
            STEP();
        }
    } else if (likely(n == 1)) {
        memcpy(dst, slots + (size_t)idx * esize, esize);
    } else if (likely(idx + n <= size)) {
        memcpy(dst, slots + (size_t)idx * esize, (size_t)n * esize);
    } else {
        uint32_t first = size - idx;
        memcpy(dst, slots + (size_t)idx * esize, (size_t)first * esize);
        memcpy(dst + (size_t)first * esize, slots, (size_t)(n - first) * esize);
    }
}

/*
 * Both sides run the same steps, in single mode without the lock:
 *   lock; start = own tail; room (entries) from the copy of the other side's
 *   tail, re-read only if the copy says too little; head = start + n; copy the
 *   slots; release-store the tail; unlock; one seq_cst fence; wake sleepers.
 * Nothing reads head, so whatever a dead operation left there is harmless.
 */
static ALWAYS_INLINE unsigned do_enqueue(struct memd_ring *r, struct memd_ring_geom g, size_t esize,
                                         const void *v, unsigned want, int behaviour,
                                         unsigned *free_space, int *busy, int crashy)
{
    const uint32_t capacity = g.capacity;
    const uint32_t single = r->prod.single;
    uint32_t start, free_entries;
    unsigned n;

    if (!single && unlikely(side_lock(&r->prod, &r->prod_recoveries, busy == NULL) < 0)) {
        *busy = MEMD_RING_BUSY; /* the lock stays held by a live owner: the caller waits */
        return 0;
    }
    /* acquire: the previous producer (lock holder, or single producer in another
     * process) stored this tail with release after filling its slots; free on
     * x86.  Only producers write prod.tail, and only one at a time. */
    start = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
    /* Our copy of cons.tail is a lower bound of the real one (tails only move
     * forward, and start - copy <= capacity always holds because nobody
     * enqueues past the copy): if it shows room enough, the consumers' line
     * need not be read at all. */
    free_entries = capacity + r->prod.other_tail - start;
    if (unlikely(want > free_entries)) {
        /* acquire: pairs with the release store of cons.tail in do_dequeue;
         * consumers are done reading every slot before it, so we may refill. */
        r->prod.other_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
        free_entries = capacity + r->prod.other_tail - start;
    }
    /* More room than the capacity: the other side's tail was past ours, which no
     * run of operations leaves (damaged counters).  Move nothing; say so. */
    if (unlikely(free_entries > capacity)) {
        free_entries = 0;
        if (busy)
            *busy = MEMD_RING_DAMAGED;
    }
    n = want <= free_entries ? want : (behaviour == BURST ? free_entries : 0);
    if (unlikely(n == 0)) {
        if (!single) {
            side_unlock(&r->prod);
            /* seq_cst fence: see wake_if_waiting. */
            atomic_thread_fence(memory_order_seq_cst);
            wake_if_waiting(&r->prod.lock_wait);
        }
        if (crashy)
            crash_after = -1;
        if (free_space)
            *free_space = free_entries;
        return 0;
    }
    /* relaxed: diagnostics only (head != tail: an operation runs or died). */
    atomic_store_explicit(&r->prod.head, start + n, memory_order_relaxed);
    STEP(); /* claimed (lock held) */
    copy_in(r, g, esize, start, v, n, crashy);
    STEP(); /* filled, not yet published */
    /* release: pairs with the acquire load of prod.tail in do_dequeue; the slots
     * we filled are visible to any consumer that sees the new tail. */
    atomic_store_explicit(&r->prod.tail, start + n, memory_order_release);
    STEP(); /* published, lock still held */
    if (!single)
        side_unlock(&r->prod);
    /* seq_cst fence: orders the tail store (and the unlock) before the waiter
     * counts read below; pairs with the fence in memd_ring_wait_prepare. */
    atomic_thread_fence(memory_order_seq_cst);
    if (unlikely(atomic_load_explicit(&r->not_empty.waiters, memory_order_relaxed) != 0))
        /* relaxed: a stale cons.tail overstates the entries: at worst a wake too many */
        wake_if_enough(&r->not_empty,
                       start + n - atomic_load_explicit(&r->cons.tail, memory_order_relaxed));
    if (!single)
        wake_if_waiting(&r->prod.lock_wait);
    if (crashy)
        crash_after = -1;
    if (free_space)
        *free_space = free_entries - n;
    return n;
}

static ALWAYS_INLINE unsigned do_dequeue(struct memd_ring *r, struct memd_ring_geom g, size_t esize,
                                         void *v, unsigned want, int behaviour, unsigned *available,
                                         int *busy, int crashy)
{
    const uint32_t single = r->cons.single;
    uint32_t start, entries;
    unsigned n;

    if (!single && unlikely(side_lock(&r->cons, &r->cons_recoveries, busy == NULL) < 0)) {
        *busy = MEMD_RING_BUSY;
        return 0;
    }
    /* acquire: as in do_enqueue, for the previous consumer's tail. */
    start = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
    /* Our copy of prod.tail is a lower bound: if it shows entries enough, skip
     * reading the producers' line. */
    entries = r->cons.other_tail - start;
    if (want > entries) {
        /* acquire: pairs with the release store of prod.tail in do_enqueue; the
         * slots before it are filled and visible. */
        r->cons.other_tail = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
        entries = r->cons.other_tail - start;
    }
    /* More entries than the capacity (or prod.tail behind ours): no run of
     * operations leaves that (producers stop at our tail + capacity), so the
     * counters were overwritten.  Hand out nothing: those slots hold no entries. */
    if (unlikely(entries > g.capacity)) {
        entries = 0;
        if (busy)
            *busy = MEMD_RING_DAMAGED;
    }
    n = want <= entries ? want : (behaviour == BURST ? entries : 0);
    if (unlikely(n == 0)) {
        if (!single) {
            side_unlock(&r->cons);
            /* seq_cst fence: see wake_if_waiting. */
            atomic_thread_fence(memory_order_seq_cst);
            wake_if_waiting(&r->cons.lock_wait);
        }
        if (crashy)
            crash_after = -1;
        if (available)
            *available = entries;
        return 0;
    }
    /* relaxed: diagnostics only. */
    atomic_store_explicit(&r->cons.head, start + n, memory_order_relaxed);
    STEP(); /* claimed (lock held) */
    copy_out(r, g, esize, start, v, n, crashy);
    STEP(); /* read, not yet released: a death here leaves them in the ring */
    /* release: pairs with the acquire load of cons.tail in do_enqueue; our reads
     * of the slots are done before any producer may overwrite them. */
    atomic_store_explicit(&r->cons.tail, start + n, memory_order_release);
    STEP(); /* released, lock still held */
    if (!single)
        side_unlock(&r->cons);
    /* seq_cst fence: as in do_enqueue. */
    atomic_thread_fence(memory_order_seq_cst);
    if (unlikely(atomic_load_explicit(&r->not_full.waiters, memory_order_relaxed) != 0))
        /* relaxed: a stale prod.tail overstates the room: at worst a wake too many */
        wake_if_enough(
            &r->not_full,
            g.capacity - (atomic_load_explicit(&r->prod.tail, memory_order_relaxed) - (start + n)));
    if (!single)
        wake_if_waiting(&r->cons.lock_wait);
    if (crashy)
        crash_after = -1;
    if (available)
        *available = entries - n;
    return n;
}

static __attribute__((noinline, cold)) unsigned
enqueue_crashy(struct memd_ring *r, struct memd_ring_geom g, size_t esize, const void *v,
               unsigned n, int behaviour, unsigned *free_space, int *busy)
{
    return do_enqueue(r, g, esize, v, n, behaviour, free_space, busy, 1);
}

static __attribute__((noinline, cold)) unsigned
dequeue_crashy(struct memd_ring *r, struct memd_ring_geom g, size_t esize, void *v, unsigned n,
               int behaviour, unsigned *available, int *busy)
{
    return do_dequeue(r, g, esize, v, n, behaviour, available, busy, 1);
}

/* The uint64 calls: esize is the constant 8, so their copies stay single moves. */
unsigned memd_ring_enqueue_bulk(struct memd_ring *r, struct memd_ring_geom g, const uint64_t *v,
                                unsigned n, unsigned *free_space, int *busy)
{
    if (unlikely(crash_after >= 0))
        return enqueue_crashy(r, g, sizeof(uint64_t), v, n, BULK, free_space, busy);
    return do_enqueue(r, g, sizeof(uint64_t), v, n, BULK, free_space, busy, 0);
}

unsigned memd_ring_enqueue_burst(struct memd_ring *r, struct memd_ring_geom g, const uint64_t *v,
                                 unsigned n, unsigned *free_space, int *busy)
{
    if (unlikely(crash_after >= 0))
        return enqueue_crashy(r, g, sizeof(uint64_t), v, n, BURST, free_space, busy);
    return do_enqueue(r, g, sizeof(uint64_t), v, n, BURST, free_space, busy, 0);
}

unsigned memd_ring_dequeue_bulk(struct memd_ring *r, struct memd_ring_geom g, uint64_t *v,
                                unsigned n, unsigned *available, int *busy)
{
    if (unlikely(crash_after >= 0))
        return dequeue_crashy(r, g, sizeof(uint64_t), v, n, BULK, available, busy);
    return do_dequeue(r, g, sizeof(uint64_t), v, n, BULK, available, busy, 0);
}

unsigned memd_ring_dequeue_burst(struct memd_ring *r, struct memd_ring_geom g, uint64_t *v,
                                 unsigned n, unsigned *available, int *busy)
{
    if (unlikely(crash_after >= 0))
        return dequeue_crashy(r, g, sizeof(uint64_t), v, n, BURST, available, busy);
    return do_dequeue(r, g, sizeof(uint64_t), v, n, BURST, available, busy, 0);
}

/* Records of any esize. */
unsigned memd_ring_enqueue_bulk_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                     const void *v, unsigned n, unsigned *free_space, int *busy)
{
    if (unlikely(crash_after >= 0))
        return enqueue_crashy(r, g, esize, v, n, BULK, free_space, busy);
    return do_enqueue(r, g, esize, v, n, BULK, free_space, busy, 0);
}

unsigned memd_ring_enqueue_burst_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                      const void *v, unsigned n, unsigned *free_space, int *busy)
{
    if (unlikely(crash_after >= 0))
        return enqueue_crashy(r, g, esize, v, n, BURST, free_space, busy);
    return do_enqueue(r, g, esize, v, n, BURST, free_space, busy, 0);
}

unsigned memd_ring_dequeue_bulk_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                     void *v, unsigned n, unsigned *available, int *busy)
{
    if (unlikely(crash_after >= 0))
        return dequeue_crashy(r, g, esize, v, n, BULK, available, busy);
    return do_dequeue(r, g, esize, v, n, BULK, available, busy, 0);
}

unsigned memd_ring_dequeue_burst_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                      void *v, unsigned n, unsigned *available, int *busy)
{
    if (unlikely(crash_after >= 0))
        return dequeue_crashy(r, g, esize, v, n, BURST, available, busy);
    return do_dequeue(r, g, esize, v, n, BURST, available, busy, 0);
}

unsigned memd_ring_count(const struct memd_ring *r, struct memd_ring_geom g)
{
    /* acquire: cons.tail first, and the prod.tail load may not move above it;
     * the consumer that stored this cons.tail had seen prod.tail at least that
     * far, so prod.tail - cons.tail never goes negative. */
    uint32_t cons_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
    uint32_t prod_tail = atomic_load_explicit(&r->prod.tail, memory_order_relaxed);
    uint32_t count = prod_tail - cons_tail;
    /* Producers may have moved on between the two loads. */
    return count > g.capacity ? g.capacity : count;
}

int64_t memd_ring_entries(const struct memd_ring *r, struct memd_ring_geom g)
{
    uint32_t cons_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
    uint32_t prod_tail = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
    uint32_t count = prod_tail - cons_tail;
    if (likely(count <= g.capacity))
        return count;
    /* Producers may have moved on between the two loads, after consumers did; but
     * while cons.tail stays put, prod.tail stays within capacity of it. */
    if (atomic_load_explicit(&r->cons.tail, memory_order_acquire) == cons_tail)
        return -EBADMSG;
    return g.capacity;
}

unsigned memd_ring_free_count(const struct memd_ring *r, struct memd_ring_geom g)
{
    return g.capacity - memd_ring_count(r, g);
}
