"""Hugepage discovery: DPDK's ``eal_hugepage_info_init`` in Python.

What the kernel offers (page sizes and their counters, per NUMA node) and where
hugetlbfs is mounted, read from ``/sys`` and ``/proc``. Both roots are module-level
settings (:data:`SYS_ROOT`, :data:`PROC_ROOT`) read only through :func:`roots`, so
tests point them at fake trees with :func:`set_roots`.

Parsing policy (what is skipped, as DPDK skips it, and what is an error):

* skipped: entries of ``/sys/kernel/mm/hugepages`` not named ``hugepages-<N>kB``;
  a NUMA node without a ``hugepages`` directory; a per-node size directory without
  its counter files; ``/proc/mounts`` lines with fewer than four fields; a
  hugetlbfs mount hidden by a later mount on the same mount point.
* zero when missing: ``resv_hugepages``, ``surplus_hugepages`` and
  ``nr_overcommit_hugepages`` (old kernels lack some); ``surplus_hugepages`` per node.
* :class:`~memd.errors.MalformedFileError` naming the file: any counter file that
  exists but is not a decimal integer (empty, text, negative); a ``pagesize=`` mount
  option or a ``Hugepagesize:`` line that does not parse. DPDK silently reads such
  files as 0; memd refuses, because a wrong count is worse than a clear stop.
* :class:`~memd.errors.HugepageConfigError` naming the file: ``nr_hugepages`` or
  ``free_hugepages`` missing for a page size the kernel lists; a hugetlbfs mount
  without ``pagesize=`` when ``/proc/meminfo`` has no ``Hugepagesize:``.

No ``/sys/kernel/mm/hugepages`` at all means a kernel without hugepages: discovery
returns no sizes rather than failing (the daemon then says to use ``--no-huge``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from memd.errors import HugepageConfigError, MalformedFileError, MemdValueError

SYS_ROOT = "/sys"
PROC_ROOT = "/proc"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "p": 1024 * 1024 * GiB}
_HP_DIR_RE = re.compile(r"^hugepages-(\d+)kB$")
_NODE_DIR_RE = re.compile(r"^node(\d+)$")
_OCTAL_RE = re.compile(r"\\([0-7]{3})")


# --------------------------------------------------------------------------- roots


def roots() -> tuple[str, str]:
    """The current ``(sys_root, proc_root)``: the one place the settings are read."""
    return SYS_ROOT, PROC_ROOT


def sys_path(*parts: str) -> str:
    """A path under the /sys root, e.g. ``sys_path("kernel/mm/hugepages")``."""
    return os.path.join(roots()[0], *parts)


def proc_path(*parts: str) -> str:
    """A path under the /proc root, e.g. ``proc_path("self", "pagemap")``."""
    return os.path.join(roots()[1], *parts)


class _RootsRestorer(contextlib.AbstractContextManager[None]):
    def __init__(self, old: tuple[str, str]) -> None:
        self._old = old

    def __exit__(self, *exc: object) -> None:
        global SYS_ROOT, PROC_ROOT
        SYS_ROOT, PROC_ROOT = self._old


def set_roots(
    sys: str | os.PathLike[str] | None = None, proc: str | os.PathLike[str] | None = None
) -> _RootsRestorer:
    """Point discovery at other /sys and /proc trees (None keeps the current one).

    Takes effect at once; used as a context manager it restores the previous roots
    on exit::

        with set_roots(sys=str(tmp_path / "sys"), proc=str(tmp_path / "proc")):
            info = discover()
    """
    global SYS_ROOT, PROC_ROOT
    old = (SYS_ROOT, PROC_ROOT)
    if sys is not None:
        SYS_ROOT = os.fspath(sys)
    if proc is not None:
        PROC_ROOT = os.fspath(proc)
    return _RootsRestorer(old)


# --------------------------------------------------------------------------- sizes


def parse_size(text: str | int) -> int:
    """Bytes from a human size: ``"2M"``, ``"1G"``, ``"512M"``, ``"2048kB"``, ``"4096"``.

    Units are binary (k = 1024) as in DPDK's ``rte_str_to_size`` and the kernel's
    ``pagesize=``; an optional ``B``/``iB`` suffix and any letter case are accepted.
    An int is taken as bytes. Raises :class:`~memd.errors.MemdValueError`.
    """
    if isinstance(text, bool):
        raise MemdValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise MemdValueError(f"a size cannot be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if m is None:
        raise MemdValueError(
            f"not a size: {text!r} (use a number with an optional unit: 2M, 1G, 2048kB)"
        )
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(nbytes: int) -> str:
    """The shortest exact ``pagesize=`` spelling: 2097152 → ``"2M"``, 1 GiB → ``"1G"``."""
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)


def kb(nbytes: int) -> str:
    """``"2048 kB"``: how the kernel and DPDK's messages name a page size."""
    return f"{nbytes // KiB} kB"


