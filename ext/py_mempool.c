/*
 * py_mempool.c - Python bindings for mempool.c: memd._ext.Mempool (memd.shm.mempool
 * subclasses it), memd._ext.MempoolObject, and module functions mempool_memsize,
 * mempool_init and mempool_flush_cache.
 *
 * An object is a small Python object holding its pool and its handle; it
 * exports its data through the buffer protocol (zero-copy, writable), and
 * `.buf` is a memoryview of it.  The hot calls raise memd.errors.PoolEmpty /
 * CorruptionError themselves (imported on first use) instead of returning an
 * errno for Python to translate: a Python wrapper would double their cost.
 */
#include "config.h"
#include "memd_py.h"
#include "mempool.h"
#include "py_ring.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define likely(x)     __builtin_expect(!!(x), 1)
#define unlikely(x)   __builtin_expect(!!(x), 0)
#define STACK_HANDLES 64

typedef struct {
    PyObject_HEAD
    PyObject *window; /* strong reference: keeps the mapping alive */
    uint64_t offset;  /* window offset of the struct memd_mempool */
    uint32_t slot;    /* this process's cache, or MEMD_MEMPOOL_NO_CACHE */
    uint32_t n;
    uint32_t elt_size;
    uint32_t private_size;
    uint64_t first_handle;
    uint64_t obj_stride;
    /* as validated when this object was made: every call indexes with it, never
     * with the shared header (see struct memd_mempool_geometry); g.tag is the
     * identity tag a freed pool no longer carries */
    struct memd_mempool_geometry g;
    void *pin;                /* the pin keeping the pool's pages (memd_view_pin's tag) */
    uint32_t mz_id, mz_gen;   /* the memzone it was found in (_bind_zone); mz_gen 0: unknown */
    char name[MEMD_NAMESIZE]; /* as validated: for the error about a freed pool */
} MemdMempool;

typedef struct {
    PyObject_HEAD
    MemdMempool *pool; /* strong reference */
    uint64_t handle;   /* window offset of the object's data */
} MemdMpObj;

static PyTypeObject MemdMempool_Type;
static PyTypeObject MemdMpObj_Type;

static inline char *pool_base(MemdMempool *self)
{
    char *base = ((MemdWindow *)self->window)->base;
    if (unlikely(base == NULL))
        memd_raise_closed(PyExc_ValueError);
    return base;
}

static inline struct memd_mempool *pool_hdr(MemdMempool *self, char *base)
{
    return (struct memd_mempool *)(base + self->offset);
}

/* Whether a pool whose tag no longer matches was damaged rather than freed.  A
 * handle bound to its memzone asks the directory: a free unlists it first, so
 * still listed there means nothing freed it.  Else the copies tell: a free
 * overwrites the header's with MEMD_TAG_FREED (every copy, if the header still
 * loads), a pool made anew writes its own everywhere, so a copy still carrying
 * ours beside none that says freed is damage.  The handle's pin keeps every
 * copy's page. */
static int pool_damaged(MemdMempool *self, const char *base)
{
    if (self->mz_gen != 0)
        return memd_object_listed(base, MEMD_OBJ_MEMPOOL, self->offset, self->mz_id, self->mz_gen);
    const struct memd_mempool_geometry *g = &self->g;
    const struct memd_ring *r = (const struct memd_ring *)(base + g->pool + g->ring_offset);
    uint64_t t[4] = {
        atomic_load_explicit(&((const struct memd_mempool *)(base + g->pool))->tag,
                             memory_order_relaxed),
        atomic_load_explicit(&r->prod.tag, memory_order_relaxed),
        atomic_load_explicit(&r->cons.tag, memory_order_relaxed),
        g->tag,
    };
    if (g->cache_size && self->slot < MEMD_MAX_PROCS) {
        const struct memd_mempool_cache *c =
            (const struct memd_mempool_cache *)(base + g->pool + g->caches_offset +
                                                (uint64_t)self->slot * g->cache_stride);
        t[3] = atomic_load_explicit(&c->tag, memory_order_relaxed);
    }
    int ours = 0;
    for (int i = 0; i < 4; i++) {
        if (t[i] == MEMD_TAG_FREED)
            return 0;
        ours |= t[i] == g->tag;
    }
    return ours;
}

/* A tag copy did not match: StaleHandle if the pool was freed (here or in another
 * process) since this handle was made, CorruptionError if its header (or a
 * cache's or its ring's line) was overwritten.  Only on this failing path.
 * Returns NULL. */
static __attribute__((noinline, cold)) void *raise_stale(MemdMempool *self)
{
    char *base = pool_base(self);
    if (base == NULL)
        return NULL;
    if (pool_damaged(self, base)) {
        PyErr_Format(memd_error("CorruptionError", PyExc_ValueError),
                     "the mempool '%s' is corrupted: its header was overwritten (damaged "
                     "shared memory); free it with mem.memzone_free(mem.memzone_lookup('MP_%s')) "
                     "and create it again",
                     self->name, self->name);
        return NULL;
    }
    PyErr_Format(memd_error("StaleHandle", PyExc_KeyError),
                 "the mempool '%s' was freed (by this or another process); look it up again "
                 "(mempool_lookup) if it was made anew",
                 self->name);
    return NULL;
}

/* pool_base, for a pool that must not have been freed: every call but get/put
 * (which check the tag in their cache's line, in C). */
static inline char *pool_live(MemdMempool *self)
{
    char *base = pool_base(self);
    if (base != NULL && unlikely(!memd_mempool_live(base, &self->g)))
        return raise_stale(self);
    return base;
}

/* The config whose rows this process brackets its moves in (see "objects in
 * flight" in memd_layout.h): its window's, if the window is an attachment's (it
 * has a process slot); NULL for a private test window. */
static char *mover_cfg(PyObject *window)
{
    MemdWindow *w = (MemdWindow *)window;
    return w->pin_slot >= 0 && (uint32_t)w->pin_slot < MEMD_MAX_PROCS && !w->anonymous &&
                   w->size >= MEMD_CONFIG_SIZE
               ? w->base
               : NULL;
}

static void set_mover(struct memd_mempool_geometry *g, PyObject *window)
{
    memd_mempool_set_mover(g, mover_cfg(window), ((MemdWindow *)window)->pin_slot);
}

static PyObject *pool_name(MemdMempool *self, char *base)
{
    const char *name = pool_hdr(self, base)->name;
    return memd_text(name, MEMD_NAMESIZE); /* damaged bytes show, never raise */
}

static PyObject *raise_pool(MemdMempool *self, char *base, int rc, const char *what, unsigned n)
{
    if (rc == -ESTALE)
        return raise_stale(self);
    PyObject *name = pool_name(self, base);
    if (name == NULL)
        return NULL;
    switch (rc) {
    case -ENOBUFS:
        PyErr_Format(memd_error("PoolEmpty", PyExc_LookupError),
                     "mempool %R: %s of %u object(s) failed: not enough free objects in this "
                     "process's cache and the ring (%llu free in all, of %u); put some back "
                     "or create a larger pool",
                     name, what, n, (unsigned long long)memd_mempool_avail_count(base, &self->g),
                     self->n);
        break;
    case -EINVAL:
        PyErr_Format(memd_error("MemdValueError", PyExc_ValueError),
                     "mempool %R: %s: not an object of this pool", name, what);
        break;
    case -EALREADY:
        PyErr_Format(memd_error("MemdValueError", PyExc_ValueError),
                     "mempool %R: %s: object already free (a double put)", name, what);
        break;
    default:
        PyErr_Format(memd_error("CorruptionError", PyExc_ValueError),
                     "mempool %R: %s found the pool corrupted (a cookie, a cache's length or the "
                     "free ring); run audit() for details",
                     name, what);
    }
    Py_DECREF(name);
    return NULL;
}

/* --- a busy free ring ------------------------------------------------------ */

/* A get or put whose free ring's lock another live process keeps (stopped, say)
 * fails in C with -EBUSY, having changed nothing; here it sleeps without the GIL
 * and tries again, for at most the lock wait limit in all (heap_lock_wait: 30 s
 * in a program, the daemon's bound in the daemon), letting signals through
 * between slices.  An unlock wakes the sleeper; a holder that died is taken over
 * by the next try, so slices are short. */
