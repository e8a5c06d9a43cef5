"""The admin socket: DPDK telemetry v2 byte for byte, robustness, access control.

A fake memory object (tests/support/fake_admin.py) stands in for the primary; the end-to-end
tests against a real daemon are in test_memd_ops_e2e.py.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fake_admin import FakeMem, FakeZone

from memd.admin.api import MAX_HELP_LEN, AdminAPI, BadParams, UnknownCommand, reference
from memd.admin.telemetry import (
    MAX_CLIENTS,
    TelemetryClient,
    TelemetryServer,
    encode_reply,
    parse_request,
)
from memd.hw.hugepage_info import set_roots
from memd.mp.access import AccessPolicy, PeerCred, peer_credentials, resolve_group
from memd.paths import TELEMETRY_SOCKET, telemetry_path
from memd.testing import Daemon, run_secondary

DPDK_TELEMETRY = shutil.which("dpdk-telemetry.py") or "/usr/bin/dpdk-telemetry.py"
LIMIT = 16384


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def rundir() -> Iterator[str]:
    # short and world-traversable: sun_path is 108 bytes, and the access tests run a
    # client as nobody
    d = tempfile.mkdtemp(prefix="mt", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mem() -> FakeMem:
    return FakeMem.populated()


@pytest.fixture
def server(rundir: str, mem: FakeMem) -> Iterator[TelemetryServer]:
    srv = TelemetryServer(AdminAPI(mem), rundir, "fake").start()
    yield srv
    srv.stop()


def connect(path: str) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect(path)
    return s, s.recv(2048)


def ask(s: socket.socket, request: bytes) -> bytes:
    s.send(request)
    return s.recv(LIMIT * 2)


# -- protocol -----------------------------------------------------------------------------


def test_greeting_is_one_compact_packet_under_1k(server: TelemetryServer) -> None:
    s, greeting = connect(server.path)
    with s:
        assert len(greeting) < 1024
        assert (
            greeting
            == (
                f'{{"version":"{server.api.version}","pid":{os.getpid()},"max_output_len":16384}}'
            ).encode()
        )
        assert json.loads(greeting)["max_output_len"] == 16384


def test_socket_path_is_where_dpdk_looks(server: TelemetryServer, rundir: str) -> None:
    assert server.path == os.path.join(rundir, "dpdk", "fake", TELEMETRY_SOCKET)
    assert server.path == telemetry_path("fake", rundir)
    st_ = os.stat(server.path)
    assert st_.st_mode & 0o777 == 0o600


def test_multi_command_session_replies_keyed_by_command(
    server: TelemetryServer, mem: FakeMem
) -> None:
    s, _ = connect(server.path)
    with s:
        assert ask(s, b"/eal/heap_list") == b'{"/eal/heap_list":[0]}'
        info = json.loads(ask(s, b"/eal/heap_info,0"))["/eal/heap_info"]
        assert list(info) == [
            "Heap_id",
            "Name",
            "Heap_size",
            "Free_size",
            "Alloc_size",
            "Greatest_free_size",
            "Alloc_count",
            "Free_count",
        ]
        assert info["Heap_size"] == mem.heaps[0]["heap_totalsz_bytes"]
        assert ask(s, b"/eal/memzone_list") == b'{"/eal/memzone_list":[0,1,2]}'
        assert ask(s, b"/mempool/list") == b'{"/mempool/list":["mbuf_pool"]}'
        assert ask(s, b"/ring/list") == b'{"/ring/list":["rx","tx"]}'
        assert json.loads(ask(s, b"/"))["/"] == sorted(server.api.commands())
        assert ask(s, b"/help,/eal/heap_info") == (
            b'{"/help":{"/eal/heap_info":"Returns malloc heap stats. Parameters: int heap_id"}}'
        )
        assert json.loads(ask(s, b"/info"))["/info"]["pid"] == os.getpid()
        assert json.loads(ask(s, b"/eal/params"))["/eal/params"] == mem.params()


@pytest.mark.parametrize(
    "request_, key",
    [
        (b"/bogus", "/bogus"),
        (b"/eal/heap_info", "/eal/heap_info"),  # missing parameter
        (b"/eal/heap_info,", "/eal/heap_info"),  # empty parameter
        (b"/eal/heap_info,abc", "/eal/heap_info"),  # not a number
        (b"/eal/heap_info,7", "/eal/heap_info"),  # no such heap
        (b"/eal/memzone_info,99", "/eal/memzone_info"),
        (b"/help", "/help"),
        (b"/help,/nope", "/help"),
        (b"/mempool/info", "/mempool/info"),
        (b"/ring/info," + b"r" * 40, "/ring/info"),  # longer than a ring name can be
        (b"info", "info"),  # no leading slash
        (b"/a b", "/a b"),  # bad character
        (b"/" + b"x" * 55, "/" + "x" * 55),  # 56 characters: too long
    ],
)
def test_unknown_command_or_bad_params_is_null(
    server: TelemetryServer, request_: bytes, key: str
) -> None:
    s, _ = connect(server.path)
    with s:
        reply = ask(s, request_)
    assert json.loads(reply) == {key: None}
    assert reply == b"{" + json.dumps(key).encode() + b":null}"


def test_unknown_names_give_dpdks_empty_object(server: TelemetryServer) -> None:
    s, _ = connect(server.path)
    with s:
        assert ask(s, b"/mempool/info,nope") == b'{"/mempool/info":{}}'
        assert ask(s, b"/ring/info,nope") == b'{"/ring/info":{}}'


def test_params_split_at_first_comma(server: TelemetryServer) -> None:
    assert parse_request(b"/help,/eal/heap_info") == ("/help", "/eal/heap_info", True)
    assert parse_request(b"/x,a,b") == ("/x", "a,b", True)
    assert parse_request(b"/x,") == ("/x", None, True)
    assert parse_request(b"/x") == ("/x", None, True)
    assert parse_request(b"/x\x00y")[2] is False
    assert parse_request(b"/\xff")[2] is False
    assert parse_request(b"/" + b"a" * 54)[2] is True
    assert parse_request(b"/" + b"a" * 55)[2] is False
    # at most 1023 bytes are read
    assert parse_request(b"/help," + b"a" * 5000)[1] == "a" * (1023 - 6)


def test_ring_and_mempool_shapes(server: TelemetryServer) -> None:
    s, _ = connect(server.path)
    with s:
        ring = json.loads(ask(s, b"/ring/info,rx"))["/ring/info"]
        records = json.loads(ask(s, b"/ring/info,tx"))["/ring/info"]
        pool = json.loads(ask(s, b"/mempool/info,mbuf_pool"))["/mempool/info"]
        zone = json.loads(ask(s, b"/eal/memzone_info,1"))["/eal/memzone_info"]
    assert list(ring)[:9] == [
        "name",
        "socket",
        "flags",
        "producer_type",
        "consumer_type",
        "size",
        "mask",
        "capacity",
        "used_count",
    ]
    assert ring["mask"] == "0x3ff" and ring["capacity"] == 1023 and ring["used_count"] == 10
    assert (ring["producer_type"], ring["consumer_type"]) == ("MP", "MC")
    assert list(ring)[-2:] == ["free_count", "esize"]  # memd's, after DPDK's keys
    assert ring["esize"] == 8 and records["esize"] == 24
    assert list(pool)[:12] == [
        "name",
        "pool_id",
        "flags",
        "socket_id",
        "size",
        "cache_size",
        "elt_size",
        "header_size",
        "trailer_size",
        "private_data_size",
        "ops_index",
        "populated_size",
    ]
    assert pool["in_use_count"] == 100
    assert list(zone)[:9] == [
        "Zone",
        "Name",
        "Length",
        "Address",
        "Socket",
        "Flags",
        "Hugepage_size",
        "Hugepage_base",
        "Hugepage_used",
    ]
    # zone 1 starts at 3 MiB + 128 and is 3 MiB long: it touches pages 1, 2 and 3
    assert zone["Hugepage_base"] == "0x200000" and zone["Hugepage_used"] == 3


# -- size limit ---------------------------------------------------------------------------


def test_long_reply_is_trimmed_to_valid_json(rundir: str) -> None:
    mem = FakeMem.populated(n_zones=0, n_segs=2000)
    mem.zones = [FakeZone(i, f"z{i}", offset=i * 4096, length=64) for i in range(5000)]
    with TelemetryServer(AdminAPI(mem), rundir, "big") as srv:
        s, _ = connect(srv.path)
        with s:
            reply = ask(s, b"/eal/memzone_list")
            assert len(reply) <= LIMIT
            ids = json.loads(reply)["/eal/memzone_list"]
            assert ids == list(range(len(ids))) and 1000 < len(ids) < 5000
            reply = ask(s, b"/memd/memsegs")
            assert len(reply) <= LIMIT
            first = json.loads(reply)["/memd/memsegs"]
            assert 0 < len(first) < 2000 and first[0]["slot"] == 0
        # the client pages through the whole list
        with TelemetryClient(srv.path) as c:
            segs: list[dict[str, object]] = []
            while part := c.query("/memd/memsegs", len(segs) or None):
                segs.extend(part)
        assert [sg["slot"] for sg in segs] == list(range(2000))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=40)
        | st.dictionaries(st.text(max_size=20), children, max_size=40)
    ),
    max_leaves=120,
)


@settings(max_examples=120, deadline=None)
@given(value=json_values, limit=st.integers(64, 4096))
def test_encode_reply_never_exceeds_limit_and_stays_json(value: object, limit: int) -> None:
    out = encode_reply("/cmd", value, limit)
    assert len(out) <= limit
    decoded = json.loads(out)
    assert list(decoded) == ["/cmd"]
    full = json.dumps({"/cmd": value}, separators=(",", ":"))
    if len(full) <= limit:
        assert decoded == {"/cmd": value}


def test_encode_reply_trims_entries_and_strings() -> None:
    out = json.loads(encode_reply("/c", list(range(10000)), 200))["/c"]
    assert out == list(range(len(out))) and len(out) > 10
    out = json.loads(encode_reply("/c", {f"k{i}": i for i in range(1000)}, 200))["/c"]
    assert list(out.values()) == list(range(len(out)))
    out = json.loads(encode_reply("/c", 'ab"\\' * 1000, 100))["/c"]
    assert ('ab"\\' * 1000).startswith(out) and len(out) > 10
    assert len(encode_reply("/c", "x" * 20000)) == LIMIT


# -- robustness -----------------------------------------------------------------------------


def _random_packet(rng: random.Random, commands: list[str]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1000, 3000)))
    if kind == 2:
        return rng.choice(commands).encode()
    if kind == 3:
        junk = "".join(rng.choice(",/\\\"'{}[]:0123456789abc\n\t -") for _ in range(20))
        return (rng.choice(commands) + "," + junk).encode()
    if kind == 4:
        return ("/" + "".join(rng.choice("abc_/09") for _ in range(rng.randrange(80)))).encode()
    return rng.choice(
        [
            b"\x00",
            b",",
            b",,,",
            b"/,",
            b"/help,",
            b"/\xc3",
            b"\xff" * 1023,
            b'"}',
            b"/eal/heap_info,-1",
            b"/eal/heap_info,99999999999999999999",
        ]
    )


def test_10000_random_and_malformed_packets(server: TelemetryServer) -> None:
    rng = random.Random(20240505)
    commands = [*server.api.commands(), "/nope", "/eal/heap_info,0", "/ring/info,rx"]
    clients = [connect(server.path)[0] for _ in range(4)]
    try:
        for i in range(10_000):
            s = clients[i % len(clients)]
            reply = ask(s, _random_packet(rng, commands))
            assert 0 < len(reply) <= LIMIT
            decoded = json.loads(reply)
            assert isinstance(decoded, dict) and len(decoded) == 1
    finally:
        for s in clients:
            s.close()
    s, _ = connect(server.path)
    with s:
        assert json.loads(ask(s, b"/info"))["/info"]["pid"] == os.getpid()
    assert server.running and server.counters["errors"] == 0


def test_a_newcomer_takes_the_place_of_the_client_idle_longest(server: TelemetryServer) -> None:
    """All places taken by clients that keep asking: a newcomer still gets in, and the
    client idle longest is closed cleanly (end-of-file, no reset, nothing lost);
    the others go on."""
    held = [connect(server.path)[0] for _ in range(MAX_CLIENTS)]
    for s in held:  # in order: held[0] is idle longest
        assert ask(s, b"/eal/heap_list") == b'{"/eal/heap_list":[0]}'
    extra, greeting = connect(server.path)
    with extra:
        assert json.loads(greeting)["pid"] == os.getpid()
        assert ask(extra, b"/eal/heap_list") == b'{"/eal/heap_list":[0]}'
    assert held[0].recv(100) == b""  # a clean close: end-of-file
    with pytest.raises(BrokenPipeError):
        held[0].send(b"/eal/heap_list")  # refused at once, not swallowed
    for s in held[1:]:
        assert ask(s, b"/eal/heap_list") == b'{"/eal/heap_list":[0]}'
    for s in held:
        s.close()
    assert server.counters["refused"] == 0


def test_no_request_is_lost_when_a_client_gives_way(rundir: str) -> None:
    """Requests waiting in every client's socket when a newcomer comes (the server
    was busy): each is answered; then exactly one client reads end-of-file (the one
    that gave way) and every other one goes on."""
    entered, gate = threading.Event(), threading.Event()

    class Slow(FakeMem):
        def heap_ids(self) -> list[int]:
            entered.set()
            assert gate.wait(60)
            return super().heap_ids()

    with TelemetryServer(AdminAPI(Slow.populated()), rundir, "slow") as srv:
        held = [connect(srv.path)[0] for _ in range(MAX_CLIENTS)]
        for s in held:  # in order: held[0] idle longest
            assert ask(s, b"/ring/list") == b'{"/ring/list":["rx","tx"]}'
        blocker = held[-1]
        blocker.send(b"/eal/heap_list")  # the server's thread waits in it
        assert entered.wait(30)
        for s in held[:-1]:
            s.send(b"/ring/list")  # waiting in each socket
        newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        newcomer.settimeout(30)
        newcomer.connect(srv.path)  # in the backlog until the server is free
        gate.set()
        with newcomer:
            assert json.loads(newcomer.recv(2048))["pid"] == os.getpid()
            assert ask(newcomer, b"/ring/list") == b'{"/ring/list":["rx","tx"]}'
        assert blocker.recv(LIMIT) == b'{"/eal/heap_list":[0]}'
        for s in held[:-1]:
            assert s.recv(LIMIT) == b'{"/ring/list":["rx","tx"]}'  # none lost
        gone = []
        for i, s in enumerate(held):
            try:
                reply = ask(s, b"/ring/list")
            except BrokenPipeError:  # the one that gave way: closed for sends ...
                assert s.recv(100) == b""  # ... and end-of-file, no reset
                gone.append(i)
            else:
                assert reply == b'{"/ring/list":["rx","tx"]}'
        assert len(gone) == 1, gone
        for s in held:
            s.close()
        assert srv.counters["refused"] == 0


def test_silent_and_non_reading_clients_do_not_block_others(server: TelemetryServer) -> None:
    silent, _ = connect(server.path)  # connects and says nothing
    flooder, _ = connect(server.path)  # sends requests and never reads a reply
    flooder.setblocking(False)
    dropped = False
    for _ in range(1_000_000):
        try:
            flooder.send(b"/memd/stats")
        except BlockingIOError:  # the server is behind: wait until it reads some more
            select.select([], [flooder], [], 30)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True  # its unread replies filled up: the server hung up on it
            break
    flooder.close()
    assert dropped
    s, _ = connect(server.path)
    with s:
        assert ask(s, b"/eal/heap_list") == b'{"/eal/heap_list":[0]}'
    silent.send(b"/eal/heap_list")
    assert silent.recv(LIMIT) == b'{"/eal/heap_list":[0]}'
    silent.close()
    assert server.running


def test_idle_clients_are_dropped(rundir: str, mem: FakeMem) -> None:
    with TelemetryServer(AdminAPI(mem), rundir, "idle", idle_timeout=0.05) as srv:
        s, _ = connect(srv.path)
        with s:
            assert s.recv(100) == b""  # the server closed it (recv waits for that)


def test_handler_exception_is_null_and_server_survives(rundir: str) -> None:
    class Broken(FakeMem):
        def heap_ids(self) -> list[int]:
            raise RuntimeError("boom")

    with TelemetryServer(AdminAPI(Broken.populated()), rundir, "broken") as srv:
        s, _ = connect(srv.path)
        with s:
            assert ask(s, b"/eal/heap_list") == b'{"/eal/heap_list":null}'
            assert ask(s, b"/ring/list") == b'{"/ring/list":["rx","tx"]}'
        assert srv.counters["errors"] == 1


# -- socket files -------------------------------------------------------------------------


def test_stale_socket_is_replaced_and_live_one_gets_next_instance(
    rundir: str, mem: FakeMem
) -> None:
    d = os.path.join(rundir, "dpdk", "p")
    os.makedirs(d)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(os.path.join(d, TELEMETRY_SOCKET))
    stale.close()  # the file stays, nobody listens
    with TelemetryServer(AdminAPI(mem), rundir, "p") as first:
        assert first.path == os.path.join(d, TELEMETRY_SOCKET) and first.instance == 0
        with TelemetryServer(AdminAPI(mem), rundir, "p") as second:
            assert second.path == os.path.join(d, TELEMETRY_SOCKET + ":1")
            with TelemetryClient(second.path) as c:
                assert c.query("/eal/heap_list") == [0]
            out = _dpdk_telemetry(rundir, "p", "/eal/heap_list\n", "-i", "1")
            assert out.strip().splitlines()[-1] == '{"/eal/heap_list": [0]}'
        assert not os.path.exists(second.path)
        assert os.path.exists(first.path)
    assert not os.path.exists(first.path)


def test_stop_leaves_a_replaced_socket_alone(rundir: str, mem: FakeMem) -> None:
    srv = TelemetryServer(AdminAPI(mem), rundir, "r").start()
    path = srv.path
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other.bind(path)
    try:
        srv.stop()
        assert os.path.exists(path)
    finally:
        other.close()
        os.unlink(path)


# -- DPDK's own client ----------------------------------------------------------------------


def _dpdk_telemetry(rundir: str, prefix: str, stdin: str, *extra: str) -> str:
    if not os.path.exists(DPDK_TELEMETRY):
        pytest.skip("dpdk-telemetry.py is not installed (apt-get install dpdk-dev)")
    env = dict(os.environ, RUNTIME_DIRECTORY=rundir)
    proc = subprocess.run(
        [sys.executable, DPDK_TELEMETRY, "-f", prefix, *extra],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Error" not in proc.stdout, proc.stdout
    return proc.stdout


def test_unmodified_dpdk_telemetry_py(server: TelemetryServer, mem: FakeMem, rundir: str) -> None:
    out = _dpdk_telemetry(
        rundir,
        "fake",
        "/eal/heap_list\n/eal/heap_info,0\n/ring/info,tx\n/mempool/list\n/nope\n/help,/ring/list\n",
    )
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert lines[0] == {"/eal/heap_list": [0]}
    assert lines[1]["/eal/heap_info"]["Free_size"] == mem.heaps[0]["heap_freesz_bytes"]
    assert lines[2]["/ring/info"]["producer_type"] == "SP"
    assert lines[3] == {"/mempool/list": ["mbuf_pool"]}
    assert lines[4] == {"/nope": None}
    assert lines[5] == {
        "/help": {"/ring/list": "Returns list of available rings. Takes no parameters"}
    }


# -- access control ---------------------------------------------------------------------------

NOBODY_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
first = s.recv(2048)
print(first.decode())
try:
    s.send(b"/info")
    print(repr(s.recv(2048)))
except OSError:
    print("closed")
"""


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a client as nobody")
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def test_nobody_is_refused_with_a_clear_error(rundir: str, mem: FakeMem) -> None:
    # a world-writable socket, so the filesystem lets nobody in and SO_PEERCRED decides
    with TelemetryServer(AdminAPI(mem), rundir, "acl", socket_mode=0o666) as srv:
        proc = _as_nobody("/usr/bin/python3", "-c", NOBODY_CLIENT, srv.path)
        assert proc.returncode == 0, proc.stderr
        first, second = proc.stdout.strip().splitlines()
        error = json.loads(first)["error"]
        assert "permission denied" in error and "uid 65534" in error
        assert second in ("b''", "closed")  # closed without serving /info
        assert srv.counters["refused"] == 1
        # root (our uid) is still served
        with TelemetryClient(srv.path) as c:
            assert c.query("/eal/heap_list") == [0]


