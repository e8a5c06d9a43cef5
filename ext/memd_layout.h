/*
 * memd_layout.h - the one definition of everything memd keeps in shared memory.
 *
 * Every process maps one *window*: a reserved range of virtual addresses whose
 * first MEMD_CONFIG_SIZE bytes are the config file (struct memd_config) and whose
 * rest holds the memseg lists, each list's pages at window offset
 * list.base_offset + slot * list.page_size.  Processes map the window at any
 * address they like, so everything stored in shared memory is an *offset from the
 * window base*, never a pointer.  Offset 0 is the config header, so 0 also means
 * "none" wherever an offset names heap memory.
 *
 * Fixed sizes only; each field's byte offset is written beside it and checked by
 * _Static_assert at the bottom.  Python reads sizes and offsets from the extension
 * (memd._ext.LAYOUT), never from a copy.
 *
 * Lock order (take left before right, never the reverse):
 *     config_lock -> heaps[i].lock -> proc_lock
 * A multi-producer (-consumer) ring side has its own small lock (memd_ring_headtail
 * .lock), a leaf: nothing is taken while it is held.  Mempools take no other
 * lock, except create/free, which run under config_lock.
 */
#ifndef MEMD_LAYOUT_H
#define MEMD_LAYOUT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MEMD_CONFIG_MAGIC 0x31474643444d454dULL /* "MEMDCFG1", little endian */
/* 2: robust ring sides, mempool owner tags; 3: heap undo journals, element owner tags;
 * 4: DPDK fidelity (an object directory entry per memzone, rings of esize-byte
 *    records, memzone flags as DPDK's), memzone generations, view pins;
 * 5: fork pin rows (a forked child's inherited views keep their pages), identity
 *    tags in rings and mempools (a freed one's handles raise), heap allocation
 *    serials (memd_heap.alloc_serial, a busy header's serial: a freed block's
 *    handles raise);
 * 6: mempool objects in flight (pool_moving words in the slot rows, a pool's
 *    recovering word), a fork row's parent (a per-process cap on fork rows) */
#define MEMD_LAYOUT_VERSION 6u

#define MEMD_CACHE_LINE         64u
#define MEMD_NAMESIZE           32u  /* names are at most 31 bytes + NUL */
#define MEMD_SOCKET_ID_ANY      (-1) /* DPDK's SOCKET_ID_ANY: any heap, local first */
#define MEMD_MAX_MEMSEG_LISTS   8u   /* socket x page size combinations */
#define MEMD_MAX_PAGES_PER_LIST 8192u
#define MEMD_MAX_HEAPS          8u   /* one per NUMA socket */
#define MEMD_MAX_PROCS          128u /* slot 0 is the primary */
#define MEMD_MAX_MEMZONES       2560u
/* named rings and mempools: DPDK bounds them by its memzone table only */
#define MEMD_MAX_OBJECTS MEMD_MAX_MEMZONES
#define MEMD_PATH_SIZE   192u
#define MEMD_CONFIG_SIZE (2u * 1024u * 1024u) /* file size; the struct fits inside */
/* The largest alignment a request may ask for (DPDK's usual largest page size): every
 * process places its window at a multiple of it, so an offset aligned to it gives
 * an address aligned to it in every process. */
#define MEMD_MAX_ALIGN (1ull << 30)
#define MEMD_BAD_IOVA  UINT64_MAX

/* --- config header -------------------------------------------------------- */

enum memd_state {
    MEMD_STATE_INIT = 1,     /* primary is building the config */
    MEMD_STATE_READY = 2,    /* secondaries may attach */
    MEMD_STATE_SHUTDOWN = 3, /* primary is tearing down; refuse new attaches */
};

enum memd_iova_mode {
    MEMD_IOVA_PA = 1, /* iova = physical address from /proc/self/pagemap */
    MEMD_IOVA_VA = 2, /* iova = the primary's virtual address */
};

/* header.flags: how the primary was started */
#define MEMD_CFG_F_NO_HUGE     0x1u  /* pages are POSIX shm objects, not hugetlbfs */
#define MEMD_CFG_F_LEGACY      0x2u  /* all pages mapped at init, sorted by iova */
#define MEMD_CFG_F_HUGE_UNLINK 0x4u  /* page files unlinked right after mapping */
#define MEMD_CFG_F_SINGLE_FILE 0x8u  /* one file per memseg list */
#define MEMD_CFG_F_IN_MEMORY   0x10u /* list files are memfds: no name, handed over */

struct memd_config_header {
    uint64_t magic;              /*   0: MEMD_CONFIG_MAGIC, stored last (release) */
    uint32_t layout_version;     /*   8: MEMD_LAYOUT_VERSION */
    uint32_t state;              /*  12: enum memd_state (atomic) */
    int32_t primary_pid;         /*  16 */
    uint32_t flags;              /*  20: MEMD_CFG_F_* */
    uint64_t primary_start_time; /*  24: field 22 of /proc/<pid>/stat, clock ticks */
    uint64_t config_size;        /*  32: MEMD_CONFIG_SIZE */
    uint64_t window_size;        /*  40: bytes of address space every process reserves */
    uint64_t window_align;       /*  48: window base alignment (largest page size) */
    uint32_t iova_mode;          /*  56: enum memd_iova_mode */
    uint32_t n_memseg_lists;     /*  60 */
    uint64_t mem_generation;     /*  64: bumped (release) on every page map/unmap */
    uint64_t primary_base;       /*  72: the primary's window address (VA-mode iova) */
    uint32_t n_sockets;          /*  80 */
    uint32_t reserved0;          /*  84 */
    uint64_t reserved1[2];       /*  88 */
    char prefix[64];             /* 104: --file-prefix */
    uint8_t reserved2[88];       /* 168 */
}; /* 256 */

/* --- locks ---------------------------------------------------------------- */

/*
 * A process-shared robust mutex.  If its holder dies, the next locker gets it
 * with EOWNERDEAD, checks the structure it guards, and marks it consistent
 * (ext/lock.c).  owner_pid is for diagnostics only.
 */
struct memd_lock {
    union {
        pthread_mutex_t mutex;
        uint8_t raw[56];
    } u;                 /*  0 */
    int32_t owner_pid;   /* 56 */
    uint32_t recoveries; /* 60: times a dead owner's lock was recovered */
}; /* 64 */

/* --- memseg lists (DPDK: rte_memseg_list + fbarray) ----------------------- */