#define BUSY_SLICE_NS 10000000ull /* 10 ms */
#define RAISED        INT_MIN     /* a retry ended with an exception set */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* One wait for the free ring's producer (enq) or consumer lock of the pool g
 * describes; *start is 0 before a call's first wait.  0: try again; -1 with an
 * exception set: a signal handler's, or past the limit MemdError naming the pool,
 * the lock and its holder's pid. */
static __attribute__((noinline, cold)) int wait_busy(char *base,
                                                     const struct memd_mempool_geometry *g, int enq,
                                                     const char *what, uint64_t *start)
{
    uint64_t now = now_ns(), limit = memd_py_lock_wait_limit();
    if (*start == 0)
        *start = now;
    uint64_t waited = now - *start;
    struct memd_ring *r = (struct memd_ring *)(base + g->pool + g->ring_offset);
    struct memd_ring_headtail *side = enq ? &r->prod : &r->cons;
    if (waited >= limit) {
        uint64_t owner = memd_mempool_ring_owner(base, g, enq);
        uint64_t holder =
            atomic_load_explicit(&((struct memd_mempool *)(base + g->pool))->recovering,
                                 memory_order_relaxed) &
            ((1u << MEMD_PIN_OWNER_PID_BITS) - 1);
        PyObject *name = memd_text(((struct memd_mempool *)(base + g->pool))->name, MEMD_NAMESIZE);
        if (name == NULL)
            return -1;
        if (owner == 0 && holder != 0) {
            PyErr_Format(memd_error("MemdError", PyExc_RuntimeError),
                         "mempool %R: %s: busy: pid %d kept holding the pool's gets and puts "
                         "off (recover or audit; waited %llu ms); nothing was taken or put back: "
                         "try again later",
                         name, what, (int)holder, (unsigned long long)(waited / 1000000u));
            Py_DECREF(name);
            return -1;
        }
        PyErr_Format(memd_error("MemdError", PyExc_RuntimeError),
                     "mempool %R: %s: busy: the %s lock of its free ring is held by pid %d "
                     "(waited %llu ms; stopped in a debugger, or paused?); nothing was taken or "
                     "put back: try again later",
                     name, what, enq ? "producer" : "consumer", (int)MEMD_RING_LOCK_PID(owner),
                     (unsigned long long)(waited / 1000000u));
        Py_DECREF(name);
        return -1;
    }
    if (memd_mempool_recover_holds(base, g)) { /* for milliseconds at most */
        struct timespec nap = {0, 200000};
        Py_BEGIN_ALLOW_THREADS
            nanosleep(&nap, NULL);
        Py_END_ALLOW_THREADS
        return PyErr_CheckSignals() < 0 ? -1 : 0;
    }
    uint64_t slice = limit - waited < BUSY_SLICE_NS ? limit - waited : BUSY_SLICE_NS;
    uint32_t seq = memd_ring_wait_prepare(&side->lock_wait, 0);
    /* after prepare's fence: an unlock from now on wakes us (or moves seq) */
    if (memd_mempool_ring_owner(base, g, enq) != 0) {
        Py_BEGIN_ALLOW_THREADS
            memd_ring_wait_sleep(&side->lock_wait, seq, slice);
        Py_END_ALLOW_THREADS
    }
    memd_ring_wait_done(&side->lock_wait); /* the window stays mapped while we hold it */
    return PyErr_CheckSignals() < 0 ? -1 : 0;
}

enum pool_op {
    POOL_GET,
    POOL_PUT,
    POOL_FLUSH
};

/* op on self found the free ring busy: wait and try again until it is not.  Its
 * result then (a count or -errno), or RAISED with an exception set (nothing taken
 * or put back; the window may have been closed meanwhile). */
static __attribute__((noinline, cold)) int retry_busy(MemdMempool *self, enum pool_op op,
                                                      uint64_t *h, unsigned n, const char *what)
{
    uint64_t start = 0;
    int rc = -EBUSY;
    while (rc == -EBUSY) {
        char *base = pool_base(self);
        if (base == NULL || wait_busy(base, &self->g, op != POOL_GET, what, &start) < 0 ||
            pool_base(self) == NULL)
            return RAISED;
        if (op == POOL_GET)
            rc = memd_mempool_get_bulk(base, &self->g, self->slot, h, n);
        else if (op == POOL_PUT)
            rc = memd_mempool_put_bulk(base, &self->g, self->slot, h, n);
        else
            rc = memd_mempool_flush_cache(base, &self->g, self->slot);
    }
    return rc;
}

/* Give back objects a failed get_bulk took (an exception is set and kept). */
static void give_back_quiet(MemdMempool *self, char *base, uint64_t *h, unsigned n)
{
    if (memd_mempool_put_bulk(base, &self->g, self->slot, h, n) != -EBUSY)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (retry_busy(self, POOL_PUT, h, n, "get_bulk") == RAISED)
        PyErr_Clear(); /* a signal's or the wait's: the first error is the one to tell */
    PyErr_Restore(type, value, tb);
}

/* --- MempoolObject -------------------------------------------------------- */

static inline PyObject *new_obj(MemdMempool *pool, uint64_t handle)
{
    MemdMpObj *o = PyObject_New(MemdMpObj, &MemdMpObj_Type);
    if (o == NULL)
        return NULL;
    Py_INCREF(pool);
    o->pool = pool;
    o->handle = handle;
    return (PyObject *)o;
}

static void mpobj_dealloc(PyObject *o)
{
    Py_DECREF(((MemdMpObj *)o)->pool);
    PyObject_Free(o);
}

static int mpobj_getbuffer(PyObject *o, Py_buffer *view, int flags)
{
    MemdMpObj *obj = (MemdMpObj *)o;
    char *base = ((MemdWindow *)obj->pool->window)->base;
    if (base == NULL) {
        memd_raise_closed(PyExc_BufferError);
        view->obj = NULL;
        return -1;
    }
    if (unlikely(!memd_mempool_live(base, &obj->pool->g))) {
        raise_stale(obj->pool);
        view->obj = NULL;
        return -1;
    }
    /* the view pins its page: it outlives the pool's free while it lives */
    if (memd_view_pin(obj->pool->window, obj->handle, obj->pool->elt_size, view) < 0) {
        view->obj = NULL;
        return -1;
    }
    void *tag = view->internal;
    if (PyBuffer_FillInfo(view, o, base + obj->handle, (Py_ssize_t)obj->pool->elt_size, 0, flags) <
        0) {
        view->internal = tag;
        memd_view_unpin(obj->pool->window, view);
        return -1;
    }
    view->internal = tag;
    return 0;
}

static void mpobj_releasebuffer(PyObject *o, Py_buffer *view)
{
    memd_view_unpin(((MemdMpObj *)o)->pool->window, view);
}

static PyBufferProcs mpobj_as_buffer = {mpobj_getbuffer, mpobj_releasebuffer};

static PyObject *mpobj_get_handle(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(((MemdMpObj *)o)->handle);
}

static PyObject *mpobj_get_index(PyObject *o, void *Py_UNUSED(c))
{
    MemdMpObj *obj = (MemdMpObj *)o;
    return PyLong_FromUnsignedLongLong((obj->handle - obj->pool->first_handle) /
                                       obj->pool->obj_stride);
}

static PyObject *mpobj_get_pool(PyObject *o, void *Py_UNUSED(c))
{
    PyObject *p = (PyObject *)((MemdMpObj *)o)->pool;
    Py_INCREF(p);
    return p;
}

/* DPDK rte_mempool_virt2iova: computed from the memseg tables when asked (a
 * page's IOVA is fixed while it is mapped), so the object header needs no copy. */
static PyObject *mpobj_get_iova(PyObject *o, void *Py_UNUSED(c))
{
    MemdMpObj *obj = (MemdMpObj *)o;
    char *base = pool_live(obj->pool);
    return base ? PyLong_FromUnsignedLongLong(memd_iova_of(base, obj->handle)) : NULL;
}

static PyObject *mpobj_get_buf(PyObject *o, void *Py_UNUSED(c))
{
    return PyMemoryView_FromObject(o);
}

static PyObject *mpobj_get_size(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(((MemdMpObj *)o)->pool->elt_size);
}

static Py_ssize_t mpobj_len(PyObject *o) { return (Py_ssize_t)((MemdMpObj *)o)->pool->elt_size; }

