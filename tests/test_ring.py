"""Rings: semantics against a deque model, cross-process delivery, blocking, leaks.

Everything runs on anonymous shared windows (inherited across fork), so no
primary is needed.  No assertion here depends on speed: that is bench/'s job.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import signal
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from support.forking import fork_run, wait_child

from memd import _ext
from memd.shm.ring import RING_F_EXACT_SZ, RING_F_SC_DEQ, RING_F_SP_ENQ, Ring, ring_memsize
from tests.support.layout import offsets

BASE = _ext.CONFIG_SIZE  # offsets below this are the config struct
U64_MAX = 2**64 - 1
SENTINEL = U64_MAX


@pytest.fixture(scope="module")
def window() -> _ext.Window:
    return _ext.Window.anonymous(64 << 20)


# --- process helpers --------------------------------------------------------


def wait_for(cond: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition never became true")
        time.sleep(0.001)


# --- geometry, limits, types --------------------------------------------------


def test_layout_offsets() -> None:
    lay = offsets()
    assert lay["memd_ring"] == 512
    assert lay["memd_ring.prod"] == 128
    assert lay["memd_ring.cons"] == 256
    assert lay["memd_ring.not_empty"] == 384
    assert lay["memd_ring.not_full"] == 416
    assert lay["memd_ring.slots"] == 512
    # producer and consumer counters never share a cache line
    assert lay["memd_ring.cons"] - lay["memd_ring.prod"] >= 128


def test_flag_values_are_dpdks() -> None:
    assert (RING_F_SP_ENQ, RING_F_SC_DEQ, RING_F_EXACT_SZ) == (0x1, 0x2, 0x4)


@pytest.mark.parametrize(
    ("count", "flags", "size", "capacity"),
    [
        (2, 0, 2, 1),
        (1024, 0, 1024, 1023),
        (1, RING_F_EXACT_SZ, 2, 1),
        (1000, RING_F_EXACT_SZ, 1024, 1000),
        (1024, RING_F_EXACT_SZ, 2048, 1024),
        (7, RING_F_EXACT_SZ | RING_F_SP_ENQ | RING_F_SC_DEQ, 8, 7),
    ],
)
def test_geometry(window: _ext.Window, count: int, flags: int, size: int, capacity: int) -> None:
    assert ring_memsize(count, flags) == 512 + 8 * size
    r = Ring.create(window, BASE, count, flags, "geo")
    assert (r.size, r.capacity, r.flags, r.name) == (size, capacity, flags, "geo")
    assert (r.count, r.free_count, r.empty(), r.full()) == (0, capacity, True, False)
    assert r.enqueue_bulk(list(range(capacity))) == capacity
    assert (r.count, r.free_count, r.empty(), r.full()) == (capacity, 0, False, True)
    assert not r.enqueue(1)
    assert r.dequeue_bulk(capacity) == list(range(capacity))


@pytest.mark.parametrize(
    ("count", "flags"),
    [
        (0, 0),
        (1, 0),
        (3, 0),
        (1000, 0),
        (0, RING_F_EXACT_SZ),
        (2**31, RING_F_EXACT_SZ),
        (2**32, 0),
        (8, 0x8),
        (8, 0x100),
    ],
)
def test_bad_geometry(window: _ext.Window, count: int, flags: int) -> None:
    with pytest.raises(ValueError):
        ring_memsize(count, flags)
    with pytest.raises(ValueError):
        Ring.create(window, BASE, count, flags)


def test_attach_checks(window: _ext.Window) -> None:
    window.view(BASE + (1 << 20), 512)[:8] = b"\0" * 8
    with pytest.raises(ValueError, match="no initialised ring"):
        Ring(window, BASE + (1 << 20))
    with pytest.raises(ValueError):
        Ring(window, window.size - 8)
    with pytest.raises(ValueError, match="64-byte aligned"):
        Ring.create(window, BASE + 8, 8)
    with pytest.raises(ValueError, match="outside"):
        Ring.create(window, window.size - 512, 1024)
    with pytest.raises(ValueError):
        Ring.create(window, BASE, 8, 0, "x" * 32)
    r = Ring.create(window, BASE, 8, 0, "x" * 31)
    assert r.name == "x" * 31
    again = Ring(window, BASE)  # a second handle sees the same ring
    r.enqueue(5)
    assert again.dequeue() == 5


def test_value_limits(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 16)
    assert r.enqueue(U64_MAX)
    assert r.enqueue(0)
    assert r.dequeue() == U64_MAX
    assert r.dequeue() == 0
    for bad in (2**64, -1, -(2**63)):
        with pytest.raises(OverflowError):
            r.enqueue(bad)
        with pytest.raises(OverflowError):
            r.enqueue_bulk([1, bad])
    assert r.empty()  # a failed conversion enqueues nothing
    with pytest.raises(TypeError):
        r.enqueue("1")
    with pytest.raises(TypeError):
        r.enqueue(1.0)
    with pytest.raises(TypeError):
        r.enqueue_bulk([1, None])
    assert r.enqueue(True)  # ints by __index__ work, NumPy scalars too
    assert r.enqueue(np.uint64(U64_MAX))
    assert r.dequeue_bulk(2) == [1, U64_MAX]


def test_value_kinds(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 64)
    assert r.enqueue_bulk((1, 2)) == 2
    assert r.enqueue_bulk(array.array("Q", [3, 4])) == 2
    assert r.enqueue_bulk(np.array([5, 6], dtype=np.uint64)) == 2
    assert r.enqueue_bulk(range(7, 9)) == 2  # any sequence
    assert r.enqueue_bulk(memoryview(struct.pack("=2Q", 9, 10)).cast("Q")) == 2
    assert r.enqueue_burst(np.array([[11, 12], [13, 14]], dtype=np.uint64)) == 4
    assert r.dequeue_burst(100) == list(range(1, 15))
    for bad in (
        array.array("I", [1]),
        np.array([1], dtype=np.int64),
        b"12345678",
        np.array([1, 2, 3], dtype=np.uint64)[::2],
    ):
        with pytest.raises((TypeError, ValueError, BufferError)):
            r.enqueue_bulk(bad)
    with pytest.raises(TypeError):
        r.enqueue_bulk(5)
    with pytest.raises(TypeError):
        r.dequeue_burst_into(bytearray(16))  # wrong format
    with pytest.raises(BufferError):  # read-only
        r.dequeue_burst_into(np.zeros(2, dtype=np.uint64).data.toreadonly())
    assert r.enqueue_bulk([]) == 0
    assert r.dequeue_bulk(0) == []
    with pytest.raises(ValueError):
        r.dequeue_burst(-1)


def test_into_buffers(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)
    r.enqueue_bulk([1, 2, 3, 4, 5])
    out = np.zeros(3, dtype=np.uint64)
    assert r.dequeue_bulk_into(out) == 3
    assert out.tolist() == [1, 2, 3]
    assert r.dequeue_bulk_into(out) == 0  # only 2 left: all or nothing
    assert out.tolist() == [1, 2, 3]
    a = array.array("Q", [0] * 4)
    assert r.dequeue_burst_into(a) == 2
    assert a.tolist() == [4, 5, 0, 0]
    assert r.dequeue_burst_into(memoryview(a)[3:]) == 0


def test_oversized_requests(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)  # capacity 7
    assert r.enqueue_bulk(list(range(8))) == 0
    assert r.enqueue_burst(list(range(100))) == 7
    assert r.dequeue_bulk(8) == []
    assert r.dequeue_bulk_into(np.zeros(100, dtype=np.uint64)) == 0
    with pytest.raises(ValueError, match="never fit"):
        r.dequeue_bulk(8, timeout=1)
    with pytest.raises(ValueError, match="never fit"):
        r.enqueue_bulk(list(range(8)), timeout=None)
    assert r.dequeue_burst(10**9) == list(range(7))  # clamped, no huge allocation


def test_timeout_arguments(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)
    for bad in (-1, -0.5, float("nan")):
        with pytest.raises(ValueError):
            r.dequeue(timeout=bad)
    with pytest.raises(TypeError):
        r.dequeue(timeout="1")
    with pytest.raises(TypeError):
        r.dequeue(1, timeout=1)
    with pytest.raises(TypeError):
        r.enqueue(1, tmeout=1)
    with pytest.raises(TypeError):
        r.enqueue(1, value=2)
    assert r.enqueue(value=3, timeout=0)
    assert r.dequeue_burst(n=5, timeout=0.0) == [3]
    assert r.enqueue_bulk(values=[1], timeout=None) == 1
    assert r.dequeue(timeout=1e-9) == 1


def test_counter_wraparound(window: _ext.Window) -> None:
    """Heads and tails are 32-bit and wrap; start them just below 2**32."""
    for flags in (0, RING_F_SP_ENQ | RING_F_SC_DEQ):
        r = Ring.create(window, BASE, 16, flags)
        poke_counters(window, BASE, 2**32 - 5)
        model: collections.deque[int] = collections.deque()
        v = 0
        for _ in range(200):
            k = r.enqueue_burst(list(range(v, v + 7)))
            model.extend(range(v, v + k))
            v += 7
            got = r.dequeue_burst(5)
            assert got == [model.popleft() for _ in got]
            assert r.count == len(model)


def poke_counters(window: _ext.Window, off: int, value: int) -> None:
    """Start an empty ring's counters at `value` (head, tail, and the single-mode
    copy of the other side's tail, which init sets equal to the counters)."""
    lay = offsets()
    for side in ("memd_ring.prod", "memd_ring.cons"):
        window.view(off + lay[side], 8)[:] = struct.pack("=II", value, value)
        copy = off + lay[side] + lay["memd_ring_headtail.other_tail"]
        window.view(copy, 4)[:] = struct.pack("=I", value)


