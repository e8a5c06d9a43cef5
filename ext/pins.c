/*
 * pins.c - view pins: which pages some process's views still cover (memd_layout.h,
 * "view pins").  The owner of a row is its only writer; the primary reads rows
 * with the seqlock's retry rule.
 */
#include "pins.h"

#include <errno.h>
#include <stdatomic.h>

#include "config.h"

#define U32(p) ((_Atomic uint32_t *)(p))

/* 1 iff every page of [off, off+len) inside a memseg list is in use, or on its
 * way out but not yet punched (releasing: memory event callbacks hear FREE then
 * and may view the pages); read after the caller's fence.  Pages outside the
 * lists are memd's config or nothing, never given back. */
static int range_in_use(const char *base, uint64_t off, uint64_t len)
{
    const struct memd_config *c = (const struct memd_config *)base;
    uint64_t end = off + (len ? len : 1);
    for (uint32_t i = 0; i < c->hdr.n_memseg_lists && i < MEMD_MAX_MEMSEG_LISTS; i++) {
        const struct memd_memseg_list *l = &c->msls[i];
        uint64_t ps = l->page_size, cap = l->capacity;
        if (ps == 0 || cap > MEMD_MAX_PAGES_PER_LIST)
            continue;
        uint64_t lo = l->base_offset, hi = lo + cap * ps;
        if (end <= lo || off >= hi)
            continue;
        uint64_t s0 = (off > lo ? off - lo : 0) / ps, s1 = ((end < hi ? end : hi) - 1 - lo) / ps;
        uint64_t rel_n = __atomic_load_n(&l->releasing_n, __ATOMIC_RELAXED);
        uint64_t rel_first = __atomic_load_n(&l->releasing_first, __ATOMIC_RELAXED);
        for (uint64_t s = s0; s <= s1; s++) {
            uint64_t w = __atomic_load_n(&l->used_bitmap[s / 64], __ATOMIC_RELAXED);
            if (!((w >> (s % 64)) & 1u) && !(s >= rel_first && s - rel_first < rel_n))
                return 0;
        }
    }
    return 1;
}

int memd_pin_add(char *base, uint32_t slot, uint64_t off, uint64_t len, int *tag)
{
    struct memd_config *c = memd_cfg(base);
    if (slot >= MEMD_PIN_ROWS)
        return -EINVAL;
    uint64_t end = off + (len ? len : 1);
    if (end <= MEMD_CONFIG_SIZE) {
        *tag = MEMD_PIN_NONE; /* the config is never given back */
        return 0;
    }
    struct memd_proc_pins *r = &c->pins[slot];
    uint64_t lo = off / MEMD_PIN_UNIT, hi = (end + MEMD_PIN_UNIT - 1) / MEMD_PIN_UNIT;
    uint32_t first = (uint32_t)lo, n = (uint32_t)(hi - lo);
    uint32_t nh = r->n_hint < MEMD_PINS_PER_PROC ? r->n_hint : MEMD_PINS_PER_PROC;
    int free_i = -1;
    for (uint32_t i = 0; i < nh; i++) {
        struct memd_pin *p = &r->e[i];
        uint32_t cnt = atomic_load_explicit(&p->count, memory_order_relaxed);
        if (cnt == 0) {
            if (free_i < 0)
                free_i = (int)i;
        } else if (p->first == first && p->n == n && cnt < UINT32_MAX) {
            /* the range has been pinned all along: its pages cannot have gone */
            atomic_store_explicit(&p->count, cnt + 1, memory_order_relaxed);
            *tag = (int)i;
            return 0;
        }
    }
    if (free_i < 0 && nh < MEMD_PINS_PER_PROC)
        free_i = (int)nh;
    if (free_i < 0) {
        atomic_fetch_add_explicit(&r->overflow, 1, memory_order_seq_cst);
        *tag = MEMD_PIN_OVERFLOW;
    } else {
        struct memd_pin *p = &r->e[free_i];
        uint64_t s = atomic_load_explicit(&r->seq, memory_order_relaxed);
        atomic_store_explicit(&r->seq, s + 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_release);
        __atomic_store_n(&p->first, first, __ATOMIC_RELAXED);
        __atomic_store_n(&p->n, n, __ATOMIC_RELAXED);
        atomic_store_explicit(&p->count, 1, memory_order_relaxed);
        if ((uint32_t)free_i >= nh)
            r->n_hint = (uint32_t)free_i + 1;
        /* seq_cst read-modify-write: the end of the write and the Dekker fence
         * below in one locked instruction */
        atomic_fetch_add_explicit(&r->seq, 1, memory_order_seq_cst);
        *tag = free_i;
    }
    /* Dekker with the primary's release: pin, fence (the seq_cst RMW above), then
     * look at the used bits */
    if (!range_in_use(base, off, len)) {
        memd_pin_drop(base, slot, *tag);
        return -EFAULT;
    }
    return 0;
}

