/*
 * mempool.h - fixed-size object pools in shared memory (DPDK: rte_mempool).
 * The layout (struct memd_mempool, its caches and object headers) is in
 * memd_layout.h.
 *
 * A pool is one block at window offset `pool`: header, per-process caches,
 * private area, the ring of free objects, then the objects.  Objects are named
 * by *handles*, the window offsets of their data, which every process
 * understands and which travel through rings.  A process gets and puts through
 * its own cache (cache index = its process slot) first: a LIFO stack refilled
 * from the ring on a miss and flushed back to the ring past flushthresh, as DPDK
 * 22.11's rte_mempool_do_generic_get/put do (see memd_mempool_get_bulk/put_bulk).
 *
 * `base` is this process's window address; the pool never stores it.  Slot
 * MEMD_MEMPOOL_NO_CACHE bypasses the caches.  A cache is only touched by its
 * owner (memd_mempool_flush_cache of another slot is for a slot whose process has
 * gone); the free ring's sides take its small robust locks, never waited for
 * here (see below).
 *
 * Errors: 0 on success, -errno on failure, as each function lists.
 */
#ifndef MEMD_MEMPOOL_H
#define MEMD_MEMPOOL_H

#include <stdint.h>

#include "memd_layout.h"
#include "ring.h"

#define MEMD_MEMPOOL_NO_CACHE UINT32_MAX /* a slot value: use the ring only */

/* Where each part of a pool goes; all offsets relative to the pool header.  A
 * pool's user keeps the geometry it validated (memd_mempool_load) in its own memory
 * and gets, puts and counts with it, never with the shared header, which any
 * attached process can overwrite: a damaged header then breaks that pool (an
 * error), and nothing outside its memory is touched. */
struct memd_mempool_geometry {
    uint64_t caches_offset, cache_stride, private_offset, ring_offset;
    uint64_t objs_offset, obj_stride, trailer_offset, memsize;
    uint32_t flushthresh;
    uint32_t n, cache_size;     /* as asked */
    uint64_t pool;              /* window offset of the header (memd_mempool_load only) */
    struct memd_ring_geom ring; /* the free ring's (memd_mempool_load only) */
    uint64_t tag;               /* the pool's identity tag (init, memd_mempool_load) */
    struct memd_proc_pins *row; /* where this process brackets its moves (see "objects in
                                   flight" in memd_layout.h): memd_mempool_set_mover */
};

/* Bracket this process's moves in g's pool in process slot `slot`'s row of the
 * config mapped at `cfg` (its window's base); cfg NULL or no slot: in a private
 * row nobody reads (a test window).  Every geometry starts with the private one. */
void memd_mempool_set_mover(struct memd_mempool_geometry *g, char *cfg, int slot);

/* 1 iff a live process runs memd_mempool_recover on g's pool and asked moves to
 * wait (briefly: at most MEMD_MEMPOOL_RECOVER_HOLD_MS(n)); get, put and flush then
 * fail with -EBUSY having changed nothing. */
int memd_mempool_recover_holds(const char *base, const struct memd_mempool_geometry *g);

/* Compute the geometry.  Fails iff -EINVAL: n is 0 or >= 2^31, elt_size >= 2^31,
 * cache_size > MEMD_MEMPOOL_CACHE_MAX_SIZE or cache_size * 3 / 2 > n,
 * private_size >= 2^31, or an unknown flag. */
int memd_mempool_geometry(uint32_t n, uint32_t elt_size, uint32_t cache_size, uint32_t private_size,
                          uint32_t flags, struct memd_mempool_geometry *g);

/* Build an empty pool at window offset `pool` (64-byte aligned, geometry's
 * memsize bytes): every object's header and trailer, every handle in the free
 * ring in index order, zeroed caches and private area; magic stored last.
 * Fails iff -EINVAL (as memd_mempool_geometry, or a name too long). */
int memd_mempool_init(char *base, uint64_t pool, const char *name, uint32_t n, uint32_t elt_size,
                      uint32_t cache_size, uint32_t private_size, uint32_t flags);

/* 0 if a pool header at `pool` looks initialised and fits in `avail` bytes;
 * -EINVAL otherwise. */
int memd_mempool_check(const char *base, uint64_t pool, uint64_t avail);

/* memd_mempool_check, then the pool's geometry (with its free ring's and its
 * identity tag) into *g, for every later call on the pool.  0 or -EINVAL (a freed
 * pool too). */
int memd_mempool_load(const char *base, uint64_t pool, uint64_t avail,
                      struct memd_mempool_geometry *g);

/* 1 if the pool g was loaded from still carries g's tag in its header (it was not
 * freed since); 0 if not. */
int memd_mempool_live(const char *base, const struct memd_mempool_geometry *g);

