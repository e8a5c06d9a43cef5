"""memd.hw.hugepage_info: discovery on fake /sys and /proc trees, then on this machine."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fake_sys import FakeSys, standard

from memd.errors import (
    HugepageConfigError,
    MalformedFileError,
    MemdError,
    MemdValueError,
)
from memd.hw import hugepage_info as hi

M2 = 2 * 1024 * 1024
G1 = 1024 * 1024 * 1024


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeSys]:
    fs = standard(tmp_path)
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        yield fs


# --------------------------------------------------------------------------- roots


def test_set_roots_function_and_context_manager(tmp_path: Path) -> None:
    before = hi.roots()
    with hi.set_roots(sys="/x/sys"):
        assert hi.roots() == ("/x/sys", before[1])
        assert hi.sys_path("kernel", "mm") == "/x/sys/kernel/mm"
        with hi.set_roots(proc="/y/proc"):
            assert hi.proc_path("meminfo") == "/y/proc/meminfo"
        assert hi.roots() == ("/x/sys", before[1])
    assert hi.roots() == before
    restore = hi.set_roots(sys=tmp_path)  # plain call takes effect at once
    try:
        assert str(tmp_path) == hi.SYS_ROOT
    finally:
        restore.__exit__(None, None, None)
    assert hi.roots() == before


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2M", M2),
        ("2m", M2),
        ("2MB", M2),
        ("2MiB", M2),
        ("1G", G1),
        ("1g", G1),
        ("512M", 512 * 1024 * 1024),
        ("2048kB", M2),
        ("2048k", M2),
        ("2048 kB", M2),
        ("4096", 4096),
        ("0", 0),
        (M2, M2),
        (" 1G ", G1),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert hi.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "M", "2X", "-2M", "2.5M", "1 G B", "two", -1, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(MemdValueError) as ei:
        hi.parse_size(bad)  # type: ignore[arg-type]
    assert isinstance(ei.value, ValueError)


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trips(n: int) -> None:
    assert hi.parse_size(hi.format_size(n)) == n


def test_format_size_spellings() -> None:
    assert hi.format_size(M2) == "2M"
    assert hi.format_size(G1) == "1G"
    assert hi.format_size(64 * 1024) == "64K"
    assert hi.kb(M2) == "2048 kB"


# --------------------------------------------------------------------------- discovery


def test_discover_two_sizes_two_nodes(fake: FakeSys) -> None:
    info = hi.discover()
    assert list(info.sizes) == [M2, G1]
    s2 = info.sizes[M2]
    assert (s2.nr_hugepages, s2.free_hugepages, s2.resv_hugepages, s2.surplus_hugepages) == (
        512,
        500,
        10,
        0,
    )
    assert s2.available == 490  # free - resv, as DPDK's get_num_hugepages
    assert s2.path == str(fake.size_dir(2048))
    assert info.sizes[G1].nr_hugepages == 2
    assert info.nodes == (0, 1)
    assert info.node_pages(M2, 1) == hi.NodePages(1, M2, 256, 250, 0, str(fake.size_dir(2048, 1)))
    assert info.node_pages(G1, 0).free_hugepages == 1
    assert info.default_page_size == M2
    assert [m.page_size for m in info.mounts] == [M2]
    assert info.usable_sizes == [M2]
    d = info.as_dict()
    assert d["sizes"][0]["available"] == 490
    assert {(n["node"], n["page_size"]) for n in d["per_node"]} == {
        (0, M2),
        (1, M2),
        (0, G1),
        (1, G1),
    }


def test_available_counts_unused_overcommit(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    fs.add_size(2048, nr=4, free=4, resv=6, surplus=1, overcommit=10)
    fs.set_meminfo()
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        s = hi.discover().sizes[M2]
    assert s.available == 0 + 9  # free < resv gives 0; overcommit 10 - surplus 1


def test_mount_with_pagesize_1g_and_default_size(fake: FakeSys, tmp_path: Path) -> None:
    g = tmp_path / "mnt" / "huge1G"
    d = tmp_path / "mnt" / "hugedef"
    g.mkdir()
    d.mkdir()
    fake.add_mount(fake.hugetlbfs(g, "1G"))
    fake.add_mount(fake.hugetlbfs(d, None))  # no pagesize=: the default (2M) applies
    info = hi.discover()
    by_point = {m.mount_point: m for m in info.mounts}
    assert by_point[str(g)].page_size == G1
    assert by_point[str(g)].explicit_size
    assert by_point[str(d)].page_size == M2
    assert not by_point[str(d)].explicit_size
    assert info.mount_for(G1).mount_point == str(g)
    assert info.mount_for(M2).mount_point == str(tmp_path / "mnt" / "huge2M")  # first wins
    assert hi.resolve_huge_dir(page_size="1G", info=info) == hi.HugeDir(str(g), str(g), G1)
    assert info.usable_sizes == [M2, G1]


def test_mount_path_with_space(fake: FakeSys, tmp_path: Path) -> None:
    spaced = tmp_path / "huge pages" / "dir\twith tab"
    spaced.mkdir(parents=True)
    fake.set_mounts(fake.hugetlbfs(spaced, "2M"))
    assert "\\040" in (fake.proc / "mounts").read_text()
    info = hi.discover()
    assert [m.mount_point for m in info.mounts] == [str(spaced)]
    assert hi.resolve_huge_dir(str(spaced), info=info).path == str(spaced)
    assert hi.unescape_mount_field(r"a\040b\134c\012d") == "a b\\c\nd"


def test_later_mount_hides_earlier(fake: FakeSys, tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    fake.set_mounts(fake.hugetlbfs(a, "2M"), fake.hugetlbfs(a, "1G"))
    assert [(m.mount_point, m.page_size) for m in hi.discover().mounts] == [(str(a), G1)]
    fake.add_mount(f"tmpfs {a} tmpfs rw 0 0")  # tmpfs on top: no hugetlbfs visible
    assert hi.discover().mounts == ()


# --------------------------------------------------------------------------- resolve_huge_dir


def test_resolve_default(fake: FakeSys, tmp_path: Path) -> None:
    mnt = str(tmp_path / "mnt" / "huge2M")
    assert hi.resolve_huge_dir() == hi.HugeDir(mnt, mnt, M2)
    assert hi.resolve_huge_dir(None, "2M") == hi.HugeDir(mnt, mnt, M2)
    assert hi.resolve_huge_dir(mnt) == hi.HugeDir(mnt, mnt, M2)


def test_resolve_directory_inside_mount_innermost_wins(fake: FakeSys, tmp_path: Path) -> None:
    outer = tmp_path / "mnt" / "huge2M"
    inner = outer / "sub" / "g"
    deep = inner / "x"
    deep.mkdir(parents=True)
    assert hi.resolve_huge_dir(str(outer / "sub")) == hi.HugeDir(str(outer / "sub"), str(outer), M2)
    fake.add_mount(fake.hugetlbfs(inner, "1G"))
    assert hi.resolve_huge_dir(str(deep)) == hi.HugeDir(str(deep), str(inner), G1)
    # a sibling whose name merely starts like the mount is not inside it
    sibling = tmp_path / "mnt" / "huge2Mx"
    sibling.mkdir()
    with pytest.raises(HugepageConfigError, match="not on a hugetlbfs mount"):
        hi.resolve_huge_dir(str(sibling))


def test_resolve_no_mount_says_how_to_mount(fake: FakeSys) -> None:
    fake.set_mounts()
    with pytest.raises(HugepageConfigError) as ei:
        hi.resolve_huge_dir()
    msg = str(ei.value)
    assert "no hugetlbfs mount for 2048 kB pages" in msg
    assert "mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages" in msg
    assert "--no-huge" in msg
    assert isinstance(ei.value, MemdError)
    assert isinstance(ei.value, RuntimeError)


def test_resolve_no_1g_mount_does_not_suggest_shadowing(fake: FakeSys) -> None:
    fake.set_mounts(fake.hugetlbfs("/dev/hugepages", "2M"))
    with pytest.raises(HugepageConfigError, match=r"pagesize=1G nodev /dev/hugepages-1G"):
        hi.resolve_huge_dir(page_size=G1)


def test_resolve_errors(fake: FakeSys, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(HugepageConfigError, match="not on a hugetlbfs mount") as ei:
        hi.resolve_huge_dir(str(plain))
    assert "mount -t hugetlbfs -o pagesize=2M nodev" in str(ei.value)
    assert ei.value.path == str(plain)
    with pytest.raises(HugepageConfigError, match="does not exist") as ei:
        hi.resolve_huge_dir(str(tmp_path / "nope"))
    assert "mkdir -p" in str(ei.value)
    mnt = str(tmp_path / "mnt" / "huge2M")
    with pytest.raises(HugepageConfigError, match=r"for 2048 kB pages.*not 1048576 kB"):
        hi.resolve_huge_dir(mnt, "1G")
    with pytest.raises(HugepageConfigError, match=r"no 65536 kB hugepages.*2M, 1G"):
        hi.resolve_huge_dir(page_size="64M")


def test_resolve_without_default_size(fake: FakeSys) -> None:
    fake.set_meminfo(default_kb=None)
    fake.set_mounts()
    with pytest.raises(HugepageConfigError, match=r"no default hugepage size.*--no-huge"):
        hi.resolve_huge_dir()


# --------------------------------------------------------------------------- require_free_pages


def test_require_free_pages(fake: FakeSys) -> None:
    assert hi.require_free_pages("2M", 10) == 490
    assert hi.require_free_pages(M2, 1, node=1) == 250
    with pytest.raises(HugepageConfigError) as ei:
        hi.require_free_pages("2M", 491)
    assert "only 490 free 2048 kB hugepages (need 491)" in str(ei.value)
    assert f"echo 513 > {fake.size_dir(2048)}/nr_hugepages" in str(ei.value)
    with pytest.raises(HugepageConfigError, match=r"node 1.*node1/hugepages/hugepages-2048kB"):
        hi.require_free_pages("2M", 300, node=1)
    with pytest.raises(HugepageConfigError, match="NUMA node 7"):
        hi.require_free_pages("2M", node=7)


def test_require_free_pages_none_free(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    fs.add_size(2048, nr=0)
    fs.set_meminfo()
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        with pytest.raises(HugepageConfigError) as ei:
            hi.require_free_pages("2M")
        assert str(ei.value) == (
            "no free 2048 kB hugepages (need 1): echo 512 > "
            f"{fs.size_dir(2048)}/nr_hugepages (or run memd --no-huge)"
        )
        with pytest.raises(HugepageConfigError, match="no 1048576 kB hugepages"):
            hi.require_free_pages("1G")


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("content", ["abc\n", "", "\n", "-1\n", "12 34\n", "0x10\n", "\u0663\n"])
def test_malformed_counter_names_the_file(fake: FakeSys, content: str) -> None:
    path = fake.size_dir(2048) / "nr_hugepages"
    path.write_text(content)
    with pytest.raises(MalformedFileError) as ei:
        hi.discover()
    assert ei.value.path == str(path)
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, HugepageConfigError)


def test_malformed_optional_and_per_node_counters_are_errors_too(fake: FakeSys) -> None:
    (fake.size_dir(2048) / "resv_hugepages").write_text("x\n")
    with pytest.raises(MalformedFileError, match="resv_hugepages"):
        hi.discover()
    (fake.size_dir(2048) / "resv_hugepages").write_text("0\n")
    (fake.size_dir(1048576, 1) / "free_hugepages").write_text("\n")
    with pytest.raises(MalformedFileError, match="node1/hugepages/hugepages-1048576kB/free"):
        hi.discover()


def test_missing_required_counter_names_the_file(fake: FakeSys) -> None:
    (fake.size_dir(2048) / "free_hugepages").unlink()
    with pytest.raises(HugepageConfigError, match="hugepages-2048kB/free_hugepages is missing"):
        hi.discover()


def test_missing_optional_counters_read_as_zero(fake: FakeSys) -> None:
    for name in ("resv_hugepages", "surplus_hugepages", "nr_overcommit_hugepages"):
        (fake.size_dir(2048) / name).unlink()
    s = hi.discover().sizes[M2]
    assert (s.resv_hugepages, s.surplus_hugepages, s.nr_overcommit_hugepages) == (0, 0, 0)
    assert s.available == 500


def test_skipped_entries(fake: FakeSys) -> None:
    base = fake.sys / "kernel/mm/hugepages"
    (base / "hugepages-foo").mkdir()
    (base / "README").write_text("x")
    (base / "hugepages-64kB").mkdir(parents=True)  # listed by name but empty: an error
    with pytest.raises(HugepageConfigError, match="hugepages-64kB/nr_hugepages"):
        hi.discover()
    (base / "hugepages-64kB").rmdir()
    fake.add_node(2)  # a node without a hugepages dir: no per-node entries
    fake.set_online("0-2\n")
    (fake.size_dir(1048576, 1) / "nr_hugepages").unlink()  # incomplete per-node dir
    info = hi.discover()
    assert list(info.sizes) == [M2, G1]
    assert info.nodes == (0, 1, 2)
    assert set(info.per_node[M2]) == {0, 1}
    assert set(info.per_node[G1]) == {0}


def test_nodes_from_online_dirs_or_default(fake: FakeSys) -> None:
    fake.set_online("0,2-3,5\n")
    assert hi.numa_nodes() == [0, 2, 3, 5]
    fake.set_online("zero\n")
    with pytest.raises(MalformedFileError, match="online"):
        hi.numa_nodes()
    (fake.sys / "devices/system/node/online").unlink()
    assert hi.numa_nodes() == [0, 1]  # from the node<N> directories
    fake.set_online("\n")
    assert hi.numa_nodes() == [0, 1]


def test_machine_without_numa_dirs_is_node_0(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    fs.add_size(2048, nr=8)
    fs.set_meminfo()
    fs.set_mounts()
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        info = hi.discover()
    assert info.nodes == (0,)
    assert info.per_node == {M2: {}}


def test_kernel_without_hugepages(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    fs.set_meminfo(default_kb=None)
    fs.set_mounts()
    with hi.set_roots(sys=str(fs.sys), proc=str(fs.proc)):
        info = hi.discover()
        assert info.sizes == {}
        assert info.default_page_size is None
        with pytest.raises(HugepageConfigError, match="--no-huge"):
            hi.resolve_huge_dir(info=info)


def test_mounts_short_lines_skipped_bad_pagesize_rejected(fake: FakeSys, tmp_path: Path) -> None:
    good = tmp_path / "mnt" / "huge2M"
    fake.set_mounts("garbage", "", "a b c", fake.hugetlbfs(good, "2M"))
    assert [m.mount_point for m in hi.discover().mounts] == [str(good)]
    fake.add_mount(fake.hugetlbfs(tmp_path / "bad", "lots"))
    with pytest.raises(MalformedFileError, match="pagesize=lots"):
        hi.discover()


def test_mount_without_pagesize_needs_default(fake: FakeSys, tmp_path: Path) -> None:
    fake.set_meminfo(default_kb=None)
    fake.set_mounts(fake.hugetlbfs(tmp_path / "m", None))
    with pytest.raises(HugepageConfigError, match=r"without pagesize=.*meminfo"):
        hi.discover()


def test_malformed_meminfo_line(fake: FakeSys) -> None:
    (fake.proc / "meminfo").write_text("HugePages_Total: lots\nHugepagesize: 2048 kB\n")
    with pytest.raises(MalformedFileError, match=r"meminfo.*HugePages_Total"):
        hi.discover()


# --------------------------------------------------------------------------- locking


def test_lock_huge_dir_exclusive_and_shared(tmp_path: Path) -> None:
    fd = hi.lock_huge_dir(str(tmp_path))
    try:
        with pytest.raises(HugepageConfigError, match="locked by another memd primary"):
            hi.lock_huge_dir(str(tmp_path), timeout=0.05)
        hi.relock_huge_dir(fd, str(tmp_path), exclusive=False)
        with hi.locked_huge_dir(str(tmp_path), exclusive=False):
            pass
        with pytest.raises(HugepageConfigError):
            hi.lock_huge_dir(str(tmp_path))  # shared holder blocks a new exclusive
    finally:
        os.close(fd)
    with hi.locked_huge_dir(str(tmp_path)):
        pass


# --------------------------------------------------------------------------- real machine


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def _hugepage_lines(mi: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in mi.items() if k.startswith("HugePages_") or k == "Hugepagesize"}


def _stable(tries: int = 20) -> tuple[hi.HugepageInfo, dict[str, int]]:
    """discover() and /proc/meminfo read while nobody else changed the pools."""
    for _ in range(tries):
        before = _meminfo()
        info = hi.discover()
        after = _meminfo()
        if _hugepage_lines(before) == _hugepage_lines(after):
            return info, after
        time.sleep(0.05)
    pytest.skip("hugepage counters kept changing (other users on this machine)")


def test_real_discovery_matches_meminfo() -> None:
    if not os.path.isdir("/sys/kernel/mm/hugepages"):
        pytest.skip("kernel without hugepages")
    info, mi = _stable()
    assert info.default_page_size == mi["Hugepagesize"] * 1024
    s = info.sizes[info.default_page_size]
    assert s.nr_hugepages == mi["HugePages_Total"]
    assert s.free_hugepages == mi["HugePages_Free"]
    assert s.resv_hugepages == mi["HugePages_Rsvd"]
    assert s.surplus_hugepages == mi["HugePages_Surp"]
    # Hugetlb: is the memory of all sizes together
    assert sum(x.nr_hugepages * x.page_size for x in info.sizes.values()) <= mi["Hugetlb"] * 1024
    per_node = info.per_node[info.default_page_size]
    if per_node:
        assert sum(n.nr_hugepages for n in per_node.values()) == s.nr_hugepages
    assert set(per_node) <= set(info.nodes)


def test_real_mounts_match_proc_mounts() -> None:
    expected = []
    default_kb = _meminfo().get("Hugepagesize")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    with open("/proc/mounts", encoding="utf-8") as f:
        lines = f.read().splitlines()
    visible: dict[str, str] = {}
    for line in lines:
        _dev, mnt, fstype, opts, *_ = line.split()
        mnt = mnt.replace("\\040", " ")
        visible.pop(mnt, None)
        visible[mnt] = fstype + " " + opts
    for mnt, rest in visible.items():
        fstype, opts = rest.split(" ")
        if fstype == "hugetlbfs":
            m = re.search(r"pagesize=(\d+)([KMG])", opts)
            size = int(m.group(1)) * units[m.group(2)] if m else default_kb * 1024
            expected.append((mnt, size))
    got = [(m.mount_point, m.page_size) for m in hi.discover().mounts]
    assert got == expected


def test_real_nodes_match_sysfs() -> None:
    node_dirs = (
        sorted(
            int(n[4:])
            for n in os.listdir("/sys/devices/system/node")
            if re.fullmatch(r"node\d+", n)
        )
        if os.path.isdir("/sys/devices/system/node")
        else [0]
    )
    assert set(hi.numa_nodes()) >= set(node_dirs or [0])


@pytest.mark.hugepages
def test_real_resolve_and_require(require_hugepages) -> None:
    hd = hi.resolve_huge_dir()
    assert hd.page_size == require_hugepages.page_size
    assert os.path.isdir(hd.path)
    assert hi.require_free_pages(hd.page_size, 1) >= 1
