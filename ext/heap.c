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

#include "lock.h"

#define HDR ((uint64_t)MEMD_ELEM_HEADER_SIZE)
#define TRL ((uint64_t)MEMD_ELEM_TRAILER_SIZE)
#define MIN_ELEM ((uint64_t)MEMD_ELEM_MIN_SIZE)
#define GRAIN 64u
#define NLISTS MEMD_HEAP_NUM_FREELISTS
#define MAX_REQUEST (1ull << 56) /* no window is this big: such a request is ENOMEM */
#define BEST_FIT_SCAN 16         /* candidates looked at in the request's own class */

_Static_assert(HDR % GRAIN == 0 && MIN_ELEM % GRAIN == 0 && MIN_ELEM >= HDR + GRAIN,
               "element granularity");

__attribute__((weak)) int memd_iova_contig(const char *base, uint64_t off, uint64_t len)
{
    (void)base;
    (void)off;
    (void)len;
    return 1; /* TODO(lead): config.c provides the real one from the memsegs */
}

/* --- small helpers ---------------------------------------------------------- */

static inline struct memd_heap_elem *EL(char *base, uint64_t off)
{
    return (struct memd_heap_elem *)(base + off);
}

static inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

static inline uint32_t head_cookie(uint64_t off)
{
    return MEMD_ELEM_COOKIE ^ (uint32_t)(off >> 6);
}

static inline uint64_t trailer_cookie(uint64_t data) { return MEMD_ELEM_TRAILER_COOKIE ^ data; }

static inline uint64_t *trailer_at(char *base, uint64_t data, uint64_t data_size)
{
    return (uint64_t *)(base + data + round_up(data_size, 8));
}

/* Smallest element holding data_size bytes with the default alignment. */
static inline uint64_t elem_need(uint64_t data_size)
{
    return round_up(HDR + round_up(data_size, 8) + TRL, GRAIN);
}

static inline unsigned size_class(uint64_t size)
{
    unsigned lg = 63u - (unsigned)__builtin_clzll(size | MIN_ELEM);
    unsigned c = lg - 7u;
    return c < NLISTS ? c : NLISTS - 1;
}

static inline uint8_t heap_index(char *base, struct memd_heap *h)
{
    return (uint8_t)(((char *)h - base - offsetof(struct memd_config, heaps)) /
                     sizeof(struct memd_heap));
}

/* Dirty hulls: [lo, hi) with lo >= hi meaning empty (stored as 0, 0). */
static inline void hull_add(uint64_t *lo, uint64_t *hi, uint64_t a, uint64_t b)
{
    if (a >= b)
        return;
    if (*lo >= *hi) {
        *lo = a;
        *hi = b;
        return;
    }
    if (a < *lo)
        *lo = a;
    if (b > *hi)
        *hi = b;
}

static inline void hull_clip(uint64_t *lo, uint64_t *hi, uint64_t a, uint64_t b)
{
    uint64_t l = *lo > a ? *lo : a, r = *hi < b ? *hi : b;
    if (l >= r)
        l = r = 0;
    *lo = l;
    *hi = r;
}

/* --- lists ------------------------------------------------------------------ */

static void fl_insert(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *e = EL(base, off);
    unsigned c = size_class(e->size);
    uint64_t head = h->free_head[c];
    e->u.free.prev = 0;
    e->u.free.next = head;
    if (head)
        EL(base, head)->u.free.prev = off;
    h->free_head[c] = off;
    h->list_mask |= 1u << c;
}

static void fl_remove(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *e = EL(base, off);
    uint64_t p = e->u.free.prev, n = e->u.free.next;
    if (p) {
        EL(base, p)->u.free.next = n;
    } else {
        unsigned c = size_class(e->size);
        h->free_head[c] = n;
        if (!n)
            h->list_mask &= ~(1u << c);
    }
    if (n)
        EL(base, n)->u.free.prev = p;
}

