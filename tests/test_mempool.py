"""Mempools: exhaustion, all-or-nothing bulk, caches and counts (DPDK 22.11's get
and put, predicted exactly), obj_init, handles across processes through a ring,
audit, leaks, object IOVAs and iteration.  Mostly anonymous windows; the last
sections use real daemons and secondaries in both modes.  No timing."""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import select
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support.fake_memory import FakeMemory
from support.forking import fork_run, wait_child

from memd import _ext
from memd.errors import CorruptionError, MemdError, MemdValueError, PoolEmpty
from memd.hw import pagemap
from memd.shm.config import header
from memd.shm.mempool import (
    MEMPOOL_CACHE_MAX_SIZE,
    MEMPOOL_F_SC_GET,
    MEMPOOL_F_SP_PUT,
    Mempool,
    MempoolMemChunk,
    MempoolObject,
    mempool_memsize,
)
from memd.shm.ring import RING_F_SC_DEQ, RING_F_SP_ENQ, Ring
from memd.testing import SECONDARY_PRELUDE, Daemon
from tests.support.layout import offsets

BASE = _ext.CONFIG_SIZE


@pytest.fixture
def window() -> _ext.Window:
    return _ext.Window.anonymous(32 << 20)


# --- geometry -------------------------------------------------------------------


def test_layout() -> None:
    lay = offsets()
    assert lay["memd_mempool"] == 256
    assert lay["memd_mempool.ring_offset"] == 88
    assert lay["memd_mempool_cache"] == 64
    assert lay["memd_mempool_cache.objs"] == 64
    assert lay["memd_mempool_objhdr"] == 64
    assert (MEMPOOL_F_SP_PUT, MEMPOOL_F_SC_GET) == (0x4, 0x8)  # DPDK's values


@pytest.mark.parametrize(
    ("n", "elt_size", "cache_size"),
    [(0, 8, 0), (10, 8, 513), (767, 8, 512), (10, 8, 8), (2**31, 8, 0), (10, 2**31, 0)],
)
def test_bad_geometry(window: _ext.Window, n: int, elt_size: int, cache_size: int) -> None:
    with pytest.raises(ValueError):
        mempool_memsize(n, elt_size, cache_size)
    with pytest.raises(ValueError):
        Mempool.create(window, BASE, n, elt_size, cache_size=cache_size)


def test_limits_accepted(window: _ext.Window) -> None:
    assert mempool_memsize(768, 8, 512) > 0  # 1.5 * 512 == 768: just fits
    assert mempool_memsize(10, 8, 7) > 0  # 7 * 3 // 2 == 10
    with pytest.raises(ValueError):
        mempool_memsize(10, 8, 0, 0, 0x10)  # unknown flag
    with pytest.raises(ValueError):
        Mempool.create(window, BASE + 8, 4, 8)  # unaligned
    with pytest.raises(ValueError):
        Mempool.create(window, BASE, 4, 8, name="n" * 32)
    with pytest.raises(ValueError, match="no initialised mempool"):
        Mempool(window, BASE + (8 << 20))
    p = Mempool.create(window, BASE, 4, 8, flags=MEMPOOL_F_SP_PUT | MEMPOOL_F_SC_GET, name="f")
    with pytest.raises(ValueError):
        Mempool(window, BASE, 128)  # no such slot
    assert (p.size, p.elt_size, p.flags, p.name, len(p)) == (4, 8, 0xC, "f", 4)


def test_objects_are_zero_copy_buffers(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 8, 1000)
    o = p.get()
    assert isinstance(o, MempoolObject)
    assert len(o) == o.size == len(o.buf) == 1000
    assert o.pool is p
    o.buf[:5] = b"hello"
    arr = np.frombuffer(o, dtype=np.uint8)  # the object is a buffer itself
    assert bytes(arr[:5]) == b"hello"
    arr[5] = ord("!")
    assert bytes(memoryview(o)[:6]) == b"hello!"
    # the same bytes, seen through the window at the handle
    assert bytes(window.view(o.handle, 6)) == b"hello!"
    assert o.handle % 64 == 0
    same = p.obj(o.handle)
    assert same == o and hash(same) == hash(o) and same is not o
    assert p.obj_at(o.index) == o
    p.put(o)


# --- exhaustion and all-or-nothing ----------------------------------------------------


@pytest.mark.parametrize("cache_size", [0, 4, 16])
def test_exhaustion(window: _ext.Window, cache_size: int) -> None:
    n = 40
    p = Mempool.create(window, BASE, n, 64, cache_size=cache_size)
    objs = [p.get() for _ in range(n)]
    assert len({o.handle for o in objs}) == n
    assert (p.avail_count(), p.in_use_count()) == (0, n)
    with pytest.raises(PoolEmpty) as ei:
        p.get()
    assert isinstance(ei.value, LookupError) and isinstance(ei.value, MemdError)
    with pytest.raises(PoolEmpty):
        p.get_handle()
    p.put(objs.pop())
    assert p.get().handle not in {o.handle for o in objs}
    p.put_bulk(objs[:10])
    assert p.avail_count() == 10
    p.audit()


