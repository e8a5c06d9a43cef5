"""malloc+free pairs on memd's shared heap vs Python baselines.

    PYTHONPATH=. python bench/heap_bench.py [-n PAIRS] [-r REPEATS]

Prints the median ns per malloc+free pair for 64 B, 1 KiB and 64 KiB, and each
row's ratio to bytearray(n) and to libc malloc+free through ctypes.  Rows:

  ext offsets   _ext.heap_alloc + _ext.heap_free (plain ints, no Block)
  ext Block     _ext.heap_malloc + _ext.heap_free_block (a Block object)
  HeapMixin     mem.malloc + mem.free (the API; memd.heap.AnonymousMemory,
                preallocated, so no expansion / release)
  zmalloc       mem.zmalloc + mem.free (freed memory is dirty: zeroes n bytes)
  bytearray     bytearray(n), dropped (Python's allocator; zero-filled)
  ctypes libc   libc.malloc + libc.free through ctypes

The lead adds memzone and expansion-round-trip parts later.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import timeit

from memd import _ext
from memd.heap import AnonymousMemory

SIZES = (64, 1024, 64 * 1024)


def bench(stmt: str, env: dict[str, object], number: int, repeat: int) -> float:
    """Median ns per execution of stmt."""
    times = timeit.repeat(stmt, globals=env, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000, help="pairs per timing run")
    ap.add_argument("-r", type=int, default=7, help="timing runs (the median is shown)")
    args = ap.parse_args()

    mem = AnonymousMemory(heap_size=64 << 20, prealloc=64 << 20, release=False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    env: dict[str, object] = {
        "w": mem.window,
        "order": (0,),
        "alloc": _ext.heap_alloc,
        "free": _ext.heap_free,
        "hmalloc": _ext.heap_malloc,
        "hfree": _ext.heap_free_block,
        "mmalloc": mem.malloc,
        "mzmalloc": mem.zmalloc,
        "mfree": mem.free,
        "cmalloc": libc.malloc,
        "cfree": libc.free,
    }
    rows = {
        "ext offsets": "free(w, 0, alloc(w, 0, n))",
        "ext Block": "hfree(w, hmalloc(w, order, n, 0, 0, False, False, None))",
        "HeapMixin": "mfree(mmalloc(n))",
        "zmalloc": "mfree(mzmalloc(n))",
        "bytearray": "bytearray(n)",
        "ctypes libc": "cfree(cmalloc(n))",
    }
    results: dict[str, dict[int, float]] = {name: {} for name in rows}
    for n in SIZES:
        env["n"] = n
        for name, stmt in rows.items():
            results[name][n] = bench(stmt, env, args.n, args.r)

    head = "".join(f"{f'{n} B':>12}{'/bytearray':>11}{'/libc':>7}" for n in SIZES)
    print(f"median ns per malloc+free pair ({args.n} pairs x {args.r} runs)")
    print(f"{'':14}{head}")
    for name, per in results.items():
        cells = "".join(
            f"{per[n]:>12.0f}{per[n] / results['bytearray'][n]:>11.2f}"
            f"{per[n] / results['ctypes libc'][n]:>7.2f}"
            for n in SIZES
        )
        print(f"{name:14}{cells}")
    s = mem.heap_stats()
    assert s["alloc_count"] == 0, s
    _ext.heap_check(mem.window, 0)


if __name__ == "__main__":
    main()