def test_member_of_the_group_is_served(rundir: str, mem: FakeMem) -> None:
    nogroup = 65534
    with TelemetryServer(AdminAPI(mem), rundir, "grp", group=nogroup) as srv:
        st_ = os.stat(srv.path)
        assert (st_.st_mode & 0o777, st_.st_gid) == (0o660, nogroup)
        proc = _as_nobody("/usr/bin/python3", "-c", NOBODY_CLIENT, srv.path)
        assert proc.returncode == 0, proc.stderr
        greeting, reply = proc.stdout.strip().splitlines()
        assert json.loads(greeting)["pid"] == os.getpid()
        assert "max_output_len" in reply


def test_default_socket_mode_keeps_nobody_out(server: TelemetryServer) -> None:
    proc = _as_nobody("/usr/bin/python3", "-c", NOBODY_CLIENT, server.path)
    assert proc.stdout.strip() == "EACCES", proc.stdout + proc.stderr


def test_access_policy_rules(tmp_path: Path) -> None:
    pol = AccessPolicy(uid=1000, gid=2000)
    assert pol.allows(PeerCred(1, 1000, 1000))
    assert pol.allows(PeerCred(1, 0, 0))
    assert pol.allows(PeerCred(1, 1001, 2000))
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text("Name:\tx\nGroups:\t10 2000 30\n")
    with set_roots(proc=tmp_path):  # the one /proc root, pointed at a fake tree
        assert pol.allows(PeerCred(77, 1002, 1002))  # supplementary group
        reason = pol.refusal(PeerCred(78, 1003, 1003))
    assert reason is not None and "uid 1003" in reason and "gid 2000" in reason
    assert not AccessPolicy(uid=1000).allows(PeerCred(1, 1001, 2000))
    assert resolve_group(None) is None and resolve_group("0") == 0
    assert resolve_group("root") == 0
    with pytest.raises(ValueError, match="no such group"):
        resolve_group("no-such-group-memd")


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert peer_credentials(a) == PeerCred(os.getpid(), os.getuid(), os.getgid())