/* Put element off between prev and next in the element list. */
static void link_elem(char *base, struct memd_heap *h, uint64_t off, uint64_t prev, uint64_t next)
{
    struct memd_heap_elem *e = EL(base, off);
    e->prev = prev;
    e->next = next;
    if (prev)
        EL(base, prev)->next = off;
    else
        h->first_elem = off;
    if (next)
        EL(base, next)->prev = off;
    else
        h->last_elem = off;
}

/*
 * Make [off, off+size) a free element between elements prev and next (0 = none),
 * with dirty hull [dlo, dhi) (clipped to its data area), joining adjacent free neighbours.  has_header: a
 * header already sits at off (a freed block); it is zeroed if off is joined into
 * prev, and its bytes count as dirty then.  Returns the resulting element.
 */
static uint64_t make_free(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                          uint64_t prev, uint64_t next, uint64_t dlo, uint64_t dhi,
                          int has_header)
{
    if (next && off + size == next && EL(base, next)->state == MEMD_ELEM_FREE) {
        struct memd_heap_elem *n = EL(base, next);
        fl_remove(base, h, next);
        h->free_count--;
        hull_add(&dlo, &dhi, next, next + HDR);
        hull_add(&dlo, &dhi, n->u.free.dirty_lo, n->u.free.dirty_hi);
        size += n->size;
        next = n->next;
        n->cookie = 0;
        n->state = 0;
    }
    if (prev && prev + EL(base, prev)->size == off && EL(base, prev)->state == MEMD_ELEM_FREE) {
        struct memd_heap_elem *p = EL(base, prev);
        fl_remove(base, h, prev);
        h->free_count--;
        if (has_header) {
            EL(base, off)->cookie = 0;
            EL(base, off)->state = 0;
            hull_add(&dlo, &dhi, off, off + HDR);
        }
        hull_add(&dlo, &dhi, p->u.free.dirty_lo, p->u.free.dirty_hi);
        size += p->size;
        off = prev;
        prev = p->prev;
    }
    struct memd_heap_elem *e = EL(base, off);
    e->cookie = head_cookie(off);
    e->state = MEMD_ELEM_FREE;
    e->heap = heap_index(base, h);
    e->flags = 0;
    e->size = size;
    hull_clip(&dlo, &dhi, off + HDR, off + size);
    e->u.free.dirty_lo = dlo;
    e->u.free.dirty_hi = dhi;
    link_elem(base, h, off, prev, next);
    fl_insert(base, h, off);
    h->free_count++;
    return off;
}

/* --- allocation ------------------------------------------------------------- */

/* Can free element f hold the request?  Sets *data to the data offset. */
static int can_hold(char *base, uint64_t foff, const struct memd_heap_elem *f, uint64_t size,
                    uint64_t align, uint64_t bound, int contig, uint64_t *data)
{
    uint64_t lo = foff, hi = foff + f->size;
    uint64_t d = round_up(lo + HDR, align);
    uint64_t body = round_up(size, 8) + TRL;
    /* Each step moves d up; a gap fix makes the gap >= align + 64 for good and a
     * bound fix lands where the block fits its bound, so 5 steps always do. */
    for (int step = 0; step < 8; step++) {
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
        /* TODO: on a non-contiguous candidate, try later positions (next page). */
        if (contig && !memd_iova_contig(base, d, size))
            return 0;
        *data = d;
        return 1;
    }
    return 0;
}

