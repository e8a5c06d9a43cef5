"""Mempools: pools of fixed-size objects in shared memory (DPDK's ``rte_mempool``).

A pool of `n` objects of `elt_size` bytes is one block of shared memory: a header,
one cache per process slot, a private area, a ring of free objects, and the
objects (each with a header and a trailer cookie).  Objects are named by
*handles*, the window offsets of their data, which mean the same in every process
and travel through rings::

    o = pool.get()                # MempoolObject; raises PoolEmpty
    o.buf[:5] = b"hello"          # zero-copy, writable
    ring.enqueue(o.handle)        # another process: pool.obj(ring.dequeue())
    pool.put(o)

Each process gets and puts through its own cache first (DPDK's per-lcore cache,
indexed by the process slot), exactly as DPDK 22.11's ``rte_mempool_do_generic_get``
and ``_put`` do:

- ``get_bulk(n)`` with ``n <= cache_count()`` serves from the cache's top.  Otherwise
  the cache gives all it has and the ring the rest: one all-or-nothing ring
  dequeue of ``cache_size + rest`` leaves exactly ``cache_size`` cached (only when
  the rest is at most ``MEMPOOL_CACHE_MAX_SIZE``); if the ring holds fewer, the
  ring gives just the rest; if not even that, nothing is taken (PoolEmpty, the
  ring and the cache as they were).  So a get never takes more from the ring than
  ``n + cache_size``.
- ``put_bulk(objs)`` of more than ``flushthresh`` (``cache_size * 3 // 2``) objects
  goes straight to the ring; otherwise, if the cache would pass flushthresh, the
  whole cache goes to the ring first; then the objects are cached.

Objects sitting in *another* process's cache count as available
(:meth:`Mempool.avail_count`, :meth:`Mempool.full`) but cannot be taken by this one.

Each object's header records the pid of the process that last got it (its *owner
tag*).  When a process dies, ``pool.held_by(pid)`` says how many objects it had
taken and not put back, and ``pool.reclaim_held_by(pid)`` puts them back -- only
right for programs that know the dead process shared none of them (an object it
passed to another process through a ring still carries *its* tag, and reclaiming
it would hand it out twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from memd import _ext
from memd.errors import CorruptionError, MemdValueError, PoolEmpty, StaleHandle
from memd.shm import aio, objects
from memd.shm.config import SOCKET_ID_ANY, memseg_lists

MEMPOOL_F_NO_SPREAD: int = _ext.MEMPOOL_F_NO_SPREAD  # accepted, no effect
MEMPOOL_F_NO_CACHE_ALIGN: int = _ext.MEMPOOL_F_NO_CACHE_ALIGN  # accepted, no effect
MEMPOOL_F_SP_PUT: int = _ext.MEMPOOL_F_SP_PUT  # one process/thread puts to the free ring
MEMPOOL_F_SC_GET: int = _ext.MEMPOOL_F_SC_GET  # one process/thread gets from the free ring
MEMPOOL_F_NO_IOVA_CONTIG: int = _ext.MEMPOOL_F_NO_IOVA_CONTIG  # accepted, no effect
MEMPOOL_CACHE_MAX_SIZE: int = _ext.MEMPOOL_CACHE_MAX_SIZE
MEMD_OBJ_MEMPOOL: int = _ext.OBJ_MEMPOOL  # enum memd_object_type
MEMPOOL_MZ_PREFIX = "MP_"  # memzone of pool <name> is "MP_<name>", as in DPDK
MEMPOOL_NAMESIZE = _ext.NAMESIZE - 1 - len(MEMPOOL_MZ_PREFIX)  # the memzone name fits

#: obj_init(pool, obj, idx): runs once for every object when the pool is created
ObjInit = Callable[["Mempool", "MempoolObject", int], object]

MempoolObject = _ext.MempoolObject
"""An object of a pool: ``.handle``, ``.index``, ``.buf`` (memoryview), ``.pool``,
``.size``, ``.iova`` (DPDK ``rte_mempool_virt2iova``: the IO address of its data,
``_ext.BAD_IOVA`` when the memory has none); it is itself a writable buffer
(``memoryview(o)``, ``numpy.frombuffer(o)``)."""


class MempoolMemChunk(NamedTuple):
    """One chunk of a pool's object memory (DPDK ``struct rte_mempool_memhdr``)."""

    offset: int  # window offset of the chunk's first byte
    length: int  # bytes
    iova: int  # IO address of the first byte, the chunk IOVA-contiguous; or _ext.BAD_IOVA