# --- the deque model, every mode ---------------------------------------------


class RingModel(RuleBasedStateMachine):
    """Every operation on the ring does the same to a deque; compare always."""

    FLAGS = 0
    window = _ext.Window.anonymous(4 << 20)

    def __init__(self) -> None:
        super().__init__()
        self.ring: Ring
        self.model: collections.deque[int] = collections.deque()
        self.capacity = 0
        self.next_value = 0

    @initialize(
        log2=st.integers(1, 6),
        exact=st.integers(1, 70),
        start=st.sampled_from([0, 2**31, 2**32 - 3, 2**32 - 40]),
    )
    def create(self, log2: int, exact: int, start: int) -> None:
        count = exact if self.FLAGS & RING_F_EXACT_SZ else 2**log2
        self.ring = Ring.create(self.window, BASE, count, self.FLAGS, "model")
        self.capacity = count if self.FLAGS & RING_F_EXACT_SZ else count - 1
        if start:
            poke_counters(self.window, BASE, start)

    def values(self, k: int) -> list[int]:
        vals = [(self.next_value + i) * 0x9E3779B97F4A7C15 % 2**64 for i in range(k)]
        self.next_value += k
        return vals

    @rule()
    def enqueue(self) -> None:
        (v,) = self.values(1)
        ok = self.ring.enqueue(v)
        assert ok == (len(self.model) < self.capacity)
        if ok:
            self.model.append(v)

    @rule()
    def dequeue(self) -> None:
        got = self.ring.dequeue()
        assert got == (self.model.popleft() if self.model else None)

    @rule(k=st.integers(0, 80), kind=st.sampled_from(["list", "tuple", "array", "numpy"]))
    def enqueue_bulk(self, k: int, kind: str) -> None:
        vals = self.values(k)
        arg = {
            "list": vals,
            "tuple": tuple(vals),
            "array": array.array("Q", vals),
            "numpy": np.array(vals, dtype=np.uint64),
        }[kind]
        n = self.ring.enqueue_bulk(arg)
        expect = k if len(self.model) + k <= self.capacity else 0
        assert n == expect
        self.model.extend(vals[:n])

    @rule(k=st.integers(0, 80), as_buffer=st.booleans())
    def enqueue_burst(self, k: int, as_buffer: bool) -> None:
        vals = self.values(k)
        n = self.ring.enqueue_burst(array.array("Q", vals) if as_buffer else vals)
        assert n == min(k, self.capacity - len(self.model))
        self.model.extend(vals[:n])

    @rule(k=st.integers(0, 80), into=st.booleans())
    def dequeue_bulk(self, k: int, into: bool) -> None:
        if into:
            buf = np.zeros(k, dtype=np.uint64)
            n = self.ring.dequeue_bulk_into(buf)
            got = buf[:n].tolist()
        else:
            got = self.ring.dequeue_bulk(k)
        if k <= len(self.model):
            assert got == [self.model.popleft() for _ in range(k)]
        else:
            assert got == []

    @rule(k=st.integers(0, 80), into=st.booleans())
    def dequeue_burst(self, k: int, into: bool) -> None:
        if into:
            buf = array.array("Q", bytes(8 * k))
            n = self.ring.dequeue_burst_into(buf)
            got = buf[:n].tolist()
        else:
            got = self.ring.dequeue_burst(k)
        assert got == [self.model.popleft() for _ in range(min(k, len(self.model)))]

    @invariant()
    def counts(self) -> None:
        if not hasattr(self, "ring"):
            return
        r = self.ring
        n = len(self.model)
        assert (r.count, r.free_count, len(r)) == (n, self.capacity - n, n)
        assert r.empty() == (n == 0)
        assert r.full() == (n == self.capacity)