static PyObject *mpobj_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(b) != &MemdMpObj_Type)
        Py_RETURN_NOTIMPLEMENTED;
    MemdMpObj *x = (MemdMpObj *)a, *y = (MemdMpObj *)b;
    int eq = x->handle == y->handle && x->pool->offset == y->pool->offset &&
             x->pool->window == y->pool->window;
    return PyBool_FromLong(op == Py_EQ ? eq : !eq);
}

static Py_hash_t mpobj_hash(PyObject *o)
{
    Py_hash_t h = (Py_hash_t)(((MemdMpObj *)o)->handle >> 6);
    return h == -1 ? -2 : h;
}

static PyObject *mpobj_repr(PyObject *o)
{
    MemdMpObj *obj = (MemdMpObj *)o;
    return PyUnicode_FromFormat(
        "<MempoolObject handle=%llu index=%llu size=%u>", (unsigned long long)obj->handle,
        (unsigned long long)((obj->handle - obj->pool->first_handle) / obj->pool->obj_stride),
        obj->pool->elt_size);
}

static PyGetSetDef mpobj_getset[] = {
    {"handle", mpobj_get_handle, NULL,
     "window offset of the object's data: what travels through rings", NULL},
    {"index", mpobj_get_index, NULL, "0..n-1, as given to obj_init", NULL},
    {"pool", mpobj_get_pool, NULL, "the Mempool it belongs to", NULL},
    {"buf", mpobj_get_buf, NULL, "writable zero-copy memoryview of the object's data", NULL},
    {"iova", mpobj_get_iova, NULL,
     "IO address of the object's data (DPDK rte_mempool_virt2iova); BAD_IOVA if the memory "
     "has none (not in a memseg list, or its page's IOVA is unknown). ValueError after detach.",
     NULL},
    {"size", mpobj_get_size, NULL, "bytes of data (the pool's elt_size)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods mpobj_as_sequence = {.sq_length = mpobj_len};

static PyTypeObject MemdMpObj_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.MempoolObject",
    .tp_basicsize = sizeof(MemdMpObj),
    .tp_dealloc = mpobj_dealloc,
    .tp_repr = mpobj_repr,
    .tp_hash = mpobj_hash,
    .tp_richcompare = mpobj_richcompare,
    .tp_as_buffer = &mpobj_as_buffer,
    .tp_as_sequence = &mpobj_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An object of a mempool: .handle, .index, .buf (also a buffer itself).",
    .tp_getset = mpobj_getset,
};

/* --- Mempool -------------------------------------------------------------- */

/* The memory of a pool header at off, and then of the whole pool its header claims,
 * is mapped here: memd_mempool_check reads the pool's ring, which a damaged (or
 * copied) header can place in a hole.  0, or -1 with MemdValueError set. */
static int pool_mapped(PyObject *window, char *base, unsigned long long off)
{
    if (memd_check_mapped(window, off, sizeof(struct memd_mempool)) < 0)
        return -1;
    uint64_t memsize = ((struct memd_mempool *)(base + off))->memsize;
    uint64_t room = ((MemdWindow *)window)->size - off;
    return memd_check_mapped(window, off, memsize < room ? memsize : room);
}

static PyObject *mempool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"window", "offset", "slot", NULL};
    PyObject *window;
    unsigned long long off;
    int slot = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O&|i:Mempool", kwlist, &MemdWindow_Type,
                                     &window, memd_conv_u64, &off, &slot))
        return NULL;
    char *base = memd_base_of(window);
    if (slot < -1 || slot >= (int)MEMD_MAX_PROCS) {
        PyErr_Format(PyExc_ValueError, "slot must be a process slot 0..%u, or -1 for no cache",
                     MEMD_MAX_PROCS - 1);
        return NULL;
    }
    /* The header's pages stay while we read it, the whole pool's while the handle
     * lives: a stale handle then finds its tag overwritten, never a hole. */
    Py_buffer head_pin, pin;
    if (base == NULL || memd_check_range(window, off, sizeof(struct memd_mempool)) < 0 ||
        memd_check_mapped(window, off, sizeof(struct memd_mempool)) < 0 ||
        memd_view_pin(window, off, sizeof(struct memd_mempool), &head_pin) < 0)
        return NULL;
    struct memd_mempool_geometry g;
    int bad = pool_mapped(window, base, off) < 0;
    if (!bad && memd_mempool_load(base, off, ((MemdWindow *)window)->size - off, &g) < 0) {
        PyErr_Format(PyExc_ValueError, "no initialised mempool at window offset %llu", off);
        bad = 1;
    }
    if (bad || memd_view_pin(window, off, g.memsize, &pin) < 0) {
        memd_view_unpin(window, &head_pin);
        return NULL;
    }
    memd_view_unpin(window, &head_pin);
    struct memd_mempool *mp = (struct memd_mempool *)(base + off);
    MemdMempool *self = (MemdMempool *)type->tp_alloc(type, 0);
    if (self == NULL) {
        memd_view_unpin(window, &pin);
        return NULL;
    }
    Py_INCREF(window);
    self->window = window;
    self->offset = off;
    self->pin = pin.internal;
    memcpy(self->name, mp->name, MEMD_NAMESIZE);
    self->name[MEMD_NAMESIZE - 1] = '\0';
    self->slot = slot < 0 ? MEMD_MEMPOOL_NO_CACHE : (uint32_t)slot;
    self->g = g;
    set_mover(&self->g, window);
    self->n = g.n;
    self->elt_size = mp->elt_size;
    self->private_size = mp->private_data_size;
    if (g.private_offset + self->private_size > g.ring_offset ||
        self->elt_size > g.trailer_offset) { /* rewritten since the check */
        Py_DECREF(self);
        PyErr_Format(PyExc_ValueError, "no initialised mempool at window offset %llu", off);
        return NULL;
    }
    self->first_handle = off + g.objs_offset + sizeof(struct memd_mempool_objhdr);
    self->obj_stride = g.obj_stride;
    if (g.cache_size && slot >= 0) {
        struct memd_mempool_cache *c =
            (struct memd_mempool_cache *)(base + off + g.caches_offset +
                                          (uint64_t)slot * g.cache_stride);
        c->owner_pid = getpid();
    }
    return (PyObject *)self;
}

static void mempool_unpin(MemdMempool *self)
{
    if (self->pin != NULL && self->window != NULL) {
        Py_buffer pin = {.internal = self->pin};
        memd_view_unpin(self->window, &pin);
    }
    self->pin = NULL;
}

static void mempool_dealloc(PyObject *o)
{
    PyObject_GC_UnTrack(o);
    mempool_unpin((MemdMempool *)o);
    Py_CLEAR(((MemdMempool *)o)->window);
    Py_TYPE(o)->tp_free(o);
}

static int mempool_traverse(PyObject *o, visitproc visit, void *arg)
{
    Py_VISIT(((MemdMempool *)o)->window);
    Py_VISIT(Py_TYPE(o));
    return 0;
}

static int mempool_clear(PyObject *o)
{
    mempool_unpin((MemdMempool *)o);
    Py_CLEAR(((MemdMempool *)o)->window);
    return 0;
}

static PyObject *mp_get(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_base(self);
    uint64_t h;
    if (base == NULL)
        return NULL;
    int rc = memd_mempool_get_bulk(base, &self->g, self->slot, &h, 1);
    if (unlikely(rc < 0)) {
        if (rc == -EBUSY && (rc = retry_busy(self, POOL_GET, &h, 1, "get")) == RAISED)
            return NULL;
        if (rc < 0)
            return raise_pool(self, base, rc, "get", 1);
    }
    return new_obj(self, h);
}

static PyObject *mp_get_handle(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_base(self);
    uint64_t h;
    if (base == NULL)
        return NULL;
    int rc = memd_mempool_get_bulk(base, &self->g, self->slot, &h, 1);
    if (unlikely(rc < 0)) {
        if (rc == -EBUSY && (rc = retry_busy(self, POOL_GET, &h, 1, "get_handle")) == RAISED)
            return NULL;
        if (rc < 0)
            return raise_pool(self, base, rc, "get_handle", 1);
    }
    return PyLong_FromUnsignedLongLong(h);
}

/* A handle given as an int: one outside 64 bits (negative, 2**64 + h) is no
 * object's, MemdValueError as for any other, never wrapped to some object's. */
