"""Physical memory as root: --legacy-mem sorts pages by physical address into
contiguous memsegs, and every recorded iova is the page's real physical address,
checked from another process's own /proc/self/pagemap."""

from __future__ import annotations

import itertools
import os
import textwrap

import pytest

from memd.testing import Daemon, result, run_secondary

CHECK_IOVAS = textwrap.dedent("""
    import struct
    segs = mem.memsegs()
    runs = mem.memseg_runs()
    base = mem.window.address
    real = []
    with open("/proc/self/pagemap", "rb") as pm:
        for s in segs:
            mem.view(s["offset"], 1)[0]            # fault the page in here
            va = base + s["offset"]
            pm.seek(va // 4096 * 8)
            entry = struct.unpack("<Q", pm.read(8))[0]
            real.append((entry & ((1 << 55) - 1)) * 4096 if entry >> 63 else None)
    out({"segs": segs, "runs": runs, "real": real, "mode": mem.info()["iova_mode"]})
""")


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("physical addresses need root (CAP_SYS_ADMIN)")


@pytest.mark.hugepages
@pytest.mark.parametrize("mode", ["huge"], indirect=True)
def test_legacy_memsegs_are_sorted_contiguous_and_real(daemon_factory, root_only) -> None:
    d: Daemon = daemon_factory("--legacy-mem", "-m", "32")
    res = result(run_secondary(d, CHECK_IOVAS))
    assert res["mode"] == "PA"
    segs, runs, real = res["segs"], res["runs"], res["real"]
    assert len(segs) == 16
    assert [s["iova"] for s in segs] == real, "recorded iova is not the physical address"
    assert all(s["iova"] % s["page_size"] == 0 and s["prealloc"] for s in segs)
    iovas = [s["iova"] for s in segs]
    assert iovas == sorted(iovas), "pages are not in physical order"
    for run in runs:  # each run is contiguous both ways ...
        first = next(s for s in segs if s["offset"] == run["offset"])
        assert run["iova"] == first["iova"]
        assert run["length"] == run["n_pages"] * run["page_size"]
    for a, b in itertools.pairwise(runs):  # ... and runs are really separate
        assert a["iova"] + a["length"] != b["iova"] or a["offset"] + a["length"] != b["offset"]
    # window-adjacent pages are physically adjacent too (the hole between runs)
    for a, b in itertools.pairwise(segs):
        if a["offset"] + a["page_size"] == b["offset"]:
            assert a["iova"] + a["page_size"] == b["iova"]


@pytest.mark.hugepages
@pytest.mark.parametrize("mode", ["huge"], indirect=True)
def test_dynamic_mode_records_real_physical_addresses(daemon_factory, root_only) -> None:
    d: Daemon = daemon_factory("-m", "8")
    res = result(run_secondary(d, "blk = mem.malloc(12 << 20)\n" + CHECK_IOVAS))
    assert res["mode"] == "PA"
    assert len(res["segs"]) >= 10
    assert [s["iova"] for s in res["segs"]] == res["real"]


@pytest.mark.parametrize("mode", ["nohuge"], indirect=True)
def test_no_huge_is_iova_va(daemon_factory) -> None:
    d: Daemon = daemon_factory("-m", "4")
    res = result(run_secondary(d, "out(mem.info()['iova_mode'])"))
    assert res == "VA"
