"""memd.cli.hugepages_admin: reserve/mount/setup against a fake /sys, show() on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fake_sys import FakeSys, standard

from memd.cli import hugepages_admin as ha
from memd.errors import HugepageConfigError, HugepageReserveError, MemdValueError
from memd.hw import hugepage_info as hi

M2 = 2 * 1024 * 1024
G1 = 1024 * 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeSys]:
    fs = standard(tmp_path)
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        yield fs


@pytest.fixture
def runs(fake: FakeSys, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Fake mount(8)/umount(8): record argv and update the fake /proc/mounts."""
    calls: list[list[str]] = []

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[0] == "mount":
            size = argv[4].split(",")[0].partition("=")[2]
            fake.add_mount(fake.hugetlbfs(argv[-1], size))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(ha, "_run", run)
    return calls


def _nr(fake: FakeSys, size_kb: int = 2048, node: int | None = None) -> int:
    return int((fake.size_dir(size_kb, node) / "nr_hugepages").read_text())


# --------------------------------------------------------------------------- show


def test_show_rows_per_size_and_node(fake: FakeSys, tmp_path: Path) -> None:
    rows = ha.show()
    mnt = str(tmp_path / "mnt" / "huge2M")
    assert rows == [
        ha.HugepageRow(M2, 0, 256, 250, (mnt,)),
        ha.HugepageRow(M2, 1, 256, 250, (mnt,)),
        ha.HugepageRow(G1, 0, 1, 1, ()),
        ha.HugepageRow(G1, 1, 1, 1, ()),
    ]
    table = ha.format_rows(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["Size", "Node", "Total", "Free", "Reserved", "Mounts"]
    assert lines[1].split() == ["2M", "0", "256", "250", "512M", mnt]
    assert lines[3].split()[-2:] == ["(not", "mounted)"]


def test_show_without_node_dirs(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    fs.add_size(2048, nr=8, free=3)
    fs.set_meminfo()
    fs.set_mounts()
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        assert ha.show() == [ha.HugepageRow(M2, None, 8, 3, ())]


def test_parse_size_is_the_shared_helper() -> None:
    assert ha.parse_size is hi.parse_size
    assert ha.parse_size("512M") == 256 * M2


# --------------------------------------------------------------------------- reserve


def test_reserve_pages_and_size(fake: FakeSys) -> None:
    r = ha.reserve(100)
    assert r == ha.ReserveResult(M2, None, 512, 100, 100, str(fake.size_dir(2048) / "nr_hugepages"))
    assert _nr(fake) == 100
    assert r.changed
    assert r.shortfall == 0
    r = ha.reserve(size="1G")
    assert (r.previous, r.requested, r.got) == (100, 512, 512)
    r = ha.reserve(size="3M")  # rounded up to whole pages
    assert r.requested == 2
    r = ha.reserve(size="2G", page_size="1G")
    assert (r.page_size, r.got) == (G1, 2)
    assert _nr(fake, 1048576) == 2


def test_reserve_at_least_never_shrinks(fake: FakeSys) -> None:
    r = ha.reserve(10, at_least=True)
    assert (r.previous, r.got, r.changed) == (512, 512, False)
    assert _nr(fake) == 512
    assert ha.reserve(600, at_least=True).got == 600


def test_reserve_per_node(fake: FakeSys) -> None:
    r = ha.reserve(300, "2M", node=1)
    assert r.path == str(fake.size_dir(2048, 1) / "nr_hugepages")
    assert _nr(fake, 2048, 1) == 300
    assert _nr(fake, 2048, 0) == 256
    assert _nr(fake) == 512  # the global file is the kernel's job, untouched here


def test_reserve_shortfall(fake: FakeSys, monkeypatch: pytest.MonkeyPatch) -> None:
    def stingy_kernel(path: str, value: int) -> None:  # gives at most 600 pages
        Path(path).write_text(f"{min(value, 600)}\n")

    monkeypatch.setattr(ha, "_write_sysfs", stingy_kernel)
    with pytest.raises(HugepageReserveError) as ei:
        ha.reserve(1000)
    assert (ei.value.requested, ei.value.got) == (1000, 600)
    msg = str(ei.value)
    assert "only 600 of 1000 2048 kB hugepages" in msg
    assert "hugepages=1000" in msg
    assert isinstance(ei.value, HugepageConfigError)
    r = ha.reserve(2000, strict=False)
    assert (r.got, r.shortfall) == (600, 1400)


def test_reserve_errors(fake: FakeSys, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        HugepageConfigError, match=r"no 65536 kB hugepages.*valid page sizes: 2M, 1G"
    ):
        ha.reserve(1, "64M")
    with pytest.raises(HugepageConfigError, match="NUMA node 5"):
        ha.reserve(1, "2M", node=5)
    with pytest.raises(MemdValueError, match="exactly one"):
        ha.reserve()
    with pytest.raises(MemdValueError, match="exactly one"):
        ha.reserve(1, size="2M")
    with pytest.raises(MemdValueError, match="negative"):
        ha.reserve(-1)

    def denied(path: str, value: int) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ha, "_write_sysfs", denied)
    with pytest.raises(HugepageConfigError, match=r"permission denied.*run as root"):
        ha.reserve(1)


def test_clear(fake: FakeSys) -> None:
    results = ha.clear()
    assert [(r.page_size, r.previous, r.got) for r in results] == [(M2, 512, 0), (G1, 2, 0)]
    assert _nr(fake) == 0
    assert _nr(fake, 1048576) == 0


# --------------------------------------------------------------------------- mount


def test_mount_runs_mount_and_is_idempotent(
    fake: FakeSys, runs: list[list[str]], tmp_path: Path
) -> None:
    where = tmp_path / "new dir" / "huge1G"
    assert ha.mount(str(where), "1G") is True
    assert where.is_dir()
    assert runs == [["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "nodev", str(where)]]
    assert hi.discover().mount_for(G1).mount_point == str(where)
    assert ha.mount(str(where), "1G") is False  # already there
    assert len(runs) == 1
    with pytest.raises(HugepageConfigError, match="already has hugetlbfs for 1048576 kB"):
        ha.mount(str(where), "2M")
    ha.mount(str(tmp_path / "g"), "2M", options="gid=1001,mode=0770")
    assert runs[-1][4] == "pagesize=2M,gid=1001,mode=0770"


def test_mount_failure_reports_stderr(
    fake: FakeSys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        ha,
        "_run",
        lambda argv: subprocess.CompletedProcess(argv, 32, "", "mount: only root can do that"),
    )
    with pytest.raises(HugepageConfigError, match=r"only root can do that.*run as root"):
        ha.mount(str(tmp_path / "m"), "2M")


def test_unmount(fake: FakeSys, runs: list[list[str]], tmp_path: Path) -> None:
    assert ha.unmount(str(tmp_path / "not-mounted")) is False
    assert runs == []
    mnt = str(tmp_path / "mnt" / "huge2M")
    assert ha.unmount(mnt) is True
    assert runs == [["umount", mnt]]


# --------------------------------------------------------------------------- setup


@pytest.fixture
def kernel(fake: FakeSys, monkeypatch: pytest.MonkeyPatch) -> FakeSys:
    """A fake kernel: writing nr_hugepages moves free_hugepages along (up to 1000)."""

    def write(path: str, value: int) -> None:
        d = Path(path).parent
        old_nr = int((d / "nr_hugepages").read_text())
        got = min(value, 1000)
        free = int((d / "free_hugepages").read_text()) + got - old_nr
        (d / "nr_hugepages").write_text(f"{got}\n")
        (d / "free_hugepages").write_text(f"{max(free, 0)}\n")

    monkeypatch.setattr(ha, "_write_sysfs", write)
    monkeypatch.setattr(ha.os, "geteuid", lambda: 0)
    return fake


def test_setup_as_root_reserves_and_mounts(
    kernel: FakeSys, runs: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ha, "probe", lambda path, size: None)
    kernel.set_mounts()
    out: list[str] = []
    dev = tmp_path / "dev" / "hugepages"
    assert ha.setup(600, mount_dir=str(dev), out=out.append) is True
    assert _nr(kernel) == 512 + (600 - 490)  # grown by the shortfall only
    assert runs == [["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", str(dev)]]
    text = "\n".join(out)
    assert "nr_hugepages 512 -> 622" in text
    assert f"mounted hugetlbfs (pagesize=2M) at {dev}" in text
    assert "usable: 600" in text


def test_setup_enough_already_changes_nothing(
    kernel: FakeSys, runs: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ha, "probe", lambda path, size: None)
    out: list[str] = []
    assert ha.setup(100, out=out.append) is True
    assert _nr(kernel) == 512
    assert runs == []
    assert "nothing to reserve" in out[0]


def test_setup_shortfall_still_usable(
    kernel: FakeSys, runs: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ha, "probe", lambda path, size: None)
    out: list[str] = []
    assert ha.setup(5000, out=out.append) is True
    assert "SHORT by" in "\n".join(out)
    assert "fewer than the 5000 asked" in out[-1]


def test_setup_not_root_changes_nothing_and_fails_soft(
    kernel: FakeSys, runs: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ha.os, "geteuid", lambda: 1000)
    kernel.set_mounts()
    out: list[str] = []
    assert ha.setup(256, out=out.append) is False
    assert runs == []
    assert _nr(kernel) == 512
    text = "\n".join(out)
    assert "not root" in text
    assert "NOT usable" in text


def test_setup_probe_failure_is_unusable(kernel: FakeSys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ha, "probe", lambda path, size: "cannot map: no memory")
    out: list[str] = []
    assert ha.setup(1, out=out.append) is False
    assert "NOT usable: cannot map" in out[-1]


def test_setup_kernel_without_size(kernel: FakeSys) -> None:
    out: list[str] = []
    assert ha.setup(1, page_size="64K", out=out.append) is False
    assert "no 64 kB hugepages" in out[0]


def test_main_exit_codes(
    kernel: FakeSys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ha.os, "geteuid", lambda: 1000)
    kernel.set_mounts()
    assert ha.main(["--setup", "--pages", "10"]) == ha.EXIT_UNUSABLE
    assert ha.main(["--show", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rows[0] == {"page_size": M2, "node": 0, "total": 256, "free": 250, "mounts": []}
    assert ha.main(["--reserve", "64M", "--page-size", "64M"]) == 1
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        ha.main([])
    assert ei.value.code == 2


def test_probe_on_plain_directory(tmp_path: Path) -> None:
    assert ha.probe(str(tmp_path), 4096) is None
    assert os.listdir(tmp_path) == []
    assert "cannot create" in ha.probe(str(tmp_path / "missing"), 4096)


# --------------------------------------------------------------------------- real machine


def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo", encoding="ascii") as f:
        return {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in f)}


def test_real_show_matches_meminfo() -> None:
    if not os.path.isdir("/sys/kernel/mm/hugepages"):
        pytest.skip("kernel without hugepages")
    for _ in range(20):
        before = _meminfo()
        rows = ha.show()
        after = _meminfo()
        if all(before[k] == after[k] for k in ("HugePages_Total", "HugePages_Free")):
            break
        time.sleep(0.05)
    else:
        pytest.skip("hugepage counters kept changing")
    size = after["Hugepagesize"] * 1024
    mine = [r for r in rows if r.page_size == size]
    assert sum(r.total for r in mine) == after["HugePages_Total"]
    assert sum(r.free for r in mine) == after["HugePages_Free"]
    assert {r.mounts for r in mine} == {
        tuple(m.mount_point for m in hi.discover().mounts_for(size))
    }


def test_real_reserve_rewrites_current_value() -> None:
    """Non-destructive: write back what is there (other people share these pages)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    size = hi.default_page_size()
    if size is None:
        pytest.skip("kernel without hugepages")
    current = hi.page_size_info(size).nr_hugepages
    try:
        r = ha.reserve(current, size)
    except HugepageConfigError as exc:
        if "read-only" in str(exc) or "cannot write" in str(exc):
            pytest.skip(f"sysfs not writable here: {exc}")
        raise
    assert (r.previous, r.requested) == (current, current)
    assert r.got == current


def test_real_cli_show_and_unprivileged_setup() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "memd.hugepages_admin", "--show"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Size")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run as nobody")
    p = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "memd.hugepages_admin",
            "--setup",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    if "Permission denied" in p.stderr and "python" in p.stderr:
        pytest.skip("nobody cannot read the interpreter or the checkout")
    # as nobody nothing may change and nothing may crash: usable (0) or not (3)
    assert p.returncode in (0, ha.EXIT_UNUSABLE), p.stderr
    assert "Traceback" not in p.stderr
