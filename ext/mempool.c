/* mempool.c - fixed-size object pools in shared memory (see mempool.h). */
#include "mempool.h"
#include "proc.h"

#include <errno.h>
#include <linux/membarrier.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "lock.h"
#include "ring.h"

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define OBJHDR_SIZE  ((uint64_t)sizeof(struct memd_mempool_objhdr))
#define TRAILER_SIZE 8u
#define LIMIT31      0x80000000u

static inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

/* The slot row of a process in no instance's process table (a private test
 * window, a detached one): nobody reads it, so its moves are unseen by a
 * recover (see "objects in flight"). */
static struct memd_proc_pins unseen_row;

static inline struct memd_mempool *pool_at(const char *base, uint64_t pool)
{
    return (struct memd_mempool *)(uintptr_t)(base + pool);
}

/* Everything below indexes with the geometry the caller validated (g), never
 * with the shared header (see struct memd_mempool_geometry). */
static inline struct memd_ring *ring_of(const char *base, const struct memd_mempool_geometry *g)
{
    return (struct memd_ring *)(uintptr_t)(base + g->pool + g->ring_offset);
}

static inline struct memd_mempool_cache *
cache_of(const char *base, const struct memd_mempool_geometry *g, uint32_t slot)
{
    if (g->cache_size == 0 || slot >= MEMD_MAX_PROCS)
        return NULL;
    return (struct memd_mempool_cache *)(uintptr_t)(base + g->pool + g->caches_offset +
                                                    (uint64_t)slot * g->cache_stride);
}

static inline uint64_t *trailer_of(char *base, const struct memd_mempool_geometry *g,
                                   uint64_t handle)
{
    return (uint64_t *)(base + handle + g->trailer_offset);
}

/* --- geometry and init ---------------------------------------------------- */

int memd_mempool_geometry(uint32_t n, uint32_t elt_size, uint32_t cache_size, uint32_t private_size,
                          uint32_t flags, struct memd_mempool_geometry *g)
{
    if (n == 0 || n >= LIMIT31 || elt_size >= LIMIT31 || private_size >= LIMIT31 ||
        cache_size > MEMD_MEMPOOL_CACHE_MAX_SIZE || (flags & ~MEMD_MEMPOOL_F_ALL))
        return -EINVAL;
    uint32_t flushthresh = cache_size * 3 / 2;
    if (flushthresh > n)
        return -EINVAL;
    int64_t ring_size = memd_ring_memsize(n, MEMD_RING_ESIZE_U64, MEMD_RING_F_EXACT_SZ);
    if (ring_size < 0)
        return -EINVAL;
    uint64_t off = sizeof(struct memd_mempool);
    memset(g, 0, sizeof(*g));
    g->row = &unseen_row;
    g->flushthresh = flushthresh;
    g->n = n;
    g->cache_size = cache_size;
    if (cache_size) {
        g->caches_offset = off;
        /* 2 * cache_size: a refill of cache_size + n lands here when n <= size
         * (a bigger one goes through the stack); a put leaves <= 1.5 * size */
        g->cache_stride = round_up(sizeof(struct memd_mempool_cache) +
                                       2u * (uint64_t)cache_size * sizeof(uint64_t),
                                   MEMD_CACHE_LINE);
        off += MEMD_MAX_PROCS * g->cache_stride;
    }
    g->private_offset = off;
    off += round_up(private_size, MEMD_CACHE_LINE);
    g->ring_offset = off;
    off += round_up((uint64_t)ring_size, MEMD_CACHE_LINE);
    g->objs_offset = off;
    g->trailer_offset = round_up(elt_size, 8);
    g->obj_stride = round_up(OBJHDR_SIZE + g->trailer_offset + TRAILER_SIZE, MEMD_CACHE_LINE);
    g->memsize = off + (uint64_t)n * g->obj_stride;
    return 0;
}

int memd_mempool_init(char *base, uint64_t pool, const char *name, uint32_t n, uint32_t elt_size,
                      uint32_t cache_size, uint32_t private_size, uint32_t flags)
{
    struct memd_mempool_geometry g;
    int rc = memd_mempool_geometry(n, elt_size, cache_size, private_size, flags, &g);
    if (rc < 0)
        return rc;
    if (pool % MEMD_CACHE_LINE || (name && strnlen(name, MEMD_NAMESIZE) >= MEMD_NAMESIZE))
        return -EINVAL;
    g.pool = pool;
    g.tag = memd_new_tag();
    struct memd_mempool *mp = pool_at(base, pool);
    /* relaxed: nobody may use the pool until the magic is stored below. */
    atomic_store_explicit(&mp->magic, 0, memory_order_relaxed);
    memset((char *)mp + sizeof(mp->magic), 0, g.ring_offset - sizeof(mp->magic));
    if (name)
        memcpy(mp->name, name, strlen(name));
    mp->n = n;
    mp->elt_size = elt_size;
    mp->cache_size = cache_size;
    mp->flushthresh = g.flushthresh;
    mp->private_data_size = private_size;
    mp->flags = flags;
    mp->caches_offset = g.caches_offset;
    mp->cache_stride = g.cache_stride;
    mp->private_offset = g.private_offset;
    mp->ring_offset = g.ring_offset;
    mp->objs_offset = g.objs_offset;
    mp->obj_stride = g.obj_stride;
    mp->trailer_offset = g.trailer_offset;
    mp->memsize = g.memsize;
    atomic_store_explicit(&mp->tag, g.tag, memory_order_relaxed);
    for (uint32_t i = 0; g.cache_size && i < MEMD_MAX_PROCS; i++)
        atomic_store_explicit(&cache_of(base, &g, i)->tag, g.tag, memory_order_relaxed);

    uint32_t ring_flags = MEMD_RING_F_EXACT_SZ;
    if (flags & MEMD_MEMPOOL_F_SP_PUT)
        ring_flags |= MEMD_RING_F_SP_ENQ;
    if (flags & MEMD_MEMPOOL_F_SC_GET)
        ring_flags |= MEMD_RING_F_SC_DEQ;
    struct memd_ring *r = ring_of(base, &g);
    rc = memd_ring_init(r, name, n, MEMD_RING_ESIZE_U64, ring_flags, g.tag);
    if (rc < 0)
        return rc;
    g.ring = memd_ring_geom_of(r);

    uint64_t handle = pool + g.objs_offset + OBJHDR_SIZE;
    for (uint32_t i = 0; i < n; i++, handle += g.obj_stride) {
        struct memd_mempool_objhdr *h = (struct memd_mempool_objhdr *)(base + handle - OBJHDR_SIZE);
        memset(h, 0, sizeof(*h));
        h->pool_offset = pool;
        h->cookie = MEMD_MEMPOOL_HDR_COOKIE_FREE;
        h->index = i;
        *trailer_of(base, &g, handle) = MEMD_MEMPOOL_TRAILER_COOKIE;
        if (memd_ring_enqueue_bulk(r, g.ring, &handle, 1, NULL, NULL) != 1)
            return -EFAULT; /* cannot happen: the ring holds exactly n */
    }
    /* release: pairs with the acquire load in memd_mempool_check; whoever sees
     * the magic sees the whole pool as built above. */
    atomic_store_explicit(&mp->magic, MEMD_MEMPOOL_MAGIC, memory_order_release);
    return 0;
}

