"""Heaps across processes: expansion through the primary (ZeroMQ), sync of every
secondary, rollback, exhaustion, giving pages back (memd/mp/malloc_mp.py)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from memd import _ext
from memd.mp.channel import PROTOCOL_VERSION
from memd.paths import mp_endpoint
from memd.testing import Daemon, pages_held, result, run_secondary, start_secondary


def _attached_waiter(d: Daemon) -> subprocess.Popen[str]:
    """A secondary that attaches, says so, and waits for a line on stdin."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, memd_client as mc\n"
            f"m = mc.attach({d.prefix!r}, runtime_dir={str(d.runtime_dir)!r})\n"
            "print('attached', flush=True)\nsys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "attached"
    return p


def test_secondary_expands_heap_and_another_process_reads_it(daemon: Daemon) -> None:
    res = result(
        run_secondary(
            daemon,
            """
        before = mem.heap_stats(0)["heap_totalsz_bytes"]
        blk = mem.malloc(30 << 20)          # 8 MB preallocated: must expand
        mv = memoryview(blk).cast("B")
        mv[:8] = b"memd-exp"
        mv[-1] = 0x77
        after = mem.heap_stats(0)["heap_totalsz_bytes"]
        out([blk.offset, blk.size, before, after])
    """,
        )
    )
    offset, size, before, after = res
    assert size >= 30 << 20 and after >= before + (30 << 20)
    with daemon.attach() as mem:
        view = mem.view(offset, size)
        assert bytes(view[:8]) == b"memd-exp" and view[-1] == 0x77
        assert mem.heap_stats(0)["alloc_count"] >= 1


