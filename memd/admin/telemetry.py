"""The admin socket: DPDK's telemetry v2 protocol, so ``dpdk-telemetry.py`` works on memd.

Protocol (DPDK lib/telemetry/telemetry.c, followed byte for byte):

* ``AF_UNIX`` ``SOCK_SEQPACKET`` socket at ``<runtime>/dpdk/<prefix>/dpdk_telemetry.v2``;
  if a live process already serves that path the next free ``…v2:1``, ``…v2:2``, … is
  used (``dpdk-telemetry.py -i N``); a stale socket file is replaced.
* On accept the server sends one greeting packet, compact JSON under 1 KiB:
  ``{"version":"memd 0.1.0","pid":1234,"max_output_len":16384}``.
* Each request is one packet ``/cmd`` or ``/cmd,params`` (at most 1023 bytes are
  read, the rest of a longer packet is discarded); it is split at the first comma.
* Each reply is one packet ``{"/cmd":value}`` of compact JSON no longer than
  ``max_output_len``: a value that does not fit is trimmed to its leading entries
  (strings are cut), so the reply stays valid JSON.
* An unknown command, a malformed one (not ``/`` + ``[A-Za-z0-9_/]``, ≤ 55 chars) or
  bad parameters give ``{"/cmd":null}``.
* A command the daemon cannot answer now, because what it reads is busy behind a
  stopped process or damaged, gives ``{"/cmd":{"error":"<reason>"}}`` (memd's
  addition: DPDK has no such case); ``TelemetryClient.query`` raises it as MemdError.

memd's additions, all invisible to a well-behaved DPDK client: the peer's uid/gid is
checked with ``SO_PEERCRED`` (:mod:`memd.mp.access`) and a refused peer gets one packet
``{"error":"..."}`` instead of the greeting, then the socket is closed. When all
``max_clients`` places are taken (DPDK closes a newcomer without a word), the client
idle longest gives its place: a newcomer (``memctl``) always gets in, however busy the
others keep it.  The client dropped is never one with a request waiting: it gets no
more requests in (a send fails with EPIPE), those already sent are answered, then
it reads end-of-file, a clean close.  A client idle for ``idle_timeout`` seconds (one
that never sends a request: 5 s), or one that stops reading its replies, is
disconnected.

The server is one thread with one selector: a slow, silent or garbage-sending client
costs a file descriptor and never blocks the others or the daemon's ZeroMQ loop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from typing import Any

from memd.admin.api import CMD_RE, MAX_CMD_LEN, MAX_OUTPUT_LEN, AdminAPI
from memd.errors import MemdError, PermissionDenied, PrimaryNotRunning, ProtocolError
from memd.files import ensure_dir
from memd.mp.access import AccessPolicy, peer_credentials
from memd.paths import telemetry_path

__all__ = [
    "TelemetryClient",
    "TelemetryServer",
    "encode_reply",
    "parse_request",
]

log = logging.getLogger("memd.admin.telemetry")

MAX_REQUEST = 1023  # DPDK reads into a 1024-byte buffer, keeping one byte for the NUL
MAX_GREETING = 1024
MAX_CLIENTS = 10  # DPDK's MAX_CONNECTIONS
# A client that never sent a request is dropped after this long: silent connections
# hold no place for long (and a newcomer takes the place of the client idle longest).
SILENT_TIMEOUT = 5.0
MAX_INSTANCES = 64  # how many ":N" sockets to try before giving up


# -- paths ------------------------------------------------------------------------------


# -- encoding ---------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str)


def _fit(value: Any, budget: int) -> str:
    """The compact JSON of ``value`` in at most ``budget`` characters, trimming entries."""
    try:
        text = _dumps(value)
    except ValueError:  # NaN/inf: not JSON
        text = "null"
    if len(text) <= budget:
        return text
    if isinstance(value, (list, tuple)):
        parts: list[str] = []
        used = 2
        for item in value:
            t = _dumps(item)
            extra = len(t) + (1 if parts else 0)
            if used + extra > budget:
                break
            parts.append(t)
            used += extra
        return "[" + ",".join(parts) + "]" if budget >= 2 else "null"
    if isinstance(value, dict):
        parts = []
        used = 2
        for key, item in value.items():
            t = _dumps(str(key)) + ":" + _dumps(item)
            extra = len(t) + (1 if parts else 0)
            if used + extra > budget:
                break
            parts.append(t)
            used += extra
        return "{" + ",".join(parts) + "}" if budget >= 2 else "null"
    if isinstance(value, str) and budget >= 2:
        lo, hi = 0, len(value)  # longest prefix whose encoding fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(_dumps(value[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return _dumps(value[:lo])
    return "null"


def encode_reply(cmd: str, value: Any, limit: int = MAX_OUTPUT_LEN) -> bytes:
    """``{"<cmd>":<value>}`` as compact JSON bytes, never longer than ``limit``."""
    head = "{" + _dumps(cmd[:MAX_CMD_LEN]) + ":"
    body = _fit(value, limit - len(head) - 1)
    return (head + body + "}").encode("ascii")


def parse_request(packet: bytes) -> tuple[str, str | None, bool]:
    """Split one request packet into ``(cmd, params, well_formed)``.

    ``cmd`` is what the reply is keyed by; ``params`` is the text after the first
    comma (None if there is none or it is empty, as DPDK's strtok gives NULL);
    ``well_formed`` is False for anything that cannot be a command: not UTF-8, a
    NUL byte, a name outside ``/[A-Za-z0-9_/]{0,54}``.
    """
    packet = packet[:MAX_REQUEST]
    if packet.endswith(b"\n"):  # a human on socat; DPDK's own client never sends one
        packet = packet.rstrip(b"\r\n")
    text = packet.decode("utf-8", errors="replace")
    cmd, comma, params = text.partition(",")
    ok = "\ufffd" not in text and "\0" not in text and CMD_RE.fullmatch(cmd) is not None
    return cmd, (params if comma and params else None), ok


# -- server -----------------------------------------------------------------------------


class _Client:
    __slots__ = ("cred", "last", "requests", "sock")

    def __init__(self, sock: socket.socket, cred: Any) -> None:
        self.sock = sock
        self.cred = cred
        self.last = time.monotonic()
        self.requests = 0


class TelemetryServer:
    """Serves an :class:`~memd.admin.api.AdminAPI` on the telemetry v2 socket, in a thread.

    ``TelemetryServer(api, runtime_dir, prefix).start()`` binds and returns once the
    socket accepts connections; ``.stop()`` closes every client, removes the socket
    file and joins the thread. ``group`` (a gid) widens both the access rule and the
    socket's mode to ``0660``; ``socket_mode`` overrides the mode outright.
    """

    def __init__(
        self,
        api: AdminAPI,
        runtime_dir: str,
        prefix: str = "rte",
        *,
        max_clients: int = MAX_CLIENTS,
        group: int | None = None,
        socket_mode: int | None = None,
        idle_timeout: float | None = 600.0,
        max_output_len: int = MAX_OUTPUT_LEN,
        policy: AccessPolicy | None = None,
    ) -> None:
        self.api = api
        self.runtime_dir = runtime_dir
        self.prefix = prefix
        self.max_clients = max_clients
        self.group = group
        self.socket_mode = (
            socket_mode if socket_mode is not None else (0o660 if group is not None else 0o600)
        )
        self.idle_timeout = idle_timeout
        self.max_output_len = max_output_len
        self.policy = policy or AccessPolicy(gid=group)
        self.path: str | None = None
        self.instance = -1
        self.counters = {"clients": 0, "connections": 0, "requests": 0, "refused": 0, "errors": 0}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: dict[int, _Client] = {}
        self._inode: tuple[int, int] | None = None
        api.max_output_len = max_output_len
        api.stats_sources["admin"] = lambda: dict(self.counters)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> TelemetryServer:
        """Bind the socket and start serving. Raises OSError (with the path) on failure."""
        if self._thread is not None:
            raise RuntimeError("telemetry server already started")
        directory = os.path.dirname(telemetry_path(self.prefix, self.runtime_dir))
        # whoever may use the socket must be able to reach it: <runtime>/dpdk and
        # <runtime>/dpdk/<prefix> get the socket's group/other search bits (never
        # write: only we create there); <runtime>/dpdk, shared with other instances
        # and DPDK apps, is only ever widened
        dir_mode = (
            0o700
            | (0o050 if self.socket_mode & 0o060 else 0)
            | (0o005 if self.socket_mode & 0o006 else 0)
        )
        ensure_dir(os.path.dirname(directory), 0o711 if dir_mode & 0o055 else 0o700, shared=True)
        ensure_dir(directory, dir_mode, self.group)
        self._listener, self.path, self.instance = self._bind(directory)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="memd-telemetry", daemon=True)
        self._thread.start()
        log.info("admin socket listening on %s", self.path)
        return self

    def _bind(self, directory: str) -> tuple[socket.socket, str, int]:
        for instance in range(MAX_INSTANCES):
            path = telemetry_path(self.prefix, self.runtime_dir, instance)
            if os.path.lexists(path):
                if _is_live(path):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its server is gone
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:  # lost a race with another server
                    continue
                raise OSError(exc.errno, f"cannot bind admin socket: {exc.strerror}", path) from exc
            try:
                os.chmod(path, self.socket_mode)
                if self.group is not None:
                    os.chown(path, -1, self.group)
                sock.listen(16)
            except OSError:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            sock.setblocking(False)
            return sock, path, instance
        raise OSError(
            errno.EADDRINUSE,
            f"{MAX_INSTANCES} live admin sockets already in {directory}",
            telemetry_path(self.prefix, self.runtime_dir),
        )

    def stop(self) -> None:
        """Stop serving, close every client and remove the socket file (if still ours)."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        self._thread.join()
        self._thread = None
        for c in list(self._clients.values()):
            c.sock.close()
        self._clients.clear()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode and stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.path)
            # <runtime>/dpdk/<prefix> and <runtime>/dpdk, if nothing else lives there
            directory = os.path.dirname(self.path)
            for d in (directory, os.path.dirname(directory)):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        log.info("admin socket closed")

    def __enter__(self) -> TelemetryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None and self._wake_r is not None
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                try:
                    events = sel.select(self._select_timeout())
                    for key, _ in events:
                        if key.data == "listen":
                            self._accept(sel)
                        elif key.data == "wake":
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(64)
                        else:
                            self._serve(sel, key.data)
                    self._reap_idle(sel)
                except Exception:  # the admin socket must never take the daemon down
                    self.counters["errors"] += 1
                    log.exception("admin socket: unexpected error (serving on)")
        finally:
            sel.close()

    def _deadline(self, c: _Client) -> float:
        """When `c` is dropped: SILENT_TIMEOUT after connecting if it never asks
        anything, else idle_timeout after its last request."""
        if c.requests == 0:
            return c.last + min(SILENT_TIMEOUT, self.idle_timeout or SILENT_TIMEOUT)
        return c.last + self.idle_timeout if self.idle_timeout is not None else float("inf")

    def _select_timeout(self) -> float | None:
        if not self._clients:
            return None
        first = min(self._deadline(c) for c in self._clients.values())
        return None if first == float("inf") else max(0.0, first - time.monotonic())

    def _reap_idle(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for fd, c in list(self._clients.items()):
            if self._deadline(c) <= now:
                self._drop(sel, fd)

    def _make_room(self, sel: selectors.BaseSelector) -> bool:
        """All places are taken: the client idle longest gives its place, one with
        no request waiting if there is any (polling clients must not lock memctl
        out).  True if there is room now (False only with ``max_clients`` 0)."""
        if len(self._clients) < self.max_clients:
            return True
        if not self._clients:
            return False
        waiting = {fd for fd in self._clients if _readable(fd)}
        fd, c = min(self._clients.items(), key=lambda item: (item[0] in waiting, item[1].last))
        log.info(
            "admin socket: closing pid %d, idle for %.1f s, to make room for a new client",
            c.cred.pid,
            time.monotonic() - c.last,
        )
        self._evict(sel, fd)
        return True

    def _evict(self, sel: selectors.BaseSelector, fd: int) -> None:
        """Close client `fd` cleanly: no request is lost, it reads end-of-file.
        SHUT_RD first makes its later sends fail (EPIPE) instead of vanishing; the
        requests it sent before are answered; closing with none unread is no reset."""
        c = self._clients[fd]
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_RD)
        for _ in range(64):  # what it queued before: bounded by its socket buffer
            if fd not in self._clients or not _readable(fd):
                break
            self._serve(sel, fd)
        self._drop(sel, fd)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and the like: shed this one, keep serving
            log.warning("admin socket: accept failed: %s", exc)
            return
        conn.setblocking(False)
        self.counters["connections"] += 1
        try:
            cred = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        reason = self.policy.refusal(cred)
        if reason is None and not self._make_room(sel):
            reason = "the admin socket takes no clients (max_clients 0)"
        if reason is not None:
            self.counters["refused"] += 1
            log.warning("admin socket: refused pid %d uid %d: %s", cred.pid, cred.uid, reason)
            with contextlib.suppress(OSError):
                conn.send(_dumps({"error": f"memd: {reason}"}).encode())
            conn.close()
            return
        greeting = _dumps(
            {
                "version": self.api.version,
                "pid": self.api.pid,
                "max_output_len": self.max_output_len,
            }
        ).encode()
        try:
            conn.send(greeting[:MAX_GREETING])
        except OSError:
            conn.close()
            return
        self._clients[conn.fileno()] = _Client(conn, cred)
        self.counters["clients"] = len(self._clients)
        sel.register(conn, selectors.EVENT_READ, conn.fileno())

    def _drop(self, sel: selectors.BaseSelector, fd: int) -> None:
        c = self._clients.pop(fd, None)
        if c is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)
        c.sock.close()
        self.counters["clients"] = len(self._clients)

    def _serve(self, sel: selectors.BaseSelector, fd: int) -> None:
        c = self._clients.get(fd)
        if c is None:
            return
        try:
            packet = c.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, fd)
            return
        if not packet:  # EOF (or an empty packet, which DPDK also takes as the end)
            self._drop(sel, fd)
            return
        c.last = time.monotonic()
        c.requests += 1
        self.counters["requests"] += 1
        reply = self.handle(packet)
        try:
            c.sock.send(reply)
        except OSError:  # EAGAIN: it stopped reading; EPIPE: it left. Either way: gone.
            self._drop(sel, fd)

    def handle(self, packet: bytes) -> bytes:
        """The reply packet for one request packet (no I/O; used by the loop and tests)."""
        cmd, params, ok = parse_request(packet)
        value: Any = None
        if ok and self.api.has(cmd):
            try:
                value = self.api.call(cmd, params)
            except ProtocolError as exc:  # bad parameters: null, as DPDK answers
                log.debug("admin %s,%s: %s", cmd, params, exc)
            except MemdError as exc:  # the daemon cannot answer now (busy, corrupt): say so
                self.counters["errors"] += 1
                log.warning("admin command %s: %s", cmd, exc)
                value = {"error": str(exc)}
            except Exception:
                self.counters["errors"] += 1
                log.exception("admin command %s failed", cmd)
        return encode_reply(cmd, value, self.max_output_len)


