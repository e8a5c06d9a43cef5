"""Memzones across real processes (DPDK rte_memzone_*)."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest

import memd_client as mc
from memd import _ext
from memd.errors import MemdMemoryError, MemdValueError
from memd.testing import Daemon, result, run_secondary


def test_written_by_one_process_read_by_another(daemon: Daemon) -> None:
    run_secondary(
        daemon,
        """
        mz = mem.memzone_reserve("shared-zone", 1 << 20)
        mz.buf[:] = bytes(range(256)) * 4096
        out(mz.offset)
    """,
    )
    res = result(
        run_secondary(
            daemon,
            """
        mz = mem.memzone_lookup("shared-zone")
        out([mz.length, bytes(mz.buf[:4]).hex(), bytes(mz.buf[-2:]).hex(),
             sum(mz.buf[:256]), mz.offset])
    """,
        )
    )
    assert res[:4] == [1 << 20, "00010203", "feff", sum(range(256))]
    # every process may map the window at a different address; the offset is the same
    with daemon.attach() as mem:
        assert mem.memzone_lookup("shared-zone").offset == res[4]


def test_alignment_and_bound_hold_for_random_requests(daemon: Daemon) -> None:
    rng = random.Random(2)
    with daemon.attach() as mem:
        zones = []
        for i in range(200):
            length = rng.choice([1, 63, 64, 100, 4096, 5000, 65536, 300000])
            align = 1 << rng.randint(6, 16)
            fits = 1 << (length - 1).bit_length()  # the smallest power of two >= length
            bound = 0 if rng.random() < 0.5 else max(1 << rng.randint(6, 20), fits)
            if bound and align > bound:
                align = bound
            mz = mem.memzone_reserve(f"z{i}", length, align=align, bound=bound)
            assert mz.offset % align == 0, (mz, align)
            if bound:
                assert mz.offset // bound == (mz.offset + length - 1) // bound, (mz, bound)
            zones.append((mz.offset, mz.offset + length))
        zones.sort()
        for (_, a1), (b0, _) in itertools.pairwise(zones):
            assert a1 <= b0, "memzones overlap"
        assert len(mem.memzones()) == 200


def test_bad_requests_raise_and_daemon_keeps_serving(daemon: Daemon) -> None:
    with daemon.attach() as mem:
        mem.memzone_reserve("taken", 100)
        with pytest.raises(FileExistsError):
            mem.memzone_reserve("taken", 100)
        with pytest.raises(ValueError, match="too long"):
            mem.memzone_reserve("x" * 32, 100)
        mem.memzone_reserve("y" * 31, 100)  # exactly the limit works
        with pytest.raises(ValueError, match="power of two"):
            mem.memzone_reserve("badalign", 100, align=96)
        with pytest.raises(ValueError, match="bound"):
            mem.memzone_reserve("badbound", 100, bound=64)
        with pytest.raises(ValueError, match="bound"):
            mem.memzone_reserve("badbound2", 100, bound=100)
        with pytest.raises(ValueError):
            mem.memzone_reserve("neg", -1)
        with pytest.raises(ValueError, match="socket_id"):
            mem.memzone_reserve("nosock", 100, socket_id=7)
        with pytest.raises(MemoryError):
            mem.memzone_reserve("huge", 1 << 45)  # 32 TiB
        for wraps in (2**64, 2**64 + 100, 2**65 + 4096):  # not taken modulo 2**64
            with pytest.raises(MemoryError, match="can never fit"):
                mem.memzone_reserve("wraps", wraps)
        with pytest.raises(KeyError):
            mem.memzone_lookup("absent")
        mz = mem.memzone_lookup("taken")
        mem.memzone_free(mz)
        with pytest.raises(KeyError):
            mem.memzone_free(mz)  # double free is an error, not a corruption
        with pytest.raises(MemdValueError, match="expected a Memzone"):
            mem.memzone_free(None)  # type: ignore[arg-type]  # rte_memzone_free(NULL): EINVAL
        mem.memzone_reserve("taken", 100)  # the name is free again
    # the daemon still serves a new process
    res = result(run_secondary(daemon, "out(mem.memzone_lookup('taken').length)"))
    assert res == 100
    assert daemon.proc.poll() is None


def test_memzone_from_expanded_heap_is_seen_by_others(daemon: Daemon) -> None:
    # 8 MB are preallocated: 20 MB forces the primary to map pages and sync everyone
    with daemon.attach() as watcher:
        run_secondary(
            daemon,
            """
            mz = mem.memzone_reserve("big", 20 << 20)
            mz.buf[-1] = 0x5A
        """,
        )
        mz = watcher.memzone_lookup("big")
        assert mz.buf[-1] == 0x5A
        assert mc.SOCKET_ID_ANY == -1


DPDK_MEMZONE_H = Path("/usr/include/dpdk/rte_memzone.h")  # libdpdk-dev (CI installs it)


def test_memzone_flags_have_dpdks_values() -> None:
    if DPDK_MEMZONE_H.exists():
        text = DPDK_MEMZONE_H.read_text()
        want = {
            m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"#define RTE_(MEMZONE_\w+)\s+(0x[0-9a-fA-F]+)", text)
        }
    else:  # the values of DPDK 22.11's rte_memzone.h
        want = {
            "MEMZONE_2MB": 0x1,
            "MEMZONE_1GB": 0x2,
            "MEMZONE_16MB": 0x100,
            "MEMZONE_16GB": 0x200,
            "MEMZONE_256KB": 0x10000,
            "MEMZONE_256MB": 0x20000,
            "MEMZONE_512MB": 0x40000,
            "MEMZONE_4GB": 0x80000,
            "MEMZONE_SIZE_HINT_ONLY": 0x4,
            "MEMZONE_IOVA_CONTIG": 0x100000,
        }
    assert len(want) == 10
    assert {name: getattr(mc, name) for name in want} == want


def test_page_size_flags_pick_pages_or_fail(daemon: Daemon) -> None:
    """DPDK semantics: a page-size flag takes pages of that size (growing the heap
    with them if needed) or fails; SIZE_HINT_ONLY falls back to any size."""
    with daemon.attach() as mem:
        sizes = {s["page_size"] for s in mem.memsegs()}
        assert sizes == {2 << 20}  # this host: 2 MB hugepages, or --no-huge's 2 MB chunks
        mz = mem.memzone_reserve("two", 4096, flags=mc.MEMZONE_2MB)
        assert mz.page_size == 2 << 20
        # beyond the 8 MB preallocated: growth asked for 2 MB pages, from this secondary
        big = mem.memzone_reserve("big", 12 << 20, flags=mc.MEMZONE_2MB)
        assert big.page_size == 2 << 20 and big.length == 12 << 20
        big.buf[-1] = 7
        either = mem.memzone_reserve("either", 4096, flags=mc.MEMZONE_2MB | mc.MEMZONE_1GB)
        assert either.page_size == 2 << 20
        for flag, text in [(mc.MEMZONE_1GB, "1 GB"), (mc.MEMZONE_16MB, "16 MB")]:
            with pytest.raises(MemdMemoryError, match=f"no {text} pages"):
                mem.memzone_reserve("nope", 4096, flags=flag)
            hinted = mem.memzone_reserve(
                f"hint{flag}", 4096, flags=flag | mc.MEMZONE_SIZE_HINT_ONLY
            )
            assert hinted.page_size == 2 << 20
            assert hinted.flags == flag | mc.MEMZONE_SIZE_HINT_ONLY
        with pytest.raises(KeyError):
            mem.memzone_lookup("nope")  # a failed reserve leaves nothing
        with pytest.raises(MemdValueError, match="unknown memzone flags"):
            mem.memzone_reserve("bad", 4096, flags=0x8)
        _ext.heap_check(mem.window, 0)
    res = result(run_secondary(daemon, "out(mem.memzone_lookup('big').buf[-1])"))
    assert res == 7


def test_length_zero_reserves_the_biggest_free_block(daemon: Daemon) -> None:
    """DPDK's len 0: the biggest block there is now (no growth), or the bound's
    size with a bound; the zone's length is what it got."""
    with daemon.attach() as mem:
        mapped = mem.info()["mapped_bytes"]
        greatest = mem.heap_stats()["greatest_free_size"]
        mz = mem.memzone_reserve("all", 0, align=1 << 20)
        assert mz.offset % (1 << 20) == 0
        assert greatest - (2 << 20) < mz.length <= greatest  # all but alignment slack
        mz.buf[-1] = 1  # the whole length is usable
        assert mem.heap_stats()["greatest_free_size"] < greatest - mz.length + (1 << 20)
        bounded = mem.memzone_reserve("bounded", 0, bound=4096)
        assert bounded.length == 4096
        assert bounded.offset // 4096 == (bounded.offset + 4095) // 4096
        contig = mem.memzone_reserve("contig", 0, flags=mc.MEMZONE_IOVA_CONTIG)
        assert contig.length > 0
        assert _ext.iova_contig(mem.window, contig.offset, contig.length)
        # keep taking the biggest until nothing is left: then it fails, without growing
        rest = [contig]
        with pytest.raises(MemdMemoryError):
            for i in range(1000):
                rest.append(mem.memzone_reserve(f"rest{i}", 0))
        assert rest and all(z.length > 0 for z in rest)
        assert mem.info()["mapped_bytes"] == mapped
        _ext.heap_check(mem.window, 0)
        for z in [mz, bounded, *rest]:
            mem.memzone_free(z)
        assert mem.memzones() == []


