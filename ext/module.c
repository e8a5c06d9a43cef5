/*
 * module.c - memd._ext: the Window type and the module's assembly.
 *
 * A Window is a range of address space reserved with PROT_NONE.  Shared files
 * (the config, hugepage files, shm objects) are mapped into it with MAP_FIXED at
 * their window offsets; unmapping puts PROT_NONE back so the hole stays reserved.
 * Views (memoryviews) hold a reference to the Window, so the range is released
 * only when the last view is gone: a stale view never points at unmapped memory.
 */
#include "memd_py.h"
#include "pins.h"
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The one way the extension raises memd's own exceptions: the class of that name
 * in memd.errors, looked up when first needed (memd.errors does not import the
 * extension, so there is no cycle), or `fallback` if it cannot be had. */
PyObject *memd_error(const char *name, PyObject *fallback)
{
    static PyObject *errors_mod;
    if (errors_mod == NULL) {
        errors_mod = PyImport_ImportModule("memd.errors");
        if (errors_mod == NULL) {
            PyErr_Clear();
            return fallback;
        }
    }
    PyObject *e = PyObject_GetAttrString(errors_mod, name);
    if (e == NULL) {
        PyErr_Clear();
        return fallback;
    }
    Py_DECREF(e); /* the module keeps it alive */
    return e;
}

int memd_window_check_watch(PyObject *window)
{
    int fd = ((MemdWindow *)window)->watch_fd;
    if (fd < 0)
        return 0;
    /* A pidfd polls readable once its process has exited.  POLLNVAL (the
     * caller closed it) is not a death: ignore it. */
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    if (poll(&p, 1, 0) <= 0 || !(p.revents & (POLLIN | POLLHUP)))
        return 0;
    PyErr_SetString(memd_error("PrimaryNotRunning", PyExc_ConnectionError),
                    "the memd primary died while this call was waiting: shared memory is no "
                    "longer served. Restart memd (e.g. systemctl restart memd), then attach "
                    "again (memd_client.attach()); do not use rings, pools or blocks of the "
                    "old attachment");
    return -1;
}

PyObject *memd_raise_errno(int neg_errno, const char *where)
{
    if (PyErr_Occurred())
        return NULL; /* e.g. a signal handler's exception during a wait: it wins */
    int e = neg_errno < 0 ? -neg_errno : neg_errno;
    PyObject *msg = PyUnicode_FromFormat("%s (from %s)", strerror(e), where);
    if (msg == NULL)
        return NULL;
    PyObject *exc_args = Py_BuildValue("(iN)", e, msg);
    if (exc_args == NULL)
        return NULL;
    PyErr_SetObject(PyExc_OSError, exc_args);
    Py_DECREF(exc_args);
    return NULL;
}

int memd_add_functions(PyObject *m, PyMethodDef *defs)
{
    for (PyMethodDef *d = defs; d->ml_name != NULL; d++) {
        PyObject *f = PyCFunction_NewEx(d, NULL, PyModule_GetNameObject(m));
        if (f == NULL)
            return -1;
        if (PyModule_AddObject(m, d->ml_name, f) < 0) {
            Py_DECREF(f);
            return -1;
        }
    }
    return 0;
}

