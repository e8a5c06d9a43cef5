"""What a dead secondary leaves behind (issue 6): the primary reclaims its slot
and cached objects at once, reports what it still held (mempool objects in hand,
heap blocks), shows it in /memd/processes, and frees its blocks on request
(free_owned_by, or memd --reclaim-heap)."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time

from memd.admin.telemetry import TelemetryClient
from memd.paths import telemetry_path
from memd.testing import Daemon, remove_leftover_pages

_numbers = itertools.count()

HOLDER = """
import sys
import memd_client as mc
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=10)
mp = mem.mempool_lookup("pool")
held = mp.get_bulk(10)            # in hand: reported when we die
mp.put_bulk(mp.get_bulk(40))      # in our cache: returned when we die
blocks = [mem.malloc(1000) for _ in range(7)]
mem.memzone_reserve("kept_zone", 4096)
print(mp.cache_count(), flush=True)
sys.stdin.readline()
"""


def _start_holder(daemon: Daemon) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, daemon.prefix, str(daemon.runtime_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    cached = int(p.stdout.readline())
    assert cached > 0
    return p, cached


def _query(daemon: Daemon, command: str) -> object:
    with TelemetryClient(telemetry_path(daemon.prefix, str(daemon.runtime_dir))) as c:
        return c.query(command)


def _wait_for(cond, what: str, daemon: Daemon, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}; daemon log:\n{daemon.log_text()}"
        time.sleep(0.01)


def test_dead_secondary_is_reclaimed_and_reported(daemon_factory) -> None:
    daemon = daemon_factory("-m", "8")
    with daemon.attach() as mem:
        mp = mem.mempool_create("pool", 512, 64, cache_size=64)
        p, _cached = _start_holder(daemon)
        procs = {q["pid"]: q for q in _query(daemon, "/memd/processes")}
        assert procs[p.pid]["role"] == "secondary"
        # heap blocks count every element it allocated, its memzone's too
        assert procs[p.pid]["heap_blocks"] == 8 and procs[p.pid]["memzones"] == 1
        assert procs[p.pid]["mempool_objects"] == 10
        assert mp.avail_count() == 512 - 10  # caches count as available

        p.send_signal(signal.SIGKILL)
        p.wait()
        _wait_for(
            lambda: p.pid not in {q["pid"] for q in mem.processes()},
            "the dead secondary's slot was not reclaimed",
            daemon,
        )
        # its cache went back to the ring; the 10 in hand are reported, not lost
        assert mp.avail_count() == 512 - 10
        assert mp.held_by(p.pid) == 10
        (record,) = _query(daemon, "/memd/reclaims")
        assert record["pid"] == p.pid
        assert record["cached_objects_returned"] > 0
        assert record["mempool_objects_in_hand"] == {"pool": 10}
        assert record["heap_blocks"] == 8 and not record["heap_freed"]

        # /memd/processes still shows what the exited process owns
        procs = {q["pid"]: q for q in _query(daemon, "/memd/processes")}
        assert procs[p.pid]["role"] == "exited" and procs[p.pid]["slot"] is None
        assert procs[p.pid]["heap_blocks"] == 8

        before = mem.heap_stats()["alloc_count"]
        assert mem.free_owned_by(p.pid)["blocks"] == 7  # its memzone stays
        assert mem.heap_stats()["alloc_count"] == before - 7
        assert mem.memzone_lookup("kept_zone").owner_pid == p.pid
        assert mp.reclaim_held_by(p.pid) == 10
        assert mp.avail_count() == 512
        # only its memzone is left, and memzones outlive their creators by design
        assert p.pid not in {q["pid"] for q in _query(daemon, "/memd/processes")}
        owned = mem.heap_owners()[p.pid]
        assert owned["blocks"] == owned["memzones"] == 1


def test_reclaim_heap_policy_frees_a_dead_secondarys_blocks(daemon_factory) -> None:
    daemon = daemon_factory("-m", "8", "--reclaim-heap")
    with daemon.attach() as mem:
        mem.mempool_create("pool", 512, 64, cache_size=64)
        before = mem.heap_stats()["alloc_count"]
        p, _ = _start_holder(daemon)
        assert mem.heap_stats()["alloc_count"] == before + 8  # 7 blocks + 1 memzone
        p.send_signal(signal.SIGKILL)
        p.wait()
        _wait_for(lambda: bool(_query(daemon, "/memd/reclaims")), "no reclaim record", daemon)
        (record,) = _query(daemon, "/memd/reclaims")
        assert record["heap_blocks"] == 8 and record["heap_freed"]
        assert mem.heap_stats()["alloc_count"] == before + 1  # the memzone is kept
        assert mem.heap_owners()[p.pid]["blocks"] == 1  # its memzone


# A primary (embedded, so the test decides when it polls) whose secondary dies
# unnoticed, then releases pages: the release holds the heap lock while it syncs,
# and the sync finds the dead secondary.  Reclaiming it there (reclaim walks the
# heap under its lock) deadlocked the daemon on its own lock.
RELEASE_AFTER_DEATH = """
import subprocess, sys, threading
from memd import Options, Primary
from memd import _ext
prefix, rundir, no_huge = sys.argv[1], sys.argv[2], sys.argv[3] == "nohuge"
p = Primary(Options(file_prefix=prefix, runtime_dir=rundir, no_huge=no_huge))
stop = threading.Event()
server = threading.Thread(target=p.serve, args=(stop, 0.02))
server.start()
child = subprocess.Popen(
    [sys.executable, "-c",
     "import sys, memd_client as mc\\n"
     "mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=20)\\n"
     "print('READY', flush=True)\\n"
     "sys.stdin.readline()\\n",
     prefix, rundir],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "READY"
stop.set()
server.join()
blk = p.malloc(8 << 20)  # new pages, mapped by the child too
child.kill()
child.wait()  # dead, and its pidfd not yet polled
p.free(blk)
p._release_pages(0)  # heap lock -> sync -> the dead child
p.poll(0.2)  # reclaims it now, outside any heap lock
assert [r["pid"] for r in p.reclaims] == [child.pid], list(p.reclaims)
_ext.heap_check(p.window, 0)
print("released", p.info()["mapped_bytes"], flush=True)
p.close()
"""


def test_a_release_that_meets_a_dead_secondary_does_not_deadlock(tmp_path, mode) -> None:
    """Issue: a kill -9 during a page release hung the daemon for good.  Now the
    release finishes, and the dead secondary is reclaimed by the next poll."""
    prefix = f"rd{next(_numbers)}x{int(time.time() * 1000) % 100000}"
    rundir = tmp_path / "run"
    rundir.mkdir()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RELEASE_AFTER_DEATH, prefix, str(rundir), mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        remove_leftover_pages(prefix)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stdout.startswith("released "), proc.stdout


# A secondary SIGKILLed at one point of creating or freeing a ring or pool, under a
# name of its own: `{name}` is unique per case.  It first makes a complete ring and a
# plain memzone, which must outlive it.
DIE_MIDWAY = """
import os, signal, sys
import memd_client as mc
from memd import _ext
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=10)
mem.ring_create("{name}_kept", 16)
mem.memzone_reserve("{name}_zone", 4096)