#define MEMD_SEG_F_USED     0x1u /* slot holds a mapped page */
#define MEMD_SEG_F_PREALLOC 0x2u /* from -m / --socket-mem: never given back */

struct memd_memseg {   /* one page slot */
    uint64_t iova;     /*  0: MEMD_BAD_IOVA when unknown */
    int32_t socket_id; /*  8 */
    uint32_t flags;    /* 12: MEMD_SEG_F_* */
}; /* 16 */

struct memd_memseg_list {
    uint64_t base_offset;     /*   0: window offset of slot 0, aligned to page_size */
    uint64_t page_size;       /*   8 */
    int32_t socket_id;        /*  16 */
    uint32_t capacity;        /*  20: slots (<= MEMD_MAX_PAGES_PER_LIST) */
    uint32_t n_used;          /*  24 */
    uint32_t flags;           /*  28 */
    uint64_t version;         /*  32: bumped on every map/unmap in this list */
    uint32_t releasing_first; /*  40: slots [first, first + n) are being given back: */
    uint32_t releasing_n;     /*  44: unused already, but not punched yet (memory event
                                      callbacks view them): views may still pin them */
    uint8_t reserved[16];     /*  48 */
    char dir[MEMD_PATH_SIZE]; /* 64: hugetlbfs directory ("" for --no-huge: shm) */
    uint64_t used_bitmap[MEMD_MAX_PAGES_PER_LIST / 64]; /* 256: bit = slot in use */
    struct memd_memseg segs[MEMD_MAX_PAGES_PER_LIST];   /* 1280 */
}; /* 132352 */

/* --- malloc heaps (ext/heap.c) -------------------------------------------- */

#define MEMD_HEAP_NUM_FREELISTS 16u

struct memd_heap {
    struct memd_lock lock;                       /*   0 */
    uint64_t first_elem;                         /*  64: offset of the lowest element, 0 = empty */
    uint64_t last_elem;                          /*  72: offset of the highest element */
    uint64_t free_head[MEMD_HEAP_NUM_FREELISTS]; /* 80: free lists by size class */
    uint64_t total_size;                         /* 208: bytes of memory added to the heap */
    uint64_t alloc_count;                        /* 216: busy elements */
    uint64_t free_count;                         /* 224: free elements */
    uint64_t alloc_size;                         /* 232: bytes of busy elements, headers included
                                                  *      (DPDK: total = alloc + free) */
    int32_t socket_id;                           /* 240 */
    uint32_t broken;                             /* 244: 1 once a recovery found the heap corrupt:
                                                  *      every call then fails with -EFAULT */
    uint32_t list_mask;                          /* 248: bit c set iff free_head[c] != 0 */
    uint32_t alloc_serial;                       /* 252: bumped (never to 0, wrapping) by every
                                                  *      allocation and realloc; the block's
                                                  *      header keeps the value it got */
    uint64_t reserved[32];                       /* 256 */
}; /* 512 */

/*
 * Heap elements (DPDK: malloc_elem).  A heap's memory is a doubly linked list of
 * elements ordered by window offset; regions added separately may leave holes,
 * so only elements with prev_off + prev.size == off are neighbours (and joinable).
 *
 *   element:  [header 64][data: data_size][pad to 8][trailer cookie 8][slack]
 *
 * Every element starts at a multiple of 64 and its size is a multiple of 64, so
 * the data (header + 64) is 64-byte aligned.  A bigger alignment is met by
 * splitting the gap before the header off as a free element of its own (it is
 * never smaller than MEMD_ELEM_MIN_SIZE), so there are no "pad" elements.  Free
 * space smaller than MEMD_ELEM_MIN_SIZE after a block stays in it as slack.
 * A free element sits on free list c = min(log2(size) - 7, 15), so list c holds
 * sizes in [2^(c+7), 2^(c+8)) and list 15 everything from 4 MiB up.
 *
 * Cookies: the header's is MEMD_ELEM_COOKIE ^ (offset >> 6) (a stale or foreign
 * offset does not match; a header whose element was joined into a neighbour is
 * zeroed); the trailer's is MEMD_ELEM_TRAILER_COOKIE ^ data offset, right after
 * the data rounded up to 8, so a one-byte overflow smashes it.
 *
 * Zeroing: a free element records the hull [dirty_lo, dirty_hi) (window offsets,
 * empty when equal) of bytes in its data area that may be non-zero.  Memory added
 * from fresh pages is clean; a freed block's data and a joined neighbour's header
 * are dirty.  zmalloc clears only the part of the block inside the hull.
 *
 * Owners: a busy element records the pid of the process that allocated it (or
 * last resized it), so a dead process's blocks can be found and freed
 * (memd_heap_free_owned); blocks backing memzones carry MEMD_ELEM_F_MEMZONE and
 * are left to the memzone table.
 *
 * Serials: each allocation and realloc takes the next memd_heap.alloc_serial
 * (never 0) and stores it beside owner_pid (one 8-byte word).  A Block keeps the
 * serial it was made with and compares it before it touches the block, so a copy
 * of a Block (unpickled, in any process) kept past a free raises instead of
 * reaching the next block at that offset.  32 bits: a copy kept across exactly
 * 2^32 - 1 allocations of one heap landing at its offset is not told apart.
 */
#define MEMD_ELEM_HEADER_SIZE    64u
#define MEMD_ELEM_TRAILER_SIZE   8u
#define MEMD_ELEM_MIN_SIZE       128u                  /* header + one cache line */
#define MEMD_ELEM_COOKIE         0x4d454c45u           /* "ELEM" */
#define MEMD_ELEM_TRAILER_COOKIE 0x4c494152544d454dULL /* "MEMTRAIL" */

enum memd_elem_state {
    MEMD_ELEM_FREE = 1,
    MEMD_ELEM_BUSY = 2,
};

/* memd_heap_elem.flags (busy elements only; a free element's flags are 0) */
#define MEMD_ELEM_F_MEMZONE 0x1u /* backs a memzone: freed with the zone, never by owner */
#define MEMD_ELEM_F_ALL     0x1u

