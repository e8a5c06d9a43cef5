/*
 * heap.c - malloc heaps in shared memory (see heap.h; the element layout is the
 * "heap elements" section of memd_layout.h).
 *
 * The shape is o1heap's and DPDK malloc's: elements ordered by offset in one
 * doubly linked list, free elements also on a free list by size class.  alloc
 * takes the best fit in the request's own class (looking at a bounded number of
 * candidates) and otherwise the first fit in a bigger class, which for a plain
 * request is the head of the first non-empty list: O(1) on the fast path.  free
 * joins both neighbours when they are free and physically adjacent: O(1).
 * Adding and removing memory walk the element list: O(elements), rare.
 */
#include "heap.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "heap_internal.h"
#include "heap_journal.h"
#include "lock.h"

#define MAX_REQUEST (1ull << 56) /* no window is this big: such a request is ENOMEM */
/* Alignments up to this hold for the IOVA wherever the address holds them (no
 * page is smaller); candidates for larger ones are checked, this many at most. */
#define MEMD_IOVA_ALIGN_FREE (2ull << 20)
#define IOVA_ALIGN_TRIES     64
#define CONTIG_TRIES         (int)MEMD_MAX_PAGES_PER_LIST /* a page at a time, one list */
#define BEST_FIT_SCAN        16 /* candidates looked at in the request's own class */

/* --- element headers -------------------------------------------------------------- */

/* Header words built in registers (a narrow store then a wide load of the same
 * bytes would stall on store forwarding); the layout is little endian. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "header words assume little endian");

/* Word 0 of a header: cookie, state, heap, flags. */
static inline uint64_t head_word(uint64_t off, uint8_t state, uint8_t heap, uint16_t flags)
{
    return (uint64_t)head_cookie(off) | (uint64_t)state << 32 | (uint64_t)heap << 40 |
           (uint64_t)flags << 48;
}

/* Word 5 of a busy header: owner_pid, serial. */
static inline uint64_t owner_word(int32_t pid, uint32_t serial)
{
    return (uint64_t)(uint32_t)pid | (uint64_t)serial << 32;
}

/* The heap's next allocation serial (never 0).  Between jbegin() and jcommit():
 * alloc_serial is on the counters line jbegin saved. */
static inline uint32_t next_serial(struct memd_heap *h)
{
    uint32_t s = h->alloc_serial + 1;
    s += s == 0;
    h->alloc_serial = s;
    return s;
}

enum hdr_kind {
    HDR_LIVE,  /* a header (or a busy block's data) is there: save its 64 bytes */
    HDR_BUSY,  /* make_free only: the busy header of the block being freed (LIVE) */
    HDR_FRESH, /* free memory, or memory being added: undo clears it */
};

static inline void st64(char *p, uint64_t v) { memcpy(p, &v, 8); }

/* Write a 64-byte header at off, word by word (w0: head_word; w4..w7: the free
 * or busy words).  Built in registers: a header assembled on the stack and copied
 * would stall on store forwarding. */
static inline void put_header(char *base, struct memd_heap *h, uint64_t off, int fresh, uint64_t w0,
                              uint64_t prev, uint64_t next, uint64_t size, uint64_t w4, uint64_t w5,
                              uint64_t w6, uint64_t w7)
{
    char *e = base + off;
    if (fresh)
        jfresh(base, h, off);
    else
        jsave64(base, h, off);
    st64(e, w0);
    st64(e + 8, prev);
    st64(e + 16, next);
    st64(e + 24, size);
    st64(e + 32, w4);
    st64(e + 40, w5);
    st64(e + 48, w6);
    st64(e + 56, w7);
}

/* --- damage found on the way ---------------------------------------------------- */

/*
 * A client's heap operation follows neighbour and free-list links that a scribble
 * past a block can damage.  A link into a hole faults (the operation's guard,
 * GUARDED); one into mapped memory would let the operation write where it must
 * not.  So before an operation writes through a link, it checks the header there:
 * its cookie and that it links back, and the size of a neighbour it joins
 * (EXPECT, jrelink).  All of that is on lines the operation touches anyway.
 * A mismatch leaves through the operation's guard as a fault does: what it
 * changed is undone and the heap is marked broken (-EFAULT, CorruptionError).
 * Outside a guard (the daemon's changes, which check the whole heap first,
 * memd_heap_check) nothing is undone here.
 */
static __attribute__((noinline, cold, noreturn)) void heap_damaged(void)
{
    __builtin_longjmp(*memd_fault_env, 1);
}

/* noreturn, and only under a guard: the compiler keeps what it loaded before a
 * check in registers after it (a call that may return would force reloads) */
#define EXPECT(cond)                                                \
    do {                                                            \
        if (__builtin_expect(!(cond), 0) && memd_fault_env != NULL) \
            heap_damaged();                                         \
    } while (0)

/* Does o hold an element header, by its cookie?  With the link back that each
 * caller checks too, a stray link (or a header smashed by user bytes) is told
 * apart; a link out of the window faults (the guard).  No bounds: read-only. */
static inline int elem_ok(char *base, uint64_t o) { return EL(base, o)->cookie == head_cookie(o); }

/* The element above (below) element `at` in address order is sound and names
 * `at` as its prev (next); none: `at` is the heap's last (first). */
static inline int next_ok(char *base, const struct memd_heap *h, uint64_t at, uint64_t next)
{
    return next ? next > at && elem_ok(base, next) && EL(base, next)->prev == at
                : h->last_elem == at;
}

static inline int prev_ok(char *base, const struct memd_heap *h, uint64_t at, uint64_t prev)
{
    return prev ? prev < at && elem_ok(base, prev) && EL(base, prev)->next == at
                : h->first_elem == at;
}

/* jset of a link that must hold `expect` now (a list neighbour's link back): the
 * check rides on the load jset makes anyway. */
static inline void jrelink(char *base, struct memd_heap *h, uint64_t *p, uint64_t v,
                           uint64_t expect)
{
    EXPECT(*p == expect);
    jset(base, h, p, v);
}

/* --- lists ------------------------------------------------------------------ */

