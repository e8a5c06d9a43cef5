"""`memd`: run the primary in the foreground (docs/daemon.md).

Exit codes: 0 clean shutdown, 1 init failure (the message says how to fix it),
2 bad usage.  SIGTERM/SIGINT: clean shutdown.  SIGHUP: log a state summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from memd import _ext
from memd._version import __version__
from memd.errors import MemdError
from memd.paths import DEFAULT_PREFIX
from memd.primary import notify
from memd.primary.memalloc import MAX_LIST_BYTES, NO_HUGE_PAGE_SIZE, list_capacity
from memd.primary.state import HUGE_UNLINK_MODES

log = logging.getLogger("memd")

# -m and each --socket-mem value are preallocated in one memseg list of their socket:
# more than the largest list (of 1 GiB pages) can never start, so it is bad usage.
MAX_PREALLOC_MB = MAX_LIST_BYTES >> 20
# with --no-huge, the one list of 2 MiB chunks holds less
NO_HUGE_MAX_MB = list_capacity(NO_HUGE_PAGE_SIZE) * NO_HUGE_PAGE_SIZE >> 20
MAX_ADDRESS = (1 << 64) - 1  # --base-virtaddr: C takes 64 bits (more used to wrap to 0)


def _prealloc_ok(mb: int) -> bool:
    return 0 <= mb <= MAX_PREALLOC_MB


def _prealloc_mb(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if not _prealloc_ok(value):
        raise argparse.ArgumentTypeError(
            f"must be 0 to {MAX_PREALLOC_MB} MB (the most one memseg list holds), got {value}"
        )
    return value


def _mb_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MB[,MB...], got {text!r}") from None
    if not all(_prealloc_ok(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"each size must be 0 to {MAX_PREALLOC_MB} MB (the most one memseg list holds)"
        )
    return values


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an address like 0x100000000, got {text!r}"
        ) from None
    if not 0 <= value <= MAX_ADDRESS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_ADDRESS:#x}, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memd",
        description="memd primary: hugepage memory for Python processes "
        "(options follow DPDK's EAL)",
    )
    p.add_argument("--version", action="version", version=f"memd {__version__}")
    p.add_argument("--file-prefix", default=DEFAULT_PREFIX, help="instance name (default rte)")
    p.add_argument(
        "--runtime-dir",
        help="where the config and sockets live "
        "(default $RUNTIME_DIRECTORY, /var/run as root, else $XDG_RUNTIME_DIR)",
    )
    p.add_argument("--huge-dir", help="hugetlbfs mount (or a directory in one) for page files")
    p.add_argument(
        "-m",
        dest="memory_mb",
        type=_prealloc_mb,
        default=None,
        help="MB to preallocate at start (kept for life; not with --socket-mem)",
    )
    p.add_argument(
        "--socket-mem",
        type=_mb_list,
        help=f"MB to preallocate per NUMA socket, MB[,MB...] (at most {_ext.MAX_HEAPS} values; "
        "not with -m or --no-huge)",
    )
    p.add_argument("--no-huge", action="store_true", help="use POSIX shared memory, no hugepages")
    p.add_argument(
        "--legacy-mem",
        action="store_true",
        help="map all memory at start, physically sorted (no growth)",
    )
    p.add_argument(
        "--huge-unlink",
        nargs="?",
        const="always",
        default="existing",
        choices=HUGE_UNLINK_MODES,
        help="existing (default): a dead primary's page files are removed and pages made "
        "afresh; always (or no value): page files are also unlinked right after mapping, "
        "so none is left behind (secondaries get them over the fd socket); never: page "
        "files are kept "
        "(also at exit, holding the hugepages in use then) and reused by the next run, old "
        "data included (zmalloc clears it); it punches out the slots it does not use",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="no page files at all: memory lists are memfds (hugetlb ones, or plain with "
        "--no-huge) that secondaries get over the fd socket, so no crash can leave "
        "page files behind",
    )
    p.add_argument(
        "--single-file-segments",
        action="store_true",
        help="accepted for DPDK compatibility: dynamic memory always has one file per "
        "memseg list (--legacy-mem one per page)",
    )
    p.add_argument(
        "--base-virtaddr", type=_address, default=0, help="map the shared window at this address"
    )
    p.add_argument(
        "--max-mem",
        dest="max_mem_mb",
        type=_non_negative,
        default=0,
        help="MB of memory the heaps may grow to (default: no limit)",
    )
    p.add_argument(
        "--take-over",
        action="store_true",
        help="start even if a dead primary's secondaries still run (they keep "
        "its old memory and get PrimaryNotRunning)",
    )
    p.add_argument(
        "--reclaim-heap",
        action="store_true",
        help="free the heap blocks of a secondary that dies, whoever else still "
        "uses them: only for applications whose processes never hand blocks on",
    )
    p.add_argument("--config", help="TOML file with the same options (command line wins)")
    p.add_argument("--group", help="group allowed to attach (files and sockets 0660)")
    p.add_argument(
        "--sync-timeout",
        type=_seconds,
        default=2.0,
        help="seconds a memory change waits for each secondary with memory event "
        "callbacks (no other secondary is waited for)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity",
    )
    p.add_argument("--no-telemetry", action="store_true", help="do not open the admin socket")
    return p


def _toml_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_seconds(v: object) -> bool:
    if not (_toml_int(v) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(v) and v >= 0  # type: ignore[arg-type, operator]
    except OverflowError:  # an int beyond any float
        return False


# What each kind of option takes in a --config file, by its parser's `type`: TOML
# values are typed, so a string where a number belongs is refused, not converted.
# Ranges are the command line's: an int that is too large is refused here, not at start.
_CONFIG_TYPES: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    None: ("a string", lambda v: isinstance(v, str)),
    _non_negative: ("an integer >= 0 (MB)", lambda v: _toml_int(v) and v >= 0),
    _prealloc_mb: (
        f"an integer 0 to {MAX_PREALLOC_MB} (MB; the most one memseg list holds)",
        lambda v: _toml_int(v) and _prealloc_ok(v),
    ),
    _mb_list: (
        f"an array of integers 0 to {MAX_PREALLOC_MB} (MB per socket)",
        lambda v: isinstance(v, list) and all(_toml_int(x) and _prealloc_ok(x) for x in v),
    ),
    _address: (
        f"an integer 0 to {MAX_ADDRESS:#x} (an address, e.g. 0x100000000)",
        lambda v: _toml_int(v) and 0 <= v <= MAX_ADDRESS,
    ),
    _seconds: ("a finite number >= 0 (seconds)", _finite_seconds),
}


def _config_value(action: argparse.Action, value: object) -> object:
    """`value` from the config file for `action`'s option, checked as the command
    line checks it; raises ValueError naming the type expected."""
    if isinstance(action, argparse._StoreTrueAction):  # a flag
        expected, ok = "true or false", isinstance(value, bool)
    else:
        expected, check = _CONFIG_TYPES[action.type]
        ok = check(value)
        if ok and action.choices is not None and value not in action.choices:
            expected, ok = f"one of {', '.join(map(repr, action.choices))}", False
    if not ok:
        raise ValueError(f"expected {expected}")
    return float(value) if action.type is _seconds else value  # type: ignore[arg-type]


def _toml_kind(value: object) -> str:
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "a boolean"),  # before int: a bool is an int
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    return next((name for kind, name in kinds if isinstance(value, kind)), "a date or time")


def _apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options not given on the command line from a TOML file.  A bad file,
    an unknown key or a value of the wrong type is bad usage (exit 2), named."""
    if not args.config:
        return
    if sys.version_info < (3, 11):
        parser.error("--config needs Python 3.11 or later (tomllib); pass the options instead")
    import tomllib

    try:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--config {args.config}: {e}")
    defaults = vars(parser.parse_args([]))
    # keys are the long options without dashes (max-mem, and m for -m), or their dest
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in defaults and a.dest != "config":
            for name in [a.dest, *a.option_strings]:
                actions[name.lstrip("-").replace("_", "-")] = a
    for key, raw in data.items():
        action = actions.get(key.replace("_", "-"))
        if action is None:
            parser.error(f"--config {args.config}: unknown option {key!r}")
        try:
            value = _config_value(action, raw)
        except ValueError as e:
            shown = json.dumps(raw, default=str)  # TOML's spelling: "64", true
            parser.error(f"--config {args.config}: {key} = {shown} ({_toml_kind(raw)}): {e}")
        if getattr(args, action.dest) == defaults[action.dest]:
            setattr(args, action.dest, value)


