"""Show, reserve and mount hugepages: ``memctl hugepages`` and ``make run``/CI setup.

The counterpart of DPDK's ``usertools/dpdk-hugepages.py``. Reads go through
:mod:`memd.hw.hugepage_info` (so the fake /sys trees of the tests apply to writes too:
``nr_hugepages`` under the current ``SYS_ROOT``); writes are checked by reading the
value back, because the kernel may give fewer pages than asked.

Command line (exit 0 success, 1 error, 2 usage; ``--setup`` exits 3 when hugepages
are not usable afterwards, so callers fall back to ``--no-huge``)::

    python -m memd.hugepages_admin --setup [--pages 256] [--dir /dev/hugepages]
    python -m memd.hugepages_admin --show [--json]
    python -m memd.hugepages_admin --reserve 1G [--page-size 2M] [--node 0]
    python -m memd.hugepages_admin --mount /dev/hugepages [--page-size 2M]
    python -m memd.hugepages_admin --unmount /mnt/huge
    python -m memd.hugepages_admin --clear
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from memd.errors import HugepageConfigError, HugepageReserveError, MemdError, MemdValueError
from memd.hw.hugepage_info import (
    HugepageInfo,
    discover,
    format_size,
    hugetlbfs_mounts,
    kb,
    parse_size,
    read_int,
    size_sysfs_dir,
)

__all__ = [
    "EXIT_UNUSABLE",
    "HugepageRow",
    "ReserveResult",
    "clear",
    "format_rows",
    "main",
    "mount",
    "parse_size",
    "probe",
    "reserve",
    "setup",
    "show",
    "unmount",
]

EXIT_UNUSABLE = 3
DEFAULT_SETUP_PAGES = 256


class HugepageRow(NamedTuple):
    """One line of :func:`show`: a page size on a node (``node`` None: no per-node data)."""

    page_size: int
    node: int | None
    total: int
    free: int
    mounts: tuple[str, ...]


class ReserveResult(NamedTuple):
    """What :func:`reserve` asked for and what the kernel gave (pages)."""

    page_size: int
    node: int | None
    previous: int
    requested: int
    got: int
    path: str

    @property
    def shortfall(self) -> int:
        return max(self.requested - self.got, 0)

    @property
    def changed(self) -> bool:
        return self.got != self.previous


# --------------------------------------------------------------------------- show


def show(info: HugepageInfo | None = None) -> list[HugepageRow]:
    """Rows per page size and NUMA node: total, free, and the size's mount points."""
    if info is None:
        info = discover()
    rows: list[HugepageRow] = []
    for size, glob in info.sizes.items():
        mounts = tuple(m.mount_point for m in info.mounts_for(size))
        by_node = info.per_node.get(size, {})
        if by_node:
            rows.extend(
                HugepageRow(size, n.node, n.nr_hugepages, n.free_hugepages, mounts)
                for n in by_node.values()
            )
        else:
            rows.append(HugepageRow(size, None, glob.nr_hugepages, glob.free_hugepages, mounts))
    return rows