int memd_mempool_check(const char *base, uint64_t pool, uint64_t avail)
{
    if (avail < sizeof(struct memd_mempool) || pool % MEMD_CACHE_LINE)
        return -EINVAL;
    const struct memd_mempool *mp = pool_at(base, pool);
    /* acquire: pairs with the release store of the magic in memd_mempool_init. */
    if (atomic_load_explicit(&mp->magic, memory_order_acquire) != MEMD_MEMPOOL_MAGIC)
        return -EINVAL;
    struct memd_mempool_geometry g;
    if (memd_mempool_geometry(mp->n, mp->elt_size, mp->cache_size, mp->private_data_size, mp->flags,
                              &g) < 0 ||
        g.caches_offset != mp->caches_offset || g.cache_stride != mp->cache_stride ||
        g.private_offset != mp->private_offset || g.ring_offset != mp->ring_offset ||
        g.objs_offset != mp->objs_offset || g.obj_stride != mp->obj_stride ||
        g.trailer_offset != mp->trailer_offset || g.memsize != mp->memsize ||
        g.flushthresh != mp->flushthresh || mp->memsize > avail)
        return -EINVAL;
    const struct memd_ring *r = (const struct memd_ring *)(base + pool + mp->ring_offset);
    /* The free ring carries handles: uint64 entries, whatever its header says. */
    uint64_t tag = atomic_load_explicit(&mp->tag, memory_order_relaxed);
    if (memd_ring_check(r, mp->memsize - mp->ring_offset) < 0 || r->capacity != mp->n ||
        r->esize != MEMD_RING_ESIZE_U64 || tag == MEMD_TAG_FREED ||
        atomic_load_explicit(&r->prod.tag, memory_order_relaxed) != tag)
        return -EINVAL;
    return 0;
}

int memd_mempool_load(const char *base, uint64_t pool, uint64_t avail,
                      struct memd_mempool_geometry *g)
{
    if (memd_mempool_check(base, pool, avail) < 0)
        return -EINVAL;
    const struct memd_mempool *mp = pool_at(base, pool);
    /* computed again from the inputs just checked, and the ring checked again at the
     * computed place: a rewrite of the header meanwhile cannot slip in a geometry
     * that was not checked */
    if (memd_mempool_geometry(mp->n, mp->elt_size, mp->cache_size, mp->private_data_size, mp->flags,
                              g) < 0 ||
        g->memsize > avail)
        return -EINVAL;
    const struct memd_ring *r = (const struct memd_ring *)(base + pool + g->ring_offset);
    g->pool = pool;
    g->ring = memd_ring_geom_of(r);
    g->tag = atomic_load_explicit(&mp->tag, memory_order_relaxed);
    if (memd_ring_check(r, g->objs_offset - g->ring_offset) < 0 || g->ring.capacity != g->n ||
        r->esize != MEMD_RING_ESIZE_U64 || g->ring.size <= g->n ||
        (g->ring.size & (g->ring.size - 1)) ||
        sizeof(struct memd_ring) + 8ull * g->ring.size > g->objs_offset - g->ring_offset ||
        g->tag == MEMD_TAG_FREED ||
        atomic_load_explicit(&r->prod.tag, memory_order_relaxed) != g->tag)
        return -EINVAL;
    return 0;
}

int memd_mempool_live(const char *base, const struct memd_mempool_geometry *g)
{
    return atomic_load_explicit(&pool_at(base, g->pool)->tag, memory_order_relaxed) == g->tag;
}

void memd_mempool_poison(char *base, uint64_t pool, uint64_t avail)
{
    struct memd_mempool *mp = pool_at(base, pool);
    struct memd_mempool_geometry g;
    /* every copy of the tag this pool's geometry places; a damaged header (no
     * geometry) at least loses its magic and header tag: nobody can load it again */
    if (memd_mempool_load(base, pool, avail, &g) == 0) {
        for (uint32_t i = 0; g.cache_size && i < MEMD_MAX_PROCS; i++)
            atomic_store_explicit(&cache_of(base, &g, i)->tag, MEMD_TAG_FREED,
                                  memory_order_relaxed);
        memd_ring_poison(ring_of(base, &g));
    }
    atomic_store_explicit(&mp->magic, 0, memory_order_relaxed);
    atomic_store_explicit(&mp->tag, MEMD_TAG_FREED, memory_order_seq_cst);
}

/* --- handles -------------------------------------------------------------- */

/* Inline in the get/put loops: a call per object costs a bulk put of 32 a
 * tenth of its time. */
static inline __attribute__((always_inline)) struct memd_mempool_objhdr *
objhdr_checked(char *base, const struct memd_mempool_geometry *g, uint64_t handle)
{
    const uint64_t pool = g->pool;
    uint64_t first = pool + g->objs_offset + OBJHDR_SIZE;
    uint64_t rel = handle - first; /* wraps to huge if handle < first */
    if (unlikely(handle < first || rel >= (uint64_t)g->n * g->obj_stride || rel % MEMD_CACHE_LINE))
        return NULL;
    struct memd_mempool_objhdr *h = (struct memd_mempool_objhdr *)(base + handle - OBJHDR_SIZE);
    if (unlikely(h->pool_offset != pool || (uint64_t)h->index * g->obj_stride != rel))
        return NULL;
    return h;
}

struct memd_mempool_objhdr *
memd_mempool_objhdr_of(char *base, const struct memd_mempool_geometry *g, uint64_t handle)
{
    return objhdr_checked(base, g, handle);
}

/* --- get / put ------------------------------------------------------------ */

/* Mark handles[0..n), just taken from a cache or the ring, busy and owned by
 * this process (the owner tag shares the cookie's cache line: no extra miss).
 * Each must be a FREE object of the pool; if not, the pool is corrupted:
 * -EFAULT (the entry is dropped, and audit() says what is wrong). */
static int mark_busy(char *base, const struct memd_mempool_geometry *g, const uint64_t *handles,
                     unsigned n)
{
    int rc = 0;
    const int32_t pid = (int32_t)memd_self_pid();
    for (unsigned i = 0; i < n; i++) {
        struct memd_mempool_objhdr *h = objhdr_checked(base, g, handles[i]);
        if (unlikely(h == NULL || h->cookie != MEMD_MEMPOOL_HDR_COOKIE_FREE)) {
            rc = -EFAULT;
            continue;
        }
        h->cookie = MEMD_MEMPOOL_HDR_COOKIE_BUSY;
        h->owner_pid = pid;
    }
    return rc;
}

/* What a free-ring move that moved nothing means: -EBUSY (a live process keeps
 * its lock), -EFAULT (its tails are damaged: the pool is corrupted), or `empty`
 * (the ring had too few entries, or too little room). */
static inline int ring_fail(int busy, int empty)
{
    return busy == MEMD_RING_BUSY ? -EBUSY : busy == MEMD_RING_DAMAGED ? -EFAULT : empty;
}

