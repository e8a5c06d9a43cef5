/*
 * py_ring.c - Python bindings for ring.c: the memd._ext.Ring type (memd.shm.ring.Ring
 * subclasses it) and module functions ring_memsize / ring_init.
 *
 * Hot paths are METH_FASTCALL and allocate nothing per entry when given a
 * buffer: values are read straight from a uint64 buffer (array('Q'), NumPy) or
 * converted from a list/tuple into a stack array; *_into() dequeues into a
 * caller's buffer.  A ring of esize-byte records (esize != 8) takes and gives
 * bytes-likes instead of ints: its calls branch off once, after the arguments
 * are parsed, so the uint64 ring's paths stay as they were.  Blocking calls release the GIL only
 * while asleep on the ring's futex and wake at least every WAIT_SLICE_NS to run signal handlers.
 */
#include "config.h"
#include "memd_py.h"
#include "py_ring.h"
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449 /* the same number on every architecture */
#endif

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define WAIT_SLICE_NS 100000000ull /* 100 ms: how late Ctrl-C may be noticed */

/* Before sleeping, a waiter may retry for up to this long (about what a futex
 * sleep and wake cost together, ~5 us, is a good value): a peer that is busy
 * producing or consuming is then met without any system call on either side.
 * memd promises "waits sleep, no spinning", so it is 0 (sleep at once) unless
 * a program opts in with ring_wait_spin(). */
static uint64_t wait_spin_ns = 0;
#define STACK_VALUES 64 /* values converted on the stack, no malloc */

/* --- argument helpers (memd_parse_timeout: shared with py_mempool.c through py_ring.h) */

int memd_parse_timeout(PyObject *o, uint64_t *ns)
{
    if (o == NULL) {
        *ns = 0;
        return 0;
    }
    if (o == Py_None) {
        *ns = UINT64_MAX;
        return 0;
    }
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return -1; /* e.g. an OverflowError of a huge int */
        PyErr_Format(PyExc_TypeError, "timeout must be a number of seconds or None, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (!(d >= 0.0)) { /* also NaN */
        PyErr_Format(memd_error("MemdValueError", PyExc_ValueError),
                     "timeout must be >= 0 seconds, or None to wait forever (got %R)", o);
        return -1;
    }
    if (d >= 1e9) { /* ~31 years: forever */
        *ns = UINT64_MAX;
        return 0;
    }
    uint64_t v = (uint64_t)(d * 1e9);
    *ns = (v == 0 && d > 0.0) ? 1 : v;
    return 0;
}

static int is_u64_format(const Py_buffer *b)
{
    if (b->itemsize != 8)
        return 0;
    const char *f = b->format;
    if (f == NULL) /* "B" */
        return 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
#else
    if (*f == '@' || *f == '=' || *f == '>' || *f == '!')
        f++;
#endif
    return (f[0] == 'Q' || f[0] == 'L') && f[1] == '\0';
}

