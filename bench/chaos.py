"""Chaos: SIGKILL secondaries at random moments inside tight heap, ring and mempool
loops while another secondary keeps working, and prove nothing wedges or leaks.

    python bench/chaos.py [--rounds 50] [--no-huge] [--in-memory] [--seed 1]

Each round starts a *victim* secondary that loops on one kind of work (heap
malloc/free, MP/MC ring dequeue/enqueue, mempool get/put piped through the ring,
or all of them), lets it run a random 5-120 ms and kills it with SIGKILL.  A
*survivor* secondary runs its own malloc/free + ring + mempool loop for the whole
run and records its longest iteration (a lock held by the dead shows up there).
After each kill the bench waits for the primary to reclaim the victim, pauses the
survivor, and checks: every heap passes heap_check, the ring holds each token
once, the mempool audits clean; what the victim still held (heap blocks, objects
in hand) is reported and then reclaimed with free_owned_by / reclaim_held_by; the
objects it was moving (in no ring and no cache) the primary puts back by itself,
and anything else missing counts as lost.  Finally the primary itself is SIGKILLed
under a secondary blocked in ring.dequeue(timeout=None) and one blocked in a heap
expansion, and the time until each raises PrimaryNotRunning is printed.

The table's "deadlocks" and "lost" rows must be 0; the exit status says so.
tests/test_chaos.py runs this with a bounded round count in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from memd import _ext
from memd.admin.telemetry import TelemetryClient
from memd.paths import telemetry_path
from memd.testing import Daemon, remove_leftover_pages

N_OBJECTS = 2048  # mempool objects
N_TOKENS = 512  # of them circulating in the token ring
KINDS = ("heap", "ring", "mempool", "mixed")
# control block (a memzone of int64s) shared with the survivor
PAUSE, PAUSED, STOP, ITERS, MAX_STALL_NS, ERRORS, READY = range(7)
CHECK_TIMEOUT = 30.0  # seconds a check may take before the bench calls it a deadlock

_PRELUDE = """
import os, random, sys, time
import memd_client as mc
mem = mc.attach({prefix!r}, runtime_dir={rundir!r}, timeout=10)
ring = mem.ring_lookup("chaos_tokens")
mp = mem.mempool_lookup("chaos_objs")
"""

SURVIVOR = """
ctl = mem.memzone_lookup("chaos_ctl").buf.cast("q")
rnd = random.Random(2)
ctl[READY] = 1
last = time.monotonic_ns()
while not ctl[STOP]:
    if ctl[PAUSE]:
        ctl[PAUSED] = 1
        while ctl[PAUSE] and not ctl[STOP]:
            time.sleep(0.0005)
        ctl[PAUSED] = 0
        last = time.monotonic_ns()
        continue
    try:
        mem.free(mem.malloc(rnd.randrange(64, 8192)))
        t = ring.dequeue(timeout=5)
        if t is not None:
            ring.enqueue(t, timeout=5)
        mp.put(mp.get_handle())
    except Exception as e:
        ctl[ERRORS] += 1
        print("survivor:", repr(e), file=sys.stderr, flush=True)
    now = time.monotonic_ns()
    ctl[MAX_STALL_NS] = max(ctl[MAX_STALL_NS], now - last)
    last = now
    ctl[ITERS] += 1
mem.detach()
"""

VICTIM = """
from array import array
rnd = random.Random({seed})
kind = {kind!r}
live = []
buf = array("Q", bytes(8 * 8))
print("ready", flush=True)
while True:
    if kind in ("heap", "mixed"):
        live.append(mem.malloc(rnd.randrange(64, 16384)))
        if len(live) > 16:
            mem.free(live.pop(0))
    if kind in ("ring", "mixed"):
        k = ring.dequeue_burst_into(buf)
        if k:
            ring.enqueue_bulk(buf[:k], timeout=5)
    if kind in ("mempool", "mixed"):
        ring.enqueue_bulk([mp.get_handle() for _ in range(4)], timeout=5)
        k = ring.dequeue_burst_into(memoryview(buf)[:4])
        if k:
            mp.put_bulk(memoryview(buf)[:k])
        # bulk moves past the cache (refills, flushes through the ring): a kill
        # between their steps leaves objects in flight for the primary to put back
        mp.put_bulk(mp.get_bulk(rnd.choice((8, 40, 64))))
"""

PRIMARY_KILL = """
import json
kind = {kind!r}
if kind == "dequeue":
    empty = mem.ring_lookup("chaos_empty")
    print("ready", flush=True)
    try:
        empty.dequeue(timeout=None)
        print("RESULT " + json.dumps(["returned", 0.0]), flush=True)
    except mc.PrimaryNotRunning:
        print("RESULT " + json.dumps(["PrimaryNotRunning", time.monotonic()]), flush=True)
