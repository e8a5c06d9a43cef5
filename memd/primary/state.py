"""The primary's settings (DPDK's EAL options) and the state its parts share: each
part of the primary (`mcfg`, `memalloc`, `reclaim`, `handlers`, and the primary half
of `memd.mp.malloc_mp`) is a mixin over `PrimaryState`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memd.errors import MemdError
from memd.mp.channel import Server
from memd.paths import DEFAULT_PREFIX
from memd.shm.memory import Memory

MiB = 1 << 20

# --huge-unlink values, DPDK's: existing (default) removes a dead primary's page files
# and makes pages afresh; always also unlinks each file right after mapping it; never
# keeps page files past their pages and the primary, and reuses them (not cleared).
HUGE_UNLINK_MODES = ("existing", "always", "never")


class InitError(MemdError, RuntimeError):
    """The primary cannot start; the message says how to fix it (exit code 1)."""


class AlreadyRunning(InitError):
    """Another primary owns this --file-prefix."""


@dataclass
class Options:
    """The primary's settings (DPDK's EAL memory options): ``memd``'s command line
    and ``--config`` file fill them; ``Primary(Options(...))`` embeds a primary.
    Sizes here are MB (2**20 bytes), as on the command line."""

    #: ``--file-prefix``: the instance's name
    file_prefix: str = DEFAULT_PREFIX
    #: ``--runtime-dir``: where the config and sockets go (None: the default)
    runtime_dir: str | None = None
    #: ``--huge-dir``: the hugetlbfs mount to use (None: one of the default page size)
    huge_dir: str | None = None
    #: ``-m``: MB preallocated at start, never given back (0: grow on demand)
    memory_mb: int = 0
    #: ``--socket-mem``: MB preallocated per NUMA socket, or None
    socket_mem: list[int] | None = None
    #: ``--no-huge``: POSIX shared memory (``/dev/shm``) instead of hugepages
    no_huge: bool = False
    #: ``--legacy-mem``: map all memory at start, sorted by physical address
    legacy_mem: bool = False
    #: ``--huge-unlink``: one of ``HUGE_UNLINK_MODES`` (existing, always, never)
    huge_unlink: str = "existing"
    #: ``--in-memory``: list files are memfds (no files at all; secondaries get fds)
    in_memory: bool = False
    #: ``--single-file-segments``: accepted for DPDK compatibility
    single_file_segments: bool = False
    #: ``--base-virtaddr``: where to reserve the window (0: anywhere; a multiple of 1 GiB)
    base_virtaddr: int = 0
    #: ``--group``: a group (name or gid) whose members may attach, or None
    group: str | None = None
    #: ``--sync-timeout``: seconds a heap growth waits for every secondary to map
    sync_timeout: float = 2.0
    #: ``--max-mem``: cap in MB on the memory heaps may grow to (0 = none)
    max_mem_mb: int = 0
    #: ``--take-over``: start although a dead primary's secondaries still run
    take_over: bool = False
    #: ``--reclaim-heap``: free the heap blocks of a secondary that dies
    reclaim_heap: bool = False
    #: the command line, as telemetry ``/eal/params`` shows it
    argv: list[str] = field(default_factory=list)


class PrimaryState(Memory):
    """What every part of the primary reads; `Primary.__init__` sets it all."""

    is_primary = True
    options: Options
    server: Server | None
    config_file: Path
    iova_mode: int
    _cfg_fd: int
    _gid: int | None
    _mode: int
    _dir_mode: int
    _prefix_locks: dict[str, int]  # page directory -> its prefix lock fd
    _list_fds: dict[int, int]  # memseg list -> its file (single-file lists)
    _expand_lock: threading.RLock
    reclaims: deque[dict[str, Any]]  # dead secondaries, newest last
    # mempool offset -> the dead pid whose objects in flight are still to recover
    # (the pool was busy at its reclaim); retried every second
    recoveries_due: dict[int, int]
    # pins of secondaries that detached with views still alive: (pid, start time)
    # -> window offset ranges; kept until the process exits
    detached_pins: dict[tuple[int, int], list[tuple[int, int]]]
    # heap -> the pins a release found keeping free pages; retried when they change
    release_deferred: dict[int, list[tuple[int, int]]]
    pin_rows_odd_since: dict[int, float]  # pin row -> when first seen mid-write
    pin_rows_logged: set[int]  # stuck pin rows already logged
