/* heap_stub.c - TEMPORARY bump allocator so main links until ext/heap.c lands. */
#include <errno.h>
#include <string.h>

#include "heap.h"
#include "lock.h"

int memd_heap_init(struct memd_heap *h, int socket_id)
{
    memset(h, 0, sizeof(*h));
    h->socket_id = socket_id;
    return memd_lock_init(&h->lock);
}
int memd_heap_lock(struct memd_heap *h) { return memd_lock_acquire(&h->lock); }
void memd_heap_unlock(struct memd_heap *h) { memd_lock_release(&h->lock); }
int memd_heap_add_memory(char *base, struct memd_heap *h, uint64_t off, uint64_t len)
{
    (void)base;
    h->first_elem = off; /* bump pointer */
    h->last_elem = off + len;
    h->total_size += len;
    return 0;
}
int memd_heap_alloc(char *base, struct memd_heap *h, uint64_t size, uint64_t align,
                    uint64_t bound, int contig, uint64_t *out)
{
    (void)base; (void)bound; (void)contig;
    if (align == 0) align = 64;
    memd_lock_acquire(&h->lock);
    uint64_t o = (h->first_elem + align - 1) & ~(align - 1);
    int rc = -ENOMEM;
    if (h->first_elem && o + size <= h->last_elem) {
        h->first_elem = o + size;
        *out = o;
        rc = 0;
    }
    memd_lock_release(&h->lock);
    return rc;
}
int memd_heap_free(char *base, struct memd_heap *h, uint64_t off) { (void)base; (void)h; (void)off; return 0; }
