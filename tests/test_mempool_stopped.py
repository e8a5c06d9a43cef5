"""Mempools beside a process that is stopped (SIGSTOP) inside a call.

A pool's get and put move handles through its free ring, whose sides each take a
small robust lock.  A process stopped while it holds one (``_ext._ring_stop_after``
stops it there, in test builds) must cost another process's get or put a bounded
wait, without the GIL and interruptible, ending in a MemdError that names the pool
and the holder, with nothing taken or put back; the daemon must not stall on it
when it reclaims a dead process's cache; and nothing may be lost or handed out
twice (``audit()``).  Every process here is real; every wait is bounded by a
timeout (a regression fails the run instead of hanging it); nothing asserts on
time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import textwrap
import time

import pytest

from memd import _ext
from memd.testing import Daemon, result, run_secondary, start_secondary, wait_stopped
from tests.support.layout import offsets
from tests.support.stopping import stop_in_put

HDR = offsets()["memd_mempool_objhdr"]
COOKIE = offsets()["memd_mempool_objhdr.cookie"]
OWNER = offsets()["memd_mempool_objhdr.owner_pid"]


# The victim takes the free ring's lock on the side `op` uses and stops there.
VICTIM = {
    "put": ("x = p.get()", "p.put(x)", ""),
    "get": ("", "y = p.get()", "p.put(y)"),
    "flush": ("xs = p.get_bulk(13)", "p.put_bulk(xs)", ""),  # 13 > flushthresh: to the ring
}
# The probe, beside it: `before` prepares (taking only from the ring, whose other
# side is free), `call` must wait for the victim's lock, `cleanup` gives back.
PROBE = {
    "put": ("x = p.get_handle()", "p.put(x)", ""),
    "get": ("", "x = p.get_handle()", "p.put(x)"),  # no cache: from the ring
    # a cache of 8 flushes past 12: cache 12, then one more put flushes to the ring
    "flush": (
        "x = p.get_handle(); ys = p.get_bulk(12); p.put_bulk(ys[:4])",
        "p.put(x)",
        "p.put_bulk(ys[4:])",
    ),
}


@pytest.mark.parametrize("op", ["put", "get", "flush"])
def test_a_call_behind_a_stopped_lock_holder_waits_bounded(daemon_factory, stopped, op) -> None:
    """The probe's call waits for the lock the stopped victim holds: a signal
    handler's exception ends the wait, and so does the wait limit (a MemdError
    naming the pool and the victim's pid); the GIL is free meanwhile (another
    thread runs), and nothing changed (its objects held, its cache as it was).
    Once the victim goes on, the call succeeds, and the pool is whole."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    cache = 8 if op == "flush" else 0
    pool = mem.mempool_create("p", 64, 32, cache_size=cache)
    prep, act, after = VICTIM[op]
    victim = start_secondary(
        d,
        f"""
        from memd import _ext
        p = mem.mempool_lookup("p")
        {prep}
        # then:
        _ext._ring_stop_after(0)  # stop holding the side's lock
        {act}
        {after}
        {"p.flush_cache()" if cache else ""}
        """,
    )
    stopped.append(victim)
    assert victim.stdin is not None
    victim.stdin.write("go\n")
    victim.stdin.flush()
    wait_stopped(victim)

    before, call, cleanup = PROBE[op]
    probe = run_secondary(
        d,
        f"""
        import os, signal, threading, time
        from memd import _ext
        from memd.errors import MemdError
        p = mem.mempool_lookup("p")
        {before}
        held, cached = p.held_by(os.getpid()), p.cache_count()
        _ext.heap_lock_wait(1.0)

        class Alarm(Exception):
            pass

        def ring(*_):
            raise Alarm

        signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        try:
            {call}
            interrupted = False
        except Alarm:
            interrupted = True
        ticks, done = [0], threading.Event()

        def tick():
            while not done.is_set():
                ticks[0] += 1
                time.sleep(0.001)

        th = threading.Thread(target=tick)
        th.start()
        try:
            {call}
            err = ""
        except MemdError as e:
            err = str(e)
        done.set()
        th.join()
        now = p.held_by(os.getpid()), p.cache_count()
        os.kill({victim.pid}, signal.SIGCONT)
        _ext.heap_lock_wait(30.0)
        {call}  # waits for the victim to let go
        {cleanup}
        p.flush_cache()
        out(dict(interrupted=interrupted, err=err, ticks=ticks[0], before=[held, cached],
                 now=list(now), after=p.held_by(os.getpid())))
        """,
        timeout=60,
    )
    r = result(probe)
    assert isinstance(r, dict)
    assert r["interrupted"], r
    assert "busy" in r["err"] and "'p'" in r["err"] and f"pid {victim.pid}" in r["err"], r
    assert r["ticks"] >= 10, r  # the other thread ran while the call waited
    assert r["now"] == r["before"], r  # nothing taken, put back or flushed
    assert r["after"] == 0, r
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 0, err
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (64, 0), a
    mem.detach()