int memd_add_type(PyObject *m, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    const char *dot = strrchr(type->tp_name, '.');
    Py_INCREF(type);
    if (PyModule_AddObject(m, dot ? dot + 1 : type->tp_name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

int memd_add_constants(PyObject *m, const struct memd_const *table)
{
    for (const struct memd_const *c = table; c->name != NULL; c++) {
        PyObject *v = c->is_signed ? PyLong_FromLongLong((long long)c->value)
                                   : PyLong_FromUnsignedLongLong(c->value);
        if (v == NULL || PyModule_AddObject(m, c->name, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
    }
    return 0;
}

int memd_add_layout(PyObject *m, const struct memd_field *table)
{
    PyObject *d = PyObject_GetAttrString(m, "LAYOUT");
    if (d == NULL) {
        PyErr_Clear();
        d = PyDict_New();
        if (d == NULL)
            return -1;
        Py_INCREF(d);
        if (PyModule_AddObject(m, "LAYOUT", d) < 0) {
            Py_DECREF(d);
            Py_DECREF(d);
            return -1;
        }
    }
    int rc = 0;
    for (const struct memd_field *f = table; f->name != NULL && rc == 0; f++) {
        PyObject *v = f->is_type
                          ? PyLong_FromSize_t(f->size)
                          : Py_BuildValue("(nn)", (Py_ssize_t)f->offset, (Py_ssize_t)f->size);
        rc = v == NULL ? -1 : PyDict_SetItemString(d, f->name, v);
        Py_XDECREF(v);
    }
    Py_DECREF(d);
    return rc;
}

PyObject *memd_raise_closed(PyObject *fallback)
{
    PyErr_SetString(memd_error("MemdValueError", fallback),
                    "memd: this object belongs to an attachment that was detached (or a "
                    "closed window); attach() again and look it up anew");
    return NULL;
}

int memd_window_base(PyObject *obj, void *out_base)
{
    char *base = memd_base_of(obj);
    if (base == NULL)
        return 0;
    *(char **)out_base = base;
    return 1;
}

int memd_check_range(PyObject *window, uint64_t off, uint64_t len)
{
    MemdWindow *w = (MemdWindow *)window;
    if (off > w->size || len > w->size - off) {
        PyErr_Format(PyExc_ValueError,
                     "range [%llu, +%llu) is outside the shared window of %llu bytes",
                     (unsigned long long)off, (unsigned long long)len, (unsigned long long)w->size);
        return -1;
    }
    return 0;
}

int memd_check_mapped(PyObject *window, uint64_t off, uint64_t len)
{
    MemdWindow *w = (MemdWindow *)window;
    /* every mapping in a window covers whole MEMD_CONFIG_SIZE (2 MiB) units */
    if (w->anonymous || memd_readable(w->base + off, len, MEMD_CONFIG_SIZE))
        return 0;
    PyErr_Format(memd_error("MemdValueError", PyExc_ValueError),
                 "window range [%llu, +%llu) is not mapped in this process: pass an offset "
                 "taken from a block, memzone, ring or mempool",
                 (unsigned long long)off, (unsigned long long)len);
    return -1;
}

/* --- pins: views keep their pages (memd_layout.h, "view pins") ----------- */

/* view->internal holds (epoch << 8 | (tag + 2)): never NULL once pinned, and a
 * tag of another epoch (before a pin_as) is ignored. */
#define PIN_TAG_BITS 8
_Static_assert(MEMD_PINS_PER_PROC + 2 < (1u << PIN_TAG_BITS), "a pin tag fits its bits");

/* Set in a forked child: the rows belong to the parent, which writes them alone.
 * The child pins nothing, and the views it inherited unpin nothing (the parent's
 * copies of them still live); a child must attach on its own. */
static volatile int forked_child;

static void on_fork_child(void) { forked_child = 1; }

int memd_view_pin(PyObject *window, uint64_t off, uint64_t len, Py_buffer *view)
{
    MemdWindow *w = (MemdWindow *)window;
    view->internal = NULL;
    if (w->pin_slot < 0 || w->base == NULL || forked_child)
        return 0; /* not registered (tests' windows, a detached process): nothing to pin */
    int tag;
    if (memd_pin_add(w->base, (uint32_t)w->pin_slot, off, len, &tag) < 0) {
        PyErr_Format(PyExc_BufferError,
                     "window range [%llu, +%llu) lies on a page that is no longer in use: "
                     "its memory was freed and given back",
                     (unsigned long long)off, (unsigned long long)len);
        return -1;
    }
    view->internal =
        (void *)(((uintptr_t)w->pin_epoch << PIN_TAG_BITS) | (uintptr_t)(unsigned)(tag + 2));
    return 0;
}

void memd_view_unpin(PyObject *window, Py_buffer *view)
{
    MemdWindow *w = (MemdWindow *)window;
    uintptr_t t = (uintptr_t)view->internal;
    view->internal = NULL;
    if (t == 0 || w->pin_slot < 0 || w->mapping == NULL || forked_child ||
        (t >> PIN_TAG_BITS) != ((uintptr_t)w->pin_epoch & (UINTPTR_MAX >> PIN_TAG_BITS)))
        return;
    /* the mapping, not base: a view may outlive close() (base NULL) */
    memd_pin_drop(w->mapping, (uint32_t)w->pin_slot, (int)(t & ((1u << PIN_TAG_BITS) - 1)) - 2);
}

/* --- Span: a buffer exporter over part of a Window ------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *window; /* strong ref: keeps the mapping alive */
    char *addr;
    Py_ssize_t len;
    uint64_t off;
} MemdSpan;

static int span_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    MemdSpan *s = (MemdSpan *)self;
    if (memd_view_pin(s->window, s->off, (uint64_t)s->len, view) < 0) {
        view->obj = NULL;
        return -1;
    }
    void *tag = view->internal;
    if (PyBuffer_FillInfo(view, self, s->addr, s->len, 0, flags) < 0) {
        view->internal = tag;
        memd_view_unpin(s->window, view);
        return -1;
    }
    view->internal = tag;
    return 0;
}

static void span_releasebuffer(PyObject *self, Py_buffer *view)
{
    memd_view_unpin(((MemdSpan *)self)->window, view);
}

static void span_dealloc(PyObject *self)
{
    MemdSpan *s = (MemdSpan *)self;
    Py_XDECREF(s->window);
    Py_TYPE(self)->tp_free(self);
}

static PyBufferProcs span_as_buffer = {span_getbuffer, span_releasebuffer};

static PyTypeObject MemdSpan_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.Span",
    .tp_basicsize = sizeof(MemdSpan),
    .tp_dealloc = span_dealloc,
    .tp_as_buffer = &span_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Part of a shared window, exported through the buffer protocol.",
};

PyObject *memd_view(PyObject *window, uint64_t off, uint64_t len)
{
    char *base = memd_base_of(window);
    if (base == NULL || memd_check_range(window, off, len) < 0 ||
        memd_check_mapped(window, off, len) < 0)
        return NULL;
    MemdSpan *s = PyObject_New(MemdSpan, &MemdSpan_Type);
    if (s == NULL)
        return NULL;
    Py_INCREF(window);
    s->window = window;
    s->addr = base + off;
    s->len = (Py_ssize_t)len;
    s->off = off;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)s);
    Py_DECREF(s);
    return mv;
}

