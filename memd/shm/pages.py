"""The files behind pages: hugetlbfs files (`<huge-dir>/<prefix>map_<n>`) or, with
--no-huge, POSIX shared-memory objects (`/dev/shm/<prefix>map_<n>`).

Locking follows DPDK: whoever maps a page file holds a shared ``flock`` on it for
as long as it is mapped (the lock lives in the open file, which the mapping keeps
open), so a page file nobody holds is stale.  Each primary also holds
`<dir>/<prefix>.memd-lock` exclusively for its life: one primary per prefix and
directory, host-wide, whatever its runtime dir.  Stale files are removed only
under that lock, and only if nobody holds them.  Only the primary creates and
removes page files; secondaries open them to map the same pages."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field

from memd import _ext
from memd.errors import MemdError
from memd.files import (
    NOFOLLOW,
    Holder,
    UnsafePath,
    create_file,
    describe_owner,
    holders,
    open_checked,
    try_lock,
)
from memd.paths import (
    SHM_DIR,
    page_file_name,
    page_file_number,
    parse_memd_name,
    prefix_lock_name,
)
from memd.shm.config import MemsegList

log = logging.getLogger("memd")

HOLDER_WAIT = 1.0  # s: a cleaner holds a lock for milliseconds; a primary for its life


class PrefixInUse(MemdError, RuntimeError):
    """A live process holds this prefix's files in a page directory."""


