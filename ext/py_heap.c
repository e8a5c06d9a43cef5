/*
 * py_heap.c - Python bindings for heap.c, and the Block type.
 *
 * Every function takes a Window and a heap index (0..MEMD_MAX_HEAPS-1); the heap
 * is config.heaps[index] of the config at the window's base.  Locking: the lock
 * is tried first; only when it is contended is the GIL released while blocking.
 * A lock taken from a dead owner runs memd_heap_check first; a broken heap fails
 * with OSError(EFAULT).  heap_add_memory, heap_find_free_pages and
 * heap_remove_memory are "(caller locks)" as in C: call them between heap_lock()
 * and heap_unlock() (the lock is not recursive).  heap_check and heap_walk lock
 * unless given locked=True.  Errors are OSError(errno, "... (from heap_xxx)").
 */
#include "memd_py.h" /* Python.h first */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <structmember.h>

#include "heap.h"
#include "proc.h"
#include "lock.h"

/* --- arguments and locking ------------------------------------------------------ */

static int u64_arg(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* The heap at index idxo of the config in window win, or NULL with an error set. */
static struct memd_heap *heap_of(PyObject *win, PyObject *idxo, char **base)
{
    char *b = memd_base_of(win);
    if (b == NULL)
        return NULL;
    long i = PyLong_AsLong(idxo);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= (long)MEMD_MAX_HEAPS) {
        PyErr_Format(PyExc_ValueError, "heap index %ld is not in 0..%u", i, MEMD_MAX_HEAPS - 1);
        return NULL;
    }
    if (((MemdWindow *)win)->size < MEMD_CONFIG_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the window is too small to hold a config");
        return NULL;
    }
    *base = b;
    return &((struct memd_config *)b)->heaps[i];
}

/* Take h's lock: 0, 1 (taken from a dead owner; the heap checked fine), or -errno
 * with the lock not held.  Releases the GIL only while blocking. */
/* How long a heap lock is waited for: 30 s in a program (a wait lets signals
 * through: Ctrl-C works; past the bound the call fails "busy" rather than hang
 * behind a stopped holder), less in the daemon (heap_lock_wait), which a stopped
 * holder must not stall.  Waits sleep with the GIL released. */
static uint64_t lock_wait_limit_ns = 30000000000ull;
#define LOCK_WAIT_SLICE_NS 100000000ull /* how often a waiter looks for signals */

uint64_t memd_py_lock_wait_limit(void) { return lock_wait_limit_ns; }

/* Set while a C fast path that waited the limit out hands the call to its Python
 * slow path, which redoes it to raise memd's "busy" error: it must not wait again
 * (thread-local: other threads' waits are their own). */
static __thread int lock_wait_spent __attribute__((tls_model("initial-exec")));

/* Is the exception set an OSError ETIMEDOUT (memd_raise_errno's, not normalized)? */
static int lock_timed_out(void)
{
    if (!PyErr_Occurred() || !PyErr_ExceptionMatches(PyExc_OSError))
        return 0;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    int r = v != NULL && PyObject_TypeCheck(v, (PyTypeObject *)PyExc_TimeoutError);
    PyErr_Restore(t, v, tb);
    return r;
}

/* Take heap h's lock: 0, 1 (recovered from a dead owner), or -errno: -ETIMEDOUT
 * past the wait limit, -EINTR with the signal handler's exception set. */
static int py_lock(char *base, struct memd_heap *h)
{
    int rc = memd_lock_try(&h->lock);
    /* read only when the lock is busy: malloc and free come through here */
    const uint64_t limit = rc == 0 ? 0 : lock_wait_spent ? 0 : lock_wait_limit_ns;
    for (uint64_t waited = 0; rc == -EBUSY || rc == -ETIMEDOUT;) {
        if (waited >= limit)
            return -ETIMEDOUT;
        uint64_t slice = limit - waited;
        if (slice > LOCK_WAIT_SLICE_NS)
            slice = LOCK_WAIT_SLICE_NS;
        Py_BEGIN_ALLOW_THREADS
            rc = memd_lock_timed(&h->lock, slice);
        Py_END_ALLOW_THREADS
        waited += slice;
        if (rc == -ETIMEDOUT && PyErr_CheckSignals() < 0)
            return -EINTR;
    }
    int done = memd_heap_lock_done(base, h, rc);
    return done < 0 ? done : rc;
}

/* --- Block ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *window; /* strong ref: keeps the mapping alive */
    PyObject *owner;  /* the Memory that allocated it (iova), or NULL */
    char *addr;
    unsigned long long offset;
    unsigned long long size;
    uint32_t serial; /* the block's serial when this handle was made (its header's) */
    uint16_t heap;   /* < MEMD_MAX_HEAPS; 16 bits keep the object at 64 bytes */
    char freed;      /* freed or resized through the bindings: no new buffers */
} MemdBlock;
_Static_assert(MEMD_MAX_HEAPS <= UINT16_MAX, "MemdBlock.heap is 16 bits");

static PyTypeObject MemdBlock_Type;

