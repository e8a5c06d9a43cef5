"""The shared-memory model both sides use: the window, the pages mapped into it,
memzones, and the calls a user makes.  `memd.Primary` and
`memd_client.Secondary` differ only in how memory is added (the primary maps
pages itself; a secondary asks the primary) and in who owns the files."""

from __future__ import annotations

import copyreg
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memd import _ext
from memd.errors import (
    MemdError,
    MemdExistsError,
    MemdKeyError,
    MemdMemoryError,
    MemdValueError,
    translate,
)
from memd.paths import SHM_DIR, config_path
from memd.shm import objects, refs
from memd.shm.config import SOCKET_ID_ANY, Header, MemsegList, header, memseg_lists, processes
from memd.shm.heap import HeapMixin
from memd.shm.mempool import MEMPOOL_MZ_PREFIX, Mempool, MempoolMixin
from memd.shm.pages import PageStore, check_list_fd
from memd.shm.ring import RING_MZ_PREFIX, Ring, RingMixin

# DPDK's memzone flags (rte_memzone.h names and values).  A page-size flag (any of
# them ORed) asks for memory on pages of one of those sizes and fails without such
# pages, unless MEMZONE_SIZE_HINT_ONLY lets any size do.
MEMZONE_2MB: int = _ext.MEMZONE_F_2MB
MEMZONE_1GB: int = _ext.MEMZONE_F_1GB
MEMZONE_16MB: int = _ext.MEMZONE_F_16MB
MEMZONE_16GB: int = _ext.MEMZONE_F_16GB
MEMZONE_256KB: int = _ext.MEMZONE_F_256KB
MEMZONE_256MB: int = _ext.MEMZONE_F_256MB
MEMZONE_512MB: int = _ext.MEMZONE_F_512MB
MEMZONE_4GB: int = _ext.MEMZONE_F_4GB
MEMZONE_SIZE_HINT_ONLY: int = _ext.MEMZONE_F_SIZE_HINT_ONLY
MEMZONE_IOVA_CONTIG: int = _ext.MEMZONE_F_IOVA_CONTIG
MEMZONE_FLAGS = (
    "MEMZONE_2MB",
    "MEMZONE_1GB",
    "MEMZONE_16MB",
    "MEMZONE_16GB",
    "MEMZONE_256KB",
    "MEMZONE_256MB",
    "MEMZONE_512MB",
    "MEMZONE_4GB",
    "MEMZONE_SIZE_HINT_ONLY",
    "MEMZONE_IOVA_CONTIG",
)


MAX_ALIGN: int = _ext.MAX_ALIGN  # the largest alignment any request may ask for


# rte_mem_event values: what a memory event callback is told
MEM_EVENT_ALLOC = 0
MEM_EVENT_FREE = 1

