"""Who may talk to memd's local sockets: peer credentials and the allow rule.

The rule: a peer is allowed iff its uid is the daemon's uid,
or it is root, or it belongs to the configured group (``--group``) as its primary
group or a supplementary one. The kernel vouches for the peer's pid/uid/gid through
``SO_PEERCRED``; supplementary groups are read from ``/proc/<pid>/status``.

Filesystem permissions (sockets ``0600``, or ``0660`` with the group) are the first
fence; this check is the second, and the one that can say *why* in a reply.
"""

from __future__ import annotations

import grp
import os
import socket
import struct
from dataclasses import dataclass

from memd.hw.hugepage_info import proc_path

__all__ = ["AccessPolicy", "PeerCred", "peer_credentials", "resolve_group"]

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The connected peer's pid, uid and gid as the kernel recorded them at connect().

    Raises OSError if ``sock`` is not a connected AF_UNIX socket.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def resolve_group(group: str | int | None) -> int | None:
    """A gid from a group name or number; None stays None.

    Raises ValueError naming the group if no such group exists.
    """
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group {group!r}: create it or fix --group") from None


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(proc_path(str(pid), "status"), encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


class AccessPolicy:
    """Decides whether a peer may use memd's sockets.

    ``uid`` defaults to the daemon's own; ``gid`` is the configured group, if any.
    """

    def __init__(self, uid: int | None = None, gid: int | None = None) -> None:
        self.uid = os.getuid() if uid is None else uid
        self.gid = gid

    def refusal(self, cred: PeerCred) -> str | None:
        """None if ``cred`` is allowed, else the reason in one sentence."""
        if cred.uid in (0, self.uid):
            return None
        if self.gid is not None and (
            cred.gid == self.gid or self.gid in _supplementary_groups(cred.pid)
        ):
            return None
        who = f"uid {cred.uid} gid {cred.gid} (pid {cred.pid})"
        allowed = "root" if self.uid == 0 else f"uid {self.uid}, root"
        if self.gid is not None:
            allowed += f" or members of gid {self.gid}"
        return f"permission denied: {who} may not use this memd; allowed: {allowed}"

    def allows(self, cred: PeerCred) -> bool:
        return self.refusal(cred) is None
