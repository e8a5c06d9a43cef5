"""Rings: fixed-size lock-free FIFOs of unsigned 64-bit entries in shared memory.

DPDK's ``rte_ring``.  The C type :class:`memd._ext.Ring` does the work; this module
adds construction, names and the :class:`RingMixin` that ``Memory`` inherits.

Entries are integers in ``0 .. 2**64-1``: usually handles (window offsets of
mempool objects or heap blocks), which mean the same thing in every process.
Every enqueue/dequeue call takes ``timeout``: 0 (the default) does not wait, a
number of seconds waits up to that long, ``None`` waits until it can.  A waiting
call sleeps on a futex in the ring with the GIL released (a program may opt in to
a few microseconds of retrying first, about what a sleep and a wake cost: see
:func:`set_wait_spin`),
waking at least every 100 ms so that Ctrl-C still works.  The other side makes
the wake-up system call only when somebody sleeps.

Crash safety: a multi-producer (-consumer) side is serialised by a small lock that
names its owner process; a process that waits behind an owner that was killed takes
the lock over within milliseconds (``wait_stats["producer_recoveries"]`` /
``["consumer_recoveries"]`` count it).  Every operation starts from its side's tail,
so a producer killed mid-call loses only the entries it was enqueuing, and the
entries a killed consumer was dequeuing stay in the ring.  If the window watches the
primary (``Window.watch(pidfd)``, done by ``memd_client.attach``), a waiting call
raises :class:`memd.errors.PrimaryNotRunning` within 100 ms of the primary's death.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memd import _ext
from memd.errors import MemdValueError
from memd.shm import objects
from memd.shm.config import SOCKET_ID_ANY

RING_F_SP_ENQ: int = _ext.RING_F_SP_ENQ  # default enqueue is single-producer
RING_F_SC_DEQ: int = _ext.RING_F_SC_DEQ  # default dequeue is single-consumer
RING_F_EXACT_SZ: int = _ext.RING_F_EXACT_SZ  # capacity is exactly `count`
MEMD_OBJ_RING: int = _ext.OBJ_RING  # enum memd_object_type
RING_MZ_PREFIX = "RG_"  # memzone holding ring <name> is "RG_<name>", as in DPDK
RING_NAMESIZE = _ext.NAMESIZE - 1 - len(RING_MZ_PREFIX)  # the memzone name fits

#: a writable or readable buffer of unsigned 64-bit ints: array('Q'), numpy uint64, ...
Buffer = Any
#: what enqueue_bulk/enqueue_burst take: ints, or a uint64 buffer
Values = Sequence[int] | Buffer

__all__ = [
    "RING_F_EXACT_SZ",
    "RING_F_SC_DEQ",
    "RING_F_SP_ENQ",
    "Ring",
    "RingMixin",
    "ring_memsize",
    "set_wait_spin",
]


def ring_memsize(count: int, flags: int = 0) -> int:
    """Bytes of shared memory a ring of `count` entries needs (ValueError if bad)."""
    return _ext.ring_memsize(count, flags)


def set_wait_spin(seconds: float) -> float:
    """How long a waiting call retries before it sleeps, for this process (and
    children forked later); 0 sleeps at once.  Returns the previous value."""
    return _ext.ring_wait_spin(seconds)


class Ring(_ext.Ring):
    """A ring in a shared window, addressed by its window offset.

    ``Ring(window, offset)`` attaches to a ring that :meth:`create` (or
    ``_ext.ring_init``) initialised there; any process that maps the window can.

    Methods (all in C, METH_FASTCALL; ``values`` is a list/tuple/sequence of ints
    or a buffer of uint64 such as ``array('Q')`` or a NumPy ``uint64`` array):

    - ``enqueue(value, timeout=0) -> bool``; ``dequeue(timeout=0) -> int | None``
    - ``enqueue_bulk(values, timeout=0) -> int``: ``len(values)`` or 0
    - ``enqueue_burst(values, timeout=0) -> int``: how many fitted
    - ``dequeue_bulk(n, timeout=0) -> list[int]``: n entries or ``[]``
    - ``dequeue_burst(n, timeout=0) -> list[int]``: up to n entries
    - ``dequeue_bulk_into(buffer, timeout=0) -> int`` / ``dequeue_burst_into``:
      fill a writable uint64 buffer without allocating; return the count
    - ``full()``, ``empty()``; properties ``count``, ``free_count``, ``capacity``,
      ``size``, ``flags``, ``name``, ``offset``, ``memsize``, ``window``,
      ``wait_stats`` (futex sleeps/wakes, ``*_recoveries``: locks taken over from a
      dead process, ``*_lock_sleeps``, ``*_lock_owner``: pid holding a side's lock)

    A bulk larger than the capacity never fits: it returns 0 / ``[]`` at once,
    or raises ValueError if asked to wait.  A burst waits for at least one entry
    (or one free slot).

    ``timeout`` is in seconds: 0 (the default) never waits, a positive number waits
    up to that long, None waits until the call can complete.  A call that could not
    complete in time returns False / None / 0 / ``[]``; it never raises for that.

    Raises:
        ValueError: a negative timeout; a bulk larger than the capacity with a
            timeout; ``n < 0``.
        OverflowError: an entry outside ``0 .. 2**64-1``.
        TypeError: an entry that is not an integer, or a buffer whose items are not
            unsigned 64-bit.
        MemdValueError: the attachment the ring came from was detached.
        PrimaryNotRunning: while waiting, the primary died (within 100 ms).
        KeyboardInterrupt: (or any exception a signal handler raises) while waiting:
            the ring is unchanged.
    """

    __slots__ = ()

    # the C methods' signatures are in memd/_ext.pyi

    @classmethod
    def create(
        cls, window: _ext.Window, offset: int, count: int, flags: int = 0, name: str = ""
    ) -> Ring:
        """Initialise an empty ring at `offset` (64-byte aligned) and attach to it.

        `count` is a power of two (capacity ``count - 1``) or, with
        ``RING_F_EXACT_SZ``, any count >= 1 (capacity ``count``).
        """
        _ext.ring_init(window, offset, count, flags, name)
        return cls(window, offset)

    def __repr__(self) -> str:
        return (
            f"<Ring {self.name!r} offset={self.offset:#x} count={self.count}"
            f"/{self.capacity} flags={self.flags:#x}>"
        )

    def __len__(self) -> int:
        return self.count

    def info(self) -> dict[str, Any]:
        """Fields for telemetry ``/ring/info`` and ``memctl rings``."""
        return {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "capacity": self.capacity,
            "count": self.count,
            "free_count": self.free_count,
            "flags": self.flags,
            "memsize": self.memsize,
            **self.wait_stats,
        }


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > RING_NAMESIZE or "\0" in name:
        raise MemdValueError(f"ring name {name!r}: 1 to {RING_NAMESIZE} bytes, no NUL")


class RingMixin:
    """Named rings (``ring_create``/``ring_lookup``/``ring_free``) for ``Memory``.

    The ring lives in memzone ``RG_<name>``; its name, offset and memzone are in
    the shared object directory so that any process finds it by name.
    """

    if TYPE_CHECKING:  # provided by Memory, as are the memzone_* that memd.shm.objects calls
        window: _ext.Window
        proc_slot: int

    def ring_create(
        self, name: str, count: int, socket_id: int = SOCKET_ID_ANY, flags: int = 0
    ) -> Ring:
        """Create ring `name` of `count` entries (see :meth:`Ring.create`).

        Raises FileExistsError (MemdExistsError) if the name is taken, ValueError
        for a bad count/flags/name, MemoryError when no memory is left.
        """
        _check_name(name)
        size = ring_memsize(count, flags)
        return objects.create(
            self,
            name,
            MEMD_OBJ_RING,
            RING_MZ_PREFIX,
            size,
            socket_id,
            lambda off: Ring.create(self.window, off, count, flags, name),
            "ring_create",
        )

    def ring_lookup(self, name: str) -> Ring:
        """The ring called `name`; KeyError (MemdKeyError) if there is none."""
        return objects.open_listed(
            self.window, name, MEMD_OBJ_RING, lambda off: Ring(self.window, off), "ring_lookup"
        )

    def ring_free(self, ring: Ring) -> None:
        """Remove the ring from the directory and free its memzone.

        Processes still holding the Ring object must not use it afterwards.
        """
        objects.remove(self, ring.name, MEMD_OBJ_RING, RING_MZ_PREFIX, ring.offset, "ring_free")
