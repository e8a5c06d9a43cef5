/*
 * heap.h - malloc heaps in shared memory (DPDK: malloc_heap + malloc_elem).
 *
 * A heap's state (struct memd_heap in memd_layout.h) lives in the config; its
 * elements live in the window's mapped pages.  All positions are window offsets.
 * `base` is this process's window address; the heap never stores it.
 *
 * Locking: functions marked (locks) take heap->lock themselves; functions marked
 * (caller locks) must be called between memd_heap_lock()/memd_heap_unlock().
 * Error convention: 0 or a non-negative result on success, -errno on failure.
 */
#ifndef MEMD_HEAP_H
#define MEMD_HEAP_H

#include <stdint.h>

#include "memd_layout.h"

#define MEMD_HEAP_DEFAULT_ALIGN 64u

struct memd_heap_stats {
    uint64_t total;          /* heap_totalsz_bytes */
    uint64_t free;           /* heap_freesz_bytes */
    uint64_t alloc;          /* heap_allocsz_bytes */
    uint64_t greatest_free;  /* greatest_free_size */
    uint64_t free_count;
    uint64_t alloc_count;
};

/* Empty heap for socket_id (primary at init). Fails iff the lock cannot init. */
int memd_heap_init(struct memd_heap *h, int socket_id);

/* 0, or 1 if the previous owner died holding it (run memd_heap_check). */
int memd_heap_lock(struct memd_heap *h);
void memd_heap_unlock(struct memd_heap *h);

/* (caller locks) Add mapped memory [off, off+len) as free space, joining a free
 * neighbour.  Fails iff -EINVAL (unaligned, overlapping the heap). */
int memd_heap_add_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len);

/* (locks) Allocate: returns the data offset in *out.  align 0 = 64, else a power
 * of two; bound 0 = none, else a power of two >= size that the block never
 * crosses; contig: the block's iova range is contiguous (memd_iova_contig).
 * Fails iff -EINVAL (bad align/bound/size) or -ENOMEM (nothing fits: expand). */
int memd_heap_alloc(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                    uint64_t bound, int contig, uint64_t *out);

/* (locks) Free the block whose data starts at off.  Fails iff -EINVAL (not a
 * busy block of this heap: a double free or a foreign offset) or -EFAULT (its
 * cookie is smashed).  Returns 1 when the free left whole pages releasable. */
int memd_heap_free(char *base, struct memd_heap *h, uint64_t off);

/* (locks) Data size of the busy block at off, or -EINVAL. */
int64_t memd_heap_block_size(char *base, struct memd_heap *h, uint64_t off);

/* (locks) 0 if the block's cookies are intact, -EFAULT if smashed, -EINVAL if
 * off is not a busy block. */
int memd_heap_validate(char *base, struct memd_heap *h, uint64_t off);

/* (locks) Stats as API.md heap_stats(). */
void memd_heap_get_stats(char *base, struct memd_heap *h, struct memd_heap_stats *s);

/* (caller locks) Walk every element and check every invariant; 0 or -EFAULT. */
int memd_heap_check(char *base, struct memd_heap *h);

#endif
