/*
 * heap_journal.h - the heap's undo journal (memd_layout.h "heap undo journals"),
 * private to the heap: the inline writers every heap operation calls on its hot
 * path, and the recovery in heap_journal.c.
 */
#ifndef MEMD_HEAP_JOURNAL_H
#define MEMD_HEAP_JOURNAL_H

#include <string.h>

#include "heap_internal.h"

/*
 * Every store to heap state is logged first: jset()/jset32() for one word,
 * jsave64() for a 64-byte header or the heap's counters line about to be
 * rewritten, jfresh() for a new header in free memory.  The order entry -> count
 * -> store is kept by compiler barriers (signal fences): a SIGKILL stops the
 * process at an instruction boundary and everything before it reaches memory
 * (the kernel's exit path, which marks the robust mutex owner-dead, orders it
 * before any later locker), so only the compiler could reorder what the next
 * locker sees.  The count store is also a release store (free on x86).
 *
 * Each operation starts with jbegin(), which saves the counters line, so the
 * counters (total_size, alloc_count, free_count, alloc_size, list_mask,
 * alloc_serial) are then written with plain stores.
 */
#define BARRIER()    __atomic_signal_fence(__ATOMIC_SEQ_CST)
#define J_SAVE_SLOTS 5u /* a SAVE64 entry and its 64 bytes */

/* Journal entries an operation may need, at most (jset/jset32/jfresh: 1 slot,
 * jsave64: 5; stores that change nothing are not logged). */
enum {
    J_FL_REMOVE = 3, /* prev's link or head (+ mask), next's link */
    J_LINK = 2,      /* prev's next (or first_elem), next's prev (or last) */
    J_MAKE_FREE = 3 * J_FL_REMOVE + 2 + J_SAVE_SLOTS + 3 + J_LINK, /* removals, zeroed
                                        joined headers, header, list slot */
    J_CARVE = J_SAVE_SLOTS + 2 * J_MAKE_FREE + J_FL_REMOVE + J_SAVE_SLOTS + 1 + 1,
    J_FREE = J_MAKE_FREE,
    J_REALLOC_IN_PLACE = J_SAVE_SLOTS + J_FL_REMOVE + 1 + 1 + J_MAKE_FREE + 3,
    J_REALLOC_MOVE = J_SAVE_SLOTS + J_CARVE + J_FREE, /* after its own hull commit */
    J_ADD_MEMORY = J_SAVE_SLOTS + J_MAKE_FREE,
    J_REMOVE_MEMORY = J_SAVE_SLOTS + 2 * J_MAKE_FREE + J_FL_REMOVE + J_LINK,
};
_Static_assert(J_CARVE + J_SAVE_SLOTS <= MEMD_HEAP_JOURNAL_ENTRIES &&
                   J_FREE + J_SAVE_SLOTS <= MEMD_HEAP_JOURNAL_ENTRIES &&
                   J_REALLOC_IN_PLACE <= MEMD_HEAP_JOURNAL_ENTRIES &&
                   J_REALLOC_MOVE <= MEMD_HEAP_JOURNAL_ENTRIES &&
                   J_ADD_MEMORY <= MEMD_HEAP_JOURNAL_ENTRIES &&
                   J_REMOVE_MEMORY <= MEMD_HEAP_JOURNAL_ENTRIES,
               "an operation can outgrow the heap journal");

#ifdef MEMD_TEST_HOOKS
/* Test builds: memd_heap_crash_after() arms crash points (heap_journal.c); while
 * armed the limit is 0, so every entry takes the slow path that has them. */
extern uint32_t memd_heap_jlimit;
void memd_heap_crash_point(void);
#define JLIMIT        memd_heap_jlimit
#define CRASH_POINT() memd_heap_crash_point()
#else
#define JLIMIT        ((uint32_t)MEMD_HEAP_JOURNAL_ENTRIES)
#define CRASH_POINT() ((void)0)
#endif