int memd_u64_buffer(PyObject *o, Py_buffer *view, int writable)
{
    int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, view, flags) < 0)
        return -1;
    if (!is_u64_format(view)) {
        PyErr_Format(PyExc_TypeError,
                     "expected a buffer of unsigned 64-bit integers (array('Q'), numpy "
                     "uint64), got format '%s' with %zd-byte items",
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline int to_u64(PyObject *item, uint64_t *out)
{
    if (likely(PyLong_CheckExact(item))) {
        unsigned long long x = PyLong_AsUnsignedLongLong(item);
        if (unlikely(x == (unsigned long long)-1 && PyErr_Occurred()))
            return -1;
        *out = x;
        return 0;
    }
    PyObject *idx = PyNumber_Index(item); /* bool, numpy integers, ... */
    if (idx == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

int memd_u64_from_object(PyObject *o, uint64_t *out)
{
    if (to_u64(o, out) < 0) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_OverflowError,
                            "ring entries are unsigned 64-bit: 0 <= v < 2**64");
        }
        return -1;
    }
    return 0;
}

void memd_values_release(struct memd_values *vs)
{
    if (vs->have_view)
        PyBuffer_Release(&vs->view);
    if (vs->heap)
        PyMem_Free(vs->heap);
    vs->have_view = 0;
    vs->heap = NULL;
}

int memd_values_get(PyObject *o, struct memd_values *vs)
{
    vs->have_view = 0;
    vs->heap = NULL;
    vs->n = 0;
    PyObject *seq = NULL;
    if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) {
        if (PyObject_CheckBuffer(o)) {
            if (memd_u64_buffer(o, &vs->view, 0) < 0)
                return -1;
            vs->have_view = 1;
            vs->v = (uint64_t *)vs->view.buf;
            vs->n = vs->view.len / 8;
            return 0;
        }
        seq = PySequence_Fast(o, "values must be a sequence of ints or a uint64 buffer");
        if (seq == NULL)
            return -1;
        o = seq;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject **items = PySequence_Fast_ITEMS(o);
    if (n <= STACK_VALUES) {
        vs->v = vs->stack;
    } else {
        vs->heap = PyMem_Malloc((size_t)n * sizeof(uint64_t));
        if (vs->heap == NULL) {
            Py_XDECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
        vs->v = vs->heap;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (unlikely(!PyLong_CheckExact(items[i])) && PyList_CheckExact(o)) {
            /* Converting this item runs Python code (__index__), which may change
             * the list under `items`: go on over a tuple copy.  No Python code has
             * run yet, so the copy holds the same n items. */
            PyObject *copy = PyList_AsTuple(o);
            if (copy == NULL) {
                Py_XDECREF(seq);
                memd_values_release(vs);
                return -1;
            }
            Py_XDECREF(seq);
            seq = o = copy;
            items = PySequence_Fast_ITEMS(copy);
        }
        if (unlikely(memd_u64_from_object(items[i], &vs->v[i]) < 0)) {
            Py_XDECREF(seq);
            memd_values_release(vs);
            return -1;
        }
    }
    Py_XDECREF(seq);
    vs->n = n;
    return 0;
}

/* --- the Ring type -------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *window; /* strong reference: keeps the mapping alive */
    uint64_t offset;  /* window offset of the struct memd_ring */
    uint32_t capacity;
    uint32_t size;
    uint32_t esize; /* bytes per entry; 8: uint64 entries as ints, else records as bytes */
    uint64_t tag;   /* the identity tag validated when made: a freed ring's no longer matches */
    void *pin;      /* the pin keeping the ring's pages (memd_view_pin's tag), or NULL */
    uint32_t mz_id, mz_gen;   /* the memzone it was found in (_bind_zone); mz_gen 0: unknown */
    char name[MEMD_NAMESIZE]; /* as validated: for the error about a freed ring */
} MemdRing;

enum ring_op {
    OP_ENQ_BULK,
    OP_ENQ_BURST,
    OP_DEQ_BULK,
    OP_DEQ_BURST
};

static inline struct memd_ring *ring_ptr(MemdRing *self)
{
    char *base = ((MemdWindow *)self->window)->base;
    if (unlikely(base == NULL)) {
        memd_raise_closed(PyExc_ValueError);
        return NULL;
    }
    return (struct memd_ring *)(base + self->offset);
}

static inline struct memd_ring_geom geom(const MemdRing *self)
{
    return (struct memd_ring_geom){self->size, self->capacity};
}

/* CorruptionError: the ring's header or counters were overwritten (any attached
 * process can write them); it stays broken until its memzone is freed.  NULL. */
static __attribute__((noinline, cold)) void *raise_damaged(MemdRing *self, const char *what)
{
    PyErr_Format(memd_error("CorruptionError", PyExc_ValueError),
                 "the ring '%s' is corrupted: %s (damaged shared memory); free it with "
                 "mem.memzone_free(mem.memzone_lookup('RG_%s')) and create it again",
                 self->name, what, self->name);
    return NULL;
}

/* Whether a ring whose tag no longer matches was damaged rather than freed.  A
 * handle bound to its memzone asks the directory: a free unlists it first, so
 * still listed there means nothing freed it.  Else the tags tell: a free
 * overwrites both with MEMD_TAG_FREED, a ring made anew writes its own into both,
 * so one side still carrying ours is damage. */
static int ring_damaged(MemdRing *self, const struct memd_ring *r)
{
    MemdWindow *w = (MemdWindow *)self->window;
    if (self->mz_gen != 0)
        return w->base != NULL &&
               memd_object_listed(w->base, MEMD_OBJ_RING, self->offset, self->mz_id, self->mz_gen);
    uint64_t p = atomic_load_explicit(&r->prod.tag, memory_order_relaxed);
    uint64_t c = atomic_load_explicit(&r->cons.tag, memory_order_relaxed);
    return p != MEMD_TAG_FREED && c != MEMD_TAG_FREED && (p == self->tag || c == self->tag);
}

/* A side's tag did not match: StaleHandle if the ring was freed (here or in
 * another process) since this handle was made, CorruptionError if its header was
 * overwritten.  Only on this failing path.  Returns NULL. */
static __attribute__((noinline, cold)) void *raise_stale(MemdRing *self)
{
    struct memd_ring *r = ring_ptr(self);
    if (r == NULL)
        return NULL;
    if (ring_damaged(self, r))
        return raise_damaged(self, "its header was overwritten");
    PyErr_Format(memd_error("StaleHandle", PyExc_KeyError),
                 "the ring '%s' was freed (by this or another process); look it up again "
                 "(ring_lookup) if it was made anew",
                 self->name);
    return NULL;
}

/* ring_ptr, for a ring that must not have been freed or damaged: every call but
 * the hot ones (which check their own side's tag in run_op).  Both sides: the
 * counts read both lines anyway. */
static inline struct memd_ring *ring_live(MemdRing *self)
{
    struct memd_ring *r = ring_ptr(self);
    if (r != NULL &&
        unlikely(!memd_ring_tag_ok(&r->prod, self->tag) || !memd_ring_tag_ok(&r->cons, self->tag)))
        return raise_stale(self);
    return r;
}

/* The entries in r now, or -1 with CorruptionError if its tails are damaged. */
static inline int64_t ring_entries(MemdRing *self, const struct memd_ring *r)
{
    int64_t n = memd_ring_entries(r, geom(self));
    if (unlikely(n < 0))
        raise_damaged(self, "its head and tail counters were overwritten");
    return n;
}

/* One try of op.  A side lock that another live process keeps (stopped in a
 * debugger, say) is not slept on here, with the GIL held: *busy says so, and
 * run_op waits for the lock its own way. */
static inline unsigned do_op(MemdRing *self, struct memd_ring *r, enum ring_op op, void *v,
                             unsigned n, int *busy)
{
    *busy = 0;
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64)) {
        switch (op) {
        case OP_ENQ_BULK:
            return memd_ring_enqueue_bulk_elem(r, geom(self), self->esize, v, n, NULL, busy);
        case OP_ENQ_BURST:
            return memd_ring_enqueue_burst_elem(r, geom(self), self->esize, v, n, NULL, busy);
        case OP_DEQ_BULK:
            return memd_ring_dequeue_bulk_elem(r, geom(self), self->esize, v, n, NULL, busy);
        default:
            return memd_ring_dequeue_burst_elem(r, geom(self), self->esize, v, n, NULL, busy);
        }
    }
    switch (op) { /* the uint64 ring: six arguments, all in registers */
    case OP_ENQ_BULK:
        return memd_ring_enqueue_bulk(r, geom(self), v, n, NULL, busy);
    case OP_ENQ_BURST:
        return memd_ring_enqueue_burst(r, geom(self), v, n, NULL, busy);
    case OP_DEQ_BULK:
        return memd_ring_dequeue_bulk(r, geom(self), v, n, NULL, busy);
    default:
        return memd_ring_dequeue_burst(r, geom(self), v, n, NULL, busy);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* An operation found the tails damaged and moved nothing: CorruptionError. */
static __attribute__((noinline, cold)) Py_ssize_t damaged_op(MemdRing *self)
{
    raise_damaged(self, "its head and tail counters were overwritten");
    return -1;
}

/*
 * run_op's wait, after a first try moved nothing (busy: a side lock stayed held)
 * and timeout_ns > 0: sleep on the other side's futex (or the lock's) and retry
 * until op moves something or the time is up.  Returns the count moved (0 on
 * timeout), or -1 with an exception set (a signal handler raised, the window was
 * closed meanwhile, or the process the window watches, the primary, has exited:
 * PrimaryNotRunning).
 */
static __attribute__((noinline)) Py_ssize_t run_op_wait(MemdRing *self, struct memd_ring *r,
                                                        enum ring_op op, void *v, unsigned n,
                                                        uint64_t timeout_ns, int busy)
{
    unsigned got;
    uint64_t start = now_ns();
    uint64_t deadline = timeout_ns == UINT64_MAX ? UINT64_MAX : start + timeout_ns;
    int enq = op == OP_ENQ_BULK || op == OP_ENQ_BURST;
    if (wait_spin_ns) {
        uint64_t spin_end = start + wait_spin_ns;
        if (spin_end > deadline)
            spin_end = deadline;
        for (unsigned i = 1;; i++) {
            memd_cpu_relax();
            if ((got = do_op(self, r, op, v, n, &busy)) != 0)
                return got;
            if (busy == MEMD_RING_DAMAGED)
                return damaged_op(self);
            if ((i & 15) == 0 && now_ns() >= spin_end)
                break;
        }
    }
    for (;;) {
        /* nothing moved: the ring was full (empty), or a side lock stays held */
        struct memd_ring_headtail *side = enq ? &r->prod : &r->cons;
        struct memd_ring_wait *w = busy ? &side->lock_wait : enq ? &r->not_full : &r->not_empty;
        int was_busy = busy;
        /* a bulk can use only n (entries or slots), a burst any */
        uint32_t want = busy ? 0 : (op == OP_ENQ_BULK || op == OP_DEQ_BULK) ? n : 1;
        uint32_t seq = memd_ring_wait_prepare(w, want);
        got = do_op(self, r, op, v, n, &busy); /* the retry that closes the lost-wakeup window */
        if (got != 0 || busy == MEMD_RING_DAMAGED) {
            memd_ring_wait_done(w);
            return got != 0 ? got : damaged_op(self);
        }
        if (busy != was_busy) { /* now waiting for the other thing: wait on its futex */
            memd_ring_wait_done(w);
            continue;
        }
        uint64_t slice = WAIT_SLICE_NS;
        if (deadline != UINT64_MAX) {
            uint64_t now = now_ns();
            if (now >= deadline) {
                memd_ring_wait_done(w);
                return 0;
            }
            if (deadline - now < slice)
                slice = deadline - now;
        }
        /* Before every sleep, so at least every slice: has the watched primary
         * died?  Then nobody may ever move this ring again: fail, don't wait. */
        if (memd_window_check_watch(self->window) < 0) {
            memd_ring_wait_done(w);
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
            memd_ring_wait_sleep(w, seq, slice);
        Py_END_ALLOW_THREADS
        memd_ring_wait_done(w);
        if (PyErr_CheckSignals() < 0)
            return -1;
        if ((r = ring_ptr(self)) == NULL)
            return -1;
        if (unlikely(!memd_ring_tag_ok(enq ? &r->prod : &r->cons, self->tag))) {
            raise_stale(self); /* freed while we slept */
            return -1;
        }
        /* Retry before announcing ourselves again: usually the wake means we
         * can go on, and an armed futex would cost the other side a syscall. */
        if ((got = do_op(self, r, op, v, n, &busy)) != 0)
            return got;
        if (busy == MEMD_RING_DAMAGED)
            return damaged_op(self);
    }
}

/* Run op; if it moved nothing and timeout_ns > 0, wait (run_op_wait).  The first
 * try is inline, where op is a constant (do_op's switch folds away); the waiting
 * is out of line.  Returns the count moved, or -1 with an exception set. */
static inline __attribute__((always_inline)) Py_ssize_t run_op(MemdRing *self, enum ring_op op,
                                                               void *v, unsigned n,
                                                               uint64_t timeout_ns)
{
    struct memd_ring *r = ring_ptr(self);
    if (r == NULL)
        return -1;
    /* one load from the side's line, which the operation writes anyway */
    int enq = op == OP_ENQ_BULK || op == OP_ENQ_BURST;
    if (unlikely(!memd_ring_tag_ok(enq ? &r->prod : &r->cons, self->tag))) {
        raise_stale(self);
        return -1;
    }
    int busy;
    unsigned got = do_op(self, r, op, v, n, &busy);
    if (likely(got != 0))
        return got;
    if (unlikely(busy == MEMD_RING_DAMAGED)) /* moved nothing: the failing path */
        return damaged_op(self);
    if (timeout_ns == 0 || n == 0)
        return 0;
    return run_op_wait(self, r, op, v, n, timeout_ns, busy);
}

/*
 * Clamp a request of n entries to what the ring can ever move: burst to the
 * capacity; bulk beyond it moves nothing (returns 0 in *n) at once, or raises
 * ValueError if the caller asked to wait (it would wait forever).  -1 on error.
 */
static int clamp_request(MemdRing *self, enum ring_op op, Py_ssize_t *n, uint64_t timeout)
{
    if (likely(*n <= (Py_ssize_t)self->capacity))
        return 0;
    if (op == OP_ENQ_BURST || op == OP_DEQ_BURST) {
        *n = self->capacity;
        return 0;
    }
    if (timeout != 0) {
        PyErr_Format(PyExc_ValueError, "a bulk of %zd entries can never fit a ring of capacity %u",
                     *n, self->capacity);
        return -1;
    }
    *n = 0;
    return 0;
}

static PyObject *ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"window", "offset", NULL};
    PyObject *window;
    unsigned long long off;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O&:Ring", kwlist, &MemdWindow_Type, &window,
                                     memd_conv_u64, &off))
        return NULL;
    char *base = memd_base_of(window);
    if (base == NULL || memd_check_range(window, off, sizeof(struct memd_ring)) < 0 ||
        memd_check_mapped(window, off, sizeof(struct memd_ring)) < 0)
        return NULL;
    if (off % 8) {
        PyErr_SetString(PyExc_ValueError, "a ring's offset must be 8-byte aligned");
        return NULL;
    }
    struct memd_ring *r = (struct memd_ring *)(base + off);
    /* The header's pages stay while we read it, the whole ring's while the
     * handle lives: a stale handle then finds its tag overwritten, never a hole. */
    Py_buffer head_pin, pin;
    if (memd_view_pin(window, off, sizeof(struct memd_ring), &head_pin) < 0)
        return NULL;
    if (memd_ring_check(r, ((MemdWindow *)window)->size - off) < 0) {
        memd_view_unpin(window, &head_pin);
        PyErr_Format(PyExc_ValueError, "no initialised ring at window offset %llu", off);
        return NULL;
    }
    /* copies of what was checked: the header may be rewritten meanwhile */
    uint32_t capacity = r->capacity, size = r->size, esize = r->esize;
    uint64_t memsize = sizeof(struct memd_ring) + (uint64_t)size * esize;
    uint64_t tag = atomic_load_explicit(&r->prod.tag, memory_order_relaxed);
    int bad = capacity == 0 || capacity >= size || memsize > ((MemdWindow *)window)->size - off;
    if (bad)
        PyErr_Format(PyExc_ValueError, "no initialised ring at window offset %llu", off);
    if (bad || memd_check_mapped(window, off, memsize) < 0 ||
        memd_view_pin(window, off, memsize, &pin) < 0) {
        memd_view_unpin(window, &head_pin);
        return NULL;
    }
    memd_view_unpin(window, &head_pin);
    MemdRing *self = (MemdRing *)type->tp_alloc(type, 0);
    if (self == NULL) {
        memd_view_unpin(window, &pin);
        return NULL;
    }
    Py_INCREF(window);
    self->window = window;
    self->offset = off;
    self->capacity = capacity;
    self->size = size;
    self->esize = esize;
    self->tag = tag;
    self->pin = pin.internal;
    memcpy(self->name, r->name, MEMD_NAMESIZE);
    self->name[MEMD_NAMESIZE - 1] = '\0';
    return (PyObject *)self;
}

