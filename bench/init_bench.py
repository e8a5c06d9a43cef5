"""Primary init and secondary attach times, side by side with DPDK's EAL init.

    python bench/init_bench.py [--mb 1024] [--runs 5]

memd: spawn -> READY=1 (sd_notify) for `memd -m MB` (dynamic) and `--legacy-mem`,
plus `Primary()` in-process, and `memd_client.attach()` in-process.
DPDK (when `dpdk-test` is installed): spawn -> the `RTE>>` prompt, i.e. EAL init
done, for the same -m, in dynamic and legacy mode, and for a secondary
(`--proc-type=secondary`).  Prints medians and the ratio memd/DPDK (< 1: faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import memd_client as mc
from memd.hw.hugepage_info import read_meminfo
from memd.primary import Options, Primary
from memd.testing import memd_argv


def _hugepages_ok(mb: int) -> bool:
    info = read_meminfo()  # pages, and the page size in bytes
    return info.get("HugePages_Free", 0) * info.get("Hugepagesize", 0) >= mb << 20


def memd_start(mb: int, extra: list[str], rundir: Path, prefix: str) -> subprocess.Popen[bytes]:
    """A memd left running (the caller stops it), once it is ready."""
    sock_path = rundir / "notify"
    sock_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        s.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        p = subprocess.Popen(
            memd_argv(
                prefix, rundir, "-m", str(mb), "--no-telemetry", "--log-level", "warning", *extra
            ),
            env=env,
        )
        while b"READY=1" not in s.recv(4096):
            pass
    return p


def memd_spawn_to_ready(mb: int, extra: list[str], rundir: Path) -> float:
    """Seconds from spawning `memd -m MB` to its READY=1."""
    t0 = time.perf_counter()
    p = memd_start(mb, extra, rundir, "ibench")
    dt = time.perf_counter() - t0
    p.terminate()
    p.wait()
    return dt


def memd_inprocess(mb: int, extra: dict, rundir: Path) -> float:
    t0 = time.perf_counter()
    p = Primary(Options(file_prefix="ibench", runtime_dir=str(rundir), memory_mb=mb, **extra))
    dt = time.perf_counter() - t0
    p.close()
    return dt


def memd_attach(mb: int, no_huge: bool, rundir: Path, runs: int) -> list[float]:
    p = Primary(
        Options(file_prefix="ibench", runtime_dir=str(rundir), memory_mb=mb, no_huge=no_huge)
    )
    import threading

    stop = threading.Event()
    t = threading.Thread(target=p.serve, args=(stop, 0.01), daemon=True)
    t.start()
    times = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            m = mc.attach("ibench", runtime_dir=rundir)
            times.append(time.perf_counter() - t0)
            m.detach()
    finally:
        stop.set()
        t.join()
        p.close()
    return times


def dpdk_spawn_to_prompt(args: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["dpdk-test", "--no-pci", "-l", "0", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert p.stdout is not None
    buf = b""
    while b"RTE>>" not in buf:
        chunk = p.stdout.read1(4096)
        if not chunk:
            raise RuntimeError(f"dpdk-test exited: {buf.decode(errors='replace')[-500:]}")
        buf += chunk
    dt = time.perf_counter() - t0
    p.communicate(b"quit\n", timeout=60)
    return dt


def dpdk_secondary(mb: int, runs: int) -> list[float]:
    prim = subprocess.Popen(
        ["dpdk-test", "--no-pci", "-l", "0", "-m", str(mb), "--file-prefix", "dbench"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert prim.stdout is not None
    buf = b""
    while b"RTE>>" not in buf:
        buf += prim.stdout.read1(4096) or b"x" * 0
        if prim.poll() is not None:
            raise RuntimeError("dpdk-test primary exited")
    try:
        return [
            dpdk_spawn_to_prompt(["--proc-type=secondary", "--file-prefix", "dbench"])
            for _ in range(runs)
        ]
    finally:
        prim.communicate(b"quit\n", timeout=60)


def med(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    huge = _hugepages_ok(a.mb + 64)
    dpdk = shutil.which("dpdk-test") is not None and huge
    rundir = Path(tempfile.mkdtemp(prefix="memd-bench-"))
    rows: list[tuple[str, float, float | None]] = []
    modes = [("dynamic", [], {}), ("legacy", ["--legacy-mem"], {"legacy_mem": True})]
    if not huge:
        print(f"(no {a.mb} MB of free hugepages: memd runs --no-huge, DPDK is skipped)")
        modes = [("no-huge", ["--no-huge"], {"no_huge": True})]
    for name, flags, opts in modes:
        spawn = [memd_spawn_to_ready(a.mb, flags, rundir) for _ in range(a.runs)]
        inproc = [memd_inprocess(a.mb, opts, rundir) for _ in range(a.runs)]
        ref = None
        if dpdk:
            ref = med(
                [
                    dpdk_spawn_to_prompt(["-m", str(a.mb), "--file-prefix", "dbench", *flags])
                    for _ in range(a.runs)
                ]
            )
        rows.append((f"init {a.mb} MiB {name}: spawn -> ready", med(spawn), ref))
        rows.append((f"init {a.mb} MiB {name}: Primary() in-process", med(inproc), None))
    # A second instance on the same mount (another prefix) while this one starts:
    # what sharing a host costs (prefix lock, stale scan, probe) beside a lone start.
    flags = [] if huge else ["--no-huge"]
    other = Path(tempfile.mkdtemp(prefix="memd-bench-other-"))
    bystander = memd_start(64, flags, other, "ibench-other")
    try:
        beside = [memd_spawn_to_ready(a.mb, flags, rundir) for _ in range(a.runs)]
    finally:
        bystander.terminate()
        bystander.wait()
        shutil.rmtree(other, ignore_errors=True)
    alone = rows[0][1]
    rows.append((f"init {a.mb} MiB {modes[0][0]} beside another memd", med(beside), alone))
    att = memd_attach(64, not huge, rundir, a.runs * 10)
    ref = med(dpdk_secondary(64, a.runs)) if dpdk else None
    rows.append(("secondary attach()", med(att), ref))
    shutil.rmtree(rundir, ignore_errors=True)

    print(f"\n{'what':48} {'memd ms':>9} {'DPDK ms':>9} {'memd/DPDK':>10}")
    print("(the 'beside another memd' row compares with memd's own lone start instead)")
    for what, ms, ref in rows:
        ratio = f"{ms / ref:10.2f}" if ref else f"{'-':>10}"
        refs = f"{ref:9.1f}" if ref else f"{'-':>9}"
        print(f"{what:48} {ms:9.1f} {refs} {ratio}")
    print(
        f"\nmedians of {a.runs} runs (attach: {a.runs * 10}); DPDK = dpdk-test spawn -> "
        "RTE>> prompt (EAL init done), same -m and mode"
    )


if __name__ == "__main__":
    main()
