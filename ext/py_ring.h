/*
 * py_ring.h - helpers that py_ring.c shares with the other binding files:
 * fastcall argument parsing, timeouts, and uint64 value conversion.
 */
#ifndef MEMD_PY_RING_H
#define MEMD_PY_RING_H

#include "memd_py.h"
#include "ring.h"

/* Values to enqueue: borrowed from a uint64 buffer, or converted from a
 * sequence of ints into `stack` (small) or `heap`. */
struct memd_values {
    uint64_t *v;
    Py_ssize_t n;
    int have_view;
    Py_buffer view;
    uint64_t *heap;
    uint64_t stack[64];
};

/* Fill vs from a list/tuple/sequence of ints or a uint64 buffer.  -1 with
 * TypeError (bad type), OverflowError (outside 0..2**64-1). */
int memd_values_get(PyObject *o, struct memd_values *vs);
void memd_values_release(struct memd_values *vs);

/* One int (anything with __index__) to uint64; OverflowError outside range. */
int memd_u64_from_object(PyObject *o, uint64_t *out);

/* Get a C-contiguous buffer of 8-byte unsigned ints ('Q' or 'L'); TypeError if
 * the format is anything else. */
int memd_u64_buffer(PyObject *o, Py_buffer *view, int writable);

/* timeout argument: absent -> 0 (don't wait), None -> UINT64_MAX (forever),
 * seconds (>= 0) -> nanoseconds.  TypeError for a non-number, MemdValueError if
 * negative or NaN. */
int memd_parse_timeout(PyObject *o, uint64_t *ns);

/* The memd._ext.Ring type; the ring a Ring object points at (NULL + error if
 * it is not a Ring, its window is closed, or the ring was freed: StaleHandle). */
PyTypeObject *memd_ring_type(void);
PyObject *memd_ring_ptr_of(PyObject *ring, struct memd_ring **out);

#endif