static void ring_unpin(MemdRing *self)
{
    if (self->pin != NULL && self->window != NULL) {
        Py_buffer pin = {.internal = self->pin};
        memd_view_unpin(self->window, &pin);
    }
    self->pin = NULL;
}

static void ring_dealloc(PyObject *o)
{
    MemdRing *self = (MemdRing *)o;
    PyObject_GC_UnTrack(o);
    ring_unpin(self);
    Py_CLEAR(self->window);
    Py_TYPE(o)->tp_free(o);
}

static int ring_traverse(PyObject *o, visitproc visit, void *arg)
{
    Py_VISIT(((MemdRing *)o)->window);
    Py_VISIT(Py_TYPE(o));
    return 0;
}

static int ring_clear(PyObject *o)
{
    ring_unpin((MemdRing *)o);
    Py_CLEAR(((MemdRing *)o)->window);
    return 0;
}

static const char *const kw_value_timeout[] = {"value", "timeout"};
static const char *const kw_timeout[] = {"timeout"};
static const char *const kw_values_timeout[] = {"values", "timeout"};
static const char *const kw_n_timeout[] = {"n", "timeout"};
static const char *const kw_buffer_timeout[] = {"buffer", "timeout"};

/* --- rings of records (esize != 8; DPDK: rte_ring_*_elem) ------------------ */

#define STACK_RECORD_BYTES 4096 /* records gathered on the stack, no malloc */

static PyObject *value_error(void) { return memd_error("MemdValueError", PyExc_ValueError); }

/* A C-contiguous buffer (any format: bytes, bytearray, a NumPy structured array)
 * whose length is a whole number of records; MemdValueError if it is not. */
