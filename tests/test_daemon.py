"""The primary as a real process: lifecycle, refusal, crash recovery, cleanup."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import memd_client as mc
from memd import _ext
from memd.testing import (
    Daemon,
    file_pages,
    finish_secondary,
    pages_held,
    remove_leftover_pages,
    result,
    run_memd,
    run_secondary,
    start_secondary,
)


def _page_files(d: Daemon) -> list[str]:
    return glob.glob(f"/dev/hugepages/{d.prefix}map_*") + glob.glob(f"/dev/shm/{d.prefix}map_*")


def test_ready_means_attachable_and_config_layout(daemon: Daemon) -> None:
    # READY=1 came (the fixture waited): attach must work at once, without waiting
    with daemon.attach(timeout=0) as mem:
        info = mem.info()
        assert info["primary_pid"] == daemon.pid
        assert info["prefix"] == daemon.prefix
        assert info["mapped_bytes"] >= 8 << 20
        assert info["no_huge"] == (daemon.mode == "nohuge")
    # the config file holds the pid at the offset the extension reports
    off, size = _ext.LAYOUT["memd_config_header.primary_pid"]
    with open(daemon.config_path, "rb") as f:
        f.seek(off)
        assert int.from_bytes(f.read(size), "little") == daemon.pid
    assert oct(daemon.config_path.stat().st_mode & 0o777) == "0o600"
    assert daemon.config_path.stat().st_size == _ext.CONFIG_SIZE


def test_second_primary_is_refused(daemon_factory) -> None:
    first = daemon_factory("-m", "4")
    second = daemon_factory(
        "-m", "4", prefix=first.prefix, runtime_dir=first.runtime_dir, start=False
    )
    proc = subprocess.run(second.command(), check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert first.prefix in proc.stderr and str(first.pid) in proc.stderr
    # the first one is unharmed
    with first.attach() as mem:
        assert mem.info()["primary_pid"] == first.pid


def test_clean_shutdown_leaves_nothing(daemon_factory, mode: str) -> None:
    d = daemon_factory("-m", "16")
    run_secondary(d, "mem.memzone_reserve('grow', 40 << 20)\n")  # forces expansion
    assert _page_files(d)
    assert pages_held(d.prefix) >= 8 + 20
    assert d.stop() == 0
    assert "STOPPING=1" in "\n".join(d.notifications)
    assert not d.config_path.exists()
    assert not (d.runtime_dir / "memd" / d.prefix).exists()
    assert _page_files(d) == []
    assert pages_held(d.prefix) == 0


def test_kill9_primary_then_new_primary_starts_clean(daemon_factory, tmp_path) -> None:
    old = daemon_factory("-m", "8")
    # a secondary of the old primary stays attached across the crash
    code = (
        "import sys, time\n"
        "print('attached', flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    mem.memzone_reserve('after', 64 << 20)\n"
        "    out('no error')\n"
        "except mc.PrimaryNotRunning as e:\n"
        "    out('PrimaryNotRunning: ' + str(e))\n"
    )
    prelude_proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, memd_client as mc\n"
            f"mem = mc.attach({old.prefix!r}, runtime_dir={str(old.runtime_dir)!r})\n"
            "def out(o): print('RESULT ' + json.dumps(o), flush=True)\n" + code,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert prelude_proc.stdout.readline().strip() == "attached"
    files_before = _page_files(old)
    assert files_before
    old.kill()
    # stale files are still there after kill -9 ...
    assert old.config_path.exists()
    # ... a new primary refuses to start under the old one's live secondary ...
    refused = daemon_factory("-m", "8", prefix=old.prefix, runtime_dir=old.runtime_dir, start=False)
    refused.start(wait=False)
    assert refused.proc.wait(30) == 1
    assert f"pid {prelude_proc.pid}" in refused.log_text()
    assert "--take-over" in refused.log_text()
    assert old.config_path.exists()  # and touched nothing
    # ... and with --take-over it cleans them up and starts
    new = daemon_factory("-m", "8", "--take-over", prefix=old.prefix, runtime_dir=old.runtime_dir)
    assert "dead primary" in new.log_text()
    with new.attach() as mem:
        assert mem.info()["primary_pid"] == new.pid
    out, err = prelude_proc.communicate("go\n", timeout=30)
    assert "PrimaryNotRunning" in out, (out, err)


def test_restart_after_old_secondaries_detach(daemon_factory) -> None:
    """A secondary that detaches from a dead primary frees its slot itself, so
    a new primary starts without --take-over."""
    old = daemon_factory("-m", "4")
    mem = old.attach()
    old.kill()
    with pytest.raises(mc.PrimaryNotRunning):
        mem.memzone_reserve("too-late", 64 << 20)
    mem.detach()
    new = daemon_factory("-m", "4", prefix=old.prefix, runtime_dir=old.runtime_dir)
    with new.attach() as mem2:
        assert mem2.info()["primary_pid"] == new.pid


@pytest.mark.parametrize("form", ["blocking", "asyncio"])
@pytest.mark.parametrize(
    ("sig", "said"),
    [(signal.SIGTERM, "was stopped (clean shutdown)"), (signal.SIGKILL, "died")],
    ids=["stopped", "killed"],
)
def test_a_primary_gone_fails_a_blocked_ring_wait(daemon_factory, sig, said, form) -> None:
    """A secondary blocked in a ring call (timeout=None, or its asyncio twin) gets
    PrimaryNotRunning when the primary goes: attach() made its window watch the
    primary's pidfd.  The message tells a clean stop (the config says SHUTDOWN)
    from a death."""
    d = daemon_factory("-m", "8")
    with d.attach() as mem:
        assert mem.window.watch_fd >= 0
        r = mem.ring_create("blocked", 64)
        rcs: list[int] = []
        stopper = threading.Timer(0.2, lambda: rcs.append(d.stop(sig)))
        done = threading.Event()

        def unblock() -> None:  # a broken watch fails the test instead of hanging it
            if not done.wait(60):
                r.enqueue(1)

        threading.Thread(target=unblock, daemon=True).start()
        stopper.start()
        try:
            with pytest.raises(mc.PrimaryNotRunning) as raised:
                if form == "blocking":
                    r.dequeue(timeout=None)
                else:
                    asyncio.run(r.dequeue_async(timeout=None))
        finally:
            done.set()
            stopper.join()
        assert rcs == [0 if sig == signal.SIGTERM else -signal.SIGKILL]
        assert f"the memd primary {said} while this call was waiting" in str(raised.value)
        other = "died" if sig == signal.SIGTERM else "stopped"
        assert other not in str(raised.value)
    assert mem.window.watch_fd == -1  # detach stopped watching and closed the pidfd


def test_attach_without_primary_raises(tmp_path) -> None:
    t0 = time.monotonic()
    with pytest.raises(mc.PrimaryNotRunning, match="no memd primary"):
        mc.attach("nobody-here", runtime_dir=tmp_path, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3  # it did wait for a starting primary


def test_attach_to_stale_config_raises(daemon_factory) -> None:
    d = daemon_factory("-m", "4")
    d.kill()
    with pytest.raises(mc.PrimaryNotRunning, match="dead"):
        d.attach(timeout=0.2)


def test_attach_waits_for_a_starting_primary(daemon_factory) -> None:
    d = daemon_factory("-m", "4", start=False)
    d.start(wait=False)
    try:
        mem = d.attach(timeout=60)  # no READY wait: attach itself waits
    except mc.PrimaryNotRunning as e:
        raise AssertionError(f"{e}\ndaemon log:\n{d.log_text()}") from e
    with mem:
        assert mem.info()["primary_pid"] == d.pid


def test_attach_right_after_detach(daemon: Daemon) -> None:
    """Each attach of a process has its own socket identities.  They used to be
    named after id(self), which a new attach gets back after a detach; the primary
    still held the old identity for a moment and ignored the new connection, so
    about one re-attach in twenty waited 5 s and failed to register."""
    names = set()
    for _ in range(20):
        with daemon.attach(timeout=5) as mem:
            assert mem._channel is not None
            names.add(mem._channel.name)
            assert mem.heap_stats(0)["heap_totalsz_bytes"] > 0
    assert len(names) == 20


def test_version_mismatch(tmp_path) -> None:
    cfg = tmp_path / ".old_config"
    data = bytearray(_ext.CONFIG_SIZE)
    data[0:8] = _ext.CONFIG_MAGIC.to_bytes(8, "little")
    off, size = _ext.LAYOUT["memd_config_header.layout_version"]
    data[off : off + size] = (999).to_bytes(size, "little")
    cfg.write_bytes(bytes(data))
    with pytest.raises(mc.VersionMismatch, match="layout version 999"):
        mc.attach("old", runtime_dir=tmp_path, timeout=0.1)


def test_permission_denied_for_other_user(daemon: Daemon) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as nobody")
    os.chmod(daemon.runtime_dir.parent, 0o755)
    os.chmod(daemon.runtime_dir, 0o755)
    proc = run_secondary(daemon, "", check=False, user="nobody")
    assert proc.returncode != 0
    assert "PermissionDenied" in proc.stderr


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--bogus"], 2, "unrecognized"),
        (["-m", "lots"], 2, "number of MB"),
        (["--file-prefix", "a/b"], 1, "file-prefix"),
        (["--huge-dir", "/nonexistent/dir"], 1, "huge-dir"),
        # DPDK's eal_check_common_options refuses these combinations
        (["-m", "8", "--socket-mem", "8"], 2, "-m and --socket-mem cannot be used together"),
        (["--no-huge", "--socket-mem", "8"], 2, "--socket-mem cannot be used with --no-huge"),
        (["--no-huge", "--huge-unlink"], 2, "--huge-unlink cannot be used with --no-huge"),
        (["--socket-mem", "1,1,1,1,1,1,1,1,1"], 2, "has 9 values"),
        (["--huge-unlink=sometimes"], 2, "invalid choice"),
        (["--sync-timeout", "nan"], 2, "finite number"),
        (["--sync-timeout", "inf"], 2, "finite number"),
        (["--sync-timeout", "-1"], 2, "finite number"),
        (["--socket-mem", "0,0,0,0,0,0,0,4"], 2, "asks for memory on socket 7"),
        (["--group", "nosuchgroup-memd"], 2, "--group: no such group 'nosuchgroup-memd'"),
    ],
)
def test_bad_usage_and_init_failures(tmp_path, args: list[str], code: int, words: str) -> None:
    proc = run_memd("--runtime-dir", str(tmp_path), *args, timeout=30)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("create it") <= 1  # one piece of advice, said once


def test_sighup_logs_state(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "state:" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    assert daemon.proc.poll() is None


def test_processes_table_tracks_secondaries(daemon: Daemon) -> None:
    res = result(run_secondary(daemon, "out([p['role'] for p in mem.processes()])"))
    assert res == ["primary", "secondary"]
    with daemon.attach() as mem:  # the first secondary's slot was freed at detach
        assert [p["role"] for p in mem.processes()] == ["primary", "secondary"]


@pytest.mark.parametrize("spelling", ["--huge-unlink", "--huge-unlink=always"])
def test_huge_unlink_hands_the_files_to_secondaries(tmp_path, require_hugepages, spelling) -> None:
    # hugepages only: with --no-huge it is a usage error (test_bad_usage_and_init_failures)
    d = Daemon(tmp_path, "huge", "-m", "4", spelling).start()
    try:
        assert _page_files(d) == []  # unlinked right after creation
        with d.attach(timeout=5) as mem:  # the fds came over the fd socket
            blk = mem.malloc(8 << 20)
            blk.buf[-2:] = b"ok"
            assert bytes(mem.view(blk.offset + blk.size - 2, 2)) == b"ok"
            mem.free(blk)
        assert _page_files(d) == []
    finally:
        assert d.stop() == 0


def test_huge_unlink_with_legacy_mem_refuses_secondaries_clearly(
    tmp_path, require_hugepages
) -> None:
    d = Daemon(tmp_path, "huge", "-m", "4", "--legacy-mem", "--huge-unlink=always").start()
    try:
        with pytest.raises(mc.MemdError, match="--huge-unlink and --legacy-mem"):
            d.attach(timeout=1)
    finally:
        assert d.stop() == 0


def test_a_forked_child_is_told_to_attach_again(daemon: Daemon) -> None:
    """ZeroMQ sockets do not survive fork(): a child that grows the heap through
    its parent's attachment gets a clear error (it used to spin until killed; the
    secondary's 60 s bound fails the test if that comes back)."""
    res = result(
        run_secondary(
            daemon,
            """
r, w = os.pipe()
child = os.fork()
if child == 0:
    try:
        mem.malloc(64 << 20)          # beyond -m 8: needs the primary
        msg = "no error"
    except mc.MemdError as e:
        msg = f"{type(e).__name__}: {e}"
    os.write(w, msg.encode())
    os._exit(0)
os.waitpid(child, 0)
msg = os.read(r, 4096).decode()
out({"msg": msg, "parent": mem.malloc(64 << 20).size})
""",
            timeout=60,
        )
    )
    assert "forked" in res["msg"] and "attach" in res["msg"], res
    assert res["parent"] >= 64 << 20  # the parent's attachment is unharmed


