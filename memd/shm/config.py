"""Typed views of the mem_config.  The extension reads shared memory and returns
tuples; this module names their fields.  Sizes and constants come from the
extension (``memd._ext``), never from a copy."""

from __future__ import annotations

import os
import select
import signal
from typing import NamedTuple

from memd import _ext
from memd.hw.hugepage_info import proc_path

SOCKET_ID_ANY: int = _ext.SOCKET_ID_ANY  # DPDK's: any heap, the local socket's first


class Header(NamedTuple):
    magic: int
    layout_version: int
    state: int
    primary_pid: int
    flags: int
    primary_start_time: int
    window_size: int
    window_align: int
    iova_mode: int
    n_memseg_lists: int
    mem_generation: int
    primary_base: int
    prefix: str


class MemsegList(NamedTuple):
    index: int  # type: ignore[assignment]  # a field named like tuple.index, on purpose
    base_offset: int
    page_size: int
    socket_id: int
    capacity: int
    n_used: int
    version: int
    dir: str
    used_bitmap: bytes

    def used_slots(self) -> list[int]:
        """Slots whose bit is set, lowest first."""
        bits = int.from_bytes(self.used_bitmap, "little")
        slots = []
        while bits:
            low = bits & -bits
            slots.append(low.bit_length() - 1)
            bits ^= low
        return slots


class ProcessSlot(NamedTuple):
    slot: int
    pid: int
    state: int
    start_time: int
    attach_ns: int
    mem_generation: int
    comm: str


def header(win: _ext.Window) -> Header:
    return Header(*_ext.header(win))


def memseg_lists(win: _ext.Window) -> list[MemsegList]:
    n = _ext.header(win)[9]
    lists = []
    for i in range(n):
        t = _ext.msl(win, i)
        if t[1]:  # page_size 0 = unused entry
            lists.append(MemsegList(i, *t))
    return lists


def processes(win: _ext.Window) -> list[ProcessSlot]:
    return [ProcessSlot(*t) for t in _ext.procs(win)]


def proc_start_time(pid: int) -> int | None:
    """Start time of live process `pid` (/proc/<pid>/stat field 22, clock ticks),
    None if it is gone or a zombie.  A pid plus its start time names a process
    even after pid reuse."""
    return _ext.proc_start_time(pid)


def block_fault_signals() -> set[int | signal.Signals]:
    """Block SIGSEGV and SIGBUS in the calling thread, one of memd's own (they only
    wait, and touch no memory that can fault): a sent one (kill, sigqueue) then
    goes to the application's threads and handlers, as it would without memd.
    Returns the mask before (for ``signal.pthread_sigmask(SIG_SETMASK, ...)``)."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSEGV, signal.SIGBUS})


def process_alive(pid: int, start_time: int = 0) -> bool:
    """True if `pid` is the same live process that had `start_time` (0: any).
    The one liveness rule (ext/proc.h), shared with the C structures."""
    return _ext.process_alive(pid, start_time)


def watch_process(pid: int, start_time: int) -> int | None:
    """A pidfd for the live process `pid` that had `start_time` (the caller
    closes it), or None if that process is gone.  A pidfd turns readable the
    moment the process exits, so a poll loop learns of a death at once."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, ValueError):
        return None
    except OSError:  # no pidfd (kernel < 5.3): callers fall back to polling /proc
        return None if not process_alive(pid, start_time) else -1
    if not process_alive(pid, start_time):  # checked after opening: no pid reuse race
        os.close(fd)
        return None
    return fd


def exited(pidfd: int) -> bool:
    """True once the process behind `pidfd` (from watch_process) has exited."""
    poller = select.poll()  # not select(): an fd above 1023 is fine
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def comm() -> str:
    try:
        with open(proc_path("self", "comm")) as f:
            return f.read().strip()[:31]
    except OSError:
        return str(os.getpid())
