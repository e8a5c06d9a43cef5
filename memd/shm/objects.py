"""The shared directory of named objects (rings, mempools): each lives in a
memzone `<prefix><name>` and is listed by name, kind and offset so that any
process finds it.  RingMixin and MempoolMixin share these steps."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from memd import _ext
from memd.errors import CorruptionError, MemdExistsError, MemdKeyError, MemdValueError, translate
from memd.shm.config import process_alive

log = logging.getLogger("memd")

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

    def _bind_zone(self, mz_id: int, generation: int) -> None: ...


S = TypeVar("S", bound=_Sized)


@dataclass(frozen=True)
class Damaged:
    """A listed ring or mempool whose header no longer validates (damaged shared
    memory).  Only what the daemon can trust is kept: the name its memzone
    (``RG_<name>`` / ``MP_<name>``) gives, its kind ("ring" or "mempool"), the
    memzone and the offset; ``reason`` says what failed.  Free it with
    ``memzone_free(mem.memzone_lookup(memzone))``."""

    name: str
    kind: str
    offset: int
    memzone: str
    reason: str
    corrupt: bool = True


def _zone_name(window: _ext.Window, mz_id: int) -> str | None:
    zone = _ext.memzone(window, mz_id)
    return None if zone is None else str(zone[1])


def validate(
    window: _ext.Window,
    name: str,
    offset: int,
    mz_id: int,
    build: Callable[[int], S],
    prefix: str,
) -> S | str:
    """The object listed as `name` at `offset` in memzone `mz_id`, or why it is not
    a valid one.  Any process can rewrite its header: consistently to claim more
    memory (this process must not then write past its zone), or with another
    object's header (then it claims another name)."""
    zone = _ext.memzone(window, mz_id)
    if zone is None or zone[1] != prefix + name:
        return f"its memzone {prefix + name!r} is gone or renamed"
    try:
        obj = build(offset)
    except (ValueError, OSError) as e:
        return f"its header does not validate ({e})"
    if not zone[2] <= offset <= offset + obj.memsize <= zone[2] + zone[4]:
        return f"its header claims {obj.memsize} bytes, past the memzone it lives in"
    header_name = getattr(obj, "name", name)
    if header_name != name:
        return f"its header names {header_name!r}"
    # a tag mismatch while it is still listed in this zone is damage, not a free
    obj._bind_zone(mz_id, zone[9])
    return obj


def _damage_error(what: str, name: str, reason: str, zone: str) -> CorruptionError:
    return CorruptionError(
        f"{what}({name!r}): damaged shared memory: {reason}; free it with "
        f"memzone_free(memzone_lookup({zone!r})) and create it again"
    )


def open_listed(
    window: _ext.Window,
    name: str,
    kind: int,
    build: Callable[[int], S],
    what: str,
    prefix: str,
) -> S:
    """Open listed object `name` with `build(offset)`, bounded by the memzone
    `<prefix><name>` it lives in.  CorruptionError, naming it, if it does not
    validate."""
    _idx, offset, mz_id = _lookup(window, name, kind, what)
    got = validate(window, name, offset, mz_id, build, prefix)
    if isinstance(got, str):
        raise _damage_error(what, name, got, prefix + name)
    return got


def listing(
    window: _ext.Window, kind: int, build: Callable[[int], S], prefix: str
) -> list[S | Damaged]:
    """Every listed object of `kind`, in directory order, each validated on its own:
    a damaged one is a `Damaged` (named by its memzone), the rest as they are."""
    out: list[S | Damaged] = []
    for _idx, dir_name, k, offset, mz_id, _pid in _ext.objects(window):
        if k != kind:
            continue
        got = validate(window, dir_name, offset, mz_id, build, prefix)
        if not isinstance(got, str):
            out.append(got)
            continue
        zone = _zone_name(window, mz_id)
        name = zone[len(prefix) :] if zone is not None and zone.startswith(prefix) else dir_name
        log.warning("%s %r is damaged: %s", KIND_NAMES[kind], name, got)
        out.append(Damaged(name, KIND_NAMES[kind], offset, zone or prefix + name, got))
    return out


def held_in(window: _ext.Window, memzone_id: int) -> tuple[int, str, str, int] | None:
    """(directory index, name, kind, offset) of the listed object that lives in
    memzone `memzone_id`, if any."""
    for idx, name, kind, offset, mz_id, _pid in _ext.objects(window):
        if mz_id == memzone_id:
            return idx, name, KIND_NAMES.get(kind, "object"), offset
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
    build: Callable[[int], S],
    what: str,
) -> S:
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
        obj._bind_zone(mz.id, mz.generation)  # see validate
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
