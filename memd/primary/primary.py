"""The primary: all hugepage initialisation, the shared config, and heap growth
(docs/design.md).  `Primary` is usable in-process (embedding, tests);
`memd.primary.daemon` wraps it in a long-running process."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import Any

from memd import _ext
from memd.files import ensure_dir
from memd.hw import hugepage_info
from memd.mp.access import AccessPolicy, resolve_group
from memd.mp.channel import Server
from memd.mp.fd_pass import FdServer
from memd.mp.malloc_mp import PrimaryGrowth
from memd.paths import (
    SHM_DIR,
    config_path,
    fd_socket_path,
    mp_endpoint,
    mp_socket_path,
    runtime_dir,
    socket_dir,
    validate_prefix,
)
from memd.primary.handlers import HandlersMixin
from memd.primary.mcfg import ConfigMixin
from memd.primary.memalloc import MemallocMixin, plan_lists
from memd.primary.state import AlreadyRunning, InitError, Options
from memd.shm.config import comm, proc_start_time
from memd.shm.pages import unlock_prefix

log = logging.getLogger("memd")

# The most the daemon waits for a heap lock: a secondary stopped while holding one
# (a debugger, a paused container) gets callers a "busy" error, never a hung daemon.
HEAP_LOCK_WAIT = 2.0  # seconds


class Primary(HandlersMixin, MemallocMixin, ConfigMixin, PrimaryGrowth):
    """Initialise everything, then serve secondaries (call `serve` or `poll`)."""

    def __init__(self, options: Options | None = None) -> None:
        self.options = opts = options or Options()
        prefix = validate_prefix(opts.file_prefix)
        super().__init__(prefix, runtime_dir(opts.runtime_dir, uid=os.geteuid()))
        self.proc_slot = 0
        self._closed = False
        self._cfg_fd = -1
        self._prefix_locks = {}
        self._list_fds: dict[int, int] = {}  # memseg list -> its file (single-file lists)
        self.server = None
        self.fd_server: FdServer | None = None
        self._gid = self._group_id(opts.group)
        self._mode = 0o660 if self._gid is not None else 0o600
        self._dir_mode = 0o750 if self._gid is not None else 0o700
        self.pages.mode = self._mode
        self.pages.gid = self._gid
        self._expand_lock = threading.RLock()
        self.reclaims = deque(maxlen=64)
        self.recoveries_due = {}
        self.detached_pins = {}
        self.release_deferred = {}
        self.pin_rows_odd_since = {}
        self.pin_rows_logged = set()
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
            raise InitError(f"--group: {e}") from None  # e says what to do

    def _init(self) -> None:
        _ext.heap_lock_wait(HEAP_LOCK_WAIT)
        self._make_runtime_dir()
        self.config_file = config_path(self.prefix, self.rundir)
        self._lock_config()
        plans = plan_lists(self.options, None if self.options.no_huge else hugepage_info.discover())
        page_sizes = {p.dir or SHM_DIR: p.page_size for p in plans}
        for i, p in enumerate(plans):
            self.pages.set_dir(i, p.dir or SHM_DIR)
        self.pages.reuse = self.options.huge_unlink == "never"
        self.pages.in_memory = self.options.in_memory
        dir_locks: list[int] = []
        try:
            self._claim_page_dirs(page_sizes, dir_locks)
            self._init_memory(plans)
        finally:
            for fd in dir_locks:  # DPDK: the directory is locked only while initialising
                os.close(fd)
        self._start_server()

    def _handlers(self) -> dict[str, Any]:
        return {
            "register": self._on_register,
            "unregister": self._on_unregister,
            "alloc": self._on_alloc,
            "shrink": self._on_shrink,
            "mem_events": self._on_mem_events,
            "ping": self._on_ping,
        }

    def _start_server(self) -> None:
        start = proc_start_time(os.getpid()) or 0
        _ext.proc_register(self.window, os.getpid(), start, _ext.PROC_PRIMARY, comm(), 0)
        self.window.pin_as(0)  # our own views pin pages too
        sockdir = socket_dir(self.prefix, self.rundir)
        # group members may enter and connect, never create: the socket is ours alone
        ensure_dir(sockdir.parent, 0o711 if self._gid is not None else 0o700, shared=True)
        ensure_dir(sockdir, self._dir_mode, self._gid)
        # a dead primary's sockets (we hold the config lock): its fd_socket too, which
        # a primary without nameless files would otherwise leave behind at its stop
        for stale in (
            mp_socket_path(self.prefix, self.rundir),
            fd_socket_path(self.prefix, self.rundir),
        ):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.server = Server(
            mp_endpoint(self.prefix, self.rundir),
            self._handlers(),
            self.options.sync_timeout,
            AccessPolicy(gid=self._gid),
        )
        self.server.on_death = self._reclaim
        sockets = [mp_socket_path(self.prefix, self.rundir)]
        if self.single_file and (self.options.in_memory or self.options.huge_unlink == "always"):
            # the list files have no name: registered secondaries get their fds
            self.fd_server = FdServer(
                fd_socket_path(self.prefix, self.rundir),
                lambda: dict(self._list_fds),
                self._is_peer,
                AccessPolicy(gid=self._gid),
            )
            sockets.append(self.fd_server.path)
        for path in sockets:
            if self._gid is not None:
                os.chown(path, -1, self._gid)
            os.chmod(path, self._mode)
        _ext.config_publish(self.window)  # magic last: secondaries may attach now
        log.info(
            "ready: prefix %s, %d memseg lists, %s MiB mapped, iova %s",
            self.prefix,
            len(self._lists),
            self.info()["mapped_bytes"] >> 20,
            "PA" if self.iova_mode == _ext.IOVA_PA else "VA",
        )

    def _is_peer(self, pid: int) -> bool:
        """pid registered as a secondary (called from the fd server's thread)."""
        for _ in range(3):
            try:
                server = self.server
                return server is not None and any(p.pid == pid for p in list(server.peers.values()))
            except RuntimeError:  # the dict changed under us: look again
                continue
        return False

    # --- running -------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> int:
        """Serve requests for up to `timeout` seconds; returns how many."""
        if self.server is None:
            return 0
        return self.server.poll_once(int(timeout * 1000))

    def serve(self, stop: threading.Event, tick: float = 0.2, on_tick: Any = None) -> None:
        """Serve until `stop` is set; `on_tick()` runs between polls."""
        last_prune = last_retry = time.monotonic()
        while not stop.is_set():
            self.poll(tick)
            now = time.monotonic()
            if now - last_prune >= 1.0:
                self.prune_dead()
                self._reap_fork_pins()  # rows of dead forked children go back to the pool
                self.retry_recoveries()
                last_prune = now
            if now - last_retry >= tick:  # pages views kept go soon after the views
                self.retry_deferred_release()
                last_retry = now
            if on_tick is not None:
                on_tick()

    def params(self) -> list[str]:
        """The command line the primary was started with (telemetry ``/eal/params``)."""
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
        if self.fd_server is not None:
            self.fd_server.close()
            self.fd_server = None
        if self.server is not None:
            self.server.close()
            self.server = None
        window = getattr(self, "window", None)
        if window is not None and self.single_file:
            if remove_files and self.pages.reuse:
                # --huge-unlink=never keeps the files: with only the pages in use
                try:
                    self._punch_unused("released while memd ran")
                except OSError as e:
                    log.warning("cannot give back the unused pages of a kept file: %s", e)
            for msl in self._lists:
                # unlinked, the pages go with the last mapping (secondaries still
                # attached keep theirs until they detach)
                fd = self._list_fds.pop(msl.index, None)
                if remove_files:
                    self.pages.remove_list(msl)
                if fd is not None:
                    os.close(fd)
        elif window is not None:
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
                mp_socket_path(self.prefix, self.rundir).unlink()
            for made in (sockdir, sockdir.parent):
                with contextlib.suppress(OSError):
                    made.rmdir()
        for page_dir, fd in self._prefix_locks.items():
            if remove_files:
                unlock_prefix(page_dir, self.prefix, fd, keep=self.pages.reuse)
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