static int records_buffer(MemdRing *self, PyObject *o, Py_buffer *view, int writable,
                          const char *fn)
{
    if (PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len % self->esize) {
        PyErr_Format(value_error(),
                     "%s: a buffer of %zd bytes is not a whole number of %u-byte records", fn,
                     view->len, self->esize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *record_enqueue(MemdRing *self, PyObject *value, uint64_t timeout)
{
    Py_buffer view;
    if (PyObject_GetBuffer(value, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t got = -1;
    if (view.len != (Py_ssize_t)self->esize)
        PyErr_Format(value_error(), "enqueue: a record of this ring is %u bytes, got %zd",
                     self->esize, view.len);
    else
        got = run_op(self, OP_ENQ_BURST, view.buf, 1, timeout);
    PyBuffer_Release(&view);
    return got < 0 ? NULL : PyBool_FromLong(got);
}

static PyObject *record_dequeue(MemdRing *self, uint64_t timeout)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, self->esize);
    if (b == NULL)
        return NULL;
    Py_ssize_t got = run_op(self, OP_DEQ_BURST, PyBytes_AS_STRING(b), 1, timeout);
    if (got <= 0) {
        Py_DECREF(b);
        if (got < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return b;
}

/* Records from a sequence of bytes-likes, each exactly esize bytes, gathered
 * into *out (stack or, if bigger, PyMem_Malloc'd: *heap).  Works on a tuple
 * copy, so item conversions cannot change what is being read. */
static Py_ssize_t gather_records(MemdRing *self, PyObject *o, char *stack, char **heap, char **out,
                                 const char *fn)
{
    PyObject *t = PySequence_Tuple(o);
    if (t == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s: values must be a buffer of %u-byte records or a sequence of "
                         "bytes-likes of %u bytes each",
                         fn, self->esize, self->esize);
        }
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    size_t bytes = (size_t)n * self->esize;
    *heap = NULL;
    *out = stack;
    if (bytes > STACK_RECORD_BYTES) {
        if ((*heap = PyMem_Malloc(bytes)) == NULL) {
            Py_DECREF(t);
            PyErr_NoMemory();
            return -1;
        }
        *out = *heap;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(t, i);
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        int ok = view.len == (Py_ssize_t)self->esize;
        if (ok)
            memcpy(*out + (size_t)i * self->esize, view.buf, self->esize);
        else
            PyErr_Format(value_error(), "%s: record %zd is %zd bytes; this ring's are %u", fn, i,
                         view.len, self->esize);
        PyBuffer_Release(&view);
        if (!ok)
            goto fail;
    }
    Py_DECREF(t);
    return n;
fail:
    Py_DECREF(t);
    PyMem_Free(*heap);
    *heap = NULL;
    return -1;
}

static PyObject *record_enqueue_many(MemdRing *self, PyObject *values, enum ring_op op,
                                     uint64_t timeout, const char *fn)
{
    Py_ssize_t n, got = -1;
    if (!PyList_CheckExact(values) && !PyTuple_CheckExact(values) && PyObject_CheckBuffer(values)) {
        Py_buffer view;
        if (records_buffer(self, values, &view, 0, fn) < 0)
            return NULL;
        n = view.len / self->esize;
        if (clamp_request(self, op, &n, timeout) == 0)
            got = run_op(self, op, view.buf, (unsigned)n, timeout);
        PyBuffer_Release(&view);
    } else {
        char stack[STACK_RECORD_BYTES], *heap, *v;
        n = gather_records(self, values, stack, &heap, &v, fn);
        if (n < 0)
            return NULL;
        if (clamp_request(self, op, &n, timeout) == 0)
            got = run_op(self, op, v, (unsigned)n, timeout);
        PyMem_Free(heap);
    }
    return got < 0 ? NULL : PyLong_FromSsize_t(got);
}

static PyObject *record_dequeue_list(MemdRing *self, Py_ssize_t n, enum ring_op op,
                                     uint64_t timeout)
{
    char stack[STACK_RECORD_BYTES], *v = stack;
    size_t bytes = (size_t)n * self->esize; /* n <= capacity < 2^30: no overflow */
    if (bytes > STACK_RECORD_BYTES && (v = PyMem_Malloc(bytes)) == NULL)
        return PyErr_NoMemory();
    Py_ssize_t got = run_op(self, op, v, (unsigned)n, timeout);
    PyObject *list = NULL;
    if (got >= 0 && (list = PyList_New(got)) != NULL) {
        for (Py_ssize_t i = 0; i < got; i++) {
            PyObject *x = PyBytes_FromStringAndSize(v + (size_t)i * self->esize, self->esize);
            if (x == NULL) {
                /* The records are gone from the ring already; nothing to undo. */
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, x);
        }
    }
    if (v != stack)
        PyMem_Free(v);
    return list;
}

static PyObject *record_dequeue_into(MemdRing *self, PyObject *buffer, enum ring_op op,
                                     uint64_t timeout, const char *fn)
{
    Py_buffer view;
    if (records_buffer(self, buffer, &view, 1, fn) < 0)
        return NULL;
    Py_ssize_t n = view.len / self->esize, got = -1;
    if (clamp_request(self, op, &n, timeout) == 0)
        got = run_op(self, op, view.buf, (unsigned)n, timeout);
    PyBuffer_Release(&view);
    return got < 0 ? NULL : PyLong_FromSsize_t(got);
}

/* --- the methods ------------------------------------------------------------ */

static PyObject *ring_enqueue(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    MemdRing *self = (MemdRing *)o;
    uint64_t v, timeout = 0;
    PyObject *a[2];
    if (likely(nargs == 1 && kwnames == NULL)) {
        a[0] = args[0];
    } else {
        if (memd_fast_args("enqueue", args, nargs, kwnames, kw_value_timeout, 2, 1, a) < 0 ||
            memd_parse_timeout(a[1], &timeout) < 0)
            return NULL;
    }
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64))
        return record_enqueue(self, a[0], timeout);
    if (memd_u64_from_object(a[0], &v) < 0)
        return NULL;
    Py_ssize_t got = run_op(self, OP_ENQ_BURST, &v, 1, timeout);
    if (got < 0)
        return NULL;
    return PyBool_FromLong(got);
}

static PyObject *ring_dequeue(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    MemdRing *self = (MemdRing *)o;
    uint64_t v, timeout = 0;
    if (unlikely(nargs != 0 || kwnames != NULL)) {
        PyObject *a[1];
        if (memd_fast_args("dequeue", args, nargs, kwnames, kw_timeout, 1, 0, a) < 0 ||
            memd_parse_timeout(a[0], &timeout) < 0)
            return NULL;
    }
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64))
        return record_dequeue(self, timeout);
    Py_ssize_t got = run_op(self, OP_DEQ_BURST, &v, 1, timeout);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *enqueue_many(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames, enum ring_op op, const char *fn)
{
    MemdRing *self = (MemdRing *)o;
    PyObject *a[2];
    uint64_t timeout = 0;
    struct memd_values vs;
    if (likely(nargs == 1 && kwnames == NULL)) {
        a[0] = args[0];
    } else if (memd_fast_args(fn, args, nargs, kwnames, kw_values_timeout, 2, 1, a) < 0 ||
               memd_parse_timeout(a[1], &timeout) < 0) {
        return NULL;
    }
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64))
        return record_enqueue_many(self, a[0], op, timeout, fn);
    if (memd_values_get(a[0], &vs) < 0)
        return NULL;
    Py_ssize_t n = vs.n, got = -1;
    if (clamp_request(self, op, &n, timeout) == 0)
        got = run_op(self, op, vs.v, (unsigned)n, timeout);
    memd_values_release(&vs);
    if (got < 0)
        return NULL;
    return PyLong_FromSsize_t(got);
}