/* --- Window --------------------------------------------------------------- */

static int reserve(uint64_t size, uint64_t align, char **out)
{
    /* Over-reserve and trim so the base is aligned to the largest page size:
     * MAP_FIXED hugepage mappings need page-size-aligned addresses. */
    uint64_t total = size + align;
    char *p = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    if (start > (uintptr_t)p)
        munmap(p, start - (uintptr_t)p);
    uintptr_t end = start + size;
    if ((uintptr_t)p + total > end)
        munmap((char *)end, (uintptr_t)p + total - end);
    *out = (char *)start;
    return 0;
}

static PyObject *window_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", "align", "address", NULL};
    unsigned long long size, align = 2u << 20, address = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K|KK", kwlist, &size, &align, &address))
        return NULL;
    long pg = sysconf(_SC_PAGESIZE);
    if (size == 0 || size % (unsigned long long)pg || align < (unsigned long long)pg ||
        (align & (align - 1))) {
        PyErr_SetString(PyExc_ValueError,
                        "window size must be a non-zero multiple of the page size and "
                        "align a power of two >= the page size");
        return NULL;
    }
    char *base = NULL;
    if (address) {
        /* --base-virtaddr: ask for that address, accept only it. */
        base = mmap((void *)(uintptr_t)address, size, PROT_NONE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (base == MAP_FAILED)
            return memd_raise_errno(-errno, "mmap at --base-virtaddr");
        if (base != (char *)(uintptr_t)address) {
            munmap(base, size);
            return memd_raise_errno(-EADDRINUSE, "mmap at --base-virtaddr");
        }
    } else {
        int rc = reserve(size, align, &base);
        if (rc < 0)
            return memd_raise_errno(rc, "mmap (reserving the shared window)");
    }
    MemdWindow *w = (MemdWindow *)type->tp_alloc(type, 0);
    if (w == NULL) {
        munmap(base, size);
        return NULL;
    }
    w->base = w->mapping = base;
    w->size = size;
    w->watch_fd = -1;
    w->uffd = -1;
    w->pin_slot = -1;
    return (PyObject *)w;
}