_MODEL_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_MODES = {
    "mpmc": 0,
    "sp": RING_F_SP_ENQ,
    "sc": RING_F_SC_DEQ,
    "spsc": RING_F_SP_ENQ | RING_F_SC_DEQ,
    "exact_mpmc": RING_F_EXACT_SZ,
    "exact_spsc": RING_F_EXACT_SZ | RING_F_SP_ENQ | RING_F_SC_DEQ,
}
for _mode, _flags in _MODES.items():
    _cls = type(f"RingModel_{_mode}", (RingModel,), {"FLAGS": _flags})
    _cls.TestCase.settings = _MODEL_SETTINGS
    globals()[f"TestRingModel_{_mode}"] = _cls.TestCase


# --- across processes ----------------------------------------------------------


def test_spsc_million_in_order(window: _ext.Window) -> None:
    """10**6 values, one producer process, one consumer process: exactly once, in order."""
    total = 10**6
    r = Ring.create(window, BASE, 1024, RING_F_SP_ENQ | RING_F_SC_DEQ, "spsc")
    res_off = BASE + (4 << 20)
    result = np.frombuffer(window.view(res_off, 16), dtype=np.uint64)
    result[:] = 0

    def consume() -> None:
        buf = np.zeros(97, dtype=np.uint64)  # odd size: bursts straddle the wrap
        expect = 0
        singles = 0
        while expect < total:
            if expect % 5 == 0 and singles < 50_000:  # exercise the single-item path too
                v = r.dequeue(timeout=10)
                assert v == expect, (v, expect)
                expect += 1
                singles += 1
                continue
            n = r.dequeue_burst_into(buf, timeout=10)
            assert n > 0
            got = buf[:n]
            if not np.array_equal(got, np.arange(expect, expect + n, dtype=np.uint64)):
                raise AssertionError(f"out of order near {expect}")
            expect += n
        assert r.dequeue(timeout=0.01) is None
        result[0] = expect
        result[1] = 1

    pid = fork_run(consume)
    sent = 0
    rng = np.random.default_rng(1)
    while sent < total:
        k = int(min(rng.integers(1, 64), total - sent))
        if k == 1:
            assert r.enqueue(sent, timeout=10)
        else:
            assert r.enqueue_bulk(np.arange(sent, sent + k, dtype=np.uint64), timeout=10) == k
        sent += k
    assert wait_child(pid) == 0
    assert result.tolist() == [total, 1]


