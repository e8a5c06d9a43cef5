/*
 * memd_py.h - what the extension's binding files share: the Window type (the
 * reserved address range a process maps shared memory into) and error helpers.
 * The primitives themselves (lock.c, config.c, heap.c, ring.c, mempool.c) never
 * include Python.h; py_*.c files bind them.
 */
#ifndef MEMD_PY_H
#define MEMD_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "memd_layout.h"

typedef struct {
    PyObject_HEAD
    char *base;         /* window address in this process; NULL once closed */
    char *mapping;      /* the reservation: unmapped when the Window is freed */
    uint64_t size;      /* bytes reserved */
    int anonymous;      /* Window.anonymous(): private test memory, fully mapped */
    int watch_fd;       /* Window.watch(): a pidfd of the primary (caller-owned), or -1 */
    int uffd;           /* Window.guard(): userfaultfd turning faults on holes into SIGBUS, or -1 */
    int pin_slot;       /* Window.pin_as(): the process-table row our views pin pages in, or -1 */
    unsigned pin_epoch; /* bumped by pin_as: a tag from an earlier slot unpins nothing */
    int fork_row;       /* between os.fork's prepare and its end: the fork row claimed, or -1 */
    int fork_adopted;   /* a forked child's window: pin_slot is its fork row, kept by close() */
    uint64_t fork_from; /* the owner word fork_row was claimed for (the parent's) */
    void *reg_prev, *reg_next; /* every live Window (the fork handlers walk them) */
} MemdWindow;

extern PyTypeObject MemdWindow_Type;

/* Raise "detached" (MemdValueError, or `fallback` if memd.errors is missing) for
 * a call through a closed window; returns NULL. */
PyObject *memd_raise_closed(PyObject *fallback);

/* "O&" converter: a Window argument to its base address (fails if closed). */
int memd_window_base(PyObject *obj, void *out_base);

/* "O&" converters for an offset, length, size, count, index or flag word from
 * Python, in place of "K" and "I", which wrap modulo 2**64 and 2**32 (2**64 + off
 * would alias off): an int that fits an unsigned long long (unsigned int), else
 * MemdValueError saying so. */
int memd_conv_u64(PyObject *obj, void *out);
int memd_conv_u32(PyObject *obj, void *out);

/* A handle's _bind_zone(mz_id, generation) arguments: 1 with *id and *gen to keep
 * (the memzone its object was found in: a tag mismatch then tells a free, unlisted,
 * from damage, still listed), 0 for a private window (no directory: the tags
 * decide), -1 with ValueError set. */
int memd_zone_binding(PyObject *window, PyObject *args, uint32_t *id, uint32_t *gen);

/* Base address of a Window taken from a fastcall argument, or NULL with an error set. */
static inline char *memd_base_of(PyObject *obj)
{
    if (Py_TYPE(obj) != &MemdWindow_Type) {
        PyErr_SetString(PyExc_TypeError, "expected a memd._ext.Window");
        return NULL;
    }
    char *base = ((MemdWindow *)obj)->base;
    if (base == NULL)
        memd_raise_closed(PyExc_ValueError);
    return base;
}

/* Check that [off, off+len) lies inside the window; sets ValueError if not. */
int memd_check_range(PyObject *window, uint64_t off, uint64_t len);

/* Check that [off, off+len) (inside the window) is mapped in this process, so that
 * touching it cannot kill the process; sets MemdValueError if not.  A system call:
 * for constructors and views, not per operation. */
int memd_check_mapped(PyObject *window, uint64_t off, uint64_t len);

/* 0 if the window watches no process (Window.watch) or it still runs; if it
 * has exited, raise memd.errors.PrimaryNotRunning (else ConnectionError), saying
 * "was stopped" if the config it mapped says SHUTDOWN (a clean stop), else "died",
 * and return -1.  One poll() system call when watching:
 * for wait loops, before each sleep. */
int memd_window_check_watch(PyObject *window);

/* memd.errors' exception class `name` (e.g. "CorruptionError"), or `fallback`
 * when memd.errors cannot be imported: a borrowed reference. */