# --------------------------------------------------------------------------- results


class PageSizeInfo(NamedTuple):
    """Counters of one page size, from ``/sys/kernel/mm/hugepages/hugepages-<N>kB/``."""

    page_size: int  #: bytes
    nr_hugepages: int  #: persistent pool size
    free_hugepages: int  #: not allocated (includes reserved ones)
    resv_hugepages: int  #: promised to mappings but not yet faulted in
    surplus_hugepages: int  #: allocated above nr_hugepages through overcommit
    nr_overcommit_hugepages: int
    path: str  #: the sysfs directory

    @property
    def available(self) -> int:
        """Pages a new mapping can get, as DPDK's ``get_num_hugepages`` counts them:
        ``free - resv`` plus unused overcommit ``nr_overcommit - surplus``."""
        return max(self.free_hugepages - self.resv_hugepages, 0) + max(
            self.nr_overcommit_hugepages - self.surplus_hugepages, 0
        )


class NodePages(NamedTuple):
    """Counters of one page size on one NUMA node (``node<N>/hugepages/hugepages-<N>kB``)."""

    node: int
    page_size: int
    nr_hugepages: int
    free_hugepages: int
    surplus_hugepages: int
    path: str


class HugetlbfsMount(NamedTuple):
    """A visible hugetlbfs mount from ``/proc/mounts``."""

    mount_point: str  #: unescaped (``\\040`` → space)
    page_size: int  #: from ``pagesize=``, else the default size
    source: str  #: device field, usually ``nodev`` or ``hugetlbfs``
    options: tuple[str, ...]  #: mount options, split on commas
    explicit_size: bool  #: True when ``pagesize=`` was given


class HugeDir(NamedTuple):
    """Where to create hugepage files: the result of :func:`resolve_huge_dir`."""

    path: str  #: the directory (the mount point or a directory in it)
    mount_point: str
    page_size: int