def test_huge_unlink_never_keeps_and_reuses_page_files(tmp_path, mode) -> None:
    """DPDK's --huge-unlink=never: page files outlive the primary and the next run
    maps the same files (old data and all); zmalloc still returns zeros."""
    first = Daemon(tmp_path, mode, "-m", "4", "--huge-unlink=never")
    try:
        first.start()
        # beyond -m 4: growth pages too; freed, they are released but their files stay
        run_secondary(first, "b = mem.malloc(6 << 20); b.buf[:] = b'\\xab' * b.size; mem.free(b)")
        assert first.stop() == 0
        kept = {f: os.stat(f).st_ino for f in _page_files(first)}
        # the list's file, holding the pages in use at the stop: the 2 preallocated
        # (the grown ones were released; the stop punched them out)
        assert kept and sum(file_pages(f) for f in kept) == 2

        second = Daemon(tmp_path, mode, "-m", "4", "--huge-unlink=never", prefix=first.prefix)
        second.start()
        code = """
        from memd import _ext
        z = mem.zmalloc(6 << 20)
        out([bytes(z.buf) == bytes(z.size), z.size])  # reused pages count as dirty
        mem.free(z)
        _ext.heap_check(mem.window, 0)
        """
        assert result(run_secondary(second, code)) == [True, 6 << 20]
        now = {f: os.stat(f).st_ino for f in _page_files(second)}
        assert set(kept) <= set(now) and all(now[f] == ino for f, ino in kept.items())
        assert second.stop() == 0
    finally:
        for d in (first, locals().get("second")):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.stop()
        remove_leftover_pages(first.prefix)
    assert _page_files(first) == []