static void window_dealloc(PyObject *self)
{
    MemdWindow *w = (MemdWindow *)self;
    if (w->mapping)
        munmap(w->mapping, w->size);
    if (w->uffd >= 0)
        close(w->uffd);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *window_anonymous(PyObject *cls, PyObject *arg)
{
    /* Test memory: a fully mapped, shared anonymous window (fork-shared). */
    unsigned long long size = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    PyObject *w = PyObject_CallFunction(cls, "K", size);
    if (w == NULL)
        return NULL;
    MemdWindow *mw = (MemdWindow *)w;
    if (mmap(mw->base, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) == MAP_FAILED) {
        Py_DECREF(w);
        return memd_raise_errno(-errno, "mmap (anonymous window)");
    }
    mw->anonymous = 1;
    return w;
}

static PyObject *window_map_fd(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"offset",   "length",   "fd",        "file_offset",
                             "populate", "readonly", "noreserve", NULL};
    unsigned long long off, len, foff = 0;
    int fd, populate = 0, readonly = 0, noreserve = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKi|Kppp", kwlist, &off, &len, &fd, &foff,
                                     &populate, &readonly, &noreserve))
        return NULL;
    char *base = memd_base_of(self);
    if (base == NULL || memd_check_range(self, off, len) < 0)
        return NULL;
    int prot = PROT_READ | (readonly ? 0 : PROT_WRITE);
    /* noreserve: a whole memseg list's file, mostly holes; mapping it takes no pages */
    int flags =
        MAP_SHARED | MAP_FIXED | (populate ? MAP_POPULATE : 0) | (noreserve ? MAP_NORESERVE : 0);
    void *p;
    Py_BEGIN_ALLOW_THREADS
        p = mmap(base + off, len, prot, flags, fd, (off_t)foff);
    Py_END_ALLOW_THREADS
    if (p == MAP_FAILED)
        return memd_raise_errno(-errno, "mmap (mapping a page file into the window)");
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)p);
}

static PyObject *window_unmap(PyObject *self, PyObject *args)
{
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    char *base = memd_base_of(self);
    if (base == NULL || memd_check_range(self, off, len) < 0)
        return NULL;
    /* Put the reservation back rather than munmap: nobody else may take the hole. */
    if (mmap(base + off, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
             -1, 0) == MAP_FAILED)
        return memd_raise_errno(-errno, "mmap (unmapping part of the window)");
    Py_RETURN_NONE;
}

/* A userfaultfd that answers every fault on a hole of a registered range with
 * SIGBUS (UFFD_FEATURE_SIGBUS): nothing reads it, it only has to stay open.  Tries
 * kernel faults too; without privilege (vm.unprivileged_userfaultfd = 0) user-mode
 * faults only.  Returns the fd, or -errno. */
static int guard_fd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM)
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_SIGBUS};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

