"""Mempool objects in flight: a process killed inside a get or put.

A get or put moves objects between the free ring, a cache and the caller's hands
in steps; a process killed between two steps leaves FREE objects that are in no
ring and no cache.  The daemon, reclaiming the dead process's slot, sees that it
died in the middle of a move (its slot row says so) and puts them back at a
moment when no live process moves objects of that pool: no ``recover()`` by hand,
nothing lost, nothing handed out twice.  ``recover()`` and ``audit()`` find such a
moment themselves, so they are safe while other processes get and put.  Every
process here is real; every wait is bounded; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import memd_client as mc
from memd import _ext
from memd.admin.telemetry import TelemetryClient
from memd.errors import CorruptionError, MemdError
from memd.paths import telemetry_path
from memd.testing import (
    SECONDARY_PRELUDE,
    Daemon,
    result,
    run_secondary,
    start_secondary,
)
from tests.support.stopping import stop_in_put

N_OBJECTS = 512


def _wait(pred, what: str, d: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} after {timeout} s; daemon log:\n{d.log_text()}")


def _whole(pool) -> bool:
    try:
        a = pool.audit()
    except CorruptionError as e:
        assert "missing" in str(e), e  # any other damage fails at once
        return False
    return bool(a["free"] + a["in_use"] == N_OBJECTS)


def _reclaimed(d: Daemon, mem, pid: int) -> None:
    _wait(lambda: pid not in {q["pid"] for q in mem.processes()}, f"pid {pid} not reclaimed", d)


# A looper: random bulk gets and puts, some past the flush threshold (through the
# ring), some within the cache, on a cached pool and an uncached one; it holds
# what it got for a moment (so that a kill also finds objects in its hands).
LOOPER = """
import random, sys
from memd.errors import PoolEmpty
pools = [mem.mempool_lookup("cached"), mem.mempool_lookup("plain")]
rnd = random.Random({seed})
held = [[], []]
print("LOOPING", flush=True)
for i in range({rounds}):
    k = rnd.randrange(2)
    p = pools[k]
    if held[k] and rnd.random() < 0.5:
        n = rnd.randint(1, len(held[k]))
        p.put_bulk(held[k][:n])
        del held[k][:n]
    else:
        try:
            held[k] += p.get_bulk(rnd.choice((1, 3, 8, 13, 40)))
        except PoolEmpty:
            pass
for k, p in enumerate(pools):
    p.put_bulk(held[k])