struct memd_heap_elem {
    uint32_t cookie; /*  0: MEMD_ELEM_COOKIE ^ (uint32_t)(offset >> 6) */
    uint8_t state;   /*  4: enum memd_elem_state */
    uint8_t heap;    /*  5: owning heap's index in config.heaps */
    uint16_t flags;  /*  6: MEMD_ELEM_F_* */
    uint64_t prev;   /*  8: offset of the element below, 0 = first */
    uint64_t next;   /* 16: offset of the element above, 0 = last */
    uint64_t size;   /* 24: bytes of the whole element, header included */
    union {
        struct {
            uint64_t prev;     /* 32: previous element on its free list, 0 = head */
            uint64_t next;     /* 40: next element on its free list, 0 = tail */
            uint64_t dirty_lo; /* 48: hull of possibly non-zero data bytes */
            uint64_t dirty_hi; /* 56 */
        } free;
        struct {
            uint64_t data_size;   /* 32: bytes asked for (the trailer follows them) */
            int32_t owner_pid;    /* 40: process that allocated (or last resized) it */
            uint32_t serial;      /* 44: the heap's alloc_serial of that allocation
                                   *     (or resize): tells it from a later block at
                                   *     the same offset */
            uint64_t reserved[2]; /* 48: 0 */
        } busy;
    } u;
}; /* 64 */

/*
 * Heap undo journals (ext/heap.c).  One per heap, in the config.  Every mutating
 * heap operation (alloc, free, realloc, add/remove memory, free-by-owner: each
 * public *_nolock call) runs under the heap lock and, before each store to heap
 * state (the struct memd_heap, element headers, trailer cookies), appends the
 * aligned 8-byte word's window offset and old value here; the operation's end
 * resets count to 0 (commit).  Order per store: entry, then count (compiler
 * barrier between, and before the store itself), then the store, so a process
 * killed anywhere leaves count covering every store it made.
 *
 * Entry kinds, by the low bits of entry.off (offsets are multiples of 8):
 *   0                    one word: undo writes `old` back;
 *   MEMD_JOURNAL_ZERO64  a new element header written into free memory: undo
 *                        clears those 64 bytes (free memory may read zero whatever
 *                        it held; the element's dirty hull is unchanged);
 *   MEMD_JOURNAL_SAVE64  the 64 bytes at off (an element header, or the heap's
 *                        counters line, struct memd_heap bytes 192..255) before a
 *                        rewrite: they fill the next 4 entries; undo copies them
 *                        back.
 *
 * Whoever takes the lock from a dead owner undoes the entries in reverse order
 * (idempotent: a recovery killed halfway is simply redone), resets count, and
 * only then runs memd_heap_check.  overflow != 0 means an operation logged more
 * than fits (a bug: the worst cases are bounded by _Static_assert in heap.c);
 * such a heap cannot be rolled back and is marked broken.
 */
#define MEMD_HEAP_JOURNAL_ENTRIES 252u
#define MEMD_JOURNAL_ZERO64       0x1u /* entry.off kind: clear 64 bytes at off on undo */
#define MEMD_JOURNAL_SAVE64       0x2u /* entry.off kind: 64 old bytes follow (4 entries) */
#define MEMD_HEAP_COUNTERS_LINE   192u /* struct memd_heap: the 64-byte line of counters */

struct memd_heap_journal_entry {
    uint64_t off; /*  0: window offset | MEMD_JOURNAL_* kind */
    uint64_t old; /*  8: its value before the store */
}; /* 16 */

struct memd_heap_journal {
    uint32_t count;       /*  0: entries of the operation in progress */
    uint32_t overflow;    /*  4: 1 = the operation outgrew the entries */
    uint64_t rollbacks;   /*  8: operations undone after their process died */
    uint64_t undone;      /* 16: entries undone, over all rollbacks */
    uint64_t reserved[5]; /* 24 */
    struct memd_heap_journal_entry e[MEMD_HEAP_JOURNAL_ENTRIES]; /* 64 */
}; /* 4096 */

/* --- processes ------------------------------------------------------------ */

enum memd_proc_state {
    MEMD_PROC_FREE = 0,
    MEMD_PROC_PRIMARY = 1,
    MEMD_PROC_SECONDARY = 2,
};

struct memd_process {
    int32_t pid;             /*  0: 0 = free slot */
    uint32_t state;          /*  4: enum memd_proc_state */
    uint64_t start_time;     /*  8: field 22 of /proc/<pid>/stat */
    uint64_t attach_ns;      /* 16: CLOCK_REALTIME at registration */
    uint64_t mem_generation; /* 24: last header.mem_generation it mapped */
    char comm[32];           /* 32: process name, for memctl */
}; /* 64 */

/* --- view pins ------------------------------------------------------------ */

/*
 * A page that a view (memoryview, Py_buffer) exported by some process covers is
 * *pinned*: the primary gives it back to the system only once no row pins it
 * (a pinned free page stays in its heap until the primary, seeing the pins
 * change, releases again).  Each process
 * slot has one row, written by its owner alone (under its GIL: bf_getbuffer and
 * bf_releasebuffer, ext/module.c), read by the primary when it releases pages.
 * An entry is a range of MEMD_PIN_UNIT units of window offsets (a view rounded
 * out) with the number of live views on exactly that range; count 0 = free entry.
 * Writes are bracketed by `seq` (odd while writing: a seqlock), so the reader
 * never acts on a torn entry; a row the primary finds odd at two looks a second
 * apart (its writer stopped mid-write, or not memd) it reads as it stands.  Views that find no free
 * entry are counted in `overflow`: while it is non-zero the row pins every page (conservative).
 * proc_register and proc_unregister clear the row, so a dead process's pins go
 * with its slot when reclaim frees it.
 *
 * Fork rows (pins[MEMD_MAX_PROCS...]): a forked child's attachment is dead, but
 * the views it inherited still reach the pages.  Before os.fork, a process whose
 * row pins something claims a free fork row (CAS `owner` 0 -> its own word) and
 * copies its row into it, entry for entry; the child, in its atfork handler,
 * takes the row over (CAS parent's word -> its own) and from then on its inherited
 * views unpin there (the same entry indexes).  The primary frees a fork row whose
 * owner is dead (CAS owner -> MEMD_PIN_OWNER_REAPING, clear, owner = 0).  A fork
 * that failed leaves its row to the parent until the parent exits.
 * The table is the instance's, so one process forking many children must not take
 * every row: a row records its forking process (`parent`, set by the claim, kept
 * by the child's takeover, cleared by the reap), and a claim is refused while the
 * caller is the parent of MEMD_FORK_ROWS_PER_PROC rows in use (its children
 * alive, or not yet reaped: the refused claim reaps dead owners and counts again).
 * A child that forks is a parent then, with a cap of its own.  The cap is
 * fairness, not a wall: MEMD_FORK_PIN_ROWS / MEMD_FORK_ROWS_PER_PROC forking
 * processes together still take every row.
 *
 * Order against release (a Dekker pair): an exporter writes its entry, fences,
 * then checks the pages' used bits and the list's releasing range (refusing the
 * view if a page is neither); the primary clears the used bits inside a releasing
 * range (memory event callbacks hear FREE and may view them), clears the range,
 * fences, then reads the rows (putting the pages back if one pins them).  So
 * either the exporter sees the page go or the primary sees the pin.
 */
