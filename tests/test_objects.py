"""Rings and mempools through a real daemon: named objects any process finds,
handles that travel between processes, and caches that come back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memd import _ext
from memd.testing import Daemon, result, run_secondary


def test_ring_and_mempool_across_processes(daemon: Daemon) -> None:
    run_secondary(
        daemon,
        """
        r = mem.ring_create("jobs", 1024, flags=mc.RING_F_SP_ENQ | mc.RING_F_SC_DEQ)
        mp = mem.mempool_create("frames", 256, 1024, cache_size=32)
        objs = mp.get_bulk(100)
        for i, o in enumerate(objs):
            o.buf[:4] = i.to_bytes(4, "little")
            o.buf[-1] = 0xAB
        assert r.enqueue_bulk([o.handle for o in objs]) == 100
    """,
    )
    res = result(
        run_secondary(
            daemon,
            """
        r = mem.ring_lookup("jobs")
        mp = mem.mempool_lookup("frames")
        handles = r.dequeue_burst(1000)
        seen = []
        for h in handles:
            o = mp.obj(h)
            seen.append(int.from_bytes(bytes(o.buf[:4]), "little"))
            assert o.buf[-1] == 0xAB
        mp.put_bulk([mp.obj(h) for h in handles])
        mp.audit()
        out([seen, r.count, mp.avail_count(), mp.in_use_count(),
             sorted(x.name for x in mem.rings()), sorted(x.name for x in mem.mempools())])
    """,
        )
    )
    seen, count, avail, in_use, rings, pools = res
    assert seen == list(range(100)) and count == 0
    assert avail == 256 and in_use == 0  # detach flushed the first process's cache too
    assert rings == ["jobs"] and pools == ["frames"]


def test_names_are_unique_and_freed(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        r = mem.ring_create("r1", 64)
        with pytest.raises(FileExistsError):
            mem.ring_create("r1", 64)
        mp = mem.mempool_create("p1", 64, 64)
        with pytest.raises(FileExistsError):
            mem.mempool_create("p1", 64, 64)
        with pytest.raises(ValueError):
            mem.mempool_create("p2", 64, 64, cache_size=513)
        mem.ring_free(r)
        mem.mempool_free(mp)
        mem.mempool_free(None)  # rte_mempool_free(NULL) does nothing
        mem.ring_free(None)  # rte_ring_free(NULL) too
        with pytest.raises(ValueError, match="expected a Ring"):
            mem.ring_free("r1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="expected a Mempool"):
            mem.mempool_free("p1")  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            mem.ring_lookup("r1")
        with pytest.raises(KeyError):
            mem.mempool_lookup("p1")
        assert mem.rings() == [] and mem.mempools() == []
        assert [z.name for z in mem.memzones()] == []


def test_every_memzone_can_back_a_named_object(daemon: Daemon) -> None:
    """DPDK bounds rings and pools by its memzone table only: the object directory
    has an entry per memzone, so more than the old 1024 rings fit, and the limit
    met is the memzone table's."""
    assert _ext.MAX_OBJECTS == _ext.MAX_MEMZONES
    n = 1100
    res = result(
        run_secondary(
            daemon,
            f"""
        for i in range({n}):
            mem.ring_create(f"r{{i}}", 16)
        mem.mempool_create("pool", 8, 64)
        r = mem.ring_lookup("r{n - 1}")
        r.enqueue(7)
        out([len(mem.rings()), len(mem.mempools()), len(mem.memzones()), r.dequeue()])
        for x in mem.rings():
            mem.ring_free(x)
        mem.mempool_free(mem.mempool_lookup("pool"))
        from memd import _ext
        _ext.heap_check(mem.window, 0)
    """,
            timeout=120,
        )
    )
    assert res == [n, 1, n + 1, 7]
    with daemon.attach() as mem:
        assert mem.rings() == [] and mem.memzones() == []


def test_blocking_dequeue_wakes_on_enqueue_from_another_process(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        r = mem.ring_create("wake", 16)
        p = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time, memd_client as mc\n"
                f"m = mc.attach({daemon.prefix!r}, "
                f"runtime_dir={str(daemon.runtime_dir)!r})\n"
                "time.sleep(0.3)\nm.ring_lookup('wake').enqueue(42)\nm.detach()\n",
            ]
        )
        assert r.dequeue(timeout=10) == 42
        assert r.dequeue(timeout=0.05) is None
        assert p.wait(30) == 0


def test_admin_socket_lists_real_rings_and_mempools(daemon: Daemon) -> None:
    import json
    import os

    with daemon.attach() as mem:
        mem.ring_create("tq", 256)
        mp = mem.mempool_create("bufs", 128, 2048, cache_size=16)
        held = mp.get_bulk(5)
        cmds = "/ring/list\n/mempool/list\n/mempool/info,bufs\n/ring/info,tq\n"
        proc = subprocess.run(
            ["dpdk-telemetry.py", "-f", daemon.prefix],
            input=cmds,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "RUNTIME_DIRECTORY": str(daemon.runtime_dir)},
        )
        replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert replies[0] == {"/ring/list": ["tq"]}
        assert replies[1] == {"/mempool/list": ["bufs"]}
        info = replies[2]["/mempool/info"]
        assert info["name"] == "bufs" and info["size"] == 128 and info["elt_size"] == 2048
        assert info["avail_count"] == 123 and info["in_use_count"] == 5
        assert replies[3]["/ring/info"]["name"] == "tq"
        # socket and mz_* come from the object's memzone, as in DPDK
        ring_mz = mem.memzone_lookup("RG_tq")
        ring = replies[3]["/ring/info"]
        assert ring["socket"] == ring_mz.socket_id == 0
        assert (ring["mz_name"], ring["mz_len"], ring["mz_socket_id"]) == (
            "RG_tq",
            ring_mz.length,
            0,
        )
        assert ring["mz_hugepage_sz"] == ring_mz.page_size
        pool_mz = mem.memzone_lookup("MP_bufs")
        assert info["socket_id"] == pool_mz.socket_id == 0
        assert (info["mz_name"], info["mz_len"]) == ("MP_bufs", pool_mz.length)
        mp.put_bulk(held)