"""


def _looper(d: Daemon, seed: int, rounds: int) -> subprocess.Popen[str]:
    proc = start_secondary(d, "# then:\n" + LOOPER.format(seed=seed, rounds=rounds))
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "LOOPING"
    return proc


def test_kill_9_inside_gets_and_puts_loses_nothing(daemon_factory) -> None:
    """Loopers are SIGKILLed at random moments while another keeps looping; the
    daemon reclaims each.  After the last, with every survivor done, the pools
    audit whole with every object free except what dead processes held in their
    hands (which reclaim_held_by gives back): recover() is never called.  (Before,
    about one kill in three left objects FREE in no ring: audit found them
    missing.)"""
    d = daemon_factory("-m", "16")
    mem = d.attach()
    cached = mem.mempool_create("cached", N_OBJECTS, 64, cache_size=16)
    plain = mem.mempool_create("plain", N_OBJECTS, 64)
    survivor = _looper(d, seed=1, rounds=10**9)  # until killed at the end, by SIGTERM
    dead: list[int] = []
    for i in range(12):
        victim = _looper(d, seed=100 + i, rounds=10**9)
        time.sleep(0.05 + (i % 4) * 0.03)  # somewhere in its loop (nothing asserts on it)
        victim.kill()
        victim.communicate(timeout=20)
        assert victim.returncode == -signal.SIGKILL
        dead.append(victim.pid)
        _reclaimed(d, mem, victim.pid)
    assert survivor.poll() is None, survivor.communicate()
    survivor.terminate()  # mid-loop too: a third kind of death
    survivor.communicate(timeout=20)
    dead.append(survivor.pid)
    _reclaimed(d, mem, survivor.pid)
    for pool in (cached, plain):
        for pid in dead:
            pool.reclaim_held_by(pid)  # what it had in its hands: reported, not lost
        # a recovery the daemon found busy at a reclaim is retried every second
        _wait(lambda p=pool: _whole(p), f"{pool.name}: objects missing", d, 10)
        a = pool.audit()
        assert (a["free"], a["in_use"]) == (N_OBJECTS, 0), (pool.name, a)
        got = pool.get_bulk(N_OBJECTS)  # each handed out once
        assert len({o.handle for o in got}) == N_OBJECTS
        pool.put_bulk(got)
    assert d.proc is not None and d.proc.poll() is None
    mem.detach()


def test_a_process_killed_between_mark_and_ring_loses_nothing(daemon_factory, stopped) -> None:
    """Deterministic: a put of 13 objects (past the flush threshold: straight to
    the ring) marks them FREE, then stops inside the ring's enqueue (a test hook)
    and is killed there.  The daemon's reclaim takes the dead process's ring lock
    over (its enqueue never happened) and puts the 13 back: its reclaim record
    says so, and the pool audits whole."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 64, 32, cache_size=8)
    victim = stop_in_put(d, stopped, 13)
    assert pool.held_by(victim.pid) == 0  # marked FREE: not its any more, and in no ring
    victim.kill()
    victim.communicate(timeout=20)
    records: list[dict[str, object]] = []

    def recorded() -> bool:  # the record comes last in a reclaim, after the slot is free
        with TelemetryClient(telemetry_path(d.prefix, str(d.runtime_dir))) as c:
            records[:] = [r for r in c.query("/memd/reclaims") if r["pid"] == victim.pid]
        return bool(records)

    _wait(recorded, f"no reclaim record of pid {victim.pid}", d)
    (record,) = records
    assert record["moving_objects_returned"] == 13, record
    a = pool.audit()
    assert (a["free"], a["in_use"], a["in_ring"] + a["in_caches"]) == (64, 0, 64), a
    mem.detach()


def test_recover_and_audit_while_others_move_objects(daemon_factory) -> None:
    """recover() and audit() while two processes get and put as fast as they can:
    nobody died, so recover finds nothing to put back (before, it took objects
    in flight for lost and put them in the ring a second time), and audit never
    reports objects missing; the pools audit whole at the end."""
    d = daemon_factory("-m", "16")
    mem = d.attach()
    pools = [
        mem.mempool_create("cached", N_OBJECTS, 64, cache_size=16),
        mem.mempool_create("plain", N_OBJECTS, 64),
    ]
    movers = [_looper(d, seed=s, rounds=60_000) for s in (7, 8)]
    recovered, audits = 0, 0
    while any(m.poll() is None for m in movers):
        for pool in pools:
            recovered += pool.recover()
            a = pool.audit()
            assert a["free"] + a["in_use"] == N_OBJECTS, a
            audits += 1
    for m in movers:
        _, err = m.communicate(timeout=60)
        assert m.returncode == 0, err
    assert audits > 0
    assert recovered == 0
    for pool in pools:
        a = pool.audit()
        assert (a["free"], a["in_use"]) == (N_OBJECTS, 0), a
    mem.detach()


