"""Memory runs out in the middle of heap growth (memd/mp/malloc_mp.py): a cap of 8 pages
of 2 MB, -m 2 preallocating one.  The expansion that does not fit must fail with a
MemoryError that says what to do, leave no page, file or heap change behind, and
leave the daemon serving; what fits still fits, and freed pages come back.

Two caps, same scenarios: real hugepages from a hugetlbfs mount of our own with
size=16M (the system's reservation is left alone; the mount's free count is ours,
HugePages_Free is shared with whatever else runs), and --no-huge with --max-mem 16.
test_expansion.py covers --max-mem's message and reuse after free.
"""

from __future__ import annotations

import gc
import glob
import inspect
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import hugepages_unavailable

from memd._ext import HEAP_ELEM_HEADER_SIZE, HEAP_ELEM_TRAILER_SIZE
from memd.errors import MemdMemoryError
from memd.shm.heap import space_needed
from memd.testing import Daemon, file_pages, result, run_secondary

MiB = 1 << 20
PAGES = 8  # the cap, in 2 MB pages


@dataclass
class Capped:
    daemon: Daemon
    files: str  # glob of the daemon's page files
    mount: str | None  # the hugetlbfs mount whose size= is the cap (None: --max-mem)
    hint: str  # what the MemoryError must tell the user to do


def state(mem: Any, files: str, mount: str | None) -> dict[str, Any]:
    """Everything a failed expansion could leave behind (also run in secondaries)."""
    import glob
    import os

    from memd.testing import file_pages

    return {
        "pages": sum(file_pages(f) for f in glob.glob(files)),  # pages the files hold
        "free_pages": os.statvfs(mount).f_bfree if mount else None,
        "memsegs": mem.memsegs(),
        "mapped": mem.info()["mapped_bytes"],
        "heap": mem.heap_stats(0),
        "zones": [z.name for z in mem.memzones()],
    }


def fills(pages: int) -> int:
    """The largest block whose heap growth takes exactly `pages` pages."""
    size = pages * 2 * MiB - HEAP_ELEM_HEADER_SIZE - HEAP_ELEM_TRAILER_SIZE
    assert space_needed(size) == pages * 2 * MiB
    return size


STATE = "from typing import Any\n" + textwrap.dedent(inspect.getsource(state))


