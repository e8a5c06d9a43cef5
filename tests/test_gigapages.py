"""1 GiB pages next to 2 MB ones: a memseg list per page size, and a memzone that
asks for MEMZONE_1GB gets a 1 GiB page.  Runs only where one 1 GiB page can be
reserved (root, and the kernel finds one): the test reserves it and mounts a
hugetlbfs of pagesize=1G in a private mount namespace (no other memd on the host
sees the mount, so none plans a list on the one page), and restores both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

GIGA = "/sys/kernel/mm/hugepages/hugepages-1048576kB"


@pytest.fixture
def one_gigapage(require_hugepages) -> Iterator[None]:
    nr = os.path.join(GIGA, "nr_hugepages")
    if os.geteuid() != 0 or not os.path.exists(nr):
        pytest.skip("1 GiB pages need root and a kernel that has them")
    with open(nr) as f:
        old = int(f.read())
    try:
        if old < 1:
            with open(nr, "w") as f:
                f.write("1")
        with open(os.path.join(GIGA, "free_hugepages")) as f:
            if int(f.read()) < 1:
                pytest.skip("no free 1 GiB page could be reserved")
        yield
    finally:
        with open(nr, "w") as f:
            f.write(str(old))


SCENARIO = """
import json, os, subprocess, sys, tempfile
from pathlib import Path
from memd.testing import Daemon, result, run_secondary
mnt = tempfile.mkdtemp(prefix="memd-1g-")
subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "none", mnt], check=True)
try:
    with tempfile.TemporaryDirectory() as t:
        d = Daemon(Path(t), "huge", *sys.argv[1:]).start(timeout=120)
        try:
            res = result(run_secondary(d, '''
from memd_client import MEMZONE_1GB, MEMZONE_2MB
mz = mem.memzone_reserve("giga", 64 << 20, flags=MEMZONE_1GB)
mz.buf[-2:] = b"ok"
small = mem.memzone_reserve("small", 1 << 20, flags=MEMZONE_2MB)
out({"sizes": mem.info()["page_sizes"], "giga": mz.page_size, "small": small.page_size,
     "data": bytes(mz.buf[-2:]).decode(),
     "segs": sorted({m["length"] for m in mem.memsegs()})})
mem.memzone_free(mz)
mem.memzone_free(small)
''', timeout=120))
            res["rc"] = d.stop()
        finally:
            if d.proc.poll() is None:
                d.stop()
    print("SCENARIO " + json.dumps(res), flush=True)
finally:
    subprocess.run(["umount", mnt], check=False)
    os.rmdir(mnt)
"""


@pytest.mark.parametrize("extra", [[], ["--in-memory"]])
def test_a_memzone_asking_for_1gb_pages_gets_one_next_to_2mb_ones(
    one_gigapage, extra: list[str]
) -> None:
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", SCENARIO, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("SCENARIO ")]
    res = json.loads(line[0].removeprefix("SCENARIO "))
    assert res["sizes"] == [2 << 20, 1 << 30], res
    assert res["giga"] == 1 << 30 and res["small"] == 2 << 20 and res["data"] == "ok", res
    assert res["segs"] == [2 << 20, 1 << 30] and res["rc"] == 0, res


PROBE = """
import mmap, os, subprocess, tempfile
from memd.shm.pages import probe_dir
mnt = tempfile.mkdtemp(prefix="memd-1g-")
subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "none", mnt], check=True)
try:
    free = probe_dir(mnt, 1 << 30)
    # take the one free page: the probe must say none can be had
    fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 30)
    mm = mmap.mmap(fd, 1 << 30, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    taken = probe_dir(mnt, 1 << 30)
    mm.close()
    os.close(fd)
    print("PROBE", repr(free), "|", taken, flush=True)
finally:
    subprocess.run(["umount", mnt], check=False)
    os.rmdir(mnt)
"""


def test_the_probe_of_a_1gb_directory_reserves_and_refuses_without_faulting(
    one_gigapage,
) -> None:
    """probe_dir only reserves a 1 GiB page (zeroing one made start take seconds):
    a free page passes, none free is refused with the reason."""
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    free, taken = line.removeprefix("PROBE ").split(" | ")
    assert free == "None", line
    assert taken != "None" and "1048576kB" in taken, line