def _wait_log(d: Daemon, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the daemon's log after {timeout} s:\n{d.log_text()}")


def test_a_put_killed_while_it_waits_loses_nothing(daemon_factory, stopped) -> None:
    """The reported symptom: a put waiting behind a stopped lock holder is killed
    (by a watchdog, say).  It had changed nothing yet: its object is still its,
    BUSY, which reclaim_held_by gives back; the pool audits whole, with no
    recover() needed (before, the object was marked FREE and in no ring: lost)."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 32, 32)
    victim = stop_in_put(d, stopped, 13, flush=True)
    probe = start_secondary(
        d,
        """
        p = mem.mempool_lookup("p")
        x = p.get()
        # then:
        print("PUTTING", flush=True)
        p.put(x)
        """,
    )
    assert probe.stdin is not None and probe.stdout is not None
    probe.stdin.write("go\n")
    probe.stdin.flush()
    assert probe.stdout.readline().strip() == "PUTTING"
    time.sleep(0.3)  # into its wait (nothing asserts on this)
    assert probe.poll() is None  # still waiting: the victim holds the lock
    probe.kill()
    probe.communicate(timeout=20)
    _wait_log(d, f"secondary pid {probe.pid} (slot")  # the daemon reclaimed its slot
    os.kill(victim.pid, signal.SIGCONT)
    victim.communicate(timeout=60)
    assert victim.returncode == 0
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (31, 1), a  # the dead probe's object, not lost
    assert pool.held_by(probe.pid) == 1
    assert pool.reclaim_held_by(probe.pid) == 1
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (32, 0), a
    mem.detach()


def test_the_daemon_does_not_stall_on_a_dead_process_cache(daemon_factory, stopped) -> None:
    """A secondary with objects in its cache dies while another, stopped, holds
    the pool's ring producer lock: the daemon's reclaim waits for it only
    briefly (it logs that the cache was not flushed: the objects stay in the
    slot's cache, free) and goes on serving; nothing is lost."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 64, 32, cache_size=8)
    holder = start_secondary(
        d,
        """
        p = mem.mempool_lookup("p")
        p.put_bulk(p.get_bulk(4))  # 8 + 4 in its cache
        """,
    )
    victim = stop_in_put(d, stopped, 13, flush=True)
    holder.kill()
    holder.communicate(timeout=20)
    log = _wait_log(d, f"secondary pid {holder.pid} (slot")
    assert "not flushed" in log and "busy" in log, log
    # the daemon serves on while the victim stays stopped (this secondary may get
    # the dead one's slot and cache: its detach would wait to flush them)
    r = run_secondary(
        d,
        """
        from memd import _ext
        _ext.heap_lock_wait(0.2)
        out(mem.mempool_lookup("p").n)
        """,
        timeout=60,
    )
    assert result(r) == 64
    assert victim.poll() is None
    os.kill(victim.pid, signal.SIGCONT)
    victim.communicate(timeout=60)
    assert victim.returncode == 0
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (64, 0), a
    assert a["in_caches"] >= 12, a  # the dead slot's cache, kept for its next owner
    mem.detach()


def test_a_put_that_gives_up_on_a_stopped_claimer_keeps_its_object(daemon_factory) -> None:
    """Two processes put one object at once (a double put): the getter's check
    finds the other's claim on the owner tag.  If that claimer stays stopped, the
    getter gives up (bounded) and marks the object BUSY again: the claimer, when
    it goes on, sees BUSY and wins, or (having seen FREE) fails; never is the
    object left FREE in no ring (lost).  A claimer that died never settles: the
    getter's put stands."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 8, 32)
    x, y = pool.get(), pool.get()

    def hdr(obj, field: int) -> memoryview:
        return mem.view(obj.handle - HDR + field, 8 if field == COOKIE else 4)

    busy = bytes(hdr(x, COOKIE))
    free = bytes(hdr(pool.obj_at(7), COOKIE))  # still in the ring
    assert busy != free

    def mid_put(obj, claimer: int) -> None:
        """As a put that stored FREE and then found `claimer`'s claim (CLAIMING is
        the negated pid) on the owner tag."""
        hdr(obj, COOKIE)[:] = free
        hdr(obj, OWNER)[:] = (-claimer).to_bytes(4, "little", signed=True)

    claimer = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(claimer.pid, signal.SIGSTOP)
        mid_put(x, claimer.pid)
        assert _ext._mempool_settle_own(mem.window, pool.offset, x.handle) == 1  # gave up
        assert bytes(hdr(x, COOKIE)) == busy  # held again, not FREE in no ring
    finally:
        claimer.kill()
        claimer.wait()
    # the claimer died before it looked: x is the getter's to put again
    pool.put(x)
    # a claimer already dead when the getter checks: the getter's put stands
    mid_put(y, claimer.pid)
    assert _ext._mempool_settle_own(mem.window, pool.offset, y.handle) == 0
    assert int.from_bytes(hdr(y, OWNER), "little", signed=True) == os.getpid()
    hdr(y, COOKIE)[:] = busy  # (the hook stops short of the ring: as before the put)
    pool.put(y)
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (8, 0), a
    mem.detach()


STRESS_POOLS = [("s0", 40, 0), ("s2", 16, 2), ("s8", 64, 8)]  # name, n, cache size

STRESS_WORKER = """
import os, random
from memd import _ext
from memd.errors import MemdError, PoolEmpty
pools = [mem.mempool_lookup(name) for name in NAMES]
rnd = random.Random(SEED)
held = {p.name: [] for p in pools}
_ext.heap_lock_wait(0.3)  # a busy error now and then, instead of a 30 s wait
counts = {"ops": 0, "busy": 0, "empty": 0, "stops_armed": 0}
other = []
# then:
while not os.path.exists(STOPFILE):
    if SELFSTOP and rnd.random() < 0.01:
        _ext._ring_stop_after(rnd.randint(0, 3))  # stop inside the next ring call
        counts["stops_armed"] += 1
    p = rnd.choice(pools)
    h = held[p.name]
    k = rnd.randint(1, max(1, p.n // 5))
    r = rnd.random()
    counts["ops"] += 1
    try:
        if r < 0.25 and len(h) < p.n // 2:
            h.append(p.get_handle())
        elif r < 0.5 and len(h) < p.n // 2:
            h.extend(o.handle for o in p.get_bulk(k))
        elif r < 0.75 and h:
            x = h.pop()
            try:
                p.put(x)
            except BaseException:
                h.append(x)
                raise
        elif h:
            batch = h[-k:]
            p.put_bulk(batch)
            del h[-len(batch):]
    except PoolEmpty:
        counts["empty"] += 1
    except MemdError as e:
        if "busy" not in str(e):
            raise
        counts["busy"] += 1
_ext._ring_stop_after(-1)
_ext.heap_lock_wait(30.0)
for p in pools:
    p.put_bulk(held[p.name])
    p.flush_cache()
out(counts)
"""


@pytest.mark.parametrize("mode", ["nohuge"])  # the host's hugepages are for the other tests
def test_get_and_put_beside_a_process_stopped_again_and_again(daemon_factory, stopped) -> None:
    """Four secondaries get and put, singly and in bulk, on pools with caches of
    0, 2 and 8 and few objects (the free ring is touched often); one of them also
    stops itself inside a ring call now and then (holding its side's lock), and
    the test stops and continues it at random, thousands of times.  Every call
    either succeeds, finds the pool empty, or gives up busy (its wait limit is
    short here); every process ends with exit 0; and no object is lost or handed
    out twice."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pools = [mem.mempool_create(n, k, 32, cache_size=c) for n, k, c in STRESS_POOLS]
    stopfile = d.runtime_dir / "stop-stress"
    names = [n for n, _, _ in STRESS_POOLS]

    def worker(seed: int, selfstop: bool) -> subprocess.Popen[str]:
        code = (
            STRESS_WORKER.replace("NAMES", repr(names))
            .replace("SEED", str(seed))
            .replace("STOPFILE", repr(str(stopfile)))
            .replace("SELFSTOP", repr(selfstop))
        )
        return start_secondary(d, textwrap.dedent(code))

    victim = worker(0, True)
    stopped.append(victim)
    procs = [victim] + [worker(i, False) for i in range(1, 4)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    rnd = random.Random(1)
    cycles = 0
    end = time.monotonic() + 8.0
    while time.monotonic() < end:
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(rnd.choice((0, 1e-5, 1e-4, 1e-3, 5e-3)) * rnd.random())
        os.kill(victim.pid, signal.SIGCONT)  # also ends a stop it made itself
        cycles += 1
        time.sleep(rnd.choice((0, 1e-5, 1e-4, 1e-3)) * rnd.random())
    stopfile.touch()
    os.kill(victim.pid, signal.SIGCONT)
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out + err
        counts.append(json.loads(lines[-1][7:]))
    assert counts[0]["stops_armed"] > 0, counts
    assert sum(c["ops"] for c in counts) > 1000, counts
    print(f"{cycles} stop/cont cycles; {counts}")  # for -s: what the run did
    for pool, (_, n, _) in zip(pools, STRESS_POOLS, strict=True):
        a = pool.audit()
        assert (a["free"], a["in_use"]) == (n, 0), (pool.name, a)
    mem.detach()