static void fl_remove(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *e = EL(base, off);
    uint64_t p = e->u.free.prev, n = e->u.free.next;
    /* its list neighbours link back to it (else a stray link: damage) */
    if (p) {
        jrelink(base, h, &EL(base, p)->u.free.next, n, off);
    } else {
        unsigned c = size_class(e->size);
        jset(base, h, &h->free_head[c], n);
        if (!n)
            h->list_mask &= ~(1u << c); /* counters line: saved by jbegin */
    }
    if (n)
        jrelink(base, h, &EL(base, n)->u.free.prev, p, off);
}

#define MF_NO_PREV 0x1u /* prev is the caller's (a busy block it links itself) */
#define MF_NO_NEXT 0x2u /* next is the caller's */

/*
 * Make [off, off+size) a free element between elements prev and next (0 = none),
 * with dirty hull [dlo, dhi) (clipped to its data area), joining adjacent free
 * neighbours (unless MF_NO_PREV / MF_NO_NEXT: then that neighbour is not joined
 * or linked).  kind: what is at off now (enum hdr_kind); a busy header joined
 * into prev is zeroed and its bytes count as dirty then.  gone (0 = none): a free
 * element the caller is taking off its list (carve); the new element takes over
 * the list slot of gone or of a joined neighbour in its own size class, which
 * costs fewer stores than leaving one list and joining another.  dcount is added
 * to free_count along with this element's own +1.  Returns the resulting element.
 * Call between jbegin() and jcommit().
 */
static uint64_t make_free(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                          uint64_t prev, uint64_t next, uint64_t dlo, uint64_t dhi,
                          enum hdr_kind kind, int64_t dcount, uint64_t gone, unsigned mf)
{
    int fresh = kind == HDR_FRESH;
    uint64_t jn = 0, jp = 0, busy_hdr = 0;
    dcount++;
    if (!(mf & MF_NO_NEXT) && next && off + size == next &&
        EL(base, next)->state == MEMD_ELEM_FREE) {
        struct memd_heap_elem *n = EL(base, next);
        /* joined: its size, and the element above it, whose prev link we rewrite */
        EXPECT(n->size >= MIN_ELEM && n->size % GRAIN == 0 &&
               (n->next ? n->next >= next + n->size : n->size <= UINT64_MAX - next) &&
               next_ok(base, h, next, n->next));
        jn = next;
        dcount--;
        hull_add(&dlo, &dhi, next, next + HDR);
        hull_add(&dlo, &dhi, n->u.free.dirty_lo, n->u.free.dirty_hi);
        size += n->size;
        next = n->next;
    }
    if (!(mf & MF_NO_PREV) && prev && prev + EL(base, prev)->size == off &&
        EL(base, prev)->state == MEMD_ELEM_FREE) {
        struct memd_heap_elem *p = EL(base, prev);
        /* joined: the element below it, whose next link we rewrite */
        EXPECT(prev_ok(base, h, prev, p->prev));
        jp = prev;
        dcount--;
        if (kind == HDR_BUSY) {
            busy_hdr = off;
            hull_add(&dlo, &dhi, off, off + HDR);
        }
        hull_add(&dlo, &dhi, p->u.free.dirty_lo, p->u.free.dirty_hi);
        size += p->size;
        off = prev;
        prev = p->prev;
        fresh = 0;
    }
    hull_clip(&dlo, &dhi, off + HDR, off + size);
    unsigned c = size_class(size);
    uint64_t keep = 0; /* whose list slot the element takes over */
    if (jp && size_class(EL(base, jp)->size) == c)
        keep = jp; /* == off: the slot is already ours */
    else if (gone && size_class(EL(base, gone)->size) == c)
        keep = gone;
    else if (jn && size_class(EL(base, jn)->size) == c)
        keep = jn;
    if (jn && jn != keep)
        fl_remove(base, h, jn);
    if (jp && jp != keep)
        fl_remove(base, h, jp);
    if (gone && gone != keep)
        fl_remove(base, h, gone);
    if (jn)
        jset(base, h, EL(base, jn), 0); /* cookie, state, heap, flags: data now */
    if (busy_hdr)
        jset(base, h, EL(base, busy_hdr), 0);
    uint64_t fprev = 0, fnext = h->free_head[c];
    if (keep) {
        fprev = EL(base, keep)->u.free.prev; /* read after the removals above */
        fnext = EL(base, keep)->u.free.next;
    }
    put_header(base, h, off, fresh, head_word(off, MEMD_ELEM_FREE, heap_index(base, h), 0), prev,
               next, size, fprev, fnext, dlo, dhi);
    if (keep != off) {
        /* between fprev and fnext, which link to keep (or fnext heads the list) */
        if (fprev)
            jrelink(base, h, &EL(base, fprev)->u.free.next, off, keep);
        else
            jset(base, h, &h->free_head[c], off);
        if (fnext)
            jrelink(base, h, &EL(base, fnext)->u.free.prev, off, keep);
        h->list_mask |= 1u << c;
    }
    if (!(mf & MF_NO_PREV)) {
        if (prev)
            jset(base, h, &EL(base, prev)->next, off);
        else
            jset(base, h, &h->first_elem, off);
    }
    if (!(mf & MF_NO_NEXT)) {
        if (next)
            jset(base, h, &EL(base, next)->prev, off);
        else
            jset(base, h, &h->last_elem, off);
    }
    h->free_count += (uint64_t)dcount;
    return off;
}

/* --- allocation ------------------------------------------------------------- */

/* Can free element f hold the request?  Sets *data to the data offset.  page_mask
 * (0 = any): bit k set accepts memory on pages of 2^k bytes (memzone page-size flags). */