class PageStore:
    """The page files of one prefix.  `dirs` maps each memseg list to its directory;
    it comes from the process's own knowledge (the primary's plan, the primary's
    reply to a secondary), never from shared memory, which others may write."""

    def __init__(
        self, prefix: str, mode: int = 0o600, gid: int | None = None, owner: int | None = None
    ) -> None:
        self.prefix = prefix
        self.mode = mode
        self.gid = gid
        self.owner = os.geteuid() if owner is None else owner
        self.dirs: dict[int, str] = {}
        self._devs: dict[int, int] = {}
        # --huge-unlink=never: page files outlive their pages and the primary, and a
        # new page reuses the file a previous run left (its old data included)
        self.reuse = False
        # --in-memory: list files are memfds (no name, nothing left by a crash)
        self.in_memory = False

    def set_dir(self, index: int, directory: str) -> None:
        """Page files of memseg list `index` live in `directory` (SHM_DIR for shm)."""
        self.dirs[index] = directory
        self._devs[index] = os.stat(directory).st_dev

    def _number(self, msl: MemsegList, slot: int) -> int:
        return page_file_number(msl.index, slot, _ext.MAX_PAGES_PER_LIST)

    def path(self, msl: MemsegList, slot: int) -> str:
        try:
            directory = self.dirs[msl.index]
        except KeyError:
            raise MemdError(
                f"memseg list {msl.index} has no page directory here; detach and attach again"
            ) from None
        return os.path.join(directory, page_file_name(self.prefix, self._number(msl, slot)))

    describe = path

    def create(self, msl: MemsegList, slot: int) -> int:
        """Create the page's file (exclusively, never through a symlink) sized to
        one page, locked shared; returns an fd.  With ``reuse``, a file a previous
        run left there is taken instead, if it is this uid's, one page long, and
        nobody maps it (raises OSError EBUSY if somebody does)."""
        path = self.path(msl, slot)
        try:
            fd = create_file(path, self.mode, self.gid, size=msl.page_size)
        except FileExistsError:
            if not self.reuse:
                raise
            fd = open_checked(
                path, self.owner, size=msl.page_size, dev=self._devs[msl.index], what="page file"
            )
            if not try_lock(fd, exclusive=True):
                os.close(fd)
                raise OSError(
                    errno.EBUSY, f"{path} is still mapped by another process", path
                ) from None
        fcntl.flock(fd, fcntl.LOCK_SH)  # ours alone until now: nobody else holds it
        return fd

    def open(self, msl: MemsegList, slot: int) -> int:
        """Open an existing page file to map it, locked shared.  It must be a
        regular file of the daemon's uid, one page long, on the list's filesystem.
        Raises UnsafePath (a PermissionError) or OSError otherwise."""
        path = self.path(msl, slot)
        fd = open_checked(
            path, self.owner, size=msl.page_size, dev=self._devs[msl.index], what="page file"
        )
        if not try_lock(fd, exclusive=False, timeout=HOLDER_WAIT):
            os.close(fd)
            raise OSError(errno.EAGAIN, f"{path} is locked by a cleaner; try again", path)
        return fd

    # --- one file per memseg list (the dynamic layout) ---------------------------
    # A list's file is as long as the list (capacity x page size) and holds each
    # page at its slot's offset; only allocated slots have pages, the rest are holes.

    def list_path(self, msl: MemsegList) -> str:
        return self.path_of(msl, msl.index)

    def path_of(self, msl: MemsegList, number: int) -> str:
        try:
            directory = self.dirs[msl.index]
        except KeyError:
            raise MemdError(
                f"memseg list {msl.index} has no page directory here; detach and attach again"
            ) from None
        return os.path.join(directory, page_file_name(self.prefix, number))

    def create_list(self, msl: MemsegList) -> int:
        """Create the list's file (exclusively, never through a symlink), sized to the
        list and holding no page yet, locked shared; returns an fd.  With ``reuse``,
        a file of that size a previous run left is taken (raises OSError EBUSY if a
        process still maps it)."""
        size = msl.capacity * msl.page_size
        if self.in_memory:
            return self._create_memfd(msl, size)
        path = self.list_path(msl)
        try:
            fd = create_file(path, self.mode, self.gid, size=size)
        except FileExistsError:
            if not self.reuse:
                raise
            fd = open_checked(
                path, self.owner, size=size, dev=self._devs[msl.index], what="page file"
            )
            if not try_lock(fd, exclusive=True):
                os.close(fd)
                raise OSError(
                    errno.EBUSY, f"{path} is still mapped by another process", path
                ) from None
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def _create_memfd(self, msl: MemsegList, size: int) -> int:
        """--in-memory (DPDK's name): the list's file is a memfd, hugetlb-backed with
        pages of the list's size unless the list is shm (--no-huge).  It has no
        name, so no crash can leave it behind; secondaries get it over the fd
        socket (memd/mp/fd_pass.py)."""
        flags = os.MFD_CLOEXEC
        if self.dirs.get(msl.index) != SHM_DIR:
            shift = msl.page_size.bit_length() - 1
            flags |= os.MFD_HUGETLB | (shift << os.MFD_HUGE_SHIFT)
        fd = os.memfd_create(f"{self.prefix}map_{msl.index}", flags)
        try:
            os.ftruncate(fd, size)
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_list(self, msl: MemsegList) -> int:
        """Open the list's file to map it, locked shared: a regular file of the
        daemon's uid, as long as the list, on the list's filesystem.  Raises
        UnsafePath (a PermissionError) or OSError otherwise."""
        path = self.list_path(msl)
        fd = open_checked(
            path,
            self.owner,
            size=msl.capacity * msl.page_size,
            dev=self._devs[msl.index],
            what="page file",
        )
        if not try_lock(fd, exclusive=False, timeout=HOLDER_WAIT):
            os.close(fd)
            raise OSError(errno.EAGAIN, f"{path} is locked by a cleaner; try again", path)
        return fd

    def remove_list(self, msl: MemsegList) -> None:
        """Unlink the list's file (kept with ``reuse``; a memfd has none)."""
        if self.reuse or self.in_memory:
            return
        with contextlib.suppress(FileNotFoundError, KeyError):
            os.unlink(self.list_path(msl))

    def remove(self, msl: MemsegList, slot: int) -> None:
        """Unlink the page's file (kept with ``reuse``: the next run takes it)."""
        if self.reuse:
            return
        with contextlib.suppress(FileNotFoundError, KeyError):
            os.unlink(self.path(msl, slot))


# --- one primary per prefix and directory -----------------------------------------------


