"""Malloc heaps for ``Memory``: DPDK's ``rte_malloc`` family on memd's shared heaps.

:class:`HeapMixin` adds ``malloc``/``zmalloc``/``calloc``/``realloc``/``free``/
``validate``/``heap_stats`` (docs/concepts.md, "Heaps"), plus ``heap_owners``/
``free_owned_by`` (blocks by owning process), to the primary's and the
secondaries' ``Memory`` class.  The heaps themselves are C (``ext/heap.c``): this
layer picks heaps, asks for more memory when they are full, gives pages back after
big frees, and turns C errors into memd's exceptions.

What the class using the mixin provides (see :class:`AnonymousMemory` for a
complete, daemon-free example):

``window``
    the ``memd._ext.Window`` (the config at offset 0 holds the heaps).
``_heap_order(socket_id) -> list[int]``
    heap indices to try; ``SOCKET_ID_ANY`` (-1) means the local socket's first.
    The result is cached per ``socket_id`` (-1..7); call
    :meth:`HeapMixin._heap_reset` when it changes.
``_expand_heap(heap_idx, size, align, bound, contig, page_sizes=()) -> None``
    map more memory into that heap so that the request fits (see
    :func:`space_needed`), on pages of one of ``page_sizes`` (bytes; empty: any);
    raise ``MemoryError`` when it cannot.
``_release_pages(heap_idx) -> int | None``
    called after a free left a free element of at least the heap's release
    threshold (initially ``_page_size(heap_idx)``); may give whole free pages back
    (``_ext.heap_find_free_pages``/``heap_remove_memory``).  It may return the
    free-element size below which it need not be called again (say, a huge value
    when all of the heap's pages are preallocated); when it returns None and gave
    nothing back, the threshold doubles past the free element's size.  The
    threshold goes back to the page size when this process expands the heap, on
    ``_heap_cache_clear(heap_idx)`` (call it when pages are added by someone else)
    or :meth:`HeapMixin._heap_reset`, and is asked for again by the first free
    after pages came or went anywhere (``mem_generation`` moved: pinned pages a
    deferred release gave back, a growth), so pages once held back do not keep
    later frees from releasing.
``_iova(offset) -> int`` and ``_page_size(heap_idx) -> int``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memd import _ext
from memd.errors import CorruptionError, MemdError, MemdMemoryError, MemdValueError, translate
from memd.shm.config import SOCKET_ID_ANY, process_alive

__all__ = [
    "NEVER_RELEASE",
    "SOCKET_ID_ANY",
    "AnonymousMemory",
    "Block",
    "HeapMixin",
    "space_needed",
]

Block = _ext.Block
log = logging.getLogger("memd")

_U64_MAX = 2**64 - 1
NEVER_RELEASE = _U64_MAX  # _release_pages' answer when nothing can ever be given back
GROW_ATTEMPTS = 8  # expansions per heap before a malloc gives up
_HDR = _ext.HEAP_ELEM_HEADER_SIZE
_TRL = _ext.HEAP_ELEM_TRAILER_SIZE

_heap_malloc = _ext.heap_malloc
_heap_free_block = _ext.heap_free_block
_heap_realloc_block = _ext.heap_realloc_block


def lock_wait(seconds: float | None = None) -> float:
    """How long, in seconds, a call waits for a lock in shared memory that another
    live process holds (stopped in a debugger, say) before it raises a "busy"
    :class:`~memd.errors.MemdError` naming the holder: a heap's lock (``malloc``,
    ``free``, ...), a mempool's free ring (``get``, ``put``, ``recover``,
    ``audit``), and the memzone and object tables (which wait 30 s at most
    whatever it is).  30 s in a program by default.  Waits sleep without the GIL
    and let signals through.  Sets the limit, process-wide, if `seconds` is given
    (0: never wait; ``math.inf``: wait forever) and returns the previous one.
    DPDK's locks spin without a bound; it has no counterpart.

    Raises:
        ValueError: `seconds` is negative or NaN.
    """
    return _ext.heap_lock_wait(seconds)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def space_needed(size: int, align: int = 0, bound: int = 0) -> int:
    """Bytes of fresh memory (one region starting on a page boundary, page size >= 64)
    that are sure to hold a block of ``size`` bytes with that align and bound."""
    align = max(align, _ext.HEAP_DEFAULT_ALIGN)
    need = _round_up(_HDR + _round_up(size, 8) + _TRL, 64)
    if align > _ext.HEAP_DEFAULT_ALIGN:
        need += 2 * align  # the gap before the header must be 0 or a whole free element
    if bound:
        need += bound + align  # the block may have to start at the next boundary
    return need


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _arg_error(exc: Exception, what: str, size: int, align: int, bound: int) -> MemdError:
    """The precise exception for arguments the C layer refused."""
    if size <= 0:
        return MemdValueError(f"{what}: size must be > 0, got {size}")
    if align < 0 or (align and not _is_pow2(align)):
        return MemdValueError(f"{what}: align must be 0 (64) or a power of two, got {align}")
    if align > _ext.MAX_ALIGN:
        return MemdValueError(
            f"{what}: align {align} is larger than {_ext.MAX_ALIGN >> 30} GiB, the largest "
            "alignment memd can give an address in every process and its IOVA"
        )
    if bound < 0 or (bound and not _is_pow2(bound)):
        return MemdValueError(f"{what}: bound must be 0 (none) or a power of two, got {bound}")
    if bound and bound < size:
        return MemdValueError(f"{what}: bound {bound} is smaller than size {size}")
    if size > _U64_MAX or align > _U64_MAX or bound > _U64_MAX:
        return MemdMemoryError(f"{what}: {size} bytes can never fit in a heap")
    if isinstance(exc, OSError):
        return translate(exc, what)
    return MemdValueError(f"{what}: {exc}")


class HeapMixin(_ext.HeapBase):
    """malloc and friends over the shared heaps (DPDK's rte_malloc).

    ``malloc(size, align=0, socket_id=SOCKET_ID_ANY) -> Block``,
    ``zmalloc(...)`` and ``free(blk)`` are C (``_ext.HeapBase``) for speed; they fall
    back to :meth:`_heap_alloc_py` / :meth:`_heap_free_py` for anything unusual, so
    their behaviour and errors are the ones documented there.  ``window`` is a slot
    of the C base: assign it (``self.window = win``); a property would bypass the
    fast paths.  The C base has an instance layout, so a class using the mixin can
    not also derive from another C type with one.
    """

    window: _ext.Window

    if TYPE_CHECKING:  # provided by the class that uses the mixin

        def _heap_order(self, socket_id: int) -> list[int]: ...

        def _expand_heap(
            self,
            heap_idx: int,
            size: int,
            align: int,
            bound: int,
            contig: bool,
            page_sizes: Sequence[int] = (),
        ) -> None: ...

        def _release_pages(self, heap_idx: int) -> int | None: ...

        def _iova(self, offset: int) -> int: ...

        def _page_size(self, heap_idx: int) -> int: ...

    # --- API (malloc, zmalloc and free: C fast paths over these) -------------------

    def _heap_alloc_py(self, size: int, align: int, socket_id: int, zero: bool) -> Block:
        """malloc/zmalloc (rte_malloc_socket/rte_zmalloc_socket): a block of ``size``
        bytes (> 0) whose data is aligned to ``align`` bytes (0 = 64, else a power of
        two), from ``socket_id``'s heap (``SOCKET_ID_ANY``: local first), zeroed if
        ``zero`` (only where it may be dirty, so fresh memory costs nothing).  A full
        heap grows through the primary.  Returns a Block: ``buf`` (a memoryview of
        ``size`` bytes), ``offset`` (its window offset, valid in every process),
        ``iova``, ``serial`` (the heap's allocation serial it got: a copy of the Block
        raises StaleHandle once the block is freed through another).  Raises
        MemdValueError for bad arguments, MemdMemoryError when no heap has or can get
        the room, PrimaryNotRunning when growth needs a primary that is gone."""
        what = "zmalloc" if zero else "malloc"
        return self.heap_alloc(size, align, zero=zero, socket_id=socket_id, what=what)

    def _heap_free_py(self, blk: Block | None) -> None:
        """free: give ``blk`` back; ``None`` does nothing (rte_free(NULL)).  Raises
        MemdValueError for a Block that was freed through itself or is not from this
        memory, StaleHandle (changing nothing) when the block was freed or resized
        through another handle (a copy, an unpickled one, in any process) since
        ``blk`` was made, CorruptionError when its trailer cookie is smashed (the
        block then stays allocated)."""
        if blk is None:
            return
        try:
            n = _heap_free_block(self.window, blk)
        except ValueError as e:
            raise MemdValueError(f"free: {e}") from e
        except OSError as e:
            raise translate(e, f"free({blk!r})") from e
        except TypeError as e:
            raise MemdValueError(f"free: expected a Block, got {type(blk).__name__}") from e
        self._heap_maybe_release(blk.heap, n)

    def calloc(self, num: int, size: int, align: int = 0, socket_id: int = SOCKET_ID_ANY) -> Block:
        """Zeroed room for ``num`` elements of ``size`` bytes (:meth:`zmalloc`)."""
        if num <= 0 or size <= 0:
            raise MemdValueError(f"calloc: num and size must be > 0, got {num}, {size}")
        total = num * size
        if total > _U64_MAX:
            raise MemdMemoryError(f"calloc: {num} x {size} bytes can never fit in a heap")
        return self.heap_alloc(total, align, zero=True, socket_id=socket_id, what="calloc")

    def realloc(
        self, blk: Block | None, size: int, align: int = 0, socket_id: int = SOCKET_ID_ANY
    ) -> Block:
        """Resize ``blk`` to ``size`` bytes, keeping min(old, new) bytes of its data
        (rte_realloc_socket).  ``blk`` None is :meth:`malloc` (``size``, ``align``,
        ``socket_id``), as rte_realloc(NULL, ...).  In place when it can (shrinking,
        or growing into free space above it), else moved within its heap, else moved
        to another heap (growing one if needed; ``socket_id`` only picks the heap of
        a new block).  Returns the new Block; ``blk`` is then dead (its buffer
        refuses new views, and every other handle to it raises StaleHandle: the
        block gets a new serial even in place).  Bytes past the old size are not
        zeroed.  On failure ``blk`` is unchanged.  Raises MemdValueError for a size
        <= 0, a bad alignment, or ``blk`` freed through itself or not of this memory;
        StaleHandle (changing nothing) when the block was freed or resized through
        another handle since ``blk`` was made; MemdMemoryError when no heap has or
        can get the room."""
        if blk is None:
            return self.heap_alloc(size, align, socket_id=socket_id, what="realloc")
        if not isinstance(blk, Block):
            raise MemdValueError(f"realloc: expected a Block or None, got {type(blk).__name__}")
        try:
            new = _heap_realloc_block(self.window, blk, size, align)
        except ValueError as e:  # dead block, another window
            raise MemdValueError(f"realloc: {e}") from e
        except (OSError, OverflowError) as e:
            raise _arg_error(e, "realloc", size, align, 0) from e
        if new is not None:
            return new
        order = (blk.heap, *(i for i in self._heap_order_of(SOCKET_ID_ANY) if i != blk.heap))
        new = self._heap_alloc_slow(
            order, size, align, bound=0, contig=False, zero=False, what="realloc", retry=True
        )
        n = min(blk.size, size)
        memoryview(new)[:n] = memoryview(blk)[:n]
        self.free(blk)
        return new

    def validate(self, blk: Block) -> None:
        """Check ``blk``'s cookies, as rte_malloc_validate, and its header's links to
        its neighbours: raises CorruptionError if one is smashed (the trailer by an
        overflow past its end, the header by an underflow; a damaged link to a
        neighbour is the heap's damage: the next free or malloc through it marks the
        heap broken).  Raises MemdValueError when ``blk`` is not a Block or
        was freed through itself, StaleHandle when the block was freed or resized
        through another handle since ``blk`` was made."""
        if not isinstance(blk, Block):
            raise MemdValueError(f"validate: expected a Block, got {type(blk).__name__}")
        if blk.freed:
            raise MemdValueError(f"validate: {blk!r} was freed")
        try:
            _ext.heap_validate(self.window, blk.heap, blk.offset, blk.serial)
        except OSError as e:
            what = {
                errno.EFAULT: "its trailer cookie is smashed: something wrote past its end",
                errno.EBADMSG: "its header's links to its neighbours are smashed: something "
                "wrote before its start (past the end of the block below it)",
            }.get(e.errno or 0, "its header is smashed: something wrote before its start")
            raise CorruptionError(f"validate({blk!r}): {what}") from e

    def heap_stats(self, socket_id: int = SOCKET_ID_ANY) -> dict[str, int]:
        """rte_malloc_get_socket_stats: of the socket's heap, or summed over all heaps for
        ``SOCKET_ID_ANY``.  Sizes count whole elements (headers included), so
        heap_totalsz_bytes == heap_freesz_bytes + heap_allocsz_bytes."""
        order = self._heap_order_of(socket_id)
        heaps = order if socket_id == SOCKET_ID_ANY else order[:1]
        out = dict.fromkeys(
            (
                "heap_totalsz_bytes",
                "heap_freesz_bytes",
                "heap_allocsz_bytes",
                "greatest_free_size",
                "free_count",
                "alloc_count",
            ),
            0,
        )
        for idx in heaps:
            try:
                total, free, alloc, greatest, nfree, nalloc = _ext.heap_stats(self.window, idx)
            except OSError as e:
                raise translate(e, f"heap_stats(heap {idx})") from e
            out["heap_totalsz_bytes"] += total
            out["heap_freesz_bytes"] += free
            out["heap_allocsz_bytes"] += alloc
            out["greatest_free_size"] = max(out["greatest_free_size"], greatest)
            out["free_count"] += nfree
            out["alloc_count"] += nalloc
        return out

    # --- owners ------------------------------------------------------------------------

    def heap_owners(self, unavailable: dict[int, str] | None = None) -> dict[int, dict[str, int]]:
        """Busy blocks by the process that allocated them, summed over this memory's
        heaps: ``{pid: {"blocks": n, "bytes": b, "memzones": z}}``.  ``bytes`` counts
        whole elements (headers included, as ``heap_allocsz_bytes``, so the values
        add up to it); ``blocks`` and ``bytes`` include the ``memzones`` blocks that
        back memzones (those are freed with their zone, never by owner).  A heap that
        cannot be walked (corrupt: CorruptionError; busy) raises, or, if
        `unavailable` is a dict, is left out and recorded there as
        ``{heap index: reason}``."""
        out: dict[int, dict[str, int]] = {}
        for idx in self._heap_order_of(SOCKET_ID_ANY):
            try:
                rows = _ext.heap_owners(self.window, idx)
            except OSError as e:
                err = translate(e, f"heap_owners(heap {idx})")
                if unavailable is None:
                    raise err from e
                unavailable[idx] = str(err)
                continue
            for pid, blocks, nbytes, zones in rows:
                d = out.setdefault(pid, {"blocks": 0, "bytes": 0, "memzones": 0})
                d["blocks"] += blocks
                d["bytes"] += nbytes
                d["memzones"] += zones
        return out

    def free_owned_by(self, pid: int, *, force: bool = False) -> dict[str, int]:
        """Free every block process ``pid`` allocated and left behind (not the blocks
        of memzones: free those with their zone), in all of this memory's heaps, and
        offer whole free pages back as ``free`` does.  Returns ``{"blocks": n,
        "bytes": b}`` (element sizes, as :meth:`heap_owners`).  Refuses with
        MemdValueError while ``pid`` is alive (its blocks may be in use) unless
        ``force`` is True.  Blocks of ``pid`` that another process still refers to
        are freed too: call it for processes that are gone."""
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
            raise MemdValueError(f"free_owned_by: pid must be a positive process id, got {pid!r}")
        if not force and process_alive(pid):
            raise MemdValueError(
                f"free_owned_by({pid}): process {pid} is alive, so its blocks may still be in "
                "use; free them from that process, or pass force=True if you know they are "
                "garbage"
            )
        total = {"blocks": 0, "bytes": 0}
        for idx in self._heap_order_of(SOCKET_ID_ANY):
            try:
                blocks, nbytes = _ext.heap_free_owned(self.window, idx, pid)
                if blocks:
                    greatest = _ext.heap_stats(self.window, idx)[3]
            except OSError as e:
                raise translate(e, f"free_owned_by({pid}) (heap {idx})") from e
            if blocks:
                total["blocks"] += blocks
                total["bytes"] += nbytes
                self._heap_maybe_release(idx, greatest)
        return total

    # --- for memzones and the Memory class -------------------------------------------

    def heap_alloc(
        self,
        size: int,
        align: int = 0,
        *,
        bound: int = 0,
        contig: bool = False,
        zero: bool = False,
        socket_id: int = SOCKET_ID_ANY,
        what: str = "heap_alloc",
    ) -> Block:
        """The general allocation behind malloc, zmalloc, calloc and memzones
        (rte_malloc_socket with DPDK's bounded, contiguous variants): ``size`` bytes
        aligned to ``align`` (0 = 64, else a power of two), never crossing a
        multiple of ``bound`` (0 = none, else a power of two >= size), contiguous in
        IOVA if ``contig``, zeroed if ``zero``, from ``socket_id``'s heap.  ``what``
        names the call in error messages.  Raises MemdValueError for bad arguments,
        MemdMemoryError when no heap has or can get the room."""
        order = self._heap_order_of(socket_id)
        try:
            blk = _heap_malloc(self.window, order, size, align, bound, contig, zero, self)
        except (OSError, OverflowError) as e:
            raise _arg_error(e, what, size, align, bound) from e
        if blk is None:
            return self._heap_alloc_slow(
                order, size, align, bound=bound, contig=contig, zero=zero, what=what
            )
        return blk

    def _heap_reset(self) -> None:
        """Forget cached heap orders and release thresholds."""
        self._heap_cache_clear()

    def _heap_order_of(self, socket_id: int) -> tuple[int, ...]:
        order = tuple(self._heap_order(socket_id))
        if not order:
            raise MemdValueError(f"no heap serves socket {socket_id}")
        return order

    def _heap_alloc_slow(
        self,
        order: tuple[int, ...],
        size: int,
        align: int,
        *,
        bound: int,
        contig: bool,
        zero: bool,
        what: str,
        retry: bool = False,
    ) -> Block:
        """No heap had room: grow them in order, retrying after each growth.  On
        failure, pages grown for it go back (as DPDK rolls a failed growth back)."""
        window = self.window
        why = ""
        grown: list[int] = []
        for idx in order:
            if retry:  # another process may have freed meanwhile
                blk = _heap_malloc(window, order, size, align, bound, contig, zero, self)
                if blk is not None:
                    return blk
            retry = True
            # Other processes may take the new pages before we retry (or give free
            # pages back): grow again, a bounded number of times, while growth works.
            for _ in range(GROW_ATTEMPTS):
                try:
                    self._expand_heap(idx, size, align, bound, contig)
                except MemoryError as e:
                    why = f" ({e})"
                    break
                self._heap_cache_clear(idx)
                grown.append(idx)
                blk = _heap_malloc(window, (idx,), size, align, bound, contig, zero, self)
                if blk is not None:
                    return blk
        self._give_back(grown)
        raise MemdMemoryError(
            f"{what}({size} bytes, align {align}, bound {bound}, contig {contig}): "
            f"heaps {list(order)} are full and could not grow{why}. Free blocks you no longer "
            "need, reserve more hugepages (memctl hugepages), or raise -m / --socket-mem"
            + self._align_note(order[0], align)
        )

    def _give_back(self, heaps: list[int]) -> None:
        """Offer the whole free pages of `heaps` back (after a failed request grew
        them); best effort."""
        for idx in dict.fromkeys(heaps):
            try:
                self._release_pages(idx)
            except Exception as e:  # the request's own error is the one to raise
                log.debug("giving pages of heap %d back failed: %s", idx, e)

    def _align_note(self, heap_idx: int, align: int) -> str:
        """Why a request aligned past the page size may fail although memory is
        free (the Memory class knows the IOVA mode; here there is none)."""
        return ""

    def _heap_maybe_release(self, idx: int, free_size: int) -> int:
        """A free left a free element of free_size bytes: offer the heap's pages
        back if that is at least a page.  Returns the free-element size from which
        the next free should call again: what _release_pages returned; else the page
        size if it gave memory back, else twice free_size (back off: the pages it
        kept are likely kept again; an expansion resets the threshold)."""
        at = self._page_size(idx)
        if free_size >= at:
            try:
                total = _ext.heap_stats(self.window, idx)[0]
                new_at = self._release_pages(idx)
                if new_at is not None:
                    at = new_at
                elif _ext.heap_stats(self.window, idx)[0] == total:
                    at = 2 * free_size
            except (OSError, MemdError) as e:
                # The free is done: pages not offered back (a broken heap, a busy
                # lock) must not make it look failed.  The next free asks again.
                log.debug("heap %d: pages not offered back after a free: %s", idx, e)
        return at


class AnonymousMemory(HeapMixin):
    """Heaps on an anonymous window, no daemon: for tests and benchmarks.  The
    window is MAP_SHARED, so a forked child works on the same heaps (but this
    object's page bookkeeping stays per process).

    Heap ``i`` (socket ``i``) owns the area ``[CONFIG + i * heap_size, +heap_size)``,
    cut in pages of ``page_size``.  Either ``prealloc`` bytes of each are added at
    start and never given back (as ``--socket-mem``; ``release=False``), or pages
    are "mapped" by _expand_heap and given back by _release_pages (``prealloc=0``,
    ``release=True``; the memory stays mapped, so re-added pages are marked dirty).
    """

    CONFIG = 2 << 20

    def __init__(
        self,
        heap_size: int = 64 << 20,
        n_heaps: int = 1,
        page_size: int = 2 << 20,
        prealloc: int = 0,
        release: bool = True,
    ) -> None:
        if heap_size % page_size or prealloc % page_size or not _is_pow2(page_size):
            raise MemdValueError("heap_size and prealloc must be multiples of page_size")
        if prealloc and release:
            raise MemdValueError("preallocated memory is never released: pass release=False")
        self.window = _ext.Window.anonymous(self.CONFIG + n_heaps * heap_size)
        self.heap_size = heap_size
        self.n_heaps = n_heaps
        self.page_size_ = page_size
        self.release = release
        self.n_pages = heap_size // page_size
        self.n_prealloc = prealloc // page_size
        self.mapped = [[False] * self.n_pages for _ in range(n_heaps)]
        self.used_before = [[False] * self.n_pages for _ in range(n_heaps)]
        self.expansions = 0
        self.releases = 0
        for i in range(n_heaps):
            _ext.heap_init(self.window, i, i)
            if prealloc:
                self._map(i, 0, self.n_prealloc)

    def area(self, idx: int) -> int:
        return self.CONFIG + idx * self.heap_size

    def _map(self, idx: int, first: int, n: int) -> None:
        dirty = any(self.used_before[idx][first : first + n])
        off = self.area(idx) + first * self.page_size_
        _ext.heap_lock(self.window, idx)
        try:
            _ext.heap_add_memory(self.window, idx, off, n * self.page_size_, dirty)
        finally:
            _ext.heap_unlock(self.window, idx)
        for p in range(first, first + n):
            self.mapped[idx][p] = self.used_before[idx][p] = True

    def _heap_order(self, socket_id: int) -> list[int]:
        if socket_id == SOCKET_ID_ANY:
            return list(range(self.n_heaps))
        if not 0 <= socket_id < self.n_heaps:
            raise MemdValueError(f"no socket {socket_id}")
        return [socket_id]

    def _expand_heap(
        self,
        heap_idx: int,
        size: int,
        align: int,
        bound: int,
        contig: bool,
        page_sizes: Sequence[int] = (),
    ) -> None:
        pages = -(-space_needed(size, align, bound) // self.page_size_)
        mapped = self.mapped[heap_idx]
        run = 0
        for p in range(self.n_pages):
            run = 0 if mapped[p] else run + 1
            if run == pages:
                self._map(heap_idx, p - pages + 1, pages)
                self.expansions += 1
                return
        raise MemoryError(f"heap {heap_idx}: no {pages} free pages left")

    def _release_pages(self, heap_idx: int) -> int | None:
        if not self.release:
            return NEVER_RELEASE  # everything is preallocated
        w, pg, area = self.window, self.page_size_, self.area(heap_idx)
        _ext.heap_lock(w, heap_idx)
        try:
            while True:
                try:
                    off, length = _ext.heap_find_free_pages(w, heap_idx, pg)
                except OSError:
                    break
                _ext.heap_remove_memory(w, heap_idx, off, length)
                for p in range((off - area) // pg, (off - area + length) // pg):
                    self.mapped[heap_idx][p] = False
                self.releases += 1
        finally:
            _ext.heap_unlock(w, heap_idx)
        return None

    def _iova(self, offset: int) -> int:
        return self.window.address + offset

    def _page_size(self, heap_idx: int) -> int:
        return self.page_size_