#define MEMD_PIN_UNIT       (2u * 1024u * 1024u) /* the smallest page size memd uses */
#define MEMD_PINS_PER_PROC  60u
#define MEMD_PIN_SEQ_STABLE 1000u /* reader retries before it takes a row as "pins all" */
#define MEMD_FORK_PIN_ROWS  64u   /* rows for forked children, after the slots' rows */
#define MEMD_PIN_ROWS       (MEMD_MAX_PROCS + MEMD_FORK_PIN_ROWS)
/* fork rows one process may hold for its live children: 8 processes' worth of
 * forking before the table runs out, and a fork pool of 8 workers keeps its views */
#define MEMD_FORK_ROWS_PER_PROC 8u
/* a fork row's owner word: pid (< 2^22, the kernel's PID_MAX_LIMIT) and start time */
#define MEMD_PIN_OWNER_PID_BITS 22u
#define MEMD_PIN_OWNER(pid, start) \
    ((uint64_t)(uint32_t)(pid) | ((uint64_t)(start) << MEMD_PIN_OWNER_PID_BITS))
#define MEMD_PIN_OWNER_REAPING UINT64_MAX /* the primary is clearing the row */

struct memd_pin {
    uint32_t first;         /*  0: first unit (window offset / MEMD_PIN_UNIT) */
    uint32_t n;             /*  4: units */
    _Atomic uint32_t count; /*  8: live views of this range; 0 = free entry */
    uint32_t reserved;      /* 12 */
}; /* 16 */

struct memd_proc_pins {
    _Atomic uint64_t seq;                  /*  0: odd while the owner writes the row */
    _Atomic uint32_t overflow;             /*  8: views not in an entry: pins every page */
    uint32_t n_hint;                       /* 12: entries at or past it are free */
    _Atomic uint64_t owner;                /* 16: fork rows: MEMD_PIN_OWNER(); 0 = free */
    _Atomic uint64_t pool_moving;          /* 24: odd while the owner moves mempool objects
                                                  (see "objects in flight") */
    _Atomic uint64_t pool_moving_at;       /* 32: the window offset of that mempool */
    _Atomic uint32_t pool_barrier;         /* 40: 1 if the owner takes part in
                                                  MEMBARRIER_CMD_GLOBAL_EXPEDITED */
    uint32_t reserved32;                   /* 44 */
    _Atomic uint64_t parent;               /* 48: fork rows: the forking process's
                                                  MEMD_PIN_OWNER(); 0 while claimed or reaped */
    uint64_t reserved;                     /* 56 */
    struct memd_pin e[MEMD_PINS_PER_PROC]; /* 64 */
}; /* 1024 */

/* --- named objects (rings, mempools) -------------------------------------- */

enum memd_object_type {
    MEMD_OBJ_FREE = 0,
    MEMD_OBJ_RING = 1,
    MEMD_OBJ_MEMPOOL = 2,
};

struct memd_object {
    char name[MEMD_NAMESIZE]; /*  0 */
    uint32_t type;            /* 32: enum memd_object_type */
    uint32_t memzone_id;      /* 36: the memzone holding it */
    uint64_t offset;          /* 40: window offset of its header */
    int32_t creator_pid;      /* 48 */
    uint32_t reserved0;       /* 52 */
    uint64_t reserved1;       /* 56 */
}; /* 64 */

/* --- memzones (DPDK: rte_memzone) ----------------------------------------- */

struct memd_memzone {
    char name[MEMD_NAMESIZE]; /*  0: "" = free slot */
    uint64_t offset;          /* 32: window offset of the zone's first byte */
    uint64_t iova;            /* 40 */
    uint64_t length;          /* 48 */
    uint64_t page_size;       /* 56 */
    int32_t socket_id;        /* 64 */
    uint32_t flags;           /* 68: MEMD_MEMZONE_F_* as given at reserve */
    uint64_t elem_offset;     /* 72: heap block to free with the zone */
    int32_t owner_pid;        /* 80 */
    uint32_t generation;      /* 84: bumped (never to 0) each time the slot is reserved,
                                     kept across a free: a handle from before a free
                                     (same name, id and offset) has an older one */
    uint64_t reserved1;       /* 88 */
}; /* 96 */

/* memzone flags: DPDK's RTE_MEMZONE_* values.  Page-size flags (any of them) ask
 * for memory on pages of one of those sizes; SIZE_HINT_ONLY lets any size do when
 * none of them can be had. */
#define MEMD_MEMZONE_F_2MB            0x00000001u
#define MEMD_MEMZONE_F_1GB            0x00000002u
#define MEMD_MEMZONE_F_SIZE_HINT_ONLY 0x00000004u
#define MEMD_MEMZONE_F_16MB           0x00000100u
#define MEMD_MEMZONE_F_16GB           0x00000200u
#define MEMD_MEMZONE_F_256KB          0x00010000u
#define MEMD_MEMZONE_F_256MB          0x00020000u
#define MEMD_MEMZONE_F_512MB          0x00040000u
#define MEMD_MEMZONE_F_4GB            0x00080000u
#define MEMD_MEMZONE_F_IOVA_CONTIG    0x00100000u
#define MEMD_MEMZONE_F_PAGE_SIZES                                                          \
    (MEMD_MEMZONE_F_2MB | MEMD_MEMZONE_F_1GB | MEMD_MEMZONE_F_16MB | MEMD_MEMZONE_F_16GB | \
     MEMD_MEMZONE_F_256KB | MEMD_MEMZONE_F_256MB | MEMD_MEMZONE_F_512MB | MEMD_MEMZONE_F_4GB)
#define MEMD_MEMZONE_F_ALL \
    (MEMD_MEMZONE_F_PAGE_SIZES | MEMD_MEMZONE_F_SIZE_HINT_ONLY | MEMD_MEMZONE_F_IOVA_CONTIG)

