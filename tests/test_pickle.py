"""Pickling: memd's objects travel as references through pickle, multiprocessing
pools (spawn, forkserver, fork) and concurrent.futures, and unpickle into the
receiving process's own attachment; a reference to a freed object raises."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from typing import Any

import pytest

import memd_client as mc
from memd import _ext
from memd.errors import MemdError, MemdValueError, StaleHandle, StaleReference
from memd.shm import refs
from memd.testing import finish_secondary, start_secondary


def _memd_attachments(prefix: str) -> int:
    """Live Memory objects of this process for `prefix`."""
    return sum(1 for m in list(refs._memories) if m.prefix == prefix and refs._live(m))


def use_refs(ring: mc.Ring[int], pool: mc.Mempool, mz: mc.Memzone, blk: Any, obj: Any) -> dict:
    """Worker: use every reference it received, in a process of its own."""
    data = bytes(blk.buf[:5])
    mz.buf[:4] = b"seen"
    obj.buf[:3] = b"obj"
    assert ring.enqueue(obj.handle)
    return {
        "pid": os.getpid(),
        "block": data,
        "pool_name": pool.name,
        "attachments": _memd_attachments(mz._mem.prefix),
        "same_memory": mz._mem is blk.owner,
    }


def _objects(mem: mc.Secondary, tag: str) -> tuple[Any, ...]:
    ring = mem.ring_create(f"r{tag}", 16)
    pool = mem.mempool_create(f"p{tag}", 8, 64)
    mz = mem.memzone_reserve(f"z{tag}", 4096)
    blk = mem.malloc(64)
    blk.buf[:5] = b"hello"
    obj = pool.get()
    return ring, pool, mz, blk, obj


def _check(mem: mc.Secondary, objs: tuple[Any, ...], res: dict) -> None:
    ring, pool, mz, _blk, obj = objs
    assert res["pid"] != os.getpid()
    assert res["block"] == b"hello"
    assert res["pool_name"] == pool.name
    assert res["attachments"] == 1  # one attachment per instance, however many references
    assert res["same_memory"]
    assert bytes(mz.buf[:4]) == b"seen"
    assert bytes(obj.buf[:3]) == b"obj"
    assert ring.dequeue() == obj.handle


def test_round_trip_in_process(daemon) -> None:
    with daemon.attach() as mem:
        ring, pool, mz, blk, obj = _objects(mem, "a")
        ring2, pool2, mz2, blk2, obj2 = pickle.loads(pickle.dumps((ring, pool, mz, blk, obj)))
        assert (ring2.offset, ring2.name, ring2.window) == (ring.offset, ring.name, mem.window)
        assert (pool2.offset, pool2.slot) == (pool.offset, mem.proc_slot)
        assert mz2 == mz
        assert (blk2.offset, blk2.size, bytes(blk2.buf[:5])) == (blk.offset, 64, b"hello")
        assert obj2 == obj and obj2.pool.offset == pool.offset
        assert _memd_attachments(daemon.prefix) == 1


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_process_pool_executor(daemon, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with daemon.attach() as mem:
        objs = _objects(mem, method[:2])
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            res = ex.submit(use_refs, *objs).result(timeout=60)
            _check(mem, objs, res)
            # the worker keeps its attachment: a second call attaches no more
            res = ex.submit(use_refs, *objs).result(timeout=60)
            assert res["attachments"] == 1
            objs[0].dequeue()


def test_fork_pool_created_before_attach(daemon) -> None:
    """A fork worker made before the parent attached attaches on its own when the
    first reference reaches it (a child that inherits an attachment must not use it)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as workers, daemon.attach() as mem:
        objs = _objects(mem, "fk")
        res = workers.apply_async(use_refs, objs).get(timeout=60)
        _check(mem, objs, res)


def send_back(queue: Any, item: Any) -> None:
    queue.put(item)