def _readable(fd: int) -> bool:
    """A packet (or end-of-file) waits on `fd` (poll: any fd number, unlike select)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _is_live(path: str) -> bool:
    """True iff something accepts connections on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        # EACCES/EPERM: someone else's live socket; anything else: treat it as taken
        return exc.errno not in (errno.ENOTSOCK, errno.EPROTOTYPE)
    else:
        return True
    finally:
        probe.close()


# -- client -----------------------------------------------------------------------------


class TelemetryClient:
    """A telemetry v2 client (what memctl uses): one connection, many queries.

    Raises PrimaryNotRunning when nothing serves ``path``, PermissionDenied when the
    daemon refuses us (its reason is in the message), ProtocolError on a bad reply.
    """

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise PrimaryNotRunning(
                f"no memd admin socket at {path}: start memd, or check --file-prefix/--runtime-dir"
            ) from exc
        except PermissionError as exc:
            self.sock.close()
            raise PermissionDenied(
                f"cannot connect to {path}: permission denied; run as "
                "the daemon's user, root, or its group"
            ) from exc
        except OSError as exc:
            self.sock.close()
            raise PrimaryNotRunning(f"cannot connect to {path}: {exc.strerror}") from exc
        greeting = self._recv(MAX_GREETING)
        if not isinstance(greeting, dict):
            self.close()
            raise ProtocolError(f"unexpected greeting from {path}: {greeting!r}")
        if "error" in greeting:
            self.close()
            message = str(greeting["error"])
            if "permission denied" in message:
                raise PermissionDenied(message)
            raise MemdError(message)
        self.greeting = greeting
        self.max_output_len = int(greeting.get("max_output_len", MAX_OUTPUT_LEN))

    def _recv(self, size: int) -> Any:
        try:
            data = self.sock.recv(size)
        except TimeoutError as exc:
            raise ProtocolError(f"no reply from {self.path} in time") from exc
        if not data:
            raise PrimaryNotRunning(f"memd closed the admin connection on {self.path}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ProtocolError(f"bad JSON from {self.path}: {data[:80]!r}") from exc

    def raw(self, request: str) -> dict[str, Any]:
        """Send one request packet; return the whole reply object ``{"/cmd": value}``."""
        self.sock.send(request.encode())
        reply = self._recv(max(self.max_output_len, MAX_OUTPUT_LEN) + 1)
        if not isinstance(reply, dict):
            raise ProtocolError(f"bad reply to {request!r}: {reply!r}")
        return reply

    def query(self, cmd: str, params: object = None) -> Any:
        """The value of ``cmd`` (with optional ``params``); None means a null reply.
        Raises MemdError with the daemon's reason when it could not answer (a
        structure busy behind a stopped process, or found corrupt)."""
        request = cmd if params is None else f"{cmd},{params}"
        reply = self.raw(request)
        if len(reply) != 1:
            raise ProtocolError(f"bad reply to {request!r}: {reply!r}")
        value = next(iter(reply.values()))
        if isinstance(value, dict) and value.keys() == {"error"}:
            raise MemdError(f"{request}: {value['error']}")
        return value

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
