/*
 * heap.h - malloc heaps in shared memory (DPDK: malloc_heap + malloc_elem).
 *
 * A heap's state (struct memd_heap in memd_layout.h) lives in the config; its
 * elements (struct memd_heap_elem, same header) live in the window's mapped
 * pages.  All positions are window offsets.  `base` is this process's window
 * address; the heap never stores it.  `h` must be &config->heaps[i] of the config
 * at `base`: the heap's index i is derived from it and stamped in each element.
 *
 * Locking: functions marked (locks) take heap->lock themselves; functions marked
 * (caller locks) must be called between memd_heap_lock()/memd_heap_unlock(), or
 * after memd_heap_lock_done() returned 0.  Every (locks) function has a _nolock
 * twin for callers that lock themselves (the Python bindings do, so that they can
 * release the GIL only when the lock is contended).
 * Crash safety: every mutating (caller locks) / _nolock function is one
 * operation of the heap's undo journal (memd_layout.h "heap undo journals"): a
 * process killed inside it leaves a journal that the next locker rolls back, so
 * the heap is as before the operation (memd_heap_lock_done).
 * Error convention: 0 or a non-negative result on success, -errno on failure.
 * Every (locks) function also fails with -EFAULT iff the heap is marked broken
 * (a dead owner left it inconsistent) and with -ENOTRECOVERABLE from the lock.
 */
#ifndef MEMD_HEAP_H
#define MEMD_HEAP_H

#include <stddef.h>
#include <stdint.h>

#include "memd_layout.h"

#define MEMD_HEAP_DEFAULT_ALIGN 64u

struct memd_heap_stats {
    uint64_t total;         /* heap_totalsz_bytes: memory added, minus removed */
    uint64_t free;          /* heap_freesz_bytes: bytes of free elements */
    uint64_t alloc;         /* heap_allocsz_bytes: bytes of busy elements (with
                             * headers, as DPDK: total = free + alloc) */
    uint64_t greatest_free; /* greatest_free_size: the biggest free element */
    uint64_t free_count;
    uint64_t alloc_count;
};

/* Is the iova range of [off, off+len) contiguous?  From the memsegs (config.c). */
extern int memd_iova_contig(const char *base, uint64_t off, uint64_t len);
/* 1 if off's iova is a multiple of align (always in VA mode; config.c). */
extern int memd_iova_aligned(const char *base, uint64_t off, uint64_t align);
/* Bytes from off on (at most len) whose iova is contiguous (config.c). */
extern uint64_t memd_iova_contig_len(const char *base, uint64_t off, uint64_t len);
/* 1 if [off, off+len) lies in one memseg list whose page size page_mask accepts. */
extern int memd_pages_fit(const char *base, uint64_t off, uint64_t len, uint64_t page_mask);
/* The page size of the memseg list holding off (0 if none does). */
extern uint64_t memd_page_size_at(const char *base, uint64_t off);
/* The window offset where the memseg list holding off ends (0 if none does). */
extern uint64_t memd_list_end(const char *base, uint64_t off);

/* Empty heap for socket_id (primary at init), with an empty journal.  Fails iff
 * the lock cannot init. */
int memd_heap_init(char *base, struct memd_heap *h, int socket_id);

/* 0, or 1 if the previous owner died holding it (call memd_heap_lock_done), or
 * -ENOTRECOVERABLE.  Blocks. */
int memd_heap_lock(struct memd_heap *h);
void memd_heap_unlock(struct memd_heap *h);

/* Finish taking the lock: lock_rc is what memd_heap_lock() or memd_lock_try()
 * returned.  On 1 (dead owner) undoes the operation the owner left half done
 * (its journal), then checks the heap; it marks the heap broken iff the journal
 * cannot be undone (it overflowed or is corrupt) or the check fails.  Returns 0 when the caller
 * holds a usable heap; otherwise the lock is not held (released if it was taken) and it fails iff
 * -EFAULT (broken heap) or lock_rc < 0 (returned as is, e.g. -EBUSY from a trylock). */
int memd_heap_lock_done(char *base, struct memd_heap *h, int lock_rc);

/* (caller locks) Add mapped memory [off, off+len) as free space, joining free
 * neighbours that are adjacent.  The memory must read zero (fresh pages).
 * Fails iff -EINVAL: off or len not a multiple of 64, len < MEMD_ELEM_MIN_SIZE,
 * off inside the config (< MEMD_CONFIG_SIZE), or the range overlaps the heap. */