static PyObject *ring_enqueue_bulk(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    return enqueue_many(o, args, nargs, kwnames, OP_ENQ_BULK, "enqueue_bulk");
}

static PyObject *ring_enqueue_burst(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    return enqueue_many(o, args, nargs, kwnames, OP_ENQ_BURST, "enqueue_burst");
}

static PyObject *dequeue_list(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames, enum ring_op op, const char *fn)
{
    MemdRing *self = (MemdRing *)o;
    PyObject *a[2];
    uint64_t timeout = 0, stack[STACK_VALUES], *v = stack;
    if (likely(nargs == 1 && kwnames == NULL)) {
        a[0] = args[0];
    } else if (memd_fast_args(fn, args, nargs, kwnames, kw_n_timeout, 2, 1, a) < 0 ||
               memd_parse_timeout(a[1], &timeout) < 0) {
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(a[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    if (clamp_request(self, op, &n, timeout) < 0)
        return NULL;
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64))
        return record_dequeue_list(self, n, op, timeout);
    if (n > STACK_VALUES) {
        v = PyMem_Malloc((size_t)n * sizeof(uint64_t));
        if (v == NULL)
            return PyErr_NoMemory();
    }
    Py_ssize_t got = run_op(self, op, v, (unsigned)n, timeout);
    PyObject *list = NULL;
    if (got >= 0 && (list = PyList_New(got)) != NULL) {
        for (Py_ssize_t i = 0; i < got; i++) {
            PyObject *x = PyLong_FromUnsignedLongLong(v[i]);
            if (x == NULL) {
                /* The entries are gone from the ring already; nothing to undo. */
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, x);
        }
    }
    if (v != stack)
        PyMem_Free(v);
    return list;
}

static PyObject *ring_dequeue_bulk(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    return dequeue_list(o, args, nargs, kwnames, OP_DEQ_BULK, "dequeue_bulk");
}

static PyObject *ring_dequeue_burst(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames)
{
    return dequeue_list(o, args, nargs, kwnames, OP_DEQ_BURST, "dequeue_burst");
}

static PyObject *dequeue_into(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames, enum ring_op op, const char *fn)
{
    MemdRing *self = (MemdRing *)o;
    PyObject *a[2];
    uint64_t timeout = 0;
    Py_buffer view;
    if (likely(nargs == 1 && kwnames == NULL)) {
        a[0] = args[0];
    } else if (memd_fast_args(fn, args, nargs, kwnames, kw_buffer_timeout, 2, 1, a) < 0 ||
               memd_parse_timeout(a[1], &timeout) < 0) {
        return NULL;
    }
    if (unlikely(self->esize != MEMD_RING_ESIZE_U64))
        return record_dequeue_into(self, a[0], op, timeout, fn);
    if (memd_u64_buffer(a[0], &view, 1) < 0)
        return NULL;
    Py_ssize_t n = view.len / 8, got = -1;
    if (clamp_request(self, op, &n, timeout) == 0)
        got = run_op(self, op, view.buf, (unsigned)n, timeout);
    PyBuffer_Release(&view);
    if (got < 0)
        return NULL;
    return PyLong_FromSsize_t(got);
}

static PyObject *ring_dequeue_bulk_into(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                        PyObject *kwnames)
{
    return dequeue_into(o, args, nargs, kwnames, OP_DEQ_BULK, "dequeue_bulk_into");
}

static PyObject *ring_dequeue_burst_into(PyObject *o, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames)
{
    return dequeue_into(o, args, nargs, kwnames, OP_DEQ_BURST, "dequeue_burst_into");
}

/* --- asyncio (memd.shm.aio): a coroutine announces itself with _wait_prepare, retries,
 * and awaits a future that the process's one waiter thread (ring_wait_many, all
 * waits at once) resolves when the futex moves; then _wait_done and retries.  The
 * coroutine's thread does every ring operation, so cancelling it loses nothing. */

static struct memd_ring_wait *async_wait_of(struct memd_ring *r, int enq)
{
    return enq ? &r->not_full : &r->not_empty;
}

/* _wait_prepare(enq, want) -> seq.  Raises PrimaryNotRunning if the watched
 * primary died, ValueError if the window was closed. */
static PyObject *ring_wait_prepare(PyObject *o, PyObject *args)
{
    MemdRing *self = (MemdRing *)o;
    int enq;
    unsigned int want;
    if (!PyArg_ParseTuple(args, "pO&:_wait_prepare", &enq, memd_conv_u32, &want))
        return NULL;
    struct memd_ring *r = ring_live(self);
    if (r == NULL || memd_window_check_watch(self->window) < 0)
        return NULL;
    if (want > self->capacity)
        want = self->capacity;
    return PyLong_FromUnsignedLong(memd_ring_wait_prepare(async_wait_of(r, enq), want ? want : 1));
}

/* _wait_done(enq): withdraw what _wait_prepare announced (nothing once the window
 * is closed: its memory is gone from this process). */
static PyObject *ring_wait_done(PyObject *o, PyObject *arg)
{
    MemdRing *self = (MemdRing *)o;
    int enq = PyObject_IsTrue(arg);
    if (enq < 0)
        return NULL;
    char *base = ((MemdWindow *)self->window)->base;
    if (base != NULL)
        memd_ring_wait_done(async_wait_of((struct memd_ring *)(base + self->offset), enq));
    Py_RETURN_NONE;
}

/* _check_live(): None, or StaleHandle if the ring was freed. */
static PyObject *ring_check_live(PyObject *o, PyObject *Py_UNUSED(a))
{
    return ring_live((MemdRing *)o) ? Py_NewRef(Py_None) : NULL;
}

/* _bind_zone(mz_id, generation): the memzone this handle's ring was found in, so
 * that a tag mismatch tells a free (unlisted) from damage (still listed). */
static PyObject *ring_bind_zone(PyObject *o, PyObject *args)
{
    MemdRing *self = (MemdRing *)o;
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

/* _poison(): ring_free's last step before the memory goes: every handle to this
 * ring, in every process, raises StaleHandle from now on (this one too). */
static PyObject *ring_poison(PyObject *o, PyObject *Py_UNUSED(a))
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    if (r == NULL)
        return NULL;
    memd_ring_poison(r);
    Py_RETURN_NONE;
}

/* The entries in the ring now, or -1 with an exception (freed, damaged). */
static int64_t live_entries(PyObject *o)
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    return r ? ring_entries((MemdRing *)o, r) : -1;
}

static PyObject *ring_full(PyObject *o, PyObject *Py_UNUSED(a))
{
    int64_t n = live_entries(o);
    return n < 0 ? NULL : PyBool_FromLong(n == ((MemdRing *)o)->capacity);
}

static PyObject *ring_empty(PyObject *o, PyObject *Py_UNUSED(a))
{
    int64_t n = live_entries(o);
    return n < 0 ? NULL : PyBool_FromLong(n == 0);
}

static PyObject *ring_get_count(PyObject *o, void *Py_UNUSED(c))
{
    int64_t n = live_entries(o);
    return n < 0 ? NULL : PyLong_FromLongLong(n);
}

