"""Fuzzing the shared memory from a secondary (docs/design.md: "The daemon never
trusts shared memory"): random bytes over random shared headers (heap elements and
heaps, ring and mempool headers, mempool object headers, memzone and object
descriptors, the process table), then every admin command, and now and then a
secondary killed (the daemon reclaims it: walks heaps and pools).  The daemon must
answer every command (a reply or an error) and never die.

Each case restores the bytes it overwrote, so damage does not pile up past one
case (a heap marked broken stays broken: that path is fuzzed too).  The number of
cases is MEMD_SHM_FUZZ_CASES (default 1000, under a minute; a secondary is
killed every MEMD_SHM_FUZZ_KILL_EVERY cases, default 20); the issue's
10 000 are a manual run: ``MEMD_SHM_FUZZ_CASES=10000 pytest tests/test_shm_fuzz.py``.
--no-huge only, as tests/test_fuzz.py: the walks do not depend on the page backend.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import subprocess
import sys

import pytest

from memd import _ext
from memd.admin.telemetry import TelemetryClient
from memd.errors import MemdError, ProtocolError
from memd.paths import telemetry_path
from memd.testing import Daemon

CASES = int(os.environ.get("MEMD_SHM_FUZZ_CASES", "1000"))
KILL_EVERY = int(os.environ.get("MEMD_SHM_FUZZ_KILL_EVERY", "20"))
LAY = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}

VICTIM = """
import sys
import memd_client as mc
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=20)
keep = []
for call in (lambda: mem.malloc(4096), lambda: mem.mempool_lookup("fz_pool").get(),
             lambda: mem.mempool_lookup("fz_cached").get_bulk(8),
             lambda: mem.ring_lookup("fz_ring").enqueue(7, timeout=0.5)):
    try:
        keep.append(call())
    except Exception:
        pass  # damaged shared state: an error is fine, the kill is what matters
print("UP", flush=True)
sys.stdin.readline()
"""


def _regions(mem) -> list[tuple[str, int, int]]:
    """(kind, window offset, length) of every shared header worth damaging."""
    cfg = 0
    out: list[tuple[str, int, int]] = [
        # past its lock: a pthread mutex overwritten by garbage may stay taken for
        # good (the daemon then answers "busy", 2 s per command, which is right but
        # makes a long run crawl); a holder's death is what test_misuse.py tests
        ("heap", LAY["memd_config.heaps"] + 64, LAY["memd_heap"] - 64),
        ("process table", LAY["memd_config.procs"], 128 * LAY["memd_process"]),
        ("memzone table", LAY["memd_config.memzones"], 64 * LAY["memd_memzone"]),
        ("object table", LAY["memd_config.objects"], 16 * LAY["memd_object"]),
        ("config header", cfg + 64, 40),  # past the magic and version: layout fields
    ]
    for off, size, _state, _data in _ext.heap_walk(mem.window, 0):
        out.append(("heap element", off, min(size, _ext.HEAP_ELEM_HEADER_SIZE)))
    for ring in mem.rings():
        out.append(("ring header", ring.offset, LAY["memd_ring"]))
    for pool in mem.mempools():
        out.append(("pool header", pool.offset, LAY["memd_mempool"]))
        out.append(("pool ring", pool.ring_offset, LAY["memd_ring"]))
        for i in (0, pool.size // 2, pool.size - 1):
            handle = pool.obj_at(i).handle
            out.append(("object header", handle - LAY["memd_mempool_objhdr"], 64))
        if pool.cache_size:
            out.append(("pool caches", pool.offset + LAY["memd_mempool"], 4096))
    return out


@pytest.mark.slow
def test_random_bytes_over_shared_headers_never_stop_the_daemon(tmp_path) -> None:
    daemon = Daemon(tmp_path, "nohuge", "-m", "8").start()
    rng = random.Random(int(os.environ.get("MEMD_SHM_FUZZ_SEED", "14")))
    victims: list[subprocess.Popen[str]] = []
    answered = errors = kills = 0
    mem = None
    try:
        mem = daemon.attach()
        mem.memzone_reserve("fz_zone", 1 << 16)
        mem.ring_create("fz_ring", 1024)
        mem.mempool_create("fz_pool", 64, 256)
        mem.mempool_create("fz_cached", 256, 64, cache_size=16)
        keep = [mem.malloc(n) for n in (64, 4096, 70_000)]
        regions = _regions(mem)
        admin = TelemetryClient(telemetry_path(daemon.prefix, str(daemon.runtime_dir)), 30)
        commands = [c for c in admin.query("/") if c != "/"]
        window = mem.window
        for case in range(CASES):
            kind, off, length = rng.choice(regions)
            at = off + rng.randrange(length)
            n = min(rng.choice((1, 2, 4, 8, 16, 64)), off + length - at)
            saved = bytes(window.view(at, n))
            window.view(at, n)[:] = rng.randbytes(n)
            victim = None
            if case % KILL_EVERY == 0:
                victim = subprocess.Popen(
                    [sys.executable, "-c", VICTIM, daemon.prefix, str(daemon.runtime_dir)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                victims.append(victim)
            for cmd in commands:
                try:
                    admin.query(cmd, rng.choice((None, "0", "fz_pool", "fz_ring", "1")))
                    answered += 1
                except (MemdError, ProtocolError) as e:
                    # an error reply is fine; a dead daemon or no reply is not
                    assert "no reply" not in str(e), (case, kind, cmd, e)
                    errors += 1
            if victim is not None:
                assert victim.stdout is not None
                # "UP", or EOF if damage made it die, or nothing if it waits for a lock
                # whose damaged word names a live process: killed all the same
                select.select([victim.stdout], [], [], 5)
                victim.kill()
                victim.wait(timeout=30)
                kills += 1
            window.view(at, n)[:] = saved
            if (case + 1) % 1000 == 0:
                print(
                    f"case {case + 1}: {answered} replies, {errors} errors, {kills} kills",
                    flush=True,
                )
            assert daemon.proc is not None and daemon.proc.poll() is None, (
                f"case {case} ({kind} +{at - off}, {n} bytes) killed the daemon:\n"
                + daemon.log_text()[-3000:]
            )
        admin.close()
        del keep
        # it still serves: a new process attaches and grows the heap (if not broken)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, memd_client as mc\n"
                "mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=20)\n"
                "print(len(mem.processes()))\nmem.detach()\n",
                daemon.prefix,
                str(daemon.runtime_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr
        print(f"{CASES} cases: {answered} replies, {errors} error replies, {kills} kills")
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
                v.wait()
        if mem is not None:
            with contextlib.suppress(Exception):
                mem.detach()
        with_pid = daemon.proc is not None and daemon.proc.poll() is None
        daemon.stop()
    assert with_pid
