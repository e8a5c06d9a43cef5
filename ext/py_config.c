/*
 * py_config.c - bindings for config.c and lock.c.  C does the shared-memory
 * work and returns ints or tuples; memd/shm/config.py gives them names and types.
 */
#include "memd_py.h"

#include <errno.h>
#include <stdio.h>
#include <time.h>
#include <string.h>

#include "config.h"
#include "lock.h"

#define CFG(base) memd_cfg(base)

static PyObject *check_rc(long long rc, const char *where)
{
    if (rc < 0)
        return memd_raise_errno((int)rc, where);
    return PyLong_FromLongLong(rc);
}

static PyObject *py_config_format(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    const char *prefix;
    unsigned int flags, iova_mode;
    unsigned long long window_size, window_align, start_time;
    int pid;
    if (!PyArg_ParseTuple(args, "O&sO&O&O&O&iO&", memd_window_base, &base, &prefix, memd_conv_u32,
                          &flags, memd_conv_u32, &iova_mode, memd_conv_u64, &window_size,
                          memd_conv_u64, &window_align, &pid, memd_conv_u64, &start_time))
        return NULL;
    return check_rc(memd_config_format(base, prefix, flags, iova_mode, window_size, window_align,
                                       pid, start_time),
                    "config_format");
}

static PyObject *py_config_publish(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    memd_config_publish(base);
    Py_RETURN_NONE;
}

static PyObject *py_config_set_state(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int state;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u32, &state))
        return NULL;
    memd_config_set_state(base, state);
    Py_RETURN_NONE;
}

/* header(win) -> (magic, layout_version, state, primary_pid, flags, primary_start_time,
 *                 window_size, window_align, iova_mode, n_memseg_lists, mem_generation,
 *                 primary_base, prefix) */
static PyObject *py_header(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    const struct memd_config_header *h = &CFG(base)->hdr;
    uint64_t magic = memd_config_magic(base);
    return Py_BuildValue("(KIIiIKKKIIKKN)", (unsigned long long)magic, h->layout_version, h->state,
                         h->primary_pid, h->flags, (unsigned long long)h->primary_start_time,
                         (unsigned long long)h->window_size, (unsigned long long)h->window_align,
                         h->iova_mode, h->n_memseg_lists, (unsigned long long)h->mem_generation,
                         (unsigned long long)h->primary_base,
                         memd_text(h->prefix, sizeof(h->prefix)));
}

/* mem_generation(win) -> int: bumped on every page map/unmap (acquire load, pairs
 * with the release increment in bump_versions). */
static PyObject *py_mem_generation(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(memd_config_generation(base));
}

static PyObject *py_msl_init(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx, capacity;
    unsigned long long off, page_size;
    int socket;
    const char *dir;
    if (!PyArg_ParseTuple(args, "O&O&O&O&iO&s", memd_window_base, &base, memd_conv_u32, &idx,
                          memd_conv_u64, &off, memd_conv_u64, &page_size, &socket, memd_conv_u32,
                          &capacity, &dir))
        return NULL;
    return check_rc(memd_msl_init(base, idx, off, page_size, socket, capacity, dir), "msl_init");
}

/* msl(win, idx) -> (base_offset, page_size, socket_id, capacity, n_used, version, dir,
 *                   used_bitmap bytes) */
static PyObject *py_msl(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u32, &idx))
        return NULL;
    if (idx >= MEMD_MAX_MEMSEG_LISTS)
        return memd_raise_errno(-EINVAL, "msl");
    const struct memd_memseg_list *l = &CFG(base)->msls[idx];
    /* anyone may write the list: never read past its bitmap */
    uint32_t cap = l->capacity < MEMD_MAX_PAGES_PER_LIST ? l->capacity : MEMD_MAX_PAGES_PER_LIST;
    return Py_BuildValue("(KKiIIKNy#)", (unsigned long long)l->base_offset,
                         (unsigned long long)l->page_size, l->socket_id, cap, l->n_used,
                         (unsigned long long)l->version, memd_text(l->dir, sizeof(l->dir)),
                         (const char *)l->used_bitmap, (Py_ssize_t)((cap + 63) / 64 * 8));
}

