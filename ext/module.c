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
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
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
                    "memd: this object belongs to an attachment that was detached, or "
                    "that this process inherited when it was forked (attach() again in "
                    "the child), or a closed window; attach() again and look it up anew");
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

/* --- Span: a buffer exporter over part of a Window ------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *window; /* strong ref: keeps the mapping alive */
    char *addr;
    Py_ssize_t len;
} MemdSpan;

static int span_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    MemdSpan *s = (MemdSpan *)self;
    return PyBuffer_FillInfo(view, self, s->addr, s->len, 0, flags);
}

static void span_dealloc(PyObject *self)
{
    MemdSpan *s = (MemdSpan *)self;
    Py_XDECREF(s->window);
    Py_TYPE(self)->tp_free(self);
}

static PyBufferProcs span_as_buffer = {span_getbuffer, NULL};

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
    return (PyObject *)w;
}

static void window_dealloc(PyObject *self)
{
    MemdWindow *w = (MemdWindow *)self;
    if (w->mapping)
        munmap(w->mapping, w->size);
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
    static char *kwlist[] = {"offset", "length", "fd", "file_offset", "populate", "readonly", NULL};
    unsigned long long off, len, foff = 0;
    int fd, populate = 0, readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKi|Kpp", kwlist, &off, &len, &fd, &foff,
                                     &populate, &readonly))
        return NULL;
    char *base = memd_base_of(self);
    if (base == NULL || memd_check_range(self, off, len) < 0)
        return NULL;
    int prot = PROT_READ | (readonly ? 0 : PROT_WRITE);
    int flags = MAP_SHARED | MAP_FIXED | (populate ? MAP_POPULATE : 0);
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
    Py_RETURN_NONE;
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
     "map_fd(offset, length, fd, file_offset=0, populate=False, readonly=False) -> address"},
    {"unmap", window_unmap, METH_VARARGS, "unmap(offset, length): back to reserved PROT_NONE."},
    {"view", window_view, METH_VARARGS, "view(offset, length) -> writable memoryview."},
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

static PyMethodDef module_functions[] = {
    {"process_alive", py_process_alive, METH_VARARGS,
     "process_alive(pid, start_time=0) -> bool: pid is a live process (not a zombie) "
     "that started at start_time (/proc/<pid>/stat field 22; 0: any)."},
    {"proc_start_time", py_proc_start_time, METH_O,
     "proc_start_time(pid) -> int | None: the start time of live process pid, in clock "
     "ticks since boot; None if it is gone or a zombie."},
    {NULL, NULL, 0, NULL},
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
    PyObject *m = PyModule_Create(&memd_module);
    if (m == NULL)
        return NULL;
    if (memd_add_type(m, &MemdWindow_Type) < 0 || memd_add_functions(m, module_functions) < 0 ||
        memd_py_init_config(m) < 0 || memd_py_init_heap(m) < 0 || memd_py_init_ring(m) < 0 ||
        memd_py_init_mempool(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