static PyObject *block_new(PyObject *win, PyObject *owner, char *base, uint64_t off, uint64_t size,
                           int heap, uint32_t serial)
{
    MemdBlock *b = PyObject_GC_New(MemdBlock, &MemdBlock_Type);
    if (b == NULL)
        return NULL;
    Py_INCREF(win);
    b->window = win;
    b->owner = (owner == Py_None) ? NULL : owner;
    Py_XINCREF(b->owner);
    b->addr = base + off;
    b->offset = off;
    b->size = size;
    b->heap = (uint16_t)heap;
    b->serial = serial;
    b->freed = 0;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static int block_traverse(PyObject *self, visitproc visit, void *arg)
{
    MemdBlock *b = (MemdBlock *)self;
    Py_VISIT(b->window);
    Py_VISIT(b->owner);
    return 0;
}

static int block_clear(PyObject *self)
{
    MemdBlock *b = (MemdBlock *)self;
    Py_CLEAR(b->owner);
    return 0; /* the window stays until dealloc: addr must remain mapped */
}

static void block_dealloc(PyObject *self)
{
    MemdBlock *b = (MemdBlock *)self;
    PyObject_GC_UnTrack(self);
    Py_CLEAR(b->owner);
    Py_CLEAR(b->window);
    PyObject_GC_Del(self);
}

/* StaleHandle: b's block was freed, by another handle (a copy, an unpickled one,
 * in this process or another) or with its owner.  Returns NULL. */
static __attribute__((noinline, cold)) void *raise_stale_at(uint64_t off)
{
    char hex[24]; /* PyErr_Format has no %#llx */
    snprintf(hex, sizeof(hex), "%#llx", (unsigned long long)off);
    PyErr_Format(memd_error("StaleHandle", PyExc_KeyError),
                 "the block at offset %s was freed (by this or another process, through "
                 "another handle to it) or resized since this Block was made; nothing was "
                 "touched: use the Block that malloc or realloc returned",
                 hex);
    return NULL;
}

static inline void *raise_stale_block(const MemdBlock *b) { return raise_stale_at(b->offset); }

/* Is b's block still the one b was made for: a busy header with b's serial?
 * Read without the heap lock (a check, as a ring's tag: a free racing with it
 * is the user's race); the header's page must be mapped (pinned by the caller,
 * or in a window without pins). */
static inline int block_current(const MemdBlock *b)
{
    const struct memd_heap_elem *e =
        (const struct memd_heap_elem *)(b->addr - MEMD_ELEM_HEADER_SIZE);
    uint64_t hoff = b->offset - MEMD_ELEM_HEADER_SIZE;
    uint64_t w0 = __atomic_load_n((const uint64_t *)e, __ATOMIC_RELAXED);
    uint64_t w5 = __atomic_load_n((const uint64_t *)&e->u.busy.owner_pid, __ATOMIC_RELAXED);
    /* cookie and state: the low 5 bytes of word 0 */
    uint64_t busy = (uint64_t)MEMD_ELEM_BUSY << 32;
    uint64_t want = (uint64_t)(MEMD_ELEM_COOKIE ^ (uint32_t)(hoff >> 6)) | busy;
    return (w0 & 0xffffffffffull) == want && (uint32_t)(w5 >> 32) == b->serial;
}

static int block_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    MemdBlock *b = (MemdBlock *)self;
    if (b->freed) {
        PyErr_SetString(memd_error("StaleHandle", PyExc_KeyError),
                        "this Block was freed (or resized: use the Block realloc returned)");
        view->obj = NULL;
        return -1;
    }
    if (((MemdWindow *)b->window)->base == NULL) {
        memd_raise_closed(PyExc_BufferError);
        view->obj = NULL;
        return -1;
    }
    /* the view pins its pages (and its header's, read next): they outlive a free
     * while it lives */
    if (memd_view_pin(b->window, b->offset - MEMD_ELEM_HEADER_SIZE, b->size + MEMD_ELEM_HEADER_SIZE,
                      view) < 0) {
        view->obj = NULL;
        return -1;
    }
    void *tag = view->internal;
    if (__builtin_expect(!block_current(b), 0)) {
        memd_view_unpin(b->window, view);
        raise_stale_block(b);
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, self, b->addr, (Py_ssize_t)b->size, 0, flags) < 0) {
        view->internal = tag;
        memd_view_unpin(b->window, view);
        return -1;
    }
    view->internal = tag;
    return 0;
}

static void block_releasebuffer(PyObject *self, Py_buffer *view)
{
    memd_view_unpin(((MemdBlock *)self)->window, view);
}

static PyBufferProcs block_as_buffer = {block_getbuffer, block_releasebuffer};

static PyObject *block_get_buf(PyObject *self, void *Py_UNUSED(c))
{
    return PyMemoryView_FromObject(self);
}

static PyObject *block_get_iova(PyObject *self, void *Py_UNUSED(c))
{
    MemdBlock *b = (MemdBlock *)self;
    if (b->owner == NULL) {
        PyErr_SetString(PyExc_AttributeError, "iova: the block has no owning Memory");
        return NULL;
    }
    return PyObject_CallMethod(b->owner, "_iova", "K", b->offset);
}

/* owner_pid: read from the header without the heap lock (one aligned word). */
static PyObject *block_get_owner_pid(PyObject *self, void *Py_UNUSED(c))
{
    MemdBlock *b = (MemdBlock *)self;
    char *base = ((MemdWindow *)b->window)->base;
    if (b->freed || base == NULL)
        Py_RETURN_NONE;
    const struct memd_heap_elem *e =
        (const struct memd_heap_elem *)(b->addr - MEMD_ELEM_HEADER_SIZE);
    uint64_t hoff = b->offset - MEMD_ELEM_HEADER_SIZE;
    if (e->cookie != (MEMD_ELEM_COOKIE ^ (uint32_t)(hoff >> 6)) || e->state != MEMD_ELEM_BUSY ||
        e->u.busy.serial != b->serial)
        Py_RETURN_NONE; /* freed by someone else (e.g. free_owned_by), perhaps allocated anew */
    return PyLong_FromLong(__atomic_load_n(&e->u.busy.owner_pid, __ATOMIC_RELAXED));
}

static PyObject *block_repr(PyObject *self)
{
    MemdBlock *b = (MemdBlock *)self;
    char buf[128];
    snprintf(buf, sizeof(buf), "<memd Block heap=%d offset=%#llx size=%llu%s>", b->heap, b->offset,
             b->size, b->freed ? " freed" : "");
    return PyUnicode_FromString(buf);
}

static Py_ssize_t block_len(PyObject *self) { return (Py_ssize_t)((MemdBlock *)self)->size; }

static PySequenceMethods block_as_sequence = {.sq_length = block_len};

