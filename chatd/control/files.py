"""The control socket and the FIFO: made safely, recreated, and removed on the way out.

Both live in runtime_dir, which chatd gives to ``control.group`` (set-group-ID)
before it drops privileges, so what it creates there later belongs to that group.
Nothing here follows a symbolic link or steals a socket a live process serves.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat

import structlog

from chatd import safefs
from chatd.settings import ControlSettings

log = structlog.get_logger("chatd")

#: connections the listening socket queues, and the admin child serves at once
MAX_CONNECTIONS = 32


def socket_is_live(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path`` (its file may
    outlive a killed server: then it may be replaced, never while someone listens)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _chgrp(path: str, gid: int | None, fd: int | None = None) -> None:
    """Give ``path`` (or the FIFO open at ``fd``) to ``control.group``; never through a link.

    Usually there is nothing to do: chatd gives runtime_dir that group (set-group-ID)
    before it drops privileges, and what is created in it inherits the group.
    """
    if gid is None:
        return
    st = os.fstat(fd) if fd is not None else os.lstat(path)
    if st.st_gid == gid:
        return
    try:
        if fd is not None:
            os.fchown(fd, -1, gid)
        else:
            os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        group = grp.getgrgid(gid).gr_name
        raise OSError(errno.EPERM, f"cannot give {path} to group {group}: "
                      f"{safefs.user_name(os.geteuid())} is not a member; keep the control "
                      "socket and FIFO in runtime_dir (chatd gives it that group), or add "
                      "the user to the group") from None


def _private_parent(path: str) -> None:
    """The directory of the socket or FIFO: made if missing, refused if another user could
    swap files in it (see :mod:`chatd.safefs`)."""
    directory = os.path.dirname(path)
    safefs.make_dir(directory, 0o755)
    safefs.check_private_dir(directory, {0, os.geteuid()})


def create_socket(settings: ControlSettings, gid: int | None) -> socket.socket:
    """Bind the control socket: never stealing a live one, never world-writable for an instant."""
    path = settings.socket
    try:
        return _bind_control_socket(path, settings.mode, gid)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create control socket {path}: "
                      f"{exc.strerror or exc}") from None


def _bind_control_socket(path: str, mode: int, gid: int | None) -> socket.socket:
    _private_parent(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # bind() makes the file with exactly this mode: no chmod by path afterwards, and
        # nobody can connect before listen(), so the group is set in time
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        _chgrp(path, gid)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def create_fifo(settings: ControlSettings, gid: int | None) -> int:
    """The FIFO, opened read-write so that it never reports end-of-file between writers."""
    path = settings.fifo
    try:
        return _open_fifo(path, gid)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create control FIFO {path}: "
                      f"{exc.strerror or exc}") from None


def _open_fifo(path: str, gid: int | None) -> int:
    _private_parent(path)
    if os.path.lexists(path) and not stat.S_ISFIFO(os.lstat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO")
    old = os.umask(0o177)
    try:
        os.mkfifo(path, 0o600)  # the group may write only once the group is right
    except FileExistsError:
        pass
    finally:
        os.umask(old)
    fd = safefs.open_nofollow(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO")
        _chgrp(path, gid, fd)
        os.fchmod(fd, 0o620)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_files(settings: ControlSettings) -> None:
    """Remove the socket and FIFO unless a live process serves that socket."""
    if os.path.lexists(settings.socket) and socket_is_live(settings.socket):
        return
    remove_files(settings)


def remove_files(settings: ControlSettings) -> None:
    """Remove the socket and FIFO, or log why not: this runs on the way out, where an
    error would cost the clean exit (a runtime_dir chowned to another user, say)."""
    for path in (settings.socket, settings.fifo):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            log.warning("control_file_not_removed", path=path, error=exc.strerror or str(exc))
