"""Stress: many attaches while another secondary grows and releases a heap.

    python bench/attach_race.py [--seconds 180] [--no-huge] [--workers 2]

Once seen (before the single-file list layout): a heap growth during another
process's attach failed there with "memseg list 0 has no page directory here",
between two forkserver workers.  This runs a *grower* secondary that mallocs and
frees blocks big enough to make the primary add and punch out pages, and a
forkserver pool of workers that each attach again and again: attach, malloc, write
and read the block through its view, look a ring up and use it, unpickle a ring
reference (the first use of an instance attaches), detach.  Every error a worker or
the grower meets is counted by its message; the exit status is 1 if there was any.
It never asserts on time.  At most ~40 hugepages (2 MB) at once.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path

from memd.testing import Daemon, remove_leftover_pages
from memd_client import Secondary, attach

GROW_BLOCK = 24 << 20  # past -m 4: every malloc of it grows the heap, every free releases


def _attach(prefix: str, rundir: str) -> Secondary:
    return attach(prefix, runtime_dir=rundir, timeout=20)


def grower(prefix: str, rundir: str, stop_at: float, out: multiprocessing.Queue) -> None:
    errors: collections.Counter[str] = collections.Counter()
    rounds = 0
    mem = _attach(prefix, rundir)
    try:
        while time.monotonic() < stop_at:
            try:
                blk = mem.malloc(GROW_BLOCK)
                blk.buf[-1] = 1
                mem.free(blk)
                rounds += 1
            except Exception as e:  # counted and reported, the loop goes on
                errors[f"grower: {type(e).__name__}: {e}"] += 1
    finally:
        mem.detach()
    out.put(("grower", rounds, dict(errors)))


def attach_once(prefix: str, rundir: str, ref: bytes) -> tuple[int, str | None]:
    """One worker task: attach, use, detach (the forkserver worker lives on)."""
    try:
        mem = _attach(prefix, rundir)
        try:
            blk = mem.malloc(64 << 10)
            blk.buf[:4] = b"race"
            assert bytes(mem.view(blk.offset, 4)) == b"race"
            mem.free(blk)
            ring = mem.ring_lookup("race")
            ring.enqueue(os.getpid())
            ring.dequeue()
        finally:
            mem.detach()
        ring = pickle.loads(ref)  # attaches on first use, kept for the worker's life
        ring.count  # noqa: B018 (touches the ring through that attachment)
        return 1, None
    except Exception as e:
        return 0, f"worker: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-huge", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="memd-attach-race-"))
    d = Daemon(tmp, "nohuge" if args.no_huge else "huge", "-m", "4").start()
    rundir = str(d.runtime_dir)
    try:
        with _attach(d.prefix, rundir) as mem:
            ref = pickle.dumps(mem.ring_create("race", 1024))
            stop_at = time.monotonic() + args.seconds
            ctx = multiprocessing.get_context("forkserver")
            out: multiprocessing.Queue = ctx.Queue()
            g = ctx.Process(target=grower, args=(d.prefix, rundir, stop_at, out))
            g.start()
            attaches = 0
            errors: collections.Counter[str] = collections.Counter()
            with ctx.Pool(args.workers) as pool:
                while time.monotonic() < stop_at:
                    batch = [
                        pool.apply_async(attach_once, (d.prefix, rundir, ref))
                        for _ in range(4 * args.workers)
                    ]
                    for r in batch:
                        ok, err = r.get(timeout=120)
                        attaches += ok
                        if err:
                            errors[err] += 1
            _name, rounds, gerr = out.get(timeout=120)
            g.join(60)
            errors.update(gerr)
        print(
            f"{args.seconds:.0f} s: {attaches} attaches in {args.workers} forkserver workers, "
            f"{rounds} grow+release rounds; errors: {sum(errors.values())}"
        )
        for msg, n in errors.most_common():
            print(f"  {n} x {msg}")
        if d.proc is None or d.proc.poll() is not None:
            print("the primary died", file=sys.stderr)
            return 1
        return 1 if errors else 0
    finally:
        d.stop()
        remove_leftover_pages(d.prefix)


if __name__ == "__main__":
    sys.exit(main())
