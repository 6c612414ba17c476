"""The handover socket: how a running chatd gives its UDP socket and its room to a new one.

A Unix stream socket in runtime_dir (``handover.sock``, mode 0600). The new
process connects, says who it is, and the old one answers with the socket
itself (``SCM_RIGHTS``: the same kernel socket, so datagrams that arrive
meanwhile wait in its buffer) and the state blob (:mod:`chatd.handover.state`)::

    new -> old   {"op": "takeover", "protocol": 1, "pid": N}
    old -> new   {"op": "offer", "bytes": B, "fds": ["udp", "pidfile"], ...} + 2 fds, then B bytes
    new -> old   {"op": "ready", "sessions": S}     or {"op": "fail", "error": "..."}
    old -> new   {"op": "go", "pause_ms": T}        the old one will never read again

``ready`` is the new process's acknowledgement; until ``go`` the old one may
still take the room back (on ``fail``, a timeout, or a peer that vanished),
and the new one serves only once it has ``go``. The pidfile's descriptor
travels too: its ``flock`` belongs to the open file, so the lock passes from
one process to the other without an instant when it is free.

Frames are a 4-byte length and JSON; every read is bounded in size and in
time. Both ends check who is at the other end (``SO_PEERCRED``): root or the
daemon's own user only, whatever the file's mode says.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import socket
import stat
import struct
import time
from typing import Any, Final

from chatd import safefs
from chatd.control.files import socket_is_live
from chatd.control.peers import peer_credentials

#: Version of the exchange above; both ends must speak the same.
PROTOCOL: Final = 1
#: The largest JSON frame (a request or an answer; the blob goes apart).
MAX_FRAME: Final = 64 * 1024
#: Descriptors an offer carries, at most.
MAX_FDS: Final = 4
#: Seconds each step of the exchange may take before the other end is given up on.
STEP_TIMEOUT: Final = 5.0
SOCKET_NAME: Final = "handover.sock"

_LENGTH = struct.Struct(">I")


class HandoverError(Exception):
    """The exchange failed; the message says at which step and why."""


def socket_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


def allowed_uids() -> frozenset[int]:
    """Who may be at the other end: root and the daemon's own user."""
    return frozenset({0, os.geteuid()})


def check_peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the peer, or :class:`HandoverError` when it may not take part."""
    try:
        pid, uid, _ = peer_credentials(sock)
    except OSError as exc:
        raise HandoverError(f"cannot tell who is connected: {exc.strerror}") from None
    if uid not in allowed_uids():
        raise HandoverError(f"permission denied: uid {uid} may not take part in a handover")
    return pid, uid


# -- the listening end (the running daemon) ---------------------------------------------


def listen(path: str) -> socket.socket:
    """Bind the handover socket, mode 0600, non-blocking.

    What is already at ``path`` is removed only when it is a socket of root or of
    ours that nobody serves (a crashed daemon's); a link, another kind of file,
    a stranger's socket or a live one is refused with :class:`OSError`.
    """
    directory = os.path.dirname(path)
    safefs.check_private_dir(directory, allowed_uids())
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket "
                          f"({safefs.file_kind(st.st_mode)})")
        if st.st_uid not in allowed_uids():
            raise OSError(errno.EPERM, f"{path} belongs to {safefs.user_name(st.st_uid)}")
        if socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# -- the connecting end (the new process) ----------------------------------------------


def connect(path: str, timeout: float = STEP_TIMEOUT) -> tuple[socket.socket, int]:
    """Connect to a running daemon's handover socket; returns it and the daemon's pid.

    The file must be a socket (not a link) of root or of our user, and the process
    serving it root or our user: a planted socket cannot feed us a state or a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise HandoverError(f"no handover socket at {path}: the running daemon cannot hand "
                            "over (an older chatd?); use chatd restart --fresh") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise HandoverError(f"refusing {path}: not a socket ({safefs.file_kind(st.st_mode)})")
    if st.st_uid not in allowed_uids():
        raise HandoverError(f"refusing {path}: it belongs to {safefs.user_name(st.st_uid)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        pid, _ = check_peer(sock)
    except OSError as exc:
        sock.close()
        raise HandoverError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    except HandoverError:
        sock.close()
        raise
    return sock, pid


# -- frames ------------------------------------------------------------------------------


def send_frame(sock: socket.socket, message: dict[str, Any], deadline: float,
               fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        _settimeout(sock, deadline)
        sent = socket.send_fds(sock, [frame], fds)
        frame = frame[sent:]
    send_bytes(sock, frame, deadline)


def send_bytes(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _settimeout(sock, deadline)
        try:
            sent = sock.send(view[:1 << 20])
        except TimeoutError:
            raise HandoverError("the other end stopped reading") from None
        view = view[sent:]


def recv_frame(sock: socket.socket, deadline: float) -> tuple[dict[str, Any], list[int]]:
    """One JSON frame, and the descriptors that came with it (the caller owns them)."""
    fds: list[int] = []
    try:
        header = _recv_exactly(sock, _LENGTH.size, deadline, fds)
        (length,) = _LENGTH.unpack(header)
        if length > MAX_FRAME:
            raise HandoverError(f"a frame of {length} bytes, more than {MAX_FRAME}")
        data = _recv_exactly(sock, length, deadline, fds)
        try:
            message = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise HandoverError(f"malformed frame: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise HandoverError("malformed frame: no op")
    except BaseException:
        close_fds(fds)
        raise
    return message, fds


def recv_bytes(sock: socket.socket, size: int, deadline: float) -> bytes:
    return _recv_exactly(sock, size, deadline, None)


def _recv_exactly(sock: socket.socket, size: int, deadline: float,
                  fds: list[int] | None) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        _settimeout(sock, deadline)
        want = min(size - len(chunks), 1 << 20)
        try:
            if fds is not None:
                data, ancillary, flags, _ = sock.recvmsg(
                    want, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
                _take_fds(ancillary, flags, fds)
            else:
                data = sock.recv(want)
        except TimeoutError:
            raise HandoverError("the other end did not answer in time") from None
        except OSError as exc:
            raise HandoverError(f"connection lost: {exc.strerror or exc}") from None
        if not data:
            raise HandoverError("the other end closed the connection")
        chunks += data
    return bytes(chunks)


def _take_fds(ancillary: list, flags: int, fds: list[int]) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
        raise HandoverError("too many descriptors sent")


def close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise HandoverError("the other end did not answer in time")
    sock.settimeout(remaining)
