"""sd_notify(3) without libsystemd: readiness, status and watchdog pings for systemd.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or an abstract name written with a
leading ``@``) to a ``Type=notify`` service; the service sends newline-separated
``KEY=value`` assignments to it in one datagram. Outside systemd the variable is unset
and every call here is a cheap no-op, so the daemon calls them unconditionally.

What memd sends, and when:

* ``READY=1`` (with ``STATUS=``) once a secondary can attach: the config is written,
  its magic set, and the ZeroMQ and admin sockets are bound;
* ``WATCHDOG=1`` from the main loop at half of ``$WATCHDOG_USEC`` (see :class:`Watchdog`:
  a ping from a side thread would keep pinging while the main loop hangs);
* ``STOPPING=1`` when SIGTERM starts a clean shutdown.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Watchdog", "notify", "notify_socket_address", "watchdog_interval"]


def notify_socket_address(env: dict[str, str] | None = None) -> str | bytes | None:
    """The address in ``$NOTIFY_SOCKET`` as ``socket.sendto`` takes it, or None if unset.

    A leading ``@`` names a Linux abstract socket: it becomes a leading NUL byte.
    Fails (returns None) iff the variable is unset, empty, or neither absolute nor
    abstract (systemd never sends such a value; a stray one is ignored, not guessed at).
    """
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def _format(fields: dict[str, object]) -> bytes:
    lines = []
    for key, value in fields.items():
        name = key.upper()
        if not name or "=" in name or "\n" in name:
            raise ValueError(f"notify: bad field name {key!r}")
        if value is True:
            text = "1"
        elif value is False:
            text = "0"
        else:
            text = str(value)
        if "\n" in text:  # one assignment per line: a newline would start a forged one
            text = text.replace("\n", " ")
        lines.append(f"{name}={text}")
    return "\n".join(lines).encode()


def notify(env: dict[str, str] | None = None, **fields: object) -> bool:
    """Send ``KEY=value`` fields to systemd in one datagram.

    ``notify(READY=1, STATUS="serving 2 secondaries")``; names are upper-cased, so
    ``notify(ready=True)`` is the same. Returns True iff a datagram was sent; False when
    not under systemd (no ``$NOTIFY_SOCKET``) or when the socket is gone or full —
    never raises for those, as losing a status line must not stop the daemon.
    Raises ValueError for a field name holding ``=`` or a newline.
    """
    if not fields:
        return False
    payload = _format(fields)
    address = notify_socket_address(env)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(payload, address)
        except OSError:
            return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None if disabled.

    As sd_watchdog_enabled(3): None when the variable is unset, not a positive integer,
    or when ``$WATCHDOG_PID`` is set and names another process. Ping at half of it.
    """
    e = os.environ if env is None else env
    raw = e.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = e.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class Watchdog:
    """Pings ``WATCHDOG=1`` at half the interval, driven by the daemon's own loop.

    Call :meth:`tick` on every loop iteration (it sends only when a ping is due) and
    bound the loop's poll timeout by :meth:`timeout_ms`::

        wd = Watchdog.from_env()
        while running:
            events = poller.poll(wd.timeout_ms(default=1000))
            ...
            wd.tick()

    When the watchdog is disabled, ``tick`` does nothing and ``timeout_ms`` returns the
    default.
    """

    def __init__(self, interval: float | None, env: dict[str, str] | None = None) -> None:
        self.interval = interval
        self.period = interval / 2 if interval else None
        self.env = env
        self.pings = 0
        self._next: float | None = None  # the first tick pings at once

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Watchdog:
        return cls(watchdog_interval(env), env)

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def timeout_ms(self, default: int | None = None) -> int | None:
        """Milliseconds until the next ping is due (bounded by ``default``)."""
        if self.period is None:
            return default
        if self._next is None:
            return 0
        due = max(0, int((self._next - time.monotonic()) * 1000))
        return due if default is None else min(due, default)

    def tick(self, now: float | None = None) -> bool:
        """Send ``WATCHDOG=1`` if due. Returns True iff a ping was sent."""
        if self.period is None:
            return False
        now = time.monotonic() if now is None else now
        if self._next is not None and now < self._next:
            return False
        self._next = now + self.period
        sent = notify(self.env, WATCHDOG=1)
        self.pings += sent
        return sent
