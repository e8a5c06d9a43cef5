/*
 * ring.h - a fixed-size lock-free FIFO of 64-bit entries, or of esize-byte
 * records, in shared memory (DPDK: rte_ring, rte_ring_elem).  The layout, struct
 * memd_ring, is in memd_layout.h.
 *
 * A ring has `size` slots (a power of two) and holds at most `capacity` entries:
 * size - 1, or exactly the count asked for with MEMD_RING_F_EXACT_SZ.  Each side
 * (producers, consumers) has a tail, which it moves to hand finished slots to the
 * other side.  An operation computes from its own side's tail (never from head,
 * which only records what the running operation claimed), fills or reads its
 * slots, and moves the tail past them with a release store.  With several
 * producers (consumers) a side is serialised by a small robust lock in its
 * headtail: the word names the owner process, a waiter spins briefly, then
 * sleeps on a futex, and every few milliseconds checks whether the owner died;
 * if so it takes the lock over (one CAS from the dead owner's word) and counts a
 * recovery.  Because everything starts from the tail, a dead producer's
 * unpublished slots are simply overwritten and a dead consumer's unreleased
 * entries stay in the ring.  A single-producer (single-consumer) side takes no
 * lock.  Threads of one process share a pid: they just wait for each other.
 * Owners must be in this process's pid namespace.
 *
 * Bulk calls move all n entries or none; burst calls move as many as they can.
 * Each enqueue/dequeue returns how many entries it moved and, through the
 * optional last argument, the room (entries) left after the call.
 *
 * Blocking (waiting for room or entries) is built from the non-blocking calls
 * and a futex per side (struct memd_ring_wait): a waiter announces itself
 * (memd_ring_wait_prepare), retries, then sleeps on the futex
 * (memd_ring_wait_sleep); every call that moves a tail wakes the other side's
 * futex only if its waiter count is non-zero, so the fast path makes no system
 * call.  The lock wait inside a call is short unless the owner is preempted, and
 * at most a few milliseconds plus the check if it died.
 *
 * Errors: 0 or a count on success, -errno on failure.  The ring never stores a
 * pointer.
 */
#ifndef MEMD_RING_H
#define MEMD_RING_H

#include <stdint.h>

#include "memd_layout.h"

/* Bytes needed for a ring of `count` entries of `esize` bytes with `flags`
 * (DPDK: rte_ring_get_memsize_elem).  Fails iff -EINVAL: count is 0, or not a
 * power of two >= 2 without EXACT_SZ, or needs more than MEMD_RING_SZ_MASK slots;
 * esize is 0 or not a multiple of 4; an unknown flag is set. */
int64_t memd_ring_memsize(uint32_t count, uint32_t esize, uint32_t flags);

/* Initialise an empty ring at r (memd_ring_memsize(count, esize, flags) bytes),
 * then publish it by storing its magic last.  name may be NULL; tag is its
 * identity tag (MEMD_TAG_FREED: a new one, memd_new_tag).  Fails iff -EINVAL (as
 * memd_ring_memsize, or a name of MEMD_NAMESIZE bytes or more). */
int memd_ring_init(struct memd_ring *r, const char *name, uint32_t count, uint32_t esize,
                   uint32_t flags, uint64_t tag);

/* A new identity tag ("identity tags" in memd_layout.h): random, never MEMD_TAG_FREED. */
uint64_t memd_new_tag(void);

/* 0 if r looks like an initialised ring whose slots end within `avail` bytes;
 * -EINVAL if its magic, geometry (esize included) or tags are wrong (a freed ring),
 * or its tails are damaged (memd_ring_entries). */
int memd_ring_check(const struct memd_ring *r, uint64_t avail);

/* The ring is being freed: clear its magic and tags, so that every handle to it
 * raises from now on, and wake whoever sleeps on it to notice. */
void memd_ring_poison(struct memd_ring *r);

/* 1 if the side ht (r->prod for enqueues, r->cons for dequeues) still carries the
 * tag a handle validated: one load from the line the operation writes anyway. */
static inline int memd_ring_tag_ok(const struct memd_ring_headtail *ht, uint64_t tag)
{
    return __builtin_expect(atomic_load_explicit(&ht->tag, memory_order_relaxed) == tag, 1) != 0;
}

/* A ring's size and capacity as its user validated them (memd_ring_check) and keeps
 * in its own memory (with the esize, for the *_elem calls).  Operations index and
 * bound with these, never with the shared copy, which any attached process can
 * overwrite: damaged counters then move wrong entries, inside this ring's slots,
 * and nothing outside it.  Eight bytes: the uint64 calls keep all their arguments
 * in registers. */
struct memd_ring_geom {
    uint32_t size, capacity;
};

/* The geometry in r's header, for a ring just checked with memd_ring_check. */
static inline struct memd_ring_geom memd_ring_geom_of(const struct memd_ring *r)
{
    return (struct memd_ring_geom){r->size, r->capacity};
}

