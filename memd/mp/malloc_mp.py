"""Heap growth and release, both halves (DPDK `malloc_mp.c`), top to bottom.

1. A `malloc` finds no free element big enough (`ext/heap.c`) and calls
   `_expand_heap(heap, size, align, bound, contig)`.
2. In a secondary (`SecondaryGrowth`) that sends `alloc {heap, size, align, bound}`
   to the primary and waits for the answer.  In the primary the same call runs in
   process, and `alloc` requests land in `PrimaryGrowth._on_alloc`.
3. The primary (`PrimaryGrowth._expand_heap`) allocates pages in the memseg
   list's file (`fallocate`, `memd.primary.memalloc`), records them in the list and
   adds them to the heap, under the heap lock.  Every process maps each list's file
   whole at attach, so every process sees the new pages at once: nobody has to map
   anything, and nobody is told or waited for, except secondaries that registered
   memory event callbacks: they get a `sync` and are waited for, a bounded time, so
   that their ALLOC callbacks run before anyone can allocate from the pages, as in
   DPDK.
4. The secondary retries its allocation.
5. Whole free pages go back the other way (`_release_pages`, `shrink` requests):
   out of the heap, marked unused, callbacks' FREE while the pages still exist,
   then punched out of the file, unless preallocated (-m, --socket-mem,
   --legacy-mem, which never grows) or pinned: a view some process holds (a
   `.buf`, `mem.view()`, a NumPy array over one, or one a forked child
   inherited) pins the pages under it (`ext/pins.c`), which then stay in the
   heap as free memory; the primary's serving loop releases again once the pins
   changed (`retry_deferred_release`: the last such view went, or its process
   died), nobody else having to free anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from memd import _ext
from memd.errors import MemdError, MemdMemoryError, PrimaryNotRunning
from memd.hw import hugepage_info
from memd.mp.channel import Server, param, reply
from memd.shm.config import MemsegList, process_alive
from memd.shm.heap import NEVER_RELEASE, space_needed
from memd.shm.memory import MEM_EVENT_ALLOC, MEM_EVENT_FREE, Memory

log = logging.getLogger("memd")
secondary_log = logging.getLogger("memd_client")

MiB = 1 << 20
# a pin row mid-write at two looks this far apart (seconds) is read as it stands
STUCK_PIN_ROW = 1.0


class GrowthOptions(Protocol):
    """The primary's options that growth reads (`memd.primary.Options` has them)."""

    legacy_mem: bool
    max_mem_mb: int


def _overlaps(ranges: Sequence[tuple[int, int]], off: int, length: int) -> bool:
    """[off, +length) meets one of `ranges` ([lo, hi) window offsets)."""
    return any(lo < off + length and off < hi for lo, hi in ranges)


class SecondaryGrowth(Memory):
    """A secondary's half: ask the primary, map what it says."""

    if TYPE_CHECKING:

        def _request(self, msg: dict[str, Any]) -> dict[str, Any]: ...

    def _expand_heap(
        self,
        heap: int,
        size: int,
        align: int,
        bound: int,
        contig: bool,
        page_sizes: Sequence[int] = (),
    ) -> None:
        ans = self._request(
            {
                "type": "alloc",
                "heap": heap,
                "size": size,
                "align": align,
                "bound": bound,
                "contig": contig,
                "page_sizes": list(page_sizes),
            }
        )
        if ans["status"]:
            raise MemdMemoryError(f"primary: {ans['reason']}")
        self.sync_pages()

    def _release_pages(self, heap: int) -> int | None:
        with contextlib.suppress(MemdMemoryError, PrimaryNotRunning):
            self._request({"type": "shrink", "heap": heap})
        return None

    def _mem_events_wanted(self, on: bool) -> None:
        ans = self._request({"type": "mem_events", "on": on})
        if ans["status"]:
            raise MemdError(f"primary: {ans['reason']}")

    def _on_sync(self, msg: dict[str, Any]) -> None:
        """Background thread: the primary changed the memory map."""
        if msg["type"] == "sync":
            self.sync_pages()
            self._heap_cache_clear()  # pages came or went: reset release thresholds
        elif msg["type"] == "shutdown":
            secondary_log.info("the memd primary is shutting down")


