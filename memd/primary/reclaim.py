"""A dead secondary (DPDK has no equivalent: its secondaries' leftovers stay): drop
its requests, return its mempool caches and the objects it was moving, free its
process slot, record what it held."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from memd import _ext
from memd.errors import CorruptionError, MemdError, StaleHandle
from memd.mp.channel import Peer
from memd.primary.state import PrimaryState
from memd.shm.config import process_alive, processes
from memd.shm.mempool import MEMPOOL_MZ_PREFIX
from memd.shm.ring import RING_MZ_PREFIX

log = logging.getLogger("memd")

RECLAIM_LOCK_WAIT = 0.1  # seconds a reclaim waits for a heap lock


class ReclaimMixin(PrimaryState):
    """Reclaim of dead secondaries."""

    def prune_dead(self) -> list[int]:
        """Reclaim secondaries whose process is gone; returns their pids.  Their
        pidfds report a death at once (Server.on_death); this periodic check of
        pid + start time is the backstop."""
        gone: list[int] = []
        if self.server is None:
            return gone
        for peer in list(self.server.peers.values()):
            if not process_alive(peer.pid, peer.start_time):
                self._reclaim(peer)
                gone.append(peer.pid)
        return gone

    def _drop_unknown_rows(self) -> int:
        """Free process-table rows of no registered secondary: only the primary
        writes rows, so such a row is damage (any attached process can write the
        table), and must not keep the slot from the living.  Returns how many."""
        assert self.server is not None
        known = {peer.slot for peer in self.server.peers.values()} | {self.proc_slot}
        dropped = 0
        for row in processes(self.window):
            if row.slot not in known:
                with contextlib.suppress(OSError):
                    _ext.proc_unregister(self.window, row.slot, row.pid)
                    dropped += 1
        if dropped:
            log.warning("freed %d process-table rows that no secondary owns (damaged)", dropped)
        return dropped

    def _reclaim(self, peer: Peer) -> None:
        """A secondary died: drop its pending requests, return the objects in its
        mempool caches, free its process slot, and record what it still held."""
        assert self.server is not None
        self.server.remove_peer(peer)
        record: dict[str, Any] = {
            "pid": peer.pid,
            "slot": peer.slot,
            "time": time.time(),
            "cached_objects_returned": 0,
        }
        # Each step on its own: a structure that fails (say, a heap found broken)
        # must not stop the rest, nor the daemon.
        # A pool whose free ring a stopped process keeps locked is waited for only
        # briefly (its cache then stays with the slot, whose next owner uses it).
        bound = _ext.heap_lock_wait(RECLAIM_LOCK_WAIT)
        try:
            record["cached_objects_returned"] = self.flush_mempool_caches(peer.slot)
        except Exception:
            log.exception("returning pid %d's cached mempool objects failed", peer.pid)
        finally:
            _ext.heap_lock_wait(bound)
        try:
            record.update(self._held_by(peer.pid))
        except Exception:
            log.exception("counting what pid %d still held failed", peer.pid)
        try:
            record["half_made_freed"] = self._free_half_made_by(peer.pid)
        except Exception:
            log.exception("freeing what pid %d left half made failed", peer.pid)
        pinned = bool(_ext.pin_ranges(self.window, peer.slot))
        moving_at = _ext.mempool_moving(self.window, peer.slot)  # died inside a get or put?
        with contextlib.suppress(OSError):
            _ext.proc_unregister(self.window, peer.slot, peer.pid)  # drops its pins
        record["pins_dropped"] = pinned
        if moving_at is not None:  # now that its row no longer says it is moving them
            record["moving_objects_returned"] = self._recover_moving(moving_at, peer.pid)
        if pinned:
            self._release_unpinned()
        self.reclaims.append(record)
        log.warning(
            "secondary pid %d (slot %d) died; reclaimed: %s",
            peer.pid,
            peer.slot,
            {k: v for k, v in record.items() if k not in ("pid", "slot", "time")},
        )

    def _recover_moving(self, offset: int, pid: int) -> int | None:
        """Put back into its free ring what dead `pid` was moving in the mempool at
        window offset `offset`: it died inside a get or put, between taking objects
        out of the ring or a cache and putting them in the other (or in its hands),
        so they are in neither.  `Mempool.recover` finds them at a quiet moment.
        Returns how many, or None if no quiet moment came within the reclaim's
        brief wait (a process stopped in the middle of a move, say): then it is
        tried again every second (`retry_recoveries`)."""
        pool = next((p for p in self.mempools() if p.offset == offset), None)
        if pool is None:  # freed meanwhile, or damaged (listed as such)
            self.recoveries_due.pop(offset, None)
            return 0
        try:
            name = pool.name  # for the log lines below, which must not raise
        except MemdError:  # freed or damaged since the listing
            self.recoveries_due.pop(offset, None)
            return 0
        bound = _ext.heap_lock_wait(RECLAIM_LOCK_WAIT)
        try:
            n = pool.recover()
        except (StaleHandle, CorruptionError) as e:
            log.warning("mempool %r: objects pid %d was moving not recovered: %s", name, pid, e)
            self.recoveries_due.pop(offset, None)
            return 0
        except MemdError as e:  # busy
            if offset not in self.recoveries_due:
                log.info("mempool %r: recovering what pid %d was moving later: %s", name, pid, e)
            self.recoveries_due[offset] = pid
            return None
        finally:
            _ext.heap_lock_wait(bound)
        self.recoveries_due.pop(offset, None)
        if n:
            log.warning(
                "mempool %r: %d object(s) pid %d was moving when it died went back to the pool",
                name,
                n,
                pid,
            )
        return n

    def retry_recoveries(self) -> None:
        """Again, `_recover_moving` for each pool that was busy at a reclaim."""
        for offset, pid in list(self.recoveries_due.items()):
            self._recover_moving(offset, pid)

    def _free_half_made_by(self, pid: int) -> list[str]:
        """Free the ring and pool memzones (``RG_<name>``, ``MP_<name>``) that dead
        `pid` reserved but that back no listed object: it died inside ring_create or
        mempool_create (before the object was listed: half made) or inside ring_free
        or mempool_free (after it was unlisted: half freed).  Nobody can look such an
        object up, so nobody else would ever free it.  Each is poisoned first (a handle
        kept to a half-freed one raises StaleHandle) and named in the log.  Returns
        their memzone names."""
        if process_alive(pid, 0):  # a reused pid: the zones may be a live creator's
            return []
        kinds = {RING_MZ_PREFIX: _ext.OBJ_RING, MEMPOOL_MZ_PREFIX: _ext.OBJ_MEMPOOL}
        listed = {mz_id for _i, _n, _k, _o, mz_id, _p in _ext.objects(self.window)}
        freed: list[str] = []
        for zone in self.memzones():
            kind = next((k for p, k in kinds.items() if zone.name.startswith(p)), None)
            if kind is None or zone.owner_pid != pid or zone.id in listed:
                continue
            now = _ext.memzone(self.window, zone.id)
            if now is None or now[9] != zone.generation:  # freed (and re-made) meanwhile
                continue
            try:
                _ext.object_poison(self.window, kind, zone.offset, zone.length)
                self.memzone_free(zone)
            except (MemdError, OSError) as e:  # freed meanwhile (re-created?), say
                log.warning(
                    "memzone %r, left half made by pid %d, not freed: %s", zone.name, pid, e
                )
                continue
            log.warning(
                "freed memzone %r: pid %d died creating or freeing the object in it", zone.name, pid
            )
            freed.append(zone.name)
        return freed

    def _release_unpinned(self) -> None:
        """Give back the free pages a dead process's views kept (its pins are
        gone), waiting briefly for each heap lock as the rest of reclaim does."""
        bound = _ext.heap_lock_wait(RECLAIM_LOCK_WAIT)
        try:
            for heap in self.heap_ids():
                try:
                    self._release_pages(heap)
                except (MemdError, OSError) as e:
                    log.warning("releasing heap %d's unpinned pages failed: %s", heap, e)
        finally:
            _ext.heap_lock_wait(bound)

    def _held_by(self, pid: int) -> dict[str, Any]:
        """What a dead process still holds: objects out of mempools it took, heap
        blocks it allocated (freed too under --reclaim-heap)."""
        in_hand = {}
        for pool in self.mempools():
            n = pool.held_by(pid)
            if n:
                in_hand[pool.name] = n
        # A lock held by a stopped process must not stall the daemon once per death
        # (deaths come in bursts): wait briefly, and report the heap as busy.
        bound = _ext.heap_lock_wait(RECLAIM_LOCK_WAIT)
        try:
            own = self.heap_owners().get(pid, {})
        except MemdError as e:
            log.warning("pid %d's heap blocks not counted: %s", pid, e)
            own = {}
        finally:
            _ext.heap_lock_wait(bound)
        out = {
            "mempool_objects_in_hand": in_hand,
            "heap_blocks": own.get("blocks", 0),
            "heap_bytes": own.get("bytes", 0),
            "heap_freed": False,
        }
        if own.get("blocks") and self.options.reclaim_heap:
            self.free_owned_by(pid, force=True)
            out["heap_freed"] = True
        return out