def test_through_a_multiprocessing_queue(daemon) -> None:
    """A child that never imported memd_client gets a reference and sends it back."""
    ctx = multiprocessing.get_context("spawn")
    with daemon.attach() as mem:
        ring = mem.ring_create("rq", 16)
        q = ctx.Queue()
        p = ctx.Process(target=send_back, args=(q, ring))
        p.start()
        back = q.get(timeout=60)
        p.join(timeout=60)
        assert p.exitcode == 0
        assert back.offset == ring.offset and back.window is mem.window


def test_stale_references_raise(daemon) -> None:
    with daemon.attach() as mem:
        ring = mem.ring_create("rs", 16)
        pickled = pickle.dumps(ring)
        mem.ring_free(ring)
        with pytest.raises(StaleReference, match="freed"):
            pickle.loads(pickled)
        mem.ring_create("rs", 16)  # same name, likely the same offset: another ring
        with pytest.raises(StaleReference):
            pickle.loads(pickled)

        pool = mem.mempool_create("ps", 4, 64)
        obj = pool.get()
        pickled_pool, pickled_obj = pickle.dumps(pool), pickle.dumps(obj)
        pool.put(obj)
        with pytest.raises(StaleReference, match="put back"):
            pickle.loads(pickled_obj)
        mem.mempool_free(pool)
        mem.mempool_create("ps", 4, 64)
        with pytest.raises(StaleReference):
            pickle.loads(pickled_pool)

        mz = mem.memzone_reserve("zs", 4096)
        pickled = pickle.dumps(mz)
        mem.memzone_free(mz)
        mem.memzone_reserve("zs", 4096)
        with pytest.raises(StaleReference):
            pickle.loads(pickled)

        blk = mem.malloc(100)
        pickled = pickle.dumps(blk)
        mem.free(blk)
        with pytest.raises(StaleReference):
            pickle.loads(pickled)
        with pytest.raises(MemdValueError, match="freed"):
            pickle.dumps(blk)
        assert issubclass(StaleReference, MemdError) and issubclass(StaleReference, KeyError)


def test_restarted_instance_is_stale(daemon_factory) -> None:
    d = daemon_factory("-m", "8")
    with d.attach() as mem:
        pickled = pickle.dumps(mem.ring_create("rr", 16))
    d.stop()
    d.start()
    with d.attach() as mem:
        mem.ring_create("rr", 16)
        with pytest.raises(StaleReference, match="restarted"):
            pickle.loads(pickled)


def test_unlisted_ring_does_not_pickle(daemon) -> None:
    with daemon.attach() as mem:
        mz = mem.memzone_reserve("zu", 4096)
        ring = mc.Ring.create(mem.window, mz.offset, 16)
        with pytest.raises(TypeError, match="listed by name"):
            pickle.dumps(ring)


def test_a_worker_attached_before_a_restart_takes_new_references(daemon_factory) -> None:
    """A process that attached on first use, then saw its daemon restart, drops that
    attachment and attaches anew for a reference made after the restart (it used to
    compare it with the dead instance and raise StaleReference, breaking the pool)."""
    d = daemon_factory("-m", "8")
    worker = start_secondary(
        d,
        """
        import pickle
        from memd.shm import refs
        # then:
        ring = pickle.loads(bytes.fromhex(sys.stdin.readline().strip()))
        ring.enqueue(42)
        out("ok")
        """,
    )
    try:
        d.stop()
        d.start()
        with d.attach() as mem:
            ring = mem.ring_create("after", 16)
            out_text, err = worker.communicate("go\n" + pickle.dumps(ring).hex() + "\n", 60)
            assert worker.returncode == 0 and 'RESULT "ok"' in out_text, err
            assert ring.dequeue() == 42
    finally:
        if worker.poll() is None:
            worker.kill()


def attach_and_return(prefix: str, runtime_dir: str) -> None:
    """Worker: attach, take a block, and end as multiprocessing children end (os._exit)."""
    mem = mc.attach(prefix, runtime_dir=runtime_dir, timeout=20)
    mem.malloc(64).buf[:2] = b"ok"


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_multiprocessing_child_that_returns_detaches(daemon, method: str) -> None:
    """multiprocessing ends its children with os._exit, past atexit: the child's
    attachment still detaches at its exit, so the primary logs a detach, not a
    death (and --reclaim-heap would not take what the child handed on)."""
    ctx = multiprocessing.get_context(method)
    p = ctx.Process(target=attach_and_return, args=(daemon.prefix, str(daemon.runtime_dir)))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    deadline = time.monotonic() + 10
    while f"secondary pid {p.pid} detached" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    assert f"secondary pid {p.pid} (slot" not in daemon.log_text()  # "... died; reclaimed"


