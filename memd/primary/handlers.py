"""The primary's answers to secondaries' requests (DPDK's `rte_mp` actions): register,
unregister, ping.  Heap growth's requests (`alloc`, `shrink`) are in `memd.mp.malloc_mp`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Any

from memd import _ext
from memd.mp.channel import PROTOCOL_VERSION, Peer, param, reply
from memd.primary.reclaim import ReclaimMixin
from memd.shm.config import watch_process

log = logging.getLogger("memd")

# Attachments one process may hold at once: a process that attaches in a loop and
# never detaches must not take every slot from the others.
MAX_SLOTS_PER_PROCESS = 8


class HandlersMixin(ReclaimMixin):
    """The request handlers but heap growth's (`Server` calls them by message type)."""

    def _on_register(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """register {pid, start_time, version, comm} -> {slot, generation}.
        Sent on the secondary's sync socket, whose identity the primary keeps."""
        pid = param(msg, "pid", int, 1, 2**31 - 1)
        start = param(msg, "start_time", int, 0, 2**63)
        version = param(msg, "version", int, 0, 2**31)
        name = msg.get("comm", "")
        if not isinstance(name, str):
            name = ""
        # the slot keeps 31 bytes of C string: no NUL, and cut between characters, or
        # every later processes() would fail to decode it
        name = name.replace("\0", "").encode()[:31].decode(errors="ignore")
        if version != PROTOCOL_VERSION:
            return reply(
                msg["id"],
                errno.EPROTONOSUPPORT,
                f"protocol version {version} != primary's {PROTOCOL_VERSION}; "
                "use the same memd version on both sides",
            )
        if not identity.startswith(b"sync-"):
            return reply(msg["id"], errno.EINVAL, "register from the sync socket")
        assert self.server is not None
        cred = self.server.current_cred
        if cred is not None and cred.pid != pid:
            return reply(
                msg["id"], errno.EPERM, f"register names pid {pid} but was sent by pid {cred.pid}"
            )
        pidfd = watch_process(pid, start)
        if pidfd is None:
            return reply(msg["id"], errno.ESRCH, f"pid {pid} is not a live process")
        held = sum(1 for i, p in self.server.peers.items() if p.pid == pid and i != identity)
        if held >= MAX_SLOTS_PER_PROCESS:
            if pidfd >= 0:
                os.close(pidfd)
            return reply(
                msg["id"],
                errno.EUSERS,
                f"pid {pid} holds {held} process slots already, the most one process may; "
                "detach() the attachments it no longer uses",
            )
        old = self.server.peers.get(identity)
        if old is not None:
            self.server.remove_peer(old)
            with contextlib.suppress(OSError):
                _ext.proc_unregister(self.window, old.slot, old.pid)
        try:
            slot = _ext.proc_register(self.window, pid, start, _ext.PROC_SECONDARY, name)
        except OSError:
            self.prune_dead()
            self._drop_unknown_rows()
            try:
                slot = _ext.proc_register(self.window, pid, start, _ext.PROC_SECONDARY, name)
            except OSError:
                if pidfd >= 0:
                    os.close(pidfd)
                return reply(
                    msg["id"],
                    errno.EUSERS,
                    f"all {_ext.MAX_PROCS - 1} secondary slots are taken; detach unused processes",
                )
        self.server.add_peer(Peer(identity, slot, pid, start, pidfd))
        log.info("secondary pid %d attached in slot %d", pid, slot)
        # Page directories travel here, from our own memory: a secondary never takes
        # a path from shared memory, which any attached process can write.
        return reply(
            msg["id"],
            slot=slot,
            generation=self._header().mem_generation,
            page_dirs=sorted(self.pages.dirs.items()),
        )

    def _on_unregister(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """unregister {} -> {}: the secondary detaches; its slot is freed."""
        assert self.server is not None
        peer = self.server.peer_of(identity)
        if peer is None:
            return reply(msg["id"], errno.ENOENT, "not registered")
        self.server.remove_peer(peer)
        # Views it still holds keep their pages while it lives (its slot goes now)
        pins = _ext.pin_ranges(self.window, peer.slot)
        if pins:
            self.detached_pins[(peer.pid, peer.start_time)] = pins
        with contextlib.suppress(OSError):
            _ext.proc_unregister(self.window, peer.slot, peer.pid)
        log.info("secondary pid %d detached from slot %d", peer.pid, peer.slot)
        return reply(msg["id"])

    def _on_ping(self, identity: bytes, msg: dict[str, Any]) -> dict[str, Any]:
        """ping {} -> {pid}: liveness."""
        return reply(msg["id"], pid=os.getpid())
