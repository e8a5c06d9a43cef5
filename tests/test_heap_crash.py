"""Crash safety of the heap (ext/heap.c undo journal) and owner tags.

A forked child arms ``_ext._heap_crash_after(k)`` and runs one heap operation on a
MAP_SHARED anonymous window; at its k-th crash point (before or after a journal
entry, or at the commit) it ``_exit(77)``s holding the heap lock.  The parent then
takes the lock (recovered from a dead owner), and the heap must be exactly as
before the operation: same stats, same element headers, same heap struct.  k runs
from 1 until the child finishes the operation, so every store of every operation
is interrupted once, on both sides.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from support.forking import fork_run, wait_child

from memd import _ext
from memd.errors import MemdValueError
from memd.shm.heap import AnonymousMemory
from memd.testing import Daemon, result, run_secondary
from tests.support.layout import offsets

MiB = 1 << 20
CONFIG = _ext.CONFIG_SIZE
HDR = _ext.HEAP_ELEM_HEADER_SIZE
FREE, BUSY = _ext.HEAP_ELEM_FREE, _ext.HEAP_ELEM_BUSY
HEAP0 = offsets()["memd_config.heaps"]
JOURNAL0 = _ext.LAYOUT["memd_config.heap_journals"][0]
ENTRIES = _ext.LAYOUT["memd_heap_journal.e"][0]
ENTRY = _ext.LAYOUT["memd_heap_journal_entry"]
DIRTY_LO = _ext.LAYOUT["memd_heap_elem.u.free.dirty_lo"][0]  # dirty_hi follows
TOTAL_SIZE = _ext.LAYOUT["memd_heap.total_size"][0]
CRASHED = 77


def new_heap(size: int = MiB, add: int | None = None) -> _ext.Window:
    w = _ext.Window.anonymous(CONFIG + size)
    _ext.heap_init(w, 0, 0)
    if add is None:
        add = size
    if add:
        locked_add(w, CONFIG, add)
    return w


def locked_add(w: _ext.Window, off: int, length: int, dirty: bool = False) -> None:
    _ext.heap_lock(w, 0)
    try:
        _ext.heap_add_memory(w, 0, off, length, dirty)
    finally:
        _ext.heap_unlock(w, 0)


def locked_remove(w: _ext.Window, off: int, length: int) -> None:
    _ext.heap_lock(w, 0)
    try:
        _ext.heap_remove_memory(w, 0, off, length)
    finally:
        _ext.heap_unlock(w, 0)


def stamp(w: _ext.Window, off: int, byte: int) -> None:
    size = _ext.heap_block_size(w, 0, off)
    w.view(off, size)[:] = bytes((byte,)) * size


def snapshot(w: _ext.Window, hulls: bool = True) -> tuple:
    """Everything the heap's state is made of: the heap struct's fields (not the
    lock), stats, every element's 64-byte header (free elements' dirty hulls left
    out unless ``hulls``), and busy elements' whole bodies (data, trailer, slack:
    a rolled-back operation must not have touched a live block's bytes)."""
    heap = bytes(w.view(HEAP0 + 64, 192))
    elems = []
    for off, size, state, data_size in _ext.heap_walk(w, 0):
        hdr = bytes(w.view(off, HDR))
        if state == FREE and not hulls:
            hdr = hdr[:48]
        body = bytes(w.view(off + HDR, size - HDR)) if state == BUSY else b""
        elems.append((off, size, state, data_size, hdr, body))
    return heap, _ext.heap_stats(w, 0), elems


def assert_clean_outside_hulls(w: _ext.Window) -> None:
    """zmalloc's premise: a free element's data reads zero outside its dirty hull."""
    for off, size, state, _ in _ext.heap_walk(w, 0):
        if state != FREE:
            continue
        lo, hi = struct.unpack_from("<QQ", w.view(off + DIRTY_LO, 16))
        data = bytes(w.view(off + HDR, size - HDR))
        nz_lo = len(data) - len(data.lstrip(b"\0"))
        if nz_lo == len(data):
            continue  # all zero
        nz_hi = len(data.rstrip(b"\0"))
        assert lo < hi, f"free element {off:#x} holds data but says it is clean"
        assert lo <= off + HDR + nz_lo and off + HDR + nz_hi <= hi, (
            f"free element {off:#x}: non-zero bytes [{off + HDR + nz_lo:#x}, "
            f"{off + HDR + nz_hi:#x}) outside its dirty hull [{lo:#x}, {hi:#x})"
        )