static int can_hold(char *base, uint64_t foff, const struct memd_heap_elem *f, uint64_t size,
                    uint64_t align, uint64_t bound, int contig, uint64_t page_mask, uint64_t *data)
{
    uint64_t lo = foff, hi = foff + f->size;
    uint64_t d = round_up(lo + HDR, align);
    uint64_t body = round_up(size, 8) + TRL;
    /* Each step moves d up; a gap fix makes the gap >= align + 64 for good and a
     * bound fix lands where the block fits its bound, so 5 steps always do (a
     * page-size fix moves to the next memseg list, of which there are few). */
    for (int step = 0; step < 8 + 2 * (int)MEMD_MAX_MEMSEG_LISTS + IOVA_ALIGN_TRIES + CONTIG_TRIES;
         step++) {
        if (d > hi || hi - d < body)
            return 0;
        uint64_t gap = d - HDR - lo;
        if (gap != 0 && gap < MIN_ELEM) {
            d += align;
            continue;
        }
        if (bound && ((d ^ (d + size - 1)) & ~(bound - 1))) {
            d = round_up((d | (bound - 1)) + 1, align);
            continue;
        }
        if (page_mask && !memd_pages_fit(base, d, size, page_mask)) {
            uint64_t next = memd_list_end(base, d); /* try the next list */
            if (next <= d)
                return 0;
            d = round_up(next + HDR, align);
            continue;
        }
        /* Past the page size (PA mode) the IOVA is aligned only where the page's
         * physical address is: try the next aligned positions. */
        if (align > MEMD_IOVA_ALIGN_FREE && !memd_iova_aligned(base, d, align)) {
            d += align;
            continue;
        }
        /* Not contiguous from here: a contiguous run may start at a later page. */
        if (contig && !memd_iova_contig(base, d, size)) {
            uint64_t pg = memd_page_size_at(base, d);
            if (pg == 0)
                return 0;
            d = round_up((d / pg + 1) * pg, align);
            continue;
        }
        *data = d;
        return 1;
    }
    return 0;
}

/* Is o, a link just read from a free list, a free element?  A damaged link that
 * points into mapped memory is refused here (a hole faults, see memd_fault_env):
 * one compare on the line the walk loads anyway. */
static inline int free_link_ok(char *base, const struct memd_heap *h, uint64_t o)
{
    return !(o % GRAIN) && o >= MEMD_CONFIG_SIZE && o <= h->last_elem &&
           EL(base, o)->cookie == head_cookie(o) && EL(base, o)->state == MEMD_ELEM_FREE;
}

/* 1 (found: *eoff, *data), 0 (nothing fits) or -EFAULT (a damaged free list: a
 * link to no free element, or more elements than the heap has free: a cycle). */
static int find_suitable(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                         uint64_t bound, int contig, uint64_t page_mask, uint64_t *eoff,
                         uint64_t *data)
{
    uint64_t need = elem_need(size);
    unsigned c = size_class(need);
    uint64_t best = 0, best_d = 0, best_size = UINT64_MAX, resume = 0, d;
    uint64_t left = h->free_count; /* steps: every element is on one list */
    int scanned = 0;

    /* Best fit among the first candidates of the request's own class. */
    for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next) {
        if (scanned++ == BEST_FIT_SCAN) {
            resume = o;
            break;
        }
        if (__builtin_expect(!free_link_ok(base, h, o) || left-- == 0, 0))
            return -EFAULT;
        struct memd_heap_elem *f = EL(base, o);
        if (f->size >= need && f->size < best_size &&
            can_hold(base, o, f, size, align, bound, contig, page_mask, &d)) {
            best = o;
            best_d = d;
            best_size = f->size;
            if (f->size == need)
                break;
        }
    }
    if (best)
        goto found;
    /* First fit in the bigger classes: for a plain request, any element does. */
    uint64_t left_big = left;
    for (uint32_t mask = h->list_mask & ~((2u << c) - 1); mask; mask &= mask - 1)
        for (uint64_t o = h->free_head[__builtin_ctz(mask)]; o; o = EL(base, o)->u.free.next) {
            if (__builtin_expect(!free_link_ok(base, h, o) || left_big-- == 0, 0))
                return -EFAULT;
            if (can_hold(base, o, EL(base, o), size, align, bound, contig, page_mask, &d)) {
                *eoff = o;
                *data = d;
                return 1;
            }
        }
    /* The rest of the own class, before giving up. */
    for (uint64_t o = resume; o; o = EL(base, o)->u.free.next) {
        if (__builtin_expect(!free_link_ok(base, h, o) || left-- == 0, 0))
            return -EFAULT;
        struct memd_heap_elem *f = EL(base, o);
        if (f->size >= need && f->size < best_size &&
            can_hold(base, o, f, size, align, bound, contig, page_mask, &d)) {
            best = o;
            best_d = d;
            best_size = f->size;
        }
    }
    if (!best)
        return 0;
found:
    *eoff = best;
    *data = best_d;
    return 1;
}

/* Carve a busy block with data at d (size bytes) out of free element foff.  Call
 * between jbegin() and jcommit(). */