static inline int handle_int(PyObject *x, uint64_t *h)
{
    if (likely(memd_u64_from_object(x, h) == 0))
        return 0;
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        PyErr_Format(memd_error("MemdValueError", PyExc_ValueError),
                     "%R is out of range: a mempool handle is an int in 0..%llu", x, ULLONG_MAX);
    }
    return -1;
}

/* The handle of a MempoolObject or an int. */
static inline int handle_of(PyObject *x, uint64_t *h)
{
    if (likely(Py_TYPE(x) == &MemdMpObj_Type)) {
        *h = ((MemdMpObj *)x)->handle;
        return 0;
    }
    if (PyLong_Check(x) || PyIndex_Check(x))
        return handle_int(x, h);
    PyErr_Format(PyExc_TypeError, "expected a MempoolObject or a handle (int), not %.100s",
                 Py_TYPE(x)->tp_name);
    return -1;
}

static PyObject *mp_put(PyObject *o, PyObject *x)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_base(self);
    uint64_t h;
    if (base == NULL || handle_of(x, &h) < 0)
        return NULL;
    int rc = memd_mempool_put_bulk(base, &self->g, self->slot, &h, 1);
    if (unlikely(rc < 0)) {
        if (rc == -EBUSY && (rc = retry_busy(self, POOL_PUT, &h, 1, "put")) == RAISED)
            return NULL;
        if (rc < 0)
            return raise_pool(self, base, rc, "put", 1);
    }
    Py_RETURN_NONE;
}

static int bulk_count(MemdMempool *self, PyObject *arg, Py_ssize_t *n)
{
    *n = PyLong_AsSsize_t(arg);
    if (*n == -1 && PyErr_Occurred())
        return -1;
    if (*n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return -1;
    }
    if (*n > (Py_ssize_t)self->n)
        *n = (Py_ssize_t)self->n + 1; /* can never be served; no huge allocation */
    return 0;
}

static PyObject *mp_get_bulk(PyObject *o, PyObject *arg)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_base(self);
    Py_ssize_t n;
    uint64_t stack[STACK_HANDLES], *h = stack;
    if (base == NULL || bulk_count(self, arg, &n) < 0)
        return NULL;
    if (n > (Py_ssize_t)self->n)
        return raise_pool(self, base, -ENOBUFS, "get_bulk", (unsigned)n);
    if (n > STACK_HANDLES && (h = PyMem_Malloc((size_t)n * sizeof(uint64_t))) == NULL)
        return PyErr_NoMemory();
    PyObject *list = NULL;
    int rc = memd_mempool_get_bulk(base, &self->g, self->slot, h, (unsigned)n);
    if (unlikely(rc == -EBUSY))
        rc = retry_busy(self, POOL_GET, h, (unsigned)n, "get_bulk");
    if (rc < 0) {
        if (rc != RAISED) /* else the wait's error is set */
            raise_pool(self, base, rc, "get_bulk", (unsigned)n);
    } else if ((list = PyList_New(n)) != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *x = new_obj(self, h[i]);
            if (x == NULL) {
                /* Give back the objects no Python object names yet. */
                Py_CLEAR(list);
                give_back_quiet(self, base, h + i, (unsigned)(n - i));
                break;
            }
            PyList_SET_ITEM(list, i, x);
        }
    } else {
        give_back_quiet(self, base, h, (unsigned)n);
    }
    if (h != stack)
        PyMem_Free(h);
    return list;
}

static PyObject *mp_get_bulk_into(PyObject *o, PyObject *arg)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    Py_buffer view;
    if (base == NULL || memd_u64_buffer(arg, &view, 1) < 0)
        return NULL;
    Py_ssize_t n = view.len / 8;
    int rc = n > (Py_ssize_t)self->n
                 ? -ENOBUFS
                 : memd_mempool_get_bulk(base, &self->g, self->slot, view.buf, (unsigned)n);
    if (unlikely(rc == -EBUSY))
        rc = retry_busy(self, POOL_GET, view.buf, (unsigned)n, "get_bulk_into");
    PyBuffer_Release(&view);
    if (rc == RAISED)
        return NULL;
    if (rc < 0)
        return raise_pool(self, base, rc, "get_bulk_into",
                          (unsigned)(n > UINT32_MAX ? UINT32_MAX : n));
    return PyLong_FromSsize_t(n);
}

static PyObject *mp_put_bulk(PyObject *o, PyObject *arg)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_base(self);
    if (base == NULL)
        return NULL;
    int rc;
    Py_ssize_t n;
    if (!PyList_CheckExact(arg) && !PyTuple_CheckExact(arg) && PyObject_CheckBuffer(arg)) {
        Py_buffer view;
        if (memd_u64_buffer(arg, &view, 0) < 0)
            return NULL;
        n = view.len / 8;
        /* More handles than objects must hold a duplicate or a stranger: the
         * check below names which (it stops at the first bad one). */
        rc = n > (Py_ssize_t)UINT32_MAX
                 ? -EINVAL
                 : memd_mempool_put_bulk(base, &self->g, self->slot, view.buf, (unsigned)n);
        if (unlikely(rc == -EBUSY))
            rc = retry_busy(self, POOL_PUT, view.buf, (unsigned)n, "put_bulk");
        PyBuffer_Release(&view);
        if (rc == RAISED)
            return NULL;
    } else {
        PyObject *seq = PySequence_Fast(arg, "put_bulk() takes a sequence of MempoolObjects "
                                             "or handles, or a uint64 buffer of handles");
        if (seq == NULL)
            return NULL;
        n = PySequence_Fast_GET_SIZE(seq);
        PyObject **items = PySequence_Fast_ITEMS(seq);
        if (n > (Py_ssize_t)UINT32_MAX) {
            Py_DECREF(seq);
            return raise_pool(self, base, -EINVAL, "put_bulk", 0);
        }
        uint64_t stack[STACK_HANDLES], *h = stack;
        if (n > STACK_HANDLES && (h = PyMem_Malloc((size_t)n * sizeof(uint64_t))) == NULL) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
        rc = 0;
        for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
            if (Py_TYPE(items[i]) != &MemdMpObj_Type && !PyLong_CheckExact(items[i]) &&
                PyList_CheckExact(seq)) {
                /* a handle's __index__ may change the list under `items`: go on
                 * over a tuple copy (no Python code has run yet: same n items) */
                PyObject *copy = PyList_AsTuple(seq);
                if (copy == NULL) {
                    rc = 1;
                    break;
                }
                Py_SETREF(seq, copy);
                items = PySequence_Fast_ITEMS(seq);
            }
            rc = handle_of(items[i], &h[i]) < 0 ? 1 : 0;
        }
        /* an item's __index__ may have detached us: our slot may be someone else's */
        if (rc == 0 && pool_base(self) == NULL)
            rc = 1;
        if (rc == 0)
            rc = memd_mempool_put_bulk(base, &self->g, self->slot, h, (unsigned)n);
        if (unlikely(rc == -EBUSY))
            rc = retry_busy(self, POOL_PUT, h, (unsigned)n, "put_bulk");
        if (h != stack)
            PyMem_Free(h);
        Py_DECREF(seq);
        if (rc == 1 || rc == RAISED)
            return NULL; /* a bad item: TypeError/OverflowError set; or the wait's error */
    }
    if (rc < 0)
        return raise_pool(self, base, rc, "put_bulk", (unsigned)n);
    Py_RETURN_NONE;
}

static PyObject *mp_obj(PyObject *o, PyObject *arg)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    uint64_t h;
    if (base == NULL || handle_int(arg, &h) < 0)
        return NULL;
    if (memd_mempool_objhdr_of(base, &self->g, h) == NULL)
        return raise_pool(self, base, -EINVAL, "obj(handle)", 0);
    return new_obj(self, h);
}

static PyObject *mp_obj_at(PyObject *o, PyObject *arg)
{
    MemdMempool *self = (MemdMempool *)o;
    if (pool_live(self) == NULL)
        return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= (Py_ssize_t)self->n) {
        PyErr_Format(PyExc_IndexError, "object index %zd outside 0..%u", i, self->n - 1);
        return NULL;
    }
    return new_obj(self, self->first_handle + (uint64_t)i * self->obj_stride);
}

static PyObject *mp_avail_count(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    return base ? PyLong_FromUnsignedLongLong(memd_mempool_avail_count(base, &self->g)) : NULL;
}

