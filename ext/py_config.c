/* py_config.c - Python bindings for config.c (in progress). */
#include "memd_py.h"

int memd_py_init_config(PyObject *m)
{
    (void)m;
    return 0;
}