static PyMemberDef block_members[] = {
    {"offset", T_ULONGLONG, offsetof(MemdBlock, offset), READONLY,
     "window offset of the data (any process can view it there)"},
    {"size", T_ULONGLONG, offsetof(MemdBlock, size), READONLY, "bytes asked for"},
    {"heap", T_USHORT, offsetof(MemdBlock, heap), READONLY, "index of the owning heap"},
    {"serial", T_UINT, offsetof(MemdBlock, serial), READONLY,
     "the heap's allocation serial the block got (its header's; a later block at the same "
     "offset has another)"},
    {"freed", T_BOOL, offsetof(MemdBlock, freed), READONLY,
     "True once freed or resized through this object"},
    {"window", T_OBJECT, offsetof(MemdBlock, window), READONLY, "the Window"},
    {"owner", T_OBJECT, offsetof(MemdBlock, owner), READONLY, "the Memory, or None"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef block_getset[] = {
    {"buf", block_get_buf, NULL, "writable memoryview over the data, zero-copy", NULL},
    {"iova", block_get_iova, NULL,
     "the IO address of the data, as the owner's _iova gives it for the offset", NULL},
    {"owner_pid", block_get_owner_pid, NULL,
     "pid of the process that allocated (or last resized) the block, from its header; "
     "None once it is freed",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MemdBlock_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.Block",
    .tp_basicsize = sizeof(MemdBlock),
    .tp_dealloc = block_dealloc,
    .tp_repr = block_repr,
    .tp_as_sequence = &block_as_sequence,
    .tp_as_buffer = &block_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A heap block (rte_malloc's pointer): its data exported through the buffer "
              "protocol (``buf``: a writable memoryview of ``size`` bytes at window offset "
              "``offset``).  It records the block's allocation ``serial`` when it is made "
              "(malloc, zmalloc, calloc, realloc, heap_alloc, unpickling) and compares it "
              "wherever it touches the block: a buffer export (``buf``, ``memoryview(blk)``) "
              "raises StaleHandle, touching nothing, once the block was freed or resized "
              "through another handle (a copy, an unpickled one, in any process), even if a "
              "later block took its offset, and so do free, realloc and validate through it. "
              "The handle that freed or resized it raises StaleHandle on export too, and "
              "MemdValueError on free (it knows).  A view taken before the free is not "
              "revoked.",
    .tp_traverse = block_traverse,
    .tp_clear = block_clear,
    .tp_members = block_members,
    .tp_getset = block_getset,
};

/* --- hot paths (METH_FASTCALL) ------------------------------------------------------ */

/* heap_alloc(win, idx, size, align=0, bound=0, contig=False, zero=False) -> offset.
 * Fails iff ValueError/TypeError (bad window, index or argument types) or OSError:
 * EINVAL (size 0, align/bound not a power of two, bound < size), ENOMEM (nothing
 * fits: expand the heap), EFAULT (heap broken). */
static PyObject *py_heap_alloc(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    uint64_t size, align = 0, bound = 0, off;
    int contig = 0, zero = 0;
    char *base;
    if (nargs < 3 || nargs > 7) {
        PyErr_SetString(PyExc_TypeError,
                        "heap_alloc(win, idx, size, align=0, bound=0, contig=False, zero=False)");
        return NULL;
    }
    struct memd_heap *h = heap_of(args[0], args[1], &base);
    if (h == NULL || u64_arg(args[2], &size) < 0 || (nargs > 3 && u64_arg(args[3], &align) < 0) ||
        (nargs > 4 && u64_arg(args[4], &bound) < 0) ||
        (nargs > 5 && (contig = PyObject_IsTrue(args[5])) < 0) ||
        (nargs > 6 && (zero = PyObject_IsTrue(args[6])) < 0))
        return NULL;
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_alloc");
    rc = memd_heap_alloc_nolock(base, h, size, align, bound, contig, zero, &off);
    memd_heap_unlock(h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_alloc");
    return PyLong_FromUnsignedLongLong(off);
}

/* heap_free(win, idx, off) -> size of the free element it ended up in.
 * Fails iff OSError EINVAL (not a busy block of this heap: double free, foreign
 * offset) or EFAULT (smashed trailer; the block stays allocated). */
static PyObject *py_heap_free(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    uint64_t off;
    char *base;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "heap_free(win, idx, off)");
        return NULL;
    }
    struct memd_heap *h = heap_of(args[0], args[1], &base);
    if (h == NULL || u64_arg(args[2], &off) < 0)
        return NULL;
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_free");
    int64_t r = memd_heap_free_nolock(base, h, off);
    memd_heap_unlock(h);
    if (r < 0)
        return memd_raise_errno((int)r, "heap_free");
    return PyLong_FromLongLong(r);
}

/* Allocate from the heaps in order (a tuple of indices).  Returns a Block, or NULL
 * with an error set, or NULL with no error when every heap said ENOMEM. */
static PyObject *malloc_in(PyObject *win, PyObject *order, uint64_t size, uint64_t align,
                           uint64_t bound, int contig, int zero, PyObject *owner)
{
    char *base;
    uint64_t off;
    Py_ssize_t n = PyTuple_GET_SIZE(order);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *idx = PyTuple_GET_ITEM(order, i);
        struct memd_heap *h = heap_of(win, idx, &base);
        if (h == NULL)
            return NULL;
        int rc = py_lock(base, h);
        if (rc < 0)
            return memd_raise_errno(rc, "heap_malloc");
        rc = memd_heap_alloc_nolock(base, h, size, align, bound, contig, zero, &off);
        uint32_t serial = rc == 0 ? memd_heap_block_serial(base, off) : 0;
        memd_heap_unlock(h);
        if (rc == 0)
            return block_new(win, owner, base, off, size,
                             (int)(h - ((struct memd_config *)base)->heaps), serial);
        if (rc != -ENOMEM)
            return memd_raise_errno(rc, "heap_malloc");
    }
    return NULL;
}

/* heap_malloc(win, order, size, align, bound, contig, zero, owner) -> Block | None.
 * Tries the heaps in order (a tuple of indices); None when none has room (expand
 * and retry).  Fails iff as heap_alloc, except that ENOMEM returns None. */
static PyObject *py_heap_malloc(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    uint64_t size, align, bound;
    int contig, zero;
    if (nargs != 8 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "heap_malloc(win, order: tuple, size, align, bound, contig, zero, owner)");
        return NULL;
    }
    if (u64_arg(args[2], &size) < 0 || u64_arg(args[3], &align) < 0 ||
        u64_arg(args[4], &bound) < 0 || (contig = PyObject_IsTrue(args[5])) < 0 ||
        (zero = PyObject_IsTrue(args[6])) < 0)
        return NULL;
    PyObject *r = malloc_in(args[0], args[1], size, align, bound, contig, zero, args[7]);
    if (r == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return r;
}

static MemdBlock *block_arg(PyObject *win, PyObject *o, const char *fn)
{
    if (Py_TYPE(o) != &MemdBlock_Type) {
        PyErr_Format(PyExc_TypeError, "%s: expected a memd._ext.Block", fn);
        return NULL;
    }
    MemdBlock *b = (MemdBlock *)o;
    if (b->window != win) {
        PyErr_Format(PyExc_ValueError, "%s: the block belongs to another window", fn);
        return NULL;
    }
    if (b->freed) {
        PyErr_Format(PyExc_ValueError, "%s: the block was already freed (or resized)", fn);
        return NULL;
    }
    return b;
}

/* Free b (checked by block_arg) and mark it freed: the free element's size or -errno. */
static int64_t free_block(char *base, MemdBlock *b)
{
    struct memd_heap *h = &((struct memd_config *)base)->heaps[b->heap];
    int rc = py_lock(base, h);
    if (rc < 0)
        return rc;
    int64_t r = memd_heap_free_serial_nolock(base, h, b->offset, b->serial);
    memd_heap_unlock(h);
    if (r >= 0)
        b->freed = 1;
    return r;
}

/* memd_raise_errno, but -ESTALE (b's block was freed) is StaleHandle. */
static PyObject *raise_block_errno(const MemdBlock *b, int neg_errno, const char *where)
{
    if (neg_errno == -ESTALE && !PyErr_Occurred())
        return raise_stale_block(b);
    return memd_raise_errno(neg_errno, where);
}

/* heap_free_block(win, blk) -> size of the free element it ended up in; marks blk
 * freed.  Fails iff ValueError (another window's block, or already freed) or as
 * heap_free. */
static PyObject *py_heap_free_block(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    char *base;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "heap_free_block(win, blk)");
        return NULL;
    }
    MemdBlock *b = block_arg(args[0], args[1], "heap_free_block");
    if (b == NULL || (base = memd_base_of(args[0])) == NULL)
        return NULL;
    int64_t r = free_block(base, b);
    if (r < 0)
        return raise_block_errno(b, (int)r, "heap_free_block");
    return PyLong_FromLongLong(r);
}

