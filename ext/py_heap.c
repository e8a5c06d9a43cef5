/* py_heap.c - Python bindings for heap.c (placeholder until heap lands). */
#include "memd_py.h"

int memd_py_init_heap(PyObject *m)
{
    (void)m;
    return 0;
}
