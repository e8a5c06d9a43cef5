"""Who may use a memd instance, checked with real users: the daemon runs as root,
other processes run as `nobody` (setpriv), in or out of the --group.

Covered: the owner, group and mode of every path memd creates (with and without
--group, under umask 022 and 077), refusal of users outside the group, a non-root
daemon against root-owned directories, squatting in a world-writable sticky
runtime dir, and a group member rewriting a page directory in the shared config."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memd.testing import (
    Daemon,
    file_pages,
    memd_argv,
    remove_leftover_pages,
    result,
    run_memctl,
    run_memd,
    run_secondary,
)

GROUP = 4242  # a gid with no /etc/group entry: --group takes numbers
NOBODY = "nobody"
NOBODY_UID = 65534
REPO = Path(__file__).resolve().parents[1]
# nobody's processes must find memd and memd_client whatever the install looks like
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")

MakeDaemon = Callable[..., Daemon]


# --- helpers ------------------------------------------------------------------------


def as_nobody(cmd: list[str], groups: int | None) -> list[str]:
    """`cmd` run as nobody:nogroup, with `groups` as its only supplementary group."""
    extra = [f"--groups={groups}"] if groups is not None else ["--clear-groups"]
    return ["setpriv", f"--reuid={NOBODY}", "--regid=nogroup", *extra, *cmd]


def run_nobody(
    args: list[str], groups: int | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `python args...` as nobody (setpriv execs the interpreter directly)."""
    return subprocess.run(
        as_nobody([sys.executable, *args], groups),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def py_nobody(
    code: str, groups: int | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return run_nobody(["-c", textwrap.dedent(code)], groups, timeout)


def last_json(proc: subprocess.CompletedProcess[str]) -> object:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(
        f"no RESULT from {proc.args[-1][:60]!r} (rc {proc.returncode}):\n"
        f"{proc.stdout}\n{proc.stderr}"
    )


def shared_tmp_dir(mode: int) -> Path:
    """A fresh dir under /tmp that nobody can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="memd-acc-", dir="/tmp"))
    os.chmod(d, mode)
    return d


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A 0755 runtime dir nobody can traverse; listed before daemon_factory in a
    test's arguments, so it is removed after the daemons stopped."""
    d = shared_tmp_dir(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sticky_dir() -> Iterator[Path]:
    """A world-writable sticky dir, like /tmp."""
    d = shared_tmp_dir(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tree(root: Path) -> dict[str, os.stat_result]:
    """Every path under `root` (lstat), relative; the harness's notify socket aside."""
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.startswith("notify-"):
                found[rel] = os.lstat(os.path.join(dirpath, name))
    return found


def page_dirs() -> list[str]:
    dirs = ["/dev/shm"]
    with open("/proc/mounts", encoding="utf-8") as f:
        dirs += [line.split()[1] for line in f if line.split()[2:3] == ["hugetlbfs"]]
    return dirs


def page_files(prefix: str) -> dict[str, os.stat_result]:
    """The page files and prefix lock of `prefix`, in every page directory."""
    out: dict[str, os.stat_result] = {}
    for d in page_dirs():
        base = os.path.join(d, glob.escape(prefix))
        for p in glob.glob(base + "map_*") + glob.glob(base + ".memd-lock"):
            out[p] = os.lstat(p)
    return out


def describe(st: os.stat_result) -> str:
    return f"{stat.filemode(st.st_mode)} uid {st.st_uid} gid {st.st_gid}"


def expected_tree(prefix: str, grouped: bool) -> dict[str, tuple[int, int, int | None]]:
    """rel path -> (file type, mode, gid or None for "not checked")."""
    g = GROUP if grouped else 0
    f, d = (0o660, 0o750) if grouped else (0o600, 0o700)
    parent = 0o711 if grouped else 0o700  # shared by all prefixes: enter, never list
    return {
        f".{prefix}_config": (stat.S_IFREG, f, g),
        "memd": (stat.S_IFDIR, parent, None),
        f"memd/{prefix}": (stat.S_IFDIR, d, g),
        f"memd/{prefix}/mp_socket": (stat.S_IFSOCK, f, g),
        "dpdk": (stat.S_IFDIR, parent, None),
        f"dpdk/{prefix}": (stat.S_IFDIR, d, g),
        f"dpdk/{prefix}/dpdk_telemetry.v2": (stat.S_IFSOCK, f, g),
    }


def check_paths(d: Daemon, grouped: bool, min_pages: int) -> None:
    """Every path memd made has exactly its owner, group and mode."""
    want = expected_tree(d.prefix, grouped)
    got = tree(d.runtime_dir)
    assert set(got) == set(want), f"runtime dir holds {sorted(got)}, want {sorted(want)}"
    bad = []
    for rel, (kind, mode, gid) in want.items():
        st = got[rel]
        if (
            stat.S_IFMT(st.st_mode) != kind
            or stat.S_IMODE(st.st_mode) != mode
            or st.st_uid != 0
            or (gid is not None and st.st_gid != gid)
            or st.st_mode & stat.S_IWOTH
            or (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWGRP)
        ):
            bad.append(f"{rel}: {describe(st)}, want {mode:o} gid {gid}")
    pages = page_files(d.prefix)
    where = "/dev/shm" if d.mode == "nohuge" else None
    locks = [p for p in pages if p.endswith(".memd-lock")]
    assert len(locks) == 1, f"prefix locks: {locks}"
    # one file per memseg list, holding the pages in use (2 MB each in both modes)
    held = sum(st.st_blocks * 512 // (2 << 20) for p, st in pages.items() if p not in locks)
    assert held >= min_pages, f"only {held} pages in {sorted(pages)}"
    for p, st in pages.items():
        in_shm = os.path.dirname(p) == "/dev/shm"
        if (where == "/dev/shm") != in_shm:
            bad.append(f"{p}: in the wrong directory for {d.mode}")
        if (
            not stat.S_ISREG(st.st_mode)
            or stat.S_IMODE(st.st_mode) != want[f".{d.prefix}_config"][1]
            or st.st_uid != 0
            or st.st_gid != (GROUP if grouped else 0)
        ):
            bad.append(f"{p}: {describe(st)}")
    assert not bad, "\n".join(bad)


class Member:
    """A secondary run as nobody that works, then waits (so its pages stay mapped
    while the test looks), then checks its heap and detaches."""

    CODE = """
    import json, sys
    import memd_client as mc
    from memd import _ext
    mem = mc.attach({prefix!r}, runtime_dir={rundir!r}, timeout=10)
    blk = mem.malloc(24 << 20)            # far beyond -m 4: the primary maps pages for us
    blk.buf[:5] = b"group"
    ring = mem.ring_create("acc_ring", 64)
    ok_ring = ring.enqueue(7) and ring.dequeue() == 7
    pool = mem.mempool_create("acc_pool", 64, 128)
    obj = pool.get()
    pool.put(obj)
    print("RESULT " + json.dumps({{"ring": bool(ok_ring), "pool": pool.avail_count(),
                                  "buf": bytes(blk.buf[:5]).decode()}}), flush=True)
    sys.stdin.readline()
    for h in mem.heap_ids():
        _ext.heap_check(mem.window, h)   # raises if the heap is broken
    mem.free(blk)
    mem.detach()
    print("DONE", flush=True)
    """

    def __init__(self, d: Daemon, groups: int | None, timeout: float = 30.0) -> None:
        code = textwrap.dedent(self.CODE).format(prefix=d.prefix, rundir=str(d.runtime_dir))
        self.proc = subprocess.Popen(
            as_nobody([sys.executable, "-c", code], groups),
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("RESULT "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(
                f"member secondary failed: {line!r}\n{err}\ndaemon log:\n{d.log_text()}"
            )
        self.result = json.loads(line[7:])

    def finish(self, timeout: float = 30.0) -> None:
        out, err = self.proc.communicate("go\n", timeout=timeout)
        assert self.proc.returncode == 0 and "DONE" in out, (
            f"member exited {self.proc.returncode}:\n{err}"
        )


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The daemon inherits our umask through Popen."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# A refusal must come at once, not from waiting out the attach timeout: with 600 s
# here, a waiting attach would run into py_nobody's 60 s bound and fail the test.
ATTACH = """
import memd_client as mc
mc.attach({prefix!r}, runtime_dir={rundir!r}, timeout=600)
print("ATTACHED")
"""


# --- 1. --group: members get in, paths are exactly as documented ---------------------


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_group_member_uses_everything(rundir: Path, daemon_factory: MakeDaemon, mask: int) -> None:
    with umask(mask):
        d = daemon_factory("-m", "4", "--group", str(GROUP), runtime_dir=rundir)
    member = Member(d, groups=GROUP)
    try:
        assert member.result == {"ring": True, "pool": 64, "buf": "group"}
        # while the member holds its 24 MiB, the pages it made the primary map exist
        check_paths(d, grouped=True, min_pages=(24 << 20) // (2 << 20))
        status = run_nobody(
            [
                "-m",
                "memd.cli.memctl",
                "--file-prefix",
                d.prefix,
                "--runtime-dir",
                str(rundir),
                "status",
            ],
            groups=GROUP,
        )
        assert status.returncode == 0, status.stderr
        assert d.prefix in status.stdout and "Traceback" not in status.stderr
    finally:
        member.finish()
    assert d.proc is not None and d.proc.poll() is None, d.log_text()
    # nothing the member did changed who may use what
    check_paths(d, grouped=True, min_pages=1)


# --- 2. outside the group: refused at once, saying where ----------------------------


def test_outsider_is_refused_at_once(rundir: Path, daemon_factory: MakeDaemon) -> None:
    d = daemon_factory("-m", "2", "--group", str(GROUP), runtime_dir=rundir)
    proc = py_nobody(ATTACH.format(prefix=d.prefix, rundir=str(rundir)), groups=None)
    assert proc.returncode != 0 and "ATTACHED" not in proc.stdout, proc.stdout
    assert "memd.errors.PermissionDenied" in proc.stderr, proc.stderr
    assert str(d.config_path) in proc.stderr, proc.stderr
    # the admin socket refuses too (its directory is 0750 to the group)
    status = run_nobody(
        ["-m", "memd.cli.memctl", "--file-prefix", d.prefix, "--runtime-dir", str(rundir), "status"]
    )
    assert status.returncode != 0, status.stdout
    assert d.proc is not None and d.proc.poll() is None


# --- 3. no --group: owner only --------------------------------------------------------


def test_without_group_everything_is_private(rundir: Path, daemon_factory: MakeDaemon) -> None:
    with umask(0o022):  # a permissive umask must not leak into memd's modes
        d = daemon_factory("-m", "4", runtime_dir=rundir)
    grow = run_secondary(d, "b = mem.malloc(12 << 20)\nout({'n': len(mem.heap_ids())})\n")
    assert result(grow)["n"] >= 1
    check_paths(d, grouped=False, min_pages=2)
    for groups in (None, GROUP):  # being in some group changes nothing
        proc = py_nobody(ATTACH.format(prefix=d.prefix, rundir=str(rundir)), groups=groups)
        assert proc.returncode != 0 and "ATTACHED" not in proc.stdout
        assert "memd.errors.PermissionDenied" in proc.stderr, proc.stderr


# --- 4. a non-root daemon against root's directories -----------------------------------


def test_non_root_daemon_cannot_use_root_dirs(require_hugepages: Any, rundir: Path) -> None:
    mount = require_hugepages.mount
    st = os.stat(mount)
    assert st.st_uid == 0 and not st.st_mode & 0o022, f"{mount}: {describe(st)}"
    prefix = f"acc{os.getpid()}h"
    own = shared_tmp_dir(0o755)
    try:
        os.chown(own, NOBODY_UID, -1)
        proc = run_nobody(
            ["-m", "memd", "--file-prefix", prefix, "--runtime-dir", str(own), "--huge-dir", mount],
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert f"cannot write to {mount}" in proc.stderr, proc.stderr
        assert "Permission denied" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(own) == [], "a failed start leaves nothing behind"
        assert page_files(prefix) == {}
    finally:
        shutil.rmtree(own, ignore_errors=True)
        remove_leftover_pages(prefix)
    # a root-owned runtime dir (0755): nobody can neither create files in it nor in
    # a new subdirectory of it
    for target in (rundir, rundir / "sub"):
        proc = run_nobody(
            ["-m", "memd", "--file-prefix", prefix, "--runtime-dir", str(target), "--no-huge"],
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert "cannot create" in proc.stderr and str(target) in proc.stderr, proc.stderr
        assert "permission denied" in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert os.listdir(rundir) == []
    remove_leftover_pages(prefix)


# --- 5. squatting in a sticky, world-writable runtime dir -----------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """What nobody left there: (mode, uid, inode, mtime, content) of every path."""
    out = {}
    for rel, st in tree(root).items():
        data = b""
        if stat.S_ISREG(st.st_mode):
            data = (root / rel).read_bytes()
        out[rel] = (st.st_mode, st.st_uid, st.st_ino, st.st_mtime_ns, data)
    return out


SQUATS = {
    "config": "open(os.path.join(D, '.' + P + '_config'), 'w').write('evil');"
    "os.chmod(os.path.join(D, '.' + P + '_config'), 0o666)",
    "memd_dir": "os.mkdir(os.path.join(D, 'memd'), 0o777); os.chmod(os.path.join(D, 'memd'),"
    " 0o777)",
    "memd_prefix_dir": "os.makedirs(os.path.join(D, 'memd', P)); "
    "[os.chmod(p, 0o777) for p in (os.path.join(D, 'memd'), "
    "os.path.join(D, 'memd', P))]",
}


@pytest.mark.parametrize("squat", sorted(SQUATS))
def test_sticky_dir_squatter_is_ignored(
    sticky_dir: Path, daemon_factory: MakeDaemon, squat: str
) -> None:
    d = daemon_factory("-m", "2", runtime_dir=sticky_dir, start=False)
    made = py_nobody(f"import os\nD, P = {str(sticky_dir)!r}, {d.prefix!r}\n{SQUATS[squat]}\n")
    assert made.returncode == 0, made.stderr
    before = snapshot(sticky_dir)
    assert before and all(v[1] == NOBODY_UID for v in before.values())
    d.start()
    private = sticky_dir / "memd-0"
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, (
        describe(st)
    )
    cfg = private / f".{d.prefix}_config"
    assert os.stat(cfg).st_uid == 0
    # a root secondary given the sticky dir finds the daemon in memd-0
    ans = result(
        run_secondary(
            d,
            """
        b = mem.malloc(6 << 20)
        b.buf[:2] = b"ok"
        out({"rundir": str(mem.rundir), "buf": bytes(b.buf[:2]).decode()})
        """,
        )
    )
    assert ans == {"rundir": str(private), "buf": "ok"}
    # nobody's files are as nobody left them, and memd put nothing beside them
    after = snapshot(sticky_dir)
    ours = {k for k in after if k == "memd-0" or k.startswith("memd-0/")}
    assert {k: v for k, v in after.items() if k not in ours} == before
    # and nobody gains nothing: memd-0 is closed to it
    probe = py_nobody(f"""
        import memd_client as mc
        try:
            open({str(cfg)!r}, "rb")
            print("RESULT " + '"opened"')
        except PermissionError:
            print("RESULT " + '"denied"')
        try:
            mc.attach({d.prefix!r}, runtime_dir={str(sticky_dir)!r}, timeout=2)
            print("RESULT " + '"attached"')
        except PermissionError as e:
            print("RESULT " + '"refused"')
        """)
    assert [json.loads(x[7:]) for x in probe.stdout.splitlines()] == ["denied", "refused"], (
        probe.stdout + probe.stderr
    )


@pytest.mark.parametrize("kind", ["dir", "open_dir", "symlink"])
def test_sticky_dir_squatted_private_dir_is_refused(
    sticky_dir: Path, daemon_factory: MakeDaemon, kind: str
) -> None:
    d = daemon_factory("-m", "2", runtime_dir=sticky_dir, start=False)
    private = sticky_dir / "memd-0"
    decoy = shared_tmp_dir(0o755)  # root's, where a symlink would lead memd
    try:
        make = {
            "dir": f"os.mkdir({str(private)!r}, 0o755)",
            "open_dir": f"os.mkdir({str(private)!r}); os.chmod({str(private)!r}, 0o777)",
            "symlink": f"os.symlink({str(decoy)!r}, {str(private)!r})",
        }[kind]
        made = py_nobody(f"import os\n{make}\n")
        assert made.returncode == 0, made.stderr
        proc = subprocess.run(d.command(), capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1, proc.stderr
        assert str(private) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        if kind != "symlink":
            assert "uid 65534 (nobody)" in proc.stderr, proc.stderr
            assert os.listdir(private) == []
        assert os.lstat(private).st_uid == NOBODY_UID
        assert os.listdir(decoy) == []
        assert page_files(d.prefix) == {}
    finally:
        shutil.rmtree(decoy, ignore_errors=True)


def test_sticky_dir_root_client_refuses_foreign_private_dir(
    sticky_dir: Path, tmp_path: Path
) -> None:
    """nobody runs a memd of its own in `<sticky>/memd-0` (a dir it made): a root
    client looking in the sticky dir for root's daemon must not attach to it."""
    private = sticky_dir / "memd-0"
    prefix = f"acc{os.getpid()}f"
    made = py_nobody(f"import os\nos.mkdir({str(private)!r}, 0o755)\n")
    assert made.returncode == 0, made.stderr
    log_path = tmp_path / "nobody-memd.log"
    with open(log_path, "wb") as log:
        fake = subprocess.Popen(
            as_nobody(
                memd_argv(prefix, private, "--no-huge", "-m", "2", "--log-level", "info"), None
            ),
            env=ENV,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while "init took" not in log_path.read_text(errors="replace"):
            assert fake.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc = subprocess.run(
            [sys.executable, "-c", ATTACH.format(prefix=prefix, rundir=str(sticky_dir))],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=ENV,
        )
        assert "ATTACHED" not in proc.stdout, (
            f"a root client attached to nobody's daemon in {private}"
        )
        # UnsafePath (memd.files) is a memd.errors.PermissionDenied
        assert proc.returncode != 0, proc.stderr
        assert re.search(r"memd\.(errors|files)\.(PermissionDenied|UnsafePath): ", proc.stderr), (
            proc.stderr
        )
        assert str(private) in proc.stderr and "uid 65534 (nobody)" in proc.stderr, proc.stderr
    finally:
        fake.send_signal(signal.SIGTERM)
        try:
            fake.wait(20)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait(10)
        remove_leftover_pages(prefix)


# --- 6. a member rewrites a page directory in the shared config ------------------------


REWRITE = """
import json, os, tempfile
cfg, prefix, old, target = {cfg!r}, {prefix!r}, {old!r}, {target!r}
evil = tempfile.mkdtemp(dir="/tmp")        # a directory of the member's own
os.chmod(evil, 0o755)
for n in range(256):                        # whatever page numbers memd asks for next
    os.symlink(target, os.path.join(evil, prefix + "map_" + str(n)))
new = evil.encode()
assert len(new) < 64                        # fits the 64-byte dir field
fd = os.open(cfg, os.O_RDWR)                # the member may: the config is 0660 group
data = os.pread(fd, os.fstat(fd).st_size, 0)
needle = old.encode() + b"\\0"
n, at = 0, data.find(needle)
while at >= 0:
    os.pwrite(fd, new + b"\\0" * max(1, len(needle) - len(new)), at)
    n += 1
    at = data.find(needle, at + 1)
os.close(fd)
print("RESULT " + json.dumps({{"dir": evil, "replaced": n}}))
"""

ROOT_GROWS = """
from memd import _ext
blocks = [mem.malloc(8 << 20) for _ in range(4)]   # 32 MiB: new pages, past -m 4
for i, b in enumerate(blocks):
    b.buf[:4] = b"mine"
    b.buf[-4:] = bytes([i]) * 4
for h in mem.heap_ids():
    _ext.heap_check(mem.window, h)
out({"ok": all(bytes(b.buf[:4]) == b"mine" for b in blocks)})
"""


@pytest.mark.parametrize("mode", ["huge"], indirect=True)
def test_rewritten_page_dir_is_not_followed(
    rundir: Path, daemon_factory: MakeDaemon, require_hugepages: Any
) -> None:
    mount = require_hugepages.mount
    d = daemon_factory("-m", "4", "--group", str(GROUP), "--huge-dir", mount, runtime_dir=rundir)
    secret_dir = Path(tempfile.mkdtemp(prefix="memd-acc-root-", dir="/tmp"))  # 0700 root
    secret = secret_dir / "rootonly"
    content = b"ROOT ONLY, never written by memd\n" * 4096
    secret.write_bytes(content)
    os.chmod(secret, 0o600)
    before = os.stat(secret)
    evil: str | None = None
    try:
        rw = py_nobody(
            REWRITE.format(cfg=str(d.config_path), prefix=d.prefix, old=mount, target=str(secret)),
            groups=GROUP,
        )
        assert rw.returncode == 0, rw.stderr
        ans = last_json(rw)
        evil = ans["dir"]
        assert ans["replaced"] >= 1, "the config names no page directory to rewrite"
        assert evil.encode() + b"\0" in d.config_path.read_bytes()  # the rewrite took
        proc = run_secondary(d, ROOT_GROWS, check=False)
        if proc.returncode == 0:
            assert result(proc) == {"ok": True}
        else:  # refusing is fine, if it is memd saying why
            assert re.search(r"memd\.\w+\.\w+: ", proc.stderr), proc.stderr
        after = os.stat(secret)
        assert secret.read_bytes() == content, "memd wrote a root-only file through a symlink"
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        )
        names = os.listdir(evil)
        assert len(names) == 256 and all(os.path.islink(os.path.join(evil, n)) for n in names), (
            "memd made files in the member's dir"
        )
        assert d.proc is not None and d.proc.poll() is None, d.log_text()
        # memd's own pages are where they belong, and there are more of them now
        real = [p for p in page_files(d.prefix) if "map_" in p]
        assert real and all(os.path.dirname(p) == mount for p in real)
        if proc.returncode == 0:
            assert sum(file_pages(p) for p in real) >= (32 << 20) // require_hugepages.page_size
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
        if evil:
            shutil.rmtree(evil, ignore_errors=True)


# --- what a hostile review found -------------------------------------------------------


@pytest.mark.parametrize("prefix", [".", "..", ".hidden", "-x", "a/b", "caf\u00e9"])
def test_prefixes_that_name_other_paths_are_refused(rundir: Path, prefix: str) -> None:
    """`..` made <runtime>/memd/.. the socket dir, and its removal emptied the
    runtime dir: a prefix must be a plain name."""
    canary = rundir / "memd" / "CANARY"
    canary.parent.mkdir()
    canary.write_text("keep")
    proc = run_memd("--file-prefix", prefix, "--runtime-dir", str(rundir), "--no-huge", "-m", "2")
    assert proc.returncode in (1, 2), proc.stderr
    assert "file-prefix" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert canary.read_text() == "keep"
    assert sorted(p.name for p in rundir.iterdir()) == ["memd"]


def test_runtime_dir_through_another_users_symlink_is_refused(sticky_dir: Path) -> None:
    """A symlink nobody owns could be pointed elsewhere while memd runs (and root
    would then remove files there at shutdown): refused at start."""
    target = shared_tmp_dir(0o755)
    link = sticky_dir / "rt"
    try:
        proc = run_nobody(["-c", f"import os; os.symlink({str(target)!r}, {str(link)!r})"])
        assert proc.returncode == 0, proc.stderr
        proc = run_memd(
            "--file-prefix", f"sl{os.getpid()}", "--runtime-dir", str(link), "--no-huge", "-m", "2"
        )
        assert proc.returncode == 1, proc.stderr
        assert str(link) in proc.stderr and "uid 65534" in proc.stderr, proc.stderr
        assert list(target.iterdir()) == []
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_clean_trusts_a_lock_file_only_for_its_owners_files() -> None:
    """Anyone can create `<p>.memd-lock` in /dev/shm: it must not make root remove
    a root file of that name, held or not."""
    prefix = f"cl{os.getpid()}"
    page = Path(f"/dev/shm/{prefix}map_0")
    lock = Path(f"/dev/shm/{prefix}.memd-lock")
    page.write_bytes(b"root data")
    os.chmod(page, 0o600)
    try:
        proc = run_nobody(["-c", f"open({str(lock)!r}, 'w').close()"])
        assert proc.returncode == 0, proc.stderr
        proc = run_memctl("hugepages", "--clean", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert str(page) not in {r["path"] for r in report["removed"]}
        assert page.read_bytes() == b"root data"
        assert str(page) in {r["path"] for r in report["skipped"]}
    finally:
        page.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def test_a_squatted_page_name_refuses_the_start_naming_its_owner(rundir: Path) -> None:
    prefix = f"sq{os.getpid()}"
    squat = Path(f"/dev/shm/{prefix}map_0")
    proc = run_nobody(["-c", f"open({str(squat)!r}, 'w').close()"])
    assert proc.returncode == 0, proc.stderr
    try:
        proc = run_memd(
            "--file-prefix", prefix, "--runtime-dir", str(rundir), "--no-huge", "-m", "2"
        )
        assert proc.returncode == 1, proc.stderr
        assert str(squat) in proc.stderr and "uid 65534" in proc.stderr, proc.stderr
        assert squat.exists() and squat.stat().st_uid == NOBODY_UID
        # the refused start leaves nothing of its own behind (no prefix lock)
        assert not Path(f"/dev/shm/{prefix}.memd-lock").exists()
    finally:
        squat.unlink(missing_ok=True)


# --- the system service's instance, found by users other than root ---------------------

SYSTEM_SCENARIO = """
import json, os, pathlib, subprocess, sys, tempfile
# A private mount namespace with a fresh /run: the daemon runs where the system
# service's does (--runtime-dir /var/run), and the host's /run is never touched.
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "memd-test-run", "/run"], check=True)
from memd.testing import Daemon, remove_leftover_pages
tmp, group = sys.argv[1], sys.argv[2]
as_member, as_outsider = json.loads(sys.argv[3]), json.loads(sys.argv[4])
d = Daemon(pathlib.Path(tmp), "nohuge", "-m", "2", "--group", group,
           runtime_dir=pathlib.Path("/var/run"))
env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")}
res = {}
def run(who, *args):
    p = subprocess.run([*who, sys.executable, *args], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
d.start()
try:
    res["prefix"] = d.prefix
    # no --runtime-dir, no RUNTIME_DIRECTORY: memctl and attach find /var/run's instance
    res["member_memctl"] = run(as_member, "-m", "memd.cli.memctl", "--file-prefix", d.prefix,
                               "--json", "status")
    res["member_attach"] = run(as_member, "-c", (
        "import memd_client as mc, sys\\n"
        "with mc.attach(sys.argv[1], timeout=10) as mem:\\n"
        "    r = mem.ring_create('sys_ring', 64)\\n"
        "    print('RING', r.enqueue(5) and r.dequeue() == 5, mem.rundir)\\n"
        "    mem.ring_free(r)\\n"), d.prefix)
    res["outsider_memctl"] = run(as_outsider, "-m", "memd.cli.memctl", "--file-prefix",
                                 d.prefix, "status")
    res["other_prefix"] = run(as_member, "-m", "memd.cli.memctl", "--file-prefix",
                              d.prefix + "-none", "status")
    res["rc"] = d.stop()
finally:
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    remove_leftover_pages(d.prefix)
print("SCENARIO " + json.dumps(res), flush=True)
"""


def test_a_group_member_finds_the_system_instance_without_options(tmp_path: Path) -> None:
    """On a host running the system service (--runtime-dir /var/run), a --group
    member that is not root runs `memctl status` and `attach(prefix)` with no
    runtime dir: its own default ($XDG_RUNTIME_DIR, /tmp) has no such instance,
    /var/run has.  An outsider is refused naming the /var/run path; a prefix found
    nowhere is still looked for in the user's own default."""
    member = as_nobody([], GROUP)
    outsider = as_nobody([], None)
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            SYSTEM_SCENARIO,
            str(tmp_path),
            str(GROUP),
            json.dumps(member),
            json.dumps(outsider),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("SCENARIO ")]
    res = json.loads(line[0].removeprefix("SCENARIO "))
    status = res["member_memctl"]
    assert status["rc"] == 0, status
    shown = json.loads(status["out"])
    assert shown["info"]["prefix"] == res["prefix"], status
    assert shown["socket"] == f"/var/run/dpdk/{res['prefix']}/dpdk_telemetry.v2", status
    attached = res["member_attach"]
    assert attached["rc"] == 0, attached
    # the attachment keeps its runtime dir resolved (/var/run is a symlink to /run)
    assert attached["out"].split() == ["RING", "True", os.path.realpath("/var/run")], attached
    refused = res["outsider_memctl"]
    assert refused["rc"] == 1 and "Traceback" not in refused["err"], refused
    assert f"/var/run/dpdk/{res['prefix']}" in refused["err"], refused
    nowhere = res["other_prefix"]
    assert nowhere["rc"] == 1 and "/var/run" not in nowhere["err"], nowhere
    assert res["rc"] == 0, res