static void carve(char *base, struct memd_heap *h, uint64_t foff, uint64_t d, uint64_t size,
                  int zero, uint16_t flags)
{
    struct memd_heap_elem *f = EL(base, foff);
    uint64_t hi = foff + f->size, prev = f->prev, next = f->next;
    uint64_t dlo = f->u.free.dirty_lo, dhi = f->u.free.dirty_hi;
    uint64_t boff = d - HDR;
    uint64_t end = round_up(d + round_up(size, 8) + TRL, GRAIN);
    if (hi - end < MIN_ELEM)
        end = hi; /* too small to stand alone: slack in the block */
    int gap = boff > foff, tail = end < hi;
    /* the neighbours whose links we rewrite: the one above always, the one below
     * when a gap is split off */
    EXPECT(hi <= (next ? next : UINT64_MAX) && next_ok(base, h, foff, next));
    EXPECT(!gap || prev_ok(base, h, foff, prev));

    uint64_t w0 = head_word(boff, MEMD_ELEM_BUSY, heap_index(base, h), flags);
    uint64_t w5 = owner_word(memd_self_pid(), next_serial(h));
#define PUT_BLOCK_HEADER(fresh)                                                                  \
    put_header(base, h, boff, fresh, w0, gap ? foff : prev, tail ? end : next, end - boff, size, \
               w5, 0, 0)
    if (gap)
        PUT_BLOCK_HEADER(1); /* fresh: inside foff's data */

    /* The tail and the gap become free elements; foff leaves its list unless one of
     * them takes its slot. */
    uint64_t gone = foff;
    int64_t dcount = -1;
    if (tail) {
        uint64_t lo2 = dlo, hi2 = dhi;
        hull_clip(&lo2, &hi2, end + HDR, hi);
        make_free(base, h, end, hi - end, boff, next, lo2, hi2, HDR_FRESH, dcount, gone,
                  MF_NO_PREV);
        gone = 0;
        dcount = 0;
    }
    if (gap) {
        uint64_t lo2 = dlo, hi2 = dhi;
        hull_clip(&lo2, &hi2, foff + HDR, boff);
        make_free(base, h, foff, boff - foff, prev, boff, lo2, hi2, HDR_LIVE, dcount, gone,
                  MF_NO_NEXT);
        gone = 0;
        dcount = 0;
    }
    if (gone) {
        fl_remove(base, h, foff);
        h->free_count--;
    }
    if (!gap)
        PUT_BLOCK_HEADER(0); /* over foff's, read until here */
#undef PUT_BLOCK_HEADER
    if (!tail) {
        if (next)
            jset(base, h, &EL(base, next)->prev, boff);
        else
            jset(base, h, &h->last_elem, boff);
    }
    jset(base, h, trailer_at(base, d, size), trailer_cookie(d));
    h->alloc_count++;
    h->alloc_size += end - boff;

    if (zero) {
        hull_clip(&dlo, &dhi, d, d + size);
        if (dlo < dhi)
            memset(base + dlo, 0, dhi - dlo); /* data, not heap state: no journal */
    }
}

static int check_request(uint64_t size, uint64_t *align, uint64_t *bound)
{
    if (size == 0 || (*align & (*align - 1)) || (*bound & (*bound - 1)) ||
        (*bound && *bound < size))
        return -EINVAL;
    if (*align > MEMD_MAX_ALIGN)
        return -EINVAL;
    if (size > MAX_REQUEST)
        return -ENOMEM;
    if (*align < MEMD_HEAP_DEFAULT_ALIGN)
        *align = MEMD_HEAP_DEFAULT_ALIGN;
    if (*bound > MAX_REQUEST)
        *bound = 0; /* no window spans such a boundary twice */
    return 0;
}

/* --- surviving a fault ---------------------------------------------------------- */

/* An operation faulted on a link into a hole (see memd_fault_env): undo what it
 * changed (every journaled word was read before it was logged, so the undo touches
 * mapped memory only; guarded anyway) and mark the heap broken. */
static __attribute__((noinline, cold)) int heap_fault(char *base, struct memd_heap *h)
{
    memd_jmp_buf env;
    if (__builtin_setjmp(env) == 0) {
        memd_fault_env = &env;
        memd_heap_journal_undo(base, h);
    }
    memd_fault_env = NULL;
    h->broken = 1;
    return -EFAULT;
}

/* Non-zero while an operation reads the block it was handed, before it changes
 * anything: a fault then returns this (the block is not there), heap intact.
 * volatile: the fault is a jump the compiler does not see, so its stores must
 * not move across the reads they guard. */
static __thread volatile int target_fault_rc __attribute__((tls_model("initial-exec")));

/* Run `call` (an expression of type `type`) under a fault guard: a SIGSEGV or
 * SIGBUS inside it returns -EFAULT from the enclosing function, heap broken (or
 * target_fault_rc, heap intact, for a fault on the block handed in).
 * __builtin_setjmp saves three words (sigsetjmp saves eight and calls into libc:
 * a guard was half the cost the checks add to malloc+free). */
#define GUARDED(type, call)                                         \
    do {                                                            \
        memd_jmp_buf env_;                                          \
        memd_jmp_buf *const saved_ = memd_fault_env;                \
        if (__builtin_expect(__builtin_setjmp(env_), 0)) {          \
            int target_ = target_fault_rc;                          \
            target_fault_rc = 0;                                    \
            memd_fault_env = saved_;                                \
            return (type)(target_ ? target_ : heap_fault(base, h)); \
        }                                                           \
        memd_fault_env = &env_;                                     \
        type r_ = (call);                                           \
        memd_fault_env = saved_;                                    \
        return r_;                                                  \
    } while (0)

static int alloc_op(char *base, struct memd_heap *h, uint64_t size, uint64_t align, uint64_t bound,
                    int contig, uint64_t page_mask, int zero, uint16_t flags, uint64_t *out)
{
    uint64_t foff, d;
    int rc = check_request(size, &align, &bound);
    if (rc < 0)
        return rc;
    rc = find_suitable(base, h, size, align, bound, contig, page_mask, &foff, &d);
    if (rc <= 0)
        return rc == 0 ? -ENOMEM : (h->broken = 1, -EFAULT);
    jbegin(base, h);
    carve(base, h, foff, d, size, zero, flags);
    *out = d;
    return 0;
}

static int alloc_unguarded(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                           uint64_t bound, int contig, int zero, uint64_t *out)
{
    int rc = alloc_op(base, h, size, align, bound, contig, 0, zero, 0, out);
    jcommit(base, h);
    return rc;
}

int memd_heap_alloc_nolock(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                           uint64_t bound, int contig, int zero, uint64_t *out)
{
    GUARDED(int, alloc_unguarded(base, h, size, align, bound, contig, zero, out));
}

static int alloc_flags_unguarded(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                                 uint64_t bound, int contig, uint64_t page_mask, uint16_t flags,
                                 uint64_t *out)
{
    if (flags & ~MEMD_ELEM_F_ALL)
        return -EINVAL;
    int rc = alloc_op(base, h, size, align, bound, contig, page_mask, 0, flags, out);
    jcommit(base, h);
    return rc;
}

int memd_heap_alloc_flags_nolock(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                                 uint64_t bound, int contig, uint64_t page_mask, uint16_t flags,
                                 uint64_t *out)
{
    GUARDED(int, alloc_flags_unguarded(base, h, size, align, bound, contig, page_mask, flags, out));
}

/* Largest data size a block aligned to align (and on pages of page_mask, and
 * iova-contiguous if contig) could have in free element f. */