def test_alignment_past_the_page_size_holds_in_every_process(daemon: Daemon) -> None:
    """Every process places its window at a multiple of MAX_ALIGN, so an aligned
    offset is an aligned address everywhere; the IOVA is aligned too, or (IOVA =
    physical address, no page at such an address) the request fails saying why."""
    code = """
    import memd_client as mc
    from memd.errors import MemdMemoryError
    got = []
    for align in (4 << 20, 16 << 20):
        try:
            b = mem.malloc(1000, align=align)
            z = mem.memzone_reserve(f"z{align}", 1000, align=align)
        except MemdMemoryError as e:
            assert "physical address" in str(e), e
            continue
        got.append([align, b.offset, b.iova, z.name])
        assert (mem.window.address + b.offset) % align == 0
        assert (mem.window.address + z.offset) % align == 0
    out([got, mem.info()["iova_mode"]])
    """
    got, iova_mode = result(run_secondary(daemon, code))
    if iova_mode == "VA":
        assert len(got) == 2  # always possible when IOVA is the virtual address
    with daemon.attach() as mem:  # another process, another window address
        assert mem.window.address % _ext.MAX_ALIGN == 0
        for align, offset, iova, zname in got:
            assert iova % align == 0
            z = mem.memzone_lookup(zname)
            assert (mem.window.address + z.offset) % align == 0 and z.iova % align == 0
            assert offset % align == 0
        with pytest.raises(MemdValueError, match="larger than 1 GiB"):
            mem.malloc(100, align=2 << 30)
        with pytest.raises(MemdValueError, match="larger than 1 GiB"):
            mem.memzone_reserve("toobig", 100, align=2 << 30)


