/*
 * heap_internal.h - what heap.c (elements, journal, allocation) and heap_check.c
 * (stats, walk, the checker) share: element geometry and small helpers.  Not
 * part of the heap API (heap.h).
 */
#ifndef MEMD_HEAP_INTERNAL_H
#define MEMD_HEAP_INTERNAL_H

#include "heap.h"
#include "proc.h"

#define HDR      ((uint64_t)MEMD_ELEM_HEADER_SIZE)
#define TRL      ((uint64_t)MEMD_ELEM_TRAILER_SIZE)
#define MIN_ELEM ((uint64_t)MEMD_ELEM_MIN_SIZE)
#define GRAIN    64u
#define NLISTS   MEMD_HEAP_NUM_FREELISTS

_Static_assert(HDR % GRAIN == 0 && MIN_ELEM % GRAIN == 0 && MIN_ELEM >= HDR + GRAIN,
               "element granularity");

/* --- small helpers ---------------------------------------------------------- */

static inline struct memd_heap_elem *EL(char *base, uint64_t off)
{
    return (struct memd_heap_elem *)(base + off);
}

static inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

static inline uint32_t head_cookie(uint64_t off) { return MEMD_ELEM_COOKIE ^ (uint32_t)(off >> 6); }

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
    size_t at = (size_t)((char *)h - base) - offsetof(struct memd_config, heaps);
    return (uint8_t)(at / sizeof(struct memd_heap));
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
/* --- walks that must survive damage ------------------------------------------------ */

/* Any attached process can write heap state, so a walk that must not die (the
 * daemon's: reclaim, admin queries, the checker) follows a link only to an element
 * that is 64-aligned, above the config, after the previous one (so walks end), no
 * further than last_elem, in memory readable here, with its cookie.  The guard
 * remembers the last 2 MiB unit found readable: one probe per unit, not per element. */
struct walk_guard {
    uint64_t prev, ok_lo, ok_hi;
};

static inline int walk_readable(char *base, struct walk_guard *g, uint64_t o)
{
    if (o < g->ok_lo || o + HDR > g->ok_hi) {
        uint64_t lo = o & ~((uint64_t)MEMD_CONFIG_SIZE - 1);
        if (!memd_readable(base + lo, MEMD_CONFIG_SIZE, MEMD_CONFIG_SIZE))
            return 0;
        g->ok_lo = lo;
        g->ok_hi = lo + MEMD_CONFIG_SIZE;
    }
    return 1;
}

static inline int walk_ok(char *base, const struct memd_heap *h, struct walk_guard *g, uint64_t o)
{
    if (o % GRAIN || o < MEMD_CONFIG_SIZE || o <= g->prev || o > h->last_elem ||
        !walk_readable(base, g, o) || EL(base, o)->cookie != head_cookie(o))
        return 0;
    g->prev = o;
    return 1;
}

#endif /* MEMD_HEAP_INTERNAL_H */
