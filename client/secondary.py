"""A secondary process's view of memd: map the config and pages at any address,
register with the primary, keep mappings in step, ask the primary for memory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import time
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
from memd.ipc import PROTOCOL_VERSION, Channel
from memd.memory import Memory
from memd.paths import DEFAULT_PREFIX, config_path, mp_endpoint
from memd.paths import runtime_dir as resolve_runtime_dir
from memd.shared import comm, exited, header, proc_start_time, process_alive, watch_process

log = logging.getLogger("memd_client")

# Each attach gets its own socket identities: id(self) came back after a detach, and
# the primary's ROUTER ignores a connection whose identity it still holds, so an
# immediate re-attach could wait for registration until it timed out.
_attach_numbers = itertools.count(1)


class Secondary(Memory):
    """Attached process. Use `attach()`; `detach()` (or `with`) when done."""

    def __init__(self, prefix: str, rundir: Path, timeout: float) -> None:
        super().__init__(prefix, rundir)
        self.proc_slot = -1
        self._cfg_fd = -1
        self._primary_fd = -1  # pidfd of the primary (-1: none, poll /proc instead)
        self._channel: Channel | None = None
        self._attach(timeout)

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
                    "and --runtime-dir")
            time.sleep(0.01)
        try:
            self._channel = Channel(mp_endpoint(self.prefix, self.rundir),
                                    f"{os.getpid()}-{next(_attach_numbers)}", self._on_sync,
                                    timeout=max(timeout, 5.0))
            self._channel.alive_check = self.primary_alive
            self._channel.watch_fd = self._primary_fd
            ans = self._channel.register({
                "pid": os.getpid(), "start_time": proc_start_time(os.getpid()) or 0,
                "version": PROTOCOL_VERSION, "comm": comm()})
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
            raise PrimaryNotRunning(f"the primary refused to register us: {ans['reason']}")
        self.proc_slot = int(ans["slot"])
        self.sync_pages()

    def _try_open(self, path: Path) -> str | None:
        """Open and map the config if a live, ready primary owns it; else say why not."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"{path} does not exist"
        except PermissionError:
            raise PermissionDenied(
                f"cannot open {path}: it belongs to another user; run as the daemon's user "
                "or ask for memd --group") from None
        try:
            if os.fstat(fd).st_size < _ext.CONFIG_SIZE:
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
                    f"{_ext.LAYOUT_VERSION}: install the same memd version on both sides")
            if not self._locked_by_primary(fd):
                return f"its primary (pid {h.primary_pid}) is dead (stale config)"
            if h.state != _ext.STATE_READY:
                return "the primary is shutting down"
            if h.flags & _ext.CFG_F_HUGE_UNLINK:
                raise MemdError(
                    f"the primary (pid {h.primary_pid}) runs with --huge-unlink, so its page "
                    "files are gone and no secondary can map them; restart it without "
                    "--huge-unlink to attach")
            # Watch the primary through a pidfd (watch_process checks its start
            # time after opening it, so a reused pid cannot fool us).
            pidfd = watch_process(h.primary_pid, h.primary_start_time)
            if pidfd is None:
                return f"its primary (pid {h.primary_pid}) is dead (stale config)"
            self.window = _ext.Window(h.window_size, h.window_align)
            self.window.map_fd(0, _ext.CONFIG_SIZE, fd)
            self._cfg_fd, fd = fd, -1
            self._primary = (h.primary_pid, h.primary_start_time)
            self._primary_fd = pidfd
            if pidfd >= 0:
                self.window.watch(pidfd)  # blocked ring calls raise PrimaryNotRunning
            return None
        finally:
            if fd >= 0:
                os.close(fd)

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
        if self._cfg_fd < 0:
            return False
        if self._primary_fd >= 0:
            return not exited(self._primary_fd)
        pid, start = self._primary
        return self._locked_by_primary(self._cfg_fd) and process_alive(pid, start)

    def _check_alive(self) -> None:
        if not self.primary_alive():
            raise PrimaryNotRunning(
                f"the memd primary (pid {self._primary[0]}) has died; detach and attach "
                "again once it is restarted")

    def _on_sync(self, msg: dict[str, Any]) -> None:
        """Background thread: the primary changed the memory map."""
        if msg["type"] == "sync":
            self.sync_pages()
            self._heap_cache_clear()  # pages came or went: reset release thresholds
        elif msg["type"] == "shutdown":
            log.warning("the memd primary is shutting down")

    # --- growth through the primary --------------------------------------------------

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._channel is None:
            raise PrimaryNotRunning("detached")
        self._check_alive()
        try:
            return self._channel.request(msg)
        except TimeoutError as e:
            self._check_alive()
            raise MemdMemoryError(f"{e}; the primary may be overloaded") from None

    def _expand_heap(self, heap: int, size: int, align: int, bound: int, contig: bool) -> None:
        ans = self._request({"type": "alloc", "heap": heap, "size": size, "align": align,
                             "bound": bound, "contig": contig})
        if ans["status"]:
            raise MemdMemoryError(f"primary: {ans['reason']}")
        self.sync_pages()

    def _release_pages(self, heap: int) -> int | None:
        with contextlib.suppress(MemdMemoryError, PrimaryNotRunning):
            self._request({"type": "shrink", "heap": heap})
        return None

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

    def detach(self) -> None:
        """Unregister and stop the sync thread.  The mappings stay until every view
        of them is gone, so a stale memoryview never points at unmapped memory."""
        if self._channel is None:
            return
        with contextlib.suppress(Exception):
            if self.proc_slot > 0:
                self.flush_mempool_caches(self.proc_slot)  # cached objects go back
        with contextlib.suppress(Exception):
            if self.primary_alive():
                self._channel.request({"type": "unregister"}, timeout=1.0)
            elif self.proc_slot > 0:
                # Nobody reclaims for a dead primary: leave its table as we found
                # it, so a new primary does not count us among the old secondaries.
                _ext.proc_unregister(self.window, self.proc_slot, os.getpid())
        self._close_quietly()

    def __enter__(self) -> Secondary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.detach()


def attach(prefix: str = DEFAULT_PREFIX, runtime_dir: str | os.PathLike[str] | None = None,
           timeout: float = 5.0) -> Secondary:
    """Attach to the primary of `prefix`, waiting up to `timeout` seconds for a
    starting one to become ready.  Raises PrimaryNotRunning, VersionMismatch or
    PermissionDenied."""
    return Secondary(prefix, resolve_runtime_dir(runtime_dir), timeout)
