"""The shared directory of named objects (rings, mempools): each lives in a
memzone `<prefix><name>` and is listed by name, kind and offset so that any
process finds it.  RingMixin and MempoolMixin share these steps."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from memd import _ext
from memd.errors import CorruptionError, MemdExistsError, MemdKeyError, MemdValueError, translate
from memd.shm.config import process_alive

log = logging.getLogger("memd")

T = TypeVar("T")
KIND_NAMES = {_ext.OBJ_RING: "ring", _ext.OBJ_MEMPOOL: "mempool"}


def _lookup(window: _ext.Window, name: str, kind: int, what: str) -> tuple[int, int, int]:
    try:
        return _ext.object_lookup(window, name, kind)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise MemdKeyError(f"{what}({name!r}): no such {KIND_NAMES[kind]}") from e
        raise translate(e, f"{what}({name!r})") from e


def find(window: _ext.Window, name: str, kind: int, what: str) -> tuple[int, int]:
    """(directory index, offset) of object `name`; MemdKeyError if there is none."""
    idx, offset, _mz_id = _lookup(window, name, kind, what)
    return idx, offset


class _Sized(Protocol):
    @property
    def memsize(self) -> int: ...


S = TypeVar("S", bound=_Sized)


def open_listed(
    window: _ext.Window, name: str, kind: int, build: Callable[[int], S], what: str
) -> S:
    """Open listed object `name` with `build(offset)`, bounded by the memzone it lives
    in: any process can rewrite its header to claim more memory (consistently), and
    this process must not then write past its zone.  CorruptionError if it does."""
    _idx, offset, mz_id = _lookup(window, name, kind, what)
    obj = build(offset)
    zone = _ext.memzone(window, mz_id)
    if zone is None or not zone[2] <= offset <= offset + obj.memsize <= zone[2] + zone[4]:
        raise CorruptionError(
            f"{what}({name!r}): its header claims {obj.memsize} bytes, past the memzone it "
            "lives in (damaged shared memory); free it and create it again"
        )
    return obj


def held_in(window: _ext.Window, memzone_id: int) -> tuple[str, str] | None:
    """(name, kind) of the listed object that lives in memzone `memzone_id`, if any."""
    for _idx, name, kind, _offset, mz_id, _pid in _ext.objects(window):
        if mz_id == memzone_id:
            return name, KIND_NAMES.get(kind, "object")
    return None


def _free_half_made(mem: Any, zone_name: str, what: str) -> None:
    """A creator killed between reserving an object's memzone and listing the object
    (inside a mempool's obj_init, say) left the zone behind, unlisted: free it.  If
    its creator still runs, it is creating the object right now."""
    try:
        zone = mem.memzone_lookup(zone_name)
    except MemdKeyError:
        return
    if process_alive(zone.owner_pid, 0):
        raise MemdExistsError(
            f"{what}: pid {zone.owner_pid} is creating it right now (memzone {zone_name!r} "
            "is reserved); look it up once it is done, or pick another name"
        )
    log.warning(
        "%s: freeing memzone %r, left half made by pid %d, which died while creating it",
        what,
        zone_name,
        zone.owner_pid,
    )
    mem.memzone_free(zone)


def create(
    mem: Any,
    name: str,
    kind: int,
    mz_prefix: str,
    size: int,
    socket_id: int,
    build: Callable[[int], T],
    what: str,
) -> T:
    """Reserve memzone `<mz_prefix><name>`, build the object at its offset, then list
    it.  A taken name raises MemdExistsError; on any failure the memzone is freed."""
    mem._check_primary()
    try:
        find(mem.window, name, kind, what)
    except MemdKeyError:
        pass
    else:
        raise MemdExistsError(
            f"{what}({name!r}): the name is already in use; pick another or free it"
        )
    _free_half_made(mem, mz_prefix + name, what)
    mz = mem.memzone_reserve(mz_prefix + name, size, socket_id, 0, align=64)
    try:
        obj = build(mz.offset)
        _ext.object_add(mem.window, name, kind, mz.id, mz.offset, os.getpid())
    except OSError as e:
        mem.memzone_free(mz)
        raise translate(e, f"{what}({name!r})") from e
    except BaseException:
        mem.memzone_free(mz)
        raise
    return obj


def remove(
    mem: Any,
    name: str,
    kind: int,
    mz_prefix: str,
    offset: int,
    poison: Callable[[], None],
    what: str,
) -> None:
    """Unlist object `name` (which must be the one at `offset`), `poison` it (every
    handle to it, in every process, raises StaleHandle from then on) and free its
    memzone."""
    idx, listed = find(mem.window, name, kind, what)
    if listed != offset:
        raise MemdValueError(f"{what}({name!r}): this {KIND_NAMES[kind]} is not the one registered")
    zone = mem.memzone_lookup(mz_prefix + name)
    _ext.object_remove(mem.window, idx)
    poison()  # before the memory goes back to the heap, where anything may reuse it
    mem.memzone_free(zone)
