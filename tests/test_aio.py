"""asyncio: awaited ring and mempool calls against real secondaries in other
processes; timeouts; cancellation loses nothing; one waiter thread per process."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from memd import _ext
from memd.errors import PoolEmpty
from memd.testing import finish_secondary, start_secondary


def waiter_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "memd-aio-waiter")


def test_asyncio_consumer_of_a_producer_secondary(daemon) -> None:
    n = 300
    with daemon.attach() as mem:
        rings = [mem.ring_create(f"aio{i}", 64) for i in range(3)]
        producer = start_secondary(
            daemon,
            f"""
            import time
            rings = [mem.ring_lookup(f"aio{{i}}") for i in range(3)]
            # then:
            for v in range(1, {n} + 1):
                for r in rings:
                    assert r.enqueue(v, timeout=30)
                if v % 50 == 0:
                    time.sleep(0.02)  # the consumers catch up and sleep
            """,
        )

        async def consume(ring) -> list[int]:
            return [await ring.dequeue_async(timeout=30) for _ in range(n)]

        async def main() -> list[list[int]]:
            tasks = [asyncio.create_task(consume(r)) for r in rings]
            await asyncio.sleep(0.05)
            assert all(r.wait_stats["consumers_waiting"] == 1 for r in rings)  # all asleep
            assert waiter_threads() == 1  # three waits, one thread
            await asyncio.get_running_loop().run_in_executor(None, finish_secondary, producer)
            return await asyncio.gather(*tasks)

        for got in asyncio.run(main()):
            assert got == list(range(1, n + 1))
        assert all(r.wait_stats["consumers_waiting"] == 0 for r in rings)


def test_bulk_and_burst_forms(daemon) -> None:
    with daemon.attach() as mem:
        ring = mem.ring_create("aiob", 16)  # capacity 15
        other = start_secondary(
            daemon,
            """
            ring = mem.ring_lookup("aiob")
            # then:
            assert ring.enqueue_bulk(list(range(10)), timeout=30) == 10
            assert sorted(ring.dequeue_bulk(12, timeout=30)) == list(range(100, 112))
            """,
        )

        async def main() -> None:
            t = asyncio.create_task(ring.dequeue_bulk_async(10, timeout=30))
            await asyncio.sleep(0.05)
            await asyncio.get_running_loop().run_in_executor(None, other.stdin.write, "go\n")
            await asyncio.get_running_loop().run_in_executor(None, other.stdin.flush)
            assert await t == list(range(10))
            assert await ring.enqueue_bulk_async(list(range(100, 108))) == 8
            buf = np.arange(108, 112, dtype=np.uint64)
            assert await ring.enqueue_burst_async(buf) == 4
            # the other side takes all 12 at once; now fill it and wait for room
            await asyncio.get_running_loop().run_in_executor(None, finish_secondary, other)
            assert ring.empty()
            assert await ring.enqueue_bulk_async(list(range(15))) == 15
            out = np.zeros(4, dtype=np.uint64)
            assert await ring.dequeue_burst_into_async(out) == 4
            assert out.tolist() == [0, 1, 2, 3]
            assert await ring.dequeue_bulk_into_async(out) == 4
            assert await ring.dequeue_burst_async(100) == list(range(8, 15))

        asyncio.run(main())


def test_timeouts(daemon) -> None:
    with daemon.attach() as mem:
        ring = mem.ring_create("aiot", 4)  # capacity 3
        pool = mem.mempool_create("aiotp", 1, 64)

        async def main() -> None:
            assert await ring.dequeue_async(timeout=0.2) is None  # more than a slice
            assert await ring.dequeue_bulk_async(2, timeout=0.05) == []
            assert await ring.dequeue_async(timeout=0) is None
            assert await ring.enqueue_bulk_async([1, 2, 3]) == 3
            assert await ring.enqueue_async(4, timeout=0.05) is False
            assert await ring.enqueue_burst_async([4], timeout=0.05) == 0
            with pytest.raises(ValueError, match="never fit"):
                await ring.enqueue_bulk_async([1, 2, 3, 4])
            with pytest.raises(ValueError, match="timeout"):
                await ring.dequeue_async(timeout=-1)
            assert await ring.enqueue_bulk_async([1, 2, 3, 4], timeout=0) == 0
            obj = await pool.get_async(timeout=0)
            with pytest.raises(PoolEmpty):
                await pool.get_async(timeout=0.05)
            pool.put(obj)

        asyncio.run(main())
        assert ring.wait_stats["consumers_waiting"] == ring.wait_stats["producers_waiting"] == 0


def test_cancellation_loses_nothing(daemon) -> None:
    """A producer secondary enqueues 1..n without pause while the consumer cancels
    awaited dequeues at random moments: every entry arrives once, in order."""
    n = 2000
    with daemon.attach() as mem:
        ring = mem.ring_create("aioc", 8)
        producer = start_secondary(
            daemon,
            f"""
            ring = mem.ring_lookup("aioc")
            # then:
            import time
            for v in range(1, {n} + 1):
                assert ring.enqueue(v, timeout=30)
                if v % 20 == 0:
                    time.sleep(0.001)  # the ring runs empty: awaits really wait
            """,
        )

        async def main() -> list[int]:
            # waits that are surely asleep, cancelled: nothing moves
            sleepers = [asyncio.create_task(ring.dequeue_async()) for _ in range(5)]
            await asyncio.sleep(0.05)
            assert not any(t.done() for t in sleepers)
            for t in sleepers:
                t.cancel()
            await asyncio.gather(*sleepers, return_exceptions=True)
            assert all(t.cancelled() for t in sleepers)
            assert ring.wait_stats["consumers_waiting"] == 0
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(None, finish_secondary, producer)
            got: list[int] = []
            cancelled = 0
            rng = np.random.default_rng(1)
            while len(got) < n:
                t = asyncio.create_task(ring.dequeue_async(timeout=30))
                await asyncio.sleep(float(rng.choice([0, 0, 1e-5, 1e-4])))
                if t.cancel():
                    with pytest.raises(asyncio.CancelledError):
                        await t
                    cancelled += 1
                    continue
                v = await t
                got.append(v)
            await done
            assert cancelled > 0
            return got

        assert asyncio.run(main()) == list(range(1, n + 1))
        assert ring.empty()
        assert ring.wait_stats["consumers_waiting"] == 0


def test_get_async_woken_by_a_put_in_another_process(daemon) -> None:
    with daemon.attach() as mem:
        pool = mem.mempool_create("aiop", 1, 64)  # no cache: a put goes to the ring
        obj = pool.get()
        putter = start_secondary(
            daemon,
            f"""
            pool = mem.mempool_lookup("aiop")
            # then:
            pool.put({obj.handle})
            """,
        )

        async def main() -> int:
            t = asyncio.create_task(pool.get_async(timeout=30))
            await asyncio.sleep(0.05)
            assert not t.done()
            await asyncio.get_running_loop().run_in_executor(None, finish_secondary, putter)
            got = await t
            return got.handle

        assert asyncio.run(main()) == obj.handle
        assert pool.in_use_count() == 1


def test_empty_bulk_and_burst_return_at_once(daemon) -> None:
    """Nothing asked for is done at once, as the blocking forms are (they used to
    wait forever for a result that is never truthy)."""
    with daemon.attach() as mem:
        ring = mem.ring_create("empty_asks", 64)
        ring.enqueue(1)

        async def main() -> list[object]:
            return [
                await asyncio.wait_for(ring.dequeue_burst_async(0), 5),
                await asyncio.wait_for(ring.dequeue_bulk_async(0), 5),
                await asyncio.wait_for(ring.enqueue_bulk_async([]), 5),
                await asyncio.wait_for(ring.enqueue_burst_async([]), 5),
            ]

        assert asyncio.run(main()) == [[], [], 0, 0]
        assert ring.count == 1  # nothing moved


@pytest.mark.parametrize("esize", [8, 16], ids=["ints", "records"])
def test_a_bad_timeout_raises_alike_in_every_form(daemon, esize: int) -> None:
    """Every enqueue/dequeue call and its *_async twin refuse a bad timeout with the
    same exception and message (TypeError for a non-number, MemdValueError for a
    negative or NaN one), before anything moves; so does Mempool.get_async."""
    from memd.errors import MemdValueError

    with daemon.attach() as mem:
        ring = mem.ring_create(f"aiot{esize}", 16, esize=esize)
        pool = mem.mempool_create(f"aiotp{esize}", 4, 64)
        one = 7 if esize == 8 else bytes(range(16))
        out = np.zeros(2, dtype=np.uint64) if esize == 8 else bytearray(32)
        assert ring.enqueue_bulk([one, one])
        calls = {
            "enqueue": (ring.enqueue, (one,)),
            "dequeue": (ring.dequeue, ()),
            "enqueue_bulk": (ring.enqueue_bulk, ([one],)),
            "enqueue_burst": (ring.enqueue_burst, ([one],)),
            "dequeue_bulk": (ring.dequeue_bulk, (1,)),
            "dequeue_burst": (ring.dequeue_burst, (1,)),
            "dequeue_bulk_into": (ring.dequeue_bulk_into, (out,)),
            "dequeue_burst_into": (ring.dequeue_burst_into, (out,)),
        }
        for bad, cls in [("1", TypeError), (-1, MemdValueError), (float("nan"), MemdValueError)]:
            for name, (call, args) in calls.items():
                with pytest.raises(cls) as blocking:
                    call(*args, timeout=bad)
                twin = getattr(ring, f"{name}_async")
                with pytest.raises(cls) as awaited:
                    asyncio.run(twin(*args, timeout=bad))
                assert type(awaited.value) is type(blocking.value), (name, bad)
                assert str(awaited.value) == str(blocking.value), (name, bad)
                assert "timeout must be" in str(blocking.value), (name, bad)
            with pytest.raises(cls) as got:
                asyncio.run(pool.get_async(timeout=bad))
            assert str(got.value) == str(blocking.value)
        assert ring.count == 2  # nothing moved
        assert pool.avail_count() == 4
        assert ring.dequeue_bulk(2) == [one, one]
        mem.ring_free(ring)
        mem.mempool_free(pool)


def test_asyncio_on_both_sides_ping_pong(daemon) -> None:
    """A ping-pong with asyncio in both processes: every value comes back once, in
    order.  The waits first sleep on the futex in the loop's own thread (the loop
    has nothing else to run): consumer_sleeps counts them."""
    n = 500
    with daemon.attach() as mem:
        ab, ba = mem.ring_create("aioab", 64), mem.ring_create("aioba", 64)
        pong = start_secondary(
            daemon,
            f"""
            import asyncio
            ab, ba = mem.ring_lookup("aioab"), mem.ring_lookup("aioba")
            # then:
            async def pong() -> None:
                for _ in range({n}):
                    v = await ab.dequeue_async(timeout=30)
                    assert v is not None
                    assert await ba.enqueue_async(v + 1, timeout=30)
            asyncio.run(pong())
            """,
        )

        async def ping() -> list[int]:
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(None, finish_secondary, pong)
            got = []
            for i in range(n):
                assert await ab.enqueue_async(i, timeout=30)
                got.append(await ba.dequeue_async(timeout=30))
            await done
            return got

        assert asyncio.run(ping()) == [i + 1 for i in range(n)]
        assert ba.wait_stats["consumer_sleeps"] > 0  # direct waits, in this process
        assert ab.empty() and ba.empty()


def test_a_direct_wait_never_holds_back_a_ready_task(daemon, monkeypatch) -> None:
    """The direct wait blocks the loop, so it is skipped while another task is ready
    to run: here the task that will enqueue (with a 5 s direct wait, that task could
    not run and the entry would come only after it)."""
    from memd.shm import aio

    monkeypatch.setattr(aio, "DIRECT_WAIT", 5.0)
    with daemon.attach() as mem:
        ring = mem.ring_create("aiord", 8)

        async def producer() -> None:
            assert ring.enqueue(7)

        async def main() -> int | None:
            waiting = asyncio.create_task(ring.dequeue_async(timeout=30))
            ready = asyncio.create_task(producer())  # ready while `waiting` starts
            await ready
            return await asyncio.wait_for(waiting, 60)

        assert asyncio.run(main()) == 7
        assert ring.wait_stats["consumer_sleeps"] == 0  # no direct wait: handed over


def test_a_thousand_coroutines_on_one_ring_sleep_without_polling(daemon, monkeypatch) -> None:
    """Waits on one futex share one futex_waitv entry: past 127 waiters on one ring
    the waiter thread still sleeps (it used to poll every millisecond, a quarter of
    a core: ~2000 rounds in 2 s), and every waiter still gets its entry.  Counted
    in rounds of the waiter thread, not CPU time, which a busy host inflates."""
    n = 1000
    rounds = [0]
    wait_many = _ext.ring_wait_many

    def counted(*args: Any) -> Any:
        rounds[0] += 1
        return wait_many(*args)

    monkeypatch.setattr(_ext, "ring_wait_many", counted)
    with daemon.attach() as mem:
        ring = mem.ring_create("aio_pool", 2048)
        producer = start_secondary(
            daemon,
            f"""
            ring = mem.ring_lookup("aio_pool")
            # then:
            for v in range({n}):
                assert ring.enqueue(v, timeout=30)
            """,
        )

        async def main() -> tuple[int, list[int | None]]:
            tasks = [asyncio.create_task(ring.dequeue_async(timeout=60)) for _ in range(n)]
            await asyncio.sleep(0.3)  # all asleep
            assert ring.wait_stats["consumers_waiting"] == n
            before = rounds[0]
            await asyncio.sleep(2)
            idle_rounds = rounds[0] - before
            await asyncio.get_running_loop().run_in_executor(None, finish_secondary, producer)
            return idle_rounds, await asyncio.wait_for(asyncio.gather(*tasks), 30)

        idle_rounds, got = asyncio.run(main())
        # ~180 here (the waiters' own 100 ms re-checks), against ~2000 when polling
        assert idle_rounds < 600, f"the waiter thread woke {idle_rounds} times in 2 s"
        assert sorted(v for v in got if v is not None) == list(range(n))
        mem.ring_free(ring)


def test_bad_arguments_raise_as_the_synchronous_call(daemon) -> None:
    """Every awaited bulk/burst form checks its arguments as its synchronous twin,
    in the same order (a buffer's format before its size), and moves nothing."""
    with daemon.attach() as mem:
        ring = mem.ring_create("aiobad", 16)  # capacity 15
        recs = mem.ring_create("aiobadr", 16, esize=16)
        cases = [
            (ring, "enqueue_bulk", bytes(256)),  # wrong format and too many
            (ring, "dequeue_bulk_into", bytearray(256)),
            (ring, "enqueue_burst", bytes(256)),
            (ring, "dequeue_burst_into", bytearray(256)),
            (ring, "dequeue_bulk", -1),
            (ring, "dequeue_burst", -1),
            (ring, "dequeue_bulk", "x"),
            (ring, "enqueue_bulk", list(range(20))),  # right format, too many
            (ring, "dequeue_bulk", 20),
            (recs, "enqueue_bulk", 5),
            (recs, "dequeue_bulk_into", 5),
            (recs, "enqueue_bulk", bytes(24)),
        ]
        for r, name, arg in cases:
            with pytest.raises(Exception) as sync:
                getattr(r, name)(arg, timeout=1)
            with pytest.raises(type(sync.value)) as awaited:
                asyncio.run(getattr(r, name + "_async")(arg, timeout=1))
            assert str(awaited.value) == str(sync.value), (name, arg)
        assert ring.count == recs.count == 0
