"""Rings of records (DPDK rte_ring_create_elem) and ring size limits.

Semantics run on an anonymous shared window (inherited across fork); the named
rings, lookups from another process and the size limits run through real daemons
in both modes.
"""

from __future__ import annotations

import array
import collections
import json
import struct

import numpy as np
import pytest
from support.forking import fork_run, wait_child

from memd import _ext
from memd.errors import MemdValueError
from memd.shm.ring import (
    RING_F_EXACT_SZ,
    RING_F_SC_DEQ,
    RING_F_SP_ENQ,
    RING_SZ_MASK,
    Ring,
    ring_memsize,
)
from memd.testing import Daemon, result, run_memctl, run_secondary
from tests.support.layout import offsets

BASE = _ext.CONFIG_SIZE  # offsets below this are the config struct
HDR = 512  # struct memd_ring
REC = np.dtype([("seq", "<u8"), ("x", "<f4"), ("tag", "<i4")])  # 16 bytes


@pytest.fixture(scope="module")
def window() -> _ext.Window:
    return _ext.Window.anonymous(64 << 20)


def rec(i: int, esize: int = 16) -> bytes:
    """Record i: its number, then a pattern, esize bytes in all."""
    return struct.pack("<I", i) + bytes((i + k) & 0xFF for k in range(esize - 4))


# --- geometry and limits -----------------------------------------------------------


def test_layout() -> None:
    lay = offsets()
    assert lay["memd_ring.esize"] == 64
    assert lay["memd_ring"] == HDR and lay["memd_ring.slots"] == HDR
    assert _ext.LAYOUT_VERSION == 6
    assert RING_SZ_MASK == 0x7FFFFFFF  # DPDK's RTE_RING_SZ_MASK


@pytest.mark.parametrize(
    ("count", "flags", "esize", "size", "capacity"),
    [
        (8, 0, 4, 8, 7),
        (8, 0, 16, 8, 7),
        (1024, 0, 24, 1024, 1023),
        (5, RING_F_EXACT_SZ, 12, 8, 5),
        (8, RING_F_EXACT_SZ, 16, 16, 8),
        (2**30, 0, 8, 2**30, 2**30 - 1),  # the most slots there are
        (2**30 - 1, RING_F_EXACT_SZ, 4, 2**30, 2**30 - 1),
    ],
)
def test_memsize_and_capacity(
    window: _ext.Window, count: int, flags: int, esize: int, size: int, capacity: int
) -> None:
    assert ring_memsize(count, flags, esize) == HDR + size * esize
    if HDR + size * esize > 16 << 20:
        return
    r = Ring.create(window, BASE, count, flags, "geo", esize)
    assert (r.size, r.capacity, r.esize, r.memsize) == (size, capacity, esize, HDR + size * esize)
    assert r.info()["esize"] == esize
    assert r.free_count == capacity


@pytest.mark.parametrize("esize", [0, 23, 2, 6, 1, 2**32, 2**32 + 8])
def test_bad_esize_refused(window: _ext.Window, esize: int) -> None:
    with pytest.raises(MemdValueError, match="esize"):
        ring_memsize(8, 0, esize)
    with pytest.raises(MemdValueError):
        Ring.create(window, BASE, 8, 0, "bad", esize)


@pytest.mark.parametrize(
    ("count", "flags"),
    [(2**31, 0), (0x80000000, 0), (2**30, RING_F_EXACT_SZ), (0x7FFFFFFF, RING_F_EXACT_SZ)],
)
def test_more_slots_than_sz_mask_refused(count: int, flags: int) -> None:
    # DPDK: the slots (a power of two) are at most RTE_RING_SZ_MASK
    with pytest.raises(MemdValueError, match="RING_SZ_MASK"):
        ring_memsize(count, flags)


def test_attach_validates_esize(window: _ext.Window) -> None:
    off = BASE + (4 << 20)
    Ring.create(window, off, 8, 0, "v", 16)
    lay = offsets()
    hdr = window.view(off, HDR)
    es = lay["memd_ring.esize"]
    for bad in (0, 6, 24):  # 24: the slots would end past the memsize it claims
        hdr[es : es + 4] = struct.pack("<I", bad)
        with pytest.raises(ValueError, match="no initialised ring"):
            Ring(window, off)
    hdr[es : es + 4] = struct.pack("<I", 16)
    assert Ring(window, off).esize == 16


