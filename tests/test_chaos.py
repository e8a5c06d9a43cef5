"""Crash safety under SIGKILL (issue 6), with real processes in both modes.

bench/chaos.py does the work: secondaries killed at random moments inside tight
heap, ring and mempool loops while another secondary keeps going, then the
primary killed under secondaries blocked in dequeue(timeout=None) and in a heap
expansion.  MEMD_CHAOS_ROUNDS overrides the round count (default 50)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos

ROUNDS = int(os.environ.get("MEMD_CHAOS_ROUNDS", "50"))


@pytest.mark.chaos
def test_kill9_rounds_lose_nothing_and_wedge_nothing(daemon_factory, mode) -> None:
    daemon = daemon_factory("-m", "16", "--sync-timeout", "60")
    st = chaos.run(daemon, ROUNDS, seed=7)
    print(chaos.table(st, mode))
    assert st["rounds"] == st["kills"] == ROUNDS
    assert st["deadlocks"] == 0
    assert st["heap_check_failures"] == 0, st["survivor_stderr"]
    assert st["objects_lost"] == 0
    assert st["blocks_lost"] == 0
    assert st["survivor_errors"] == 0, st["survivor_stderr"]
    # every victim held something when it died, and it was reported and reclaimed
    assert st["dead_blocks_freed"] > 0
    assert st["dead_hand_objects"] > 0
    # ... and never more than a victim can hold: a ring burst (8), a mempool
    # bulk (4) and a cache refill (2 x cache size 32); more would be a real loss
    assert st["max_dead_hand_objects"] <= 8 + 4 + 2 * 32
    # both blocked secondaries learned that the primary died (the table shows how fast)
    assert all(isinstance(v, float) for v in st["primary_kill_ms"].values()), st["primary_kill_ms"]
