"""memd: a hugepage memory manager for Python (DPDK memory subsystem as a daemon).

``memd.Primary`` and ``memd.Options`` embed the primary; ``memd_client.attach``
attaches a secondary.  Both raise the errors exported here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from memd.primary import InitError, Options, Primary  # noqa: TID251 (names only)

__all__ = [
    "CorruptionError",
    "HugepageConfigError",
    "HugepageReserveError",
    "InitError",
    "MalformedFileError",
    "MemdError",
    "MemdExistsError",
    "MemdKeyError",
    "MemdMemoryError",
    "MemdValueError",
    "Options",
    "PermissionDenied",
    "PoolEmpty",
    "Primary",
    "PrimaryNotRunning",
    "ProtocolError",
    "StaleHandle",
    "StaleReference",
    "VersionMismatch",
]

_PRIMARY = ("Primary", "Options", "InitError")


def __getattr__(name: str) -> Any:
    # The primary loads on first use: a secondary imports memd (for memd._ext) and
    # must not pull in the daemon with it.
    if name in _PRIMARY:
        from memd import primary  # noqa: TID251 (on first use, by the daemon's users)

        return getattr(primary, name)
    raise AttributeError(f"module 'memd' has no attribute {name!r}")