static PyObject *ring_get_free_count(PyObject *o, void *Py_UNUSED(c))
{
    int64_t n = live_entries(o);
    return n < 0 ? NULL : PyLong_FromLongLong((int64_t)((MemdRing *)o)->capacity - n);
}

static PyObject *ring_get_capacity(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(((MemdRing *)o)->capacity);
}

static PyObject *ring_get_size(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(((MemdRing *)o)->size);
}

static PyObject *ring_get_esize(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLong(((MemdRing *)o)->esize);
}

static PyObject *ring_get_flags(PyObject *o, void *Py_UNUSED(c))
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    return r ? PyLong_FromUnsignedLong(r->flags) : NULL;
}

static PyObject *ring_get_memsize(PyObject *o, void *Py_UNUSED(c))
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    return r ? PyLong_FromUnsignedLongLong(r->memsize) : NULL;
}

static PyObject *ring_get_name(PyObject *o, void *Py_UNUSED(c))
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    return r ? memd_text(r->name, MEMD_NAMESIZE) : NULL; /* damaged bytes show, never raise */
}

static PyObject *ring_get_offset(PyObject *o, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(((MemdRing *)o)->offset);
}

static PyObject *ring_get_window(PyObject *o, void *Py_UNUSED(c))
{
    PyObject *w = ((MemdRing *)o)->window;
    Py_INCREF(w);
    return w;
}

static PyObject *ring_get_wait_stats(PyObject *o, void *Py_UNUSED(c))
{
    struct memd_ring *r = ring_live((MemdRing *)o);
    if (r == NULL)
        return NULL;
    /* relaxed everywhere: statistics, each field read once. */
#define LD(x) atomic_load_explicit(&(x), memory_order_relaxed)
    return Py_BuildValue("{sKsKsKsKsIsIsIsIsKsKsisi}", "consumer_sleeps",
                         (unsigned long long)LD(r->not_empty.sleeps), "consumer_wakes",
                         (unsigned long long)LD(r->not_empty.wakes), "producer_sleeps",
                         (unsigned long long)LD(r->not_full.sleeps), "producer_wakes",
                         (unsigned long long)LD(r->not_full.wakes), "consumers_waiting",
                         (unsigned)LD(r->not_empty.waiters), "producers_waiting",
                         (unsigned)LD(r->not_full.waiters),
                         /* locks taken over from a dead producer / consumer */
                         "producer_recoveries", (unsigned)LD(r->prod_recoveries),
                         "consumer_recoveries", (unsigned)LD(r->cons_recoveries),
                         /* times somebody slept waiting for a side's lock */
                         "producer_lock_sleeps", (unsigned long long)LD(r->prod.lock_wait.sleeps),
                         "consumer_lock_sleeps", (unsigned long long)LD(r->cons.lock_wait.sleeps),
                         /* pid holding a side's lock now, 0 if free */
                         "producer_lock_owner", (int)MEMD_RING_LOCK_PID(LD(r->prod.lock)),
                         "consumer_lock_owner", (int)MEMD_RING_LOCK_PID(LD(r->cons.lock)));
#undef LD
}

#define FC      (METH_FASTCALL | METH_KEYWORDS)
#define FCFN(f) (PyCFunction)(void (*)(void))(f)

static PyMethodDef ring_methods[] = {
    /* Entries are ints on an 8-byte ring, bytes of esize on a ring of records. */
    {"enqueue", FCFN(ring_enqueue), FC,
     "enqueue(value, timeout=0) -> bool: False if the ring stayed full.  value: an int, "
     "or a bytes-like of esize bytes on a ring of records."},
    {"dequeue", FCFN(ring_dequeue), FC,
     "dequeue(timeout=0) -> int | bytes | None: None if the ring stayed empty."},
    {"enqueue_bulk", FCFN(ring_enqueue_bulk), FC,
     "enqueue_bulk(values, timeout=0) -> int: all entries or 0 (all or nothing).  values: "
     "ints or a uint64 buffer; on a ring of records a buffer of whole records or a "
     "sequence of bytes-likes of esize bytes."},
    {"enqueue_burst", FCFN(ring_enqueue_burst), FC,
     "enqueue_burst(values, timeout=0) -> int: how many fitted."},
    {"dequeue_bulk", FCFN(ring_dequeue_bulk), FC,
     "dequeue_bulk(n, timeout=0) -> list[int] | list[bytes]: n entries or []."},
    {"dequeue_burst", FCFN(ring_dequeue_burst), FC,
     "dequeue_burst(n, timeout=0) -> list[int] | list[bytes]: up to n entries."},
    {"dequeue_bulk_into", FCFN(ring_dequeue_bulk_into), FC,
     "dequeue_bulk_into(buffer, timeout=0) -> int: fills the whole buffer (uint64; any "
     "format on a ring of records) or nothing; returns its entries or 0."},
    {"dequeue_burst_into", FCFN(ring_dequeue_burst_into), FC,
     "dequeue_burst_into(buffer, timeout=0) -> int: fills the buffer's head with up to "
     "its length in entries and returns how many."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "Ring[int] / Ring[bytes]: what its entries are, for type checkers."},
    {"_wait_prepare", ring_wait_prepare, METH_VARARGS,
     "_wait_prepare(enq, want) -> int: announce an asyncio waiter for room (enq) or "
     "entries, wanting `want` of them; returns the futex value to wait on"},
    {"_wait_done", ring_wait_done, METH_O, "_wait_done(enq): withdraw the announced waiter"},
    {"_check_live", ring_check_live, METH_NOARGS,
     "_check_live() -> None: StaleHandle if the ring was freed since this handle was made"},
    {"_bind_zone", ring_bind_zone, METH_VARARGS,
     "_bind_zone(mz_id, generation) -> None: the memzone the ring was found in (a tag "
     "mismatch while it is still listed there is damage: CorruptionError, not StaleHandle)"},
    {"_poison", ring_poison, METH_NOARGS,
     "_poison() -> None (ring_free's step): every handle to this ring raises StaleHandle "
     "from now on; StaleHandle if it was freed already"},
    {"full", ring_full, METH_NOARGS, "full() -> bool"},
    {"empty", ring_empty, METH_NOARGS, "empty() -> bool"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"count", ring_get_count, NULL, "entries in the ring now", NULL},
    {"free_count", ring_get_free_count, NULL, "room for entries now", NULL},
    {"capacity", ring_get_capacity, NULL, "most entries the ring holds", NULL},
    {"esize", ring_get_esize, NULL, "bytes per entry (8: uint64 ints; else records)", NULL},
    {"size", ring_get_size, NULL, "slots (a power of two)", NULL},
    {"flags", ring_get_flags, NULL, "RING_F_* flags it was created with", NULL},
    {"memsize", ring_get_memsize, NULL, "bytes of shared memory it uses", NULL},
    {"name", ring_get_name, NULL, "name stored in the ring header", NULL},
    {"offset", ring_get_offset, NULL, "window offset of the ring header", NULL},
    {"window", ring_get_window, NULL, "the Window the ring lives in", NULL},
    {"wait_stats", ring_get_wait_stats, NULL,
     "futex sleep/wake counters, lock recoveries and owners (dict)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MemdRing_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.Ring",
    .tp_basicsize = sizeof(MemdRing),
    .tp_dealloc = ring_dealloc,
    .tp_traverse = ring_traverse,
    .tp_clear = ring_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ring(window, offset): an initialised ring in a shared window (see memd.shm.ring).",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
    .tp_new = ring_new,
};

/* --- module functions ----------------------------------------------------- */

/* memd_ring_memsize for Python numbers; -1 with MemdValueError set on bad input. */
static int64_t checked_memsize(unsigned long long count, unsigned long long esize,
                               unsigned int flags)
{
    int64_t sz = count > UINT32_MAX || esize > UINT32_MAX
                     ? -EINVAL
                     : memd_ring_memsize((uint32_t)count, (uint32_t)esize, flags);
    if (sz < 0) {
        PyErr_Format(value_error(),
                     "bad ring count %llu, esize %llu, flags 0x%x: count must be a power of two "
                     ">= 2 (capacity count-1), or any count >= 1 with RING_F_EXACT_SZ (capacity "
                     "count); at most 2**30 slots (RING_SZ_MASK 0x%x); esize a multiple of 4 "
                     "bytes; flags only RING_F_*",
                     count, esize, flags, MEMD_RING_SZ_MASK);
        return -1;
    }
    return sz;
}

static PyObject *py_ring_memsize(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"count", "flags", "esize", NULL};
    unsigned long long count, esize = MEMD_RING_ESIZE_U64;
    unsigned int flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|O&O&:ring_memsize", kwlist, memd_conv_u64,
                                     &count, memd_conv_u32, &flags, memd_conv_u64, &esize))
        return NULL;
    int64_t sz = checked_memsize(count, esize, flags);
    return sz < 0 ? NULL : PyLong_FromLongLong(sz);
}

