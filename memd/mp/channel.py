"""The primary/secondary protocol: msgpack maps over ZeroMQ (docs/design.md, "The protocol").

Every message is a msgpack map with ``type`` (str) and ``id`` (int) plus the
parameters of its type.  Every reply uses one envelope::

    {"type": "reply", "id": <request id>, "status": 0 | errno, "reason": str, ...}

The primary binds a ROUTER socket.  Each secondary connects two DEALER sockets:
``sync`` (owned by its background thread: registration and the primary's
``sync`` requests) and ``req`` (its own requests: ``alloc``, ``shrink``, ...).
Messages larger than MAX_MESSAGE or outside the schema get an error reply and
change nothing.  Handlers document their message in their docstrings.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgpack
import zmq

from memd.errors import PrimaryNotRunning, ProtocolError
from memd.mp.access import AccessPolicy, PeerCred
from memd.shm.config import block_fault_signals

log = logging.getLogger("memd.mp.channel")

MAX_MESSAGE = 4096  # bytes: the largest valid message is far smaller
MAX_REASON = 1024  # bytes of a reply's reason (the secondary accepts strs this long)
PROTOCOL_VERSION = 2  # 2: register answers with each memseg list's page directory
_UNPACK_LIMITS = {
    "max_str_len": 256,
    "max_bin_len": 0,
    "max_array_len": 16,
    "max_map_len": 16,
    "max_ext_len": 0,
}


def encode(msg: dict[str, Any]) -> bytes:
    out: bytes = msgpack.packb(msg, use_bin_type=True)  # typed Any by msgpack
    return out


def decode(data: bytes, max_str_len: int = _UNPACK_LIMITS["max_str_len"]) -> dict[str, Any]:
    """Decode and check the envelope; raises ProtocolError on anything else.
    Secondaries pass max_str_len=MAX_REASON: the primary's error reasons are longer
    than anything a request needs."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = msgpack.unpackb(
            data, raw=False, strict_map_key=True, **{**_UNPACK_LIMITS, "max_str_len": max_str_len}
        )
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"not a msgpack message: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a msgpack map")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("a message needs a str 'type'")
    mid = msg.get("id")
    if not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid < 2**63:
        raise ProtocolError("a message needs an int 'id' in [0, 2**63)")
    return msg


def frame_credentials(frame: zmq.Frame) -> PeerCred | None:
    """The sender's uid/gid/pid: libzmq reports SO_PEERCRED of an ipc:// peer as
    the Peer-Address property "<host>:<uid>:<gid>:<pid>"."""
    try:
        fields = cast(str, frame.get("Peer-Address")).rsplit(":", 3)
        return PeerCred(pid=int(fields[3]), uid=int(fields[1]), gid=int(fields[2]))
    except (zmq.ZMQError, ValueError, IndexError, AttributeError):
        return None


def reply(mid: int, status: int = 0, reason: str = "", **data: Any) -> dict[str, Any]:
    if len(reason) > MAX_REASON // 4:  # keep it whole unless it cannot be
        reason = reason.encode()[:MAX_REASON].decode(errors="ignore")
    return {"type": "reply", "id": mid, "status": status, "reason": reason, **data}


def param(
    msg: dict[str, Any], key: str, kind: type, lo: int | None = None, hi: int | None = None
) -> Any:
    """Fetch a typed, bounded parameter or raise ProtocolError naming it."""
    value = msg.get(key)
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"'{key}' must be an int")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ProtocolError(f"'{key}' = {value} is outside [{lo}, {hi}]")
    elif not isinstance(value, kind):
        raise ProtocolError(f"'{key}' must be a {kind.__name__}")
    return value


class Peer:
    """A registered secondary as the primary sees it."""

    def __init__(
        self, identity: bytes, slot: int, pid: int, start_time: int, pidfd: int = -1
    ) -> None:
        self.identity = identity
        self.slot = slot
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd  # readable once the process exits (-1: none)
        self.recent_ids: deque[int] = deque(maxlen=256)
        self.mem_events = False  # has memory event callbacks: memory changes wait for it
        # missed a sync (stopped, busy): later ones are sent but not waited for,
        # until it answers one, so it delays at most one change
        self.late = False

    def owns(self, identity: bytes) -> bool:
        """Its sync socket (b'sync-<x>') or its request socket (b'req-<x>')."""
        return identity in (self.identity, b"req-" + self.identity[5:])


