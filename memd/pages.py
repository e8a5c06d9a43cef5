"""The files behind pages: hugetlbfs files (`<huge-dir>/<prefix>map_<n>`) or, with
--no-huge, POSIX shared-memory objects (`/dev/shm/<prefix>map_<n>`).  Only the
primary creates and removes them; secondaries open them to map the same pages."""

from __future__ import annotations

import contextlib
import glob
import os

import posix_ipc

from memd import _ext
from memd.paths import huge_page_path, page_file_number, shm_page_name
from memd.shared import MemsegList


class PageStore:
    def __init__(self, prefix: str, mode: int = 0o600, gid: int | None = None) -> None:
        self.prefix = prefix
        self.mode = mode
        self.gid = gid

    def _number(self, msl: MemsegList, slot: int) -> int:
        return page_file_number(msl.index, slot, _ext.MAX_PAGES_PER_LIST)

    def describe(self, msl: MemsegList, slot: int) -> str:
        n = self._number(msl, slot)
        if msl.dir:
            return huge_page_path(msl.dir, self.prefix, n)
        return "/dev/shm" + shm_page_name(self.prefix, n)

    def create(self, msl: MemsegList, slot: int) -> int:
        """Create the page's file (exclusively) sized to one page; returns an fd."""
        n = self._number(msl, slot)
        if msl.dir:
            path = huge_page_path(msl.dir, self.prefix, n)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.mode)
            try:
                os.ftruncate(fd, msl.page_size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            shm = posix_ipc.SharedMemory(shm_page_name(self.prefix, n), posix_ipc.O_CREX,
                                         mode=self.mode, size=msl.page_size)
            fd = os.dup(shm.fd)
            shm.close_fd()
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)
        return fd

    def open(self, msl: MemsegList, slot: int) -> int:
        n = self._number(msl, slot)
        if msl.dir:
            return os.open(huge_page_path(msl.dir, self.prefix, n), os.O_RDWR | os.O_CLOEXEC)
        shm = posix_ipc.SharedMemory(shm_page_name(self.prefix, n))
        fd = os.dup(shm.fd)
        shm.close_fd()
        return fd

    def remove(self, msl: MemsegList, slot: int) -> None:
        n = self._number(msl, slot)
        with contextlib.suppress(FileNotFoundError, posix_ipc.ExistentialError):
            if msl.dir:
                os.unlink(huge_page_path(msl.dir, self.prefix, n))
            else:
                posix_ipc.unlink_shared_memory(shm_page_name(self.prefix, n))

    def remove_stale(self, huge_dirs: list[str]) -> int:
        """Remove every page file of this prefix (a dead primary's leftovers).
        Only called while holding the config lock, so no live primary owns them."""
        patterns = [huge_page_path(d, self.prefix, 0)[:-1] + "*" for d in huge_dirs]
        patterns.append("/dev/shm" + shm_page_name(self.prefix, 0)[:-1] + "*")
        removed = 0
        for pattern in patterns:
            for path in glob.glob(pattern):
                if not path.rsplit("map_", 1)[-1].isdigit():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
        return removed
