"""The shared config's file (DPDK `eal_common_mcfg.c`): the runtime dir, the config
lock that makes this the one primary of its prefix, and a dead primary's leftovers."""

from __future__ import annotations

import fcntl
import logging
import os
from typing import cast

from memd import _ext
from memd.files import (
    UnsafePath,
    check_trusted_path,
    create_file,
    describe_owner,
    ensure_dir,
    open_checked,
)
from memd.paths import base_runtime_dir
from memd.primary.state import AlreadyRunning, InitError, PrimaryState
from memd.shm.config import (
    header,
    process_alive,
    processes,
)

log = logging.getLogger("memd")


class ConfigMixin(PrimaryState):
    """The runtime dir and the config file's lock."""

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