def test_a_handle_keeps_the_esize_it_checked(window: _ext.Window) -> None:
    off = BASE + (5 << 20)
    r = Ring.create(window, off, 4, RING_F_SP_ENQ | RING_F_SC_DEQ, "k", 8)
    es = offsets()["memd_ring.esize"]
    window.view(off, HDR)[es : es + 4] = struct.pack("<I", 4096)  # another process lies
    assert r.esize == 8
    assert r.enqueue_bulk([1, 2, 3]) == 3 and r.dequeue_bulk(3) == [1, 2, 3]


# --- records -----------------------------------------------------------------------


def test_single_records(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 4, 0, "one", 16)
    assert r.dequeue() is None
    assert r.enqueue(rec(1))
    assert r.enqueue(bytearray(rec(2)))
    assert r.enqueue(memoryview(rec(3)), timeout=0.01)
    assert not r.enqueue(rec(4))  # full: capacity 3
    assert r.count == 3 and r.full()
    got = [r.dequeue(), r.dequeue(timeout=1), r.dequeue()]
    assert got == [rec(1), rec(2), rec(3)] and all(type(g) is bytes for g in got)
    assert r.dequeue(timeout=0.01) is None and r.empty()


def test_bad_records_lose_nothing(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8, 0, "bad", 16)
    assert r.enqueue(rec(0))
    for wrong in (b"", rec(1)[:15], rec(1) + b"x", rec(1, 20)):
        with pytest.raises(MemdValueError, match="16 bytes"):
            r.enqueue(wrong)
    with pytest.raises(TypeError):
        r.enqueue(7)  # ints are for 8-byte rings
    with pytest.raises(TypeError):
        r.enqueue("sixteen chars!!!")
    with pytest.raises(MemdValueError, match="whole number"):
        r.enqueue_bulk(rec(1) + b"x")
    with pytest.raises(MemdValueError, match="record 1 is 15 bytes"):
        r.enqueue_burst([rec(1), rec(2)[:15], rec(3)])
    with pytest.raises(TypeError):
        r.enqueue_bulk([rec(1), 5])
    with pytest.raises(TypeError):
        r.enqueue_bulk(5)
    assert r.count == 1  # every refused call enqueued nothing
    with pytest.raises(MemdValueError, match="whole number"):
        r.dequeue_bulk_into(bytearray(17))
    with pytest.raises(BufferError):  # read-only
        r.dequeue_burst_into(bytes(16))
    assert r.count == 1  # ... and dequeued nothing
    assert r.dequeue() == rec(0)


def test_bulk_and_burst(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8, RING_F_SP_ENQ | RING_F_SC_DEQ, "bb", 12)
    recs = [rec(i, 12) for i in range(10)]
    assert r.enqueue_bulk(recs[:8]) == 0  # capacity 7: all or nothing
    assert r.enqueue_bulk(recs[:5]) == 5
    assert r.enqueue_bulk(b"".join(recs[5:8])) == 0  # 3 do not fit in 2
    assert r.enqueue_burst(b"".join(recs[5:8])) == 2  # one buffer, records back to back
    assert r.full()
    assert r.dequeue_bulk(8) == []  # more than there are
    assert r.dequeue_bulk(3) == recs[:3]
    assert r.dequeue_burst(100) == recs[3:7]
    assert r.dequeue_burst(4) == [] and r.dequeue_bulk(0) == []
    assert r.enqueue_bulk([]) == 0 and r.enqueue_bulk(b"") == 0
    assert r.enqueue_bulk(tuple(recs[:2])) == 2
    assert r.enqueue_bulk(iter([recs[2]])) == 1  # any iterable of bytes-likes
    assert r.dequeue_bulk(3) == recs[:3]
    with pytest.raises(ValueError, match="can never fit"):
        r.enqueue_bulk(recs[:8], timeout=1)
    with pytest.raises(ValueError, match="can never fit"):
        r.dequeue_bulk(8, timeout=1)


def test_into_buffers(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 16, 0, "into", 8 * 3)
    recs = [rec(i, 24) for i in range(6)]
    assert r.enqueue_bulk(recs) == 6
    out = bytearray(24 * 4)
    assert r.dequeue_bulk_into(out) == 4
    assert bytes(out) == b"".join(recs[:4])
    assert r.dequeue_bulk_into(out) == 0  # only 2 left: all or nothing
    assert bytes(out) == b"".join(recs[:4])
    words = array.array("Q", bytes(24 * 3))  # any format: only the length counts
    assert r.dequeue_burst_into(words) == 2
    assert words.tobytes() == b"".join(recs[4:]) + bytes(24)
    assert r.dequeue_burst_into(memoryview(out)[:0]) == 0


