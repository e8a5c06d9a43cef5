"""memd's exceptions: one base class, each also the built-in a caller would expect.

C code returns ``-errno``; the extension raises ``OSError(errno, "... (from fn)")``;
:func:`translate` turns that into the domain exception here, chained with ``from``.
"""

from __future__ import annotations

import errno as _errno


class MemdError(Exception):
    """Base class of every memd error."""


class PrimaryNotRunning(MemdError, ConnectionError):
    """No live primary for this prefix: start memd, or check --file-prefix/--runtime-dir."""


class VersionMismatch(MemdError, RuntimeError):
    """The primary's shared layout differs from this library's: use matching versions."""


class PermissionDenied(MemdError, PermissionError):
    """The config or a socket belongs to another user or group."""


class CorruptionError(MemdError, ValueError):
    """A block's cookie or a structure's invariant is broken."""


class PoolEmpty(MemdError, LookupError):
    """A mempool has no free object (or not enough for an all-or-nothing bulk get)."""


class ProtocolError(MemdError, ValueError):
    """A malformed, oversized or unknown message on one of memd's sockets."""


class MemdMemoryError(MemdError, MemoryError):
    """Memory exhausted: free something, reserve more hugepages, or raise -m."""


class MemdKeyError(MemdError, KeyError):
    """No object of that name."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


class StaleHandle(MemdKeyError, ReferenceError):
    """A Ring, Mempool or MempoolObject used after its ring or pool was freed, by
    this process or another (and perhaps made again under the same name, at the
    same offset), or a Block used after its block was freed or resized through
    another handle (perhaps allocated again at the same offset): nothing was
    touched.  Look the object up again.  A KeyError, as for any name that is no
    longer there."""


class StaleReference(StaleHandle):
    """A pickled reference names an object that is gone: freed (and perhaps made
    again under the same name or at the same offset), or its memd instance was
    restarted."""


class MemdExistsError(MemdError, FileExistsError):
    """The name is already taken."""


class MemdValueError(MemdError, ValueError):
    """A bad argument."""


class HugepageConfigError(MemdError, RuntimeError):
    """Hugepages are not set up as memd needs (no mount, no free pages, bad --huge-dir).

    The message names what is wrong and the command that fixes it. ``path`` is the
    file or directory concerned, when there is one.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class MalformedFileError(HugepageConfigError, ValueError):
    """A /sys or /proc file memd reads holds something it cannot parse (``path`` names it)."""


class HugepageReserveError(HugepageConfigError):
    """The kernel reserved fewer hugepages than asked (``requested``, ``got``)."""

    def __init__(
        self, message: str, path: str | None = None, *, requested: int = 0, got: int = 0
    ) -> None:
        super().__init__(message, path)
        self.requested = requested
        self.got = got


def translate(exc: OSError, what: str) -> MemdError:
    """Map an OSError from the extension to memd's exception for `what` was being done."""
    code = exc.errno
    if code == _errno.ENOMEM:
        return MemdMemoryError(
            f"{what}: out of memory. Free something, reserve more "
            "hugepages (memctl hugepages --reserve), or raise -m"
        )
    if code == _errno.EEXIST:
        return MemdExistsError(f"{what}: the name is already in use; pick another or free it")
    if code == _errno.ENOENT:
        return MemdKeyError(f"{what}: no such object")
    if code == _errno.ENOSPC:
        return MemdMemoryError(f"{what}: the table is full; free unused objects first")
    if code == _errno.EFAULT:
        return CorruptionError(f"{what}: corrupted (a cookie or invariant is broken)")
    if code in (_errno.EACCES, _errno.EPERM):
        return PermissionDenied(f"{what}: permission denied; run as the daemon's user or group")
    if code == _errno.EINVAL:
        return MemdValueError(f"{what}: invalid argument")
    if code == _errno.ETIMEDOUT:
        return MemdError(
            f"{what}: busy: another process holds the lock and does not let go (stopped in "
            "a debugger, or paused?); try again later"
        )
    return MemdError(f"{what}: {exc.strerror or exc}")
