"""Physical addresses and NUMA nodes of mapped pages (DPDK ``rte_mem_virt2phy``).

``/proc/self/pagemap`` holds one little-endian 64-bit entry per base page of the
process's address space: bit 63 *present*, bit 62 *swapped*, bit 61 *file page or
shared anonymous*, bit 56 *exclusively mapped*, bit 55 *soft-dirty*, bits 0-54 the
page frame number (PFN). Since Linux 4.0 the PFN reads as 0 without
``CAP_SYS_ADMIN``, which is how DPDK decides IOVA-as-VA mode; here such an entry
gives ``None``. A page must be touched (faulted in) to be present.

NUMA nodes come from the ``get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`` system call
(exact, per page) when the /proc root is the real one, else from
``/proc/self/numa_maps`` (per mapping: the node holding most of its pages).

Paths go through :func:`memd.hw.hugepage_info.proc_path`, so ``set_roots(proc=...)``
points this module at a fake ``self/pagemap``, ``self/numa_maps`` and ``self/maps``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from memd.hw import hugepage_info
from memd.hw.hugepage_info import proc_path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
ENTRY_SIZE = 8

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
PM_EXCLUSIVE = 1 << 56
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1

MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1

# get_mempolicy(2) has no glibc wrapper (it lives in libnuma): call it by number.
_GET_MEMPOLICY_NR = {
    "x86_64": 239,
    "aarch64": 236,
    "riscv64": 236,
    "ppc64le": 260,
    "ppc64": 260,
    "s390x": 269,
    "i386": 275,
    "i686": 275,
}

NumaMethod = Literal["auto", "syscall", "numa_maps"]


class PagemapEntry(NamedTuple):
    """One decoded pagemap entry."""

    raw: int
    present: bool
    swapped: bool
    file_or_shared: bool
    exclusive: bool
    soft_dirty: bool
    pfn: int  #: 0 when not present or when the reader lacks CAP_SYS_ADMIN


def decode_entry(raw: int) -> PagemapEntry:
    """Split a raw 64-bit pagemap entry into its flags and PFN."""
    present = bool(raw & PM_PRESENT)
    return PagemapEntry(
        raw=raw,
        present=present,
        swapped=bool(raw & PM_SWAPPED),
        file_or_shared=bool(raw & PM_FILE_OR_SHARED),
        exclusive=bool(raw & PM_EXCLUSIVE),
        soft_dirty=bool(raw & PM_SOFT_DIRTY),
        pfn=(raw & PM_PFN_MASK) if present else 0,
    )


def pagemap_path() -> str:
    """``<PROC_ROOT>/self/pagemap``."""
    return proc_path("self", "pagemap")


def _check_addr(addr: int) -> int:
    if not isinstance(addr, int) or isinstance(addr, bool) or addr < 0 or addr >= 1 << 64:
        raise ValueError(f"not a virtual address: {addr!r}")
    return addr


def read_entries(addrs: Iterable[int]) -> list[PagemapEntry]:
    """Pagemap entries for many addresses, in input order.

    One open; the distinct pages are sorted and each run of consecutive pages is
    read with one ``pread``. Entries past the end of the file read as not present.
    Raises ``OSError`` if the pagemap cannot be opened (e.g. no /proc).
    """
    addr_list = [_check_addr(a) for a in addrs]
    pages = sorted({a // PAGE_SIZE for a in addr_list})
    raw: dict[int, int] = {}
    if pages:
        fd = os.open(pagemap_path(), os.O_RDONLY | os.O_CLOEXEC)
        try:
            i = 0
            while i < len(pages):
                j = i
                while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
                    j += 1
                count = j - i + 1
                data = os.pread(fd, count * ENTRY_SIZE, pages[i] * ENTRY_SIZE)
                got = len(data) // ENTRY_SIZE
                values = struct.unpack(f"<{got}Q", data[: got * ENTRY_SIZE])
                for k in range(count):
                    raw[pages[i] + k] = values[k] if k < got else 0
                i = j + 1
        finally:
            os.close(fd)
    return [decode_entry(raw[a // PAGE_SIZE]) for a in addr_list]


def read_entry(addr: int) -> PagemapEntry:
    """The pagemap entry of the page holding ``addr``."""
    return read_entries([addr])[0]


def _phys(addr: int, entry: PagemapEntry) -> int | None:
    if not entry.present or entry.pfn == 0:
        return None
    return entry.pfn * PAGE_SIZE + addr % PAGE_SIZE


def virt_to_phys(addr: int) -> int | None:
    """Physical address of ``addr``; None when the page is not present (not touched,
    swapped) or the PFN is hidden (no CAP_SYS_ADMIN). DPDK: ``rte_mem_virt2phy``."""
    return _phys(addr, read_entry(addr))


def virt_to_phys_many(addrs: Iterable[int]) -> list[int | None]:
    """:func:`virt_to_phys` for many addresses with one open and sorted reads."""
    addr_list = list(addrs)
    return [_phys(a, e) for a, e in zip(addr_list, read_entries(addr_list), strict=True)]


def buffer_address(buf: object) -> int:
    """Start address of a writable buffer (``mmap``, ``bytearray``, ``memoryview``).

    The temporary export is released before returning, so an ``mmap`` can still be
    closed afterwards. Raises ``TypeError`` for a read-only buffer.
    """
    mv = memoryview(buf)  # type: ignore[arg-type]
    try:
        if mv.readonly:
            raise TypeError("buffer_address needs a writable buffer")
        if mv.nbytes == 0:
            raise ValueError("buffer_address needs a non-empty buffer")
        holder = (ctypes.c_char * 1).from_buffer(mv.cast("B"))
        addr = ctypes.addressof(holder)
        del holder
        return addr
    finally:
        mv.release()


def iova_mode_available() -> bool:
    """Whether real physical addresses can be read (root / CAP_SYS_ADMIN): touches an
    anonymous page and asks the pagemap for it, as DPDK's ``rte_eal_using_phys_addrs``.
    False means DPDK would pick IOVA-as-VA."""
    m = mmap.mmap(-1, PAGE_SIZE)
    try:
        m[0] = 1
        try:
            return virt_to_phys(buffer_address(m)) is not None
        except OSError:
            return False
    finally:
        m.close()


# --------------------------------------------------------------------------- NUMA


def _syscall_usable() -> bool:
    return (
        os.path.realpath(hugepage_info.roots()[1]) == "/proc"
        and platform.machine() in _GET_MEMPOLICY_NR
    )


_libc: ctypes.CDLL | None = None


def _get_mempolicy_node(addr: int) -> int | None:
    """Node of the page at ``addr`` by get_mempolicy(2); None on EFAULT (unmapped).

    Faults the page in for reading if it is not yet (the kernel does so to find it).
    Raises ``OSError`` for any other failure (ENOSYS, EPERM under seccomp, ...).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    mode = ctypes.c_int(-1)
    rc = _libc.syscall(
        ctypes.c_long(_GET_MEMPOLICY_NR[platform.machine()]),
        ctypes.byref(mode),
        None,
        ctypes.c_ulong(0),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR),
    )
    if rc != 0:
        err = ctypes.get_errno()
        if err == 14:  # EFAULT: nothing mapped there
            return None
        raise OSError(err, f"{os.strerror(err)} (from get_mempolicy)")
    return mode.value