/* --- the config ----------------------------------------------------------- */

struct memd_config {
    struct memd_config_header hdr;                       /*       0 */
    struct memd_lock config_lock;                        /*     256: memsegs, memzones, objects */
    struct memd_lock proc_lock;                          /*     320: procs[] */
    uint8_t reserved[4096 - 384];                        /*     384 */
    struct memd_heap heaps[MEMD_MAX_HEAPS];              /*    4096 */
    struct memd_process procs[MEMD_MAX_PROCS];           /*    8192 */
    struct memd_object objects[MEMD_MAX_OBJECTS];        /*   16384 */
    struct memd_memzone memzones[MEMD_MAX_MEMZONES];     /*  180224 */
    struct memd_memseg_list msls[MEMD_MAX_MEMSEG_LISTS]; /*  425984 */
    struct memd_heap_journal heap_journals[MEMD_MAX_HEAPS]; /* 1484800: one per heap */
    struct memd_proc_pins pins[MEMD_PIN_ROWS]; /* 1517568: one per process slot, then fork rows */
}; /* 1714176 */

/* --- rings (DPDK: rte_ring; code in ext/ring.c) ---------------------------- */

/*
 * A ring lives at some window offset (inside a memzone "RG_<name>"): this header,
 * then `size` slots of `esize` bytes each (DPDK: rte_ring_create_elem; esize is a
 * multiple of 4; 8 is the ring of unsigned 64-bit entries, the default).  Head and
 * tail counters are 32-bit and run freely, wrapping modulo 2^32; slot = counter &
 * mask.  Producers own `prod`, consumers own `cons`, each on its own cache line with
 * an empty line between them, so the two sides never write to a line the other side
 * writes.  The wait lines are written only when somebody goes to sleep.
 *
 * Crash safety: every operation starts from its side's *tail*, the last counter
 * handed to the other side, never from head.  A multi-producer (-consumer) side
 * is serialised by `lock`, a small robust lock whose word names its owner
 * process; a waiter that finds the owner dead takes the lock over.  So a process
 * killed inside an operation loses only what it had in hand: a producer's
 * unpublished entries are simply overwritten, a consumer's unreleased entries stay
 * in the ring and are delivered again.
 */
/*
 * Identity tags: ring_init and mempool_init give every ring and pool a random
 * non-zero 64-bit tag; freeing one (ring_free, mempool_free) overwrites every copy
 * with MEMD_TAG_FREED before its memory goes back to the heap.  A handle (Ring,
 * Mempool) keeps the tag it validated and compares it on every call, in a cache
 * line that call touches anyway: a handle kept past a free (here or in another
 * process), even past a re-create at the same offset, raises instead of moving
 * entries in memory that is no longer its ring's.  A handle pins its memory's
 * pages (view pins), so the compare never reads a page that was given back.
 */
#define MEMD_TAG_FREED 0ull

#define MEMD_RING_MAGIC      0x33474e49524d454dULL /* "MEMRING3", little endian (3: esize) */
#define MEMD_RING_F_SP_ENQ   0x1u                  /* one producer at a time: no lock on prod */
#define MEMD_RING_F_SC_DEQ   0x2u                  /* one consumer at a time: no lock on cons */
#define MEMD_RING_F_EXACT_SZ 0x4u /* capacity = count exactly (slots: next 2^k > count) */
#define MEMD_RING_F_ALL      (MEMD_RING_F_SP_ENQ | MEMD_RING_F_SC_DEQ | MEMD_RING_F_EXACT_SZ)
#define MEMD_RING_SZ_MASK    0x7fffffffu /* DPDK RTE_RING_SZ_MASK: slots <= this, so <= 2^30 */
#define MEMD_RING_ESIZE_U64  8u          /* esize of the default ring: uint64 entries */

/* A side's lock word: 0 = free, else the owner's pid in the low 32 bits and the
 * low 32 bits of its start time (field 22 of /proc/<pid>/stat, clock ticks; 0 if
 * unknown) in the high ones, so that a reused pid is not taken for the owner. */
#define MEMD_RING_LOCK_PID(w)   ((int32_t)(uint32_t)(w))
#define MEMD_RING_LOCK_START(w) ((uint32_t)((w) >> 32))

struct memd_ring_wait {       /* a futex that waiters sleep on until somebody moves */
    _Atomic uint32_t seq;     /*  0: futex word; bumped before each wake */
    _Atomic uint32_t waiters; /*  4: processes about to sleep or sleeping on seq */
    _Atomic uint64_t sleeps;  /*  8: times somebody went to sleep (stats) */
    _Atomic uint64_t wakes;   /* 16: FUTEX_WAKE calls made for this side (stats) */
    _Atomic uint32_t armed;   /* 24: 1 = a waiter wants a wake; the waker clears it, so
                                     one wake serves everyone asleep at that moment */
    _Atomic uint32_t want;    /* 28: the fewest entries (free slots) an armed waiter of
                                     not_empty (not_full) can use: a move that leaves fewer
                                     wakes nobody; a wake resets it to UINT32_MAX */
}; /* 32 */

struct memd_ring_headtail {          /* one side of a ring: the producers' or the consumers' */
    _Atomic uint32_t head;           /*  0: end of the slots the running (or a dead) operation
                                            claimed; diagnostics only: nothing computes from it */
    _Atomic uint32_t tail;           /*  4: every slot before it is handed to the other side */
    uint32_t single;                 /*  8: 1 = single producer/consumer (no lock) */
    uint32_t other_tail;             /* 12: the other side's tail as last read (written only by
                                            this side's lock holder / single user), so its cache
                                            line is read only when this copy says full
                                            (producer) or empty (consumer) */
    _Atomic uint64_t lock;           /* 16: multi mode: 0 = free, else the owner (see
                                            MEMD_RING_LOCK_PID / _START) */
    _Atomic uint64_t tag;            /* 24: the ring's identity tag (the same on both sides,
                                            so each side checks the line it writes anyway);
                                            MEMD_TAG_FREED once the ring is freed */
    struct memd_ring_wait lock_wait; /* 32: processes waiting for `lock` sleep here */
}; /* 64 */