static int find_suitable(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                         uint64_t bound, int contig, uint64_t *eoff, uint64_t *data)
{
    uint64_t need = elem_need(size);
    unsigned c = size_class(need);
    uint64_t best = 0, best_d = 0, best_size = UINT64_MAX, resume = 0, d;
    int scanned = 0;

    /* Best fit among the first candidates of the request's own class. */
    for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next) {
        if (scanned++ == BEST_FIT_SCAN) {
            resume = o;
            break;
        }
        struct memd_heap_elem *f = EL(base, o);
        if (f->size >= need && f->size < best_size &&
            can_hold(base, o, f, size, align, bound, contig, &d)) {
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
    for (uint32_t mask = h->list_mask & ~((2u << c) - 1); mask; mask &= mask - 1)
        for (uint64_t o = h->free_head[__builtin_ctz(mask)]; o; o = EL(base, o)->u.free.next)
            if (can_hold(base, o, EL(base, o), size, align, bound, contig, &d)) {
                *eoff = o;
                *data = d;
                return 1;
            }
    /* The rest of the own class, before giving up. */
    for (uint64_t o = resume; o; o = EL(base, o)->u.free.next) {
        struct memd_heap_elem *f = EL(base, o);
        if (f->size >= need && f->size < best_size &&
            can_hold(base, o, f, size, align, bound, contig, &d)) {
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

/* Carve a busy block with data at d (size bytes) out of free element foff. */
static void carve(char *base, struct memd_heap *h, uint64_t foff, uint64_t d, uint64_t size,
                  int zero)
{
    struct memd_heap_elem *f = EL(base, foff);
    uint64_t hi = foff + f->size, prev = f->prev, next = f->next;
    uint64_t dlo = f->u.free.dirty_lo, dhi = f->u.free.dirty_hi;
    uint64_t boff = d - HDR;
    uint64_t end = round_up(d + round_up(size, 8) + TRL, GRAIN);

    fl_remove(base, h, foff);
    h->free_count--;
    if (hi - end < MIN_ELEM)
        end = hi; /* too small to stand alone: slack in the block */

    struct memd_heap_elem *b = EL(base, boff);
    b->cookie = head_cookie(boff);
    b->state = MEMD_ELEM_BUSY;
    b->heap = heap_index(base, h);
    b->flags = 0;
    b->size = end - boff;
    b->u.busy.data_size = size;
    b->u.busy.reserved[0] = b->u.busy.reserved[1] = b->u.busy.reserved[2] = 0;
    link_elem(base, h, boff, prev, next);
    if (end < hi) {
        uint64_t lo2 = dlo, hi2 = dhi;
        hull_clip(&lo2, &hi2, end + HDR, hi);
        make_free(base, h, end, hi - end, boff, next, lo2, hi2, 0);
    }
    if (boff > foff) {
        uint64_t lo2 = dlo, hi2 = dhi;
        hull_clip(&lo2, &hi2, foff + HDR, boff);
        make_free(base, h, foff, boff - foff, prev, boff, lo2, hi2, 0);
    }
    *trailer_at(base, d, size) = trailer_cookie(d);
    h->alloc_count++;
    h->alloc_size += b->size;

    if (zero) {
        hull_clip(&dlo, &dhi, d, d + size);
        if (dlo < dhi)
            memset(base + dlo, 0, dhi - dlo);
    }
}

static int check_request(uint64_t size, uint64_t *align, uint64_t *bound)
{
    if (size == 0 || (*align & (*align - 1)) || (*bound & (*bound - 1)) ||
        (*bound && *bound < size))
        return -EINVAL;
    if (size > MAX_REQUEST || *align > MAX_REQUEST)
        return -ENOMEM;
    if (*align < MEMD_HEAP_DEFAULT_ALIGN)
        *align = MEMD_HEAP_DEFAULT_ALIGN;
    if (*bound > MAX_REQUEST)
        *bound = 0; /* no window spans such a boundary twice */
    return 0;
}

int memd_heap_alloc_nolock(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                           uint64_t bound, int contig, int zero, uint64_t *out)
{
    uint64_t foff, d;
    int rc = check_request(size, &align, &bound);
    if (rc < 0)
        return rc;
    if (!find_suitable(base, h, size, align, bound, contig, &foff, &d))
        return -ENOMEM;
    carve(base, h, foff, d, size, zero);
    *out = d;
    return 0;
}

/* --- looking blocks up -------------------------------------------------------- */

/* The busy element whose data is at off, or -EINVAL / -EFAULT. */
static int lookup_busy(char *base, struct memd_heap *h, uint64_t off, struct memd_heap_elem **out)
{
    if (off % GRAIN || off < HDR || h->first_elem == 0)
        return -EINVAL;
    uint64_t boff = off - HDR;
    if (boff < h->first_elem || boff > h->last_elem)
        return -EINVAL;
    struct memd_heap_elem *b = EL(base, boff);
    if (b->cookie != head_cookie(boff) || b->state != MEMD_ELEM_BUSY ||
        b->heap != heap_index(base, h))
        return -EINVAL;
    uint64_t top = h->last_elem + EL(base, h->last_elem)->size;
    if (b->size < MIN_ELEM || b->size % GRAIN || b->size > top - boff ||
        b->u.busy.data_size == 0 || b->u.busy.data_size > b->size - HDR - TRL ||
        round_up(b->u.busy.data_size, 8) + TRL > b->size - HDR)
        return -EFAULT;
    if (*trailer_at(base, off, b->u.busy.data_size) != trailer_cookie(off))
        return -EFAULT;
    *out = b;
    return 0;
}

int64_t memd_heap_free_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *b;
    int rc = lookup_busy(base, h, off, &b);
    if (rc < 0)
        return rc;
    uint64_t boff = off - HDR, size = b->size;
    h->alloc_count--;
    h->alloc_size -= size;
    b->state = MEMD_ELEM_FREE;
    uint64_t fo = make_free(base, h, boff, size, b->prev, b->next, off, boff + size, 1);
    return (int64_t)EL(base, fo)->size;
}

int64_t memd_heap_block_size_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *b;
    int rc = lookup_busy(base, h, off, &b);
    return rc < 0 ? rc : (int64_t)b->u.busy.data_size;
}

int memd_heap_validate_nolock(char *base, struct memd_heap *h, uint64_t off)
{
    struct memd_heap_elem *b;
    return lookup_busy(base, h, off, &b);
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
    b->size = new_end - boff;
    make_free(base, h, new_end, end - new_end, boff, b->next, new_end + HDR, end, 0);
}

int memd_heap_realloc_nolock(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                             uint64_t align, uint64_t *out)
{
    struct memd_heap_elem *b;
    uint64_t bound = 0;
    int rc = lookup_busy(base, h, off, &b);
    if (rc < 0 || (rc = check_request(size, &align, &bound)) < 0)
        return rc;
    uint64_t boff = off - HDR, need = elem_need(size);
    if (off % align == 0) {
        if (need > b->size && b->next == boff + b->size &&
            EL(base, b->next)->state == MEMD_ELEM_FREE &&
            b->size + EL(base, b->next)->size >= need) {
            /* Grow into the free element above. */
            uint64_t noff = b->next;
            struct memd_heap_elem *n = EL(base, noff);
            fl_remove(base, h, noff);
            h->free_count--;
            uint64_t dlo = n->u.free.dirty_lo, dhi = n->u.free.dirty_hi;
            uint64_t nsize = n->size, nnext = n->next;
            n->cookie = 0;
            n->state = 0;
            h->alloc_size += nsize;
            b->size += nsize;
            link_elem(base, h, boff, b->prev, nnext);
            uint64_t end = boff + b->size;
            if (end - (boff + need) >= MIN_ELEM) {
                uint64_t t = boff + need;
                h->alloc_size -= end - t;
                b->size = need;
                hull_clip(&dlo, &dhi, t + HDR, end);
                make_free(base, h, t, end - t, boff, nnext, dlo, dhi, 0);
            }
        } else if (need <= b->size) {
            shrink_to(base, h, boff, boff + need);
        } else {
            goto move;
        }
        b->u.busy.data_size = size;
        *trailer_at(base, off, size) = trailer_cookie(off);
        *out = off;
        return 0;
    }
move:;
    uint64_t nd, old = b->u.busy.data_size;
    if ((rc = memd_heap_alloc_nolock(base, h, size, align, 0, 0, 0, &nd)) < 0)
        return rc;
    memcpy(base + nd, base + off, old < size ? old : size);
    memd_heap_free_nolock(base, h, off);
    *out = nd;
    return 0;
}

/* --- memory coming and going ---------------------------------------------------- */

int memd_heap_add_memory_ex(char *base, struct memd_heap *h, uint64_t off, uint64_t len,
                            int dirty)
{
    if (off % GRAIN || len % GRAIN || len < MIN_ELEM || off < MEMD_CONFIG_SIZE ||
        off + len < off)
        return -EINVAL;
    uint64_t p = h->last_elem;
    while (p && p >= off)
        p = EL(base, p)->prev;
    if (p && p + EL(base, p)->size > off)
        return -EINVAL;
    uint64_t next = p ? EL(base, p)->next : h->first_elem;
    if (next && next < off + len)
        return -EINVAL;
    h->total_size += len;
    make_free(base, h, off, len, p, next, dirty ? off : 0, dirty ? off + len : 0, 0);
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

int memd_heap_find_free_pages(char *base, struct memd_heap *h, uint64_t page_size,
                              uint64_t *off, uint64_t *len)
{
    if (page_size < GRAIN || (page_size & (page_size - 1)))
        return -EINVAL;
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
    fl_remove(base, h, f);
    h->free_count--;
    h->total_size -= len;
    if (trail) {
        l = dlo, r = dhi;
        hull_clip(&l, &r, off + len + HDR, hi);
        next = make_free(base, h, off + len, trail, lead ? f : prev, next, l, r, 0);
    }
    if (lead) {
        l = dlo, r = dhi;
        hull_clip(&l, &r, f + HDR, off);
        make_free(base, h, f, lead, prev, next, l, r, 0);
    }
    if (!lead && !trail) {
        if (prev)
            EL(base, prev)->next = next;
        else
            h->first_elem = next;
        if (next)
            EL(base, next)->prev = prev;
        else
            h->last_elem = prev;
    }
    return 0;
}

/* --- stats, walk, check ------------------------------------------------------- */

void memd_heap_get_stats_nolock(char *base, struct memd_heap *h, struct memd_heap_stats *s)
{
    s->total = h->total_size;
    s->alloc = h->alloc_size;
    s->free = h->total_size - h->alloc_size;
    s->free_count = h->free_count;
    s->alloc_count = h->alloc_count;
    s->greatest_free = 0;
    for (unsigned c = NLISTS; c-- > 0;) {
        for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next)
            if (EL(base, o)->size > s->greatest_free)
                s->greatest_free = EL(base, o)->size;
        if (s->greatest_free)
            break;
    }
}

int memd_heap_walk(char *base, struct memd_heap *h,
                   int (*fn)(void *arg, uint64_t off, uint64_t size, int state,
                             uint64_t data_size),
                   void *arg)
{
    for (uint64_t o = h->first_elem; o; o = EL(base, o)->next) {
        struct memd_heap_elem *e = EL(base, o);
        int rc = fn(arg, o, e->size, e->state,
                    e->state == MEMD_ELEM_BUSY ? e->u.busy.data_size : 0);
        if (rc)
            return rc;
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

#define BAD(...)                                       \
    do {                                               \
        if (why)                                       \
            snprintf(why, n, __VA_ARGS__);             \
        rc = -EFAULT;                                  \
        goto out;                                      \
    } while (0)

int memd_heap_check_ex(char *base, struct memd_heap *h, char *why, size_t n)
{
    uint64_t cap = 64, nfree = 0, nbusy = 0, free_bytes = 0, busy_bytes = 0;
    uint64_t prev = 0, prev_end = 0, listed = 0;
    int prev_free = 0, rc = 0;
    uint8_t idx = heap_index(base, h);
    uint64_t *frees = malloc(cap * sizeof(*frees));
    uint8_t *seen = NULL;
    if (!frees)
        return -ENOMEM;
    if (why && n)
        why[0] = 0;
    if ((h->first_elem == 0) != (h->last_elem == 0))
        BAD("first_elem %#llx / last_elem %#llx: only one is 0",
            (unsigned long long)h->first_elem, (unsigned long long)h->last_elem);

    for (uint64_t o = h->first_elem; o; o = EL(base, o)->next) {
        struct memd_heap_elem *e = EL(base, o);
        if (o % GRAIN || o < MEMD_CONFIG_SIZE || o > h->last_elem || (prev && o < prev_end))
            BAD("element %#llx: misplaced (after %#llx ending at %#llx)",
                (unsigned long long)o, (unsigned long long)prev, (unsigned long long)prev_end);
        if (e->cookie != head_cookie(o))
            BAD("element %#llx: header cookie smashed", (unsigned long long)o);
        if (e->heap != idx)
            BAD("element %#llx: heap %u, expected %u", (unsigned long long)o, e->heap, idx);
        if (e->prev != prev)
            BAD("element %#llx: prev %#llx, expected %#llx", (unsigned long long)o,
                (unsigned long long)e->prev, (unsigned long long)prev);
        if (e->size < MIN_ELEM || e->size % GRAIN || o + e->size < o)
            BAD("element %#llx: bad size %llu", (unsigned long long)o,
                (unsigned long long)e->size);
        if (e->next && e->next < o + e->size)
            BAD("element %#llx: next %#llx overlaps it", (unsigned long long)o,
                (unsigned long long)e->next);
        if (e->next == 0 && o != h->last_elem)
            BAD("element %#llx ends the list but last_elem is %#llx", (unsigned long long)o,
                (unsigned long long)h->last_elem);
        int adjacent = prev && prev_end == o;
        if (e->state == MEMD_ELEM_FREE) {
            if (prev_free && adjacent)
                BAD("elements %#llx and %#llx: adjacent and both free",
                    (unsigned long long)prev, (unsigned long long)o);
            uint64_t lo = e->u.free.dirty_lo, hi = e->u.free.dirty_hi;
            if ((lo || hi) && (lo >= hi || lo < o + HDR || hi > o + e->size))
                BAD("free element %#llx: dirty range [%#llx, %#llx) outside its data",
                    (unsigned long long)o, (unsigned long long)lo, (unsigned long long)hi);
            if (nfree == cap) {
                uint64_t *t = realloc(frees, 2 * cap * sizeof(*frees));
                if (!t) {
                    rc = -ENOMEM;
                    goto out;
                }
                frees = t;
                cap *= 2;
            }
            frees[nfree++] = o;
            free_bytes += e->size;
        } else if (e->state == MEMD_ELEM_BUSY) {
            uint64_t ds = e->u.busy.data_size;
            if (ds == 0 || ds > e->size || round_up(ds, 8) + TRL > e->size - HDR)
                BAD("busy element %#llx: data size %llu does not fit size %llu",
                    (unsigned long long)o, (unsigned long long)ds, (unsigned long long)e->size);
            if (e->size - elem_need(ds) >= MIN_ELEM)
                BAD("busy element %#llx: %llu bytes of slack could be a free element",
                    (unsigned long long)o, (unsigned long long)(e->size - elem_need(ds)));
            if (*trailer_at(base, o + HDR, ds) != trailer_cookie(o + HDR))
                BAD("busy element %#llx: trailer cookie smashed", (unsigned long long)o);
            nbusy++;
            busy_bytes += e->size;
        } else {
            BAD("element %#llx: bad state %u", (unsigned long long)o, e->state);
        }
        prev_free = e->state == MEMD_ELEM_FREE;
        prev = o;
        prev_end = o + e->size;
    }
    if (prev != h->last_elem)
        BAD("last element %#llx, last_elem says %#llx", (unsigned long long)prev,
            (unsigned long long)h->last_elem);
    if (nfree != h->free_count || nbusy != h->alloc_count)
        BAD("%llu free / %llu busy elements, counters say %llu / %llu",
            (unsigned long long)nfree, (unsigned long long)nbusy,
            (unsigned long long)h->free_count, (unsigned long long)h->alloc_count);
    if (busy_bytes != h->alloc_size || busy_bytes + free_bytes != h->total_size)
        BAD("%llu busy + %llu free bytes, counters say alloc %llu total %llu",
            (unsigned long long)busy_bytes, (unsigned long long)free_bytes,
            (unsigned long long)h->alloc_size, (unsigned long long)h->total_size);

    /* The free lists hold exactly the free elements, each once, in its class. */
    seen = calloc(nfree ? nfree : 1, 1);
    if (!seen) {
        rc = -ENOMEM;
        goto out;
    }
    for (unsigned c = 0; c < NLISTS; c++) {
        uint64_t fprev = 0;
        if (!!(h->list_mask & (1u << c)) != !!h->free_head[c])
            BAD("list_mask %#x disagrees with free list %u", h->list_mask, c);
        for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next) {
            uint64_t *hit = nfree ? bsearch(&o, frees, nfree, sizeof(*frees), cmp_u64) : NULL;
            if (!hit)
                BAD("free list %u: %#llx is not a free element", c, (unsigned long long)o);
            if (seen[hit - frees]++)
                BAD("free list %u: %#llx listed twice", c, (unsigned long long)o);
            struct memd_heap_elem *e = EL(base, o);
            if (size_class(e->size) != c)
                BAD("free list %u: %#llx of size %llu belongs on list %u", c,
                    (unsigned long long)o, (unsigned long long)e->size, size_class(e->size));
            if (e->u.free.prev != fprev)
                BAD("free list %u: %#llx has prev %#llx, expected %#llx", c,
                    (unsigned long long)o, (unsigned long long)e->u.free.prev,
                    (unsigned long long)fprev);
            fprev = o;
            listed++;
        }
    }
    if (listed != nfree)
        BAD("free lists hold %llu elements, the heap has %llu free", (unsigned long long)listed,
            (unsigned long long)nfree);
out:
    free(frees);
    free(seen);
    return rc;
}

int memd_heap_check(char *base, struct memd_heap *h)
{
    return memd_heap_check_ex(base, h, NULL, 0);
}

/* --- init, locking and the (locks) wrappers --------------------------------------- */

int memd_heap_init(struct memd_heap *h, int socket_id)
{
    memset(h, 0, sizeof(*h));
    h->socket_id = socket_id;
    return memd_lock_init(&h->lock);
}

int memd_heap_lock(struct memd_heap *h) { return memd_lock_acquire(&h->lock); }

void memd_heap_unlock(struct memd_heap *h) { memd_lock_release(&h->lock); }

int memd_heap_lock_done(char *base, struct memd_heap *h, int lock_rc)
{
    if (lock_rc < 0)
        return lock_rc;
    if (lock_rc == 1 && !h->broken && memd_heap_check(base, h) == -EFAULT)
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

int memd_heap_alloc(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                    uint64_t bound, int contig, uint64_t *out)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    rc = memd_heap_alloc_nolock(base, h, size, align, bound, contig, 0, out);
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

int memd_heap_realloc(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                      uint64_t align, uint64_t *out)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    rc = memd_heap_realloc_nolock(base, h, off, size, align, out);
    memd_heap_unlock(h);
    return rc;
}

int64_t memd_heap_block_size(char *base, struct memd_heap *h, uint64_t off)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    int64_t r = memd_heap_block_size_nolock(base, h, off);
    memd_heap_unlock(h);
    return r;
}

int memd_heap_validate(char *base, struct memd_heap *h, uint64_t off)
{
    int rc = lock_heap(base, h);
    if (rc < 0)
        return rc;
    rc = memd_heap_validate_nolock(base, h, off);
    memd_heap_unlock(h);
    return rc;
}

void memd_heap_get_stats(char *base, struct memd_heap *h, struct memd_heap_stats *s)
{
    if (lock_heap(base, h) < 0) {
        memset(s, 0, sizeof(*s));
        return;
    }
    memd_heap_get_stats_nolock(base, h, s);
    memd_heap_unlock(h);
}