/* A cache miss (DPDK 22.11 rte_mempool_do_generic_get past its first loop):
 * the cache gives all len it has, then one all-or-nothing ring dequeue of
 * cache_size + the rest refills the cache to cache_size and serves the rest;
 * if the ring has fewer, the rest alone comes from the ring, all or nothing;
 * if not even that, nothing is taken.  handles[] is written only on success
 * (DPDK writes it either way).  The refill lands on the stack first: the
 * cache's old entries must survive a failed get.  The cache's len is stored
 * only once the outcome is known: a process killed in between leaves objects
 * in no ring or cache (memd_mempool_recover finds them), never in two places.
 * Out of line: the stack buffer stays off the hit path. */
static __attribute__((noinline)) int get_miss(char *base, const struct memd_mempool_geometry *g,
                                              struct memd_mempool_cache *c, uint32_t len,
                                              uint64_t *handles, unsigned n)
{
    struct memd_ring *r = ring_of(base, g);
    const uint32_t size = g->cache_size;
    const unsigned rest = n - len;
    uint64_t refill[2 * MEMD_MEMPOOL_CACHE_MAX_SIZE];
    /* As DPDK: a rest bigger than the largest cache is not worth a refill. */
    const unsigned req = rest <= MEMD_MEMPOOL_CACHE_MAX_SIZE ? size + rest : 0;
    int busy = 0;
    const int refilled = req && memd_ring_dequeue_bulk(r, g->ring, refill, req, NULL, &busy) == req;
    if (refilled) {
        for (unsigned i = 0; i < rest; i++)
            handles[len + i] = refill[req - 1 - i];
    } else if (busy ||
               memd_ring_dequeue_bulk(r, g->ring, handles + len, rest, NULL, &busy) != rest) {
        /* nothing taken: the ring and the cache as they were */
        return ring_fail(busy, -ENOBUFS);
    }
    for (unsigned i = 0; i < len; i++)
        handles[i] = c->objs[len - 1 - i];
    if (refilled)
        memcpy(c->objs, refill, size * sizeof(uint64_t));
    atomic_store_explicit(&c->len, refilled ? size : 0, memory_order_relaxed);
    c->gets += n;
    return mark_busy(base, g, handles, n);
}

static inline __attribute__((always_inline)) int get_bulk(char *base,
                                                          const struct memd_mempool_geometry *g,
                                                          uint32_t slot, uint64_t *handles,
                                                          unsigned n)
{
    struct memd_mempool_cache *c = cache_of(base, g, slot);
    if (c == NULL) {
        struct memd_ring *r = ring_of(base, g);
        if (unlikely(!memd_ring_tag_ok(&r->cons, g->tag)))
            return -ESTALE;
        if (unlikely(n == 0))
            return 0;
        int busy = 0;
        if (memd_ring_dequeue_bulk(r, g->ring, handles, n, NULL, &busy) != n)
            return ring_fail(busy, -ENOBUFS);
        return mark_busy(base, g, handles, n);
    }
    /* the tag shares the line of len: no extra miss */
    if (unlikely(atomic_load_explicit(&c->tag, memory_order_relaxed) != g->tag))
        return -ESTALE;
    if (unlikely(n == 0))
        return 0;
    /* relaxed: only this process writes its cache's len (see the header). */
    uint32_t len = atomic_load_explicit(&c->len, memory_order_relaxed);
    if (unlikely(len > 2u * g->cache_size))
        return -EFAULT; /* a smashed len would index past the cache */
    if (unlikely(n > len))
        return get_miss(base, g, c, len, handles, n);
    /* The hot objects are on top of the stack: hand those out. */
    for (unsigned i = 0; i < n; i++)
        handles[i] = c->objs[len - 1 - i];
    atomic_store_explicit(&c->len, len - n, memory_order_relaxed);
    c->gets += n;
    return mark_busy(base, g, handles, n);
}

/* Put back the BUSY marks of handles[0..k) after a failed put: the caller keeps
 * them, so they are tagged as its own. */
static void unmark(char *base, const uint64_t *handles, unsigned k)
{
    const int32_t self = (int32_t)memd_self_pid();
    for (unsigned i = 0; i < k; i++) {
        struct memd_mempool_objhdr *h =
            (struct memd_mempool_objhdr *)(base + handles[i] - OBJHDR_SIZE);
        __atomic_store_n(&h->owner_pid, self, __ATOMIC_RELAXED);
        __atomic_store_n(&h->cookie, MEMD_MEMPOOL_HDR_COOKIE_BUSY, __ATOMIC_RELAXED);
    }
}

/*
 * Two processes putting one object at once (a double put) must not both pass:
 * the object would go into the free ring twice.  A locked instruction per object
 * costs a bulk put of 32 a quarter of its time, so the common case, the getter
 * putting its own object (owner tag == its pid), marks it FREE with a plain store
 * and checks once per call, after one fence, that the tag still names it.  Any
 * other putter first claims the tag with a CAS (-> CLAIMING(its pid)), then looks
 * at the cookie, and settles the tag at once: WON(its pid) if it saw BUSY (and
 * marked it FREE), else the old tag back (it failed: a double put).  By the
 * fences, either the getter's check sees the claim, or the claimer sees the
 * getter's FREE: the getter waits for the claim to settle (nanoseconds; a claimer
 * that died or stays stopped counts as lost) and wins iff the tag is its own
 * again.  Two claimers: one CAS fails.  Threads of one process hold the GIL.
 */
#define CLAIMING(pid) (-(int32_t)(pid))
#define WON(pid)      (-(int32_t)((uint32_t)(pid) | 0x40000000u)) /* pids < 2^30 */
#define IS_WON(tag)   ((tag) < 0 && ((uint32_t)-(tag) & 0x40000000u))

/* A full barrier; on x86 a locked add to the stack is cheaper than mfence and
 * orders plain stores before later loads just the same. */
static inline void full_fence(void)
{
#if defined(__x86_64__)
    __asm__ __volatile__("lock; addl $0, -8(%%rsp)" ::: "memory", "cc");
#else
    atomic_thread_fence(memory_order_seq_cst);
#endif
}

/* Put an object this process did not get (see above): 0, or -EALREADY / -EFAULT
 * with the object as it was. */
