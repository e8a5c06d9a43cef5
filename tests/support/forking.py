"""Forked children for tests of shared memory in one window (no daemon): run a
function in a child, wait for it with a bound, kill it if it hangs."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable

import pytest


def fork_run(fn: Callable[[], object], before: Callable[[], object] | None = None) -> int:
    """Run fn in a forked child (after `before`, e.g. arming a crash knob); the
    child exits 0 iff fn returned.  Returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if before is not None:
                before()
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, limit: float = 120.0) -> int:
    """Exit code of child pid; kill it and fail if it outlives `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} hung")
    return -1