def test_four_secondaries_expand_concurrently_and_get_disjoint_memory(daemon: Daemon) -> None:
    start_at = time.time() + 1.5
    code = f"""
        import time
        time.sleep(max(0, {start_at} - time.time()))
        me = os.getpid() & 0xFF
        blocks = []
        for _ in range(3):
            b = mem.malloc(6 << 20)          # each one needs new pages
            memoryview(b).cast("B")[:] = bytes([me]) * b.size
            blocks.append(b)
        out([[b.offset, b.size, me] for b in blocks])
        import sys; sys.stdin.readline()      # stay attached while the test checks
    """
    from memd.testing import SECONDARY_PRELUDE

    prelude = SECONDARY_PRELUDE.replace("PREFIX", repr(daemon.prefix)).replace(
        "RUNDIR", repr(str(daemon.runtime_dir))
    )
    import textwrap

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for p in procs:
        line = p.stdout.readline()
        assert line.startswith("RESULT "), (line, daemon.log_text())
        import json

        results.extend(json.loads(line[7:]))
    spans = sorted((off, off + size, me) for off, size, me in results)
    for (_, end, _), (nxt, _, _) in itertools.pairwise(spans):
        assert end <= nxt, "two secondaries got overlapping memory"
    with daemon.attach() as mem:
        for off, end, me in spans:  # nobody overwrote anybody
            v = mem.view(off, end - off)
            assert v[0] == me and v[-1] == me and v[(end - off) // 2] == me
    for p in procs:
        p.communicate("done\n", timeout=30)
        assert p.returncode == 0


@pytest.mark.parametrize("victim", ["stopped", "gil"])
def test_stopped_or_gil_bound_secondaries_delay_nobody(daemon_factory, victim: str) -> None:
    """Growth and release wait for no other secondary: one stopped with SIGSTOP, or
    one inside a long C call that holds its GIL, used to make everybody's growth
    fail ("rolled back") after --sync-timeout."""
    d = daemon_factory("-m", "4", "--sync-timeout", "60")  # a wait would show as a hang
    hog = (
        "import threading\n"
        "threading.Thread(target=lambda: [sum(range(10**9)) for _ in iter(int, 1)],"
        " daemon=True).start()\n"
    )
    code = """
    from memd import _ext
    got = []
    for i in range(3):
        b = mem.malloc(20 << 20)   # beyond -m 4: the primary adds pages
        b.buf[-1] = 0x5A
        got.append([b.offset, b.size])
        if i < 2:
            mem.free(b)            # and takes them back
    _ext.heap_check(mem.window, 0)
    out(got)
    """
    watcher = start_secondary(d, hog if victim == "gil" else "")
    if victim == "stopped":
        os.kill(watcher.pid, signal.SIGSTOP)
    try:
        proc = run_secondary(d, code, timeout=50)
        got = result(proc)
    finally:
        os.kill(watcher.pid, signal.SIGCONT)
        watcher.kill()
        watcher.wait()
    assert proc.returncode == 0 and len(got) == 3
    off, size = got[-1]
    with d.attach() as mem:
        assert mem.view(off + size - 1, 1)[0] == 0x5A
    assert d.proc.poll() is None


def test_exhaustion_raises_memoryerror_and_daemon_keeps_serving(daemon_factory) -> None:
    d = daemon_factory("-m", "4", "--max-mem", "40")  # 4 + 3 x 10 MB fit, 18 more do not
    res = result(
        run_secondary(
            d,
            """
        blocks = [mem.malloc(8 << 20) for _ in range(3)]
        try:
            mem.malloc(16 << 20)
            out(["no error"])
        except MemoryError as e:
            msg = str(e)
        for b in blocks:
            mem.free(b)
        again = mem.malloc(16 << 20)   # works again after the frees
        out([msg, again.size])
    """,
        )
    )
    assert "--max-mem" in res[0], res
    assert res[1] >= 16 << 20
    assert d.proc.poll() is None


def test_freeing_a_large_block_gives_pages_back(daemon_factory, mode: str) -> None:
    d = daemon_factory("-m", "4")
    res = result(
        run_secondary(
            d,
            f"""
        from memd.testing import pages_held
        blk = mem.malloc(40 << 20)
        grown = pages_held({d.prefix!r})
        mem.free(blk)
        out([grown, pages_held({d.prefix!r}), len(mem.memsegs())])
    """,
        )
    )
    grown, after, segs = res
    assert grown >= 22 and after == 2 and segs == 2, res
    assert pages_held(d.prefix) == 2  # the -m 4 ones: nobody maps the others any more
    assert d.stop() == 0
    assert pages_held(d.prefix) == 0


def test_malformed_messages_get_errors_and_change_nothing(daemon: Daemon) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(mp_endpoint(daemon.prefix, daemon.runtime_dir))
    with daemon.attach() as mem:
        stats = mem.heap_stats(0)
        segs = mem.memsegs()
    cases = [
        b"\xc1garbage",  # not msgpack
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"id": 1}),  # no type
        msgpack.packb({"type": "alloc"}),  # no id
        msgpack.packb({"type": "alloc", "id": -1}),  # bad id
        msgpack.packb({"type": "nonsense", "id": 2}),  # unknown type
        msgpack.packb(
            {"type": "alloc", "id": 3, "heap": 0, "size": 1 << 20, "align": 0, "bound": 0}
        ),  # not registered
        msgpack.packb({"type": "register", "id": 4, "pid": "x"}),  # bad param type
        msgpack.packb(
            {"type": "register", "id": 5, "pid": 1, "start_time": 0, "version": 999}
        ),  # wrong version
        msgpack.packb({"type": "ping", "id": 6, "pad": "x" * 5000}),  # over the limit
    ]
    for raw in cases:
        s.send(raw)
        ans = msgpack.unpackb(s.recv())
        assert ans["type"] == "reply" and ans["status"] != 0 and ans["reason"], (raw[:20], ans)
    s.send(msgpack.packb({"type": "ping", "id": 7}))
    assert msgpack.unpackb(s.recv())["status"] == 0
    s.send_multipart([b"two", b"frames"])
    assert msgpack.unpackb(s.recv())["status"] != 0
    s.send(b"x" * (1 << 20))  # far past the socket's size limit: dropped, not served
    s.close()
    with daemon.attach() as mem:  # still serving, nothing changed
        assert mem.heap_stats(0) == stats
        assert mem.memsegs() == segs
    assert daemon.proc.poll() is None


def test_page_files_are_private(daemon: Daemon) -> None:
    files = glob.glob(f"/dev/hugepages/{daemon.prefix}map_*") + glob.glob(
        f"/dev/shm/{daemon.prefix}map_*"
    )
    assert files
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o600, f


