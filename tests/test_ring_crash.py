"""Rings survive processes killed at any moment.

Children forked on an anonymous shared window run one ring operation with
``_ext._ring_crash_after(k)`` armed, so they ``_exit(77)`` at step point k (after
taking the lock and claiming; after each slot; before the tail store; after it).
The parent then checks that it goes on without hanging, that the count is
consistent, and that the entries are exactly the expected ones: a dead producer's
unpublished entries are absent, a dead consumer's unreleased entries are still
there, in order.  Hangs are bounded by a faulthandler watchdog (a bug fails the
run instead of hanging it); nothing here asserts on time.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from support.forking import fork_run as fork_child
from support.forking import wait_child

from memd import _ext
from memd.errors import PrimaryNotRunning
from memd.shm.ring import RING_F_SC_DEQ, RING_F_SP_ENQ, Ring
from tests.support.layout import offsets

BASE = _ext.CONFIG_SIZE  # offsets below this are the config struct
SPSC = RING_F_SP_ENQ | RING_F_SC_DEQ
CRASH = 77  # the exit code of a child killed by the crash knob
LAY = offsets()
N = 5  # entries per crashing operation: steps 0 .. N + 2
STEPS = N + 3


@pytest.fixture(scope="module")
def window() -> _ext.Window:
    return _ext.Window.anonymous(16 << 20)


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A ring call stuck in C cannot be interrupted from Python: if a test runs
    this long, dump every thread's stack and end the process (a failure)."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- helpers ----------------------------------------------------------------


def fork_run(fn: Callable[[], object], crash_after: int = -1) -> int:
    """Run fn in a forked child with the crash knob armed; return its pid."""
    return fork_child(fn, before=lambda: _ext._ring_crash_after(crash_after))


def run_child(fn: Callable[[], object], crash_after: int) -> int:
    return wait_child(fork_run(fn, crash_after))


def poke_counters(window: _ext.Window, off: int, value: int) -> None:
    """Start an empty ring's counters (head, tail, copy of the other tail) at value."""
    for side in ("memd_ring.prod", "memd_ring.cons"):
        window.view(off + LAY[side], 8)[:] = struct.pack("=II", value, value)
        copy = off + LAY[side] + LAY["memd_ring_headtail.other_tail"]
        window.view(copy, 4)[:] = struct.pack("=I", value)


def lock_view(window: _ext.Window, off: int, side: str) -> memoryview:
    return window.view(off + LAY[f"memd_ring.{side}"] + LAY["memd_ring_headtail.lock"], 8)


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: what the lock word's high half holds."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[19])


def lock_word(pid: int, start: int) -> bytes:
    return struct.pack("=Q", (pid & 0xFFFFFFFF) | ((start & 0xFFFFFFFF) << 32))


def new_ring(window: _ext.Window, flags: int, start: int) -> Ring:
    r = Ring.create(window, BASE, 16, flags, "crash")
    if start:
        poke_counters(window, BASE, start)
    return r


# --- one operation killed at each step ---------------------------------------