else:
    print("ready", flush=True)
    sys.stdin.readline()  # go: the primary is stopped now, so the growth waits for it
    try:
        mem.malloc(64 << 20)  # more than the heap has: the primary must grow it
        print("RESULT " + json.dumps(["returned", 0.0]), flush=True)
    except mc.PrimaryNotRunning:
        print("RESULT " + json.dumps(["PrimaryNotRunning", time.monotonic()]), flush=True)
"""

CONSTS = "".join(
    f"{name} = {value}\n"
    for name, value in (
        ("PAUSE", PAUSE),
        ("PAUSED", PAUSED),
        ("STOP", STOP),
        ("ITERS", ITERS),
        ("MAX_STALL_NS", MAX_STALL_NS),
        ("ERRORS", ERRORS),
        ("READY", READY),
    )
)


def _spawn(daemon: Daemon, body: str, **fmt: Any) -> subprocess.Popen[str]:
    code = (
        _PRELUDE.format(prefix=daemon.prefix, rundir=str(daemon.runtime_dir))
        + CONSTS
        + (body.format(**fmt) if fmt else body)
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Watchdog:
    """A check that blocks longer than CHECK_TIMEOUT is a deadlock: say so and exit
    (a C call stuck on a lock cannot be interrupted from Python)."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Watchdog:
        def fire() -> None:
            print(
                f"chaos: DEADLOCK: a check blocked for {CHECK_TIMEOUT:g} s",
                file=sys.stderr,
                flush=True,
            )
            os._exit(3)

        self._timer = threading.Timer(CHECK_TIMEOUT, fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._timer is not None
        self._timer.cancel()


def _wait(cond: Any, timeout: float, what: str) -> float:
    """Poll cond() every 0.5 ms until true; returns seconds waited; raises on timeout."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not done in {timeout:g} s")
        time.sleep(0.0005)
    return time.monotonic() - t0


def heap_lock_recoveries(mem: Any) -> int:
    heaps_off = _ext.LAYOUT["memd_config.heaps"][0]
    lock_off = _ext.LAYOUT["memd_heap.lock"][0]
    rec_off, rec_size = _ext.LAYOUT["memd_lock.recoveries"]
    total = 0
    for idx in mem.heap_ids():
        at = heaps_off + idx * _ext.LAYOUT["memd_heap"] + lock_off + rec_off
        total += int.from_bytes(mem.window.view(at, rec_size), "little")
    return total


def ring_recoveries(ring: Any) -> int:
    return sum(v for k, v in ring.wait_stats.items() if "recover" in k)


class Chaos:
    def __init__(self, daemon: Daemon, seed: int = 1) -> None:
        self.daemon = daemon
        self.rnd = random.Random(seed)
        self.mem = daemon.attach(timeout=10)
        mem = self.mem
        self.ctl_zone = mem.memzone_reserve("chaos_ctl", 64)
        self.ctl = self.ctl_zone.buf.cast("q")
        self.ring = mem.ring_create("chaos_tokens", 4096)
        self.empty = mem.ring_create("chaos_empty", 16)
        self.pool = mem.mempool_create("chaos_objs", N_OBJECTS, 64, cache_size=32)
        self._refill()
        self.baseline_blocks = self._heap_alloc_count()
        self.stats: dict[str, Any] = {
            "rounds": 0,
            "kills": 0,
            "deadlocks": 0,
            "objects_lost": 0,
            "blocks_lost": 0,
            "heap_check_failures": 0,
            "dead_hand_objects": 0,
            "moving_objects_returned": 0,
            "max_dead_hand_objects": 0,
            "dead_blocks_freed": 0,
            "reclaim_ms": [],
            "kinds": dict.fromkeys(KINDS, 0),
        }
        self.rec0 = (heap_lock_recoveries(mem), ring_recoveries(self.ring))
        self.survivor = _spawn(daemon, SURVIVOR)
        _wait(
            lambda: self.ctl[READY] == 1 or self.survivor.poll() is not None, 30, "survivor start"
        )
        if self.survivor.poll() is not None:
            raise RuntimeError(f"survivor died: {self.survivor.stderr.read()}")

    def _heap_alloc_count(self) -> int:
        return self.mem.heap_stats()["alloc_count"]

    def _refill(self) -> None:
        handles = [self.pool.get_handle() for _ in range(N_TOKENS)]
        assert self.ring.enqueue_bulk(handles) == N_TOKENS

    def round(self, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        victim = _spawn(self.daemon, VICTIM, seed=self.rnd.randrange(1 << 30), kind=kind)
        line = victim.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"victim failed to start: {victim.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(self.rnd.uniform(0.005, 0.12))
        t_kill = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        victim.stdout.close()  # type: ignore[union-attr]
        victim.stderr.close()  # type: ignore[union-attr]
        self.stats["rounds"] += 1
        self.stats["kinds"][kind] += 1
        with Watchdog():
            pids = lambda: {p["pid"] for p in self.mem.processes()}  # noqa: E731
            _wait(lambda: victim.pid not in pids(), CHECK_TIMEOUT, "reclaim of the victim")
            self.stats["reclaim_ms"].append((time.monotonic() - t_kill) * 1000)
            self.ctl[PAUSE] = 1
            _wait(
                lambda: self.ctl[PAUSED] == 1 or self.survivor.poll() is not None,
                CHECK_TIMEOUT,
                "survivor pause",
            )
            try:
                self._check(victim.pid)
            finally:
                self.ctl[PAUSE] = 0
        if self.survivor.poll() is not None:
            raise RuntimeError(f"the survivor died: {self.survivor.stderr.read()}")  # type: ignore[union-attr]
        self.stats["kills"] += 1

    def _check(self, dead: int) -> None:
        mem, st = self.mem, self.stats
        for idx in mem.heap_ids():
            try:
                _ext.heap_check(mem.window, idx)
            except OSError as e:
                st["heap_check_failures"] += 1
                print(f"chaos: heap {idx} inconsistent after killing {dead}: {e}", file=sys.stderr)
        owned = mem.heap_owners().get(dead, {})
        if owned.get("blocks"):
            st["dead_blocks_freed"] += mem.free_owned_by(dead, force=True)["blocks"]
        st["blocks_lost"] += self._heap_alloc_count() - self.baseline_blocks
        self.baseline_blocks = self._heap_alloc_count()

        tokens: list[int] = []
        while True:
            got = self.ring.dequeue_burst(1024)
            if not got:
                break
            tokens += got
        dup = len(tokens) - len(set(tokens))
        self.pool.put_bulk(list(set(tokens)))
        # Nobody else holds objects now: what is still handed out was in the
        # victim's hands (got by it, or tokens it had dequeued).  Report, put back.
        in_dead_hands = [h for h, _ in self.pool.busy()]
        if in_dead_hands:
            self.pool.put_bulk(in_dead_hands)
        # What it was moving between the ring, its cache and its hands (FREE, in
        # neither) the primary put back at its reclaim: its record says how many
        # (None: the pool was busy then, and the primary tries again every second).
        moving = self._moving_returned(dead)
        if moving is None:
            _wait(lambda: self._moving_returned(dead) is not None, CHECK_TIMEOUT, "recovery")
            moving = self._moving_returned(dead) or 0
        try:  # anything still FREE in no ring and no cache is lost
            missed = self.pool.recover()
        except ValueError as e:
            print(f"chaos: mempool after killing {dead}: {e}", file=sys.stderr)
            missed = 1
        st["objects_lost"] += missed
        st["moving_objects_returned"] += moving
        held = len(in_dead_hands)
        st["dead_hand_objects"] += held
        st["max_dead_hand_objects"] = max(st["max_dead_hand_objects"], held)
        lost = self.pool.in_use_count() + dup
        try:
            audit = self.pool.audit()
            lost += N_OBJECTS - audit["free"]
        except ValueError as e:
            print(f"chaos: mempool audit after killing {dead}: {e}", file=sys.stderr)
            lost += 1
        st["objects_lost"] += max(lost, 0)
        self._refill()

    def _moving_returned(self, pid: int) -> int | None:
        """The primary's count of the objects dead `pid` was moving (its reclaim
        record's moving_objects_returned; 0 if it was in the middle of no move)."""
        with TelemetryClient(telemetry_path(self.daemon.prefix, str(self.daemon.runtime_dir))) as c:
            records = [r for r in c.query("/memd/reclaims") if r["pid"] == pid]
        return records[-1].get("moving_objects_returned", 0) if records else 0

    def finish(self) -> dict[str, Any]:
        self.ctl[STOP] = 1
        try:
            _, err = self.survivor.communicate(timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.survivor.kill()
            self.stats["deadlocks"] += 1
            _, err = self.survivor.communicate()
        st = self.stats
        st["survivor_iterations"] = self.ctl[ITERS]
        st["survivor_errors"] = self.ctl[ERRORS] + (self.survivor.returncode != 0)
        st["survivor_stderr"] = err[-2000:]
        st["max_stall_ms"] = self.ctl[MAX_STALL_NS] / 1e6
        st["heap_lock_recoveries"] = heap_lock_recoveries(self.mem) - self.rec0[0]
        st["ring_lock_recoveries"] = ring_recoveries(self.ring) - self.rec0[1]
        return st

    def kill_primary(self) -> dict[str, float | str]:
        """SIGKILL the primary under a secondary blocked in dequeue(timeout=None) and
        one blocked in heap expansion (the primary is SIGSTOPped first, so the
        expansion cannot finish)."""
        d = self.daemon
        blocked = {}
        for kind in ("dequeue", "expansion"):
            blocked[kind] = p = _spawn(d, PRIMARY_KILL, kind=kind)
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                p.kill()
                raise RuntimeError(
                    f"a blocked secondary did not start: {p.communicate()[1]}\n"
                    f"daemon log:\n{d.log_text()[-3000:]}"
                )
        self.mem.detach()
        d.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        blocked["expansion"].stdin.write("go\n")  # type: ignore[union-attr]
        blocked["expansion"].stdin.flush()  # type: ignore[union-attr]
        time.sleep(0.3)  # let both block: the dequeue sleeps, the alloc waits for the primary
        t_kill = time.monotonic()
        d.kill()
        out: dict[str, float | str] = {}
        for kind, p in blocked.items():
            stdout, stderr = p.communicate(timeout=CHECK_TIMEOUT)
            line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                out[kind] = f"no result: {stderr[-500:]}"
                continue
            what, when = json.loads(line[7:])
            out[kind] = (when - t_kill) * 1000 if what == "PrimaryNotRunning" else what
        return out


def run(daemon: Daemon, rounds: int, seed: int = 1, kill_primary: bool = True) -> dict[str, Any]:
    chaos = Chaos(daemon, seed)
    try:
        for i in range(rounds):
            chaos.round(i)
    finally:
        stats = chaos.finish()
    if kill_primary:
        stats["primary_kill_ms"] = chaos.kill_primary()
    return stats


def table(st: dict[str, Any], mode: str) -> str:
    rec = st["reclaim_ms"] or [0.0]
    kinds = ", ".join(f"{k} {v}" for k, v in st["kinds"].items())
    rows = [
        ("rounds run", f"{st['rounds']} ({kinds})"),
        ("kills survived", f"{st['kills']}"),
        ("deadlocks", f"{st['deadlocks']}"),
        ("objects lost", f"{st['objects_lost']}"),
        ("heap blocks lost", f"{st['blocks_lost']}"),
        ("heap_check failures", f"{st['heap_check_failures']}"),
        ("max stall (survivor)", f"{st['max_stall_ms']:.1f} ms"),
        ("reclaim after kill", f"median {statistics.median(rec):.1f} ms, max {max(rec):.1f} ms"),
        (
            "locks taken over from the dead",
            f"heap {st['heap_lock_recoveries']}, ring {st['ring_lock_recoveries']}",
        ),
        (
            "objects in dead hands (reported)",
            f"{st['dead_hand_objects']} (at most {st['max_dead_hand_objects']} a kill)",
        ),
        ("objects in flight (the primary put back)", f"{st['moving_objects_returned']}"),
        ("heap blocks of the dead (freed)", f"{st['dead_blocks_freed']}"),
        ("survivor iterations / errors", f"{st['survivor_iterations']} / {st['survivor_errors']}"),
    ]
    for kind, v in st.get("primary_kill_ms", {}).items():
        rows.append(
            (
                f"primary kill -> {kind}",
                f"PrimaryNotRunning after {v:.1f} ms" if isinstance(v, float) else str(v),
            )
        )
    width = max(len(r[0]) for r in rows)
    return f"memd chaos ({mode})\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def ok(st: dict[str, Any]) -> bool:
    pk = st.get("primary_kill_ms", {})
    return (
        st["deadlocks"] == 0
        and st["objects_lost"] == 0
        and st["blocks_lost"] == 0
        and st["heap_check_failures"] == 0
        and st["survivor_errors"] == 0
        and st["kills"] == st["rounds"]
        and all(isinstance(v, float) for v in pk.values())
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--no-huge", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--in-memory", action="store_true", help="run memd with --in-memory")
    ap.add_argument("--json", action="store_true", help="print the raw numbers too")
    args = ap.parse_args()
    mode = "nohuge" if args.no_huge else "huge"
    tmp = Path(tempfile.mkdtemp(prefix="memd-chaos-"))
    extra = ["--in-memory"] if args.in_memory else []
    daemon = Daemon(tmp, mode, "-m", "16", "--sync-timeout", "60", *extra).start()
    try:
        st = run(daemon, args.rounds, args.seed)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        remove_leftover_pages(daemon.prefix)
    what = "--no-huge" if args.no_huge else "hugepages"
    print(table(st, what + (" --in-memory" if args.in_memory else "")))
    if args.json:
        print(json.dumps({k: v for k, v in st.items() if k != "reclaim_ms"}, indent=1))
    if not ok(st):
        print("chaos: FAILED (see above)", file=sys.stderr)
        print(st["survivor_stderr"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
