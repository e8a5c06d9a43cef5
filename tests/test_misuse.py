"""What ordinary programs do to a library that must not hurt others: many open
files, their own use of ZeroMQ.  Each case runs in a real secondary of a real
daemon, and ends in a clean exit, never a signal or a hang."""

from __future__ import annotations

import collections
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from memd.admin.telemetry import MAX_CLIENTS
from memd.errors import CorruptionError, MemdKeyError, MemdValueError, StaleHandle
from memd.paths import telemetry_path
from memd.shm.mempool import MEMPOOL_MZ_PREFIX
from memd.shm.ring import RING_MZ_PREFIX
from memd.testing import Daemon, result, run_memctl, run_secondary, start_secondary

ATTACH = """
import os, sys
import memd_client as mc
prefix, rundir = sys.argv[1], sys.argv[2]

def expect_raise(calls, exc, words):
    for name, call in calls.items():
        try:
            call()
        except exc as e:
            assert words in str(e), (name, e)
        else:
            raise AssertionError(name + " did not raise")
"""


def _run(
    daemon: Daemon, code: str, exit_status: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new process (ATTACH first), expecting `exit_status`."""
    proc = subprocess.run(
        [sys.executable, "-c", ATTACH + code, daemon.prefix, str(daemon.runtime_dir)],
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == exit_status, (
        f"secondary exited {proc.returncode}:\n{proc.stderr}\ndaemon log:\n{daemon.log_text()}"
    )
    return proc


def _run_alone(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new process of its own (no daemon), expecting exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr}"
    return proc


def _start(daemon: Daemon, code: str) -> subprocess.Popen[str]:
    """Start `code` in a new process (ATTACH first), with pipes for its stdio."""
    return subprocess.Popen(
        [sys.executable, "-c", ATTACH + code, daemon.prefix, str(daemon.runtime_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pids_attached(daemon: Daemon) -> set[int]:
    with daemon.attach() as mem:
        return {p["pid"] for p in mem.processes() if p["role"] == "secondary"}


def test_a_process_with_more_than_1024_files_open_grows_and_detaches(daemon_factory) -> None:
    """The primary's pidfd lands above 1023: watching it must not use select()."""
    daemon = daemon_factory("-m", "2")
    out = _run(
        daemon,
        """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
assert mem._primary_fd > 1023, mem._primary_fd
assert mem.primary_alive()
blk = mem.malloc(6 << 20)  # more than -m 2: the primary grows the heap
blk.buf[-1] = 7
mem.free(blk)
mem.detach()
print("OK", os.getpid())
""",
    ).stdout.split()
    assert out[0] == "OK"
    assert int(out[1]) not in _pids_attached(daemon), "detach() must unregister"


def test_destroying_the_applications_zmq_context_leaves_memd_working(daemon_factory) -> None:
    """memd_client has its own ZeroMQ context: an application that destroys the
    shared one (zmq.Context.instance()) still grows its heap and detaches."""
    daemon = daemon_factory("-m", "2")
    out = _run(
        daemon,
        """
import zmq
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
zmq.Context.instance().destroy()
blk = mem.malloc(6 << 20)
mem.free(blk)
mem.detach()
print("OK", os.getpid())
""",
    ).stdout.split()
    assert out[0] == "OK"
    assert int(out[1]) not in _pids_attached(daemon)


# The C loops over a list keep its item array; an item's __index__ that empties
# the list freed that array under them (a crash, or values read from freed memory).
REENTRANT = """
from memd import _ext
from memd.shm.mempool import Mempool
from memd.shm.ring import Ring

class Shrinker:
    def __init__(self, victim, value):
        self.victim, self.value = victim, value
    def __index__(self):
        self.victim.clear()
        self.victim.extend(range(3))  # a new, smaller item array
        return self.value

window = _ext.Window.anonymous(16 << 20)
ring = Ring.create(window, _ext.CONFIG_SIZE, 1 << 14, 0, "r")
values = list(range(100, 5100))
values[1] = Shrinker(values, 101)
ring.enqueue_bulk(values)
assert ring.dequeue_burst(1 << 14) == list(range(100, 5100)), "values changed"

pool = Mempool.create(window, _ext.CONFIG_SIZE + (4 << 20), 4096, 64, name="p")
handles = [pool.get_handle() for _ in range(4000)]
handles[1] = Shrinker(handles, handles[1])
pool.put_bulk(handles)
audit = pool.audit()
assert audit["in_use"] == 0 and audit["free"] == 4096, audit
print("OK")
"""


def test_a_list_changed_by_an_items_index_is_read_as_it_was() -> None:
    """enqueue_bulk / put_bulk read a list as it was when called, whatever its
    items' __index__ do to it: no crash, no value taken from freed memory."""
    proc = _run_alone(REENTRANT)
    assert proc.stdout.strip() == "OK"


EMPTIED_TO_A_STRANGER = """
from memd import _ext
from memd.errors import MemdValueError
from memd.shm.mempool import Mempool

window = _ext.Window.anonymous(16 << 20)
pool = Mempool.create(window, _ext.CONFIG_SIZE, 64, 64, name="p")
objs = [pool.get() for _ in range(3)]

class Emptier:
    def __index__(self):
        items.clear()
        return 0  # no object's handle

items = [Emptier(), *objs]
try:
    pool.put_bulk(items)
except MemdValueError as e:
    assert "not an object of this pool" in str(e), e
else:
    raise AssertionError("put_bulk took a stranger")
assert pool.audit()["in_use"] == 3, pool.audit()
print("OK")
"""


def test_a_put_bulk_item_that_is_no_object_is_a_memd_value_error() -> None:
    """An item's __index__ empties the list and gives a handle of no object:
    put_bulk raises MemdValueError (not a plain ValueError) and puts nothing."""
    assert _run_alone(EMPTIED_TO_A_STRANGER).stdout.strip() == "OK"


def test_the_memzone_of_a_ring_or_pool_cannot_be_freed_under_it(daemon_factory) -> None:
    """memzone_free() of the zone behind a ring or mempool is refused: freeing it
    would hand the ring's memory to the next malloc while the ring is in use."""
    daemon = daemon_factory("-m", "8")
    with daemon.attach() as mem:
        ring = mem.ring_create("mzring", 64)
        pool = mem.mempool_create("mzpool", 64, 64)
        for zone, kind in (
            (f"{RING_MZ_PREFIX}mzring", "ring"),
            (f"{MEMPOOL_MZ_PREFIX}mzpool", "mempool"),
        ):
            with pytest.raises(MemdValueError, match=f"{kind}_free"):
                mem.memzone_free(mem.memzone_lookup(zone))
        ring.enqueue(7)
        assert ring.dequeue() == 7
        assert pool.audit()["free"] == 64
        mem.ring_free(ring)
        mem.mempool_free(pool)
        for zone in (f"{RING_MZ_PREFIX}mzring", f"{MEMPOOL_MZ_PREFIX}mzpool"):
            with pytest.raises(MemdKeyError):
                mem.memzone_lookup(zone)


def test_silent_admin_connections_do_not_lock_memctl_out(daemon_factory) -> None:
    """Every admin place taken by a connection that never asks anything: memctl
    gets in within seconds (the longest-silent client gives way), not after the
    idle timeout (600 s)."""
    daemon = daemon_factory("-m", "2")
    path = telemetry_path(daemon.prefix, str(daemon.runtime_dir))
    silent = []
    for _ in range(MAX_CLIENTS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(path)
        assert b"version" in s.recv(1024)
        silent.append(s)
    args = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir), "status")
    deadline = time.monotonic() + 60  # a bound, not a timing claim
    while (proc := run_memctl(*args)).returncode != 0:
        assert time.monotonic() < deadline, f"memctl locked out:\n{proc.stdout}{proc.stderr}"
        time.sleep(0.5)
    for s in silent:
        s.close()
    assert daemon.proc is not None and daemon.proc.poll() is None


DPDK_TELEMETRY = "/usr/bin/dpdk-telemetry.py"


