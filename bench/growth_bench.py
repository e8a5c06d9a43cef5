"""Heap growth and release across secondaries, and attach time by memory in use.

    PYTHONPATH=. python bench/growth_bench.py [--mode nohuge|huge|both] [-n N]
        [--save FILE] [--baseline FILE]

Each row starts a real memd (no preallocation) and real secondaries, then times,
in one more secondary, N rounds of ``malloc(1 MiB)`` on an empty heap (the
primary must add pages: the growth round trip) and the ``free`` that gives them
back (the release round trip).  Rows: 0, 4, 16 and 64 other idle secondaries;
one other secondary stopped with SIGSTOP; one holding its GIL in back-to-back
C calls (``sum(range(...))``, about 1 s each).  Then ``attach()`` with 64 MiB,
1 GiB and 2 GiB in use (held by another secondary; skipped when the machine has
not that many free hugepages).  Medians in ms; ``fail`` counts MemoryErrors.

``--save`` writes the figures as JSON; ``--baseline`` prints each figure's ratio
to a saved run (bench/growth_baseline.json holds the per-page design's figures,
measured before the one-file-per-list layout, on the 2-core development machine
while other test suites ran).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memd.testing import (
    Daemon,
    finish_secondary,
    hugepages_free,
    remove_leftover_pages,
    result,
    run_secondary,
    start_secondary,
)

MiB = 1 << 20

GROW = """
import time, statistics
from memd.errors import MemdMemoryError
grow, release, fail = [], [], 0
for _ in range({n}):
    t0 = time.perf_counter()
    try:
        b = mem.malloc(1 << 20)
    except MemdMemoryError:
        fail += 1
        continue
    t1 = time.perf_counter()
    mem.free(b)
    t2 = time.perf_counter()
    grow.append((t1 - t0) * 1e3)
    release.append((t2 - t1) * 1e3)
med = lambda xs: statistics.median(xs) if xs else None
out({{"grow_ms": med(grow), "release_ms": med(release), "fail": fail,
     "mapped_mb": mem.info()["mapped_bytes"] >> 20}})
"""

ATTACH = """
import time, statistics
times = []
for _ in range({n}):
    t0 = time.perf_counter()
    m2 = mc.attach({prefix!r}, runtime_dir={rundir!r}, timeout=10)
    times.append((time.perf_counter() - t0) * 1e3)
    m2.detach()
out({{"attach_ms": statistics.median(times), "mapped_mb": mem.info()["mapped_bytes"] >> 20}})
"""

GIL_HOG = """
import threading
def hog():
    while True:
        sum(range(3 * 10**7))  # one C call, the GIL held throughout
threading.Thread(target=hog, daemon=True).start()
"""


def growth_row(mode: str, others: int, kind: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), mode).start()
        procs: list[subprocess.Popen[str]] = []
        try:
            for i in range(others):
                code = GIL_HOG if kind == "gil" and i == 0 else ""
                procs.append(start_secondary(d, code))
            if kind == "stopped":
                os.kill(procs[0].pid, signal.SIGSTOP)
            t0 = time.monotonic()
            res = result(run_secondary(d, GROW.format(n=n), timeout=600))
            assert isinstance(res, dict)
            res["wall_s"] = round(time.monotonic() - t0, 2)
            return res
        finally:
            for p in procs:
                os.kill(p.pid, signal.SIGCONT)
            for p in procs:
                try:
                    finish_secondary(p, timeout=60)
                except (AssertionError, subprocess.TimeoutExpired):
                    p.kill()
            d.stop()
            remove_leftover_pages(d.prefix)


def attach_row(mode: str, in_use_mb: int, n: int) -> dict[str, object] | None:
    if mode == "huge" and hugepages_free() * 2 < in_use_mb + 64:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), mode).start()
        holder = None
        try:
            chunks = max(1, in_use_mb // 64)
            holder = start_secondary(d, f"held = [mem.malloc(64 << 20) for _ in range({chunks})]")
            code = ATTACH.format(n=n, prefix=d.prefix, rundir=str(d.runtime_dir))
            res = result(run_secondary(d, code, timeout=600))
            assert isinstance(res, dict)
            return res
        finally:
            if holder is not None:
                finish_secondary(holder, timeout=120)
            d.stop()
            remove_leftover_pages(d.prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["nohuge", "huge", "both"], default="both")
    ap.add_argument("-n", type=int, default=30, help="growth rounds per row")
    ap.add_argument("--others", default="0,4,16,64", help="idle secondaries per row")
    ap.add_argument("--attach", default="64,1024,2048", help="MiB in use for attach rows")
    ap.add_argument("--save", help="write the figures to this JSON file")
    ap.add_argument("--baseline", help="print ratios to this JSON file's figures")
    args = ap.parse_args()
    base = json.loads(Path(args.baseline).read_text()) if args.baseline else {}
    modes = ["nohuge", "huge"] if args.mode == "both" else [args.mode]
    figures: dict[str, dict[str, object]] = {}

    def show(key: str, res: dict[str, object] | None, field: str, n: int = 0) -> None:
        figures[key] = res or {}
        value = None if res is None else res.get(field)
        old = base.get(key, {}).get(field)
        ratio = f"{value / old:6.2f}x" if value and old else "      "
        extra = f"fail {res['fail']}/{n or args.n}" if res and res.get("fail") else ""
        shown = "skipped" if res is None else ("-" if value is None else f"{value:9.3f}")
        was = f"(was {old:.3f})" if old else ""
        print(f"  {key:38s} {field:11s} {shown:>9s} ms {ratio} {was} {extra}", flush=True)

    for mode in modes:
        print(f"{mode}:", flush=True)
        for others in map(int, args.others.split(",")):
            res = growth_row(mode, others, "idle", args.n)
            show(f"{mode} grow, {others} idle others", res, "grow_ms")
            show(f"{mode} release, {others} idle others", res, "release_ms")
        for kind in ("stopped", "gil"):
            n = min(args.n, 5)
            res = growth_row(mode, 1, kind, n)
            show(f"{mode} grow, 1 {kind} other", res, "grow_ms", n)
        for mb in map(int, args.attach.split(",")):
            show(f"{mode} attach, {mb} MiB in use", attach_row(mode, mb, 5), "attach_ms")
    if args.save:
        Path(args.save).write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
