/* config.c - the mem_config in shared memory (see config.h). */
#include "config.h"

#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "heap.h"
#include "lock.h"

#define ATOMIC_U64(p) ((_Atomic uint64_t *)(p))
#define ATOMIC_U32(p) ((_Atomic uint32_t *)(p))

static void copy_name(char *dst, const char *src, size_t size)
{
    memset(dst, 0, size);
    strncpy(dst, src, size - 1);
}

/* A list's capacity, clamped to its arrays: shared memory is anyone's to write. */
static inline uint32_t list_capacity(const struct memd_memseg_list *l)
{
    return l->capacity < MEMD_MAX_PAGES_PER_LIST ? l->capacity : MEMD_MAX_PAGES_PER_LIST;
}

int memd_config_format(char *base, const char *prefix, uint32_t flags, uint32_t iova_mode,
                       uint64_t window_size, uint64_t window_align, int32_t pid,
                       uint64_t start_time)
{
    struct memd_config *c = memd_cfg(base);
    int rc;
    memset(c, 0, sizeof(*c));
    c->hdr.layout_version = MEMD_LAYOUT_VERSION;
    c->hdr.state = MEMD_STATE_INIT;
    c->hdr.primary_pid = pid;
    c->hdr.flags = flags;
    c->hdr.primary_start_time = start_time;
    c->hdr.config_size = MEMD_CONFIG_SIZE;
    c->hdr.window_size = window_size;
    c->hdr.window_align = window_align;
    c->hdr.iova_mode = iova_mode;
    c->hdr.primary_base = (uint64_t)(uintptr_t)base;
    copy_name(c->hdr.prefix, prefix, sizeof(c->hdr.prefix));
    if ((rc = memd_lock_init(&c->config_lock)) < 0 || (rc = memd_lock_init(&c->proc_lock)) < 0)
        return rc;
    for (uint32_t i = 0; i < MEMD_MAX_HEAPS; i++)
        if ((rc = memd_heap_init(base, &c->heaps[i], (int)i)) < 0)
            return rc;
    return 0;
}

void memd_config_publish(char *base)
{
    struct memd_config *c = memd_cfg(base);
    atomic_store_explicit(ATOMIC_U32(&c->hdr.state), MEMD_STATE_READY, memory_order_relaxed);
    /* release: everything written before is visible to a secondary that reads
     * magic with acquire (memd_config_magic). */
    atomic_store_explicit(ATOMIC_U64(&c->hdr.magic), MEMD_CONFIG_MAGIC, memory_order_release);
}

uint64_t memd_config_magic(const char *base)
{
    /* acquire: pairs with the release store in memd_config_publish. */
    return atomic_load_explicit(ATOMIC_U64(&((struct memd_config *)base)->hdr.magic),
                                memory_order_acquire);
}

uint64_t memd_config_generation(const char *base)
{
    /* acquire: pairs with the release increment in bump_versions(). */
    return atomic_load_explicit(ATOMIC_U64(&((struct memd_config *)base)->hdr.mem_generation),
                                memory_order_acquire);
}

void memd_config_set_state(char *base, uint32_t state)
{
    /* seq_cst: rare, and readers poll it without any other synchronisation. */
    atomic_store(ATOMIC_U32(&memd_cfg(base)->hdr.state), state);
}

/* --- memseg lists --------------------------------------------------------- */

static struct memd_memseg_list *msl_at(char *base, uint32_t idx)
{
    struct memd_config *c = memd_cfg(base);
    return idx < MEMD_MAX_MEMSEG_LISTS ? &c->msls[idx] : NULL;
}