# -- the API class, without a socket ---------------------------------------------------------


def test_api_commands_document_themselves(mem: FakeMem) -> None:
    api = AdminAPI(mem)
    cmds = api.commands()
    assert {
        "/",
        "/info",
        "/help",
        "/eal/heap_list",
        "/eal/heap_info",
        "/eal/memzone_list",
        "/eal/memzone_info",
        "/mempool/list",
        "/mempool/info",
        "/ring/list",
        "/ring/info",
        "/eal/params",
        "/memd/processes",
        "/memd/memsegs",
        "/memd/stats",
    } <= set(cmds)
    for path, text in cmds.items():
        assert 0 < len(text) < MAX_HELP_LEN, path
        assert len(path) <= 55
    with pytest.raises(UnknownCommand):
        api.call("/nope")
    with pytest.raises(BadParams):
        api.call("/eal/heap_info", "x")
    stats = api.call("/memd/stats")
    assert stats["memzones"] == 3 and stats["secondaries"] == 1
    assert stats["memseg_bytes"] == 8 * 2 * 1024 * 1024
    assert api.call("/memd/processes", "1")[0]["pid"] == 4242


def test_api_reference_is_generated_from_docstrings() -> None:
    text = reference()
    assert "## `/eal/heap_info`" in text and "Greatest_free_size" in text