def test_mpmc_two_by_two(window: _ext.Window, tmp_path: Path) -> None:
    """2 producers x 2 consumers: every value exactly once; each producer's values
    in order at each consumer."""
    per_producer = 150_000
    r = Ring.create(window, BASE, 256, 0, "mpmc")
    flag_off = BASE + (4 << 20)
    done = np.frombuffer(window.view(flag_off, 8), dtype=np.uint64)
    done[0] = 0

    def produce(p: int) -> None:
        seq = 0
        rng = np.random.default_rng(p)
        while seq < per_producer:
            k = int(min(rng.integers(1, 40), per_producer - seq))
            vals = (np.uint64(p) << np.uint64(32)) | np.arange(seq, seq + k, dtype=np.uint64)
            if k % 3 == 0:
                sent = 0
                while sent < k:  # burst: keep going with what did not fit
                    sent += r.enqueue_burst(vals[sent:], timeout=10)
            else:
                assert r.enqueue_bulk(vals, timeout=10) == k
            seq += k

    def consume(c: int) -> None:
        buf = np.zeros(33, dtype=np.uint64)
        chunks = []
        while True:
            n = (
                r.dequeue_burst_into(buf, timeout=0.01)
                if c
                else r.dequeue_bulk_into(buf[: 1 + len(chunks) % 8], timeout=0.01)
            )
            if n:
                chunks.append(buf[:n].copy())
            elif done[0] and r.empty():
                break
        np.save(tmp_path / f"c{c}.npy", np.concatenate(chunks) if chunks else buf[:0])

    consumers = [fork_run(lambda c=c: consume(c)) for c in range(2)]
    producers = [fork_run(lambda p=p: produce(p)) for p in range(2)]
    assert [wait_child(p) for p in producers] == [0, 0]
    done[0] = 1
    assert [wait_child(c) for c in consumers] == [0, 0]
    parts = [np.load(tmp_path / f"c{c}.npy") for c in range(2)]
    for part in parts:
        for p in range(2):
            mine = part[(part >> np.uint64(32)) == p] & np.uint64(0xFFFFFFFF)
            assert np.all(np.diff(mine.astype(np.int64)) > 0), "a producer's values reordered"
    everything = np.sort(np.concatenate(parts))
    expect = np.sort(
        np.concatenate(
            [
                (np.uint64(p) << np.uint64(32)) | np.arange(per_producer, dtype=np.uint64)
                for p in range(2)
            ]
        )
    )
    assert len(everything) == 2 * per_producer
    assert np.array_equal(everything, expect)  # each value exactly once
    assert r.empty()


