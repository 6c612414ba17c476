"""The running daemon's side of a handover: the handover socket, and SIGUSR2.

:class:`HandoverService` listens on ``runtime_dir/handover.sock``. A peer that is
neither root nor the daemon's user is turned away at ``accept`` (its ``SO_PEERCRED``);
an allowed one has :data:`~chatd.handover.transfer.STEP_TIMEOUT` seconds to say
``takeover``, read without blocking the room. Only then does the room pause:
stop reading, capture the state, send the socket and the state, wait for the
new process's ``ready``. Any failure before ``ready`` (an error, a timeout, a
peer that vanished) and the room reads on as if nothing had happened; after
it, the server stops without a goodbye.

:class:`SelfRestart` is nginx's binary upgrade: on SIGUSR2 the daemon runs
``chatd restart`` itself, so the new process starts in the daemon's own cgroup
(systemd's ``chatd-forking.service`` then follows the new pid in the pidfile).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from chatd import log as log_mod
from chatd.control.channel import recv_ready
from chatd.handover import state, transfer
from chatd.handover.transfer import HandoverError
from chatd.pidfile import PidFile
from chatd.server import Server
from chatd.services import Service, describe_status

log = structlog.get_logger("chatd")

#: Connections that may wait to say what they want at once; more are closed.
MAX_PENDING = 4
#: Seconds the backlog (datagrams a full send buffer kept back) gets before a handover.
BACKLOG_SECONDS = 1.0
#: Seconds the new process may take to restore the state and say ``ready``.
READY_TIMEOUT = 10.0


@dataclass
class _Pending:
    conn: socket.socket
    pid: int
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class HandoverService(Service):
    """Serves the handover socket; gives the room away to a process that asks for it."""

    name = "handover"

    def __init__(self, server: Server, pidfile: PidFile):
        self.server = server
        self.pidfile = pidfile
        self.path = transfer.socket_path(server.settings.runtime_dir)
        self.listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._pending: dict[int, _Pending] = {}
        #: the connection to the process that took over: closed when this one exits,
        #: which tells it the control socket and the FIFO are free
        self.successor: socket.socket | None = None
        self._logs = log_mod.BoundedLog(log, {"handover_refused": "warning"})

    def start(self) -> None:
        try:
            self.listener = transfer.listen(self.path)
            st = os.lstat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        except OSError as exc:
            # the room serves all the same; chatd restart --fresh still works
            log.error("handover_unavailable", path=self.path, error=exc.strerror or str(exc))
            return
        self.server.watch(self.listener, selectors.EVENT_READ, self._accept)

    def stop(self) -> None:
        for pending in list(self._pending.values()):
            self._drop(pending)
        if self.listener is None:
            return
        self.server.unwatch(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # ours, not a successor's
                os.unlink(self.path)

    def tick(self, now: float) -> None:
        for pending in list(self._pending.values()):
            if now > pending.deadline:
                self._logs("handover_refused", reason="said nothing in time",
                           peer_pid=pending.pid)
                self._drop(pending)

    # -- waiting for a request -------------------------------------------------------

    def _accept(self, mask: int) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE, say: the room goes on
            self._logs("handover_refused", reason=exc.strerror or str(exc))
            return
        conn.setblocking(False)
        try:
            pid, _ = transfer.check_peer(conn)
        except HandoverError as exc:
            self._logs("handover_refused", reason=str(exc))
            conn.close()
            return
        if len(self._pending) >= MAX_PENDING:
            self._logs("handover_refused", reason="too many connections", peer_pid=pid)
            conn.close()
            return
        pending = _Pending(conn, pid, time.monotonic() + transfer.STEP_TIMEOUT)
        self._pending[conn.fileno()] = pending
        self.server.watch(conn, selectors.EVENT_READ, lambda mask: self._read(pending))

    def _read(self, pending: _Pending) -> None:
        data = recv_ready(pending.conn, transfer.MAX_FRAME + 4 - len(pending.data))
        if data is None:
            return
        if not data:
            self._drop(pending)
            return
        pending.data += data
        if len(pending.data) < 4:
            return
        length = int.from_bytes(pending.data[:4], "big")
        if length > transfer.MAX_FRAME:
            self._logs("handover_refused", reason="request too large", peer_pid=pending.pid)
            self._drop(pending)
            return
        if len(pending.data) < 4 + length:
            return
        self._forget(pending)
        self._request(pending.conn, pending.pid, bytes(pending.data[4:4 + length]))

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.conn.fileno(), None)
        self.server.unwatch(pending.conn)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.conn.close()

    def _request(self, conn: socket.socket, pid: int, data: bytes) -> None:
        import json

        try:
            request = json.loads(data)
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict) or request.get("op") != "takeover":
            self._logs("handover_refused", reason="not a takeover request", peer_pid=pid)
            conn.close()
            return
        if request.get("protocol") != transfer.PROTOCOL:
            with contextlib.suppress(OSError, HandoverError):
                transfer.send_frame(conn, {"op": "refused", "error": (
                    f"handover protocol {request.get('protocol')!r}; the running chatd "
                    f"speaks {transfer.PROTOCOL}: use chatd restart --fresh")},
                    time.monotonic() + 1.0)
            conn.close()
            return
        self._give(conn, pid)

    # -- the handover ----------------------------------------------------------------

    def _give(self, conn: socket.socket, pid: int) -> None:
        """Pause the room and hand it to ``pid``; on any failure, read on as before."""
        server = self.server
        began = time.monotonic()
        server.pause_reading()
        blob = b""
        try:
            server.apply(server.room.flush())
            server.drain_backlog(BACKLOG_SECONDS)
            blob = state.capture(server)
            conn.setblocking(True)
            deadline = time.monotonic() + transfer.STEP_TIMEOUT
            transfer.send_frame(conn, {"op": "offer", "protocol": transfer.PROTOCOL,
                                       "from_pid": os.getpid(), "bytes": len(blob),
                                       "fds": ["udp", "pidfile"]},
                                deadline, fds=[server.sock.fileno(), self.pidfile.fileno()])
            transfer.send_bytes(conn, blob, deadline)
            reply, fds = transfer.recv_frame(conn, time.monotonic() + READY_TIMEOUT)
            transfer.close_fds(fds)
            if reply["op"] != "ready":
                raise HandoverError(str(reply.get("error") or f"it answered {reply['op']!r}"))
            pause_ms = round((time.monotonic() - began) * 1000, 1)
            transfer.send_frame(conn, {"op": "go", "pause_ms": pause_ms},
                                time.monotonic() + transfer.STEP_TIMEOUT)
        except (HandoverError, OSError) as exc:
            conn.close()
            server.resume_reading()
            server.counters["handovers_failed"] += 1
            log.error("handover_failed", peer_pid=pid, error=str(exc),
                      paused_ms=round((time.monotonic() - began) * 1000, 1))
            return
        # committed: the new process serves from now on; this one leaves without a word
        self.successor = conn
        server.handed_over = True
        server.stop("handover")
        log.info("handover_sent", to_pid=pid, sessions=len(server.room), bytes=len(blob),
                 ms=pause_ms)


class SelfRestart(Service):
    """On SIGUSR2, run ``chatd restart`` (a handover) as a child of the daemon itself."""

    name = "self_restart"

    def __init__(self, server: Server):
        self.server = server
        self.pid: int | None = None
        self._output: int | None = None

    def start(self) -> None:
        self.server.handle_signal(signal.SIGUSR2, self.restart)

    def pids(self) -> tuple[int, ...]:
        return (self.pid,) if self.pid is not None else ()

    def restart(self) -> None:
        if self.pid is not None:
            log.warning("self_restart_busy", child_pid=self.pid)
            return
        argv = [sys.executable, "-m", "chatd", "restart"]
        if self.server.config_path is not None:
            argv += ["-c", self.server.config_path]
        read_end, write_end = os.pipe()
        try:
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                       (os.POSIX_SPAWN_DUP2, write_end, 2)]
            self.pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions,
                                      setsigdef=(signal.SIGPIPE, signal.SIGTSTP,
                                                 signal.SIGTTIN, signal.SIGTTOU))
        except OSError as exc:
            os.close(read_end)
            log.error("self_restart_failed", error=exc.strerror or str(exc))
            return
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self._output = read_end
        log.info("self_restart", child_pid=self.pid, signal="SIGUSR2")

    def child_exited(self, pid: int, status: int) -> None:
        if pid != self.pid:
            return
        self.pid = None
        output = b""
        if self._output is not None:
            with contextlib.suppress(OSError):
                output = os.read(self._output, 8192)
            os.close(self._output)
            self._output = None
        if status != 0:  # we are still here: the new process did not take over
            log.error("self_restart_failed", status=describe_status(status),
                      error=output.decode("utf-8", "replace").strip())

    def stop(self) -> None:
        if self._output is not None:
            os.close(self._output)
            self._output = None

    def status(self) -> dict[str, Any]:
        return {}