int memd_heap_add_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len);

/* (caller locks) As memd_heap_add_memory; dirty != 0 when the memory may hold
 * old data (zmalloc will clear it). */
int memd_heap_add_memory_ex(char *base, struct memd_heap *h, uint64_t off, uint64_t len, int dirty);

/* (caller locks) Allocate: returns the data offset in *out.  align 0 = 64, else
 * a power of two; bound 0 = none, else a power of two >= size that the block
 * never crosses; contig: the block's iova range is contiguous (memd_iova_contig);
 * zero != 0 makes the data read zero (zmalloc): only bytes that may be dirty are
 * cleared.  Fails iff -EINVAL (size 0, align or bound not a power of two, bound <
 * size) or -ENOMEM (no free element fits: expand the heap and retry). */
int memd_heap_alloc_nolock(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                           uint64_t bound, int contig, int zero, uint64_t *out);

/* (locks) memd_heap_alloc_nolock with element flags (MEMD_ELEM_F_*; memzones pass
 * MEMD_ELEM_F_MEMZONE), no zeroing.  Fails as memd_heap_alloc_nolock, and -EINVAL for an
 * unknown flag. */
int memd_heap_alloc_flags(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                          uint64_t bound, int contig, uint64_t page_mask, uint16_t flags,
                          uint64_t *out);
int memd_heap_alloc_flags_nolock(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                                 uint64_t bound, int contig, uint64_t page_mask, uint16_t flags,
                                 uint64_t *out);

/* (caller locks) The largest data size one allocation with align (0 = 64) could
 * get now, without growth: on pages of page_mask (0 = any; bit k = pages of 2^k
 * bytes) and iova-contiguous if contig (DPDK's malloc_heap_alloc_biggest).  Fails
 * iff -EINVAL (align) or -ENOMEM (no free element). */
int memd_heap_biggest_nolock(char *base, struct memd_heap *h, uint64_t align, int contig,
                             uint64_t page_mask, uint64_t *size);

/* (locks) Free the block whose data starts at off.  Returns the size of the
 * free element the block ended up in after joining its free neighbours (callers
 * compare it with the page size to decide whether to look for releasable pages).
 * Fails iff -EINVAL (not a busy block of this heap: a double free or a foreign
 * offset) or -EFAULT (its trailer cookie is smashed; the block stays busy). */
int64_t memd_heap_free(char *base, struct memd_heap *h, uint64_t off);
int64_t memd_heap_free_nolock(char *base, struct memd_heap *h, uint64_t off);
/* As memd_heap_free_nolock for the block of a handle that was made with serial
 * (the block's memd_heap_elem.u.busy.serial then): fails with -ESTALE, changing
 * nothing, if the block at off is no longer busy or carries another serial (it
 * was freed, perhaps allocated again), and with -EINVAL only for a listed
 * element whose header cookie is smashed. */
int64_t memd_heap_free_serial_nolock(char *base, struct memd_heap *h, uint64_t off,
                                     uint32_t serial);

/* The serial of the busy block whose data is at off (checked by the caller):
 * read it under the lock that made or checked the block. */
static inline uint32_t memd_heap_block_serial(const char *base, uint64_t off)
{
    return ((const struct memd_heap_elem *)(base + off - MEMD_ELEM_HEADER_SIZE))->u.busy.serial;
}

/* (caller locks) Resize the block at off to size bytes with its data aligned to align
 * (0 = 64); *out is its new data offset.  Shrinks in place (the tail becomes
 * free), grows in place into a free adjacent element, else moves: allocates in
 * the same heap, copies min(old, new) bytes and frees the old block.  Bytes past
 * the old size are not zeroed.  Fails iff -EINVAL (off not a busy block, size 0,
 * align not a power of two), -EFAULT (smashed trailer) or -ENOMEM (no room in
 * this heap; the block is unchanged: allocate elsewhere, copy and free). */
int memd_heap_realloc_nolock(char *base, struct memd_heap *h, uint64_t off, uint64_t size,
                             uint64_t align, uint64_t *out);
/* As memd_heap_realloc_nolock, with the -ESTALE of memd_heap_free_serial_nolock.
 * The resized block gets a new serial (memd_heap_block_serial(base, *out)). */
