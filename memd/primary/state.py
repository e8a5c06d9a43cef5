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
    """The primary's settings; the daemon fills them from its command line."""

    file_prefix: str = DEFAULT_PREFIX
    runtime_dir: str | None = None
    huge_dir: str | None = None
    memory_mb: int = 0  # -m: preallocated, never given back
    socket_mem: list[int] | None = None  # --socket-mem: MB per socket
    no_huge: bool = False
    legacy_mem: bool = False
    huge_unlink: str = "existing"  # --huge-unlink: one of HUGE_UNLINK_MODES
    single_file_segments: bool = False
    base_virtaddr: int = 0
    group: str | None = None
    sync_timeout: float = 2.0
    max_mem_mb: int = 0  # --max-mem: cap on mapped memory (0 = none)
    take_over: bool = False  # start although a dead primary's secondaries run
    reclaim_heap: bool = False  # free a dead secondary's heap blocks
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