# -- against the real daemon ------------------------------------------------------------------


@pytest.fixture
def live(rundir: str, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, "nohuge", "-m", "8", runtime_dir=Path(rundir)).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def test_daemon_speaks_to_dpdk_telemetry_py(live: Daemon, rundir: str) -> None:
    run_secondary(live, "mem.memzone_reserve('e2e_zone', 1 << 20)\n")
    path = telemetry_path(live.prefix, rundir)
    # READY=1 came: the admin socket already answers, no retry
    s, greeting = connect(path)
    s.close()
    assert json.loads(greeting)["pid"] == live.pid
    out = _dpdk_telemetry(
        rundir,
        live.prefix,
        "/eal/heap_list\n/eal/memzone_list\n"
        "/eal/memzone_info,0\n/eal/params\n/memd/processes\n/info\n",
    )
    heaps, zones, zone, params, procs, info = (json.loads(x) for x in out.strip().splitlines())
    assert heaps == {"/eal/heap_list": [0]}
    assert zones == {"/eal/memzone_list": [0]}
    assert zone["/eal/memzone_info"]["Name"] == "e2e_zone"
    assert zone["/eal/memzone_info"]["Length"] == 1 << 20
    assert "--file-prefix" in params["/eal/params"] and live.prefix in params["/eal/params"]
    assert [p["role"] for p in procs["/memd/processes"]] == ["primary"]
    assert info["/info"]["pid"] == live.pid
    assert live.stop() == 0
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.join(rundir, "dpdk"))  # nothing left behind


