"""asyncio waits on rings and mempools, with no thread per waiter.

A coroutine that must wait first sleeps on the ring's futex in its own thread for
at most ``DIRECT_WAIT`` (50 µs), the event loop blocked, when the loop has nothing
else ready: a peer that answers by then wakes it directly, as it wakes a blocking
call, instead of through the three thread hand-offs below (asyncio on both sides of
a ping-pong: 27.5 µs a round trip on the 2-core test VM, from about 100 µs;
docs/performance.md).  Then it announces itself on the ring's futex (the same
``not_empty``/``not_full`` futex and batch-aware ``want`` the blocking calls use,
so the other side wakes it exactly as it wakes a blocked call), retries once, and
awaits a future.  One daemon thread per process sleeps in ``futex_waitv`` on every
announced futex at once (``_ext.ring_wait_many``) and resolves the futures whose
futex moved, through each future's event loop.  The coroutine then retries its
operation on its own thread.

Waits on the same futex with the same expected value share one ``futex_waitv``
entry, so any number of coroutines awaiting up to 127 distinct ring sides sleep
without polling.  Past 127 distinct ones in one process (``FUTEX_WAITV_MAX`` less
the kick futex), or on a kernel without ``futex_waitv`` (< 5.16), the thread polls
every millisecond: about a quarter of a core with 1000 idle rings awaited.

Every ring operation runs in the coroutine, never in the waiter thread: a
cancelled (or timed out) wait has moved nothing, so cancellation leaves the ring
unchanged.  Waits are sliced (100 ms, as the blocking calls): each slice re-checks
the ring and whether the watched primary died (``PrimaryNotRunning``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from memd import _ext
from memd.shm.config import block_fault_signals

__all__ = ["wait_for_op"]

log = logging.getLogger("memd")
T = TypeVar("T")
SLICE = 0.1  # seconds: a wait re-checks at least this often
#: seconds a wait sleeps on the futex in the coroutine's thread, the loop blocked
#: (no CPU used), before it is handed to the waiter thread; 0 hands it over at once
DIRECT_WAIT = 50e-6


def _loop_idle(loop: asyncio.AbstractEventLoop) -> bool:
    """Nothing else is ready to run on `loop` (CPython's loops keep their ready
    callbacks in ``_ready``; a loop without it, uvloop's, never waits directly)."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waiter:
    """The process's one waiter thread and the waits it watches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[_ext.Ring[Any], bool, int, asyncio.Future[None]]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, ring: _ext.Ring[Any], enq: bool, seq: int, fut: asyncio.Future[None]) -> int:
        with self._lock:
            token = next(self._ids)
            self._waits[token] = (ring, enq, seq, fut)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="memd-aio-waiter", daemon=True
                )
                self._thread.start()
        _ext.ring_wait_kick()
        return token

    def remove(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    def _run(self) -> None:
        block_fault_signals()  # sent SIGSEGV/SIGBUS are the application's
        while True:
            kick = _ext.ring_wait_kick_seq()  # before the snapshot: a later add kicks
            with self._lock:
                items = list(self._waits.items())
            # With nothing to watch, sleep on the kick alone (no CPU while idle).
            try:
                moved = _ext.ring_wait_many(
                    [(ring, enq, seq) for _, (ring, enq, seq, _) in items],
                    kick,
                    SLICE if items else 3600.0,
                )
            except Exception:  # never dies: the waits' own 100 ms checks go on meanwhile
                log.exception("memd asyncio waiter")
                time.sleep(SLICE)
                continue
            for i in moved:
                token, (_ring, _enq, _seq, fut) = items[i]
                with self._lock:
                    if self._waits.pop(token, None) is None:
                        continue  # the coroutine gave up meanwhile
                with contextlib.suppress(RuntimeError):  # its loop was closed
                    fut.get_loop().call_soon_threadsafe(_wake, fut)


_waiter = _Waiter()


def _after_fork() -> None:
    global _waiter
    _waiter = _Waiter()  # the thread did not come along


os.register_at_fork(after_in_child=_after_fork)


async def wait_for_op(
    ring: _ext.Ring[Any],
    attempt: Callable[[], T],
    ok: Callable[[T], bool],
    enq: bool,
    want: int,
    timeout: float | None,
    blocking: Callable[[float], T] | None = None,
) -> T:
    """Run ``attempt()`` (a non-blocking ring call) until ``ok(result)``, waiting for
    room (`enq`) or entries on `ring` between tries, at most `timeout` seconds (None:
    no limit; 0: one try).  `want`: the fewest entries (slots) the call can use.
    `blocking(seconds)`: the same call waiting up to that long, for the direct wait
    (None: none).  Returns the last result: not ok when the time ran out.  A bad
    `timeout` raises what the blocking calls raise (TypeError, MemdValueError),
    before anything moves."""
    timeout = _ext.check_timeout(timeout)
    result = attempt()
    if ok(result) or timeout == 0 or want <= 0:  # nothing asked for: done at once
        return result
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    if blocking is not None and DIRECT_WAIT > 0 and _loop_idle(loop):
        # No await between the call and the return: a cancel cannot lose its entry.
        result = blocking(DIRECT_WAIT if timeout is None else min(DIRECT_WAIT, timeout))
        if ok(result):
            return result
    while True:
        seq = ring._wait_prepare(enq, want)
        token = None
        try:
            result = attempt()  # closes the window between our try and the announcement
            if ok(result):
                return result
            wait = SLICE
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return result
            fut: asyncio.Future[None] = loop.create_future()
            token = _waiter.add(ring, enq, seq, fut)
            timer = loop.call_later(wait, _wake, fut)
            try:
                await fut
            finally:
                timer.cancel()
        finally:
            if token is not None:
                _waiter.remove(token)
            ring._wait_done(enq)
        result = attempt()
        if ok(result):
            return result
