"""Pickling memd's objects as references, so they travel through ``multiprocessing``
queues, ``concurrent.futures`` and ``pickle``.

A pickled ``Memzone``, ``Ring``, ``Mempool``, ``Block`` or ``MempoolObject`` holds no
bytes of shared memory: only which instance (prefix, runtime dir, and the primary's
pid and start time), which object (a memzone's id and name, a ring's or pool's
name, a block's heap and offset, an object's handle) and what tells this object from
one made later in its place (the generation of the memzone it lives in; a block's
allocation serial, size and owner; an object's getter).  Unpickling yields the
object of the receiving process's attachment to that instance -- attaching on
first use if the process has none (``memd_client.attach(prefix, runtime_dir)``, one
attachment per instance per process, detached at exit) -- and raises
:class:`memd.errors.StaleReference` if the object is gone (freed, re-created, or the
instance restarted).

Registered with :mod:`copyreg` when :mod:`memd.shm.memory` is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from memd import _ext
from memd.errors import CorruptionError, MemdValueError, StaleReference
from memd.shm.config import header
from memd.shm.mempool import Mempool
from memd.shm.ring import Ring

if TYPE_CHECKING:
    from memd.shm.memory import Memory, Memzone

__all__ = ["register"]

# Every Memory of this process (the primary, attachments): a reference's owner is
# found by its window, and an unpickled reference goes to the one of its instance.
_memories: weakref.WeakSet[Memory] = weakref.WeakSet()
# Attachments made by unpickling, kept alive (and detached at exit, as any other).
_auto: dict[tuple[str, Path], Memory] = {}
_auto_lock = threading.Lock()


def _offset(name: str) -> int:
    v = _ext.LAYOUT[name]
    assert isinstance(v, tuple)
    return v[0]


def _sizeof(name: str) -> int:
    v = _ext.LAYOUT[name]
    assert isinstance(v, int)
    return v


_MZ_BASE = _offset("memd_config.memzones")
_MZ_SIZE = _sizeof("memd_memzone")
_MZ_GENERATION = _offset("memd_memzone.generation")
_OBJHDR = _sizeof("memd_mempool_objhdr")
_OBJ_COOKIE = _offset("memd_mempool_objhdr.cookie")
_OBJ_OWNER = _offset("memd_mempool_objhdr.owner_pid")


class _Laid(Protocol):
    """An object laid out in a memzone (a ring, a mempool)."""

    @property
    def memsize(self) -> int: ...

    def _bind_zone(self, mz_id: int, generation: int) -> None: ...


T = TypeVar("T", bound=_Laid)

#: (prefix, runtime dir, (primary pid, primary start time))
Instance = tuple[str, str, tuple[int, int]]


def register(mem: Memory) -> None:
    """Make `mem` the owner of references to its objects (Memory.__init__ calls it)."""
    _memories.add(mem)


def _u64(win: _ext.Window, off: int, size: int = 8) -> int:
    return int.from_bytes(win.view(off, size), "little")


def _generation(win: _ext.Window, zone_id: int) -> int:
    """The memzone slot's reserve count (memd_memzone.generation): it changes when
    the zone is freed and the slot reserved again."""
    return _u64(win, _MZ_BASE + zone_id * _MZ_SIZE + _MZ_GENERATION, 4)


def _live(mem: Memory) -> bool:
    if getattr(mem, "_pid", os.getpid()) != os.getpid():
        return False  # an attachment inherited through fork belongs to the parent
    if mem.window.closed:  # detached
        return False
    alive = getattr(mem, "primary_alive", None)  # a restarted instance needs a new one
    return alive is None or bool(alive())


def _instance(mem: Memory) -> Instance:
    """`mem`'s instance (constant for its life: kept on it after the first call)."""
    inst: Instance | None = mem.__dict__.get("_ref_instance")
    if inst is None:
        h = header(mem.window)  # raises MemdValueError after detach
        # resolved: a reference works from another cwd, and names one dir one way
        rundir = os.path.realpath(mem.rundir)
        inst = (mem.prefix, rundir, (h.primary_pid, h.primary_start_time))
        mem.__dict__["_ref_instance"] = inst
    return inst