def test_polling_admin_clients_do_not_lock_memctl_out(daemon_factory) -> None:
    """Every admin place held by a client that asks something every half second (so
    none is ever silent): memctl and DPDK's dpdk-telemetry.py are answered at their
    first try, each taking the place of the client idle longest, which sees a clean
    close (end-of-file, or EPIPE on its next send; never a reset, never a request
    swallowed) and comes back two seconds later, as a monitoring agent would."""
    daemon = daemon_factory("-m", "2")
    path = telemetry_path(daemon.prefix, str(daemon.runtime_dir))
    stop = threading.Event()
    lock = threading.Lock()
    seen: collections.Counter[str] = collections.Counter()
    connected = [False] * MAX_CLIENTS
    errors: list[str] = []

    def note(what: str) -> None:
        with lock:
            seen[what] += 1

    def poller(i: int) -> None:
        s: socket.socket | None = None
        while not stop.is_set():
            try:
                if s is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.settimeout(30)
                    s.connect(path)
                    assert b"version" in s.recv(1024)
                    connected[i] = True
                if select.select([s], [], [], 0.5)[0]:  # nothing asked: only a close
                    assert s.recv(65536) == b"", "an unasked packet"
                    note("eof")
                else:
                    s.send(b"/eal/heap_list")
                    reply = s.recv(65536)
                    if reply:
                        assert json.loads(reply) == {"/eal/heap_list": [0]}, reply
                        note("answered")
                        continue
                    note("lost")  # sent, then end-of-file: a request swallowed
            except BrokenPipeError:
                note("epipe")  # closed before this send: refused, not swallowed
            except Exception as e:  # a reset, a timeout, a bad reply: the test fails
                errors.append(f"poller {i}: {e!r}")
            connected[i] = False
            if s is not None:
                s.close()
                s = None
            stop.wait(2.0)

    threads = [threading.Thread(target=poller, args=(i,), daemon=True) for i in range(MAX_CLIENTS)]
    for t in threads:
        t.start()

    def table_full() -> None:
        deadline = time.monotonic() + 60  # a bound, not a timing claim
        while not all(connected):
            assert time.monotonic() < deadline and not errors, (connected, errors)
            time.sleep(0.05)

    args = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
    env = {**os.environ, "RUNTIME_DIRECTORY": str(daemon.runtime_dir)}
    try:
        for _ in range(3):
            table_full()
            proc = run_memctl(*args, "--json", "status")  # once: no retry
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["info"]["primary_pid"] == daemon.pid
            if os.path.exists(DPDK_TELEMETRY):
                table_full()
                dpdk = subprocess.run(
                    [sys.executable, DPDK_TELEMETRY, "-f", daemon.prefix],
                    input="/eal/heap_list\n",
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=60,
                    check=False,
                )
                assert dpdk.returncode == 0, dpdk.stderr
                assert dpdk.stdout.strip().splitlines()[-1] == '{"/eal/heap_list": [0]}'
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert seen["lost"] == 0, seen
    assert seen["eof"] + seen["epipe"] >= 3, seen  # a poller gave way to each newcomer
    assert seen["answered"] > MAX_CLIENTS, seen
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_one_process_cannot_take_every_slot(daemon_factory) -> None:
    """A process that attaches again and again gets MemdError at its limit (the
    primary runs: not PrimaryNotRunning), and every other process still attaches."""
    daemon = daemon_factory("-m", "2")
    proc = _start(
        daemon,
        """
from memd.errors import MemdError, PrimaryNotRunning
mems = []
try:
    for _ in range(200):
        mems.append(mc.attach(prefix, runtime_dir=rundir, timeout=20))
except PrimaryNotRunning as e:
    print("WRONG", e, flush=True)
except MemdError as e:
    print("REFUSED", len(mems), e, flush=True)
sys.stdin.readline()
for m in mems:
    m.detach()
""",
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        assert line.startswith("REFUSED "), line
        assert "the most one process may" in line
        with daemon.attach() as mem:  # someone else still gets a slot
            mem.free(mem.malloc(64))
    finally:
        _, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err


UNMAPPED = """
from memd import _ext
from memd.errors import MemdValueError
from memd.shm.mempool import Mempool
from memd.shm.ring import Ring

mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
msl = mem._lists[-1]
hole = msl.base_offset + (msl.capacity - 1) * msl.page_size  # the last slot: never used here
bare = _ext.Window(64 << 20)
cases = {
    "Window.view": lambda: bare.view(8 << 20, 64),
    "Ring": lambda: Ring(mem.window, hole),
    "Mempool": lambda: Mempool(mem.window, hole, 0),
    "mem.window.view": lambda: mem.window.view(hole, 4096),
}
expect_raise(cases, MemdValueError, "not mapped")
mem.detach()
print("OK")
"""


def test_an_unmapped_offset_raises_instead_of_killing_the_process(daemon_factory) -> None:
    """Ring(), Mempool() and Window.view() at an offset with no page behind it in
    this process raise MemdValueError; before, the first touch was a SIGSEGV."""
    daemon = daemon_factory("-m", "2")
    assert _run(daemon, UNMAPPED).stdout.strip() == "OK"


DAMAGE = """
import struct
from memd import _ext

mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
pools = {name: off for _i, name, kind, off, _z, _p in _ext.objects(mem.window)}
# a stray copy of a big pool's header over a small one's
size = lay["memd_mempool"]
mem.window.view(pools["small"], size)[:] = bytes(mem.window.view(pools["big"], size))
# an 8-byte underflow into a block's header: its next link now points into a hole,
# and the heap's last element moved past it
blk = mem.malloc(4096)
msl = mem._lists[0]
hole = msl.base_offset + (msl.capacity - 1) * msl.page_size
elem = blk.offset - _ext.HEAP_ELEM_HEADER_SIZE
mem.window.view(elem + lay["memd_heap_elem.next"], 8)[:] = struct.pack("=Q", hole)
heap0 = lay["memd_config.heaps"]
mem.window.view(heap0 + lay["memd_heap.last_elem"], 8)[:] = struct.pack("=Q", hole + 4096)
print("DAMAGED", flush=True)
sys.stdin.readline()
"""


OVERRUN = """
from memd import _ext
from memd.errors import CorruptionError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
HDR = _ext.HEAP_ELEM_HEADER_SIZE
nxt = _ext.LAYOUT["memd_heap_elem.next"][0]
a = mem.malloc(1000)
b = mem.malloc(1000)
above = int.from_bytes(mem.window.view(a.offset - HDR + nxt, 8), "little")
assert above == b.offset - HDR > a.offset + a.size, (above, a, b)  # b's header follows a
word = bytearray(mem.window.view(above, 8))
if DAMAGE == "free-state":
    word[4] = _ext.HEAP_ELEM_FREE  # cookie intact: b, busy, looks free, to be joined
else:
    word[:] = bytes(range(0xA0, 0xA8))  # user bytes over its cookie
mem.window.view(above, 8)[:] = bytes(word)  # 8 bytes past a, into b's header
expect_raise({"free": lambda: mem.free(a)}, CorruptionError, "corrupt")
expect_raise({"malloc": lambda: mem.malloc(64)}, CorruptionError, "corrupt")  # broken
mem.detach()
print("OK")
"""


@pytest.mark.parametrize("damage", ["free-state", "garbage"])
def test_an_overrun_into_the_next_header_is_caught_by_free(daemon_factory, damage: str) -> None:
    """An 8-byte write past a block into the next element's header: free() of the
    block checks the neighbours it would join or relink (cookie, state, back link,
    the free lists it would write) and raises CorruptionError, the heap marked
    broken, instead of joining a busy block into free memory; the process exits 0
    and the daemon serves on."""
    daemon = daemon_factory("-m", "4")
    assert _run(daemon, f"DAMAGE = {damage!r}\n" + OVERRUN).stdout.strip().endswith("OK")
    assert daemon.proc.poll() is None
    assert (
        run_memctl(
            "--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir), "status"
        ).returncode
        == 0
    )
    assert daemon.proc.poll() is None


HEAP_STATE_IN_A_HOLE = """
import faulthandler, struct, threading
from memd import _ext
from memd.errors import CorruptionError, StaleHandle
assert faulthandler.is_enabled() == FAULTHANDLER
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
blk = mem.malloc(4096)
msl = mem._lists[0]
hole = msl.base_offset + (msl.capacity - 1) * msl.page_size  # never mapped here
last = _ext.LAYOUT["memd_config.heaps"][0] + _ext.LAYOUT["memd_heap.last_elem"][0]
mem.window.view(last, 8)[:] = struct.pack("=Q", hole)
caught = []
def free():
    try:
        mem.free(blk)
    except StaleHandle as e:  # the block is sound: only the heap's state is damaged
        caught.append(("StaleHandle", str(e)))
    except CorruptionError as e:
        caught.append(("CorruptionError", str(e)))
t = threading.Thread(target=free)  # a guard is per thread
t.start()
t.join(60)
assert [c[0] for c in caught] == ["CorruptionError"], caught
expect_raise({"malloc": lambda: mem.malloc(64)}, CorruptionError, "corrupt")  # broken
print("OK")
"""


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_fault_on_heap_state_is_corruption_not_a_stale_block(daemon_factory, faulthandler):
    """The heap's last element moved into a hole: free() of a sound block faults on
    the heap's state while it checks the block.  That is the heap's damage
    (CorruptionError, heap broken for everyone), not "this block was freed"
    (StaleHandle), which only a fault on the block itself means.  The fault is
    caught in a thread of its own, and with faulthandler enabled at start-up
    (PYTHONFAULTHANDLER, as -X faulthandler) nothing is dumped: the process exits
    0 and prints no fatal error."""
    daemon = daemon_factory("-m", "4")
    env = {"PYTHONFAULTHANDLER": "1"} if faulthandler else None
    proc = _run(daemon, f"FAULTHANDLER = {faulthandler}\n" + HEAP_STATE_IN_A_HOLE, env=env)
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    assert "Fatal Python error" not in proc.stderr, proc.stderr
    assert daemon.proc.poll() is None


def test_the_daemon_survives_damaged_shared_structures(daemon_factory) -> None:
    """A secondary scribbles over a pool header and a heap link, then dies: the
    daemon's reclaim and its admin queries meet the damage and go on serving."""
    daemon = daemon_factory("-m", "4")
    with daemon.attach() as mem:
        mem.mempool_create("big", 8192, 64)
        mem.mempool_create("small", 8, 64)
    proc = _start(daemon, DAMAGE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "DAMAGED", proc.stderr.read() if proc.stderr else ""
    proc.kill()  # the daemon reclaims it: walks the pools and the heap
    proc.wait(timeout=30)
    base = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
    for command in ("processes", "mempools", "heaps", "status"):
        run_memctl(*base, command)  # an error reply is fine; the daemon must live
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()
    status = run_memctl(*base, "status")
    assert status.returncode == 0, status.stderr


RING_DAMAGE = """
import struct
from memd import _ext
from memd.errors import CorruptionError
from memd.shm.ring import Ring

lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
window = _ext.Window.anonymous(64 << 20)
base = _ext.CONFIG_SIZE
ring = Ring.create(window, base, 64, 0, "victim")  # validated here, before the damage
end = base + _ext.ring_memsize(64)
window.view(end, 4096)[:] = b"\\xa5" * 4096  # whatever lies after the ring
for field, value in (("size", 1 << 31), ("mask", (1 << 31) - 1), ("capacity", (1 << 31) - 1)):
    window.view(base + lay["memd_ring." + field], 4)[:] = struct.pack("=I", value)
for side in ("prod", "cons"):
    for field, value in (("tail", 0x7FFFFFF0), ("other_tail", 0x10)):
        at = base + lay["memd_ring." + side] + lay["memd_ring_headtail." + field]
        window.view(at, 4)[:] = struct.pack("=I", value)
for op in (lambda: ring.enqueue_burst(list(range(1000))), lambda: ring.dequeue_burst(1000)):
    try:  # the tails say more room (entries) than the capacity: damage
        op()
    except CorruptionError:
        pass
    else:
        raise AssertionError("a ring with damaged counters moved entries")
assert bytes(window.view(end, 4096)) == b"\\xa5" * 4096, "wrote past the ring"
try:
    Ring(window, base)
except ValueError:
    pass
else:
    raise AssertionError("a damaged ring must not validate")
print("OK")
"""


def test_a_damaged_ring_header_never_moves_entries_outside_the_ring() -> None:
    """Another process overwrote the ring's size, mask, capacity and counters: a
    Ring object keeps the geometry it validated, moves nothing (CorruptionError:
    the counters claim more than the capacity) and writes nothing outside its slots."""
    proc = _run_alone(RING_DAMAGE)
    assert proc.stdout.startswith("OK"), proc.stdout


VICTIM = """
mem = mc.attach(prefix, runtime_dir=rundir)
print("UP", flush=True)
sys.stdin.readline()
"""

HOLD_HEAP_LOCK = """
from memd import _ext
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
_ext.heap_lock(mem.window, 0)
print("HOLDING", flush=True)
sys.stdin.readline()
_ext.heap_unlock(mem.window, 0)
mem.detach()
"""

WAIT_FOR_HEAP = """
from memd import _ext
from memd.errors import MemdError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
assert _ext.heap_lock_wait() == 30.0  # a program's heap calls wait 30 s at most
_ext.heap_lock_wait(0.5)
try:
    mem.malloc(64)
except MemdError as e:
    assert "busy" in str(e), e
else:
    raise AssertionError("malloc got a heap lock a stopped process holds")
_ext.heap_lock_wait(30.0)
print("WAITING", flush=True)
try:
    mem.malloc(64)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


def test_a_stopped_lock_holder_stalls_nobody_for_good(daemon_factory) -> None:
    """A secondary stopped while it holds heap 0's lock: another's malloc waits
    (boundedly: past the bound it fails "busy") but Ctrl-C still ends it, and the
    daemon answers admin queries (a busy error for what needs that heap) and keeps
    serving."""
    daemon = daemon_factory("-m", "2")
    holder = _start(daemon, HOLD_HEAP_LOCK)
    waiter = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HOLDING"
        os.kill(holder.pid, signal.SIGSTOP)
        waiter = _start(daemon, WAIT_FOR_HEAP)
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "WAITING"
        time.sleep(0.3)  # let it block on the lock (an earlier SIGINT is fine too)
        waiter.send_signal(signal.SIGINT)
        out, _ = waiter.communicate(timeout=30)  # (its stdin closes: it does not read it)
        assert "INTERRUPTED" in out and waiter.returncode == 0, (out, waiter.returncode)
        base = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
        procs = run_memctl(*base, "processes", timeout=60)
        # not a healthy-looking table: the processes, and the heap left out named
        assert procs.returncode == 0 and "busy" in procs.stdout, procs
        assert run_memctl(*base, "status", timeout=60).returncode == 0
        # deaths come in bursts: reclaiming them must not add up behind the lock
        victims = [_start(daemon, VICTIM) for _ in range(8)]
        for v in victims:
            assert v.stdout is not None and v.stdout.readline().strip() == "UP"
        for v in victims:
            v.kill()
            v.wait(timeout=30)
        _run(daemon, "mem = mc.attach(prefix, runtime_dir=rundir, timeout=10)\nmem.detach()\n")
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.communicate("go\n", timeout=30)
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
    assert holder.returncode == 0


AFTER_DETACH = """
from memd.errors import MemdValueError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
ring = mem.ring_create("kept_ring", 64)
pool = mem.mempool_create("kept_pool", 64, 64, cache_size=8)
blk = mem.malloc(256)
view = blk.buf
obj = pool.get()
mem.detach()
calls = {
    "malloc": lambda: mem.malloc(64),
    "memzone_reserve": lambda: mem.memzone_reserve("after_detach", 64),
    "free": lambda: mem.free(blk),
    "ring.enqueue": lambda: ring.enqueue(1),
    "pool.get": lambda: pool.get(),
    "pool.put": lambda: pool.put(obj),
    "blk.buf": lambda: blk.buf,
    "view": lambda: mem.view(blk.offset, 16),
}
expect_raise(calls, MemdValueError, "detached")
view[0] = 1  # a view taken before detach() stays valid memory
print("OK")
"""


def test_objects_kept_past_detach_raise(daemon_factory) -> None:
    """After detach() (whose slot and caches may go to the next process) every
    call through the attachment or its objects raises; old views stay valid."""
    daemon = daemon_factory("-m", "2")
    assert _run(daemon, AFTER_DETACH).stdout.strip() == "OK"
    with daemon.attach() as mem:  # nothing of it leaked into the shared state
        pool = mem.mempool_lookup("kept_pool")
        audit = pool.audit()
        assert audit["in_use"] == 1 and audit["free"] == 63, audit
        with pytest.raises(MemdKeyError):
            mem.memzone_lookup("after_detach")


DIE_IN_OBJ_INIT = """
import signal
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)

def init(pool, obj, idx):
    if idx == 3:
        os.kill(os.getpid(), signal.SIGKILL)

mem.mempool_create("half_made", 64, 64, obj_init=init)
"""


def test_a_pool_whose_creator_died_in_obj_init_can_be_created_again(daemon_factory) -> None:
    """The creator is killed inside obj_init: its pool's memzone is left reserved
    but unlisted.  The next mempool_create of that name succeeds: the primary's
    reclaim of the creator frees the zone (test_reclaim), or, if that has not run
    yet, the create frees it."""
    daemon = daemon_factory("-m", "4")
    _run(daemon, DIE_IN_OBJ_INIT, exit_status=-signal.SIGKILL)
    with daemon.attach() as mem:
        pool = mem.mempool_create("half_made", 64, 64)
        assert pool.audit()["free"] == 64
        names = [z.name for z in mem.memzones()]
        assert names.count("MP_half_made") == 1  # the left-over zone was freed, not leaked
        mem.mempool_free(pool)
        assert "MP_half_made" not in [z.name for z in mem.memzones()]


# Damage that helper reviews found to kill or hang the daemon through paths other than
# the reclaim walk: heap growth and release, stats, journal recovery, the tables.
DAMAGE_CASES = {
    "free-list link into a hole, then growth": """
free = [w[0] for w in _ext.heap_walk(mem.window, 0) if w[2] == _ext.HEAP_ELEM_FREE]
put(free[-1] + lay["memd_heap_elem.u.free.next"], hole)
""",
    "last_elem into a hole, then growth": """
put(heap0 + lay["memd_heap.last_elem"], hole + 4096)
""",
    "every free-list head into a hole, then release": """
for c in range(_ext.HEAP_NUM_FREELISTS):
    put(heap0 + lay["memd_heap.free_head"] + 8 * c, hole)
""",
    "a free-list cycle and a huge total_size, then stats": """
free = [w[0] for w in _ext.heap_walk(mem.window, 0) if w[2] == _ext.HEAP_ELEM_FREE]
put(free[-1] + lay["memd_heap_elem.u.free.next"], free[-1])
put(heap0 + lay["memd_heap.total_size"], 1 << 62)
""",
    "a journal entry into a hole, then its writer dies holding the lock": """
_ext.heap_lock(mem.window, 0)
journal = lay["memd_config.heap_journals"] + lay["memd_heap_journal.e"]
put(journal, hole)
put(journal + 8, 0)
mem.window.view(lay["memd_config.heap_journals"] + lay["memd_heap_journal.count"], 4)[:] = (
    struct.pack("=I", 1)
)
""",
    "a listed pool's offset into a hole": """
objects = lay["memd_config.objects"]
for i, name, kind, off, _z, _p in _ext.objects(mem.window):
    if name == "small":
        put(objects + i * lay["memd_object"] + lay["memd_object.offset"], hole)
""",
    "random bytes over the process table": """
procs = lay["memd_config.procs"]
mem.window.view(procs + lay["memd_process"], 127 * lay["memd_process"])[:] = os.urandom(
    127 * lay["memd_process"]
)
""",
}

DAMAGE_PRELUDE = """
import struct
from memd import _ext
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
msl = mem._lists[0]
hole = msl.base_offset + (msl.capacity - 1) * msl.page_size
heap0 = lay["memd_config.heaps"]
keep = mem.malloc(1 << 20)
mem.free(mem.malloc(3 << 20))  # free pages above, for the release case

def put(off, value):
    mem.window.view(off, 8)[:] = struct.pack("=Q", value)
"""

TRIGGER = """
try:
    blk = mem.malloc(24 << 20)  # growth
    mem.free(blk)  # and release
except Exception as e:
    print("REFUSED", type(e).__name__, flush=True)
"""


@pytest.mark.parametrize("case", sorted(DAMAGE_CASES))
def test_the_daemon_survives_damage_on_every_path(daemon_factory, case: str) -> None:
    """A secondary damages shared state, then dies (SIGKILL); others grow and shrink
    the heap and query the daemon.  Every step may fail with an error, but the
    daemon lives, answers within its bounds, and a new process still attaches."""
    daemon = daemon_factory("-m", "2")
    with daemon.attach() as mem:
        mem.mempool_create("small", 8, 64)
    damager = _start(
        daemon,
        DAMAGE_PRELUDE + DAMAGE_CASES[case] + "print('DAMAGED', flush=True)\n"
        "sys.stdin.readline()\n",
    )
    assert damager.stdout is not None
    line = damager.stdout.readline()
    assert line.strip() == "DAMAGED", (line, damager.stderr.read() if damager.stderr else "")
    damager.kill()
    damager.wait(timeout=30)
    # the client's own malloc follows the damaged links too: an error, never a signal
    _run(daemon, "mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)\n" + TRIGGER)
    base = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
    for command in ("processes", "mempools", "heaps", "memzones", "status"):
        run_memctl(*base, command, timeout=60)  # an error reply is fine
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()
    _run(daemon, "mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)\nmem.detach()\n")


RING_LOCK_HELD = """
import os, signal, struct, subprocess, sys, threading, time
from memd import _ext
from memd.shm.ring import Ring

lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
window = _ext.Window.anonymous(16 << 20)
base = _ext.CONFIG_SIZE
ring = Ring.create(window, base, 64, 0, "held")
# a live process, stopped (as in a debugger), owns the producers' lock
owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
os.kill(owner.pid, signal.SIGSTOP)
with open(f"/proc/{owner.pid}/stat") as f:
    start = int(f.read().rpartition(")")[2].split()[19])
word = (owner.pid & 0xFFFFFFFF) | ((start & 0xFFFFFFFF) << 32)
lock = base + lay["memd_ring.prod"] + lay["memd_ring_headtail.lock"]
window.view(lock, 8)[:] = struct.pack("=Q", word)

ticks = []
threading.Thread(target=lambda: [ticks.append(time.sleep(0.01)) for _ in range(100)],
                 daemon=True).start()
assert ring.enqueue(1, timeout=0) is False  # timeout=0 never waits
before = len(ticks)
assert ring.enqueue(1, timeout=0.5) is False  # waits its timeout, no longer
assert len(ticks) > before + 10, "the GIL was held during the wait"
signal.setitimer(signal.ITIMER_REAL, 0.3)
signal.signal(signal.SIGALRM, signal.default_int_handler)
try:
    ring.enqueue(1, timeout=None)  # waits for ever: a signal still ends it
except KeyboardInterrupt:
    pass
else:
    raise AssertionError("enqueue got a lock a live process holds")
owner.kill()
owner.wait()
assert ring.enqueue(1, timeout=10)  # the owner died: its lock is taken back
print("OK")
"""


def test_a_ring_lock_held_by_a_stopped_process_stalls_nobody() -> None:
    """Another process stopped while holding a ring side's lock: enqueue honours
    its timeout (0 never waits), waits without the GIL, lets signals through, and
    takes the lock back once the owner dies."""
    proc = _run_alone(RING_LOCK_HELD)
    assert proc.stdout.strip() == "OK"


GROWN_RING = """
import struct
from memd import _ext
from memd.errors import CorruptionError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
ring = mem.ring_create("grown", 1024)
size = 1 << 14  # a consistent header for a ring 16 times its memzone
for field, value, fmt in (("size", size, "=I"), ("mask", size - 1, "=I"),
                          ("capacity", size - 1, "=I"),
                          ("memsize", lay["memd_ring"] + 8 * size, "=Q")):
    at = ring.offset + lay["memd_ring." + field]
    mem.window.view(at, struct.calcsize(fmt))[:] = struct.pack(fmt, value)
other = mc.attach(prefix, runtime_dir=rundir, timeout=20)  # another process's view
expect_raise({"ring_lookup": lambda: other.ring_lookup("grown")}, CorruptionError, "memzone")
print("OK")
"""

DETACH_IN_INDEX = """
from memd.errors import MemdValueError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
pool = mem.mempool_create("detaching", 64, 64, cache_size=8)
h0, h1 = pool.get_handle(), pool.get_handle()

class Detach:
    def __index__(self):
        mem.detach()
        return h1

expect_raise({"put_bulk": lambda: pool.put_bulk([h0, Detach()])}, MemdValueError, "detached")
print("OK")
"""


def test_a_ring_whose_header_claims_more_than_its_memzone_is_refused(daemon_factory) -> None:
    """A header rewritten consistently (size, mask, capacity, memsize) to claim more
    than the ring's memzone: ring_lookup refuses it, rather than write past it."""
    daemon = daemon_factory("-m", "4")
    assert _run(daemon, GROWN_RING).stdout.strip() == "OK"


def test_put_bulk_after_an_items_index_detached_is_refused(daemon_factory) -> None:
    """An item's __index__ detaches mid-call: the objects must not go into the cache
    of a slot that was just given up."""
    daemon = daemon_factory("-m", "4")
    assert _run(daemon, DETACH_IN_INDEX).stdout.strip() == "OK"
    with daemon.attach() as mem:
        audit = mem.mempool_lookup("detaching").audit()
        assert audit["in_use"] == 2 and audit["in_caches"] == 0, audit


POOL_USER = """
from memd.errors import CorruptionError, MemdError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
pool = mem.mempool_create("victim", 256, 64, cache_size=16)
held = [pool.get() for _ in range(8)]
print("READY", pool.offset, mem.proc_slot, flush=True)
sys.stdin.readline()  # another process damages the pool's header meanwhile
errors = 0
for _ in range(200):
    for call in (pool.get, lambda: pool.put(held.pop()) if held else None,
                 lambda: pool.get_bulk(32), lambda: pool.put_bulk(pool.get_bulk(40)),
                 pool.avail_count, pool.flush_cache):
        try:
            got = call()
            if hasattr(got, "handle"):
                held.append(got)
        except (CorruptionError, MemdError, LookupError, ValueError):
            errors += 1
print("OK", errors, flush=True)
"""

POOL_DAMAGE = """
import struct
from memd import _ext
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
pool, slot = int(sys.argv[3]), int(sys.argv[4])

def get(field):
    return struct.unpack("=Q", mem.window.view(pool + lay["memd_mempool." + field], 8))[0]

def put(at, value, fmt):
    mem.window.view(at, struct.calcsize(fmt))[:] = struct.pack(fmt, value)

ring, cache = get("ring_offset"), get("caches_offset") + slot * get("cache_stride")
put(pool + cache, 0x7FFFFFF0, "=I")  # the user's cache length
for field, value in (("size", 1 << 31), ("mask", (1 << 31) - 1), ("capacity", (1 << 31) - 1)):
    put(pool + ring + lay["memd_ring." + field], value, "=I")
for field in ("ring_offset", "caches_offset", "cache_stride", "objs_offset", "obj_stride",
              "trailer_offset", "memsize"):
    put(pool + lay["memd_mempool." + field], 1 << 40, "=Q")
for field in ("n", "cache_size", "flushthresh"):
    put(pool + lay["memd_mempool." + field], 0x7FFFFFFF, "=I")
print("DAMAGED", flush=True)
"""


def test_a_damaged_mempool_header_breaks_the_pool_not_the_process(daemon_factory) -> None:
    """Another process rewrites a pool's geometry (n, cache size, ring, cache and
    object offsets and strides), its free ring's size, mask and capacity, and the
    user's cache length: the user's gets and puts raise (or keep working inside
    the pool), never a signal."""
    daemon = daemon_factory("-m", "4")
    user = _start(daemon, POOL_USER)
    try:
        assert user.stdout is not None
        ready = user.stdout.readline().split()
        assert ready and ready[0] == "READY", user.stderr.read() if user.stderr else ""
        damage = subprocess.run(
            [
                sys.executable,
                "-c",
                ATTACH + POOL_DAMAGE,
                daemon.prefix,
                str(daemon.runtime_dir),
                *ready[1:3],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert damage.returncode == 0 and "DAMAGED" in damage.stdout, damage.stderr
        out, err = user.communicate("go\n", timeout=120)
    finally:
        if user.poll() is None:
            user.kill()
    assert user.returncode == 0, (user.returncode, err)
    assert out.split()[0] == "OK" and int(out.split()[1]) > 0, out
    assert daemon.proc is not None and daemon.proc.poll() is None


HEAD_INTO_HOLE = """
import struct
from memd import _ext
from memd.errors import CorruptionError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
lay = {k: v[0] if isinstance(v, tuple) else v for k, v in _ext.LAYOUT.items()}
msl = mem._lists[0]
hole = msl.base_offset + (msl.capacity - 1) * msl.page_size  # never mapped
heap0 = lay["memd_config.heaps"]
keep = mem.malloc(64)
for c in range(_ext.HEAP_NUM_FREELISTS):
    mem.window.view(heap0 + lay["memd_heap.free_head"] + 8 * c, 8)[:] = struct.pack("=Q", hole)
other = mc.attach(prefix, runtime_dir=rundir, timeout=20)  # as another process would
expect_raise({"malloc": lambda: other.malloc(64), "again": lambda: other.malloc(64)},
             CorruptionError, "")
print("OK")
"""


def test_a_malloc_that_follows_a_free_list_into_a_hole_raises(daemon_factory) -> None:
    """Every free-list head points into an unmapped hole: malloc raises
    CorruptionError (the heap is marked broken), it does not die on SIGSEGV."""
    daemon = daemon_factory("-m", "2")
    assert _run(daemon, HEAD_INTO_HOLE).stdout.strip() == "OK"
    base = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
    heaps = run_memctl(*base, "heaps", timeout=60)
    assert heaps.returncode == 0 and "corrupt" in heaps.stdout, heaps
    (info,) = json.loads(run_memctl(*base, "--json", "heaps", timeout=60).stdout)
    assert info["Heap_id"] == 0 and info["corrupt"] is True, info
    # the other listings go on without the broken heap's counts
    procs = run_memctl(*base, "--json", "processes", timeout=60)
    assert procs.returncode == 0, procs
    (primary,) = [p for p in json.loads(procs.stdout) if p["role"] == "primary"]
    assert "0" in primary["heaps_unavailable"], primary
    assert daemon.proc is not None and daemon.proc.poll() is None


CONFIG_WAITS = """
import signal, threading
from memd import _ext
from memd.errors import MemdError
holder = int(sys.argv[3])
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
ring = mem.ring_lookup("kept")  # made before heap 0's lock was taken
zone = mem.memzone_lookup("kept_zone")
_ext.heap_lock_wait(3.0)  # (a program waits 30 s at most)
waiter = threading.Thread(target=lambda: expect_raise(
    {"reserve in a thread": lambda: mem.memzone_reserve("t", 64)}, MemdError, "busy"))
waiter.start()  # waits for heap 0 (with the config lock, slice by slice)
for _ in range(20):  # lookups never wait behind it
    assert mem.memzone_lookup("kept_zone").offset == zone.offset
    assert mem.ring_lookup("kept").offset == ring.offset
signal.signal(signal.SIGALRM, signal.default_int_handler)
signal.setitimer(signal.ITIMER_REAL, 0.3)
try:
    mem.memzone_reserve("interrupted", 64)
except KeyboardInterrupt:
    pass
else:
    raise AssertionError("memzone_reserve got a heap lock a stopped process holds")
_ext.heap_lock_wait(0.5)
expect_raise({
    "memzone_reserve": lambda: mem.memzone_reserve("z", 64),
    "memzone_free": lambda: mem.memzone_free(zone),
    "ring_create": lambda: mem.ring_create("r2", 64),
    "ring_free": lambda: mem.ring_free(ring),
    "mempool_create": lambda: mem.mempool_create("p2", 64, 64),
}, MemdError, f"heap 0's lock is busy: held by pid {holder}")
waiter.join(60)
assert not waiter.is_alive()
print("OK")
"""


def test_structure_changes_behind_a_stopped_heap_lock_holder_are_bounded(daemon_factory) -> None:
    """A process stopped holding heap 0's lock: memzone and ring/pool creation and
    freeing wait without the GIL, let Ctrl-C through and give up with MemdError
    naming the lock and its holder; lookups do not wait at all."""
    daemon = daemon_factory("-m", "2")
    with daemon.attach() as mem:
        mem.ring_create("kept", 64)
        mem.memzone_reserve("kept_zone", 64)
    holder = _start(daemon, HOLD_HEAP_LOCK)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HOLDING"
        os.kill(holder.pid, signal.SIGSTOP)
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                ATTACH + CONFIG_WAITS,
                daemon.prefix,
                str(daemon.runtime_dir),
                str(holder.pid),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0
    with daemon.attach() as mem:  # nothing was half done
        assert {z.name for z in mem.memzones()} >= {"kept_zone", "RG_kept"}


FORKED = """
import multiprocessing as mp
from memd.errors import MemdValueError

def child_work(kind):
    if kind == "fork":  # the parent's attachment came along: every use raises
        expect_raise(INHERITED, MemdValueError, "attach() again in the child")
        mem.detach()  # returns at once, tells the primary nothing
    own = mc.attach(prefix, runtime_dir=rundir, timeout=20)
    p = own.mempool_lookup("forked_pool")
    got = p.get_bulk(8)
    b = own.malloc(8 << 20)  # a growth round trip on the child's own sockets
    own.free(b)
    p.put_bulk(got)
    own.ring_lookup("forked_ring").enqueue(os.getpid())
    own.detach()
    return kind

if __name__ == "__main__":  # (spawn and forkserver workers import this file)
    mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
    ring = mem.ring_create("forked_ring", 64)
    pool = mem.mempool_create("forked_pool", 64, 64, cache_size=8)
    blk = mem.malloc(256)
    obj = pool.get()
    INHERITED = {
        "malloc": lambda: mem.malloc(64),
        "grow": lambda: mem.malloc(8 << 20),
        "free": lambda: mem.free(blk),
        "ring_lookup": lambda: mem.ring_lookup("forked_ring"),
        "ring.enqueue": lambda: ring.enqueue(1),
        "pool.get": lambda: pool.get(),
        "pool.put": lambda: pool.put(obj),
        "memzone_reserve": lambda: mem.memzone_reserve("child_zone", 64),
    }
    pid = os.fork()
    if pid == 0:
        try:
            child_work("fork")
        except BaseException:
            import traceback; traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    for method in ("fork", "forkserver", "spawn"):
        # one worker at a time: a growth while another process is attaching can be
        # rolled back ("no page directory here"), a page-mapping race of its own
        with mp.get_context(method).Pool(1) as workers:
            assert workers.map(child_work, [method] * 2, chunksize=1) == [method] * 2, method
    # the parent's own attachment is untouched by its children
    mem.free(mem.malloc(64))
    pool.put(obj)
    assert ring.count == 7, ring.count
    audit = pool.audit()
    assert audit["in_use"] == 0 and audit["free"] == 64, audit
    mem.detach()
    print("OK")
"""


def test_a_forked_child_must_attach_again(daemon_factory, tmp_path) -> None:
    """os.fork and multiprocessing's fork, forkserver and spawn: an attachment
    inherited through fork raises MemdValueError("attach() again in the child")
    on any use (nothing of the parent's slot, caches or sockets is shared); a child
    that attaches on its own works; the parent is untouched."""
    daemon = daemon_factory("-m", "2")
    script = tmp_path / "forked.py"  # spawn and forkserver import the main module
    script.write_text(ATTACH + FORKED)
    proc = subprocess.run(
        [sys.executable, str(script), daemon.prefix, str(daemon.runtime_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr
    assert daemon.proc is not None and daemon.proc.poll() is None


STALE_ZONE = """
from memd.errors import MemdKeyError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
stale = mem.memzone_lookup("reused")  # made by the test, freed and made again below
print("LOOKED", flush=True)
sys.stdin.readline()
new = mem.memzone_lookup("reused")
assert (new.id, new.offset) == (stale.id, stale.offset), "the test wants a reused slot"
expect_raise({"memzone_free": lambda: mem.memzone_free(stale), "buf": lambda: stale.buf},
             MemdKeyError, "reused")
assert bytes(new.buf[:4]) == b"new!"
print("OK")
"""


def test_a_stale_memzone_handle_cannot_touch_the_zone_that_reused_its_slot(daemon_factory) -> None:
    """A Memzone kept past its memzone_free (here by another process) raises
    MemdKeyError from memzone_free and .buf, although the next zone took its
    name, id and offset: the new zone stays reserved and intact."""
    daemon = daemon_factory("-m", "2")
    holder = _start(daemon, STALE_ZONE)
    try:
        with daemon.attach() as mem:
            mem.memzone_reserve("reused", 4096)
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "LOOKED"
            mem.memzone_free(mem.memzone_lookup("reused"))
            mem.memzone_reserve("reused", 4096).buf[:4] = b"new!"
            out, err = holder.communicate("go\n", timeout=60)
            assert holder.returncode == 0 and out.split()[-1] == "OK", err
            assert bytes(mem.memzone_lookup("reused").buf[:4]) == b"new!"
    finally:
        if holder.poll() is None:
            holder.kill()


HOLD_MANY = """
import array
mem = mc.attach(prefix, runtime_dir=rundir, timeout=60)
pool = mem.mempool_create("many", 500_000, 8)
handles = array.array("Q", bytes(8 * 500_000))
pool.get_bulk_into(handles)
print("HOLDING", flush=True)
sys.stdin.readline()
pool.put_bulk(handles)
mem.detach()
"""


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def test_listing_processes_with_many_objects_in_use_stays_small(daemon_factory) -> None:
    """/memd/processes counts each process's mempool objects without building a
    Python object per object: with 500 000 objects in use the daemon's peak memory
    during the call grows by a few MiB at most (it was one tuple per object), and
    the counts are right."""
    daemon = daemon_factory()
    holder = _start(daemon, HOLD_MANY)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.strip() == "HOLDING", holder.stderr.read() if holder.stderr else line
        assert daemon.proc is not None
        base = ("--file-prefix", daemon.prefix, "--runtime-dir", str(daemon.runtime_dir))
        assert run_memctl(*base, "status", timeout=60).returncode == 0
        # a first walk maps in every object header (shared pages count in RSS too)
        assert run_memctl(*base, "processes", timeout=120).returncode == 0
        pid = daemon.proc.pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the RSS now
        before = _status_mib(pid, "VmRSS")
        procs = run_memctl(*base, "--json", "processes", timeout=120)
        after = _status_mib(pid, "VmHWM")
        assert procs.returncode == 0, procs.stderr
        assert f'"pid": {holder.pid}' in procs.stdout or str(holder.pid) in procs.stdout
        assert "500000" in procs.stdout, procs.stdout
        assert after - before < 16, (before, after)
        holder.communicate("go\n", timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0


RACE_PUT = """
import array
from memd.errors import MemdError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
me, rounds, bulk = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "bulk"
pool = mem.mempool_lookup("raced")
n = pool.size
w = mem.memzone_lookup("race_sync").buf.cast("Q")
PUB, GO, READY, DONE, HANDLES = 0, 1, 2, 5, 8  # w[READY + me], w[DONE + me]: rounds reached

def wait(cond, limit=60.0):
    import time
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:  # another racer died: do not spin for ever
            print("STUCK", me, r, flush=True)
            os._exit(3)

won = 0
for r in range(1, rounds + 1):
    if me == 0:  # the getter takes every object, its handles into the shared slots
        pool.get_bulk_into(w[HANDLES:HANDLES + n])
        w[PUB] = r
    wait(lambda: w[PUB] == r)
    handles = list(w[HANDLES:HANDLES + n])
    if me == 2:
        handles.reverse()  # it meets the others head on: same object, same moment
    packed = array.array("Q", handles)
    w[READY + me] = r
    if me == 0:
        wait(lambda: w[READY + 1] == r and w[READY + 2] == r)
        w[GO] = r
    wait(lambda: w[GO] == r)
    if bulk:  # one C loop each, all at once
        try:
            pool.put_bulk(packed)
            won += n
        except (ValueError, MemdError):
            pass
    else:
        for h in handles:
            try:
                pool.put(h)
                won += 1
            except (ValueError, MemdError):
                pass
    w[DONE + me] = r
    if me == 0:
        wait(lambda: w[DONE + 1] == r and w[DONE + 2] == r)
        pool.audit()  # quiescent: raises CorruptionError on a duplicate
        for h, _pid in pool.busy():  # a bulk that lost a race keeps its objects
            pool.put(h)
        assert pool.audit()["free"] == n
print("WON", won, flush=True)
"""


@pytest.mark.slow  # rounds of three processes spinning on 2 CPUs: about a minute
@pytest.mark.parametrize("how", ["put", "put_bulk"])
def test_two_processes_putting_one_object_at_once_put_it_once(daemon_factory, how) -> None:
    """Three processes put the same objects at the same moment, round after round
    (the getter and two others): each object goes back exactly once, never twice
    into the free ring (audit() after every round)."""
    rounds = int(os.environ.get("MEMD_RACE_ROUNDS", "400"))
    daemon = daemon_factory("-m", "4")
    n = 256
    with daemon.attach() as mem:
        mem.mempool_create("raced", n, 64)
        mem.memzone_reserve("race_sync", 8 * (8 + n))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    ATTACH + RACE_PUT,
                    daemon.prefix,
                    str(daemon.runtime_dir),
                    str(me),
                    str(rounds),
                    "bulk" if how == "put_bulk" else "single",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for me in range(3)
        ]
        outs = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=600)
                assert p.returncode == 0, (out, err)
                outs.append(int(out.split()[1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if how == "put":  # every object exactly once per round
            assert sum(outs) == n * rounds, outs
        audit = mem.mempool_lookup("raced").audit()
        assert audit["free"] == n, audit


def test_an_address_space_too_small_for_the_window_is_a_clear_error(daemon: Daemon) -> None:
    """attach() in a process whose address space cannot hold the instance's window
    (ulimit -v; mlockall(MCL_FUTURE) without CAP_IPC_LOCK fails the same mmap) is
    a MemdMemoryError that says what to change, not a raw OSError."""
    _run(
        daemon,
        """
import resource
from memd.errors import MemdMemoryError
with open("/proc/self/statm") as f:
    size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
expect_raise({"attach": lambda: mc.attach(prefix, runtime_dir=rundir, timeout=5)},
             MemdMemoryError, "ulimit -v")
""",
    )
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_damaged_name_in_shared_memory_shows_and_raises_nothing(daemon) -> None:
    """Any attached process can write a ring's or pool's header: a name that is not
    UTF-8 reads with its bad bytes escaped (no UnicodeDecodeError from a handle,
    repr, pickle), a lookup says the object is damaged, and memctl still lists it
    (as corrupt, by its memzone's name)."""
    import pickle

    with daemon.attach() as mem:
        ring = mem.ring_create("dmgring", 16)
        pool = mem.mempool_create("dmgpool", 16, 64)
        zones = [mem.memzone_lookup(RING_MZ_PREFIX + "dmgring")]
        zones.append(mem.memzone_lookup(MEMPOOL_MZ_PREFIX + "dmgpool"))
        saved = []
        for mz, name in zip(zones, (b"dmgring", b"dmgpool"), strict=True):
            at = bytes(mz.buf[:64]).index(name + b"\0")
            saved.append((mz, at, bytes(mz.buf[at : at + 2])))
            mz.buf[at : at + 2] = b"\xff\xfe"  # not UTF-8
        try:
            assert ring.name == "\\xff\\xfegring"
            with pytest.raises(CorruptionError, match="names"):
                mem.ring_lookup("dmgring")  # its header names another ring: damaged
            assert repr(ring.name) in repr(ring)
            assert pool.name == "\\xff\\xfegpool"
            assert repr(pool.name) in repr(pool)
            with pytest.raises(TypeError, match="name in its header was overwritten"):
                pickle.dumps(ring)  # it is not the ring listed as "dmgring" any more
            for what in ("rings", "mempools"):
                ctl = run_memctl(
                    "--runtime-dir", str(daemon.runtime_dir), "--file-prefix", daemon.prefix,
                    "--json", what,
                )  # fmt: skip
                assert ctl.returncode == 0, ctl.stderr
                rows = json.loads(ctl.stdout)  # listed by its memzone's name, as corrupt
                assert [(row["name"], row.get("corrupt")) for row in rows] == [
                    ("dmg" + what[:-1].replace("mempool", "pool"), True)
                ]
        finally:
            for mz, at, old in saved:
                mz.buf[at : at + 2] = old
        assert ring.name == "dmgring"
        mem.ring_free(ring)
        mem.mempool_free(pool)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS], ids=["SIGSEGV", "SIGBUS"])
def test_a_sent_segv_or_bus_is_not_a_fault_in_shared_memory(daemon_factory, sig) -> None:
    """`kill -SEGV` (or -BUS) of a secondary looping malloc/free is a signal, not a
    fault the heap guard recovers from: the process dies of it, in or out of a heap
    operation (it was lost outside one, and marked heap 0 broken for every process
    inside one).  The dead process's half-done operation is rolled back by the next
    locker, so the heap stays sound: another process allocates and the check passes."""
    daemon = daemon_factory("-m", "8")
    for _ in range(6):
        victim = start_secondary(daemon, "# then:\nwhile True:\n    mem.free(mem.malloc(64))\n")
        assert victim.stdin is not None
        victim.stdin.write("go\n")
        victim.stdin.flush()
        time.sleep(0.2)  # well inside the loop: most of its time is in heap calls
        victim.send_signal(sig)
        try:
            rc = victim.wait(timeout=30)
        finally:
            victim.kill()
            victim.communicate(timeout=30)
        assert rc == -sig, (rc, daemon.log_text())
    out = run_secondary(
        daemon,
        """
        from memd import _ext
        mem.free(mem.malloc(64))
        _ext.heap_check(mem.window, 0)
        print("SOUND")
        """,
    ).stdout
    assert "SOUND" in out
    assert daemon.proc is not None and daemon.proc.poll() is None


# An application's own SIGSEGV/SIGBUS handler, installed before memd's: it counts
# its calls, its deepest nesting, and the calls that ran with the signal or its
# sa_mask (SIGUSR2) open, which the kernel never allows without SA_NODEFER.
APP_HANDLER_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static int depth, max_depth_, calls_, unmasked_;
static void h(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    (void)uc;
    int d = __atomic_add_fetch(&depth, 1, __ATOMIC_SEQ_CST);
    if (d > max_depth_)
        max_depth_ = d;
    __atomic_add_fetch(&calls_, 1, __ATOMIC_SEQ_CST);
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    if (!sigismember(&cur, sig) || !sigismember(&cur, SIGUSR2))
        __atomic_add_fetch(&unmasked_, 1, __ATOMIC_SEQ_CST);
    struct timespec t = {0, 2000000};
    nanosleep(&t, NULL);
    __atomic_sub_fetch(&depth, 1, __ATOMIC_SEQ_CST);
}
int install(int sig, int oneshot)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | (oneshot ? SA_RESETHAND : 0);
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    return sigaction(sig, &sa, NULL);
}
int installed(int sig)
{
    struct sigaction sa;
    return sigaction(sig, NULL, &sa) == 0 && sa.sa_sigaction == h;
}
void flood(int tid, int sig, int n, int us)
{
    for (int i = 0; i < n; i++) {
        syscall(SYS_tgkill, getpid(), tid, sig);
        usleep((useconds_t)us);
    }
}
int calls(void) { return calls_; }
int max_depth(void) { return max_depth_; }
int unmasked(void) { return unmasked_; }
"""

APP_HANDLER_FIRST = """
import ctypes, sys, threading
prefix, rundir, lib, sig = sys.argv[1], sys.argv[2], ctypes.CDLL(sys.argv[3]), int(sys.argv[4])
assert lib.install(sig, ONESHOT) == 0
import memd_client as mc
assert not lib.installed(sig)  # memd's handler is in front of the application's now
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
tid = threading.get_native_id()
"""


@pytest.fixture(scope="module")
def app_handler_lib(tmp_path_factory) -> str:
    """APP_HANDLER_C built into a shared library (gcc, as the extension itself)."""
    src = tmp_path_factory.mktemp("apphandler") / "apphandler.c"
    src.write_text(APP_HANDLER_C)
    lib = src.with_suffix(".so")
    cc = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-pthread"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cc.returncode == 0, cc.stderr
    return str(lib)


def _run_app(
    daemon: Daemon, lib: str, sig: int, oneshot: int, code: str
) -> subprocess.CompletedProcess[str]:
    """Run `code` after APP_HANDLER_FIRST (the handler in `lib`, then memd) attached."""
    return subprocess.run(
        [sys.executable, "-c", APP_HANDLER_FIRST.replace("ONESHOT", str(oneshot)) + code,
         daemon.prefix, str(daemon.runtime_dir), lib, str(int(sig))],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS], ids=["SIGSEGV", "SIGBUS"])
def test_a_sent_signal_reaches_the_applications_handler_as_the_kernel_would_run_it(
    daemon, app_handler_lib, sig
) -> None:
    """memd's fault handler hands a signal that is not its own to the application's
    handler with that handler's mask and the signal blocked, as the kernel would have
    run it: a flood of sent signals (200, 0.5 ms apart, at a thread looping
    malloc/free, while the handler sleeps 2 ms) never nests it (it nested 200 deep,
    and with more the process died of a stack overflow), and the process lives."""
    proc = _run_app(
        daemon, app_handler_lib, sig, 0,
        """
done = threading.Event()
def flood():
    lib.flood(tid, sig, 200, 500)
    done.set()
t = threading.Thread(target=flood)
t.start()
while not done.is_set():
    mem.free(mem.malloc(64))
t.join()
mem.detach()
print(lib.calls(), lib.max_depth(), lib.unmasked())
""",
    )  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    calls, max_depth, unmasked = map(int, proc.stdout.split())
    assert calls >= 1
    assert (max_depth, unmasked) == (1, 0), (calls, max_depth, unmasked)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS], ids=["SIGSEGV", "SIGBUS"])
def test_a_one_shot_application_handler_runs_once(daemon, app_handler_lib, sig) -> None:
    """An application handler installed with SA_RESETHAND runs for the first sent
    signal only; the second meets the default action and the process dies of it."""
    proc = _run_app(
        daemon, app_handler_lib, sig, 1,
        """
lib.flood(tid, sig, 1, 0)  # to this thread: handled before tgkill returns
print("ONE", lib.calls(), lib.unmasked(), flush=True)
mem.free(mem.malloc(64))
lib.flood(tid, sig, 1, 0)
print("SURVIVED", flush=True)
""",
    )  # fmt: skip
    assert proc.stdout.split() == ["ONE", "1", "0"], (proc.stdout, proc.stderr)
    assert proc.returncode == -sig, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS], ids=["SIGSEGV", "SIGBUS"])
def test_memds_threads_leave_a_sent_signal_to_the_application(daemon, app_handler_lib, sig) -> None:
    """A SIGSEGV/SIGBUS sent to the process while the application's thread blocks
    it stays pending, as without memd, and runs the application's handler once it
    unblocks; memd's own threads (the sync thread, the asyncio waiter) never take
    it (before, the sync thread did, at once)."""
    proc = _run_app(
        daemon, app_handler_lib, sig, 0,
        """
import asyncio, os, signal, time
ring = mem.ring_create("sigring", 16)
async def wait_a_bit():  # starts memd's asyncio waiter thread
    await asyncio.wait_for(ring.dequeue_async(), 0.05)
try:
    asyncio.run(wait_a_bit())
except TimeoutError:
    pass
signal.pthread_sigmask(signal.SIG_BLOCK, [sig])
for _ in range(5):
    os.kill(os.getpid(), sig)  # process-directed: any thread that does not block it
time.sleep(0.3)
print("BLOCKED", lib.calls(), flush=True)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
print("UNBLOCKED", lib.calls(), lib.unmasked(), flush=True)
mem.detach()
""",
    )  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    got = proc.stdout.split()
    assert got == ["BLOCKED", "0", "UNBLOCKED", "1", "0"], (proc.stdout, proc.stderr)


WRAPPED_NUMBERS = """
from memd import _ext
from memd.errors import MemdValueError
from memd.shm.mempool import Mempool
from memd.shm.ring import Ring
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
w = mem.window
b = mem.malloc(64)
b.buf[:4] = b"MEMD"
at, page, heap = b.offset, b.offset & ~((2 << 20) - 1), b.heap
ring = mem.ring_create("wrapring", 16)
pool = mem.mempool_create("wrappool", 16, 64)
obj = pool.get()
h = obj.handle
W = 2**64  # each number below is a valid one plus or minus 2**64: it must not wrap
expect_raise({
    "view offset + 2**64": lambda: w.view(W + at, 4),
    "view offset + 2**65": lambda: w.view(2 * W + at, 4),
    "view offset - 2**64": lambda: w.view(at - W, 4),
    "view length + 2**64": lambda: w.view(at, W + 4),
    "view length - 2**64": lambda: w.view(at, 4 - W),
    "view negative": lambda: w.view(-1, 4),
    "touch": lambda: w.touch(W + at, 4, 1),
    "touch step": lambda: w.touch(at, 4, W + 1),
    "unmap": lambda: w.unmap(W + page, 2 << 20),
    "guard": lambda: w.guard(W + page, 2 << 20),
    "map_fd": lambda: w.map_fd(W + page, 2 << 20, -1),
    "Ring": lambda: Ring(w, W + ring.offset),
    "Mempool": lambda: Mempool(w, W + pool.offset),
    "heap_block": lambda: _ext.heap_block(w, heap, W + at),
    "heap_validate": lambda: _ext.heap_validate(w, heap, W + at),
    "heap_validate serial": lambda: _ext.heap_validate(w, heap, at, 2**32 + b.serial),
    "iova_of": lambda: _ext.iova_of(w, W + at),
    "ring_memsize": lambda: _ext.ring_memsize(W + 16),
    "ring_memsize flags": lambda: _ext.ring_memsize(16, 2**32),
    "mempool_memsize": lambda: _ext.mempool_memsize(W + 16, 64),
    "memzone_page_sizes": lambda: _ext.memzone_page_sizes(2**32),
}, MemdValueError, "out of range")
expect_raise({
    "obj handle + 2**64": lambda: pool.obj(W + h),
    "obj handle - 2**64": lambda: pool.obj(h - W),
    "put handle + 2**64": lambda: pool.put(W + h),
    "put_bulk handle + 2**64": lambda: pool.put_bulk([W + h]),
}, MemdValueError, "mempool handle")
# nothing was touched: the block, the ring, the pool and the heap are as they were
assert bytes(b.buf[:4]) == b"MEMD"
mem.validate(b)
assert pool.audit()["in_use"] == 1, pool.audit()
ring.enqueue(7)
assert ring.dequeue() == 7
pool.put(obj)
mem.free(b)
_ext.heap_check(w, heap)
mem.ring_free(ring)
mem.mempool_free(pool)
mem.detach()
print("OK")
"""


def test_a_number_past_64_bits_or_negative_raises_and_touches_nothing(daemon) -> None:
    """An offset, length, size, flag word or handle that does not fit its C type
    (2**64 + off, negative) raises MemdValueError naming it out of range, at every
    entry point: it is never taken modulo 2**64 (or 2**32) as the memory, object
    or flags it would wrap to (w.view(2**64 + off, 4) was a view of off,
    w.unmap(2**64 + page, ...) unmapped that page).  Nothing is touched."""
    assert _run(daemon, WRAPPED_NUMBERS).stdout.strip().endswith("OK")


SCRIBBLED_LINK = """
from memd import _ext
from memd.errors import CorruptionError
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
HDR = _ext.HEAP_ELEM_HEADER_SIZE
nxt = _ext.LAYOUT["memd_heap_elem.next"][0]
a = mem.malloc(1000)
b = mem.malloc(1000)
link = mem.window.view(a.offset - HDR + nxt, 8)
good = bytes(link)
msl = mem._lists[0]
bad = {
    "hole": msl.base_offset + (msl.capacity - 1) * msl.page_size,  # never mapped here
    "stray": b.offset + 64,  # mapped, inside b's data: no header there
}[WHERE]
link[:] = bad.to_bytes(8, "little")  # an 8-byte underflow into a's header
expect_raise({"validate": lambda: mem.validate(a)}, CorruptionError, "links")
link[:] = good  # validate wrote nothing and broke nothing: with the link back, all is well
mem.validate(a)
mem.free(a)
mem.free(b)
mem.detach()
print("OK")
"""


@pytest.mark.parametrize("where", ["hole", "stray"])
def test_validate_finds_a_scribbled_link_to_a_neighbour(daemon_factory, where: str) -> None:
    """An 8-byte underflow into a block's header rewrites its link to the next
    element (into a hole, or into another block's data): validate() raises
    CorruptionError naming the links, as free() would find, but reads only: the
    heap is not marked broken, and with the link written back the block validates
    and frees."""
    daemon = daemon_factory("-m", "4")
    assert _run(daemon, f"WHERE = {where!r}\n" + SCRIBBLED_LINK).stdout.strip().endswith("OK")
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_validate_finds_an_underflow_just_before_the_data(daemon) -> None:
    """The 16 bytes just before a block's data are its header's reserved words,
    always 0: an 8-byte underflow lands there and touches no link, and validate()
    still names it (as DPDK's header cookie would); with the bytes put back, the
    block validates and frees."""
    mem = daemon.attach()
    blk = mem.malloc(100)
    before = mem.window.view(blk.offset - 8, 8)
    before[:] = b"\xa5" * 8
    with pytest.raises(CorruptionError, match="wrote before its start"):
        mem.validate(blk)
    before[:] = bytes(8)
    before.release()
    mem.validate(blk)
    mem.free(blk)
    mem.detach()


def test_a_scribble_over_a_blocks_owner_tag_is_that_blocks_damage_only(daemon_factory) -> None:
    """A 24-byte underrun before a block's data overwrites its owner tag, serial and
    reserved words (its links stay intact): that block's handle no longer
    validates or frees (StaleHandle: its serial changed), but the heap is not
    broken (before: the next heap check marked it broken, and every process's
    malloc, free and memzone_reserve raised CorruptionError until a restart), and
    a free next to it completes without an exception."""
    d = daemon_factory("-m", "8")
    mem = d.attach()
    a, b, c = mem.malloc(256), mem.malloc(256), mem.malloc(256)
    under = mem.view(b.offset - 24, 24)
    under[:] = b"\xff" * 24
    under.release()
    with pytest.raises((CorruptionError, StaleHandle)):
        mem.validate(b)
    mem.free(c)
    mem.free(a)
    r = run_secondary(
        d,
        """
        from memd import _ext
        x = mem.malloc(3 << 20)  # past the free space: a growth, and a heap check
        mem.free(x)
        mem.memzone_reserve("after", 64)
        out([_ext.heap_check(mem.window, i) is None for i in mem.heap_ids()])
        """,
    )
    assert all(result(r)), r
    assert d.proc is not None and d.proc.poll() is None
    mem.detach()
