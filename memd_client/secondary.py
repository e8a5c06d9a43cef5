"""A secondary process's view of memd: map the config and pages at any address,
register with the primary, keep mappings in step, ask the primary for memory."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from memd import _ext
from memd.errors import (
    MemdError,
    MemdMemoryError,
    PermissionDenied,
    PrimaryNotRunning,
    VersionMismatch,
)
from memd.files import (
    UnsafePath,
    check_trusted_path,
    describe_owner,
    is_shared_writable,
    open_checked,
)
from memd.hw.hugepage_info import hugetlbfs_mounts
from memd.mp.channel import PROTOCOL_VERSION, Channel
from memd.mp.fd_pass import receive_list_fds
from memd.mp.malloc_mp import SecondaryGrowth
from memd.paths import (
    DEFAULT_PREFIX,
    SHM_DIR,
    config_path,
    fd_socket_path,
    find_runtime_dir,
    mp_endpoint,
)
from memd.shm.config import comm, exited, header, proc_start_time, process_alive, watch_process

log = logging.getLogger("memd_client")

# Each attach gets its own socket identities: id(self) came back after a detach, and
# the primary's ROUTER ignores a connection whose identity it still holds, so an
# immediate re-attach could wait for registration until it timed out.
_attach_numbers = itertools.count(1)

# Attachments still open when the interpreter exits are detached then: the primary
# logs a clean exit as a detach, and keeps "died" (and its reclaim) for real deaths.
_open: weakref.WeakSet[Secondary] = weakref.WeakSet()


@atexit.register
def _detach_at_exit() -> None:
    for sec in list(_open):
        if sec._pid == os.getpid():  # a forked child's copy is its parent's to detach
            with contextlib.suppress(Exception):
                sec.detach()


_exit_hooked_pid = 0


def _detach_at_multiprocessing_exit() -> None:
    """A multiprocessing child ends in os._exit, which skips atexit: its own exit
    hook (util.Finalize, run by every start method's bootstrap) detaches too, so
    the primary sees a clean exit, not a death (nor reclaims what it handed on)."""
    global _exit_hooked_pid
    mp_util = sys.modules.get("multiprocessing.util")  # a child has it; else atexit does
    if mp_util is None or _exit_hooked_pid == os.getpid():
        return
    _exit_hooked_pid = os.getpid()
    mp_util.Finalize(None, _detach_at_exit, exitpriority=0)


# A forked child's copy of the ZeroMQ sockets is its parent's: closing it in the
# child is not safe, so it is kept here, never closed and never used.
_forked_channels: list[object] = []


def _forget_in_child() -> None:
    """After fork: every attachment inherited from the parent is unusable here (its
    process slot, mempool caches and sockets are the parent's); each call through
    it raises MemdValueError telling the child to attach() again."""
    for sec in list(_open):
        sec._forget_forked()
    _open.clear()
    missed = _ext.fork_pins_missed()
    if missed is not None:
        why = (
            "every fork pin row of the memd instance was taken"
            if missed == "full"
            else f"the parent's live forked children held its {_ext.FORK_ROWS_PER_PROC} "
            "fork pin rows (its share of the instance's)"
        )
        log.warning(
            "%s when this process was forked: views inherited from the parent are not "
            "pinned here, and fault (SIGBUS) if the parent frees their memory; attach() "
            "here and view anew",
            why,
        )


os.register_at_fork(after_in_child=_forget_in_child)


class Secondary(SecondaryGrowth):
    """A process attached to a memd primary: made by :func:`attach`; call
    :meth:`detach` (or leave a ``with`` block) when done.

    Everything the primary and other secondaries created is visible here without
    copies; offsets found in rings, blocks and memzones are valid here through
    :meth:`view`.  The heaps (``malloc`` ...), memzones, rings and mempools below
    are shared by every process of the instance.  An attachment may be used from
    several threads of this process; a process forked after attaching must attach
    on its own (its calls that need the primary raise MemdError).
    """

    def __init__(self, prefix: str, rundir: Path, timeout: float) -> None:
        # The dir as given is checked as given (a symlink in it must be trusted); the
        # attachment keeps it resolved, so a reference it pickles works from any cwd and
        # one instance reached through /var/run and /run is one attachment.
        self._given_rundir = rundir
        super().__init__(prefix, Path(os.path.realpath(rundir)))
        self.proc_slot = -1
        self._pid = os.getpid()  # who attached: a forked child must attach anew
        self._cfg_fd = -1
        self._primary_fd = -1  # pidfd of the primary (-1: none, poll /proc instead)
        self.daemon_uid = -1  # the owner of the config: every file we open must be its
        self._channel: Channel | None = None
        self._attach(timeout)
        _open.add(self)
        _detach_at_multiprocessing_exit()

    # --- attach ------------------------------------------------------------------

    def _attach(self, timeout: float) -> None:
        path = config_path(self.prefix, self.rundir)
        deadline = time.monotonic() + timeout
        while True:
            why = self._try_open(path)
            if why is None:
                break
            if time.monotonic() >= deadline:
                raise PrimaryNotRunning(
                    f"no memd primary for prefix {self.prefix!r} in {self.rundir}: {why}. "
                    f"Start it (memd --file-prefix {self.prefix}) or check --file-prefix "
                    "and --runtime-dir"
                )
            time.sleep(0.01)
        self._check_socket()
        try:
            self._channel = Channel(
                mp_endpoint(self.prefix, self.rundir),
                f"{os.getpid()}-{next(_attach_numbers)}",
                self._on_sync,
                timeout=max(timeout, 5.0),
            )
            self._channel.alive_check = self.primary_alive
            self._channel.stopped_check = self.primary_stopped
            self._channel.watch_fd = self._primary_fd
            ans = self._channel.register(
                {
                    "pid": os.getpid(),
                    "start_time": proc_start_time(os.getpid()) or 0,
                    "version": PROTOCOL_VERSION,
                    "comm": comm(),
                }
            )
        except TimeoutError as e:
            self._close_quietly()
            raise PrimaryNotRunning(f"the primary did not answer registration: {e}") from None
        except BaseException:
            self._close_quietly()
            raise
        if ans["status"]:
            self._close_quietly()
            if ans["status"] == errno.EPROTONOSUPPORT:
                raise VersionMismatch(ans["reason"])
            if ans["status"] == errno.EUSERS:  # slots taken: the primary runs
                raise MemdError(f"memd refused to attach: {ans['reason']}")
            raise PrimaryNotRunning(f"the primary refused to register us: {ans['reason']}")
        self.proc_slot = int(ans["slot"])
        self.window.pin_as(self.proc_slot)  # views pin their pages in our row
        try:
            self._set_page_dirs(ans.get("page_dirs"))
            flags = self._header().flags
            if flags & _ext.CFG_F_SINGLE_FILE:
                handed = None
                if flags & (_ext.CFG_F_HUGE_UNLINK | _ext.CFG_F_IN_MEMORY):
                    # the files have no name: the primary hands them over
                    handed = receive_list_fds(
                        fd_socket_path(self.prefix, self.rundir),
                        self._primary[0],
                        self.daemon_uid,
                    )
                self._map_lists(create=False, handed=handed)  # every page there is, or will be
        except BaseException:
            self.detach()
            raise
        self.sync_pages()

    def _check_rundir(self) -> None:
        """Only a runtime dir that no one but its owner can write is trusted: in any
        other, anyone could have put a config or socket of their own.  Both the dir
        as given and as resolved must pass."""
        for rundir in dict.fromkeys((self._given_rundir, self.rundir)):
            self._check_one_rundir(rundir)

    def _check_one_rundir(self, rundir: Path) -> None:
        try:
            # the path up to it is root's or ours; the dir itself may be the daemon's
            check_trusted_path(rundir, {0, os.geteuid()}, any_owner_last=True)
            st = os.stat(rundir)
        except FileNotFoundError:
            return  # no primary yet: _try_open says so
        except PermissionError:
            raise PermissionDenied(
                f"cannot reach {rundir}: permission denied; run as the daemon's user "
                "or as a member of its --group"
            ) from None
        private = rundir.name.removeprefix("memd-")
        if (
            rundir.name.startswith("memd-")
            and private.isdigit()
            and is_shared_writable(os.stat(rundir.parent))
        ):
            lst = os.lstat(rundir)
            if not stat.S_ISDIR(lst.st_mode) or lst.st_uid != int(private):
                raise UnsafePath(
                    f"{rundir} belongs to {describe_owner(lst.st_uid)}, not to uid "
                    f"{private} whose private runtime dir it should be: someone else made it; "
                    "remove it and restart memd"
                )
        if is_shared_writable(st):
            raise UnsafePath(
                f"{rundir} can be written by other users, so memd files there cannot "
                f"be trusted; attach with the runtime dir the daemon uses (in such a "
                f"directory memd keeps its files in memd-<uid> inside it)"
            )

    def _try_open(self, path: Path) -> str | None:
        """Open and map the config if a live, ready primary owns it; else say why not."""
        self._check_rundir()
        try:
            # the daemon's uid is whoever owns the config in a runtime dir only its
            # owner can write (_check_rundir); every other file must be that uid's
            fd = open_checked(path, None, what="config")
        except FileNotFoundError:
            return f"{path} does not exist"
        except UnsafePath:
            raise
        except PermissionError:
            raise PermissionDenied(
                f"cannot open {path}: it belongs to another user; run as the daemon's user "
                "or as a member of its --group"
            ) from None
        try:
            st = os.fstat(fd)
            if st.st_size < _ext.CONFIG_SIZE:
                return "the primary is still initialising"
            # Temporary window to read the header: we need the window size first.
            probe = _ext.Window(_ext.CONFIG_SIZE)
            probe.map_fd(0, _ext.CONFIG_SIZE, fd, readonly=True)
            h = header(probe)
            del probe
            if h.magic != _ext.CONFIG_MAGIC:
                return "the primary is still initialising"
            if h.layout_version != _ext.LAYOUT_VERSION:
                raise VersionMismatch(
                    f"the primary uses layout version {h.layout_version}, this library "
                    f"{_ext.LAYOUT_VERSION}: install the same memd version on both sides"
                )
            if not self._locked_by_primary(fd):
                return f"its primary (pid {h.primary_pid}) is dead (stale config)"
            if h.state != _ext.STATE_READY:
                return "the primary is shutting down"
            if h.flags & _ext.CFG_F_HUGE_UNLINK and not h.flags & _ext.CFG_F_SINGLE_FILE:
                raise MemdError(
                    f"the primary (pid {h.primary_pid}) runs with --huge-unlink and "
                    "--legacy-mem, so its page files are gone and no secondary can map "
                    "them; restart it without one of them to attach"
                )
            # Watch the primary through a pidfd (watch_process checks its start
            # time after opening it, so a reused pid cannot fool us).
            pidfd = watch_process(h.primary_pid, h.primary_start_time)
            if pidfd is None:
                return f"its primary (pid {h.primary_pid}) is dead (stale config)"
            try:
                self.window = _ext.Window(h.window_size, h.window_align)
            except OSError as e:
                raise MemdMemoryError(
                    f"attach: cannot reserve the instance's {h.window_size >> 20} MiB of "
                    f"address space ({e.strerror}): raise this process's address-space "
                    "limit (ulimit -v), or drop mlockall(MCL_FUTURE) (it needs "
                    "CAP_IPC_LOCK and would lock the whole window)"
                ) from e
            self.window.map_fd(0, _ext.CONFIG_SIZE, fd)
            self._cfg_fd, fd = fd, -1
            self.daemon_uid = st.st_uid
            self.pages.owner = st.st_uid
            self._primary = (h.primary_pid, h.primary_start_time)
            self._primary_fd = pidfd
            if pidfd >= 0:
                self.window.watch(pidfd)  # blocked ring calls raise PrimaryNotRunning
            return None
        finally:
            if fd >= 0:
                os.close(fd)

    def _check_socket(self) -> None:
        """The primary's socket and its directory must be the daemon's, as the config
        is: a socket someone else bound would hand us a fake primary."""
        sock = Path(mp_endpoint(self.prefix, self.rundir).removeprefix("ipc://"))
        for path, kind, is_kind in (
            (sock.parent, "directory", stat.S_ISDIR),
            (sock, "socket", stat.S_ISSOCK),
        ):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return  # not bound yet: registration times out with the reason
            why = None
            if not is_kind(st.st_mode):
                why = f"is not a {kind}"
            elif st.st_uid != self.daemon_uid:
                why = f"belongs to {describe_owner(st.st_uid)}"
            elif kind == "directory" and is_shared_writable(st):
                why = "can be written by other users"
            if why:
                self._close_quietly()
                raise UnsafePath(
                    f"{path} {why}, but the memd config belongs to "
                    f"{describe_owner(self.daemon_uid)}: not attaching to it; remove it and "
                    "restart memd"
                )

    def _set_page_dirs(self, page_dirs: object) -> None:
        """Where each memseg list's page files are, as the primary answered: each
        must be inside a hugetlbfs mount (or /dev/shm), which we check ourselves."""
        if not isinstance(page_dirs, list):
            raise VersionMismatch(
                "the primary's registration answer has no page "
                "directories: install the same memd version on both sides"
            )
        mounts = {}
        for m in hugetlbfs_mounts() if any(d != SHM_DIR for _, d in page_dirs) else []:
            with contextlib.suppress(OSError):
                mounts[os.stat(m.mount_point).st_dev] = m.mount_point
        for item in page_dirs:
            index, directory = item
            if directory != SHM_DIR:
                st = os.stat(directory)
                if os.path.realpath(directory) != directory or st.st_dev not in mounts:
                    raise UnsafePath(
                        f"the primary keeps pages in {directory}, which is not a hugetlbfs "
                        "mount here (or not its real path): not mapping files from it"
                    )
            self.pages.set_dir(int(index), directory)

    @staticmethod
    def _locked_by_primary(fd: int) -> bool:
        """The primary holds an exclusive flock on the config for its life."""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def primary_alive(self) -> bool:
        """Whether the primary this process attached to still runs (False after
        :meth:`detach`).  Calls that need the primary raise PrimaryNotRunning once it
        is gone; this asks without raising."""
        if self._cfg_fd < 0:
            return False
        if self._primary_fd >= 0:
            return not exited(self._primary_fd)
        pid, start = self._primary
        return self._locked_by_primary(self._cfg_fd) and process_alive(pid, start)

    def primary_stopped(self) -> bool:
        """The primary shut down cleanly (or is shutting down): it marks the config
        SHUTDOWN before it tells anyone, so a primary gone without it died."""
        try:
            return header(self.window).state == _ext.STATE_SHUTDOWN
        except Exception:  # detached: nothing to read
            return False

    def _check_primary(self) -> None:
        if self._cfg_fd >= 0:  # detached: the call itself says so
            self._check_alive()

    def _check_alive(self) -> None:
        if not self.primary_alive():
            how = "was stopped" if self.primary_stopped() else "has died"
            raise PrimaryNotRunning(
                f"the memd primary (pid {self._primary[0]}) {how}; detach and attach "
                "again once it is restarted"
            )

    # --- requests to the primary -----------------------------------------------------

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._channel is None:
            raise PrimaryNotRunning("detached")
        if os.getpid() != self._pid:  # ZeroMQ sockets do not survive a fork
            raise MemdError(
                f"this process (pid {os.getpid()}) was forked from pid {self._pid} after it "
                "attached; the child must attach on its own (memd_client.attach())"
            )
        self._check_alive()
        try:
            return self._channel.request(msg)
        except TimeoutError as e:
            self._check_alive()
            raise MemdMemoryError(f"{e}; the primary may be overloaded") from None

    # --- detach ----------------------------------------------------------------------

    def _close_quietly(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._cfg_fd >= 0:
            os.close(self._cfg_fd)
            self._cfg_fd = -1
        if self._primary_fd >= 0:
            with contextlib.suppress(Exception):
                self.window.watch(-1)
            os.close(self._primary_fd)
            self._primary_fd = -1

    def _forget_forked(self) -> None:
        """In a forked child: let go of the parent's attachment without telling
        the primary anything (the parent is still attached) and close the window,
        so that nothing of the parent's state (slot, caches, sockets) is used."""
        if self._channel is not None:
            _forked_channels.append(self._channel)
            self._channel = None
        for fd in (self._cfg_fd, self._primary_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._cfg_fd = self._primary_fd = -1
        # the child's mappings lost the parent's userfaultfd registration: guard the
        # holes again, so an inherited view of a page given back faults, never allocates
        if self.single_file and not self.window.closed:
            fresh = True
            for msl in self._lists:
                try:
                    self.window.guard(msl.base_offset, msl.capacity * msl.page_size, fresh)
                    fresh = False
                except OSError:
                    break
        self.window.close()

    def detach(self) -> None:
        """Unregister and stop the sync thread.  Every later call through this
        attachment or an object from it raises MemdValueError; the mappings stay
        until every view of them is gone, so a stale memoryview never points at
        unmapped memory."""
        if self._channel is None:
            return
        _open.discard(self)
        # Views made from here on pin nothing, and the row (the primary keeps what
        # it pins while this process lives) is no longer ours to write.
        self.window.pin_as(-1)
        with contextlib.suppress(Exception):
            if self.proc_slot > 0:
                # cached objects go back; a pool another process damaged is
                # reported by memctl, not by every process's detach
                self.flush_mempool_caches(self.proc_slot, damaged_level=logging.INFO)
        with contextlib.suppress(Exception):
            if self.primary_alive():
                self._channel.request({"type": "unregister"}, timeout=1.0)
            elif self.proc_slot > 0:
                # Nobody reclaims for a dead primary: leave its table as we found
                # it, so a new primary does not count us among the old secondaries.
                _ext.proc_unregister(self.window, self.proc_slot, os.getpid())
        self._close_quietly()
        self._unmap_if_unused()
        # Objects kept past detach() (blocks, rings, pools, this Memory) raise from
        # now on: our slot and its mempool caches may go to the next process.
        self.window.close()

    def _unmap_if_unused(self) -> None:
        """Unmap every page once nothing but us refers to the window, so that a
        detached process holds no page file and a new primary may remove them.
        A live view (or ring, mempool) keeps the pages mapped, and the process
        is named as their holder until it lets go."""
        window = getattr(self, "window", None)
        if window is None or sys.getrefcount(window) > 3:  # ours, the local, the argument
            return
        with self._map_lock:
            for msl in self._lists:
                if self.single_file:  # the whole list's file
                    with contextlib.suppress(OSError):
                        window.unmap(msl.base_offset, msl.capacity * msl.page_size)
                    self._mapped.pop(msl.index, None)
                    continue
                for slot in sorted(self._mapped.get(msl.index, set())):
                    with contextlib.suppress(OSError):
                        self._unmap_slot(msl, slot)
            self._synced_generation = -1

    def __enter__(self) -> Secondary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.detach()


def attach(
    prefix: str = DEFAULT_PREFIX,
    runtime_dir: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
) -> Secondary:
    """Attach this process to the memd primary of ``prefix`` as a DPDK secondary
    (``rte_eal_init`` with ``--proc-type=secondary``).

    Args:
        prefix: the instance's ``--file-prefix`` (default ``"rte"``).
        runtime_dir: the daemon's ``--runtime-dir``; None picks the daemon's own
            default (``$RUNTIME_DIRECTORY``, ``/var/run`` as root, else
            ``$XDG_RUNTIME_DIR``, else ``/tmp``; in a directory others can write,
            its ``memd-<uid>`` subdirectory); a user other than root whose default
            has no instance ``prefix`` while ``/var/run`` (the system service's)
            has, gets that one.  A relative or symlinked dir is checked as given and
            kept resolved (``os.path.realpath``, ``Secondary.rundir``): pickled
            references name the real dir, whatever a receiver's cwd.
        timeout: seconds to wait for a primary that is starting to become ready.

    Returns:
        Secondary: the attachment; use it as a context manager, or call
        :meth:`Secondary.detach` when done.  An attachment still open when the
        interpreter exits is detached then (atexit), so the primary logs a detach,
        not a death.  A process forked after attaching must attach on its own.

    Raises:
        PrimaryNotRunning: no ready primary within ``timeout`` (the message says
            why: no config, a dead primary's stale config, shutting down), or it did
            not answer registration.
        VersionMismatch: the primary runs another memd version (layout or protocol).
        PermissionDenied: the config or sockets belong to a user or group this
            process is not (run as the daemon's user or a member of its ``--group``).
        UnsafePath: the runtime dir or a socket could have been made by someone else.
        MemdError: the primary runs with ``--huge-unlink`` (its page files are gone),
            or its process table is full.
    """
    return Secondary(prefix, find_runtime_dir(prefix, runtime_dir), timeout)
