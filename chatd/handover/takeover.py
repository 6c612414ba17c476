"""The new process's side of ``chatd restart``: take the socket and the room, then serve.

Everything slow or fallible happens first, while the old process still serves:
Python's start-up, the configuration, the plugins' start-up. Only then does it
ask for the room (:mod:`chatd.handover.transfer`), so that the pause users see
is just: stop reading, capture, send, restore. It serves as soon as the old
one says ``go``; the control socket, the FIFO and the handover socket follow
once the old process has gone (its admin child removes its own on the way
out), which :class:`Successor` waits for.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import structlog

from chatd import pidfile as pidfile_mod
from chatd.control.channel import recv_ready
from chatd.handover import state, transfer
from chatd.handover.transfer import HandoverError
from chatd.pidfile import PidFile
from chatd.server import Server
from chatd.services import Service

log = structlog.get_logger("chatd")

#: Seconds the old process may take to leave once it said ``go`` (its admin child
#: stops within 5 s); past that it is killed, so the control socket can be made.
LEAVE_TIMEOUT = 15.0


class TakeoverFailed(Exception):
    """The room stayed with the old process; the message says why."""


def take_over(server: Server, pidfile: PidFile) -> tuple[socket.socket, dict[str, Any]]:
    """Get the socket, the pidfile lock and the room from the running daemon into ``server``
    (plugins started, not serving yet). Returns the connection to the old process (keep it
    open: its end tells when the old one has gone) and the summary for the log.

    Raises :class:`TakeoverFailed`: the old process then serves on, untouched.
    """
    path = transfer.socket_path(server.settings.runtime_dir)
    asked = time.monotonic()
    try:
        conn, old_pid = transfer.connect(path)
    except HandoverError as exc:
        raise TakeoverFailed(str(exc)) from None
    fds: list[int] = []
    try:
        deadline = time.monotonic() + transfer.STEP_TIMEOUT
        transfer.send_frame(conn, {"op": "takeover", "protocol": transfer.PROTOCOL,
                                   "pid": os.getpid()}, deadline)
        # a room busy with a burst reads the request between two batches, and drains
        # what a full send buffer kept back (at most a second) before it offers
        offer, fds = transfer.recv_frame(conn, time.monotonic() + 3 * transfer.STEP_TIMEOUT)
        if offer["op"] != "offer":
            raise HandoverError(str(offer.get("error") or f"it answered {offer['op']!r}"))
        size = offer.get("bytes")
        if not isinstance(size, int) or not 0 <= size <= state.MAX_STATE_BYTES:
            raise HandoverError(f"a state of {size!r} bytes")
        blob = transfer.recv_bytes(conn, size, time.monotonic() + 4 * transfer.STEP_TIMEOUT)
        udp, lock_fd = _check_fds(fds, pidfile.path)
        try:
            summary = state.restore(server, blob)
        except state.StateError as exc:
            error = (f"cannot read the running daemon's state ({exc}); "
                     "chatd restart --fresh starts with an empty room")
            _tell(conn, {"op": "fail", "error": error})
            raise TakeoverFailed(error) from None
        server.sock = udp
        transfer.send_frame(conn, {"op": "ready", "sessions": summary["sessions"]},
                            time.monotonic() + transfer.STEP_TIMEOUT)
        go, more = transfer.recv_frame(conn, time.monotonic() + 2 * transfer.STEP_TIMEOUT)
        transfer.close_fds(more)
        if go["op"] != "go":
            raise HandoverError(f"it answered {go['op']!r}")
    except HandoverError as exc:
        conn.close()
        transfer.close_fds(fds)
        server.sock = None
        raise TakeoverFailed(f"handover from pid {old_pid} failed: {exc}") from None
    except BaseException:
        conn.close()
        transfer.close_fds(fds)
        server.sock = None
        raise
    pidfile.adopt(lock_fd)  # the lock is ours as well as the old one's, never nobody's
    summary.update(from_pid=old_pid, ms=go.get("pause_ms"),
                   total_ms=round((time.monotonic() - asked) * 1000, 1))
    return conn, summary


def _check_fds(fds: list[int], pidfile_path: str) -> tuple[socket.socket, int]:
    """The UDP socket and the pidfile's descriptor, checked to be what they claim."""
    if len(fds) != 2:
        raise HandoverError(f"expected 2 descriptors, got {len(fds)}")
    if not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
        raise HandoverError("what was handed over as the socket is not one")
    try:
        udp = socket.socket(fileno=fds[0])
    except OSError as exc:
        raise HandoverError(f"the socket handed over is unusable: {exc.strerror}") from None
    if udp.type != socket.SOCK_DGRAM or udp.family not in (socket.AF_INET, socket.AF_INET6):
        udp.detach()
        raise HandoverError("the socket handed over is not a UDP socket")
    if not pidfile_mod.is_file_at(fds[1], pidfile_path):
        udp.detach()
        raise HandoverError(f"the running daemon's pidfile is not {pidfile_path} "
                            "(pidfile changed in the configuration? use chatd restart --fresh)")
    udp.setblocking(False)
    lock_fd = fds[1]
    fds.clear()  # both are the caller's now
    return udp, lock_fd


def _tell(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError, HandoverError):
        transfer.send_frame(conn, message, time.monotonic() + 1.0)


class Successor(Service):
    """The new process, waiting for the old one to leave: then (``then``) it makes the
    control socket, the FIFO and the handover socket its own."""

    name = "successor"

    def __init__(self, server: Server, conn: socket.socket, old_pid: int,
                 then: Callable[[], None]):
        self.server = server
        self.conn = conn
        self.old_pid = old_pid
        self.then = then
        self.deadline = time.monotonic() + LEAVE_TIMEOUT

    def start(self) -> None:
        self.conn.setblocking(False)
        self.server.watch(self.conn, selectors.EVENT_READ, self._readable)

    def _readable(self, mask: int) -> None:
        data = recv_ready(self.conn, 4096)
        if data is None:
            return
        if not data:  # the old process has exited
            self._done()

    def tick(self, now: float) -> None:
        if self.conn.fileno() >= 0 and now > self.deadline:
            log.error("old_process_lingers", old_pid=self.old_pid, seconds=LEAVE_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.old_pid, signal.SIGKILL)
            self._done()

    def _done(self) -> None:
        if self.conn.fileno() < 0:
            return
        self.server.unwatch(self.conn)
        self.conn.close()
        self.then()

    def stop(self) -> None:
        if self.conn.fileno() >= 0:
            self.server.unwatch(self.conn)
            self.conn.close()
