"""Rings: fixed-size lock-free FIFOs of unsigned 64-bit entries, or of fixed-size
records, in shared memory.

DPDK's ``rte_ring`` (and ``rte_ring_create_elem``).  The C type
:class:`memd._ext.Ring` does the work; this module adds construction, names and the
:class:`RingMixin` that ``Memory`` inherits.

A ring's entries are ``esize`` bytes each (a multiple of 4, fixed at creation).
The default, ``esize=8``, is the ring of integers in ``0 .. 2**64-1``
(``Ring[int]``): usually handles (window offsets of mempool objects or heap
blocks), which mean the same thing in every process.  Any other ``esize`` makes a
ring of records (``Ring[bytes]``): each entry is ``esize`` bytes copied in and out,
given as a bytes-like (``bytes``, ``bytearray``, ``memoryview``, one element of a
NumPy structured array) and returned as ``bytes``.  Its bulk and burst calls take a
buffer holding whole records back to back (a NumPy structured array whose
``itemsize`` is ``esize``: read in place, no copy) or a sequence of bytes-likes;
``dequeue_bulk``/``dequeue_burst`` return a list of ``bytes``, and
``dequeue_bulk_into``/``dequeue_burst_into`` fill a writable buffer of whole
records (a structured array's memory) with no copy but the ring's own.  For
8-byte records as raw bytes, view them as ``uint64`` (``arr.view(np.uint64)``).

Every enqueue/dequeue call takes ``timeout``: 0 (the default) does not wait, a
number of seconds waits up to that long, ``None`` waits until it can.  A waiting
call sleeps on a futex in the ring with the GIL released (a program may opt in to
a few microseconds of retrying first, about what a sleep and a wake cost: see
:func:`set_wait_spin`),
waking at least every 100 ms so that Ctrl-C still works.  The other side makes
the wake-up system call only when somebody sleeps and its move leaves at least
what a sleeper can use (a bulk of n waits for n: smaller moves do not wake it).
The ``*_async`` twins wait the same way from asyncio (:mod:`memd.shm.aio`).

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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from memd import _ext
from memd.errors import CorruptionError, MemdValueError, StaleHandle
from memd.shm import aio, objects
from memd.shm.config import SOCKET_ID_ANY
from memd.shm.heap import space_needed

RING_F_SP_ENQ: int = _ext.RING_F_SP_ENQ  # default enqueue is single-producer
RING_F_SC_DEQ: int = _ext.RING_F_SC_DEQ  # default dequeue is single-consumer
RING_F_EXACT_SZ: int = _ext.RING_F_EXACT_SZ  # capacity is exactly `count`
RING_SZ_MASK: int = _ext.RING_SZ_MASK  # DPDK RTE_RING_SZ_MASK: at most 2**30 slots
RING_ESIZE_U64: int = _ext.RING_ESIZE_U64  # the default esize: entries are ints
MEMD_OBJ_RING: int = _ext.OBJ_RING  # enum memd_object_type
RING_MZ_PREFIX = "RG_"  # memzone holding ring <name> is "RG_<name>", as in DPDK
RING_NAMESIZE = _ext.NAMESIZE - 1 - len(RING_MZ_PREFIX)  # the memzone name fits

#: a writable or readable buffer of unsigned 64-bit ints: array('Q'), numpy uint64, ...
Buffer = Any
#: what enqueue_bulk/enqueue_burst take: ints, or a uint64 buffer
Values = Sequence[int] | Buffer
#: what a ring's entries are: int (esize 8) or bytes (records)
E = TypeVar("E", int, bytes)
R = TypeVar("R")  # what an awaited bulk or burst call returns

__all__ = [
    "RING_F_EXACT_SZ",
    "RING_F_SC_DEQ",
    "RING_F_SP_ENQ",
    "RING_SZ_MASK",
    "Ring",
    "RingMixin",
    "ring_memsize",
    "set_wait_spin",
]


def ring_memsize(count: int, flags: int = 0, esize: int = RING_ESIZE_U64) -> int:
    """Bytes of shared memory a ring of `count` entries of `esize` bytes needs (DPDK
    ``rte_ring_get_memsize_elem``): the 512-byte header plus ``esize`` bytes per slot.

    Raises MemdValueError for a bad count (see :meth:`Ring.create`; more than
    ``RING_SZ_MASK`` slots), an `esize` that is 0 or not a multiple of 4, or
    unknown flags."""
    return _ext.ring_memsize(count, flags, esize)


def set_wait_spin(seconds: float) -> float:
    """How long a waiting call retries before it sleeps, for this process (and
    children forked later); 0 (the default) sleeps at once.  Returns the previous
    value.

    A spin pays only when the peer runs on another CPU meanwhile (both sides
    pinned to their own cores, as DPDK's lcores are): 0.7 µs a blocking round trip
    with ``set_wait_spin(5e-6)`` against 43 µs without, on the 2-core test VM.
    Unpinned, Linux tends to wake the peer on the waiter's own CPU, where the spin
    only delays it: 15 µs against 3.3 µs without (docs/performance.md)."""
    return _ext.ring_wait_spin(seconds)


class Ring(_ext.Ring[E]):
    """A ring in a shared window, addressed by its window offset.

    ``Ring(window, offset)`` attaches to a ring that :meth:`create` (or
    ``_ext.ring_init``) initialised there; any process that maps the window can.
    Its ``esize`` is read from the ring (checked: a multiple of 4, the slots within
    the memory it claims) and kept.

    Methods of an 8-byte ring, ``Ring[int]`` (all in C, METH_FASTCALL; ``values``
    is a list/tuple/sequence of ints or a buffer of uint64 such as ``array('Q')``
    or a NumPy ``uint64`` array):

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

    A ring of records, ``Ring[bytes]`` (any other ``esize``), has the same methods
    with ``bytes`` entries:

    - ``enqueue(record, timeout=0) -> bool``: a bytes-like of exactly ``esize``
      bytes (MemdValueError otherwise); ``dequeue(timeout=0) -> bytes | None``
    - ``enqueue_bulk(values, timeout=0)`` / ``enqueue_burst``: ``values`` is a
      C-contiguous buffer of any format holding whole records back to back (its
      length a multiple of ``esize``, else MemdValueError; a NumPy structured array
      with ``itemsize == esize`` is read in place), or a sequence of bytes-likes of
      ``esize`` bytes each (MemdValueError naming the first that is not; TypeError
      for anything else); returns how many records went in
    - ``dequeue_bulk(n, timeout=0) -> list[bytes]`` / ``dequeue_burst``
    - ``dequeue_bulk_into(buffer, timeout=0) -> int`` / ``dequeue_burst_into``: a
      writable C-contiguous buffer of any format whose length is a multiple of
      ``esize`` (MemdValueError otherwise); fills its head with records, returns
      how many

    Each of these enqueue/dequeue calls has an awaitable twin for asyncio,
    ``await ring.dequeue_async(timeout=None)``, ``enqueue_async(value)``,
    ``enqueue_bulk_async`` ... ``dequeue_burst_into_async`` (below): it waits
    without blocking the event loop and without a thread per waiter, and a
    cancelled one has moved nothing.  Their ``timeout`` defaults to None.

    A bulk larger than the capacity never fits: it returns 0 / ``[]`` at once,
    or raises ValueError if asked to wait.  A burst waits for at least one entry
    (or one free slot).

    ``timeout`` is in seconds: 0 (the default) never waits, a positive number waits
    up to that long, None waits until the call can complete.  A call that could not
    complete in time returns False / None / 0 / ``[]``; it never raises for that.

    Raises:
        ValueError: a bulk larger than the capacity with a timeout; ``n < 0``.
        OverflowError: an entry outside ``0 .. 2**64-1``.
        TypeError: an entry that is not an integer, or a buffer whose items are not
            unsigned 64-bit; a timeout that is not a number or None.
        MemdValueError: a negative (or NaN) timeout; the attachment the ring came
            from was detached.  The ``*_async`` twins check ``timeout`` first, and
            raise the same for it, before anything moves.
        StaleHandle: the ring was freed, by this process or another (even if a ring
            was made again under its name, at its offset): every call but the local
            properties (``capacity``, ``size``, ``esize``, ``offset``) raises it and
            touches nothing; a waiting call raises it at once.  Look it up again.
        PrimaryNotRunning: while waiting, the primary stopped or died (within 100 ms;
            the message says which).
        KeyboardInterrupt: (or any exception a signal handler raises) while waiting:
            the ring is unchanged.
    """

    __slots__ = ()

    # the C methods' signatures are in memd/_ext.pyi

    @classmethod
    def create(
        cls,
        window: _ext.Window,
        offset: int,
        count: int,
        flags: int = 0,
        name: str = "",
        esize: int = RING_ESIZE_U64,
    ) -> Ring[Any]:
        """Initialise an empty ring at `offset` (64-byte aligned) and attach to it
        (DPDK ``rte_ring_init``; with `esize`, the ring ``rte_ring_create_elem``
        makes).

        `count` is a power of two (capacity ``count - 1``) or, with
        ``RING_F_EXACT_SZ``, any count >= 1 (capacity ``count``); the slots (a power
        of two) are at most ``RING_SZ_MASK`` (2**30).  `esize`: bytes per entry, a
        multiple of 4; 8 (the default) holds ints, anything else records.  Raises
        MemdValueError for a bad count, esize or flags; ValueError for a long name,
        a misaligned offset or memory outside the window.
        """
        _ext.ring_init(window, offset, count, flags, name, esize)
        return cls(window, offset)

    # --- asyncio: the same calls, awaited (memd.shm.aio: no thread per waiter) -------

    def _count_of(self, values: Any) -> int:
        """Entries in `values` (ints, records, or a buffer of them)."""
        if self.esize == RING_ESIZE_U64 or isinstance(values, list | tuple):
            return len(values)
        return memoryview(values).nbytes // self.esize

    def _bulk_want(self, n: int, timeout: float | None) -> int:
        if n > self.capacity and timeout != 0:
            raise ValueError(
                f"a bulk of {n} entries can never fit a ring of capacity {self.capacity}"
            )
        return n  # 0: nothing asked for, done at once

    async def _many_async(
        self,
        attempt: Callable[[], R],
        blocking: Callable[[float], R],
        enq: bool,
        count: Callable[[], int],
        timeout: float | None,
        bulk: bool,
    ) -> R:
        """The bulk and burst forms, awaited: one try first, so bad arguments raise
        exactly what the synchronous call raises (a buffer's format before its size),
        then wait for all `count()` entries (`bulk`) or at least one."""
        timeout = _ext.check_timeout(timeout)  # first, as the blocking call does
        result = attempt()
        if result or timeout == 0:
            return result
        n = count()
        want = self._bulk_want(n, timeout) if bulk else min(1, n)
        return await aio.wait_for_op(self, attempt, bool, enq, want, timeout, blocking)

    async def enqueue_async(self, value: Any, timeout: float | None = None) -> bool:
        """``await ring.enqueue_async(value)``: :meth:`enqueue` that waits for room
        without blocking the event loop (DPDK ``rte_ring_enqueue``).  `timeout`: seconds,
        None (the default) waits until there is room.  Returns False if the ring stayed
        full.  No thread waits per call: one waiter thread per process watches every
        wait.  Cancelling the awaiting task leaves the ring unchanged.  Raises as
        :meth:`enqueue`; PrimaryNotRunning if the primary dies while it waits."""
        return await aio.wait_for_op(
            self,
            lambda: self.enqueue(value),
            bool,
            True,
            1,
            timeout,
            lambda t: self.enqueue(value, timeout=t),
        )

    async def dequeue_async(self, timeout: float | None = None) -> E | None:
        """``await ring.dequeue_async()``: :meth:`dequeue` that waits for an entry
        without blocking the event loop (DPDK ``rte_ring_dequeue``).  `timeout`:
        seconds, None (the default) waits until an entry comes.  Returns the entry
        (int, or bytes on a ring of records), None if the ring stayed empty.
        Cancelling the awaiting task dequeues nothing: no entry is lost.  Raises as
        :meth:`dequeue`; PrimaryNotRunning if the primary dies while it waits."""
        return await aio.wait_for_op(
            self,
            self.dequeue,
            lambda v: v is not None,
            False,
            1,
            timeout,
            lambda t: self.dequeue(timeout=t),
        )

    async def enqueue_bulk_async(self, values: Any, timeout: float | None = None) -> int:
        """:meth:`enqueue_bulk`, awaited: waits (and is woken) only until there is room
        for all of `values`; returns ``len(values)``, or 0 if that did not happen in
        `timeout` seconds.  ValueError for a bulk larger than the capacity (unless
        ``timeout=0``).  Cancelling enqueues nothing."""
        return await self._many_async(
            lambda: self.enqueue_bulk(values),
            lambda t: self.enqueue_bulk(values, timeout=t),
            True,
            lambda: self._count_of(values),
            timeout,
            bulk=True,
        )

    async def enqueue_burst_async(self, values: Any, timeout: float | None = None) -> int:
        """:meth:`enqueue_burst`, awaited: waits until at least one entry fits, then
        enqueues as many as fit; returns how many (0 on timeout)."""
        return await self._many_async(
            lambda: self.enqueue_burst(values),
            lambda t: self.enqueue_burst(values, timeout=t),
            True,
            lambda: self._count_of(values),
            timeout,
            bulk=False,
        )

    async def dequeue_bulk_async(self, n: int, timeout: float | None = None) -> list[E]:
        """:meth:`dequeue_bulk`, awaited: waits (and is woken) only until `n` entries
        are there; returns them, or ``[]`` on timeout.  ValueError for ``n`` larger
        than the capacity (unless ``timeout=0``) or negative.  Cancelling dequeues
        nothing."""
        return await self._many_async(
            lambda: self.dequeue_bulk(n),
            lambda t: self.dequeue_bulk(n, timeout=t),
            False,
            lambda: n,
            timeout,
            bulk=True,
        )

    async def dequeue_burst_async(self, n: int, timeout: float | None = None) -> list[E]:
        """:meth:`dequeue_burst`, awaited: waits until at least one entry is there;
        returns up to `n` entries, ``[]`` on timeout."""
        return await self._many_async(
            lambda: self.dequeue_burst(n),
            lambda t: self.dequeue_burst(n, timeout=t),
            False,
            lambda: n,
            timeout,
            bulk=False,
        )

    async def dequeue_bulk_into_async(self, buffer: Any, timeout: float | None = None) -> int:
        """:meth:`dequeue_bulk_into`, awaited: fills the whole buffer once that many
        entries are there; returns the count, 0 on timeout."""
        return await self._many_async(
            lambda: self.dequeue_bulk_into(buffer),
            lambda t: self.dequeue_bulk_into(buffer, timeout=t),
            False,
            lambda: self._count_of(buffer),
            timeout,
            bulk=True,
        )

    async def dequeue_burst_into_async(self, buffer: Any, timeout: float | None = None) -> int:
        """:meth:`dequeue_burst_into`, awaited: waits for at least one entry; returns
        how many it wrote to the buffer's head, 0 on timeout."""
        return await self._many_async(
            lambda: self.dequeue_burst_into(buffer),
            lambda t: self.dequeue_burst_into(buffer, timeout=t),
            False,
            lambda: self._count_of(buffer),
            timeout,
            bulk=False,
        )

    def __repr__(self) -> str:
        try:
            return (
                f"<Ring {self.name!r} offset={self.offset:#x} count={self.count}"
                f"/{self.capacity} esize={self.esize} flags={self.flags:#x}>"
            )
        except StaleHandle:
            return f"<Ring (freed) offset={self.offset:#x}>"
        except CorruptionError:  # its header was overwritten: repr never raises
            return f"<Ring (corrupted) offset={self.offset:#x}>"

    def __len__(self) -> int:
        return self.count

    def info(self) -> dict[str, Any]:
        """Fields for telemetry ``/ring/info`` and ``memctl rings``."""
        return {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "capacity": self.capacity,
            "esize": self.esize,
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

        def _check_primary(self) -> None: ...

        def _largest_block(self, socket_id: int) -> int: ...

    @overload
    def ring_create(
        self,
        name: str,
        count: int,
        socket_id: int = ...,
        flags: int = ...,
        esize: Literal[8] = ...,
    ) -> Ring[int]: ...
    @overload
    def ring_create(
        self, name: str, count: int, socket_id: int = ..., flags: int = ..., *, esize: int
    ) -> Ring[Any]: ...
    def ring_create(
        self,
        name: str,
        count: int,
        socket_id: int = SOCKET_ID_ANY,
        flags: int = 0,
        esize: int = RING_ESIZE_U64,
    ) -> Ring[Any]:
        """Create ring `name` of `count` entries of `esize` bytes (DPDK
        ``rte_ring_create`` / ``rte_ring_create_elem``; see :meth:`Ring.create`).
        ``esize=8`` (the default) is a ring of ints; another multiple of 4, a ring
        of records (bytes).

        Raises FileExistsError (MemdExistsError) if the name is taken;
        MemdValueError for a bad count/esize/flags/name/socket_id, and, at once,
        before any memory is asked for, for a ring larger than a heap here can
        ever hold (a block lies within one memseg list); MemoryError when no
        memory is left.
        """
        _check_name(name)
        size = ring_memsize(count, flags, esize)
        self._check_fits(name, count, esize, size, socket_id)
        return objects.create(
            self,
            name,
            MEMD_OBJ_RING,
            RING_MZ_PREFIX,
            size,
            socket_id,
            lambda off: Ring.create(self.window, off, count, flags, name, esize),
            "ring_create",
        )

    def _check_fits(self, name: str, count: int, esize: int, size: int, socket_id: int) -> None:
        """MemdValueError unless a block of `size` bytes fits one memseg list of a
        heap `socket_id` may use: growth can never make room for more."""
        largest = self._largest_block(socket_id)
        if space_needed(size, 64) > largest:
            raise MemdValueError(
                f"ring_create({name!r}): {count} entries of {esize} bytes need {size} bytes, "
                f"more than a heap here can ever hold in one block ({largest} bytes: one "
                "memseg list); make the ring smaller"
            )

    def ring_lookup(self, name: str) -> Ring[Any]:
        """The ring called `name`, with the esize it was created with
        (rte_ring_lookup); KeyError (MemdKeyError) if there is none; CorruptionError,
        naming it, if it is damaged (its header does not validate, claims memory past
        its memzone or another ring's name): free its memzone ``RG_<name>`` with
        memzone_free() and create it again."""
        self._check_primary()
        return objects.open_listed(
            self.window,
            name,
            MEMD_OBJ_RING,
            lambda off: Ring(self.window, off),
            "ring_lookup",
            RING_MZ_PREFIX,
        )

    def ring_free(self, ring: Ring[Any] | None) -> None:
        """Remove the ring from the directory and free its memzone (rte_ring_free;
        ``None`` does nothing, as there).

        Every Ring object of it, in this process or another, raises
        :class:`~memd.errors.StaleHandle` from then on (even after a ring is made
        again under the name, at the same offset): look it up again.  Raises
        MemdValueError if ``ring`` is not a Ring, StaleHandle if it was freed
        already, MemdKeyError if it is no longer listed.
        """
        if ring is None:
            return
        if not isinstance(ring, Ring):
            raise MemdValueError(f"ring_free: expected a Ring, got {type(ring).__name__}")
        ring._check_live()  # a stale handle must not free the ring made after it
        objects.remove(
            self, ring.name, MEMD_OBJ_RING, RING_MZ_PREFIX, ring.offset, ring._poison, "ring_free"
        )