def lock_prefix(directory: str, prefix: str, mode: int, gid: int | None) -> int:
    """Take `<directory>/<prefix>.memd-lock` exclusively; returns its fd (hold it for
    life; `unlock_prefix` at a clean exit).  Raises PrefixInUse naming the primary
    that holds it, or UnsafePath if the file is not ours."""
    path = os.path.join(directory, prefix_lock_name(prefix))
    for _ in range(10):
        try:
            fd = create_file(path, mode, gid, os.O_RDONLY)
        except FileExistsError:
            try:
                fd = open_checked(path, os.geteuid(), os.O_RDONLY, what="prefix lock")
            except FileNotFoundError:
                continue  # its holder just removed it
        if not try_lock(fd, exclusive=True, timeout=HOLDER_WAIT):
            who = holders(fd, prefix)
            os.close(fd)
            names = ", ".join(map(str, who)) or "another process"
            raise PrefixInUse(
                f"--file-prefix {prefix} is in use on {directory} by another memd primary "
                f"({names}); stop it, or give this memd another --file-prefix"
            )
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # removed or replaced while we waited: start over
    raise PrefixInUse(f"{path} keeps changing; is another memd starting with this prefix?")


KEEP_MARK = b"keep\n"  # in a prefix lock: its page files are kept for reuse


def unlock_prefix(directory: str, prefix: str, fd: int, keep: bool = False) -> None:
    """Close the prefix lock, removing it (still held) unless page files of the
    prefix that are ours are left: it marks them as memd's for a later clean.
    Somebody else's file of that name (a squat) does not keep it.  `keep`
    (--huge-unlink=never): the lock says so (KEEP_MARK), and cleaners of dead
    prefixes leave the files for the prefix's next run."""
    path = os.path.join(directory, prefix_lock_name(prefix))
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            wfd = os.open(path, os.O_WRONLY | os.O_TRUNC | NOFOLLOW | os.O_NONBLOCK)
            try:
                if os.fstat(wfd).st_ino == os.fstat(fd).st_ino and keep:
                    os.write(wfd, KEEP_MARK)
            finally:
                os.close(wfd)
    kinds = _memd_files(directory).get(prefix, {})
    ours = os.fstat(fd).st_uid

    def owned(name: str) -> bool:
        try:
            return os.lstat(os.path.join(directory, name)).st_uid == ours
        except OSError:
            return False

    if not any(owned(n) for n in kinds.get("page", []) + kinds.get("temp", [])):
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
    os.close(fd)


# --- stale files ---------------------------------------------------------------------------


