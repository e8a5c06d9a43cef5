"""Many memd instances on one host: different prefixes share a mount and /dev/shm,
one prefix has one owner host-wide, and only dead instances' files are removed."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest

from memd.testing import (
    Daemon,
    finish_secondary,
    result,
    run_memctl,
    run_secondary,
    start_secondary,
)

GROW = """
from memd import _ext
b = mem.malloc(12 << 20)          # more than -m 2: the primary maps pages for us
b.buf[:4] = b"grow"
ok = bytes(b.buf[:4]).decode()
mem.free(b)
for h in mem.heap_ids():
    _ext.heap_check(mem.window, h)    # raises if the heap is broken
out({"ok": ok})
"""


def page_dir(d: Daemon) -> str:
    if d.mode == "nohuge":
        return "/dev/shm"
    return "/dev/hugepages"


def files_of(d: Daemon) -> set[str]:
    """The page files and prefix lock of `d` in its page directory."""
    base = os.path.join(page_dir(d), glob.escape(d.prefix))
    return set(glob.glob(base + "map_*")) | set(glob.glob(base + ".memd-lock"))


def grows(d: Daemon) -> None:
    """A new secondary attaches, grows the heap, and the heap checks out."""
    assert result(run_secondary(d, GROW)) == {"ok": "grow"}


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_two_prefixes_share_a_mount(daemon_factory, order: str) -> None:
    a = daemon_factory("-m", "2", start=False)
    b = daemon_factory("-m", "2", start=False)
    first, second = (a, b) if order == "ab" else (b, a)
    first.start()
    second.start()
    holder_a = start_secondary(a, "x = mem.malloc(8 << 20)\n# then:\nmem.free(x)\n")
    grows(b)
    grows(a)
    files_a = files_of(a)
    assert any("map_" in f for f in files_a) and any(f.endswith(".memd-lock") for f in files_a)
    # stopping one leaves the other's files and secondaries untouched
    assert b.stop() == 0
    assert files_of(b) == set()
    assert files_of(a) >= files_a
    assert finish_secondary(holder_a) is not None
    grows(a)
    assert a.proc.poll() is None


def test_same_prefix_other_runtime_dir_is_refused(daemon_factory, tmp_path) -> None:
    first = daemon_factory("-m", "2")
    holder = start_secondary(first, "x = mem.malloc(8 << 20)\n")  # keeps grown pages mapped
    before = files_of(first)
    second = daemon_factory(
        "-m", "2", prefix=first.prefix, runtime_dir=tmp_path / "run2", start=False
    )
    proc = subprocess.run(second.command(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"pid {first.pid}" in proc.stderr, proc.stderr
    assert str(first.runtime_dir) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # it removed nothing: the first one's files are all there and it still serves
    assert files_of(first) == before
    grows(first)
    # once the first and its secondaries are dead, the second starts and removes
    # exactly their files
    first.kill()
    holder.kill()
    holder.wait(10)
    left = files_of(first)
    second.start()
    stale_pages = [f for f in left if "map_" in f]
    log = second.log_text()
    assert f"removed {len(stale_pages)} page files" in log and "dead primary" in log, log
    grows(second)
    assert second.stop() == 0
    assert files_of(second) == set()


def test_restart_of_a_killed_prefix_cleans_only_its_own(daemon_factory) -> None:
    other = daemon_factory("-m", "2")
    grows(other)
    holder = start_secondary(other, "x = mem.malloc(8 << 20)\n")
    other_files = files_of(other)
    victim = daemon_factory("-m", "4")
    run_secondary(victim, "mem.memzone_reserve('z', 6 << 20)\n")
    victim.kill()
    left = files_of(victim)
    assert left, "kill -9 leaves the page files"
    stale = {f: os.stat(f).st_ino for f in left if "map_" in f}
    again = daemon_factory("-m", "2", prefix=victim.prefix, runtime_dir=victim.runtime_dir)
    # every stale page file is gone (the new ones may take the same names): its
    # start removed them, or another memd's starting on the host did at the same
    # moment (any start cleans dead prefixes)
    for f, ino in stale.items():
        assert not os.path.exists(f) or os.stat(f).st_ino != ino, (f, again.log_text())
    assert files_of(other) == other_files  # the live instance lost nothing
    grows(again)
    finish_secondary(holder)
    grows(other)


def test_any_start_removes_dead_prefixes_but_not_live_or_foreign(daemon_factory, tmp_path) -> None:
    dead = daemon_factory("-m", "4")
    dead.kill()
    assert files_of(dead)
    live = daemon_factory("-m", "2")  # any start cleans dead prefixes
    # (this one, or another memd starting on the host at the same moment)
    assert files_of(dead) == set(), live.log_text()
    holder = start_secondary(live, "x = mem.malloc(8 << 20)\n")
    live_files = files_of(live)
    # a DPDK-style file (no memd lock beside it) is not memd's to remove
    foreign = os.path.join(page_dir(dead), f"f{os.getpid()}xdpdkmap_0")
    with open(foreign, "wb"):
        pass
    try:
        fresh = daemon_factory("-m", "2")
        assert fresh.proc.poll() is None
        assert files_of(live) == live_files
        assert os.path.exists(foreign)
        grows(live)
    finally:
        os.unlink(foreign)
    finish_secondary(holder)


def test_memctl_hugepages_clean(daemon_factory) -> None:
    live = daemon_factory("-m", "2")
    live_files = files_of(live)
    dead = daemon_factory("-m", "4")
    dead.kill()
    stale = files_of(dead)
    proc = run_memctl("hugepages", "--clean", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    removed = {r["path"] for r in report["removed"]}
    # what memctl did not remove, another memd starting on the host did meanwhile
    assert removed & stale or not any(os.path.exists(f) for f in stale)
    assert not removed & live_files
    assert files_of(dead) == set()
    assert files_of(live) == live_files
    grows(live)
    # the human form says what it freed
    proc = run_memctl("hugepages", "--clean")
    assert proc.returncode == 0 and "freed" in proc.stdout, proc.stdout + proc.stderr


def test_dead_primarys_secondaries_elsewhere_block_the_prefix(daemon_factory, tmp_path) -> None:
    old = daemon_factory("-m", "2")
    holder = start_secondary(old, "x = mem.malloc(8 << 20)\n")
    old.kill()
    new = daemon_factory(
        "-m", "2", prefix=old.prefix, runtime_dir=tmp_path / "elsewhere", start=False
    )
    new.start(wait=False)
    assert new.proc.wait(60) == 1
    log = new.log_text()
    assert f"pid {holder.pid}" in log and "--take-over" in log, log
    taken = daemon_factory(
        "-m", "2", "--take-over", prefix=old.prefix, runtime_dir=tmp_path / "elsewhere2"
    )
    grows(taken)
    holder.kill()
    holder.wait(10)
    assert taken.proc.poll() is None


def test_refused_restart_keeps_the_dead_files_cleanable(daemon_factory) -> None:
    """A restart refused because a dead primary's pages are still mapped leaves its
    lock file, so the pages are freed once their holder is gone."""
    old = daemon_factory("-m", "2")
    holder = start_secondary(old, "x = mem.malloc(8 << 20)\n")
    old.kill()
    left = files_of(old)
    refused = daemon_factory("-m", "2", prefix=old.prefix, runtime_dir=old.runtime_dir, start=False)
    refused.start(wait=False)
    assert refused.proc.wait(60) == 1
    assert files_of(old) == left, "a refused start removes nothing"
    holder.kill()
    holder.wait(10)
    # another memd starting on this host may clean the dead prefix first
    still_there = {f for f in left if os.path.exists(f)}
    proc = run_memctl("hugepages", "--clean", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"] for r in json.loads(proc.stdout)["removed"]}
    assert {f for f in still_there if f not in removed} <= {
        f for f in left if not os.path.exists(f)
    }
    assert files_of(old) == set()


def test_a_forked_holder_is_named_by_its_own_pid(daemon_factory) -> None:
    """The pid a flock records is the process that took it; a fork that outlives it
    still maps the pages and is the one to name."""
    old = daemon_factory("-m", "2")
    child = result(
        run_secondary(
            old,
            """
x = mem.malloc(8 << 20)
child = os.fork()
if child == 0:            # keeps the pages mapped after its parent is gone
    os.close(1)
    os.close(2)
    import time
    time.sleep(120)
    os._exit(0)
out(child)
os._exit(0)
""",
        )
    )
    old.kill()
    refused = daemon_factory("-m", "2", prefix=old.prefix, runtime_dir=old.runtime_dir, start=False)
    refused.start(wait=False)
    try:
        assert refused.proc.wait(60) == 1
        assert f"pid {child}" in refused.log_text(), refused.log_text()
    finally:
        os.kill(child, 9)
