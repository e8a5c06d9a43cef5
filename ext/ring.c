/* ring.c - lock-free FIFO of 64-bit entries in shared memory (see ring.h). */
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>


#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Spins on a tail before yielding the CPU: on a busy 2-core machine the producer
 * we wait for may have been preempted, and it cannot finish while we spin. */
#define TAIL_SPINS 64u

enum { BULK = 0, BURST = 1 };

/* --- geometry ------------------------------------------------------------- */

static int geometry(uint32_t count, uint32_t flags, uint32_t *size, uint32_t *capacity)
{
    if ((flags & ~MEMD_RING_F_ALL) || count == 0)
        return -EINVAL;
    if (flags & MEMD_RING_F_EXACT_SZ) {
        if (count >= MEMD_RING_SZ_MAX)
            return -EINVAL;
        uint32_t s = 2;
        while (s < count + 1) /* count + 1 <= 2^31, so s stops at 2^31 at most */
            s <<= 1;
        *size = s;
        *capacity = count;
    } else {
        if (count < 2 || (count & (count - 1)) || count > MEMD_RING_SZ_MAX)
            return -EINVAL;
        *size = count;
        *capacity = count - 1;
    }
    return 0;
}

int64_t memd_ring_memsize(uint32_t count, uint32_t flags)
{
    uint32_t size, capacity;
    int rc = geometry(count, flags, &size, &capacity);
    if (rc < 0)
        return rc;
    return (int64_t)sizeof(struct memd_ring) + (int64_t)size * (int64_t)sizeof(uint64_t);
}

int memd_ring_init(struct memd_ring *r, const char *name, uint32_t count, uint32_t flags)
{
    uint32_t size, capacity;
    int rc = geometry(count, flags, &size, &capacity);
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
    r->memsize = sizeof(struct memd_ring) + (uint64_t)size * sizeof(uint64_t);
    r->prod.single = (flags & MEMD_RING_F_SP_ENQ) ? 1 : 0;
    r->cons.single = (flags & MEMD_RING_F_SC_DEQ) ? 1 : 0;
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
    uint32_t size = r->size;
    if (size < 2 || (size & (size - 1)) || size > MEMD_RING_SZ_MAX || r->mask != size - 1 ||
        r->capacity == 0 || r->capacity >= size || (r->flags & ~MEMD_RING_F_ALL) ||
        r->memsize != sizeof(*r) + (uint64_t)size * sizeof(uint64_t) || r->memsize > avail)
        return -EINVAL;
    return 0;
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
    /* release: a waiter that sees the new seq (futex compare) sees our tail. */
    atomic_fetch_add_explicit(&w->seq, 1, memory_order_release);
    atomic_fetch_add_explicit(&w->wakes, 1, memory_order_relaxed); /* stats only */
    futex(&w->seq, FUTEX_WAKE, INT_MAX, NULL);
}

/* Called after moving a tail: wake the other side only if somebody sleeps. */
static ALWAYS_INLINE void wake_waiters(struct memd_ring_wait *w)
{
    /* seq_cst fence: pairs with the seq_cst fence in memd_ring_wait_prepare.
     * It orders our tail store before the waiters load (store-buffering): either
     * the waiter's retry sees our tail, or we see its count and wake it. */
    atomic_thread_fence(memory_order_seq_cst);
    if (likely(atomic_load_explicit(&w->waiters, memory_order_relaxed) == 0))
        return;
    wake_slow(w);
}