@dataclass(frozen=True)
class HugepageInfo:
    """Everything :func:`discover` found, in one object."""

    default_page_size: int | None  #: ``Hugepagesize:`` of /proc/meminfo
    sizes: dict[int, PageSizeInfo]  #: by page size, ascending
    nodes: tuple[int, ...]  #: online NUMA nodes (``(0,)`` if none)
    per_node: dict[int, dict[int, NodePages]]  #: page size → node → counters
    mounts: tuple[HugetlbfsMount, ...]  #: in /proc/mounts order
    meminfo: dict[str, int] = field(default_factory=dict)  #: HugePages_* and Hugepagesize

    def mounts_for(self, page_size: int) -> list[HugetlbfsMount]:
        """The hugetlbfs mounts of that page size, in /proc/mounts order."""
        return [m for m in self.mounts if m.page_size == page_size]

    def mount_for(self, page_size: int) -> HugetlbfsMount | None:
        """The first mount of that size (the one DPDK picks), or None."""
        found = self.mounts_for(page_size)
        return found[0] if found else None

    def node_pages(self, page_size: int, node: int) -> NodePages | None:
        """Counters of a page size on a node, or None if the kernel does not list them."""
        return self.per_node.get(page_size, {}).get(node)

    @property
    def usable_sizes(self) -> list[int]:
        """Page sizes with both pages the kernel offers and a hugetlbfs mount (DPDK's
        ``num_hugepage_sizes``): what the daemon can actually use."""
        return [s for s in self.sizes if self.mount_for(s) is not None]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (memctl ``--json``, telemetry)."""
        return {
            "default_page_size": self.default_page_size,
            "nodes": list(self.nodes),
            "sizes": [dict(s._asdict(), available=s.available) for s in self.sizes.values()],
            "per_node": [
                n._asdict() for by_node in self.per_node.values() for n in by_node.values()
            ],
            "mounts": [dict(m._asdict(), options=list(m.options)) for m in self.mounts],
        }


# --------------------------------------------------------------------------- readers


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def read_int(path: str, *, default: int | None = None) -> int:
    """A non-negative decimal integer from a one-value sysfs file.

    Missing file: ``default`` if given, else :class:`HugepageConfigError`.
    Anything else than one integer: :class:`MalformedFileError` naming the file.
    """
    try:
        text = _read_text(path)
    except FileNotFoundError:
        if default is not None:
            return default
        raise HugepageConfigError(
            f"{path} is missing: the kernel lists this hugepage size but not its counter; "
            "check that sysfs is mounted (mount -t sysfs sysfs /sys)",
            path,
        ) from None
    except OSError as exc:
        raise HugepageConfigError(f"cannot read {path}: {exc.strerror or exc}", path) from exc
    value = text.strip()
    if not value.isdigit() or not value.isascii():
        shown = value[:40] if value else "an empty file"
        raise MalformedFileError(f"{path}: expected a non-negative integer, found {shown!r}", path)
    return int(value)


def read_meminfo() -> dict[str, int]:
    """The hugepage lines of ``/proc/meminfo``: ``HugePages_Total``, ``_Free``, ``_Rsvd``,
    ``_Surp`` (pages) and ``Hugepagesize``, ``Hugetlb`` (bytes). Missing file → {}."""
    path = proc_path("meminfo")
    try:
        text = _read_text(path)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or not (key.startswith("HugePages_") or key in ("Hugepagesize", "Hugetlb")):
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            raise MalformedFileError(f"{path}: cannot parse the line {line.strip()!r}", path)
        value = int(parts[0])
        if len(parts) > 1:
            value = parse_size(parts[0] + parts[1])
        out[key] = value
    return out


def default_page_size() -> int | None:
    """The default hugepage size in bytes (``Hugepagesize:``), None if not reported."""
    return read_meminfo().get("Hugepagesize")


def page_sizes() -> list[int]:
    """Page sizes the kernel offers, ascending (``hugepages-<N>kB`` directories)."""
    base = sys_path("kernel", "mm", "hugepages")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    sizes = []
    for name in names:
        m = _HP_DIR_RE.match(name)
        if m:
            sizes.append(int(m.group(1)) * KiB)
    return sorted(sizes)


def _size_dir(page_size: int) -> str:
    return f"hugepages-{page_size // KiB}kB"


def size_sysfs_dir(page_size: int, node: int | None = None) -> str:
    """The sysfs directory of a page size, global or of one NUMA node."""
    if node is None:
        return sys_path("kernel", "mm", "hugepages", _size_dir(page_size))
    return sys_path("devices", "system", "node", f"node{node}", "hugepages", _size_dir(page_size))


def page_size_info(page_size: int) -> PageSizeInfo:
    """Counters of one page size (see the module doc for missing/malformed files)."""
    d = size_sysfs_dir(page_size)
    return PageSizeInfo(
        page_size=page_size,
        nr_hugepages=read_int(os.path.join(d, "nr_hugepages")),
        free_hugepages=read_int(os.path.join(d, "free_hugepages")),
        resv_hugepages=read_int(os.path.join(d, "resv_hugepages"), default=0),
        surplus_hugepages=read_int(os.path.join(d, "surplus_hugepages"), default=0),
        nr_overcommit_hugepages=read_int(os.path.join(d, "nr_overcommit_hugepages"), default=0),
        path=d,
    )


def _parse_range_list(text: str, path: str) -> list[int]:
    """``"0-1,3"`` → [0, 1, 3] (the kernel's cpulist/nodelist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise MalformedFileError(
                f"{path}: expected a node list like 0-1,3, found {text.strip()!r}", path
            )
        out.extend(range(int(lo), int(hi if sep else lo) + 1))
    return sorted(set(out))