void memd_pin_drop(char *base, uint32_t slot, int tag)
{
    if (slot >= MEMD_PIN_ROWS || tag == MEMD_PIN_NONE || tag < 0 || tag > (int)MEMD_PINS_PER_PROC)
        return;
    struct memd_proc_pins *r = &memd_cfg(base)->pins[slot];
    _Atomic uint32_t *cnt = tag == MEMD_PIN_OVERFLOW ? &r->overflow : &r->e[tag].count;
    uint32_t v = atomic_load_explicit(cnt, memory_order_relaxed);
    if (v > 0) /* 0: the row was cleared under us (the slot was freed) */
        atomic_store_explicit(cnt, v - 1, memory_order_release);
}

int memd_msl_releasing(char *base, uint32_t idx, uint32_t first, uint32_t n)
{
    struct memd_config *c = memd_cfg(base);
    if (idx >= MEMD_MAX_MEMSEG_LISTS)
        return -EINVAL;
    struct memd_memseg_list *l = &c->msls[idx];
    if (n == 0) {
        /* Dekker: the marker goes before the primary reads the pins */
        __atomic_store_n(&l->releasing_n, 0, __ATOMIC_SEQ_CST);
        atomic_thread_fence(memory_order_seq_cst);
        return 0;
    }
    __atomic_store_n(&l->releasing_n, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&l->releasing_first, first, __ATOMIC_RELAXED);
    __atomic_store_n(&l->releasing_n, n, __ATOMIC_RELEASE);
    return 0;
}

/* The row's pinned entries as window ranges into out; returns how many.  The
 * caller decides whether they are a consistent snapshot (the seqlock). */
static int pins_copy(struct memd_proc_pins *r, uint64_t (*out)[2])
{
    int n = 0;
    for (uint32_t i = 0; i < MEMD_PINS_PER_PROC; i++) {
        if (atomic_load_explicit(&r->e[i].count, memory_order_relaxed) == 0)
            continue;
        uint64_t first = __atomic_load_n(&r->e[i].first, __ATOMIC_RELAXED);
        uint64_t units = __atomic_load_n(&r->e[i].n, __ATOMIC_RELAXED);
        out[n][0] = first * MEMD_PIN_UNIT;
        out[n][1] = (first + units) * MEMD_PIN_UNIT;
        n++;
    }
    return n;
}

/* The row's entries as they are, without the seqlock (a torn entry reads as
 * either its old or its new range: both are pins the reader may honour). */
static int pins_read_raw(struct memd_proc_pins *r, uint64_t (*out)[2])
{
    int n = pins_copy(r, out);
    return atomic_load_explicit(&r->overflow, memory_order_relaxed) ? -EAGAIN : n;
}

int memd_pins_odd(const char *base, uint32_t slot)
{
    if (slot >= MEMD_PIN_ROWS)
        return 0;
    struct memd_proc_pins *r =
        (struct memd_proc_pins *)&((const struct memd_config *)base)->pins[slot];
    return (int)(atomic_load_explicit(&r->seq, memory_order_acquire) & 1u);
}

int memd_pins_read(const char *base, uint32_t slot, uint64_t (*out)[2], int stuck)
{
    const struct memd_config *c = (const struct memd_config *)base;
    if (slot >= MEMD_PIN_ROWS)
        return -EINVAL;
    struct memd_proc_pins *r = (struct memd_proc_pins *)&c->pins[slot];
    atomic_thread_fence(memory_order_seq_cst); /* Dekker: used bits cleared before */
    for (unsigned tries = 0; tries < MEMD_PIN_SEQ_STABLE; tries++) {
        uint64_t s1 = atomic_load_explicit(&r->seq, memory_order_acquire);
        if (s1 & 1u)
            continue;
        uint32_t ov = atomic_load_explicit(&r->overflow, memory_order_relaxed);
        int n = pins_copy(r, out);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&r->seq, memory_order_relaxed) == s1)
            return ov ? -EAGAIN : n;
    }
    return stuck ? pins_read_raw(r, out) : -EAGAIN;
}

/* --- fork rows ------------------------------------------------------------- */