log = logging.getLogger("memd")


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slots as (first, count) runs of consecutive slots."""
    out: list[tuple[int, int]] = []
    for slot in slots:
        if out and out[-1][0] + out[-1][1] == slot:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((slot, 1))
    return out


def _size_text(page_size: int) -> str:
    return (
        f"{page_size >> 30} GB"
        if page_size >= 1 << 30
        else f"{page_size >> 20} MB"
        if page_size >= 1 << 20
        else f"{page_size >> 10} kB"
    )


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise MemdValueError(f"{what} must be a non-empty str")
    if len(name.encode()) >= _ext.NAMESIZE or "\0" in name:
        raise MemdValueError(
            f"{what} {name!r} is too long: at most {_ext.NAMESIZE - 1} bytes, no NUL"
        )
    return name


@dataclass
class Memzone:
    """A named reservation of shared memory (DPDK ``struct rte_memzone``), as
    ``memzone_reserve``, ``memzone_lookup`` and ``memzones`` return it: a snapshot
    of the zone's descriptor, plus ``buf`` to reach its bytes.  Two processes looking
    up the same name get equal Memzones with the same ``offset``."""

    #: index in the memzone table (DPDK's memzone id, as in ``/eal/memzone_info,<id>``)
    id: int
    #: the name it was reserved under (at most 31 bytes)
    name: str
    #: window offset of its first byte: ``mem.view(mz.offset, mz.length)`` in any process
    offset: int
    #: IO address of its first byte (physical in IOVA-as-PA mode, else the virtual one)
    iova: int
    #: bytes, as requested (the space reserved is rounded up to 64)
    length: int
    #: bytes per page of the memory it lies in (2 MiB chunks with ``--no-huge``)
    page_size: int
    #: NUMA socket of its heap
    socket_id: int
    #: the ``MEMZONE_*`` flags it was reserved with
    flags: int
    #: pid of the process that reserved it (memzones outlive it)
    owner_pid: int
    #: the slot's reserve count when this handle was made: a handle kept past a
    #: memzone_free (whose name, id and offset the next zone may reuse) differs
    generation: int
    _mem: Memory = field(repr=False, compare=False)

    @property
    def buf(self) -> memoryview:
        """A writable zero-copy memoryview of the zone's ``length`` bytes.  Raises
        MemdKeyError once the zone was freed (even if a new zone took its name, id
        and offset since), MemdValueError after the attachment was detached."""
        t = _ext.memzone(self._mem.window, self.id)
        if t is None or t[9] != self.generation:
            raise MemdKeyError(f"memzone {self.name!r} was freed")
        return self._mem.window.view(self.offset, self.length)


class Memory(RingMixin, MempoolMixin, HeapMixin):
    """Base of Primary and Secondary. Subclasses set `window`, `proc_slot` and
    implement `_expand_heap` and `_release_pages`."""

    is_primary = False
    window: _ext.Window
    #: this process's row in the shared process table (0 is the primary's): the
    #: mempool cache it uses and the slot ``memctl processes`` shows
    proc_slot: int

    def __init__(self, prefix: str, rundir: Path) -> None:
        self.prefix = prefix
        self.rundir = rundir
        refs.register(self)  # owns the references pickled from its objects
        self.pages = PageStore(prefix)
        self._mapped: dict[int, set[int]] = {}  # list index -> slots mapped here
        self._map_lock = threading.RLock()
        self._lists: list[MemsegList] = []
        self._synced_generation = -1  # header.mem_generation at the last sync_pages
        self._heap_id_cache: list[int] | None = None
        self._mem_event_callbacks: dict[str, Callable[[int, int, int], object]] = {}
        # dynamic layout: one file per memseg list, mapped whole (see _map_lists)
        self.single_file = False
        self.guarded = False  # holes fault with SIGBUS (userfaultfd), not allocate

    # --- memory events (DPDK rte_mem_event_callback_*) -------------------------

    def mem_event_callback_register(
        self, name: str, callback: Callable[[int, int, int], object]
    ) -> None:
        """Call ``callback(event, offset, length)`` whenever pages are added to or
        removed from the shared memory (rte_mem_event_callback_register): ``event``
        is MEM_EVENT_ALLOC after ``[offset, offset + length)`` (window offsets,
        bytes) was mapped in this process, MEM_EVENT_FREE before it is unmapped, so
        a process can register memory with a device (RDMA, CUDA host registration)
        and unregister it in time.  Every process that registers a callback gets
        the events of every growth and release, whoever caused them.

        The callback runs in the thread that maps or unmaps (this process's sync
        thread, or the one whose allocation grew the heap), with this memory's map
        lock held: like DPDK's, it must not allocate or free memd memory.  An
        exception it raises is logged and does not stop the change.  Raises
        MemdValueError for a bad name or a callback that is not callable, and
        MemdExistsError when ``name`` is registered already.
        """
        check_name(name, "callback name")
        if not callable(callback):
            raise MemdValueError(f"callback must be callable, got {type(callback).__name__}")
        with self._map_lock:
            if name in self._mem_event_callbacks:
                raise MemdExistsError(f"a memory event callback named {name!r} is registered")
            self._mem_event_callbacks[name] = callback
            if len(self._mem_event_callbacks) == 1:
                self._mem_events_wanted(True)

    def mem_event_callback_unregister(self, name: str) -> None:
        """Stop calling the callback registered as ``name``
        (rte_mem_event_callback_unregister).  Raises MemdKeyError if none is."""
        with self._map_lock:
            if self._mem_event_callbacks.pop(name, None) is None:
                raise MemdKeyError(f"no memory event callback named {name!r}")
            if not self._mem_event_callbacks:
                self._mem_events_wanted(False)

    def _check_primary(self) -> None:
        """Raise PrimaryNotRunning if this memory's primary is gone (a secondary:
        named objects made or looked up then would belong to a dead instance)."""

    def _mem_events_wanted(self, on: bool) -> None:
        """This process has memory event callbacks now (on), or none any more: a
        secondary tells the primary, which then waits for it on every change."""

    def _mem_event(self, event: int, offset: int, length: int) -> None:
        """Tell the registered callbacks (call with _map_lock held)."""
        for name, callback in list(self._mem_event_callbacks.items()):
            try:
                callback(event, offset, length)
            except Exception:
                log.exception("memory event callback %r failed", name)

    # --- pages ---------------------------------------------------------------

    def _header(self) -> Header:
        return header(self.window)

    def _align_note(self, heap_idx: int, align: int) -> str:
        if align <= self._page_size(heap_idx) or self._header().iova_mode != _ext.IOVA_PA:
            return ""
        return (
            f". An alignment of {align} bytes, past the page size, must also hold for the "
            "IOVA, which here is the physical address: only a page that starts at such a "
            "physical address can hold the block, and none could be found; ask for a "
            "smaller alignment, or run memd where IOVA is the virtual address (--no-huge "
            "or without root)"
        )

    def _map_slot(
        self, msl: MemsegList, slot: int, fd: int | None = None, populate: bool = False
    ) -> int:
        """Map one page file at its window offset; returns its address here."""
        own_fd = fd is None
        fd = self.pages.open(msl, slot) if fd is None else fd
        try:
            addr = self.window.map_fd(
                msl.base_offset + slot * msl.page_size, msl.page_size, fd, populate=populate
            )
        finally:
            if own_fd:
                os.close(fd)
        self._mapped.setdefault(msl.index, set()).add(slot)
        return addr

    def _unmap_slot(self, msl: MemsegList, slot: int) -> None:
        self.window.unmap(msl.base_offset + slot * msl.page_size, msl.page_size)
        self._mapped.get(msl.index, set()).discard(slot)

    def _map_lists(self, create: bool, handed: dict[int, int] | None = None) -> dict[int, int]:
        """Map each memseg list's file whole, MAP_NORESERVE, at the list's offset:
        pages then come and go inside the files (fallocate, punched holes), seen by
        every process through the same mappings, with nothing to map or sync.  A
        hole faults with SIGBUS rather than allocating a page behind the primary's
        back (userfaultfd, where the kernel allows it).  `create`: the primary
        makes the files; returns their fds (a secondary's are closed: the mapping
        keeps the file and its lock).  `handed`: the fds the primary passed over
        the fd socket (unlinked files, memfds), index -> fd, checked here and
        closed (all of them, whatever happens)."""
        fds: dict[int, int] = {}
        # read before the lists: pages that come meanwhile are then not taken as seen
        # (their generation is newer), and the next sync_pages looks again
        generation = _ext.mem_generation(self.window)
        try:
            for msl in memseg_lists(self.window):
                if not 0 < msl.capacity <= _ext.MAX_PAGES_PER_LIST:
                    raise MemdError(f"memseg list {msl.index} has a bad capacity {msl.capacity}")
                length = msl.capacity * msl.page_size
                if handed is not None:
                    fd = handed.pop(msl.index, -1)
                    if fd < 0:
                        raise MemdError(f"the primary handed over no file for list {msl.index}")
                    fds[msl.index] = fd
                    huge = self.pages.dirs.get(msl.index) != SHM_DIR
                    check_list_fd(fd, self.pages.owner, length, msl.page_size, huge)
                elif create:
                    fd = fds[msl.index] = self.pages.create_list(msl)
                else:
                    fd = fds[msl.index] = self.pages.open_list(msl)
                self.window.map_fd(msl.base_offset, length, fd, noreserve=True)
                try:
                    self.window.guard(msl.base_offset, length)
                    self.guarded = True
                except OSError as e:
                    log.warning(
                        "unused pages of memseg list %d are not guarded (%s): a stray access "
                        "there would allocate a page instead of failing with SIGBUS",
                        msl.index,
                        e.strerror,
                    )
                self._mapped[msl.index] = set(msl.used_slots())
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        finally:
            for fd in (handed or {}).values():  # handed over but not ours to map
                os.close(fd)
        if not create:
            for fd in fds.values():
                os.close(fd)
            fds = {}
        self.single_file = True
        self._lists = memseg_lists(self.window)
        self._synced_generation = generation
        return fds

    def _sync_list_events(self) -> None:
        """Single-file lists: nothing to map; tell the callbacks which pages came
        and went since the last look."""
        for msl in self._lists:
            want = set(msl.used_slots())
            have = self._mapped.setdefault(msl.index, set())
            for kind, slots in ((MEM_EVENT_FREE, have - want), (MEM_EVENT_ALLOC, want - have)):
                for first, n in _runs(sorted(slots)):
                    self._mem_event(
                        kind, msl.base_offset + first * msl.page_size, n * msl.page_size
                    )
            have.clear()
            have.update(want)

    def sync_pages(self) -> tuple[int, int]:
        """Make this process's mappings match the memseg lists: map pages that
        appeared, unmap pages that went.  Returns (mapped, unmapped)."""
        mapped = unmapped = 0
        with self._map_lock:
            generation = _ext.mem_generation(self.window)
            if generation == self._synced_generation:
                return 0, 0  # nothing was mapped or unmapped since the last sync
            self._lists = memseg_lists(self.window)
            if self.single_file:
                self._sync_list_events()
                self._synced_generation = generation
                return 0, 0
            vanished = False
            for msl in self._lists:
                want = set(msl.used_slots())
                have = self._mapped.setdefault(msl.index, set())
                gone = sorted(have - want)
                for first, n in _runs(gone):  # told before they go (DPDK's order)
                    self._mem_event(
                        MEM_EVENT_FREE, msl.base_offset + first * msl.page_size, n * msl.page_size
                    )
                for slot in gone:
                    self._unmap_slot(msl, slot)
                    unmapped += 1
                added = []
                for slot in sorted(want - have):
                    try:
                        self._map_slot(msl, slot)
                    except FileNotFoundError:  # released since we read the list
                        vanished = True
                        continue
                    added.append(slot)
                    mapped += 1
                for first, n in _runs(added):
                    self._mem_event(
                        MEM_EVENT_ALLOC, msl.base_offset + first * msl.page_size, n * msl.page_size
                    )
            # the generation was read before the walk: no change is lost; after a
            # page vanished under us, the next sync looks again
            self._synced_generation = -1 if vanished else generation
        return mapped, unmapped

    def _is_mapped(self, offset: int, length: int) -> bool:
        """[offset, +length) lies in pages in use (never the config: memd's own
        state, which no offset a user is handed points into)."""
        end = offset + max(length, 1)
        for msl in self._lists or memseg_lists(self.window):
            lo = msl.base_offset
            hi = lo + msl.capacity * msl.page_size
            if lo <= offset < hi:
                if end > hi:
                    return False
                have = self._mapped.get(msl.index, set())
                first = (offset - lo) // msl.page_size
                last = (end - 1 - lo) // msl.page_size
                return all(s in have for s in range(first, last + 1))
        return False

    def view(self, offset: int, length: int) -> memoryview:
        """Writable zero-copy view of shared memory at a window offset (from a
        block, a memzone or a ring entry of any process)."""
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise MemdValueError("view(offset, length) takes non-negative ints")
        if not self._is_mapped(offset, length):
            self.sync_pages()  # another process may just have added the page
            if not self._is_mapped(offset, length):
                raise MemdValueError(
                    f"[{offset:#x}, +{length}) is not mapped shared memory: pass an offset "
                    "taken from a block, memzone or mempool object"
                )
        return self.window.view(offset, length)

    # --- what's there -------------------------------------------------------

    def heap_ids(self) -> list[int]:
        """Socket ids that have memory (a heap), lowest first.  The memseg lists
        are fixed at init, so this is computed once."""
        if self._heap_id_cache is None:
            self._heap_id_cache = sorted({m.socket_id for m in memseg_lists(self.window)})
        return list(self._heap_id_cache)

    def _page_size(self, heap: int) -> int:
        """The smallest page size feeding `heap` (its release granularity)."""
        lists = self._lists or memseg_lists(self.window)
        return min((m.page_size for m in lists if m.socket_id == heap), default=1 << 21)

    def _iova(self, offset: int) -> int:
        iova = _ext.iova_of(self.window, offset)
        return _ext.BAD_IOVA if iova is None else iova

    def _heap_order(self, socket_id: int) -> list[int]:
        ids = self.heap_ids()
        if socket_id == SOCKET_ID_ANY:
            return ids
        if not isinstance(socket_id, int) or socket_id not in ids:
            raise MemdValueError(
                f"socket_id {socket_id!r} has no memory here; use one of {ids} or SOCKET_ID_ANY"
            )
        return [socket_id]

    def _largest_block(self, socket_id: int) -> int:
        """Most bytes one heap block for `socket_id` can ever span, however the heap
        grows: a block lies within one memseg list (MemdValueError for a socket
        without memory)."""
        heaps = self._heap_order(socket_id)
        lists = self._lists or memseg_lists(self.window)
        return max((m.capacity * m.page_size for m in lists if m.socket_id in heaps), default=0)

    def info(self) -> dict[str, Any]:
        """What this memd instance is and how this process sees it (the data behind
        ``memctl status``)::

            {"prefix": str, "primary_pid": int,
             "page_sizes": [bytes, ...], "sockets": [socket id, ...],
             "iova_mode": "PA" | "VA", "no_huge": bool, "legacy_mem": bool,
             "runtime_dir": str, "config_path": str, "huge_dirs": [str, ...],
             "window_size": bytes, "mapped_bytes": bytes, "layout_version": int,
             "proc_slot": int}

        ``mapped_bytes`` is the memory all heaps have now, ``window_size`` the address
        space each process reserves for them, ``proc_slot`` this process's row in the
        process table (0 is the primary's).  Raises MemdValueError after detach."""
        h = self._header()
        lists = memseg_lists(self.window)
        return {
            "prefix": h.prefix,
            "primary_pid": h.primary_pid,
            "page_sizes": sorted({m.page_size for m in lists}),
            "sockets": sorted({m.socket_id for m in lists}),
            "iova_mode": "PA" if h.iova_mode == _ext.IOVA_PA else "VA",
            "no_huge": bool(h.flags & _ext.CFG_F_NO_HUGE),
            "legacy_mem": bool(h.flags & _ext.CFG_F_LEGACY),
            "runtime_dir": str(self.rundir),
            "config_path": str(config_path(self.prefix, self.rundir)),
            "huge_dirs": sorted({d for d in self.pages.dirs.values() if d != SHM_DIR}),
            "window_size": h.window_size,
            "mapped_bytes": sum(m.n_used * m.page_size for m in lists),
            "layout_version": h.layout_version,
            "proc_slot": self.proc_slot,
        }

    def memsegs(self) -> list[dict[str, Any]]:
        """Every mapped page, in window order."""
        out = []
        for msl in memseg_lists(self.window):
            for slot, iova, socket_id, flags in _ext.segs(self.window, msl.index):
                out.append(
                    {
                        "list_index": msl.index,
                        "slot": slot,
                        "offset": msl.base_offset + slot * msl.page_size,
                        "iova": None if iova == _ext.BAD_IOVA else iova,
                        "length": msl.page_size,
                        "socket_id": socket_id,
                        "page_size": msl.page_size,
                        "prealloc": bool(flags & _ext.SEG_F_PREALLOC),
                    }
                )
        return out

    def memseg_runs(self) -> list[dict[str, Any]]:
        """Memsegs as DPDK legacy mode shows them: runs of pages contiguous in
        both window and iova."""
        runs: list[dict[str, Any]] = []
        for seg in self.memsegs():
            last = runs[-1] if runs else None
            if (
                last
                and last["list_index"] == seg["list_index"]
                and last["offset"] + last["length"] == seg["offset"]
                and seg["iova"] is not None
                and last["iova"] is not None
                and last["iova"] + last["length"] == seg["iova"]
            ):
                last["length"] += seg["length"]
                last["n_pages"] += 1
            else:
                runs.append({**seg, "n_pages": 1})
        return runs

    def processes(self, usage: bool = False) -> list[dict[str, Any]]:
        """Attached processes.  With `usage`, also what each allocated and still
        holds (heap blocks, memzones, mempool objects in hand), plus a row with
        role "exited" for every process that is gone but still owns malloc'd heap
        blocks or mempool objects (free them with free_owned_by /
        Mempool.reclaim_held_by).  A heap that cannot be walked (corrupt, busy) is
        left out of the heap counts and named in each row's ``heaps_unavailable``
        (``{heap index: reason}``).
        `usage` walks every heap and pool: meant for admin tools, not loops."""
        out: list[dict[str, Any]] = [
            {
                "slot": p.slot,
                "pid": p.pid,
                "role": "primary" if p.state == _ext.PROC_PRIMARY else "secondary",
                "start_time": p.start_time,
                "attach_time": p.attach_ns / 1e9,
                "comm": p.comm,
            }
            for p in processes(self.window)
        ]
        if not usage:
            return out
        unavailable: dict[int, str] = {}
        owners = self.heap_owners(unavailable)  # a corrupt heap hides no process
        held: dict[int, int] = {}
        for pool in self.mempools():
            for pid, n in pool.holders().items():
                held[pid] = held.get(pid, 0) + n
        zones: dict[int, int] = {}
        for z in self.memzones():
            zones[z.owner_pid] = zones.get(z.owner_pid, 0) + 1
        attached = {p["pid"] for p in out}
        # Memzones are named and meant to outlive their creator: an exited process
        # gets a row only for malloc'd blocks or mempool objects it left behind.
        leftovers = {pid for pid, o in owners.items() if o["blocks"] > o["memzones"]}
        for pid in sorted((leftovers | held.keys()) - attached):
            out.append(
                {
                    "slot": None,
                    "pid": pid,
                    "role": "exited",
                    "start_time": None,
                    "attach_time": None,
                    "comm": "",
                }
            )
        for p in out:
            own = owners.get(p["pid"], {})
            p.update(
                heap_blocks=own.get("blocks", 0),
                heap_bytes=own.get("bytes", 0),
                memzones=zones.get(p["pid"], 0),
                mempool_objects=held.get(p["pid"], 0),
            )
            if unavailable:  # its heap counts leave these heaps out
                p["heaps_unavailable"] = {str(h): why for h, why in unavailable.items()}
        return out

    # --- memzones (DPDK rte_memzone_*) ---------------------------------------

    def memzone_reserve(
        self,
        name: str,
        length: int,
        socket_id: int = SOCKET_ID_ANY,
        flags: int = 0,
        align: int = 64,
        bound: int = 0,
    ) -> Memzone:
        """Reserve ``length`` bytes named ``name`` (rte_memzone_reserve_bounded).

        ``align``: a power of two (smaller than 64 is rounded up to 64, as DPDK
        does).  ``bound``: 0, or a power of two >= length the zone never crosses.
        ``length`` 0 asks for as much as possible, as in DPDK: the bound's size
        with a bound, else the biggest block the heaps have now (no growth); the
        zone's length is then that block's usable size.  ``flags``: MEMZONE_*
        (a page-size flag restricts the pages used, MEMZONE_SIZE_HINT_ONLY lets
        any size do when none of them can be had, MEMZONE_IOVA_CONTIG asks for
        contiguous IOVA).  The memzone's ``length`` is the requested one (DPDK
        rounds it up to 64); the space reserved is rounded.

        Raises MemdValueError for a bad name, length, align, bound or flag,
        MemdExistsError if the name is taken, MemdMemoryError when no memory (of
        the page size asked for) can be had or the memzone table is full.
        """
        check_name(name)
        self._check_primary()
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise MemdValueError(f"memzone length must be an int >= 0, not {length!r}")
        if length >= 1 << 63:
            raise MemdMemoryError(f"memzone_reserve({name!r}): {length} bytes can never fit")
        if not isinstance(align, int) or not (align == 0 or _is_pow2(align)):
            raise MemdValueError(f"align must be a power of two, not {align!r}")
        if align > MAX_ALIGN:
            raise MemdValueError(
                f"align {align} is larger than {MAX_ALIGN >> 30} GiB, the largest page size "
                "memd aligns to"
            )
        if not isinstance(bound, int) or bound < 0 or (bound and not _is_pow2(bound)):
            raise MemdValueError(f"bound must be 0 or a power of two, not {bound!r}")
        bound = 0 if bound >= 1 << 63 else bound  # no window spans such a boundary
        if bound and bound < length:
            raise MemdValueError(f"bound {bound} is smaller than length {length}")
        if not isinstance(flags, int) or flags & ~_ext.MEMZONE_F_ALL:
            raise MemdValueError(
                f"unknown memzone flags {flags!r}: use mc.MEMZONE_* ({', '.join(MEMZONE_FLAGS)})"
            )
        align = max(align, 64)
        if bound and align > bound:
            raise MemdValueError(f"align {align} is larger than bound {bound}")
        contig = bool(flags & MEMZONE_IOVA_CONTIG)
        sizes = _ext.memzone_page_sizes(flags)
        # Page sizes asked for first; with SIZE_HINT_ONLY, then any size.
        passes = [False, True] if sizes and flags & MEMZONE_SIZE_HINT_ONLY else [not sizes]
        grow_size = length or bound
        grown: list[int] = []
        last_error: MemdError | None = None
        for any_size in passes:
            for heap in self._heap_order(socket_id):
                if not any_size and not any(
                    m.page_size in sizes for m in memseg_lists(self.window) if m.socket_id == heap
                ):
                    last_error = MemdMemoryError(
                        f"memzone_reserve({name!r}): socket {heap} has no "
                        f"{' or '.join(_size_text(p) for p in sizes)} pages; reserve some, "
                        "or add MEMZONE_SIZE_HINT_ONLY to take any page size"
                    )
                    continue
                for attempt in range(3):
                    try:
                        zid = _ext.memzone_reserve(
                            self.window,
                            name,
                            length,
                            heap,
                            flags,
                            any_size,
                            align,
                            bound,
                            os.getpid(),
                        )
                        self.sync_pages()
                        return self._zone(zid)
                    except OSError as e:
                        if e.errno != errno.ENOMEM:
                            raise translate(e, f"memzone_reserve({name!r})") from e
                        last_error = translate(e, f"memzone_reserve({name!r}, {length})")
                        if attempt == 2 or not grow_size:  # length 0: what there is now
                            break
                        try:
                            self._expand_heap(
                                heap, grow_size, align, bound, contig, () if any_size else sizes
                            )
                            grown.append(heap)
                        except MemoryError as me:
                            last_error = (
                                me if isinstance(me, MemdError) else MemdMemoryError(str(me))
                            )
                            break
        self._give_back(grown)
        if isinstance(last_error, MemdMemoryError) and align > 64:
            note = self._align_note(self._heap_order(socket_id)[0], align)
            if note:
                last_error = MemdMemoryError(f"{last_error}{note}")
        raise last_error or MemdMemoryError(f"memzone_reserve({name!r}): no memory")

    def _zone(self, zid: int) -> Memzone:
        t = _ext.memzone(self.window, zid)
        if t is None:
            raise MemdKeyError(f"memzone {zid} was freed")
        return Memzone(*t, _mem=self)

    def memzone_lookup(self, name: str) -> Memzone:
        """The memzone reserved as ``name`` by any process (rte_memzone_lookup).
        Raises MemdKeyError if there is none, MemdValueError for a name that is not a
        non-empty str of at most 63 bytes."""
        check_name(name)
        self._check_primary()
        try:
            zid = _ext.memzone_lookup(self.window, name)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise MemdKeyError(f"no memzone named {name!r}") from None
            raise translate(e, "memzone_lookup") from e
        return self._zone(zid)

    def memzone_free(self, mz: Memzone) -> None:
        """Free memzone `mz` (DPDK `rte_memzone_free`).  Raises MemdKeyError if it is
        no longer reserved (freed already, perhaps by another process), and
        MemdValueError if a valid listed ring or mempool lives in it (free that
        instead), or if ``mz`` is not a Memzone (DPDK's rte_memzone_free(NULL) is
        -EINVAL).  A damaged ring or mempool (one that no longer validates, listed
        with "corrupt": true) has no handle to free it with: freeing its memzone
        unlists it and frees it."""
        if not isinstance(mz, Memzone):
            raise MemdValueError(f"memzone_free: expected a Memzone, got {type(mz).__name__}")
        t = _ext.memzone(self.window, mz.id)
        if t is None or t[1] != mz.name or t[2] != mz.offset or t[9] != mz.generation:
            raise MemdKeyError(f"memzone {mz.name!r} is not reserved (already freed?)")
        held = objects.held_in(self.window, mz.id)
        if held is not None:
            idx, name, kind, offset = held
            if self._object_valid(kind, name, offset, mz.id):
                raise MemdValueError(
                    f"memzone {mz.name!r} holds {kind} {name!r}: free it with {kind}_free(), "
                    "which frees its memzone too (or, if it is damaged, with memzone_free(), "
                    "which this refuses while it validates)"
                )
            log.warning("memzone_free(%r): freeing damaged %s %r", mz.name, kind, name)
            try:
                _ext.object_remove(self.window, idx)
                kind_id = _ext.OBJ_RING if kind == "ring" else _ext.OBJ_MEMPOOL
                # handles other processes kept must not write into memory reused next
                if mz.offset <= offset < mz.offset + mz.length:
                    _ext.object_poison(self.window, kind_id, offset, mz.offset + mz.length - offset)
            except OSError as e:
                raise translate(e, f"memzone_free({mz.name!r})") from e
        try:
            heap = _ext.memzone_free(self.window, mz.id, mz.generation)
        except OSError as e:
            if e.errno == errno.ENOENT:  # freed meanwhile (and reserved again?)
                raise MemdKeyError(
                    f"memzone {mz.name!r} is not reserved (already freed?)"
                ) from None
            raise translate(e, f"memzone_free({mz.name!r})") from e
        self._heap_maybe_release(heap, mz.length)

    def _object_valid(self, kind: str, name: str, offset: int, mz_id: int) -> bool:
        """Whether listed ring or pool `name` validates (then its own free frees it)."""
        build: Callable[[int], Any]
        if kind == "ring":
            build, prefix = (lambda off: Ring(self.window, off)), RING_MZ_PREFIX
        else:
            slot = max(self.proc_slot, 0)
            build, prefix = (lambda off: Mempool(self.window, off, slot)), MEMPOOL_MZ_PREFIX
        got = objects.validate(self.window, name, offset, mz_id, build, prefix)
        return not isinstance(got, str)

    def memzones(self) -> list[Memzone]:
        """Every reserved memzone, in table order (rte_memzone_walk), those that back
        rings (``RG_<name>``) and mempools (``MP_<name>``) included."""
        return [Memzone(*t, _mem=self) for t in _ext.memzones(self.window)]

    # --- rings and mempools ----------------------------------------------------

    def ring_listing(self) -> list[Ring[Any] | objects.Damaged]:
        """Every named ring, in directory order, each checked on its own: a damaged
        one (its header does not validate) is an `objects.Damaged`, named by its
        memzone ``RG_<name>``, so that one ring's damage hides no other."""
        return objects.listing(
            self.window, _ext.OBJ_RING, lambda off: Ring(self.window, off), RING_MZ_PREFIX
        )

    def mempool_listing(self) -> list[Mempool | objects.Damaged]:
        """Every named mempool (used through this process's cache slot), in
        directory order; a damaged one is an `objects.Damaged` named by its memzone
        ``MP_<name>``."""
        slot = max(self.proc_slot, 0)
        return objects.listing(
            self.window,
            _ext.OBJ_MEMPOOL,
            lambda off: Mempool(self.window, off, slot),
            MEMPOOL_MZ_PREFIX,
        )

    def rings(self) -> list[Ring[Any]]:
        """Every named ring that validates, in directory order (damaged ones are
        left out and logged: `ring_listing` names them)."""
        return [r for r in self.ring_listing() if isinstance(r, Ring)]

    def mempools(self) -> list[Mempool]:
        """Every named mempool that validates, used through this process's cache
        slot (damaged ones are left out and logged: `mempool_listing` names them)."""
        return [p for p in self.mempool_listing() if isinstance(p, Mempool)]

    def flush_mempool_caches(self, slot: int, damaged_level: int = logging.WARNING) -> int:
        """Put every object cached in process slot `slot` back into its pool's
        ring (on detach, or when the primary reclaims a dead process's slot).
        Returns how many objects went back.  A pool whose free ring stays locked by
        a stopped process past the lock wait limit is skipped with a warning (its
        cache keeps the objects, for the slot's next owner); damaged pools are
        skipped and named in one log line at `damaged_level` (memctl lists them as
        corrupt)."""
        moved = 0
        skipped = []
        for _, name, kind, off, _, _ in _ext.objects(self.window):
            if kind == _ext.OBJ_MEMPOOL:
                try:
                    moved += _ext.mempool_flush_cache(self.window, off, slot) or 0
                except (ValueError, OSError) as e:  # damaged (CorruptionError among them)
                    skipped.append(f"{name!r} ({e})")
                except MemdError as e:  # busy
                    log.warning("mempool %r: cache of slot %d not flushed: %s", name, slot, e)
        if skipped:
            log.log(
                damaged_level,
                "cache of slot %d not flushed in damaged mempools: %s",
                slot,
                ", ".join(skipped),
            )
        return moved

    # --- heap growth hooks (subclasses) ----------------------------------------

    def _expand_heap(
        self,
        heap: int,
        size: int,
        align: int,
        bound: int,
        contig: bool,
        page_sizes: Sequence[int] = (),
    ) -> None:
        raise NotImplementedError

    def _release_pages(self, heap: int) -> int | None:
        raise NotImplementedError


# Pickled, memd's objects are references to shared memory (memd.shm.refs).
copyreg.pickle(Memzone, refs.reduce_memzone)
copyreg.pickle(Ring, refs.reduce_ring)
copyreg.pickle(Mempool, refs.reduce_mempool)
copyreg.pickle(_ext.Block, refs.reduce_block)
copyreg.pickle(_ext.MempoolObject, refs.reduce_mempool_object)
