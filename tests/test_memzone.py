"""Memzones across real processes (DPDK rte_memzone_*)."""

from __future__ import annotations

import itertools
import random

import pytest

import memd_client as mc
from memd.testing import Daemon, result, run_secondary


def test_written_by_one_process_read_by_another(daemon: Daemon) -> None:
    run_secondary(
        daemon,
        """
        mz = mem.memzone_reserve("shared-zone", 1 << 20)
        mz.buf[:] = bytes(range(256)) * 4096
        out(mz.offset)
    """,
    )
    res = result(
        run_secondary(
            daemon,
            """
        mz = mem.memzone_lookup("shared-zone")
        out([mz.length, bytes(mz.buf[:4]).hex(), bytes(mz.buf[-2:]).hex(),
             sum(mz.buf[:256]), mz.offset])
    """,
        )
    )
    assert res[:4] == [1 << 20, "00010203", "feff", sum(range(256))]
    # every process may map the window at a different address; the offset is the same
    with daemon.attach() as mem:
        assert mem.memzone_lookup("shared-zone").offset == res[4]


def test_alignment_and_bound_hold_for_random_requests(daemon: Daemon) -> None:
    rng = random.Random(2)
    with daemon.attach() as mem:
        zones = []
        for i in range(200):
            length = rng.choice([1, 63, 64, 100, 4096, 5000, 65536, 300000])
            align = 1 << rng.randint(6, 16)
            fits = 1 << (length - 1).bit_length()  # the smallest power of two >= length
            bound = 0 if rng.random() < 0.5 else max(1 << rng.randint(6, 20), fits)
            if bound and align > bound:
                align = bound
            mz = mem.memzone_reserve(f"z{i}", length, align=align, bound=bound)
            assert mz.offset % align == 0, (mz, align)
            if bound:
                assert mz.offset // bound == (mz.offset + length - 1) // bound, (mz, bound)
            zones.append((mz.offset, mz.offset + length))
        zones.sort()
        for (_, a1), (b0, _) in itertools.pairwise(zones):
            assert a1 <= b0, "memzones overlap"
        assert len(mem.memzones()) == 200


def test_bad_requests_raise_and_daemon_keeps_serving(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        mem.memzone_reserve("taken", 100)
        with pytest.raises(FileExistsError):
            mem.memzone_reserve("taken", 100)
        with pytest.raises(ValueError, match="too long"):
            mem.memzone_reserve("x" * 32, 100)
        mem.memzone_reserve("y" * 31, 100)  # exactly the limit works
        with pytest.raises(ValueError, match="power of two"):
            mem.memzone_reserve("badalign", 100, align=96)
        with pytest.raises(ValueError, match="bound"):
            mem.memzone_reserve("badbound", 100, bound=64)
        with pytest.raises(ValueError, match="bound"):
            mem.memzone_reserve("badbound2", 100, bound=100)
        with pytest.raises(ValueError):
            mem.memzone_reserve("neg", -1)
        with pytest.raises(ValueError, match="socket_id"):
            mem.memzone_reserve("nosock", 100, socket_id=7)
        with pytest.raises(MemoryError):
            mem.memzone_reserve("huge", 1 << 45)  # 32 TiB
        with pytest.raises(KeyError):
            mem.memzone_lookup("absent")
        mz = mem.memzone_lookup("taken")
        mem.memzone_free(mz)
        with pytest.raises(KeyError):
            mem.memzone_free(mz)  # double free is an error, not a corruption
        mem.memzone_reserve("taken", 100)  # the name is free again
    # the daemon still serves a new process
    res = result(run_secondary(daemon, "out(mem.memzone_lookup('taken').length)"))
    assert res == 100
    assert daemon.proc.poll() is None


def test_memzone_from_expanded_heap_is_seen_by_others(daemon: Daemon) -> None:
    # 8 MB are preallocated: 20 MB forces the primary to map pages and sync everyone
    with daemon.attach() as watcher:
        run_secondary(
            daemon,
            """
            mz = mem.memzone_reserve("big", 20 << 20)
            mz.buf[-1] = 0x5A
        """,
        )
        mz = watcher.memzone_lookup("big")
        assert mz.buf[-1] == 0x5A
        assert mc.SOCKET_ID_ANY == -1
