"""What ordinary programs do to a library that must not hurt others: many open
files, their own use of ZeroMQ.  Each case runs in a real secondary of a real
daemon, and ends in a clean exit, never a signal or a hang."""

from __future__ import annotations

import subprocess
import sys

from memd.testing import Daemon

ATTACH = """
import os, sys
import memd_client as mc
prefix, rundir = sys.argv[1], sys.argv[2]
"""


def _run(daemon: Daemon, code: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", ATTACH + code, daemon.prefix, str(daemon.runtime_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        f"secondary exited {proc.returncode}:\n{proc.stderr}\ndaemon log:\n{daemon.log_text()}"
    )
    return proc


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
