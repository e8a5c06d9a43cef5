#!/usr/bin/env python3
"""memd rings and mempools against Python's usual IPC, side by side.

One producer process and one consumer process (forked; nothing pinned), for
8-byte and 1 KiB messages:

- throughput (messages/s): memd ring with single-item calls and bulk-32 from a
  uint64 buffer, multiprocessing.Queue, multiprocessing.Pipe, faster-fifo
  (single and put_many/get_many of 32), pyzmq PUSH/PULL over ipc://, posix_ipc
  MessageQueue;
- ping-pong round trip (µs), busy-polling and blocking, and with an asyncio ping
  side (memd ``await dequeue_async()`` against asyncio + multiprocessing.Queue
  awaited through one executor thread), and with asyncio on both sides;
- blocking throughput idle and with a third process spinning on one core;
- pickling: a MempoolObject or Ring reference through pickle and a
  multiprocessing.Queue round trip, against an int handle and 1 KiB of bytes;
- in-process cost per call: ring enqueue+dequeue, mempool get+put, bulk-32.

memd's 1 KiB messages are mempool objects: the producer takes an object, writes
1 KiB into it in place and sends its handle through the ring; the consumer reads
the object in place (its first byte) and puts it back.  The others copy 1 KiB
bytes through pickling and/or the kernel.  8-byte memd messages are the ring
entries themselves; the others send 8-byte bytes objects.

Every number is the median of --repeat runs (default 3); the machine is shared
and noisy.  This script never asserts on time: it prints, and marks the
project's targets as met or missed.  Default run: about 1-2 minutes.

    PYTHONPATH=. python bench/ring_bench.py [--repeat N] [--quick] [--only PART]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import queue
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import timeit
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from memd import _ext
from memd.shm.mempool import Mempool
from memd.shm.ring import RING_F_SC_DEQ, RING_F_SP_ENQ, Ring

try:
    import faster_fifo
except ImportError:  # pragma: no cover - optional peer
    faster_fifo = None
try:
    import zmq
except ImportError:  # pragma: no cover
    zmq = None
try:
    import posix_ipc
except ImportError:  # pragma: no cover
    posix_ipc = None

SPSC = RING_F_SP_ENQ | RING_F_SC_DEQ
BASE = 2 << 20  # below this an anonymous window stands in for the config
RING_COUNT = 1024
POOL_N = 8192
POOL_CACHE = 256
BULK = 32
CHILD_LIMIT = 120.0  # seconds before a stuck peer is killed and reported
TARGET_SECONDS = 0.4  # each throughput run aims at about this long
SPIN = "memd ring, 5 us spin (opt-in)"
AIO = "memd ring, asyncio dequeue_async"
AIO_BOTH = "memd ring, asyncio on both sides"
AIO_MPQ = "mp.Queue, asyncio executor"

MP = multiprocessing.get_context("fork")
T = TypeVar("T")
now = time.perf_counter


# --- process plumbing ----------------------------------------------------------------


def fork(fn: Callable[[], object]) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(CHILD_LIMIT) + 10)  # an orphan never outlives the bench
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this process if the block takes longer than seconds."""

    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"no result within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_with(children: list[Callable[[], object]], parent: Callable[[], T]) -> T:
    """Fork the children, run parent(), reap them; never blocks past CHILD_LIMIT.

    Raises RuntimeError if a child failed or the time ran out (children killed)."""
    pids = [fork(fn) for fn in children]
    codes: list[int] = []
    try:
        with deadline(CHILD_LIMIT):
            out = parent()
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    except BaseException as e:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        if isinstance(e, Exception):
            raise RuntimeError(f"run failed: {e!r}") from e
        raise
    if any(codes):
        raise RuntimeError(f"a child failed (exit codes {codes})")
    return out


class Sync:
    """Pipes: children say ready, wait for go, and report times to the parent."""

    def __init__(self) -> None:
        self.ready = os.pipe()
        self.go = os.pipe()
        self.res = os.pipe()

    def ready_then_wait(self) -> None:
        os.write(self.ready[1], b"r")
        os.read(self.go[0], 1)

    def report(self, tag: bytes, value: float) -> None:
        os.write(self.res[1], struct.pack("=cd", tag, value))

    def start(self, k: int) -> None:
        for _ in range(k):
            os.read(self.ready[0], 1)
        os.write(self.go[1], b"g" * k)

    def results(self, k: int) -> dict[bytes, float]:
        out = {}
        for _ in range(k):
            tag, value = struct.unpack("=cd", os.read(self.res[0], 9))
            out[tag] = value
        return out

    def close(self) -> None:
        for fds in (self.ready, self.go, self.res):
            for fd in fds:
                os.close(fd)


# --- memd --------------------------------------------------------------------------------