@dataclass
class CleanReport:
    """What a scan for stale page files did."""

    removed: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes it held)
    held: list[tuple[str, list[Holder]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    foreign: list[tuple[str, int]] = field(default_factory=list)  # (path, owner uid)

    @property
    def bytes_freed(self) -> int:
        return sum(n for _, n in self.removed)

    def merge(self, other: CleanReport) -> None:
        self.removed += other.removed
        self.held += other.held
        self.skipped += other.skipped
        self.foreign += other.foreign

    def as_dict(self) -> dict[str, object]:
        return {
            "removed": [{"path": p, "bytes": n} for p, n in self.removed],
            "bytes_freed": self.bytes_freed,
            "held": [{"path": p, "holders": [h.pid for h in hs]} for p, hs in self.held],
            "skipped": [{"path": p, "reason": why} for p, why in self.skipped]
            + [
                {"path": p, "reason": f"belongs to uid {uid}, not to its prefix lock's owner"}
                for p, uid in self.foreign
            ],
        }


def _memd_files(directory: str) -> dict[str, dict[str, list[str]]]:
    """prefix -> kind -> names of memd's own files in `directory`."""
    found: dict[str, dict[str, list[str]]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        parsed = parse_memd_name(name)
        if parsed is not None:
            prefix, kind = parsed
            found.setdefault(prefix, {}).setdefault(kind, []).append(name)
    return found


def _remove_if_unheld(
    path: str,
    report: CleanReport,
    prefix: str,
    owner: int,
    force: bool = False,
    keep: bool = False,
) -> bool:
    """Unlink `path` if it is `owner`'s and nobody holds a lock on it (or, with
    `force`, if it is held: its holders keep their mappings).  True if removed.
    `keep`: only judge it (foreign, held), remove nothing that nobody holds."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    except OSError as e:
        report.skipped.append((path, e.strerror or str(e)))
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            report.skipped.append((path, "not a regular file"))
            return False
        if st.st_uid != owner:  # not made by whoever made the prefix lock: not memd's
            report.foreign.append((path, st.st_uid))
            return False
        if not try_lock(fd, exclusive=True):
            who = holders(fd, prefix, mapped=True)
            if not force:
                report.held.append((path, who))
                return False
        elif keep:
            return False
        try:
            if os.stat(path).st_ino != st.st_ino:
                return False  # replaced since we opened it: not the file we judged
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError as e:
            report.skipped.append((path, f"cannot remove: {e.strerror}"))
            return False
        # what it held (a memseg list's file is mostly holes), not its apparent size
        report.removed.append((path, st.st_blocks * 512))
        return True
    finally:
        os.close(fd)


def remove_own_stale(
    directory: str, prefix: str, *, take_over: bool, keep_pages: bool = False
) -> CleanReport:
    """With this prefix's lock held: remove its page files that nobody holds.  Files
    a live process still maps (a dead primary's secondaries) are left and reported,
    or with `take_over` unlinked under them (they keep their mappings).
    `keep_pages` (--huge-unlink=never): page files nobody holds stay, for reuse."""
    report = CleanReport()
    kinds = _memd_files(directory).get(prefix, {})
    for name in kinds.get("page", []):
        _remove_if_unheld(
            os.path.join(directory, name),
            report,
            prefix,
            os.geteuid(),
            force=take_over,
            keep=keep_pages,
        )
    for name in kinds.get("temp", []):
        _remove_if_unheld(
            os.path.join(directory, name), report, prefix, os.geteuid(), force=take_over
        )
    return report


def clean_stale(directory: str, skip: str | None = None) -> CleanReport:
    """Remove the page files of every memd prefix in `directory` that no live
    process holds; `skip` names a prefix not to touch (our own).  A prefix counts
    as memd's only with its lock file there, and is passed over while a primary
    holds that lock; the lock file goes last, once no page file of it is left."""
    report = CleanReport()
    for prefix, kinds in sorted(_memd_files(directory).items()):
        if prefix == skip or "lock" not in kinds:
            continue  # ours, or not memd's (DPDK uses the same page names)
        lock_path = os.path.join(directory, prefix_lock_name(prefix))
        try:
            lock_fd = os.open(lock_path, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            report.skipped.append((lock_path, e.strerror or str(e)))
            continue
        try:
            lock_st = os.fstat(lock_fd)
            if not stat.S_ISREG(lock_st.st_mode) or not try_lock(lock_fd, exclusive=True):
                continue  # a live primary's
            if os.pread(lock_fd, len(KEEP_MARK), 0) == KEEP_MARK:
                report.skipped.append((lock_path, "kept for reuse (--huge-unlink=never)"))
                continue
            # anyone may create a lock file in /dev/shm: it vouches only for its
            # owner's files, which that owner could remove anyway
            left = [
                name
                for name in kinds.get("page", []) + kinds.get("temp", [])
                if not _remove_if_unheld(
                    os.path.join(directory, name), report, prefix, lock_st.st_uid
                )
            ]
            if not left:
                with contextlib.suppress(OSError):
                    if os.stat(lock_path).st_ino == os.fstat(lock_fd).st_ino:
                        os.unlink(lock_path)
                        report.removed.append((lock_path, 0))
        finally:
            os.close(lock_fd)
    return report


def clean_all() -> CleanReport:
    """`clean_stale` in every hugetlbfs mount and /dev/shm: free the memory of memd
    instances that died and never came back (`memctl hugepages --clean`)."""
    from memd.hw.hugepage_info import hugetlbfs_mounts

    report = CleanReport()
    for directory in [*sorted({m.mount_point for m in hugetlbfs_mounts()}), SHM_DIR]:
        report.merge(clean_stale(directory))
    return report


# --- can this directory give us pages? ------------------------------------------------------


def no_pages_reason(directory: str, page_size: int, wanted: int, error: OSError) -> str:
    """Why `wanted` pages of `page_size` could not be had in `directory`, in words
    that say what to do: permissions, a hugetlbfs mount's size= limit (statfs
    reports blocks only for a mount that has one), a full /dev/shm, or the pool."""
    from memd.hw.hugepage_info import kb, size_sysfs_dir

    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        owner = "?"
        with contextlib.suppress(OSError):
            owner = describe_owner(os.stat(directory).st_uid)
        return (
            f"cannot write to {directory} ({error.strerror}; it belongs to {owner}): run "
            f"memd as a user that can, or chown/chmod {directory}"
        )
    if error.errno == errno.EEXIST:
        path = error.filename or directory
        owner = "?"
        with contextlib.suppress(OSError):
            owner = describe_owner(os.lstat(path).st_uid)
        return (
            f"{path} already exists (made by {owner}), but only this memd may make that "
            "name: remove it (and find out who made it), or use another --file-prefix"
        )
    if directory == SHM_DIR:
        return f"the shm filesystem ({SHM_DIR}) is full ({error.strerror}): free memory"
    st = None
    with contextlib.suppress(OSError):
        st = os.statvfs(directory)
    if st is not None and st.f_blocks and st.f_bfree < wanted:
        return (
            f"the hugetlbfs mount {directory} holds {st.f_blocks} pages (its size= "
            f"limit) and {st.f_bfree} are free: remount it with a larger size= "
            "(mount -o remount,size=...) or free memory"
        )
    nr = os.path.join(size_sysfs_dir(page_size), "nr_hugepages")
    return (
        f"no free {kb(page_size)} hugepages ({error.strerror}): reserve more, "
        f"echo N > {nr} (or memctl hugepages --reserve), or free memory"
    )


# Pages larger than this are probed by reservation only: faulting one in zeroes it
# (a 1 GiB page took the primary's start 6-12 s on a busy host).
PROBE_POPULATE_MAX = 2 << 20


def probe_dir(directory: str, page_size: int) -> str | None:
    """Create, size and map one page in `directory`, then give it back.  None if
    that works, else why not (`no_pages_reason`).  A page of at most
    PROBE_POPULATE_MAX is faulted in (MAP_POPULATE); a larger one is only
    reserved: hugetlbfs reserves a shared mapping's pages at mmap, refusing it
    (ENOMEM) when the pool has none, without zeroing a page."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None  # no O_TMPFILE on this kernel's hugetlbfs: the first page will tell
        return no_pages_reason(directory, page_size, 1, e)
    try:
        os.ftruncate(fd, page_size)
        flags = mmap.MAP_SHARED
        if page_size <= PROBE_POPULATE_MAX:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, page_size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        mm.close()
        return None
    except OSError as e:
        return no_pages_reason(directory, page_size, 1, e)
    finally:
        os.close(fd)


__all__ = [
    "CleanReport",
    "PageStore",
    "PrefixInUse",
    "UnsafePath",
    "check_list_fd",
    "clean_all",
    "clean_stale",
    "lock_prefix",
    "no_pages_reason",
    "probe_dir",
    "remove_own_stale",
    "unlock_prefix",
]


def check_list_fd(fd: int, owner: int, size: int, page_size: int, huge: bool) -> None:
    """A handed-over list file must be a regular file (hugetlbfs, tmpfs or a memfd)
    of the daemon's uid, as long as the list, with hugepages of the list's page
    size when `huge`.  Raises UnsafePath otherwise."""
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid != owner:
        why = f"belongs to uid {st.st_uid}, not the daemon's {owner}"
    elif st.st_size != size:
        why = f"is {st.st_size} bytes, not the list's {size}"
    elif huge and st.st_blksize != page_size:
        why = f"has {st.st_blksize}-byte pages, not {page_size}"
    if why:
        raise UnsafePath(f"a page file the primary handed over {why}: not mapping it")
