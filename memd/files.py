"""Opening memd's own files without trusting anything else on the host.

Every file and directory memd creates is made with ``O_EXCL``/``O_NOFOLLOW`` (or a
``mkdir`` that must succeed), given its mode and group explicitly (whatever the
umask), and checked with ``fstat`` when it is opened again: a path another user
prepared, or a symlink, is refused with a message naming the path, its owner and
the fix.  Who holds a file is read from its ``flock`` (``/proc/locks``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from memd.errors import PermissionDenied
from memd.hw.hugepage_info import proc_path
from memd.paths import config_path

__all__ = [
    "Holder",
    "UnsafePath",
    "create_file",
    "describe_owner",
    "ensure_dir",
    "holders",
    "is_shared_writable",
    "open_checked",
    "try_lock",
]

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(PermissionDenied):
    """A path memd would use belongs to someone else or is not what memd made."""


def describe_owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def is_shared_writable(st: os.stat_result) -> bool:
    """True if users other than the owner may create or rename entries in it."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _apply(fd: int, mode: int, gid: int | None) -> None:
    if gid is not None:
        os.fchown(fd, -1, gid)
    os.fchmod(fd, mode)  # after fchown: chown clears setgid bits, and the umask is not ours


def create_file(
    path: str | Path, mode: int, gid: int | None = None, flags: int = os.O_RDWR, size: int = 0
) -> int:
    """Create `path`, which must not exist (not even as a symlink), `size` bytes
    long; returns the fd.

    Raises FileExistsError if something is there, PermissionError if the
    directory refuses us, OSError if it cannot be sized."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode & 0o600)
    try:
        _apply(fd, mode, gid)
        if size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def open_checked(
    path: str | Path,
    owner: int | None,
    flags: int = os.O_RDWR,
    *,
    size: int | None = None,
    dev: int | None = None,
    what: str = "file",
) -> int:
    """Open an existing regular file that `owner` made (None: anyone); returns the fd.

    Refuses (UnsafePath) a symlink, anything but a regular file, a file of another
    owner, of another size than `size` or on another filesystem than `dev`.
    Raises FileNotFoundError if it is missing and PermissionError if we may not."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symlink, not memd's {what}: remove it") from None
        raise
    try:
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif owner is not None and st.st_uid != owner:
            why = f"belongs to {describe_owner(st.st_uid)}, not to memd's {describe_owner(owner)}"
        elif size is not None and st.st_size != size:
            why = f"is {st.st_size} bytes, not {size}"
        elif dev is not None and st.st_dev != dev:
            why = "is not on memd's filesystem"
        if why:
            raise UnsafePath(
                f"{path} {why}: it is not memd's {what}; remove it (and find out who made it)"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_dir(
    path: str | Path,
    mode: int,
    gid: int | None = None,
    *,
    owner: int | None = None,
    shared: bool = False,
) -> bool:
    """Make directory `path` with `mode` (and `gid`), or accept one that `owner`
    (default: us) already made and nobody else can write; returns True if made.
    `shared`: other instances use it too, so an existing one's mode is only
    widened to `mode`, never narrowed, and its group kept.

    Raises UnsafePath naming the path, its owner and the fix otherwise."""
    uid = os.geteuid() if owner is None else owner
    try:
        os.mkdir(path, mode & 0o700)
        made = True
    except FileExistsError:
        made = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.lstat(path)
        raise UnsafePath(
            f"{path} is a {'symlink' if stat.S_ISLNK(st.st_mode) else 'file'} of "
            f"{describe_owner(st.st_uid)}, not a directory memd made: remove it"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise UnsafePath(
                f"{path} belongs to {describe_owner(st.st_uid)}, not to "
                f"{describe_owner(uid)}: memd will not use a directory someone else "
                "made; remove it, or pick another --runtime-dir"
            )
        if is_shared_writable(st) and not made:
            raise UnsafePath(
                f"{path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                f"chmod go-w {path}, or remove it"
            )
        if shared and not made:
            mode |= stat.S_IMODE(st.st_mode)
            gid = None
        if made or stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
            _apply(fd, mode, gid)
    finally:
        os.close(fd)
    return made


def check_trusted_path(
    path: str | Path, trusted: set[int], *, any_owner_last: bool = False
) -> None:
    """Refuse (UnsafePath) a directory path that a user outside `trusted` could
    redirect: every directory and symlink on the way (symlinks followed) must
    belong to a trusted user, and one that others may write must be sticky, so
    they cannot rename or replace what is in it.  `any_owner_last`: the last
    directory itself may be anyone's (a daemon's runtime dir), if it is a real
    directory.  A missing tail is fine: whoever creates it owns it."""
    todo = list(reversed(os.path.abspath(path).split("/")))
    cur, cur_st, links = "/", os.lstat("/"), 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            cur_st = os.lstat(cur)
            continue
        if cur_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not cur_st.st_mode & stat.S_ISVTX:
            raise UnsafePath(
                f"{cur} can be written by other users and is not sticky, so "
                f"{os.path.join(cur, name)} cannot be trusted: chmod go-w {cur}"
            )
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return
        last = not any(p not in ("", ".") for p in todo)
        if st.st_uid not in trusted and not (last and any_owner_last and stat.S_ISDIR(st.st_mode)):
            raise UnsafePath(
                f"{nxt} belongs to {describe_owner(st.st_uid)}, who could redirect memd's "
                f"files through it: use a directory of your own user or root"
            )
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                raise UnsafePath(f"{path}: too many symlinks")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur, cur_st = "/", os.lstat("/")
            todo.extend(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{nxt} is not a directory")
        cur, cur_st = nxt, st


def try_lock(fd: int, exclusive: bool, timeout: float = 0.0) -> bool:
    """flock `fd` without blocking for longer than `timeout` seconds; True if taken."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


@dataclass(frozen=True)
class Holder:
    """A process that holds a flock on a file, and memd's runtime dir if it is one."""

    pid: int
    runtime_dir: str | None = None

    def __str__(self) -> str:
        where = f" (runtime dir {self.runtime_dir})" if self.runtime_dir else ""
        return f"pid {self.pid}{where}"


def _config_dir_of(pid: int, prefix: str | None) -> str | None:
    """The runtime dir of the memd config that `pid` maps, read from its maps."""
    if prefix is None:
        return None
    suffix = "/" + config_path(prefix, Path()).name
    try:
        with open(proc_path(str(pid), "maps"), encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[5:]
                if path and path[0].endswith(suffix):
                    return path[0][: -len(suffix)] or "/"
    except OSError:
        pass
    return None


def _mappers(st: os.stat_result) -> list[int]:
    """The processes that map the file `st` describes, from /proc/*/maps."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    pids = []
    for entry in os.listdir(proc_path()):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(proc_path(entry, "maps"), encoding="utf-8", errors="replace") as f:
                if any(line.split(maxsplit=5)[3:5] == [dev, ino] for line in f):
                    pids.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def holders(fd: int, prefix: str | None = None, *, mapped: bool = False) -> list[Holder]:
    """The processes that hold a flock on the file open at `fd` (ourselves
    excluded), from /proc/locks; with `mapped`, those that map it (a lock is
    named after the process that took it, which may have died leaving a fork
    holding it).  With `prefix`, each with its memd runtime dir."""
    st = os.fstat(fd)
    if mapped:
        found = _mappers(st)
        if found:
            return [Holder(pid, _config_dir_of(pid, prefix)) for pid in found]
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    try:
        with open(proc_path("locks"), encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "->" in fields:  # a waiter, not a holder
                    continue
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
                    pid = int(fields[4])
                    if pid != os.getpid() and pid not in pids:
                        pids.append(pid)
    except OSError:
        pass
    return [Holder(pid, _config_dir_of(pid, prefix)) for pid in pids]
