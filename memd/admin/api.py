"""memd's admin API: the commands of the admin socket, free of any transport.

:class:`AdminAPI` answers path-style commands (``/eal/heap_info`` with parameter
``"0"``) with plain JSON-ready values. It knows nothing of sockets: the telemetry
server (memd/admin/telemetry.py) only parses a packet, calls :meth:`AdminAPI.call`, and
encodes the value as ``{"/cmd": value}``. Unit tests call this class directly.

Each command is a method registered with :func:`command`. The first line of its
docstring is the one-line help that ``/help,<cmd>`` returns (under 64 characters,
DPDK's limit); the rest documents the reply. ``python -m memd.admin.api`` prints the
reference generated from these docstrings.

Reply shapes of the ``/eal``, ``/mempool`` and ``/ring`` commands are DPDK's
(22.11 for EAL and mempool; the ``/ring`` commands as DPDK added them in 24.03), so
tools written for DPDK telemetry read memd unchanged. Addresses are offsets into the
shared window (memd stores no pointers). memd's own commands live under ``/memd``.

Errors: a command that cannot answer raises :class:`BadParams` (or any exception);
the transport answers ``{"/cmd": null}`` as DPDK does.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

from memd._version import __version__
from memd.errors import CorruptionError, MemdError, ProtocolError
from memd.shm.config import SOCKET_ID_ANY
from memd.shm.mempool import MEMPOOL_MZ_PREFIX
from memd.shm.ring import RING_F_SC_DEQ, RING_F_SP_ENQ, RING_MZ_PREFIX

__all__ = [
    "CMD_RE",
    "MAX_CMD_LEN",
    "MAX_HELP_LEN",
    "MAX_OUTPUT_LEN",
    "AdminAPI",
    "BadParams",
    "UnknownCommand",
    "command",
]

MAX_CMD_LEN = 56  # DPDK: a command is shorter than this (so at most 55 characters)
MAX_HELP_LEN = 64  # DPDK: help text is shorter than this
MAX_OUTPUT_LEN = 16 * 1024  # DPDK: the largest reply packet
CMD_RE = re.compile(r"/[A-Za-z0-9_/]{0,54}")


VERSION = f"memd {__version__}"  # for /info and the greeting


class UnknownCommand(ProtocolError):
    """No such command."""


class BadParams(ProtocolError):
    """The command exists but its parameters are missing or wrong."""


Handler = Callable[["AdminAPI", "str | None"], Any]


def command(path: str) -> Callable[[Handler], Handler]:
    """Register a method as the handler of ``path`` (its docstring is its help)."""
    if not CMD_RE.fullmatch(path):
        raise ValueError(f"bad command path {path!r}")

    def mark(fn: Handler) -> Handler:
        doc = inspect.getdoc(fn) or ""
        help_line = doc.splitlines()[0] if doc else ""
        if not help_line or len(help_line) >= MAX_HELP_LEN:
            raise ValueError(
                f"{path}: the docstring's first line is the help text "
                f"(1..{MAX_HELP_LEN - 1} characters)"
            )
        fn._memd_command = path  # type: ignore[attr-defined]
        return fn

    return mark


def _int_param(params: str | None, what: str) -> int:
    if params is None or not params.isascii() or not params.isdigit():
        raise BadParams(f"expected a non-negative integer {what}, got {params!r}")
    return int(params)


def _opt_start(params: str | None) -> int:
    return 0 if params is None or params == "" else _int_param(params, "start index")


def _name_param(params: str | None, limit: int = 64) -> str:
    if params is None or params == "" or len(params) >= limit:
        raise BadParams(f"expected a name shorter than {limit} characters")
    return params


def _hex(value: int | None) -> str:
    """DPDK's address strings; RTE_BAD_IOVA (all ones) and None print "Bad IOVA"."""
    if value is None or value < 0 or value >= (1 << 64) - 1:
        return "Bad IOVA"
    return f"0x{value:x}"


