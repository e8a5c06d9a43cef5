/* heap_check.c - heap statistics, the element walk and the invariant checker
 * (see heap.h): read-only, cold, run under the heap lock. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "heap_internal.h"

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
        /* free lists are not in address order: each step is checked, and a cycle
         * (a damaged link) is found by a second cursor at half speed (Floyd) */
        struct walk_guard g = {0};
        uint64_t slow = h->free_head[c];
        unsigned step = 0;
        for (uint64_t o = h->free_head[c]; o; o = EL(base, o)->u.free.next) {
            g.prev = 0;
            if (!walk_ok(base, h, &g, o) || (step && o == slow)) {
                h->broken = 1;
                break;
            }
            if (step++ & 1)
                slow = EL(base, slow)->u.free.next; /* already checked by the cursor */
            if (EL(base, o)->size > s->greatest_free)
                s->greatest_free = EL(base, o)->size;
        }
        if (s->greatest_free)
            break;
    }
}

int memd_heap_walk(char *base, struct memd_heap *h,
                   int (*fn)(void *arg, uint64_t off, uint64_t size, int state, uint64_t data_size),
                   void *arg)
{
    struct walk_guard g = {0};
    for (uint64_t o = h->first_elem; o; o = EL(base, o)->next) {
        if (!walk_ok(base, h, &g, o)) {
            h->broken = 1;
            return -EFAULT;
        }
        struct memd_heap_elem *e = EL(base, o);
        int rc =
            fn(arg, o, e->size, e->state, e->state == MEMD_ELEM_BUSY ? e->u.busy.data_size : 0);
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

#define BAD(...)                           \
    do {                                   \
        if (why)                           \
            snprintf(why, n, __VA_ARGS__); \
        rc = -EFAULT;                      \
        goto out;                          \
    } while (0)

int memd_heap_check_ex(char *base, struct memd_heap *h, char *why, size_t n)
{
    uint64_t cap = 64, nfree = 0, nbusy = 0, free_bytes = 0, busy_bytes = 0;
    uint64_t prev = 0, prev_end = 0, listed = 0;
    struct walk_guard guard = {0};
    int prev_free = 0, rc = 0;
    uint8_t idx = heap_index(base, h);
    uint64_t *frees = malloc(cap * sizeof(*frees));
    uint8_t *seen = NULL;
    if (!frees)
        return -ENOMEM;
    if (why && n)
        why[0] = 0;
    if ((h->first_elem == 0) != (h->last_elem == 0))
        BAD("first_elem %#llx / last_elem %#llx: only one is 0", (unsigned long long)h->first_elem,
            (unsigned long long)h->last_elem);

    for (uint64_t o = h->first_elem; o; o = EL(base, o)->next) {
        struct memd_heap_elem *e = EL(base, o);
        if (o % GRAIN || o < MEMD_CONFIG_SIZE || o > h->last_elem || (prev && o < prev_end))
            BAD("element %#llx: misplaced (after %#llx ending at %#llx)", (unsigned long long)o,
                (unsigned long long)prev, (unsigned long long)prev_end);
        if (!walk_readable(base, &guard, o))
            BAD("element %#llx: not in mapped memory", (unsigned long long)o);
        if (e->cookie != head_cookie(o))
            BAD("element %#llx: header cookie smashed", (unsigned long long)o);
        if (e->heap != idx)
            BAD("element %#llx: heap %u, expected %u", (unsigned long long)o, e->heap, idx);
        if (e->prev != prev)
            BAD("element %#llx: prev %#llx, expected %#llx", (unsigned long long)o,
                (unsigned long long)e->prev, (unsigned long long)prev);
        if (e->size < MIN_ELEM || e->size % GRAIN || o + e->size < o)
            BAD("element %#llx: bad size %llu", (unsigned long long)o, (unsigned long long)e->size);
        if (e->next && e->next < o + e->size)
            BAD("element %#llx: next %#llx overlaps it", (unsigned long long)o,
                (unsigned long long)e->next);
        if (e->next == 0 && o != h->last_elem)
            BAD("element %#llx ends the list but last_elem is %#llx", (unsigned long long)o,
                (unsigned long long)h->last_elem);
        int adjacent = prev && prev_end == o;
        if (e->state == MEMD_ELEM_FREE) {
            if (prev_free && adjacent)
                BAD("elements %#llx and %#llx: adjacent and both free", (unsigned long long)prev,
                    (unsigned long long)o);
            uint64_t lo = e->u.free.dirty_lo, hi = e->u.free.dirty_hi;
            if (e->flags)
                BAD("free element %#llx: flags %#x", (unsigned long long)o, e->flags);
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
            if (e->flags & ~MEMD_ELEM_F_ALL)
                BAD("busy element %#llx: unknown flags %#x", (unsigned long long)o, e->flags);
            /* the owner tag (and serial, and reserved words) label the block: a
             * scribble over them is that block's damage (validate names it), not
             * the heap's: the heap stays usable */
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
        BAD("%llu free / %llu busy elements, counters say %llu / %llu", (unsigned long long)nfree,
            (unsigned long long)nbusy, (unsigned long long)h->free_count,
            (unsigned long long)h->alloc_count);
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
                BAD("free list %u: %#llx of size %llu belongs on list %u", c, (unsigned long long)o,
                    (unsigned long long)e->size, size_class(e->size));
            if (e->u.free.prev != fprev)
                BAD("free list %u: %#llx has prev %#llx, expected %#llx", c, (unsigned long long)o,
                    (unsigned long long)e->u.free.prev, (unsigned long long)fprev);
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