static inline struct memd_heap_journal *journal_of(char *base, struct memd_heap *h)
{
    return &((struct memd_config *)base)->heap_journals[heap_index(base, h)];
}

/* Entry e[n] (1 slot, or J_SAVE_SLOTS with 64 bytes from src) and count = n+slots. */
static inline void jput(struct memd_heap_journal *j, uint32_t n, uint64_t off, uint64_t old,
                        const void *src, unsigned slots)
{
    j->e[n].off = off;
    j->e[n].old = old;
    if (src)
        memcpy(&j->e[n + 1], src, 64);
    BARRIER();
    __atomic_store_n(&j->count, n + slots, __ATOMIC_RELEASE);
    BARRIER();
}

/* The journal is full (or, in test builds, crash points are armed). */
void memd_heap_jlog_slow(struct memd_heap_journal *j, uint64_t off, uint64_t old, const void *src,
                         unsigned slots);

/* Log entry (off | kind, old), with the 64 bytes at src for SAVE64. */
static inline void jlog(char *base, struct memd_heap *h, uint64_t off, uint64_t old,
                        const void *src, unsigned slots)
{
    struct memd_heap_journal *j = journal_of(base, h);
    uint32_t n = j->count;
    if (__builtin_expect(n + slots > JLIMIT, 0))
        memd_heap_jlog_slow(j, off, old, src, slots);
    else
        jput(j, n, off, old, src, slots);
}

/* Store v into the aligned 8-byte word at p, journaled; a store that changes
 * nothing is skipped (and not logged).  memcpy: the word may hold narrower
 * fields (element word 0: cookie, state, heap, flags). */
static inline void jset(char *base, struct memd_heap *h, void *p, uint64_t v)
{
    uint64_t old;
    memcpy(&old, p, 8);
    if (old == v)
        return;
    jlog(base, h, (uint64_t)((char *)p - base), old, NULL, 1);
    memcpy(p, &v, 8);
}

/* jset for a 32-bit field: logs the aligned word holding it. */
static inline void jset32(char *base, struct memd_heap *h, uint32_t *p, uint32_t v)
{
    if (*p == v)
        return;
    char *w = (char *)((uintptr_t)p & ~(uintptr_t)7);
    uint64_t old;
    memcpy(&old, w, 8);
    jlog(base, h, (uint64_t)(w - base), old, NULL, 1);
    *p = v;
}

/* The 64 bytes at window offset off are about to be rewritten. */
static inline void jsave64(char *base, struct memd_heap *h, uint64_t off)
{
    jlog(base, h, off | MEMD_JOURNAL_SAVE64, 0, base + off, J_SAVE_SLOTS);
}

/* An element header is about to be written at off, inside free memory (or memory
 * being added): undo clears those 64 bytes, so the stores need no entries. */
static inline void jfresh(char *base, struct memd_heap *h, uint64_t off)
{
    jlog(base, h, off | MEMD_JOURNAL_ZERO64, 0, NULL, 1);
}

/* Start of an operation's stores: save the counters line (then the counters are
 * written plainly). */
static inline void jbegin(char *base, struct memd_heap *h)
{
    jsave64(base, h, (uint64_t)((char *)h - base) + MEMD_HEAP_COUNTERS_LINE);
}

/* The end of a mutating operation: nothing to undo any more. */
static inline void jcommit(char *base, struct memd_heap *h)
{
    struct memd_heap_journal *j = journal_of(base, h);
    static const uint64_t zero = 0;
    if (__builtin_expect(JLIMIT == 0, 0))
        CRASH_POINT();
    BARRIER();
    memcpy(j, &zero, 8); /* count = overflow = 0 in one store */
    BARRIER();
}

/* Roll back the operation a dead process left half done.  Returns the entries
 * undone, or -EFAULT when the journal cannot be trusted (it overflowed, or an
 * entry points outside heap state): nothing is written then. */
int memd_heap_journal_undo(char *base, struct memd_heap *h);

#endif /* MEMD_HEAP_JOURNAL_H */