def _owner(win: _ext.Window, what: str) -> tuple[Memory, Instance]:
    """The Memory whose window `win` is, and its instance, for pickling."""
    if win.closed:
        raise MemdValueError(f"cannot pickle this {what}: its attachment was detached")
    for mem in list(_memories):
        if mem.window is win:
            return mem, _instance(mem)
    raise TypeError(
        f"cannot pickle this {what}: it does not come from a memd attachment "
        "(memd_client.attach) or a memd.Primary"
    )


# (prefix, runtime dir) -> this process's Memory for it, as last found (weakly: the
# user's attachments live as long as the user keeps them)
_found: weakref.WeakValueDictionary[tuple[str, str], Memory] = weakref.WeakValueDictionary()


@atexit.register
def _drop_auto() -> None:
    # After memd_client's own atexit detached them (atexit runs last-registered first),
    # while the modules their __del__ needs are still there.
    _auto.clear()


def _memory(inst: Instance) -> Memory:
    """This process's Memory for `inst`, attaching on first use."""
    prefix, rundir, ident = inst
    mem = _found.get((prefix, rundir))
    if mem is None or not _live(mem):
        path = Path(os.path.realpath(rundir))  # /var/run/x and /run/x are one instance
        with _auto_lock:
            mem = next(
                (
                    m
                    for m in list(_memories)
                    if m.prefix == prefix and Path(os.path.realpath(m.rundir)) == path and _live(m)
                ),
                None,
            )
            if mem is None:
                import memd_client  # a reference may reach a process that never attached

                mem = memd_client.attach(prefix, path)
                _auto[(prefix, path)] = mem
            _found[(prefix, rundir)] = mem
    if _instance(mem)[2] != tuple(ident):
        raise StaleReference(
            f"the memd instance {prefix!r} in {rundir} was restarted since this reference "
            "was pickled: its objects are gone"
        )
    return mem


# --- memzones -------------------------------------------------------------------------


def reduce_memzone(mz: Memzone) -> tuple[Any, tuple[Any, ...]]:
    """copyreg reducer for Memzone."""
    mem, inst = _owner(mz._mem.window, "Memzone")
    return _memzone, (inst, mz.id, mz.name, mz.offset, _generation(mem.window, mz.id))


def _memzone(inst: Instance, zone_id: int, name: str, offset: int, generation: int) -> Memzone:
    mem = _memory(inst)
    t = _ext.memzone(mem.window, zone_id)
    gen = _generation(mem.window, zone_id)
    if t is None or t[1] != name or t[2] != offset or gen != generation:
        raise StaleReference(f"memzone {name!r} was freed since this reference was pickled")
    return mem._zone(zone_id)


# --- rings and mempools -----------------------------------------------------------------
#
# A listed ring or pool lives in its own memzone ("RG_"/"MP_" + name), freed with it:
# while that memzone's generation is unchanged, the object is the one referred to.  So a
# reference carries the zone's id and generation, and checking it is one read, no lock.

# (id(window), offset) -> (name, zone id, generation) that pickling looked up: reused while
# the name and the zone's generation still match (then it is that object, whichever window)
_listing: dict[tuple[int, int], tuple[str, int, int]] = {}


def _reduce_listed(obj: Ring[Any] | _ext.Mempool, kind: int, what: str) -> tuple[Any, ...]:
    mem, inst = _owner(obj.window, what)
    name = obj.name
    seen = _listing.get((id(obj.window), obj.offset))
    if seen is not None and seen[0] == name and _generation(obj.window, seen[1]) == seen[2]:
        _name, zone_id, generation = seen
    else:
        listed = -1
        with contextlib.suppress(OSError):
            if name:
                _idx, listed, zone_id = _ext.object_lookup(mem.window, name, kind)
        if listed != obj.offset:
            raise TypeError(
                f"cannot pickle {what} {obj.name!r}: only a {what.lower()} listed by name "
                f"({what.lower()}_create) pickles, and this one is not (freed, made at an "
                "offset, or the name in its header was overwritten)"
            )
        generation = _generation(mem.window, zone_id)
        _listing[(id(obj.window), obj.offset)] = (name, zone_id, generation)
    return inst, name, obj.offset, zone_id, generation