struct memd_ring {
    _Atomic uint64_t magic;           /*   0: MEMD_RING_MAGIC, stored last (release) */
    char name[MEMD_NAMESIZE];         /*   8 */
    uint32_t flags;                   /*  40: MEMD_RING_F_* as created */
    uint32_t size;                    /*  44: slots, a power of two */
    uint32_t mask;                    /*  48: size - 1 */
    uint32_t capacity;                /*  52: usable slots: size - 1, or count if EXACT_SZ */
    uint64_t memsize;                 /*  56: bytes from the header to the last slot's end */
    uint32_t esize;                   /*  64: bytes per slot, a multiple of 4 */
    _Atomic uint32_t prod_recoveries; /*  68: producer locks taken over from a dead owner */
    _Atomic uint32_t cons_recoveries; /*  72: consumer locks taken over from a dead owner */
    uint8_t pad0[52];                 /*  76: keeps prod off the config line's neighbour */
    struct memd_ring_headtail prod;   /* 128 */
    uint8_t pad1[64];                 /* 192 */
    struct memd_ring_headtail cons;   /* 256 */
    uint8_t pad2[64];                 /* 320 */
    struct memd_ring_wait not_empty;  /* 384: consumers sleep here for entries */
    struct memd_ring_wait not_full;   /* 416: producers sleep here for room */
    uint8_t pad3[64];                 /* 448 */
    uint64_t slots[];                 /* 512: `size` entries of esize bytes (8-byte aligned) */
}; /* 512 + esize * size */

/* --- mempools (DPDK: rte_mempool; code in ext/mempool.c) ------------------ */

/*
 * One mempool is one block of memory (memzone "MP_<name>") at window offset
 * `pool`:
 *     pool + 0                  struct memd_mempool (this header)
 *     pool + caches_offset      MEMD_MAX_PROCS x cache (stride cache_stride;
 *                               absent when cache_size is 0)
 *     pool + private_offset     private_data_size bytes for the user
 *     pool + ring_offset        struct memd_ring of the free objects (EXACT_SZ, n)
 *     pool + objs_offset        n x [objhdr | data (elt_size) | trailer | pad],
 *                               each obj_stride bytes, 64-byte aligned
 * An object's *handle* is the window offset of its data (its objhdr sits just
 * before): handles are what rings carry and what every process understands.
 * Cache i belongs to process slot i (struct memd_config.procs[i]); it is a LIFO
 * stack of handles used before the ring and flushed to it past flushthresh.
 */
/*
 * Objects in flight.  A get or put moves objects between the ring, a cache and
 * the caller's hands in steps: a process killed between two steps leaves FREE
 * objects that are in no ring and no cache, lost to everyone (DPDK loses them
 * too).  Only a look at the pool while nobody moves its objects tells those
 * from objects a live process is moving right now.  So every move (get, put,
 * flush) is bracketed in the mover's slot row: pool_moving odd, and
 * pool_moving_at the pool, for its duration (a seqlock per process).
 * memd_mempool_recover and _audit find a quiet moment: they set the pool's
 * `recovering` word (one at a time); a move that starts while it is set backs
 * off (-EBUSY: its caller waits) until the time the word names, at most
 * MEMD_MEMPOOL_RECOVER_HOLD_MS(n) after it was set, so that a stopped recoverer
 * cannot stop the pool; a mover that finds a hold over (by its own clock: time
 * namespaces differ), too far ahead or its holder dead takes the word away.
 * Having set it, the recoverer takes a MEMBARRIER_CMD_GLOBAL_EXPEDITED: every
 * registered mover's odd word is visible to it from then on, or the mover sees
 * `recovering` (an asymmetric Dekker pair: the movers' side costs no fence).  The recoverer waits
 * until no row is odd in this pool (giving up after MEMD_MEMPOOL_QUIET_WAIT_MS: a mover stopped
 * mid-move must not keep the pool held; rows of free slots and dead processes count as quiet),
 * walks it, and trusts the walk if its word stayed there and the hold is not over (for a process
 * that takes no barriers, or past the hold: if its row did not change meanwhile).  What the trusted
 * walk found lost it puts back after the hold, its own row still odd (lost objects stay lost:
 * nobody else can reach them).  After a hold the word names a pause (no pid)
 * MEMD_MEMPOOL_RECOVER_PAUSE times as long as the hold took, with no new hold: recovers in a loop
 * cannot starve the movers.  The primary clears a dead process's row when it frees its slot, then
 * recovers the pool the row named.
 */
/* a walk takes about 10 ns an object: 20 ms, and 1 ms more per 16384 objects */
#define MEMD_MEMPOOL_RECOVER_HOLD_MS(n) (20u + (uint32_t)(n) / 16384u)
#define MEMD_MEMPOOL_QUIET_WAIT_MS      2u
#define MEMD_MEMPOOL_RECOVER_PAUSE      4u /* then no hold for 4 times as long */
/* the recovering word: pid (< 2^22) and the CLOCK_MONOTONIC millisecond the hold
 * ends */
#define MEMD_MEMPOOL_RECOVERING(pid, until_ms) \
    ((uint64_t)(uint32_t)(pid) | ((uint64_t)(until_ms) << MEMD_PIN_OWNER_PID_BITS))

#define MEMD_MEMPOOL_MAGIC            0x314c4f4f504d454dULL /* "MEMPOOL1" */
#define MEMD_MEMPOOL_HDR_COOKIE_FREE  0x45455246444d454dULL /* "MEMDFREE": in the pool */
#define MEMD_MEMPOOL_HDR_COOKIE_BUSY  0x59535542444d454dULL /* "MEMDBUSY": handed out */
#define MEMD_MEMPOOL_TRAILER_COOKIE   0x4c49415254444d45ULL /* "EMDTRAIL" */
#define MEMD_MEMPOOL_CACHE_MAX_SIZE   512u                  /* DPDK: RTE_MEMPOOL_CACHE_MAX_SIZE */
#define MEMD_MEMPOOL_F_NO_SPREAD      0x1u                  /* accepted, no effect (DPDK value) */
#define MEMD_MEMPOOL_F_NO_CACHE_ALIGN 0x2u  /* accepted, no effect: objects stay aligned */
#define MEMD_MEMPOOL_F_SP_PUT         0x4u  /* the free ring is single-producer */
#define MEMD_MEMPOOL_F_SC_GET         0x8u  /* the free ring is single-consumer */
#define MEMD_MEMPOOL_F_NO_IOVA_CONTIG 0x20u /* accepted, no effect */
#define MEMD_MEMPOOL_F_ALL            0x2fu