static PyObject *py_ring_init(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"window", "offset", "count", "flags", "name", "esize", NULL};
    PyObject *window;
    unsigned long long off, count, esize = MEMD_RING_ESIZE_U64;
    unsigned int flags = 0;
    const char *name = "";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O&O&|O&sO&:ring_init", kwlist, &MemdWindow_Type,
                                     &window, memd_conv_u64, &off, memd_conv_u64, &count,
                                     memd_conv_u32, &flags, &name, memd_conv_u64, &esize))
        return NULL;
    char *base = memd_base_of(window);
    if (base == NULL)
        return NULL;
    if (strlen(name) >= MEMD_NAMESIZE) {
        PyErr_Format(PyExc_ValueError, "ring name '%s' is longer than %u bytes", name,
                     MEMD_NAMESIZE - 1);
        return NULL;
    }
    int64_t sz = checked_memsize(count, esize, flags);
    if (sz < 0)
        return NULL;
    if (off % 64) {
        PyErr_SetString(PyExc_ValueError, "a ring's offset must be 64-byte aligned");
        return NULL;
    }
    if (memd_check_range(window, off, (uint64_t)sz) < 0)
        return NULL;
    int rc = memd_ring_init((struct memd_ring *)(base + off), name, (uint32_t)count,
                            (uint32_t)esize, flags, MEMD_TAG_FREED);
    if (rc < 0)
        return memd_raise_errno(rc, "ring_init");
    Py_RETURN_NONE;
}

static PyObject *py_ring_wait_spin(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *arg = Py_None;
    if (!PyArg_ParseTuple(args, "|O:ring_wait_spin", &arg))
        return NULL;
    uint64_t old = wait_spin_ns;
    if (arg != Py_None) {
        double s = PyFloat_AsDouble(arg);
        if (s == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(s >= 0.0 && s <= 0.1)) {
            PyErr_SetString(PyExc_ValueError, "spin must be 0 to 0.1 seconds");
            return NULL;
        }
        wait_spin_ns = (uint64_t)(s * 1e9);
    }
    return PyFloat_FromDouble((double)old / 1e9);
}

#ifdef MEMD_TEST_HOOKS
static PyObject *py_ring_crash_after(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (k > INT_MAX)
        k = INT_MAX;
    return PyLong_FromLong(memd_ring_crash_after(k < 0 ? -1 : (int)k));
}

static PyObject *py_ring_stop_after(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (k > INT_MAX)
        k = INT_MAX;
    return PyLong_FromLong(memd_ring_stop_after(k < 0 ? -1 : (int)k));
}
#endif

/* The asyncio waiter thread's own futex: bumped when a wait is added. */
static _Atomic uint32_t aio_kick;

static PyObject *py_ring_wait_kick(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    atomic_fetch_add_explicit(&aio_kick, 1, memory_order_release);
    syscall(SYS_futex, (void *)&aio_kick, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    Py_RETURN_NONE;
}

static PyObject *py_ring_wait_kick_seq(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLong(atomic_load_explicit(&aio_kick, memory_order_acquire));
}

#define AIO_MAX_WAITS 127 /* FUTEX_WAITV_MAX (128) less the kick futex */

/* ring_wait_many(waits, kick_seq, timeout) -> [index]: sleep (without the GIL) until
 * one of the waits [(ring, enq, seq)] or the kick futex moves from the value given,
 * or timeout seconds pass; returns the indices of the waits whose futex moved (or
 * whose window was closed).  Waits on the same futex and value share one entry;
 * past AIO_MAX_WAITS distinct ones, or without futex_waitv (Linux < 5.16), it
 * polls every millisecond. */
static PyObject *py_ring_wait_many(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *waits;
    unsigned int kick;
    double timeout;
    if (!PyArg_ParseTuple(args, "O!O&d:ring_wait_many", &PyList_Type, &waits, memd_conv_u32, &kick,
                          &timeout))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(waits);
    struct futex_waitv wv[AIO_MAX_WAITS + 1];
    memset(wv, 0, sizeof(wv));
    wv[0].val = kick;
    wv[0].uaddr = (uintptr_t)&aio_kick;
    wv[0].flags = FUTEX_32 | FUTEX_PRIVATE_FLAG;
    unsigned k = 1, ready = 0, unwatched = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(waits, i);
        PyObject *ring;
        int enq;
        unsigned int seq;
        if (!PyArg_ParseTuple(item, "O!pO&:ring_wait_many", &MemdRing_Type, &ring, &enq,
                              memd_conv_u32, &seq))
            return NULL;
        char *base = ((MemdWindow *)((MemdRing *)ring)->window)->base;
        if (base == NULL) {
            ready = 1;
            continue;
        }
        struct memd_ring *r = (struct memd_ring *)(base + ((MemdRing *)ring)->offset);
        struct memd_ring_wait *w = async_wait_of(r, enq);
        if (atomic_load_explicit(&w->seq, memory_order_acquire) != seq ||
            !memd_ring_tag_ok(&r->prod, ((MemdRing *)ring)->tag))
            ready = 1; /* a freed ring: its coroutine retries and raises */
        else {
            /* Waits on one futex with one expected value share an entry: a pool of
             * coroutines consuming one ring takes one slot, however many they are. */
            unsigned j = 1;
            while (j < k && (wv[j].uaddr != (uintptr_t)&w->seq || wv[j].val != seq))
                j++;
            if (j < k)
                continue;
            if (k > AIO_MAX_WAITS) {
                unwatched = 1;
                continue;
            }
            /* no FUTEX_PRIVATE_FLAG: the wakers are other processes */
            wv[k].val = seq;
            wv[k].uaddr = (uintptr_t)&w->seq;
            wv[k].flags = FUTEX_32;
            k++;
        }
    }
    if (!ready) {
        uint64_t ns = timeout <= 0     ? 0
                      : timeout >= 1e6 ? 1000000000000000ull
                                       : (uint64_t)(timeout * 1e9);
        if (unwatched && ns > 1000000)
            ns = 1000000; /* more distinct futexes than one call takes: poll the rest */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec +=
            (time_t)(ns / 1000000000u) + (ts.tv_nsec + (long)(ns % 1000000000u)) / 1000000000L;
        ts.tv_nsec = (ts.tv_nsec + (long)(ns % 1000000000u)) % 1000000000L;
        long rc;
        Py_BEGIN_ALLOW_THREADS
            rc = syscall(SYS_futex_waitv, wv, k, 0, &ts, CLOCK_MONOTONIC);
            if (rc < 0 && errno == ENOSYS) {
                struct timespec ms = {0, 1000000};
                nanosleep(&ms, NULL);
            }
        Py_END_ALLOW_THREADS
    }
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out != NULL && i < PyList_GET_SIZE(waits); i++) {
        PyObject *item = PyList_GET_ITEM(waits, i);
        MemdRing *ring = (MemdRing *)PyTuple_GET_ITEM(item, 0);
        int enq = PyObject_IsTrue(PyTuple_GET_ITEM(item, 1));
        unsigned long seq = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(item, 2));
        char *base = ((MemdWindow *)ring->window)->base;
        struct memd_ring *r = base ? (struct memd_ring *)(base + ring->offset) : NULL;
        int moved = r == NULL || !memd_ring_tag_ok(&r->prod, ring->tag) ||
                    atomic_load_explicit(&async_wait_of(r, enq)->seq, memory_order_acquire) !=
                        (uint32_t)seq;
        if (moved) {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (idx == NULL || PyList_Append(out, idx) < 0)
                Py_CLEAR(out);
            Py_XDECREF(idx);
        }
    }
    return out;
}