/* heap_realloc_block(win, blk, size, align=0) -> Block | None.  Resizes within
 * blk's heap (in place when it can, else alloc + copy + free); on success blk is
 * marked freed and the new Block returned; None when the heap has no room (blk
 * unchanged).  Fails iff ValueError as heap_free_block, or OSError EINVAL (bad
 * size/align), EFAULT (smashed trailer). */
static PyObject *py_heap_realloc_block(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    uint64_t size, align = 0, off;
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "heap_realloc_block(win, blk, size, align=0)");
        return NULL;
    }
    MemdBlock *b = block_arg(args[0], args[1], "heap_realloc_block");
    char *base = b ? memd_base_of(args[0]) : NULL;
    if (base == NULL || u64_arg(args[2], &size) < 0 || (nargs > 3 && u64_arg(args[3], &align) < 0))
        return NULL;
    struct memd_heap *h = &((struct memd_config *)base)->heaps[b->heap];
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_realloc_block");
    rc = memd_heap_realloc_serial_nolock(base, h, b->offset, b->serial, size, align, &off);
    uint32_t serial = rc == 0 ? memd_heap_block_serial(base, off) : 0;
    memd_heap_unlock(h);
    if (rc == -ENOMEM)
        Py_RETURN_NONE;
    if (rc < 0)
        return raise_block_errno(b, rc, "heap_realloc_block");
    b->freed = 1;
    return block_new(args[0], b->owner ? b->owner : Py_None, base, off, size, b->heap, serial);
}

/* --- HeapBase: the C fast paths of memd.shm.heap.HeapMixin -------------------------------
 *
 * malloc/zmalloc/free of the API, in C so that a Python-level malloc+free pair
 * stays within a few hundred ns.  They only handle the common case (cached heap
 * order, plain arguments, room in a heap, a live Block of this window) and hand
 * everything else to the Python methods _heap_alloc_py / _heap_free_py, which
 * redo the call and raise memd's exceptions.  Caches: the heap order per
 * socket_id (-1..MAX_HEAPS-1) from self._heap_order_of(), and per heap the free
 * element size from which a free calls self._heap_maybe_release() (which returns
 * the next threshold).  _heap_cache_clear() forgets them.  A threshold holds only
 * while the memory map stays as it was (mem_generation): pages kept back (pinned,
 * preallocated) raise it, and once pages came or went (a deferred release, a
 * growth, by any process) the next free asks again, so it comes back down.
 */

#define ORDER_SLOTS (1 + MEMD_MAX_HEAPS) /* socket_id -1 .. MEMD_MAX_HEAPS - 1 */

/* header.mem_generation, inline and relaxed: the free path only compares it with
 * what it saw when it set a threshold, and a late look merely asks one free later. */
static inline uint64_t map_generation(const char *base)
{
    return atomic_load_explicit(
        (_Atomic uint64_t *)&((const struct memd_config *)base)->hdr.mem_generation,
        memory_order_relaxed);
}

typedef struct {
    PyObject_HEAD
    PyObject *window;              /* the Window (attribute "window") */
    PyObject *orders[ORDER_SLOTS]; /* tuples of heap indices, or NULL */
    struct {
        uint64_t at;  /* free element size that asks _heap_maybe_release; 0: ask */
        uint64_t gen; /* mem_generation when `at` was set */
    } release[MEMD_MAX_HEAPS];
} MemdHeapBase;