def test_recover_names_a_process_stopped_in_a_move(daemon_factory, stopped) -> None:
    """A process stopped inside a put (in the ring's enqueue) is in the middle of
    a move: recover() cannot tell its objects from lost ones, waits (bounded, the
    limit memd_client.lock_wait sets) and raises a MemdError naming it;
    meanwhile other processes' gets and puts through their caches go on.  Once
    it goes on, recover finds nothing lost."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 64, 32, cache_size=8)
    victim = stop_in_put(d, stopped, 13, flush=True)
    r = run_secondary(
        d,
        """
        from memd.errors import MemdError
        p = mem.mempool_lookup("p")
        assert mc.lock_wait(0.5) == 30.0  # the default, for a program
        assert mc.lock_wait() == 0.5
        try:
            p.recover()
            err = ""
        except MemdError as e:
            err = str(e)
        for _ in range(200):  # the cache: no ring, no lock, no wait for the recover
            p.put_bulk(p.get_bulk(4))
        out(err)  # its detach leaves its cache for the slot's next owner: the ring is locked
        """,
        timeout=60,
    )
    err = result(r)
    assert isinstance(err, str)
    assert "busy" in err and f"pid {victim.pid} is in the middle of a get or put" in err, err
    assert "'p'" in err, err
    os.kill(victim.pid, signal.SIGCONT)
    _, verr = victim.communicate(timeout=60)
    assert victim.returncode == 0, verr
    assert pool.recover() == 0
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (64, 0), a
    mem.detach()


# A mover for SECONDS: gets and puts (single and bulk) through `pool` ("cached"
# through its cache, "plain" without, "slotless": the cached pool without a cache
# slot), stamping each object it holds with its pid and checking the stamp when it
# puts it back (an object handed out twice shows up as a wrong stamp).
STAMPED_MOVER = """
import os, random, struct, time
from memd.errors import PoolEmpty
name, mode = NAME, MODE
pool = mem.mempool_lookup(name)
if mode == "slotless":
    pool = type(pool)(pool.window, pool.offset, -1)
rnd, stamp, zero = random.Random(os.getpid()), struct.pack("<q", os.getpid()), bytes(8)
held, bad, ops = [], 0, 0
def take(objs):
    global bad
    for o in objs:
        bad += bytes(o.buf[:8]) != zero
        o.buf[:8] = stamp
def give(objs):
    global bad
    for o in objs:
        bad += bytes(o.buf[:8]) != stamp
        o.buf[:8] = zero
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    r = rnd.random()
    try:
        if r < 0.3:
            o = pool.get(); take([o]); held.append(o)
        elif r < 0.5:
            objs = pool.get_bulk(rnd.randint(1, 40)); take(objs); held += objs
        elif r < 0.75 and held:
            o = held.pop(); give([o]); pool.put(o)
        elif held:
            k = rnd.randint(1, len(held)); objs = held[-k:]; give(objs); pool.put_bulk(objs)
            del held[-k:]
    except PoolEmpty:
        give(held); pool.put_bulk(held); held = []
    ops += 1
give(held); pool.put_bulk(held)
out([bad, ops])
"""

RECOVERER = """
import time
pool = mem.mempool_lookup(NAME)
recovered = audits = 0
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    recovered += pool.recover()
    a = pool.audit()
    assert a["free"] + a["in_use"] == 3000, a
    audits += 1