static PyObject *window_guard(PyObject *self, PyObject *args)
{
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    MemdWindow *w = (MemdWindow *)self;
    char *base = memd_base_of(self);
    if (base == NULL || memd_check_range(self, off, len) < 0)
        return NULL;
    if (w->uffd < 0) {
        int fd = guard_fd();
        if (fd < 0)
            return memd_raise_errno(fd, "userfaultfd (guarding unused pages)");
        w->uffd = fd;
    }
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)(base + off), .len = len},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(w->uffd, UFFDIO_REGISTER, &reg) < 0)
        return memd_raise_errno(-errno, "userfaultfd register (guarding unused pages)");
    Py_RETURN_NONE;
}

static PyObject *window_view(PyObject *self, PyObject *args)
{
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len))
        return NULL;
    return memd_view(self, off, len);
}

static PyObject *window_touch(PyObject *self, PyObject *args)
{
    /* Fault every page of the range in (read + write back the same byte). */
    unsigned long long off, len, step;
    if (!PyArg_ParseTuple(args, "KKK", &off, &len, &step))
        return NULL;
    char *base = memd_base_of(self);
    if (base == NULL || memd_check_range(self, off, len) < 0 || step == 0 ||
        memd_check_mapped(self, off, len) < 0)
        return step == 0 ? (PyErr_SetString(PyExc_ValueError, "step must be > 0"), NULL) : NULL;
    Py_BEGIN_ALLOW_THREADS
        for (unsigned long long o = 0; o < len; o += step) {
            volatile char *p = base + off + o;
            *p = *p;
        }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *window_watch(PyObject *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < -1 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "watch(fd): a file descriptor, or -1 to stop");
        return NULL;
    }
    if (fd >= 0 && fcntl((int)fd, F_GETFD) == -1)
        return memd_raise_errno(-errno, "Window.watch");
    ((MemdWindow *)self)->watch_fd = (int)fd;
    Py_RETURN_NONE;
}

static PyObject *window_get_watch_fd(PyObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(((MemdWindow *)self)->watch_fd);
}

static PyObject *window_get_address(PyObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)((MemdWindow *)self)->base);
}

static PyObject *window_get_size(PyObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(((MemdWindow *)self)->size);
}

/* close(): every call through this window (blocks, rings, pools, views) raises from
 * now on.  The memory stays mapped until the Window is freed, so a memoryview that
 * is still held never points at unmapped memory. */
static PyObject *window_close(PyObject *self, PyObject *Py_UNUSED(a))
{
    ((MemdWindow *)self)->base = NULL;
    ((MemdWindow *)self)->pin_slot = -1; /* our row may go to the next process */
    ((MemdWindow *)self)->pin_epoch++;
    Py_RETURN_NONE;
}

static PyObject *window_pin_as(PyObject *self, PyObject *arg)
{
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    MemdWindow *w = (MemdWindow *)self;
    if (slot < -1 || slot >= (long)MEMD_MAX_PROCS || w->size < MEMD_CONFIG_SIZE) {
        PyErr_Format(PyExc_ValueError, "pin_as(slot): a process slot in 0..%u, or -1",
                     MEMD_MAX_PROCS - 1);
        return NULL;
    }
    w->pin_slot = (int)slot;
    w->pin_epoch++; /* views made before unpin nothing in the new row */
    Py_RETURN_NONE;
}

static PyObject *window_get_pin_slot(PyObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(((MemdWindow *)self)->pin_slot);
}

static PyObject *window_get_closed(PyObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(((MemdWindow *)self)->base == NULL);
}

