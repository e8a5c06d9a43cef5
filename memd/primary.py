"""The primary: all hugepage initialisation, the shared config, and heap growth
(docs/design.md §1, §5).  `Primary` is usable in-process (embedding, tests);
`memd.daemon` wraps it in a long-running process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from memd import _ext, hugepage_info, pagemap
from memd.access import AccessPolicy, resolve_group
from memd.errors import MemdError, MemdMemoryError
from memd.files import (
    UnsafePath,
    check_trusted_path,
    create_file,
    describe_owner,
    ensure_dir,
    holders,
    open_checked,
    try_lock,
)
from memd.heap import space_needed
from memd.ipc import PROTOCOL_VERSION, Peer, Server, param, reply
from memd.memory import Memory
from memd.pages import (
    clean_stale,
    lock_prefix,
    no_pages_reason,
    probe_dir,
    remove_own_stale,
    unlock_prefix,
)
from memd.paths import (
    DEFAULT_PREFIX,
    SHM_DIR,
    base_runtime_dir,
    config_path,
    legacy_temp_name,
    mp_endpoint,
    runtime_dir,
    socket_dir,
    validate_prefix,
)
from memd.shared import (
    MemsegList,
    comm,
    header,
    memseg_lists,
    proc_start_time,
    process_alive,
    processes,
    watch_process,
)

log = logging.getLogger("memd")

MiB = 1 << 20
GiB = 1 << 30
NO_HUGE_PAGE_SIZE = 2 * MiB  # --no-huge "pages": one shm object each
MAX_LIST_BYTES = 32 * GiB  # DPDK RTE_MAX_MEM_MB_PER_LIST


class InitError(MemdError, RuntimeError):
    """The primary cannot start; the message says how to fix it (exit code 1)."""


class AlreadyRunning(InitError):
    """Another primary owns this --file-prefix."""


@dataclass
class Options:
    """The primary's settings; the daemon fills them from its command line."""

    file_prefix: str = DEFAULT_PREFIX
    runtime_dir: str | None = None
    huge_dir: str | None = None
    memory_mb: int = 0  # -m: preallocated, never given back
    socket_mem: list[int] | None = None  # --socket-mem: MB per socket
    no_huge: bool = False
    legacy_mem: bool = False
    huge_unlink: bool = False
    single_file_segments: bool = False
    base_virtaddr: int = 0
    group: str | None = None
    sync_timeout: float = 2.0
    max_mem_mb: int = 0  # --max-mem: cap on mapped memory (0 = none)
    take_over: bool = False  # start although a dead primary's secondaries run
    reclaim_heap: bool = False  # free a dead secondary's heap blocks
    argv: list[str] = field(default_factory=list)