def test_daemon_in_var_run_found_by_default_paths(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the default runtime dir /var/run needs root")
    prefix = f"memdtest{os.getpid()}"
    d = Daemon(tmp_path, "nohuge", "-m", "4", prefix=prefix, runtime_dir=Path("/var/run"))
    try:
        d.start()
        env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
        proc = subprocess.run(
            [sys.executable, DPDK_TELEMETRY, "-f", prefix],
            input="/eal/heap_list\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert proc.stdout.strip() == '{"/eal/heap_list": [0]}', proc.stdout + proc.stderr
        proc = subprocess.run(
            [sys.executable, "-m", "memd.cli.memctl", "--file-prefix", prefix, "--json", "status"],
            capture_output=True,
            text=True,
            env=dict(env, PYTHONPATH=str(Path(__file__).parent.parent)),
            timeout=60,
            check=False,
            cwd="/",
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["info"]["primary_pid"] == d.pid
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        Path(f"/var/run/notify-{prefix}").unlink(missing_ok=True)  # the harness's
    assert not os.path.exists(f"/var/run/dpdk/{prefix}")


def test_generated_reference_is_up_to_date() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "admin-socket.md"
    regenerate = f"regenerate: python -m memd.admin.api > {doc}"
    assert doc.read_text() == reference() + "\n", regenerate