@pytest.mark.parametrize("n_other", [0, 4])
def test_expansion_syncs_every_secondary(daemon: Daemon, n_other: int) -> None:
    others = [_attached_waiter(daemon) for _ in range(n_other)]
    try:
        res = result(run_secondary(daemon, "b = mem.malloc(12 << 20); out([b.offset, b.size])"))
        with daemon.attach() as mem:  # every mapping is there for a newcomer too
            v = mem.view(res[0], res[1])
            assert len(v) == res[1]
        assert "rolled back" not in daemon.log_text()
    finally:
        for p in others:
            p.communicate("x\n", timeout=30)
            assert p.returncode == 0


def test_zmq_socket_refuses_other_users(daemon_factory) -> None:
    """Even with the socket opened up on disk, the primary checks each sender's
    uid (SO_PEERCRED, which libzmq reports as Peer-Address) and refuses others."""
    rundir = Path(tempfile.mkdtemp(prefix="memd-acl-"))  # outside pytest's 0700 tree
    try:
        os.chmod(rundir, 0o755)
        daemon = daemon_factory("-m", "4", runtime_dir=rundir)
        sockdir = rundir / "memd" / daemon.prefix
        os.chmod(rundir / "memd", 0o755)
        os.chmod(sockdir, 0o755)
        os.chmod(sockdir / "mp_socket", 0o666)
        _refused_as_nobody(daemon)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _refused_as_nobody(daemon: Daemon) -> None:
    code = (
        "import msgpack, zmq\n"
        "s = zmq.Context().socket(zmq.DEALER)\n"
        "s.setsockopt(zmq.RCVTIMEO, 5000)\n"
        f"s.connect({mp_endpoint(daemon.prefix, daemon.runtime_dir)!r})\n"
        "s.send(msgpack.packb({'type': 'ping', 'id': 1}))\n"
        "print(msgpack.unpackb(s.recv()))\n"
    )
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "'status': 13" in proc.stdout and "permission denied" in proc.stdout, proc.stdout
    with daemon.attach() as mem:  # root is still served
        assert mem.info()["primary_pid"] == daemon.pid


def test_register_must_come_from_the_named_pid(daemon: Daemon) -> None:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"sync-spoof")
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(mp_endpoint(daemon.prefix, daemon.runtime_dir))
    s.send(
        msgpack.packb(
            {
                "type": "register",
                "id": 1,
                "pid": daemon.pid,
                "start_time": 0,
                "version": PROTOCOL_VERSION,
            }
        )
    )
    ans = msgpack.unpackb(s.recv())
    s.close()
    assert ans["status"] != 0 and "sent by pid" in ans["reason"]


def test_a_stray_access_to_an_unused_page_faults_and_allocates_nothing(daemon: Daemon) -> None:
    """Each memseg list is mapped whole, holes included: touching a hole must not
    make the kernel allocate a page behind the primary's back.  The process that
    does it gets SIGBUS (userfaultfd); mem.view() refuses the range."""
    held = pages_held(daemon.prefix)
    code = """
    import ctypes
    from memd.shm.config import memseg_lists
    from memd.errors import MemdValueError
    assert mem.guarded and mem.single_file
    msl = memseg_lists(mem.window)[0]
    slot = msl.capacity - 1
    assert slot not in msl.used_slots()
    off = msl.base_offset + slot * msl.page_size
    try:
        mem.view(off, 16)
        raise AssertionError("a view of a hole")
    except MemdValueError:
        pass
    print("touching", flush=True)
    ctypes.c_char.from_address(mem.window.address + off).value = b"x"
    print("NOT REACHED", flush=True)
    """
    proc = run_secondary(daemon, code, check=False)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert "touching" in proc.stdout and "NOT REACHED" not in proc.stdout
    assert pages_held(daemon.prefix) == held  # no page was allocated for it
    with daemon.attach() as mem:
        _ext.heap_check(mem.window, 0)
    assert daemon.proc.poll() is None