@dataclass
class _ListPlan:
    page_size: int
    socket_id: int
    capacity: int
    dir: str
    base_offset: int = 0


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Primary(Memory):
    """Initialise everything, then serve secondaries (call `serve` or `poll`)."""

    is_primary = True

    def __init__(self, options: Options | None = None) -> None:
        self.options = opts = options or Options()
        prefix = validate_prefix(opts.file_prefix)
        super().__init__(prefix, runtime_dir(opts.runtime_dir, uid=os.geteuid()))
        self.proc_slot = 0
        self._closed = False
        self._cfg_fd = -1
        self._prefix_locks: dict[str, int] = {}  # page directory -> its prefix lock fd
        self.server: Server | None = None
        self._gid = self._group_id(opts.group)
        self._mode = 0o660 if self._gid is not None else 0o600
        self._dir_mode = 0o750 if self._gid is not None else 0o700
        self.pages.mode = self._mode
        self.pages.gid = self._gid
        self._expand_lock = threading.RLock()
        self.reclaims: deque[dict[str, Any]] = deque(maxlen=64)  # dead secondaries, newest last
        try:
            self._init()
        except BaseException:
            self._teardown(remove_files=True)
            raise

    # --- init ------------------------------------------------------------------

    @staticmethod
    def _group_id(group: str | None) -> int | None:
        try:
            return resolve_group(group)
        except ValueError as e:
            raise InitError(f"--group {group}: {e}; create it or drop --group") from None

    def _init(self) -> None:
        self._make_runtime_dir()
        self.config_file = config_path(self.prefix, self.rundir)
        self._lock_config()
        plans = self._plan_lists()
        page_sizes = {p.dir or SHM_DIR: p.page_size for p in plans}
        for i, p in enumerate(plans):
            self.pages.set_dir(i, p.dir or SHM_DIR)
        dir_locks: list[int] = []
        try:
            self._claim_page_dirs(page_sizes, dir_locks)
            self._init_memory(plans)
        finally:
            for fd in dir_locks:  # DPDK: the directory is locked only while initialising
                os.close(fd)
        self._start_server()

    def _init_memory(self, plans: list[_ListPlan]) -> None:
        opts = self.options

        window_align = max(p.page_size for p in plans)
        cursor = _ext.CONFIG_SIZE
        for p in plans:
            cursor = _round_up(cursor, p.page_size)
            p.base_offset = cursor
            cursor += p.capacity * p.page_size
        window_size = _round_up(cursor, window_align)
        try:
            self.window = _ext.Window(window_size, window_align, opts.base_virtaddr)
        except OSError as e:
            raise InitError(
                f"cannot reserve {window_size >> 20} MiB of address space"
                f"{' at --base-virtaddr' if opts.base_virtaddr else ''}: "
                f"{e.strerror}; try another --base-virtaddr or fewer pages"
            ) from e
        self.window.map_fd(0, _ext.CONFIG_SIZE, self._cfg_fd)

        self.iova_mode = (
            _ext.IOVA_PA if not opts.no_huge and pagemap.iova_mode_available() else _ext.IOVA_VA
        )
        flags = (
            (_ext.CFG_F_NO_HUGE if opts.no_huge else 0)
            | (_ext.CFG_F_LEGACY if opts.legacy_mem else 0)
            | (_ext.CFG_F_HUGE_UNLINK if opts.huge_unlink else 0)
            | (_ext.CFG_F_SINGLE_FILE if opts.single_file_segments else 0)
        )
        start = proc_start_time(os.getpid()) or 0
        _ext.config_format(
            self.window,
            self.prefix,
            flags,
            self.iova_mode,
            window_size,
            window_align,
            os.getpid(),
            start,
        )
        for i, p in enumerate(plans):
            _ext.msl_init(
                self.window, i, p.base_offset, p.page_size, p.socket_id, p.capacity, p.dir
            )
        self._lists = memseg_lists(self.window)

        if opts.legacy_mem:
            self._init_legacy()
        else:
            self._prealloc()

    def _start_server(self) -> None:
        start = proc_start_time(os.getpid()) or 0
        _ext.proc_register(self.window, os.getpid(), start, _ext.PROC_PRIMARY, comm(), 0)
        sockdir = socket_dir(self.prefix, self.rundir)
        # group members may enter and connect, never create: the socket is ours alone
        ensure_dir(sockdir.parent, 0o711 if self._gid is not None else 0o700, shared=True)
        ensure_dir(sockdir, self._dir_mode, self._gid)
        with contextlib.suppress(FileNotFoundError):
            (sockdir / "mp_socket").unlink()  # a dead primary's: we hold the config lock
        self.server = Server(
            mp_endpoint(self.prefix, self.rundir),
            self._handlers(),
            self.options.sync_timeout,
            AccessPolicy(gid=self._gid),
        )
        self.server.on_death = self._reclaim
        if self._gid is not None:
            os.chown(sockdir / "mp_socket", -1, self._gid)
        os.chmod(sockdir / "mp_socket", self._mode)
        _ext.config_publish(self.window)  # magic last: secondaries may attach now
        log.info(
            "ready: prefix %s, %d memseg lists, %s MiB mapped, iova %s",
            self.prefix,
            len(self._lists),
            self.info()["mapped_bytes"] >> 20,
            "PA" if self.iova_mode == _ext.IOVA_PA else "VA",
        )

    def _make_runtime_dir(self) -> None:
        """The runtime dir must be one only its owner can write: memd makes its own
        `memd-<uid>` inside a shared one (the sticky /tmp), and refuses one that
        belongs to another user."""
        base = base_runtime_dir(self.options.runtime_dir)
        try:
            check_trusted_path(base, {0, os.geteuid()})
        except UnsafePath as e:
            raise InitError(f"runtime dir {base}: {e}") from None
        if self.rundir != base:  # the private subdirectory of a shared-writable base
            ensure_dir(self.rundir, 0o711 if self._gid is not None else 0o700, shared=True)
            return
        try:
            self.rundir.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise InitError(
                f"cannot create {self.rundir}: permission denied; run as root or "
                "pass --runtime-dir to a directory you own"
            ) from None
        st = os.stat(self.rundir)
        if st.st_uid not in (0, os.geteuid()):
            raise InitError(
                f"runtime dir {self.rundir} belongs to {describe_owner(st.st_uid)}: memd keeps "
                "its config and sockets only in a directory of its own user or root; pass "
                "another --runtime-dir"
            )

    def _claim_page_dirs(self, page_sizes: dict[str, int], dir_locks: list[int]) -> None:
        """Make each page directory ours to use: take the prefix lock (refused if a
        live primary of this prefix uses the directory, under any runtime dir), lock
        the directory as DPDK does while initialising, remove this prefix's stale
        files and every dead prefix's unheld ones, and check a page can be had.
        Appends the directory locks to `dir_locks`, to release once initialised."""
        opts = self.options
        for d, page_size in sorted(page_sizes.items()):
            try:
                self._prefix_locks[d] = lock_prefix(d, self.prefix, self._mode, self._gid)
            except UnsafePath as e:
                raise InitError(str(e)) from None
            except PermissionError as e:
                owner = describe_owner(os.stat(d).st_uid)
                raise InitError(
                    f"cannot write to {d} ({e.strerror or e}; it belongs to "
                    f"{owner}): run memd as a user that can, or chown/chmod "
                    f"{d}"
                ) from None
            except MemdError as e:
                raise InitError(str(e)) from None
            if d != SHM_DIR:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                dir_locks.append(fd)
                if not try_lock(fd, exclusive=True, timeout=2.0):
                    # Our safety rests on the prefix lock; the directory lock is DPDK's
                    # courtesy, so a process that sits on it only delays us.
                    log.warning(
                        "%s stays locked by %s; going on without its lock",
                        d,
                        ", ".join(map(str, holders(fd))) or "another process",
                    )
            own = remove_own_stale(d, self.prefix, take_over=opts.take_over)
            if own.foreign:
                path, uid = own.foreign[0]
                raise InitError(
                    f"{path} has this memd's name but belongs to {describe_owner(uid)}: it "
                    f"is not memd's, and memd would need that name; remove it (and find out "
                    f"who made it), or use another --file-prefix"
                )
            if own.held:
                pids = sorted({h.pid for _, hs in own.held for h in hs})
                where = sorted({str(h) for _, hs in own.held for h in hs})
                raise InitError(
                    f"{len(own.held)} page files of --file-prefix {self.prefix} in {d} are "
                    f"still mapped by {', '.join(where)}: secondaries of a dead primary of "
                    f"this prefix. Stop them (kill {' '.join(map(str, pids))}), or start "
                    "memd with --take-over to leave them on the old memory"
                )
            if own.removed:
                log.info(
                    "removed %d page files (%d MiB) of a dead primary of %s from %s",
                    len(own.removed),
                    own.bytes_freed >> 20,
                    self.prefix,
                    d,
                )
            others = clean_stale(d, skip=self.prefix)
            if others.removed:
                log.info(
                    "removed %d stale page files (%d MiB) of dead prefixes from %s",
                    len(others.removed),
                    others.bytes_freed >> 20,
                    d,
                )
            why = probe_dir(d, page_size)
            if why:
                raise InitError(why)

    def _lock_config(self) -> None:
        """One primary per prefix: an exclusive flock on the config file, held for
        life.  A stale file (its primary died) is replaced by a new inode, so the
        dead primary's secondaries keep their old mapping and never see ours."""
        path = self.config_file
        for _ in range(10):
            try:
                try:
                    fd = create_file(path, self._mode, self._gid)
                except FileExistsError:
                    fd = open_checked(path, os.geteuid(), what="config")
            except FileNotFoundError:
                continue  # a dead primary's, removed by whoever started just before us
            except PermissionError as e:
                if isinstance(e, UnsafePath):
                    raise InitError(str(e)) from None
                raise InitError(
                    f"cannot create {path}: permission denied; run as root or "
                    "pass --runtime-dir to a directory you own"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = self._pid_in(fd)
                os.close(fd)
                raise AlreadyRunning(
                    f"another memd primary (pid {pid}) is running with --file-prefix "
                    f"{self.prefix} in {self.rundir}; stop it (kill {pid}) or use another "
                    "--file-prefix"
                ) from None
            st = os.fstat(fd)
            try:
                same = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if not same:  # someone replaced it between open and flock: start over
                os.close(fd)
                continue
            if st.st_size:
                try:
                    self._check_orphans(fd, st.st_size)
                except BaseException:
                    os.close(fd)
                    raise
                log.info("removing the config of a dead primary (pid %s)", self._pid_in(fd))
                os.unlink(path)
                os.close(fd)
                continue
            os.ftruncate(fd, _ext.CONFIG_SIZE)
            if self._gid is not None:
                os.fchown(fd, -1, self._gid)
            os.fchmod(fd, self._mode)  # after fchown, which may clear mode bits
            self._cfg_fd = fd
            return
        raise InitError(f"{path} keeps changing under us; is another memd starting?")

    def _check_orphans(self, fd: int, size: int) -> None:
        """A dead primary's secondaries may still run, its memory mapped.  Starting
        over under them would leave two generations of memory in use: refuse,
        unless --take-over says they may keep the old memory (their next request
        to us raises PrimaryNotRunning, and they never see our memory)."""
        if size < _ext.CONFIG_SIZE:
            return
        probe = _ext.Window(_ext.CONFIG_SIZE)
        probe.map_fd(0, _ext.CONFIG_SIZE, fd, readonly=True)
        h = header(probe)
        if h.magic != _ext.CONFIG_MAGIC or h.layout_version != _ext.LAYOUT_VERSION:
            return  # half-written, or another memd version's: no process table we can read
        alive = [
            p
            for p in processes(probe)
            if p.state == _ext.PROC_SECONDARY and process_alive(p.pid, p.start_time)
        ]
        del probe
        if not alive:
            return
        pids = ", ".join(str(p.pid) for p in alive)
        if self.options.take_over:
            log.warning(
                "taking over from dead primary pid %d: its secondaries %s keep the "
                "old memory until they detach",
                h.primary_pid,
                pids,
            )
            return
        raise InitError(
            f"the previous primary (pid {h.primary_pid}) of --file-prefix {self.prefix} died, "
            f"but {len(alive)} of its secondaries still run with its memory mapped (pid "
            f"{pids}); stop them (or let them detach), or start memd with --take-over to "
            "leave them on the old memory (their next request fails with PrimaryNotRunning)"
        )

    @staticmethod
    def _pid_in(fd: int) -> int:
        off, size = cast("tuple[int, int]", _ext.LAYOUT["memd_config_header.primary_pid"])
        raw = os.pread(fd, size, off)
        return int.from_bytes(raw, "little", signed=True) if len(raw) == size else 0

    def _requested_mb(self) -> dict[int, int]:
        """MB to preallocate per socket from -m / --socket-mem."""
        opts = self.options
        if opts.socket_mem:
            return {s: mb for s, mb in enumerate(opts.socket_mem) if mb}
        return {0: opts.memory_mb} if opts.memory_mb else {}

    def _plan_lists(self) -> list[_ListPlan]:
        opts = self.options
        if opts.no_huge:
            cap = min(_ext.MAX_PAGES_PER_LIST, MAX_LIST_BYTES // NO_HUGE_PAGE_SIZE)
            return [_ListPlan(NO_HUGE_PAGE_SIZE, 0, cap, "")]
        info = hugepage_info.discover()
        if opts.huge_dir:
            dirs = [hugepage_info.resolve_huge_dir(opts.huge_dir, info=info)]
        else:
            dirs = []
            for size in info.usable_sizes:
                if info.sizes[size].nr_hugepages or info.sizes[size].nr_overcommit_hugepages:
                    dirs.append(hugepage_info.resolve_huge_dir(None, size, info=info))
            if not dirs:  # let resolve/require explain what is missing
                hd = hugepage_info.resolve_huge_dir(None, None, info=info)
                hugepage_info.require_free_pages(hd.page_size, 1, info=info)
                dirs = [hd]
        for hd in dirs:
            hugepage_info.require_free_pages(hd.page_size, 1, info=info)
        want = self._requested_mb()
        if want:
            size = dirs[0].page_size
            for sock, mb in want.items():
                if sock not in info.nodes:
                    raise InitError(
                        f"--socket-mem asks for memory on socket {sock}, but this "
                        f"machine has NUMA nodes {list(info.nodes)}"
                    )
                n = math.ceil(mb * MiB / size)
                hugepage_info.require_free_pages(
                    size, n, node=sock if len(info.nodes) > 1 else None, info=info
                )
        plans = []
        for hd in sorted(dirs, key=lambda d: d.page_size):
            cap = max(1, min(_ext.MAX_PAGES_PER_LIST, MAX_LIST_BYTES // hd.page_size))
            for node in info.nodes:
                plans.append(_ListPlan(hd.page_size, node, cap, hd.path))
        if len(plans) > _ext.MAX_MEMSEG_LISTS:
            plans = plans[: _ext.MAX_MEMSEG_LISTS]
        return plans

    def _lists_of(self, socket_id: int) -> list[MemsegList]:
        return sorted(
            (m for m in self._lists if m.socket_id == socket_id), key=lambda m: m.page_size
        )

    # --- pages -----------------------------------------------------------------

    def _page_iova(self, addr: int) -> int:
        if self.iova_mode != _ext.IOVA_PA:
            return _ext.BAD_IOVA
        phys = pagemap.virt_to_phys(addr)
        return _ext.BAD_IOVA if phys is None else phys

    def _map_new_pages(self, msl: MemsegList, n: int, prealloc: bool) -> int:
        """Create, map and record n pages in one free run of `msl`; returns the first
        slot.  All or nothing: on failure the pages done so far are undone."""
        first = _ext.msl_find_free(self.window, msl.index, n) if n <= msl.capacity else -1
        if first < 0:
            raise MemdMemoryError(f"no room for {n} more pages in memseg list {msl.index}")
        done: list[int] = []
        try:
            for slot in range(first, first + n):
                fd = self.pages.create(msl, slot)
                done.append(slot)
                try:
                    # Populate hugepages now (fail here, not with SIGBUS later); shm
                    # pages fault in on first use like any other memory.
                    addr = self._map_slot(
                        msl, slot, fd=fd, populate=self.pages.dirs[msl.index] != SHM_DIR
                    )
                finally:
                    os.close(fd)
                flags = _ext.SEG_F_PREALLOC if prealloc else 0
                _ext.msl_set_page(
                    self.window, msl.index, slot, self._page_iova(addr), msl.socket_id, flags
                )
                if self.options.huge_unlink:
                    self.pages.remove(msl, slot)
        except (OSError, MemoryError) as e:
            for slot in done:
                self._drop_page(msl, slot)
            size = hugepage_info.kb(msl.page_size)
            err = e if isinstance(e, OSError) else OSError(errno.ENOMEM, str(e) or "no memory")
            why = no_pages_reason(self.pages.dirs[msl.index], msl.page_size, n, err)
            raise MemdMemoryError(f"cannot map {n} pages of {size}: {why}") from e
        self._lists = memseg_lists(self.window)
        return first

    def sync_pages(self) -> tuple[int, int]:
        """The primary maps and unmaps every page itself, so its mappings are
        always current: only refresh the cached lists when the map changed."""
        generation = _ext.mem_generation(self.window)
        if generation != self._synced_generation:
            self._lists = memseg_lists(self.window)
            self._synced_generation = generation
        return 0, 0

    def _drop_page(self, msl: MemsegList, slot: int) -> None:
        if slot in self._mapped.get(msl.index, set()):
            self._unmap_slot(msl, slot)
        with contextlib.suppress(OSError):
            _ext.msl_clear_page(self.window, msl.index, slot)
        self.pages.remove(msl, slot)

    def _prealloc(self) -> None:
        """Dynamic mode: map -m / --socket-mem up front, mark it never to give back."""
        for sock, mb in self._requested_mb().items():
            lists = self._lists_of(sock)
            if not lists:
                raise InitError(f"no memory list for socket {sock}")
            msl = lists[0]
            n = math.ceil(mb * MiB / msl.page_size)
            try:
                first = self._map_new_pages(msl, n, prealloc=True)
            except MemoryError as e:
                raise InitError(str(e)) from e
            self._add_to_heap(sock, msl.base_offset + first * msl.page_size, n * msl.page_size)

    def _add_to_heap(self, heap: int, offset: int, length: int) -> None:
        _ext.heap_lock(self.window, heap)
        try:
            _ext.heap_add_memory(self.window, heap, offset, length)
        finally:
            _ext.heap_unlock(self.window, heap)

    def _init_legacy(self) -> None:
        """--legacy-mem: map every requested page now, sort by physical address and
        place runs of physically contiguous pages at contiguous window offsets,
        leaving a hole between runs so that window-contiguous means iova-contiguous."""
        opts = self.options
        if opts.no_huge:
            self._prealloc()
            return
        msl = self._lists[0]
        want = self._requested_mb()
        info = hugepage_info.discover()
        total = (
            math.ceil(sum(want.values()) * MiB / msl.page_size)
            if want
            else info.sizes[msl.page_size].available
        )
        total = min(total, msl.capacity // 2)
        temp: list[tuple[str, int, mmap.mmap]] = []
        try:
            for i in range(total):
                path = os.path.join(self.pages.dirs[msl.index], legacy_temp_name(self.prefix, i))
                fd = create_file(path, self._mode, self._gid)
                try:
                    os.ftruncate(fd, msl.page_size)
                    mm = mmap.mmap(
                        fd, msl.page_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                    )
                finally:
                    os.close(fd)
                mm[0:1] = b"\0"  # fault the page in so it has a frame
                temp.append((path, pagemap.buffer_address(mm), mm))
            addrs = [a for _, a, _ in temp]
            phys = pagemap.virt_to_phys_many(addrs)
            nodes = pagemap.numa_nodes_of(addrs)
            order = sorted(range(total), key=lambda i: (nodes[i], phys[i] or 0, i))
            slot_by_list: dict[int, int] = {}
            prev: dict[int, int | None] = {}
            for i in order:
                lists = self._lists_of(nodes[i]) or [msl]
                target = lists[0]
                slot = slot_by_list.get(target.index, 0)
                last = prev.get(target.index)
                if last is not None and (phys[i] is None or phys[i] != last + target.page_size):
                    slot += 1  # a hole: the next run is not physically contiguous
                final = self.pages.describe(target, slot)
                os.rename(temp[i][0], final)
                fd = self.pages.open(target, slot)
                try:
                    self._map_slot(target, slot, fd=fd)
                finally:
                    os.close(fd)
                pa = phys[i]
                iova = _ext.BAD_IOVA if pa is None or self.iova_mode != _ext.IOVA_PA else pa
                _ext.msl_set_page(
                    self.window, target.index, slot, iova, target.socket_id, _ext.SEG_F_PREALLOC
                )
                if opts.huge_unlink:
                    self.pages.remove(target, slot)
                prev[target.index] = phys[i]
                slot_by_list[target.index] = slot + 1
        finally:
            for path, _, mm in temp:
                mm.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # still a temp name only if something failed
        self._lists = memseg_lists(self.window)
        for run in self.memseg_runs():
            self._add_to_heap(run["socket_id"], run["offset"], run["length"])

    # --- heap growth (docs/design.md §5; DPDK try_expand_heap_primary) ---------------------

    def _expand_heap(self, heap: int, size: int, align: int, bound: int, contig: bool) -> None:
        """Map enough new pages for `size` into `heap`, tell every secondary to map
        them, and only then let anyone allocate from them (the heap lock is held
        throughout).  Raises MemoryError when no pages can be had."""
        if self.options.legacy_mem:
            raise MemdMemoryError(
                "memd runs with --legacy-mem: all memory was mapped at "
                "start; restart it with a larger -m"
            )
        lists = self._lists_of(heap)
        if not lists:
            raise MemdMemoryError(f"socket {heap} has no memory lists")
        need = space_needed(size, align, bound)
        errors = []
        with self._expand_lock:
            for msl in lists:
                n = math.ceil(need / msl.page_size)
                cap = self.options.max_mem_mb * MiB
                if cap and self._mapped_bytes() + n * msl.page_size > cap:
                    errors.append(
                        f"memd's --max-mem {self.options.max_mem_mb} MB is reached "
                        "(free memory or restart memd with a larger --max-mem)"
                    )
                    continue
                if n > msl.capacity:
                    errors.append(
                        f"{n} pages of {hugepage_info.kb(msl.page_size)} exceed the "
                        f"list's {msl.capacity}"
                    )
                    continue
                _ext.heap_lock(self.window, heap)
                try:
                    try:
                        first = self._map_new_pages(msl, n, prealloc=False)
                    except MemoryError as e:
                        errors.append(str(e))
                        continue
                    offset = msl.base_offset + first * msl.page_size
                    failures = self._sync_secondaries()
                    if failures:
                        for slot in range(first, first + n):
                            self._drop_page(msl, slot)
                        self._sync_secondaries()  # rollback: they unmap what they mapped
                        raise MemdMemoryError(
                            "heap expansion rolled back: secondary "
                            + ", ".join(f"pid {p.pid} ({why})" for p, why in failures)
                        )
                    _ext.heap_add_memory(self.window, heap, offset, n * msl.page_size)
                    log.debug("heap %d grew by %d x %d bytes", heap, n, msl.page_size)
                    return
                finally:
                    _ext.heap_unlock(self.window, heap)
        raise MemdMemoryError(f"cannot grow heap {heap} by {size} bytes: " + "; ".join(errors))

    def _mapped_bytes(self) -> int:
        return sum(m.n_used * m.page_size for m in memseg_lists(self.window))

    def _release_pages(self, heap: int) -> int | None:
        """Give whole free pages that are not preallocated back to the system
        (docs/design.md §5).  Best effort: a failed sync puts them back.
        Returns the free size below which it need not be called again (None:
        let the heap double its threshold)."""
        if self.options.legacy_mem:
            return 2**64 - 1  # legacy memory is all preallocated
        with self._expand_lock:
            for msl in self._lists_of(heap):
                _ext.heap_lock(self.window, heap)
                try:
                    while True:
                        try:
                            off, length = _ext.heap_find_free_pages(
                                self.window, heap, msl.page_size
                            )
                        except OSError:
                            break
                        run = self._releasable_run(msl, off, length)
                        if run is None:
                            break
                        first, n = run
                        start = msl.base_offset + first * msl.page_size
                        _ext.heap_remove_memory(self.window, heap, start, n * msl.page_size)
                        for slot in range(first, first + n):
                            with contextlib.suppress(OSError):
                                _ext.msl_clear_page(self.window, msl.index, slot)
                        failures = self._sync_secondaries()
                        if failures:  # someone could not unmap: keep the pages
                            for slot in range(first, first + n):
                                _ext.msl_set_page(
                                    self.window,
                                    msl.index,
                                    slot,
                                    self._page_iova(self.window.address + start),
                                    msl.socket_id,
                                    0,
                                )
                            _ext.heap_add_memory(self.window, heap, start, n * msl.page_size, True)
                            self._sync_secondaries()
                            break
                        for slot in range(first, first + n):
                            self._unmap_slot(msl, slot)
                            self.pages.remove(msl, slot)
                        self._lists = memseg_lists(self.window)
                finally:
                    _ext.heap_unlock(self.window, heap)
        return None

    def _releasable_run(self, msl: MemsegList, off: int, length: int) -> tuple[int, int] | None:
        """The longest run of non-preallocated pages of `msl` inside [off, +length)."""
        lo, hi = msl.base_offset, msl.base_offset + msl.capacity * msl.page_size
        if not (lo <= off < hi):
            return None
        first = (off - lo) // msl.page_size
        count = length // msl.page_size
        segs = {s: f for s, _, _, f in _ext.segs(self.window, msl.index)}
        best: tuple[int, int] | None = None
        start = None
        for s in [*range(first, first + count), None]:
            ok = s is not None and s in segs and not segs[s] & _ext.SEG_F_PREALLOC
            if ok and start is None:
                start = s
            elif not ok and start is not None:
                assert s is None or s > start
                end = s if s is not None else first + count
                if best is None or end - start > best[1]:
                    best = (start, end - start)
                start = None
        return best

    def _sync_secondaries(self) -> list[tuple[Peer, str]]:
        if self.server is None:
            return []
        self.prune_dead()
        gen = self._header().mem_generation
        return self.server.sync_all({"type": "sync", "generation": gen})

    # --- secondaries ---------------------------------------------------------------

    def prune_dead(self) -> list[int]:
        """Reclaim secondaries whose process is gone; returns their pids.  Their
        pidfds report a death at once (Server.on_death); this periodic check of
        pid + start time is the backstop."""
        gone: list[int] = []
        if self.server is None:
            return gone
        for peer in list(self.server.peers.values()):
            if not process_alive(peer.pid, peer.start_time):
                self._reclaim(peer)
                gone.append(peer.pid)
        return gone

    def _reclaim(self, peer: Peer) -> None:
        """A secondary died: drop its pending requests, return the objects in its
        mempool caches, free its process slot, and record what it still held."""
        assert self.server is not None
        self.server.remove_peer(peer)
        record: dict[str, Any] = {
            "pid": peer.pid,
            "slot": peer.slot,
            "time": time.time(),
            "cached_objects_returned": 0,
        }
        # Each step on its own: a structure that fails (say, a heap found broken)
        # must not stop the rest, nor the daemon.
        try:
            record["cached_objects_returned"] = self.flush_mempool_caches(peer.slot)
        except Exception:
            log.exception("returning pid %d's cached mempool objects failed", peer.pid)
        try:
            record.update(self._held_by(peer.pid))
        except Exception:
            log.exception("counting what pid %d still held failed", peer.pid)
        with contextlib.suppress(OSError):
            _ext.proc_unregister(self.window, peer.slot, peer.pid)
        self.reclaims.append(record)
        log.warning(
            "secondary pid %d (slot %d) died; reclaimed: %s",
            peer.pid,
            peer.slot,
            {k: v for k, v in record.items() if k not in ("pid", "slot", "time")},
        )

    def _held_by(self, pid: int) -> dict[str, Any]:
        """What a dead process still holds: objects out of mempools it took, heap
        blocks it allocated (freed too under --reclaim-heap)."""
        in_hand = {}
        for pool in self.mempools():
            n = pool.held_by(pid)
            if n:
                in_hand[pool.name] = n
        own = self.heap_owners().get(pid, {})
        out = {
            "mempool_objects_in_hand": in_hand,
            "heap_blocks": own.get("blocks", 0),
            "heap_bytes": own.get("bytes", 0),
            "heap_freed": False,
        }
        if own.get("blocks") and self.options.reclaim_heap:
            self.free_owned_by(pid, force=True)
            out["heap_freed"] = True
        return out

    def _handlers(self) -> dict[str, Any]:
        return {
            "register": self._on_register,
            "unregister": self._on_unregister,
            "alloc": self._on_alloc,
            "shrink": self._on_shrink,
            "ping": self._on_ping,
        }

    def _on_register(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """register {pid, start_time, version, comm} -> {slot, generation}.
        Sent on the secondary's sync socket, whose identity the primary keeps."""
        pid = param(msg, "pid", int, 1, 2**31 - 1)
        start = param(msg, "start_time", int, 0, 2**63)
        version = param(msg, "version", int, 0, 2**31)
        name = msg.get("comm", "")
        if not isinstance(name, str):
            name = ""
        # the slot keeps 31 bytes of C string: no NUL, and cut between characters, or
        # every later processes() would fail to decode it
        name = name.replace("\0", "").encode()[:31].decode(errors="ignore")
        if version != PROTOCOL_VERSION:
            return reply(
                msg["id"],
                errno.EPROTONOSUPPORT,
                f"protocol version {version} != primary's {PROTOCOL_VERSION}; "
                "use the same memd version on both sides",
            )
        if not identity.startswith(b"sync-"):
            return reply(msg["id"], errno.EINVAL, "register from the sync socket")
        assert self.server is not None
        cred = self.server.current_cred
        if cred is not None and cred.pid != pid:
            return reply(
                msg["id"], errno.EPERM, f"register names pid {pid} but was sent by pid {cred.pid}"
            )
        pidfd = watch_process(pid, start)
        if pidfd is None:
            return reply(msg["id"], errno.ESRCH, f"pid {pid} is not a live process")
        old = self.server.peers.get(identity)
        if old is not None:
            self.server.remove_peer(old)
            with contextlib.suppress(OSError):
                _ext.proc_unregister(self.window, old.slot, old.pid)
        try:
            slot = _ext.proc_register(self.window, pid, start, _ext.PROC_SECONDARY, name)
        except OSError:
            self.prune_dead()
            try:
                slot = _ext.proc_register(self.window, pid, start, _ext.PROC_SECONDARY, name)
            except OSError:
                if pidfd >= 0:
                    os.close(pidfd)
                return reply(
                    msg["id"],
                    errno.EUSERS,
                    f"all {_ext.MAX_PROCS - 1} secondary slots are taken; detach unused processes",
                )
        self.server.add_peer(Peer(identity, slot, pid, start, pidfd))
        log.info("secondary pid %d attached in slot %d", pid, slot)
        # Page directories travel here, from our own memory: a secondary never takes
        # a path from shared memory, which any attached process can write.
        return reply(
            msg["id"],
            slot=slot,
            generation=self._header().mem_generation,
            page_dirs=sorted(self.pages.dirs.items()),
        )

    def _on_unregister(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """unregister {} -> {}: the secondary detaches; its slot is freed."""
        assert self.server is not None
        peer = self.server.peer_of(identity)
        if peer is None:
            return reply(msg["id"], errno.ENOENT, "not registered")
        self.server.remove_peer(peer)
        with contextlib.suppress(OSError):
            _ext.proc_unregister(self.window, peer.slot, peer.pid)
        log.info("secondary pid %d detached from slot %d", peer.pid, peer.slot)
        return reply(msg["id"])

    def _on_alloc(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """alloc {heap, size, align, bound, contig} -> {}: grow `heap` so that a
        block of `size` fits; every secondary has mapped the pages when this answers."""
        assert self.server is not None
        if self.server.peer_of(identity) is None:
            return reply(msg["id"], errno.EPERM, "register first")
        heap = param(msg, "heap", int, 0, _ext.MAX_HEAPS - 1)
        size = param(msg, "size", int, 1, 2**48)
        align = param(msg, "align", int, 0, 2**30)
        bound = param(msg, "bound", int, 0, 2**48)
        if align & (align - 1):  # what malloc and memzone_reserve accept, nothing else
            return reply(msg["id"], errno.EINVAL, f"'align' = {align} is not 0 or a power of two")
        if bound and (bound & (bound - 1) or bound < size):
            return reply(
                msg["id"],
                errno.EINVAL,
                f"'bound' = {bound} is not 0 or a power of two >= 'size' {size}",
            )
        contig = bool(msg.get("contig", False))
        if heap not in self.heap_ids():
            return reply(msg["id"], errno.EINVAL, f"no heap {heap}")
        self._expand_heap(heap, size, align, bound, contig)
        return reply(msg["id"])

    def _on_shrink(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """shrink {heap} -> {}: give whole free pages of `heap` back to the system."""
        assert self.server is not None
        if self.server.peer_of(identity) is None:
            return reply(msg["id"], errno.EPERM, "register first")
        heap = param(msg, "heap", int, 0, _ext.MAX_HEAPS - 1)
        if heap not in self.heap_ids():
            return reply(msg["id"], errno.EINVAL, f"no heap {heap}")
        self._release_pages(heap)
        return reply(msg["id"])

    def _on_ping(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """ping {} -> {pid}: liveness."""
        return reply(msg["id"], pid=os.getpid())

    # --- running -------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> int:
        """Serve requests for up to `timeout` seconds; returns how many."""
        if self.server is None:
            return 0
        return self.server.poll_once(int(timeout * 1000))

    def serve(self, stop: threading.Event, tick: float = 0.2, on_tick: Any = None) -> None:
        """Serve until `stop` is set; `on_tick()` runs between polls."""
        last_prune = time.monotonic()
        while not stop.is_set():
            self.poll(tick)
            now = time.monotonic()
            if now - last_prune >= 1.0:
                self.prune_dead()
                last_prune = now
            if on_tick is not None:
                on_tick()

    def params(self) -> list[str]:
        return list(self.options.argv)

    def close(self) -> None:
        """Clean shutdown: refuse new attaches, tell secondaries, give every page
        back and remove every file this primary made."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            _ext.config_set_state(self.window, _ext.STATE_SHUTDOWN)
        if self.server is not None:
            for peer in list(self.server.peers.values()):
                self.server.send(peer.identity, {"type": "shutdown", "id": 0})
        self._teardown(remove_files=True)

    def _teardown(self, remove_files: bool) -> None:
        self._closed = True
        if self.server is not None:
            self.server.close()
            self.server = None
        window = getattr(self, "window", None)
        if window is not None:
            for msl in self._lists:
                for slot in sorted(self._mapped.get(msl.index, set())):
                    with contextlib.suppress(OSError):
                        self._unmap_slot(msl, slot)
                    if remove_files:
                        self.pages.remove(msl, slot)
        if remove_files and self._cfg_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                self.config_file.unlink()
            # exactly what we made: the socket, then each directory if it is empty
            sockdir = socket_dir(self.prefix, self.rundir)
            with contextlib.suppress(OSError):
                (sockdir / "mp_socket").unlink()
            for made in (sockdir, sockdir.parent):
                with contextlib.suppress(OSError):
                    made.rmdir()
        for page_dir, fd in self._prefix_locks.items():
            if remove_files:
                unlock_prefix(page_dir, self.prefix, fd)
            else:
                os.close(fd)
        self._prefix_locks = {}
        if self._cfg_fd >= 0:
            os.close(self._cfg_fd)  # releases the primary lock
            self._cfg_fd = -1

    def __enter__(self) -> Primary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memory_summary(p: Primary) -> dict[str, Any]:
    """One line of state for SIGHUP and STATUS=."""
    info = p.info()
    return {
        "prefix": info["prefix"],
        "mapped_mb": info["mapped_bytes"] >> 20,
        "memzones": len(p.memzones()),
        "secondaries": len(p.server.peers) if p.server else 0,
    }


__all__ = ["AlreadyRunning", "InitError", "Options", "Primary", "memory_summary"]
