"""Fake /sys and /proc trees for the hugepage discovery and admin tests."""

from __future__ import annotations

import os
from pathlib import Path


class FakeSys:
    """Builds ``<tmp>/sys`` and ``<tmp>/proc`` the way the kernel lays them out."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sys = base / "sys"
        self.proc = base / "proc"
        self.sys.mkdir(parents=True, exist_ok=True)
        (self.proc / "self").mkdir(parents=True, exist_ok=True)

    # -- /sys ------------------------------------------------------------------
    def size_dir(self, size_kb: int, node: int | None = None) -> Path:
        if node is None:
            return self.sys / "kernel/mm/hugepages" / f"hugepages-{size_kb}kB"
        return (
            self.sys
            / "devices/system/node"
            / f"node{node}"
            / "hugepages"
            / f"hugepages-{size_kb}kB"
        )

    def add_size(
        self,
        size_kb: int,
        nr: int = 0,
        *,
        free: int | None = None,
        resv: int = 0,
        surplus: int = 0,
        overcommit: int = 0,
    ) -> Path:
        d = self.size_dir(size_kb)
        d.mkdir(parents=True, exist_ok=True)
        for name, val in (
            ("nr_hugepages", nr),
            ("free_hugepages", nr if free is None else free),
            ("resv_hugepages", resv),
            ("surplus_hugepages", surplus),
            ("nr_overcommit_hugepages", overcommit),
        ):
            (d / name).write_text(f"{val}\n")
        return d

    def add_node(self, node: int, sizes: dict[int, tuple[int, int]] | None = None) -> Path:
        """A node directory; ``sizes`` maps kB → (nr, free) for its hugepages dir."""
        nd = self.sys / "devices/system/node" / f"node{node}"
        nd.mkdir(parents=True, exist_ok=True)
        for size_kb, (nr, free) in (sizes or {}).items():
            d = self.size_dir(size_kb, node)
            d.mkdir(parents=True, exist_ok=True)
            (d / "nr_hugepages").write_text(f"{nr}\n")
            (d / "free_hugepages").write_text(f"{free}\n")
            (d / "surplus_hugepages").write_text("0\n")
        return nd

    def set_online(self, text: str) -> None:
        p = self.sys / "devices/system/node/online"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    # -- /proc -----------------------------------------------------------------
    def set_meminfo(self, default_kb: int | None = 2048, total: int = 0, free: int = 0) -> None:
        lines = [
            "MemTotal:       16000000 kB",
            "MemFree:         8000000 kB",
            f"HugePages_Total: {total:7d}",
            f"HugePages_Free:  {free:7d}",
            "HugePages_Rsvd:        0",
            "HugePages_Surp:        0",
        ]
        if default_kb is not None:
            lines.append(f"Hugepagesize:    {default_kb:7d} kB")
        (self.proc / "meminfo").write_text("\n".join(lines) + "\n")

    def set_mounts(self, *lines: str) -> None:
        base = [
            "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
            "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
        ]
        (self.proc / "mounts").write_text("\n".join([*base, *lines]) + "\n")

    def add_mount(self, line: str) -> None:
        with open(self.proc / "mounts", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def hugetlbfs(self, path: str | os.PathLike[str], pagesize: str | None = "2M") -> str:
        """A /proc/mounts line for hugetlbfs at `path` (spaces escaped as the kernel does)."""
        esc = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        opts = "rw,relatime" + (f",pagesize={pagesize}" if pagesize else "")
        return f"nodev {esc} hugetlbfs {opts} 0 0"


def standard(base: Path) -> FakeSys:
    """Two page sizes (2M: 512 reserved, 1G: 2), two nodes, 2M mounted, 1G not."""
    fs = FakeSys(base)
    fs.add_size(2048, nr=512, free=500, resv=10, surplus=0)
    fs.add_size(1048576, nr=2, free=2)
    fs.add_node(0, {2048: (256, 250), 1048576: (1, 1)})
    fs.add_node(1, {2048: (256, 250), 1048576: (1, 1)})
    fs.set_online("0-1\n")
    fs.set_meminfo(2048, total=512, free=500)
    mnt = base / "mnt" / "huge2M"
    mnt.mkdir(parents=True)
    fs.set_mounts(fs.hugetlbfs(mnt, "2M"))
    return fs