int memd_msl_init(char *base, uint32_t idx, uint64_t base_offset, uint64_t page_size,
                  int32_t socket_id, uint32_t capacity, const char *dir)
{
    struct memd_config *c = memd_cfg(base);
    struct memd_memseg_list *l = msl_at(base, idx);
    if (l == NULL || page_size == 0 || (page_size & (page_size - 1)) || base_offset % page_size ||
        base_offset < MEMD_CONFIG_SIZE || capacity == 0 || capacity > MEMD_MAX_PAGES_PER_LIST ||
        base_offset + (uint64_t)capacity * page_size > c->hdr.window_size)
        return -EINVAL;
    memset(l, 0, sizeof(*l));
    l->base_offset = base_offset;
    l->page_size = page_size;
    l->socket_id = socket_id;
    l->capacity = capacity;
    copy_name(l->dir, dir ? dir : "", sizeof(l->dir));
    for (uint32_t s = 0; s < MEMD_MAX_PAGES_PER_LIST; s++)
        l->segs[s].iova = MEMD_BAD_IOVA;
    if (idx + 1 > c->hdr.n_memseg_lists)
        c->hdr.n_memseg_lists = idx + 1;
    return 0;
}

static int slot_used(const struct memd_memseg_list *l, uint32_t s)
{
    return (l->used_bitmap[s / 64] >> (s % 64)) & 1u;
}

int64_t memd_msl_find_free(char *base, uint32_t idx, uint32_t n, uint32_t from)
{
    struct memd_memseg_list *l = msl_at(base, idx);
    if (l == NULL || n == 0)
        return -EINVAL;
    uint32_t run = 0;
    for (uint32_t s = from; s < list_capacity(l); s++) {
        /* skip whole used words quickly */
        if (s % 64 == 0 && l->used_bitmap[s / 64] == UINT64_MAX && s + 64 <= list_capacity(l)) {
            run = 0;
            s += 63;
            continue;
        }
        run = slot_used(l, s) ? 0 : run + 1;
        if (run == n)
            return (int64_t)(s + 1 - n);
    }
    return -ENOSPC;
}

static void bump_versions(struct memd_config *c, struct memd_memseg_list *l)
{
    /* release: the segment fields written before are visible to whoever reads
     * the version/generation with acquire (secondary sync walks). */
    atomic_fetch_add_explicit(ATOMIC_U64(&l->version), 1, memory_order_release);
    atomic_fetch_add_explicit(ATOMIC_U64(&c->hdr.mem_generation), 1, memory_order_release);
}

int memd_msl_set_page(char *base, uint32_t idx, uint32_t slot, uint64_t iova, int32_t socket_id,
                      uint32_t flags)
{
    struct memd_config *c = memd_cfg(base);
    struct memd_memseg_list *l = msl_at(base, idx);
    if (l == NULL || slot >= list_capacity(l))
        return -EINVAL;
    if (slot_used(l, slot))
        return -EBUSY;
    l->segs[slot].iova = iova;
    l->segs[slot].socket_id = socket_id;
    l->segs[slot].flags = flags | MEMD_SEG_F_USED;
    l->used_bitmap[slot / 64] |= 1ull << (slot % 64);
    l->n_used++;
    bump_versions(c, l);
    return 0;
}

int memd_msl_clear_page(char *base, uint32_t idx, uint32_t slot)
{
    struct memd_config *c = memd_cfg(base);
    struct memd_memseg_list *l = msl_at(base, idx);
    if (l == NULL || slot >= list_capacity(l))
        return -EINVAL;
    if (!slot_used(l, slot))
        return -ENOENT;
    l->used_bitmap[slot / 64] &= ~(1ull << (slot % 64));
    l->segs[slot].flags = 0;
    l->segs[slot].iova = MEMD_BAD_IOVA;
    l->n_used--;
    bump_versions(c, l);
    return 0;
}

static const struct memd_memseg_list *msl_of(const char *base, uint64_t off, uint32_t *slot)
{
    const struct memd_config *c = (const struct memd_config *)base;
    for (uint32_t i = 0; i < c->hdr.n_memseg_lists && i < MEMD_MAX_MEMSEG_LISTS; i++) {
        const struct memd_memseg_list *l = &c->msls[i];
        uint64_t cap = list_capacity(l);
        if (l->page_size && off >= l->base_offset && off < l->base_offset + cap * l->page_size) {
            *slot = (uint32_t)((off - l->base_offset) / l->page_size);
            return l;
        }
    }
    return NULL;
}