class MemdWorld:
    """A shared anonymous window with two SP/SC rings and a 1 KiB-object pool."""

    def __init__(self) -> None:
        self.window = _ext.Window.anonymous(64 << 20)
        self.pool_off = BASE + (2 << 20)
        self.reset()

    def pool(self, slot: int) -> Mempool:
        return Mempool(self.window, self.pool_off, slot)

    def reset(self) -> None:
        """Fresh rings and pool for each run (an aborted run leaves no debris)."""
        self.ab = Ring.create(self.window, BASE, RING_COUNT, SPSC, "ab")
        self.ba = Ring.create(self.window, BASE + (1 << 20), RING_COUNT, SPSC, "ba")
        Mempool.create(self.window, self.pool_off, POOL_N, 1024, cache_size=POOL_CACHE, name="msgs")

    def views(self, pool: Mempool) -> dict[int, memoryview]:
        return {o.handle: o.buf for o in (pool.obj_at(i) for i in range(pool.size))}

    def rows(self, pool: Mempool) -> tuple[np.ndarray, int, int]:
        """All objects as one (n, 1024) uint8 array, zero-copy, plus first handle, stride."""
        first = pool.obj_at(0).handle
        stride = pool.obj_stride
        arr = np.ndarray(
            (pool.size, pool.elt_size),
            dtype=np.uint8,
            buffer=self.window.view(first, pool.size * stride),
            strides=(stride, 1),
        )
        return arr, first, stride


PAYLOAD_1K = bytes(range(256)) * 4
PAYLOAD_8 = b"12345678"


class Side:
    """What one process of a memd run holds: its pool handle and object views."""

    def __init__(self, world: MemdWorld, slot: int) -> None:
        self.ring = world.ab
        self.pool = world.pool(slot)
        self.views = world.views(self.pool)
        self.rows, self.first, self.stride = world.rows(self.pool)


