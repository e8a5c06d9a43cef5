/* py_ring.c - Python bindings for ring.c (placeholder until ring lands). */
#include "memd_py.h"

int memd_py_init_ring(PyObject *m)
{
    (void)m;
    return 0;
}