/* segs(win, idx) -> list of (slot, iova, socket_id, flags) for used slots */
static PyObject *py_segs(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u32, &idx))
        return NULL;
    if (idx >= MEMD_MAX_MEMSEG_LISTS)
        return memd_raise_errno(-EINVAL, "segs");
    const struct memd_memseg_list *l = &CFG(base)->msls[idx];
    PyObject *out = PyList_New(0);
    uint32_t cap = l->capacity < MEMD_MAX_PAGES_PER_LIST ? l->capacity : MEMD_MAX_PAGES_PER_LIST;
    for (uint32_t s = 0; out && s < cap; s++) {
        if (!(l->segs[s].flags & MEMD_SEG_F_USED))
            continue;
        PyObject *t = Py_BuildValue("(IKiI)", s, (unsigned long long)l->segs[s].iova,
                                    l->segs[s].socket_id, l->segs[s].flags);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *py_msl_find_free(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx, n, from = 0;
    if (!PyArg_ParseTuple(args, "O&O&O&|O&", memd_window_base, &base, memd_conv_u32, &idx,
                          memd_conv_u32, &n, memd_conv_u32, &from))
        return NULL;
    return check_rc(memd_msl_find_free(base, idx, n, from), "msl_find_free");
}

static PyObject *py_msl_set_page(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx, slot, flags;
    unsigned long long iova;
    int socket;
    if (!PyArg_ParseTuple(args, "O&O&O&O&iO&", memd_window_base, &base, memd_conv_u32, &idx,
                          memd_conv_u32, &slot, memd_conv_u64, &iova, &socket, memd_conv_u32,
                          &flags))
        return NULL;
    return check_rc(memd_msl_set_page(base, idx, slot, iova, socket, flags), "msl_set_page");
}

static PyObject *py_msl_clear_page(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx, slot;
    if (!PyArg_ParseTuple(args, "O&O&O&", memd_window_base, &base, memd_conv_u32, &idx,
                          memd_conv_u32, &slot))
        return NULL;
    return check_rc(memd_msl_clear_page(base, idx, slot), "msl_clear_page");
}

static PyObject *py_iova_of(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned long long off;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u64, &off))
        return NULL;
    uint64_t iova = memd_iova_of(base, off);
    if (iova == MEMD_BAD_IOVA)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(iova);
}

static PyObject *py_iova_contig(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "O&O&O&", memd_window_base, &base, memd_conv_u64, &off,
                          memd_conv_u64, &len))
        return NULL;
    return PyBool_FromLong(memd_iova_contig(base, off, len));
}

/* --- bounded lock waits --- */

#define CONFIG_WAIT_SLICE_NS 100000000ull   /* how often a waiter looks for signals */
#define CONFIG_WAIT_MAX_NS   30000000000ull /* a structure change waits no longer */

/* Run `call` (an expression using `slice_` and `busy_`, giving an int) without the
 * GIL, again and again in slices while it says -ETIMEDOUT: signals are looked for
 * between slices (Ctrl-C ends the wait), and past the wait limit (heap_lock_wait's,
 * at most CONFIG_WAIT_MAX_NS) MemdError names the busy lock and its holder. */
