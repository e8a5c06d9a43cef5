"""A secondary stopped inside a mempool put, holding its free ring's producer lock."""

from __future__ import annotations

import subprocess

from memd.testing import Daemon, start_secondary, wait_stopped


def stop_in_put(
    d: Daemon, stopped: list[subprocess.Popen[str]], n: int, flush: bool = False
) -> subprocess.Popen[str]:
    """A secondary that gets `n` objects of pool "p", then stops (SIGSTOP, a test
    hook) inside its put_bulk of them, in the free ring's enqueue, holding the
    producer lock with the objects marked FREE; SIGCONT lets it finish (and flush
    its cache) and exit 0."""
    victim = start_secondary(
        d,
        f"""
        from memd import _ext
        p = mem.mempool_lookup("p")
        xs = p.get_bulk({n})
        # then:
        _ext._ring_stop_after(0)
        p.put_bulk(xs)
        {"p.flush_cache()" if flush else ""}
        """,
    )
    stopped.append(victim)
    assert victim.stdin is not None
    victim.stdin.write("go\n")
    victim.stdin.flush()
    wait_stopped(victim)
    return victim
