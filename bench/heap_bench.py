"""malloc+free pairs on memd's shared heap vs Python baselines.

    PYTHONPATH=. python bench/heap_bench.py [-n PAIRS] [-r REPEATS]

Prints the median ns per malloc+free pair for 64 B, 1 KiB and 64 KiB, and each
row's ratio to bytearray(n) and to libc malloc+free through ctypes.  Rows:

  ext offsets   _ext.heap_alloc + _ext.heap_free (plain ints, no Block)
  ext Block     _ext.heap_malloc + _ext.heap_free_block (a Block object)
  HeapMixin     mem.malloc + mem.free (the API; memd.shm.heap.AnonymousMemory,
                preallocated, so no expansion / release)
  zmalloc       mem.zmalloc + mem.free (freed memory is dirty: zeroes n bytes)
  bytearray     bytearray(n), dropped (Python's allocator; zero-filled)
  ctypes libc   libc.malloc + libc.free through ctypes

Then, side by side with DPDK's `malloc_perf_autotest` (dpdk-test, --no-huge -m 1600)
when installed: rte_malloc+rte_free per size, memzone reserve+free (memd: a primary
in-process), and the secondary expansion round trip: a secondary's malloc that
must ask the primary (a real memd process) for pages, with 0, 1 and 4 other
secondaries attached that the primary must sync.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from memd import _ext
from memd.shm.heap import AnonymousMemory
from memd.testing import hugepages_free, memd_argv

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

    dpdk = dpdk_malloc_perf() if shutil.which("dpdk-test") else {}
    if dpdk:
        print("\nvs DPDK rte_malloc+rte_free (malloc_perf_autotest, C):")
        for n in SIZES:
            ref = dpdk.get(("rte_malloc", n))
            if ref:
                ours = results["HeapMixin"][n]
                print(
                    f"  {n:>6} B: memd {ours:6.0f} ns, DPDK {ref:6.0f} ns, "
                    f"memd/DPDK {ours / ref:5.2f}"
                )
    print()
    mz = memzone_pairs(2000)
    ref = dpdk.get(("rte_memzone_reserve", 64))
    print(
        f"memzone reserve+free (64 B): memd {mz:.2f} us"
        + (f", DPDK {ref / 1000:.2f} us, memd/DPDK {mz * 1000 / ref:.2f}" if ref else "")
    )
    for others in (0, 1, 4):
        rt = expansion_round_trip(others, 30)
        kind = "hugepages" if hugepages_free() >= 64 else "no-huge"
        print(
            f"secondary expansion round trip ({kind}), {others} other secondaries: "
            f"median {rt:.2f} ms"
        )


def dpdk_malloc_perf() -> dict[tuple[str, int], float]:
    """ns per alloc+free from DPDK's own malloc_perf_autotest, by (section, size)."""
    try:
        out = subprocess.run(
            [
                "dpdk-test",
                "--no-pci",
                "--no-huge",
                "-m",
                "1600",
                "-l",
                "0",
                "--file-prefix",
                f"hb{os.getpid()}",
            ],
            input="malloc_perf_autotest\nquit\n",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # results are logged to stderr
            text=True,
            timeout=600,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[tuple[str, int], float] = {}
    section = ""
    for line in out.splitlines():
        m = re.search(r"Performance: (\w+)", line)
        if m:
            section = m.group(1)
            continue
        cols = line.split()
        if len(cols) >= 6 and cols[1].isdigit() and cols[2].isdigit():
            found[(section, int(cols[1]))] = float(cols[5]) * 1000  # Total (us) -> ns
    return found


def memzone_pairs(n: int) -> float:
    """Median us per memzone_reserve + memzone_free on an in-process primary."""
    from memd.primary import Options, Primary

    rundir = tempfile.mkdtemp(prefix="memd-hb-")
    p = Primary(
        Options(file_prefix=f"hb{os.getpid()}", runtime_dir=rundir, no_huge=True, memory_mb=64)
    )
    try:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            p.memzone_free(p.memzone_reserve(f"z{i % 7}", 64))
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        p.close()
        shutil.rmtree(rundir, ignore_errors=True)


def expansion_round_trip(others: int, runs: int) -> float:
    """Median ms of a secondary malloc that needs the primary to map a page and
    sync every secondary (a real memd process; the free gives the page back)."""
    import memd_client as mc

    rundir = Path(tempfile.mkdtemp(prefix="memd-hb-"))
    prefix = f"hx{os.getpid()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(rundir / "n"))
    mode = [] if hugepages_free() >= 64 else ["--no-huge"]
    daemon = subprocess.Popen(
        memd_argv(prefix, rundir, *mode, "--no-telemetry", "--log-level", "warning"),
        env={**os.environ, "NOTIFY_SOCKET": str(rundir / "n")},
    )
    waiters = []
    try:
        notify.settimeout(30)
        while b"READY=1" not in notify.recv(4096):
            pass
        for _ in range(others):
            w = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys, memd_client as mc\n"
                    f"m = mc.attach({prefix!r}, runtime_dir={str(rundir)!r})\n"
                    "print('ok', flush=True); sys.stdin.readline()",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert w.stdout is not None and w.stdout.readline().strip() == "ok"
            waiters.append(w)
        times = []
        with mc.attach(prefix, runtime_dir=rundir) as mem:
            for _ in range(runs):
                t0 = time.perf_counter()
                blk = mem.malloc(1 << 20)  # heap is empty: always one new page
                times.append(time.perf_counter() - t0)
                mem.free(blk)  # ... which the free gives back
        return statistics.median(times) * 1000
    finally:
        for w in waiters:
            w.communicate("x\n", timeout=30)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        notify.close()
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