uint64_t memd_iova_of(const char *base, uint64_t off)
{
    const struct memd_config *c = (const struct memd_config *)base;
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    if (l == NULL || !slot_used(l, slot))
        return MEMD_BAD_IOVA;
    if (c->hdr.iova_mode == MEMD_IOVA_VA)
        return c->hdr.primary_base + off;
    uint64_t iova = l->segs[slot].iova;
    return iova == MEMD_BAD_IOVA ? iova : iova + (off - l->base_offset) % l->page_size;
}

int memd_iova_contig(const char *base, uint64_t off, uint64_t len)
{
    const struct memd_config *c = (const struct memd_config *)base;
    if (c->hdr.iova_mode == MEMD_IOVA_VA || len == 0)
        return 1;
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    if (l == NULL)
        return 0;
    uint64_t last = (off - l->base_offset + len - 1) / l->page_size;
    if (last >= list_capacity(l))
        return 0;
    for (uint64_t s = slot; s < last; s++) {
        if (!slot_used(l, (uint32_t)s) || !slot_used(l, (uint32_t)s + 1) ||
            l->segs[s].iova == MEMD_BAD_IOVA ||
            l->segs[s + 1].iova != l->segs[s].iova + l->page_size)
            return 0;
    }
    return 1;
}

int memd_iova_aligned(const char *base, uint64_t off, uint64_t align)
{
    const struct memd_config *c = (const struct memd_config *)base;
    if (c->hdr.iova_mode != MEMD_IOVA_PA)
        return 1; /* VA mode: the primary's window is MEMD_MAX_ALIGN-aligned */
    uint64_t iova = memd_iova_of(base, off);
    return iova != MEMD_BAD_IOVA && (iova & (align - 1)) == 0;
}

uint64_t memd_iova_contig_len(const char *base, uint64_t off, uint64_t len)
{
    const struct memd_config *c = (const struct memd_config *)base;
    if (c->hdr.iova_mode == MEMD_IOVA_VA || len == 0)
        return len;
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    if (l == NULL || !slot_used(l, slot) || l->segs[slot].iova == MEMD_BAD_IOVA)
        return 0;
    uint64_t got = l->page_size - (off - l->base_offset) % l->page_size;
    for (uint32_t s = slot; got < len && s + 1 < list_capacity(l); s++) {
        if (!slot_used(l, s + 1) || l->segs[s + 1].iova != l->segs[s].iova + l->page_size)
            break;
        got += l->page_size;
    }
    return got < len ? got : len;
}

int memd_pages_fit(const char *base, uint64_t off, uint64_t len, uint64_t page_mask)
{
    uint32_t slot, last_slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    if (l == NULL || msl_of(base, off + len - 1, &last_slot) != l)
        return 0;
    return (page_mask >> __builtin_ctzll(l->page_size)) & 1;
}

uint64_t memd_page_size_at(const char *base, uint64_t off)
{
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    return l ? l->page_size : 0;
}

uint64_t memd_list_end(const char *base, uint64_t off)
{
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    return l ? l->base_offset + (uint64_t)list_capacity(l) * l->page_size : 0;
}

uint64_t memd_memzone_page_mask(uint32_t flags)
{
    static const struct {
        uint32_t flag;
        unsigned shift;
    } sizes[] = {
        {MEMD_MEMZONE_F_256KB, 18}, {MEMD_MEMZONE_F_2MB, 21},   {MEMD_MEMZONE_F_16MB, 24},
        {MEMD_MEMZONE_F_256MB, 28}, {MEMD_MEMZONE_F_512MB, 29}, {MEMD_MEMZONE_F_1GB, 30},
        {MEMD_MEMZONE_F_4GB, 32},   {MEMD_MEMZONE_F_16GB, 34},
    };
    uint64_t mask = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (flags & sizes[i].flag)
            mask |= 1ull << sizes[i].shift;
    return mask;
}