out([recovered, audits])
"""


@pytest.mark.parametrize("offset", ["-50000", "50000"])
def test_a_recoverer_on_another_clock_corrupts_nothing(daemon_factory, offset: str) -> None:
    """recover() and audit() in a time namespace whose CLOCK_MONOTONIC is 50 000 s
    behind or ahead of the movers' (containers, CRIU): a mover that finds a hold
    over by its own clock takes it away before it moves, so the recoverer never
    trusts a walk it moved under (before, it put objects in flight back into the
    ring: "an object is twice in the free ring", movers failing), and a hold that
    looks far ahead stops nobody."""
    d = daemon_factory("-m", "16")
    mem = d.attach()
    pools = [
        mem.mempool_create("cached", 3000, 64, cache_size=32),
        mem.mempool_create("plain", 3000, 64),
    ]

    def spawn(code: str, wrap: list[str], **names: object) -> subprocess.Popen[str]:
        for k, v in names.items():
            code = code.replace(k, repr(v))
        prelude = SECONDARY_PRELUDE.replace("PREFIX", repr(d.prefix))
        prelude = prelude.replace("RUNDIR", repr(str(d.runtime_dir)))
        src = prelude + code + "\nmem.detach()\n"
        return subprocess.Popen(
            [*wrap, sys.executable, "-c", src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    ns = ["unshare", "--time", "--fork", "--monotonic", offset]
    procs = [
        spawn(STAMPED_MOVER, [], NAME="cached", MODE="cached", SECONDS=5),
        spawn(STAMPED_MOVER, [], NAME="cached", MODE="slotless", SECONDS=5),
        spawn(STAMPED_MOVER, [], NAME="plain", MODE="plain", SECONDS=5),
        spawn(RECOVERER, ns, NAME="cached", SECONDS=5),
        spawn(RECOVERER, ns, NAME="plain", SECONDS=5),
    ]
    outs = []
    for p in procs:
        o, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(o.split("RESULT ", 1)[1]))
    for bad, ops in outs[:3]:
        assert bad == 0 and ops > 0, outs
    for recovered, audits in outs[3:]:
        assert recovered == 0 and audits > 0, outs
    for pool in pools:
        a = pool.audit()
        assert (a["free"], a["in_use"]) == (3000, 0), a
        got = pool.get_bulk(3000)
        assert len({o.handle for o in got}) == 3000
        pool.put_bulk(got)
    mem.detach()


def test_scribbled_in_flight_words_stop_nothing(daemon_factory) -> None:
    """Any attached process can write the shared words of the bracket.  A
    `recovering` word naming a live process and a time far ahead, or all ones,
    holds no get or put off (before: every get waited out the lock wait limit),
    and an odd `pool_moving` row in a free slot, naming the pool, keeps no
    audit() or recover() waiting (before: "busy" for good)."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 64, 32, cache_size=8)
    mc.lock_wait(2.0)  # a regression: "busy" in 2 s, not 30
    try:
        word = mem.view(pool.offset + _ext.LAYOUT["memd_mempool.recovering"][0], 8)
        assert d.proc is not None
        for bad in (d.proc.pid | (1 << 40) << 22, (1 << 64) - 1):
            word[:] = bad.to_bytes(8, "little")
            pool.put(pool.get())
            assert pool.audit()["free"] == 64 and pool.recover() == 0
        row_size = _ext.LAYOUT["memd_proc_pins"]  # sizeof
        free_slot = max(set(range(_ext.MAX_PROCS)) - {q["slot"] for q in mem.processes()})
        row = _ext.LAYOUT["memd_config.pins"][0] + free_slot * row_size
        moving = mem.window.view(row + _ext.LAYOUT["memd_proc_pins.pool_moving"][0], 8)
        moving_at = mem.window.view(row + _ext.LAYOUT["memd_proc_pins.pool_moving_at"][0], 8)
        moving_at[:] = pool.offset.to_bytes(8, "little")
        moving[:] = (1).to_bytes(8, "little")
        assert pool.audit()["free"] == 64 and pool.recover() == 0
        moving[:] = bytes(8)
        moving_at[:] = bytes(8)
        for v in (word, moving, moving_at):
            v.release()
    finally:
        mc.lock_wait(30.0)
    assert d.proc.poll() is None
    mem.detach()


def test_reclaim_held_by_behind_a_stopped_ring_keeps_the_dead_processs_tag(
    daemon_factory, stopped
) -> None:
    """reclaim_held_by(pid) whose put into the free ring finds its lock held by a
    stopped process gives up "busy" with the dead process's objects still tagged
    as its (before: tagged as the caller's, whom nobody asks, so lost for good);
    once the ring is free, the next call returns every one."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    pool = mem.mempool_create("p", 64, 32)  # no cache: every put goes to the ring
    holder = start_secondary(d, "objs = mem.mempool_lookup('p').get_bulk(5)\n")
    holder.kill()
    holder.communicate(timeout=20)
    _reclaimed(d, mem, holder.pid)
    assert pool.held_by(holder.pid) == 5
    victim = stop_in_put(d, stopped, 3)
    previous = mc.lock_wait(0.3)
    try:
        with pytest.raises(MemdError, match="busy"):
            pool.reclaim_held_by(holder.pid)
    finally:
        mc.lock_wait(previous)
    assert pool.held_by(holder.pid) == 5 and pool.held_by(os.getpid()) == 0
    os.kill(victim.pid, signal.SIGCONT)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 0, err
    assert pool.reclaim_held_by(holder.pid) == 5
    a = pool.audit()
    assert (a["free"], a["in_use"]) == (64, 0), a
    mem.detach()