# --- blocking ---------------------------------------------------------------------


def test_fast_path_makes_no_wake_calls(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 64)
    for i in range(1000):
        r.enqueue_bulk([i, i])
        r.dequeue_burst(2)
    s = r.wait_stats
    assert s["consumer_wakes"] == s["producer_wakes"] == 0


def test_dequeue_times_out(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)
    for timeout in (0.05, 0.25):  # 0.25 takes more than one 100 ms sleep slice
        t0 = time.monotonic()
        assert r.dequeue(timeout=timeout) is None
        assert time.monotonic() - t0 >= timeout  # never gives up early
    t0 = time.monotonic()
    assert r.dequeue_bulk(3, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.05
    assert r.enqueue_bulk(list(range(7))) == 7
    t0 = time.monotonic()
    assert not r.enqueue(1, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert r.wait_stats["consumers_waiting"] == 0


def test_blocking_dequeue_woken_by_other_process(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8, 0, "wake")
    res = np.frombuffer(window.view(BASE + (4 << 20), 16), dtype=np.uint64)
    res[:] = 0

    def consume() -> None:
        res[0] = r.dequeue(timeout=None)
        res[1] = len(r.dequeue_bulk(3, timeout=60))  # waits for all three

    pid = fork_run(consume)
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1)  # it is asleep
    assert r.enqueue(42)
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1 and r.empty())
    for v in (1, 2, 3):  # one at a time: each wake finds too few until the last
        r.enqueue(v)
        time.sleep(0.01)
    assert wait_child(pid) == 0
    assert res.tolist() == [42, 3]
    assert r.wait_stats["consumer_wakes"] >= 1