def test_huge_unlink_never_next_primary_repairs_what_a_killed_one_grew(tmp_path, mode) -> None:
    """--huge-unlink=never keeps the list file across primaries: a primary killed
    (-9) while 40 MiB was grown for a secondary leaves those pages in it; the
    next primary punches out every slot it does not mark used (the file then
    holds exactly the used slots' pages), and its clean stop keeps just those."""
    args = ("-m", "4", "--huge-unlink=never")
    first = Daemon(tmp_path, mode, *args)
    second = None
    try:
        first.start()
        holder = start_secondary(first, "b = mem.malloc(40 << 20)\nb.buf[-1] = 1")
        assert sum(file_pages(f) for f in _page_files(first)) >= 22
        first.kill()
        holder.kill()
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert sum(file_pages(f) for f in _page_files(first)) >= 22  # the crash left them

        second = Daemon(tmp_path, mode, *args, prefix=first.prefix).start()
        with second.attach() as mem:
            used = len(mem.memsegs())
        assert used == 2  # -m 4: the preallocated pages
        assert sum(file_pages(f) for f in _page_files(second)) == used
        assert pages_held(second.prefix) == used
        assert "a previous run left" in second.log_text()
        assert second.stop() == 0
        assert _page_files(second) and pages_held(second.prefix) == 2  # kept, in use
    finally:
        for d in (first, second):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.stop()
        remove_leftover_pages(first.prefix)
    assert _page_files(first) == []


