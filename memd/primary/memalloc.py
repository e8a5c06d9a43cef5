"""Pages (DPDK `eal_memory.c`/`eal_memalloc.c`): plan the memseg lists, claim the page
directories, reserve the window, and create, map and drop pages, in dynamic and legacy
mode.  Heap growth, which decides *when* pages come and go, is `memd.mp.malloc_mp`."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import mmap
import os
from dataclasses import dataclass

from memd import _ext
from memd.errors import MemdError, MemdMemoryError
from memd.files import (
    UnsafePath,
    create_file,
    describe_owner,
    holders,
    try_lock,
)
from memd.hw import hugepage_info, pagemap
from memd.paths import SHM_DIR, legacy_temp_name
from memd.primary.state import InitError, MiB, Options, PrimaryState
from memd.shm.config import (
    MemsegList,
    memseg_lists,
    proc_start_time,
)
from memd.shm.pages import (
    clean_stale,
    lock_prefix,
    no_pages_reason,
    probe_dir,
    remove_own_stale,
)

log = logging.getLogger("memd")

GiB = 1 << 30
NO_HUGE_PAGE_SIZE = 2 * MiB  # --no-huge "pages": one shm object each
MAX_LIST_BYTES = 32 * GiB  # DPDK RTE_MAX_MEM_MB_PER_LIST


@dataclass
class _ListPlan:
    page_size: int
    socket_id: int
    capacity: int
    dir: str
    base_offset: int = 0


def list_capacity(page_size: int) -> int:
    """Pages a memseg list of `page_size` pages holds (DPDK: RTE_MAX_MEMSEG_PER_LIST,
    and at most RTE_MAX_MEM_MB_PER_LIST of memory)."""
    return max(1, min(_ext.MAX_PAGES_PER_LIST, MAX_LIST_BYTES // page_size))


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def requested_mb(opts: Options) -> dict[int, int]:
    """MB to preallocate per socket from -m / --socket-mem."""
    if opts.socket_mem:
        return {s: mb for s, mb in enumerate(opts.socket_mem) if mb}
    return {0: opts.memory_mb} if opts.memory_mb else {}


def plan_lists(opts: Options, info: hugepage_info.HugepageInfo | None) -> list[_ListPlan]:
    """The memseg lists for these options on a machine with these hugepages (`info`,
    None with --no-huge): one per page size and NUMA node, or one shm list.  Raises
    InitError or HugepageConfigError when the machine cannot give what they ask."""
    if opts.no_huge or info is None:
        return [_ListPlan(NO_HUGE_PAGE_SIZE, 0, list_capacity(NO_HUGE_PAGE_SIZE), "")]
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
    want = requested_mb(opts)
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
        for node in info.nodes:
            plans.append(_ListPlan(hd.page_size, node, list_capacity(hd.page_size), hd.path))
    if len(plans) > _ext.MAX_MEMSEG_LISTS:
        plans = plans[: _ext.MAX_MEMSEG_LISTS]
    return plans


class MemallocMixin(PrimaryState):
    """The window, the page directories, and pages made, mapped and dropped."""

    def _init_memory(self, plans: list[_ListPlan]) -> None:
        opts = self.options

        # Every process places the window at a multiple of MAX_ALIGN (address space
        # only), so an offset aligned to up to that is an aligned address everywhere.
        largest_page = max(p.page_size for p in plans)
        window_align = max(largest_page, _ext.MAX_ALIGN)
        cursor = _ext.CONFIG_SIZE
        for p in plans:
            cursor = _round_up(cursor, p.page_size)
            p.base_offset = cursor
            cursor += p.capacity * p.page_size
        window_size = _round_up(cursor, largest_page)
        if opts.base_virtaddr % window_align:
            raise InitError(
                f"--base-virtaddr {opts.base_virtaddr:#x} is not a multiple of "
                f"{window_align >> 20} MiB: memd aligns the window to that so that "
                "alignments up to it hold in every process"
            )
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
            | (_ext.CFG_F_HUGE_UNLINK if opts.huge_unlink == "always" else 0)
            | (_ext.CFG_F_IN_MEMORY if opts.in_memory else 0)
            # dynamic memory: one file per memseg list (DPDK's --single-file-segments);
            # legacy memory keeps a file per page, placed by physical address
            | (0 if opts.legacy_mem else _ext.CFG_F_SINGLE_FILE)
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
            self._list_fds = self._map_lists(create=True)
            if opts.huge_unlink == "always":
                for msl in self._lists:
                    self.pages.remove_list(msl)
            self._prealloc()
            if self.pages.reuse:
                # a kept file may hold pages a previous run left in slots this
                # run does not use (released, or grown when it was killed)
                try:
                    self._punch_unused("a previous run left")
                except OSError as e:
                    raise InitError(f"cannot give back the unused pages of a kept file: {e}") from e

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
            own = remove_own_stale(
                d, self.prefix, take_over=opts.take_over, keep_pages=self.pages.reuse
            )
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
        if self.single_file:
            self._allocate_in_list(msl, first, n, prealloc)
            return first
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
                if self.options.huge_unlink == "always":
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

    def _allocate_in_list(self, msl: MemsegList, first: int, n: int, prealloc: bool) -> None:
        """Single-file lists: give slots [first, first+n) pages in the list's file
        (every process sees them through its mapping of the file) and mark them
        used.  All or nothing."""
        fd = self._list_fds[msl.index]
        ps = msl.page_size
        try:
            _ext.fallocate(fd, first * ps, n * ps)
        except OSError as e:
            with contextlib.suppress(OSError):
                _ext.fallocate(fd, first * ps, n * ps, punch=True)
            size = hugepage_info.kb(ps)
            why = no_pages_reason(self.pages.dirs[msl.index], ps, n, e)
            raise MemdMemoryError(f"cannot map {n} pages of {size}: {why}") from e
        flags = _ext.SEG_F_PREALLOC if prealloc else 0
        for slot in range(first, first + n):
            offset = msl.base_offset + slot * ps
            iova = _ext.BAD_IOVA
            if self.iova_mode == _ext.IOVA_PA:
                self.window.touch(offset, ps, ps)  # into our page table, for pagemap
                iova = self._page_iova(self.window.address + offset)
            _ext.msl_set_page(self.window, msl.index, slot, iova, msl.socket_id, flags)
            self._mapped.setdefault(msl.index, set()).add(slot)
        self._lists = memseg_lists(self.window)

    def _free_in_list(self, msl: MemsegList, first: int, n: int) -> None:
        """Single-file lists: give the pages of slots [first, first+n) back (punch
        them out of the file; every mapping loses them) and mark them unused.
        With --huge-unlink=never the pages stay in the file for the next run."""
        for slot in range(first, first + n):
            with contextlib.suppress(OSError):
                _ext.msl_clear_page(self.window, msl.index, slot)
            self._mapped.get(msl.index, set()).discard(slot)
        if not self.pages.reuse:
            ps = msl.page_size
            _ext.fallocate(self._list_fds[msl.index], first * ps, n * ps, punch=True)
        self._lists = memseg_lists(self.window)

    def _punch_unused(self, what: str) -> None:
        """--huge-unlink=never: punch every slot the memseg lists do not mark used
        out of the kept list files, so that they hold only the pages in use (the
        used ones keep their data, for the next run).  Called once the
        preallocated pages are in (at start) and at a clean stop; pages released
        while memd runs stay in the file until then.  Raises OSError (naming the
        file) when a file refuses the punch."""
        for msl in self._lists:
            fd = self._list_fds.get(msl.index)
            if fd is None:
                continue
            used = {slot for slot, *_ in _ext.segs(self.window, msl.index)}
            ps = msl.page_size
            before = os.fstat(fd).st_blocks * 512
            slot = 0
            while slot < msl.capacity:
                end = slot
                while end < msl.capacity and end not in used:
                    end += 1
                if end > slot:
                    try:
                        _ext.fallocate(fd, slot * ps, (end - slot) * ps, punch=True)
                    except OSError as e:
                        raise OSError(e.errno, e.strerror, self.pages.list_path(msl)) from e
                slot = end + 1
            freed = before - os.fstat(fd).st_blocks * 512
            if freed > 0:
                log.info(
                    "gave back %d MiB %s in unused slots of %s",
                    freed >> 20,
                    what,
                    self.pages.list_path(msl),
                )

    def sync_pages(self) -> tuple[int, int]:
        """The primary maps and unmaps every page itself, so its mappings are
        always current: only refresh the cached lists when the map changed."""
        generation = _ext.mem_generation(self.window)
        if generation != self._synced_generation:
            self._lists = memseg_lists(self.window)
            self._synced_generation = generation
        return 0, 0

    def _drop_page(self, msl: MemsegList, slot: int) -> None:
        if self.single_file:
            self._free_in_list(msl, slot, 1)
            return
        if slot in self._mapped.get(msl.index, set()):
            self._unmap_slot(msl, slot)
        with contextlib.suppress(OSError):
            _ext.msl_clear_page(self.window, msl.index, slot)
        self.pages.remove(msl, slot)

    def _prealloc(self) -> None:
        """Dynamic mode: map -m / --socket-mem up front, mark it never to give back."""
        for sock, mb in requested_mb(self.options).items():
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
            _ext.heap_add_memory(self.window, heap, offset, length, self.pages.reuse)
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
        want = requested_mb(self.options)
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
                if opts.huge_unlink == "always":
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

    def _mapped_bytes(self) -> int:
        return sum(m.n_used * m.page_size for m in memseg_lists(self.window))