/* check_timeout(timeout) -> float | None: a ring call's timeout as the blocking
 * calls take it (None: forever), raising what they raise; the asyncio twins check
 * theirs with it, so both forms refuse a bad timeout alike. */
static PyObject *py_check_timeout(PyObject *Py_UNUSED(m), PyObject *arg)
{
    uint64_t ns;
    if (memd_parse_timeout(arg, &ns) < 0)
        return NULL;
    if (ns == UINT64_MAX)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(PyFloat_AsDouble(arg)); /* a number: checked above */
}

static PyMethodDef ring_functions[] = {
    {"check_timeout", py_check_timeout, METH_O,
     "check_timeout(timeout) -> float | None: the timeout in seconds (None: no limit) as "
     "every ring call takes it; TypeError for a non-number, MemdValueError for one < 0 or "
     "NaN."},
    {"ring_wait_many", py_ring_wait_many, METH_VARARGS,
     "ring_wait_many(waits, kick_seq, timeout) -> list[int]: asyncio's waiter thread: sleep "
     "until one of [(ring, enq, seq)] or the kick futex moves, or timeout seconds; the "
     "indices of the waits that moved"},
    {"ring_wait_kick", py_ring_wait_kick, METH_NOARGS,
     "ring_wait_kick(): wake the waiter thread (a wait was added)"},
    {"ring_wait_kick_seq", py_ring_wait_kick_seq, METH_NOARGS,
     "ring_wait_kick_seq() -> int: the kick futex's value, read before ring_wait_many"},
    {"ring_wait_spin", py_ring_wait_spin, METH_VARARGS,
     "ring_wait_spin(seconds=None) -> float: how long a waiting call retries before it "
     "sleeps (default 5 µs; 0 sleeps at once); sets it if given, returns the old value."},
    {"ring_memsize", (PyCFunction)(void (*)(void))py_ring_memsize, METH_VARARGS | METH_KEYWORDS,
     "ring_memsize(count, flags=0, esize=8) -> bytes a ring needs (MemdValueError on a bad "
     "count or esize)."},
    {"ring_init", (PyCFunction)(void (*)(void))py_ring_init, METH_VARARGS | METH_KEYWORDS,
     "ring_init(window, offset, count, flags=0, name='', esize=8) -> None: an empty ring at "
     "offset."},
#ifdef MEMD_TEST_HOOKS /* test builds only (setup.py) */
    {"_ring_crash_after", py_ring_crash_after, METH_O,
     "_ring_crash_after(k) -> old k (TESTS ONLY): the next ring operation in this process "
     "calls _exit(77) at its step point k (0: after taking the lock and claiming; then one "
     "per slot written/read; then before the tail store; then after it, before the "
     "unlock).  k < 0 disarms; an operation with fewer steps disarms it too."},
    {"_ring_stop_after", py_ring_stop_after, METH_O,
     "_ring_stop_after(k) -> old k (TESTS ONLY): as _ring_crash_after, but step point k "
     "raises SIGSTOP (the process stops there, holding the side's lock) instead of exiting."},
#endif
    {NULL, NULL, 0, NULL},
};

PyTypeObject *memd_ring_type(void) { return &MemdRing_Type; }

PyObject *memd_ring_ptr_of(PyObject *ring, struct memd_ring **out)
{
    if (!PyObject_TypeCheck(ring, &MemdRing_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a memd ring");
        return NULL;
    }
    *out = ring_live((MemdRing *)ring);
    return *out ? ring : NULL;
}

static const struct memd_const ring_constants[] = {
    MEMD_CONST("RING_F_SP_ENQ", MEMD_RING_F_SP_ENQ),
    MEMD_CONST("RING_F_SC_DEQ", MEMD_RING_F_SC_DEQ),
    MEMD_CONST("RING_F_EXACT_SZ", MEMD_RING_F_EXACT_SZ),
    MEMD_CONST("RING_SZ_MASK", MEMD_RING_SZ_MASK),
    MEMD_CONST("RING_ESIZE_U64", MEMD_RING_ESIZE_U64),
    MEMD_CONST("TAG_FREED", MEMD_TAG_FREED),
    {NULL},
};

static const struct memd_field ring_layout[] = {
    MEMD_SIZEOF(memd_ring),
    MEMD_FIELD(memd_ring, magic),
    MEMD_FIELD(memd_ring, name),
    MEMD_FIELD(memd_ring, flags),
    MEMD_FIELD(memd_ring, size),
    MEMD_FIELD(memd_ring, mask),
    MEMD_FIELD(memd_ring, capacity),
    MEMD_FIELD(memd_ring, memsize),
    MEMD_FIELD(memd_ring, esize),
    MEMD_FIELD(memd_ring, prod),
    MEMD_FIELD(memd_ring, cons),
    MEMD_FIELD(memd_ring, not_empty),
    MEMD_FIELD(memd_ring, not_full),
    MEMD_FLEX(memd_ring, slots),
    MEMD_FIELD(memd_ring_headtail, head),
    MEMD_FIELD(memd_ring_headtail, tail),
    MEMD_FIELD(memd_ring_headtail, other_tail),
    MEMD_FIELD(memd_ring_headtail, lock),
    MEMD_FIELD(memd_ring_headtail, tag),
    MEMD_FIELD(memd_ring, prod_recoveries),
    MEMD_FIELD(memd_ring, cons_recoveries),
    MEMD_FIELD(memd_ring_headtail, lock_wait),
    {NULL},
};

int memd_py_init_ring(PyObject *m)
{
    return memd_add_type(m, &MemdRing_Type) < 0 || memd_add_functions(m, ring_functions) < 0 ||
                   memd_add_constants(m, ring_constants) < 0 || memd_add_layout(m, ring_layout) < 0
               ? -1
               : 0;
}