def numa_nodes() -> list[int]:
    """Online NUMA nodes: ``node/online``, else the ``node<N>`` directories, else [0]."""
    base = sys_path("devices", "system", "node")
    online = os.path.join(base, "online")
    try:
        nodes = _parse_range_list(_read_text(online), online)
    except FileNotFoundError:
        nodes = []
    if not nodes:
        try:
            nodes = sorted(int(m.group(1)) for m in map(_NODE_DIR_RE.match, os.listdir(base)) if m)
        except FileNotFoundError:
            nodes = []
    return nodes or [0]


def node_page_info(page_size: int, node: int) -> NodePages | None:
    """Counters of a page size on one node; None when the node lists none (skipped)."""
    d = size_sysfs_dir(page_size, node)
    nr_path = os.path.join(d, "nr_hugepages")
    free_path = os.path.join(d, "free_hugepages")
    if not (os.path.exists(nr_path) and os.path.exists(free_path)):
        return None
    return NodePages(
        node=node,
        page_size=page_size,
        nr_hugepages=read_int(nr_path),
        free_hugepages=read_int(free_path),
        surplus_hugepages=read_int(os.path.join(d, "surplus_hugepages"), default=0),
        path=d,
    )


def unescape_mount_field(text: str) -> str:
    """Undo /proc/mounts escaping: ``\\040`` space, ``\\011`` tab, ``\\012`` newline,
    ``\\134`` backslash."""
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), text)