uint32_t memd_ring_wait_prepare(struct memd_ring_wait *w)
{
    /* acquire: pairs with the release bump in wake_slow (read seq first, then
     * announce: a wake after our announcement changes what we read here). */
    uint32_t seq = atomic_load_explicit(&w->seq, memory_order_acquire);
    /* relaxed: ordered before the retry by the fence below. */
    atomic_fetch_add_explicit(&w->waiters, 1, memory_order_relaxed);
    /* release: pairs with the exchange in wake_slow (see there). */
    atomic_store_explicit(&w->armed, 1, memory_order_release);
    /* seq_cst fence: pairs with the one in wake_waiters; orders the count and
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

/* --- enqueue / dequeue ---------------------------------------------------- */

/* Wait for the same side's earlier claimers to hand over their slots. */
static ALWAYS_INLINE void wait_turn(struct memd_ring_headtail *ht, uint32_t old_head)
{
    unsigned spins = 0;
    /* acquire: pairs with the release store of this tail by the claimer ahead
     * of us, so its slot accesses happen before our own release store. */
    while (atomic_load_explicit(&ht->tail, memory_order_acquire) != old_head) {
        if (++spins < TAIL_SPINS) {
            memd_cpu_relax();
        } else {
            sched_yield();
            spins = 0;
        }
    }
}

static ALWAYS_INLINE unsigned do_enqueue(struct memd_ring *r, const uint64_t *v, unsigned want,
                                         int behaviour, unsigned *free_space)
{
    const uint32_t capacity = r->capacity;
    const uint32_t single = r->prod.single;
    uint32_t old_head, new_head, free_entries;
    unsigned n;

    if (single) {
        /* relaxed: only this producer writes prod.head. */
        old_head = atomic_load_explicit(&r->prod.head, memory_order_relaxed);
        /* Our copy of cons.tail is a lower bound of the real one: if it shows
         * room enough, the consumers' line need not be read at all. */
        free_entries = capacity + r->prod.other_tail - old_head;
        if (unlikely(want > free_entries)) {
            /* acquire: as below; pairs with the release store in do_dequeue. */
            r->prod.other_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
            free_entries = capacity + r->prod.other_tail - old_head;
        }
        n = want <= free_entries ? want : (behaviour == BURST ? free_entries : 0);
        if (unlikely(n == 0)) {
            if (free_space)
                *free_space = free_entries;
            return 0;
        }
        new_head = old_head + n;
        atomic_store_explicit(&r->prod.head, new_head, memory_order_relaxed);
        goto claimed;
    }
    /* acquire: keeps the cons.tail load below from moving above this one, and
     * pairs with the acq_rel CAS of the producer that wrote this head, so the
     * cons.tail we read is at least the one that producer based its claim on
     * (else the room computed could wrap and look huge). */
    old_head = atomic_load_explicit(&r->prod.head, memory_order_acquire);
    for (;;) {
        n = want;
        /* acquire: pairs with the release store of cons.tail in do_dequeue;
         * consumers are done reading every slot before it, so we may refill. */
        uint32_t cons_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
        free_entries = capacity + cons_tail - old_head; /* modulo 2^32 */
        if (unlikely(n > free_entries))
            n = behaviour == BURST ? free_entries : 0;
        if (unlikely(n == 0)) {
            if (free_space)
                *free_space = free_entries;
            return 0;
        }
        new_head = old_head + n;
        /* acq_rel on success: pairs with the acquire load of prod.head in other
         * producers (see above).  acquire on failure: reloads old_head as the
         * load above does. */
        if (atomic_compare_exchange_weak_explicit(&r->prod.head, &old_head, new_head,
                                                  memory_order_acq_rel, memory_order_acquire))
            break;
    }

claimed:
    /* The slots [old_head, new_head) are ours alone now. */
    const uint32_t size = r->size;
    const uint32_t idx = old_head & r->mask;
    uint64_t *slots = r->slots;
    if (likely(n == 1)) {
        slots[idx] = v[0];
    } else if (likely(idx + n <= size)) {
        memcpy(&slots[idx], v, n * sizeof(uint64_t));
    } else {
        uint32_t first = size - idx;
        memcpy(&slots[idx], v, first * sizeof(uint64_t));
        memcpy(slots, v + first, (n - first) * sizeof(uint64_t));
    }

    if (!single)
        wait_turn(&r->prod, old_head);
    /* release: pairs with the acquire load of prod.tail in do_dequeue; the slots
     * we filled are visible to any consumer that sees the new tail. */
    atomic_store_explicit(&r->prod.tail, new_head, memory_order_release);
    wake_waiters(&r->not_empty);
    if (free_space)
        *free_space = free_entries - n;
    return n;
}

static ALWAYS_INLINE unsigned do_dequeue(struct memd_ring *r, uint64_t *v, unsigned want,
                                         int behaviour, unsigned *available)
{
    const uint32_t single = r->cons.single;
    uint32_t old_head, new_head, entries;
    unsigned n;

    if (single) {
        /* relaxed: only this consumer writes cons.head. */
        old_head = atomic_load_explicit(&r->cons.head, memory_order_relaxed);
        /* Our copy of prod.tail is a lower bound: if it shows entries enough,
         * skip reading the producers' line. */
        entries = r->cons.other_tail - old_head;
        if (want > entries) {
            /* acquire: as below; pairs with the release store in do_enqueue. */
            r->cons.other_tail = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
            entries = r->cons.other_tail - old_head;
        }
        n = want <= entries ? want : (behaviour == BURST ? entries : 0);
        if (unlikely(n == 0)) {
            if (available)
                *available = entries;
            return 0;
        }
        new_head = old_head + n;
        atomic_store_explicit(&r->cons.head, new_head, memory_order_relaxed);
        goto claimed;
    }
    /* acquire: as in do_enqueue, orders the prod.tail load after this one and
     * pairs with other consumers' acq_rel CAS of cons.head. */
    old_head = atomic_load_explicit(&r->cons.head, memory_order_acquire);
    for (;;) {
        n = want;
        /* acquire: pairs with the release store of prod.tail in do_enqueue; the
         * slots before it are filled and visible. */
        uint32_t prod_tail = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
        entries = prod_tail - old_head; /* modulo 2^32 */
        if (unlikely(n > entries))
            n = behaviour == BURST ? entries : 0;
        if (unlikely(n == 0)) {
            if (available)
                *available = entries;
            return 0;
        }
        new_head = old_head + n;
        /* acq_rel / acquire: as the producers' CAS in do_enqueue. */
        if (atomic_compare_exchange_weak_explicit(&r->cons.head, &old_head, new_head,
                                                  memory_order_acq_rel, memory_order_acquire))
            break;
    }

claimed:
    const uint32_t size = r->size;
    const uint32_t idx = old_head & r->mask;
    const uint64_t *slots = r->slots;
    if (likely(n == 1)) {
        v[0] = slots[idx];
    } else if (likely(idx + n <= size)) {
        memcpy(v, &slots[idx], n * sizeof(uint64_t));
    } else {
        uint32_t first = size - idx;
        memcpy(v, &slots[idx], first * sizeof(uint64_t));
        memcpy(v + first, slots, (n - first) * sizeof(uint64_t));
    }

    if (!single)
        wait_turn(&r->cons, old_head);
    /* release: pairs with the acquire load of cons.tail in do_enqueue; our reads
     * of the slots are done before any producer may overwrite them. */
    atomic_store_explicit(&r->cons.tail, new_head, memory_order_release);
    wake_waiters(&r->not_full);
    if (available)
        *available = entries - n;
    return n;
}

unsigned memd_ring_enqueue_bulk(struct memd_ring *r, const uint64_t *v, unsigned n,
                                unsigned *free_space)
{
    return do_enqueue(r, v, n, BULK, free_space);
}

unsigned memd_ring_enqueue_burst(struct memd_ring *r, const uint64_t *v, unsigned n,
                                 unsigned *free_space)
{
    return do_enqueue(r, v, n, BURST, free_space);
}

unsigned memd_ring_dequeue_bulk(struct memd_ring *r, uint64_t *v, unsigned n,
                                unsigned *available)
{
    return do_dequeue(r, v, n, BULK, available);
}

unsigned memd_ring_dequeue_burst(struct memd_ring *r, uint64_t *v, unsigned n,
                                 unsigned *available)
{
    return do_dequeue(r, v, n, BURST, available);
}

unsigned memd_ring_count(const struct memd_ring *r)
{
    /* acquire: cons.tail first, and the prod.tail load may not move above it;
     * the consumer that stored this cons.tail had seen prod.tail at least that
     * far, so prod.tail - cons.tail never goes negative. */
    uint32_t cons_tail = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
    uint32_t prod_tail = atomic_load_explicit(&r->prod.tail, memory_order_relaxed);
    uint32_t count = prod_tail - cons_tail;
    /* Producers may have moved on between the two loads. */
    return count > r->capacity ? r->capacity : count;
}

unsigned memd_ring_free_count(const struct memd_ring *r)
{
    return r->capacity - memd_ring_count(r);
}