def test_blocking_enqueue_woken_by_other_process(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 4, RING_F_SP_ENQ | RING_F_SC_DEQ)
    r.enqueue_bulk([1, 2, 3])

    def produce() -> None:
        assert r.enqueue_bulk([4, 5], timeout=None) == 2

    pid = fork_run(produce)
    wait_for(lambda: r.wait_stats["producers_waiting"] == 1)
    assert r.dequeue() == 1
    time.sleep(0.01)  # one slot is not enough for the bulk of two
    assert r.dequeue() == 2
    assert wait_child(pid) == 0
    assert r.dequeue_burst(10) == [3, 4, 5]


def test_a_bulk_waiter_is_not_woken_by_smaller_moves(window: _ext.Window) -> None:
    """Batch-aware waking: a consumer asleep in dequeue_bulk(8) is woken once, by the
    enqueue that makes 8 entries, not by each of the seven before it; a producer
    asleep in enqueue_bulk(4) likewise by the dequeue that frees 4 slots."""
    r = Ring.create(window, BASE, 16, RING_F_SP_ENQ | RING_F_SC_DEQ)
    res = np.frombuffer(window.view(BASE + (4 << 20), 8), dtype=np.uint64)
    res[:] = 0

    def consume() -> None:
        res[0] = sum(r.dequeue_bulk(8, timeout=60))

    pid = fork_run(consume)
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1)  # it is asleep
    for v in range(1, 8):
        assert r.enqueue(v)
        time.sleep(0.005)  # a woken consumer would re-arm before the next one
    assert r.wait_stats["consumer_wakes"] == 0
    assert r.enqueue(8)
    assert wait_child(pid) == 0
    assert res[0] == sum(range(1, 9))
    assert r.wait_stats["consumer_wakes"] == 1

    assert r.enqueue_bulk(list(range(15))) == 15  # full: capacity 15

    def produce() -> None:
        assert r.enqueue_bulk([1, 2, 3, 4], timeout=60) == 4

    pid = fork_run(produce)
    wait_for(lambda: r.wait_stats["producers_waiting"] == 1)
    for _ in range(3):
        assert r.dequeue() is not None
        time.sleep(0.005)
    assert r.wait_stats["producer_wakes"] == 0
    assert r.dequeue() is not None
    assert wait_child(pid) == 0
    assert r.count == 15
    assert r.wait_stats["producer_wakes"] == 1


def test_a_burst_waiter_is_woken_by_one_entry(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 16, RING_F_SP_ENQ | RING_F_SC_DEQ)
    res = np.frombuffer(window.view(BASE + (4 << 20), 8), dtype=np.uint64)
    res[:] = 0

    def consume() -> None:
        res[0] = len(r.dequeue_burst(8, timeout=60))

    pid = fork_run(consume)
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1)
    assert r.enqueue(5)
    assert wait_child(pid) == 0
    assert res[0] == 1


def test_blocking_releases_the_gil(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.append(r.dequeue(timeout=60)))
    t.start()
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1)  # main thread still runs
    r.enqueue(7)
    t.join(60)
    assert got == [7]