MODES = [pytest.param(0, id="mpmc"), pytest.param(SPSC, id="spsc")]
STARTS = [pytest.param(0, id="start0"), pytest.param(2**32 - 3, id="wrapping")]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("flags", MODES)
def test_producer_killed_at_every_step(window: _ext.Window, flags: int, start: int) -> None:
    for k in range(STEPS + 1):
        r = new_ring(window, flags, start)
        assert r.enqueue_bulk([1, 2, 3, 4, 5, 6]) == 6
        assert r.dequeue_bulk(4) == [1, 2, 3, 4]  # slots wrap inside the 16 below
        before = r.wait_stats
        vals = [1000 + 10 * k + i for i in range(N)]
        code = run_child(lambda r=r, vals=vals: r.enqueue_bulk(vals), k)
        assert code == (CRASH if k < STEPS else 0), f"step {k}"
        published = k >= N + 2  # died after the tail store, or finished
        expect = [5, 6] + (vals if published else [])
        assert r.count == len(expect), f"step {k}"
        # The survivor (a new producer) goes on: it needs the dead one's lock.
        assert r.enqueue_bulk([7, 8], timeout=10) == 2
        expect += [7, 8]
        assert r.count == len(expect)
        assert r.dequeue_bulk(len(expect), timeout=10) == expect, f"step {k}"
        assert r.empty()
        after = r.wait_stats
        died_holding = k < STEPS and not flags
        assert after["producer_recoveries"] == before["producer_recoveries"] + died_holding
        assert after["consumer_recoveries"] == before["consumer_recoveries"]
        assert after["producer_lock_owner"] == after["consumer_lock_owner"] == 0


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("flags", MODES)
def test_consumer_killed_at_every_step(window: _ext.Window, flags: int, start: int) -> None:
    for k in range(STEPS + 1):
        r = new_ring(window, flags, start)
        items = list(range(100, 112))
        assert r.enqueue_bulk(items) == 12
        assert r.dequeue_bulk(3) == items[:3]
        items = items[3:]
        before = r.wait_stats
        code = run_child(lambda r=r: r.dequeue_bulk(N), k)
        assert code == (CRASH if k < STEPS else 0), f"step {k}"
        released = k >= N + 2  # died after the tail store, or finished
        expect = items[N:] if released else items  # unreleased entries stay, in order
        assert r.count == len(expect), f"step {k}"
        assert r.enqueue_bulk([7], timeout=10) == 1  # producers never noticed
        # The survivor (a new consumer) takes the lock over and sees them again.
        assert r.dequeue_bulk(len(expect) + 1, timeout=10) == [*expect, 7], f"step {k}"
        assert r.empty()
        after = r.wait_stats
        died_holding = k < STEPS and not flags
        assert after["consumer_recoveries"] == before["consumer_recoveries"] + died_holding
        assert after["producer_recoveries"] == before["producer_recoveries"]


def test_burst_and_single_item_calls_are_safe_too(window: _ext.Window) -> None:
    """enqueue/dequeue/burst go through the same code: one death of each."""
    r = new_ring(window, 0, 0)
    assert run_child(lambda: r.enqueue(5), 1) == CRASH  # slot written, unpublished
    assert run_child(lambda: r.enqueue_burst(list(range(40))), 10) == CRASH
    assert r.empty()
    r.enqueue_bulk([1, 2, 3])
    assert run_child(r.dequeue, 1) == CRASH  # read, not released
    assert run_child(lambda: r.dequeue_burst(8), 3) == CRASH
    assert r.dequeue_burst(8, timeout=10) == [1, 2, 3]
    assert r.wait_stats["producer_recoveries"] == 2
    assert r.wait_stats["consumer_recoveries"] == 2


def test_unreaped_dead_owner_is_recovered(window: _ext.Window) -> None:
    """A dead child its parent has not waited for yet (a zombie) still has a pid:
    the waiter sees from /proc that it is gone."""
    r = new_ring(window, 0, 0)
    pid = fork_run(lambda: r.enqueue_bulk([1, 2]), 1)
    with open(f"/proc/{pid}/stat") as f:  # wait until it is a zombie, without reaping
        while f.read().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.002)
            f.seek(0)
    assert r.enqueue_bulk([3], timeout=10) == 1
    assert r.wait_stats["producer_recoveries"] == 1
    assert wait_child(pid) == CRASH
    assert r.dequeue_burst(8) == [3]