struct memd_mempool {
    _Atomic uint64_t magic;      /*   0: MEMD_MEMPOOL_MAGIC, stored last (release) */
    char name[MEMD_NAMESIZE];    /*   8 */
    uint32_t n;                  /*  40: objects */
    uint32_t elt_size;           /*  44: bytes of data per object, as asked */
    uint32_t cache_size;         /*  48: per-process cache target (0 = no caches) */
    uint32_t flushthresh;        /*  52: cache_size * 3 / 2 */
    uint32_t private_data_size;  /*  56 */
    uint32_t flags;              /*  60: MEMD_MEMPOOL_F_* */
    uint64_t caches_offset;      /*  64: from the pool header; 0 = no caches */
    uint64_t cache_stride;       /*  72: bytes per cache */
    uint64_t private_offset;     /*  80: from the pool header */
    uint64_t ring_offset;        /*  88: from the pool header */
    uint64_t objs_offset;        /*  96: from the pool header: first objhdr */
    uint64_t obj_stride;         /* 104: bytes per object (header + data + trailer) */
    uint64_t trailer_offset;     /* 112: from an object's data to its trailer cookie */
    uint64_t memsize;            /* 120: bytes of the whole block */
    _Atomic uint64_t tag;        /* 128: identity tag (see "identity tags"), also in every
                                         cache and both sides of the free ring */
    _Atomic uint64_t recovering; /* 136: MEMD_MEMPOOL_RECOVERING() of a process checking
                                         for objects in flight; 0 = none */
    uint64_t reserved[14];       /* 144 */
}; /* 256 */

struct memd_mempool_cache { /* one per process slot */
    _Atomic uint32_t len;   /*  0: handles in objs[] (its owner writes; all read) */
    int32_t owner_pid;      /*  4: last process that used it (diagnostics) */
    uint64_t gets;          /*  8: objects served from this cache (stats) */
    uint64_t puts;          /* 16: objects put into this cache (stats) */
    _Atomic uint64_t tag;   /* 24: the pool's identity tag: checked on the line get/put
                                   touch anyway */
    uint64_t reserved[4];   /* 32 */
    uint64_t objs[];        /* 64: 2 * cache_size handles (room for a refill) */
}; /* 64 + 16 * cache_size, rounded up to 64 */

struct memd_mempool_objhdr { /* the 64 bytes before each object's data */
    uint64_t pool_offset;    /*  0: window offset of its struct memd_mempool */
    uint64_t cookie;         /*  8: MEMD_MEMPOOL_HDR_COOKIE_FREE or _BUSY */
    uint32_t index;          /* 16: 0..n-1, the obj_init index */
    int32_t owner_pid;       /* 20: the process that last got it (set on get, kept
                                    on put): Mempool.held_by / reclaim_held_by */
    uint64_t reserved[5];    /* 24 */
}; /* 64 */

/* --- layout checks -------------------------------------------------------- */

