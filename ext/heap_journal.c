/*
 * heap_journal.c - the cold half of the heap's undo journal: the slow path of a
 * log entry, recovery after a dead locker, and (test builds) crash points.
 */
#include "heap_journal.h"

#include <errno.h>
#include <unistd.h>

/*
 * Test knob (memd_heap_crash_after): _exit(77) at the k-th crash point of this
 * process.  Each journal entry has two (before it, i.e. right after the previous
 * store; and after it, before the store it covers), each commit one, and a
 * recovery one before undoing each entry.  While it
 * is armed, jlimit is 0 so every entry takes the slow path; otherwise jlimit is
 * the journal size, and the fast path's one compare also catches an overflow.
 */
#ifdef MEMD_TEST_HOOKS
static int64_t crash_countdown;
uint32_t memd_heap_jlimit = MEMD_HEAP_JOURNAL_ENTRIES;

void memd_heap_crash_after(int64_t k)
{
    crash_countdown = k > 0 ? k : 0;
    memd_heap_jlimit = k > 0 ? 0 : MEMD_HEAP_JOURNAL_ENTRIES;
}

void memd_heap_crash_point(void)
{
    if (crash_countdown > 0 && --crash_countdown == 0)
        _exit(77);
}
#endif

__attribute__((cold)) void memd_heap_jlog_slow(struct memd_heap_journal *j, uint64_t off,
                                               uint64_t old, const void *src, unsigned slots)
{
    uint32_t n = j->count;
    CRASH_POINT();
    if (n + slots > MEMD_HEAP_JOURNAL_ENTRIES) {
        j->overflow = 1; /* recovery cannot undo this operation: heap broken */
        BARRIER();
    } else {
        jput(j, n, off, old, src, slots);
    }
    CRASH_POINT();
}

/* Is journal entry off (kind included) a place an operation of heap h writes? */
static int entry_ok(char *base, struct memd_heap *h, uint64_t off)
{
    uint64_t hs = (uint64_t)((char *)h - base), o = off & ~(uint64_t)7;
    if (o >= MEMD_CONFIG_SIZE && !memd_readable(base + o, 64, MEMD_CONFIG_SIZE))
        return 0; /* a damaged entry pointing into a hole: undoing it would fault */
    switch (off & 7) {
    case 0:
        return o >= MEMD_CONFIG_SIZE || (o >= hs + offsetof(struct memd_heap, first_elem) &&
                                         o < hs + offsetof(struct memd_heap, socket_id));
    case MEMD_JOURNAL_ZERO64:
        return o % GRAIN == 0 && o >= MEMD_CONFIG_SIZE;
    case MEMD_JOURNAL_SAVE64:
        return o % GRAIN == 0 && (o >= MEMD_CONFIG_SIZE || o == hs + MEMD_HEAP_COUNTERS_LINE);
    default:
        return 0;
    }
}

int memd_heap_journal_undo(char *base, struct memd_heap *h)
{
    struct memd_heap_journal *j = journal_of(base, h);
    uint32_t n = j->count, k = 0;
    uint16_t at[MEMD_HEAP_JOURNAL_ENTRIES];
    if (j->overflow || n > MEMD_HEAP_JOURNAL_ENTRIES)
        return -EFAULT;
    for (uint32_t i = 0; i < n; i += (j->e[i].off & MEMD_JOURNAL_SAVE64) ? J_SAVE_SLOTS : 1) {
        if (!entry_ok(base, h, j->e[i].off) ||
            ((j->e[i].off & MEMD_JOURNAL_SAVE64) && i + J_SAVE_SLOTS > n))
            return -EFAULT;
        at[k++] = (uint16_t)i;
    }
    for (uint32_t i = k; i-- > 0;) {
        struct memd_heap_journal_entry *e = &j->e[at[i]];
        if (__builtin_expect(JLIMIT == 0, 0))
            CRASH_POINT(); /* tests: a recovery killed halfway */
        char *p = base + (e->off & ~(uint64_t)7);
        if (e->off & MEMD_JOURNAL_ZERO64)
            memset(p, 0, 64);
        else if (e->off & MEMD_JOURNAL_SAVE64)
            memcpy(p, e + 1, 64);
        else
            memcpy(p, &e->old, 8);
    }
    if (k) {
        j->rollbacks++;
        j->undone += k;
    }
    BARRIER();
    j->count = 0; /* last: a recovery killed before this is simply redone */
    return (int)k;
}