def test_contiguous_zones_start_where_a_contiguous_run_does(daemon: Daemon) -> None:
    """MEMZONE_IOVA_CONTIG looks past a free element's first position for a run of
    physically contiguous pages (DPDK's malloc_elem_find_max_iova_contig): with
    IOVA = PA it used to fail for 2 MB and more whenever the first page of the free
    memory did not start such a run."""
    with daemon.attach() as mem:
        va = mem.info()["iova_mode"] == "VA"
        segs = sorted((s["offset"], s["iova"]) for s in mem.memsegs())
        run = best = 1
        for (o1, i1), (o2, i2) in itertools.pairwise(segs):
            ok = not va and o2 == o1 + (2 << 20) and i2 == i1 + (2 << 20)
            run = run + 1 if ok else 1
            best = max(best, run)
        if va or best >= 2:
            z = mem.memzone_reserve("contig", 2 << 20, flags=mc.MEMZONE_IOVA_CONTIG)
            assert _ext.iova_contig(mem.window, z.offset, z.length)
            mem.memzone_free(z)
        zero = mem.memzone_reserve("biggest", 0, flags=mc.MEMZONE_IOVA_CONTIG)
        assert _ext.iova_contig(mem.window, zero.offset, zero.length)
        if not va:  # the biggest contiguous block spans the longest run, less its header
            assert zero.length > (best - 1) * (2 << 20)
        _ext.heap_check(mem.window, 0)