int memd_heap_realloc_serial_nolock(char *base, struct memd_heap *h, uint64_t off, uint32_t serial,
                                    uint64_t size, uint64_t align, uint64_t *out);

/* (caller locks) Data size of the busy block at off, or -EINVAL. */
int64_t memd_heap_block_size_nolock(char *base, struct memd_heap *h, uint64_t off);

/* (caller locks) 0 if the block's cookies are intact, -EFAULT if its trailer is
 * smashed, -EBADMSG if its links to its neighbours are, -EINVAL if off is not a
 * busy block (which includes a smashed header cookie: the header is what says
 * "block") or the header's reserved words (just before the data) are not 0. */
int memd_heap_validate_nolock(char *base, struct memd_heap *h, uint64_t off);
/* As memd_heap_validate_nolock, with the -ESTALE of memd_heap_free_serial_nolock. */
int memd_heap_validate_serial_nolock(char *base, struct memd_heap *h, uint64_t off,
                                     uint32_t serial);

/* (caller locks) Stats as rte_malloc_get_socket_stats().  O(length of the top
 * free list). */
void memd_heap_get_stats_nolock(char *base, struct memd_heap *h, struct memd_heap_stats *s);

/* (caller locks) Walk every element and check every invariant; 0 or -EFAULT
 * (-ENOMEM if it cannot allocate its scratch array). */
int memd_heap_check(char *base, struct memd_heap *h);

/* (caller locks) memd_heap_check that also says which invariant broke, as a
 * NUL-terminated sentence in why[0..n) (why may be NULL). */
int memd_heap_check_ex(char *base, struct memd_heap *h, char *why, size_t n);

/* (caller locks) The largest range of whole pages (page-aligned, page_size a power
 * of two >= 64) inside one free element that memd_heap_remove_memory would accept
 * (what remains of the element on each side is 0 or >= MEMD_ELEM_MIN_SIZE).
 * Fails iff -EINVAL (bad page_size) or -ENOENT (no such range). */
int memd_heap_find_free_pages(char *base, struct memd_heap *h, uint64_t page_size, uint64_t *off,
                              uint64_t *len);

/* (caller locks) Take [off, off+len) out of the heap (to unmap its pages): it
 * must lie inside one free element and leave 0 or >= MEMD_ELEM_MIN_SIZE bytes of
 * it on each side; those stay free elements.  Nothing inside is written.
 * Fails iff -EINVAL (unaligned, empty, or not inside one free element so). */
int memd_heap_remove_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len);

/* (caller locks) Call fn for every element in offset order: offset, element size,
 * state, data size (busy) or 0.  Stops and returns fn's value when it is != 0. */
int memd_heap_walk(char *base, struct memd_heap *h,
                   int (*fn)(void *arg, uint64_t off, uint64_t size, int state, uint64_t data_size),
                   void *arg);

/* One process's busy elements in a heap (memd_heap_owners). */
struct memd_heap_owner {
    int32_t pid;       /* owner_pid of the elements */
    uint64_t blocks;   /* busy elements, memzones included */
    uint64_t bytes;    /* their element sizes, headers included (as alloc_size) */
    uint64_t memzones; /* of which back memzones (MEMD_ELEM_F_MEMZONE) */
};

/* (caller locks) Busy elements summed by owner pid, in order of first appearance:
 * *out is malloc'ed (the caller frees it), *n entries.  Fails iff -ENOMEM. */
int memd_heap_owners(char *base, struct memd_heap *h, struct memd_heap_owner **out, size_t *n);

/* (caller locks) Free every busy element owned by pid that does not back a
 * memzone, each as an operation of its own (a crash keeps the ones before).
 * Trailer cookies are not checked (the owner is gone; a smashed one is its
 * doing); elements whose header is unsound are left alone.  *blocks and *bytes
 * (element sizes) say what was freed, *largest (may be NULL) the biggest free
 * element that resulted.  Fails iff -EINVAL (pid <= 0). */
int memd_heap_free_owned_nolock(char *base, struct memd_heap *h, int32_t pid, uint64_t *blocks,
                                uint64_t *bytes, uint64_t *largest);

#ifdef MEMD_TEST_HOOKS
/* Test builds only: in this process, _exit(77) at the k-th crash point of a heap
 * operation (each journaled store has one before its journal entry and one
 * between the entry and the store; each commit one before it; a recovery one
 * before undoing each entry); 0 = never. */
void memd_heap_crash_after(int64_t k);
#endif

#endif