def run_child(op, k: int) -> int:
    """Fork; the child arms the crash knob at k and runs op.  Its exit code:
    CRASHED (it died at crash point k), 0 (op finished first), 1 (op raised)."""
    return wait_child(fork_run(op, before=lambda: _ext._heap_crash_after(k)))


def sweep(w: _ext.Window, op, *, hulls: bool = True, limit: int = 1000) -> int:
    """Crash op at every crash point; after each crash the heap must be as before.
    Returns the number of crash points op has.  Then op has run once (finished)."""
    _ext.heap_check(w, 0)
    before = snapshot(w, hulls)
    rollbacks = first = _ext.heap_journal(w, 0)[2]
    for k in range(1, limit):
        code = run_child(op, k)
        if code == 0:
            assert _ext.heap_lock(w, 0) is False  # the child finished and unlocked
            _ext.heap_unlock(w, 0)
            _ext.heap_check(w, 0)
            assert _ext.heap_journal(w, 0)[:2] == (0, 0)
            assert_clean_outside_hulls(w)
            assert k > 2, "the operation stored nothing"
            # every crash point but those before an operation's first entry rolled back
            assert rollbacks - first >= k - 4
            return k - 1
        assert code == CRASHED, f"crash point {k}: child exited {code}"
        assert _ext.heap_lock(w, 0) is True, f"crash point {k}: lock not recovered"
        _ext.heap_unlock(w, 0)
        _ext.heap_check(w, 0)
        assert snapshot(w, hulls) == before, f"crash point {k}: heap not rolled back"
        count, overflow, rb, _ = _ext.heap_journal(w, 0)
        assert (count, overflow) == (0, 0)
        assert rb - rollbacks in (0, 1)  # 0: nothing was logged yet (or just committed)
        rollbacks = rb
        assert_clean_outside_hulls(w)
    raise AssertionError(f"op still crashing after {limit} crash points")


def still_works(w: _ext.Window) -> None:
    offs = [_ext.heap_alloc(w, 0, n) for n in (1, 100, 5000)]
    for o in offs:
        _ext.heap_free(w, 0, o)
    _ext.heap_check(w, 0)


# --- the journal itself ---------------------------------------------------------------


def test_layout():
    assert _ext.LAYOUT["memd_heap_journal"] == 4096
    off, size = _ext.LAYOUT["memd_config.heap_journals"]
    assert size == 4096 * _ext.MAX_HEAPS
    pins_off, pins_size = _ext.LAYOUT["memd_config.pins"]  # the view pins follow them
    assert off + size == pins_off and pins_off + pins_size == _ext.LAYOUT["memd_config"] <= CONFIG
    assert _ext.LAYOUT["memd_heap_elem.u.busy.owner_pid"] == (40, 4)
    assert _ext.LAYOUT["memd_heap_elem.u.busy.serial"] == (44, 4)  # the same word
    # in the counters line jbegin saves (snapshot() covers it)
    assert 192 <= _ext.LAYOUT["memd_heap.alloc_serial"][0] < 256
    assert _ext.LAYOUT["memd_heap_elem.flags"] == (6, 2)
    assert _ext.LAYOUT["memd_heap_journal.count"] == (0, 4)
    assert _ext.LAYOUT["memd_heap_journal.overflow"] == (4, 4)
    assert ENTRY == 16
    assert _ext.HEAP_JOURNAL_ENTRIES == 252


def test_journal_is_empty_between_operations():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 100)
    a = _ext.heap_realloc(w, 0, a, 3000)
    _ext.heap_free(w, 0, a)
    assert _ext.heap_journal(w, 0) == (0, 0, 0, 0)