static __attribute__((noinline)) int claim_foreign(struct memd_mempool_objhdr *h, uint64_t ck,
                                                   int32_t self)
{
    if (ck != MEMD_MEMPOOL_HDR_COOKIE_BUSY)
        return ck == MEMD_MEMPOOL_HDR_COOKIE_FREE ? -EALREADY : -EFAULT;
    int32_t o = __atomic_load_n(&h->owner_pid, __ATOMIC_RELAXED);
    /* WON: another put has just marked it FREE (its stores come in that order);
     * a negative tag without WON is a claim: only a live claimer's blocks us */
    if (IS_WON(o) || (o < 0 && memd_process_alive((pid_t)-o, 0, 0)))
        return -EALREADY; /* another process is putting it right now */
    if (!__atomic_compare_exchange_n(&h->owner_pid, &o, CLAIMING(self), 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return -EALREADY;
    ck = __atomic_load_n(&h->cookie, __ATOMIC_RELAXED);
    if (ck != MEMD_MEMPOOL_HDR_COOKIE_BUSY) {
        __atomic_store_n(&h->owner_pid, o, __ATOMIC_RELAXED); /* settled: not ours */
        return ck == MEMD_MEMPOOL_HDR_COOKIE_FREE ? -EALREADY : -EFAULT;
    }
    __atomic_store_n(&h->cookie, MEMD_MEMPOOL_HDR_COOKIE_FREE, __ATOMIC_RELAXED);
    __atomic_store_n(&h->owner_pid, WON(self), __ATOMIC_RELAXED); /* settled: ours */
    return 0;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* How long a put waits for another putter's claim on the same object (a double
 * put) to settle before it gives up: a claim settles in nanoseconds unless its
 * process is stopped or preempted, and giving up is safe (see own_mark_lost). */
#define CLAIM_WAIT_NS 10000000ull /* 10 ms */

/* After the fence: is object h, marked FREE by our plain store, still ours?
 * Waits (bounded) for a claim in progress to settle. */
static __attribute__((noinline)) int own_mark_lost(struct memd_mempool_objhdr *h, int32_t self,
                                                   int32_t o)
{
    uint64_t start = 0;
    for (unsigned spins = 0; o < 0 && !IS_WON(o); spins++) {
        if (spins % 256 == 255) {
            if (!memd_process_alive((pid_t)-o, 0, 0)) {
                /* The claimer died mid-claim: it never settles the tag, and it put
                 * nothing in the ring (it would have settled first), so our FREE
                 * stands.  One CAS: another putter may be taking it over too. */
                if (__atomic_compare_exchange_n(&h->owner_pid, &o, self, 0, __ATOMIC_SEQ_CST,
                                                __ATOMIC_RELAXED))
                    return 0;
                continue;
            }
            uint64_t now = mono_ns();
            if (start == 0)
                start = now;
            else if (now - start >= CLAIM_WAIT_NS)
                break;     /* a stopped (or long preempted) claimer: give up */
            sched_yield(); /* on a busy 2-core host it may be waiting for our CPU */
        }
        memd_cpu_relax();
        o = __atomic_load_n(&h->owner_pid, __ATOMIC_RELAXED);
    }
    if (o == self || o == WON(self))
        return 0;
    /* Lost.  Unless another putter won it (its FREE is the one that counts), put
     * our BUSY back: a getter holding it again means our FREE store came late (we
     * were preempted before it); a claimer we gave up on sees BUSY when it runs
     * again and wins, or it had seen our FREE already and settles the tag back
     * to us, failing: we keep the object.  Left FREE, it would be in no ring and
     * no cache, lost. */
    uint64_t want = MEMD_MEMPOOL_HDR_COOKIE_FREE;
    if (!IS_WON(o))
        __atomic_compare_exchange_n(&h->cookie, &want, MEMD_MEMPOOL_HDR_COOKIE_BUSY, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    return 1;
}

#ifdef MEMD_TEST_HOOKS
int memd_mempool_settle_own(char *base, const struct memd_mempool_geometry *g, uint64_t handle)
{
    struct memd_mempool_objhdr *h = objhdr_checked(base, g, handle);
    if (h == NULL)
        return -EINVAL;
    const int32_t self = (int32_t)memd_self_pid();
    full_fence();
    int32_t o = __atomic_load_n(&h->owner_pid, __ATOMIC_RELAXED);
    return o == self || o == WON(self) ? 0 : own_mark_lost(h, self, o);
}
#endif

/* A put that failed gives back its marks on handles[0..k) except `skip` (all or
 * nothing), but not on one another putter took meanwhile (our plain FREE store
 * can be overtaken by a claimer that saw BUSY). */
static __attribute__((noinline)) void give_back(char *base, const uint64_t *handles, unsigned k,
                                                unsigned skip, int32_t self)
{
    full_fence(); /* as in put_bulk: a claimer's CAS is seen, or it saw our FREE */
    for (unsigned j = 0; j < k; j++) {
        struct memd_mempool_objhdr *x =
            (struct memd_mempool_objhdr *)(base + handles[j] - OBJHDR_SIZE);
        int32_t t = __atomic_load_n(&x->owner_pid, __ATOMIC_RELAXED);
        if (j != skip && (t == self || t == WON(self) || !own_mark_lost(x, self, t)))
            unmark(base, &handles[j], 1);
    }
}

static inline __attribute__((always_inline)) int put_bulk(char *base,
                                                          const struct memd_mempool_geometry *g,
                                                          uint32_t slot, const uint64_t *handles,
                                                          unsigned n)
{
    struct memd_ring *r = ring_of(base, g);
    struct memd_mempool_cache *c = cache_of(base, g, slot);
    /* before any write: a freed pool's memory may be somebody else's now */
    if (unlikely((c ? atomic_load_explicit(&c->tag, memory_order_relaxed)
                    : atomic_load_explicit(&r->prod.tag, memory_order_relaxed)) != g->tag))
        return -ESTALE;
    /* relaxed: only this process writes its cache's len (see the header). */
    uint32_t len = c ? atomic_load_explicit(&c->len, memory_order_relaxed) : 0;
    if (unlikely(len > 2u * g->cache_size))
        return -EFAULT; /* a smashed len would index past the cache */

    /* Validate and mark free in one pass; a duplicate in this call then shows
     * up as already FREE.  On any failure undo the marks made so far. */
    const int32_t self = (int32_t)memd_self_pid();
    unsigned own = 0; /* marked by the plain store: checked after the fence */
    for (unsigned i = 0; i < n; i++) {
        struct memd_mempool_objhdr *h = objhdr_checked(base, g, handles[i]);
        if (unlikely(h == NULL)) {
            give_back(base, handles, i, UINT32_MAX, self);
            return -EINVAL;
        }
        uint64_t ck = __atomic_load_n(&h->cookie, __ATOMIC_RELAXED);
        if (likely(ck == MEMD_MEMPOOL_HDR_COOKIE_BUSY &&
                   __atomic_load_n(&h->owner_pid, __ATOMIC_RELAXED) == self)) {
            __atomic_store_n(&h->cookie, MEMD_MEMPOOL_HDR_COOKIE_FREE, __ATOMIC_RELAXED);
            own++;
            continue;
        }
        int rc = claim_foreign(h, ck, self);
        if (unlikely(rc < 0)) {
            give_back(base, handles, i, UINT32_MAX, self);
            return rc;
        }
    }
    if (own) {
        /* our FREE stores before the tag loads below, against a claimer's CAS
         * before its cookie load (store buffering: one of us sees the other) */
        full_fence();
        for (unsigned i = 0; i < n; i++) {
            struct memd_mempool_objhdr *h =
                (struct memd_mempool_objhdr *)(base + handles[i] - OBJHDR_SIZE);
            int32_t o = __atomic_load_n(&h->owner_pid, __ATOMIC_RELAXED);
            if (likely(o == self || o == WON(self)) || !own_mark_lost(h, self, o))
                continue;
            give_back(base, handles, n, i, self); /* another putter has it */
            return -EALREADY;
        }
    }

    /* DPDK 22.11 rte_mempool_do_generic_put: more than the flush threshold goes
     * straight to the ring; else if the cache would pass the threshold, the
     * whole cache goes to the ring first; then the n objects are cached.  The
     * threshold is computed, not read: the cache has room for 2 * cache_size. */
    const uint32_t flushthresh = g->flushthresh;
    int busy = 0;
    if (c == NULL || n > flushthresh) {
        if (unlikely(n == 0))
            return 0; /* nothing to move: no lock to wait for */
        if (memd_ring_enqueue_bulk(r, g->ring, handles, n, NULL, &busy) != n) {
            unmark(base, handles, n);
            /* else more objects than the pool has: corrupted */
            return ring_fail(busy, -EFAULT);
        }
        return 0;
    }
    if (len + n > flushthresh) {
        /* Past the threshold: the whole cache goes back to the ring.  Empty it
         * first: a process killed in between leaves objects in no ring or cache
         * (memd_mempool_recover finds them), never in both (handed out twice). */
        atomic_store_explicit(&c->len, 0, memory_order_relaxed);
        if (memd_ring_enqueue_bulk(r, g->ring, c->objs, len, NULL, &busy) != len) {
            atomic_store_explicit(&c->len, len, memory_order_relaxed);
            unmark(base, handles, n);
            return ring_fail(busy, -EFAULT);
        }
        len = 0;
    }
    memcpy(&c->objs[len], handles, n * sizeof(uint64_t));
    /* relaxed: readers of another process's len only count. */
    atomic_store_explicit(&c->len, len + n, memory_order_relaxed);
    c->puts += n;
    return 0;
}

static inline __attribute__((always_inline)) int
flush_cache(char *base, const struct memd_mempool_geometry *g, uint32_t slot)
{
    if (slot >= MEMD_MAX_PROCS)
        return -EINVAL;
    struct memd_mempool_cache *c = cache_of(base, g, slot);
    if (c == NULL)
        return 0;
    if (atomic_load_explicit(&c->tag, memory_order_relaxed) != g->tag)
        return -ESTALE;
    uint32_t len = atomic_load_explicit(&c->len, memory_order_relaxed);
    if (len > 2u * g->cache_size)
        return -EFAULT;
    if (len == 0)
        return 0; /* no lock to take: a stopped holder must not delay an empty flush */
    atomic_store_explicit(&c->len, 0, memory_order_relaxed); /* first: see put_bulk */
    int busy = 0;
    if (memd_ring_enqueue_bulk(ring_of(base, g), g->ring, c->objs, len, NULL, &busy) != len) {
        atomic_store_explicit(&c->len, len, memory_order_relaxed);
        return ring_fail(busy, -EFAULT);
    }
    return (int)len;
}

/* --- objects in flight (memd_layout.h) -------------------------------------- */

void memd_mempool_set_mover(struct memd_mempool_geometry *g, char *cfg, int slot)
{
    /* once per process (a forked child too): registered, a recover's barrier
     * covers our moves, and it need not wait for all of them (quiet_walk) */
    static pid_t registered_pid;
    static int registered;
    if (cfg == NULL || slot < 0 || (uint32_t)slot >= MEMD_MAX_PROCS) {
        g->row = &unseen_row;
        return;
    }
    if (registered_pid != memd_self_pid()) {
        registered = syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0;
        registered_pid = memd_self_pid();
    }
    g->row = &((struct memd_config *)(uintptr_t)cfg)->pins[slot];
    atomic_store_explicit(&g->row->pool_barrier, (uint32_t)registered, memory_order_relaxed);
}

static uint64_t mono_ms(void) { return mono_ns() / 1000000u; }

/* Does a recover (its `recovering` word w) ask moves of g's pool to wait?  Only a
 * live one, until the time it names, and only if that is no further ahead than a
 * hold can be: a scribbled word, or a recoverer whose clock runs ahead of ours
 * (another time namespace), must not stop the pool.  A hold that is over (by our
 * clock) is taken away, so that the recoverer cannot trust a walk we move under
 * (quiet_walk checks its word is still there).  A word with no pid is the pause
 * after a hold (no hold). */
static __attribute__((noinline, cold)) int
recover_holds(const char *base, const struct memd_mempool_geometry *g, uint64_t w)
{
    const pid_t pid = (pid_t)(w & ((1u << MEMD_PIN_OWNER_PID_BITS) - 1));
    if (pid == 0)
        return 0;
    const uint64_t until = w >> MEMD_PIN_OWNER_PID_BITS, now = mono_ms();
    if (until > now && until - now <= MEMD_MEMPOOL_RECOVER_HOLD_MS(g->n) &&
        memd_process_alive(pid, 0, 0))
        return 1;
    atomic_compare_exchange_strong(&pool_at(base, g->pool)->recovering, &w, 0);
    return 0;
}

int memd_mempool_recover_holds(const char *base, const struct memd_mempool_geometry *g)
{
    uint64_t w = atomic_load_explicit(&pool_at(base, g->pool)->recovering, memory_order_relaxed);
    return w != 0 && recover_holds(base, g, w);
}

/* Open a move of g's pool: our row's word odd (before any of the move's stores),
 * then a look at the pool's recovering word and its header's tag (one line).
 * Returns the word's value for move_end (even, >= 2), or, with nothing changed,
 * MOVE_BUSY if a recover asks us to wait (-EBUSY for the caller) or MOVE_STALE if
 * the header no longer carries g's tag (freed or overwritten: -ESTALE). */
#define MOVE_BUSY  0u
#define MOVE_STALE 1u
static inline __attribute__((always_inline)) uint64_t
move_begin(const char *base, const struct memd_mempool_geometry *g)
{
    struct memd_proc_pins *row = g->row;
    const uint64_t s = atomic_load_explicit(&row->pool_moving, memory_order_relaxed) | 1u;
    atomic_store_explicit(&row->pool_moving_at, g->pool, memory_order_relaxed);
    atomic_store_explicit(&row->pool_moving, s, memory_order_release);
    /* odd before the move's stores: a recover that sees one of them sees odd */
    atomic_thread_fence(memory_order_release);
    /* and before the load below in program order (the CPU may still reorder
     * them: a recover's membarrier makes up for that, see quiet_walk) */
    atomic_signal_fence(memory_order_seq_cst);
    const struct memd_mempool *mp = pool_at(base, g->pool);
    uint64_t w = atomic_load_explicit(&mp->recovering, memory_order_relaxed);
    /* the tag shares recovering's line: a damaged header stops every get and put
     * (its memzone may be freed, its caches' tags out of the free's reach) */
    if (unlikely(atomic_load_explicit(&mp->tag, memory_order_relaxed) != g->tag)) {
        atomic_store_explicit(&row->pool_moving, s + 1, memory_order_release);
        return MOVE_STALE;
    }
    if (unlikely(w != 0) && recover_holds(base, g, w)) {
        atomic_store_explicit(&row->pool_moving, s + 1, memory_order_release);
        return MOVE_BUSY;
    }
    return s + 1;
}

/* Close it: even again, after the move's stores. */
static inline __attribute__((always_inline)) void move_end(const struct memd_mempool_geometry *g,
                                                           uint64_t even)
{
    atomic_store_explicit(&g->row->pool_moving, even, memory_order_release);
}

int memd_mempool_get_bulk(char *base, const struct memd_mempool_geometry *g, uint32_t slot,
                          uint64_t *handles, unsigned n)
{
    const uint64_t m = move_begin(base, g);
    if (unlikely(m <= MOVE_STALE))
        return m == MOVE_BUSY ? -EBUSY : -ESTALE;
    int rc = get_bulk(base, g, slot, handles, n);
    move_end(g, m);
    return rc;
}

int memd_mempool_put_bulk(char *base, const struct memd_mempool_geometry *g, uint32_t slot,
                          const uint64_t *handles, unsigned n)
{
    const uint64_t m = move_begin(base, g);
    if (unlikely(m <= MOVE_STALE))
        return m == MOVE_BUSY ? -EBUSY : -ESTALE;
    int rc = put_bulk(base, g, slot, handles, n);
    move_end(g, m);
    return rc;
}

int memd_mempool_flush_cache(char *base, const struct memd_mempool_geometry *g, uint32_t slot)
{
    const uint64_t m = move_begin(base, g);
    if (unlikely(m <= MOVE_STALE))
        return m == MOVE_BUSY ? -EBUSY : -ESTALE;
    int rc = flush_cache(base, g, slot);
    move_end(g, m);
    return rc;
}

/* --- owner tags ------------------------------------------------------------ */

static inline struct memd_mempool_objhdr *
objhdr_at(char *base, const struct memd_mempool_geometry *g, uint32_t i)
{
    return (struct memd_mempool_objhdr *)(base + g->pool + g->objs_offset +
                                          (uint64_t)i * g->obj_stride);
}

uint64_t memd_mempool_held_by(char *base, const struct memd_mempool_geometry *g, int32_t pid)
{
    uint64_t count = 0;
    for (uint32_t i = 0; i < g->n; i++) {
        const struct memd_mempool_objhdr *h = objhdr_at(base, g, i);
        count += h->cookie == MEMD_MEMPOOL_HDR_COOKIE_BUSY && h->owner_pid == pid;
    }
    return count;
}

int64_t memd_mempool_holders(char *base, const struct memd_mempool_geometry *g, int32_t *pids,
                             uint64_t *counts, uint32_t cap)
{
    uint32_t k = 0, last = 0;
    for (uint32_t i = 0; i < g->n; i++) {
        const struct memd_mempool_objhdr *h = objhdr_at(base, g, i);
        if (h->cookie != MEMD_MEMPOOL_HDR_COOKIE_BUSY)
            continue;
        int32_t pid = h->owner_pid;
        /* runs of one getter are the common case: try the last one first */
        uint32_t j = last < k && pids[last] == pid ? last : 0;
        while (j < k && pids[j] != pid)
            j++;
        if (j == k) {
            if (k == cap)
                return -ENOSPC;
            pids[k] = pid;
            counts[k++] = 0;
        }
        counts[j]++;
        last = j;
    }
    return k;
}

int memd_mempool_busy_at(char *base, const struct memd_mempool_geometry *g, uint32_t i,
                         uint64_t *handle, int32_t *pid)
{
    if (i >= g->n)
        return -EINVAL;
    const struct memd_mempool_objhdr *h = objhdr_at(base, g, i);
    *handle = (uint64_t)((const char *)(h + 1) - base);
    *pid = h->owner_pid;
    return h->cookie == MEMD_MEMPOOL_HDR_COOKIE_BUSY;
}

/* Put back handles[0..k) straight to the ring; if the batch is refused (one of
 * them was put meanwhile by someone else: the caller was wrong that the dead
 * process's objects are not shared), put them one by one and count those that
 * went back.  -EFAULT if the ring overflows (corruption).  A busy ring stops it
 * early (*busy = 1): those not counted are still held. */
static int64_t put_back(char *base, const struct memd_mempool_geometry *g, const uint64_t *handles,
                        unsigned k, int32_t pid, int *busy)
{
    int rc = memd_mempool_put_bulk(base, g, MEMD_MEMPOOL_NO_CACHE, handles, k);
    if (rc == 0)
        return k;
    if (rc == -EFAULT)
        return rc;
    int64_t done = 0;
    for (unsigned i = 0; i < k && rc != -EBUSY; i++) {
        rc = memd_mempool_put_bulk(base, g, MEMD_MEMPOOL_NO_CACHE, &handles[i], 1);
        if (rc == -EFAULT)
            return rc;
        done += rc == 0;
    }
    if (rc == -EBUSY) {
        *busy = 1;
        /* A put that fails gives the objects it claimed back BUSY as the caller's
         * own: tag them as the dead process's again, or the next call (which looks
         * for its tag) would leave them to us for good. */
        const int32_t self = (int32_t)memd_self_pid();
        for (unsigned i = 0; i < k; i++) {
            struct memd_mempool_objhdr *h =
                (struct memd_mempool_objhdr *)(base + handles[i] - OBJHDR_SIZE);
            int32_t o = self;
            if (__atomic_load_n(&h->cookie, __ATOMIC_RELAXED) == MEMD_MEMPOOL_HDR_COOKIE_BUSY)
                __atomic_compare_exchange_n(&h->owner_pid, &o, pid, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED);
        }
    }
    return done;
}

int64_t memd_mempool_reclaim_held_by(char *base, const struct memd_mempool_geometry *g, int32_t pid,
                                     int *busy)
{
    *busy = 0;
    if (pid <= 0)
        return -EINVAL;
    /* Never take objects from under a live process (a zombie is dead). */
    if (memd_process_alive((pid_t)pid, 0, 0))
        return -EBUSY;
    uint64_t batch[64];
    unsigned k = 0;
    int64_t total = 0;
    for (uint32_t i = 0; i < g->n; i++) {
        struct memd_mempool_objhdr *h = objhdr_at(base, g, i);
        if (h->cookie != MEMD_MEMPOOL_HDR_COOKIE_BUSY || h->owner_pid != pid)
            continue;
        batch[k++] = (uint64_t)((char *)(h + 1) - base);
        if (k == sizeof(batch) / sizeof(batch[0])) {
            int64_t rc = put_back(base, g, batch, k, pid, busy);
            if (rc < 0)
                return rc;
            total += rc;
            k = 0;
            if (*busy)
                return total;
        }
    }
    if (k) {
        int64_t rc = put_back(base, g, batch, k, pid, busy);
        if (rc < 0)
            return rc;
        total += rc;
    }
    return total;
}

uint32_t memd_mempool_cache_count(const char *base, const struct memd_mempool_geometry *g,
                                  uint32_t slot)
{
    struct memd_mempool_cache *c = cache_of(base, g, slot);
    /* relaxed: a count, not a hand-over of objects. */
    return c ? atomic_load_explicit(&c->len, memory_order_relaxed) : 0;
}

uint64_t memd_mempool_avail_count(const char *base, const struct memd_mempool_geometry *g)
{
    uint64_t count = memd_ring_count(ring_of(base, g), g->ring);
    if (g->cache_size) {
        for (uint32_t s = 0; s < MEMD_MAX_PROCS; s++)
            count += memd_mempool_cache_count(base, g, s);
    }
    /* Objects moving between a cache and the ring may be counted twice (and a
     * smashed len, many times). */
    return count > g->n ? g->n : count;
}

/* --- audit ---------------------------------------------------------------- */

static int fault(struct memd_mempool_audit *a, uint32_t what, int64_t where)
{
    a->fault = what;
    a->where = where;
    return -EFAULT;
}

/* Account for one handle found in the ring (slot -1) or a cache. */
static int audit_entry(char *base, const struct memd_mempool_geometry *g, uint64_t handle,
                       uint8_t *seen, struct memd_mempool_audit *a, int64_t slot)
{
    struct memd_mempool_objhdr *h = memd_mempool_objhdr_of(base, g, handle);
    if (h == NULL)
        return fault(a, MEMD_MP_BAD_ENTRY, slot);
    if (h->cookie != MEMD_MEMPOOL_HDR_COOKIE_FREE)
        return fault(a,
                     h->cookie == MEMD_MEMPOOL_HDR_COOKIE_BUSY ? MEMD_MP_BUSY_IN_FREE
                                                               : MEMD_MP_BAD_OBJ_COOKIE,
                     h->index);
    if (seen[h->index / 8] & (1u << (h->index % 8)))
        return fault(a, MEMD_MP_DUPLICATE, h->index);
    seen[h->index / 8] |= (uint8_t)(1u << (h->index % 8));
    return 0;
}

static int audit_walk(char *base, const struct memd_mempool_geometry *g,
                      struct memd_mempool_audit *a, uint8_t *seen)
{
    const uint64_t pool = g->pool;
    uint64_t handle = pool + g->objs_offset + OBJHDR_SIZE;
    for (uint32_t i = 0; i < g->n; i++, handle += g->obj_stride) {
        struct memd_mempool_objhdr *h = (struct memd_mempool_objhdr *)(base + handle - OBJHDR_SIZE);
        if (h->pool_offset != pool || h->index != i)
            return fault(a, MEMD_MP_BAD_OBJ_HEADER, i);
        if (h->cookie == MEMD_MEMPOOL_HDR_COOKIE_FREE)
            a->free_objs++;
        else if (h->cookie == MEMD_MEMPOOL_HDR_COOKIE_BUSY)
            a->busy_objs++;
        else
            return fault(a, MEMD_MP_BAD_OBJ_COOKIE, i);
        if (*trailer_of(base, g, handle) != MEMD_MEMPOOL_TRAILER_COOKIE)
            return fault(a, MEMD_MP_BAD_TRAILER, i);
    }

    struct memd_ring *r = ring_of(base, g);
    if (memd_ring_check(r, g->memsize - g->ring_offset) < 0 || r->size != g->ring.size ||
        r->capacity != g->n || r->esize != MEMD_RING_ESIZE_U64)
        return fault(a, MEMD_MP_BAD_RING, -1);
    /* acquire: as memd_ring_count; quiescent, so head == tail on each side. */
    uint32_t cons = atomic_load_explicit(&r->cons.tail, memory_order_acquire);
    uint32_t prod = atomic_load_explicit(&r->prod.tail, memory_order_acquire);
    if (prod - cons > g->ring.capacity)
        return fault(a, MEMD_MP_BAD_RING, -1);
    for (uint32_t k = cons; k != prod; k++) {
        a->in_ring++;
        if (audit_entry(base, g, r->slots[k & (g->ring.size - 1)], seen, a, -1) < 0)
            return -EFAULT;
    }

    for (uint32_t s = 0; g->cache_size && s < MEMD_MAX_PROCS; s++) {
        struct memd_mempool_cache *c = cache_of(base, g, s);
        uint32_t len = atomic_load_explicit(&c->len, memory_order_relaxed);
        if (len > 2u * g->cache_size)
            return fault(a, MEMD_MP_BAD_CACHE, s);
        for (uint32_t k = 0; k < len; k++) {
            a->in_caches++;
            if (audit_entry(base, g, c->objs[k], seen, a, s) < 0)
                return -EFAULT;
        }
    }
    if (a->in_ring + a->in_caches != a->free_objs)
        return fault(a, MEMD_MP_LOST, -1);
    return 0;
}

/* --- a quiet look at a pool while others move objects ------------------------ */

/* The walk may start: no row that could be moving objects of g's pool is odd.
 * With the barrier taken, only rows odd *in this pool* count (a registered mover
 * that starts a move here from now on sees `recovering` and backs off); without
 * it, or for a process that takes no barriers, any odd row. */
static int rows_quiet(const struct memd_config *c, const struct memd_mempool_geometry *g,
                      int barrier, uint64_t *snap, uint32_t *odd_pid)
{
    for (uint32_t r = 0; r < MEMD_MAX_PROCS; r++) {
        const struct memd_proc_pins *row = &c->pins[r];
        if (row == g->row)
            continue;
        uint64_t v = atomic_load_explicit(&row->pool_moving, memory_order_acquire);
        snap[r] = v;
        if (!(v & 1u))
            continue;
        if (barrier && atomic_load_explicit(&row->pool_barrier, memory_order_relaxed) &&
            atomic_load_explicit(&row->pool_moving_at, memory_order_relaxed) != g->pool)
            continue;
        /* a free slot's row (scribbled) or a dead process's moves nothing: what it
         * left in flight is what we look for */
        const int32_t pid = c->procs[r].pid;
        if (pid <= 0 || !memd_process_alive(pid, c->procs[r].start_time, UINT64_MAX))
            continue;
        *odd_pid = (uint32_t)pid;
        return 0;
    }
    return 1;
}

/* After the walk: did a move that the barrier does not cover overlap it? */
static int rows_moved(const struct memd_config *c, const struct memd_mempool_geometry *g,
                      int barrier, const uint64_t *snap)
{
    atomic_thread_fence(memory_order_acquire); /* the walk's loads before these */
    for (uint32_t r = 0; r < MEMD_MAX_PROCS; r++) {
        const struct memd_proc_pins *row = &c->pins[r];
        if (row == g->row ||
            (barrier && atomic_load_explicit(&row->pool_barrier, memory_order_relaxed)))
            continue;
        if (atomic_load_explicit(&row->pool_moving, memory_order_relaxed) != snap[r])
            return 1;
    }
    return 0;
}

/* After a walk that found free objects in no ring or cache: turn `seen` into the
 * set of those (bit i: object i is lost), while the walk can still be trusted. */
static void mark_lost(char *base, const struct memd_mempool_geometry *g, uint8_t *seen)
{
    for (uint32_t i = 0; i < g->n; i++) {
        const struct memd_mempool_objhdr *h = objhdr_at(base, g, i);
        const uint8_t bit = (uint8_t)(1u << (i % 8));
        if (h->cookie == MEMD_MEMPOOL_HDR_COOKIE_FREE && !(seen[i / 8] & bit))
            seen[i / 8] |= bit; /* lost */
        else
            seen[i / 8] &= (uint8_t)~bit;
    }
}

/* May a recover hold g's pool now?  Not while another live one holds it, nor
 * during the pause after a hold (a pid-less word: the movers' turn), unless that
 * pause is further ahead than a pause can be (scribbled, or another clock). */
static int may_hold(const char *base, const struct memd_mempool_geometry *g, uint64_t w)
{
    if (w == 0)
        return 1;
    if (w & ((1u << MEMD_PIN_OWNER_PID_BITS) - 1))
        return !recover_holds(base, g, w);
    const uint64_t until = w >> MEMD_PIN_OWNER_PID_BITS, now = mono_ms();
    return until <= now ||
           until - now > MEMD_MEMPOOL_RECOVER_PAUSE * MEMD_MEMPOOL_RECOVER_HOLD_MS(g->n);
}

/* audit_walk at a moment when no process moves objects of g's pool (see "objects
 * in flight" in memd_layout.h); `cfg` is the config whose rows movers bracket
 * their moves in (NULL: nobody else moves now, the caller promises).  With
 * `lost`, a walk that finds free objects in no ring or cache leaves them marked
 * in `seen` (mark_lost) and *lost = 1.  Returns the walk's result; -EBUSY
 * (*odd_pid: a live process in the middle of a move, 0 if none) if no quiet
 * moment came within the hold, or another live process holds the pool, or the
 * pool is in its pause after a hold.  Our row stays odd in this pool until
 * *row_end is stored back (the caller moves the lost objects first: a second
 * recover waits for that). */
static int64_t quiet_walk(char *base, const struct memd_mempool_geometry *g, const char *cfg,
                          struct memd_mempool_audit *a, uint8_t *seen, uint32_t *odd_pid, int *lost,
                          uint64_t *row_end)
{
    *odd_pid = 0;
    *row_end = 0;
    if (lost != NULL)
        *lost = 0;
    if (cfg == NULL) {
        int64_t rc = audit_walk(base, g, a, seen);
        if (lost != NULL && rc == -EFAULT && a->fault == MEMD_MP_LOST) {
            mark_lost(base, g, seen);
            *lost = 1;
        }
        return rc;
    }
    const struct memd_config *c = (const struct memd_config *)cfg;
    struct memd_mempool *mp = pool_at(base, g->pool);
    struct memd_proc_pins *own = g->row;
    /* our row odd in this pool all along: a second recover waits for us */
    const uint64_t s = atomic_load_explicit(&own->pool_moving, memory_order_relaxed) | 1u;
    atomic_store_explicit(&own->pool_moving_at, g->pool, memory_order_relaxed);
    atomic_store_explicit(&own->pool_moving, s, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    *row_end = s + 1;

    const uint64_t start = mono_ms(), until = start + MEMD_MEMPOOL_RECOVER_HOLD_MS(g->n);
    const uint64_t mine = MEMD_MEMPOOL_RECOVERING(memd_self_pid(), until);
    uint64_t w = atomic_load_explicit(&mp->recovering, memory_order_relaxed);
    if (!may_hold(base, g, w) || !atomic_compare_exchange_strong(&mp->recovering, &w, mine))
        return -EBUSY; /* another recover's, or the movers' turn */
    /* Every registered mover's odd word is seen from here on, and every one of its
     * moves that starts later sees `recovering` (the heavy half of an asymmetric
     * Dekker pair; move_begin is the light half). */
    const int barrier = syscall(__NR_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) == 0;
    uint64_t snap[MEMD_MAX_PROCS];
    uint64_t odd_since = 0;
    int64_t rc = -EBUSY;
    while (mono_ms() < until) {
        if (!rows_quiet(c, g, barrier, snap, odd_pid)) {
            const uint64_t now = mono_ms();
            if (odd_since == 0)
                odd_since = now;
            else if (now - odd_since >= MEMD_MEMPOOL_QUIET_WAIT_MS)
                break; /* stuck mid-move (stopped?): let the pool go */
            sched_yield();
            continue;
        }
        odd_since = 0;
        memset(a, 0, sizeof(*a));
        a->where = -1;
        memset(seen, 0, (g->n + 7u) / 8u);
        int64_t walked = audit_walk(base, g, a, seen);
        const int found_lost = lost != NULL && walked == -EFAULT && a->fault == MEMD_MP_LOST;
        if (found_lost)
            mark_lost(base, g, seen); /* before the check: what the trusted walk saw */
        /* the barrier held moves off only if our word stayed there all along (a
         * mover takes away a hold it finds over) and our hold is not over */
        const int held = barrier &&
                         atomic_load_explicit(&mp->recovering, memory_order_acquire) == mine &&
                         mono_ms() < until;
        if (rows_moved(c, g, held, snap))
            continue;
        *odd_pid = 0;
        if (found_lost)
            *lost = 1;
        rc = walked;
        break;
    }
    /* then the movers' turn: no hold for MEMD_MEMPOOL_RECOVER_PAUSE times as long
     * as this one took, so that recovers in a loop cannot starve them */
    const uint64_t took = mono_ms() - start + 1;
    uint64_t expect = mine;
    atomic_compare_exchange_strong(
        &mp->recovering, &expect,
        MEMD_MEMPOOL_RECOVERING(0, mono_ms() + MEMD_MEMPOOL_RECOVER_PAUSE * took));
    return rc;
}

int64_t memd_mempool_recover(char *base, const struct memd_mempool_geometry *g, const char *cfg,
                             struct memd_mempool_audit *a, uint32_t *odd_pid)
{
    memset(a, 0, sizeof(*a));
    a->where = -1;
    *odd_pid = 0;
    if (!memd_mempool_live(base, g))
        return -ESTALE;
    uint8_t *seen = calloc((g->n + 7u) / 8u, 1);
    if (seen == NULL)
        return -ENOMEM;
    int lost = 0;
    uint64_t row_end;
    int64_t rc = quiet_walk(base, g, cfg, a, seen, odd_pid, &lost, &row_end);
    if (lost) {
        /* Lost: nobody else can reach them, so they stay lost while we put them
         * back, the hold over (our row still says we move in this pool). */
        rc = 0;
        uint64_t handle = g->pool + g->objs_offset + OBJHDR_SIZE;
        for (uint32_t i = 0; i < g->n; i++, handle += g->obj_stride) {
            if (!(seen[i / 8] & (1u << (i % 8))) ||
                objhdr_at(base, g, i)->cookie != MEMD_MEMPOOL_HDR_COOKIE_FREE)
                continue;
            int busy = 0;
            if (memd_ring_enqueue_bulk(ring_of(base, g), g->ring, &handle, 1, NULL, &busy) != 1) {
                if (busy != MEMD_RING_BUSY)
                    rc = fault(a, MEMD_MP_BAD_RING, i);
                else if (rc == 0)
                    rc = -EBUSY; /* the ring's lock: the rest on the next call */
                break;
            }
            rc++;
        }
    }
    if (row_end)
        atomic_store_explicit(&g->row->pool_moving, row_end, memory_order_release);
    free(seen);
    return rc;
}

int memd_mempool_audit(char *base, uint64_t pool, struct memd_proc_pins *row, const char *cfg,
                       struct memd_mempool_audit *a, uint32_t *odd_pid)
{
    memset(a, 0, sizeof(*a));
    a->where = -1;
    *odd_pid = 0;
    struct memd_mempool_geometry g;
    if (memd_mempool_load(base, pool, UINT64_MAX, &g) < 0)
        return fault(a, MEMD_MP_BAD_POOL_HEADER, -1);
    if (row != NULL)
        g.row = row;
    uint8_t *seen = calloc((g.n + 7u) / 8u, 1);
    if (seen == NULL)
        return -ENOMEM;
    uint64_t row_end;
    int rc = (int)quiet_walk(base, &g, cfg, a, seen, odd_pid, NULL, &row_end);
    if (row_end)
        atomic_store_explicit(&g.row->pool_moving, row_end, memory_order_release);
    free(seen);
    return rc;
}

uint64_t memd_mempool_ring_owner(const char *base, const struct memd_mempool_geometry *g, int enq)
{
    const struct memd_ring *r = ring_of(base, g);
    /* relaxed: a name for an error message */
    return atomic_load_explicit(enq ? &r->prod.lock : &r->cons.lock, memory_order_relaxed);
}
