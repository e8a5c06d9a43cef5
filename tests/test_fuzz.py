"""Fuzzing both of memd's sockets with hypothesis, 10 000 inputs each, against a real
daemon (docs/design.md, "The protocol": malformed or oversized input gets an error reply
and changes nothing).

Every generated input is invalid by construction (or, for ``alloc``, valid but
impossible to satisfy), so each must get an error reply and leave the daemon as it
was: every 500 inputs and at the end the observable state (info, memsegs, memzones,
processes, heap stats, rings, mempools, /memd/stats) must equal the snapshot taken
before, and the daemon must still answer ``ping``, admin commands and a new secondary
that mallocs past the preallocated memory.

Both run in --no-huge mode only: parsing and the handlers' checks do not depend on
the page backend, and each run takes tens of seconds (test_exhaustion.py runs the
hugepage paths).  test_telemetry.py::test_10000_random_and_malformed_packets already
throws random packets at the admin server over a fake memory; here the admin inputs
are mostly mutated commands and parameters, against the real daemon.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memd.admin.telemetry import TelemetryClient
from memd.errors import ProtocolError
from memd.mp.channel import MAX_MESSAGE, MAX_REASON, PROTOCOL_VERSION, decode, reply
from memd.paths import mp_endpoint, telemetry_path
from memd.shm.config import proc_start_time
from memd.testing import Daemon

CASES = int(os.environ.get("MEMD_FUZZ_CASES", "10000"))  # per socket; fewer for a quick run
CHECK_EVERY = 500
REPLY_WAIT_MS = 10_000
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
KNOWN = ("register", "unregister", "alloc", "shrink", "ping")
U64 = 2**64 - 1
I64 = -(2**63)  # msgpack holds ints in [I64, U64]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One --no-huge daemon with something in every table."""
    d = Daemon(tmp_path_factory.mktemp("fuzz"), "nohuge", "-m", "8").start()
    try:
        with d.attach() as mem:
            mem.memzone_reserve("fz_zone", 1 << 20)
            mem.ring_create("fz_ring", 1024)
            mem.mempool_create("fz_pool", 64, 256)
            mem.malloc(12 << 20)  # past -m 8: pages a wrong shrink could give back
        yield d
    finally:
        assert d.stop() == 0, d.log_text()


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """What a secondary and the admin socket can see of the daemon."""
    with (
        daemon.attach() as mem,
        TelemetryClient(telemetry_path(daemon.prefix, str(daemon.runtime_dir))) as admin,
    ):
        stats = admin.query("/memd/stats")
        return {
            "info": {k: v for k, v in mem.info().items() if k != "proc_slot"},
            "memsegs": mem.memsegs(),
            "memzones": [(z.id, z.name, z.offset, z.length) for z in mem.memzones()],
            # our own observer attaches and detaches: the others must stay as they were
            "processes": [p for p in mem.processes() if p["slot"] != mem.proc_slot],
            "heap": mem.heap_stats(0),
            "rings": [(r.name, r.count) for r in mem.rings()],
            "mempools": [(p.name, p.avail_count()) for p in mem.mempools()],
            "admin_errors": stats["admin_errors"],
            "stats": {
                k: v
                for k, v in stats.items()
                if not k.startswith("admin_") and k not in ("processes", "secondaries")
            },
        }


def every(n: int, check: Callable[[], None]) -> Callable[[], None]:
    counter = itertools.count(1)

    def tick() -> None:
        if next(counter) % n == 0:
            check()

    return tick