#define BOUNDED(rc, base, what, call)                                    \
    do {                                                                 \
        uint64_t limit_ = memd_py_lock_wait_limit(), start_ = now_ns();  \
        if (limit_ > CONFIG_WAIT_MAX_NS)                                 \
            limit_ = CONFIG_WAIT_MAX_NS;                                 \
        for (;;) {                                                       \
            const struct memd_lock *busy_ = NULL;                        \
            uint64_t waited_ = now_ns() - start_;                        \
            uint64_t slice_ = waited_ < limit_ ? limit_ - waited_ : 0;   \
            if (slice_ > CONFIG_WAIT_SLICE_NS)                           \
                slice_ = CONFIG_WAIT_SLICE_NS;                           \
            Py_BEGIN_ALLOW_THREADS                                       \
                rc = (call);                                             \
            Py_END_ALLOW_THREADS                                         \
            if (rc != -ETIMEDOUT && rc != -EAGAIN)                       \
                break;                                                   \
            if (PyErr_CheckSignals() < 0)                                \
                return NULL;                                             \
            if (rc == -ETIMEDOUT && now_ns() - start_ >= limit_)         \
                return raise_busy(base, busy_, what, now_ns() - start_); \
        }                                                                \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* MemdError: `what` gave up waiting for lock l. */
static PyObject *raise_busy(char *base, const struct memd_lock *l, const char *what,
                            uint64_t waited_ns)
{
    const struct memd_config *c = CFG(base);
    char name[48] = "a lock";
    if (l == &c->config_lock)
        snprintf(name, sizeof(name), "the config lock");
    else if (l >= &c->heaps[0].lock && l <= &c->heaps[MEMD_MAX_HEAPS - 1].lock)
        snprintf(
            name, sizeof(name), "heap %d's lock",
            (int)((size_t)((const char *)l - (const char *)c->heaps) / sizeof(struct memd_heap)));
    PyErr_Format(memd_error("MemdError", PyExc_RuntimeError),
                 "%s: %s is busy: held by pid %d for over %d ms (stopped in a debugger?)", what,
                 name, l ? (int)l->owner_pid : 0, (int)(waited_ns / 1000000));
    return NULL;
}

/* --- memzones --- */

static PyObject *py_memzone_reserve(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    const char *name;
    unsigned long long len, align, bound;
    unsigned int heap_idx, flags;
    int any_page_size, pid, rc;
    if (!PyArg_ParseTuple(args, "O&sO&O&O&pO&O&i", memd_window_base, &base, &name, memd_conv_u64,
                          &len, memd_conv_u32, &heap_idx, memd_conv_u32, &flags, &any_page_size,
                          memd_conv_u64, &align, memd_conv_u64, &bound, &pid))
        return NULL;
    BOUNDED(rc, base, "memzone_reserve",
            memd_memzone_reserve(base, name, len, heap_idx, flags, any_page_size, align, bound, pid,
                                 slice_, &busy_));
    return check_rc(rc, "memzone_reserve");
}

/* memzone_page_sizes(flags) -> the page sizes (bytes, ascending) the flags ask for. */
static PyObject *py_memzone_page_sizes(PyObject *Py_UNUSED(m), PyObject *arg)
{
    unsigned int flags;
    if (!memd_conv_u32(arg, &flags))
        return NULL;
    uint64_t mask = memd_memzone_page_mask(flags);
    PyObject *out = PyList_New(0);
    for (unsigned k = 0; out && k < 64; k++)
        if ((mask >> k) & 1) {
            PyObject *v = PyLong_FromUnsignedLongLong(1ull << k);
            if (v == NULL || PyList_Append(out, v) < 0)
                Py_CLEAR(out);
            Py_XDECREF(v);
        }
    return out;
}

static PyObject *py_memzone_lookup(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    const char *name;
    int rc;
    if (!PyArg_ParseTuple(args, "O&s", memd_window_base, &base, &name))
        return NULL;
    rc = memd_memzone_lookup(base, name); /* no lock: never waits */
    return check_rc(rc, "memzone_lookup");
}

static PyObject *py_memzone_free(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int id, generation = 0;
    int rc;
    if (!PyArg_ParseTuple(args, "O&O&|O&", memd_window_base, &base, memd_conv_u32, &id,
                          memd_conv_u32, &generation))
        return NULL;
    BOUNDED(rc, base, "memzone_free", memd_memzone_free(base, id, generation, slice_, &busy_));
    return check_rc(rc, "memzone_free");
}

/* memzone(win, id) -> None if free, else (id, name, offset, iova, length, page_size,
 *                     socket_id, flags, owner_pid, generation) */
static PyObject *zone_tuple(uint32_t id, const struct memd_memzone *z)
{
    return Py_BuildValue("(INKKKKiIiI)", id, memd_text(z->name, sizeof(z->name)),
                         (unsigned long long)z->offset, (unsigned long long)z->iova,
                         (unsigned long long)z->length, (unsigned long long)z->page_size,
                         z->socket_id, z->flags, z->owner_pid, z->generation);
}

static PyObject *py_memzone(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int id;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u32, &id))
        return NULL;
    if (id >= MEMD_MAX_MEMZONES)
        return memd_raise_errno(-EINVAL, "memzone");
    const struct memd_memzone *z = &CFG(base)->memzones[id];
    if (z->name[0] == '\0')
        Py_RETURN_NONE;
    return zone_tuple(id, z);
}