#define MEMD_CHECK(type, field, off) \
    _Static_assert(offsetof(type, field) == (off), #type "." #field " moved")
#define MEMD_CHECK_SIZE(type, size) _Static_assert(sizeof(type) == (size), #type " changed size")

MEMD_CHECK(struct memd_config_header, magic, 0);
MEMD_CHECK(struct memd_config_header, state, 12);
MEMD_CHECK(struct memd_config_header, primary_start_time, 24);
MEMD_CHECK(struct memd_config_header, mem_generation, 64);
MEMD_CHECK(struct memd_config_header, prefix, 104);
MEMD_CHECK_SIZE(struct memd_config_header, 256);
MEMD_CHECK(struct memd_lock, owner_pid, 56);
MEMD_CHECK_SIZE(struct memd_lock, 64);
_Static_assert(sizeof(pthread_mutex_t) <= 56, "pthread_mutex_t does not fit memd_lock");
MEMD_CHECK_SIZE(struct memd_memseg, 16);
MEMD_CHECK(struct memd_memseg_list, version, 32);
MEMD_CHECK(struct memd_memseg_list, releasing_first, 40);
MEMD_CHECK(struct memd_memseg_list, dir, 64);
MEMD_CHECK(struct memd_memseg_list, used_bitmap, 256);
MEMD_CHECK(struct memd_memseg_list, segs, 1280);
MEMD_CHECK_SIZE(struct memd_memseg_list, 132352);
MEMD_CHECK(struct memd_heap, free_head, 80);
MEMD_CHECK(struct memd_heap, total_size, 208);
MEMD_CHECK(struct memd_heap, socket_id, 240);
MEMD_CHECK(struct memd_heap, broken, 244);
MEMD_CHECK(struct memd_heap, list_mask, 248);
MEMD_CHECK(struct memd_heap, alloc_serial, 252);
_Static_assert(MEMD_HEAP_NUM_FREELISTS <= 32, "memd_heap.list_mask is 32 bits");
_Static_assert(offsetof(struct memd_heap, total_size) >= MEMD_HEAP_COUNTERS_LINE &&
                   offsetof(struct memd_heap, alloc_serial) < MEMD_HEAP_COUNTERS_LINE + 64 &&
                   MEMD_HEAP_COUNTERS_LINE % 64 == 0,
               "the heap's counters, list_mask and alloc_serial share one 64-byte line");
MEMD_CHECK_SIZE(struct memd_heap, 512);
MEMD_CHECK(struct memd_heap_elem, state, 4);
MEMD_CHECK(struct memd_heap_elem, heap, 5);
MEMD_CHECK(struct memd_heap_elem, prev, 8);
MEMD_CHECK(struct memd_heap_elem, next, 16);
MEMD_CHECK(struct memd_heap_elem, size, 24);
MEMD_CHECK(struct memd_heap_elem, u.free.prev, 32);
MEMD_CHECK(struct memd_heap_elem, u.free.next, 40);
MEMD_CHECK(struct memd_heap_elem, u.free.dirty_lo, 48);
MEMD_CHECK(struct memd_heap_elem, u.free.dirty_hi, 56);
MEMD_CHECK(struct memd_heap_elem, flags, 6);
MEMD_CHECK(struct memd_heap_elem, u.busy.data_size, 32);
MEMD_CHECK(struct memd_heap_elem, u.busy.owner_pid, 40);
MEMD_CHECK(struct memd_heap_elem, u.busy.serial, 44);
MEMD_CHECK(struct memd_heap_elem, u.busy.reserved, 48);
MEMD_CHECK_SIZE(struct memd_heap_elem, MEMD_ELEM_HEADER_SIZE);
_Static_assert(MEMD_MAX_HEAPS <= 256, "memd_heap_elem.heap is one byte");
MEMD_CHECK_SIZE(struct memd_heap_journal_entry, 16);
MEMD_CHECK(struct memd_heap_journal, overflow, 4);
MEMD_CHECK(struct memd_heap_journal, rollbacks, 8);
MEMD_CHECK(struct memd_heap_journal, undone, 16);
MEMD_CHECK(struct memd_heap_journal, e, 64);
MEMD_CHECK_SIZE(struct memd_heap_journal, 4096);
MEMD_CHECK(struct memd_process, comm, 32);
MEMD_CHECK_SIZE(struct memd_process, 64);
MEMD_CHECK(struct memd_object, offset, 40);
MEMD_CHECK_SIZE(struct memd_object, 64);
MEMD_CHECK(struct memd_memzone, offset, 32);
MEMD_CHECK(struct memd_memzone, elem_offset, 72);
MEMD_CHECK(struct memd_memzone, generation, 84);
MEMD_CHECK_SIZE(struct memd_memzone, 96);
MEMD_CHECK(struct memd_config, config_lock, 256);
MEMD_CHECK(struct memd_config, proc_lock, 320);
MEMD_CHECK(struct memd_config, heaps, 4096);
MEMD_CHECK(struct memd_config, procs, 8192);
MEMD_CHECK(struct memd_config, objects, 16384);
MEMD_CHECK(struct memd_config, memzones, 180224);
MEMD_CHECK(struct memd_config, msls, 425984);
MEMD_CHECK(struct memd_config, heap_journals, 1484800);
MEMD_CHECK(struct memd_config, pins, 1517568);
MEMD_CHECK_SIZE(struct memd_config, 1714176);
MEMD_CHECK(struct memd_pin, count, 8);
MEMD_CHECK_SIZE(struct memd_pin, 16);
MEMD_CHECK(struct memd_proc_pins, overflow, 8);
MEMD_CHECK(struct memd_proc_pins, owner, 16);
MEMD_CHECK(struct memd_proc_pins, pool_moving, 24);
MEMD_CHECK(struct memd_proc_pins, pool_moving_at, 32);
MEMD_CHECK(struct memd_proc_pins, pool_barrier, 40);
MEMD_CHECK(struct memd_proc_pins, parent, 48);
MEMD_CHECK(struct memd_proc_pins, e, 64);
MEMD_CHECK_SIZE(struct memd_proc_pins, 1024);
_Static_assert(sizeof(struct memd_config) <= MEMD_CONFIG_SIZE, "config outgrew its file");
MEMD_CHECK(struct memd_ring_headtail, tail, 4);
MEMD_CHECK(struct memd_ring_headtail, single, 8);
MEMD_CHECK(struct memd_ring_headtail, other_tail, 12);
MEMD_CHECK(struct memd_ring_headtail, lock, 16);
MEMD_CHECK(struct memd_ring_headtail, tag, 24);
MEMD_CHECK(struct memd_ring_headtail, lock_wait, 32);
_Static_assert(sizeof(_Atomic uint64_t) == 8 && _Alignof(_Atomic uint64_t) == 8,
               "the ring lock word must be a naturally aligned 8-byte atomic");
MEMD_CHECK_SIZE(struct memd_ring_headtail, 64);
MEMD_CHECK(struct memd_ring_wait, waiters, 4);
MEMD_CHECK(struct memd_ring_wait, wakes, 16);
MEMD_CHECK(struct memd_ring_wait, armed, 24);
MEMD_CHECK_SIZE(struct memd_ring_wait, 32);
MEMD_CHECK(struct memd_ring, name, 8);
MEMD_CHECK(struct memd_ring, flags, 40);
MEMD_CHECK(struct memd_ring, capacity, 52);
MEMD_CHECK(struct memd_ring, memsize, 56);
MEMD_CHECK(struct memd_ring, esize, 64);
MEMD_CHECK(struct memd_ring, prod_recoveries, 68);
MEMD_CHECK(struct memd_ring, cons_recoveries, 72);
MEMD_CHECK(struct memd_ring, prod, 128);
MEMD_CHECK(struct memd_ring, cons, 256);
MEMD_CHECK(struct memd_ring, not_empty, 384);
MEMD_CHECK(struct memd_ring, not_full, 416);
MEMD_CHECK(struct memd_ring_wait, want, 28);
MEMD_CHECK(struct memd_ring, slots, 512);
MEMD_CHECK_SIZE(struct memd_ring, 512);
_Static_assert(sizeof(_Atomic uint32_t) == 4 && sizeof(_Atomic uint64_t) == 8,
               "atomics must have their plain sizes in shared memory");
MEMD_CHECK(struct memd_mempool, n, 40);
MEMD_CHECK(struct memd_mempool, flags, 60);
MEMD_CHECK(struct memd_mempool, caches_offset, 64);
MEMD_CHECK(struct memd_mempool, ring_offset, 88);
MEMD_CHECK(struct memd_mempool, objs_offset, 96);
MEMD_CHECK(struct memd_mempool, memsize, 120);
MEMD_CHECK(struct memd_mempool, tag, 128);
MEMD_CHECK(struct memd_mempool, recovering, 136);
MEMD_CHECK_SIZE(struct memd_mempool, 256);
MEMD_CHECK(struct memd_mempool_cache, gets, 8);
MEMD_CHECK(struct memd_mempool_cache, tag, 24);
MEMD_CHECK(struct memd_mempool_cache, objs, 64);
MEMD_CHECK_SIZE(struct memd_mempool_cache, 64);
MEMD_CHECK(struct memd_mempool_objhdr, cookie, 8);
MEMD_CHECK(struct memd_mempool_objhdr, index, 16);
MEMD_CHECK(struct memd_mempool_objhdr, owner_pid, 20);
MEMD_CHECK_SIZE(struct memd_mempool_objhdr, 64);

/*
 * Heap elements live in heap memory; their layout is the "heap elements" section
 * above.  Rings and mempools also live in heap memory; their layouts follow in
 * the sections of ext/ring.h and ext/mempool.h, which this header includes so
 * that there is still one place to look.
 */

#endif /* MEMD_LAYOUT_H */
