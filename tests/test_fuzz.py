"""Fuzzing both of memd's sockets with hypothesis, 10 000 inputs each, against a real
daemon (DESIGN.md §4: "malformed or oversized messages get an error reply and change
nothing"; §5: "every input from a socket is bounded and validated").

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
import itertools
import os
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, settings
from memd_harness import Daemon

from memd.paths import mp_endpoint
from memd.shared import proc_start_time
from memd.telemetry import TelemetryClient, socket_path

CASES = int(os.environ.get("MEMD_FUZZ_CASES", "10000"))  # the brief: 10 000 each
CHECK_EVERY = 500
REPLY_WAIT_MS = 10_000
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
KNOWN = ("register", "unregister", "alloc", "shrink", "ping")
U64 = 2**64 - 1
I64 = -(2**63)  # msgpack holds ints in [I64, U64]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One --no-huge daemon with something in every table, and an observer secondary."""
    d = Daemon(tmp_path_factory.mktemp("fuzz"), "nohuge", "-m", "8").start()
    try:
        with d.attach() as mem:
            mem.memzone_reserve("fz_zone", 1 << 20)
            mem.ring_create("fz_ring", 1024)
            mem.mempool_create("fz_pool", 64, 256)
            d.block = mem.malloc(12 << 20)  # past -m 8: non-preallocated pages exist
        yield d
    finally:
        assert d.stop() == 0, d.log_text()


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """What a secondary and the admin socket can see of the daemon."""
    with daemon.attach() as mem, TelemetryClient(
            socket_path(str(daemon.runtime_dir), daemon.prefix)) as admin:
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
            "stats": {k: v for k, v in stats.items()
                      if not k.startswith("admin_") and k not in ("processes", "secondaries")},
        }


def _pack(msg: Any) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)



def recv_reply(sock: zmq.Socket, daemon: Daemon, what: object) -> dict[str, Any]:
    if not sock.poll(REPLY_WAIT_MS, zmq.POLLIN):
        pytest.fail(f"no reply in {REPLY_WAIT_MS // 1000} s to {what!r}; daemon log:\n"
                    + daemon.log_text()[-3000:])
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
    identity (b"req-<name>", see memd.ipc.Channel) of a secondary attached here, so
    its messages reach the handlers' parameter checks; the others are strangers."""

    def __init__(self, daemon: Daemon) -> None:
        self.ids = itertools.count(1 << 40)  # fresh ids: a duplicate only when wanted
        self.victim = daemon.attach()
        channel = self.victim._channel
        assert channel is not None
        channel.req.close(linger=0)
        self.daemon = daemon
        self.socks: dict[str, zmq.Socket] = {}
        for key, identity in [("registered", b"req-" + channel.name.encode()),
                              ("req-ghost", b"req-ghost"), ("sync-ghost", b"sync-ghost"),
                              ("anonymous", None)]:
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
def test_requests_no_client_makes_are_refused(daemon: Daemon, peers: Peers,
                                              msg: dict[str, Any]) -> None:
    before = snapshot(daemon)
    ans = peers.call("registered", msg)
    assert ans["status"] == errno.EINVAL and ans["reason"], ans
    assert snapshot(daemon) == before


@pytest.mark.parametrize("comm, shown", [("\u00e9" * 31, "\u00e9" * 15), ("a\0b", "ab")],
                         ids=["cut-utf8", "nul"])
def test_register_stores_a_comm_that_reads_back(daemon: Daemon, comm: str, shown: str) -> None:
    """The process table keeps 31 bytes of comm: "\u00e9" * 31 used to be cut inside a
    character, after which processes() raised for everyone (/memd/processes and
    /memd/stats answered null); a NUL in it made register fail with EIO."""
    s = dealer(daemon, b"sync-comm-%d" % len(comm))  # one identity per case: see Peers
    s.send(_pack({"type": "register", "id": 1, "pid": os.getpid(), "version": 1,
                  "start_time": proc_start_time(os.getpid()) or 0, "comm": comm}))
    ans = recv_reply(s, daemon, comm)
    try:
        assert ans["status"] == 0, ans
        with daemon.attach() as mem:
            assert {p["slot"]: p["comm"] for p in mem.processes()}[ans["slot"]] == shown
        with TelemetryClient(socket_path(str(daemon.runtime_dir), daemon.prefix)) as admin:
            assert shown in [p["comm"] for p in admin.query("/memd/processes")]
            assert admin.query("/memd/stats")["secondaries"] >= 1
    finally:
        s.send(_pack({"type": "unregister", "id": 2}))
        assert recv_reply(s, daemon, "unregister")["status"] in (0, errno.ENOENT)
        s.close()