/* What a call that moved nothing leaves in *busy (when busy is not NULL): 0, the
 * ring was full (empty); MEMD_RING_BUSY, a live owner keeps the side lock past a
 * short spin; MEMD_RING_DAMAGED, the tails say more entries (room) than the
 * capacity, which no run of operations leaves: another process overwrote them.
 * Nothing was moved: a damaged ring hands out no slot nobody filled. */
#define MEMD_RING_BUSY    1
#define MEMD_RING_DAMAGED 2

/* Rings of uint64 entries (esize 8: the caller checked it).
 * Enqueue n entries from v: all or none (bulk) or as many as fit (burst).
 * Returns the number enqueued; *free_space (if not NULL) gets the room left.
 * busy NULL: a side lock held by another process is waited for (sleeping); else
 * 0 is returned with *busy = MEMD_RING_BUSY when a live owner keeps it past a
 * short spin, so that the caller can wait its own way (Python: without the GIL)
 * and retry. */
unsigned memd_ring_enqueue_bulk(struct memd_ring *r, struct memd_ring_geom g, const uint64_t *v,
                                unsigned n, unsigned *free_space, int *busy);
unsigned memd_ring_enqueue_burst(struct memd_ring *r, struct memd_ring_geom g, const uint64_t *v,
                                 unsigned n, unsigned *free_space, int *busy);

/* Dequeue into v: n entries or none (bulk), or up to n (burst).  Returns the
 * number dequeued; *available (if not NULL) gets the entries still in the ring. */
unsigned memd_ring_dequeue_bulk(struct memd_ring *r, struct memd_ring_geom g, uint64_t *v,
                                unsigned n, unsigned *available, int *busy);
unsigned memd_ring_dequeue_burst(struct memd_ring *r, struct memd_ring_geom g, uint64_t *v,
                                 unsigned n, unsigned *available, int *busy);

/* Rings of any esize (DPDK: rte_ring_*_elem): as above, with n records of esize
 * bytes each at v (n * esize bytes); esize is the one the caller validated with the
 * geometry. */
unsigned memd_ring_enqueue_bulk_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                     const void *v, unsigned n, unsigned *free_space, int *busy);
unsigned memd_ring_enqueue_burst_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                      const void *v, unsigned n, unsigned *free_space, int *busy);
unsigned memd_ring_dequeue_bulk_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                     void *v, unsigned n, unsigned *available, int *busy);
unsigned memd_ring_dequeue_burst_elem(struct memd_ring *r, struct memd_ring_geom g, uint32_t esize,
                                      void *v, unsigned n, unsigned *available, int *busy);

/* Entries in the ring now (a snapshot while others run), at most g.capacity. */
unsigned memd_ring_count(const struct memd_ring *r, struct memd_ring_geom g);
/* As memd_ring_count, or -EBADMSG if the tails are damaged (more entries than the
 * capacity, with the consumers' tail unchanged around the read). */
int64_t memd_ring_entries(const struct memd_ring *r, struct memd_ring_geom g);
/* Room for entries now: capacity - count. */
unsigned memd_ring_free_count(const struct memd_ring *r, struct memd_ring_geom g);

/* --- sleeping ------------------------------------------------------------- */

/* A CPU hint for spin-wait loops. */
static inline void memd_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    atomic_signal_fence(memory_order_seq_cst);
#endif
}

/* Announce a waiter on w and return the futex value to sleep on.  `want`: the
 * fewest entries (not_empty) or free slots (not_full) the waiter can use, so
 * that smaller moves do not wake it (1 for a burst, n for a bulk; 0 on a lock
 * wait).  The caller must retry its operation after this (that retry closes
 * the lost-wakeup window) and call memd_ring_wait_done exactly once afterwards. */
uint32_t memd_ring_wait_prepare(struct memd_ring_wait *w, uint32_t want);

/* Sleep until w is woken or timeout_ns passes (UINT64_MAX: no limit).
 * Returns 0 when woken or the value already moved on, -ETIMEDOUT, -EINTR. */
int memd_ring_wait_sleep(struct memd_ring_wait *w, uint32_t seq, uint64_t timeout_ns);

/* Withdraw the waiter announced by memd_ring_wait_prepare. */
void memd_ring_wait_done(struct memd_ring_wait *w);

/* --- crash injection (test builds only, MEMD_TEST_HOOKS) ------------------- */

#ifdef MEMD_TEST_HOOKS
/* k >= 0: the next ring operation in this process calls _exit(77) at its step
 * point number k (0 = the first); k < 0 disarms.  Step points, in order: after
 * taking the lock (multi mode) and claiming the slots, after each slot written
 * or read, before the tail store, after the tail store (before the unlock).  An
 * operation that ends before step k disarms the knob.  Returns the old value. */
int memd_ring_crash_after(int k);

/* As memd_ring_crash_after, but step point k raises SIGSTOP (the process stops
 * there, holding what it holds, until SIGCONT) instead of exiting. */
int memd_ring_stop_after(int k);
#endif

/* 1 if the process whose lock word is `owner` (see MEMD_RING_LOCK_PID) is gone:
 * no such pid, a zombie, or the pid now belongs to a process started later. */
int memd_ring_owner_dead(uint64_t owner);

#endif /* MEMD_RING_H */
