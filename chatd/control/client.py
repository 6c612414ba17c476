"""The client side of the control channel: what ``chatctl`` and ``chatd status`` use.

An admin's words go to chatd or nowhere: the socket is trusted only when
root, the caller or chatd's user serves it, checked on the file before
connecting and on the listening process after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import socket
import stat
from typing import Any

from chatd import safefs
from chatd.control.channel import LineChannel
from chatd.control.peers import peer_credentials
from chatd.settings import Settings


class ControlError(Exception):
    """The control socket could not be used; the message names it.

    ``errno`` is EACCES or EPERM when the caller may not use it (permission
    denied, or a socket chatd's users did not make), else why it was not reached.
    """

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code

    @property
    def denied(self) -> bool:
        return self.errno in (errno.EACCES, errno.EPERM)


def request(path: str, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 10.0, daemon_uid: int | None = None) -> dict[str, Any]:
    """One request, one answer. Raises :class:`ControlError` when nobody answers at ``path``,
    or when whoever serves it is not root, the caller, or chatd's user ``daemon_uid``
    (see :func:`trusted_servers`): an admin's words go to chatd or nowhere."""
    path = os.path.abspath(path)
    trusted = trusted_servers(path, daemon_uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except PermissionError:
            raise ControlError(f"permission denied: {path}", errno.EACCES) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the control socket {path}: {exc.strerror}",
                               exc.errno) from None
        # the process that listens, as the kernel saw it: no file swapped in since counts
        server_uid = peer_credentials(sock)[1]
        if server_uid not in trusted:
            raise ControlError(_untrusted(path, server_uid), errno.EPERM)
        channel = LineChannel(sock, max_depth=None)  # the server was checked: no bounds
        try:
            # a refused peer is cut off at once: the reason is still waiting to be read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                channel.send({"cmd": cmd, "args": args or {}})
            line = channel.read_line()
        except TimeoutError:
            raise ControlError(f"no answer on the control socket {path} within {timeout:g} s"
                               ) from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}", exc.errno) from None
    finally:
        sock.close()
    try:
        answer = channel.decode(line) if line is not None else None
    except (ValueError, RecursionError):
        raise ControlError(f"control socket {path} gave no valid answer") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"control socket {path} gave no valid answer")
    return answer


def trusted_servers(path: str, daemon_uid: int | None) -> frozenset[int]:
    """The uids that may serve the control socket at ``path``, or :class:`ControlError`.

    Root, the caller and chatd's user (``daemon.user``); and the owner of the
    socket's directory when root made that directory for it, as systemd's
    ``RuntimeDirectory=`` does for a ``DynamicUser=`` (the directory is not
    writable by others and lies in a root-owned directory nobody else may write).
    Anyone else could have put a socket there (a ``/tmp/chatd-UID`` made first by
    another user) to read what the admin says and answer "ok".
    """
    trusted = {0, os.getuid()} | ({daemon_uid} if daemon_uid is not None else set())
    try:
        st = os.lstat(path)
    except PermissionError:
        raise ControlError(f"permission denied: {path}", errno.EACCES) from None
    except OSError as exc:
        raise ControlError(f"cannot reach the control socket {path}: {exc.strerror}",
                           exc.errno) from None
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(f"refusing the control socket {path}: it is a symbolic link",
                           errno.EPERM)
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"cannot reach the control socket {path}: not a socket",
                           errno.ENOTSOCK)
    if st.st_uid not in trusted and _made_by_root_for(os.path.dirname(path), st.st_uid):
        trusted.add(st.st_uid)
    if st.st_uid not in trusted:
        raise ControlError(_untrusted(path, st.st_uid), errno.EPERM)
    return frozenset(trusted)


def _made_by_root_for(directory: str, uid: int) -> bool:
    try:
        mine, parent = os.lstat(directory), os.lstat(os.path.dirname(directory))
    except OSError:
        return False
    return (stat.S_ISDIR(mine.st_mode) and mine.st_uid == uid and not mine.st_mode & 0o022
            and parent.st_uid == 0 and not parent.st_mode & 0o022)


def _untrusted(path: str, uid: int) -> str:
    return (f"refusing the control socket {path}: it is served by {safefs.user_name(uid)}, "
            "not by root, you or chatd's user (daemon.user), so it is not chatd's")


def daemon_uid(settings: Settings | None) -> int | None:
    """The uid of ``daemon.user``, whose control socket ``chatd`` and ``chatctl`` trust."""
    user = settings.daemon.user if settings is not None else None
    if user is None:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None