def _rebuild(
    inst: Instance,
    name: str,
    offset: int,
    zone_id: int,
    generation: int,
    what: str,
    build: Callable[[Memory, int], T],
) -> T:
    """The object at `offset` of this process's attachment, if its memzone is still
    the reservation the reference names; bounded by that zone, as open_listed does."""
    mem = _memory(inst)
    win = mem.window
    zone = _ext.memzone(win, zone_id)
    if zone is None or _generation(win, zone_id) != generation:
        raise StaleReference(f"{what} {name!r} was freed since this reference was pickled")
    obj = build(mem, offset)
    if not zone[2] <= offset <= offset + obj.memsize <= zone[2] + zone[4]:
        raise CorruptionError(
            f"{what} {name!r}: its header claims {obj.memsize} bytes, past the memzone it "
            "lives in (damaged shared memory); free it and create it again"
        )
    obj._bind_zone(zone_id, generation)  # a tag mismatch while listed there is damage
    return obj


def reduce_ring(ring: Ring[Any]) -> tuple[Any, tuple[Any, ...]]:
    """copyreg reducer for Ring."""
    return _ring, _reduce_listed(ring, _ext.OBJ_RING, "Ring")


def _ring(inst: Instance, name: str, offset: int, zone_id: int, generation: int) -> Ring[Any]:
    return _rebuild(
        inst, name, offset, zone_id, generation, "ring", lambda m, off: Ring(m.window, off)
    )


def reduce_mempool(pool: Mempool) -> tuple[Any, tuple[Any, ...]]:
    """copyreg reducer for Mempool."""
    return _mempool, _reduce_listed(pool, _ext.OBJ_MEMPOOL, "Mempool")


def _mempool(inst: Instance, name: str, offset: int, zone_id: int, generation: int) -> Mempool:
    return _rebuild(
        inst,
        name,
        offset,
        zone_id,
        generation,
        "mempool",
        lambda m, off: Mempool(m.window, off, m.proc_slot),
    )


# --- blocks and pool objects ----------------------------------------------------------------


def reduce_block(blk: _ext.Block) -> tuple[Any, tuple[Any, ...]]:
    """copyreg reducer for Block: the block's heap, offset, size, allocating pid and
    serial (the heap's allocation serial it got: a later block there has another)."""
    _mem, inst = _owner(blk.window, "Block")
    owner = blk.owner_pid  # None once freed, also through another handle
    if blk.freed or owner is None:
        raise MemdValueError(f"cannot pickle {blk!r}: it was freed")
    return _block, (inst, blk.heap, blk.offset, blk.size, owner, blk.serial)


def _block(
    inst: Instance, heap: int, offset: int, size: int, owner: int, serial: int
) -> _ext.Block:
    mem = _memory(inst)
    try:
        blk = _ext.heap_block(mem.window, heap, offset, owner=mem)
    except OSError:
        blk = None
    if blk is None or blk.serial != serial or blk.size != size or blk.owner_pid != owner:
        raise StaleReference(
            f"the block at offset {offset:#x} was freed since this reference was pickled"
        )
    return blk


def _getter(win: _ext.Window, handle: int) -> int | None:
    """Pid that got pool object `handle`, or None if it is in the pool."""
    hdr = handle - _OBJHDR
    if _u64(win, hdr + _OBJ_COOKIE) != _ext.MEMPOOL_HDR_COOKIE_BUSY:
        return None
    pid = _u64(win, hdr + _OBJ_OWNER, 4)
    return pid - (1 << 32) if pid >= 1 << 31 else pid


def reduce_mempool_object(obj: _ext.MempoolObject) -> tuple[Any, tuple[Any, ...]]:
    """copyreg reducer for MempoolObject: its pool, handle and getter."""
    pool = obj.pool
    pool_args = _reduce_listed(pool, _ext.OBJ_MEMPOOL, "Mempool")
    getter = _getter(pool.window, obj.handle)
    if getter is None:
        raise MemdValueError(f"cannot pickle {obj!r}: it is back in its pool")
    return _mempool_object, (pool_args, obj.handle, getter)


def _mempool_object(pool_args: tuple[Any, ...], handle: int, getter: int) -> _ext.MempoolObject:
    pool = _mempool(*pool_args)
    obj = pool.obj(handle)
    if _getter(pool.window, handle) != getter:
        raise StaleReference(
            f"mempool {pool.name!r} object {handle} was put back since this reference was pickled"
        )
    return obj