def test_numpy_structured_round_trip(window: _ext.Window) -> None:
    assert REC.itemsize == 16
    r = Ring.create(window, BASE, 64, RING_F_SP_ENQ | RING_F_SC_DEQ, "np", REC.itemsize)
    a = np.zeros(40, dtype=REC)
    a["seq"] = np.arange(40) * 3
    a["x"] = np.linspace(0, 1, 40, dtype=np.float32)
    a["tag"] = -np.arange(40)
    assert r.enqueue_bulk(a[:25]) == 25  # read in place
    assert r.enqueue_burst(a[25:]) == 15
    assert r.enqueue(a[0].tobytes())  # one record, as bytes
    out = np.empty(41, dtype=REC)
    assert r.dequeue_bulk_into(out) == 41  # written in place
    assert np.array_equal(out[:40], a) and out[40] == a[0]
    assert r.enqueue_bulk(a[:3]) == 3
    back = np.frombuffer(b"".join(r.dequeue_burst(10)), dtype=REC)
    assert np.array_equal(back, a[:3])
    with pytest.raises((ValueError, BufferError)):
        r.enqueue_bulk(a[::2])  # not contiguous
    with pytest.raises(MemdValueError):
        r.enqueue_bulk(np.zeros(3, dtype=np.uint32))  # 12 bytes: not whole records


def test_records_in_order_across_wraparound(window: _ext.Window) -> None:
    """Against a deque model, with slot indices wrapping many times."""
    r = Ring.create(window, BASE, 8, RING_F_EXACT_SZ, "wrap", 20)  # size 16, capacity 8
    model: collections.deque[bytes] = collections.deque()
    n = 0
    for step in range(400):
        k = step % 7 + 1
        recs = [rec(n + i, 20) for i in range(k)]
        moved = r.enqueue_burst(recs)
        assert moved == min(k, 8 - len(model))
        model.extend(recs[:moved])
        n += moved
        want = (step * 5) % 6
        got = r.dequeue_burst(want)
        assert got == [model.popleft() for _ in range(len(got))]
        assert len(got) == min(want, len(got) + len(model)) and r.count == len(model)


def test_int_ring_is_unchanged(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)  # esize 8: uint64 entries as ints
    assert r.esize == 8 and r.memsize == HDR + 8 * 8
    assert r.enqueue(2**64 - 1) and r.enqueue_bulk([1, 2]) == 2
    assert r.dequeue() == 2**64 - 1 and r.dequeue_bulk(2) == [1, 2]
    with pytest.raises(TypeError):
        r.enqueue(b"12345678")


def test_records_between_processes(window: _ext.Window) -> None:
    """A forked consumer sleeps for records and sends back what it got."""
    to_child = Ring.create(window, BASE, 16, RING_F_SP_ENQ | RING_F_SC_DEQ, "down", 32)
    back = Ring.create(window, BASE + (1 << 20), 64, 0, "up", 32)

    def child() -> None:
        first = to_child.dequeue(timeout=60)
        rest = to_child.dequeue_bulk(9, timeout=60)
        assert back.enqueue_bulk([first, *rest], timeout=60) == 10

    pid = fork_run(child)
    recs = [rec(i, 32) for i in range(10)]
    assert to_child.enqueue(recs[0], timeout=60)
    assert to_child.enqueue_bulk(recs[1:], timeout=60) == 9
    assert wait_child(pid) == 0
    out = bytearray(32 * 10)
    assert back.dequeue_bulk_into(out, timeout=60) == 10
    assert bytes(out) == b"".join(recs)


# --- named rings through a daemon (both modes) ----------------------------------------