static PyMethodDef window_methods[] = {
    {"close", window_close, METH_NOARGS,
     "close(): calls through this window raise from now on (its memory stays mapped "
     "while views of it live)."},
    {"anonymous", window_anonymous, METH_O | METH_CLASS,
     "anonymous(size) -> Window fully backed by shared anonymous memory (tests)."},
    {"map_fd", (PyCFunction)(void (*)(void))window_map_fd, METH_VARARGS | METH_KEYWORDS,
     "map_fd(offset, length, fd, file_offset=0, populate=False, readonly=False, "
     "noreserve=False) -> address"},
    {"unmap", window_unmap, METH_VARARGS, "unmap(offset, length): back to reserved PROT_NONE."},
    {"guard", window_guard, METH_VARARGS,
     "guard(offset, length): a fault on a hole of this mapped file range raises SIGBUS "
     "instead of allocating a page (userfaultfd; OSError if the kernel refuses)."},
    {"view", window_view, METH_VARARGS,
     "view(offset, length) -> writable memoryview (pins its pages while it lives)."},
    {"pin_as", window_pin_as, METH_O,
     "pin_as(slot): views exported from now on pin their pages in process slot `slot`'s "
     "row (-1: pin nothing); views made before unpin nothing."},
    {"touch", window_touch, METH_VARARGS, "touch(offset, length, step): fault pages in."},
    {"watch", window_watch, METH_O,
     "watch(fd) -> None: watch a pidfd of the primary (the caller owns and closes it; -1 "
     "stops).  Ring calls waiting on this window then raise PrimaryNotRunning within "
     "100 ms once that process has exited."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef window_getset[] = {
    {"address", window_get_address, NULL, "base address in this process", NULL},
    {"size", window_get_size, NULL, "bytes reserved", NULL},
    {"watch_fd", window_get_watch_fd, NULL, "the watched pidfd (Window.watch), or -1", NULL},
    {"closed", window_get_closed, NULL, "True once close() was called", NULL},
    {"pin_slot", window_get_pin_slot, NULL, "the row views pin pages in (pin_as), or -1", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject MemdWindow_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "memd._ext.Window",
    .tp_basicsize = sizeof(MemdWindow),
    .tp_dealloc = window_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Window(size, align=2 MiB, address=0): reserved address space for shared memory.",
    .tp_methods = window_methods,
    .tp_getset = window_getset,
    .tp_new = window_new,
};

/* --- module --------------------------------------------------------------- */

static PyObject *py_fallocate(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "offset", "length", "punch", NULL};
    int fd, punch = 0, rc;
    unsigned long long off, len;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKK|p", kwlist, &fd, &off, &len, &punch))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
        rc = fallocate(fd, punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : 0, (off_t)off,
                       (off_t)len);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_process_alive(PyObject *Py_UNUSED(m), PyObject *args)
{
    long pid;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "l|K:process_alive", &pid, &start))
        return NULL;
    if (pid <= 0 || pid > INT32_MAX)
        Py_RETURN_FALSE;
    return PyBool_FromLong(memd_process_alive((pid_t)pid, start, start ? UINT64_MAX : 0));
}

static PyObject *py_proc_start_time(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred())
        return NULL;
    char state;
    long threads = 0;
    uint64_t start;
    if (pid <= 0 || pid > INT32_MAX || !memd_process_alive((pid_t)pid, 0, 0) ||
        memd_proc_stat((pid_t)pid, &state, &threads, &start) < 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(start);
}

static PyObject *py_pin_ranges(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *win;
    int one = -1;
    if (!PyArg_ParseTuple(args, "O|i:pin_ranges", &win, &one))
        return NULL;
    char *base = memd_base_of(win);
    if (base == NULL)
        return NULL;
    if (((MemdWindow *)win)->size < MEMD_CONFIG_SIZE || one < -1 || one >= (int)MEMD_MAX_PROCS) {
        PyErr_SetString(PyExc_ValueError, "pin_ranges(win, slot=-1): a config window, a slot");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    uint64_t r[MEMD_PINS_PER_PROC][2];
    for (int slot = one < 0 ? 0 : one;
         out != NULL && slot < (one < 0 ? (int)MEMD_MAX_PROCS : one + 1); slot++) {
        int n = memd_pins_read(base, (uint32_t)slot, r);
        if (n == -EAGAIN) { /* overflowed or mid-write: it pins everything */
            n = 1;
            r[0][0] = 0;
            r[0][1] = ((MemdWindow *)win)->size;
        }
        for (int i = 0; i < n; i++) {
            PyObject *t =
                Py_BuildValue("(KK)", (unsigned long long)r[i][0], (unsigned long long)r[i][1]);
            if (t == NULL || PyList_Append(out, t) < 0)
                Py_CLEAR(out);
            Py_XDECREF(t);
            if (out == NULL)
                break;
        }
    }
    return out;
}

static PyObject *py_msl_releasing(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *win;
    unsigned int idx, first, n;
    if (!PyArg_ParseTuple(args, "OIII:msl_releasing", &win, &idx, &first, &n))
        return NULL;
    char *base = memd_base_of(win);
    if (base == NULL)
        return NULL;
    if (((MemdWindow *)win)->size < MEMD_CONFIG_SIZE ||
        memd_msl_releasing(base, idx, first, n) < 0) {
        PyErr_SetString(PyExc_ValueError, "msl_releasing(win, idx, first, n): a list index");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_functions[] = {
    {"msl_releasing", py_msl_releasing, METH_VARARGS,
     "msl_releasing(win, idx, first, n): slots [first, first + n) of list idx are being "
     "given back (views may pin them until n = 0 is set, before the last pin check)."},
    {"pin_ranges", py_pin_ranges, METH_VARARGS,
     "pin_ranges(win, slot=-1) -> [(lo, hi), ...]: window offset ranges that views of "
     "process slot `slot` (every slot: -1) pin; a row that pins everything gives "
     "(0, window size).  Pages in them must not be given back."},
    {"fallocate", (PyCFunction)(void (*)(void))py_fallocate, METH_VARARGS | METH_KEYWORDS,
     "fallocate(fd, offset, length, punch=False): allocate the file's pages in that range "
     "(OSError ENOSPC when there are none), or with punch free them (a hole; the size "
     "stays)."},
    {"process_alive", py_process_alive, METH_VARARGS,
     "process_alive(pid, start_time=0) -> bool: pid is a live process (not a zombie) "
     "that started at start_time (/proc/<pid>/stat field 22; 0: any)."},
    {"proc_start_time", py_proc_start_time, METH_O,
     "proc_start_time(pid) -> int | None: the start time of live process pid, in clock "
     "ticks since boot; None if it is gone or a zombie."},
    {NULL, NULL, 0, NULL},
};

static const struct memd_const pin_consts[] = {
    MEMD_CONST("PINS_PER_PROC", MEMD_PINS_PER_PROC),
    MEMD_CONST("PIN_UNIT", MEMD_PIN_UNIT),
    {NULL, 0, 0},
};

static const struct memd_field pin_layout[] = {
    MEMD_FIELD(memd_config, pins),
    MEMD_FIELD(memd_proc_pins, seq),
    MEMD_FIELD(memd_proc_pins, overflow),
    MEMD_FIELD(memd_proc_pins, e),
    MEMD_FIELD(memd_pin, count),
    MEMD_SIZEOF(memd_proc_pins),
    MEMD_SIZEOF(memd_pin),
    {NULL, 0, 0, 0},
};

static struct PyModuleDef memd_module = {
    PyModuleDef_HEAD_INIT,
    "memd._ext",
    "memd's C core: the shared layout, locks, config, heap, ring and mempool.",
    -1,
    NULL,
};

PyMODINIT_FUNC PyInit__ext(void)
{
    if (PyType_Ready(&MemdSpan_Type) < 0) /* internal: not in the module */
        return NULL;
    if (pthread_atfork(NULL, NULL, on_fork_child) != 0)
        return PyErr_NoMemory();
    PyObject *m = PyModule_Create(&memd_module);
    if (m == NULL)
        return NULL;
    if (memd_add_type(m, &MemdWindow_Type) < 0 || memd_add_functions(m, module_functions) < 0 ||
        memd_py_init_config(m) < 0 || memd_py_init_heap(m) < 0 || memd_py_init_ring(m) < 0 ||
        memd_py_init_mempool(m) < 0 || memd_add_constants(m, pin_consts) < 0 ||
        memd_add_layout(m, pin_layout) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