@pytest.fixture
def hugetlbfs_16m(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A hugetlbfs mount that holds 8 pages (size=16M); unmounted at the end."""
    env = request.getfixturevalue("require_hugepages")  # the policy: skip or fail
    if env.page_size != 2 * MiB:
        hugepages_unavailable(f"the default hugepage size is {env.page_size >> 10} kB, not 2 MB")
    env.need(PAGES)
    if os.geteuid() != 0:
        hugepages_unavailable("mounting a hugetlbfs needs root")
    mnt = tmp_path / "hp16m"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", f"pagesize=2M,size={2 * PAGES}M", "nodev", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        hugepages_unavailable(f"cannot mount a hugetlbfs: {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        gc.collect()  # caught MemoryErrors' tracebacks keep blocks (and their pages) alive
        if subprocess.run(["umount", str(mnt)], check=False).returncode:
            # still mapped by this process (a failed test's traceback keeps its blocks):
            # detach it now, the kernel frees the pages when the last mapping goes
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(params=["hugetlbfs", "max-mem"])
def capped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Capped]:
    if request.param == "hugetlbfs":
        mount = request.getfixturevalue("hugetlbfs_16m")
        d = Daemon(tmp_path, "huge", "-m", "2", "--huge-dir", mount)
        cap = Capped(d, f"{mount}/{d.prefix}map_*", mount, "larger size=")
    else:
        d = Daemon(tmp_path, "nohuge", "-m", "2", "--max-mem", str(2 * PAGES))
        cap = Capped(d, f"/dev/shm/{d.prefix}map_*", None, "--max-mem")
    d.start()
    try:
        yield cap
    finally:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_text()
    assert not glob.glob(cap.files), "a clean shutdown removes every page file"


def test_secondary_mallocs_until_the_pages_run_out(capped: Capped) -> None:
    res = result(
        run_secondary(
            capped.daemon,
            STATE
            + f"""
files, mount = {capped.files!r}, {capped.mount!r}
start = state(mem, files, mount)
blocks = []
while True:
    before = state(mem, files, mount)
    try:
        blocks.append(mem.malloc(3 << 19))   # 1.5 MB: at most one new page each
    except MemoryError as e:
        error, after = e, state(mem, files, mount)
        break
full = before
for b in blocks:
    mem.free(b)
freed = state(mem, files, mount)
again = [mem.malloc(3 << 19) for _ in blocks]   # the pages are made again
out({{"n": len(blocks), "type": type(error).__name__, "msg": str(error),
     "unchanged": before == after, "full": full, "start": start, "freed": freed}})
""",
        )
    )
    assert res["type"] == "MemdMemoryError" and capped.hint in res["msg"], res["msg"]
    assert res["unchanged"], "the failed malloc left something behind"
    # at least one block per page, at most what 16 MB can hold
    assert PAGES <= res["n"] <= PAGES * 2 * MiB // space_needed(3 << 19), res
    assert res["full"]["mapped"] == PAGES * 2 * MiB
    assert res["full"]["pages"] == PAGES and res["full"]["free_pages"] in (0, None)
    assert res["freed"] == res["start"], "freeing every block gives every page back"
    with capped.daemon.attach() as mem:  # still serving; the other process's blocks stay
        assert state(mem, capped.files, capped.mount)["mapped"] == PAGES * 2 * MiB


def test_expansion_larger_than_what_remains_changes_nothing(capped: Capped) -> None:
    with capped.daemon.attach() as mem:
        base = state(mem, capped.files, capped.mount)
        pre = mem.malloc(fills(1))  # the preallocated page: from now on each growth
        four = mem.malloc(fills(4))  # is exactly its block; 3 pages remain under the cap
        before = state(mem, capped.files, capped.mount)
        assert before["pages"] == 5 and before["heap"]["heap_freesz_bytes"] == 0
        if capped.mount:
            assert before["free_pages"] == 3
        # 4 more pages do not fit: the primary maps 3, fails on the 4th, rolls back
        with pytest.raises(MemdMemoryError, match=capped.hint):
            mem.malloc(fills(4))
        assert state(mem, capped.files, capped.mount) == before
        with pytest.raises(MemoryError, match=capped.hint):
            mem.memzone_reserve("too_big", fills(4))
        assert state(mem, capped.files, capped.mount) == before

        # another process: the same failures, then a block that takes the last 3 pages
        res = result(
            run_secondary(
                capped.daemon,
                STATE
                + f"""
files, mount = {capped.files!r}, {capped.mount!r}
before = state(mem, files, mount)
errors = []
for call in (lambda: mem.malloc({fills(4)}), lambda: mem.memzone_reserve("z", {fills(4)})):
    try:
        call()
    except MemoryError as e:
        errors.append(str(e))
unchanged = state(mem, files, mount) == before
three = mem.malloc({fills(3)})
full = state(mem, files, mount)
mem.free(three)
out({{"errors": errors, "unchanged": unchanged, "full": full,
     "after": state(mem, files, mount) == before}})
""",
            )
        )
        assert len(res["errors"]) == 2 and all(capped.hint in e for e in res["errors"]), res
        assert res["unchanged"] and res["after"], res
        assert res["full"]["pages"] == PAGES and res["full"]["mapped"] == PAGES * 2 * MiB
        if capped.mount:
            assert res["full"]["free_pages"] == 0
        assert state(mem, capped.files, capped.mount) == before

        mem.free(four)  # its 4 pages go back ...
        mem.free(pre)
        assert state(mem, capped.files, capped.mount) == base
        big = mem.malloc(fills(7))  # ... and 7 are made for a block that never fit
        assert state(mem, capped.files, capped.mount)["pages"] == PAGES
        mem.free(big)
        assert state(mem, capped.files, capped.mount) == base


def test_no_page_left_fails_at_start_with_the_cause(hugetlbfs_16m: str, tmp_path: Path) -> None:
    """A primary without -m on a mount with no page left fails at start (exit 1) with
    the mount's size= limit, instead of saying ready and failing at the first growth;
    the primary that holds the pages is untouched."""
    full = Daemon(tmp_path, "huge", "-m", str(2 * PAGES), "--huge-dir", hugetlbfs_16m).start()
    try:
        late = Daemon(tmp_path, "huge", "--huge-dir", hugetlbfs_16m)
        proc = subprocess.run(
            late.command(), capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 1, proc.stderr
        assert "size= limit" in proc.stderr and hugetlbfs_16m in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        held = glob.glob(f"{hugetlbfs_16m}/{full.prefix}map_*")
        assert sum(file_pages(f) for f in held) == PAGES
        with full.attach() as mem:
            assert mem.info()["mapped_bytes"] == PAGES * 2 * MiB
    finally:
        assert full.stop() == 0, full.log_text()