static PyObject *hb_alloc(MemdHeapBase *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames, int zero)
{
    static const char *const names[] = {"size", "align", "socket_id"};
    PyObject *a[3];
    uint64_t size, align = 0;
    long sock = MEMD_SOCKET_ID_ANY;
    if (memd_fast_args(zero ? "zmalloc" : "malloc", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    if (self->window == NULL || u64_arg(a[0], &size) < 0 || (a[1] && u64_arg(a[1], &align) < 0) ||
        (a[2] && (sock = PyLong_AsLong(a[2])) == -1 && PyErr_Occurred()))
        goto slow;
    if (sock < MEMD_SOCKET_ID_ANY || sock >= (long)MEMD_MAX_HEAPS)
        goto slow;
    PyObject *order = self->orders[sock - MEMD_SOCKET_ID_ANY];
    if (order == NULL) {
        order = PyObject_CallMethod((PyObject *)self, "_heap_order_of", "l", sock);
        if (order == NULL)
            return NULL;
        if (!PyTuple_Check(order)) {
            Py_DECREF(order);
            goto slow;
        }
        Py_XSETREF(self->orders[sock + 1], order); /* another thread may have set it */
    }
    /* Hold the order (and window): the GIL is released while waiting for a heap
     * lock, and another thread may clear the cache or swap the window meanwhile. */
    PyObject *win = self->window;
    Py_INCREF(order);
    Py_INCREF(win);
    PyObject *blk = malloc_in(win, order, size, align, 0, 0, zero, (PyObject *)self);
    Py_DECREF(order);
    Py_DECREF(win);
    if (blk != NULL)
        return blk;
slow:
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        return NULL; /* KeyboardInterrupt during a lock wait: not an error to redo */
    const int spent = lock_timed_out();
    PyErr_Clear(); /* the Python path redoes the call and raises the right error */
    PyObject *zero_i = PyLong_FromLong(0), *any = PyLong_FromLong(MEMD_SOCKET_ID_ANY);
    PyObject *r = NULL;
    lock_wait_spent = spent;
    if (zero_i && any)
        r = PyObject_CallMethod((PyObject *)self, "_heap_alloc_py", "OOOO", a[0],
                                a[1] ? a[1] : zero_i, a[2] ? a[2] : any, zero ? Py_True : Py_False);
    lock_wait_spent = 0;
    Py_XDECREF(zero_i);
    Py_XDECREF(any);
    return r;
}

static PyObject *hb_malloc(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    return hb_alloc((MemdHeapBase *)self, args, nargs, kwnames, 0);
}

static PyObject *hb_zmalloc(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    return hb_alloc((MemdHeapBase *)self, args, nargs, kwnames, 1);
}

static PyObject *hb_free(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"blk"};
    MemdHeapBase *self = (MemdHeapBase *)op;
    PyObject *a[1];
    int spent = 0;
    if (memd_fast_args("free", args, nargs, kwnames, names, 1, 1, a) < 0)
        return NULL;
    if (self->window == NULL || Py_TYPE(a[0]) != &MemdBlock_Type)
        goto slow;
    MemdBlock *b = (MemdBlock *)a[0];
    if (Py_TYPE(self->window) != &MemdWindow_Type)
        goto slow;
    char *base = ((MemdWindow *)self->window)->base;
    if (b->window != self->window || b->freed || base == NULL)
        goto slow;
    int64_t r = free_block(base, b);
    spent = r == -ETIMEDOUT;
    if (r < 0)
        goto slow;
    if ((uint64_t)r >= self->release[b->heap].at ||
        map_generation(base) != self->release[b->heap].gen) {
        /* read before the call: a change while it runs is seen by the next free */
        uint64_t gen = map_generation(base);
        PyObject *t = PyObject_CallMethod(op, "_heap_maybe_release", "iL", b->heap, (long long)r);
        if (t == NULL)
            return NULL;
        uint64_t at = PyLong_AsUnsignedLongLong(t);
        Py_DECREF(t);
        if (at == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        self->release[b->heap].at = at;
        self->release[b->heap].gen = gen;
    }
    Py_RETURN_NONE;
slow:
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        return NULL; /* KeyboardInterrupt during a lock wait: not an error to redo */
    PyErr_Clear();
    lock_wait_spent = spent;
    PyObject *res = PyObject_CallMethod(op, "_heap_free_py", "O", a[0]);
    lock_wait_spent = 0;
    return res;
}

/* _heap_cache_clear(heap=None): forget the cached orders and release thresholds
 * (of one heap's threshold only, when heap is given). */
static PyObject *hb_cache_clear(PyObject *op, PyObject *args)
{
    MemdHeapBase *self = (MemdHeapBase *)op;
    PyObject *heap = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &heap))
        return NULL;
    if (heap != Py_None) {
        long i = PyLong_AsLong(heap);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i >= 0 && i < (long)MEMD_MAX_HEAPS)
            self->release[i].at = 0;
        Py_RETURN_NONE;
    }
    for (int i = 0; i < (int)ORDER_SLOTS; i++)
        Py_CLEAR(self->orders[i]);
    memset(self->release, 0, sizeof(self->release));
    Py_RETURN_NONE;
}

static int hb_traverse(PyObject *op, visitproc visit, void *arg)
{
    MemdHeapBase *self = (MemdHeapBase *)op;
    /* Subclasses are heap types: subtype_traverse visits the type itself. */
    Py_VISIT(self->window);
    for (int i = 0; i < (int)ORDER_SLOTS; i++)
        Py_VISIT(self->orders[i]);
    return 0;
}

static int hb_clear(PyObject *op)
{
    MemdHeapBase *self = (MemdHeapBase *)op;
    Py_CLEAR(self->window);
    for (int i = 0; i < (int)ORDER_SLOTS; i++)
        Py_CLEAR(self->orders[i]);
    return 0;
}

static void hb_dealloc(PyObject *op)
{
    /* subtype_dealloc drops a subclass's type reference after this returns */
    PyObject_GC_UnTrack(op);
    hb_clear(op);
    Py_TYPE(op)->tp_free(op);
}