def test_crash_points_are_counted_per_process():
    w = new_heap()
    assert run_child(lambda: _ext.heap_alloc(w, 0, 64), 1) == CRASHED
    assert _ext.heap_lock(w, 0) is True
    _ext.heap_unlock(w, 0)
    # the parent was never armed
    _ext.heap_free(w, 0, _ext.heap_alloc(w, 0, 64))
    assert _ext.heap_journal(w, 0)[:2] == (0, 0)


# --- every operation, interrupted everywhere ----------------------------------------------


def test_malloc_with_tail_split():
    w = new_heap()
    keep = [_ext.heap_alloc(w, 0, n) for n in (100, 200, 300, 400)]
    _ext.heap_free(w, 0, keep[1])  # a small free element before the big one
    n = sweep(w, lambda: _ext.heap_alloc(w, 0, 5000))
    assert n >= 10
    assert _ext.heap_stats(w, 0)[5] == 4
    still_works(w)


def test_the_allocation_serial_rolls_back_with_its_operation():
    """alloc_serial is heap state: a crashed malloc or in-place realloc leaves it as
    before (sweep's snapshot holds it), a finished one has bumped it."""
    serial = _ext.LAYOUT["memd_heap.alloc_serial"][0]
    w = new_heap()

    def now() -> int:
        return int.from_bytes(w.view(HEAP0 + serial, 4), "little")

    a = _ext.heap_alloc(w, 0, 1000)
    before = now()
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 2000))  # grows in place
    assert now() == before + 1
    sweep(w, lambda: _ext.heap_alloc(w, 0, 64))
    assert now() == before + 2
    still_works(w)


def test_malloc_taking_a_whole_free_element():
    w = new_heap()
    a, b, _c = (_ext.heap_alloc(w, 0, 1000) for _ in range(3))
    _ext.heap_free(w, 0, b)
    sweep(w, lambda: _ext.heap_alloc(w, 0, 1000))  # exact fit: no split
    _ext.heap_free(w, 0, a)
    still_works(w)


def test_zmalloc_from_dirty_memory():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 4000)
    stamp(w, a, 0xA5)
    _ext.heap_free(w, 0, a)
    sweep(w, lambda: _ext.heap_alloc(w, 0, 3000, 0, 0, False, True))
    off = next(o for o, _, st, _ in _ext.heap_walk(w, 0) if st == BUSY) + HDR
    assert bytes(w.view(off, 3000)) == bytes(3000)


def test_aligned_malloc_whose_gap_becomes_a_free_element():
    w = new_heap()
    _ext.heap_alloc(w, 0, 64)  # the free element now starts off the 4 KiB grid
    before = len(_ext.heap_walk(w, 0))
    sweep(w, lambda: _ext.heap_alloc(w, 0, 100, 4096))
    walk = _ext.heap_walk(w, 0)
    assert len(walk) == before + 2  # gap + block (+ the tail that was already there)
    busy = [o for o, _, st, _ in walk if st == BUSY]
    assert (busy[-1] + HDR) % 4096 == 0
    still_works(w)


def test_aligned_malloc_with_a_gap_and_no_tail():
    w = new_heap()
    _ext.heap_alloc(w, 0, 100)  # [CONFIG, +192)
    f = _ext.heap_alloc(w, 0, 8000)  # [CONFIG + 192, +8128)
    _ext.heap_alloc(w, 0, 100)
    _ext.heap_free(w, 0, f)
    # data at CONFIG + 4096: the gap [CONFIG + 192, CONFIG + 4032) stays free and the
    # block (4288 bytes with its header) ends exactly where the free element did
    sweep(w, lambda: _ext.heap_alloc(w, 0, 4216, 4096))
    assert _ext.heap_block_size(w, 0, CONFIG + 4096) == 4216
    still_works(w)