static uint64_t usable_in(char *base, uint64_t foff, const struct memd_heap_elem *f, uint64_t align,
                          int contig, uint64_t page_mask)
{
    uint64_t lo = foff, hi = foff + f->size, best = 0;
    /* Candidate runs: the whole element, or (page mask, contig) each piece of it
     * that one memseg list and one iova-contiguous run of pages hold. */
    for (uint64_t start = lo; start < hi;) {
        uint64_t end = hi;
        uint64_t lend = memd_list_end(base, start);
        if (page_mask || contig) {
            if (lend > start && lend < end)
                end = lend;
            if (page_mask && !memd_pages_fit(base, start, 1, page_mask)) {
                start = end;
                continue;
            }
            if (contig)
                end = start + memd_iova_contig_len(base, start, end - start);
        }
        uint64_t d = round_up(start + HDR, align);
        if (d - HDR - lo != 0 && d - HDR - lo < MIN_ELEM)
            d = round_up(lo + MIN_ELEM + HDR, align);
        if (d < end && end - d > TRL) {
            uint64_t n = (end - d - TRL) & ~(uint64_t)7;
            if (n > best)
                best = n;
        }
        if (!(page_mask || contig) || end <= start)
            break;
        start = end;
    }
    return best;
}

static int biggest_unguarded(char *base, struct memd_heap *h, uint64_t align, int contig,
                             uint64_t page_mask, uint64_t *size)
{
    if (align & (align - 1) || align > MAX_REQUEST)
        return -EINVAL;
    if (align < MEMD_HEAP_DEFAULT_ALIGN)
        align = MEMD_HEAP_DEFAULT_ALIGN;
    uint64_t best = 0, left = h->free_count;
    for (uint32_t mask = h->list_mask; mask; mask &= mask - 1)
        for (uint64_t o = h->free_head[__builtin_ctz(mask)]; o; o = EL(base, o)->u.free.next) {
            if (!free_link_ok(base, h, o) || left-- == 0) {
                h->broken = 1;
                return -EFAULT;
            }
            uint64_t n = usable_in(base, o, EL(base, o), align, contig, page_mask);
            if (n > best)
                best = n;
        }
    *size = best > MAX_REQUEST ? MAX_REQUEST : best;
    return best ? 0 : -ENOMEM;
}

int memd_heap_biggest_nolock(char *base, struct memd_heap *h, uint64_t align, int contig,
                             uint64_t page_mask, uint64_t *size)
{
    GUARDED(int, biggest_unguarded(base, h, align, contig, page_mask, size));
}

/* --- looking blocks up -------------------------------------------------------- */

/* Is the element at boff a sound busy element of h (trailer not looked at)?
 * 0, -EINVAL (not a busy element of h) or -EFAULT (its header makes no sense). */
/* The end of h's last element: the bound busy_ok checks a size against. */
static inline uint64_t heap_top(char *base, const struct memd_heap *h)
{
    return h->last_elem + EL(base, h->last_elem)->size;
}

/* Reads the header at boff only (and nothing else: see lookup_busy_serial). */
static int busy_ok(char *base, struct memd_heap *h, uint64_t boff, uint64_t top)
{
    struct memd_heap_elem *b = EL(base, boff);
    if (b->cookie != head_cookie(boff) || b->state != MEMD_ELEM_BUSY ||
        b->heap != heap_index(base, h))
        return -EINVAL;
    if (b->size < MIN_ELEM || b->size % GRAIN || b->size > top - boff || b->u.busy.data_size == 0 ||
        b->u.busy.data_size > b->size - HDR - TRL ||
        round_up(b->u.busy.data_size, 8) + TRL > b->size - HDR)
        return -EFAULT;
    return 0;
}

/* Is boff an element of h's list?  A walk: only for a header without its cookie,
 * to tell a live block's smashed header (listed) from a freed one's (joined into
 * a neighbour: not listed).  Follows links only to headers with their cookie. */
static __attribute__((noinline, cold)) int elem_listed(char *base, struct memd_heap *h,
                                                       uint64_t boff)
{
    uint64_t o = h->first_elem;
    while (o && o < boff && elem_ok(base, o)) {
        uint64_t n = EL(base, o)->next;
        if (n <= o)
            return 0;
        o = n;
    }
    return o == boff;
}

/* The busy element whose data is at off, or -EINVAL / -EFAULT.  serial != 0: it
 * must also carry that serial (a Block's), else -ESTALE, as for a block that is
 * no longer busy: the caller's block was freed. */
static int lookup_busy_serial(char *base, struct memd_heap *h, uint64_t off, uint32_t serial,
                              struct memd_heap_elem **out)
{
    int stale = serial ? -ESTALE : -EINVAL;
    if (off % GRAIN || off < HDR || h->first_elem == 0)
        return stale;
    uint64_t boff = off - HDR;
    if (boff < h->first_elem || boff > h->last_elem)
        return stale;
    /* heap state, read first: a fault there is a broken heap, not a stale handle */
    const uint64_t top = heap_top(base, h);
    /* Reading the block itself may fault where its pages were given back (a stale
     * handle's block, freed): that says "not a block", not "heap broken". */
    target_fault_rc = stale;
    int rc = busy_ok(base, h, boff, top);
    int smashed = rc == -EINVAL && serial && !elem_ok(base, boff);
    target_fault_rc = 0;
    if (smashed && elem_listed(base, h, boff))
        return -EINVAL; /* a live block's smashed header, not a freed block */
    if (rc < 0)
        return rc == -EINVAL ? stale : rc;
    struct memd_heap_elem *b = EL(base, boff);
    if (serial && b->u.busy.serial != serial)
        return -ESTALE;
    target_fault_rc = stale;
    int trailer_ok = *trailer_at(base, off, b->u.busy.data_size) == trailer_cookie(off);
    target_fault_rc = 0;
    if (!trailer_ok)
        return -EFAULT;
    *out = b;
    return 0;
}

static inline int lookup_busy(char *base, struct memd_heap *h, uint64_t off,
                              struct memd_heap_elem **out)
{
    return lookup_busy_serial(base, h, off, 0, out);
}

