/* py_mempool.c - Python bindings for mempool.c (placeholder until mempool lands). */
#include "memd_py.h"

int memd_py_init_mempool(PyObject *m)
{
    (void)m;
    return 0;
}
