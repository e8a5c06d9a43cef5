/*
 * config.h - the mem_config in shared memory: header, memseg lists, memzones,
 * the process table and the named-object directory (layouts in memd_layout.h).
 *
 * Conventions: `base` is this process's window address (the config is at window
 * offset 0); results are >= 0 on success and -errno on failure.
 */
#ifndef MEMD_CONFIG_H
#define MEMD_CONFIG_H

#include <stdint.h>

#include "memd_layout.h"

static inline struct memd_config *memd_cfg(char *base) { return (struct memd_config *)base; }

/* Zero the config and write every header field but magic; state = INIT.
 * Fails iff a lock cannot be initialised. */
int memd_config_format(char *base, const char *prefix, uint32_t flags, uint32_t iova_mode,
                       uint64_t window_size, uint64_t window_align, int32_t pid,
                       uint64_t start_time);

/* state = READY, then magic (release): secondaries may attach from here on. */
void memd_config_publish(char *base);

/* Read magic with acquire order (pairs with memd_config_publish). */
uint64_t memd_config_magic(const char *base);

void memd_config_set_state(char *base, uint32_t state);

/* header.mem_generation with acquire order: changes whenever a page is mapped or
 * unmapped, so a process can skip re-reading the memseg lists when it has not. */
uint64_t memd_config_generation(const char *base);

/* Memseg lists.  Fails iff -EINVAL (index, alignment or capacity out of range). */
int memd_msl_init(char *base, uint32_t idx, uint64_t base_offset, uint64_t page_size,
                  int32_t socket_id, uint32_t capacity, const char *dir);

/* First slot of a run of n free slots at or after `from`; -ENOSPC if none. */
int64_t memd_msl_find_free(char *base, uint32_t idx, uint32_t n, uint32_t from);

/* Mark a slot mapped/unmapped; bumps the list version and mem_generation.
 * Fails iff -EINVAL (bad slot) or -EBUSY/-ENOENT (already used/free). */
int memd_msl_set_page(char *base, uint32_t idx, uint32_t slot, uint64_t iova, int32_t socket_id,
                      uint32_t flags);
int memd_msl_clear_page(char *base, uint32_t idx, uint32_t slot);

/* iova of a window offset (MEMD_BAD_IOVA if not in a mapped page). */
uint64_t memd_iova_of(const char *base, uint64_t off);

/* 1 if [off, off+len) has contiguous iova (always in VA mode), else 0. */
int memd_iova_contig(const char *base, uint64_t off, uint64_t len);

/* Bit k set for each page size 2^k a memzone's MEMD_MEMZONE_F_<size> flags ask for
 * (0: none asked, any size will do). */
uint64_t memd_memzone_page_mask(uint32_t flags);

/* Lock waits: the calls below that take config_lock or a heap lock wait for each
 * at most wait_ns.  -ETIMEDOUT: nothing was changed, *busy (if not NULL) is the
 * lock a live process holds; the caller (Python, without the GIL) looks for
 * signals and calls again, so that a stopped holder stalls nobody for good. */

/* Memzones (take config_lock; then the zone's heap lock).  reserve: len 0 is
 * DPDK's "as big as possible" (the bound's size with a bound, else the largest
 * block the heap has now); the page-size flags restrict the pages used unless
 * any_page_size.  Fails with -EINVAL (name, heap, unknown flag), -EEXIST,
 * -ENOSPC (table full), -ENOMEM (no room: grow the heap and retry), -ETIMEDOUT. */
int memd_memzone_reserve(char *base, const char *name, uint64_t len, uint32_t heap_idx,
                         uint32_t flags, int any_page_size, uint64_t align, uint64_t bound,
                         int32_t pid, uint64_t wait_ns, const struct memd_lock **busy);
/* No lock: a snapshot of the table (a slot's name is written last when it is
 * claimed and cleared first when it is freed), so a lookup never waits behind a
 * reserve that waits for a heap. */
int memd_memzone_lookup(char *base, const char *name);
/* free: -ENOENT also when generation (0: any) is not the zone's: the zone the
 * caller meant was freed and its slot reserved again. */
int memd_memzone_free(char *base, uint32_t id, uint32_t generation, uint64_t wait_ns,
                      const struct memd_lock **busy);

/* Processes (take proc_lock).  register returns the slot. */
int memd_proc_register(char *base, int32_t pid, uint64_t start_time, uint32_t state,
                       const char *comm, int want_slot);
int memd_proc_unregister(char *base, uint32_t slot, int32_t pid);

/* Named objects (add and remove take config_lock; lookup is a snapshot, no lock). */
int memd_object_add(char *base, const char *name, uint32_t type, uint32_t memzone_id,
                    uint64_t offset, int32_t pid, uint64_t wait_ns, const struct memd_lock **busy);
int memd_object_lookup(char *base, const char *name, uint32_t type);
int memd_object_remove(char *base, uint32_t idx, uint64_t wait_ns, const struct memd_lock **busy);
/* 1 if an object of `type` at `offset` is still listed in memzone mz_id, reserved
 * with generation mz_gen (a snapshot, no lock): it was not freed since a handle
 * bound to that zone was made (ring_free and mempool_free unlist it first, and a
 * re-made one has a newer zone).  0 otherwise.  A cold path's question: "was it
 * freed, or was its header overwritten?" */
int memd_object_listed(const char *base, uint32_t type, uint64_t offset, uint32_t mz_id,
                       uint32_t mz_gen);

#endif