PyObject *memd_error(const char *name, PyObject *fallback);

/* A C string of at most `max` bytes from shared memory as str: bytes that are not
 * UTF-8 (any process can write them) show as \xNN escapes instead of raising
 * UnicodeDecodeError; distinct damaged names stay distinct and can be asked for. */
static inline PyObject *memd_text(const char *s, size_t max)
{
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strnlen(s, max), "backslashreplace");
}

/* Raise OSError(-neg_errno, "<strerror> (from <where>)"); returns NULL. */
PyObject *memd_raise_errno(int neg_errno, const char *where);

/* How long a heap lock is waited for (heap_lock_wait; UINT64_MAX: no limit). */
uint64_t memd_py_lock_wait_limit(void);

/* bf_getbuffer / bf_releasebuffer halves for every exporter of window memory:
 * pin the pages under [off, off+len) in this process's row (Window.pin_as) and
 * keep the tag in view->internal; 0, or -1 with BufferError set when a page of
 * the range is no longer in use (given back: the view would fault).  unpin is
 * a no-op for a view made before pin_as changed (detach). */
int memd_view_pin(PyObject *window, uint64_t off, uint64_t len, Py_buffer *view);
void memd_view_unpin(PyObject *window, Py_buffer *view);

/* Zero-copy writable memoryview of [off, off+len) that keeps the window alive
 * and pins its pages while it lives. */
PyObject *memd_view(PyObject *window, uint64_t off, uint64_t len);

/* Each binding file adds its functions and constants to the module. */
int memd_py_init_config(PyObject *m);
int memd_py_init_heap(PyObject *m);
int memd_py_init_ring(PyObject *m);
int memd_py_init_mempool(PyObject *m);

/* --- registering: the one way each binding file adds what it binds ---------- */

/* A PyMethodDef table (NULL-terminated) as module functions. */
int memd_add_functions(PyObject *m, PyMethodDef *defs);

/* A type (readied here) under its short name (the tp_name after the last dot). */
int memd_add_type(PyObject *m, PyTypeObject *type);

/* Integer constants: MEMD_CONST for unsigned values, MEMD_SIGNED for negative
 * ones; a {NULL} entry ends the table. */
struct memd_const {
    const char *name;
    unsigned long long value;
    int is_signed;
};
#define MEMD_CONST(name, v)  {name, (unsigned long long)(v), 0}
#define MEMD_SIGNED(name, v) {name, (unsigned long long)(long long)(v), 1}
int memd_add_constants(PyObject *m, const struct memd_const *table);

/* Shared-layout facts for the module's LAYOUT dict: "type.field" -> (offset,
 * size) and "type" -> sizeof; a {NULL} entry ends the table. */
struct memd_field {
    const char *name;
    size_t offset;
    size_t size;
    int is_type;
};
#define MEMD_FIELD(type, field) \
    {#type "." #field, offsetof(struct type, field), sizeof(((struct type *)0)->field), 0}
#define MEMD_FLEX(type, field) \
    {#type "." #field, offsetof(struct type, field), 0, 0} /* []: size 0 */
#define MEMD_SIZEOF(type) {#type, 0, sizeof(struct type), 1}
int memd_add_layout(PyObject *m, const struct memd_field *table);

/* --- arguments ------------------------------------------------------------------ */

/* METH_FASTCALL | METH_KEYWORDS arguments into out[0..n) by position or by names[i]
 * (NULL: not given); the first `required` must be given.  -1 with TypeError set.
 * Inline: it is on the hot paths (malloc, free, enqueue with a timeout). */
static inline int memd_fast_args(const char *fn, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames, const char *const *names, Py_ssize_t n,
                                 Py_ssize_t required, PyObject **out)
{
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments", fn, n);
        return -1;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(name, names[j]) != 0)
            j++;
        if (j == n || out[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got %s argument '%U'", fn,
                         j == n ? "an unexpected keyword" : "multiple values for", name);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < required; i++)
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fn, names[i]);
            return -1;
        }
    return 0;
}

#endif /* MEMD_PY_H */
