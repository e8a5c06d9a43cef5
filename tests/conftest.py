"""Shared pytest fixtures.

Hugepage policy: tests that need real hugepages carry ``@pytest.mark.hugepages`` and
take the ``require_hugepages`` fixture. When hugepages are not usable the test is
SKIPPED, unless the environment says ``MEMD_REQUIRE_HUGEPAGES=1`` (CI on a machine
set up with ``python -m memd.hugepages_admin --setup``): then it FAILS, so a broken
setup cannot pass silently.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

import pytest


class HugepageEnv(NamedTuple):
    """What ``require_hugepages`` found: the default size's mount and free pages."""

    mount: str  #: a writable hugetlbfs mount point of the default page size
    page_size: int  #: bytes (the kernel's default hugepage size)
    free: int  #: HugePages_Free - HugePages_Rsvd when the fixture ran

    def need(self, pages: int) -> None:
        """Skip (or fail, under MEMD_REQUIRE_HUGEPAGES=1) unless `pages` are free."""
        if self.free < pages:
            hugepages_unavailable(f"need {pages} free hugepages, {self.free} free")


def hugepages_unavailable(why: str) -> NoReturn:
    """Apply the policy: fail under MEMD_REQUIRE_HUGEPAGES=1, else skip."""
    msg = f"hugepages unavailable: {why} (python -m memd.hugepages_admin --setup)"
    if os.environ.get("MEMD_REQUIRE_HUGEPAGES") == "1":
        pytest.fail(msg + "; MEMD_REQUIRE_HUGEPAGES=1 makes this a failure", pytrace=False)
    pytest.skip(msg)


def _probe_hugepages() -> HugepageEnv:
    # Read /proc directly, not through memd.hw.hugepage_info: the policy must not depend
    # on the code under test.
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.split():
                    meminfo[key] = int(rest.split()[0])
    except OSError as exc:
        hugepages_unavailable(f"cannot read /proc/meminfo: {exc}")
    size_kb = meminfo.get("Hugepagesize")
    if not size_kb:
        hugepages_unavailable("the kernel reports no Hugepagesize")
    free = meminfo.get("HugePages_Free", 0) - meminfo.get("HugePages_Rsvd", 0)
    if free < 1:
        hugepages_unavailable(f"no free {size_kb} kB hugepages")
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    mounts = []
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4 or fields[2] != "hugetlbfs":
                continue
            m = re.search(r"(?:^|,)pagesize=(\d+)([KMG])", fields[3], re.IGNORECASE)
            mkb = int(m.group(1)) * units[m.group(2).upper()] if m else size_kb
            path = re.sub(r"\\([0-7]{3})", lambda o: chr(int(o.group(1), 8)), fields[1])
            if mkb == size_kb and os.access(path, os.W_OK):
                mounts.append(path)
    if not mounts:
        hugepages_unavailable(f"no writable hugetlbfs mount for {size_kb} kB pages")
    return HugepageEnv(mount=mounts[0], page_size=size_kb * 1024, free=free)


@pytest.fixture
def require_hugepages() -> HugepageEnv:
    """Real hugepages of the default size, or skip/fail per the policy above."""
    return _probe_hugepages()


# --- real daemons ---------------------------------------------------------------

from memd.testing import Daemon, remove_leftover_pages  # noqa: E402


@pytest.fixture(params=["nohuge", "huge"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test once with --no-huge and once on real hugepages."""
    if request.param == "huge":
        env = _probe_hugepages()
        env.need(16)
    return request.param


@pytest.fixture
def daemon_factory(tmp_path, mode):
    """Start memd primaries (real processes); all are stopped at the end."""
    started: list[Daemon] = []

    def make(*args: str, start: bool = True, **kw) -> Daemon:
        d = Daemon(tmp_path, mode, *args, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
    for prefix in {d.prefix for d in started}:  # a primary killed on purpose leaves pages
        remove_leftover_pages(prefix)


@pytest.fixture
def daemon(daemon_factory):
    """One running memd with 8 MB preallocated."""
    return daemon_factory("-m", "8")


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test stops (SIGSTOP): continued (and killed, if still running)
    at the end, so that a failing test leaves none behind."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
