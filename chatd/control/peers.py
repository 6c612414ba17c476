"""Who is at the other end of a Unix socket, and who may use the control socket."""

from __future__ import annotations

import errno
import grp
import pwd
import socket
import struct


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def group_members(group: str | None) -> tuple[int | None, frozenset[str]]:
    if group is None:
        return None, frozenset()
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        raise OSError(errno.EINVAL, f"control.group: no such group {group!r}") from None
    return entry.gr_gid, frozenset(entry.gr_mem)


def peer_allowed(uid: int, gid: int, daemon_uid: int, group_gid: int | None,
                 members: frozenset[str]) -> bool:
    """Root, the daemon's own user, and members of ``control.group``."""
    if uid in (0, daemon_uid):
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in members or pwd.getpwnam(name).pw_gid == group_gid