/* memzones(win) -> list of (id, name, offset, iova, length, page_size, socket, flags, pid) */
static PyObject *py_memzones(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 0; out && i < MEMD_MAX_MEMZONES; i++) {
        const struct memd_memzone *z = &CFG(base)->memzones[i];
        if (z->name[0] == '\0')
            continue;
        PyObject *row = zone_tuple(i, z);
        if (row == NULL || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(row);
    }
    return out;
}

/* --- processes --- */

static PyObject *py_proc_register(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    int pid, want_slot = -1;
    unsigned long long start_time;
    unsigned int state;
    const char *comm;
    if (!PyArg_ParseTuple(args, "O&iO&O&s|i", memd_window_base, &base, &pid, memd_conv_u64,
                          &start_time, memd_conv_u32, &state, &comm, &want_slot))
        return NULL;
    return check_rc(memd_proc_register(base, pid, start_time, state, comm, want_slot),
                    "proc_register");
}

static PyObject *py_proc_unregister(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int slot;
    int pid;
    if (!PyArg_ParseTuple(args, "O&O&i", memd_window_base, &base, memd_conv_u32, &slot, &pid))
        return NULL;
    return check_rc(memd_proc_unregister(base, slot, pid), "proc_unregister");
}

/* procs(win) -> list of (slot, pid, state, start_time, attach_ns, mem_generation, comm) */
static PyObject *py_procs(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 0; out && i < MEMD_MAX_PROCS; i++) {
        const struct memd_process *p = &CFG(base)->procs[i];
        if (p->pid == 0)
            continue;
        PyObject *t =
            Py_BuildValue("(IiIKKKN)", i, p->pid, p->state, (unsigned long long)p->start_time,
                          (unsigned long long)p->attach_ns, (unsigned long long)p->mem_generation,
                          memd_text(p->comm, sizeof(p->comm)));
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(t);
    }
    return out;
}

/* --- named objects --- */

static PyObject *py_object_add(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    const char *name;
    unsigned int type, mz;
    unsigned long long off;
    int pid;
    if (!PyArg_ParseTuple(args, "O&sO&O&O&i", memd_window_base, &base, &name, memd_conv_u32, &type,
                          memd_conv_u32, &mz, memd_conv_u64, &off, &pid))
        return NULL;
    int rc;
    BOUNDED(rc, base, "object_add",
            memd_object_add(base, name, type, mz, off, pid, slice_, &busy_));
    return check_rc(rc, "object_add");
}

static PyObject *py_object_lookup(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    const char *name;
    unsigned int type;
    if (!PyArg_ParseTuple(args, "O&sO&", memd_window_base, &base, &name, memd_conv_u32, &type))
        return NULL;
    int idx = memd_object_lookup(base, name, type);
    if (idx < 0)
        return memd_raise_errno(idx, "object_lookup");
    const struct memd_object *o = &CFG(base)->objects[idx];
    return Py_BuildValue("(iKI)", idx, (unsigned long long)o->offset, o->memzone_id);
}

