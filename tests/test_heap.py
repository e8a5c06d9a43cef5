"""The shared-memory malloc heap (ext/heap.c, ext/py_heap.c, memd/shm/heap.py).

No daemon: every test runs on an anonymous window whose first MEMD_CONFIG_SIZE bytes
are the config (the heaps live at config.heaps[i]) and whose heap memory is added
at offsets >= 2 MiB.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memd import _ext
from memd.errors import CorruptionError, MemdMemoryError, MemdValueError, StaleHandle
from memd.shm.heap import AnonymousMemory, HeapMixin, space_needed
from tests.support.layout import offsets

MiB = 1 << 20
CONFIG = _ext.CONFIG_SIZE
HDR = _ext.HEAP_ELEM_HEADER_SIZE
MIN_ELEM = _ext.HEAP_ELEM_MIN_SIZE
FREE, BUSY = _ext.HEAP_ELEM_FREE, _ext.HEAP_ELEM_BUSY
HEAP0 = offsets()["memd_config.heaps"]  # struct memd_heap of heap 0
ALLOC_COUNT = offsets()["memd_heap.alloc_count"]
ALLOC_SERIAL = offsets()["memd_heap.alloc_serial"]
ELEM_SERIAL = offsets()["memd_heap_elem.u.busy.serial"]


def new_heap(size: int = 8 * MiB, add: int | None = None) -> _ext.Window:
    """A window with heap 0 initialised and [CONFIG, CONFIG + add) added."""
    w = _ext.Window.anonymous(CONFIG + size)
    _ext.heap_init(w, 0, 0)
    if add is None:
        add = size
    if add:
        _ext.heap_add_memory(w, 0, CONFIG, add)
    return w


def stats(w: _ext.Window, idx: int = 0) -> dict[str, int]:
    keys = ("total", "free", "alloc", "greatest", "free_count", "alloc_count")
    return dict(zip(keys, _ext.heap_stats(w, idx), strict=True))


def free_elems(w: _ext.Window) -> list[tuple[int, int]]:
    return [(o, s) for o, s, st_, _ in _ext.heap_walk(w, 0) if st_ == FREE]


def raises_errno(code: int, fn, *args, **kw) -> OSError:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, ei.value
    return ei.value


# --- layout ------------------------------------------------------------------------


def test_layout_constants():
    assert HDR == 64
    assert _ext.HEAP_ELEM_TRAILER_SIZE == 8
    assert MIN_ELEM == 128
    assert _ext.LAYOUT["memd_heap"] == 512
    assert HEAP0 == 4096
    assert _ext.HEAP_NUM_FREELISTS == 16
    assert _ext.MAX_HEAPS == 8
    # in the counters line (journaled with it) / beside owner_pid (one word)
    assert _ext.LAYOUT["memd_heap.alloc_serial"] == (252, 4)
    assert _ext.LAYOUT["memd_heap_elem.u.busy.serial"] == (44, 4)


# --- basics and exact limits ---------------------------------------------------------


def test_fresh_heap_is_one_free_element():
    w = new_heap(4 * MiB)
    assert _ext.heap_walk(w, 0) == [(CONFIG, 4 * MiB, FREE, 0)]
    assert stats(w) == {
        "total": 4 * MiB,
        "free": 4 * MiB,
        "alloc": 0,
        "greatest": 4 * MiB,
        "free_count": 1,
        "alloc_count": 0,
    }
    _ext.heap_check(w, 0)


def test_alloc_free_roundtrip_and_sizes():
    w = new_heap(1 * MiB)
    off = _ext.heap_alloc(w, 0, 64)
    assert off == CONFIG + HDR
    assert _ext.heap_block_size(w, 0, off) == 64
    # 64 data + 8 trailer round up to 128, plus the 64-byte header
    assert _ext.heap_walk(w, 0)[0] == (CONFIG, 192, BUSY, 64)
    s = stats(w)
    assert s["alloc"] == 192
    assert s["alloc"] + s["free"] == s["total"]
    assert _ext.heap_free(w, 0, off) == 1 * MiB  # joined back into one element
    assert _ext.heap_walk(w, 0) == [(CONFIG, 1 * MiB, FREE, 0)]


def test_bad_arguments():
    w = new_heap(1 * MiB)
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 0)  # size 0
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 64, 3)  # align not a power of two
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 64, 96)
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 65, 0, 64)  # bound < size
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 64, 0, 100)  # bound not a power of 2
    off = _ext.heap_alloc(w, 0, 64, 0, 64)  # bound == size is fine
    assert off // 64 == (off + 63) // 64
    with pytest.raises(OverflowError):
        _ext.heap_alloc(w, 0, -1)
    with pytest.raises(OverflowError):
        _ext.heap_alloc(w, 0, 2**64)
    with pytest.raises(ValueError):
        _ext.heap_alloc(w, 8, 64)  # heap index out of range
    with pytest.raises(ValueError):
        _ext.heap_alloc(w, -1, 64)
    with pytest.raises(TypeError):
        _ext.heap_alloc(object(), 0, 64)


def test_small_alignments_are_64():
    w = new_heap(1 * MiB)
    for a in (1, 2, 8, 32, 64):
        assert _ext.heap_alloc(w, 0, 1, a) % 64 == 0
    _ext.heap_check(w, 0)


def test_huge_sizes_are_enomem():
    w = new_heap(1 * MiB)
    raises_errno(errno.ENOMEM, _ext.heap_alloc, w, 0, 2**64 - 1)
    raises_errno(errno.ENOMEM, _ext.heap_alloc, w, 0, 1 * MiB)
    # alignment is a power of two up to MAX_ALIGN (what the window base guarantees)
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 64, 2**63)
    raises_errno(errno.EINVAL, _ext.heap_alloc, w, 0, 64, _ext.MAX_ALIGN * 2)
    _ext.heap_alloc(w, 0, 64, 0, 2**63)  # such a bound is no constraint


def test_exact_fit():
    region = 1 * MiB
    w = new_heap(region)
    biggest = region - HDR - _ext.HEAP_ELEM_TRAILER_SIZE
    raises_errno(errno.ENOMEM, _ext.heap_alloc, w, 0, biggest + 1)
    off = _ext.heap_alloc(w, 0, biggest)
    assert stats(w)["free_count"] == 0
    raises_errno(errno.ENOMEM, _ext.heap_alloc, w, 0, 1)
    _ext.heap_free(w, 0, off)
    _ext.heap_check(w, 0)


def test_double_free_and_foreign_offsets():
    w = new_heap(1 * MiB)
    a = _ext.heap_alloc(w, 0, 100)
    b = _ext.heap_alloc(w, 0, 100)
    for bad in (0, 64, a + 64, a + 8, a - 64, CONFIG + 2 * MiB, 2**63):
        raises_errno(errno.EINVAL, _ext.heap_free, w, 0, bad)
    _ext.heap_free(w, 0, a)
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, a)  # double free, stand-alone
    _ext.heap_free(w, 0, b)
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, b)  # double free, joined
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, a)
    _ext.heap_check(w, 0)
    assert _ext.heap_walk(w, 0) == [(CONFIG, 1 * MiB, FREE, 0)]


def test_another_heaps_block_is_foreign():
    w = _ext.Window.anonymous(CONFIG + 2 * MiB)
    _ext.heap_init(w, 0, 0)
    _ext.heap_init(w, 1, 1)
    _ext.heap_add_memory(w, 0, CONFIG, MiB)
    _ext.heap_add_memory(w, 1, CONFIG + MiB, MiB)
    a = _ext.heap_alloc(w, 0, 64)
    b = _ext.heap_alloc(w, 1, 64)
    raises_errno(errno.EINVAL, _ext.heap_free, w, 1, a)
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, b)
    _ext.heap_free(w, 0, a)
    _ext.heap_free(w, 1, b)
    _ext.heap_check(w, 0)
    _ext.heap_check(w, 1)


def test_smashed_trailer_is_caught_and_block_stays():
    w = new_heap(1 * MiB)
    off = _ext.heap_alloc(w, 0, 100)
    _ext.heap_validate(w, 0, off)
    v = w.view(off, 112)
    v[100] ^= 0xFF  # one byte past the data (100 rounds up to 104: the trailer)
    v[104] ^= 0xFF
    raises_errno(errno.EFAULT, _ext.heap_validate, w, 0, off)
    raises_errno(errno.EFAULT, _ext.heap_free, w, 0, off)
    with pytest.raises(OSError, match="trailer"):
        _ext.heap_check(w, 0)
    v[104] ^= 0xFF  # repair: the block is still allocated and frees fine
    _ext.heap_validate(w, 0, off)
    _ext.heap_free(w, 0, off)
    _ext.heap_check(w, 0)


def test_smashed_header_is_caught():
    w = new_heap(1 * MiB)
    off = _ext.heap_alloc(w, 0, 100)
    w.view(off - HDR, 1)[0] ^= 0x5A
    raises_errno(errno.EINVAL, _ext.heap_validate, w, 0, off)
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, off)
    with pytest.raises(OSError, match="cookie"):
        _ext.heap_check(w, 0)


# --- adding and removing memory -------------------------------------------------------


def test_add_memory_limits():
    w = new_heap(8 * MiB, add=0)
    raises_errno(errno.EINVAL, _ext.heap_add_memory, w, 0, CONFIG - 4096, 8192)  # config
    raises_errno(errno.EINVAL, _ext.heap_add_memory, w, 0, CONFIG + 8, 4096)  # unaligned
    raises_errno(errno.EINVAL, _ext.heap_add_memory, w, 0, CONFIG, 4100)
    raises_errno(errno.EINVAL, _ext.heap_add_memory, w, 0, CONFIG, 64)  # < min element
    _ext.heap_add_memory(w, 0, CONFIG, MIN_ELEM)
    _ext.heap_add_memory(w, 0, CONFIG + MiB, MiB)
    for off, ln in ((CONFIG, 64), (CONFIG + MiB - 64, 128), (CONFIG + MiB + 4096, 4096)):
        raises_errno(errno.EINVAL, _ext.heap_add_memory, w, 0, off, ln)  # overlaps
    with pytest.raises(ValueError):
        _ext.heap_add_memory(w, 0, CONFIG + 8 * MiB, MiB)  # outside the window
    _ext.heap_check(w, 0)


def test_adjacent_regions_join_and_holes_do_not():
    w = new_heap(8 * MiB, add=0)
    _ext.heap_add_memory(w, 0, CONFIG + 2 * MiB, MiB)
    _ext.heap_add_memory(w, 0, CONFIG, MiB)  # hole [1, 2) MiB between
    assert free_elems(w) == [(CONFIG, MiB), (CONFIG + 2 * MiB, MiB)]
    _ext.heap_add_memory(w, 0, CONFIG + MiB, MiB)  # fills the hole: all three join
    assert free_elems(w) == [(CONFIG, 3 * MiB)]
    _ext.heap_add_memory(w, 0, CONFIG + 4 * MiB, MiB)
    a = _ext.heap_alloc(w, 0, 2 * MiB)  # fits in the first run only
    assert CONFIG <= a < CONFIG + MiB
    raises_errno(errno.ENOMEM, _ext.heap_alloc, w, 0, 2 * MiB)  # a hole is never bridged
    _ext.heap_free(w, 0, a)
    assert free_elems(w) == [(CONFIG, 3 * MiB), (CONFIG + 4 * MiB, MiB)]
    assert stats(w)["total"] == 4 * MiB
    _ext.heap_check(w, 0)


def test_memory_added_next_to_a_busy_block():
    w = new_heap(8 * MiB, add=0)
    _ext.heap_add_memory(w, 0, CONFIG, 4096)
    a = _ext.heap_alloc(w, 0, 4096 - HDR - 8)  # fills the region exactly
    _ext.heap_add_memory(w, 0, CONFIG + 4096, 4096)
    b = _ext.heap_alloc(w, 0, 100)
    assert b == CONFIG + 4096 + HDR
    _ext.heap_free(w, 0, a)
    _ext.heap_free(w, 0, b)
    assert free_elems(w) == [(CONFIG, 8192)]


def test_find_free_pages_and_remove_memory():
    pg = 64 * 1024
    w = new_heap(MiB)
    assert _ext.heap_find_free_pages(w, 0, pg) == (CONFIG, MiB)
    a = _ext.heap_alloc(w, 0, 100)  # busy [CONFIG, CONFIG + 192)
    off, ln = _ext.heap_find_free_pages(w, 0, pg)
    assert (off, ln) == (CONFIG + pg, MiB - pg)  # the first page is partly busy
    _ext.heap_remove_memory(w, 0, off + pg, 2 * pg)  # a hole in the middle
    assert free_elems(w) == [(CONFIG + 192, 2 * pg - 192), (CONFIG + 4 * pg, MiB - 4 * pg)]
    assert stats(w)["total"] == MiB - 2 * pg
    _ext.heap_check(w, 0)
    # not inside one free element, or leaving a sliver < a minimum element
    raises_errno(errno.EINVAL, _ext.heap_remove_memory, w, 0, CONFIG, pg)
    raises_errno(errno.EINVAL, _ext.heap_remove_memory, w, 0, CONFIG + 2 * pg, pg)
    raises_errno(errno.EINVAL, _ext.heap_remove_memory, w, 0, CONFIG + 4 * pg + 64, pg)
    raises_errno(errno.EINVAL, _ext.heap_remove_memory, w, 0, CONFIG + MiB - pg, pg + 64)
    raises_errno(errno.EINVAL, _ext.heap_find_free_pages, w, 0, 1000)
    _ext.heap_free(w, 0, a)
    _ext.heap_remove_memory(w, 0, CONFIG, 2 * pg)  # a whole element
    _ext.heap_remove_memory(w, 0, CONFIG + 4 * pg, MiB - 4 * pg)
    assert _ext.heap_walk(w, 0) == []
    raises_errno(errno.ENOENT, _ext.heap_find_free_pages, w, 0, pg)
    assert stats(w)["total"] == 0
    _ext.heap_check(w, 0)
    _ext.heap_add_memory(w, 0, CONFIG, MiB, dirty=True)  # the pages come back
    assert free_elems(w) == [(CONFIG, MiB)]


def test_find_free_pages_keeps_slivers_out():
    pg = 4096
    w = new_heap(MiB, add=0)
    _ext.heap_add_memory(w, 0, CONFIG + 64, 3 * pg - 64)  # starts 64 B past a page
    # [CONFIG+64, CONFIG+pg) is a 4032-byte lead, fine; the end is page aligned
    assert _ext.heap_find_free_pages(w, 0, pg) == (CONFIG + pg, 2 * pg)
    w2 = new_heap(MiB, add=0)
    _ext.heap_add_memory(w2, 0, CONFIG + pg - 64, pg + 64)  # a 64-byte lead: too small
    raises_errno(errno.ENOENT, _ext.heap_find_free_pages, w2, 0, pg)


# --- zeroing --------------------------------------------------------------------------


def test_zmalloc_reads_zero_after_dirty_frees():
    w = new_heap(MiB)
    offs = [_ext.heap_alloc(w, 0, 1000) for _ in range(10)]
    for o in offs:
        w.view(o, 1000)[:] = b"\xff" * 1000
    for o in offs[::2]:
        _ext.heap_free(w, 0, o)
    for o in offs[1::2]:
        _ext.heap_free(w, 0, o)
    for size in (1, 100, 1000, 5000, 20000):
        z = _ext.heap_alloc(w, 0, size, 0, 0, False, True)
        assert bytes(w.view(z, size)) == bytes(size)
        w.view(z, size)[:] = b"\xee" * size
        _ext.heap_free(w, 0, z)
    z = _ext.heap_alloc(w, 0, 900 * 1024, 0, 0, False, True)
    assert bytes(w.view(z, 900 * 1024)) == bytes(900 * 1024)


def test_dirty_memory_added_is_cleared():
    w = new_heap(MiB, add=0)
    w.view(CONFIG, MiB)[:] = b"\x01" * MiB
    _ext.heap_add_memory(w, 0, CONFIG, MiB, dirty=True)
    z = _ext.heap_alloc(w, 0, 4096, 0, 0, False, True)
    assert bytes(w.view(z, 4096)) == bytes(4096)


# --- realloc --------------------------------------------------------------------------


def test_realloc_in_place_and_moving():
    w = new_heap(MiB)
    a = _ext.heap_alloc(w, 0, 1000)
    w.view(a, 1000)[:] = bytes(range(250)) * 4
    assert _ext.heap_realloc(w, 0, a, 5000) == a  # grows into the free space above
    assert _ext.heap_realloc(w, 0, a, 300) == a  # shrinks, the tail becomes free
    assert bytes(w.view(a, 300)) == (bytes(range(250)) * 4)[:300]
    b = _ext.heap_alloc(w, 0, 64)  # now a is boxed in
    a2 = _ext.heap_realloc(w, 0, a, 3000)
    assert a2 != a
    assert bytes(w.view(a2, 300)) == (bytes(range(250)) * 4)[:300]
    raises_errno(errno.EINVAL, _ext.heap_free, w, 0, a)
    a3 = _ext.heap_realloc(w, 0, a2, 3000, 4096)  # new alignment: moves
    assert a3 % 4096 == 0
    assert bytes(w.view(a3, 300)) == (bytes(range(250)) * 4)[:300]
    raises_errno(errno.ENOMEM, _ext.heap_realloc, w, 0, a3, 2 * MiB)
    assert _ext.heap_block_size(w, 0, a3) == 3000  # unchanged after the failure
    raises_errno(errno.EINVAL, _ext.heap_realloc, w, 0, a3, 0)
    raises_errno(errno.EINVAL, _ext.heap_realloc, w, 0, a3 + 64, 10)
    _ext.heap_free(w, 0, a3)
    _ext.heap_free(w, 0, b)
    _ext.heap_check(w, 0)
    assert free_elems(w) == [(CONFIG, MiB)]


# --- locking ---------------------------------------------------------------------------


def _die_holding_lock(w: _ext.Window, corrupt: bool) -> None:
    pid = os.fork()
    if pid == 0:
        _ext.heap_lock(w, 0)
        if corrupt:
            v = w.view(HEAP0 + ALLOC_COUNT, 8)
            v[0] = (v[0] + 5) & 0xFF
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_dead_owner_recovery():
    w = new_heap(MiB)
    a = _ext.heap_alloc(w, 0, 64)
    _die_holding_lock(w, corrupt=False)
    assert _ext.heap_lock(w, 0) is True  # recovered; the heap checked fine
    _ext.heap_unlock(w, 0)
    assert _ext.heap_lock(w, 0) is False
    _ext.heap_unlock(w, 0)
    _ext.heap_free(w, 0, a)


def test_dead_owner_leaving_a_broken_heap():
    w = new_heap(MiB)
    _ext.heap_alloc(w, 0, 64)
    _die_holding_lock(w, corrupt=True)
    raises_errno(errno.EFAULT, _ext.heap_alloc, w, 0, 64)
    raises_errno(errno.EFAULT, _ext.heap_alloc, w, 0, 64)  # and stays refused
    raises_errno(errno.EFAULT, _ext.heap_lock, w, 0)


def test_contended_lock_releases_the_gil():
    # If a blocked heap_alloc kept the GIL, the main thread (holding the heap lock)
    # could never run again: run in a subprocess with a timeout.
    code = textwrap.dedent(
        """
        import threading, time
        from memd import _ext
        w = _ext.Window.anonymous(4 << 20)
        _ext.heap_init(w, 0, 0)
        _ext.heap_add_memory(w, 0, 2 << 20, 2 << 20)
        _ext.heap_lock(w, 0)
        got = []
        t = threading.Thread(target=lambda: got.append(_ext.heap_alloc(w, 0, 64)))
        t.start()
        time.sleep(0.2)
        n = sum(range(100000))  # needs the GIL while the thread waits for the lock
        assert not got
        _ext.heap_unlock(w, 0)
        t.join()
        assert got and n
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        check=False,
    )
    assert r.stdout.strip() == "ok", r.stderr