static PyObject *mp_in_use_count(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    return base ? PyLong_FromUnsignedLongLong(self->n - memd_mempool_avail_count(base, &self->g))
                : NULL;
}

static PyObject *mp_cache_count(PyObject *o, PyObject *const *args, Py_ssize_t nargs)
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    uint32_t slot = self->slot;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "cache_count(slot=this process's)");
        return NULL;
    }
    if (nargs == 1) {
        long s = PyLong_AsLong(args[0]);
        if (s == -1 && PyErr_Occurred())
            return NULL;
        if (s < 0 || s >= (long)MEMD_MAX_PROCS) {
            PyErr_SetString(PyExc_ValueError, "no such process slot");
            return NULL;
        }
        slot = (uint32_t)s;
    }
    return PyLong_FromUnsignedLong(memd_mempool_cache_count(base, &self->g, slot));
}

static PyObject *mp_flush_cache(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    if (self->slot == MEMD_MEMPOOL_NO_CACHE)
        return PyLong_FromLong(0);
    int rc = memd_mempool_flush_cache(base, &self->g, self->slot);
    if (rc == -EBUSY && (rc = retry_busy(self, POOL_FLUSH, NULL, 0, "flush_cache")) == RAISED)
        return NULL;
    if (rc < 0)
        return raise_pool(self, base, rc, "flush_cache", 0);
    return PyLong_FromLong(rc);
}

static const char *const fault_text[] = {
    [MEMD_MP_OK] = "ok",
    [MEMD_MP_BAD_POOL_HEADER] = "the pool header (magic or geometry) is damaged",
    [MEMD_MP_BAD_OBJ_HEADER] = "an object header (pool offset or index) is smashed",
    [MEMD_MP_BAD_OBJ_COOKIE] = "an object's header cookie is smashed",
    [MEMD_MP_BAD_TRAILER] = "an object's trailer cookie is smashed: something wrote past the "
                            "end of the object",
    [MEMD_MP_BAD_RING] = "the free ring is damaged",
    [MEMD_MP_BAD_ENTRY] = "the free ring or a cache holds a handle that is no object of "
                          "this pool",
    [MEMD_MP_BUSY_IN_FREE] = "an object in use is also in the free ring or a cache",
    [MEMD_MP_DUPLICATE] = "an object is twice in the free ring/caches (a double put)",
    [MEMD_MP_BAD_CACHE] = "a cache's length is out of range",
    [MEMD_MP_LOST] = "free objects are missing from the ring and caches",
};

/* CorruptionError naming what audit/recover found wrong. */
static PyObject *raise_audit_fault(MemdMempool *self, char *base,
                                   const struct memd_mempool_audit *a)
{
    PyObject *name = pool_name(self, base);
    if (name == NULL)
        return NULL;
    const char *what = a->fault < sizeof(fault_text) / sizeof(fault_text[0]) ? fault_text[a->fault]
                                                                             : "unknown fault";
    PyErr_Format(memd_error("CorruptionError", PyExc_ValueError),
                 "mempool %R is corrupted: %s (at %lld; %llu free, %llu busy, %llu in the "
                 "ring, %llu in caches)",
                 name, what, (long long)a->where, (unsigned long long)a->free_objs,
                 (unsigned long long)a->busy_objs, (unsigned long long)a->in_ring,
                 (unsigned long long)a->in_caches);
    Py_DECREF(name);
    return NULL;
}

/* audit or recover found no quiet moment (another process is in the middle of a
 * move, or runs recover): wait without the GIL, letting signals through, 1 ms
 * and twice as long each time up to 100 ms (each try holds the pool's moves off
 * for milliseconds: a process stopped mid-move must not make that most of the
 * time).  0: try again; -1 with an exception set: a signal handler's, or past
 * the lock wait limit a MemdError naming the pool and the process. */
static int wait_quiet(MemdMempool *self, char *base, const char *what, uint32_t odd_pid,
                      uint64_t *start, unsigned *tries)
{
    uint64_t now = now_ns();
    if (*start == 0)
        *start = now;
    if (now - *start >= memd_py_lock_wait_limit()) {
        PyObject *name = pool_name(self, base);
        if (name == NULL)
            return -1;
        if (odd_pid)
            PyErr_Format(memd_error("MemdError", PyExc_RuntimeError),
                         "mempool %R: %s: busy: pid %u is in the middle of a get or put "
                         "(stopped in a debugger, or paused?); try again later",
                         name, what, odd_pid);
        else
            PyErr_Format(memd_error("MemdError", PyExc_RuntimeError),
                         "mempool %R: %s: busy: objects kept moving (or another process "
                         "runs recover or audit); try again later",
                         name, what);
        Py_DECREF(name);
        return -1;
    }
    uint64_t nap_ns = (1000000ull << (*tries < 7 ? (*tries)++ : 7));
    uint64_t left = memd_py_lock_wait_limit() - (now - *start);
    if (nap_ns > 100000000ull)
        nap_ns = 100000000ull;
    if (nap_ns > left)
        nap_ns = left;
    struct timespec nap = {(time_t)(nap_ns / 1000000000u), (long)(nap_ns % 1000000000u)};
    Py_BEGIN_ALLOW_THREADS
        nanosleep(&nap, NULL);
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals() < 0 || pool_live(self) == NULL ? -1 : 0;
}

static PyObject *mp_audit(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    struct memd_mempool_audit a;
    uint32_t odd_pid;
    int rc;
    uint64_t start = 0;
    unsigned tries = 0;
    while ((rc = memd_mempool_audit(base, self->offset, self->g.row, mover_cfg(self->window), &a,
                                    &odd_pid)) == -EBUSY)
        if (wait_quiet(self, base, "audit", odd_pid, &start, &tries) < 0)
            return NULL;
    if (rc == -EFAULT)
        return raise_audit_fault(self, base, &a);
    if (rc < 0)
        return memd_raise_errno(rc, "mempool_audit");
    return Py_BuildValue("{sKsKsKsK}", "free", (unsigned long long)a.free_objs, "in_use",
                         (unsigned long long)a.busy_objs, "in_ring", (unsigned long long)a.in_ring,
                         "in_caches", (unsigned long long)a.in_caches);
}

static PyObject *mp_recover(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    struct memd_mempool_audit a;
    uint32_t odd_pid;
    int64_t n, total = 0;
    uint64_t start = 0;
    unsigned rounds = 0, tries = 0;
    /* -EBUSY after some went back (a busy ring): the rest on the next try */
    while ((n = memd_mempool_recover(base, &self->g, mover_cfg(self->window), &a, &odd_pid)) != 0) {
        if (n > 0) {
            total += n;
            if (++rounds < 8)
                continue; /* until a quiet look finds none lost */
            break;
        }
        if (n != -EBUSY)
            break;
        if (wait_quiet(self, base, "recover", odd_pid, &start, &tries) < 0)
            return NULL;
    }
    if (n == -EFAULT)
        return raise_audit_fault(self, base, &a);
    if (n == -ESTALE)
        return raise_stale(self);
    if (n < 0)
        return memd_raise_errno((int)n, "mempool_recover");
    return PyLong_FromLongLong(total);
}

/* Getters: fields of the shared header. */
#define MP_FIELD_GETTER(fname, expr)                                    \
    static PyObject *mp_get_##fname(PyObject *o, void *Py_UNUSED(c))    \
    {                                                                   \
        MemdMempool *self = (MemdMempool *)o;                           \
        char *base = pool_base(self);                                   \
        if (base == NULL)                                               \
            return NULL;                                                \
        struct memd_mempool *mp = pool_hdr(self, base);                 \
        (void)mp;                                                       \
        return PyLong_FromUnsignedLongLong((unsigned long long)(expr)); \
    }
MP_FIELD_GETTER(size, self->g.n)
MP_FIELD_GETTER(elt_size, self->elt_size)
MP_FIELD_GETTER(cache_size, self->g.cache_size)
MP_FIELD_GETTER(flushthresh, self->g.flushthresh)
MP_FIELD_GETTER(private_data_size, self->private_size)
MP_FIELD_GETTER(memsize, self->g.memsize)
MP_FIELD_GETTER(obj_stride, self->g.obj_stride)
MP_FIELD_GETTER(ring_offset, self->offset + self->g.ring_offset)
MP_FIELD_GETTER(offset, self->offset)