def hugetlbfs_mounts(default_size: int | None = None) -> list[HugetlbfsMount]:
    """Visible hugetlbfs mounts from ``/proc/mounts`` in file order.

    The size is ``pagesize=`` when given, else ``default_size`` (read from
    /proc/meminfo when None). A mount point mounted over later in the file is hidden,
    so only its last entry counts. Missing /proc/mounts → [].
    """
    path = proc_path("mounts")
    try:
        text = _read_text(path)
    except FileNotFoundError:
        return []
    last: dict[str, tuple[str, str, list[str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue  # DPDK stops at such a line; the rest of the file is still good
        source, mnt, fstype, opts_field = fields[:4]
        mnt = unescape_mount_field(mnt)
        last.pop(mnt, None)  # re-insert so dict order = order of the visible entries
        last[mnt] = (unescape_mount_field(source), fstype, opts_field.split(","))
    mounts = []
    for mnt, (source, fstype, opts) in last.items():
        if fstype != "hugetlbfs":
            continue
        size_opt = next((o.partition("=")[2] for o in opts if o.startswith("pagesize=")), None)
        if size_opt is not None:
            try:
                size = parse_size(size_opt)
            except MemdValueError:
                raise MalformedFileError(
                    f"{path}: hugetlbfs mount {mnt!r} has an unreadable option pagesize={size_opt}",
                    path,
                ) from None
        else:
            if default_size is None:
                default_size = default_page_size()
            if default_size is None:
                mi = proc_path("meminfo")
                raise HugepageConfigError(
                    f"hugetlbfs is mounted at {mnt!r} without pagesize= and {mi} has no "
                    f"Hugepagesize: line; remount it with -o pagesize=2M",
                    mi,
                )
            size = default_size
        mounts.append(
            HugetlbfsMount(
                mount_point=mnt,
                page_size=size,
                source=source,
                options=tuple(opts),
                explicit_size=size_opt is not None,
            )
        )
    return mounts


def discover() -> HugepageInfo:
    """Page sizes, per-node counters, NUMA nodes, mounts and default size, in one object."""
    meminfo = read_meminfo()
    default = meminfo.get("Hugepagesize")
    sizes = {s: page_size_info(s) for s in page_sizes()}
    nodes = tuple(numa_nodes())
    per_node: dict[int, dict[int, NodePages]] = {}
    for s in sizes:
        by_node = {}
        for n in nodes:
            info = node_page_info(s, n)
            if info is not None:
                by_node[n] = info
        per_node[s] = by_node
    return HugepageInfo(
        default_page_size=default,
        sizes=sizes,
        nodes=nodes,
        per_node=per_node,
        mounts=tuple(hugetlbfs_mounts(default)),
        meminfo=meminfo,
    )


# --------------------------------------------------------------------------- policy


def _nr_path(page_size: int) -> str:
    return os.path.join(size_sysfs_dir(page_size), "nr_hugepages")


def mount_hint(path: str, page_size: int) -> str:
    """The command that mounts hugetlbfs for ``page_size`` at ``path`` (mkdir when needed)."""
    q = shlex.quote(path)
    cmd = f"mount -t hugetlbfs -o pagesize={format_size(page_size)} nodev {q}"
    return cmd if os.path.isdir(path) else f"mkdir -p {q} && {cmd}"


def default_mount_dir(page_size: int, info: HugepageInfo) -> str:
    """Where to suggest mounting ``page_size`` pages: ``/dev/hugepages`` unless a
    hugetlbfs mount already uses it, then ``/dev/hugepages-<size>`` (e.g. ``-1G``)."""
    if any(m.mount_point == "/dev/hugepages" for m in info.mounts):
        return f"/dev/hugepages-{format_size(page_size)}"
    return "/dev/hugepages"


def _existing_mounts(info: HugepageInfo) -> str:
    if not info.mounts:
        return ""
    return (
        " or point --huge-dir at an existing mount ("
        + ", ".join(f"{m.mount_point} [{format_size(m.page_size)}]" for m in info.mounts)
        + ")"
    )


def resolve_huge_dir(
    huge_dir: str | None = None,
    page_size: int | str | None = None,
    *,
    info: HugepageInfo | None = None,
) -> HugeDir:
    """Where hugepage files go, and their page size (DPDK's ``get_hugepage_dir``).

    ``huge_dir`` (``--huge-dir``) may be a hugetlbfs mount point or a directory inside
    one (the innermost mount wins); its mount decides the page size, which must agree
    with ``page_size`` when both are given. With no ``huge_dir``, the first mount of
    ``page_size`` (default: the kernel's default size) is used.

    Raises :class:`HugepageConfigError` with the fixing command when the directory is
    missing or not on hugetlbfs, the sizes disagree, the kernel lacks the size, or no
    mount exists.
    """
    if info is None:
        info = discover()
    want = parse_size(page_size) if page_size is not None else None
    if huge_dir is not None:
        real = os.path.realpath(huge_dir)
        if not os.path.isdir(real):
            raise HugepageConfigError(
                f"--huge-dir {huge_dir} does not exist or is not a directory: "
                + mount_hint(huge_dir, want or info.default_page_size or 2 * MiB),
                huge_dir,
            )
        best: HugetlbfsMount | None = None
        for m in info.mounts:
            mp = os.path.realpath(m.mount_point)
            inside = real == mp or real.startswith(mp.rstrip("/") + "/")
            if inside and (best is None or len(mp) > len(os.path.realpath(best.mount_point))):
                best = m
        if best is None:
            raise HugepageConfigError(
                f"--huge-dir {huge_dir} is not on a hugetlbfs mount: mount one there ("
                + mount_hint(huge_dir, want or info.default_page_size or 2 * MiB)
                + ")"
                + _existing_mounts(info),
                huge_dir,
            )
        if want is not None and best.page_size != want:
            raise HugepageConfigError(
                f"--huge-dir {huge_dir} is on a hugetlbfs mount for {kb(best.page_size)} pages "
                f"({best.mount_point}), not {kb(want)}: pick a pagesize={format_size(want)} "
                f"mount or create one: {mount_hint(default_mount_dir(want, info), want)}",
                huge_dir,
            )
        return HugeDir(path=real, mount_point=best.mount_point, page_size=best.page_size)

    size = want if want is not None else info.default_page_size
    if size is None:
        mi = proc_path("meminfo")
        raise HugepageConfigError(
            f"this kernel reports no default hugepage size ({mi} has no Hugepagesize: "
            "line); it probably lacks hugepage support: run memd --no-huge",
            mi,
        )
    if info.sizes and size not in info.sizes:
        supported = ", ".join(format_size(s) for s in info.sizes)
        raise HugepageConfigError(
            f"the kernel has no {kb(size)} hugepages (it supports {supported}); "
            "choose one of those page sizes"
        )
    mount = info.mount_for(size)
    if mount is None:
        raise HugepageConfigError(
            f"no hugetlbfs mount for {kb(size)} pages: "
            f"{mount_hint(default_mount_dir(size, info), size)} (or run memd --no-huge)"
        )
    return HugeDir(path=mount.mount_point, mount_point=mount.mount_point, page_size=size)


def suggested_pages(page_size: int) -> int:
    """A sensible pool for the fix-it messages: 1 GiB of 2 MB pages, one 1 GB page."""
    return max(GiB // page_size, 1)


def require_free_pages(
    page_size: int | str,
    count: int = 1,
    *,
    node: int | None = None,
    info: HugepageInfo | None = None,
) -> int:
    """Check that ``count`` pages of ``page_size`` are available (on ``node`` if given).

    Returns how many are available. Raises :class:`HugepageConfigError` naming the
    ``echo N > .../nr_hugepages`` that fixes it.
    """
    if info is None:
        info = discover()
    size = parse_size(page_size)
    glob = info.sizes.get(size)
    if glob is None:
        raise HugepageConfigError(
            f"the kernel has no {kb(size)} hugepages (supported: "
            f"{', '.join(format_size(s) for s in info.sizes) or 'none'}); "
            "run memd --no-huge or choose a supported size"
        )
    avail = glob.available
    nr_file = _nr_path(size)
    nr_now = glob.nr_hugepages
    where = ""
    if node is not None:
        np_ = info.node_pages(size, node)
        if np_ is None:
            raise HugepageConfigError(
                f"NUMA node {node} has no {kb(size)} hugepages listed in sysfs "
                f"(nodes: {', '.join(map(str, info.nodes))}); choose another --socket-mem node"
            )
        avail = min(avail, np_.free_hugepages)
        nr_file = os.path.join(np_.path, "nr_hugepages")
        nr_now = np_.nr_hugepages
        where = f" on node {node}"
    if avail >= count:
        return avail
    target = max(nr_now + (count - avail), suggested_pages(size))
    free_word = "no free" if avail == 0 else f"only {avail} free"
    raise HugepageConfigError(
        f"{free_word} {kb(size)} hugepages{where} (need {count}): "
        f"echo {target} > {nr_file} (or run memd --no-huge)",
        nr_file,
    )


# --------------------------------------------------------------------------- locking


def lock_huge_dir(path: str, *, exclusive: bool = True, timeout: float = 0.0) -> int:
    """Open ``path`` and ``flock`` it, as DPDK locks its hugepage directories.

    DPDK holds it exclusive only while initialising; any number of primaries with
    different prefixes then share the directory (memd's own safety rests on its
    prefix lock and the page files' locks, see :mod:`memd.shm.pages`).
    Waits up to ``timeout`` seconds. Returns the fd (close it to unlock).
    Raises :class:`HugepageConfigError` when the lock is held elsewhere.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        relock_huge_dir(fd, path, exclusive=exclusive, timeout=timeout)
    except BaseException:
        os.close(fd)
        raise
    return fd


def relock_huge_dir(fd: int, path: str, *, exclusive: bool, timeout: float = 0.0) -> None:
    """Change the ``flock`` on an fd from :func:`lock_huge_dir` (exclusive ↔ shared)."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HugepageConfigError(f"cannot lock {path}: {exc.strerror}", path) from exc
            if time.monotonic() >= deadline:
                raise HugepageConfigError(
                    f"{path} is locked by another memd primary (or a DPDK application): stop "
                    "it, or give this one another --huge-dir",
                    path,
                ) from None
            time.sleep(0.01)
        else:
            return


@contextlib.contextmanager
def locked_huge_dir(path: str, *, exclusive: bool = True, timeout: float = 0.0) -> Iterator[int]:
    """:func:`lock_huge_dir` as a context manager; yields the fd."""
    fd = lock_huge_dir(path, exclusive=exclusive, timeout=timeout)
    try:
        yield fd
    finally:
        os.close(fd)