class Server:
    """The primary's ROUTER socket.  Not thread-safe by itself: `lock` guards it.

    handlers: type -> fn(identity, msg) -> reply dict.  `sync_all` broadcasts a
    message to every peer and collects their replies, queueing other requests
    that arrive meanwhile so nothing is lost.

    Peers are watched through their pidfds in the same poll as the socket: a
    peer that dies is handed to `on_death` (the primary reclaims it) as soon as
    the poll wakes, and requests it left queued are dropped.
    """

    def __init__(
        self,
        endpoint: str,
        handlers: dict[str, Callable[..., dict[str, Any]]],
        sync_timeout: float = 2.0,
        policy: AccessPolicy | None = None,
    ) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()  # ours alone, as Channel's
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE * 4)  # drop absurd frames in libzmq
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer raises, not drops
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.handlers = handlers
        self.sync_timeout = sync_timeout
        self.peers: dict[bytes, Peer] = {}  # sync identity -> peer
        self.policy = policy
        self.current_cred: PeerCred | None = None  # the sender of the message in hand
        self.lock = threading.RLock()
        self._pending: deque[list[zmq.Frame]] = deque()
        self._ids = itertools.count(1)
        self.on_death: Callable[[Peer], None] = lambda peer: None
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._watched: dict[int, Peer] = {}  # pidfd -> peer
        self._dead: list[Peer] = []  # died during a sync_all, reclaimed by poll_once

    # --- peers -----------------------------------------------------------------

    def add_peer(self, peer: Peer) -> None:
        old = self.peers.pop(peer.identity, None)
        if old is not None:
            self._unwatch(old)
        self.peers[peer.identity] = peer
        if peer.pidfd >= 0:
            self._watched[peer.pidfd] = peer
            self._poller.register(peer.pidfd, zmq.POLLIN)

    def remove_peer(self, peer: Peer) -> None:
        """Forget `peer`, close its pidfd and drop requests it left queued."""
        if self.peers.get(peer.identity) is peer:
            del self.peers[peer.identity]
        self._unwatch(peer)
        self._pending = deque(f for f in self._pending if not peer.owns(f[0].bytes))

    def _unwatch(self, peer: Peer) -> None:
        if peer.pidfd >= 0 and self._watched.get(peer.pidfd) is peer:
            del self._watched[peer.pidfd]
            self._poller.unregister(peer.pidfd)
            os.close(peer.pidfd)
            peer.pidfd = -1

    def set_aside(self, peer: Peer) -> None:
        """`peer` died: send it nothing more; the next poll_once hands it to on_death.
        For callers that hold a lock the reclaim takes (a heap lock in a sync)."""
        self._unwatch(peer)
        if peer not in self._dead:
            self._dead.append(peer)

    def _reap(self, events: dict[Any, int]) -> None:
        """Hand peers whose pidfd turned readable (or that died in a sync) to on_death."""
        dead = self._dead + [p for fd, p in list(self._watched.items()) if fd in events]
        self._dead = []
        for peer in dead:
            if peer.identity in self.peers:
                try:
                    self.on_death(peer)  # which forgets the peer
                except Exception:  # the daemon keeps serving the living
                    log.exception("reclaiming dead pid %d failed", peer.pid)
                    self.remove_peer(peer)

    def close(self) -> None:
        with self.lock:
            for peer in list(self.peers.values()):
                self._unwatch(peer)
            self.sock.close(linger=0)
            self.ctx.term()

    def send(self, identity: bytes, msg: dict[str, Any]) -> bool:
        try:
            self.sock.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # peer gone (EHOSTUNREACH) or its queue is full
            log.debug("send to %r failed: %s", identity, e)
            return False

    def poll_once(self, timeout_ms: int) -> int:
        """Handle queued and incoming requests for up to timeout_ms; returns count."""
        handled = 0
        with self.lock:
            self._reap({})
            while self._pending:
                self._handle(self._pending.popleft())
                handled += 1
            events = dict(self._poller.poll(timeout_ms))
            if self._watched.keys() & events.keys():
                self._reap(events)
            if events.get(self.sock):
                while True:
                    try:
                        frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    handled += 1
        return handled

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            if frames:
                self.send(frames[0].bytes, reply(0, errno.EPROTO, "expected one message frame"))
            return
        identity, data = frames[0].bytes, frames[1].bytes
        self.current_cred = cred = frame_credentials(frames[1])
        if self.policy is not None:
            why = "cannot tell who sent it" if cred is None else self.policy.refusal(cred)
            if why is not None:
                self.send(identity, reply(0, errno.EACCES, f"memd: {why}"))
                return
        try:
            msg = decode(data)
        except ProtocolError as e:
            self.send(identity, reply(0, errno.EPROTO, str(e)))
            return
        if msg["type"] == "reply" and identity in self.peers:  # a late sync answer
            self.peers[identity].late = False  # caught up: waited for again
            return
        handler = self.handlers.get(msg["type"])
        if handler is None:
            self.send(
                identity,
                reply(msg["id"], errno.EOPNOTSUPP, f"unknown message type {msg['type']!r}"),
            )
            return
        peer = self.peer_of(identity)
        if peer is not None:
            if msg["id"] in peer.recent_ids:
                self.send(
                    identity, reply(msg["id"], errno.EALREADY, f"duplicate request id {msg['id']}")
                )
                return
            peer.recent_ids.append(msg["id"])
        try:
            answer = handler(identity, msg)
        except ProtocolError as e:
            answer = reply(msg["id"], errno.EINVAL, str(e))
        except MemoryError as e:
            answer = reply(msg["id"], errno.ENOMEM, str(e))
        except Exception as e:
            log.exception("handler for %r failed", msg["type"])
            answer = reply(msg["id"], errno.EIO, f"{type(e).__name__}: {e}")
        if answer is not None:
            self.send(identity, answer)

    def peer_of(self, identity: bytes) -> Peer | None:
        """Requests come from a peer's req socket (b'req-<x>') or its sync socket."""
        if identity.startswith(b"req-"):
            return self.peers.get(b"sync-" + identity[4:])
        return self.peers.get(identity)

    def sync_all(
        self,
        msg: dict[str, Any],
        timeout: float | None = None,
        peers: Sequence[Peer] | None = None,
    ) -> list[tuple[Peer, str]]:
        """Send `msg` to every peer (or those in `peers`) and wait for each reply
        (up to the timeout).  Returns the peers that failed, with the reason;
        requests arriving meanwhile are queued for poll_once."""
        timeout = self.sync_timeout if timeout is None else timeout
        failures: list[tuple[Peer, str]] = []
        with self.lock:
            waiting: dict[bytes, tuple[Peer, int]] = {}
            for peer in list(self.peers.values()) if peers is None else peers:
                if peer in self._dead:
                    continue  # died: poll_once reclaims it
                sid = next(self._ids)
                if self.send(peer.identity, {**msg, "id": sid}):
                    waiting[peer.identity] = (peer, sid)
                else:
                    failures.append((peer, "unreachable"))
            deadline = time.monotonic() + timeout
            while waiting:
                left = deadline - time.monotonic()
                events = dict(self._poller.poll(int(max(left, 0) * 1000) + 1))
                for fd, peer in list(self._watched.items()):
                    if fd in events and peer.identity in waiting:
                        del waiting[peer.identity]  # died: nothing to wait for
                        self.set_aside(peer)  # (a readable pidfd would spin this poll)
                if not events.get(self.sock):
                    if time.monotonic() >= deadline:
                        break
                    continue
                try:
                    frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                who = frames[0].bytes
                if len(frames) == 2 and who in waiting:
                    try:
                        ans = decode(frames[1].bytes, max_str_len=MAX_REASON)
                    except ProtocolError:
                        ans = None
                    peer, sid = waiting[who]
                    if ans and ans.get("type") == "reply" and ans.get("id") == sid:
                        del waiting[who]
                        if ans.get("status"):
                            failures.append((peer, str(ans.get("reason", "failed"))))
                        continue
                self._pending.append(frames)
            failures.extend((peer, f"no reply in {timeout:g} s") for peer, _ in waiting.values())
        return failures