static PyObject *mp_get_flags(PyObject *o, void *Py_UNUSED(c))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self); /* the only field read from the shared header */
    return base ? PyLong_FromUnsignedLong(pool_hdr(self, base)->flags) : NULL;
}

static PyObject *mp_get_slot(PyObject *o, void *Py_UNUSED(c))
{
    uint32_t slot = ((MemdMempool *)o)->slot;
    return PyLong_FromLong(slot == MEMD_MEMPOOL_NO_CACHE ? -1 : (long)slot);
}

static PyObject *mp_get_name(PyObject *o, void *Py_UNUSED(c))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    return base ? pool_name(self, base) : NULL;
}

static PyObject *mp_get_window(PyObject *o, void *Py_UNUSED(c))
{
    PyObject *w = ((MemdMempool *)o)->window;
    Py_INCREF(w);
    return w;
}

static PyObject *mp_get_private_data(PyObject *o, void *Py_UNUSED(c))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    struct memd_mempool *mp = pool_hdr(self, base);
    (void)mp;
    return memd_view(self->window, self->offset + self->g.private_offset, self->private_size);
}

/* _bind_zone(mz_id, generation): the memzone this handle's pool was found in, so
 * that a tag mismatch tells a free (unlisted) from damage (still listed). */
static PyObject *mp_bind_zone(PyObject *o, PyObject *args)
{
    MemdMempool *self = (MemdMempool *)o;
    uint32_t id, gen;
    int rc = memd_zone_binding(self->window, args, &id, &gen);
    if (rc < 0)
        return NULL;
    if (rc > 0) {
        self->mz_id = id;
        self->mz_gen = gen;
    }
    Py_RETURN_NONE;
}

/* _check_live(): None, or StaleHandle if the pool was freed. */
static PyObject *mp_check_live(PyObject *o, PyObject *Py_UNUSED(a))
{
    return pool_live((MemdMempool *)o) ? Py_NewRef(Py_None) : NULL;
}

/* _poison(): mempool_free's last step before the memory goes: every handle to this
 * pool and its objects, in every process, raises StaleHandle from now on. */
static PyObject *mp_poison(PyObject *o, PyObject *Py_UNUSED(a))
{
    MemdMempool *self = (MemdMempool *)o;
    char *base = pool_live(self);
    if (base == NULL)
        return NULL;
    memd_mempool_poison(base, self->offset, ((MemdWindow *)self->window)->size - self->offset);
    Py_RETURN_NONE;
}

static PyMethodDef mempool_methods[] = {
    {"_check_live", mp_check_live, METH_NOARGS,
     "_check_live() -> None: StaleHandle if the pool was freed since this handle was made"},
    {"_bind_zone", mp_bind_zone, METH_VARARGS,
     "_bind_zone(mz_id, generation) -> None: the memzone the pool was found in (a tag "
     "mismatch while it is still listed there is damage: CorruptionError, not StaleHandle)"},
    {"_poison", mp_poison, METH_NOARGS,
     "_poison() -> None (mempool_free's step): every handle to this pool raises StaleHandle "
     "from now on; StaleHandle if it was freed already"},
    {"get", mp_get, METH_NOARGS, "get() -> MempoolObject; raises PoolEmpty."},
    {"get_handle", mp_get_handle, METH_NOARGS,
     "get_handle() -> int: an object's handle without a Python object; raises PoolEmpty."},
    {"put", mp_put, METH_O, "put(obj_or_handle): give an object back."},
    {"get_bulk", mp_get_bulk, METH_O,
     "get_bulk(n) -> list[MempoolObject]: all n or PoolEmpty (nothing taken)."},
    {"get_bulk_into", mp_get_bulk_into, METH_O,
     "get_bulk_into(buffer) -> int: fill a writable uint64 buffer with handles, all or "
     "PoolEmpty; returns len(buffer)."},
    {"put_bulk", mp_put_bulk, METH_O,
     "put_bulk(objs): MempoolObjects, handles, or a uint64 buffer of handles; all or "
     "nothing (ValueError for a foreign or already free object)."},
    {"obj", mp_obj, METH_O,
     "obj(handle) -> MempoolObject; ValueError if it is no object of this pool."},
    {"obj_at", mp_obj_at, METH_O, "obj_at(index) -> MempoolObject number index (0..n-1)."},
    {"avail_count", mp_avail_count, METH_NOARGS,
     "avail_count() -> free objects: the ring and every process's cache."},
    {"in_use_count", mp_in_use_count, METH_NOARGS, "in_use_count() -> n - avail_count()."},
    {"cache_count", (PyCFunction)(void (*)(void))mp_cache_count, METH_FASTCALL,
     "cache_count(slot=...) -> int: how many handles process slot `slot`'s cache holds "
     "(default: this process's)."},
    {"flush_cache", mp_flush_cache, METH_NOARGS,
     "flush_cache() -> int: move this process's cached objects to the ring."},
    {"recover", mp_recover, METH_NOARGS,
     "recover() -> int: put free objects found in no ring or cache (a process was killed "
     "moving them) back into the ring, at a moment when no process moves the pool's objects "
     "(holding them off for at most 20 ms, 1 ms more per 16384 objects)."},
    {"audit", mp_audit, METH_NOARGS,
     "audit() -> dict of counts; raises CorruptionError on a smashed cookie or bad count. "
     "Looks at a moment when no process moves the pool's objects, as recover."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef mempool_getset[] = {
    {"name", mp_get_name, NULL, "name stored in the pool header", NULL},
    {"size", mp_get_size, NULL, "objects in the pool (n)", NULL},
    {"elt_size", mp_get_elt_size, NULL, "bytes of data per object", NULL},
    {"cache_size", mp_get_cache_size, NULL, "per-process cache size", NULL},
    {"flushthresh", mp_get_flushthresh, NULL, "cache length that triggers a flush", NULL},
    {"private_data_size", mp_get_private_data_size, NULL, "bytes of private area", NULL},
    {"private_data", mp_get_private_data, NULL, "memoryview of the private area", NULL},
    {"flags", mp_get_flags, NULL, "MEMPOOL_F_* flags", NULL},
    {"memsize", mp_get_memsize, NULL, "bytes of shared memory the pool uses", NULL},
    {"obj_stride", mp_get_obj_stride, NULL, "bytes from one object to the next", NULL},
    {"ring_offset", mp_get_ring_offset, NULL, "window offset of the free ring", NULL},
    {"offset", mp_get_offset, NULL, "window offset of the pool header", NULL},
    {"slot", mp_get_slot, NULL, "the cache this handle uses (-1: none)", NULL},
    {"window", mp_get_window, NULL, "the Window the pool lives in", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MemdMempool_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.Mempool",
    .tp_basicsize = sizeof(MemdMempool),
    .tp_dealloc = mempool_dealloc,
    .tp_traverse = mempool_traverse,
    .tp_clear = mempool_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Mempool(window, offset, slot=0): a pool in a shared window (see memd.shm.mempool).",
    .tp_methods = mempool_methods,
    .tp_getset = mempool_getset,
    .tp_new = mempool_new,
};

/* --- module functions ----------------------------------------------------- */

static int geometry_or_raise(unsigned long long n, unsigned long long elt_size,
                             unsigned long long cache_size, unsigned long long private_size,
                             unsigned int flags, struct memd_mempool_geometry *g)
{
    if (n > UINT32_MAX || elt_size > UINT32_MAX || cache_size > UINT32_MAX ||
        private_size > UINT32_MAX ||
        memd_mempool_geometry((uint32_t)n, (uint32_t)elt_size, (uint32_t)cache_size,
                              (uint32_t)private_size, flags, g) < 0) {
        PyErr_Format(PyExc_ValueError,
                     "bad mempool geometry: n=%llu elt_size=%llu cache_size=%llu "
                     "private_data_size=%llu flags=0x%x (need 1 <= n < 2**31, elt_size and "
                     "private_data_size < 2**31, cache_size <= %u and cache_size * 3 // 2 <= "
                     "n, flags only MEMPOOL_F_*)",
                     n, elt_size, cache_size, private_size, flags, MEMD_MEMPOOL_CACHE_MAX_SIZE);
        return -1;
    }
    return 0;
}

static PyObject *py_mempool_memsize(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", "elt_size", "cache_size", "private_data_size", "flags", NULL};
    unsigned long long n, elt, cache = 0, priv = 0;
    unsigned int flags = 0;
    struct memd_mempool_geometry g;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&O&|O&O&O&:mempool_memsize", kwlist,
                                     memd_conv_u64, &n, memd_conv_u64, &elt, memd_conv_u64, &cache,
                                     memd_conv_u64, &priv, memd_conv_u32, &flags) ||
        geometry_or_raise(n, elt, cache, priv, flags, &g) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(g.memsize);
}

static PyObject *py_mempool_init(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"window", "offset", "n", "elt_size", "cache_size", "private_data_size",
                             "flags",  "name",   NULL};
    PyObject *window;
    unsigned long long off, n, elt, cache = 0, priv = 0;
    unsigned int flags = 0;
    const char *name = "";
    struct memd_mempool_geometry g;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O&O&O&|O&O&O&s:mempool_init", kwlist,
                                     &MemdWindow_Type, &window, memd_conv_u64, &off, memd_conv_u64,
                                     &n, memd_conv_u64, &elt, memd_conv_u64, &cache, memd_conv_u64,
                                     &priv, memd_conv_u32, &flags, &name) ||
        geometry_or_raise(n, elt, cache, priv, flags, &g) < 0)
        return NULL;
    char *base = memd_base_of(window);
    if (base == NULL)
        return NULL;
    if (strlen(name) >= MEMD_NAMESIZE) {
        PyErr_Format(PyExc_ValueError, "mempool name '%s' is longer than %u bytes", name,
                     MEMD_NAMESIZE - 1);
        return NULL;
    }
    if (off % MEMD_CACHE_LINE) {
        PyErr_SetString(PyExc_ValueError, "a mempool's offset must be 64-byte aligned");
        return NULL;
    }
    if (memd_check_range(window, off, g.memsize) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS /* touches every object: may take a while for big pools */
        rc = memd_mempool_init(base, off, name, (uint32_t)n, (uint32_t)elt, (uint32_t)cache,
                               (uint32_t)priv, flags);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return memd_raise_errno(rc, "mempool_init");
    Py_RETURN_NONE;
}