# --- heap blocks carry their allocation serial ------------------------------------------


def _result_line(out: str) -> Any:
    """The value a start_secondary() child printed with out()."""
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line in:\n{out}")


def test_a_copy_of_a_freed_block_raises_and_touches_nothing(daemon) -> None:
    """A second Block for the same block (here pickle.loads(pickle.dumps(blk)) in the
    same process) keeps the serial of the allocation: after the block is freed and
    allocated again at the same offset, every use of the copy raises StaleHandle and
    the new block keeps its bytes."""
    with daemon.attach() as mem:
        blk = mem.malloc(64)
        copy = pickle.loads(pickle.dumps(blk))
        assert (copy.offset, copy.serial) == (blk.offset, blk.serial)
        copy.buf[:3] = b"cpy"  # while the block lives, the copy is the block
        assert bytes(blk.buf[:3]) == b"cpy"
        mem.free(blk)
        with pytest.raises(StaleHandle, match="was freed"):
            copy.buf  # noqa: B018 (the export is what raises)
        new = mem.malloc(64)
        assert new.offset == blk.offset and new.serial != blk.serial
        new.buf[:3] = b"new"
        before = mem.heap_stats()
        for use in (
            lambda: copy.buf.__setitem__(slice(0, 3), b"BAD"),
            lambda: memoryview(copy),
            lambda: mem.free(copy),
            lambda: mem.realloc(copy, 128),
            lambda: mem.validate(copy),
        ):
            with pytest.raises(StaleHandle, match=f"offset {blk.offset:#x} was freed"):
                use()
        assert bytes(new.buf[:3]) == b"new"
        assert mem.heap_stats() == before
        assert copy.owner_pid is None and not copy.freed
        with pytest.raises(MemdValueError, match="freed"):
            pickle.dumps(copy)
        with pytest.raises(MemdValueError, match="already freed"):
            mem.free(blk)  # the freeing Block itself: as before, it knows
        mem.validate(new)
        mem.free(new)


def test_a_childs_copy_raises_after_the_parent_frees_and_allocates_again(daemon) -> None:
    """A child unpickles a Block, the parent frees it and mallocs again at the same
    offset: the child's copy raises StaleHandle instead of writing into the parent's
    new block.  A live block pickled the same way still works in the child."""
    with daemon.attach() as mem:
        blk = mem.malloc(64)
        live = mem.malloc(64)
        refs_hex = pickle.dumps((blk, live)).hex()
        child = start_secondary(
            daemon,
            """
            import pickle
            from memd.errors import StaleHandle
            old, live = pickle.loads(bytes.fromhex(REFS))
            old.buf[:3] = b"kid"
            # then:
            live.buf[:4] = b"live"
            try:
                old.buf[:3] = b"BAD"
            except StaleHandle as e:
                out(["stale", str(e)])
            else:
                out(["wrote", None])
            """.replace("REFS", repr(refs_hex)),
        )
        try:
            assert bytes(blk.buf[:3]) == b"kid"  # the child's copy was the block
            offset = blk.offset
            mem.free(blk)
            new = mem.malloc(64)
            assert new.offset == offset
            new.buf[:3] = b"new"
            out = finish_secondary(child, timeout=60)  # asserts exit status 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        kind, msg = _result_line(out)
        assert kind == "stale", out
        assert f"offset {offset:#x} was freed" in msg
        assert bytes(new.buf[:3]) == b"new"
        assert bytes(live.buf[:4]) == b"live"
        mem.free(new)
        mem.free(live)