__all__ = [
    "MEMPOOL_F_NO_CACHE_ALIGN",
    "MEMPOOL_F_NO_IOVA_CONTIG",
    "MEMPOOL_F_NO_SPREAD",
    "MEMPOOL_F_SC_GET",
    "MEMPOOL_F_SP_PUT",
    "Mempool",
    "MempoolMemChunk",
    "MempoolMixin",
    "MempoolObject",
    "mempool_memsize",
]


def mempool_memsize(
    n: int, elt_size: int, cache_size: int = 0, private_data_size: int = 0, flags: int = 0
) -> int:
    """Bytes of shared memory a pool needs (ValueError for a bad geometry)."""
    return _ext.mempool_memsize(n, elt_size, cache_size, private_data_size, flags)


class Mempool(_ext.Mempool):
    """A pool in a shared window, at a window offset, used through cache `slot`.

    ``Mempool(window, offset, slot)`` attaches to a pool that :meth:`create`
    built; `slot` is this process's slot (``Memory.proc_slot``), -1 for no cache.
    Two processes must not use the same slot at once.

    C methods: ``get()``, ``get_handle()``, ``put(obj_or_handle)``,
    ``get_bulk(n)``, ``get_bulk_into(uint64_buffer)``, ``put_bulk(objs)`` (objects,
    handles or a uint64 buffer), ``obj(handle)``, ``obj_at(index)``,
    ``avail_count()``, ``in_use_count()``, ``cache_count(slot=own)``,
    ``flush_cache()``, ``audit()``, ``recover()``; in Python :meth:`full`, :meth:`empty`,
    :meth:`obj_iter`, :meth:`mem_iter`, :meth:`held_by` and
    :meth:`reclaim_held_by` (a dead process's objects); properties ``name``,
    ``size``, ``elt_size``,
    ``cache_size``, ``flushthresh``, ``private_data_size``, ``private_data``,
    ``flags``, ``memsize``, ``obj_stride``, ``ring_offset``, ``offset``, ``slot``,
    ``window``.  Bulk gets are all or nothing (:class:`memd.errors.PoolEmpty`);
    a put of a foreign or already free object raises ValueError and changes
    nothing; :meth:`audit` raises :class:`memd.errors.CorruptionError`.

    ``audit() -> dict`` (``free``, ``in_use``, ``in_ring``, ``in_caches``: object
    counts) checks every cookie and entry; ``recover() -> int`` puts back free
    objects a killed process left in no ring and no cache (the primary does it
    when it reclaims that process) and returns how many.  Both look at the pool
    at a moment when no process moves its objects (holding gets and puts off for
    at most 20 ms, 1 ms more per 16384 objects), so both are safe while others
    get and put.  ``audit`` mirrors DPDK's ``rte_mempool_audit`` (cookies and
    cache lengths; DPDK panics where it raises) and also counts every object;
    ``recover`` has no DPDK counterpart.

    Objects are fixed-size (``elt_size`` bytes) and named by their **handle**, the
    window offset of their data: an int that means the same object in every process
    (put it in a ring; ``pool.obj(handle)`` turns it back into an object).

    Raises:
        PoolEmpty: ``get`` with no free object, a bulk get with fewer than ``n``.
        MemdError: "busy": a get, put, ``flush_cache`` or ``recover`` that must
            move objects through the free ring, whose side lock another live
            process keeps (stopped in a debugger, say; DPDK's rte_mempool has
            no such wait), waited the lock wait limit (30 s in a program) without
            the GIL; the message names the pool and the holder's pid.  Nothing
            was taken or put back: try again.  The wait lets signals through
            (Ctrl-C raises KeyboardInterrupt, also with nothing changed).  Also
            ``recover`` or ``audit`` that found no moment when no process moved
            the pool's objects within that limit: the message names a process
            stopped in the middle of a get or put.
        ValueError: ``put`` of an object or handle that is not this pool's, or is
            already free; ``obj(handle)`` of a handle that is no object of it.
        MemdValueError: the attachment the pool came from was detached.
        StaleHandle: any call but the local properties (``size``, ``offset``, ...)
            after the pool was freed, by this process or another (also through its
            MempoolObjects: ``buf``, ``iova``, the buffer protocol); nothing is
            touched.  Look the pool up again.
        CorruptionError: ``audit`` found the pool's bookkeeping smashed.
    """

    __slots__ = ()

    # the C methods' signatures are in memd/_ext.pyi

    @classmethod
    def create(
        cls,
        window: _ext.Window,
        offset: int,
        n: int,
        elt_size: int,
        *,
        cache_size: int = 0,
        private_data_size: int = 0,
        obj_init: ObjInit | None = None,
        flags: int = 0,
        name: str = "",
        slot: int = 0,
    ) -> Mempool:
        """Build a pool at `offset` (64-byte aligned), run obj_init on every object."""
        _ext.mempool_init(window, offset, n, elt_size, cache_size, private_data_size, flags, name)
        pool = cls(window, offset, slot)
        if obj_init is not None:
            for idx in range(n):
                obj_init(pool, pool.obj_at(idx), idx)
        return pool

    def __repr__(self) -> str:
        try:
            name = self.name
        except StaleHandle:
            name = "(freed)"
        except CorruptionError:  # its header was overwritten: repr never raises
            name = "(corrupted)"
        return (
            f"<Mempool {name!r} offset={self.offset:#x} n={self.size} "
            f"elt_size={self.elt_size} cache_size={self.cache_size} slot={self.slot}>"
        )

    def __len__(self) -> int:
        return self.size

    @property
    def n(self) -> int:
        """Number of objects, as mempool_create(name, n, ...) names it (DPDK: size)."""
        return self.size

    def full(self) -> bool:
        """True if every object is available (DPDK ``rte_mempool_full``:
        ``avail_count() == size``, objects in any process's cache included).
        A snapshot while others get and put.  MemdValueError after detach."""
        return self.avail_count() == self.size

    def empty(self) -> bool:
        """True if no object is available (DPDK ``rte_mempool_empty``:
        ``avail_count() == 0``; objects in another process's cache count as
        available, though only that process can take them).  A snapshot while
        others get and put.  MemdValueError after detach."""
        return self.avail_count() == 0

    async def get_async(self, timeout: float | None = None) -> MempoolObject:
        """``await pool.get_async()``: :meth:`get` that waits for a free object without
        blocking the event loop (DPDK ``rte_mempool_get``).  Waits on the pool's ring
        of free objects, woken when another process (or thread) puts one back to it;
        one waiter thread per process serves every wait.  `timeout`: seconds, None
        (the default) waits until an object is free.  An object put into this
        process's own cache is seen at the next 100 ms check, one put to the ring at
        once; objects in other processes' caches cannot be taken.  Cancelling the
        awaiting task takes nothing.

        Raises:
            PoolEmpty: no object became free within `timeout`.
            StaleHandle: the pool was freed (by any process).
            MemdValueError: the attachment was detached.
            PrimaryNotRunning: the primary stopped or died while it waited (the
                message says which).
        """
        self._check_live()  # StaleHandle, not "no ring" from the freed pool's ring
        free = _ext.Ring(self.window, self.ring_offset)  # its ring of free objects

        def attempt() -> MempoolObject | None:
            try:
                return self.get()
            except PoolEmpty:
                return None

        obj = await aio.wait_for_op(free, attempt, lambda o: o is not None, False, 1, timeout)
        if obj is None:
            raise PoolEmpty(f"mempool {self.name!r}: no free object within {timeout} s")
        return obj

    def obj_iter(self) -> Iterator[MempoolObject]:
        """Every object of the pool, free or in use, in index order 0..n-1 (DPDK
        ``rte_mempool_obj_iter``, whose callback gets ``(obj, obj_idx)``: here
        ``obj.index``).  The objects are handles as :meth:`obj_at` makes them:
        taking one does not get it from the pool, and writing to an object
        another process holds is the caller's business.  MemdValueError after
        detach."""
        for i in range(self.size):
            yield self.obj_at(i)

    def mem_iter(self) -> Iterator[MempoolMemChunk]:
        """The memory the objects live in, as :class:`MempoolMemChunk`
        ``(offset, length, iova)`` (DPDK ``rte_mempool_mem_iter``).

        The chunks cover the objects' memory (each object's header, data and
        trailer: ``size * obj_stride`` bytes, the pool's last part) in order,
        each one as long as its IOVA is contiguous: a pool is one chunk unless
        it spans pages whose IO addresses do not follow on (IOVA-as-PA), or
        whose IOVA is unknown (a chunk with ``iova == _ext.BAD_IOVA``).  Unlike
        DPDK, objects are laid out regardless of page boundaries: an object may
        straddle two chunks.  MemdValueError after detach."""
        win = self.window
        length = self.size * self.obj_stride
        start = self.offset + self.memsize - length  # the objects are the pool's tail
        end = start + length
        first_iova = _iova_of(win, start)
        if _ext.iova_contig(win, start, length):  # always so in IOVA-as-VA mode
            yield MempoolMemChunk(start, length, first_iova)
            return
        lists = [(m.base_offset, m.page_size, m.capacity) for m in memseg_lists(win)]
        chunk, chunk_iova, off = start, first_iova, start
        while True:
            page = next(
                ((b, ps) for b, ps, cap in lists if b <= off < b + cap * ps and ps > 0), None
            )
            if page is None:
                break  # not in a memseg list: no page to split at
            base, page_size = page
            off = base + ((off - base) // page_size + 1) * page_size  # the next page
            if off >= end:
                break
            iova = _iova_of(win, off)
            bad = _ext.BAD_IOVA
            follows = iova == bad if chunk_iova == bad else iova == chunk_iova + (off - chunk)
            if not follows:
                yield MempoolMemChunk(chunk, off - chunk, chunk_iova)
                chunk, chunk_iova = off, iova
        yield MempoolMemChunk(chunk, end - chunk, chunk_iova)

    def held_by(self, pid: int) -> int:
        """Objects process `pid` got from the pool and has not put back.

        The owner tag is set on get and not moved when an object travels to
        another process: it names the getter, not the current holder.  Walks
        every object header (O(n)); a snapshot while others get and put."""
        self._check_live()
        return _ext.mempool_held_by(self.window, self.offset, pid)

    def busy(self) -> list[tuple[int, int]]:
        """(handle, getter pid) of every object handed out and not put back: a
        snapshot (O(n)) while others get and put."""
        self._check_live()
        return _ext.mempool_busy(self.window, self.offset)

    def holders(self) -> dict[int, int]:
        """Getter pid -> objects it got and nobody put back (see :meth:`held_by`)."""
        self._check_live()
        return _ext.mempool_holders(self.window, self.offset)  # counted in C: no list

    def reclaim_held_by(self, pid: int) -> int:
        """Put back every object :meth:`held_by` counts for dead process `pid`;
        returns how many.

        Only for programs that know `pid` shared none of the objects it got:
        one it passed on (say through a ring) and that another process still
        uses would be handed out twice.  Raises ValueError if `pid` is alive (a
        zombie counts as dead), CorruptionError if the pool is corrupted.  The
        objects go straight to the free ring, not to this process's cache."""
        self._check_live()
        return _ext.mempool_reclaim_held_by(self.window, self.offset, pid)

    def info(self) -> dict[str, Any]:
        """Fields for telemetry ``/mempool/info`` and ``memctl mempools``."""
        avail = self.avail_count()
        return {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "elt_size": self.elt_size,
            "cache_size": self.cache_size,
            "private_data_size": self.private_data_size,
            "flags": self.flags,
            "memsize": self.memsize,
            "avail_count": avail,
            "in_use_count": self.size - avail,
        }


def _iova_of(win: _ext.Window, offset: int) -> int:
    iova = _ext.iova_of(win, offset)
    return _ext.BAD_IOVA if iova is None else iova


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > MEMPOOL_NAMESIZE or "\0" in name:
        raise MemdValueError(f"mempool name {name!r}: 1 to {MEMPOOL_NAMESIZE} bytes, no NUL")


class MempoolMixin:
    """Named mempools (``mempool_create``/``mempool_lookup``/``mempool_free``) for
    ``Memory``; pools live in memzone ``MP_<name>`` and the shared object directory."""

    if TYPE_CHECKING:  # provided by Memory, as are the memzone_* that memd.shm.objects calls
        window: _ext.Window
        proc_slot: int

        def _check_primary(self) -> None: ...

    def mempool_create(
        self,
        name: str,
        n: int,
        elt_size: int,
        cache_size: int = 0,
        private_data_size: int = 0,
        obj_init: ObjInit | None = None,
        socket_id: int = SOCKET_ID_ANY,
        flags: int = 0,
    ) -> Mempool:
        """Create pool `name`; obj_init(pool, obj, idx) runs once per object.

        Raises FileExistsError (MemdExistsError) for a taken name, ValueError for
        a bad geometry (cache_size > 512, or 1.5 * cache_size > n), MemoryError.
        """
        _check_name(name)
        size = mempool_memsize(n, elt_size, cache_size, private_data_size, flags)
        return objects.create(
            self,
            name,
            MEMD_OBJ_MEMPOOL,
            MEMPOOL_MZ_PREFIX,
            size,
            socket_id,
            lambda off: Mempool.create(
                self.window,
                off,
                n,
                elt_size,
                cache_size=cache_size,
                private_data_size=private_data_size,
                obj_init=obj_init,
                flags=flags,
                name=name,
                slot=self.proc_slot,
            ),
            "mempool_create",
        )

    def mempool_lookup(self, name: str) -> Mempool:
        """The pool called `name`, used through this process's cache
        (rte_mempool_lookup); KeyError (MemdKeyError) if there is none;
        CorruptionError, naming it, if it is damaged (its header does not validate,
        claims memory past its memzone or another pool's name): free its memzone
        ``MP_<name>`` with memzone_free() and create it again."""
        self._check_primary()
        return objects.open_listed(
            self.window,
            name,
            MEMD_OBJ_MEMPOOL,
            lambda off: Mempool(self.window, off, self.proc_slot),
            "mempool_lookup",
            MEMPOOL_MZ_PREFIX,
        )

    def mempool_free(self, pool: Mempool | None) -> None:
        """Remove the pool from the directory and free its memzone
        (rte_mempool_free; ``None`` does nothing, as there).

        Objects still held are lost.  Every Mempool and MempoolObject of it, in
        this process or another, raises :class:`~memd.errors.StaleHandle` from then
        on (even after a pool is made again under the name, at the same offset):
        look it up again.  Raises MemdValueError if ``pool`` is not a Mempool,
        StaleHandle if it was freed already, MemdKeyError if it is no longer listed.
        """
        if pool is None:
            return
        if not isinstance(pool, Mempool):
            raise MemdValueError(f"mempool_free: expected a Mempool, got {type(pool).__name__}")
        pool._check_live()  # a stale handle must not free the pool made after it
        objects.remove(
            self,
            pool.name,
            MEMD_OBJ_MEMPOOL,
            MEMPOOL_MZ_PREFIX,
            pool.offset,
            pool._poison,
            "mempool_free",
        )