/* The pool at (window, off) for a module function, or NULL with an error set. */
static char *checked_pool(PyObject *window, unsigned long long off, const char *fn,
                          struct memd_mempool_geometry *g)
{
    char *base = memd_base_of(window);
    if (base == NULL || memd_check_range(window, off, sizeof(struct memd_mempool)) < 0 ||
        pool_mapped(window, base, off) < 0)
        return NULL;
    if (memd_mempool_load(base, off, ((MemdWindow *)window)->size - off, g) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: no initialised mempool at window offset %llu", fn, off);
        return NULL;
    }
    set_mover(g, window);
    return base;
}

static PyObject *py_mempool_flush_cache(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off;
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "O!O&O&:mempool_flush_cache", &MemdWindow_Type, &window,
                          memd_conv_u64, &off, memd_conv_u32, &slot))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "mempool_flush_cache", &g);
    if (base == NULL)
        return NULL;
    int rc = memd_mempool_flush_cache(base, &g, slot);
    for (uint64_t start = 0; rc == -EBUSY;) {
        if (wait_busy(base, &g, 1, "mempool_flush_cache", &start) < 0 ||
            memd_base_of(window) == NULL)
            return NULL;
        rc = memd_mempool_flush_cache(base, &g, slot);
    }
    if (rc < 0)
        return memd_raise_errno(rc, "mempool_flush_cache");
    return PyLong_FromLong(rc);
}

/* mempool_moving(): the mempool (window offset) whose objects process slot `slot`
 * is in the middle of moving, or None: for the primary, about a dead process. */
static PyObject *py_mempool_moving(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned int slot;
    if (!PyArg_ParseTuple(args, "O!O&:mempool_moving", &MemdWindow_Type, &window, memd_conv_u32,
                          &slot))
        return NULL;
    char *base = memd_base_of(window);
    if (base == NULL)
        return NULL;
    if (((MemdWindow *)window)->size < MEMD_CONFIG_SIZE || slot >= MEMD_MAX_PROCS) {
        PyErr_SetString(PyExc_ValueError, "mempool_moving(win, slot): a config window and slot");
        return NULL;
    }
    const struct memd_proc_pins *row = &((const struct memd_config *)base)->pins[slot];
    if (!(atomic_load_explicit(&row->pool_moving, memory_order_acquire) & 1u))
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(
        atomic_load_explicit(&row->pool_moving_at, memory_order_relaxed));
}

/* object_poison(): a damaged ring or pool (no handle can be made to it) is about to be
 * freed through its memzone: overwrite every tag copy its header still places, within
 * [off, off + len) only, so that handles other processes kept raise StaleHandle. */
static PyObject *py_object_poison(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned int kind;
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "O!O&O&O&:object_poison", &MemdWindow_Type, &window, memd_conv_u32,
                          &kind, memd_conv_u64, &off, memd_conv_u64, &len))
        return NULL;
    char *base = memd_base_of(window);
    if (base == NULL || memd_check_range(window, off, len) < 0 ||
        memd_check_mapped(window, off, len) < 0)
        return NULL;
    if (off % MEMD_CACHE_LINE)
        return memd_raise_errno(-EINVAL, "object_poison");
    if (kind == MEMD_OBJ_RING && len >= sizeof(struct memd_ring))
        memd_ring_poison((struct memd_ring *)(base + off));
    else if (kind == MEMD_OBJ_MEMPOOL && len >= sizeof(struct memd_mempool))
        memd_mempool_poison(base, off, len);
    Py_RETURN_NONE;
}

static int checked_pid(long pid, const char *fn)
{
    if (pid <= 0 || pid > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: pid must be a process id > 0, not %ld", fn, pid);
        return -1;
    }
    return 0;
}

static PyObject *py_mempool_held_by(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off;
    long pid;
    if (!PyArg_ParseTuple(args, "O!O&l:mempool_held_by", &MemdWindow_Type, &window, memd_conv_u64,
                          &off, &pid))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "mempool_held_by", &g);
    if (base == NULL || checked_pid(pid, "mempool_held_by") < 0)
        return NULL;
    uint64_t n;
    Py_BEGIN_ALLOW_THREADS /* walks every object header */
        n = memd_mempool_held_by(base, &g, (int32_t)pid);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(n);
}

/* mempool_busy(window, off) -> list of (handle, getter pid) of the objects
 * handed out: a snapshot while others get and put. */
