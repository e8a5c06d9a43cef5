"""memd_client: attach a secondary process to a running memd primary::

    import memd_client as mc
    with mc.attach(prefix="rte") as mem:
        mz = mem.memzone_reserve("frames", 1 << 20)

Everything the primary and other secondaries created is visible zero-copy;
offsets found in rings, blocks and memzones are valid here through `mem.view`.
Every exception memd raises is importable from here (all derive from MemdError),
and so is every class of object the calls hand out (for type hints and isinstance).
"""

from __future__ import annotations

from memd._version import __version__ as __version__
from memd.errors import (
    CorruptionError,
    HugepageConfigError,
    HugepageReserveError,
    MalformedFileError,
    MemdError,
    MemdExistsError,
    MemdKeyError,
    MemdMemoryError,
    MemdValueError,
    PermissionDenied,
    PoolEmpty,
    PrimaryNotRunning,
    ProtocolError,
    StaleHandle,
    StaleReference,
    VersionMismatch,
)
from memd.files import UnsafePath
from memd.shm.config import SOCKET_ID_ANY
from memd.shm.heap import Block, lock_wait
from memd.shm.memory import (
    MEM_EVENT_ALLOC,
    MEM_EVENT_FREE,
    MEMZONE_1GB,
    MEMZONE_2MB,
    MEMZONE_4GB,
    MEMZONE_16GB,
    MEMZONE_16MB,
    MEMZONE_256KB,
    MEMZONE_256MB,
    MEMZONE_512MB,
    MEMZONE_IOVA_CONTIG,
    MEMZONE_SIZE_HINT_ONLY,
    Memzone,
)
from memd.shm.mempool import Mempool, MempoolObject
from memd.shm.ring import RING_F_EXACT_SZ, RING_F_SC_DEQ, RING_F_SP_ENQ, Ring
from memd_client.secondary import Secondary, attach

__all__ = [
    "MEMZONE_1GB",
    "MEMZONE_2MB",
    "MEMZONE_4GB",
    "MEMZONE_16GB",
    "MEMZONE_16MB",
    "MEMZONE_256KB",
    "MEMZONE_256MB",
    "MEMZONE_512MB",
    "MEMZONE_IOVA_CONTIG",
    "MEMZONE_SIZE_HINT_ONLY",
    "MEM_EVENT_ALLOC",
    "MEM_EVENT_FREE",
    "RING_F_EXACT_SZ",
    "RING_F_SC_DEQ",
    "RING_F_SP_ENQ",
    "SOCKET_ID_ANY",
    "Block",
    "CorruptionError",
    "HugepageConfigError",
    "HugepageReserveError",
    "MalformedFileError",
    "MemdError",
    "MemdExistsError",
    "MemdKeyError",
    "MemdMemoryError",
    "MemdValueError",
    "Mempool",
    "MempoolObject",
    "Memzone",
    "PermissionDenied",
    "PoolEmpty",
    "PrimaryNotRunning",
    "ProtocolError",
    "Ring",
    "Secondary",
    "StaleHandle",
    "StaleReference",
    "UnsafePath",
    "VersionMismatch",
    "attach",
    "lock_wait",
]
