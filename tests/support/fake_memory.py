"""A stand-in for memd's ``Memory`` with just what RingMixin/MempoolMixin use.

Memzones come from a bump allocator over an anonymous window; the shared object
directory (``_ext.object_add`` & co.) is replaced by a dict for the test's
duration.  The real ``Memory`` and directory get their own tests.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import pytest

from memd import _ext
from memd.errors import MemdKeyError
from memd.shm.config import SOCKET_ID_ANY
from memd.shm.mempool import MempoolMixin
from memd.shm.ring import RingMixin


@dataclass
class FakeMemzone:
    name: str
    offset: int
    length: int
    id: int
    owner_pid: int = field(default_factory=os.getpid)
    generation: int = 1


class FakeMemory(RingMixin, MempoolMixin):
    def __init__(
        self, window: _ext.Window, monkeypatch: pytest.MonkeyPatch, proc_slot: int = 0
    ) -> None:
        self.window = window
        self.proc_slot = proc_slot
        self.next_offset = 2 << 20
        self.zones: dict[str, FakeMemzone] = {}
        self.freed: list[str] = []
        self.objects: dict[int, tuple[str, int, int, int, int]] = {}
        monkeypatch.setattr(_ext, "object_add", self._object_add, raising=False)
        monkeypatch.setattr(_ext, "object_lookup", self._object_lookup, raising=False)
        monkeypatch.setattr(_ext, "object_remove", self._object_remove, raising=False)
        monkeypatch.setattr(_ext, "memzone", self._memzone, raising=False)

    def _largest_block(self, socket_id: int) -> int:
        return self.window.size - (2 << 20)

    def _check_primary(self) -> None:
        """A fake has no primary to lose."""

    # memzones
    def memzone_reserve(
        self,
        name: str,
        length: int,
        socket_id: int = SOCKET_ID_ANY,
        flags: int = 0,
        align: int = 64,
        bound: int = 0,
    ) -> FakeMemzone:
        if name in self.zones:
            raise FileExistsError(errno.EEXIST, f"memzone {name} exists")
        off = (self.next_offset + align - 1) // align * align
        if off + length > self.window.size:
            raise MemoryError("fake window full")
        self.next_offset = off + length
        mz = FakeMemzone(name, off, length, len(self.zones) + len(self.freed))
        self.zones[name] = mz
        return mz

    def memzone_lookup(self, name: str) -> FakeMemzone:
        try:
            return self.zones[name]
        except KeyError:
            raise MemdKeyError(f"no memzone named {name!r}") from None

    def _memzone(
        self, win: _ext.Window, zid: int
    ) -> tuple[int, str, int, int, int, int, int, int, int, int] | None:
        """_ext.memzone's tuple for one of our zones (None once freed)."""
        for z in self.zones.values():
            if z.id == zid:
                return (z.id, z.name, z.offset, 0, z.length, 0, 0, 0, z.owner_pid, z.generation)
        return None

    def memzone_free(self, mz: FakeMemzone) -> None:
        del self.zones[mz.name]
        self.freed.append(mz.name)

    # the shared object directory
    def _object_add(
        self, win: _ext.Window, name: str, type_: int, mz_id: int, offset: int, pid: int
    ) -> int:
        assert win is self.window
        if any(o[0] == name and o[1] == type_ for o in self.objects.values()):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        idx = max(self.objects, default=-1) + 1
        self.objects[idx] = (name, type_, offset, mz_id, pid)
        return idx

    def _object_lookup(self, win: _ext.Window, name: str, type_: int) -> tuple[int, int, int]:
        for idx, (n, t, off, mz_id, _pid) in self.objects.items():
            if n == name and t == type_:
                return idx, off, mz_id
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def _object_remove(self, win: _ext.Window, idx: int) -> None:
        del self.objects[idx]