/* The pool at `pool` is being freed: overwrite every copy of its identity tag
 * (header, caches, free ring) and its magic, so that every handle to it fails
 * with -ESTALE and nobody can load it again. */
void memd_mempool_poison(char *base, uint64_t pool, uint64_t avail);

/* Every call below that moves handles through the free ring waits for its side's
 * lock only briefly (DPDK's rte_mempool has no lock to wait for): if a live
 * process keeps it (stopped, or preempted for long), the call fails with -EBUSY
 * and nothing changed, and the caller waits its own way (Python: without the GIL,
 * in slices that let signals through, bounded) and calls again.  The lock's
 * owner word (its pid) is memd_mempool_ring_owner's.  Get, put and flush also
 * fail with -EBUSY, having changed nothing, while a recover holds moves off
 * (memd_mempool_recover_holds: at most MEMD_MEMPOOL_RECOVER_HOLD_MS(n)). */

/* Take n objects, all or nothing, through cache `slot`; their handles go to
 * handles[0..n).  DPDK 22.11 rte_mempool_do_generic_get: if the cache holds n,
 * they come from its top; else the cache gives all it has (len) and the ring the
 * rest, n - len: if the rest is at most MEMD_MEMPOOL_CACHE_MAX_SIZE, one ring
 * dequeue of cache_size + rest refills the cache to exactly cache_size as well;
 * if the ring has fewer than that, or the rest is bigger, the ring gives just
 * the rest.  No cache (slot MEMD_MEMPOOL_NO_CACHE, cache_size 0): n from the
 * ring.  Every ring dequeue is all or nothing.  Fails iff -ESTALE (a tag copy,
 * the header's or the cache's or ring's, is not g's: the pool was freed since g
 * was loaded, or that copy overwritten; nothing touched), -EBUSY (the free ring's consumer
 * lock is held by a live process: nothing taken), -ENOBUFS (fewer than
 * n free in this slot's cache and the ring; nothing taken, the cache as it was)
 * or -EFAULT (a free object's cookie is wrong, the cache's length is out of
 * range, or the ring's tails are damaged: corruption). */
int memd_mempool_get_bulk(char *base, const struct memd_mempool_geometry *g, uint32_t slot,
                          uint64_t *handles, unsigned n);

/* Give n objects back through cache `slot`, all or nothing.  DPDK 22.11
 * rte_mempool_do_generic_put: n > flushthresh (cache_size * 3 / 2) go straight
 * to the ring; else if len + n > flushthresh, the whole cache goes to the ring
 * first; then the n are cached (the last one on top).  Fails iff -ESTALE (as
 * get: freed or a tag copy overwritten; nothing touched), -EBUSY (the free ring's
 * producer lock is held by a live process), -EINVAL (a
 * handle that is not an object of this pool), -EALREADY (an object already
 * free: a double put, also within this call), or -EFAULT (a cookie is smashed,
 * the cache's length is out of range, or the ring overflowed or its tails are
 * damaged: corruption).  On
 * failure nothing changed. */
int memd_mempool_put_bulk(char *base, const struct memd_mempool_geometry *g, uint32_t slot,
                          const uint64_t *handles, unsigned n);

/* Move every handle in cache `slot` to the ring (a detaching process, or the
 * primary reclaiming a dead process's slot).  Returns how many moved, or
 * -EINVAL (bad slot), -ESTALE (the pool was freed, or a tag copy overwritten),
 * -EBUSY (the ring's producer lock is held by a live process: the cache as it
 * was), -EFAULT (ring overflow or damaged tails: corruption). */
int memd_mempool_flush_cache(char *base, const struct memd_mempool_geometry *g, uint32_t slot);

/* Objects marked BUSY whose owner tag is pid: taken from the pool (get) by that
 * process and not put back yet, wherever they went since.  A walk over all n
 * object headers; a snapshot while others run. */
uint64_t memd_mempool_held_by(char *base, const struct memd_mempool_geometry *g, int32_t pid);

/* Object i (0..n-1): its handle and its getter's pid; 1 if handed out, 0 if
 * free, -EINVAL if i >= n. */
int memd_mempool_busy_at(char *base, const struct memd_mempool_geometry *g, uint32_t i,
                         uint64_t *handle, int32_t *pid);

/* Count the objects handed out by getter pid: pids[0..k) and counts[0..k), k
 * returned (distinct pids, in no order), for a table of cap entries; -ENOSPC if
 * more than cap distinct pids hold objects (call again with a bigger table).  One
 * walk over the object headers, nothing allocated per object. */
int64_t memd_mempool_holders(char *base, const struct memd_mempool_geometry *g, int32_t *pids,
                             uint64_t *counts, uint32_t cap);