/* --- memzones ------------------------------------------------------------- */

static int lock_config(struct memd_config *c, uint64_t wait_ns, const struct memd_lock **busy)
{
    int rc = memd_lock_timed(&c->config_lock, wait_ns);
    if (rc == -ETIMEDOUT && busy)
        *busy = &c->config_lock;
    return rc < 0 ? rc : 0; /* a dead owner's table is still consistent: each slot
                               is claimed by writing its name last */
}

/* Heap h's lock, for a caller holding config_lock: 0 (taken), or -errno with the
 * heap lock not held.  Never waits with config_lock held (lookups and other heaps'
 * zones would wait behind a stopped holder of this heap): when it is busy, it
 * releases config_lock, waits up to wait_ns for the heap lock alone, and says
 * -EAGAIN (free now: call again) or -ETIMEDOUT (*busy set), config_lock no longer
 * held then. */
static int lock_heap_under_config(char *base, struct memd_config *c, struct memd_heap *h,
                                  uint64_t wait_ns, const struct memd_lock **busy)
{
    int rc = memd_lock_try(&h->lock);
    if (rc == -EBUSY) {
        memd_lock_release(&c->config_lock);
        rc = memd_lock_timed(&h->lock, wait_ns);
        if (rc == -ETIMEDOUT && busy)
            *busy = &h->lock;
        if (rc >= 0 && memd_heap_lock_done(base, h, rc) == 0)
            memd_heap_unlock(h); /* (a dead owner's operation was rolled back) */
        return rc == -ETIMEDOUT ? -ETIMEDOUT : -EAGAIN;
    }
    return memd_heap_lock_done(base, h, rc);
}

static int find_zone(struct memd_config *c, const char *name)
{
    for (uint32_t i = 0; i < MEMD_MAX_MEMZONES; i++)
        if (c->memzones[i].name[0] && strncmp(c->memzones[i].name, name, MEMD_NAMESIZE) == 0)
            return (int)i;
    return -ENOENT;
}

int memd_memzone_reserve(char *base, const char *name, uint64_t len, uint32_t heap_idx,
                         uint32_t flags, int any_page_size, uint64_t align, uint64_t bound,
                         int32_t pid, uint64_t wait_ns, const struct memd_lock **busy)
{
    struct memd_config *c = memd_cfg(base);
    if (name[0] == '\0' || strlen(name) >= MEMD_NAMESIZE || heap_idx >= MEMD_MAX_HEAPS ||
        (flags & ~MEMD_MEMZONE_F_ALL))
        return -EINVAL;
    uint64_t page_mask = any_page_size ? 0 : memd_memzone_page_mask(flags);
    int contig = (flags & MEMD_MEMZONE_F_IOVA_CONTIG) != 0;
    int rc = lock_config(c, wait_ns, busy);
    if (rc < 0)
        return rc;
    int id = -ENOSPC;
    if (find_zone(c, name) >= 0) {
        id = -EEXIST;
        goto out;
    }
    for (uint32_t i = 0; i < MEMD_MAX_MEMZONES; i++)
        if (c->memzones[i].name[0] == '\0') {
            id = (int)i;
            break;
        }
    if (id < 0)
        goto out;
    uint64_t off;
    struct memd_heap *h = &c->heaps[heap_idx];
    rc = lock_heap_under_config(base, c, h, wait_ns, busy);
    if (rc == -EAGAIN || rc == -ETIMEDOUT)
        return rc; /* config_lock released */
    if (rc < 0) {
        id = rc;
        goto out;
    }
    /* len 0 (DPDK): with a bound, a zone of the bound's size; else the biggest
     * block the heap can give now, whose size becomes the zone's length. */
    if (len == 0 && bound)
        len = bound;
    rc = len == 0 ? memd_heap_biggest_nolock(base, h, align, contig, page_mask, &len) : 0;
    if (rc == 0)
        rc = memd_heap_alloc_flags_nolock(base, h, len, align, bound, contig, page_mask,
                                          MEMD_ELEM_F_MEMZONE, &off);
    memd_heap_unlock(h);
    if (rc < 0) {
        id = rc;
        goto out;
    }
    struct memd_memzone *z = &c->memzones[id];
    uint32_t slot;
    const struct memd_memseg_list *l = msl_of(base, off, &slot);
    z->offset = off;
    z->elem_offset = off;
    z->length = len;
    z->iova = memd_iova_of(base, off);
    z->page_size = l ? l->page_size : 0;
    z->socket_id = (int32_t)heap_idx;
    z->flags = flags;
    z->owner_pid = pid;
    z->generation = z->generation + 1 ? z->generation + 1 : 1;
    copy_name(z->name, name, sizeof(z->name)); /* last: the slot is live from here */
out:
    memd_lock_release(&c->config_lock);
    return id;
}

