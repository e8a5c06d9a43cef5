"""Where memd keeps its files (docs/design.md), computed in one place for both sides."""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_PREFIX = "rte"
# root's default, and what the system service passes (systemd/memd.service), as DPDK
SYSTEM_RUNTIME_DIR = Path("/var/run")


def base_runtime_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--runtime-dir`, else $RUNTIME_DIRECTORY (systemd), else /var/run as root,
    else $XDG_RUNTIME_DIR, else /tmp."""
    if explicit:
        return Path(explicit)
    if os.environ.get("RUNTIME_DIRECTORY"):
        # systemd may pass several colon-separated directories; the first is ours
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")


def shared_writable(path: Path) -> bool:
    """True if users other than its owner may create entries in `path` (the
    sticky /tmp, a group-writable dir): anyone could squat memd's names there."""
    try:
        return bool(os.stat(path).st_mode & 0o022)
    except OSError:  # missing or unreachable: whoever opens files there says so
        return False


def runtime_dir(explicit: str | os.PathLike[str] | None = None, uid: int | None = None) -> Path:
    """Where a memd's files live: the base runtime dir (`base_runtime_dir`) when only
    its owner can write it, else the private `<base>/memd-<uid>` memd makes there.
    The primary passes its own `uid`; a client looks for its own uid's, then root's."""
    base = base_runtime_dir(explicit)
    if not shared_writable(base):
        return base
    uids = [uid] if uid is not None else [os.geteuid(), 0]
    for u in uids:
        if (base / f"memd-{u}").is_dir():
            return base / f"memd-{u}"
    return base / f"memd-{uids[0]}"


def find_runtime_dir(prefix: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The runtime dir a client (attach, memctl) looks for instance `prefix` in:
    `runtime_dir(explicit)`; but a user other than root, given no dir (neither
    `explicit` nor $RUNTIME_DIRECTORY), whose own default has no such instance while
    the system service's runtime dir has (a `--group` member on a host running the
    unit), gets that one: any memd there is root's, as only root can write it."""
    own = runtime_dir(explicit)
    if explicit or os.environ.get("RUNTIME_DIRECTORY") or os.geteuid() == 0:
        return own
    if not _has_instance(prefix, own):
        system = runtime_dir(SYSTEM_RUNTIME_DIR)
        if _has_instance(prefix, system):
            return system
    return own


def _has_instance(prefix: str, rundir: Path) -> bool:
    """Whether `rundir` holds instance `prefix`'s config or admin socket directory
    (seen even by users who may not open them: they then learn why, naming it)."""
    try:
        return (
            config_path(prefix, rundir).exists()
            or Path(telemetry_path(prefix, rundir)).parent.is_dir()
        )
    except OSError:
        return False


def config_path(prefix: str, rundir: Path) -> Path:
    """`<runtime>/.<prefix>_config`: /var/run/.rte_config by default, as DPDK."""
    return rundir / f".{prefix}_config"


def socket_dir(prefix: str, rundir: Path) -> Path:
    """memd's own sockets: `<runtime>/memd/<prefix>/`."""
    return rundir / "memd" / prefix


def mp_socket_path(prefix: str, rundir: Path) -> Path:
    """The primary's ZeroMQ socket file, in socket_dir."""
    return socket_dir(prefix, rundir) / "mp_socket"


def fd_socket_path(prefix: str, rundir: Path) -> Path:
    """The primary's Unix socket that hands list files over (SCM_RIGHTS), in
    socket_dir (memd/mp/fd_pass.py)."""
    return socket_dir(prefix, rundir) / "fd_socket"


def mp_endpoint(prefix: str, rundir: Path) -> str:
    """The primary's ZeroMQ ROUTER endpoint."""
    return f"ipc://{mp_socket_path(prefix, rundir)}"


TELEMETRY_SOCKET = "dpdk_telemetry.v2"


def telemetry_path(prefix: str, rundir: str | os.PathLike[str], instance: int = 0) -> str:
    """The admin socket where dpdk-telemetry.py looks, as DPDK names it:
    `<runtime>/dpdk/<prefix>/dpdk_telemetry.v2`, `...v2:<instance>` for later ones."""
    path = os.path.join(rundir, "dpdk", prefix, TELEMETRY_SOCKET)
    return f"{path}:{instance}" if instance else path


SHM_DIR = "/dev/shm"  # POSIX shm objects (--no-huge pages) are files here


def page_file_number(list_idx: int, slot: int, pages_per_list: int) -> int:
    """DPDK numbers page files list * max-pages-per-list + slot."""
    return list_idx * pages_per_list + slot


def page_file_name(prefix: str, number: int) -> str:
    """`<prefix>map_<n>` (rtemap_0, rtemap_1, ... for the default prefix), as DPDK;
    in the huge dir, or in /dev/shm with --no-huge."""
    return f"{prefix}map_{number}"


def prefix_lock_name(prefix: str) -> str:
    """The file a primary holds locked in each page directory for its life: one
    primary per prefix and directory, host-wide, whatever its runtime dir."""
    return f"{prefix}.memd-lock"


def legacy_temp_name(prefix: str, number: int) -> str:
    """--legacy-mem's page files before they are sorted into place."""
    return f"{prefix}tmp_{number}"


_MEMD_NAME = re.compile(
    r"^(?P<prefix>[A-Za-z0-9._-]+?)(?:map_(?P<page>\d+)|tmp_(?P<temp>\d+)"
    r"|\.memd-(?P<lock>lock))$"
)


def parse_memd_name(name: str) -> tuple[str, str] | None:
    """(prefix, kind) of a name memd creates in a page directory, kind being
    "page", "temp" or "lock"; None for any other name."""
    m = _MEMD_NAME.match(name)
    if m is None:
        return None
    kind = next(k for k in ("page", "temp", "lock") if m.group(k) is not None)
    return m.group("prefix"), kind


_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def validate_prefix(prefix: str) -> str:
    """A prefix becomes part of file and directory names: ASCII letters, digits and
    ``._-``, starting with a letter or digit (so never ``.`` or ``..``)."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"bad --file-prefix {prefix!r}: use 1-48 characters from [A-Za-z0-9._-], "
            "the first a letter or digit"
        )
    return prefix
