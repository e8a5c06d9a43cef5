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
 * (overflowed, or its owner is stopped in the middle of a write). */
int memd_pins_read(const char *base, uint32_t slot, uint64_t (*out)[2]);

#endif
