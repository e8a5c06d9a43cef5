"""Handing the memseg lists' files to a secondary over a Unix socket (SCM_RIGHTS).

With ``--huge-unlink=always`` the list files are unlinked right after they are
made, and with ``--in-memory`` they never had a name (``memfd_create``): a
secondary cannot open them by path, so the primary passes their descriptors.
One socket, ``<runtime>/memd/<prefix>/fd_socket``, beside the ZeroMQ
``mp_socket`` and under the same rules (the daemon's, mode 0600, or 0660 with
``--group``; peers checked with SO_PEERCRED by `AccessPolicy`).  A peer must have
registered on the ZeroMQ channel first (its pid is a peer's); it connects, and
the primary sends one message: ``{"lists": [index, ...]}`` (JSON) with one fd per
list, then closes.  The secondary checks the other end is the primary (pid, uid)
and every fd it got (`memd.shm.pages.check_list_fd`): it never takes a path from shared memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from memd.errors import MemdError
from memd.files import UnsafePath
from memd.mp.access import AccessPolicy, peer_credentials

log = logging.getLogger("memd")

MAX_MSG = 4096
TIMEOUT = 2.0  # seconds one exchange may take, on either side


class FdServer:
    """The primary's side: a thread that answers each registered secondary with
    the list fds (`fds()`, index -> fd; the primary keeps them open)."""

    def __init__(
        self,
        path: Path,
        fds: Callable[[], dict[int, int]],
        is_registered: Callable[[int], bool],
        policy: AccessPolicy,
    ) -> None:
        self.path = path
        self._fds = fds
        self._is_registered = is_registered
        self._policy = policy
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead primary's: the caller holds the config lock
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="memd-fd-pass", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:
                try:
                    self._answer(conn)
                except OSError as e:
                    log.info("fd handover failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        cred = peer_credentials(conn)
        why = self._policy.refusal(cred)
        if why is None and not self._is_registered(cred.pid):
            why = f"pid {cred.pid} has not registered: register on the mp socket first"
        if why is not None:
            conn.sendall(json.dumps({"error": why}).encode())
            return
        fds = self._fds()
        msg = json.dumps({"lists": sorted(fds)}).encode()
        socket.send_fds(conn, [msg], [fds[i] for i in sorted(fds)])

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def receive_list_fds(path: Path, primary_pid: int, daemon_uid: int) -> dict[int, int]:
    """The secondary's side: the primary's list fds, index -> fd (the caller closes
    them).  Raises UnsafePath if the other end is not the primary, MemdError if it
    refuses or sends something else."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise MemdError(f"cannot reach the primary's fd socket {path}: {e.strerror}") from e
        cred = peer_credentials(sock)
        if cred.pid != primary_pid or cred.uid != daemon_uid:
            raise UnsafePath(
                f"{path} is served by pid {cred.pid} uid {cred.uid}, not the memd primary "
                f"(pid {primary_pid}, uid {daemon_uid}): not taking its files"
            )
        raw, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 64)
        try:
            msg = json.loads(raw)
        except ValueError:
            raise MemdError(f"the primary's fd socket sent {raw[:80]!r}") from None
        if "error" in msg:
            raise MemdError(f"the primary refused the page files: {msg['error']}")
        lists = msg.get("lists")
        if (
            not isinstance(lists, list)
            or len(lists) != len(fds)
            or not all(type(i) is int for i in lists)
        ):
            raise MemdError("the primary's fd socket sent a malformed answer")
        out = dict(zip(lists, fds, strict=True))
        fds = []
        return out
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
