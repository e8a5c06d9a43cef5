"""A damaged ring or mempool header (any attached process can write it) is listed
on its own, as corrupt, by the name its memzone gives; the healthy ones are listed
as before; lookups raise CorruptionError naming it; freeing its memzone frees it.
Real daemons, both modes; memctl runs as a real process."""

from __future__ import annotations

import array
import asyncio
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from memd import _ext
from memd.errors import CorruptionError, MemdValueError, StaleHandle
from memd.shm.ring import Ring
from memd.testing import Daemon

# A ring header's size/mask/capacity words, rewritten as the hostile review's t6.py did.
RING_GEOMETRY_WORDS = tuple(_ext.LAYOUT[f"memd_ring.{f}"][0] for f in ("size", "mask", "capacity"))
RING_HEADER = _ext.LAYOUT["memd_ring.slots"][0]
MEMPOOL_HEADER = 256  # the first header bytes the review copied


def memctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memd.cli.memctl",
            "--file-prefix",
            daemon.prefix,
            "--runtime-dir",
            str(daemon.runtime_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"memctl {args}: {proc.returncode}\n{proc.stderr}"
    return proc


def memctl_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(memctl(daemon, "--json", *args).stdout)


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def test_a_damaged_pool_is_listed_corrupt_and_hides_no_other(daemon_factory) -> None:
    daemon = daemon_factory("-m", "16")
    with daemon.attach() as mem:
        big = mem.mempool_create("dmg_big", 4096, 64)
        small = mem.mempool_create("dmg_small", 4, 64)
        healthy = mem.mempool_create("dmg_ok", 8, 64)
        held = healthy.get()
        # another pool's header over this one's (the review's t1min.py)
        mem.window.view(small.offset, MEMPOOL_HEADER)[:] = mem.window.view(
            big.offset, MEMPOOL_HEADER
        )

        pools = by_name(memctl_json(daemon, "mempools"))
        assert pools["dmg_small"] == {
            "name": "dmg_small",
            "pool_id": 1,
            "mz_name": "MP_dmg_small",
            "corrupt": True,
        }
        assert pools["dmg_big"]["size"] == 4096 and not pools["dmg_big"].get("corrupt")
        assert pools["dmg_ok"]["in_use_count"] == 1 and not pools["dmg_ok"].get("corrupt")

        stats = memctl_json(daemon, "telemetry", "/memd/stats")["/memd/stats"]
        assert stats["mempools"] == 3 and stats["mempools_corrupt"] == ["dmg_small"]
        procs = memctl_json(daemon, "processes")
        assert any(p["mempool_objects"] == 1 for p in procs), procs
        assert "corrupt" in memctl(daemon, "mempools").stdout
        assert "corrupt: dmg_small" in memctl(daemon, "status").stdout

        with pytest.raises(CorruptionError, match=r"dmg_small.*memzone_free"):
            mem.mempool_lookup("dmg_small")
        assert mem.mempool_lookup("dmg_ok").name == "dmg_ok"

        # a healthy pool's memzone is still refused, saying what a damaged one takes
        with pytest.raises(MemdValueError, match="if it is damaged"):
            mem.memzone_free(mem.memzone_lookup("MP_dmg_ok"))
        mem.memzone_free(mem.memzone_lookup("MP_dmg_small"))
        assert sorted(p["name"] for p in memctl_json(daemon, "mempools")) == ["dmg_big", "dmg_ok"]
        again = mem.mempool_create("dmg_small", 4, 64)
        assert again.audit()["free"] == 4
        healthy.put(held)
        for p in (again, big, healthy):
            mem.mempool_free(p)
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_damaged_ring_is_listed_corrupt_by_its_memzone_name(daemon_factory) -> None:
    daemon = daemon_factory("-m", "16")
    with daemon.attach() as mem:
        big = mem.ring_create("dmg_bigr", 1 << 12)
        small = mem.ring_create("dmg_smallr", 16)
        words = mem.ring_create("dmg_words", 16)
        healthy = mem.ring_create("dmg_okr", 16)
        healthy.enqueue(7)
        # another ring's header (name and capacity) over this one's
        mem.window.view(small.offset, RING_HEADER)[:] = mem.window.view(big.offset, RING_HEADER)
        # only the geometry words (the review's t6.py)
        for off in RING_GEOMETRY_WORDS:
            mem.window.view(words.offset + off, 4)[:] = struct.pack("<I", 0xFFFFFFFF)

        rings = memctl_json(daemon, "rings")
        assert [r["name"] for r in rings] == ["dmg_bigr", "dmg_smallr", "dmg_words", "dmg_okr"]
        got = by_name(rings)
        for name in ("dmg_smallr", "dmg_words"):
            assert got[name] == {"name": name, "mz_name": "RG_" + name, "corrupt": True}
        assert got["dmg_bigr"]["capacity"] == (1 << 12) - 1
        assert got["dmg_okr"]["used_count"] == 1 and not got["dmg_okr"].get("corrupt")
        assert memctl_json(daemon, "telemetry", "/memd/stats")["/memd/stats"]["rings_corrupt"] == [
            "dmg_smallr",
            "dmg_words",
        ]

        for name in ("dmg_smallr", "dmg_words"):
            with pytest.raises(CorruptionError, match=rf"{name}.*RG_{name}"):
                mem.ring_lookup(name)
            mem.memzone_free(mem.memzone_lookup("RG_" + name))
        assert [r["name"] for r in memctl_json(daemon, "rings")] == ["dmg_bigr", "dmg_okr"]
        assert mem.ring_lookup("dmg_okr").dequeue() == 7
        for r in (big, healthy):
            mem.ring_free(r)
    assert daemon.proc is not None and daemon.proc.poll() is None


# --- handles kept across the damage ------------------------------------------------
# A header overwritten after a handle was made (the hostile review's h14rs2): every
# call through the handle raises CorruptionError naming the object and its memzone,
# none hands out an entry or object nobody put there, and a handle to an object that
# was really freed still raises StaleHandle.

DAMAGE = b"\x41" * 256  # the review's overwrite: the header and the producers' line


def ring_ops(r: Any) -> dict[str, Callable[[], object]]:
    """Every call a Ring handle offers on its entries, for either kind of ring."""
    rec = r.esize != 8
    item: Any = b"\x07" * r.esize if rec else 7
    buf: Any = bytearray(4 * r.esize) if rec else array.array("Q", [0] * 4)
    return {
        "enqueue": lambda: r.enqueue(item),
        "enqueue_bulk": lambda: r.enqueue_bulk([item, item]),
        "enqueue_burst": lambda: r.enqueue_burst([item, item]),
        "dequeue": r.dequeue,
        "dequeue_timeout": lambda: r.dequeue(timeout=1),
        "dequeue_bulk": lambda: r.dequeue_bulk(2),
        "dequeue_burst": lambda: r.dequeue_burst(100),
        "dequeue_burst_timeout": lambda: r.dequeue_burst(100, timeout=1),
        "dequeue_bulk_into": lambda: r.dequeue_bulk_into(buf),
        "dequeue_burst_into": lambda: r.dequeue_burst_into(buf),
        "dequeue_async": lambda: asyncio.run(r.dequeue_async(timeout=1)),
        "count": lambda: r.count,
        "free_count": lambda: r.free_count,
        "len": lambda: len(r),
        "empty": r.empty,
        "full": r.full,
        "name": lambda: r.name,
        "flags": lambda: r.flags,
        "info": r.info,
    }


def test_a_ring_whose_header_is_overwritten_breaks_every_call(daemon_factory) -> None:
    daemon = daemon_factory("-m", "16")
    with daemon.attach() as mem:
        rings = {
            "h14rs2": mem.ring_create("h14rs2", 64),  # new, empty (the review's)
            "h14full": mem.ring_create("h14full", 64),  # holding entries
            "h14rec": mem.ring_create("h14rec", 64, esize=16),  # a ring of records
        }
        rings["h14full"].enqueue_bulk([1, 2, 3])
        rings["h14rec"].enqueue(b"\x01" * 16)
        healthy = mem.ring_create("h14ok", 64)
        healthy.enqueue(5)
        for r in rings.values():
            mem.view(r.offset, len(DAMAGE))[:] = DAMAGE  # any attached process can
        for name, r in rings.items():
            for op_name, op in ring_ops(r).items():
                with pytest.raises(CorruptionError, match=rf"'{name}' is corrupted.*RG_{name}"):
                    got = op()
                    pytest.fail(f"{name}.{op_name} returned {got!r} from a damaged ring")

        assert repr(rings["h14rs2"]).startswith("<Ring (corrupted)")
        assert daemon.proc is not None and daemon.proc.poll() is None
        listed = by_name(memctl_json(daemon, "rings"))
        assert all(listed[n].get("corrupt") for n in rings), listed
        assert healthy.dequeue() == 5  # the others work on
        for name, r in rings.items():
            mem.memzone_free(mem.memzone_lookup("RG_" + name))  # as documented
            with pytest.raises(StaleHandle, match="was freed"):
                r.dequeue()
            again = mem.ring_create(name, 64)
            assert again.enqueue(9) and again.dequeue() == 9
            mem.ring_free(again)
        mem.ring_free(healthy)
    assert daemon.proc.poll() is None


def test_damaged_tails_alone_hand_out_nothing(daemon_factory) -> None:
    """Only the producers' tail overwritten (the tags intact): a dequeue sees more
    entries than the capacity and raises instead of handing out old slots."""
    daemon = daemon_factory("-m", "16")
    with daemon.attach() as mem:
        r = mem.ring_create("h14tail", 64)
        r.enqueue_bulk([1, 2])
        assert r.dequeue_bulk(2) == [1, 2]  # the slots keep 1 and 2
        tail = r.offset + _ext.LAYOUT["memd_ring.prod"][0]
        tail += _ext.LAYOUT["memd_ring_headtail.tail"][0]
        mem.view(tail, 4)[:] = struct.pack("<I", 0x41414141)
        for op in (lambda: r.dequeue_burst(100), lambda: r.dequeue(timeout=1), lambda: r.count):
            with pytest.raises(CorruptionError, match=r"'h14tail' is corrupted.*counters"):
                op()
        with pytest.raises(CorruptionError, match=r"h14tail.*RG_h14tail"):
            mem.ring_lookup("h14tail")  # it no longer validates: listed corrupt
        assert by_name(memctl_json(daemon, "rings"))["h14tail"]["corrupt"] is True
        mem.memzone_free(mem.memzone_lookup("RG_h14tail"))
    assert daemon.proc is not None and daemon.proc.poll() is None


@pytest.mark.parametrize("cache_size", [0, 4])
def test_a_pool_whose_header_is_overwritten_breaks_every_call(daemon_factory, cache_size) -> None:
    daemon = daemon_factory("-m", "16")
    with daemon.attach() as mem:
        pool = mem.mempool_create("h14mp", 8, 64, cache_size)
        held = pool.get()
        handle = pool.get_handle()
        mem.view(pool.offset, len(DAMAGE))[:] = DAMAGE
        ops: dict[str, Callable[[], object]] = {
            "get": pool.get,
            "get_bulk": lambda: pool.get_bulk(2),
            "get_handle": pool.get_handle,
            "put": lambda: pool.put(held),
            "put_handle": lambda: pool.put(handle),
            "put_bulk": lambda: pool.put_bulk([handle]),
            "audit": pool.audit,
            "avail_count": pool.avail_count,
        }
        for op_name, op in ops.items():
            with pytest.raises(CorruptionError, match=r"'h14mp' is corrupted.*MP_h14mp"):
                got = op()
                pytest.fail(f"{op_name} returned {got!r} from a damaged pool")
        assert "(corrupted)" in repr(pool)
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert by_name(memctl_json(daemon, "mempools"))["h14mp"]["corrupt"] is True
        mem.memzone_free(mem.memzone_lookup("MP_h14mp"))  # as documented
        for op in (pool.get, lambda: pool.put(held)):
            with pytest.raises(StaleHandle, match="was freed"):
                op()  # its memory may be anybody's now: nothing is moved
        again = mem.mempool_create("h14mp", 8, 64, cache_size)
        assert again.audit()["free"] == 8
        mem.mempool_free(again)
    assert daemon.proc.poll() is None


def test_freed_rings_and_pools_stay_stale_whatever_reuses_their_memory(daemon) -> None:
    """A free, not damage: StaleHandle, also once a new object at the same offset
    is itself overwritten (its tags look like damage; the handle's zone is gone)."""
    with daemon.attach() as mem:
        ring = mem.ring_create("h14fr", 64)
        ring.enqueue(1)
        pool = mem.mempool_create("h14fp", 8, 64, 4)
        obj = pool.get()
        mem.ring_free(ring)
        mem.mempool_free(pool)
        calls: list[Callable[[], object]] = [
            ring.dequeue,
            lambda: ring.enqueue(2),
            lambda: ring.count,
            pool.get,
            lambda: pool.put(obj),
            pool.audit,
        ]
        for op in calls:
            with pytest.raises(StaleHandle, match="was freed"):
                op()
        ring2 = mem.ring_create("h14fr", 64)
        pool2 = mem.mempool_create("h14fp", 8, 64, 4)
        assert (ring2.offset, pool2.offset) == (ring.offset, pool.offset)
        for new in (ring2, pool2):
            mem.view(new.offset, len(DAMAGE))[:] = DAMAGE
        for op in calls:
            with pytest.raises(StaleHandle, match="was freed"):
                op()
        # a handle made directly (no memzone known) decides by the tags alike
        mem.view(ring2.offset + _ext.LAYOUT["memd_ring.cons"][0], 64)[:] = b"\x41" * 64
        with pytest.raises(StaleHandle, match="was freed"):
            ring.dequeue()
        for name in ("RG_h14fr", "MP_h14fp"):
            mem.memzone_free(mem.memzone_lookup(name))
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_an_unbound_ring_handle_tells_damage_by_its_other_side(daemon) -> None:
    """Ring(window, offset), made without the directory: the consumers' line still
    carrying its tag after the producers' was overwritten is damage."""
    with daemon.attach() as mem:
        listed = mem.ring_create("h14ub", 64)
        r = Ring(mem.window, listed.offset)
        mem.view(r.offset, len(DAMAGE))[:] = DAMAGE
        for op in (lambda: r.enqueue(1), lambda: r.count, lambda: r.dequeue_burst(10)):
            with pytest.raises(CorruptionError, match="'h14ub' is corrupted"):
                op()
        mem.memzone_free(mem.memzone_lookup("RG_h14ub"))
        with pytest.raises(StaleHandle, match="was freed"):
            r.dequeue()