#define FASTKW(name, fn, doc) \
    {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef hb_methods[] = {
    FASTKW("malloc", hb_malloc,
           "malloc(size, align=0, socket_id=SOCKET_ID_ANY) -> Block (see memd.shm.heap.HeapMixin)"),
    FASTKW("zmalloc", hb_zmalloc,
           "zmalloc(size, align=0, socket_id=SOCKET_ID_ANY) -> Block whose data reads zero"),
    FASTKW("free", hb_free, "free(blk): give the block back"),
    {"_heap_cache_clear", hb_cache_clear, METH_VARARGS,
     "_heap_cache_clear(heap=None): forget cached heap orders / release thresholds"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef hb_members[] = {
    {"window", T_OBJECT_EX, offsetof(MemdHeapBase, window), 0, "the Window holding the heaps"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject MemdHeapBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.HeapBase",
    .tp_basicsize = sizeof(MemdHeapBase),
    .tp_dealloc = hb_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast paths of memd.shm.heap.HeapMixin (malloc, zmalloc, free).",
    .tp_traverse = hb_traverse,
    .tp_clear = hb_clear,
    .tp_methods = hb_methods,
    .tp_members = hb_members,
    .tp_new = PyType_GenericNew,
};

/* --- the rest (METH_VARARGS | METH_KEYWORDS) ---------------------------------------- */

#define HEAP_ARGS(fmt, ...)                                                                   \
    PyObject *win, *idxo;                                                                     \
    char *base;                                                                               \
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO" fmt, kwlist, &win, &idxo, ##__VA_ARGS__)) \
        return NULL;                                                                          \
    struct memd_heap *h = heap_of(win, idxo, &base);                                          \
    if (h == NULL)                                                                            \
    return NULL

/* heap_init(win, idx, socket_id): an empty heap.  Only the primary, once, with no
 * other user.  Fails iff OSError from pthread mutex init. */
static PyObject *py_heap_init(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "socket_id", NULL};
    int socket_id;
    HEAP_ARGS("i", &socket_id);
    int rc = memd_heap_init(base, h, socket_id);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_init");
    Py_RETURN_NONE;
}

/* heap_lock(win, idx) -> True if taken from a dead owner (and the heap checked
 * fine).  Fails iff OSError EFAULT (heap broken; lock not held) or
 * ENOTRECOVERABLE. */
/* heap_lock_wait(seconds=None) -> float: the most a heap lock is waited for in
 * this process (None: forever, the default); sets it if given, returns the old
 * value (inf for forever).  The daemon bounds it: a stopped holder gets it a
 * "busy" error (ETIMEDOUT), not a hang. */
static PyObject *py_heap_lock_wait(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *arg = Py_None;
    if (!PyArg_ParseTuple(args, "|O:heap_lock_wait", &arg))
        return NULL;
    double old = lock_wait_limit_ns == UINT64_MAX ? Py_HUGE_VAL : (double)lock_wait_limit_ns / 1e9;
    if (arg != Py_None) {
        double s = PyFloat_AsDouble(arg);
        if (s == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(s >= 0.0)) {
            PyErr_SetString(PyExc_ValueError, "the wait must be >= 0 seconds (or inf)");
            return NULL;
        }
        lock_wait_limit_ns = s >= 1e9 ? UINT64_MAX : (uint64_t)(s * 1e9);
    }
    return PyFloat_FromDouble(old);
}

static PyObject *py_heap_lock(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", NULL};
    HEAP_ARGS("");
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_lock");
    return PyBool_FromLong(rc == 1);
}

/* heap_unlock(win, idx).  Never fails (unlocking a lock you do not hold is a bug
 * that the robust mutex ignores). */
static PyObject *py_heap_unlock(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", NULL};
    HEAP_ARGS("");
    memd_heap_unlock(h);
    Py_RETURN_NONE;
}

/* Take the lock unless the caller says it holds it; -errno on failure. */
static int maybe_lock(char *base, struct memd_heap *h, int locked)
{
    return locked ? 0 : py_lock(base, h);
}

static void maybe_unlock(struct memd_heap *h, int locked)
{
    if (!locked)
        memd_heap_unlock(h);
}

/* heap_add_memory(win, idx, off, len, dirty=False): (caller locks) add mapped
 * memory; dirty when it may hold old data.  Fails iff ValueError (range outside
 * the window) or OSError EINVAL (unaligned to 64, shorter than a minimum element,
 * inside the config, or overlapping the heap). */
static PyObject *py_heap_add_memory(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", "len", "dirty", NULL};
    unsigned long long off, len;
    int dirty = 0;
    HEAP_ARGS("O&O&|p", memd_conv_u64, &off, memd_conv_u64, &len, &dirty);
    if (memd_check_range(win, off, len) < 0)
        return NULL;
    int rc = memd_heap_add_memory_ex(base, h, off, len, dirty);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_add_memory");
    Py_RETURN_NONE;
}

#ifdef MEMD_TEST_HOOKS
/* heap_realloc(win, idx, off, size, align=0) -> new offset.  Fails iff OSError
 * EINVAL (off not a busy block, size 0, bad align), EFAULT (smashed trailer),
 * ENOMEM (no room in this heap; the block is unchanged). */
static PyObject *py_heap_realloc(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", "size", "align", NULL};
    unsigned long long off, size, align = 0;
    uint64_t out;
    HEAP_ARGS("O&O&|O&", memd_conv_u64, &off, memd_conv_u64, &size, memd_conv_u64, &align);
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_realloc");
    rc = memd_heap_realloc_nolock(base, h, off, size, align, &out);
    memd_heap_unlock(h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_realloc");
    return PyLong_FromUnsignedLongLong(out);
}
#endif

#ifdef MEMD_TEST_HOOKS
/* heap_block_size(win, idx, off) -> data size.  Fails iff OSError EINVAL (not a
 * busy block) or EFAULT (smashed trailer). */
static PyObject *py_heap_block_size(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", NULL};
    unsigned long long off;
    HEAP_ARGS("O&", memd_conv_u64, &off);
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_block_size");
    int64_t r = memd_heap_block_size_nolock(base, h, off);
    memd_heap_unlock(h);
    if (r < 0)
        return memd_raise_errno((int)r, "heap_block_size");
    return PyLong_FromLongLong(r);
}
#endif

/* heap_validate(win, idx, off, serial=0) -> None.  Fails iff OSError EFAULT
 * (trailer smashed), EBADMSG (its links to its neighbours are damaged) or EINVAL
 * (not a busy block, header cookie included); with a
 * serial (a Block's), StaleHandle when the block is no longer busy or carries
 * another serial (EINVAL then only for a listed element's smashed header). */
static PyObject *py_heap_validate(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", "serial", NULL};
    unsigned long long off;
    unsigned int serial = 0;
    HEAP_ARGS("O&|O&", memd_conv_u64, &off, memd_conv_u32, &serial);
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_validate");
    rc = memd_heap_validate_serial_nolock(base, h, off, serial);
    memd_heap_unlock(h);
    if (rc == -ESTALE)
        return raise_stale_at(off);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_validate");
    Py_RETURN_NONE;
}

/* heap_block(win, idx, off, owner=None) -> Block for the busy block at off (e.g.
 * a memzone's, or an unpickled Block's).  Fails iff as heap_block_size. */
static PyObject *py_heap_block(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", "owner", NULL};
    unsigned long long off;
    PyObject *owner = Py_None;
    HEAP_ARGS("O&|O", memd_conv_u64, &off, &owner);
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_block");
    int64_t r = memd_heap_block_size_nolock(base, h, off);
    uint32_t serial = r >= 0 ? memd_heap_block_serial(base, off) : 0;
    memd_heap_unlock(h);
    if (r < 0)
        return memd_raise_errno((int)r, "heap_block");
    return block_new(win, owner, base, off, (uint64_t)r, (int)PyLong_AsLong(idxo), serial);
}

/* heap_stats(win, idx) -> (total, free, alloc, greatest_free, free_count,
 * alloc_count).  Fails iff OSError EFAULT (heap broken). */
static PyObject *py_heap_stats(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", NULL};
    struct memd_heap_stats s;
    HEAP_ARGS("");
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_stats");
    memd_heap_get_stats_nolock(base, h, &s);
    memd_heap_unlock(h);
    return Py_BuildValue("(KKKKKK)", (unsigned long long)s.total, (unsigned long long)s.free,
                         (unsigned long long)s.alloc, (unsigned long long)s.greatest_free,
                         (unsigned long long)s.free_count, (unsigned long long)s.alloc_count);
}

/* heap_check(win, idx, locked=False) -> None.  Fails iff OSError EFAULT whose
 * message names the broken invariant, or ENOMEM (no scratch memory). */
static PyObject *py_heap_check(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "locked", NULL};
    int locked = 0;
    char why[256];
    HEAP_ARGS("|p", &locked);
    int rc = maybe_lock(base, h, locked);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_check");
    rc = memd_heap_check_ex(base, h, why, sizeof(why));
    maybe_unlock(h, locked);
    if (rc == -EFAULT) {
        PyObject *a = Py_BuildValue("(is)", EFAULT, why);
        if (a != NULL) {
            PyErr_SetObject(PyExc_OSError, a);
            Py_DECREF(a);
        }
        return NULL;
    }
    if (rc < 0)
        return memd_raise_errno(rc, "heap_check");
    Py_RETURN_NONE;
}

/* heap_find_free_pages(win, idx, page_size) -> (off, len): (caller locks) the
 * largest run of whole pages heap_remove_memory would take.  Fails iff OSError
 * ENOENT (no such run) or EINVAL (page_size not a power of two >= 64). */
static PyObject *py_heap_find_free_pages(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "page_size", NULL};
    unsigned long long pg;
    uint64_t off, len;
    HEAP_ARGS("O&", memd_conv_u64, &pg);
    int rc = memd_heap_find_free_pages(base, h, pg, &off, &len);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_find_free_pages");
    return Py_BuildValue("(KK)", (unsigned long long)off, (unsigned long long)len);
}

/* heap_remove_memory(win, idx, off, len): (caller locks) take the range out of
 * the heap.  Fails iff OSError EINVAL (not inside one free element leaving 0 or
 * >= a minimum element of it on each side). */
static PyObject *py_heap_remove_memory(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "off", "len", NULL};
    unsigned long long off, len;
    HEAP_ARGS("O&O&", memd_conv_u64, &off, memd_conv_u64, &len);
    int rc = memd_heap_remove_memory(base, h, off, len);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_remove_memory");
    Py_RETURN_NONE;
}

static int walk_one(void *arg, uint64_t off, uint64_t size, int state, uint64_t data_size)
{
    PyObject *t = Py_BuildValue("(KKiK)", (unsigned long long)off, (unsigned long long)size, state,
                                (unsigned long long)data_size);
    if (t == NULL)
        return -1;
    int rc = PyList_Append((PyObject *)arg, t);
    Py_DECREF(t);
    return rc;
}

/* heap_walk(win, idx, locked=False) -> [(offset, size, state, data_size)]: every
 * element in offset order (state HEAP_ELEM_FREE / HEAP_ELEM_BUSY; offset is the
 * header's, data at offset + HEAP_ELEM_HEADER_SIZE).  Fails iff MemoryError. */
static PyObject *py_heap_walk(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "locked", NULL};
    int locked = 0;
    HEAP_ARGS("|p", &locked);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    int rc = maybe_lock(base, h, locked);
    if (rc < 0) {
        Py_DECREF(list);
        return memd_raise_errno(rc, "heap_walk");
    }
    rc = memd_heap_walk(base, h, walk_one, list);
    maybe_unlock(h, locked);
    if (rc) {
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

static int cmp_owner(const void *a, const void *b)
{
    int32_t x = ((const struct memd_heap_owner *)a)->pid,
            y = ((const struct memd_heap_owner *)b)->pid;
    return x < y ? -1 : x > y;
}

/* heap_owners(win, idx) -> [(pid, blocks, bytes, memzone_blocks)] by pid: the
 * busy elements of each owner (bytes: element sizes with headers, as
 * heap_allocsz_bytes; blocks and bytes include the memzone blocks), walked under
 * the heap lock.  Fails iff OSError EFAULT (heap broken) or MemoryError. */
static PyObject *py_heap_owners(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", NULL};
    struct memd_heap_owner *a = NULL;
    size_t n = 0;
    HEAP_ARGS("");
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_owners");
    rc = memd_heap_owners(base, h, &a, &n); /* libc memory only: no Python under the lock */
    memd_heap_unlock(h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_owners");
    qsort(a, n, sizeof(*a), cmp_owner);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *t =
            Py_BuildValue("(iKKK)", (int)a[i].pid, (unsigned long long)a[i].blocks,
                          (unsigned long long)a[i].bytes, (unsigned long long)a[i].memzones);
        if (t == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    free(a);
    return list;
}

/* heap_free_owned(win, idx, pid) -> (blocks, bytes): free pid's busy blocks that
 * do not back memzones (each freed as any free: journaled, joined), under the
 * heap lock.  bytes are element sizes.  Does not ask whether pid is alive: the
 * caller does.  Fails iff OSError EINVAL (pid <= 0), EFAULT (heap broken). */
static PyObject *py_heap_free_owned(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", "pid", NULL};
    int pid;
    uint64_t blocks, bytes;
    HEAP_ARGS("i", &pid);
    int rc = py_lock(base, h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_free_owned");
    rc = memd_heap_free_owned_nolock(base, h, pid, &blocks, &bytes, NULL);
    memd_heap_unlock(h);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_free_owned");
    return Py_BuildValue("(KK)", (unsigned long long)blocks, (unsigned long long)bytes);
}

/* heap_journal(win, idx) -> (count, overflow, rollbacks, undone): the heap's undo
 * journal, read without the lock (diagnostics, tests): count is 0 between
 * operations; rollbacks and undone count recoveries from dead owners. */
static PyObject *py_heap_journal(PyObject *m, PyObject *args, PyObject *kw)
{
    (void)m;
    static char *kwlist[] = {"win", "idx", NULL};
    HEAP_ARGS("");
    const struct memd_heap_journal *j =
        &((struct memd_config *)base)->heap_journals[h - ((struct memd_config *)base)->heaps];
    return Py_BuildValue("(IIKK)", __atomic_load_n(&j->count, __ATOMIC_ACQUIRE), j->overflow,
                         (unsigned long long)j->rollbacks, (unsigned long long)j->undone);
}

#ifdef MEMD_TEST_HOOKS
/* _heap_crash_after(k): tests only.  In this process, the k-th crash point of a
 * heap operation (two per journal entry: before it and between it and the store
 * it covers; one per commit; one per entry a recovery undoes) calls _exit(77),
 * holding the heap lock.  0 disarms. */
static PyObject *py_heap_crash_after(PyObject *m, PyObject *arg)
{
    (void)m;
    long long k = PyLong_AsLongLong(arg);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    memd_heap_crash_after(k);
    Py_RETURN_NONE;
}
#endif

#define KW(name, fn, doc)   {name, (PyCFunction)(void (*)(void))fn, METH_VARARGS | METH_KEYWORDS, doc}
#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef heap_functions[] = {
    FAST("heap_alloc", py_heap_alloc,
         "heap_alloc(win, idx, size, align=0, bound=0, contig=False, zero=False) -> offset"),
    FAST("heap_free", py_heap_free, "heap_free(win, idx, off) -> size of the free element"),
    FAST("heap_malloc", py_heap_malloc,
         "heap_malloc(win, order, size, align, bound, contig, zero, owner) -> Block | None"),
    FAST("heap_free_block", py_heap_free_block,
         "heap_free_block(win, blk) -> size of the free element"),
    FAST("heap_realloc_block", py_heap_realloc_block,
         "heap_realloc_block(win, blk, size, align=0) -> Block | None"),
    KW("heap_init", py_heap_init, "heap_init(win, idx, socket_id)"),
    KW("heap_lock", py_heap_lock, "heap_lock(win, idx) -> True if recovered from a dead owner"),
    {"heap_lock_wait", py_heap_lock_wait, METH_VARARGS,
     "heap_lock_wait(seconds=None) -> float: how long heap locks are waited for (inf: forever)"},
    KW("heap_unlock", py_heap_unlock, "heap_unlock(win, idx)"),
    KW("heap_add_memory", py_heap_add_memory,
       "heap_add_memory(win, idx, off, len, dirty=False)  (hold heap_lock)"),
    KW("heap_validate", py_heap_validate, "heap_validate(win, idx, off, serial=0)"),
    KW("heap_stats", py_heap_stats,
       "heap_stats(win, idx) -> (total, free, alloc, greatest_free, free_count, alloc_count)"),
    KW("heap_check", py_heap_check, "heap_check(win, idx, locked=False)"),
    KW("heap_find_free_pages", py_heap_find_free_pages,
       "heap_find_free_pages(win, idx, page_size) -> (off, len)  (hold heap_lock)"),
    KW("heap_remove_memory", py_heap_remove_memory,
       "heap_remove_memory(win, idx, off, len)  (hold heap_lock)"),
    KW("heap_walk", py_heap_walk,
       "heap_walk(win, idx, locked=False) -> [(offset, size, state, data_size)]"),
    KW("heap_owners", py_heap_owners,
       "heap_owners(win, idx) -> [(pid, blocks, bytes, memzone_blocks)]"),
    KW("heap_free_owned", py_heap_free_owned,
       "heap_free_owned(win, idx, pid) -> (blocks, bytes) freed (not memzones)"),
    KW("heap_journal", py_heap_journal,
       "heap_journal(win, idx) -> (count, overflow, rollbacks, undone)"),
    KW("heap_block", py_heap_block, "heap_block(win, idx, off, owner=None) -> Block"),
#ifdef MEMD_TEST_HOOKS /* test builds only (setup.py): offset-level calls, crash points */
    KW("heap_realloc", py_heap_realloc, "heap_realloc(win, idx, off, size, align=0) -> offset"),
    KW("heap_block_size", py_heap_block_size, "heap_block_size(win, idx, off) -> size"),
    {"_heap_crash_after", py_heap_crash_after, METH_O,
     "_heap_crash_after(k): tests only: _exit(77) at the k-th heap crash point; 0 = off"},
#endif
    {NULL, NULL, 0, NULL},
};

static const struct memd_const heap_constants[] = {
    MEMD_CONST("HEAP_ELEM_HEADER_SIZE", MEMD_ELEM_HEADER_SIZE),
    MEMD_CONST("HEAP_ELEM_TRAILER_SIZE", MEMD_ELEM_TRAILER_SIZE),
    MEMD_CONST("HEAP_ELEM_MIN_SIZE", MEMD_ELEM_MIN_SIZE),
    MEMD_CONST("HEAP_ELEM_FREE", MEMD_ELEM_FREE),
    MEMD_CONST("HEAP_ELEM_BUSY", MEMD_ELEM_BUSY),
    MEMD_CONST("HEAP_ELEM_F_MEMZONE", MEMD_ELEM_F_MEMZONE),
    MEMD_CONST("HEAP_JOURNAL_ENTRIES", MEMD_HEAP_JOURNAL_ENTRIES),
    MEMD_CONST("HEAP_NUM_FREELISTS", MEMD_HEAP_NUM_FREELISTS),
    MEMD_CONST("HEAP_DEFAULT_ALIGN", MEMD_HEAP_DEFAULT_ALIGN),
    {NULL},
};

int memd_py_init_heap(PyObject *m)
{
    if (memd_fault_init() < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return memd_add_type(m, &MemdBlock_Type) < 0 || memd_add_type(m, &MemdHeapBase_Type) < 0 ||
                   memd_add_constants(m, heap_constants) < 0 ||
                   memd_add_functions(m, heap_functions) < 0
               ? -1
               : 0;
}