/* Put every object memd_mempool_held_by counts back into the free ring, for a
 * program that knows process pid is dead and shared none of the objects it got
 * (one still in use elsewhere would be handed out twice).  Returns how many went
 * back, or -EINVAL (pid <= 0), -EBUSY (pid is a live process: refused), -EFAULT
 * (the ring overflowed: corruption).  *busy = 1 if it stopped early because the
 * ring's producer lock is held by a live process: call again for the rest. */
int64_t memd_mempool_reclaim_held_by(char *base, const struct memd_mempool_geometry *g, int32_t pid,
                                     int *busy);

/* Free objects: the ring plus every cache (a snapshot while others run). */
uint64_t memd_mempool_avail_count(const char *base, const struct memd_mempool_geometry *g);

/* Handles in cache `slot` now. */
uint32_t memd_mempool_cache_count(const char *base, const struct memd_mempool_geometry *g,
                                  uint32_t slot);

/* The header of the object whose data is at `handle`, or NULL if handle is not
 * an object of this pool. */
struct memd_mempool_objhdr *
memd_mempool_objhdr_of(char *base, const struct memd_mempool_geometry *g, uint64_t handle);

/* What memd_mempool_audit found wrong first. */
enum memd_mempool_fault {
    MEMD_MP_OK = 0,
    MEMD_MP_BAD_POOL_HEADER, /* magic or geometry of the pool header */
    MEMD_MP_BAD_OBJ_HEADER,  /* an object's pool offset or index */
    MEMD_MP_BAD_OBJ_COOKIE,  /* an object's header cookie is neither FREE nor BUSY */
    MEMD_MP_BAD_TRAILER,     /* an object's trailer cookie: written past its end */
    MEMD_MP_BAD_RING,        /* the free ring's header or counters */
    MEMD_MP_BAD_ENTRY,       /* a ring or cache entry that is no object of the pool */
    MEMD_MP_BUSY_IN_FREE,    /* a ring or cache entry whose object is marked BUSY */
    MEMD_MP_DUPLICATE,       /* an object twice in the ring/caches */
    MEMD_MP_BAD_CACHE,       /* a cache's length is out of range */
    MEMD_MP_LOST,            /* FREE-marked objects missing from the ring and caches */
};

struct memd_mempool_audit {
    uint32_t fault;     /* enum memd_mempool_fault */
    int64_t where;      /* object index, cache slot or -1 */
    uint64_t free_objs; /* objects marked FREE */
    uint64_t busy_objs; /* objects marked BUSY */
    uint64_t in_ring;   /* handles in the ring */
    uint64_t in_caches; /* handles in all caches */
};

/* Put free objects that sit in no ring and no cache (a process was killed
 * between taking them out of one and putting them in the other) back into the
 * ring.  It looks at the pool at a moment when no process moves its objects
 * (see "objects in flight" in memd_layout.h: movers bracket their moves in the
 * rows of the config at `cfg`; cfg NULL: the caller promises nobody moves now).
 * Returns how many went back, -ESTALE (the pool was freed), -ENOMEM, -EBUSY (no
 * quiet moment within MEMD_MEMPOOL_RECOVER_HOLD_MS(n): *odd_pid is a process
 * stuck in the middle of a move, stopped say, or 0; or another recover runs, or
 * the ring's producer lock is held by a live process: call again), or -EFAULT
 * with *a saying what else is wrong (nothing changed then). */
int64_t memd_mempool_recover(char *base, const struct memd_mempool_geometry *g, const char *cfg,
                             struct memd_mempool_audit *a, uint32_t *odd_pid);

/* The owner word of the free ring's producer (enq 1) or consumer (enq 0) lock,
 * 0 if free: its pid is MEMD_RING_LOCK_PID (for an error naming who keeps a
 * pool busy). */
uint64_t memd_mempool_ring_owner(const char *base, const struct memd_mempool_geometry *g, int enq);

/* Check every cookie, every ring and cache entry, and that the counts agree, at
 * a quiet moment as memd_mempool_recover finds one (`row`: the caller's, as
 * memd_mempool_set_mover gives; NULL: a private one).  Returns 0, -EFAULT with
 * *a saying what, -EBUSY as memd_mempool_recover, or -ENOMEM (no memory for the
 * check's bitmap). */
int memd_mempool_audit(char *base, uint64_t pool, struct memd_proc_pins *row, const char *cfg,
                       struct memd_mempool_audit *a, uint32_t *odd_pid);

#ifdef MEMD_TEST_HOOKS
/* What a put that marked the object at `handle` FREE (its plain store) does when
 * its check after the fence finds the owner tag as it now is (tests write a claim
 * of a stopped or dead process there): 0 if the object stays ours to put, 1 if
 * the put lost it (the cookie then says who holds it), -EINVAL for no object. */
int memd_mempool_settle_own(char *base, const struct memd_mempool_geometry *g, uint64_t handle);
#endif

#endif /* MEMD_MEMPOOL_H */