def test_aligned_malloc_in_the_middle_of_free_lists():
    w = new_heap()
    blocks = [_ext.heap_alloc(w, 0, 300) for _ in range(8)]
    for b in blocks[::2]:
        _ext.heap_free(w, 0, b)  # four free elements on the same list
    sweep(w, lambda: _ext.heap_alloc(w, 0, 200, 8192))
    still_works(w)


def _three_on_one_list(w: _ext.Window, x: int = 0) -> tuple[int, int, int]:
    """Free elements of 1024, 1536 and 1152 bytes, all on free list 3 (in the order
    1152, 1536, 1024), with busy blocks between; with x, a busy block of x data
    bytes just below the 1536 one; and a busy 1024-byte element at the end.
    Returns the data offsets of the 1536-byte element, of x, and of the last one."""
    sizes = [952, 100] + ([x] if x else []) + [1464, 100, 1080, 100, 952, 100]
    offs = [_ext.heap_alloc(w, 0, n) for n in sizes]
    a, b, c = offs[0], offs[3 if x else 2], offs[-4]
    for o in (a, b, c):
        _ext.heap_free(w, 0, o)
    small = [o for o, sz, st, _ in _ext.heap_walk(w, 0) if st == FREE and sz < 2048]
    assert len(small) == 3
    return b, offs[2] if x else 0, offs[-2]


def test_malloc_from_the_middle_of_a_free_list():
    w = new_heap()
    b, _, _ = _three_on_one_list(w)
    sweep(w, lambda: _ext.heap_alloc(w, 0, 1464))  # the exact fit, mid-list
    assert _ext.heap_block_size(w, 0, b) == 1464
    still_works(w)


def test_free_joining_a_neighbour_in_the_middle_of_a_free_list():
    w = new_heap()
    _, x, _ = _three_on_one_list(w, x=952)
    sweep(w, lambda: _ext.heap_free(w, 0, x))  # joins the 1536 one: 2560, list 4
    still_works(w)


def test_free_taking_over_a_neighbours_place_mid_list():
    w = new_heap()
    _, x, _ = _three_on_one_list(w, x=56)
    sweep(w, lambda: _ext.heap_free(w, 0, x))  # joins the 1536 one: 1664, still list 3
    still_works(w)


def test_free_onto_a_list_that_has_elements():
    w = new_heap()
    _, _, last = _three_on_one_list(w)
    sweep(w, lambda: _ext.heap_free(w, 0, last))  # no free neighbour: the head of list 3
    still_works(w)


def test_bounded_malloc():
    w = new_heap()
    _ext.heap_alloc(w, 0, 900)  # the free space now starts at CONFIG + 1024
    # 1000 bytes never crossing a 2 KiB boundary: moves to the next boundary
    sweep(w, lambda: _ext.heap_alloc(w, 0, 1000, 0, 2048))
    busy = [(o + HDR, ds) for o, _, st, ds in _ext.heap_walk(w, 0) if st == BUSY and ds == 1000]
    ((d, ds),) = busy
    assert d // 2048 == (d + ds - 1) // 2048
    still_works(w)


def test_free_joining_free_neighbours_on_both_sides():
    w = new_heap()
    a, b, c, d = (_ext.heap_alloc(w, 0, 500) for _ in range(4))
    _ext.heap_free(w, 0, a)
    _ext.heap_free(w, 0, c)
    stamp(w, b, 0x5A)
    free_before = _ext.heap_stats(w, 0)[4]
    sweep(w, lambda: _ext.heap_free(w, 0, b))
    assert _ext.heap_stats(w, 0)[4] == free_before - 1  # a + b + c is one element
    _ext.heap_free(w, 0, d)
    assert len(_ext.heap_walk(w, 0)) == 1
    still_works(w)


def test_free_joining_the_top_free_element():
    w = new_heap()
    a, b = _ext.heap_alloc(w, 0, 100), _ext.heap_alloc(w, 0, 100)
    sweep(w, lambda: _ext.heap_free(w, 0, b))  # joins the big free tail only
    _ext.heap_free(w, 0, a)
    still_works(w)


def test_free_without_free_neighbours():
    w = new_heap()
    _a, b, _c = (_ext.heap_alloc(w, 0, 100) for _ in range(3))
    sweep(w, lambda: _ext.heap_free(w, 0, b))
    still_works(w)