def test_a_forked_child_is_guarded_too(daemon: Daemon) -> None:
    """A child's mappings do not inherit the parent's userfaultfd registration: the
    fork handler guards them again, so a stray write in the child faults instead of
    allocating a page nobody accounts for."""
    held = pages_held(daemon.prefix)
    code = """
    import ctypes
    from memd.shm.config import memseg_lists
    msl = memseg_lists(mem.window)[0]
    off = msl.base_offset + (msl.capacity - 1) * msl.page_size
    address = mem.window.address + off
    pid = os.fork()
    if pid == 0:
        ctypes.c_char.from_address(address).value = b"x"
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    out([os.WIFSIGNALED(status) and os.WTERMSIG(status)])
    """
    (sig,) = result(run_secondary(daemon, code))
    assert sig == signal.SIGBUS
    assert pages_held(daemon.prefix) == held


def test_the_config_is_not_a_view_and_a_damaged_capacity_kills_nobody(daemon: Daemon) -> None:
    """mem.view() hands out pages in use, never memd's own state; and a list capacity
    another process rewrote (through the raw window) is clamped, not followed."""
    code = """
    import struct
    from memd import _ext
    from memd.errors import MemdValueError
    try:
        mem.view(0, 16)
        out("a view of the config")
    except MemdValueError:
        pass
    off, size = _ext.LAYOUT["memd_memseg_list.capacity"]
    base = _ext.LAYOUT["memd_config.msls"][0]
    mem.window.view(base + off, size)[:] = struct.pack("I", 0xFFFFFFFF)
    b = mem.malloc(12 << 20)   # growth, then a release that walks the list
    mem.free(b)
    out("done")
    """
    assert result(run_secondary(daemon, code)) == "done"
    assert daemon.proc.poll() is None  # the primary survived the release
    with daemon.attach() as mem:
        assert mem.heap_stats()["heap_totalsz_bytes"] > 0


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of `pid` so far."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        with open(status) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_an_idle_secondary_never_wakes_up(daemon: Daemon) -> None:
    """Its sync thread sleeps in one poll on the sync socket and the primary's
    pidfd with no timeout (64 idle secondaries waking every 100 ms slowed growth
    for everyone); detach wakes it and it ends."""
    p = _attached_waiter(daemon)
    try:
        time.sleep(0.5)  # let attach's own work settle
        before = _wakeups(p.pid)
        time.sleep(2.0)
        woke = _wakeups(p.pid) - before
        assert woke <= 4, f"an idle secondary woke {woke} times in 2 s"
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == 0  # the exit detaches: the sync thread ended
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


GROW_ZONE = """
import sys, memd_client as mc
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=20)
mz = mem.memzone_reserve("grown", 24 << 20)  # past -m 4: the heap grows; the zone stays
mz.buf[-4:] = b"grow"  # on a page the growth added
print(mz.offset + mz.length - 4)
mem.detach()
"""

RACING_ATTACH = """
import subprocess, sys
import memd_client as mc
import memd.shm.memory as memory
prefix, rundir, grow = sys.argv[1], sys.argv[2], sys.argv[3]
real_lists, real_map = memory.memseg_lists, memory.Memory._map_lists
grown = []

def racing_lists(win):
    lists = real_lists(win)
    if not grown:  # another process grows the heap right after we read the lists
        out = subprocess.run([sys.executable, "-c", grow, prefix, rundir], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        grown.append(int(out))
    return lists

def map_lists(self, *args, **kw):
    memory.memseg_lists = racing_lists
    try:
        return real_map(self, *args, **kw)
    finally:
        memory.memseg_lists = real_lists

memory.Memory._map_lists = map_lists
mem = mc.attach(prefix, runtime_dir=rundir, timeout=20)
memory.Memory._map_lists = real_map
print(bytes(mem.view(grown[0], 4)).decode())
mem.memzone_free(mem.memzone_lookup("grown"))
mem.detach()
"""


def test_pages_that_come_during_an_attach_are_seen_after_it(daemon_factory) -> None:
    """A growth between an attaching secondary's reading of the memseg lists and the
    end of its attach: its views of the new pages work (it once recorded the newer
    map generation with the older pages, and refused them as not mapped)."""
    d = daemon_factory("-m", "4")
    proc = subprocess.run(
        [sys.executable, "-c", RACING_ATTACH, d.prefix, str(d.runtime_dir), GROW_ZONE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stderr}\n{d.log_text()}"
    assert proc.stdout.strip() == "grow"
    assert d.proc.poll() is None
