"""Stale handles raise (issue 14): a Ring, Mempool or MempoolObject kept past the
free of its ring or pool, in the freeing process or in another, raises StaleHandle
and touches nothing, also after a ring or pool is made again under the same name at
the same offset, and after the freed pages were given back (a handle pins its
pages, so it never meets a hole).  Real daemons in both modes, real secondaries."""

from __future__ import annotations

import pickle
import threading

import pytest

from memd import _ext
from memd.errors import MemdKeyError, StaleHandle, StaleReference
from memd.shm.mempool import Mempool
from memd.shm.ring import Ring
from memd.testing import Daemon, DrivenSecondary, pages_held

# Run in a secondary: `res` = the exception class names each call raised.
RAISES = """
def raises(*calls):
    out = []
    for call in calls:
        try:
            call()
        except Exception as e:
            out.append(type(e).__name__)
        else:
            out.append(None)
    return out
"""


def used_slots(d: Daemon) -> int:
    with d.attach() as mem:
        return len(mem.memsegs())


def test_a_freed_ring_raises_here_and_elsewhere_and_spares_the_next_one(daemon_factory) -> None:
    d = daemon_factory("-m", "4")
    a, b = DrivenSecondary(d), DrivenSecondary(d)
    try:
        a(RAISES)
        b(RAISES)
        off = a("r = mem.ring_create('jobs', 1024)\nr.enqueue_bulk([1, 2, 3])\nres = r.offset")
        assert b("rb = mem.ring_lookup('jobs')\nres = rb.offset") == off
        a("mem.ring_free(r)")
        stale = ["StaleHandle"] * 5
        assert (
            a(
                "res = raises(lambda: r.enqueue(9), lambda: r.dequeue(), lambda: r.count,"
                " lambda: r.dequeue_burst(5, timeout=0.2), lambda: mem.ring_free(r))"
            )
            == stale
        )
        assert (
            b(
                "res = raises(lambda: rb.enqueue(9), lambda: rb.dequeue(),"
                " lambda: rb.enqueue_bulk([4, 5]), lambda: rb.full(), lambda: rb.name)"
            )
            == stale
        )
        # made again: same name, same offset; the stale handles still raise, in
        # both processes, and neither moves a thing in the new ring
        assert a("r2 = mem.ring_create('jobs', 1024)\nr2.enqueue(42)\nres = r2.offset") == off
        assert a("res = raises(lambda: r.enqueue(9), lambda: r.dequeue())") == stale[:2]
        assert (
            b(
                "res = raises(lambda: rb.enqueue(7), lambda: rb.dequeue(),"
                " lambda: rb.dequeue_bulk(1), lambda: mem.ring_free(rb))"
            )
            == stale[:4]
        )
        assert b("import pickle\nres = raises(lambda: pickle.dumps(rb))") == stale[:1]
        assert a("res = [r2.count, r2.dequeue_burst(8)]") == [1, [42]]
        # the stale free freed nothing: the new ring is still listed, and works
        assert b("rn = mem.ring_lookup('jobs')\nrn.enqueue(5)\nres = rn.offset") == off
        assert a("res = r2.dequeue()") == 5
        assert a("res = repr(r).startswith('<Ring (freed)')")
    finally:
        a.finish()
        b.finish()
    assert d.proc.poll() is None


@pytest.mark.parametrize("cache_size", [0, 8])
def test_a_freed_pool_and_its_objects_raise_here_and_elsewhere(
    daemon_factory, cache_size: int
) -> None:
    d = daemon_factory("-m", "4")
    a, b = DrivenSecondary(d), DrivenSecondary(d)
    try:
        a(RAISES)
        b(RAISES)
        off = a(
            f"p = mem.mempool_create('objs', 64, 64, cache_size={cache_size})\n"
            "o = p.get()\no.buf[:3] = b'abc'\nres = p.offset"
        )
        assert b("pb = mem.mempool_lookup('objs')\nob = pb.get()\nres = pb.offset") == off
        a("mem.mempool_free(p)")
        calls = (
            "lambda: {p}.get(), lambda: {p}.put({o}), lambda: {o}.buf, lambda: {o}.iova,"
            " lambda: {p}.get_bulk(2), lambda: {p}.put_bulk([{o}]), lambda: {p}.avail_count(),"
            " lambda: {p}.held_by(1), lambda: memoryview({o}), lambda: mem.mempool_free({p})"
        )
        stale = ["StaleHandle"] * 10
        assert a(f"res = raises({calls.format(p='p', o='o')})") == stale
        assert b(f"res = raises({calls.format(p='pb', o='ob')})") == stale
        # made again at the same offset: the stale handles touch nothing in it
        assert a(
            f"p2 = mem.mempool_create('objs', 64, 64, cache_size={cache_size})\n"
            "res = [p2.offset, p2.avail_count()]"
        ) == [off, 64]
        assert b(f"res = raises({calls.format(p='pb', o='ob')})") == stale
        assert a(f"res = raises({calls.format(p='p', o='o')})") == stale
        assert a("res = [p2.avail_count(), p2.audit()['free']]") == [64, 64]
        assert b("pn = mem.mempool_lookup('objs')\nx = pn.get()\npn.put(x)\nres = pn.offset") == off
    finally:
        a.finish()
        b.finish()
    assert d.proc.poll() is None


