"""Memory event callbacks (DPDK rte_mem_event_callback_register): every attached
process that registers one hears of every growth and release, whoever caused it,
ALLOC after the pages are mapped and FREE before they go."""

from __future__ import annotations

import json
import os
import signal

import pytest

import memd_client as mc
from memd.errors import MemdExistsError, MemdKeyError, MemdValueError
from memd.testing import Daemon, finish_secondary, result, run_secondary, start_secondary

WATCH = """
import threading, time
events = []
def on_event(event, offset, length):
    # FREE comes before the pages go: they must still be readable here
    readable = bytes(mem.view(offset, 1)) is not None
    events.append([event, offset, length, readable])
mem.mem_event_callback_register("watch", on_event)
# then:
deadline = time.monotonic() + 20
while {e[0] for e in events} != {mc.MEM_EVENT_ALLOC, mc.MEM_EVENT_FREE}:
    assert time.monotonic() < deadline, events
    time.sleep(0.01)
out(events)
"""


def _ranges(events: list[list[int]], kind: int) -> set[tuple[int, int]]:
    return {(e[1], e[2]) for e in events if e[0] == kind}


def _check(events: list[list[int]], offset: int, size: int) -> None:
    """The pages mapped for the block were announced, and the same went back."""
    added = _ranges(events, mc.MEM_EVENT_ALLOC)
    assert added and added == _ranges(events, mc.MEM_EVENT_FREE)
    # the block lies partly in the 8 MB preallocated: the pages added hold the rest
    assert sum(n for _, n in added) >= size - (8 << 20)
    for start, n in added:
        assert n % (2 << 20) == 0 and start < offset + size and offset < start + n


def test_every_process_hears_growth_and_release(daemon: Daemon) -> None:
    watcher = start_secondary(daemon, WATCH)
    grower = result(
        run_secondary(
            daemon,
            """
        own = []
        mem.mem_event_callback_register("own", lambda *e: own.append(list(e)))
        mem.mem_event_callback_register("broken", lambda *e: 1 / 0)  # logged, ignored
        b = mem.malloc(24 << 20)  # beyond -m 8: the primary maps pages for it
        b.buf[-1] = 1
        where = [b.offset, b.size]
        mem.free(b)  # its pages go back to the system
        mem.mem_event_callback_unregister("broken")
        out([where, own])
    """,
        )
    )
    (offset, size), own = grower
    _check(own, offset, size)
    assert [e[0] for e in own] == sorted(e[0] for e in own)  # ALLOC before FREE
    out = finish_secondary(watcher)
    events = json.loads(next(li[7:] for li in out.splitlines() if li.startswith("RESULT ")))
    _check(events, offset, size)
    assert all(readable for *_, readable in events)
    assert daemon.proc.poll() is None


def test_registration_errors(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        mem.mem_event_callback_register("a", print)
        with pytest.raises(MemdExistsError):
            mem.mem_event_callback_register("a", print)
        with pytest.raises(MemdValueError, match="callable"):
            mem.mem_event_callback_register("b", 42)  # type: ignore[arg-type]
        with pytest.raises(MemdValueError):
            mem.mem_event_callback_register("", print)
        mem.mem_event_callback_unregister("a")
        with pytest.raises(MemdKeyError):
            mem.mem_event_callback_unregister("a")
        assert (mc.MEM_EVENT_ALLOC, mc.MEM_EVENT_FREE) == (0, 1)  # rte_mem_event's values


GROW_AND_RELEASE = """
for _ in range(ROUNDS):
    b = mem.malloc(24 << 20)  # beyond -m 8: growth, then release at the free
    b.buf[-1] = 1
    mem.free(b)
"""

LATE = "did not run its memory event callbacks in time"


def test_a_stopped_listener_delays_one_change_only(daemon_factory) -> None:
    """A secondary with callbacks that is stopped delays the first change (up to
    --sync-timeout) and no later one: it is told, not waited for, until it answers
    again; resumed, it hears what it missed and is waited for again."""
    daemon = daemon_factory("-m", "8", "--sync-timeout", "1")
    listener = start_secondary(
        daemon,
        """
        events = []
        mem.mem_event_callback_register("watch", lambda e, o, n: events.append(e))
        # then:
        out(sorted(set(events)))
        """,
    )
    try:
        os.kill(listener.pid, signal.SIGSTOP)
        run_secondary(daemon, GROW_AND_RELEASE.replace("ROUNDS", "3"), timeout=120)
        assert daemon.log_text().count(LATE) == 1, daemon.log_text()  # not one per change
        os.kill(listener.pid, signal.SIGCONT)
        run_secondary(daemon, GROW_AND_RELEASE.replace("ROUNDS", "1"), timeout=120)
        out = finish_secondary(listener)
    finally:
        if listener.poll() is None:
            os.kill(listener.pid, signal.SIGCONT)
            listener.kill()
            listener.wait()
    assert json.loads(out.split("RESULT ", 1)[1]) == [mc.MEM_EVENT_ALLOC, mc.MEM_EVENT_FREE]
    assert daemon.log_text().count(LATE) == 1  # answered again: waited for, in time
    assert daemon.proc.poll() is None