/* Free the busy element at boff (checked by the caller); returns the free element
 * it ended up in.  Call between jbegin() and jcommit(). */
static uint64_t free_elem(char *base, struct memd_heap *h, uint64_t boff)
{
    struct memd_heap_elem *b = EL(base, boff);
    uint64_t size = b->size;
    /* both neighbours are sound and link back: a scribble past the block below
     * (or this one) into a header is caught before free() joins or relinks */
    EXPECT((!b->next || b->next >= boff + size) && next_ok(base, h, boff, b->next));
    EXPECT(prev_ok(base, h, boff, b->prev));
    h->alloc_count--;
    h->alloc_size -= size;
    return make_free(base, h, boff, size, b->prev, b->next, boff + HDR, boff + size, HDR_BUSY, 0, 0,
                     0);
}

static int64_t free_unguarded(char *base, struct memd_heap *h, uint64_t off, uint32_t serial)
{
    struct memd_heap_elem *b;
    int rc = lookup_busy_serial(base, h, off, serial, &b);
    if (rc < 0)
        return rc;
    jbegin(base, h);
    uint64_t fo = free_elem(base, h, off - HDR);
    jcommit(base, h);
    return (int64_t)EL(base, fo)->size;
}

int64_t memd_heap_free_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    GUARDED(int64_t, free_unguarded(base, h, off, 0));
}

int64_t memd_heap_free_serial_nolock(char *base, struct memd_heap *h, uint64_t off, uint32_t serial)
{
    GUARDED(int64_t, free_unguarded(base, h, off, serial));
}

static int64_t block_size_unguarded(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *b;
    int rc = lookup_busy(base, h, off, &b);
    return rc < 0 ? rc : (int64_t)b->u.busy.data_size;
}

int64_t memd_heap_block_size_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    GUARDED(int64_t, block_size_unguarded(base, h, off));
}

static int validate_unguarded(char *base, struct memd_heap *h, uint64_t off, uint32_t serial)
{
    struct memd_heap_elem *b;
    int rc = lookup_busy_serial(base, h, off, serial, &b);
    if (rc < 0)
        return rc;
    /* the links free() would relink, checked as free() checks them: a scribble
     * before the block's start (past the end of the one below) shows here first.
     * Read-only: a link into a hole faults to the same answer, heap untouched. */
    uint64_t boff = off - HDR;
    target_fault_rc = -EBADMSG;
    int links_ok = (!b->next || b->next >= boff + b->size) && next_ok(base, h, boff, b->next) &&
                   prev_ok(base, h, boff, b->prev);
    target_fault_rc = 0;
    if (!links_ok)
        return -EBADMSG;
    /* zero in every busy header (put_header): the 16 bytes just before the data,
     * where an 8- or 16-byte underflow lands */
    return b->u.busy.reserved[0] | b->u.busy.reserved[1] ? -EINVAL : 0;
}

int memd_heap_validate_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    GUARDED(int, validate_unguarded(base, h, off, 0));
}

int memd_heap_validate_serial_nolock(char *base, struct memd_heap *h, uint64_t off, uint32_t serial)
{
    GUARDED(int, validate_unguarded(base, h, off, serial));
}

/* --- realloc ------------------------------------------------------------------ */

/* Give the tail of busy element boff from new_end on back as free space. */
static void shrink_to(char *base, struct memd_heap *h, uint64_t boff, uint64_t new_end)
{
    struct memd_heap_elem *b = EL(base, boff);
    uint64_t end = boff + b->size;
    if (end - new_end < MIN_ELEM)
        return;
    h->alloc_size -= end - new_end;
    jset(base, h, &b->size, new_end - boff);
    /* the new header lands in the block's data: LIVE, its old bytes are saved */
    make_free(base, h, new_end, end - new_end, boff, b->next, new_end + HDR, end, HDR_LIVE, 0, 0,
              0);
}

/* Grow busy element boff to need bytes into the free element just above it
 * (the caller checked that it is there and big enough). */
static void grow_into_next(char *base, struct memd_heap *h, uint64_t boff, uint64_t need)
{
    struct memd_heap_elem *b = EL(base, boff);
    uint64_t noff = b->next;
    struct memd_heap_elem *n = EL(base, noff);
    uint64_t dlo = n->u.free.dirty_lo, dhi = n->u.free.dirty_hi;
    uint64_t end = noff + n->size, nnext = n->next, t = boff + need;
    EXPECT(elem_ok(base, noff) && n->prev == boff && next_ok(base, h, noff, nnext) &&
           (!nnext || nnext >= end));
    if (end - t >= MIN_ELEM) {
        /* t >= noff + 64 (need > b->size): the tail's header is in n's free data;
         * the tail may take n's list slot */
        h->alloc_size += need - b->size;
        jset(base, h, &b->size, need);
        hull_clip(&dlo, &dhi, t + HDR, end);
        make_free(base, h, t, end - t, boff, nnext, dlo, dhi, HDR_FRESH, -1, noff, 0);
    } else {
        fl_remove(base, h, noff);
        h->alloc_size += end - boff - b->size;
        jset(base, h, &b->size, end - boff);
        jset(base, h, &b->next, nnext);
        if (nnext)
            jset(base, h, &EL(base, nnext)->prev, boff);
        else
            jset(base, h, &h->last_elem, boff);
        h->free_count--;
    }
    jset(base, h, n, 0); /* its header is data now */
}