class PrimaryGrowth(Memory):
    """The primary's half: map pages, have every secondary map them, add them to the
    heap; and the reverse."""

    if TYPE_CHECKING:

        @property
        def options(self) -> GrowthOptions: ...

        server: Server | None
        _expand_lock: threading.RLock
        detached_pins: dict[tuple[int, int], list[tuple[int, int]]]
        # heap -> the pins a release found keeping free pages (retried when they change)
        release_deferred: dict[int, list[tuple[int, int]]]
        pin_rows_odd_since: dict[int, float]  # pin row -> when first seen mid-write
        pin_rows_logged: set[int]  # stuck rows already logged

        def _lists_of(self, socket_id: int) -> list[MemsegList]: ...
        def _map_new_pages(self, msl: MemsegList, n: int, prealloc: bool) -> int: ...
        def _drop_page(self, msl: MemsegList, slot: int) -> None: ...
        def _free_in_list(self, msl: MemsegList, first: int, n: int) -> None: ...
        def _page_iova(self, addr: int) -> int: ...
        def _mapped_bytes(self) -> int: ...

    def _expand_heap(
        self,
        heap: int,
        size: int,
        align: int,
        bound: int,
        contig: bool,
        page_sizes: Sequence[int] = (),
    ) -> None:
        """Allocate enough new pages for `size` in one of `heap`'s memseg list files
        (of one of `page_sizes`, if given), run the memory event callbacks (waiting
        only for secondaries that registered some), then add the pages to the heap;
        the heap lock is held throughout.  Raises MemoryError when no pages can be
        had."""
        if self.options.legacy_mem:
            raise MemdMemoryError(
                "memd runs with --legacy-mem: all memory was mapped at "
                "start; restart it with a larger -m"
            )
        lists = [m for m in self._lists_of(heap) if not page_sizes or m.page_size in page_sizes]
        if not lists:
            sizes = ", ".join(hugepage_info.kb(p) for p in page_sizes)
            raise MemdMemoryError(
                f"socket {heap} has no memory lists" + (f" of {sizes} pages" if sizes else "")
            )
        need = space_needed(size, align, bound)
        errors = []
        with self._expand_lock:
            for msl in lists:
                n = math.ceil(need / msl.page_size)
                cap = self.options.max_mem_mb * MiB
                if cap and self._mapped_bytes() + n * msl.page_size > cap:
                    errors.append(
                        f"memd's --max-mem {self.options.max_mem_mb} MB is reached "
                        "(free memory or restart memd with a larger --max-mem)"
                    )
                    continue
                if n > msl.capacity:
                    errors.append(
                        f"{n} pages of {hugepage_info.kb(msl.page_size)} exceed the "
                        f"list's {msl.capacity}"
                    )
                    continue
                _ext.heap_lock(self.window, heap)
                try:
                    try:
                        first = self._map_new_pages(msl, n, prealloc=False)
                    except MemoryError as e:
                        errors.append(str(e))
                        continue
                    offset = msl.base_offset + first * msl.page_size
                    self._tell_secondaries()
                    with self._map_lock:
                        self._mem_event(MEM_EVENT_ALLOC, offset, n * msl.page_size)
                    # a reused page file (--huge-unlink=never) holds old data
                    _ext.heap_add_memory(
                        self.window, heap, offset, n * msl.page_size, self.pages.reuse
                    )
                    log.debug("heap %d grew by %d x %d bytes", heap, n, msl.page_size)
                    return
                finally:
                    _ext.heap_unlock(self.window, heap)
        raise MemdMemoryError(f"cannot grow heap {heap} by {size} bytes: " + "; ".join(errors))

    def _release_pages(self, heap: int) -> int | None:
        """Give whole free pages that are not preallocated back to the system
        (step 5 above).  Best effort: a failed sync puts them back.
        Returns the free size below which it need not be called again (None:
        let the heap double its threshold)."""
        if self.options.legacy_mem:
            return NEVER_RELEASE  # legacy memory is all preallocated
        with self._expand_lock:
            self.release_deferred.pop(heap, None)
            for msl in self._lists_of(heap):
                _ext.heap_lock(self.window, heap)
                try:
                    while True:
                        try:
                            off, length = _ext.heap_find_free_pages(
                                self.window, heap, msl.page_size
                            )
                        except OSError:
                            break
                        pins = self._pins()
                        run = self._releasable_run(msl, off, length, pins)
                        if run is None:
                            if self._releasable_run(msl, off, length) is not None:
                                # views keep free pages: the serving loop retries
                                # when the pins change (the last view goes)
                                self.release_deferred[heap] = pins
                            break
                        first, n = run
                        start = msl.base_offset + first * msl.page_size
                        _ext.heap_remove_memory(self.window, heap, start, n * msl.page_size)
                        iovas = {s: i for s, i, _, _ in _ext.segs(self.window, msl.index)}
                        # views may still pin them while FREE callbacks run
                        _ext.msl_releasing(self.window, msl.index, first, n)
                        try:
                            for slot in range(first, first + n):
                                with contextlib.suppress(OSError):
                                    _ext.msl_clear_page(self.window, msl.index, slot)
                            # callbacks hear FREE while the pages still exist
                            with self._map_lock:
                                self._mem_event(MEM_EVENT_FREE, start, n * msl.page_size)
                            self._tell_secondaries()
                        finally:
                            _ext.msl_releasing(self.window, msl.index, 0, 0)
                        if _overlaps(self._pins(), start, n * msl.page_size):
                            # a view still holds them (made by a callback, or made
                            # meanwhile and it saw them releasing): keep them, for
                            # a later release
                            for slot in range(first, first + n):
                                _ext.msl_set_page(
                                    self.window, msl.index, slot, iovas[slot], msl.socket_id, 0
                                )
                            _ext.heap_add_memory(self.window, heap, start, n * msl.page_size, True)
                            with self._map_lock:  # they heard FREE: now they are back
                                self._mem_event(MEM_EVENT_ALLOC, start, n * msl.page_size)
                            self._tell_secondaries()
                            self.release_deferred[heap] = self._pins()
                            break
                        self._free_in_list(msl, first, n)
                finally:
                    _ext.heap_unlock(self.window, heap)
        return None

    def retry_deferred_release(self) -> int:
        """Serving loop: release again the heaps whose free pages views kept, once
        the pins changed (a view went, its process or a forked child that
        inherited it died).  Cheap while nothing changed (one read of the pin
        rows).  Returns how many heaps it tried."""
        if not self.release_deferred:
            return 0
        pins = self._pins()
        tried = 0
        for heap, seen in list(self.release_deferred.items()):
            if pins == seen:
                continue
            tried += 1
            try:
                self._release_pages(heap)
            except MemdError as e:  # a heap lock held too long, a broken heap
                log.debug("deferred release of heap %d: %s", heap, e)
                self.release_deferred.setdefault(heap, seen)  # again next time
        return tried

    def _stuck_pin_rows(self) -> list[int]:
        """Pin rows found mid-write (odd seqlock) at two looks STUCK_PIN_ROW s apart
        or more.  A writer holds a row odd for nanoseconds, under its GIL; one odd
        that long is stopped mid-write (SIGSTOP, a debugger) or is not memd's
        writing (any attached process can write every shared byte).  Such a row
        would pin every page until its slot is registered again; it is read as it
        stands instead (ext/pins.h: safe for a stopped writer), and logged once.
        A row that overflowed still pins every page: that is its owner's to undo."""
        now = time.monotonic()
        odd = set(_ext.pin_rows_odd(self.window))
        seen = self.pin_rows_odd_since
        for row in [r for r in seen if r not in odd]:
            del seen[row]
        stuck = []
        for row in sorted(odd):
            since = seen.setdefault(row, now)
            if now - since >= STUCK_PIN_ROW:
                stuck.append(row)
                if row not in self.pin_rows_logged:
                    self.pin_rows_logged.add(row)
                    log.warning(
                        "pin row %d (%s) has been mid-write for %.0f s: its writer is "
                        "stopped, or not memd; reading it as it stands",
                        row,
                        f"process slot {row}" if row < _ext.MAX_PROCS else "a forked child",
                        now - since,
                    )
        self.pin_rows_logged &= odd
        return stuck

    def _reap_fork_pins(self) -> None:
        """Free the fork rows (a forked child's inherited views) of dead owners."""
        for row, pid, start, owner in _ext.pin_fork_rows(self.window):
            if not process_alive(pid, start):
                _ext.pin_fork_reap(self.window, row, owner)

    def _pins(self) -> list[tuple[int, int]]:
        """Window offset ranges that views pin: every process slot's row, every
        live forked child's, and those of detached secondaries that still live.
        Read after the used bits were cleared, it also sees a view made
        meanwhile (ext/pins.c)."""
        for key in [k for k in self.detached_pins if not process_alive(*k)]:
            del self.detached_pins[key]
        self._reap_fork_pins()
        pins = _ext.pin_ranges(self.window, -1, self._stuck_pin_rows())
        for ranges in self.detached_pins.values():
            pins.extend(ranges)
        return pins

    def _releasable_run(
        self, msl: MemsegList, off: int, length: int, pins: Sequence[tuple[int, int]] = ()
    ) -> tuple[int, int] | None:
        """The longest run of non-preallocated pages of `msl` inside [off, +length)
        that no view `pins` (window offset ranges)."""
        lo, hi = msl.base_offset, msl.base_offset + msl.capacity * msl.page_size
        if not (lo <= off < hi):
            return None
        first = (off - lo) // msl.page_size
        count = length // msl.page_size
        segs = {s: f for s, _, _, f in _ext.segs(self.window, msl.index)}
        best: tuple[int, int] | None = None
        start = None
        for s in [*range(first, first + count), None]:
            ok = (
                s is not None
                and s in segs
                and not segs[s] & _ext.SEG_F_PREALLOC
                and not _overlaps(pins, lo + s * msl.page_size, msl.page_size)
            )
            if ok and start is None:
                start = s
            elif not ok and start is not None:
                assert s is None or s > start
                end = s if s is not None else first + count
                if best is None or end - start > best[1]:
                    best = (start, end - start)
                start = None
        return best

    def _tell_secondaries(self) -> None:
        """The memory map changed.  Secondaries see it through their mappings and
        the memseg lists, so nobody is told, except those with memory event
        callbacks: they get a `sync` and are waited for (up to --sync-timeout), so
        that their callbacks run before anybody uses the pages (ALLOC) or the pages
        go (FREE).  A late one is logged and goes on.  Called under a heap lock:
        dead secondaries are only set aside here, and reclaimed (which takes heap
        locks) by the next poll."""
        if self.server is None:
            return
        waited = []
        gen = self._header().mem_generation
        for peer in list(self.server.peers.values()):
            # only those we wait for: a /proc look per idle secondary cost growth
            # ~10 us each (64 of them: 2x); their pidfds report deaths anyway
            if not peer.mem_events:
                continue
            if not process_alive(peer.pid, peer.start_time):
                self.server.set_aside(peer)
            elif peer.late:  # told, not waited for: a stopped one delays one change only
                self.server.send(peer.identity, {"type": "sync", "generation": gen, "id": 0})
            else:
                waited.append(peer)
        if waited:
            for peer, why in self.server.sync_all(
                {"type": "sync", "generation": gen}, peers=waited
            ):
                peer.late = True
                log.warning(
                    "secondary pid %d did not run its memory event callbacks in time (%s); "
                    "the memory map changed without it, and later changes will not wait for "
                    "it until it answers",
                    peer.pid,
                    why,
                )

    def _on_mem_events(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """mem_events {on} -> {}: the secondary has memory event callbacks (on) or
        no longer (off): memory map changes then wait for its `sync` answers."""
        assert self.server is not None
        peer = self.server.peer_of(identity)
        if peer is None:
            return reply(msg["id"], errno.EPERM, "register first")
        peer.mem_events = param(msg, "on", bool)
        return reply(msg["id"])

    def _on_alloc(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """alloc {heap, size, align, bound, contig, page_sizes} -> {}: grow `heap` so
        that a block of `size` fits (on pages of one of `page_sizes`, bytes, if not
        empty); every secondary has mapped the pages when this answers."""
        assert self.server is not None
        if self.server.peer_of(identity) is None:
            return reply(msg["id"], errno.EPERM, "register first")
        heap = param(msg, "heap", int, 0, _ext.MAX_HEAPS - 1)
        size = param(msg, "size", int, 1, 2**48)
        align = param(msg, "align", int, 0, 2**30)
        bound = param(msg, "bound", int, 0, 2**48)
        if align & (align - 1):  # what malloc and memzone_reserve accept, nothing else
            return reply(msg["id"], errno.EINVAL, f"'align' = {align} is not 0 or a power of two")
        if bound and (bound & (bound - 1) or bound < size):
            return reply(
                msg["id"],
                errno.EINVAL,
                f"'bound' = {bound} is not 0 or a power of two >= 'size' {size}",
            )
        contig = bool(msg.get("contig", False))
        page_sizes = msg.get("page_sizes", [])
        if (
            not isinstance(page_sizes, list)
            or len(page_sizes) > 64
            or not all(type(p) is int and 0 < p <= 2**40 and p & (p - 1) == 0 for p in page_sizes)
        ):
            return reply(msg["id"], errno.EINVAL, "'page_sizes' is not a list of page sizes")
        if heap not in self.heap_ids():
            return reply(msg["id"], errno.EINVAL, f"no heap {heap}")
        self._expand_heap(heap, size, align, bound, contig, page_sizes)
        return reply(msg["id"])

    def _on_shrink(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """shrink {heap} -> {}: give whole free pages of `heap` back to the system."""
        assert self.server is not None
        if self.server.peer_of(identity) is None:
            return reply(msg["id"], errno.EPERM, "register first")
        heap = param(msg, "heap", int, 0, _ext.MAX_HEAPS - 1)
        if heap not in self.heap_ids():
            return reply(msg["id"], errno.EINVAL, f"no heap {heap}")
        self._release_pages(heap)
        return reply(msg["id"])
