"""Where memd keeps its files (API.md "Files"), computed in one place for both sides."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PREFIX = "rte"


def runtime_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--runtime-dir`, else $RUNTIME_DIRECTORY (systemd), else /var/run as root,
    else $XDG_RUNTIME_DIR, else /tmp."""
    if explicit:
        return Path(explicit)
    if os.environ.get("RUNTIME_DIRECTORY"):
        # systemd may pass several colon-separated directories; the first is ours
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/run")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")


def config_path(prefix: str, rundir: Path) -> Path:
    """`<runtime>/.<prefix>_config`: /var/run/.rte_config by default, as DPDK."""
    return rundir / f".{prefix}_config"


def socket_dir(prefix: str, rundir: Path) -> Path:
    """memd's own sockets: `<runtime>/memd/<prefix>/`."""
    return rundir / "memd" / prefix


def mp_endpoint(prefix: str, rundir: Path) -> str:
    """The primary's ZeroMQ ROUTER endpoint."""
    return f"ipc://{socket_dir(prefix, rundir) / 'mp_socket'}"


def telemetry_dir(prefix: str, rundir: Path) -> Path:
    """Where dpdk-telemetry.py looks: `<runtime>/dpdk/<prefix>/`."""
    return rundir / "dpdk" / prefix


def page_file_number(list_idx: int, slot: int, pages_per_list: int) -> int:
    """DPDK numbers page files list * max-pages-per-list + slot."""
    return list_idx * pages_per_list + slot


def huge_page_path(huge_dir: str, prefix: str, number: int) -> str:
    """`<huge-dir>/<prefix>map_<n>`: rtemap_0, rtemap_1, ... for the default prefix."""
    return os.path.join(huge_dir, f"{prefix}map_{number}")


def shm_page_name(prefix: str, number: int) -> str:
    """POSIX shm object for a --no-huge page: /dev/shm/<prefix>map_<n>."""
    return f"/{prefix}map_{number}"


def validate_prefix(prefix: str) -> str:
    """A prefix becomes part of file names: keep it to a safe alphabet."""
    if not prefix or len(prefix) > 48 or not all(c.isalnum() or c in "-_." for c in prefix):
        raise ValueError(
            f"bad --file-prefix {prefix!r}: use 1-48 characters from [A-Za-z0-9._-]")
    return prefix
