"""Minimal sd_notify (no libsystemd): READY=1, STATUS=, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import os
import socket


def notify(**fields: object) -> bool:
    """Send KEY=value lines to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(payload, addr)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds systemd expects between WATCHDOG=1, from $WATCHDOG_USEC."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