# --- property-based: a shadow model ------------------------------------------------------

PG = 64 * 1024  # the model's page: memory comes and goes in these
NPAGES = 128  # 8 MiB of heap space


class HeapMachine(RuleBasedStateMachine):
    """Random malloc/zmalloc/free/realloc/add/remove against a shadow model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = new_heap(NPAGES * PG, add=0)
        self.present: set[int] = set()  # model pages in the heap
        self.used: set[int] = set()  # pages that were ever in the heap (dirty)
        self.live: dict[int, tuple[int, int, int, int]] = {}  # off -> size, align, bound, stamp
        self.stamp = 0
        self._add(0, 32)

    def _add(self, first: int, n: int) -> None:
        pages = set(range(first, first + n))
        dirty = bool(pages & self.used)
        _ext.heap_add_memory(self.w, 0, CONFIG + first * PG, n * PG, dirty=dirty)
        self.present |= pages
        self.used |= pages

    def _next_stamp(self) -> int:
        self.stamp = self.stamp % 255 + 1
        return self.stamp

    def _fill(self, off: int, size: int, stamp: int) -> None:
        self.w.view(off, size)[:] = bytes((stamp,)) * size

    sizes = st.one_of(st.integers(1, 256), st.integers(257, 20000), st.sampled_from([64, 4096]))
    aligns = st.sampled_from([0, 0, 0, 64, 128, 256, 4096, 65536])
    bounds = st.sampled_from([0, 0, 0, 4096, 32768, 65536])

    @rule(size=sizes, align=aligns, bound=bounds, zero=st.booleans())
    def malloc(self, size: int, align: int, bound: int, zero: bool) -> None:
        try:
            off = _ext.heap_alloc(self.w, 0, size, align, bound, False, zero)
        except OSError as e:
            if bound and bound < size:
                assert e.errno == errno.EINVAL
            else:
                assert e.errno == errno.ENOMEM
            return
        assert not (bound and bound < size)
        assert off % max(align, 64) == 0
        if bound:
            assert off // bound == (off + size - 1) // bound
        if zero:
            assert bytes(self.w.view(off, size)) == bytes(size)
        stamp = self._next_stamp()
        self._fill(off, size, stamp)
        self.live[off] = (size, align, bound, stamp)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        off = data.draw(st.sampled_from(sorted(self.live)))
        self.live.pop(off)
        assert _ext.heap_free(self.w, 0, off) >= MIN_ELEM
        raises_errno(errno.EINVAL, _ext.heap_free, self.w, 0, off)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), size=sizes, align=st.sampled_from([0, 0, 256, 4096]))
    def realloc(self, data: st.DataObject, size: int, align: int) -> None:
        off = data.draw(st.sampled_from(sorted(self.live)))
        old, _, _, stamp = self.live[off]
        try:
            new = _ext.heap_realloc(self.w, 0, off, size, align)
        except OSError as e:
            assert e.errno == errno.ENOMEM
            assert _ext.heap_block_size(self.w, 0, off) == old
            return
        assert new % max(align, 64) == 0
        keep = min(old, size)
        assert bytes(self.w.view(new, keep)) == bytes((stamp,)) * keep
        del self.live[off]
        stamp = self._next_stamp()
        self._fill(new, size, stamp)
        self.live[new] = (size, align, 0, stamp)

    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, 24))
    def add_memory(self, first: int, n: int) -> None:
        n = min(n, NPAGES - first)
        if set(range(first, first + n)) & self.present:
            raises_errno(errno.EINVAL, _ext.heap_add_memory, self.w, 0, CONFIG + first * PG, n * PG)
        else:
            self._add(first, n)

    @rule()
    def release_pages(self) -> None:
        try:
            off, ln = _ext.heap_find_free_pages(self.w, 0, PG)
        except OSError as e:
            assert e.errno == errno.ENOENT
            return
        assert off % PG == 0 and ln % PG == 0 and ln
        pages = set(range((off - CONFIG) // PG, (off - CONFIG + ln) // PG))
        assert pages <= self.present
        for o, (size, *_rest) in self.live.items():
            assert o + size <= off or o >= off + ln
        _ext.heap_remove_memory(self.w, 0, off, ln)
        self.present -= pages

    @invariant()
    def heap_is_consistent(self) -> None:
        _ext.heap_check(self.w, 0)
        s = stats(self.w)
        assert s["total"] == len(self.present) * PG
        assert s["alloc_count"] == len(self.live)
        assert s["alloc"] + s["free"] == s["total"]
        assert s["greatest"] <= s["free"]
        walk = _ext.heap_walk(self.w, 0)
        busy = {o + HDR: ds for o, _, state, ds in walk if state == BUSY}
        assert busy == {off: v[0] for off, v in self.live.items()}
        assert s["free_count"] == sum(1 for e in walk if e[2] == FREE)
        assert s["greatest"] == max((e[1] for e in walk if e[2] == FREE), default=0)
        end = 0
        for off in sorted(self.live):  # no overlap; data intact; alignment, bound
            size, align, bound, stamp = self.live[off]
            assert off >= end
            end = off + size
            assert off % max(align, 64) == 0
            if bound:
                assert off // bound == (off + size - 1) // bound
            assert bytes(self.w.view(off, size)).count(stamp) == size
        for o, _, _, _ in walk:  # every element lies in memory that was added
            assert (o - CONFIG) // PG in self.present

    def teardown(self) -> None:
        for off in list(self.live):
            _ext.heap_free(self.w, 0, off)
        _ext.heap_check(self.w, 0)
        runs = []
        for p in sorted(self.present):
            if runs and runs[-1][1] == p:
                runs[-1][1] = p + 1
            else:
                runs.append([p, p + 1])
        expect = [(CONFIG + a * PG, (b - a) * PG) for a, b in runs]
        assert free_elems(self.w) == expect
        assert _ext.heap_walk(self.w, 0) == [(o, s, FREE, 0) for o, s in expect]


TestHeapMachine = HeapMachine.TestCase
TestHeapMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- cross-process ------------------------------------------------------------------------


def _child_worker(w: _ext.Window, seed: int, wfd: int) -> None:
    rng = random.Random(seed)
    live: dict[int, tuple[int, int]] = {}
    for i in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            size, stamp = live.pop(off)
            assert bytes(w.view(off, size)).count(stamp) == size
            _ext.heap_free(w, 0, off)
        else:
            size = rng.choice((rng.randint(1, 256), rng.randint(1, 8192)))
            align = rng.choice((0, 0, 256, 4096))
            off = _ext.heap_alloc(w, 0, size, align)
            stamp = (seed * 97 + i) % 255 + 1
            w.view(off, size)[:] = bytes((stamp,)) * size
            live[off] = (size, stamp)
    for off, (size, stamp) in live.items():
        assert bytes(w.view(off, size)).count(stamp) == size
    os.write(wfd, json.dumps(sorted((o, s, t) for o, (s, t) in live.items())).encode())


def test_two_processes_share_a_heap():
    w = new_heap(16 * MiB)
    children = []
    for seed in (1, 2):
        r, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                _child_worker(w, seed, wr)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(wr)
        children.append((pid, r))
    blocks = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        blocks += json.loads(out)
    _ext.heap_check(w, 0)
    assert stats(w)["alloc_count"] == len(blocks)
    end = 0
    for off, size, stamp in sorted(blocks):
        assert off >= end, "blocks of the two processes overlap"
        end = off + size
        assert bytes(w.view(off, size)).count(stamp) == size
    for off, _, _ in blocks:
        _ext.heap_free(w, 0, off)
    assert free_elems(w) == [(CONFIG, 16 * MiB)]


# --- leaks ------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE")


def test_no_leaks():
    m = AnonymousMemory(heap_size=8 * MiB, prealloc=8 * MiB, release=False)
    w = m.window

    def work(n: int) -> None:
        for _ in range(n):
            b = m.malloc(64)
            mv = memoryview(b)
            mv[0] = 1
            mv.release()
            m.free(b)
            _ext.heap_free(w, 0, _ext.heap_alloc(w, 0, 128))
            b = _ext.heap_malloc(w, (0,), 100, 0, 0, False, True, None)
            _ext.heap_free_block(w, b)
            with contextlib.suppress(MemdValueError):
                m.free(b)

    work(20_000)
    before = _rss()
    work(200_000)
    grown = _rss() - before
    assert grown < 2 * MiB, f"RSS grew by {grown} bytes"
    assert m.heap_stats()["alloc_count"] == 0


# --- HeapMixin ---------------------------------------------------------------------------


def test_mixin_basics():
    m = AnonymousMemory(heap_size=8 * MiB, prealloc=8 * MiB, release=False)
    b = m.malloc(100)
    assert isinstance(b, _ext.Block)
    assert (b.size, b.heap, len(b)) == (100, 0, 100)
    assert b.offset % 64 == 0
    assert b.iova == m.window.address + b.offset
    b.buf[:5] = b"hello"
    assert bytes(m.window.view(b.offset, 5)) == b"hello"
    m.validate(b)
    m.free(b)
    assert b.freed
    with pytest.raises(StaleHandle):  # a MemdError, as every stale handle's
        memoryview(b)
    with pytest.raises(MemdValueError):
        m.free(b)
    with pytest.raises(MemdValueError):
        m.validate(b)
    a = m.malloc(10, align=4096)
    assert a.offset % 4096 == 0
    z = m.zmalloc(size=5000, socket_id=0)
    assert bytes(z) == bytes(5000)
    c = m.calloc(10, 30)
    assert c.size == 300
    assert bytes(c) == bytes(300)
    s = m.heap_stats(0)
    assert list(s) == [
        "heap_totalsz_bytes",
        "heap_freesz_bytes",
        "heap_allocsz_bytes",
        "greatest_free_size",
        "free_count",
        "alloc_count",
    ]
    assert s["alloc_count"] == 3
    assert s["heap_totalsz_bytes"] == s["heap_freesz_bytes"] + s["heap_allocsz_bytes"]
    for blk in (a, z, c):
        m.free(blk)
    assert m.heap_stats()["alloc_count"] == 0


def test_mixin_errors():
    m = AnonymousMemory(heap_size=4 * MiB, prealloc=4 * MiB, release=False)
    for args, kw in (((0,), {}), ((-5,), {}), ((64,), {"align": 3}), ((64,), {"align": -64})):
        with pytest.raises(MemdValueError):
            m.malloc(*args, **kw)
    with pytest.raises(ValueError):  # built-in base class
        m.malloc(0)
    with pytest.raises(MemdMemoryError, match="could not grow"):
        m.malloc(64 * MiB)
    with pytest.raises(MemoryError):
        m.malloc(2**64)
    with pytest.raises(MemdMemoryError):
        m.calloc(2**40, 2**40)
    with pytest.raises(MemdValueError):
        m.calloc(0, 5)
    with pytest.raises(MemdValueError):
        m.heap_alloc(100, bound=64)
    with pytest.raises(TypeError):
        m.malloc(64, nope=1)
    with pytest.raises(MemdValueError):
        m.free(b"not a block")
    other = AnonymousMemory(heap_size=4 * MiB, prealloc=4 * MiB, release=False)
    b = other.malloc(64)
    with pytest.raises(MemdValueError, match="another window"):
        m.free(b)
    other.free(b)


def test_mixin_validate_raises_corruption():
    m = AnonymousMemory(heap_size=4 * MiB, prealloc=4 * MiB, release=False)
    b = m.malloc(64)
    m.window.view(b.offset + 64, 1)[0] ^= 1  # overflow by one byte
    with pytest.raises(CorruptionError, match="past its end"):
        m.validate(b)
    with pytest.raises(CorruptionError):
        m.free(b)
    assert not b.freed
    m.window.view(b.offset + 64, 1)[0] ^= 1
    m.free(b)
    c = m.malloc(64)
    m.window.view(c.offset - 64, 1)[0] ^= 1  # underflow into the header
    with pytest.raises(CorruptionError, match="before its start"):
        m.validate(c)


def test_mixin_expands_and_releases():
    m = AnonymousMemory(heap_size=8 * MiB, page_size=MiB)
    assert m.heap_stats()["heap_totalsz_bytes"] == 0
    blocks = [m.malloc(300_000) for _ in range(12)]
    assert m.expansions >= 3
    total = m.heap_stats()["heap_totalsz_bytes"]
    assert total == sum(m.mapped[0]) * MiB
    for b in blocks:
        b.buf[:] = b"\xab" * b.size
    for b in blocks:
        m.free(b)
    assert m.releases >= 1
    assert m.heap_stats()["heap_totalsz_bytes"] == 0  # every page given back
    z = m.zmalloc(300_000)  # re-added pages are dirty: zmalloc clears them
    assert bytes(z) == bytes(300_000)
    with pytest.raises(MemdMemoryError):
        m.malloc(9 * MiB)
    _ext.heap_check(m.window, 0)


def test_mixin_realloc():
    m = AnonymousMemory(heap_size=2 * MiB, n_heaps=2, prealloc=2 * MiB, release=False)
    b = m.malloc(1000)
    b.buf[:] = bytes(range(200)) * 5
    b2 = m.realloc(b, 4000)
    assert b.freed and not b2.freed
    assert b2.offset == b.offset  # in place
    assert bytes(b2)[:1000] == bytes(range(200)) * 5
    blocker = m.malloc(64)  # b2 cannot grow in place any more
    # too big for what is left of heap 0, fits heap 1: moved across heaps
    b3 = m.realloc(b2, 2 * MiB - 4096)
    assert b3.heap == 1
    assert bytes(b3)[:1000] == bytes(range(200)) * 5
    with pytest.raises(MemdValueError):
        m.realloc(b2, 10)
    with pytest.raises(MemdMemoryError):
        m.realloc(b3, 3 * MiB)
    assert not b3.freed
    with pytest.raises(MemdValueError):
        m.realloc(b3, 0)
    m.free(b3)
    m.free(blocker)
    assert m.heap_stats()["alloc_count"] == 0


def test_mixin_heap_order_and_sockets():
    m = AnonymousMemory(heap_size=MiB, n_heaps=2, page_size=MiB, prealloc=MiB, release=False)
    assert m.malloc(64, socket_id=1).heap == 1
    assert m.malloc(64).heap == 0
    big = [m.malloc(200_000) for _ in range(8)]  # heap 0 fills up, then heap 1
    assert {b.heap for b in big} == {0, 1}
    with pytest.raises(MemdValueError):
        m.malloc(64, socket_id=5)
    assert m.heap_stats(1)["alloc_count"] + m.heap_stats(0)["alloc_count"] == 10
    assert m.heap_stats()["alloc_count"] == 10


def test_space_needed_is_enough():
    rng = random.Random(5)
    for _ in range(300):
        size = rng.randint(1, 300_000)
        align = rng.choice((0, 64, 128, 4096, 65536))
        bound = rng.choice((0, 0, 1 << max(size - 1, 1).bit_length(), 1 << 20))
        if bound and bound < size:
            continue
        need = space_needed(size, align, bound)
        region = -(-need // 65536) * 65536
        w = new_heap(region + 65536, add=0)
        _ext.heap_add_memory(w, 0, CONFIG + 65536, region)
        _ext.heap_alloc(w, 0, size, align, bound)


def test_mixin_is_a_heapbase():
    assert issubclass(HeapMixin, _ext.HeapBase)
    m = AnonymousMemory(heap_size=MiB, page_size=MiB, prealloc=MiB, release=False)
    b = m.malloc(64)
    del m  # the block keeps the Memory (its owner) and the window alive
    assert b.owner is not None
    b.owner.free(b)


def test_threads_share_a_memory():
    m = AnonymousMemory(heap_size=8 * MiB, n_heaps=2, prealloc=8 * MiB, release=False)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(5000):
                b = m.malloc(64 + i % 500, socket_id=-1 if k % 2 else 0)
                b.buf[0] = k
                m.free(b)
                if i % 500 == 0:
                    m._heap_reset()  # the C caches may vanish under a waiting thread
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for idx in (0, 1):
        _ext.heap_check(m.window, idx)
    assert m.heap_stats()["alloc_count"] == 0


def test_a_thread_relocking_its_own_heap_lock_gets_edeadlk_not_a_hang() -> None:
    """No path may wait on a lock it holds: such a bug raises at once."""
    mem = AnonymousMemory(heap_size=8 << 20, prealloc=8 << 20, release=False)
    _ext.heap_lock(mem.window, 0)
    try:
        with pytest.raises(OSError) as e:
            _ext.heap_lock(mem.window, 0)
        assert e.value.errno == errno.EDEADLK
        other: list[bool] = []

        def lock_and_unlock() -> None:
            other.append(_ext.heap_lock(mem.window, 0))
            _ext.heap_unlock(mem.window, 0)

        t = threading.Thread(target=lock_and_unlock)
        t.start()
        t.join(0.2)
        assert t.is_alive(), "another thread must wait for the lock, not fail"
    finally:
        _ext.heap_unlock(mem.window, 0)
    t.join(10)
    assert not t.is_alive() and other == [False]
    mem.free(mem.malloc(64))


def test_none_block_edges_follow_dpdk():
    """rte_realloc(NULL, n) is rte_malloc(n); rte_free(NULL) does nothing; a None
    or foreign object given where a Block belongs is a MemdValueError, not an
    AttributeError or TypeError."""
    m = AnonymousMemory(heap_size=2 * MiB, n_heaps=2, prealloc=2 * MiB, release=False)
    b = m.realloc(None, 1024)
    assert b.size == 1024 and not b.freed
    b.buf[:4] = b"dpdk"
    m.validate(b)
    aligned = m.realloc(None, 100, 4096, socket_id=1)
    assert aligned.offset % 4096 == 0 and aligned.heap == 1
    with pytest.raises(MemdValueError, match="size must be > 0"):
        m.realloc(None, 0)
    for bad in (None, 3, "block"):
        with pytest.raises(MemdValueError, match="expected a Block"):
            m.validate(bad)  # type: ignore[arg-type]
    with pytest.raises(MemdValueError, match="expected a Block or None"):
        m.realloc(3, 10)  # type: ignore[arg-type]
    before = m.heap_stats()
    m.free(None)  # no-op, as rte_free(NULL)
    assert m.heap_stats() == before
    m.free(b)
    m.free(aligned)
    assert m.heap_stats()["alloc_count"] == 0
    _ext.heap_check(m.window, 0)


# --- allocation serials ------------------------------------------------------------------


def _u32(w: _ext.Window, off: int) -> int:
    return int.from_bytes(w.view(off, 4), "little")


def test_every_allocation_and_realloc_takes_the_next_serial():
    w = new_heap(MiB)
    start = _u32(w, HEAP0 + ALLOC_SERIAL)
    a = _ext.heap_alloc(w, 0, 1000)
    assert _u32(w, HEAP0 + ALLOC_SERIAL) == start + 1
    assert _u32(w, a - HDR + ELEM_SERIAL) == start + 1
    b = _ext.heap_alloc(w, 0, 64)
    assert _u32(w, b - HDR + ELEM_SERIAL) == start + 2
    assert _ext.heap_realloc(w, 0, a, 500) == a  # in place: a new serial all the same
    assert _u32(w, a - HDR + ELEM_SERIAL) == start + 3
    a2 = _ext.heap_realloc(w, 0, a, 5000)  # boxed in by b: moves
    assert a2 != a and _u32(w, a2 - HDR + ELEM_SERIAL) == start + 4
    _ext.heap_free(w, 0, b)  # a free takes none
    assert _u32(w, HEAP0 + ALLOC_SERIAL) == start + 4
    _ext.heap_free(w, 0, a2)
    _ext.heap_check(w, 0)


def test_serials_skip_zero_when_they_wrap():
    w = new_heap(MiB)
    w.view(HEAP0 + ALLOC_SERIAL, 4)[:] = (2**32 - 1).to_bytes(4, "little")
    a = _ext.heap_alloc(w, 0, 64)
    assert _u32(w, a - HDR + ELEM_SERIAL) == 1 == _u32(w, HEAP0 + ALLOC_SERIAL)
    _ext.heap_free(w, 0, a)


def test_a_stale_block_handle_raises_and_touches_nothing():
    """A second handle to a block (as unpickling makes) raises StaleHandle once the
    block was freed through the first, even after a malloc took the same offset;
    the freeing handle keeps its MemdValueError; a live block's smashed header is
    still CorruptionError."""
    m = AnonymousMemory(heap_size=4 * MiB, prealloc=4 * MiB, release=False)
    blk = m.malloc(64)
    copy = _ext.heap_block(m.window, blk.heap, blk.offset, owner=m)
    assert copy.serial == blk.serial != 0
    m.free(blk)
    new = m.malloc(64)
    assert new.offset == blk.offset and new.serial != blk.serial
    new.buf[:3] = b"new"
    before = m.heap_stats()
    for use in (
        lambda: copy.buf,
        lambda: memoryview(copy),
        lambda: m.free(copy),
        lambda: m.realloc(copy, 1000),
        lambda: m.validate(copy),
    ):
        with pytest.raises(StaleHandle, match=f"the block at offset {blk.offset:#x} was freed"):
            use()
    assert bytes(new.buf[:3]) == b"new" and m.heap_stats() == before
    assert copy.owner_pid is None
    with pytest.raises(MemdValueError, match="already freed"):
        m.free(blk)
    # a realloc through one handle, even in place, leaves the other stale
    other = _ext.heap_block(m.window, new.heap, new.offset, owner=m)
    smaller = m.realloc(new, 32)
    assert smaller.offset == new.offset and smaller.serial != other.serial
    with pytest.raises(StaleHandle):
        other.buf  # noqa: B018
    assert bytes(smaller.buf[:3]) == b"new"
    # a handle to a block freed and joined into its free neighbour (header gone)
    lone = m.malloc(64)
    stale = _ext.heap_block(m.window, lone.heap, lone.offset, owner=m)
    m.free(smaller)
    m.free(lone)
    for use in (lambda: stale.buf, lambda: m.free(stale), lambda: m.validate(stale)):
        with pytest.raises(StaleHandle):
            use()
    assert m.heap_stats()["alloc_count"] == 0
    _ext.heap_check(m.window, 0)