def test_stale_handles_keep_their_pages_and_raise_after_a_release(daemon_factory) -> None:
    """A free and a release that would give the ring's and the pool's pages back:
    the handles still alive (in the freeing process and in another) keep those
    pages, so each raises StaleHandle instead of dying of SIGBUS in a hole; once
    they are gone, the next release gives every page back."""
    d = daemon_factory("-m", "4")
    a, b = DrivenSecondary(d), DrivenSecondary(d)
    try:
        a(RAISES)
        b(RAISES)
        a(
            "r = mem.ring_create('big', 1 << 22)\nr.enqueue(1)\n"  # 32 MiB of slots
            "p = mem.mempool_create('bigpool', 1 << 15, 1024, cache_size=32)\no = p.get()"
        )
        b("rb = mem.ring_lookup('big')\npb = mem.mempool_lookup('bigpool')\nob = pb.get()")
        assert used_slots(d) > 20
        a("mem.ring_free(r)\nmem.mempool_free(p)\nmem._release_pages(0)")
        assert pages_held(d.prefix) <= used_slots(d)  # nothing the primary lost track of
        assert used_slots(d) > 20  # pinned by the stale handles
        stale = ["StaleHandle"] * 6
        calls = (
            "lambda: {r}.enqueue(5), lambda: {r}.dequeue(), lambda: {p}.get(),"
            " lambda: {p}.put({o}), lambda: {o}.buf, lambda: {r}.count"
        )
        assert a(f"res = raises({calls.format(r='r', p='p', o='o')})") == stale
        assert b(f"res = raises({calls.format(r='rb', p='pb', o='ob')})") == stale
        # the pages go once no handle pins them
        b("del rb, pb, ob\nimport gc; gc.collect()")
        a("del r, p, o\nimport gc; gc.collect()\nmem._release_pages(0)")
        assert pages_held(d.prefix) == used_slots(d) == 2  # -m 4's preallocated pages
    finally:
        a.finish()
        b.finish()
    assert d.proc.poll() is None


def test_pickled_references_to_a_freed_ring_are_stale_and_new_ones_work(daemon) -> None:
    with daemon.attach() as mem:
        ring = mem.ring_create("pk", 16)
        old = pickle.dumps(ring)
        mem.ring_free(ring)
        with pytest.raises(StaleHandle):
            pickle.dumps(ring)
        again = mem.ring_create("pk", 16)
        assert again.offset == ring.offset
        with pytest.raises(StaleReference):
            pickle.loads(old)
        back = pickle.loads(pickle.dumps(again))
        back.enqueue(3)
        assert again.dequeue() == 3
        assert issubclass(StaleHandle, MemdKeyError) and issubclass(StaleReference, StaleHandle)


def test_a_sleeping_consumer_of_a_ring_freed_elsewhere_raises() -> None:
    """A dequeue waiting on a ring that gets freed wakes and raises: the free wakes
    every sleeper (here a thread; the futex is the same for another process)."""
    window = _ext.Window.anonymous(8 << 20)
    ring = Ring.create(window, 2 << 20, 16, 0, "sleepy")
    pool = Mempool.create(window, 4 << 20, 8, 64, name="sleepy")
    got: list[BaseException | object] = []

    def consume() -> None:
        try:
            got.append(Ring(window, ring.offset).dequeue(timeout=30))
        except BaseException as e:  # the test looks at it
            got.append(e)

    t = threading.Thread(target=consume)
    t.start()
    while ring.wait_stats["consumers_waiting"] == 0 and t.is_alive():
        t.join(0.01)
    ring._poison()
    t.join(60)
    assert not t.is_alive() and len(got) == 1 and isinstance(got[0], StaleHandle), got
    pool._poison()
    with pytest.raises(StaleHandle, match="'sleepy' was freed"):
        pool.get()
    with pytest.raises(ValueError, match="no initialised"):
        Ring(window, ring.offset)  # the magic went too: nothing to attach to
    with pytest.raises(ValueError, match="no initialised"):
        Mempool(window, pool.offset)