int memd_pin_fork_claim(char *base, uint32_t src, uint64_t owner)
{
    struct memd_config *c = memd_cfg(base);
    if (src >= MEMD_PIN_ROWS || owner == 0 || owner == MEMD_PIN_OWNER_REAPING)
        return -EINVAL;
    struct memd_proc_pins *s = &c->pins[src]; /* ours: nobody else writes it */
    uint32_t nh = s->n_hint < MEMD_PINS_PER_PROC ? s->n_hint : MEMD_PINS_PER_PROC;
    int any = atomic_load_explicit(&s->overflow, memory_order_relaxed) != 0;
    for (uint32_t i = 0; i < nh && !any; i++)
        any = atomic_load_explicit(&s->e[i].count, memory_order_relaxed) != 0;
    if (!any)
        return -ENOENT;
    /* our share of the instance's table: rows we forked for, their children alive
     * or not yet reaped (a row being claimed or reaped has parent 0) */
    uint32_t ours = 0;
    for (uint32_t row = MEMD_MAX_PROCS; row < MEMD_PIN_ROWS; row++) {
        struct memd_proc_pins *d = &c->pins[row];
        uint64_t o = atomic_load_explicit(&d->owner, memory_order_acquire);
        if (o != 0 && o != MEMD_PIN_OWNER_REAPING &&
            atomic_load_explicit(&d->parent, memory_order_relaxed) == owner)
            ours++;
    }
    if (ours >= MEMD_FORK_ROWS_PER_PROC)
        return -EDQUOT;
    for (uint32_t row = MEMD_MAX_PROCS; row < MEMD_PIN_ROWS; row++) {
        struct memd_proc_pins *d = &c->pins[row];
        uint64_t expect = 0;
        if (!atomic_compare_exchange_strong(&d->owner, &expect, owner))
            continue;
        atomic_store_explicit(&d->parent, owner, memory_order_relaxed); /* kept by the child */
        uint64_t q = atomic_load_explicit(&d->seq, memory_order_relaxed);
        atomic_store_explicit(&d->seq, (q | 1u) + 2u, memory_order_relaxed); /* odd */
        atomic_thread_fence(memory_order_release);
        for (uint32_t i = 0; i < MEMD_PINS_PER_PROC; i++) {
            uint32_t cnt = i < nh ? atomic_load_explicit(&s->e[i].count, memory_order_relaxed) : 0;
            __atomic_store_n(&d->e[i].first, s->e[i].first, __ATOMIC_RELAXED);
            __atomic_store_n(&d->e[i].n, s->e[i].n, __ATOMIC_RELAXED);
            atomic_store_explicit(&d->e[i].count, cnt, memory_order_relaxed);
        }
        atomic_store_explicit(&d->overflow,
                              atomic_load_explicit(&s->overflow, memory_order_relaxed),
                              memory_order_relaxed);
        d->n_hint = nh;
        atomic_fetch_add_explicit(&d->seq, 1, memory_order_seq_cst); /* even */
        return (int)row;
    }
    return -ENOSPC;
}

int memd_pin_fork_adopt(char *base, uint32_t row, uint64_t from, uint64_t to)
{
    if (row < MEMD_MAX_PROCS || row >= MEMD_PIN_ROWS || from == 0 || to == 0)
        return -EINVAL;
    return atomic_compare_exchange_strong(&memd_cfg(base)->pins[row].owner, &from, to) ? 0 : -ESRCH;
}

uint64_t memd_pin_fork_owner(const char *base, uint32_t row)
{
    if (row < MEMD_MAX_PROCS || row >= MEMD_PIN_ROWS)
        return 0;
    struct memd_proc_pins *r =
        (struct memd_proc_pins *)&((const struct memd_config *)base)->pins[row];
    return atomic_load_explicit(&r->owner, memory_order_acquire);
}

int memd_pin_fork_reap(char *base, uint32_t row, uint64_t owner)
{
    if (row < MEMD_MAX_PROCS || row >= MEMD_PIN_ROWS || owner == 0 ||
        owner == MEMD_PIN_OWNER_REAPING)
        return -EINVAL;
    struct memd_proc_pins *r = &memd_cfg(base)->pins[row];
    if (!atomic_compare_exchange_strong(&r->owner, &owner, MEMD_PIN_OWNER_REAPING))
        return -EBUSY; /* taken over, or reaped, meanwhile */
    uint64_t q = atomic_load_explicit(&r->seq, memory_order_relaxed);
    atomic_store_explicit(&r->seq, (q | 1u) + 2u, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < MEMD_PINS_PER_PROC; i++)
        atomic_store_explicit(&r->e[i].count, 0, memory_order_relaxed);
    atomic_store_explicit(&r->overflow, 0, memory_order_relaxed);
    r->n_hint = 0;
    atomic_store_explicit(&r->parent, 0, memory_order_relaxed); /* before the row is free */
    atomic_fetch_add_explicit(&r->seq, 1, memory_order_seq_cst);
    atomic_store_explicit(&r->owner, 0, memory_order_release); /* free for the next fork */
    return 0;
}