@pytest.mark.parametrize("cache_size", [0, 8])
def test_bulk_all_or_nothing(window: _ext.Window, cache_size: int) -> None:
    n = 64
    p = Mempool.create(window, BASE, n, 32, cache_size=cache_size)
    held = p.get_bulk(50)
    assert len(held) == 50
    with pytest.raises(PoolEmpty):
        p.get_bulk(15)
    assert p.avail_count() == 14  # nothing taken
    buf = np.zeros(15, dtype=np.uint64)
    with pytest.raises(PoolEmpty):
        p.get_bulk_into(buf)
    assert p.avail_count() == 14 and not buf.any()
    with pytest.raises(PoolEmpty):
        p.get_bulk(n + 1)
    assert p.get_bulk_into(buf[:14]) == 14
    assert p.avail_count() == 0
    p.put_bulk(buf[:14])  # handles in a uint64 buffer
    p.put_bulk([o.handle for o in held[:25]])  # handles as ints
    p.put_bulk(tuple(held[25:]))  # objects
    assert p.avail_count() == n
    assert p.get_bulk(0) == []
    p.audit()


def test_put_rejects_and_changes_nothing(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 16, 32, cache_size=4)
    other = Mempool.create(window, BASE + (4 << 20), 4, 32)
    a, b, c = p.get(), p.get(), p.get()
    foreign = other.get()
    for bad in ([a, foreign], [a, b, a], [a.handle + 64 * 0 + 8], [a.handle - 64]):
        with pytest.raises(ValueError):
            p.put_bulk(bad)
        assert p.in_use_count() == 3
    p.put(c)
    with pytest.raises(ValueError, match="already free"):
        p.put(c)
    with pytest.raises(ValueError, match="already free"):
        p.put_bulk([a, c])
    with pytest.raises(ValueError, match="not an object"):
        p.put(foreign)
    with pytest.raises(TypeError):
        p.put("x")
    with pytest.raises(MemdValueError, match="out of range: a mempool handle"):
        p.put(-1)  # no object's handle (OverflowError naming ring entries before)
    with pytest.raises(ValueError):
        p.obj(a.handle + 8)
    with pytest.raises(IndexError):
        p.obj_at(16)
    p.put_bulk([a, b])  # still busy after all the failed attempts
    assert p.in_use_count() == 0
    p.audit()
    other.put(foreign)


# --- caches and counts ---------------------------------------------------------------


def test_cache_counts_and_lifo(window: _ext.Window) -> None:
    n, cs = 32, 8
    p = Mempool.create(window, BASE, n, 16, cache_size=cs)
    assert p.flushthresh == 12
    o = p.get()
    # the refill keeps cache_size objects cached after serving one
    assert p.cache_count() == cs
    assert (p.avail_count(), p.in_use_count()) == (n - 1, 1)
    p.put(o)
    assert p.get() == o  # LIFO: the hot object comes back first
    p.put(o)
    objs = p.get_bulk(13)  # a miss: the cache gives its 9, a refill of 8 + 4 keeps 8
    assert p.cache_count() == cs
    p.put_bulk(objs[:12])  # 8 + 12 > flushthresh: the 8 go to the ring, the 12 are cached
    assert p.cache_count() == 12
    p.put(objs[12])  # past flushthresh: the cache goes to the ring first
    assert p.cache_count() == 1
    assert p.cache_count() <= p.flushthresh
    assert p.avail_count() == n
    assert p.flush_cache() == 1
    assert p.cache_count() == 0
    stats = p.audit()
    assert stats == {"free": n, "in_use": 0, "in_ring": n, "in_caches": 0}


def test_other_slots_cache_is_not_ours(window: _ext.Window) -> None:
    n = 12
    p0 = Mempool.create(window, BASE, n, 16, cache_size=8)
    p1 = Mempool(window, BASE, 1)  # as another process would use it
    ring = Ring(window, p0.ring_offset)
    x = p0.get()  # slot 0 pulls 9 from the ring: 8 stay in its cache
    assert (p0.cache_count(), p1.cache_count(), p0.cache_count(1), ring.count) == (8, 0, 0, 3)
    assert p1.avail_count() == n - 1  # counted ...
    with pytest.raises(PoolEmpty):
        p1.get_bulk(4)  # ... but only slot 0 may take them
    assert (ring.count, p1.cache_count()) == (3, 0)  # the failed get moved nothing
    assert _ext.mempool_flush_cache(window, BASE, 0) == 8  # what detach does
    # the ring has 11: too few for a refill (8 + 4), so it gives just the 4
    assert len(p1.get_bulk(4)) == 4
    assert (p1.cache_count(), ring.count, p0.avail_count()) == (0, 7, 7)
    p0.put(x)  # into slot 0's cache
    nc = Mempool(window, BASE, -1)  # no cache at all
    assert nc.slot == -1 and nc.flush_cache() == 0
    with pytest.raises(PoolEmpty):
        nc.get_bulk(8)  # only the ring's 7
    assert len(nc.get_bulk(7)) == 7
    assert _ext.mempool_flush_cache(window, BASE, 0) == 1
    assert nc.get() == x


def test_big_bulk_refills_and_puts_past_flushthresh_go_to_the_ring(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 1200, 8, cache_size=4)
    ring = Ring(window, p.ring_offset)
    objs = p.get_bulk(50)  # DPDK 22.11: a miss refills even for a request over cache_size
    assert (p.cache_count(), ring.count) == (4, 1200 - 54)
    p.put_bulk(objs)  # larger than flushthresh: straight to the ring
    assert (p.cache_count(), ring.count) == (4, 1200 - 4)
    assert p.flush_cache() == 4
    big = p.get_bulk(600)  # a rest over MEMPOOL_CACHE_MAX_SIZE: no refill
    assert (p.cache_count(), ring.count) == (0, 600)
    p.put_bulk(big)
    assert p.audit()["in_ring"] == 1200


