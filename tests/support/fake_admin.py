"""A stand-in for the primary's memory object, with the names memd/admin/api.py reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20


@dataclass
class FakeZone:
    id: int
    name: str
    offset: int
    length: int
    socket_id: int = 0
    iova: int | None = None
    page_size: int = 2 * MiB
    flags: int = 0


@dataclass
class FakeRing:
    name: str
    size: int = 1024
    count: int = 0
    flags: int = 0
    esize: int = 8

    @property
    def capacity(self) -> int:
        return self.size - 1

    @property
    def free_count(self) -> int:
        return self.capacity - self.count


@dataclass
class FakePool:
    name: str
    n: int = 1023
    elt_size: int = 2048
    cache_size: int = 32
    private_data_size: int = 0
    flags: int = 0
    used: int = 0

    def avail_count(self) -> int:
        return self.n - self.used

    def in_use_count(self) -> int:
        return self.used


@dataclass
class FakeMem:
    prefix: str = "fake"
    zones: list[FakeZone] = field(default_factory=list)
    ring_list: list[FakeRing] = field(default_factory=list)
    pool_list: list[FakePool] = field(default_factory=list)
    segs: list[dict[str, Any]] = field(default_factory=list)
    procs: list[dict[str, Any]] = field(default_factory=list)
    heaps: dict[int, dict[str, int]] = field(default_factory=dict)
    reclaims: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def populated(cls, n_zones: int = 3, n_segs: int = 8) -> FakeMem:
        m = cls()
        page = 2 * MiB
        m.segs = [
            {
                "list_index": 0,
                "slot": i,
                "offset": i * page,
                "iova": 0x100000000 + i * page,
                "length": page,
                "socket_id": 0,
                "page_size": page,
                "prealloc": i < 2,
            }
            for i in range(n_segs)
        ]
        m.heaps = {
            0: {
                "heap_totalsz_bytes": n_segs * page,
                "heap_freesz_bytes": 5 * MiB,
                "heap_allocsz_bytes": n_segs * page - 5 * MiB,
                "greatest_free_size": 4 * MiB,
                "free_count": 2,
                "alloc_count": 7,
            }
        }
        m.zones = [
            FakeZone(
                i,
                f"zone_{i}",
                offset=i * 3 * MiB + 128,
                length=3 * MiB,
                iova=0x100000000 + i * 3 * MiB,
            )
            for i in range(n_zones)
        ]
        m.ring_list = [
            FakeRing("rx", size=1024, count=10, flags=0),
            FakeRing("tx", size=512, count=0, flags=3, esize=24),
        ]
        m.pool_list = [FakePool("mbuf_pool", used=100)]
        m.procs = [
            {
                "slot": 0,
                "pid": os.getpid(),
                "role": "primary",
                "start_time": 1,
                "attach_time": 1_700_000_000.5,
                "comm": "memd",
            },
            {
                "slot": 1,
                "pid": 4242,
                "role": "secondary",
                "start_time": 2,
                "attach_time": 1_700_000_100.0,
                "comm": "worker",
            },
        ]
        m.reclaims = [
            {
                "pid": 4242,
                "slot": 3,
                "time": 0.0,
                "cached_objects_returned": 7,
                "mempool_objects_in_hand": {"mbuf_pool": 2},
                "heap_blocks": 1,
                "heap_bytes": 64,
                "heap_freed": False,
                "pins_dropped": False,
                "half_made_freed": [],
                "moving_objects_returned": 13,
            },
            {
                "pid": 4243,
                "slot": 4,
                "time": 0.0,
                "cached_objects_returned": 0,
                "mempool_objects_in_hand": {},
                "heap_blocks": 0,
                "heap_bytes": 0,
                "heap_freed": False,
                "pins_dropped": False,
                "half_made_freed": [],
                "moving_objects_returned": None,
            },
        ]
        return m

    def info(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "primary_pid": os.getpid(),
            "page_sizes": [2 * MiB],
            "sockets": [0],
            "iova_mode": "VA",
            "no_huge": True,
            "legacy_mem": False,
            "runtime_dir": "/tmp/x",
            "huge_dirs": [],
            "config_path": "/tmp/x/.fake_config",
        }

    def heap_ids(self) -> list[int]:
        return sorted(self.heaps)

    def heap_stats(self, socket_id: int) -> dict[str, int]:
        return self.heaps[socket_id]

    def memzones(self) -> list[FakeZone]:
        return list(self.zones)

    def memsegs(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.segs]

    def processes(self, usage: bool = False) -> list[dict[str, Any]]:
        return [dict(p) for p in self.procs]

    def rings(self) -> list[FakeRing]:
        return list(self.ring_list)

    def mempools(self) -> list[FakePool]:
        return list(self.pool_list)

    def ring_listing(self) -> list[FakeRing]:
        return self.rings()

    def mempool_listing(self) -> list[FakePool]:
        return self.mempools()

    def params(self) -> list[str]:
        return ["memd", "--no-huge", "--file-prefix", self.prefix, "-m", "64"]