def test_realloc_grow_in_place():
    w = new_heap()
    a, b, _c = (_ext.heap_alloc(w, 0, 2000) for _ in range(3))
    _ext.heap_free(w, 0, b)
    stamp(w, a, 0x11)
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 3000))  # into b, with a tail left
    assert _ext.heap_block_size(w, 0, a) == 3000
    still_works(w)


def test_realloc_grow_in_place_taking_the_whole_neighbour():
    w = new_heap()
    a, b, _c = (_ext.heap_alloc(w, 0, 2000) for _ in range(3))
    _ext.heap_free(w, 0, b)
    # 4100 bytes need 4224 = both 2112-byte elements: nothing left for a tail
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 4100))
    assert _ext.heap_block_size(w, 0, a) == 4100
    assert len(_ext.heap_walk(w, 0)) == 3
    still_works(w)


def test_realloc_grow_in_place_into_clean_memory():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 2000)  # the big clean free element follows it
    stamp(w, a, 0x12)
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 9000))
    still_works(w)


def test_realloc_shrink_in_place():
    w = new_heap()
    a, _b = _ext.heap_alloc(w, 0, 5000), _ext.heap_alloc(w, 0, 100)
    stamp(w, a, 0x22)
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 1000))
    assert _ext.heap_block_size(w, 0, a) == 1000
    still_works(w)


def test_realloc_shrink_joining_the_free_neighbour():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 5000)  # the big free element follows it
    stamp(w, a, 0x23)
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 100))
    still_works(w)


def test_realloc_moving():
    w = new_heap()
    a, _b = _ext.heap_alloc(w, 0, 3000), _ext.heap_alloc(w, 0, 100)
    stamp(w, a, 0x33)
    # the move first widens the target's dirty hull as an operation of its own,
    # which an undo keeps: compare headers without the hulls
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 6000), hulls=False)
    (new,) = [o + HDR for o, _, st, ds in _ext.heap_walk(w, 0) if st == BUSY and ds == 6000]
    assert new != a
    assert bytes(w.view(new, 3000)) == b"\x33" * 3000
    still_works(w)


def test_realloc_moving_to_an_aligned_place():
    w = new_heap()
    a, _b = _ext.heap_alloc(w, 0, 3000), _ext.heap_alloc(w, 0, 100)
    stamp(w, a, 0x44)
    sweep(w, lambda: _ext.heap_realloc(w, 0, a, 2000, 16384), hulls=False)
    (new,) = [o + HDR for o, _, st, ds in _ext.heap_walk(w, 0) if st == BUSY and ds == 2000]
    assert new % 16384 == 0
    assert bytes(w.view(new, 2000)) == b"\x44" * 2000