static PyObject *py_mempool_busy(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off;
    if (!PyArg_ParseTuple(args, "O!O&:mempool_busy", &MemdWindow_Type, &window, memd_conv_u64,
                          &off))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "mempool_busy", &g);
    if (base == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    uint64_t handle;
    int32_t pid;
    int rc;
    for (uint32_t i = 0; (rc = memd_mempool_busy_at(base, &g, i, &handle, &pid)) >= 0; i++) {
        if (rc != 1)
            continue;
        PyObject *t = Py_BuildValue("(Ki)", (unsigned long long)handle, (int)pid);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

/* mempool_holders(window, off) -> {getter pid: objects handed out}: counted in C
 * without the GIL, so that a pool of millions of objects in use costs one walk
 * and a small dict, not a list of millions of tuples. */
static PyObject *py_mempool_holders(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off;
    if (!PyArg_ParseTuple(args, "O!O&:mempool_holders", &MemdWindow_Type, &window, memd_conv_u64,
                          &off))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "mempool_holders", &g);
    if (base == NULL)
        return NULL;
    for (uint32_t cap = 64;; cap *= 4) {
        int32_t *pids = PyMem_Malloc(cap * sizeof(int32_t));
        uint64_t *counts = PyMem_Malloc(cap * sizeof(uint64_t));
        if (pids == NULL || counts == NULL) {
            PyMem_Free(pids);
            PyMem_Free(counts);
            return PyErr_NoMemory();
        }
        int64_t k;
        Py_BEGIN_ALLOW_THREADS /* walks every object header */
            k = memd_mempool_holders(base, &g, pids, counts, cap);
        Py_END_ALLOW_THREADS
        PyObject *out = NULL;
        if (k >= 0 && (out = PyDict_New()) != NULL) {
            for (int64_t i = 0; i < k; i++) {
                PyObject *key = PyLong_FromLong(pids[i]);
                PyObject *val = PyLong_FromUnsignedLongLong(counts[i]);
                if (key == NULL || val == NULL || PyDict_SetItem(out, key, val) < 0)
                    Py_CLEAR(out);
                Py_XDECREF(key);
                Py_XDECREF(val);
                if (out == NULL)
                    break;
            }
        }
        PyMem_Free(pids);
        PyMem_Free(counts);
        if (k >= 0 || cap > g.n)
            return out;
    }
}

static PyObject *py_mempool_reclaim_held_by(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off;
    long pid;
    if (!PyArg_ParseTuple(args, "O!O&l:mempool_reclaim_held_by", &MemdWindow_Type, &window,
                          memd_conv_u64, &off, &pid))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "mempool_reclaim_held_by", &g);
    if (base == NULL || checked_pid(pid, "mempool_reclaim_held_by") < 0)
        return NULL;
    int busy;
    int64_t n = memd_mempool_reclaim_held_by(base, &g, (int32_t)pid, &busy);
    for (uint64_t start = 0; n >= 0 && busy;) { /* the rest, once the ring is free */
        if (wait_busy(base, &g, 1, "mempool_reclaim_held_by", &start) < 0 ||
            memd_base_of(window) == NULL)
            return NULL;
        int64_t more = memd_mempool_reclaim_held_by(base, &g, (int32_t)pid, &busy);
        n = more < 0 ? more : n + more;
    }
    if (n == -EBUSY) {
        PyErr_Format(PyExc_ValueError,
                     "mempool_reclaim_held_by: process %ld is alive; only a dead process's "
                     "objects may be put back",
                     pid);
        return NULL;
    }
    if (n < 0) {
        PyErr_Format(memd_error("CorruptionError", PyExc_ValueError),
                     "mempool_reclaim_held_by: the free ring overflowed (the pool is "
                     "corrupted); run audit() for details");
        return NULL;
    }
    return PyLong_FromLongLong(n);
}

#ifdef MEMD_TEST_HOOKS
static PyObject *py_mempool_settle_own(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *window;
    unsigned long long off, handle;
    if (!PyArg_ParseTuple(args, "O!O&O&:_mempool_settle_own", &MemdWindow_Type, &window,
                          memd_conv_u64, &off, memd_conv_u64, &handle))
        return NULL;
    struct memd_mempool_geometry g;
    char *base = checked_pool(window, off, "_mempool_settle_own", &g);
    if (base == NULL)
        return NULL;
    int rc = memd_mempool_settle_own(base, &g, handle);
    return rc < 0 ? memd_raise_errno(rc, "_mempool_settle_own") : PyLong_FromLong(rc);
}
#endif

static PyMethodDef mempool_functions[] = {
    {"mempool_busy", py_mempool_busy, METH_VARARGS,
     "mempool_busy(window, pool_offset) -> [(handle, getter pid)] of the objects handed out"},
    {"mempool_holders", py_mempool_holders, METH_VARARGS,
     "mempool_holders(window, pool_offset) -> {getter pid: objects handed out}"},
    {"mempool_held_by", py_mempool_held_by, METH_VARARGS,
     "mempool_held_by(window, pool_offset, pid) -> int: objects process pid got and has "
     "not put back (BUSY with its owner tag)."},
#ifdef MEMD_TEST_HOOKS /* test builds only (setup.py) */
    {"_mempool_settle_own", py_mempool_settle_own, METH_VARARGS,
     "_mempool_settle_own(window, pool_offset, handle) -> 0 or 1 (TESTS ONLY): what a put "
     "that marked the object FREE does when its check finds the owner tag as it is now: 0 "
     "(still ours to put) or 1 (lost; the cookie then says who holds it)."},
#endif
    {"mempool_reclaim_held_by", py_mempool_reclaim_held_by, METH_VARARGS,
     "mempool_reclaim_held_by(window, pool_offset, pid) -> int: put those objects back "
     "(pid must be dead; ValueError if it is alive)."},
    {"mempool_memsize", (PyCFunction)(void (*)(void))py_mempool_memsize,
     METH_VARARGS | METH_KEYWORDS,
     "mempool_memsize(n, elt_size, cache_size=0, private_data_size=0, flags=0) -> int: the "
     "bytes such a pool needs."},
    {"mempool_init", (PyCFunction)(void (*)(void))py_mempool_init, METH_VARARGS | METH_KEYWORDS,
     "mempool_init(window, offset, n, elt_size, cache_size=0, private_data_size=0, flags=0, "
     "name='') -> None: a pool with every object free (obj_init is the caller's)."},
    {"mempool_flush_cache", py_mempool_flush_cache, METH_VARARGS,
     "mempool_flush_cache(window, pool_offset, slot) -> int: move a process slot's cached "
     "objects back to the ring (detach, or reclaiming a dead process's slot)."},
    {"mempool_moving", py_mempool_moving, METH_VARARGS,
     "mempool_moving(window, slot) -> int | None: the window offset of the mempool whose "
     "objects process slot `slot` is in the middle of moving (it died there?), or None."},
    {"object_poison", py_object_poison, METH_VARARGS,
     "object_poison(window, kind, offset, length): overwrite the identity tags of the "
     "(damaged) ring or pool at offset, within length bytes (freeing it by its memzone)."},
    {NULL, NULL, 0, NULL},
};

static const struct memd_const mempool_constants[] = {
    MEMD_CONST("MEMPOOL_F_NO_SPREAD", MEMD_MEMPOOL_F_NO_SPREAD),
    MEMD_CONST("MEMPOOL_HDR_COOKIE_BUSY", MEMD_MEMPOOL_HDR_COOKIE_BUSY),
    MEMD_CONST("MEMPOOL_F_NO_CACHE_ALIGN", MEMD_MEMPOOL_F_NO_CACHE_ALIGN),
    MEMD_CONST("MEMPOOL_F_SP_PUT", MEMD_MEMPOOL_F_SP_PUT),
    MEMD_CONST("MEMPOOL_F_SC_GET", MEMD_MEMPOOL_F_SC_GET),
    MEMD_CONST("MEMPOOL_F_NO_IOVA_CONTIG", MEMD_MEMPOOL_F_NO_IOVA_CONTIG),
    MEMD_CONST("MEMPOOL_CACHE_MAX_SIZE", MEMD_MEMPOOL_CACHE_MAX_SIZE),
    {NULL},
};

static const struct memd_field mempool_layout[] = {
    MEMD_SIZEOF(memd_mempool),
    MEMD_FIELD(memd_mempool, magic),
    MEMD_FIELD(memd_mempool, name),
    MEMD_FIELD(memd_mempool, n),
    MEMD_FIELD(memd_mempool, cache_size),
    MEMD_FIELD(memd_mempool, flushthresh),
    MEMD_FIELD(memd_mempool, caches_offset),
    MEMD_FIELD(memd_mempool, cache_stride),
    MEMD_FIELD(memd_mempool, ring_offset),
    MEMD_FIELD(memd_mempool, objs_offset),
    MEMD_FIELD(memd_mempool, obj_stride),
    MEMD_FIELD(memd_mempool, recovering),
    MEMD_FIELD(memd_mempool, trailer_offset),
    MEMD_FIELD(memd_mempool, memsize),
    MEMD_FIELD(memd_mempool, tag),
    MEMD_FIELD(memd_mempool_cache, len),
    MEMD_FIELD(memd_mempool_cache, tag),
    MEMD_SIZEOF(memd_mempool_cache),
    MEMD_FLEX(memd_mempool_cache, objs),
    MEMD_SIZEOF(memd_mempool_objhdr),
    MEMD_FIELD(memd_mempool_objhdr, cookie),
    MEMD_FIELD(memd_mempool_objhdr, index),
    MEMD_FIELD(memd_mempool_objhdr, owner_pid),
    {NULL},
};

int memd_py_init_mempool(PyObject *m)
{
    return memd_add_type(m, &MemdMempool_Type) < 0 || memd_add_type(m, &MemdMpObj_Type) < 0 ||
                   memd_add_functions(m, mempool_functions) < 0 ||
                   memd_add_constants(m, mempool_constants) < 0 ||
                   memd_add_layout(m, mempool_layout) < 0
               ? -1
               : 0;
}