def _plain(value: Any) -> Any:
    """Make mem.* results JSON-ready: tuples to lists, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class AdminSource(Protocol):
    """What the admin commands read: `memd.Primary` is one (and the
    tests' stand-in).  Rings, mempools and memzones are read by attribute: a
    ring's ``name``, ``flags``, ``size``, ``capacity``, ``esize``, ``count``,
    ``free_count``; a mempool's ``name``, ``flags``, ``n``, ``cache_size``,
    ``elt_size``, ``private_data_size``, ``avail_count()``, ``in_use_count()``;
    a damaged ring or mempool has only ``name``, ``memzone`` and ``corrupt`` (True);
    a memzone's ``id``, ``name``, ``offset``, ``length``, ``iova``,
    ``page_size``, ``socket_id``, ``flags``."""

    def info(self) -> dict[str, Any]: ...
    def params(self) -> list[str]: ...
    def heap_ids(self) -> list[int]: ...
    def heap_stats(self, socket_id: int) -> dict[str, int]: ...
    def memzones(self) -> Sequence[Any]: ...
    def memsegs(self) -> list[dict[str, Any]]: ...
    def processes(self, usage: bool = False) -> list[dict[str, Any]]: ...
    def ring_listing(self) -> Sequence[Any]: ...  # rings, a damaged one with corrupt=True
    def mempool_listing(self) -> Sequence[Any]: ...  # the same for mempools
    @property
    def reclaims(self) -> Sequence[dict[str, Any]]: ...  # dead secondaries, oldest first


class AdminAPI:
    """The admin commands over the primary's memory (an `AdminSource`).

    ``lock``, if given, is held around every command (the daemon's main thread
    mutates ``mem`` while the admin thread reads it). ``stats_sources`` are extra
    counters merged into ``/memd/stats`` (the telemetry server adds its own).
    """

    def __init__(
        self,
        mem: AdminSource,
        *,
        lock: threading.Lock | threading.RLock | None = None,
        pid: int | None = None,
        version: str = VERSION,
        max_output_len: int = MAX_OUTPUT_LEN,
    ) -> None:
        self.mem = mem
        self.lock = lock
        self.pid = os.getpid() if pid is None else pid
        self.version = version
        self.max_output_len = max_output_len
        self.stats_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self._handlers: dict[str, Handler] = {}
        for klass in reversed(type(self).__mro__):
            for attr in vars(klass).values():
                path = getattr(attr, "_memd_command", None)
                if path:
                    self._handlers[path] = attr

    def _list(self, name: str) -> list[Any]:
        return list(getattr(self.mem, name)())

    def _memzone(self, name: str) -> Any:
        """The memzone named `name` (a ring's or mempool's, by DPDK's prefix), or None."""
        return next((z for z in self._list("memzones") if z.name == name), None)

    # -- dispatch -----------------------------------------------------------------

    def commands(self) -> dict[str, str]:
        """Every command path with its one-line help, in DPDK's (strcmp) order."""
        return {path: self.help_text(path) for path in sorted(self._handlers)}

    def help_text(self, path: str) -> str:
        doc = inspect.getdoc(self._handlers[path]) or ""
        return doc.splitlines()[0]

    def has(self, path: str) -> bool:
        return path in self._handlers

    def call(self, path: str, params: str | None = None) -> Any:
        """Run one command. ``params`` is the text after the first comma, or None.

        Raises UnknownCommand, BadParams, or whatever ``mem`` raised; the transport
        turns every exception into a ``null`` reply.
        """
        handler = self._handlers.get(path)
        if handler is None:
            raise UnknownCommand(f"unknown command {path!r}")
        with self.lock if self.lock is not None else nullcontext():
            return _plain(handler(self, params))

    # -- built-ins (DPDK lib/telemetry) ---------------------------------------------

    @command("/")
    def list_commands(self, params: str | None) -> list[str]:
        """Returns list of available commands, Takes no parameters

        Reply: an array of command paths, sorted.
        """
        return sorted(self._handlers)

    @command("/info")
    def info(self, params: str | None) -> dict[str, Any]:
        """Returns DPDK Telemetry information. Takes no parameters

        Reply: ``{"version": str, "pid": int, "max_output_len": int}``, the same
        object the greeting carries.
        """
        return {"version": self.version, "pid": self.pid, "max_output_len": self.max_output_len}

    @command("/help")
    def help(self, params: str | None) -> dict[str, str]:
        """Returns help text for a command. Parameters: string command

        Reply: ``{"<command>": "<help>"}``; null for a missing or unknown command.
        """
        if params is None or params not in self._handlers:
            raise BadParams("expected a known command as the parameter")
        return {params: self.help_text(params)}

    # -- EAL (DPDK lib/eal/common/eal_common_memory.c, eal_common_options.c) -------

    @command("/eal/params")
    def eal_params(self, params: str | None) -> list[str]:
        """Returns EAL commandline parameters used. Takes no parameters

        Reply: the daemon's argv as an array of strings.
        """
        return [str(a) for a in self._list("params")]

    @command("/eal/heap_list")
    def eal_heap_list(self, params: str | None) -> list[int]:
        """List of heap index setup. Takes no parameters

        Reply: an array of heap ids (one per NUMA socket that has a heap).
        """
        return sorted(int(h) for h in self._list("heap_ids"))

    @command("/eal/heap_info")
    def eal_heap_info(self, params: str | None) -> dict[str, Any]:
        """Returns malloc heap stats. Parameters: int heap_id

        Reply (DPDK's keys and order): ``Heap_id``, ``Name`` (``socket_<id>``),
        ``Heap_size``, ``Free_size``, ``Alloc_size``, ``Greatest_free_size``,
        ``Alloc_count``, ``Free_count``. A heap that cannot be read now is only
        ``{"Heap_id", "Name", "corrupt": bool, "unavailable": reason}`` (corrupt: a
        damaged link was found, the heap is marked broken; else busy behind a stopped
        process). Null for an id without a heap.
        """
        heap_id = _int_param(params, "heap id")
        if heap_id not in {int(h) for h in self._list("heap_ids")}:
            raise BadParams(f"no heap {heap_id}")
        if not hasattr(self.mem, "heap_stats"):
            raise BadParams("this memd has no heap statistics")
        try:
            s = self.mem.heap_stats(heap_id)
        except MemdError as e:
            return {
                "Heap_id": heap_id,
                "Name": f"socket_{heap_id}",
                "corrupt": isinstance(e, CorruptionError),
                "unavailable": str(e),
            }
        return {
            "Heap_id": heap_id,
            "Name": f"socket_{heap_id}",
            "Heap_size": s["heap_totalsz_bytes"],
            "Free_size": s["heap_freesz_bytes"],
            "Alloc_size": s["heap_allocsz_bytes"],
            "Greatest_free_size": s["greatest_free_size"],
            "Alloc_count": s["alloc_count"],
            "Free_count": s["free_count"],
        }

    @command("/eal/memzone_list")
    def eal_memzone_list(self, params: str | None) -> list[int]:
        """List of memzone index reserved. Takes no parameters

        Reply: an array of memzone ids.
        """
        return [int(mz.id) for mz in self._list("memzones")]

    @command("/eal/memzone_info")
    def eal_memzone_info(self, params: str | None) -> dict[str, Any]:
        """Returns memzone info. Parameters: int mz_id

        Reply (DPDK's keys and order): ``Zone``, ``Name``, ``Length``, ``Address``
        (hex offset in the shared window), ``Socket``, ``Flags``, ``Hugepage_size``,
        ``Hugepage_base`` (hex offset of its first page), ``Hugepage_used`` (pages
        it spans); then memd's ``IOVA`` (hex, or "Bad IOVA") and ``Offset`` (int).
        Null for an unknown id.
        """
        mz_id = _int_param(params, "memzone id")
        for mz in self._list("memzones"):
            if int(mz.id) == mz_id:
                break
        else:
            raise BadParams(f"no memzone {mz_id}")
        page = int(mz.page_size) or 4096
        off, length = int(mz.offset), int(mz.length)
        first = off // page
        last = (off + max(length, 1) - 1) // page
        return {
            "Zone": mz_id,
            "Name": mz.name,
            "Length": length,
            "Address": _hex(off),
            "Socket": int(mz.socket_id),
            "Flags": int(mz.flags),
            "Hugepage_size": page,
            "Hugepage_base": _hex(first * page),
            "Hugepage_used": last - first + 1,
            "IOVA": _hex(mz.iova),
            "Offset": off,
        }

    # -- mempool (DPDK lib/mempool/rte_mempool.c) -------------------------------------

    @command("/mempool/list")
    def mempool_list(self, params: str | None) -> list[str]:
        """Returns list of available mempool. Takes no parameters

        Reply: an array of mempool names.
        """
        return [mp.name for mp in self._list("mempool_listing")]

    @command("/mempool/info")
    def mempool_info(self, params: str | None) -> dict[str, Any]:
        """Returns mempool info. Parameters: pool_name

        Reply (DPDK's keys and order): ``name``, ``pool_id``, ``flags``,
        ``socket_id``, ``size``, ``cache_size``, ``elt_size``, ``header_size``,
        ``trailer_size``, ``private_data_size``, ``ops_index``, ``populated_size``,
        and, when the pool knows its memzone, ``mz_name``, ``mz_len``,
        ``mz_hugepage_sz``, ``mz_socket_id``, ``mz_flags``; then memd's
        ``avail_count`` and ``in_use_count``. A damaged pool (its header does not
        validate) is only ``{"name", "pool_id", "mz_name", "corrupt": true}``: free it
        with memzone_free of its ``mz_name``. As DPDK: ``{}`` for an unknown name,
        null for a missing one.
        """
        name = _name_param(params)
        for pool_id, mp in enumerate(self._list("mempool_listing")):
            if mp.name == name:
                if _corrupt(mp):
                    return {"name": mp.name, "pool_id": pool_id, **_corrupt_dict(mp)}
                return self._mempool_dict(pool_id, mp)
        return {}

    def _mempool_dict(self, pool_id: int, mp: Any) -> dict[str, Any]:
        mz = self._memzone(MEMPOOL_MZ_PREFIX + mp.name)
        d: dict[str, Any] = {
            "name": mp.name,
            "pool_id": pool_id,
            "flags": int(mp.flags),
            "socket_id": int(mz.socket_id) if mz is not None else SOCKET_ID_ANY,
            "size": int(mp.n),
            "cache_size": int(mp.cache_size),
            "elt_size": int(mp.elt_size),
            "header_size": 0,  # memd's objects have no per-object header or trailer
            "trailer_size": 0,
            "private_data_size": int(mp.private_data_size),
            "ops_index": 0,  # one ops: the ring
            "populated_size": int(mp.n),  # populated whole at create
        }
        if mz is not None:
            d.update(
                {
                    "mz_name": mz.name,
                    "mz_len": int(mz.length),
                    "mz_hugepage_sz": int(mz.page_size),
                    "mz_socket_id": int(mz.socket_id),
                    "mz_flags": int(mz.flags),
                }
            )
        d["avail_count"] = int(mp.avail_count())
        d["in_use_count"] = int(mp.in_use_count())
        return d

    # -- ring (DPDK lib/ring/rte_ring.c, telemetry as of 24.03) ------------------------

    @command("/ring/list")
    def ring_list(self, params: str | None) -> list[str]:
        """Returns list of available rings. Takes no parameters

        Reply: an array of ring names.
        """
        return [r.name for r in self._list("ring_listing")]

    @command("/ring/info")
    def ring_info(self, params: str | None) -> dict[str, Any]:
        """Returns ring info. Parameters: ring_name.

        Reply (DPDK's keys and order): ``name``, ``socket``, ``flags``,
        ``producer_type`` ("SP"/"MP"), ``consumer_type`` ("SC"/"MC"), ``size``,
        ``mask`` (hex string), ``capacity``, ``used_count``, and, when the ring
        knows its memzone, ``mz_name``, ``mz_len``, ``mz_hugepage_sz``,
        ``mz_socket_id``, ``mz_flags`` (hex string); then memd's ``free_count`` and
        ``esize`` (bytes per entry: 8 for a ring of uint64 entries, else records).
        A damaged ring (its header does not validate) is only ``{"name", "mz_name",
        "corrupt": true}``: free it with memzone_free of its ``mz_name``.
        As DPDK: ``{}`` for an unknown name, null for a missing or too long one.
        """
        name = _name_param(params, limit=32)
        for r in self._list("ring_listing"):
            if r.name == name:
                if _corrupt(r):
                    return {"name": r.name, **_corrupt_dict(r)}
                return self._ring_dict(r)
        return {}

    def _ring_dict(self, r: Any) -> dict[str, Any]:
        flags, size = int(r.flags), int(r.size)
        mz = self._memzone(RING_MZ_PREFIX + r.name)
        d: dict[str, Any] = {
            "name": r.name,
            "socket": int(mz.socket_id) if mz is not None else SOCKET_ID_ANY,
            "flags": flags,
            "producer_type": "SP" if flags & RING_F_SP_ENQ else "MP",
            "consumer_type": "SC" if flags & RING_F_SC_DEQ else "MC",
            "size": size,
            "mask": f"0x{max(size - 1, 0):x}",
            "capacity": int(r.capacity),
            "used_count": int(r.count),
        }
        if mz is not None:
            d.update(
                {
                    "mz_name": mz.name,
                    "mz_len": int(mz.length),
                    "mz_hugepage_sz": int(mz.page_size),
                    "mz_socket_id": int(mz.socket_id),
                    "mz_flags": f"0x{int(mz.flags):x}",
                }
            )
        d["free_count"] = int(r.free_count)
        d["esize"] = int(r.esize)
        return d

    # -- memd's own ---------------------------------------------------------------------

    @command("/memd/info")
    def memd_info(self, params: str | None) -> dict[str, Any]:
        """Returns the primary's configuration. Takes no parameters

        Reply: ``prefix``, ``primary_pid``, ``page_sizes`` (bytes), ``sockets``,
        ``iova_mode`` ("PA"/"VA"), ``no_huge``, ``legacy_mem``, ``runtime_dir``,
        ``huge_dirs``, ``config_path``, plus ``version``.
        """
        d = dict(self.mem.info())
        d["version"] = self.version
        return d

    @command("/memd/memsegs")
    def memd_memsegs(self, params: str | None) -> list[dict[str, Any]]:
        """Returns mapped memsegs. Parameters: [int start]

        Reply: an array of ``{list_index, slot, offset, iova, length, socket_id,
        page_size, prealloc}`` from index ``start`` (default 0). A reply longer than
        max_output_len is cut to whole entries: ask again from ``start + len``.
        """
        return self._list("memsegs")[_opt_start(params) :]

    @command("/memd/processes")
    def memd_processes(self, params: str | None) -> list[dict[str, Any]]:
        """Returns attached processes. Parameters: [int start]

        Reply: an array of ``{slot, pid, role ("primary"/"secondary"/"exited"),
        start_time, attach_time (unix seconds), comm, heap_blocks, heap_bytes (its heap
        elements, memzones included),
        memzones, mempool_objects}`` from index ``start`` (default 0): what each
        process allocated and still holds.  A process that is gone but still
        owns malloc'd heap blocks or mempool objects is listed with role
        "exited" and slot null.
        """
        return self.mem.processes(usage=True)[_opt_start(params) :]

    @command("/memd/reclaims")
    def memd_reclaims(self, params: str | None) -> list[dict[str, Any]]:
        """Returns reclaims of dead secondaries. Takes no parameters

        Reply: an array (oldest first, the last 64) of ``{pid, slot, time,
        cached_objects_returned, mempool_objects_in_hand: {pool: n},
        heap_blocks, heap_bytes, heap_freed, pins_dropped, half_made_freed,
        moving_objects_returned}``: objects in hand and heap blocks are what the
        process still held when it died (freed only under --reclaim-heap);
        ``moving_objects_returned`` (present when it died inside a mempool get or
        put) counts the objects it was moving, in no ring and no cache, that went
        back to the pool (null: the pool was busy; retried every second);
        ``half_made_freed`` names the ring
        and pool memzones (``RG_<name>``, ``MP_<name>``) it left half made or half
        freed (it died inside ring_create, mempool_create, ring_free or
        mempool_free), which the reclaim freed.
        """
        return list(self.mem.reclaims)

    @command("/memd/stats")
    def memd_stats(self, params: str | None) -> dict[str, Any]:
        """Returns memd summary counters. Takes no parameters

        Reply: ``heaps``, ``heap_totalsz_bytes``, ``heap_freesz_bytes``,
        ``heap_allocsz_bytes``, ``heap_alloc_count``, ``memsegs``,
        ``memseg_bytes``, ``memzones``, ``memzone_bytes``, ``rings``, ``mempools``,
        ``processes``, ``secondaries``; ``rings_corrupt`` and ``mempools_corrupt``
        (names of damaged ones, counted in ``rings``/``mempools``) when there are
        any; then ``admin_*`` counters of the socket.
        A heap that cannot be read now (busy behind a stopped process, or
        corrupt) is left out of the sums and named in ``heaps_unavailable``
        (``{heap id: reason}``).
        """
        segs = self._list("memsegs")
        zones = self._list("memzones")
        procs = self._list("processes")
        d: dict[str, Any] = {"heaps": len(self._list("heap_ids"))}
        heaps, unavailable = [], {}
        for heap_id in self._list("heap_ids"):
            try:
                heaps.append(self.mem.heap_stats(heap_id))
            except MemdError as e:
                unavailable[str(heap_id)] = str(e)
        if unavailable:
            d["heaps_unavailable"] = unavailable
        d.update(
            {
                "heap_totalsz_bytes": sum(int(h["heap_totalsz_bytes"]) for h in heaps),
                "heap_freesz_bytes": sum(int(h["heap_freesz_bytes"]) for h in heaps),
                "heap_allocsz_bytes": sum(int(h["heap_allocsz_bytes"]) for h in heaps),
                "heap_alloc_count": sum(int(h["alloc_count"]) for h in heaps),
            }
        )
        d.update(
            {
                "memsegs": len(segs),
                "memseg_bytes": sum(int(s["length"]) for s in segs),
                "memzones": len(zones),
                "memzone_bytes": sum(int(z.length) for z in zones),
            }
        )
        corrupt = {}
        for what in ("rings", "mempools"):
            objs = self._list(what[:-1] + "_listing")
            d[what] = len(objs)
            bad = [o.name for o in objs if _corrupt(o)]
            if bad:
                corrupt[f"{what}_corrupt"] = bad
        d["processes"] = len(procs)
        d["secondaries"] = sum(1 for p in procs if p.get("role") == "secondary")
        d.update(corrupt)
        for prefix, source in self.stats_sources.items():
            for key, value in source().items():
                d[f"{prefix}_{key}"] = value
        return d


def _corrupt(obj: Any) -> bool:
    """Whether a listed ring or pool is a damaged one (memd.shm.objects.Damaged)."""
    return getattr(obj, "corrupt", False) is True


def _corrupt_dict(obj: Any) -> dict[str, Any]:
    return {"mz_name": obj.memzone, "corrupt": True}


def reference() -> str:
    """The admin socket's command reference, generated from the docstrings."""
    out = [
        "# memd admin socket commands",
        "",
        "Generated by `python -m memd.admin.api > docs/admin-socket.md` from the docstrings "
        "in memd/admin/api.py.",
        "",
        "The socket speaks DPDK's telemetry v2 protocol (memd/admin/telemetry.py): a "
        "`SOCK_SEQPACKET` socket at `<runtime>/dpdk/<prefix>/dpdk_telemetry.v2`; a "
        'greeting `{"version":...,"pid":...,"max_output_len":16384}` on '
        "connect; one request packet `/cmd` or `/cmd,params` (at most 1023 bytes); one "
        'reply packet `{"/cmd":value}` of at most 16384 bytes, `null` for an unknown '
        "command or bad parameters. `dpdk-telemetry.py -f <prefix>` and "
        "`memctl telemetry CMD` send them by hand.",
        "",
    ]
    for path, fn in sorted((p, f) for p, f in _registry().items()):
        doc = inspect.getdoc(fn) or ""
        first, _, rest = doc.partition("\n")
        out += [f"## `{path}`", "", first, ""]
        if rest.strip():
            out += [rest.strip(), ""]
    return "\n".join(out)


def _registry() -> dict[str, Handler]:
    reg: dict[str, Handler] = {}
    for attr in vars(AdminAPI).values():
        path = getattr(attr, "_memd_command", None)
        if path:
            reg[path] = attr
    return reg


if __name__ == "__main__":  # pragma: no cover - doc generator
    sys.stdout.write(reference() + "\n")
