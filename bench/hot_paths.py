#!/usr/bin/env python3
"""The hot paths against an earlier revision, in one run: what the checks cost.

    python bench/hot_paths.py [--against REV] [--current REV] [--rounds N]

Without --against: ns per call of each hot path in this checkout's build.  With
--against REV (a commit, tag or branch of this repository): both revisions are
exported (git archive) to a temporary directory and built there without the
test hooks, as a wheel is; then each round runs one child process per
revision, alternating, and the table shows each path's median over the rounds
and the ratio current / REV.  --current defaults to HEAD (commit first: the
working tree's changes are not in it).

Rows (in-process, one window, no daemon): ring enqueue+dequeue MP/MC and SP/SC,
bulk-32 enqueue+dequeue per entry, mempool get+put (cache 32) and bulk-32 get+put
per object, and malloc+free of 64 B and 64 KiB on an anonymous heap (no growth,
no release).  Each cell is the best of 3 timeit runs in its child, then the
median over rounds: the host is shared and noisy.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, statement, operations per statement)
ROWS = [
    ("ring enq+deq MP/MC", "enq(1); deq()", 1),
    ("ring enq+deq SP/SC", "senq(1); sdeq()", 1),
    ("ring bulk-32, per entry", "enqb(buf); deqb(out)", 32),
    ("mempool get+put", "put(get())", 1),
    ("mempool bulk-32, per object", "getb(out); putb(out)", 32),
    ("malloc+free 64 B", "free(malloc(64))", 1),
    ("malloc+free 64 KiB", "free(malloc(65536))", 1),
]


def measure() -> dict[str, float]:
    """ns per operation for each row, with the memd found on sys.path."""
    import numpy as np

    from memd import _ext

    # module paths moved between revisions: the newest first
    try:
        from memd.shm.heap import AnonymousMemory
        from memd.shm.mempool import Mempool
        from memd.shm.ring import Ring
    except ImportError:
        from memd.heap import AnonymousMemory  # type: ignore[no-redef]
        from memd.mempool import Mempool  # type: ignore[no-redef]
        from memd.ring import Ring  # type: ignore[no-redef]

    base = 4 << 20
    w = _ext.Window.anonymous(16 << 20)
    ring = Ring.create(w, base, 1024, 0, "r")
    spsc = Ring.create(w, base + (1 << 20), 1024, 3, "s")
    pool = Mempool.create(w, base + (2 << 20), 4096, 64, cache_size=32, name="p")
    mem = AnonymousMemory(heap_size=64 << 20, prealloc=64 << 20, release=False)
    env = {
        "enq": ring.enqueue,
        "deq": ring.dequeue,
        "senq": spsc.enqueue,
        "sdeq": spsc.dequeue,
        "enqb": ring.enqueue_bulk,
        "deqb": ring.dequeue_bulk_into,
        "buf": np.arange(32, dtype=np.uint64),
        "out": np.zeros(32, dtype=np.uint64),
        "get": pool.get,
        "put": pool.put,
        "getb": pool.get_bulk_into,
        "putb": pool.put_bulk,
        "malloc": mem.malloc,
        "free": mem.free,
    }
    res = {}
    for name, stmt, per in ROWS:
        n = 200_000 // per
        best = min(timeit.repeat(stmt, globals=env, number=n, repeat=3))
        res[name] = best / n / per * 1e9
    return res


def export(rev: str, into: Path) -> Path:
    """rev's tree, built without test hooks, under `into`; its path."""
    tree = into / rev.replace("/", "_")
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = dict(os.environ, MEMD_TEST_HOOKS="0")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
    )
    return tree


def child(tree: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV", help="compare with this revision, same run")
    ap.add_argument("--current", metavar="REV", default="HEAD", help="the revision compared")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (median)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return 0
    if not args.against:
        for name, ns in measure().items():
            print(f"{name:30s} {ns:8.1f} ns")
        return 0
    with tempfile.TemporaryDirectory(prefix="memd-hot-") as tmp:
        print(f"building {args.against} and {args.current} without test hooks ...", flush=True)
        old, new = export(args.against, Path(tmp)), export(args.current, Path(tmp))
        runs: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
        for r in range(args.rounds):
            for side, tree in (("old", old), ("new", new)):
                for name, ns in child(tree).items():
                    runs[side].setdefault(name, []).append(ns)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    print(f"\nns per operation, median of {args.rounds} alternating rounds")
    print(f"{'path':30s} {args.against[:10]:>10s} {args.current[:10]:>10s} {'ratio':>6s}")
    for name, _, _ in ROWS:
        a, b = statistics.median(runs["old"][name]), statistics.median(runs["new"][name])
        print(f"{name:30s} {a:10.1f} {b:10.1f} {b / a:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