def _numa_nodes() -> set[int]:
    """The machine's NUMA node ids (node 0 alone where /sys says nothing)."""
    try:
        names = os.listdir("/sys/devices/system/node")
    except OSError:
        return {0}
    nodes = {int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()}
    return nodes or {0}


def _check_combinations(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse the option combinations DPDK's EAL refuses (eal_check_common_options):
    a usage error, exit 2, before anything is touched."""
    if args.memory_mb is not None and args.socket_mem is not None:
        parser.error(
            "-m and --socket-mem cannot be used together: give the total with -m, "
            "or MB per socket with --socket-mem"
        )
    if args.no_huge and args.socket_mem is not None:
        parser.error(
            "--socket-mem cannot be used with --no-huge (there are no NUMA hugepages "
            "to spread): use -m"
        )
    if args.no_huge and args.huge_unlink == "always":
        parser.error("--huge-unlink cannot be used with --no-huge (there are no hugepage files)")
    if args.in_memory and (args.legacy_mem or args.huge_unlink == "never"):
        parser.error(
            "--in-memory cannot be used with --legacy-mem or --huge-unlink=never "
            "(they need page files)"
        )
    if args.no_huge and (args.memory_mb or 0) > NO_HUGE_MAX_MB:
        parser.error(
            f"-m (m in a --config file) {args.memory_mb} with --no-huge: must be 0 to "
            f"{NO_HUGE_MAX_MB} MB (the most its one memseg list of 2 MiB chunks holds)"
        )
    if args.socket_mem is not None and len(args.socket_mem) > _ext.MAX_HEAPS:
        parser.error(
            f"--socket-mem has {len(args.socket_mem)} values, but memd serves at most "
            f"{_ext.MAX_HEAPS} NUMA sockets: give one value per socket"
        )
    if args.group:
        from memd.mp.access import resolve_group

        try:
            resolve_group(args.group)
        except ValueError as e:  # says which group and what to do
            parser.error(f"--group: {e}")
    if args.socket_mem is not None:
        nodes = _numa_nodes()
        extra = [i for i, mb in enumerate(args.socket_mem) if mb and i not in nodes]
        if extra:
            parser.error(
                f"--socket-mem asks for memory on socket {extra[0]}, but this machine has "
                f"NUMA nodes {sorted(nodes)}: give one value per node (0 for none)"
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_config_file(args, parser)
    _check_combinations(args, parser)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        # journald adds its own timestamps; keep lines short and greppable
        format="memd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )

    from memd.primary import Options, Primary  # after logging, so init logs show

    opts = Options(
        file_prefix=args.file_prefix,
        runtime_dir=args.runtime_dir,
        huge_dir=args.huge_dir,
        memory_mb=args.memory_mb or 0,
        socket_mem=args.socket_mem,
        no_huge=args.no_huge,
        legacy_mem=args.legacy_mem,
        huge_unlink=args.huge_unlink,
        in_memory=args.in_memory,
        single_file_segments=args.single_file_segments,
        base_virtaddr=args.base_virtaddr,
        group=args.group,
        sync_timeout=args.sync_timeout,
        max_mem_mb=args.max_mem_mb,
        take_over=args.take_over,
        reclaim_heap=args.reclaim_heap,
        argv=["memd", *argv],
    )
    stop = threading.Event()
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())

    t0 = time.monotonic()
    try:
        primary = Primary(opts)
    except (MemdError, ValueError, OSError) as e:
        print(f"memd: cannot start: {e}", file=sys.stderr)
        return 1
    telemetry = _start_telemetry(primary, args)
    from memd.primary.primary import memory_summary

    notify.notify(
        READY=1,
        STATUS=f"serving prefix {primary.prefix}, "
        f"{primary.info()['mapped_bytes'] >> 20} MiB mapped",
    )
    log.info("init took %.1f ms", (time.monotonic() - t0) * 1000)
    interval = notify.watchdog_interval()
    next_ping = time.monotonic()

    def tick() -> None:
        nonlocal next_ping
        if hup.is_set():
            hup.clear()
            log.info("state: %s", memory_summary(primary))
        if interval and time.monotonic() >= next_ping:
            notify.notify(WATCHDOG=1)
            next_ping = time.monotonic() + interval / 2

    try:
        primary.serve(stop, on_tick=tick)
    finally:
        notify.notify(STOPPING=1, STATUS="shutting down")
        if telemetry is not None:
            telemetry.stop()
        primary.close()
        log.info("clean shutdown")
    return 0


def _start_telemetry(primary: Any, args: argparse.Namespace) -> Any:
    """The admin socket (DPDK telemetry v2), if that module is present."""
    if args.no_telemetry:
        return None
    try:
        from memd.admin.api import AdminAPI
        from memd.admin.telemetry import TelemetryServer
    except ImportError:
        return None
    from memd.mp.access import resolve_group

    try:
        server = TelemetryServer(
            AdminAPI(primary), primary.rundir, primary.prefix, group=resolve_group(args.group)
        )
        server.start()
    except (OSError, ValueError) as e:  # secondaries are still served; say what is missing
        log.error("admin socket disabled (memctl and dpdk-telemetry.py will not connect): %s", e)
        return None
    return server


if __name__ == "__main__":
    sys.exit(main())
