/*
 * pins.h - view pins (layout and rules: "view pins" in memd_layout.h).  A process
 * pins the pages under each view it exports; the primary reads every row before
 * it gives pages back.  `base` is the window address; no function takes a lock.
 */
#ifndef MEMD_PINS_H
#define MEMD_PINS_H

#include <stdint.h>

#include "memd_layout.h"

#define MEMD_PIN_NONE     (-1)                      /* tag: nothing pinned (the config) */
#define MEMD_PIN_OVERFLOW ((int)MEMD_PINS_PER_PROC) /* tag: counted in the row's overflow */

/* Pin [off, off+len) in row `slot` (< MEMD_MAX_PROCS); *tag is what memd_pin_drop
 * takes.  Fails with -EFAULT (pin undone) iff a page of the range is not in use:
 * it was given back, or is about to be. */
int memd_pin_add(char *base, uint32_t slot, uint64_t off, uint64_t len, int *tag);

/* Undo one memd_pin_add of row `slot`. */
void memd_pin_drop(char *base, uint32_t slot, int tag);

/* The primary marks slots [first, first + n) of list idx as being given back
 * (before it clears their used bits: views may still pin them while memory event
 * callbacks run), and n = 0 before its last look at the pins (then a view of an
 * unused slot is refused).  Fails iff -EINVAL (idx). */
int memd_msl_releasing(char *base, uint32_t idx, uint32_t first, uint32_t n);

/* Row `slot`'s pinned ranges as window offsets [lo, hi) into out (at most
 * MEMD_PINS_PER_PROC); returns how many, or -EAGAIN when the row pins every page
 * (overflowed, or its owner is in the middle of a write).  `stuck`: the reader
 * found the row mid-write before, long ago (its writer is stopped, or it is not
 * memd's writing): a row that stays mid-write is read as it is.  That is safe
 * for a writer stopped mid-pin: it checks the pages after its write (the Dekker
 * pair) and refuses the view of a page given back meanwhile. */
int memd_pins_read(const char *base, uint32_t slot, uint64_t (*out)[2], int stuck);

/* 1 iff row `slot`'s seqlock is odd now (its owner is writing it). */
int memd_pins_odd(const char *base, uint32_t slot);

/* Fork rows (memd_layout.h, "view pins").  Before a fork, the owner of row `src`
 * (a process slot's or a fork row) copies it into a free fork row claimed for
 * `owner` (MEMD_PIN_OWNER of itself), recording `owner` as the row's parent;
 * returns the row, -ENOENT when `src` pins nothing (nothing to claim), -EDQUOT
 * when `owner` already is the parent of MEMD_FORK_ROWS_PER_PROC rows in use,
 * -ENOSPC when no fork row is free. */
int memd_pin_fork_claim(char *base, uint32_t src, uint64_t owner);

/* The child takes row `row` over: CAS owner `from` (the parent's) -> `to` (its
 * own).  0, or -ESRCH if the row is not the parent's any more (reaped). */
int memd_pin_fork_adopt(char *base, uint32_t row, uint64_t from, uint64_t to);

/* Fork row `row`'s owner word (0: free, MEMD_PIN_OWNER_REAPING); 0 for other rows. */
uint64_t memd_pin_fork_owner(const char *base, uint32_t row);

/* The primary frees fork row `row` of a dead `owner` (its pins drop).  0, -EBUSY
 * if the owner word changed meanwhile (nothing done), -EINVAL. */
int memd_pin_fork_reap(char *base, uint32_t row, uint64_t owner);

#endif