class NumaMapping(NamedTuple):
    """One line of numa_maps: a mapping's start, end (from maps, if known) and pages
    per node."""

    start: int
    end: int | None
    pages_per_node: dict[int, int]

    @property
    def node(self) -> int | None:
        """The node holding most of the mapping's pages (None if it has none yet)."""
        if not self.pages_per_node:
            return None
        return max(self.pages_per_node.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def read_numa_maps() -> list[NumaMapping]:
    """Mappings of ``<PROC_ROOT>/self/numa_maps`` sorted by start, ends from ``maps``.

    Lines that do not start with a hex address are skipped; a missing file gives []."""
    ends: dict[int, int] = {}
    try:
        with open(proc_path("self", "maps"), encoding="ascii", errors="replace") as f:
            for line in f:
                lo, sep, rest = line.partition("-")
                hi = rest.split(" ", 1)[0]
                try:
                    ends[int(lo, 16)] = int(hi, 16)
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    out = []
    try:
        with open(proc_path("self", "numa_maps"), encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                try:
                    start = int(fields[0], 16)
                except ValueError:
                    continue
                per_node = {}
                for tok in fields[1:]:
                    key, sep, val = tok.partition("=")
                    if sep and key[:1] == "N" and key[1:].isdigit() and val.isdigit():
                        per_node[int(key[1:])] = int(val)
                out.append(NumaMapping(start, ends.get(start), per_node))
    except FileNotFoundError:
        return []
    out.sort(key=lambda m: m.start)
    return out


def _node_from_maps(addr: int, maps: Sequence[NumaMapping]) -> int | None:
    lo, hi = 0, len(maps)
    while lo < hi:  # last mapping with start <= addr
        mid = (lo + hi) // 2
        if maps[mid].start <= addr:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return None
    m = maps[lo - 1]
    if m.end is not None and addr >= m.end:
        return None
    return m.node


def numa_nodes_of(addrs: Iterable[int], *, method: NumaMethod = "auto") -> list[int]:
    """The NUMA node of each address, in input order; 0 when it cannot be told.

    ``method``: ``"syscall"`` (get_mempolicy, per page; faults untouched pages in),
    ``"numa_maps"`` (per mapping), or ``"auto"``: the syscall when the /proc root is the
    real ``/proc`` and it works, numa_maps for the addresses it cannot answer.
    """
    addr_list = [_check_addr(a) for a in addrs]
    result: list[int | None] = [None] * len(addr_list)
    use_syscall = method == "syscall" or (method == "auto" and _syscall_usable())
    if use_syscall:
        try:
            for i, a in enumerate(addr_list):
                result[i] = _get_mempolicy_node(a)
        except (OSError, KeyError, AttributeError):
            if method == "syscall":
                raise
    if any(r is None for r in result) and method != "syscall":
        maps = read_numa_maps()
        for i, a in enumerate(addr_list):
            if result[i] is None:
                result[i] = _node_from_maps(a, maps)
    return [0 if r is None else r for r in result]