int memd_memzone_lookup(char *base, const char *name) { return find_zone(memd_cfg(base), name); }

int memd_memzone_free(char *base, uint32_t id, uint32_t generation, uint64_t wait_ns,
                      const struct memd_lock **busy)
{
    struct memd_config *c = memd_cfg(base);
    if (id >= MEMD_MAX_MEMZONES)
        return -EINVAL;
    int rc = lock_config(c, wait_ns, busy);
    if (rc < 0)
        return rc;
    struct memd_memzone *z = &c->memzones[id];
    /* heap index == socket id (one heap per NUMA socket) */
    uint32_t heap_idx = (uint32_t)z->socket_id;
    if (z->name[0] == '\0' || (generation && z->generation != generation)) {
        rc = -ENOENT; /* freed, perhaps reserved again since: not the caller's zone */
    } else if (heap_idx >= MEMD_MAX_HEAPS) {
        rc = -EINVAL;
    } else if ((rc = lock_heap_under_config(base, c, &c->heaps[heap_idx], wait_ns, busy)) ==
                   -EAGAIN ||
               rc == -ETIMEDOUT) {
        return rc; /* config_lock released */
    } else if (rc == 0) {
        uint64_t elem = z->elem_offset;
        z->name[0] = '\0';
        int64_t freed = memd_heap_free_nolock(base, &c->heaps[heap_idx], elem);
        memd_heap_unlock(&c->heaps[heap_idx]);
        rc = freed < 0 ? (int)freed : (int)heap_idx;
        uint32_t gen = z->generation;
        memset(z, 0, sizeof(*z));
        z->generation = gen; /* the next reserve of this slot bumps it */
    }
    memd_lock_release(&c->config_lock);
    return rc;
}

/* --- processes ------------------------------------------------------------ */

int memd_proc_register(char *base, int32_t pid, uint64_t start_time, uint32_t state,
                       const char *comm, int want_slot)
{
    struct memd_config *c = memd_cfg(base);
    int rc = memd_lock_acquire(&c->proc_lock);
    if (rc < 0)
        return rc;
    int slot = -ENOSPC;
    if (want_slot >= 0) {
        slot = (uint32_t)want_slot < MEMD_MAX_PROCS && c->procs[want_slot].pid == 0 ? want_slot
                                                                                    : -EBUSY;
    } else {
        for (uint32_t i = 1; i < MEMD_MAX_PROCS; i++) /* slot 0 is the primary's */
            if (c->procs[i].pid == 0) {
                slot = (int)i;
                break;
            }
    }
    if (slot >= 0) {
        struct memd_process *p = &c->procs[slot];
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        memset(p, 0, sizeof(*p));
        memset(&c->pins[slot], 0, sizeof(c->pins[slot])); /* a previous holder's pins */
        p->state = state;
        p->start_time = start_time;
        p->attach_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        copy_name(p->comm, comm ? comm : "", sizeof(p->comm));
        p->pid = pid; /* last: a non-zero pid marks the slot taken */
    }
    memd_lock_release(&c->proc_lock);
    return slot;
}

