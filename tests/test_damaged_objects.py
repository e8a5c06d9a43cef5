"""A damaged ring or mempool header (any attached process can write it) is listed
on its own, as corrupt, by the name its memzone gives; the healthy ones are listed
as before; lookups raise CorruptionError naming it; freeing its memzone frees it.
Real daemons, both modes; memctl runs as a real process."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from typing import Any

import pytest

from memd import _ext
from memd.errors import CorruptionError, MemdValueError
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