def test_named_record_ring_across_processes(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        r = mem.ring_create("recs", 64, esize=24)
        assert r.esize == 24 and r.info()["esize"] == 24
        recs = [rec(i, 24) for i in range(20)]
        assert r.enqueue_bulk(b"".join(recs)) == 20
        got = result(
            run_secondary(
                daemon,
                """
            r = mem.ring_lookup("recs")
            recs = r.dequeue_burst(100)
            assert all(type(x) is bytes for x in recs)
            back = mem.ring_create("back", 32, esize=24, flags=mc.RING_F_SP_ENQ)
            assert back.enqueue_bulk(list(reversed(recs))) == len(recs)
            out([r.esize, r.info()["esize"], r.capacity, len(recs), [x.hex() for x in recs]])
            """,
            )
        )
        assert got == [24, 24, 63, 20, [x.hex() for x in recs]]
        back = mem.ring_lookup("back")
        assert back.esize == 24 and back.flags & RING_F_SP_ENQ
        out = np.empty(20, dtype=np.dtype((np.void, 24)))
        assert back.dequeue_bulk_into(out) == 20
        assert [bytes(x) for x in out] == recs[::-1]
        ints = mem.ring_create("ints", 16)
        assert mem.ring_lookup("ints").esize == 8 and ints.enqueue(5)
        # the primary reads the esize too: memctl rings (through /ring/info)
        ctl = run_memctl(
            "--runtime-dir", str(daemon.runtime_dir), "--file-prefix", daemon.prefix,
            "--json", "rings",
        )  # fmt: skip
        assert ctl.returncode == 0, ctl.stderr
        assert {row["name"]: row["esize"] for row in json.loads(ctl.stdout)} == {
            "recs": 24,
            "back": 24,
            "ints": 8,
        }
        table = run_memctl(
            "--runtime-dir", str(daemon.runtime_dir), "--file-prefix", daemon.prefix, "rings"
        ).stdout.splitlines()  # fmt: skip
        col = table[0].split().index("Esize")
        assert {ln.split()[0]: ln.split()[col] for ln in table[1:4]} == {
            "recs": "24",
            "back": "24",
            "ints": "8",
        }
        for x in (r, back, ints):
            mem.ring_free(x)


def test_bad_esize_creates_nothing(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        for esize in (23, 0):
            with pytest.raises(MemdValueError):
                mem.ring_create("odd", 64, esize=esize)
        assert mem.rings() == [] and mem.memzones() == []


def test_oversized_rings_fail_before_any_growth(daemon: Daemon) -> None:
    """rte_ring_create refuses what can never be: no heap growth is tried."""
    with daemon.attach() as mem:
        before = mem.info()["mapped_bytes"]
        with pytest.raises(MemdValueError, match="RING_SZ_MASK"):
            mem.ring_create("huge", 0x80000000)
        with pytest.raises(MemdValueError, match="RING_SZ_MASK"):
            mem.ring_create("huge", 2**30, flags=RING_F_EXACT_SZ)
        # a count within the limit, with records too big for any memseg list
        largest = mem._largest_block(-1)
        esize = (largest >> 20) // 4 * 4 + 4
        assert ring_memsize(1 << 20, 0, esize) > largest
        with pytest.raises(MemdValueError, match="more than a heap here can ever hold"):
            mem.ring_create("huge", 1 << 20, esize=esize)
        assert mem.info()["mapped_bytes"] == before  # no page was added
        assert mem.rings() == [] and mem.memzones() == []
        small = mem.ring_create("huge", 1024, esize=16)  # the name was never taken
        assert small.capacity == 1023
        mem.ring_free(small)


def test_ring_memsize_is_what_the_memzone_holds(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        r = mem.ring_create("sized", 100, flags=RING_F_EXACT_SZ, esize=40)
        assert r.capacity == 100 and r.size == 128
        assert r.memsize == ring_memsize(100, RING_F_EXACT_SZ, 40) == HDR + 128 * 40
        assert mem.memzone_lookup("RG_sized").length >= r.memsize
        mem.ring_free(r)


# --- crash safety with records -------------------------------------------------------


@pytest.mark.parametrize("flags", [0, RING_F_SP_ENQ | RING_F_SC_DEQ], ids=["mpmc", "spsc"])
def test_records_survive_a_process_killed_at_every_step(window: _ext.Window, flags: int) -> None:
    """The crash knob kills a child at step k of one record operation (after the
    claim, after each slot, before and after the tail store): a dead producer's
    unpublished records are absent, a dead consumer's unreleased ones stay, whole."""
    n, steps = 3, 3 + 3
    for k in range(steps + 1):
        r = Ring.create(window, BASE, 8, flags, "crash", 20)
        assert r.enqueue_bulk([rec(i, 20) for i in range(6)]) == 6
        assert r.dequeue_bulk(5) == [rec(i, 20) for i in range(5)]  # the slots wrap below
        vals = [rec(100 + 10 * k + i, 20) for i in range(n)]
        pid = fork_run(
            lambda r=r, vals=vals: r.enqueue_bulk(vals), lambda k=k: _ext._ring_crash_after(k)
        )
        assert wait_child(pid) == (77 if k < steps else 0), f"step {k}"
        expect = [rec(5, 20)] + (vals if k >= n + 2 else [])
        assert r.enqueue(rec(7, 20), timeout=10)  # a new producer goes on
        assert r.dequeue_burst(8) == [*expect, rec(7, 20)], f"step {k}"

        assert r.enqueue_bulk(vals) == n
        pid = fork_run(lambda r=r: r.dequeue_bulk(n), lambda k=k: _ext._ring_crash_after(k))
        assert wait_child(pid) == (77 if k < steps else 0), f"step {k}"
        left = vals if k < n + 2 else []  # released only by the tail store
        assert r.dequeue_burst(8, timeout=10 if left else 0) == left, f"step {k}"