def test_ctrl_c_interrupts_a_forever_wait(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 8)

    def consume() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            r.dequeue(timeout=None)
        except KeyboardInterrupt:
            os._exit(42)

    pid = fork_run(consume)
    wait_for(lambda: r.wait_stats["consumers_waiting"] == 1)
    os.kill(pid, signal.SIGINT)
    assert wait_child(pid, limit=30) == 42
    assert r.wait_stats["consumers_waiting"] == 0  # the waiter withdrew


# --- leaks ----------------------------------------------------------------------------


def test_no_leaks(window: _ext.Window) -> None:
    r = Ring.create(window, BASE, 256)
    arr = np.arange(100, dtype=np.uint64)
    out = np.zeros(100, dtype=np.uint64)
    big = list(range(200))

    def once() -> None:
        r.enqueue(5)
        r.dequeue()
        r.enqueue_bulk(big)
        r.dequeue_bulk(200)
        r.enqueue_burst(arr)
        r.dequeue_burst_into(out)
        r.enqueue_bulk(tuple(big[:10]))
        r.dequeue_burst(300)
        r.dequeue(timeout=1e-6)
        for bad in (2**64, "x"):
            with contextlib.suppress(OverflowError, TypeError):
                r.enqueue_bulk([1, bad])
        with contextlib.suppress(ValueError):
            r.dequeue_bulk(1000, timeout=1)
        _ = r.count, r.free_count, r.name, r.wait_stats

    for _ in range(2000):
        once()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20000):
            once()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 20000 rounds"
    assert r.empty()


# --- the mixin against the Memory interface ----------------------------------------------


def test_mixin_create_lookup_free(window: _ext.Window, monkeypatch: pytest.MonkeyPatch) -> None:
    from support.fake_memory import FakeMemory

    mem = FakeMemory(window, monkeypatch)
    r = mem.ring_create("jobs", 1024, flags=RING_F_SC_DEQ)
    assert (r.name, r.capacity, r.flags) == ("jobs", 1023, RING_F_SC_DEQ)
    assert mem.zones["RG_jobs"].offset == r.offset
    assert mem.zones["RG_jobs"].length == ring_memsize(1024, RING_F_SC_DEQ)
    with pytest.raises(FileExistsError):
        mem.ring_create("jobs", 16)
    r.enqueue(99)
    assert mem.ring_lookup("jobs").dequeue() == 99
    with pytest.raises(KeyError):
        mem.ring_lookup("nope")
    with pytest.raises(ValueError):
        mem.ring_create("x" * 29, 16)
    with pytest.raises(ValueError):
        mem.ring_create("odd", 1000)
    assert "RG_odd" not in mem.zones
    mem.ring_free(r)
    assert mem.freed == ["RG_jobs"]
    with pytest.raises(KeyError):
        mem.ring_lookup("jobs")
    with pytest.raises(KeyError):
        mem.ring_free(r)


def test_wait_spin_setting(window: _ext.Window) -> None:
    from memd.shm.ring import set_wait_spin

    r = Ring.create(window, BASE, 8)
    old = set_wait_spin(5e-6)
    try:
        assert old == 0  # README: waits sleep, no spinning, unless a program opts in
        before = r.wait_stats["consumer_sleeps"]
        assert r.dequeue(timeout=0.01) is None  # retried 5 us, then slept
        assert r.wait_stats["consumer_sleeps"] > before
        assert set_wait_spin(0) == pytest.approx(5e-6)
        before = r.wait_stats["consumer_sleeps"]
        assert r.dequeue(timeout=0.01) is None
        assert r.wait_stats["consumer_sleeps"] > before  # slept at once
        with pytest.raises(ValueError):
            set_wait_spin(-1)
        with pytest.raises(ValueError):
            set_wait_spin(1)
    finally:
        set_wait_spin(old)
        assert set_wait_spin(old) == old
