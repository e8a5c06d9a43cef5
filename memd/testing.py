"""Real memd processes for tests and benchmarks (memd's own, and yours): a primary
(`Daemon`) and secondaries (`run_secondary`, `start_secondary`).  Each daemon gets
its own --file-prefix (so it shares the host with any other memd) and runtime
dir, and readiness is read from a real NOTIFY_SOCKET (READY=1), as systemd would.
Nothing here is imported by memd itself."""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memd import paths
from memd.hw.hugepage_info import hugetlbfs_mounts, read_meminfo

_counter = itertools.count()


def memd_argv(prefix: str, runtime_dir: str | os.PathLike[str], *args: str) -> list[str]:
    """The command line of a memd with its own prefix and runtime dir, and `args`."""
    return [
        sys.executable,
        "-m",
        "memd",
        "--file-prefix",
        prefix,
        "--runtime-dir",
        str(runtime_dir),
        *args,
    ]


class Daemon:
    def __init__(
        self,
        tmp_path: Path,
        mode: str,
        *args: str,
        prefix: str | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.mode = mode
        self.prefix = prefix or f"t{os.getpid()}x{next(_counter)}"
        self.runtime_dir = runtime_dir or tmp_path / "run"
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / f"{self.prefix}.log"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None

    def command(self) -> list[str]:
        cmd = memd_argv(self.prefix, self.runtime_dir, "--log-level", "debug", *self.args)
        if self.mode == "nohuge":
            cmd.append("--no-huge")
        return cmd

    def start(self, wait: bool = True, timeout: float = 60.0) -> Daemon:
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.runtime_dir / f"notify-{self.prefix}"
        notify_path.unlink(missing_ok=True)
        self._notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=self.log, env=env)
        if wait:
            self.wait_notify("READY=1", timeout)
        return self

    def wait_notify(self, key: str, timeout: float = 20.0) -> str:
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            for n in self.notifications:
                if key in n.split("\n"):
                    return n
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} from memd in {timeout} s; log:\n{self.log_text()}")
            if self.proc is not None and self.proc.poll() is not None and key == "READY=1":
                raise AssertionError(f"memd exited {self.proc.returncode}:\n{self.log_text()}")
            self._notify.settimeout(min(left, 0.2))
            with contextlib.suppress(TimeoutError):
                self.notifications.append(self._notify.recv(4096).decode())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError(f"memd ignored signal {sig}; log:\n{self.log_text()}") from None
        self.log.close()
        if self._notify is not None:
            self._notify.setblocking(False)
            while True:  # keep what it said on the way out (STOPPING=1)
                try:
                    self.notifications.append(self._notify.recv(4096).decode())
                except BlockingIOError:
                    break
            self._notify.close()
            self._notify = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def config_path(self) -> Path:
        return paths.config_path(self.prefix, self.runtime_dir)

    def attach(self, timeout: float = 5.0):
        import memd_client

        return memd_client.attach(self.prefix, runtime_dir=self.runtime_dir, timeout=timeout)


SECONDARY_PRELUDE = """
import json, os, sys
import memd_client as mc
mem = mc.attach(PREFIX, runtime_dir=RUNDIR, timeout=10)
def out(obj):
    print("RESULT " + json.dumps(obj), flush=True)
"""


# A secondary that runs the Python statements it is sent, one JSON string a line,
# and answers each with a JSON line: ["ok", value of `res`] or ["err", repr].
_DRIVER = """
import json, sys, traceback
import memd_client as mc
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=10)
ns = {"mem": mem, "mc": mc}
print(json.dumps(["ok", None]), flush=True)
for line in sys.stdin:
    ns["res"] = None
    try:
        exec(json.loads(line), ns)
        ans = ["ok", ns["res"]]
    except BaseException as e:
        ans = ["err", repr(e) + traceback.format_exc()]
    print(json.dumps(ans), flush=True)
"""