def test_a_reference_to_a_block_freed_and_allocated_again_the_same_way_is_stale(
    daemon,
) -> None:
    """Same offset, same size, same allocating process: only the serial tells the
    new block from the one the reference was made for."""
    with daemon.attach() as mem:
        blk = mem.malloc(100)
        pickled = pickle.dumps(blk)
        mem.free(blk)
        new = mem.malloc(100)
        assert (new.offset, new.size, new.owner_pid) == (blk.offset, 100, os.getpid())
        with pytest.raises(StaleReference, match=f"offset {blk.offset:#x} was freed"):
            pickle.loads(pickled)
        again = pickle.loads(pickle.dumps(new))  # a reference to the new one works
        again.buf[:2] = b"ok"
        assert bytes(new.buf[:2]) == b"ok"
        mem.free(new)


def test_a_copy_of_a_block_whose_pages_went_back_raises_and_breaks_nothing(daemon_factory) -> None:
    """The block of a stale copy may sit on pages given back since (a hole): using
    the copy reads its header there, which faults; that says "not a block here"
    (StaleHandle), and the heap is not marked broken for everyone."""
    d = daemon_factory("-m", "4")
    with d.attach() as mem:
        a = mem.malloc(40 << 20)  # x's header is on a's last page
        x = mem.malloc(40 << 20)
        y = mem.malloc(40 << 20)  # after x: x's pages are in the middle of the heap
        copy = pickle.loads(pickle.dumps(x))
        offset = x.offset
        mem.free(a)
        mem.free(x)  # a's and x's whole pages go back, x's header page too
        deadline = time.monotonic() + 10
        while True:  # its pages go back (the header page included)
            try:
                mem.view(offset - 64, 64)
            except MemdValueError:
                break
            assert time.monotonic() < deadline, "x's pages were not given back"
            time.sleep(0.05)
        for use in (
            lambda: mem.free(copy),
            lambda: mem.realloc(copy, 128),
            lambda: mem.validate(copy),
        ):
            with pytest.raises(StaleHandle):
                use()
        mem.free(mem.malloc(64))  # the heap serves on
        for h in mem.heap_ids():
            _ext.heap_check(mem.window, h)  # raises if the heap is broken
        mem.free(y)
    assert d.proc.poll() is None


def test_a_relative_runtime_dir_pickles_as_an_absolute_one(daemon, monkeypatch) -> None:
    """attach(runtime_dir="run") from the dir's parent: a reference it pickles
    unpickles in a child whose cwd is elsewhere."""
    monkeypatch.chdir(daemon.runtime_dir.parent)
    with mc.attach(daemon.prefix, runtime_dir=daemon.runtime_dir.name) as mem:
        assert mem.rundir == daemon.runtime_dir.resolve()
        ring = mem.ring_create("relring", 16)
        assert ring.enqueue(3)
        code = (
            "import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); "
            "print('RESULT', r.dequeue())"
        )
        child = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps(ring),
            cwd="/",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0, child.stderr.decode()
        assert b"RESULT 3" in child.stdout
        mem.ring_free(ring)


def test_one_instance_through_a_symlink_is_one_attachment(daemon, tmp_path) -> None:
    """A reference pickled by a process attached through a symlinked runtime dir
    unpickles into this process's attachment through the real dir, not a second one."""
    link = tmp_path / "runlink"
    link.symlink_to(daemon.runtime_dir)
    with mc.attach(daemon.prefix, runtime_dir=daemon.runtime_dir) as mem:
        ring = mem.ring_create("linkring", 16)
        with mc.attach(daemon.prefix, runtime_dir=link) as through_link:
            assert through_link.rundir == mem.rundir == daemon.runtime_dir.resolve()
        code = (
            "import pickle, sys, memd_client as mc; "
            f"m = mc.attach({daemon.prefix!r}, runtime_dir={str(link)!r}); "
            f"sys.stdout.write(pickle.dumps(m.ring_lookup('linkring')).hex()); m.detach()"
        )
        child = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert child.returncode == 0, child.stderr
        got = pickle.loads(bytes.fromhex(child.stdout.strip()))
        assert got.window is mem.window
        assert _memd_attachments(daemon.prefix) == 1
        mem.ring_free(ring)