def daemon_still_serves(daemon: Daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()
    with daemon.attach() as mem:
        blk = mem.malloc(10 << 20)  # grows the heap: alloc through the primary works
        mem.free(blk)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


# -- the ZeroMQ socket -------------------------------------------------------------------


def _nested(depth: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(depth):
        v = [v]
    return v


# Small random trees that decode (hypothesis is slow on big ones); `msgpack_values` adds
# bins and cheap shapes past each of the decoder's limits: 16 entries per array or
# map, 256 characters, no bin, str or bin map keys only, nesting.
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(I64, U64) | st.floats() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=6,
)
msgpack_values = st.one_of(
    plain_values,
    plain_values,
    plain_values,
    st.binary(min_size=1, max_size=8),
    st.integers(17, 300).map(lambda n: list(range(n))),
    st.integers(17, 100).map(lambda n: {f"k{i}": i for i in range(n)}),
    st.dictionaries(
        st.integers(I64, U64) | st.floats(allow_nan=False), plain_values, min_size=1, max_size=3
    ),
    st.integers(257, 2000).map(lambda n: "s" * n),
    st.integers(2, 500).map(_nested),
)  # msgpack packs up to 511 levels
not_int = plain_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
VOCAB = [
    "type",
    "id",
    "pid",
    "start_time",
    "version",
    "comm",
    "heap",
    "size",
    "align",
    "bound",
    "contig",
    "generation",
    "status",
    "reason",
    "slot",
]


class _Fresh:
    def __repr__(self) -> str:
        return "FRESH"


FRESH = _Fresh()  # stands for a new request id, filled in when the case is sent


@dataclass
class Case:
    sender: str  # which DEALER sends it (key of the sockets dict)
    body: Any = None  # a msgpack value for the first frame
    more: tuple[bytes, ...] = ()  # raw frames (after the body, if there is one)
    tail: bytes = b""  # bytes after the body's msgpack
    dup: bool = False  # send twice: a registered peer's second copy is EALREADY

    def frames(self, fresh: Callable[[], int]) -> list[bytes]:
        if self.body is None:
            return list(self.more)

        def fill(v: Any) -> Any:  # FRESH is in the top map, or in the list wrapping it
            if isinstance(v, dict) and v.get("id") is FRESH:
                return {**v, "id": fresh()}
            return [fill(v[0])] if isinstance(v, list) and len(v) == 1 else v

        return [msgpack.packb(fill(self.body), use_bin_type=True) + self.tail, *self.more]


def _pack(msg: Any) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _not_a_request(v: Any) -> bool:
    return not (isinstance(v, dict) and v.get("type") in KNOWN)


def random_bytes(senders: list[str]) -> st.SearchStrategy[Case]:
    def harmless(b: bytes) -> bool:
        try:
            return _not_a_request(msgpack.unpackb(b))
        except Exception:
            return True

    frame = st.binary(max_size=600).filter(harmless) | st.integers(500, 4000).map(
        lambda n: b"\x91" * n + b"\xc0"
    )  # [[[...nil...]]], deeper than msgpack unpacks
    frames = frame.map(lambda f: (f,)) | st.lists(frame, min_size=2, max_size=3).map(tuple)
    return st.builds(Case, st.sampled_from(senders), more=frames)


def random_values(senders: list[str]) -> st.SearchStrategy[Case]:
    maps = st.dictionaries(st.sampled_from(VOCAB), msgpack_values, max_size=6)
    return st.builds(
        Case,
        st.sampled_from(senders),
        (msgpack_values | maps).filter(lambda v: v is not None and _not_a_request(v)),
    )


@functools.cache
def param_breakers(kind: str, pid: int, start: int) -> st.SearchStrategy[tuple]:
    """(key, value) or (key, None: drop it) that make `kind` invalid whatever else."""

    def bad(key: str, *values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple]:
        return st.tuples(st.just(key), st.one_of(st.none(), not_int, *values))

    if kind == "register":
        return st.one_of(
            bad(
                "pid",
                st.integers(I64, 0),
                st.integers(2**31, U64),
                st.integers(1, 2**31 - 1).filter(lambda p: p != pid),  # someone else
                st.integers(1, 2**31 - 1).filter(lambda p: p != pid),
            ),
            bad(
                "start_time",
                st.integers(I64, -1),
                st.integers(2**63 + 1, U64),
                st.integers(1, 2**63).filter(lambda s: s != start),
            ),  # a dead process
            bad(
                "version",
                st.integers(0, 2**31).filter(lambda v: v != PROTOCOL_VERSION),
                st.integers(I64, -1),
            ),
        )  # another version
    if kind == "alloc":
        non_pow2 = st.integers(3, 2**30).filter(lambda a: a & (a - 1))
        return st.one_of(
            bad(
                "heap", st.integers(I64, -1), st.integers(8, U64), st.integers(1, 7)
            ),  # only heap 0 exists
            bad("size", st.integers(I64, 0), st.integers(2**48 + 1, U64)),
            bad("align", st.integers(I64, -1), st.integers(2**30 + 1, U64), non_pow2),
            bad(
                "bound",
                st.integers(I64, -1),
                st.integers(2**48 + 1, U64),
                non_pow2,
                st.sampled_from([64, 1024, 2048]),
            ),
        )  # smaller than size
    if kind == "shrink":
        return bad("heap", st.integers(I64, -1), st.integers(8, U64), st.integers(1, 7))
    return st.nothing()


ENVELOPE_BREAKERS = st.one_of(
    st.tuples(
        st.just("type"),
        st.one_of(
            st.none(),
            not_int,
            st.sampled_from(["reply", "sync", "shutdown", "PING", "", "alloc "]),
            st.text(max_size=12).filter(lambda t: t not in KNOWN),
        ),
    ),
    st.tuples(
        st.just("id"), st.one_of(st.none(), not_int, st.integers(I64, -1), st.integers(2**63, U64))
    ),
)
STRUCTURAL = st.sampled_from(["list", "tail", "frames", "oversize"])
EXTRA_KEYS = st.dictionaries(
    st.text(min_size=1, max_size=8).map(lambda k: "x_" + k), plain_values, max_size=3
)
# who sends each kind, the interesting senders first: register from a sync- socket
# reaches its pid/start/version checks, alloc and shrink from a registered one theirs
SENDERS = {
    "register": ["sync-ghost", "sync-ghost", "registered", "req-ghost", "anonymous"],
    "alloc": ["registered", "registered", "registered", "req-ghost", "anonymous"],
    "shrink": ["registered", "registered", "registered", "sync-ghost", "anonymous"],
}


@st.composite
def mutated_requests(draw: st.DrawFn, senders: list[str], pid: int, start: int) -> Case:
    """A request of every type made invalid by its sender or one to three mutations:
    mostly of its parameters, one time in four of its envelope or framing too."""
    kind = draw(st.sampled_from(KNOWN))
    sender = draw(st.sampled_from(SENDERS.get(kind, senders)))
    msg: dict[Any, Any] = {"type": kind, "id": FRESH}
    msg.update(
        {
            "register": {
                "pid": pid,
                "start_time": start,
                "version": PROTOCOL_VERSION,
                "comm": "fuzz",
            },
            "alloc": {"heap": 0, "size": 4096, "align": 0, "bound": 0, "contig": False},
            "shrink": {"heap": 0},
        }.get(kind, {})
    )
    if kind == "alloc" and sender == "registered" and draw(st.integers(0, 3)) == 0:
        msg["size"] = draw(st.integers(2**35, 2**48))  # valid, and too big for any list
        msg["align"] = draw(st.sampled_from([0, 64, 4096, 2**30]))
        return Case(sender, msg, dup=draw(st.booleans()))
    # unregister/alloc/shrink from a stranger and register from a non-sync socket fail
    # by themselves; anything else needs at least one breaking mutation
    inherent = (kind in ("unregister", "alloc", "shrink") and sender != "registered") or (
        kind == "register" and sender != "sync-ghost"
    )
    pool = param_breakers(kind, pid, start)
    if kind in ("ping", "unregister") or draw(st.integers(0, 3)) == 0:
        pool = pool | ENVELOPE_BREAKERS | STRUCTURAL
    breakers = draw(st.lists(pool, min_size=0 if inherent else 1, max_size=3))
    msg.update(draw(EXTRA_KEYS))
    shape = set()
    for b in breakers:
        if isinstance(b, str):
            shape.add(b)
        elif b[1] is None:
            msg.pop(b[0], None)
        else:
            msg[b[0]] = b[1]
    if "oversize" in shape:
        msg["x_pad"] = "x" * draw(st.integers(MAX_MESSAGE, 3 * MAX_MESSAGE))
    tail = draw(st.binary(min_size=1, max_size=8)) if "tail" in shape else b""
    more = (
        draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3)) if "frames" in shape else []
    )
    return Case(sender, [msg] if "list" in shape else msg, tuple(more), tail, draw(st.booleans()))