class DrivenSecondary:
    """A secondary a test tells what to do, step by step: each call runs Python
    statements in it (`mem` is its attachment) and returns the value they left in
    `res` (JSON); an exception there fails the test with its traceback."""

    def __init__(self, d: Daemon) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, d.prefix, str(d.runtime_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.daemon = d
        assert self._answer() is None

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"secondary died ({self.proc.returncode}):\n{err}")
        kind, value = json.loads(line)
        assert kind == "ok", f"{value}\ndaemon log:\n{self.daemon.log_text()}"
        return value

    def __call__(self, code: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def finish(self) -> None:
        self("mem.detach()")
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def run_secondary(
    daemon: Daemon,
    code: str,
    timeout: float = 60.0,
    check: bool = True,
    user: str | None = None,
    wrap: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new Python process attached to `daemon` as `mem`; `user`
    runs it as another user (setpriv), `wrap` is a command it runs under (say
    ``unshare --time ...``)."""
    prelude = SECONDARY_PRELUDE.replace("PREFIX", repr(daemon.prefix)).replace(
        "RUNDIR", repr(str(daemon.runtime_dir))
    )
    source = prelude + textwrap.dedent(code) + "\nmem.detach()\n"
    cmd = [*wrap, sys.executable, "-c", source]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"secondary failed ({proc.returncode}):\n{proc.stderr}\n"
            f"daemon log:\n{daemon.log_text()}"
        )
    return proc


def start_secondary(
    daemon: Daemon, code: str = "", user: str | None = None, groups: str | None = None
) -> subprocess.Popen[str]:
    """A secondary that runs `code`, prints READY and then waits for a line on
    stdin (or EOF) before it runs what follows `# then:` in `code`, and detaches.
    `user`/`groups` run it as another user (setpriv)."""
    first, _, then = textwrap.dedent(code).partition("# then:")
    prelude = SECONDARY_PRELUDE.replace("PREFIX", repr(daemon.prefix)).replace(
        "RUNDIR", repr(str(daemon.runtime_dir))
    )
    source = (
        prelude
        + first
        + "\nprint('READY', flush=True)\nsys.stdin.readline()\n"
        + then
        + "\nmem.detach()\n"
    )
    cmd = [sys.executable, "-c", source]
    if user:
        cmd = [
            "setpriv",
            f"--reuid={user}",
            f"--regid={groups or 'nogroup'}",
            *([f"--groups={groups}"] if groups else ["--clear-groups"]),
            *cmd,
        ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(
            f"secondary did not get ready: {line!r}\n{err}\ndaemon log:\n{daemon.log_text()}"
        )
    return proc


def finish_secondary(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Let a start_secondary() go on; returns its stdout, asserting exit 0."""
    out, err = proc.communicate("go\n", timeout=timeout)
    assert proc.returncode == 0, f"secondary exited {proc.returncode}:\n{err}"
    return out


def wait_stopped(proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Until `proc` is in state T (stopped), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"pid {proc.pid} did not stop in {timeout} s")


def _run_module(
    module: str, args: tuple[str, ...], timeout: float, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def run_memd(*args: str, timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`python -m memd ARGS` to its end (a refused start, say), output captured."""
    return _run_module("memd", args, timeout, **kw)


def run_memctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m memd.cli.memctl ARGS`, output captured."""
    return _run_module("memd.cli.memctl", args, timeout)


def result(proc: subprocess.CompletedProcess[str]) -> object:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(f"no RESULT line in:\n{proc.stdout}\n{proc.stderr}")


def hugepages_free() -> int:
    return read_meminfo().get("HugePages_Free", 0)


def file_pages(path: str) -> int:
    """Pages a page file holds: a memseg list's file has pages only in its used
    slots, holes elsewhere.  Counted in 2 MB (--no-huge's page) or the hugetlbfs
    page size (its st_blksize)."""
    st = os.stat(path)
    page = st.st_blksize if st.st_blksize >= 2 << 20 else 2 << 20
    return -(-st.st_blocks * 512 // page)


def pages_held(prefix: str) -> int:
    """Pages that `prefix`'s page files still hold: in the files that exist, and one
    at least for each removed file some process still maps (its pages stay
    allocated while mapped).  0 once every page went back.  Unlike
    HugePages_Free, no other memd on the host changes it."""
    stem = paths.page_file_name(prefix, 0).removesuffix("0")
    held: dict[str, int] = {}
    for d in [paths.SHM_DIR] + [m.mount_point for m in hugetlbfs_mounts()]:
        for path in glob.glob(os.path.join(d, glob.escape(stem) + "*")):
            with contextlib.suppress(OSError):
                held[path] = file_pages(path)
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError), open(maps, encoding="utf-8", errors="replace") as f:
            for line in f:
                mapped = line.rstrip("\n").split(maxsplit=5)[5:]
                if mapped and os.path.basename(mapped[0]).startswith(stem):
                    held.setdefault(mapped[0].removesuffix(" (deleted)"), 1)
    return sum(held.values())


def remove_leftover_pages(prefix: str) -> None:
    """Delete page files of `prefix` that a SIGKILLed primary left behind (a new
    primary would clean them; tests that end with a kill must not leak hugepages)."""
    dirs = [paths.SHM_DIR] + [m.mount_point for m in hugetlbfs_mounts()]
    for d in dirs:
        pages = glob.escape(paths.page_file_name(prefix, 0)).removesuffix("0") + "*"
        lock = glob.escape(paths.prefix_lock_name(prefix))
        for path in glob.glob(os.path.join(d, pages)) + glob.glob(os.path.join(d, lock)):
            with contextlib.suppress(OSError):
                os.unlink(path)