def format_rows(rows: Sequence[HugepageRow]) -> str:
    """A human table of :func:`show` rows."""
    head = ("Size", "Node", "Total", "Free", "Reserved", "Mounts")
    body = [
        (
            format_size(r.page_size),
            "-" if r.node is None else str(r.node),
            str(r.total),
            str(r.free),
            format_size(r.total * r.page_size) if r.total else "0",
            ", ".join(r.mounts) or "(not mounted)",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- reserve


def _write_sysfs(path: str, value: int) -> None:
    """Write one integer to a sysfs file (a seam for tests that fake the kernel)."""
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{value}\n")


def reserve(
    pages: int | None = None,
    page_size: int | str = "2M",
    node: int | None = None,
    *,
    size: int | str | None = None,
    at_least: bool = False,
    strict: bool = True,
) -> ReserveResult:
    """Set the hugepage pool of ``page_size`` to ``pages`` (or ``size`` bytes, rounded
    up to whole pages), globally or on NUMA ``node``, and verify what the kernel gave.

    ``at_least``: never shrink; do nothing when the pool is already big enough (what
    shared machines and CI want). ``strict``: raise
    :class:`~memd.errors.HugepageReserveError` on a shortfall (else just report it
    in the result). Raises :class:`~memd.errors.HugepageConfigError` for an unknown
    size or node, or when not permitted (not root / read-only /sys).
    """
    if (pages is None) == (size is None):
        raise MemdValueError("reserve: give exactly one of pages= or size=")
    psize = parse_size(page_size)
    if size is not None:
        total = parse_size(size)
        pages = -(-total // psize)
    assert pages is not None
    if pages < 0:
        raise MemdValueError(f"reserve: negative page count {pages}")
    d = size_sysfs_dir(psize, node)
    if not os.path.isdir(d):
        if node is not None and os.path.isdir(size_sysfs_dir(psize)):
            raise HugepageConfigError(
                f"NUMA node {node} has no {kb(psize)} hugepages "
                f"({d} is missing); check the node number",
                d,
            )
        valid = ", ".join(format_size(s) for s in discover().sizes) or "none"
        raise HugepageConfigError(
            f"the kernel has no {kb(psize)} hugepages ({d} is missing); valid page sizes: {valid}",
            d,
        )
    path = os.path.join(d, "nr_hugepages")
    previous = read_int(path)
    if at_least and previous >= pages:
        return ReserveResult(psize, node, previous, pages, previous, path)
    try:
        _write_sysfs(path, pages)
    except PermissionError as exc:
        raise HugepageConfigError(
            f"permission denied writing {path}: run as root "
            f"(sudo python -m memd.hugepages_admin --reserve ...)",
            path,
        ) from exc
    except OSError as exc:
        raise HugepageConfigError(
            f"cannot write {pages} to {path}: {exc.strerror or exc} "
            "(a read-only /sys in a container? reserve on the host)",
            path,
        ) from exc
    got = read_int(path)
    result = ReserveResult(psize, node, previous, pages, got, path)
    if strict and got < pages:
        raise HugepageReserveError(
            f"the kernel reserved only {got} of {pages} {kb(psize)} hugepages"
            f"{'' if node is None else f' on node {node}'} ({path}): memory is short or "
            "fragmented; free memory, compact it (echo 1 > /proc/sys/vm/compact_memory) "
            f"and retry, or reserve at boot (kernel option hugepagesz={format_size(psize)} "
            f"hugepages={pages})",
            path,
            requested=pages,
            got=got,
        )
    return result


def clear(info: HugepageInfo | None = None) -> list[ReserveResult]:
    """Give every hugepage of every size back (``nr_hugepages`` = 0). Pages in use stay
    until freed (the kernel counts them as surplus)."""
    if info is None:
        info = discover()
    return [reserve(0, size, strict=False) for size in info.sizes]


# --------------------------------------------------------------------------- mount


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (a seam for tests)."""
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _mount_at(path: str) -> tuple[str, int] | None:
    """(mount point, page size) of the visible hugetlbfs mount exactly at ``path``, or None."""
    real = os.path.realpath(path)
    for m in hugetlbfs_mounts():
        if os.path.realpath(m.mount_point) == real:
            return (m.mount_point, m.page_size)
    return None


def mount(path: str, page_size: int | str = "2M", *, options: str | None = None) -> bool:
    """``mkdir -p path`` and mount hugetlbfs for ``page_size`` there.

    ``options`` adds mount options (e.g. ``"uid=0,gid=1001,mode=0770"``). Returns
    False if hugetlbfs of that size is already mounted there, True if it mounted.
    Raises :class:`~memd.errors.HugepageConfigError` if another size is mounted there
    or mount(8) fails.
    """
    psize = parse_size(page_size)
    existing = _mount_at(path)
    if existing is not None:
        if existing[1] == psize:
            return False
        raise HugepageConfigError(
            f"{path} already has hugetlbfs for {kb(existing[1])} pages; unmount it "
            f"(umount {path}) or mount {format_size(psize)} pages elsewhere",
            path,
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise HugepageConfigError(f"cannot create {path}: {exc.strerror or exc}", path) from exc
    opts = f"pagesize={format_size(psize)}" + (f",{options}" if options else "")
    argv = ["mount", "-t", "hugetlbfs", "-o", opts, "nodev", path]
    try:
        proc = _run(argv)
    except FileNotFoundError as exc:
        raise HugepageConfigError(
            f"mount(8) not found: install util-linux or mount by hand: {' '.join(argv)}", path
        ) from exc
    if proc.returncode != 0:
        raise HugepageConfigError(
            f"{' '.join(argv)} failed ({(proc.stderr or proc.stdout).strip() or proc.returncode})"
            "; run as root (in a container: --privileged or mount on the host)",
            path,
        )
    return True


def unmount(path: str) -> bool:
    """Unmount the hugetlbfs at ``path``. False if none is mounted there."""
    if _mount_at(path) is None:
        return False
    proc = _run(["umount", path])
    if proc.returncode != 0:
        raise HugepageConfigError(
            f"umount {path} failed ({(proc.stderr or proc.stdout).strip()}); is a process "
            "still using its files? (fuser -vm " + path + ")",
            path,
        )
    return True


# --------------------------------------------------------------------------- setup


def probe(path: str, page_size: int) -> str | None:
    """Try to create and map (without touching) one hugepage file in ``path``.

    Returns None when that works, else why not. The mapping reserves a page, so
    it fails cleanly when none is free; the file is removed at once.
    """
    name = os.path.join(path, f".memd_probe_{os.getpid()}")
    try:
        fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot create a file in {path}: {exc.strerror or exc}"
    try:
        os.unlink(name)
        os.ftruncate(fd, page_size)
        mmap.mmap(fd, page_size).close()
    except OSError as exc:
        return f"cannot map a {kb(page_size)} page from {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def setup(
    pages: int = DEFAULT_SETUP_PAGES,
    page_size: int | str = "2M",
    mount_dir: str = "/dev/hugepages",
    out: Callable[[str], object] = print,
) -> bool:
    """Make hugepages usable for memd, as far as permissions allow.

    As root: grow the ``page_size`` pool until ``pages`` pages are available (never
    shrink it: the machine may be shared), and mount hugetlbfs at ``mount_dir`` (or
    ``/dev/hugepages-<size>`` if that is taken by another size) when no mount of that
    size exists. Not root: change nothing. Either way report on ``out`` and return
    whether hugepages are usable afterwards: a mount we can write to, and at least
    one page that can be mapped.
    """
    psize = parse_size(page_size)
    root = os.geteuid() == 0
    try:
        info = discover()
    except MemdError as exc:
        out(f"hugepages: cannot read the hugepage state: {exc}")
        return False
    glob = info.sizes.get(psize)
    if glob is None:
        out(f"hugepages: this kernel offers no {kb(psize)} hugepages; use --no-huge")
        return False

    if glob.available >= pages:
        out(
            f"hugepages: {glob.available} {kb(psize)} pages available "
            f"({glob.nr_hugepages} reserved), nothing to reserve"
        )
    elif not root:
        out(
            f"hugepages: only {glob.available} {kb(psize)} pages available, need {pages}; "
            "not root, so not reserving (sudo python -m memd.hugepages_admin --setup)"
        )
    else:
        target = glob.nr_hugepages + (pages - glob.available)
        try:
            r = reserve(target, psize, strict=False, at_least=True)
        except MemdError as exc:
            out(f"hugepages: reserve failed: {exc}")
        else:
            out(
                f"hugepages: nr_hugepages {r.previous} -> {r.got} ({kb(psize)}, "
                f"asked {r.requested})"
                + (
                    f"; SHORT by {r.shortfall} pages: memory is short or fragmented"
                    if r.shortfall
                    else ""
                )
            )

    mnt = info.mount_for(psize)
    if mnt is None:
        where = mount_dir
        taken = _mount_at(mount_dir)
        if taken is not None and taken[1] != psize:
            where = f"/dev/hugepages-{format_size(psize)}"
        if not root:
            out(
                f"hugepages: no hugetlbfs mount for {kb(psize)} pages and not root: "
                f"sudo mount -t hugetlbfs -o pagesize={format_size(psize)} nodev {where}"
            )
        else:
            try:
                mount(where, psize)
                out(f"hugepages: mounted hugetlbfs (pagesize={format_size(psize)}) at {where}")
            except MemdError as exc:
                out(f"hugepages: mount failed: {exc}")
    else:
        out(f"hugepages: hugetlbfs for {kb(psize)} pages mounted at {mnt.mount_point}")

    try:
        info = discover()
    except MemdError as exc:
        out(f"hugepages: cannot read the hugepage state: {exc}")
        return False
    glob = info.sizes[psize]
    mnt = info.mount_for(psize)
    if mnt is None or glob.available < 1:
        out(
            f"hugepages: NOT usable ({glob.available} {kb(psize)} pages available, "
            f"mount: {mnt.mount_point if mnt else 'none'}); fall back to --no-huge"
        )
        return False
    why = probe(mnt.mount_point, psize)
    if why is not None:
        out(f"hugepages: NOT usable: {why}; fall back to --no-huge")
        return False
    short = f" (fewer than the {pages} asked)" if glob.available < pages else ""
    out(
        f"hugepages: usable: {glob.available} {kb(psize)} pages available{short} "
        f"at {mnt.mount_point}"
    )
    return True


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memd.hugepages_admin",
        description="Show, reserve and mount hugepages for memd.",
    )
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument(
        "--setup",
        action="store_true",
        help="reserve and mount as needed; exit 3 if hugepages stay unusable",
    )
    act.add_argument("--show", action="store_true", help="list sizes, nodes and mounts")
    act.add_argument(
        "--reserve",
        metavar="SIZE",
        help="set the pool to SIZE total (e.g. 1G, 512M) of --page-size pages",
    )
    act.add_argument("--mount", metavar="DIR", help="mount hugetlbfs of --page-size at DIR")
    act.add_argument("--unmount", metavar="DIR", help="unmount the hugetlbfs at DIR")
    act.add_argument("--clear", action="store_true", help="give all hugepages back")
    p.add_argument(
        "--pages",
        type=int,
        default=DEFAULT_SETUP_PAGES,
        help=f"--setup: pages wanted available (default {DEFAULT_SETUP_PAGES})",
    )
    p.add_argument("--page-size", default="2M", help="page size (default 2M)")
    p.add_argument("--node", type=int, default=None, help="--reserve on this NUMA node only")
    p.add_argument(
        "--dir", default="/dev/hugepages", help="--setup: where to mount hugetlbfs if needed"
    )
    p.add_argument("--json", action="store_true", help="--show: print JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.setup:
            return 0 if setup(args.pages, args.page_size, args.dir) else EXIT_UNUSABLE
        if args.show:
            rows = show()
            if args.json:
                print(json.dumps([dict(r._asdict(), mounts=list(r.mounts)) for r in rows]))
            else:
                print(format_rows(rows))
        elif args.reserve is not None:
            r = reserve(size=args.reserve, page_size=args.page_size, node=args.node)
            print(f"nr_hugepages {r.previous} -> {r.got} ({kb(r.page_size)})")
        elif args.mount is not None:
            did = mount(args.mount, args.page_size)
            print(f"{'mounted' if did else 'already mounted'}: {args.mount}")
        elif args.unmount is not None:
            did = unmount(args.unmount)
            print(f"{'unmounted' if did else 'not a hugetlbfs mount'}: {args.unmount}")
        elif args.clear:
            for r in clear():
                print(f"{kb(r.page_size)}: nr_hugepages {r.previous} -> {r.got}")
    except (MemdError, MemdValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