static int realloc_op(char *base, struct memd_heap *h, uint64_t off, uint32_t serial, uint64_t size,
                      uint64_t align, uint64_t *out)
{
    struct memd_heap_elem *b;
    uint64_t bound = 0;
    int rc = lookup_busy_serial(base, h, off, serial, &b);
    if (rc < 0 || (rc = check_request(size, &align, &bound)) < 0)
        return rc;
    uint64_t boff = off - HDR, need = elem_need(size);
    if (off % align == 0) {
        jbegin(base, h);
        if (need > b->size && b->next == boff + b->size &&
            EL(base, b->next)->state == MEMD_ELEM_FREE &&
            b->size + EL(base, b->next)->size >= need) {
            grow_into_next(base, h, boff, need);
        } else if (need <= b->size) {
            shrink_to(base, h, boff, boff + need);
        } else {
            goto move;
        }
        jset(base, h, &b->u.busy.data_size, size);
        jset(base, h, &b->u.busy.owner_pid, owner_word(memd_self_pid(), next_serial(h)));
        jset(base, h, trailer_at(base, off, size), trailer_cookie(off));
        *out = off;
        return 0;
    }
move:;
    uint64_t foff, nd, old = b->u.busy.data_size, n = old < size ? old : size;
    uint16_t flags = b->flags;
    int found = find_suitable(base, h, size, align, 0, 0, 0, &foff, &nd);
    if (found <= 0)
        return found == 0 ? -ENOMEM : (h->broken = 1, -EFAULT);
    /* The copy writes bytes of foff that its dirty hull may call clean, and undoing
     * the carve would not clear them: widen the hull first, as an operation of its
     * own that an undo keeps (a wider hull only costs zmalloc some zeroing). */
    struct memd_heap_elem *f = EL(base, foff);
    uint64_t lo = f->u.free.dirty_lo, hi = f->u.free.dirty_hi;
    hull_add(&lo, &hi, nd, nd + n);
    jset(base, h, &f->u.free.dirty_lo, lo);
    jset(base, h, &f->u.free.dirty_hi, hi);
    jcommit(base, h);
    jbegin(base, h);
    carve(base, h, foff, nd, size, 0, flags);
    memcpy(base + nd, base + off, n);
    free_elem(base, h, boff);
    *out = nd;
    return 0;
}

static int realloc_unguarded(char *base, struct memd_heap *h, uint64_t off, uint32_t serial,
                             uint64_t size, uint64_t align, uint64_t *out)
{
    int rc = realloc_op(base, h, off, serial, size, align, out);
    jcommit(base, h);
    return rc;
}

int memd_heap_realloc_nolock(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                             uint64_t align, uint64_t *out)
{
    GUARDED(int, realloc_unguarded(base, h, off, 0, size, align, out));
}

int memd_heap_realloc_serial_nolock(char *base, struct memd_heap *h, uint64_t off, uint32_t serial,
                                    uint64_t size, uint64_t align, uint64_t *out)
{
    GUARDED(int, realloc_unguarded(base, h, off, serial, size, align, out));
}

/* --- memory coming and going ---------------------------------------------------- */

/* The daemon's heap changes (growth, release, reclaim) follow links that any
 * attached process can damage: check the whole heap first (a walk that probes what
 * it follows, heap_check.c), and refuse a broken one instead of faulting. */
static int check_before_change(char *base, struct memd_heap *h)
{
    if (h->broken || memd_heap_check(base, h) == -EFAULT) {
        h->broken = 1;
        return -EFAULT;
    }
    return 0;
}

int memd_heap_add_memory_ex(char *base, struct memd_heap *h, uint64_t off, uint64_t len, int dirty)
{
    if (off % GRAIN || len % GRAIN || len < MIN_ELEM || off < MEMD_CONFIG_SIZE || off + len < off)
        return -EINVAL;
    if (check_before_change(base, h) < 0)
        return -EFAULT;
    uint64_t p = h->last_elem;
    while (p && p >= off)
        p = EL(base, p)->prev;
    if (p && p + EL(base, p)->size > off)
        return -EINVAL;
    uint64_t next = p ? EL(base, p)->next : h->first_elem;
    if (next && next < off + len)
        return -EINVAL;
    jbegin(base, h);
    h->total_size += len;
    /* FRESH: an undo clears the new header's bytes, harmless outside the heap */
    make_free(base, h, off, len, p, next, dirty ? off : 0, dirty ? off + len : 0, HDR_FRESH, 0, 0,
              0);
    jcommit(base, h);
    return 0;
}

int memd_heap_add_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len)
{
    return memd_heap_add_memory_ex(base, h, off, len, 0);
}

/* The pages [*P, *Q) element [lo, hi) could give up, or 0 if none. */
static uint64_t pages_in(uint64_t lo, uint64_t hi, uint64_t pg, uint64_t *P)
{
    uint64_t a = round_up(lo, pg), b = hi & ~(pg - 1);
    if (a != lo && a - lo < MIN_ELEM)
        a += pg;
    if (b != hi && hi - b < MIN_ELEM) {
        if (b < pg)
            return 0;
        b -= pg;
    }
    if (b <= a)
        return 0;
    *P = a;
    return b - a;
}

int memd_heap_find_free_pages(char *base, struct memd_heap *h, uint64_t page_size, uint64_t *off,
                              uint64_t *len)
{
    if (page_size < GRAIN || (page_size & (page_size - 1)))
        return -EINVAL;
    if (check_before_change(base, h) < 0)
        return -EFAULT;
    uint64_t best = 0, best_off = 0, p;
    for (unsigned c = 0; c < NLISTS; c++) {
        if (c + 1 < NLISTS && (1ull << (c + 8)) <= page_size)
            continue; /* every element on list c is smaller than a page */
        for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next) {
            uint64_t n = pages_in(o, o + EL(base, o)->size, page_size, &p);
            if (n > best) {
                best = n;
                best_off = p;
            }
        }
    }
    if (!best)
        return -ENOENT;
    *off = best_off;
    *len = best;
    return 0;
}