def test_add_memory_joining_the_free_neighbour():
    w = new_heap(MiB, add=MiB // 2)
    _ext.heap_alloc(w, 0, 100)
    sweep(w, lambda: locked_add(w, CONFIG + MiB // 2, MiB // 4))
    assert _ext.heap_stats(w, 0)[0] == 3 * MiB // 4
    still_works(w)


def test_add_memory_with_a_hole_and_dirty():
    w = new_heap(MiB, add=MiB // 2)
    w.view(CONFIG + 3 * MiB // 4, 4096)[:] = b"\x77" * 4096  # old data in the new range
    sweep(w, lambda: locked_add(w, CONFIG + 3 * MiB // 4, MiB // 4, True))
    assert len(_ext.heap_walk(w, 0)) == 2  # not adjacent: two free elements
    still_works(w)


def test_add_memory_below_the_heap():
    w = new_heap(MiB, add=0)
    locked_add(w, CONFIG + MiB // 2, MiB // 2)
    _ext.heap_alloc(w, 0, 64)
    sweep(w, lambda: locked_add(w, CONFIG, MiB // 2))
    still_works(w)


def test_remove_memory_with_lead_and_trail():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 100)
    stamp(w, a, 0x66)
    _ext.heap_free(w, 0, a)  # dirty bytes in the free element
    sweep(w, lambda: locked_remove(w, CONFIG + 64 * 1024, 128 * 1024))
    assert _ext.heap_stats(w, 0)[0] == MiB - 128 * 1024
    still_works(w)


def test_remove_memory_a_whole_element():
    w = new_heap(MiB, add=MiB // 2)
    locked_add(w, CONFIG + 3 * MiB // 4, MiB // 4)  # a separate region
    sweep(w, lambda: locked_remove(w, CONFIG + 3 * MiB // 4, MiB // 4))
    assert _ext.heap_stats(w, 0)[0] == MiB // 2
    still_works(w)


def test_remove_memory_the_first_element():
    w = new_heap(MiB, add=MiB // 4)
    locked_add(w, CONFIG + MiB // 2, MiB // 2)  # a separate region above
    _ext.heap_alloc(w, 0, 300 * 1024)  # lands in the upper region
    sweep(w, lambda: locked_remove(w, CONFIG, MiB // 4))
    assert _ext.heap_walk(w, 0)[0][0] == CONFIG + MiB // 2
    still_works(w)


def test_remove_memory_lead_only_and_trail_only():
    w = new_heap()
    sweep(w, lambda: locked_remove(w, CONFIG + MiB // 2, MiB // 2))  # keeps a lead
    sweep(w, lambda: locked_remove(w, CONFIG, MiB // 4))  # keeps a trail
    assert _ext.heap_stats(w, 0)[0] == MiB // 4
    still_works(w)


def test_free_owned_block_of_a_dead_process():
    w = new_heap()
    a, b = _ext.heap_alloc(w, 0, 100), _ext.heap_alloc(w, 0, 100)
    assert run_child(lambda: _ext.heap_alloc(w, 0, 2000), 0) == 0
    _ext.heap_free(w, 0, a)  # the dead child's block has a free neighbour
    (child,) = [pid for pid, *_ in _ext.heap_owners(w, 0) if pid != os.getpid()]
    sweep(w, lambda: _ext.heap_free_owned(w, 0, child))  # one block: one operation
    assert [pid for pid, *_ in _ext.heap_owners(w, 0)] == [os.getpid()]
    _ext.heap_free(w, 0, b)
    assert len(_ext.heap_walk(w, 0)) == 1


def test_a_crash_inside_free_owned_keeps_the_blocks_already_freed():
    w = new_heap()
    assert run_child(lambda: [_ext.heap_alloc(w, 0, 100) for _ in range(6)], 0) == 0
    (child,) = [pid for pid, *_ in _ext.heap_owners(w, 0)]
    # find a crash point in the middle: after some frees committed
    for k in range(1, 500):
        assert run_child(lambda: _ext.heap_free_owned(w, 0, child), k) in (0, CRASHED)
        _ext.heap_lock(w, 0)
        _ext.heap_unlock(w, 0)
        _ext.heap_check(w, 0)
        left = _ext.heap_owners(w, 0)
        if not left:
            break
        assert 0 < left[0][1] < 7
    assert _ext.heap_owners(w, 0) == []


def test_a_recovery_killed_halfway_is_redone():
    def setup() -> tuple[_ext.Window, int]:
        w = new_heap()
        a, b, c, _d = (_ext.heap_alloc(w, 0, 500) for _ in range(4))
        _ext.heap_free(w, 0, a)
        _ext.heap_free(w, 0, c)
        return w, b

    w, b = setup()
    n = sweep(w, lambda: _ext.heap_free(w, 0, b))  # how many crash points it has
    w, b = setup()
    before = snapshot(w)
    # die at the commit (every store made), then kill each recovery at each of
    # the entries it undoes; a recovery that is not killed finishes the job
    assert run_child(lambda: _ext.heap_free(w, 0, b), n) == CRASHED
    killed = 0
    for j in range(1, 100):
        code = run_child(lambda: (_ext.heap_lock(w, 0), _ext.heap_unlock(w, 0)), j)
        if code == 0:
            break
        assert code == CRASHED
        killed += 1
    assert killed >= 5
    assert _ext.heap_lock(w, 0) is False  # the last child recovered and unlocked
    _ext.heap_unlock(w, 0)
    assert snapshot(w) == before
    _ext.heap_check(w, 0)
    _ext.heap_free(w, 0, b)
    still_works(w)


# --- when the journal cannot be trusted -------------------------------------------------


def _die_holding_lock_with_journal(
    w: _ext.Window, entries: list[tuple[int, int]], overflow: int = 0
) -> None:
    def op() -> None:
        _ext.heap_lock(w, 0)
        for i, (off, old) in enumerate(entries):
            struct.pack_into("<QQ", w.view(JOURNAL0 + ENTRIES + ENTRY * i, 16), 0, off, old)
        struct.pack_into("<II", w.view(JOURNAL0, 8), 0, len(entries), overflow)  # count, overflow
        os._exit(CRASHED)

    assert run_child(op, 0) == CRASHED


def test_an_overflowed_journal_breaks_the_heap():
    w = new_heap()
    _die_holding_lock_with_journal(w, [], overflow=1)
    with pytest.raises(OSError) as ei:
        _ext.heap_lock(w, 0)
    assert ei.value.errno == errno.EFAULT


def test_a_journal_entry_outside_heap_state_breaks_the_heap():
    w = new_heap()
    # the config header is no heap state: nothing is written, the heap is broken
    _die_holding_lock_with_journal(w, [(8, 0xDEAD)])
    with pytest.raises(OSError) as ei:
        _ext.heap_alloc(w, 0, 64)
    assert ei.value.errno == errno.EFAULT
    assert bytes(w.view(8, 8)) == bytes(8)


def test_a_valid_journal_is_undone_by_the_next_locker():
    w = new_heap()
    total = HEAP0 + TOTAL_SIZE  # pretend a dead operation had changed it
    struct.pack_into("<Q", w.view(total, 8), 0, 12345)
    _die_holding_lock_with_journal(w, [(total, MiB)])
    assert _ext.heap_lock(w, 0) is True
    _ext.heap_unlock(w, 0)
    assert _ext.heap_stats(w, 0)[0] == MiB
    assert _ext.heap_journal(w, 0)[:3] == (0, 0, 1)


# --- owner tags -------------------------------------------------------------------------


def test_blocks_record_their_owner():
    m = AnonymousMemory(heap_size=8 * MiB, prealloc=8 * MiB, release=False)
    b = m.malloc(100)
    assert b.owner_pid == os.getpid()
    owners = m.heap_owners()
    assert owners == {
        os.getpid(): {"blocks": 1, "bytes": m.heap_stats()["heap_allocsz_bytes"], "memzones": 0}
    }
    m.free(b)
    assert b.owner_pid is None
    assert m.heap_owners() == {}


def test_realloc_tags_the_resizer():
    w = new_heap()
    a = _ext.heap_alloc(w, 0, 100)
    assert run_child(lambda: _ext.heap_realloc(w, 0, a, 200), 0) == 0  # in place
    ((pid, blocks, _, _),) = _ext.heap_owners(w, 0)
    assert pid != os.getpid() and blocks == 1


def test_free_owned_by_refuses_a_live_process():
    m = AnonymousMemory(heap_size=8 * MiB, prealloc=8 * MiB, release=False)
    b = m.malloc(100)
    with pytest.raises(MemdValueError, match=r"alive.*force=True"):
        m.free_owned_by(os.getpid())
    assert b.owner_pid == os.getpid()
    with pytest.raises(MemdValueError):
        m.free_owned_by(0)
    assert m.free_owned_by(os.getpid(), force=True) == {"blocks": 1, "bytes": 192}
    assert m.heap_stats()["alloc_count"] == 0
    _ext.heap_check(m.window, 0)


def test_free_owned_by_dead_children_and_pages_go_back():
    m = AnonymousMemory(heap_size=16 * MiB, n_heaps=2, page_size=2 * MiB)
    w = m.window
    # map 8 MiB in heap 1 and leave them free (no release: straight through _ext)
    _ext.heap_free_block(w, m.malloc(7 * MiB, socket_id=1))
    pages = m.heap_stats(1)["heap_totalsz_bytes"]
    assert pages >= 8 * MiB
    mine = m.malloc(1000, socket_id=0)
    for n in (2, 3):
        assert (
            run_child(
                lambda n=n: (
                    [_ext.heap_alloc(w, 1, MiB) for _ in range(n)] + [_ext.heap_alloc(w, 0, 100)]
                ),
                0,
            )
            == 0
        )
    owners = m.heap_owners()
    kids = sorted(p for p in owners if p != os.getpid())
    assert len(kids) == 2
    assert sorted(owners[p]["blocks"] for p in kids) == [3, 4]
    assert sum(o["bytes"] for o in owners.values()) == m.heap_stats()["heap_allocsz_bytes"]
    releases = m.releases
    for p in kids:
        got = m.free_owned_by(p)
        assert got["blocks"] == owners[p]["blocks"]
        assert got["bytes"] == owners[p]["bytes"]
    assert set(m.heap_owners()) == {os.getpid()}
    assert m.releases > releases  # whole free pages were offered back
    assert m.heap_stats(1)["heap_totalsz_bytes"] < pages
    assert m.free_owned_by(kids[0]) == {"blocks": 0, "bytes": 0}
    m.free(mine)
    for i in range(2):
        _ext.heap_check(w, i)


def test_memzone_blocks_are_never_freed_by_owner():
    size = CONFIG + 4 * MiB
    w = _ext.Window.anonymous(size)
    _ext.config_format(w, "hjtest", 0, _ext.IOVA_VA, size, 2 * MiB, os.getpid(), 0)
    locked_add(w, CONFIG, 4 * MiB)

    def child() -> None:
        _ext.memzone_reserve(w, "z1", 5000, 0, 0, False, 64, 0, os.getpid())
        _ext.heap_alloc(w, 0, 100)

    assert run_child(child, 0) == 0
    ((pid, blocks, nbytes, zones),) = _ext.heap_owners(w, 0)
    assert (blocks, zones) == (2, 1)
    assert _ext.heap_free_owned(w, 0, pid) == (1, 192)
    assert _ext.heap_owners(w, 0) == [(pid, 1, nbytes - 192, 1)]
    zone = _ext.memzone_lookup(w, "z1")
    _ext.memzone_free(w, zone)
    assert _ext.heap_owners(w, 0) == []
    _ext.heap_check(w, 0)


# --- with a real daemon --------------------------------------------------------------------


def test_a_secondary_killed_inside_malloc_and_what_it_left(daemon: Daemon) -> None:
    proc = run_secondary(
        daemon,
        """
        from memd import _ext
        keep = [mem.malloc(1000) for _ in range(3)]
        mem.memzone_reserve("hj-zone", 4096)
        out(os.getpid())
        _ext._heap_crash_after(5)  # dies inside the next malloc, holding the heap lock
        mem.malloc(5000)
    """,
        check=False,
    )
    assert proc.returncode == CRASHED, proc.stderr
    pid = result(proc)
    with daemon.attach() as mem:
        blk = mem.malloc(5000)  # recovers the heap lock; the half-done malloc is undone
        assert blk.owner_pid == os.getpid()
        owners = mem.heap_owners()
        assert owners[pid]["blocks"] == 4 and owners[pid]["memzones"] == 1
        s = mem.heap_stats()
        assert sum(o["bytes"] for o in owners.values()) == s["heap_allocsz_bytes"]
        got = mem.free_owned_by(pid)
        assert got["blocks"] == 3
        assert mem.heap_stats()["alloc_count"] == s["alloc_count"] - 3
        assert mem.heap_owners()[pid] == {
            "blocks": 1,
            "bytes": owners[pid]["bytes"] - got["bytes"],
            "memzones": 1,
        }
        assert mem.memzone_lookup("hj-zone").length == 4096  # memzones are left alone
        mem.free(blk)