# --- a model: two process slots, every outcome predicted ------------------------------


def dpdk_get(size: int, cache: int, ring: int, n: int) -> tuple[int, int] | None:
    """DPDK 22.11 rte_mempool_do_generic_get on counts: (cache, ring) after a get
    of n, or None if it fails (and takes nothing).  size 0: no cache."""
    if size == 0:
        return (0, ring - n) if n <= ring else None
    if n <= cache:
        return cache - n, ring
    rest = n - cache
    if rest <= MEMPOOL_CACHE_MAX_SIZE and size + rest <= ring:
        return size, ring - size - rest  # the refill
    return (0, ring - rest) if rest <= ring else None


def dpdk_put(size: int, cache: int, ring: int, n: int) -> tuple[int, int]:
    """DPDK 22.11 rte_mempool_do_generic_put on counts: (cache, ring) after."""
    flushthresh = size * 3 // 2
    if size == 0 or n > flushthresh:
        return cache, ring + n
    if cache + n > flushthresh:
        return n, ring + cache
    return cache + n, ring


class PoolModel(RuleBasedStateMachine):
    """Two slots and a cacheless user share a pool; predict every get's outcome
    and the ring's and each cache's count after every step, as DPDK 22.11's
    rte_mempool_do_generic_get/put would leave them; audit() after every step."""

    window = _ext.Window.anonymous(8 << 20)

    def __init__(self) -> None:
        super().__init__()
        self.pools: list[Mempool] = []
        self.held: list[int] = []  # handles handed out, any slot
        self.n = 0
        self.cache = [0, 0, 0]  # predicted cache counts (slot 2 has none)
        self.ring = 0  # predicted free ring count

    @initialize(n=st.integers(1, 60), cache=st.integers(0, 16), data=st.data())
    def create(self, n: int, cache: int, data: st.DataObject) -> None:
        cache = min(cache, n * 2 // 3)
        self.n = n
        self.ring = n
        p0 = Mempool.create(self.window, BASE, n, 24, cache_size=cache)
        self.pools = [p0, Mempool(self.window, BASE, 1), Mempool(self.window, BASE, -1)]
        self.free_ring = Ring(self.window, p0.ring_offset)

    def size(self, slot: int) -> int:
        return self.pools[0].cache_size if slot < 2 else 0

    @rule(slot=st.integers(0, 2), k=st.integers(0, 20), into=st.booleans())
    def get_bulk(self, slot: int, k: int, into: bool) -> None:
        p = self.pools[slot]
        after = dpdk_get(self.size(slot), self.cache[slot], self.ring, k) if k else None
        avail = p.avail_count()
        buf = np.zeros(k, dtype=np.uint64)
        try:
            if into:
                assert p.get_bulk_into(buf) == k
                got = buf.tolist()
            else:
                got = [o.handle for o in p.get_bulk(k)]
        except PoolEmpty:
            assert k and after is None
            assert p.avail_count() == avail  # nothing taken ...
            assert not buf.any()  # ... nor written
            return
        if k:
            assert after is not None
            self.cache[slot], self.ring = after
        assert len(set(got)) == k and not set(got) & set(self.held)
        self.held += got

    @precondition(lambda self: self.held)
    @rule(slot=st.integers(0, 2), data=st.data())
    def put_some(self, slot: int, data: st.DataObject) -> None:
        k = data.draw(st.integers(1, len(self.held)))
        idx = data.draw(st.permutations(range(len(self.held))))[:k]
        handles = [self.held[i] for i in idx]
        if data.draw(st.booleans()):
            dup = handles + handles[:1]
            with pytest.raises(ValueError, match="already free"):
                self.pools[slot].put_bulk(dup)  # a duplicate: nothing changes
        if k == 1:
            self.pools[slot].put(handles[0])
        else:
            self.pools[slot].put_bulk(np.array(handles, dtype=np.uint64))
        self.cache[slot], self.ring = dpdk_put(self.size(slot), self.cache[slot], self.ring, k)
        for h in handles:
            self.held.remove(h)

    @rule(slot=st.integers(0, 1))
    def flush(self, slot: int) -> None:
        assert self.pools[slot].flush_cache() == self.cache[slot]
        self.ring += self.cache[slot]
        self.cache[slot] = 0

    @invariant()
    def counts(self) -> None:
        if not self.pools:
            return
        p = self.pools[0]
        assert self.free_ring.count == self.ring
        assert [q.cache_count() for q in self.pools[:2]] == self.cache[:2]
        assert p.avail_count() == self.n - len(self.held)
        assert p.in_use_count() == len(self.held)
        assert p.full() == (not self.held) and p.empty() == (len(self.held) == self.n)
        stats = p.audit()
        assert stats["in_use"] == len(self.held)
        assert stats["in_ring"] + stats["in_caches"] == self.n - len(self.held)


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- obj_init --------------------------------------------------------------------------


def test_obj_init_runs_once_per_object(window: _ext.Window) -> None:
    calls: list[tuple[int, int]] = []

    def init(pool: Mempool, obj: MempoolObject, idx: int) -> None:
        assert isinstance(pool, Mempool)
        calls.append((idx, obj.index))
        obj.buf[:8] = (idx * 1000).to_bytes(8, "little")

    n = 50
    p = Mempool.create(window, BASE, n, 24, cache_size=4, obj_init=init, private_data_size=40)
    assert calls == [(i, i) for i in range(n)]
    seen = {}
    for o in p.get_bulk(n):
        seen[o.index] = int.from_bytes(o.buf[:8], "little")
    assert seen == {i: i * 1000 for i in range(n)}
    assert len(p.private_data) == 40
    assert bytes(p.private_data) == bytes(40)


# --- across processes --------------------------------------------------------------------


def test_handles_through_a_ring_to_another_process(window: _ext.Window) -> None:
    """1 KiB objects: stamped here, checked and restamped there, checked back here."""
    n, rounds = 64, 3000
    p = Mempool.create(window, BASE, n, 1024, cache_size=16, name="msgs")
    to_child = Ring.create(window, BASE + (8 << 20), 64, RING_F_SP_ENQ | RING_F_SC_DEQ)
    to_parent = Ring.create(window, BASE + (9 << 20), 64, RING_F_SP_ENQ | RING_F_SC_DEQ)

    def child() -> None:
        pc = Mempool(window, BASE, 1)  # its own process slot
        for i in range(rounds):
            o = pc.obj(to_child.dequeue(timeout=30))
            a = np.frombuffer(o, dtype=np.uint32)
            assert a[0] == i and np.all(a[1:] == i ^ 0xA5A5A5A5), i
            if i % 2:
                a[:] = i + 7  # answer in the same object
                assert to_parent.enqueue(o.handle, timeout=30)
            else:
                pc.put(o)  # into the child's cache
                r = pc.get()
                np.frombuffer(r, dtype=np.uint32)[:] = i + 7
                assert to_parent.enqueue(r.handle, timeout=30)
        pc.flush_cache()  # a detaching process gives its cache back

    pid = fork_run(child)
    for i in range(rounds):
        o = p.get()
        a = np.frombuffer(o, dtype=np.uint32)
        a[0] = i
        a[1:] = i ^ 0xA5A5A5A5
        assert to_child.enqueue(o.handle, timeout=30)
        back = p.obj(to_parent.dequeue(timeout=30))
        assert np.all(np.frombuffer(back, dtype=np.uint32) == i + 7)
        p.put(back)
    assert wait_child(pid) == 0
    p.flush_cache()
    assert p.avail_count() == n
    assert p.audit()["in_ring"] == n


def test_two_processes_hammer_one_pool(window: _ext.Window) -> None:
    n = 256
    p = Mempool.create(window, BASE, n, 64, cache_size=32)

    def worker(slot: int) -> None:
        q = Mempool(window, BASE, slot)
        rng = np.random.default_rng(slot)
        held: list[MempoolObject] = []
        for _ in range(4000):
            k = int(rng.integers(1, 40))
            if rng.random() < 0.5 and len(held) < 80:
                with contextlib.suppress(PoolEmpty):
                    got = q.get_bulk(k)
                    for o in got:
                        o.buf[:8] = (slot << 32 | o.index).to_bytes(8, "little")
                    held.extend(got)
            elif held:
                for o in held[-k:]:
                    assert int.from_bytes(o.buf[:8], "little") == slot << 32 | o.index
                q.put_bulk(held[-k:])
                del held[-k:]
        q.put_bulk(held)
        q.flush_cache()

    pids = [fork_run(lambda s=s: worker(s)) for s in (1, 2)]
    assert [wait_child(pid) for pid in pids] == [0, 0]
    assert p.avail_count() == n
    assert p.audit() == {"free": n, "in_use": 0, "in_ring": n, "in_caches": 0}


# --- owner tags: a dead process's objects ---------------------------------------------


def test_owner_tags_count_what_a_process_got(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 64, 32, cache_size=8)
    me = os.getpid()
    assert offsets()["memd_mempool_objhdr.owner_pid"] == 20
    assert p.held_by(me) == 0
    one = p.get()
    many = p.get_bulk(20)  # more than the cache: ring and cache
    h = p.get_handle()
    assert p.held_by(me) == 22
    p.put_bulk(many[:15])
    p.put(h)
    assert p.held_by(me) == 6
    p.put_bulk([one, *many[15:]])
    assert p.held_by(me) == 0
    assert p.held_by(me + 1) == 0
    with pytest.raises(ValueError):
        p.held_by(0)
    with pytest.raises(ValueError, match="alive"):
        p.reclaim_held_by(me)  # never from under a live process


@pytest.mark.parametrize("reap_first", [True, False], ids=["reaped", "zombie"])
def test_reclaim_a_dead_processes_objects(window: _ext.Window, reap_first: bool) -> None:
    n = 64
    p = Mempool.create(window, BASE, n, 32, cache_size=8)
    keep = p.get_bulk(3)  # ours: must survive the reclaim

    def child() -> None:
        q = Mempool(window, BASE, 1)
        got = [q.get(), *q.get_bulk(10)]
        q.put_bulk(got[:4])  # into its cache
        # and exits holding 7 objects, with 12 in its cache (8 from the refills + 4)

    pid = fork_run(child)
    if reap_first:
        assert wait_child(pid) == 0
    else:  # a zombie (dead, not yet reaped) is dead
        with open(f"/proc/{pid}/stat") as f:
            while f.read().rpartition(")")[2].split()[0] != "Z":
                time.sleep(0.002)
                f.seek(0)
    assert p.held_by(pid) == 7
    assert p.in_use_count() == 3 + 7  # (its cache counts as available)
    assert _ext.mempool_flush_cache(window, BASE, 1) == 12  # what the primary does
    assert p.reclaim_held_by(pid) == 7
    assert p.held_by(pid) == 0
    assert p.reclaim_held_by(pid) == 0
    if not reap_first:
        assert wait_child(pid) == 0
    assert p.in_use_count() == 3
    assert p.audit() == {
        "free": n - 3,
        "in_use": 3,
        "in_ring": n - 3 - p.cache_count(),
        "in_caches": p.cache_count(),
    }
    p.put_bulk(keep)


def test_owner_tag_names_the_getter_not_the_holder(window: _ext.Window) -> None:
    """An object passed on through a ring keeps its getter's tag (why reclaim is
    only for programs whose dead processes shared nothing)."""
    p = Mempool.create(window, BASE, 32, 32)
    ring = Ring.create(window, BASE + (8 << 20), 16, RING_F_SP_ENQ | RING_F_SC_DEQ)
    pid = fork_run(lambda: ring.enqueue_bulk([p.get_handle() for _ in range(3)]))
    assert wait_child(pid) == 0
    handles = ring.dequeue_bulk(3)
    assert p.held_by(pid) == 3 and p.held_by(os.getpid()) == 0
    p.put(handles[0])
    assert p.held_by(pid) == 2
    p.put_bulk(handles[1:])
    assert p.held_by(pid) == 0


@pytest.mark.parametrize("cache_size", [0, 8])
def test_get_killed_inside_the_free_ring_loses_nothing(
    window: _ext.Window, cache_size: int
) -> None:
    """A process killed while dequeuing from the free ring, at any step before it
    releases the entries, leaves the handles in the ring: the pool stays whole.
    One that finished its get holds the objects: reclaim_held_by gets them back.
    (Killed after the ring released them but before they were marked busy, the
    handles are in nobody's books: lost with the process, as audit() shows.)"""
    n = 64
    p = Mempool.create(window, BASE, n, 32, cache_size=cache_size)
    ring = Ring(window, p.ring_offset)
    for k in [*range(6), -1]:  # get_bulk(4): steps 0..5 come before the release
        before = ring.wait_stats["consumer_recoveries"]

        def child(k: int = k) -> None:
            q = Mempool(window, BASE, 1)
            _ext._ring_crash_after(k)
            q.get_bulk(4)

        pid = fork_run(child)
        assert wait_child(pid) == (0 if k < 0 else 77)
        _ext.mempool_flush_cache(window, BASE, 1)  # what the primary does for a dead slot
        assert p.held_by(pid) == (4 if k < 0 else 0)
        assert p.reclaim_held_by(pid) == (4 if k < 0 else 0)
        p.put_bulk(p.get_bulk(n))  # every object, through the dead owner's ring lock
        assert ring.wait_stats["consumer_recoveries"] == before + (k >= 0)
        assert p.avail_count() == n
        p.audit()


# --- audit --------------------------------------------------------------------------------


def test_audit_detects_a_smashed_trailer(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 8, 100, cache_size=2)
    o = p.get()
    p.audit()
    trailer = o.handle + 104  # data rounded up to 8 bytes, then the cookie
    window.view(trailer, 1)[0] ^= 0xFF  # one byte past what o.buf lets you write
    with pytest.raises(CorruptionError, match="trailer") as ei:
        p.audit()
    assert isinstance(ei.value, ValueError)
    window.view(trailer, 1)[0] ^= 0xFF
    p.audit()


def test_audit_detects_bad_headers_and_free_list(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 8, 16)
    o = p.get()
    cookie = window.view(o.handle - 64 + 8, 8)
    saved = bytes(cookie)
    cookie[:] = b"garbage!"
    with pytest.raises(CorruptionError, match="header cookie"):
        p.audit()
    with pytest.raises(CorruptionError):
        p.put(o)
    cookie[:] = saved
    free_ring = Ring(window, p.ring_offset)
    free_ring.enqueue(o.handle)  # a busy object in the free ring
    with pytest.raises(CorruptionError, match="in use"):
        p.audit()
    free_ring.dequeue_burst(100)
    with pytest.raises(CorruptionError, match="missing"):
        p.audit()  # FREE objects no longer anywhere


def test_a_smashed_cache_length_is_refused_and_changes_nothing(window: _ext.Window) -> None:
    """The cache's length is shared memory: one that would index past the cache
    (2 * cache_size entries) is corruption, for get and put alike."""
    p = Mempool.create(window, BASE, 64, 16, cache_size=8)
    held = p.get_bulk(3)
    assert p.cache_count() == 8
    off = offsets()["memd_mempool.caches_offset"]
    caches = int.from_bytes(window.view(BASE + off, 8), "little")
    length = window.view(BASE + caches, 4)  # slot 0's len
    ring = Ring(window, p.ring_offset)
    before = ring.count
    for bad in (17, 1 << 31):
        length[:] = bad.to_bytes(4, "little")
        for call in (p.get, lambda: p.get_bulk(2), lambda: p.get_bulk(40)):
            with pytest.raises(CorruptionError, match="a cache's length"):
                call()
        with pytest.raises(CorruptionError):
            p.put(held[0])
        with pytest.raises(CorruptionError):
            p.put_bulk(held)
        assert ring.count == before and p.held_by(os.getpid()) == 3
    length[:] = (8).to_bytes(4, "little")
    p.put_bulk(held)
    assert p.audit()["free"] == 64


def test_recover_returns_objects_a_killed_process_was_moving(window: _ext.Window) -> None:
    """A process killed between taking objects out of the ring and putting them
    in its cache (or emptying its cache and filling the ring) leaves FREE objects
    in no ring or cache: recover() puts them back; a cache is always emptied
    before the ring gets its objects, so nothing is ever in two places."""
    p = Mempool.create(window, BASE, 64, 16, cache_size=8, slot=1)
    p.put_bulk(p.get_bulk(6))  # in slot 1's cache now
    assert p.cache_count() == 6
    assert p.recover() == 0  # nothing missing, nothing moved
    Ring(window, p.ring_offset).dequeue_bulk(3)  # a refill killed after the ring gave 3
    with pytest.raises(CorruptionError, match="missing"):
        p.audit()
    assert p.recover() == 3
    assert p.audit()["free"] == 64 and p.avail_count() == 64
    p.flush_cache()
    assert p.audit()["in_ring"] == 64


# --- the mixin against the Memory interface ---------------------------------------------


def test_mixin_create_lookup_free(window: _ext.Window, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = FakeMemory(window, monkeypatch, proc_slot=3)
    inits: list[int] = []
    mp = mem.mempool_create("pkts", 100, 512, 16, 8, lambda _p, _o, i: inits.append(i))
    assert mp.name == "pkts" and mp.slot == 3 and inits == list(range(100))
    assert "MP_pkts" in mem.zones and mem.zones["MP_pkts"].offset == mp.offset
    with pytest.raises(FileExistsError):
        mem.mempool_create("pkts", 10, 8)
    again = mem.mempool_lookup("pkts")
    o = mp.get()
    again.put(o)  # same slot, same cache
    assert again.avail_count() == 100
    with pytest.raises(KeyError):
        mem.mempool_lookup("nope")
    with pytest.raises(ValueError):
        mem.mempool_create("x" * 29, 10, 8)
    with pytest.raises(ValueError):
        mem.mempool_create("bad", 10, 8, cache_size=8)
    assert "MP_bad" not in mem.zones
    mem.mempool_free(mp)
    assert "MP_pkts" in mem.freed
    with pytest.raises(KeyError):
        mem.mempool_lookup("pkts")


# --- leaks --------------------------------------------------------------------------------


def test_no_leaks(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 128, 64, cache_size=16)
    handles = array.array("Q", bytes(8 * 32))

    def once() -> None:
        o = p.get()
        _ = o.buf, o.index, o.handle, memoryview(o)
        p.put(o)
        p.put(p.get_handle())
        objs = p.get_bulk(20)
        p.put_bulk(objs)
        p.get_bulk_into(handles)
        p.put_bulk(handles)
        with contextlib.suppress(PoolEmpty):
            p.get_bulk(129)
        with contextlib.suppress(ValueError):
            p.put(objs[0])
        _ = p.avail_count(), p.in_use_count(), p.obj(objs[0].handle), p.name, p.audit()

    for _ in range(1000):
        once()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10000):
            once()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 10000 rounds"
    assert p.in_use_count() == 0


def test_sc_sp_flags_use_single_rings(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 8, 8, flags=MEMPOOL_F_SP_PUT | MEMPOOL_F_SC_GET)
    assert Ring(window, p.ring_offset).flags & (RING_F_SP_ENQ | RING_F_SC_DEQ) == 3
    assert len(p.get_bulk(8)) == 8


def test_put_bulk_longer_than_the_pool_names_the_duplicate(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 3, 8)
    objs = p.get_bulk(3)
    with pytest.raises(ValueError, match="already free"):
        p.put_bulk([*objs, objs[0]])
    with pytest.raises(ValueError, match="already free"):
        p.put_bulk(np.array([o.handle for o in [*objs, objs[1]]], dtype=np.uint64))
    assert p.in_use_count() == 3
    p.put_bulk(objs)
    p.audit()


# --- object IOVAs and iteration (anonymous windows) ---------------------------------------


def test_obj_iter_full_empty_and_no_iova_outside_memseg_lists(window: _ext.Window) -> None:
    p = Mempool.create(window, BASE, 20, 40, cache_size=4)
    assert p.full() and not p.empty()
    objs = list(p.obj_iter())
    assert [o.index for o in objs] == list(range(20))
    assert objs == [p.obj_at(i) for i in range(20)]
    assert p.full()  # iterating takes nothing
    held = p.get_bulk(20)
    assert p.empty() and not p.full()
    assert list(p.obj_iter()) == objs  # in use or not: every object
    p.put(held.pop())
    assert not p.empty() and not p.full()
    p.put_bulk(held)
    assert p.full()
    # an anonymous window has no memseg lists: no IOVA, one chunk
    assert {o.iova for o in objs} == {_ext.BAD_IOVA}
    stride = p.obj_stride
    first = objs[0].handle - offsets()["memd_mempool_objhdr"]
    assert list(p.mem_iter()) == [MempoolMemChunk(first, 20 * stride, _ext.BAD_IOVA)]
    assert first + 20 * stride == p.offset + p.memsize


def test_mem_iter_splits_where_the_iova_does_not_follow_on() -> None:
    """IOVA-as-PA with made-up page addresses: pages 0-1 follow on from A, 2-3 from
    B, 4-5 have no IOVA, 6 on from C.  Each chunk is one IOVA-contiguous run."""
    page, pages = 16 << 10, 64
    size = BASE + pages * page
    w = _ext.Window.anonymous(size)
    _ext.config_format(w, "mpiova", 0, _ext.IOVA_PA, size, 2 << 20, os.getpid(), 0)
    _ext.msl_init(w, 0, BASE, page, 0, pages, "")
    a, b, c = 0x1_0000_0000, 0x7_0000_0000, 0x3_0000_0000
    for k in range(pages):
        if k in (4, 5):
            continue  # no page there: no IOVA
        iova = a + k * page if k < 2 else b + (k - 2) * page if k < 4 else c + (k - 6) * page
        _ext.msl_set_page(w, 0, k, iova, 0, 0)
    p = Mempool.create(w, BASE, 500, 64)
    end = p.offset + p.memsize
    start = end - 500 * p.obj_stride
    assert (start - BASE) // page == 0 and (end - BASE) // page == 6  # the premises
    pg = [BASE + k * page for k in range(7)]
    assert list(p.mem_iter()) == [
        MempoolMemChunk(start, pg[2] - start, a + start - BASE),
        MempoolMemChunk(pg[2], 2 * page, b),
        MempoolMemChunk(pg[4], 2 * page, _ext.BAD_IOVA),
        MempoolMemChunk(pg[6], end - pg[6], c),
    ]
    for o in p.obj_iter():
        k = (o.handle - BASE) // page
        want = (
            a + o.handle - BASE
            if k < 2
            else b + o.handle - pg[2]
            if k < 4
            else _ext.BAD_IOVA
            if k < 6
            else c + o.handle - pg[6]
        )
        assert o.iova == want, o.index
    w.close()
    with pytest.raises(MemdValueError):
        list(p.mem_iter())
    with pytest.raises(MemdValueError):
        list(p.obj_iter())
    with pytest.raises(MemdValueError):
        p.full()


# --- DPDK 22.11 caches between real processes ----------------------------------------------

PEER = """
from memd.errors import PoolEmpty
mp = mem.mempool_lookup(POOL)
held = []
out({"slot": mp.slot})
for line in sys.stdin:
    cmd, k = line.split()
    k = int(k)
    if cmd == "quit":
        break
    r = "ok"
    try:
        if cmd == "get":
            held += mp.get_bulk(k)
        elif cmd == "put":
            mp.put_bulk(held[len(held) - k:])
            del held[len(held) - k:]
        elif cmd == "flush":
            r = mp.flush_cache()
        elif cmd == "iova":
            r = [[o.index, o.iova] for o in mp.obj_iter()][::k]
        elif cmd == "chunks":
            r = [list(c) for c in mp.mem_iter()]
    except PoolEmpty:
        r = "PoolEmpty"
    out({"r": r, "cache": mp.cache_count(), "held": len(held)})
mp.put_bulk(held)
mem.detach()
"""


class Peer:
    """A real secondary process that gets and puts on pool `name` on command,
    answering each with its cache count and how many objects it holds."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        source = SECONDARY_PRELUDE.replace("PREFIX", repr(daemon.prefix)).replace(
            "RUNDIR", repr(str(daemon.runtime_dir))
        ) + PEER.replace("POOL", repr(name))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.slot = self._answer()["slot"]

    def _answer(self, timeout: float = 30.0) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("RESULT "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"peer: {line!r}\n{err}\ndaemon log:\n{self.daemon.log_text()}")
        return json.loads(line[7:])

    def __call__(self, cmd: str, k: int = 0) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {k}\n")
        self.proc.stdin.flush()
        return self._answer()

    def finish(self) -> None:
        _, err = self.proc.communicate("quit 0\n", timeout=30)
        assert self.proc.returncode == 0, err


def test_two_processes_share_a_pool_as_dpdk_22_11(daemon: Daemon) -> None:
    """The starvation seen before: one process's get_bulk(40) moved all 88 free
    objects of the ring into its cache, and a failed get_bulk(40) still moved the
    ring's 30; others then got PoolEmpty with objects free.  DPDK 22.11 takes at
    most n + cache_size, and a failed get takes nothing."""
    with daemon.attach() as mem:
        mp = mem.mempool_create("fid", 128, 64, cache_size=32)
        ring = Ring(mem.window, mp.ring_offset)
        mine = mp.get_bulk(40)  # a miss: 40 handed out + a refill of 32
        assert (ring.count, mp.cache_count()) == (128 - 40 - 32, 32)
        assert mp.flush_cache() == 32
        assert ring.count == 88
        peer = Peer(daemon, "fid")
        assert peer.slot != mp.slot
        assert peer("get", 40) == {"r": "ok", "cache": 32, "held": 40}
        assert (ring.count, mp.cache_count(peer.slot)) == (88 - 40 - 32, 32)
        assert mp.avail_count() == 16 + 32
        # the ring (16) cannot refill my cache (32 + 10): it gives just the 10
        mine += mp.get_bulk(10)
        assert (ring.count, mp.cache_count()) == (6, 0)
        assert peer("flush")["r"] == 32
        mine += mp.get_bulk(8)  # 38 in the ring: no refill (40) either
        assert (ring.count, mp.cache_count(), mp.cache_count(peer.slot)) == (30, 0, 0)
        # a get the ring cannot serve takes nothing: not into the peer's cache either
        assert peer("get", 40) == {"r": "PoolEmpty", "cache": 0, "held": 40}
        assert (ring.count, mp.cache_count(peer.slot)) == (30, 0)
        mine += mp.get_bulk(30)  # so they are still there for everyone
        assert (ring.count, mp.cache_count()) == (0, 0)
        assert mp.empty() and not mp.full()
        # a failed get leaves a cache it could partly use as it was
        assert peer("put", 10) == {"r": "ok", "cache": 10, "held": 30}
        assert not mp.empty() and mp.avail_count() == 10
        assert peer("get", 20) == {"r": "PoolEmpty", "cache": 10, "held": 30}
        with pytest.raises(PoolEmpty):
            mp.get()  # the 10 are the peer's
        assert peer("get", 10) == {"r": "ok", "cache": 0, "held": 40}  # a hit
        assert mp.in_use_count() == 128
        # puts: past flushthresh (48) the cache goes to the ring first
        assert mp.flushthresh == 48
        mp.put_bulk(mine[:25])
        assert (ring.count, mp.cache_count()) == (0, 25)
        mp.put_bulk(mine[25:49])  # 25 + 24 > 48
        assert (ring.count, mp.cache_count()) == (25, 24)
        assert peer("put", 40) == {"r": "ok", "cache": 40, "held": 0}
        mp.put_bulk(mine[49:])  # 39 more: 24 + 39 > 48
        assert (ring.count, mp.cache_count(), mp.cache_count(peer.slot)) == (49, 39, 40)
        assert mp.full()  # objects in caches count, as in DPDK
        # a miss: the cache gives its 40, the ring 9 and a refill of 32
        assert peer("get", 49) == {"r": "ok", "cache": 32, "held": 49}
        assert ring.count == 49 - 9 - 32
        assert peer("put", 49) == {"r": "ok", "cache": 32, "held": 0}  # n > 48: the ring
        assert (ring.count, mp.cache_count()) == (8 + 49, 39)
        peer.finish()  # detach gives its cache back
        assert (ring.count, mp.cache_count(peer.slot)) == (57 + 32, 0)
        assert mp.flush_cache() == 39
        assert mp.audit() == {"free": 128, "in_use": 0, "in_ring": 128, "in_caches": 0}


def test_object_iova_and_iteration_in_a_daemon(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        mp = mem.mempool_create("iov", 300, 1000, cache_size=16)
        objs = list(mp.obj_iter())
        assert [o.index for o in objs] == list(range(300))
        chunks = list(mp.mem_iter())
        assert chunks[0].offset == objs[0].handle - offsets()["memd_mempool_objhdr"]
        assert chunks[-1].offset + chunks[-1].length == mp.offset + mp.memsize
        assert sum(c.length for c in chunks) == 300 * mp.obj_stride
        for x, y in itertools.pairwise(chunks):
            assert x.offset + x.length == y.offset  # in order, no gaps
            assert x.iova == _ext.BAD_IOVA or y.iova != x.iova + x.length  # a real split
        mz = mem.memzone_lookup("MP_iov")
        assert mz.offset <= chunks[0].offset and mp.offset + mp.memsize <= mz.offset + mz.length
        for o in objs:
            (c,) = [c for c in chunks if c.offset <= o.handle < c.offset + c.length]
            assert c.iova != _ext.BAD_IOVA
            assert o.iova == c.iova + (o.handle - c.offset)
        hdr = header(mem.window)
        if hdr.iova_mode == _ext.IOVA_VA:
            assert len(chunks) == 1
            assert [o.iova for o in objs] == [hdr.primary_base + o.handle for o in objs]
        else:  # the kernel's own word on each object's physical address
            addrs = [mem.window.address + o.handle for o in objs]
            assert pagemap.virt_to_phys_many(addrs) == [o.iova for o in objs]
        # another process sees the same IOVAs and chunks, and full() counts its cache
        peer = Peer(daemon, "iov")
        assert peer("iova", 7)["r"] == [[o.index, o.iova] for o in objs][::7]
        assert peer("chunks")["r"] == [list(c) for c in chunks]
        assert mp.full()
        assert peer("get", 1)["cache"] == 16
        assert not mp.full() and mp.avail_count() == 299
        assert peer("put", 1)["cache"] == 17
        assert mp.full() and Ring(mem.window, mp.ring_offset).count == 300 - 17
        peer.finish()  # detach gives its cache back
        assert mp.cache_count(peer.slot) == 0 and mp.full()
        held = mp.get_bulk(300)  # no refill possible: all 300 from the ring
        assert mp.empty() and mp.cache_count() == 0
        mp.put_bulk(held)
        assert mp.full()