int memd_heap_remove_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len)
{
    if (off % GRAIN || len % GRAIN || len == 0 || off + len < off || h->first_elem == 0)
        return -EINVAL;
    if (check_before_change(base, h) < 0)
        return -EFAULT;
    uint64_t f = h->last_elem;
    while (f && f > off)
        f = EL(base, f)->prev;
    if (!f)
        return -EINVAL;
    struct memd_heap_elem *e = EL(base, f);
    uint64_t hi = f + e->size;
    if (e->state != MEMD_ELEM_FREE || off + len > hi)
        return -EINVAL;
    uint64_t lead = off - f, trail = hi - (off + len);
    if ((lead && lead < MIN_ELEM) || (trail && trail < MIN_ELEM))
        return -EINVAL;
    uint64_t prev = e->prev, next = e->next;
    uint64_t dlo = e->u.free.dirty_lo, dhi = e->u.free.dirty_hi, l, r;
    uint64_t gone = f; /* f leaves its list unless a remaining piece takes its slot */
    int64_t dcount = -1;
    jbegin(base, h);
    h->total_size -= len;
    if (trail) {
        /* its header is in f's free data (off + len >= f + 64): FRESH; with a lead,
         * the lead's header (written next) links the two */
        l = dlo, r = dhi;
        hull_clip(&l, &r, off + len + HDR, hi);
        next = make_free(base, h, off + len, trail, lead ? f : prev, next, l, r, HDR_FRESH, dcount,
                         gone, lead ? MF_NO_PREV : 0);
        gone = 0;
        dcount = 0;
    }
    if (lead) {
        l = dlo, r = dhi;
        hull_clip(&l, &r, f + HDR, off);
        make_free(base, h, f, lead, prev, next, l, r, HDR_LIVE, dcount, gone, 0);
        gone = 0;
        dcount = 0;
    }
    if (gone) {
        fl_remove(base, h, f);
        h->free_count--;
        if (prev)
            jset(base, h, &EL(base, prev)->next, next);
        else
            jset(base, h, &h->first_elem, next);
        if (next)
            jset(base, h, &EL(base, next)->prev, prev);
        else
            jset(base, h, &h->last_elem, prev);
    }
    jcommit(base, h);
    return 0;
}

/* --- owners --------------------------------------------------------------------- */

int memd_heap_free_owned_nolock(char *base, struct memd_heap *h, int32_t pid, uint64_t *blocks,
                                uint64_t *bytes, uint64_t *largest)
{
    uint64_t nb = 0, nbytes = 0, big = 0;
    struct walk_guard g = {0};
    if (pid <= 0)
        return -EINVAL;
    if (check_before_change(base, h) < 0)
        return -EFAULT;
    for (uint64_t o = h->first_elem; o;) {
        if (!walk_ok(base, h, &g, o)) {
            h->broken = 1;
            return -EFAULT;
        }
        struct memd_heap_elem *e = EL(base, o);
        if (e->state == MEMD_ELEM_BUSY && !(e->flags & MEMD_ELEM_F_MEMZONE) &&
            e->u.busy.owner_pid == pid && busy_ok(base, h, o, heap_top(base, h)) == 0) {
            /* the owner is gone: a smashed trailer is its own business */
            nb++;
            nbytes += e->size;
            jbegin(base, h);
            uint64_t fo = free_elem(base, h, o);
            jcommit(base, h); /* each block is an operation of its own */
            if (EL(base, fo)->size > big)
                big = EL(base, fo)->size;
            g.prev = fo; /* merged with its free neighbours: go on after them */
            o = EL(base, fo)->next;
            continue;
        }
        o = e->next;
    }
    *blocks = nb;
    *bytes = nbytes;
    if (largest)
        *largest = big;
    return 0;
}

int memd_heap_owners(char *base, struct memd_heap *h, struct memd_heap_owner **out, size_t *n)
{
    size_t cap = 8, cnt = 0;
    struct walk_guard g = {0};
    struct memd_heap_owner *a = malloc(cap * sizeof(*a));
    if (!a)
        return -ENOMEM;
    for (uint64_t o = h->first_elem; o; o = EL(base, o)->next) {
        if (!walk_ok(base, h, &g, o)) {
            free(a);
            h->broken = 1;
            return -EFAULT;
        }
        struct memd_heap_elem *e = EL(base, o);
        if (e->state != MEMD_ELEM_BUSY)
            continue;
        int32_t pid = e->u.busy.owner_pid;
        size_t i = 0;
        while (i < cnt && a[i].pid != pid)
            i++;
        if (i == cnt) {
            if (cnt == cap) {
                struct memd_heap_owner *t = realloc(a, 2 * cap * sizeof(*a));
                if (!t) {
                    free(a);
                    return -ENOMEM;
                }
                a = t;
                cap *= 2;
            }
            memset(&a[cnt], 0, sizeof(*a));
            a[cnt++].pid = pid;
        }
        a[i].blocks++;
        a[i].bytes += e->size;
        if (e->flags & MEMD_ELEM_F_MEMZONE)
            a[i].memzones++;
    }
    *out = a;
    *n = cnt;
    return 0;
}

/* --- init, locking and the (locks) wrappers --------------------------------------- */

int memd_heap_init(char *base, struct memd_heap *h, int socket_id)
{
    memset(h, 0, sizeof(*h));
    memset(journal_of(base, h), 0, sizeof(struct memd_heap_journal));
    h->socket_id = socket_id;
    return memd_lock_init(&h->lock);
}

int memd_heap_lock(struct memd_heap *h) { return memd_lock_acquire(&h->lock); }

void memd_heap_unlock(struct memd_heap *h) { memd_lock_release(&h->lock); }

int memd_heap_lock_done(char *base, struct memd_heap *h, int lock_rc)
{
    if (lock_rc < 0)
        return lock_rc;
    /* The dead owner may have been inside an operation: roll it back, then check.
     * Only a journal that cannot be undone or a failed check breaks the heap. */
    if (__builtin_expect(lock_rc == 1, 0) && !h->broken &&
        (memd_heap_journal_undo(base, h) < 0 || memd_heap_check(base, h) == -EFAULT))
        h->broken = 1;
    if (h->broken) {
        memd_heap_unlock(h);
        return -EFAULT;
    }
    return 0;
}

static int lock_heap(char *base, struct memd_heap *h)
{
    return memd_heap_lock_done(base, h, memd_heap_lock(h));
}

int memd_heap_alloc_flags(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                          uint64_t bound, int contig, uint64_t page_mask, uint16_t flags,
                          uint64_t *out)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    rc = memd_heap_alloc_flags_nolock(base, h, size, align, bound, contig, page_mask, flags, out);
    memd_heap_unlock(h);
    return rc;
}

int64_t memd_heap_free(char *base, struct memd_heap *h, uint64_t off)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    int64_t r = memd_heap_free_nolock(base, h, off);
    memd_heap_unlock(h);
    return r;
}