def expected(frames: list[bytes]) -> tuple[int, set[int]]:
    """The reply id and the statuses the protocol allows for this invalid input."""
    if len(frames) != 1:
        return 0, {errno.EPROTO}
    try:
        msg = decode(frames[0])
    except ProtocolError:
        return 0, {errno.EPROTO}
    if msg["type"] not in KNOWN:
        return msg["id"], {errno.EOPNOTSUPP}
    return msg["id"], {
        errno.EINVAL,
        errno.EPERM,
        errno.ENOENT,
        errno.ESRCH,
        errno.EALREADY,
        errno.EPROTONOSUPPORT,
        errno.ENOMEM,
    }


def recv_reply(sock: zmq.Socket, daemon: Daemon, what: object) -> dict[str, Any]:
    if not sock.poll(REPLY_WAIT_MS, zmq.POLLIN):
        pytest.fail(
            f"no reply in {REPLY_WAIT_MS // 1000} s to {what!r}; daemon log:\n"
            + daemon.log_text()[-3000:]
        )
    return msgpack.unpackb(sock.recv(), raw=False)


def dealer(daemon: Daemon, identity: bytes | None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(mp_endpoint(daemon.prefix, daemon.runtime_dir))
    return s


class Peers:
    """DEALER sockets on the primary's endpoint: "registered" took over the request
    identity (b"req-<name>", see memd.mp.channel.Channel) of a secondary attached here, so
    its messages reach the handlers' parameter checks; the others are strangers."""

    def __init__(self, daemon: Daemon) -> None:
        self.ids = itertools.count(1 << 40)  # fresh ids: a duplicate only when wanted
        self.victim = daemon.attach()
        channel = self.victim._channel
        assert channel is not None
        channel.req.close(linger=0)
        self.daemon = daemon
        self.socks: dict[str, zmq.Socket] = {}
        for key, identity in [
            ("registered", b"req-" + channel.name.encode()),
            ("req-ghost", b"req-ghost"),
            ("sync-ghost", b"sync-ghost"),
            ("anonymous", None),
        ]:
            self._connect(key, identity)

    def _connect(self, key: str, identity: bytes | None) -> None:
        # Without ROUTER_HANDOVER, libzmq ignores a connection whose identity is still
        # held (by the secondary's socket, until the primary has seen it close):
        # reconnect until a ping is answered.
        for _ in range(50):
            s = self.socks[key] = dealer(self.daemon, identity)
            s.send(_pack({"type": "ping", "id": next(self.ids)}))
            if s.poll(200, zmq.POLLIN):
                assert msgpack.unpackb(s.recv())["pid"] == self.daemon.pid
                return
            s.close()
        pytest.fail(f"{key}: no answer to ping on a new connection in 10 s")

    def call(self, sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        sock = self.socks[sender]
        sock.send(_pack({**msg, "id": next(self.ids)}))
        return recv_reply(sock, self.daemon, msg)

    def close(self) -> None:
        # the victim's own unregister would go through the socket we closed; left
        # registered, its unreachable sync socket would make every expansion roll back
        ans = self.call("registered", {"type": "unregister"})
        assert ans["status"] in (0, errno.ENOENT), ans
        for s in self.socks.values():
            s.close()
        self.victim.detach()


@pytest.fixture
def peers(daemon: Daemon) -> Iterator[Peers]:
    p = Peers(daemon)
    # the takeover worked: the primary checks our parameters, not "register first"
    assert p.call("registered", {"type": "shrink", "heap": "x"})["status"] == errno.EINVAL
    yield p
    p.close()


# Requests only a hand-made client sends, each of which the primary once acted on:
# "shrink" of a heap that does not exist answered 0; "alloc" with an align or bound
# that malloc and memzone_reserve refuse mapped a new page every time.
REFUSED = [
    {"type": "shrink", "heap": 3},
    {"type": "alloc", "heap": 0, "size": 4096, "align": 3, "bound": 0, "contig": False},
    {"type": "alloc", "heap": 0, "size": 4096, "align": 0, "bound": 1000, "contig": False},
    {"type": "alloc", "heap": 0, "size": 1 << 20, "align": 0, "bound": 64, "contig": False},
]


@pytest.mark.parametrize("msg", REFUSED, ids=lambda m: f"{m['type']}-{len(m)}")
def test_requests_no_client_makes_are_refused(
    daemon: Daemon, peers: Peers, msg: dict[str, Any]
) -> None:
    before = snapshot(daemon)
    ans = peers.call("registered", msg)
    assert ans["status"] == errno.EINVAL and ans["reason"], ans
    assert snapshot(daemon) == before


@pytest.mark.parametrize(
    "comm, shown", [("\u00e9" * 31, "\u00e9" * 15), ("a\0b", "ab")], ids=["cut-utf8", "nul"]
)
def test_register_stores_a_comm_that_reads_back(daemon: Daemon, comm: str, shown: str) -> None:
    """The process table keeps 31 bytes of comm: "\u00e9" * 31 used to be cut inside a
    character, after which processes() raised for everyone (/memd/processes and
    /memd/stats answered null); a NUL in it made register fail with EIO."""
    s = dealer(daemon, b"sync-comm-%d" % len(comm))  # one identity per case: see Peers
    s.send(
        _pack(
            {
                "type": "register",
                "id": 1,
                "pid": os.getpid(),
                "version": PROTOCOL_VERSION,
                "start_time": proc_start_time(os.getpid()) or 0,
                "comm": comm,
            }
        )
    )
    ans = recv_reply(s, daemon, comm)
    try:
        assert ans["status"] == 0, ans
        with daemon.attach() as mem:
            assert {p["slot"]: p["comm"] for p in mem.processes()}[ans["slot"]] == shown
        with TelemetryClient(telemetry_path(daemon.prefix, str(daemon.runtime_dir))) as admin:
            assert shown in [p["comm"] for p in admin.query("/memd/processes")]
            assert admin.query("/memd/stats")["secondaries"] >= 1
    finally:
        s.send(_pack({"type": "unregister", "id": 2}))
        assert recv_reply(s, daemon, "unregister")["status"] in (0, errno.ENOENT)
        s.close()


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(reason=st.text(max_size=3000))
def test_any_reply_reason_reaches_a_secondary(reason: str) -> None:
    """A reply's reason is kept whole up to MAX_REASON bytes, and a secondary decodes
    any reply (its decode once had the primary's 256-byte limit for requests)."""
    data = _pack(reply(7, errno.ENOMEM, reason, slot=1))
    assert len(data) <= MAX_MESSAGE
    back = decode(data, max_str_len=MAX_REASON)["reason"]
    assert back == reason if len(reason.encode()) <= MAX_REASON else reason.startswith(back)


@pytest.mark.slow  # 10 000 messages: about a minute
def test_zmq_socket_fuzz(daemon: Daemon, peers: Peers) -> None:
    senders = list(peers.socks)
    before = snapshot(daemon)

    def state_unchanged() -> None:
        assert snapshot(daemon) == before

    check = every(CHECK_EVERY, state_unchanged)

    me = os.getpid(), proc_start_time(os.getpid()) or 0

    @FUZZ
    @given(
        case=st.one_of(
            random_bytes(senders),
            random_values(senders),  # half and half
            mutated_requests(senders, *me),
            mutated_requests(senders, *me),
        )
    )
    @example(case=Case("registered", {**REFUSED[0], "id": FRESH}))  # what it found
    @example(case=Case("registered", {**REFUSED[1], "id": FRESH}))
    @example(case=Case("registered", {**REFUSED[2], "id": FRESH}))
    @example(case=Case("registered", {**REFUSED[3], "id": FRESH}))
    def one(case: Case) -> None:
        frames = case.frames(lambda: next(peers.ids))
        assert all(len(f) <= 4 * MAX_MESSAGE for f in frames)  # beyond: libzmq hangs up
        sock = peers.socks[case.sender]
        mid, statuses = expected(frames)
        for attempt in range(2 if case.dup else 1):
            sock.send_multipart(frames)
            ans = recv_reply(sock, daemon, frames)
            assert ans["type"] == "reply" and isinstance(ans["reason"], str) and ans["reason"]
            assert ans["id"] == mid, (frames, ans)
            if attempt and case.sender == "registered" and errno.EINVAL in statuses:
                assert ans["status"] == errno.EALREADY, (frames, ans)
            assert ans["status"] in statuses, (frames, ans)
        check()

    one()
    state_unchanged()
    for sender in senders:
        assert peers.call(sender, {"type": "ping"})["status"] == 0
    # the registered identity was the secondary's: unregistering through it works
    assert peers.call("registered", {"type": "unregister"})["status"] == 0
    assert len(snapshot(daemon)["processes"]) == len(before["processes"]) - 1
    daemon_still_serves(daemon)


# -- the admin socket --------------------------------------------------------------------

REPLY_LIMIT = 16384  # max_output_len


class AdminConn:
    """A telemetry v2 connection (as dpdk-telemetry.py makes one) that reconnects
    after the server hangs up on it (an empty packet means end of session)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.connect()

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(REPLY_WAIT_MS / 1000)
        self.sock.connect(self.path)
        assert "pid" in json.loads(self.sock.recv(2048))  # the greeting

    def ask(self, packet: bytes) -> bytes:
        self.sock.send(packet)
        try:
            return self.sock.recv(2 * REPLY_LIMIT)
        except TimeoutError:
            pytest.fail(f"no admin reply in {REPLY_WAIT_MS // 1000} s to {packet[:100]!r}")


def reply_key(packet: bytes) -> tuple[str, bool]:
    """What the reply is keyed by, and whether the request is well formed
    (memd/admin/telemetry.py: the first 1023 bytes, a final newline dropped, split at the
    first comma, "/" + [A-Za-z0-9_/], at most 55 characters, no NUL, valid UTF-8)."""
    p = packet[:1023]
    if p.endswith(b"\n"):
        p = p.rstrip(b"\r\n")
    text = p.decode("utf-8", errors="replace")
    cmd = text.partition(",")[0]
    ok = (
        "\ufffd" not in text
        and "\0" not in text
        and re.fullmatch(r"/[A-Za-z0-9_/]{0,54}", cmd) is not None
    )
    return cmd[:56], ok


EDITS = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 60), st.characters()),
    st.tuples(st.just("insert"), st.integers(0, 60), st.sampled_from("/,_.-: \t\\\0\u00e9")),
    st.tuples(st.just("delete"), st.integers(0, 60)),
    st.tuples(st.just("replace"), st.integers(0, 60), st.sampled_from("/,_aZ09 \0")),
    st.tuples(st.just("cut"), st.integers(0, 60)),
    st.sampled_from([("upper",), ("slash",), ("double",), ("strip",)]),
)


def _edit(cmd: str, e: tuple) -> str:
    i = e[1] % (len(cmd) + 1) if len(e) > 1 else 0
    return {
        "insert": lambda: cmd[:i] + (e[2] if len(e) > 2 else "") + cmd[i:],
        "delete": lambda: cmd[:i] + cmd[i + 1 :],
        "cut": lambda: cmd[:i],
        "replace": lambda: cmd[:i] + (e[2] if len(e) > 2 else "") + cmd[i + 1 :],
        "upper": cmd.upper,
        "slash": lambda: cmd + "/",
        "double": lambda: cmd + cmd,
        "strip": lambda: cmd.lstrip("/"),
    }[e[0]]()


@st.composite
def admin_packets(draw: st.DrawFn, commands: list[str], names: list[str]) -> bytes:
    """A known command, its path edited or not, with a parameter of every shape."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=1200))  # including b"": the client hangs up
    cmd = draw(st.sampled_from(commands))
    for e in draw(st.lists(EDITS, max_size=3)) if draw(st.booleans()) else []:
        cmd = _edit(cmd, e)
    param = draw(
        st.one_of(
            st.none(),
            st.just(""),
            st.integers(-(10**30), 10**30).map(str),
            st.sampled_from(
                [
                    "0",
                    "00",
                    "+0",
                    "-0",
                    " 0",
                    "0 ",
                    "0x0",
                    "1e3",
                    "0.5",
                    "\u0663",
                    "\u00b2",
                    "7",
                    "4294967296",
                    "9" * 400,
                ]
            ),
            st.sampled_from(names + commands),
            st.tuples(st.sampled_from(names), EDITS).map(lambda t: _edit(*t)),
            st.integers(28, 70).map(lambda n: "r" * n),  # around the 32 and 64 limits
            st.text(max_size=40),
            st.lists(st.sampled_from(["0", "", "x", "/"]), min_size=2, max_size=4).map(",".join),
        )
    )
    text = cmd if param is None else f"{cmd},{param}"
    text += draw(st.sampled_from(["", "", "", "\n", "\r\n", "\n\n", " "]))
    data = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # a byte that is no UTF-8, or a NUL, somewhere
        i = draw(st.integers(0, len(data)))
        data = (
            data[:i]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"]))
            + data[i:]
        )
    if draw(st.integers(0, 19)) == 0:  # longer than the 1023 bytes read
        data += b"a" * draw(st.integers(1000, 3000))
    return data


@pytest.mark.slow  # 10 000 packets: about a minute
def test_admin_socket_fuzz(daemon: Daemon) -> None:
    path = telemetry_path(daemon.prefix, str(daemon.runtime_dir))
    conns = [AdminConn(path), AdminConn(path)]
    commands = json.loads(conns[0].ask(b"/"))["/"]
    no_params = [
        c
        for c in commands
        if "Takes no parameters" in json.loads(conns[0].ask(f"/help,{c}".encode()))["/help"][c]
    ]
    names = ["fz_zone", "fz_ring", "fz_pool", "0", "1", "2"]
    before = snapshot(daemon)

    def state_unchanged() -> None:
        assert snapshot(daemon) == before  # admin_errors too: no command raised

    check = every(CHECK_EVERY, state_unchanged)

    @FUZZ
    @given(packet=admin_packets(commands, names), which=st.integers(0, 1))
    def one(packet: bytes, which: int) -> None:
        conn = conns[which]
        reply = conn.ask(packet)
        if packet == b"":
            assert reply == b""  # the server took it as the end of the session
            conn.connect()
            return
        assert 0 < len(reply) <= REPLY_LIMIT, packet
        key, well_formed = reply_key(packet)
        decoded = json.loads(reply)
        assert list(decoded) == [key], (packet, reply[:200])
        if not (well_formed and key in commands):
            assert decoded[key] is None, (packet, reply[:200])
        elif key in no_params:  # whatever follows the comma is ignored
            assert decoded[key] is not None, (packet, reply[:200])
        check()

    one()
    state_unchanged()
    assert json.loads(conns[1].ask(b"/memd/info"))["/memd/info"]["primary_pid"] == daemon.pid
    assert json.loads(conns[0].ask(b"/"))["/"] == commands
    for c in conns:
        c.sock.close()
    daemon_still_serves(daemon)
