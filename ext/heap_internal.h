/*
 * heap_internal.h - what heap.c (elements, journal, allocation) and heap_check.c
 * (stats, walk, the checker) share: element geometry and small helpers.  Not
 * part of the heap API (heap.h).
 */
#ifndef MEMD_HEAP_INTERNAL_H
#define MEMD_HEAP_INTERNAL_H

#include "heap.h"

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

#endif /* MEMD_HEAP_INTERNAL_H */