def memd_tx(side: Side, n: int, size: int, bulk: bool) -> None:
    ring = side.ring
    if size == 8 and not bulk:
        enq = ring.enqueue
        for i in range(n):
            enq(i) or enq(i, None)  # fast path; else sleep until there is room
    elif size == 8:
        buf = np.arange(BULK, dtype=np.uint64)
        enq = ring.enqueue_bulk
        for _ in range(n // BULK):
            enq(buf) or enq(buf, None)
    elif not bulk:
        views = side.views
        get, enq, payload = side.pool.get_handle, ring.enqueue, PAYLOAD_1K
        for _ in range(n):
            h = get()
            views[h][:] = payload  # 1 KiB written in place
            enq(h) or enq(h, None)
    else:
        rows = side.rows
        hb = np.zeros(BULK, dtype=np.uint64)
        payload = np.frombuffer(PAYLOAD_1K, dtype=np.uint8)
        first_, stride_ = np.uint64(side.first), np.uint64(side.stride)
        get, enq = side.pool.get_bulk_into, ring.enqueue_bulk
        for _ in range(n // BULK):
            get(hb)
            rows[(hb - first_) // stride_] = payload  # 32 x 1 KiB written in place
            enq(hb) or enq(hb, None)


def memd_rx(side: Side, n: int, size: int, bulk: bool) -> None:
    ring = side.ring
    if size == 8 and not bulk:
        deq = ring.dequeue
        for _ in range(n):
            if deq() is None:
                deq(None)
    elif size == 8:
        out = np.zeros(BULK, dtype=np.uint64)
        deq = ring.dequeue_burst_into
        got = 0
        while got < n:
            got += deq(out) or deq(out, None)
    elif not bulk:
        views = side.views
        deq, put = ring.dequeue, side.pool.put
        for _ in range(n):
            h = deq()
            if h is None:
                h = deq(None)
            views[h][0]  # read it in place (no copy)
            put(h)
    else:
        rows = side.rows
        first_, stride_ = np.uint64(side.first), np.uint64(side.stride)
        out = np.zeros(BULK, dtype=np.uint64)
        deq, put = ring.dequeue_burst_into, side.pool.put_bulk
        got = 0
        while got < n:
            k = deq(out) or deq(out, None)
            sub = out[:k]
            rows[(sub - first_) // stride_, 0]  # read them in place
            put(sub)
            got += k


def memd_throughput(world: MemdWorld, n: int, size: int, bulk: bool) -> float:
    world.reset()
    sync = Sync()

    def rx() -> None:
        side = Side(world, 2)
        sync.ready_then_wait()
        memd_rx(side, n, size, bulk)
        sync.report(b"e", now())
        side.pool.flush_cache()  # what detaching does

    def tx() -> None:
        side = Side(world, 1)
        sync.ready_then_wait()
        sync.report(b"s", now())
        memd_tx(side, n, size, bulk)
        side.pool.flush_cache()

    def parent() -> dict[bytes, float]:
        sync.start(2)
        return sync.results(2)

    try:
        res = run_with([rx, tx], parent)
    finally:
        sync.close()
    return n / (res[b"e"] - res[b"s"])


def memd_rtt(
    world: MemdWorld, n: int, size: int, busy: bool, aio: bool = False, aio_pong: bool = False
) -> float:
    """Median round trip in µs; the ping side is this process (with `aio`, a
    coroutine awaiting ``dequeue_async``; the pong side blocks as usual, or with
    `aio_pong` is a coroutine too: asyncio on both sides)."""
    world.reset()
    ab, ba = world.ab, world.ba

    def pong() -> None:
        deq, enq = ab.dequeue, ba.enqueue
        pool = world.pool(2)
        views = world.views(pool) if size > 8 else {}
        payload = PAYLOAD_1K
        if aio_pong:

            async def pong_async() -> None:
                deq_async = ab.dequeue_async
                for _ in range(n):
                    v = await deq_async()
                    if size > 8:
                        buf = views[v]
                        buf[0]
                        buf[:] = payload
                    enq(v)

            asyncio.run(pong_async())
            return
        for _ in range(n):
            if busy:
                while (v := deq()) is None:
                    pass
            else:
                v = deq(None)
            if size > 8:
                buf = views[v]
                buf[0]
                buf[:] = payload  # answer in the same object
            enq(v)

    pool = world.pool(1)
    obj = pool.get()
    buf = obj.buf
    handle = obj.handle
    lat: list[int] = []
    deq, enq = ba.dequeue, ab.enqueue
    ns = time.perf_counter_ns

    def ping() -> None:
        for i in range(n):
            t0 = ns()
            if size > 8:
                buf[:] = PAYLOAD_1K
                enq(handle)
            else:
                enq(i)
            if busy:
                while deq() is None:
                    pass
            else:
                deq(None)
            if size > 8:
                buf[0]
            lat.append(ns() - t0)

    async def ping_async() -> None:
        deq_async = ba.dequeue_async
        for i in range(n):
            t0 = ns()
            if size > 8:
                buf[:] = PAYLOAD_1K
                enq(handle)
            else:
                enq(i)
            await deq_async()
            if size > 8:
                buf[0]
            lat.append(ns() - t0)

    try:
        run_with([pong], (lambda: asyncio.run(ping_async())) if aio else ping)
    finally:
        pool.put(obj)
        pool.flush_cache()
    return statistics.median(lat[n // 10 :]) / 1000


# --- the others ----------------------------------------------------------------------------


class Peer:
    """One direction of a peer transport.  __init__ runs in the parent before the
    fork; open() in the child that uses it as 'tx' or 'rx'."""

    name = "?"
    many = False  # has send_many/recv_many

    def __init__(self, size: int, tag: str) -> None:
        self.size = size

    def open(self, role: str) -> None:
        pass

    def close(self, role: str) -> None:
        pass

    def destroy(self) -> None:
        pass

    # set by open(): send(msg), recv() -> msg, poll() -> msg | None
    send: Callable[[bytes], Any]
    recv: Callable[[], Any]
    poll: Callable[[], Any]


class MPQueue(Peer):
    name = "multiprocessing.Queue"

    def __init__(self, size: int, tag: str) -> None:
        super().__init__(size, tag)
        self.q = MP.Queue()

    def open(self, role: str) -> None:
        q = self.q
        self.send, self.recv = q.put, q.get

        def poll() -> Any:
            try:
                return q.get_nowait()
            except queue.Empty:
                return None

        self.poll = poll

    def close(self, role: str) -> None:
        if role == "tx":  # let the feeder thread flush before the process exits
            self.q.close()
            self.q.join_thread()


class MPPipe(Peer):
    name = "multiprocessing.Pipe"

    def __init__(self, size: int, tag: str) -> None:
        super().__init__(size, tag)
        self.r, self.w = MP.Pipe(duplex=False)

    def open(self, role: str) -> None:
        r = self.r
        self.send, self.recv = self.w.send_bytes, r.recv_bytes
        self.poll = lambda: r.recv_bytes() if r.poll(0) else None


class FasterFifo(Peer):
    name = "faster-fifo"

    def __init__(self, size: int, tag: str) -> None:
        super().__init__(size, tag)
        self.q = faster_fifo.Queue(max_size_bytes=4 << 20)

    def open(self, role: str) -> None:
        q = self.q
        self.send = lambda m: q.put(m, timeout=1e6)
        self.recv = lambda: q.get(timeout=1e6)
        self.send_many = lambda ms: q.put_many(ms, timeout=1e6)
        self.recv_many = lambda: q.get_many(timeout=1e6, max_messages_to_get=BULK)

        def poll() -> Any:
            try:
                return q.get_nowait()
            except queue.Empty:
                return None

        self.poll = poll


class FasterFifoMany(FasterFifo):
    name = f"faster-fifo, put_many/get_many {BULK}"
    many = True


class ZmqPushPull(Peer):
    name = "pyzmq PUSH/PULL ipc://"

    def __init__(self, size: int, tag: str) -> None:
        super().__init__(size, tag)
        self.path = f"/tmp/memd-bench-{os.getpid()}-{tag}.ipc"
        self.addr = f"ipc://{self.path}"

    def open(self, role: str) -> None:
        self.ctx = zmq.Context()
        if role == "rx":
            s = self.ctx.socket(zmq.PULL)
            s.bind(self.addr)
        else:
            s = self.ctx.socket(zmq.PUSH)
            s.connect(self.addr)
        self.sock = s
        self.send, self.recv = s.send, s.recv
        noblock, again = zmq.NOBLOCK, zmq.Again

        def poll() -> Any:
            try:
                return s.recv(noblock)
            except again:
                return None

        self.poll = poll

    def close(self, role: str) -> None:
        self.sock.close(linger=-1 if role == "tx" else 0)
        self.ctx.term()

    def destroy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class PosixMQ(Peer):
    name = "posix_ipc.MessageQueue"

    def __init__(self, size: int, tag: str) -> None:
        super().__init__(size, tag)
        name = f"/memd-bench-{os.getpid()}-{tag}"
        try:
            self.mq = posix_ipc.MessageQueue(
                name, posix_ipc.O_CREX, max_messages=1024, max_message_size=max(size, 64)
            )
        except (ValueError, OSError, posix_ipc.Error):  # no CAP_SYS_RESOURCE: the default 10
            self.mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_message_size=max(size, 64))

    def open(self, role: str) -> None:
        mq = self.mq
        self.send = mq.send
        self.recv = lambda: mq.receive()[0]
        busy = posix_ipc.BusyError

        def poll() -> Any:
            try:
                return mq.receive(0)[0]
            except busy:
                return None

        self.poll = poll

    def destroy(self) -> None:
        self.mq.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            self.mq.unlink()


def peer_classes() -> list[type[Peer]]:
    out: list[type[Peer]] = [MPQueue, MPPipe]
    if faster_fifo is not None:
        out += [FasterFifo, FasterFifoMany]
    if zmq is not None:
        out.append(ZmqPushPull)
    if posix_ipc is not None:
        out.append(PosixMQ)
    return out


def peer_throughput(cls: type[Peer], n: int, size: int) -> float:
    peer = cls(size, "tp")
    sync = Sync()
    payload = PAYLOAD_8 if size == 8 else PAYLOAD_1K

    def rx() -> None:
        peer.open("rx")
        sync.ready_then_wait()
        if peer.many:
            recv_many = peer.recv_many  # type: ignore[attr-defined]
            got = 0
            while got < n:
                got += len(recv_many())
        else:
            recv = peer.recv
            for _ in range(n):
                recv()
        sync.report(b"e", now())
        peer.close("rx")

    def tx() -> None:
        peer.open("tx")
        sync.ready_then_wait()
        sync.report(b"s", now())
        if peer.many:
            send_many, batch = peer.send_many, [payload] * BULK  # type: ignore[attr-defined]
            for _ in range(n // BULK):
                send_many(batch)
        else:
            send = peer.send
            for _ in range(n):
                send(payload)
        peer.close("tx")

    def parent() -> dict[bytes, float]:
        sync.start(2)
        return sync.results(2)

    try:
        res = run_with([rx, tx], parent)
    finally:
        sync.close()
        peer.destroy()
    return n / (res[b"e"] - res[b"s"])


def peer_rtt(cls: type[Peer], n: int, size: int, busy: bool) -> float:
    ab, ba = cls(size, "ab"), cls(size, "ba")
    payload = PAYLOAD_8 if size == 8 else PAYLOAD_1K

    def pong() -> None:
        ab.open("rx")
        ba.open("tx")
        recv, poll, send = ab.recv, ab.poll, ba.send
        for _ in range(n):
            if busy:
                while (m := poll()) is None:
                    pass
            else:
                m = recv()
            send(m)
        ba.close("tx")
        ab.close("rx")

    lat: list[int] = []

    def ping() -> None:
        ab.open("tx")
        ba.open("rx")
        send, recv, poll = ab.send, ba.recv, ba.poll
        ns = time.perf_counter_ns
        for _ in range(n):
            t0 = ns()
            send(payload)
            if busy:
                while poll() is None:
                    pass
            else:
                recv()
            lat.append(ns() - t0)
        ab.close("tx")
        ba.close("rx")

    try:
        run_with([pong], ping)
    finally:
        ab.destroy()
        ba.destroy()
    return statistics.median(lat[n // 10 :]) / 1000


def peer_rtt_async(cls: type[Peer], n: int, size: int) -> float:
    """peer_rtt's blocking case with an asyncio ping side: it awaits the reply in one
    executor thread (run_in_executor), as asyncio code waits on such a transport."""
    ab, ba = cls(size, "ab"), cls(size, "ba")
    payload = PAYLOAD_8 if size == 8 else PAYLOAD_1K

    def pong() -> None:
        ab.open("rx")
        ba.open("tx")
        recv, send = ab.recv, ba.send
        for _ in range(n):
            send(recv())
        ba.close("tx")
        ab.close("rx")

    lat: list[int] = []

    async def ping() -> None:
        ab.open("tx")
        ba.open("rx")
        send, recv = ab.send, ba.recv
        loop = asyncio.get_running_loop()
        ns = time.perf_counter_ns
        with concurrent.futures.ThreadPoolExecutor(1) as waiter:
            for _ in range(n):
                t0 = ns()
                send(payload)
                await loop.run_in_executor(waiter, recv)
                lat.append(ns() - t0)
        ab.close("tx")
        ba.close("rx")

    try:
        run_with([pong], lambda: asyncio.run(ping()))
    finally:
        ab.destroy()
        ba.destroy()
    return statistics.median(lat[n // 10 :]) / 1000


# --- measuring -------------------------------------------------------------------------


def calibrated(run: Callable[[int], float], trial: int, repeat: int) -> float:
    """Median rate of `repeat` runs sized to last about TARGET_SECONDS each."""
    rate = run(trial)
    n = max(trial, int(rate * TARGET_SECONDS) // BULK * BULK)
    return statistics.median(run(n) for _ in range(repeat))


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    return f"{x / 1e3:.0f} k/s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.1f}x"


def fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} µs"


def throughput_table(repeat: int, quick: bool) -> dict[str, Any]:
    world = MemdWorld()
    rows: dict[str, dict[int, float | None]] = {}
    memd_rows = {"memd ring, single-item calls": False, f"memd ring, bulk-{BULK} buffer": True}
    for size in (8, 1024):
        for name, bulk in memd_rows.items():
            try:
                rows.setdefault(name, {})[size] = calibrated(  # short runs: 5 or more
                    lambda n, s=size, b=bulk: memd_throughput(world, n, s, b),
                    64_000 if bulk else 20_000,
                    max(repeat, 5),
                )
            except RuntimeError as e:
                print(f"  {name}: failed: {e}", file=sys.stderr)
                rows.setdefault(name, {})[size] = None
            print(f"  {name:<38} {size:>5} B  {fmt_rate(rows[name][size])}", flush=True)
        for cls in peer_classes():
            try:
                rows.setdefault(cls.name, {})[size] = calibrated(
                    lambda n, c=cls, s=size: peer_throughput(c, n, s),
                    3_200 if quick else 6_400,
                    repeat,
                )
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"  {cls.name}: failed: {e}", file=sys.stderr)
                rows.setdefault(cls.name, {})[size] = None
            print(f"  {cls.name:<38} {size:>5} B  {fmt_rate(rows[cls.name][size])}", flush=True)
    single, bulk_name = list(memd_rows)
    print()
    print(
        f"Cross-process throughput, 1 producer -> 1 consumer, median of {repeat} "
        f"(memd rows: of {max(repeat, 5)})"
    )
    print("(ratios: how many times the memd row is faster than this row)")
    hdr = (
        f"{'transport':<38} | {'8 B':>10} {'single':>7} {'bulk':>7} | {'1 KiB':>10} "
        f"{'single':>7} {'bulk':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, by_size in rows.items():
        cells = []
        for size in (8, 1024):
            x = by_size.get(size)
            cells.append(
                f"{fmt_rate(x):>10} {fmt_ratio(rows[single][size], x):>7} "
                f"{fmt_ratio(rows[bulk_name][size], x):>7}"
            )
        print(f"{name:<38} | {cells[0]} | {cells[1]}")
    return {
        "single8": rows[single][8],
        "bulk8": rows[bulk_name][8],
        "single1k": rows[single][1024],
        "bulk1k": rows[bulk_name][1024],
    }


def rtt_table(repeat: int, quick: bool) -> dict[str, Any]:
    world = MemdWorld()
    n_memd, n_peer = (5_000, 1_000) if quick else (20_000, 3_000)
    rows: dict[str, dict[tuple[int, bool], float | None]] = {}

    def measure(name: str, fn: Callable[[], float], key: tuple[int, bool]) -> None:
        try:
            rows.setdefault(name, {})[key] = statistics.median(fn() for _ in range(repeat))
        except Exception as e:
            print(f"  {name}: failed: {e}", file=sys.stderr)
            rows.setdefault(name, {})[key] = None
        mode = "busy-poll" if key[1] else "blocking"
        print(f"  {name:<38} {key[0]:>5} B {mode:<9} {fmt_us(rows[name][key])}", flush=True)

    def with_spin(fn: Callable[[], float]) -> float:
        old = _ext.ring_wait_spin(5e-6)  # forked children inherit the setting
        try:
            return fn()
        finally:
            _ext.ring_wait_spin(old)

    for size in (8, 1024):
        for busy in (True, False):
            measure("memd ring", lambda s=size, b=busy: memd_rtt(world, n_memd, s, b), (size, busy))
            if not busy:
                measure(
                    SPIN,
                    lambda s=size: with_spin(lambda: memd_rtt(world, n_memd // 2, s, False)),
                    (size, busy),
                )
            for cls in peer_classes():
                if cls.many:
                    continue
                measure(
                    cls.name, lambda c=cls, s=size, b=busy: peer_rtt(c, n_peer, s, b), (size, busy)
                )
            if not busy:
                measure(
                    AIO,
                    lambda s=size: memd_rtt(world, n_memd // 2, s, False, aio=True),
                    (size, busy),
                )
                measure(
                    AIO_BOTH,
                    lambda s=size: memd_rtt(world, n_memd // 2, s, False, aio=True, aio_pong=True),
                    (size, busy),
                )
                measure(
                    AIO_MPQ,
                    lambda s=size: peer_rtt_async(MPQueue, n_peer, s),
                    (size, busy),
                )
    print()
    print(f"Ping-pong round trip, median µs (median of {repeat} runs); ratio = this / memd")
    print(
        "(memd 'blocking' waits sleep on the futex at once, as the README says; the opt-in "
        "row first retries up to 5 µs: ring_wait_spin(5e-6))"
    )
    keys = [(8, True), (8, False), (1024, True), (1024, False)]
    labels = ["8 B busy", "8 B block", "1 KiB busy", "1 KiB block"]
    hdr = f"{'transport':<32} | " + " | ".join(f"{lab:>17}" for lab in labels)
    print(hdr)
    print("-" * len(hdr))
    for name, by_key in rows.items():
        cells = [
            f"{fmt_us(by_key.get(k)):>9} {fmt_ratio(by_key.get(k), rows['memd ring'][k]):>7}"
            for k in keys
        ]
        print(f"{name:<32} | " + " | ".join(cells))
    return {
        "aio8": rows[AIO][(8, False)],
        "aio_both8": rows[AIO_BOTH][(8, False)],
        "aio_mpq8": rows[AIO_MPQ][(8, False)],
        "busy8": rows["memd ring"][(8, True)],
        "block8": rows["memd ring"][(8, False)],
        "spin8": rows[SPIN][(8, False)],
    }


@contextlib.contextmanager
def spinner(cpu: int | None) -> Iterator[None]:
    """A third process spinning on `cpu` (None: none) while the block runs: a busy
    host, where a sleeping side competes with it for the core."""
    if cpu is None:
        yield
        return

    def spin() -> None:
        os.sched_setaffinity(0, {cpu})
        while True:
            pass

    pid = fork(spin)
    try:
        time.sleep(0.05)  # let it settle on its core
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def busy_core_table(repeat: int, quick: bool) -> dict[str, Any]:
    """Blocking throughput (8 B, timeout=None as users write it) idle and with a third
    process spinning on one of the cores."""
    world = MemdWorld()
    cpus = sorted(os.sched_getaffinity(0))
    rows: dict[str, dict[bool, float | None]] = {}
    for name, bulk in (("memd ring, single-item calls", False), (f"memd ring, bulk-{BULK}", True)):
        for busy in (False, True):
            try:
                with spinner(cpus[0] if busy else None):
                    rate = calibrated(
                        lambda n, b=bulk: memd_throughput(world, n, 8, b),
                        64_000 if bulk else 20_000,
                        max(repeat, 5),
                    )
            except RuntimeError as e:
                print(f"  {name}: failed: {e}", file=sys.stderr)
                rate = None
            rows.setdefault(name, {})[busy] = rate
            how = "a core busy" if busy else "idle"
            print(f"  {name:<38} {how:<12} {fmt_rate(rate)}", flush=True)
    print()
    print(
        f"Blocking throughput, 8 B, idle and with a third process spinning on CPU {cpus[0]} "
        f"(median of {max(repeat, 5)}); slowdown = idle / busy"
    )
    hdr = f"{'transport':<38} | {'idle':>10} | {'core busy':>10} | {'slowdown':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, by in rows.items():
        print(
            f"{name:<38} | {fmt_rate(by[False]):>10} | {fmt_rate(by[True]):>10} | "
            f"{fmt_ratio(by[False], by[True]):>8}"
        )
    single, bulk_name = list(rows)
    return {
        "single_idle": rows[single][False],
        "single_busy": rows[single][True],
        "bulk_idle": rows[bulk_name][False],
        "bulk_busy": rows[bulk_name][True],
    }


def echo_queue(prefix: str, rundir: str, inbox: Any, outbox: Any, n: int) -> None:
    """The pickle table's pong side (a spawned process): whatever arrives goes back.
    A memd reference arriving here attaches this process on first use."""
    for _ in range(n):
        outbox.put(inbox.get())


def pickle_table(repeat: int, quick: bool) -> dict[str, Any]:
    """memd objects through pickle and multiprocessing.Queue, against what a program
    sends without memd (the bytes, or a bare int handle).  Needs a primary: starts a
    --no-huge memd of its own."""
    import pickle
    import tempfile
    from pathlib import Path

    from memd.testing import Daemon

    n = 500 if quick else 2000
    rows: dict[str, tuple[float | None, float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), "nohuge", "-m", "16").start()
        try:
            with daemon.attach() as mem:
                pool = mem.mempool_create("bench-pickle", 64, 1024)
                ring = mem.ring_create("bench-pickle", 64)
                obj = pool.get()
                obj.buf[:] = PAYLOAD_1K
                items = {
                    "MempoolObject (1 KiB), a reference": obj,
                    "Ring, a reference": ring,
                    "int handle + pool.obj() (by hand)": obj.handle,
                    "1 KiB bytes, copied": PAYLOAD_1K,
                }
                ctx = multiprocessing.get_context("spawn")
                for name, item in items.items():
                    by_hand = isinstance(item, int)
                    stmt = (
                        "pool.obj(pickle.loads(pickle.dumps(item)))"
                        if by_hand
                        else "pickle.loads(pickle.dumps(item))"
                    )
                    env = {"pickle": pickle, "item": item, "pool": pool}
                    local = per_call(stmt, env, 2000, repeat) * 1e6
                    inbox, outbox = ctx.Queue(), ctx.Queue()
                    args = (daemon.prefix, str(daemon.runtime_dir), inbox, outbox, n + 1)
                    proc = ctx.Process(target=echo_queue, args=args)
                    proc.start()
                    inbox.put(item)
                    outbox.get(timeout=60)  # the first one attaches the echo process
                    lat = []
                    for _ in range(n):
                        t0 = time.perf_counter_ns()
                        inbox.put(item)
                        back = outbox.get(timeout=60)
                        if by_hand:
                            back = pool.obj(back)
                        lat.append(time.perf_counter_ns() - t0)
                    proc.join(60)
                    rows[name] = (local, statistics.median(lat[n // 10 :]) / 1000)
                    print(f"  {name:<38} {fmt_us(local)} {fmt_us(rows[name][1])}", flush=True)
                pool.put(obj)
        finally:
            daemon.stop()
    print()
    print("Pickling: memd objects as references, median µs")
    hdr = f"{'what':<38} | {'dumps+loads':>11} | {'mp.Queue round trip':>19}"
    print(hdr)
    print("-" * len(hdr))
    for name, (local, rtt) in rows.items():
        print(f"{name:<38} | {fmt_us(local):>11} | {fmt_us(rtt):>19}")
    return {name: rtt for name, (_, rtt) in rows.items()}


def per_call(stmt: str, env: dict[str, Any], number: int, repeat: int) -> float:
    """Median seconds per execution of stmt."""
    return statistics.median(
        t / number for t in timeit.repeat(stmt, globals=env, number=number, repeat=max(repeat, 3))
    )


def inproc_table(repeat: int, quick: bool) -> dict[str, Any]:
    window = _ext.Window.anonymous(16 << 20)
    ring = Ring.create(window, BASE, RING_COUNT, 0, "inproc")
    spsc = Ring.create(window, BASE + (1 << 20), RING_COUNT, SPSC, "inproc-spsc")
    pool = Mempool.create(window, BASE + (2 << 20), 4096, 64, cache_size=POOL_CACHE, name="inproc")
    buf = np.arange(BULK, dtype=np.uint64)
    out = np.zeros(BULK, dtype=np.uint64)
    dq: collections.deque[int] = collections.deque()
    sq: queue.SimpleQueue[int] = queue.SimpleQueue()
    env = {
        "enq": ring.enqueue,
        "deq": ring.dequeue,
        "senq": spsc.enqueue,
        "sdeq": spsc.dequeue,
        "enqb": ring.enqueue_bulk,
        "deqb": ring.dequeue_bulk_into,
        "buf": buf,
        "out": out,
        "get": pool.get,
        "put": pool.put,
        "geth": pool.get_handle,
        "getb": pool.get_bulk_into,
        "putb": pool.put_bulk,
        "app": dq.append,
        "pop": dq.popleft,
        "sput": sq.put,
        "sget": sq.get,
    }
    number = 100_000 if quick else 400_000
    rows = [
        ("memd ring enqueue+dequeue (MP/MC)", "enq(1); deq()", 1),
        ("memd ring enqueue+dequeue (SP/SC)", "senq(1); sdeq()", 1),
        (f"memd ring bulk-{BULK} enq+deq, per entry", "enqb(buf); deqb(out)", BULK),
        ("memd mempool get+put (objects)", "put(get())", 1),
        ("memd mempool get_handle+put", "put(geth())", 1),
        (f"memd mempool bulk-{BULK} get+put, per obj", "getb(out); putb(out)", BULK),
        ("collections.deque append+popleft", "app(1); pop()", 1),
        ("queue.SimpleQueue put+get", "sput(1); sget()", 1),
    ]
    res = {}
    for name, stmt, per in rows:
        n = number // per if per > 1 else number
        res[name] = per_call(stmt, env, n, repeat) / per
    base = res["collections.deque append+popleft"]
    print()
    print(f"In-process cost per call (median of {max(repeat, 3)}, Python loop included)")
    hdr = f"{'operation':<44} | {'ns':>7} | {'per second':>11} | {'vs deque':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, t in res.items():
        print(f"{name:<44} | {t * 1e9:7.1f} | {fmt_rate(1 / t):>11} | {t / base:7.2f}x")
    pool.audit()
    return {
        "ring": res["memd ring enqueue+dequeue (MP/MC)"],
        "ring_sp": res["memd ring enqueue+dequeue (SP/SC)"],
        "bulk": res[f"memd ring bulk-{BULK} enq+deq, per entry"],
        "mp": res["memd mempool get+put (objects)"],
        "mpbulk": 1 / res[f"memd mempool bulk-{BULK} get+put, per obj"],
    }


def cpu_hz() -> float | None:
    """The CPU clock from /proc/cpuinfo: converts DPDK's TSC cycles to ns (roughly:
    the TSC runs at the nominal clock)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def dpdk_perf(test: str, timeout: float) -> str:
    """Output (stdout+stderr) of one dpdk-test autotest, or '' if it cannot run."""
    if not shutil.which("dpdk-test"):
        return ""
    try:
        return subprocess.run(
            [
                "dpdk-test",
                "--no-pci",
                "--no-huge",
                "-m",
                "256",
                "-l",
                "0-1",
                "--file-prefix",
                f"rb{os.getpid()}",
            ],
            input=f"{test}\nquit\n",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def dpdk_table(ip: dict[str, Any], tp: dict[str, Any], mempool: bool) -> None:
    """DPDK's own ring_perf_autotest (C, no Python) beside memd's matching rows."""
    out = dpdk_perf("ring_perf_autotest", 300)
    hz = cpu_hz()
    cycles = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"legacy APIs: (.+?): ([0-9.]+)\s*$", out, re.M)
    }
    if not cycles or not hz:
        print("\n(dpdk-test not installed or ring_perf_autotest failed: no DPDK figures)")
        return
    print(
        f"\nDPDK ring_perf_autotest (C), cycles per element -> ns at {hz / 1e9:.2f} GHz; "
        "memd rows include the Python call"
    )
    rows = [
        ("SP/SC single enq+deq (in-process)", "SP/SC: single", ip.get("ring_sp")),
        ("MP/MC single enq+deq (in-process)", "MP/MC: single", ip.get("ring")),
        (f"SP/SC bulk-{BULK} per entry (in-process)", "SP/SC: bulk (size: 32)", ip.get("bulk")),
    ]
    if tp.get("bulk8"):
        # DPDK's "two physical cores" case is the cross-process producer/consumer
        rows.append((f"SP/SC bulk-{BULK} per entry, 2 cores", None, 1 / tp["bulk8"]))
    print(f"{'case':<42} | {'DPDK ns':>8} | {'memd ns':>8} | memd/DPDK")
    two_core = re.search(r"two physical cores.*?SP/SC: bulk \(size: 32\): ([0-9.]+)", out, re.S)
    for label, key, ours in rows:
        c = float(two_core.group(1)) if key is None and two_core else cycles.get(key or "")
        if c is None or ours is None:
            continue
        ns = c / hz * 1e9
        print(f"{label:<42} | {ns:8.1f} | {ours * 1e9:8.1f} | {ours * 1e9 / ns:8.1f}x")
    if mempool:
        mp = dpdk_perf("mempool_perf_autotest", 1800)
        rates = [float(x) for x in re.findall(r"rate_persec=(\d+)", mp)]
        if rates:
            print(
                f"DPDK mempool_perf_autotest: best {max(rates) / 1e6:.0f} M obj/s, median "
                f"{statistics.median(rates) / 1e6:.0f} M obj/s over {len(rates)} cases "
                f"(memd bulk-32 get+put: {ip.get('mpbulk', 0) / 1e6:.0f} M obj/s)"
            )


def targets(
    tp: dict[str, Any], bz: dict[str, Any], rtt: dict[str, Any], ip: dict[str, Any]
) -> None:
    def line(what: str, value: float | None, goal: str, ok: bool | None) -> None:
        mark = "-" if ok is None else ("met" if ok else "MISSED")
        shown = "-" if value is None else value
        print(f"  {what:<44} {shown!s:>12}   target {goal:<12} {mark}")

    print()
    print("Targets (2-core machine; medians; never asserted)")
    if tp:
        s, b = tp["single8"], tp["bulk8"]
        line("cross-process single-item, msgs/s", fmt_rate(s), ">= 5 M/s", s and s >= 5e6)
        line(f"cross-process bulk-{BULK}, msgs/s", fmt_rate(b), ">= 30 M/s", b and b >= 30e6)
    if bz:
        for what, idle, busy in (
            ("single-item", bz["single_idle"], bz["single_busy"]),
            (f"bulk-{BULK}", bz["bulk_idle"], bz["bulk_busy"]),
        ):
            ok = None if not idle or not busy else idle / busy <= 1.5
            line(
                f"blocking {what} with a core busy, slowdown", fmt_ratio(idle, busy), "<= 1.5x", ok
            )
    if rtt:
        line(
            "busy-poll round trip",
            fmt_us(rtt["busy8"]),
            "<= 2 µs",
            rtt["busy8"] is not None and rtt["busy8"] <= 2,
        )
        line(
            "blocking round trip (sleeps at once)",
            fmt_us(rtt["block8"]),
            "<= 20 µs",
            rtt["block8"] is not None and rtt["block8"] <= 20,
        )
        line(
            "asyncio round trip (dequeue_async)",
            fmt_us(rtt["aio8"]),
            "< mp.Queue",
            None
            if rtt["aio8"] is None or rtt["aio_mpq8"] is None
            else rtt["aio8"] < rtt["aio_mpq8"],
        )
        line(
            "asyncio on both sides round trip",
            fmt_us(rtt["aio_both8"]),
            "< mp.Queue asyncio",
            None
            if rtt["aio_both8"] is None or rtt["aio_mpq8"] is None
            else rtt["aio_both8"] < rtt["aio_mpq8"],
        )
        line(
            "blocking round trip (opt-in 5 µs spin)",
            fmt_us(rtt["spin8"]),
            "<= 20 µs",
            rtt["spin8"] is not None and rtt["spin8"] <= 20,
        )
    if ip:
        line(
            "in-process ring enq+deq",
            f"{ip['ring'] * 1e9:.0f} ns",
            "<= 100 ns",
            ip["ring"] <= 100e-9,
        )
        line("mempool get+put", f"{ip['mp'] * 1e9:.0f} ns", "<= 120 ns", ip["mp"] <= 120e-9)
        line(
            "mempool bulk get+put, obj/s", fmt_rate(ip["mpbulk"]), ">= 50 M/s", ip["mpbulk"] >= 50e6
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    ap.add_argument("--quick", action="store_true", help="shorter runs, 1 repeat")
    ap.add_argument(
        "--dpdk-mempool",
        action="store_true",
        help="also run DPDK's mempool_perf_autotest (takes minutes)",
    )
    ap.add_argument(
        "--only",
        choices=["throughput", "busy", "rtt", "inproc", "pickle"],
        action="append",
        help="run only these parts (repeatable)",
    )
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    global TARGET_SECONDS
    if args.quick:
        TARGET_SECONDS = 0.1
    parts = args.only or ["throughput", "busy", "rtt", "inproc", "pickle"]
    t0 = time.monotonic()
    print(
        f"memd ring bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}",
        flush=True,
    )
    tp = throughput_table(repeat, args.quick) if "throughput" in parts else {}
    bz = busy_core_table(repeat, args.quick) if "busy" in parts else {}
    rtt = rtt_table(repeat, args.quick) if "rtt" in parts else {}
    ip = inproc_table(repeat, args.quick) if "inproc" in parts else {}
    if "pickle" in parts:
        pickle_table(repeat, args.quick)
    if ip:
        dpdk_table(ip, tp, args.dpdk_mempool)
    targets(tp, bz, rtt, ip)
    print(f"\n({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