int memd_proc_unregister(char *base, uint32_t slot, int32_t pid)
{
    struct memd_config *c = memd_cfg(base);
    if (slot >= MEMD_MAX_PROCS)
        return -EINVAL;
    int rc = memd_lock_acquire(&c->proc_lock);
    if (rc < 0)
        return rc;
    rc = c->procs[slot].pid == pid && pid != 0 ? 0 : -ENOENT;
    if (rc == 0) {
        memset(&c->procs[slot], 0, sizeof(c->procs[slot]));
        memset(&c->pins[slot], 0, sizeof(c->pins[slot])); /* its views pin nothing now */
    }
    memd_lock_release(&c->proc_lock);
    return rc;
}

/* --- named objects -------------------------------------------------------- */

static int find_object(struct memd_config *c, const char *name, uint32_t type)
{
    for (uint32_t i = 0; i < MEMD_MAX_OBJECTS; i++)
        if (c->objects[i].type != MEMD_OBJ_FREE && (type == 0 || c->objects[i].type == type) &&
            strncmp(c->objects[i].name, name, MEMD_NAMESIZE) == 0)
            return (int)i;
    return -ENOENT;
}

int memd_object_add(char *base, const char *name, uint32_t type, uint32_t memzone_id,
                    uint64_t offset, int32_t pid, uint64_t wait_ns, const struct memd_lock **busy)
{
    struct memd_config *c = memd_cfg(base);
    if (name[0] == '\0' || strlen(name) >= MEMD_NAMESIZE || type == MEMD_OBJ_FREE)
        return -EINVAL;
    int rc = lock_config(c, wait_ns, busy);
    if (rc < 0)
        return rc;
    int idx = find_object(c, name, type) >= 0 ? -EEXIST : -ENOSPC;
    for (uint32_t i = 0; idx == -ENOSPC && i < MEMD_MAX_OBJECTS; i++)
        if (c->objects[i].type == MEMD_OBJ_FREE)
            idx = (int)i;
    if (idx >= 0) {
        struct memd_object *o = &c->objects[idx];
        copy_name(o->name, name, sizeof(o->name));
        o->memzone_id = memzone_id;
        o->offset = offset;
        o->creator_pid = pid;
        o->type = type; /* last: a non-zero type marks the entry live */
    }
    memd_lock_release(&c->config_lock);
    return idx;
}

int memd_object_lookup(char *base, const char *name, uint32_t type)
{
    return find_object(memd_cfg(base), name, type);
}

/* cold: only a failed tag compare asks (it also keeps the code after it in place) */
__attribute__((cold)) int memd_object_listed(const char *base, uint32_t type, uint64_t offset,
                                             uint32_t mz_id, uint32_t mz_gen)
{
    const struct memd_config *c = (const struct memd_config *)base;
    if (mz_gen == 0 || mz_id >= MEMD_MAX_MEMZONES || type == MEMD_OBJ_FREE)
        return 0;
    const volatile struct memd_memzone *z = &c->memzones[mz_id];
    if (z->name[0] == '\0' || z->generation != mz_gen)
        return 0;
    for (uint32_t i = 0; i < MEMD_MAX_OBJECTS; i++) {
        const volatile struct memd_object *o = &c->objects[i];
        if (o->type == type && o->offset == offset && o->memzone_id == mz_id)
            return 1;
    }
    return 0;
}

int memd_object_remove(char *base, uint32_t idx, uint64_t wait_ns, const struct memd_lock **busy)
{
    struct memd_config *c = memd_cfg(base);
    if (idx >= MEMD_MAX_OBJECTS)
        return -EINVAL;
    int rc = lock_config(c, wait_ns, busy);
    if (rc < 0)
        return rc;
    rc = c->objects[idx].type == MEMD_OBJ_FREE ? -ENOENT : 0;
    memset(&c->objects[idx], 0, sizeof(c->objects[idx]));
    memd_lock_release(&c->config_lock);
    return rc;
}