static PyObject *py_object_remove(PyObject *Py_UNUSED(m), PyObject *args)
{
    char *base;
    unsigned int idx;
    if (!PyArg_ParseTuple(args, "O&O&", memd_window_base, &base, memd_conv_u32, &idx))
        return NULL;
    int rc;
    BOUNDED(rc, base, "object_remove", memd_object_remove(base, idx, slice_, &busy_));
    return check_rc(rc, "object_remove");
}

/* objects(win) -> list of (idx, name, type, offset, memzone_id, creator_pid) */
static PyObject *py_objects(PyObject *Py_UNUSED(m), PyObject *arg)
{
    char *base = memd_base_of(arg);
    if (base == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    for (uint32_t i = 0; out && i < MEMD_MAX_OBJECTS; i++) {
        const struct memd_object *o = &CFG(base)->objects[i];
        if (o->type == MEMD_OBJ_FREE)
            continue;
        PyObject *t = Py_BuildValue("(INIKIi)", i, memd_text(o->name, sizeof(o->name)), o->type,
                                    (unsigned long long)o->offset, o->memzone_id, o->creator_pid);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyMethodDef config_functions[] = {
    {"config_format", py_config_format, METH_VARARGS,
     "config_format(win, prefix, flags, iova_mode, window_size, window_align, pid, start_time)"},
    {"config_publish", py_config_publish, METH_O, "state = READY, then magic (release)."},
    {"config_set_state", py_config_set_state, METH_VARARGS, "config_set_state(win, state)"},
    {"header", py_header, METH_O, "header(win) -> tuple (see memd/shm/config.py Header)"},
    {"mem_generation", py_mem_generation, METH_O, "mem_generation(win) -> int"},
    {"msl_init", py_msl_init, METH_VARARGS,
     "msl_init(win, idx, base_offset, page_size, socket_id, capacity, dir)"},
    {"msl", py_msl, METH_VARARGS, "msl(win, idx) -> tuple (see memd/shm/config.py)"},
    {"segs", py_segs, METH_VARARGS, "segs(win, idx) -> [(slot, iova, socket, flags)]"},
    {"msl_find_free", py_msl_find_free, METH_VARARGS, "msl_find_free(win, idx, n, from=0)"},
    {"msl_set_page", py_msl_set_page, METH_VARARGS,
     "msl_set_page(win, idx, slot, iova, socket_id, flags)"},
    {"msl_clear_page", py_msl_clear_page, METH_VARARGS, "msl_clear_page(win, idx, slot)"},
    {"iova_of", py_iova_of, METH_VARARGS, "iova_of(win, offset) -> int | None"},
    {"iova_contig", py_iova_contig, METH_VARARGS, "iova_contig(win, offset, length) -> bool"},
    {"memzone_reserve", py_memzone_reserve, METH_VARARGS,
     "memzone_reserve(win, name, len, heap, flags, any_page_size, align, bound, pid) -> id"},
    {"memzone_page_sizes", py_memzone_page_sizes, METH_O,
     "memzone_page_sizes(flags) -> [bytes]: the page sizes the flags ask for"},
    {"memzone_lookup", py_memzone_lookup, METH_VARARGS, "memzone_lookup(win, name) -> id"},
    {"memzone_free", py_memzone_free, METH_VARARGS, "memzone_free(win, id) -> heap index"},
    {"memzone", py_memzone, METH_VARARGS, "memzone(win, id) -> tuple | None"},
    {"memzones", py_memzones, METH_O, "memzones(win) -> [tuple]"},
    {"proc_register", py_proc_register, METH_VARARGS,
     "proc_register(win, pid, start_time, state, comm, want_slot=-1) -> slot"},
    {"proc_unregister", py_proc_unregister, METH_VARARGS, "proc_unregister(win, slot, pid)"},
    {"procs", py_procs, METH_O, "procs(win) -> [tuple]"},
    {"object_add", py_object_add, METH_VARARGS,
     "object_add(win, name, type, memzone_id, offset, pid) -> idx"},
    {"object_lookup", py_object_lookup, METH_VARARGS,
     "object_lookup(win, name, type) -> (idx, offset, memzone_id)"},
    {"object_remove", py_object_remove, METH_VARARGS, "object_remove(win, idx)"},
    {"objects", py_objects, METH_O, "objects(win) -> [tuple]"},
    {NULL, NULL, 0, NULL},
};

static const struct memd_field config_layout[] = {
    MEMD_FIELD(memd_config_header, magic),
    MEMD_FIELD(memd_config_header, layout_version),
    MEMD_FIELD(memd_config_header, state),
    MEMD_FIELD(memd_config_header, primary_pid),
    MEMD_FIELD(memd_config_header, mem_generation),
    MEMD_FIELD(memd_config, heaps),
    MEMD_FIELD(memd_config, procs),
    MEMD_FIELD(memd_config, objects),
    MEMD_FIELD(memd_object, offset),
    MEMD_FIELD(memd_config, memzones),
    MEMD_FIELD(memd_memzone, generation),
    MEMD_FIELD(memd_memseg_list, capacity),
    MEMD_FIELD(memd_config, msls),
    MEMD_FIELD(memd_heap, lock),
    MEMD_FIELD(memd_lock, recoveries),
    MEMD_FIELD(memd_config, heap_journals),
    MEMD_FIELD(memd_heap, last_elem),
    MEMD_FIELD(memd_heap, total_size),
    MEMD_FIELD(memd_heap, free_head),
    MEMD_FIELD(memd_heap, alloc_count),
    MEMD_FIELD(memd_heap, alloc_serial),
    MEMD_FIELD(memd_heap_elem, flags),
    MEMD_FIELD(memd_heap_elem, next),
    MEMD_FIELD(memd_heap_elem, prev),
    MEMD_FIELD(memd_heap_elem, u.free.next),
    MEMD_FIELD(memd_heap_elem, u.free.dirty_lo),
    MEMD_FIELD(memd_heap_elem, u.busy.owner_pid),
    MEMD_FIELD(memd_heap_elem, u.busy.serial),
    MEMD_FIELD(memd_heap_journal, count),
    MEMD_FIELD(memd_heap_journal, overflow),
    MEMD_FIELD(memd_heap_journal, e),
    MEMD_SIZEOF(memd_config_header),
    MEMD_SIZEOF(memd_config),
    MEMD_SIZEOF(memd_memseg_list),
    MEMD_SIZEOF(memd_heap),
    MEMD_SIZEOF(memd_process),
    MEMD_SIZEOF(memd_object),
    MEMD_SIZEOF(memd_memzone),
    MEMD_SIZEOF(memd_lock),
    MEMD_SIZEOF(memd_heap_journal),
    MEMD_SIZEOF(memd_heap_journal_entry),
    {NULL},
};

static const struct memd_const config_constants[] = {
    MEMD_CONST("CONFIG_MAGIC", MEMD_CONFIG_MAGIC),
    MEMD_CONST("LAYOUT_VERSION", MEMD_LAYOUT_VERSION),
    MEMD_CONST("CONFIG_SIZE", MEMD_CONFIG_SIZE),
    MEMD_CONST("NAMESIZE", MEMD_NAMESIZE),
    MEMD_CONST("MAX_MEMSEG_LISTS", MEMD_MAX_MEMSEG_LISTS),
    MEMD_CONST("MAX_PAGES_PER_LIST", MEMD_MAX_PAGES_PER_LIST),
    MEMD_CONST("MAX_HEAPS", MEMD_MAX_HEAPS),
    MEMD_CONST("MAX_PROCS", MEMD_MAX_PROCS),
    MEMD_CONST("MAX_OBJECTS", MEMD_MAX_OBJECTS),
    MEMD_CONST("MAX_MEMZONES", MEMD_MAX_MEMZONES),
    MEMD_CONST("PATH_SIZE", MEMD_PATH_SIZE),
    MEMD_CONST("BAD_IOVA", MEMD_BAD_IOVA),
    MEMD_CONST("STATE_INIT", MEMD_STATE_INIT),
    MEMD_CONST("STATE_READY", MEMD_STATE_READY),
    MEMD_CONST("STATE_SHUTDOWN", MEMD_STATE_SHUTDOWN),
    MEMD_CONST("IOVA_PA", MEMD_IOVA_PA),
    MEMD_CONST("IOVA_VA", MEMD_IOVA_VA),
    MEMD_CONST("CFG_F_NO_HUGE", MEMD_CFG_F_NO_HUGE),
    MEMD_CONST("CFG_F_LEGACY", MEMD_CFG_F_LEGACY),
    MEMD_CONST("CFG_F_HUGE_UNLINK", MEMD_CFG_F_HUGE_UNLINK),
    MEMD_CONST("CFG_F_SINGLE_FILE", MEMD_CFG_F_SINGLE_FILE),
    MEMD_CONST("CFG_F_IN_MEMORY", MEMD_CFG_F_IN_MEMORY),
    MEMD_CONST("SEG_F_USED", MEMD_SEG_F_USED),
    MEMD_CONST("SEG_F_PREALLOC", MEMD_SEG_F_PREALLOC),
    MEMD_CONST("PROC_PRIMARY", MEMD_PROC_PRIMARY),
    MEMD_CONST("PROC_SECONDARY", MEMD_PROC_SECONDARY),
    MEMD_SIGNED("SOCKET_ID_ANY", MEMD_SOCKET_ID_ANY),
    MEMD_CONST("OBJ_RING", MEMD_OBJ_RING),
    MEMD_CONST("OBJ_MEMPOOL", MEMD_OBJ_MEMPOOL),
    MEMD_CONST("MEMZONE_F_IOVA_CONTIG", MEMD_MEMZONE_F_IOVA_CONTIG),
    MEMD_CONST("MAX_ALIGN", MEMD_MAX_ALIGN),
    MEMD_CONST("MEMZONE_F_2MB", MEMD_MEMZONE_F_2MB),
    MEMD_CONST("MEMZONE_F_1GB", MEMD_MEMZONE_F_1GB),
    MEMD_CONST("MEMZONE_F_16MB", MEMD_MEMZONE_F_16MB),
    MEMD_CONST("MEMZONE_F_16GB", MEMD_MEMZONE_F_16GB),
    MEMD_CONST("MEMZONE_F_256KB", MEMD_MEMZONE_F_256KB),
    MEMD_CONST("MEMZONE_F_256MB", MEMD_MEMZONE_F_256MB),
    MEMD_CONST("MEMZONE_F_512MB", MEMD_MEMZONE_F_512MB),
    MEMD_CONST("MEMZONE_F_4GB", MEMD_MEMZONE_F_4GB),
    MEMD_CONST("MEMZONE_F_SIZE_HINT_ONLY", MEMD_MEMZONE_F_SIZE_HINT_ONLY),
    MEMD_CONST("MEMZONE_F_PAGE_SIZES", MEMD_MEMZONE_F_PAGE_SIZES),
    MEMD_CONST("MEMZONE_F_ALL", MEMD_MEMZONE_F_ALL),
    {NULL},
};

int memd_py_init_config(PyObject *m)
{
    return memd_add_functions(m, config_functions) < 0 || memd_add_layout(m, config_layout) < 0 ||
                   memd_add_constants(m, config_constants) < 0
               ? -1
               : 0;
}
