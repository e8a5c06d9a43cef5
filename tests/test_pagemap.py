"""memd.hw.pagemap: fake pagemap/numa_maps files, then real anonymous and hugetlbfs pages."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from memd.hw import hugepage_info as hi
from memd.hw import pagemap as pm

P = pm.PAGE_SIZE


def _entry(pfn: int, present: bool = True, **flags: bool) -> int:
    raw = pfn & pm.PM_PFN_MASK
    if present:
        raw |= pm.PM_PRESENT
    for name, bit in (
        ("swapped", pm.PM_SWAPPED),
        ("shared", pm.PM_FILE_OR_SHARED),
        ("exclusive", pm.PM_EXCLUSIVE),
        ("soft_dirty", pm.PM_SOFT_DIRTY),
    ):
        if flags.get(name):
            raw |= bit
    return raw


@pytest.fixture
def fake_proc(tmp_path: Path) -> Iterator[Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    with hi.set_roots(proc=str(proc)):
        yield proc


def _write_pagemap(proc: Path, entries: dict[int, int], npages: int = 64) -> None:
    data = bytearray(npages * 8)
    for page, raw in entries.items():
        struct.pack_into("<Q", data, page * 8, raw)
    (proc / "self" / "pagemap").write_bytes(bytes(data))


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 21))
    return False


# --------------------------------------------------------------------------- fake pagemap


def test_decode_entry() -> None:
    e = pm.decode_entry(_entry(0x1234, soft_dirty=True, exclusive=True))
    assert (e.present, e.swapped, e.exclusive, e.soft_dirty, e.file_or_shared, e.pfn) == (
        True,
        False,
        True,
        True,
        False,
        0x1234,
    )
    assert pm.decode_entry(0).present is False
    swapped = pm.decode_entry(_entry(0x55, present=False, swapped=True))
    assert swapped.swapped
    assert swapped.pfn == 0  # a swap entry's low bits are not a PFN


def test_virt_to_phys_fake(fake_proc: Path) -> None:
    _write_pagemap(
        fake_proc, {1: _entry(0x1000), 2: _entry(0, present=True), 3: _entry(0x77, present=False)}
    )
    assert pm.virt_to_phys(1 * P) == 0x1000 * P
    assert pm.virt_to_phys(1 * P + 123) == 0x1000 * P + 123
    assert pm.virt_to_phys(2 * P) is None  # PFN hidden (no CAP_SYS_ADMIN)
    assert pm.virt_to_phys(3 * P) is None  # not present
    assert pm.virt_to_phys(0) is None  # zero entry
    assert pm.virt_to_phys(1000 * P) is None  # past the end of the file


def test_virt_to_phys_many_one_open_sorted_coalesced(
    fake_proc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_pagemap(fake_proc, {p: _entry(100 + p) for p in range(64)})
    reads: list[tuple[int, int]] = []
    opens: list[str] = []
    real_pread, real_open = os.pread, os.open

    def pread(fd: int, n: int, off: int) -> bytes:
        reads.append((n, off))
        return real_pread(fd, n, off)

    def open_(path: str, flags: int, *a: int) -> int:
        opens.append(path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(pm.os, "pread", pread)
    monkeypatch.setattr(pm.os, "open", open_)
    addrs = [9 * P + 5, 3 * P, 4 * P + 1, 3 * P + 8, 10 * P, 40 * P]
    got = pm.virt_to_phys_many(addrs)
    assert got == [(100 + a // P) * P + a % P for a in addrs]
    assert opens == [str(fake_proc / "self" / "pagemap")]
    assert reads == [(16, 3 * 8), (16, 9 * 8), (8, 40 * 8)]  # runs 3-4, 9-10, 40
    assert pm.virt_to_phys_many([]) == []


def test_bad_addresses_rejected(fake_proc: Path) -> None:
    _write_pagemap(fake_proc, {})
    for bad in (-1, 1 << 64, 1.5, True):
        with pytest.raises(ValueError, match="not a virtual address"):
            pm.virt_to_phys(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fake numa_maps


def test_numa_nodes_from_fake_numa_maps(fake_proc: Path) -> None:
    (fake_proc / "self" / "maps").write_text(
        "00400000-00600000 rw-s 00000000 00:2f 1 /dev/hugepages/rtemap_0\n"
        "7f0000000000-7f0000400000 rw-s 00000000 00:2f 2 /dev/hugepages/rtemap_1\n"
        "7f0000800000-7f0000801000 rw-p 00000000 00:00 0\n"
    )
    (fake_proc / "self" / "numa_maps").write_text(
        "00400000 default file=/dev/hugepages/rtemap_0 huge dirty=1 N1=1 "
        "kernelpagesize_kB=2048\n"
        "7f0000000000 bind:0-1 file=/dev/hugepages/rtemap_1 huge N0=1 N1=3 "
        "kernelpagesize_kB=2048\n"
        "7f0000800000 default anon=1 dirty=1 active=0 N0=1 kernelpagesize_kB=4\n"
        "not-a-line\n"
    )
    addrs = [0x400000, 0x5FFFFF, 0x600000, 0x7F0000100000, 0x7F0000800010, 0x10]
    # the /proc root is fake, so "auto" must not ask the kernel about our own pages
    for method in ("auto", "numa_maps"):
        assert pm.numa_nodes_of(addrs, method=method) == [1, 1, 0, 1, 0, 0]
    maps = pm.read_numa_maps()
    assert maps[1].pages_per_node == {0: 1, 1: 3}
    assert maps[1].end == 0x7F0000400000
    assert pm.NumaMapping(0, None, {}).node is None
    assert pm.NumaMapping(0, None, {0: 2, 1: 2}).node == 0  # tie → lower node


def test_numa_nodes_without_numa_maps_default_to_0(fake_proc: Path) -> None:
    assert pm.numa_nodes_of([0x1000, 0x2000]) == [0, 0]


# --------------------------------------------------------------------------- real pages


def test_buffer_address() -> None:
    with pytest.raises(TypeError):
        pm.buffer_address(b"read-only")
    ba = bytearray(16)
    assert pm.buffer_address(ba) == pm.buffer_address(memoryview(ba))
    m = mmap.mmap(-1, P)
    assert pm.buffer_address(m) % P == 0
    m.close()  # no export left behind


def test_iova_mode_matches_capability() -> None:
    assert pm.iova_mode_available() == _has_cap_sys_admin()


def test_real_anonymous_page() -> None:
    m = mmap.mmap(-1, 2 * P)
    try:
        a = pm.buffer_address(m)
        e = pm.read_entry(a + P)
        assert not e.present  # never touched
        m[0] = 1
        e = pm.read_entry(a)
        assert e.present
        if not _has_cap_sys_admin():
            assert pm.virt_to_phys(a) is None
            pytest.skip("no CAP_SYS_ADMIN: PFNs are hidden")
        phys = pm.virt_to_phys(a + 17)
        assert phys is not None
        assert phys != 0
        assert phys % P == 17
        assert pm.numa_nodes_of([a]) == pm.numa_nodes_of([a], method="numa_maps")
        assert pm.numa_nodes_of([a])[0] in hi.numa_nodes()
    finally:
        m.close()


def test_real_unmapped_address_is_node_0() -> None:
    assert pm.numa_nodes_of([4096]) == [0]
    assert pm.numa_nodes_of([4096], method="syscall") == [0]


@contextlib.contextmanager
def _huge_mapping(mount: str, size: int, pages: int) -> Iterator[mmap.mmap]:
    path = os.path.join(mount, f"memd_test_{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size * pages)
        m = mmap.mmap(fd, size * pages)
        try:
            yield m
        finally:
            m.close()
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.hugepages
def test_real_hugepage_physical_addresses(require_hugepages) -> None:
    env = require_hugepages
    env.need(2)
    if not _has_cap_sys_admin():
        pytest.skip("no CAP_SYS_ADMIN: PFNs are hidden")
    size = env.page_size
    with _huge_mapping(env.mount, size, 2) as m:
        m[0] = 1
        m[size] = 2
        a = pm.buffer_address(m)
        assert a % size == 0
        p0, p1, mid = pm.virt_to_phys_many([a, a + size, a + 4097])
        assert p0 and p1
        assert p0 % size == 0
        assert p1 % size == 0
        assert p0 != p1
        assert mid == p0 + 4097  # a hugepage is physically contiguous
        assert pm.virt_to_phys(a + size + size - 1) == p1 + size - 1
        nodes = pm.numa_nodes_of([a, a + size])
        assert set(nodes) <= set(hi.numa_nodes())
        assert pm.numa_nodes_of([a, a + size], method="numa_maps") == nodes