def test_several_waiters_one_takes_over(window: _ext.Window) -> None:
    """Three producers wait behind a dead owner: exactly one takes the lock over,
    all three enqueue."""
    r = new_ring(window, 0, 0)
    dead = fork_run(lambda: time.sleep(0.2))
    dead_start = start_ticks(dead)
    wait_child(dead)
    lock_view(window, BASE, "prod")[:] = lock_word(dead, dead_start)
    pids = [fork_run(lambda p=p: r.enqueue_bulk([p, p, p], timeout=10)) for p in range(3)]
    assert [wait_child(p) for p in pids] == [0, 0, 0]
    assert sorted(r.dequeue_burst(16)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.wait_stats["producer_recoveries"] == 1


def test_live_owner_is_waited_for_not_robbed(window: _ext.Window) -> None:
    """A lock held by a live process is never taken over: the caller waits, within
    its timeout and without the GIL, until the owner lets go (here another process
    clears the word, as an unlock does); timeout=0 never waits."""
    r = new_ring(window, 0, 0)
    r.enqueue(42)
    lock = lock_view(window, BASE, "cons")

    release_r, release_w = os.pipe()

    def owner() -> None:
        lock[:] = lock_word(os.getpid(), start_ticks(os.getpid()))
        os.read(release_r, 1)  # until the parent says so
        time.sleep(0.3)  # far longer than a lock-wait slice: checked alive many times
        lock[:] = bytes(8)

    pid = fork_run(owner)
    while lock.tobytes() == bytes(8) and not os.waitpid(pid, os.WNOHANG)[0]:
        time.sleep(0.001)
    assert r.dequeue() is None  # timeout=0: a held lock is "not now", never a wait
    os.write(release_w, b"x")
    assert r.dequeue(timeout=30) == 42  # waits for the lock until the owner lets go
    os.close(release_r)
    os.close(release_w)
    assert wait_child(pid) == 0
    s = r.wait_stats
    assert s["consumer_recoveries"] == 0
    assert s["consumer_lock_sleeps"] > 0  # it did sleep, it did not spin all along


def test_reused_pid_is_not_the_owner(window: _ext.Window) -> None:
    """The lock word names pid and start time: a live process with the owner's pid
    but a different start time means the owner died and its pid was reused."""
    r = new_ring(window, 0, 0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = start_ticks(sleeper.pid)
        lock_view(window, BASE, "prod")[:] = lock_word(sleeper.pid, start + 1)
        assert r.enqueue(1, timeout=10)
        assert r.wait_stats["producer_recoveries"] == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.dequeue() == 1


def test_new_single_producer_after_a_death(window: _ext.Window) -> None:
    """SP/SC: a single producer dies with head != tail; the next one (another
    process) starts from the tail, so nothing unwritten is ever published."""
    r = new_ring(window, SPSC, 0)
    head = BASE + LAY["memd_ring.prod"] + LAY["memd_ring_headtail.head"]
    for k in range(1, N + 2):
        assert run_child(lambda: r.enqueue_bulk([9] * N), k) == CRASH
        h, t = struct.unpack("=II", window.view(head, 8))
        assert h - t == N  # claimed, never published
        assert r.empty()
    assert run_child(lambda: r.enqueue_bulk([1, 2, 3]), -1) == 0
    assert r.dequeue_burst(16) == [1, 2, 3]


# --- watching the primary ----------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for the primary: a process we can kill."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def unblock_later(r: Ring, done: threading.Event, after: float = 60.0) -> None:
    """If the call under test is still waiting after `after` s, give it an entry so
    that it returns (and the test fails) instead of hanging."""

    def run() -> None:
        if not done.wait(after):
            r.enqueue(0xDEAD)

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_waiting_call_raises_when_the_watched_primary_dies(
    sleeper: subprocess.Popen[bytes], timeout: float | None
) -> None:
    win = _ext.Window.anonymous(4 << 20)
    r = Ring.create(win, BASE, 16, 0, "watched")
    fd = os.pidfd_open(sleeper.pid)
    try:
        win.watch(fd)
        assert win.watch_fd == fd
        killer = threading.Timer(0.2, sleeper.kill)
        killer.start()
        done = threading.Event()
        unblock_later(r, done)
        try:
            with pytest.raises(PrimaryNotRunning, match="memd primary died"):
                r.dequeue(timeout=timeout)
            assert r.enqueue_bulk(list(range(15))) == 15  # full now
            with pytest.raises(PrimaryNotRunning):  # any later wait fails at once
                r.enqueue(99, timeout=timeout)
        finally:
            done.set()
            killer.join()
        # calls that need not wait still work: other processes may still run
        assert r.dequeue_burst(16) == list(range(15))
        assert r.dequeue() is None
        win.watch(-1)
        assert win.watch_fd == -1
        assert r.dequeue(timeout=0.01) is None  # no longer watching: a plain timeout
    finally:
        os.close(fd)


def test_watching_a_live_process_changes_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    win = _ext.Window.anonymous(4 << 20)
    r = Ring.create(win, BASE, 16, 0, "live")
    fd = os.pidfd_open(sleeper.pid)
    try:
        win.watch(fd)
        assert r.dequeue(timeout=0.25) is None  # slept through several slices
        pid = fork_run(lambda: (time.sleep(0.1), r.enqueue(7)))
        assert r.dequeue(timeout=30) == 7
        assert wait_child(pid) == 0
    finally:
        win.watch(-1)
        os.close(fd)


def test_watch_arguments() -> None:
    win = _ext.Window.anonymous(4 << 20)
    assert win.watch_fd == -1
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError):
        win.watch(r)  # closed
    with pytest.raises(ValueError):
        win.watch(-2)


# --- many processes, killed at random ------------------------------------------


def test_random_kills_lose_only_what_was_in_hand() -> None:
    """2 producers and 2 consumers, killed at random and replaced: by SIGKILL at a
    random moment, or inside a random ring operation at a random step (the crash
    knob), while the others keep using the ring.  Every value a consumer recorded
    was produced, none twice, each producer's values in order; the ring stays
    consistent and usable; the values lost or not confirmed are at most what the
    dead had in hand (one bulk each)."""
    rng = random.Random(1234)
    window = _ext.Window.anonymous(64 << 20)  # fresh: zero-filled bookkeeping
    r = Ring.create(window, BASE, 64, 0, "kills")
    bulk, n_prod, n_cons, per_prod, max_deaths = 8, 2, 2, 100_000, 24
    # per producer role: values confirmed sent; per consumer slot: (count, values)
    sent = np.frombuffer(window.view(BASE + (1 << 20), 8 * n_prod), dtype=np.uint64)
    rec_cap = n_prod * per_prod + 1024
    rec_off, rec_stride = BASE + (2 << 20), 8 * (rec_cap + 1)

    def record(slot: int) -> np.ndarray:
        return np.frombuffer(window.view(rec_off + slot * rec_stride, rec_stride), dtype=np.uint64)

    def plan() -> tuple[int, int]:
        """(op number, step) at which a new incarnation dies, or (-1, -1)."""
        if state["deaths"] < max_deaths and rng.random() < 0.6:
            return rng.randrange(5, 400), rng.randrange(bulk + 3)
        return -1, -1

    def producer(p: int, tag: int, crash: tuple[int, int]) -> None:
        """Values are tag << 32 | seq: each incarnation has its own tag, so one
        that re-sends an unconfirmed bulk never makes a duplicate."""
        vals = np.zeros(bulk, dtype=np.uint64)
        ops = 0
        while sent[p] < per_prod:
            seq = int(sent[p])
            k = min(bulk, per_prod - seq)
            vals[:k] = (np.uint64(tag) << np.uint64(32)) | np.arange(seq, seq + k, dtype=np.uint64)
            ops += 1
            if ops == crash[0]:
                _ext._ring_crash_after(crash[1])
            if r.enqueue_bulk(vals[:k], timeout=0.05) == k:
                sent[p] = seq + k  # a death just before this: sent, unconfirmed

    def consumer(slot: int, crash: tuple[int, int]) -> None:
        rec, buf = record(slot), np.zeros(bulk, dtype=np.uint64)
        ops = 0
        while True:
            ops += 1
            if ops == crash[0]:
                _ext._ring_crash_after(crash[1])
            got = r.dequeue_burst_into(buf, timeout=0.05)
            n = int(rec[0])
            rec[1 + n : 1 + n + got] = buf[:got]
            rec[0] = n + got  # a death before this: received, not recorded

    state = {"tag": n_prod, "slot": n_cons, "deaths": 0}

    def new_producer(p: int, tag: int) -> int:
        return fork_run(lambda: producer(p, tag, plan() if tag >= n_prod else (-1, -1)))

    def new_consumer() -> int:
        slot = state["slot"]
        state["slot"] += 1
        return fork_run(lambda: consumer(slot, plan()))

    def replaced_producer(p: int) -> int:
        state["deaths"] += 1
        state["tag"] += 1
        return new_producer(p, state["tag"] - 1)

    prods = {p: new_producer(p, p) for p in range(n_prod)}
    cons = {fork_run(lambda c=c: consumer(c, (-1, -1))) for c in range(n_cons)}
    deadline = time.monotonic() + 120
    while prods and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.002, 0.01))
        for p, pid in list(prods.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done and os.waitstatus_to_exitcode(status) == 0:
                del prods[p]  # finished its share
            elif done:
                assert os.waitstatus_to_exitcode(status) == CRASH
                prods[p] = replaced_producer(p)
        for pid in list(cons):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == CRASH
                state["deaths"] += 1
                cons.remove(pid)
                cons.add(new_consumer())
        if state["deaths"] >= max_deaths or rng.random() < 0.5:
            continue
        if rng.random() < 0.5 and prods:
            p = rng.choice(sorted(prods))
            os.kill(prods[p], signal.SIGKILL)
            os.waitpid(prods[p], 0)
            prods[p] = replaced_producer(p)
        else:
            victim = rng.choice(sorted(cons))
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
            state["deaths"] += 1
            cons.remove(victim)
            cons.add(new_consumer())
    assert not prods and int(sent.sum()) == n_prod * per_prod, "producers stalled"
    if not cons:
        cons.add(new_consumer())
    while r.count:  # the consumers drain the ring
        assert time.monotonic() < deadline, "consumers stalled"
        for pid in list(cons):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == CRASH
                state["deaths"] += 1
                cons.remove(pid)
                cons.add(new_consumer())
        time.sleep(0.01)
    for pid in cons:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert r.count == 0
    assert r.enqueue_bulk([1, 2], timeout=10) == 2 and r.dequeue_bulk(2, timeout=10) == [1, 2]

    recs = [record(s)[1 : 1 + int(record(s)[0])].copy() for s in range(state["slot"])]
    everything = np.concatenate(recs)
    assert len(np.unique(everything)) == len(everything), "a value was delivered twice"
    assert set((everything >> np.uint64(32)).tolist()) <= set(range(state["tag"]))
    assert int((everything & np.uint64(0xFFFFFFFF)).max()) < per_prod
    for rec in recs:
        for tag in range(state["tag"]):
            mine = rec[(rec >> np.uint64(32)) == tag] & np.uint64(0xFFFFFFFF)
            assert np.all(np.diff(mine.astype(np.int64)) > 0), "a producer's values reordered"
    # Confirmed values a killed consumer had in hand are lost (one bulk per death);
    # a killed producer's last bulk may be published unconfirmed (one per death).
    confirmed, deaths = n_prod * per_prod, state["deaths"]
    assert confirmed - deaths * bulk <= len(everything) <= confirmed + deaths * bulk
    stats = r.wait_stats
    assert stats["producer_lock_owner"] == stats["consumer_lock_owner"] == 0
    assert stats["producer_recoveries"] + stats["consumer_recoveries"] <= deaths