class Channel:
    """A secondary's connection to the primary: `request` from any thread (a lock
    serialises the req socket) and a background thread answering `sync`."""

    def __init__(
        self,
        endpoint: str,
        name: str,
        on_sync: Callable[[dict[str, Any]], None],
        timeout: float = 5.0,
    ) -> None:
        # Our own context: the application may destroy the shared one
        # (zmq.Context.instance().destroy()) without cutting us off.
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.on_sync = on_sync
        self._ids = itertools.count(1)
        self._req_lock = threading.Lock()
        self.req = self._socket(b"req-" + name.encode())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_sock: zmq.Socket[bytes] | None = None
        self.alive_check: Callable[[], bool] = lambda: True
        self.stopped_check: Callable[[], bool] = lambda: False  # gone cleanly, not died
        self.watch_fd = -1  # the primary's pidfd: polled with the sockets, so a wait
        #                     ends the moment the primary dies
        # close() wakes the sync thread through it: an idle secondary's thread sleeps
        # in one poll with no timeout (64 idle secondaries polling every 100 ms
        # slowed everyone's growth)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def _socket(self, identity: bytes) -> zmq.Socket[bytes]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, identity)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def register(self, params: dict[str, Any]) -> dict[str, Any]:
        """Register through the sync socket (so the primary learns its identity),
        then hand that socket to the background thread."""
        sock = self._socket(b"sync-" + self.name.encode())
        try:
            ans = self._call(sock, {"type": "register", **params}, self.timeout)
        except BaseException:
            sock.close(linger=0)
            raise
        if ans["status"]:
            sock.close(linger=0)
            return ans
        self._sync_sock = sock
        self._thread = threading.Thread(target=self._serve_sync, name="memd-sync", daemon=True)
        self._thread.start()
        return ans

    def _call(self, sock: zmq.Socket[bytes], msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        mid = next(self._ids)
        sock.send(encode({**msg, "id": mid}))
        deadline = time.monotonic() + timeout
        poller = self._poller(sock)
        while True:
            left = deadline - time.monotonic()
            # the pidfd wakes us when the primary dies; without one, look every 200 ms
            events = dict(poller.poll(int(min(max(left, 0), 0.2) * 1000) + 1))
            if events.get(sock):
                ans = decode(sock.recv(), max_str_len=MAX_REASON)
                if ans.get("type") == "reply" and ans.get("id") == mid:
                    ans.setdefault("status", 0)
                    return ans
                continue  # a late reply to an earlier, timed-out request
            if not self.alive_check():
                how = "was stopped" if self.stopped_check() else "died"
                raise PrimaryNotRunning(
                    f"the primary {how} while serving this request; restart memd and attach again"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no reply to {msg['type']!r} from the primary in {timeout:g} s")

    def _poller(self, sock: zmq.Socket[bytes]) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self.watch_fd >= 0:
            poller.register(self.watch_fd, zmq.POLLIN)
        return poller

    def request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        with self._req_lock:
            return self._call(self.req, msg, self.timeout if timeout is None else timeout)

    def _serve_sync(self) -> None:
        # sent SIGSEGV/SIGBUS are the application's (its handlers, its threads);
        # let through only while the primary's message runs callbacks
        app_mask = block_fault_signals()
        sock = self._sync_sock
        assert sock is not None
        poller = self._poller(sock)
        poller.register(self._wake_fd, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll())  # woken by a message, the pidfd or close()
                if self._wake_fd in events:
                    return
                if self.watch_fd in events:
                    if self.stopped_check():
                        log.info(
                            "the memd primary was stopped (clean shutdown); calls that need "
                            "it raise PrimaryNotRunning"
                        )
                    else:
                        log.warning(
                            "the memd primary died; calls that need it raise PrimaryNotRunning"
                        )
                    return
                if not events.get(sock):
                    continue
                data = sock.recv()
            except zmq.ZMQError:
                return
            try:
                msg = decode(data, max_str_len=MAX_REASON)
            except ProtocolError as e:
                log.warning("bad message from the primary: %s", e)
                continue
            if msg["type"] == "reply":
                continue
            quiet = signal.pthread_sigmask(signal.SIG_SETMASK, app_mask)
            try:
                self.on_sync(msg)
                ans = reply(msg["id"])
            except Exception as e:
                ans = reply(msg["id"], errno.EIO, f"{type(e).__name__}: {e}")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, quiet)
            try:
                sock.send(encode(ans))
            except zmq.ZMQError:
                return

    def close(self) -> None:
        self._stop.set()
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self._sync_sock is not None:
            self._sync_sock.close(linger=0)
        self.req.close(linger=0)
        if self._thread is None or not self._thread.is_alive():
            self.ctx.term()  # (a sync thread stuck in on_sync still has a socket)
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
