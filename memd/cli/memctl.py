"""memctl: look at a running memd (and at the machine's hugepages).

memctl is a client of the daemon's admin socket (DPDK telemetry v2, memd/admin/telemetry.py):
everything it shows comes from the same commands ``dpdk-telemetry.py`` can send.
Human tables by default, ``--json`` for scripts, ``metrics`` for Prometheus.

Exit codes: 0 success, 1 failure (no daemon, permission denied, bad reply: one line
on stderr, never a traceback; ``metrics`` also prints ``memd_up 0``), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from memd._version import __version__
from memd.admin.telemetry import TelemetryClient
from memd.errors import MemdError
from memd.paths import DEFAULT_PREFIX, find_runtime_dir, telemetry_path
from memd.shm.pages import clean_all

__all__ = ["collect", "format_down", "format_metrics", "main", "render"]

PAGE_LIMIT = 10_000  # at most this many round trips when paging a long list


# -- helpers ---------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    """1536 -> '1.5 KiB'; exact multiples without decimals ('2 MiB')."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _hex(n: int | None) -> str:
    return "-" if n is None else f"0x{n:x}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table; numbers right-aligned."""
    body = [[("-" if v is None else str(v)) for v in row] for row in rows]
    raw = [list(headers), *body]
    widths = [max(len(r[i]) for r in raw) for i in range(len(headers))]
    numeric = [all(_numeric(r[i]) for r in body) and bool(body) for i in range(len(headers))]
    lines = []
    for r in raw:
        cells = [
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    if not body:
        lines.append("(none)")
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    if s.replace(".", "", 1).replace("-", "", 1).isdigit():
        return True
    return s.endswith(("B", "KiB", "MiB", "GiB", "TiB")) and s[:1].isdigit()


# -- gathering (one connection, DPDK commands where DPDK has them) -----------------------


def _paged(client: TelemetryClient, cmd: str) -> list[Any]:
    out: list[Any] = []
    for _ in range(PAGE_LIMIT):
        part = client.query(cmd, len(out) or None)
        if not part:
            break
        out.extend(part)
    return out


def _each(client: TelemetryClient, list_cmd: str, info_cmd: str) -> list[dict[str, Any]]:
    out = []
    for key in client.query(list_cmd) or []:
        info = client.query(info_cmd, key)
        if info:  # gone between the two queries: skip it
            out.append(info)
    return out


def collect(client: TelemetryClient, what: str) -> Any:
    """The data behind one memctl command, as plain JSON-ready values."""
    if what == "status":
        return {
            "socket": client.path,
            "greeting": client.greeting,
            "info": client.query("/memd/info") or {},
            "stats": client.query("/memd/stats") or {},
        }
    if what == "memsegs":
        return _paged(client, "/memd/memsegs")
    if what == "processes":
        return _paged(client, "/memd/processes")
    if what == "reclaims":
        return client.query("/memd/reclaims") or []
    if what == "heaps":
        return _each(client, "/eal/heap_list", "/eal/heap_info")
    if what == "memzones":
        return _each(client, "/eal/memzone_list", "/eal/memzone_info")
    if what == "mempools":
        return _each(client, "/mempool/list", "/mempool/info")
    if what == "rings":
        return _each(client, "/ring/list", "/ring/info")
    if what == "metrics":
        return {
            w: collect(client, w)
            for w in ("status", "heaps", "memzones", "mempools", "rings", "processes", "memsegs")
        }
    raise ValueError(what)


# -- rendering ------------------------------------------------------------------------------


def _render_status(d: dict[str, Any]) -> str:
    info, st, g = d["info"], d["stats"], d["greeting"]
    procs = st.get("processes", 0)
    sec = st.get("secondaries", 0)
    rows = [
        ("daemon", f"{g.get('version', '?')}, pid {g.get('pid', '?')}"),
        ("prefix", info.get("prefix", "?")),
        ("admin socket", d["socket"]),
        ("config", info.get("config_path") or "-"),
        ("iova mode", info.get("iova_mode", "?")),
        (
            "memory",
            "no-huge (shared memory)"
            if info.get("no_huge")
            else ("hugepages, legacy" if info.get("legacy_mem") else "hugepages, dynamic"),
        ),
        ("page sizes", ", ".join(human_size(s) for s in info.get("page_sizes", [])) or "-"),
        ("sockets", ", ".join(str(s) for s in info.get("sockets", [])) or "-"),
        (
            "heaps",
            f"{st.get('heaps', 0)}: {human_size(st['heap_totalsz_bytes'])} total, "
            f"{human_size(st.get('heap_freesz_bytes', 0))} free, "
            f"{human_size(st.get('heap_allocsz_bytes', 0))} in "
            f"{st.get('heap_alloc_count', 0)} allocations"
            if "heap_totalsz_bytes" in st
            else f"{st.get('heaps', 0)} (no statistics)",
        ),
        *(
            (f"heap {h}", f"unavailable: {why}")
            for h, why in st.get("heaps_unavailable", {}).items()
        ),
        ("memsegs", f"{st.get('memsegs', 0)} ({human_size(st.get('memseg_bytes', 0))})"),
        ("memzones", f"{st.get('memzones', 0)} ({human_size(st.get('memzone_bytes', 0))})"),
        ("rings", _count_corrupt(st, "rings")),
        ("mempools", _count_corrupt(st, "mempools")),
        ("processes", f"{procs} ({procs - sec} primary, {sec} secondary)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _count_corrupt(st: dict[str, Any], what: str) -> str:
    bad = st.get(f"{what}_corrupt") or []
    n = str(st.get(what, 0))
    return f"{n} (corrupt: {', '.join(map(str, bad))})" if bad else n


def _render_memsegs(segs: list[dict[str, Any]]) -> str:
    return table(
        ("List", "Slot", "Offset", "IOVA", "Length", "Socket", "Page", "Prealloc"),
        [
            (
                s.get("list_index"),
                s.get("slot"),
                _hex(s.get("offset")),
                _hex(s.get("iova")),
                human_size(s.get("length")),
                s.get("socket_id"),
                human_size(s.get("page_size")),
                "yes" if s.get("prealloc") else "no",
            )
            for s in segs
        ],
    )


def _render_heaps(heaps: list[dict[str, Any]]) -> str:
    return table(
        ("Heap", "Name", "Size", "Free", "Allocated", "Greatest free", "Allocs", "Free elems"),
        [
            (
                h["Heap_id"],
                h["Name"],
                "corrupt" if h.get("corrupt") else "unavailable",
                *(["-"] * 5),
            )
            if "unavailable" in h
            else (
                h["Heap_id"],
                h["Name"],
                human_size(h["Heap_size"]),
                human_size(h["Free_size"]),
                human_size(h["Alloc_size"]),
                human_size(h["Greatest_free_size"]),
                h["Alloc_count"],
                h["Free_count"],
            )
            for h in heaps
        ],
    )


def _render_memzones(zones: list[dict[str, Any]]) -> str:
    return table(
        ("Id", "Name", "Length", "Offset", "IOVA", "Socket", "Page", "Pages", "Flags"),
        [
            (
                z["Zone"],
                z["Name"],
                human_size(z["Length"]),
                z["Address"],
                z.get("IOVA", "-"),
                z["Socket"],
                human_size(z["Hugepage_size"]),
                z["Hugepage_used"],
                _hex(z["Flags"]),
            )
            for z in zones
        ],
    )


def _corrupt_row(d: dict[str, Any], width: int) -> tuple[Any, ...]:
    """A damaged ring's or pool's row: its name, then "corrupt" (nothing else of it
    can be trusted)."""
    return (d["name"], "corrupt", *(["-"] * (width - 2)))


def _render_mempools(pools: list[dict[str, Any]]) -> str:
    return table(
        ("Name", "Size", "Elt size", "Cache", "Avail", "In use", "Private", "Socket", "Flags"),
        [
            _corrupt_row(p, 9)
            if p.get("corrupt")
            else (
                p["name"],
                p["size"],
                human_size(p["elt_size"]),
                p["cache_size"],
                p.get("avail_count"),
                p.get("in_use_count"),
                human_size(p["private_data_size"]),
                p["socket_id"],
                _hex(p["flags"]),
            )
            for p in pools
        ],
    )


def _render_rings(rings: list[dict[str, Any]]) -> str:
    return table(
        ("Name", "Capacity", "Used", "Free", "Size", "Esize", "Prod", "Cons", "Socket", "Flags"),
        [
            _corrupt_row(r, 10)
            if r.get("corrupt")
            else (
                r["name"],
                r["capacity"],
                r["used_count"],
                r.get("free_count"),
                r["size"],
                r.get("esize"),
                r["producer_type"],
                r["consumer_type"],
                r["socket"],
                _hex(r["flags"]),
            )
            for r in rings
        ],
    )


def _render_processes(procs: list[dict[str, Any]]) -> str:
    def when(t: float | None) -> str:
        if not t:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    # a heap that could not be walked: the counts above leave it out
    missing: dict[str, str] = next(
        (p["heaps_unavailable"] for p in procs if p.get("heaps_unavailable")), {}
    )
    notes = "".join(f"\nheap {h} not counted: {why}" for h, why in missing.items())
    return (
        table(
            (
                "Slot",
                "PID",
                "Role",
                "Command",
                "Attached",
                "Blocks",
                "Heap bytes",
                "Memzones",
                "Objects",
            ),
            [
                (
                    p.get("slot", "-") if p.get("slot") is not None else "-",
                    p.get("pid"),
                    p.get("role"),
                    p.get("comm") or "-",
                    when(p.get("attach_time")),
                    p.get("heap_blocks", "-"),
                    human_size(p.get("heap_bytes")),
                    p.get("memzones", "-"),
                    p.get("mempool_objects", "-"),
                )
                for p in procs
            ],
        )
        + notes
    )


def _render_reclaims(records: list[dict[str, Any]]) -> str:
    return table(
        (
            "Died",
            "PID",
            "Slot",
            "Cache returned",
            "In flight returned",
            "Objects in hand",
            "Blocks",
            "Heap bytes",
            "Freed",
        ),
        [
            (
                time.strftime("%H:%M:%S", time.localtime(r.get("time", 0))),
                r.get("pid"),
                r.get("slot"),
                r.get("cached_objects_returned", 0),
                "busy"
                if r.get("moving_objects_returned", 0) is None
                else r.get("moving_objects_returned", 0),
                ", ".join(f"{k} {v}" for k, v in r.get("mempool_objects_in_hand", {}).items())
                or "0",
                r.get("heap_blocks", 0),
                human_size(r.get("heap_bytes", 0)),
                "yes" if r.get("heap_freed") else "no",
            )
            for r in records
        ],
    )


RENDERERS: dict[str, Callable[[Any], str]] = {
    "status": _render_status,
    "memsegs": _render_memsegs,
    "heaps": _render_heaps,
    "memzones": _render_memzones,
    "mempools": _render_mempools,
    "rings": _render_rings,
    "processes": _render_processes,
    "reclaims": _render_reclaims,
}


def render(what: str, data: Any) -> str:
    """The human table for the output of :func:`collect`."""
    return RENDERERS[what](data)


# -- Prometheus text exposition --------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
        self._order: list[str] = []
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[str]] = {}

    def add(
        self,
        name: str,
        help_text: str,
        value: float | int | None,
        labels: dict[str, object] | None = None,
        kind: str = "gauge",
    ) -> None:
        if value is None:
            return
        name = f"memd_{name}"
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (help_text, kind)
            self._samples[name] = []
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"
        number = int(value) if isinstance(value, bool) else value
        self._samples[name].append(f"{name}{lab} {number}")

    def text(self) -> str:
        out = []
        for name in self._order:
            help_text, kind = self._meta[name]
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(self._samples[name])
        return "\n".join(out) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


UP_HELP = "1 if memd answered on its admin socket"


def format_down() -> str:
    """What `memctl metrics` prints when no daemon answers: memd_up 0, so that a
    textfile collector reports the daemon down instead of keeping its last figures."""
    m = _Metrics()
    m.add("up", UP_HELP, 0)
    return m.text()


def format_metrics(data: dict[str, Any]) -> str:
    """Prometheus text format (version 0.0.4) of the figures memctl shows."""
    m = _Metrics()
    status = data["status"]
    info, st, g = status["info"], status["stats"], status["greeting"]
    m.add("up", UP_HELP, 1)
    m.add(
        "info",
        "memd's configuration as labels",
        1,
        {
            "version": g.get("version", ""),
            "prefix": info.get("prefix", ""),
            "iova_mode": info.get("iova_mode", ""),
            "no_huge": str(bool(info.get("no_huge"))).lower(),
            "legacy_mem": str(bool(info.get("legacy_mem"))).lower(),
        },
    )
    m.add("primary_pid", "process id of the primary", info.get("primary_pid", g.get("pid")))
    for h in data["heaps"]:
        lab = {"heap": h["Heap_id"], "name": h["Name"]}
        m.add("heap_corrupt", "1 if the heap was found damaged", int(bool(h.get("corrupt"))), lab)
        if "unavailable" in h:  # corrupt, or busy behind a stopped process
            continue
        m.add("heap_size_bytes", "heap size", h["Heap_size"], lab)
        m.add("heap_free_bytes", "free bytes in the heap", h["Free_size"], lab)
        m.add("heap_allocated_bytes", "allocated bytes in the heap", h["Alloc_size"], lab)
        m.add("heap_greatest_free_bytes", "largest free element", h["Greatest_free_size"], lab)
        m.add("heap_allocations", "allocated elements", h["Alloc_count"], lab)
        m.add("heap_free_elements", "free elements", h["Free_count"], lab)
    segs: dict[tuple[int, int], list[int]] = {}
    for s in data["memsegs"]:
        agg = segs.setdefault((s.get("socket_id", -1), s.get("page_size", 0)), [0, 0])
        agg[0] += 1
        agg[1] += int(s.get("length", 0))
    m.add("memsegs", "mapped memsegs", len(data["memsegs"]))
    for (sock, page), (count, nbytes) in sorted(segs.items()):
        lab = {"socket": sock, "page_size": page}
        m.add("memseg_pages", "mapped pages by socket and page size", count, lab)
        m.add("memseg_bytes", "mapped bytes by socket and page size", nbytes, lab)
    m.add("memzones", "reserved memzones", len(data["memzones"]))
    for z in data["memzones"]:
        m.add(
            "memzone_length_bytes",
            "length of a memzone",
            z["Length"],
            {"name": z["Name"], "socket": z["Socket"]},
        )
    m.add("rings", "rings", len(data["rings"]))
    for r in data["rings"]:
        lab = {"ring": r["name"]}
        m.add("ring_corrupt", "1 if the ring is damaged", int(bool(r.get("corrupt"))), lab)
        if r.get("corrupt"):
            continue
        m.add("ring_capacity", "usable entries of a ring", r["capacity"], lab)
        m.add("ring_used", "entries in a ring", r["used_count"], lab)
        m.add("ring_free", "free entries of a ring", r.get("free_count"), lab)
    m.add("mempools", "mempools", len(data["mempools"]))
    for p in data["mempools"]:
        lab = {"mempool": p["name"]}
        m.add("mempool_corrupt", "1 if the mempool is damaged", int(bool(p.get("corrupt"))), lab)
        if p.get("corrupt"):
            continue
        m.add("mempool_size", "objects in a mempool", p["size"], lab)
        m.add("mempool_available", "free objects of a mempool", p.get("avail_count"), lab)
        m.add("mempool_in_use", "objects in use", p.get("in_use_count"), lab)
        m.add("mempool_element_bytes", "object size", p["elt_size"], lab)
    roles: dict[str, int] = {"primary": 0, "secondary": 0}
    for p in data["processes"]:
        roles[str(p.get("role"))] = roles.get(str(p.get("role")), 0) + 1
    for role, count in roles.items():
        m.add("processes", "attached processes by role", count, {"role": role})
    m.add(
        "admin_requests_total",
        "admin socket requests served",
        st.get("admin_requests"),
        kind="counter",
    )
    m.add(
        "admin_connections_total",
        "admin socket connections accepted",
        st.get("admin_connections"),
        kind="counter",
    )
    m.add(
        "admin_refused_total",
        "admin socket connections refused",
        st.get("admin_refused"),
        kind="counter",
    )
    m.add("admin_clients", "admin socket clients connected", st.get("admin_clients"))
    return m.text()


# -- hugepages (no daemon needed) ------------------------------------------------------------


def _hugepages(args: argparse.Namespace) -> int:
    try:
        ha = importlib.import_module("memd.cli.hugepages_admin")
    except ImportError:
        print(
            "memctl: hugepages: memd.cli.hugepages_admin is not part of this installation",
            file=sys.stderr,
        )
        return 1
    if args.reserve is not None:
        kw: dict[str, Any] = {"size": args.reserve, "node": args.node}
        if args.page_size:
            kw["page_size"] = args.page_size
        r = ha.reserve(**kw)
        if args.json:
            print(json.dumps(dict(r._asdict())))
        else:
            where = "" if r.node is None else f" on node {r.node}"
            print(f"nr_hugepages {r.previous} -> {r.got} ({human_size(r.page_size)} pages{where})")
        return 0
    if args.mount is not None:
        kw = {"page_size": args.page_size} if args.page_size else {}
        did = ha.mount(args.mount, **kw)
        print(
            json.dumps({"mounted": did, "path": args.mount})
            if args.json
            else f"{'mounted hugetlbfs at' if did else 'already mounted:'} {args.mount}"
        )
        return 0
    if args.clean:
        report = clean_all()
        if args.json:
            print(json.dumps(report.as_dict(), indent=2))
            return 0
        print(
            f"freed {len(report.removed)} page files ({human_size(report.bytes_freed)}) of "
            "dead memd instances"
        )
        for path, who in report.held:
            print(f"kept {path}: mapped by {', '.join(map(str, who)) or 'a live process'}")
        for path, why in report.skipped:
            print(f"skipped {path}: {why}")
        return 0
    if args.clear:
        results = ha.clear()
        if args.json:
            print(json.dumps([dict(r._asdict()) for r in results]))
        else:
            for r in results:
                print(f"nr_hugepages {r.previous} -> {r.got} ({human_size(r.page_size)} pages)")
        return 0
    rows = ha.show()
    if args.json:
        print(json.dumps([dict(r._asdict(), mounts=list(r.mounts)) for r in rows], indent=2))
    else:
        print(ha.format_rows(rows))
    return 0


# -- command line ----------------------------------------------------------------------------

DAEMON_COMMANDS = (
    "status",
    "memsegs",
    "heaps",
    "memzones",
    "mempools",
    "rings",
    "processes",
    "reclaims",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memctl", description="Inspect a running memd through its admin socket."
    )
    p.add_argument("--version", action="version", version=f"memctl (memd) {__version__}")
    p.add_argument(
        "--file-prefix", default=None, help=f"memd instance to talk to (default {DEFAULT_PREFIX!r})"
    )
    p.add_argument(
        "--runtime-dir",
        default=None,
        help="memd's runtime directory (default: $RUNTIME_DIRECTORY, /var/run "
        "as root, else $XDG_RUNTIME_DIR or /tmp, or /var/run when the instance is "
        "there and not in those)",
    )
    p.add_argument(
        "-i",
        "--instance",
        type=int,
        default=0,
        help="admin socket instance (the N of dpdk_telemetry.v2:N)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    # the same options after the command too (memctl status --json); SUPPRESS keeps a
    # value given before the command from being reset by the subparser's default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file-prefix", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--runtime-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "-i", "--instance", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (
        ("status", "summary of the daemon"),
        ("memsegs", "mapped pages"),
        ("heaps", "malloc heaps"),
        ("memzones", "memzones"),
        ("mempools", "mempools"),
        ("rings", "rings"),
        ("processes", "attached processes and what each holds"),
        ("reclaims", "what was reclaimed from dead secondaries"),
        ("metrics", "Prometheus text exposition"),
    ):
        sub.add_parser(name, help=text, description=text, parents=[common])
    t = sub.add_parser(
        "telemetry",
        help="send one raw telemetry command",
        parents=[common],
        description="Send one telemetry command (e.g. /eal/heap_info,0) and print the reply.",
    )
    t.add_argument("cmd", metavar="CMD", help="a command such as /eal/heap_list or /help,/")
    h = sub.add_parser(
        "hugepages",
        help="show, reserve or mount hugepages",
        parents=[common],
        description="Show hugepages per size and NUMA node (default), or "
        "reserve/mount/clear them (root).",
    )
    act = h.add_mutually_exclusive_group()
    act.add_argument("--reserve", metavar="SIZE", help="set the pool to SIZE (e.g. 1G)")
    act.add_argument("--mount", metavar="DIR", help="mount hugetlbfs at DIR")
    act.add_argument("--clear", action="store_true", help="give every hugepage back")
    act.add_argument(
        "--clean",
        action="store_true",
        help="remove the page files of dead memd instances that nobody maps",
    )
    h.add_argument("--node", type=int, default=None, help="--reserve on this NUMA node")
    h.add_argument("--page-size", default=None, help="page size for --reserve/--mount (2M)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "hugepages":
        if args.node is not None and args.reserve is None:
            print("memctl: hugepages: --node goes with --reserve", file=sys.stderr)
            return 2
        return _hugepages(args)
    prefix = args.file_prefix or DEFAULT_PREFIX
    path = telemetry_path(prefix, find_runtime_dir(prefix, args.runtime_dir), args.instance)
    with TelemetryClient(path) as client:
        if args.command == "telemetry":
            reply = client.raw(args.cmd)
            print(json.dumps(reply) if args.json else json.dumps(reply, indent=2))
            return 0
        if args.command == "metrics":
            sys.stdout.write(format_metrics(collect(client, "metrics")))
            return 0
        data = collect(client, args.command)
    print(json.dumps(data, indent=2) if args.json else render(args.command, data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memctl`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (MemdError, OSError, ValueError) as exc:
        print(f"memctl: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    if args.command == "metrics":  # still exit 1, but a scrape must see the daemon down
        sys.stdout.write(format_down())
    return 1


if __name__ == "__main__":
    sys.exit(main())