def die(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)

def after(fn):
    def call(*args, **kw):
        fn(*args, **kw)
        die()
    return call

{code}
"""

HALF_MADE_CASES = {
    # ring_create, its memzone reserved, its header not yet made (no magic)
    "ring_create before ring_init": ("RG_", "_ext.ring_init = die\nmem.ring_create(name, 16)"),
    # ring_create, the ring made but not yet listed
    "ring_create before listing": ("RG_", "_ext.object_add = die\nmem.ring_create(name, 16)"),
    # mempool_create, inside obj_init (test_misuse's case 18)
    "mempool_create in obj_init": (
        "MP_",
        "mem.mempool_create(name, 64, 64, obj_init=lambda p, o, i: i == 3 and die())",
    ),
    # ring_free, unlisted but not yet poisoned
    "ring_free after unlisting": (
        "RG_",
        "r = mem.ring_create(name, 16)\n_ext.object_remove = after(_ext.object_remove)\n"
        "mem.ring_free(r)",
    ),
    # mempool_free, poisoned, its memzone not yet freed
    "mempool_free before memzone_free": (
        "MP_",
        "p = mem.mempool_create(name, 8, 64)\n_ext.memzone_free = die\nmem.mempool_free(p)",
    ),
}


def test_what_a_dead_creator_left_half_made_is_freed_and_named(daemon_factory) -> None:
    """The primary's reclaim of a secondary killed inside ring_create / mempool_create /
    ring_free / mempool_free frees the RG_/MP_ memzone it left (nobody could look the
    object up to free it) and names it in /memd/reclaims; what the secondary made
    whole (a listed ring, a plain memzone) stays."""
    daemon = daemon_factory("-m", "8")
    with daemon.attach() as mem:
        for i, (case, (prefix, code)) in enumerate(HALF_MADE_CASES.items()):
            name = f"half{i}x{next(_numbers)}"
            script = DIE_MIDWAY.format(name=name, code=f"name = {name!r}\n{code}")
            proc = subprocess.run(
                [sys.executable, "-c", script, daemon.prefix, str(daemon.runtime_dir)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert proc.returncode == -signal.SIGKILL, f"{case}: {proc.returncode}\n{proc.stderr}"
            pid = mem.memzone_lookup(f"{name}_zone").owner_pid

            def mine(pid: int = pid) -> list[dict]:
                return [r for r in _query(daemon, "/memd/reclaims") if r["pid"] == pid]

            _wait_for(lambda: bool(mine()), f"{case}: no reclaim", daemon)
            (record,) = mine()
            assert record["half_made_freed"] == [prefix + name], (case, record)
            assert not [z for z in mem.memzones() if z.name == prefix + name], case
            assert f"freed memzone {prefix + name!r}" in daemon.log_text(), case
            # what it made whole outlives it
            assert mem.ring_lookup(f"{name}_kept").capacity == 15, case
            assert mem.memzone_lookup(f"{name}_zone").length == 4096, case
    assert daemon.proc is not None and daemon.proc.poll() is None
