/* py_heap.c - TEMPORARY minimal heap bindings until the heap branch lands. */
#include "memd_py.h"

#include "heap.h"

static struct memd_heap *heap_at(PyObject *args, char **base, unsigned long long *a,
                                 unsigned long long *b)
{
    unsigned int idx;
    if (!PyArg_ParseTuple(args, "O&I|KK", memd_window_base, base, &idx, a, b))
        return NULL;
    return &((struct memd_config *)*base)->heaps[idx % MEMD_MAX_HEAPS];
}

static PyObject *py_heap_lock(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned long long a = 0, b = 0;
    struct memd_heap *h = heap_at(args, &base, &a, &b);
    int rc;
    if (h == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = memd_heap_lock(h);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == 1);
}

static PyObject *py_heap_unlock(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned long long a = 0, b = 0;
    struct memd_heap *h = heap_at(args, &base, &a, &b);
    if (h == NULL)
        return NULL;
    memd_heap_unlock(h);
    Py_RETURN_NONE;
}

static PyObject *py_heap_add_memory(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned long long off = 0, len = 0;
    struct memd_heap *h = heap_at(args, &base, &off, &len);
    if (h == NULL)
        return NULL;
    int rc = memd_heap_add_memory(base, h, off, len);
    if (rc < 0)
        return memd_raise_errno(rc, "heap_add_memory");
    Py_RETURN_NONE;
}

static PyMethodDef heap_functions[] = {
    {"heap_lock", py_heap_lock, METH_VARARGS, "heap_lock(win, idx) -> recovered"},
    {"heap_unlock", py_heap_unlock, METH_VARARGS, "heap_unlock(win, idx)"},
    {"heap_add_memory", py_heap_add_memory, METH_VARARGS, "heap_add_memory(win, idx, off, len)"},
    {NULL, NULL, 0, NULL},
};

int memd_py_init_heap(PyObject *m)
{
    return memd_add_functions(m, heap_functions);
}
