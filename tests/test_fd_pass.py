"""List files handed over (SCM_RIGHTS, memd/mp/fd_pass.py): with --huge-unlink=always
(files unlinked right after creation) and --in-memory (memfds, no files at all)
secondaries attach, grow, release and die like in the default mode; a crashed
--in-memory primary leaves no page file behind."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import tempfile

import pytest

from memd import paths
from memd.files import UnsafePath
from memd.hw.hugepage_info import hugetlbfs_mounts
from memd.mp.fd_pass import receive_list_fds
from memd.shm.pages import check_list_fd
from memd.testing import (
    Daemon,
    DrivenSecondary,
    file_pages,
    result,
    run_secondary,
    start_secondary,
)


def _modes(mode: str) -> list[str]:
    # DPDK refuses --huge-unlink with --no-huge (there are no hugepage files)
    return ["--in-memory"] + (["--huge-unlink=always"] if mode == "huge" else [])


# the valid pairs (--huge-unlink=always with --no-huge is a usage error)
NAMELESS = [(mode, option) for mode in ("nohuge", "huge") for option in _modes(mode)]


def stem(prefix: str) -> str:
    return paths.page_file_name(prefix, 0).removesuffix("0")


def page_files(prefix: str) -> list[str]:
    """Page files of `prefix` that have a name, anywhere memd puts them."""
    found = []
    for d in [paths.SHM_DIR] + [m.mount_point for m in hugetlbfs_mounts()]:
        found += glob.glob(os.path.join(d, glob.escape(stem(prefix)) + "*"))
    return found


def held_by_fds(pid: int, prefix: str) -> int:
    """Pages the list files process `pid` holds open hold (named or not: memfds and
    unlinked files are reached through /proc/<pid>/fd)."""
    held = 0
    for link in glob.glob(f"/proc/{pid}/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            if f"{prefix}map_" in target or stem(prefix) in target:
                held += file_pages(link)
    return held


def used_slots(d: Daemon) -> int:
    with d.attach() as mem:
        return len(mem.memsegs())


@pytest.mark.parametrize("mode, nameless", NAMELESS, indirect=["mode"])
def test_secondaries_attach_grow_release_and_die(daemon_factory, nameless: str) -> None:
    d = daemon_factory("-m", "4", nameless)
    assert page_files(d.prefix) == []  # nothing has a name
    writer = DrivenSecondary(d)
    off, size, single = writer(
        'blk = mem.malloc(40 << 20)\nblk.buf[-5:] = b"hello"\n'
        "res = [blk.offset, blk.size, mem.single_file]"
    )
    assert single
    grown = used_slots(d)
    assert grown >= 20 and 2 <= held_by_fds(d.pid, d.prefix) <= grown
    # another secondary sees the pages through the fds it was handed
    seen = result(run_secondary(d, f"out(bytes(mem.view({off}, {size})[-5:]).decode())"))
    assert seen == "hello"
    # one that dies holding memory is reclaimed; the daemon serves on
    victim = start_secondary(d, "keep = mem.malloc(8 << 20)\n# then:\n")
    victim.kill()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    writer("mem.free(blk)")
    writer.finish()
    # release: the pages leave the nameless file too
    assert result(run_secondary(d, "out(len(mem.memsegs()))")) < grown
    assert 2 <= held_by_fds(d.pid, d.prefix) <= used_slots(d)
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert page_files(d.prefix) == []


def test_a_killed_in_memory_primary_leaves_no_page_files(daemon_factory) -> None:
    d = daemon_factory("-m", "4", "--in-memory")
    user = start_secondary(d, "blk = mem.malloc(20 << 20)\n# then:\n")
    assert page_files(d.prefix) == []
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(timeout=10) == -signal.SIGKILL
    assert page_files(d.prefix) == []  # a crash leaves nothing to clean
    user.kill()
    user.wait(timeout=10)
    # and once nobody maps them, the pages are gone: no process holds any
    for maps in glob.glob("/proc/[0-9]*/maps"):
        with contextlib.suppress(OSError), open(maps, errors="replace") as f:
            assert f"{d.prefix}map_" not in f.read(), maps
    # a new primary of the same prefix starts without a cleanup of ours
    d2 = daemon_factory("-m", "4", "--in-memory", prefix=d.prefix, runtime_dir=d.runtime_dir)
    assert result(run_secondary(d2, "out(len(mem.memsegs()))")) == 2


def test_the_fd_socket_hands_files_only_to_registered_secondaries(daemon_factory) -> None:
    d = daemon_factory("-m", "4", "--in-memory")
    sock_path = paths.fd_socket_path(d.prefix, d.runtime_dir)
    assert oct(os.stat(sock_path).st_mode & 0o777) == oct(0o600)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        msg, fds, _, _ = socket.recv_fds(s, 4096, 8)
    assert fds == [] and "has not registered" in json.loads(msg)["error"]
    # the secondary's side checks who serves the socket: not the primary's pid
    with pytest.raises(UnsafePath, match="not the memd primary"):
        receive_list_fds(sock_path, os.getpid(), os.getuid())
    assert d.proc.poll() is None


def test_a_handed_over_file_is_checked() -> None:
    with tempfile.TemporaryFile() as f:
        os.ftruncate(f.fileno(), 4 << 20)
        check_list_fd(f.fileno(), os.getuid(), 4 << 20, 2 << 20, huge=False)
        with pytest.raises(UnsafePath, match="not the list's"):
            check_list_fd(f.fileno(), os.getuid(), 8 << 20, 2 << 20, huge=False)
        with pytest.raises(UnsafePath, match="not the daemon's"):
            check_list_fd(f.fileno(), os.getuid() + 1, 4 << 20, 2 << 20, huge=False)
        with pytest.raises(UnsafePath, match="pages"):
            check_list_fd(f.fileno(), os.getuid(), 4 << 20, 2 << 20, huge=True)
    r, w = os.pipe()
    try:
        with pytest.raises(UnsafePath, match="not a regular file"):
            check_list_fd(r, os.getuid(), 0, 2 << 20, huge=False)
    finally:
        os.close(r)
        os.close(w)


def test_a_restart_without_nameless_files_removes_the_dead_primarys_fd_socket(
    daemon_factory,
) -> None:
    """kill -9 of a primary with --in-memory leaves its fd_socket; the next primary
    of the prefix (with named files: no fd_socket of its own) removes it, so its
    clean stop leaves nothing."""
    d = daemon_factory("-m", "4", "--in-memory")
    sock = paths.fd_socket_path(d.prefix, d.runtime_dir)
    assert sock.exists()
    d.proc.send_signal(signal.SIGKILL)
    assert d.proc.wait(timeout=10) == -signal.SIGKILL
    assert sock.exists()  # a crash leaves it
    d2 = daemon_factory("-m", "4", prefix=d.prefix, runtime_dir=d.runtime_dir)
    assert not sock.exists()
    assert d2.stop() == 0
    assert not (d.runtime_dir / "memd" / d.prefix).exists()  # nothing left