@pytest.mark.parametrize(
    "toml, words",
    [
        ('m = "64"', 'm = "64" (a string): expected an integer 0 to 32768 (MB'),
        # ints that pass the type check but are out of range: exit 2 too, not 1 at start
        (f"m = {10**23}", f"m = {10**23} (an integer): expected an integer 0 to 32768 (MB"),
        (
            f"socket-mem = [8, {10**23}]",
            f"socket-mem = [8, {10**23}] (an array): expected an array of integers 0 to 32768",
        ),
        (
            f"base-virtaddr = {1 << 64}",
            f"base-virtaddr = {1 << 64} (an integer): expected an integer 0 to 0xffffffffffffffff",
        ),
        (
            f"sync-timeout = {10**400}",
            f"sync-timeout = {10**400} (an integer): expected a finite number >= 0 (seconds)",
        ),
        ('no-huge = "yes"', 'no-huge = "yes" (a string): expected true or false'),
        ("socket-mem = [8, true]", "socket-mem = [8, true] (an array): expected an array of"),
        ("max-mem = -1", "max-mem = -1 (an integer): expected an integer >= 0 (MB)"),
        ("sync-timeout = false", "sync-timeout = false (a boolean): expected a finite number"),
        ('log-level = "loud"', "log-level = \"loud\" (a string): expected one of 'debug',"),
        ("file-prefix = 7", "file-prefix = 7 (an integer): expected a string"),
        ("frobnicate = 1", "unknown option 'frobnicate'"),
        ("m = 1979-05-27", 'm = "1979-05-27" (a date or time): expected an integer'),
        ("sync-timeout = nan", "sync-timeout = NaN (a float): expected a finite number"),
        ("sync-timeout = inf", "sync-timeout = Infinity (a float): expected a finite number"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_bad_usage(
    tmp_path, toml: str, words: str
) -> None:
    """A --config value of the wrong TOML type is exit 2 naming the file, the key and
    the type expected (a string for -m used to end in a TypeError traceback)."""
    conf = tmp_path / "memd.toml"
    conf.write_text(toml + "\n")
    proc = run_memd("--runtime-dir", str(tmp_path), "--config", str(conf), timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--config {conf}: {words}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["-m", str(10**23)], "argument -m: must be 0 to 32768 MB"),
        (["--socket-mem", f"8,{10**23}"], "argument --socket-mem: each size must be 0 to 32768 MB"),
        (["--base-virtaddr", hex(1 << 64)], "argument --base-virtaddr: must be 0 to 0xffff"),
        (["--no-huge", "-m", "16385"], "-m (m in a --config file) 16385 with --no-huge: must be"),
    ],
)
def test_integer_options_out_of_range_are_bad_usage(tmp_path, args: list[str], words: str) -> None:
    """An integer no instance can start with is exit 2 naming the option and its range
    (-m 10**23 used to fail at start, exit 1; a --base-virtaddr past 64 bits wrapped)."""
    proc = run_memd("--runtime-dir", str(tmp_path), *args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_file_that_is_not_utf8_is_bad_usage(tmp_path) -> None:
    conf = tmp_path / "memd.toml"
    conf.write_bytes(b"\xff\xfe x = 1\n")
    proc = run_memd("--runtime-dir", str(tmp_path), "--config", str(conf), timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"--config {conf}:" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_of_the_right_types_starts_memd(daemon_factory, tmp_path) -> None:
    """Every key spelled as its long option (m for -m, max-mem for --max-mem) with
    its TOML type is taken; the command line wins over the file."""
    conf = tmp_path / "memd.toml"
    conf.write_text('m = 4\nmax-mem = 16\nsync-timeout = 3\nlog-level = "debug"\n')
    d = daemon_factory("--config", str(conf), "-m", "6")
    with d.attach() as mem:
        assert mem.info()["mapped_bytes"] == 6 << 20  # -m 6 beat m = 4
        with pytest.raises(mc.MemdMemoryError):
            mem.malloc(32 << 20)  # max-mem = 16 is the cap
    assert d.stop() == 0


def _log_lines(text: str, pid: int) -> list[str]:
    return [line for line in text.splitlines() if f"pid {pid} " in line]


def _wait_for(what, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.05)
    return found


def test_a_clean_secondary_exit_is_logged_as_detached_not_died(daemon: Daemon) -> None:
    """A secondary that exits without detach() detaches at exit (atexit), so the
    primary logs it as detached; a SIGKILLed one is still logged as died."""
    script = (
        "import os, memd_client as mc\n"
        f"mem = mc.attach({daemon.prefix!r}, runtime_dir={str(daemon.runtime_dir)!r})\n"
        "mz = mem.memzone_reserve(f'kept{os.getpid()}', 4096)\n"  # a live view: exit must not mind
        "print('READY', flush=True)\n"
        "input()\n"
    )
    clean = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert clean.stdout is not None and clean.stdout.readline() == "READY\n"
    assert clean.communicate("\n", timeout=30)[0] == "" and clean.returncode == 0
    lines = _wait_for(lambda: _log_lines(daemon.log_text(), clean.pid)[1:])
    assert "detached" in lines[-1] and not any("died" in line for line in lines), lines

    killed = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert killed.stdout is not None and killed.stdout.readline() == "READY\n"
    killed.kill()
    killed.wait(30)
    lines = _wait_for(lambda: _log_lines(daemon.log_text(), killed.pid)[1:])
    assert "died" in lines[-1] and not any("detached" in line for line in lines), lines
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_secondary_tells_a_stopped_primary_from_a_dead_one(daemon_factory, sig) -> None:
    """The primary marks the config SHUTDOWN before a clean exit: a secondary then
    logs (and raises) that it was stopped; a killed primary died."""
    d = daemon_factory("-m", "4")
    script = f"""
import logging, sys, time
import memd_client as mc
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
mem = mc.attach({d.prefix!r}, runtime_dir={str(d.runtime_dir)!r})
print("READY", flush=True)
deadline = time.monotonic() + 20
while mem.primary_alive() and time.monotonic() < deadline:
    time.sleep(0.02)
deadline = time.monotonic() + 10
while mem._channel._thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.02)   # the sync thread logs what became of the primary, then ends
try:
    mem.malloc(64 << 20)  # beyond -m 4: needs the primary
except mc.PrimaryNotRunning as e:
    print("RAISED", e, flush=True)
mem.detach()
"""
    sec = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sec.stdout is not None and sec.stdout.readline() == "READY\n"
    assert d.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    out, err = sec.communicate(timeout=60)
    assert sec.returncode == 0, err
    logged = [line for line in err.splitlines() if line.startswith("LOG the memd primary")]
    if sig == signal.SIGTERM:
        assert any("was stopped (clean shutdown)" in line for line in logged), err
        assert not any("died" in line for line in logged), err
        assert "RAISED the memd primary" in out and "was stopped" in out, out
    else:
        assert any("died" in line for line in logged), err
        assert not any("stopped" in line for line in logged), err
        assert "RAISED the memd primary" in out and "has died" in out, out


def test_a_stopped_primarys_secondary_makes_no_new_objects(daemon_factory) -> None:
    """After a clean stop (and a new primary of the prefix), an old secondary still
    maps the old memory; creating or looking up named objects there would make
    them where no new process will ever see them: PrimaryNotRunning instead."""
    d = daemon_factory("-m", "4")
    old = start_secondary(
        d,
        """
        mem.ring_create("before", 64)
        # then:
        got = []
        for call in (lambda: mem.memzone_reserve("after", 4096),
                     lambda: mem.memzone_lookup("before"),
                     lambda: mem.ring_create("after", 64),
                     lambda: mem.ring_lookup("before"),
                     lambda: mem.mempool_create("after", 8, 64),
                     lambda: mem.mempool_lookup("before")):
            try:
                call()
                got.append("ok")
            except mc.PrimaryNotRunning:
                got.append("PrimaryNotRunning")
            except Exception as e:
                got.append(type(e).__name__)
        out(got)
        """,
    )
    assert d.stop() == 0
    new = daemon_factory("-m", "4", prefix=d.prefix, runtime_dir=d.runtime_dir)
    out = finish_secondary(old)
    got = json.loads(next(li[7:] for li in out.splitlines() if li.startswith("RESULT ")))
    assert got == ["PrimaryNotRunning"] * 6, got
    with new.attach() as mem:
        assert mem.memzones() == []


@pytest.mark.parametrize("sig", [signal.SIGBUS, signal.SIGSEGV, signal.SIGABRT])
def test_a_primary_killed_by_a_fatal_signal_logs_where(daemon: Daemon, sig: int) -> None:
    """faulthandler is on before memd._ext installs its fault guard, so a fault
    outside the guard reaches it: the log says which signal and where."""
    assert daemon.stop(sig) == -sig
    log = daemon.log_text()
    assert "Fatal Python error" in log and "most recent call first" in log, log[-2000:]


def test_removed_stale_files_are_logged_with_what_they_held(daemon_factory) -> None:
    """A memseg list's file is as long as the list (GiBs) but holds only its used
    pages: the next primary reports those, not the file's apparent size."""
    old = daemon_factory("-m", "8")
    run_secondary(old, "mem.memzone_reserve('grow', 40 << 20)\n")
    old.kill()
    new = daemon_factory("-m", "8", prefix=old.prefix, runtime_dir=old.runtime_dir)
    found = re.search(r"removed (\d+) page files \((\d+) MiB\) of a dead primary", new.log_text())
    assert found is not None, new.log_text()
    assert 48 <= int(found.group(2)) <= 64, found.group(0)
