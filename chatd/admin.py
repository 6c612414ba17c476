"""The admin child: the process that serves the control socket, and the daemon's service
that forks it, relays for it and replaces it.

The child owns everything a local admin can reach: the Unix socket
(``control.sock``), the FIFO, and a terminal on stdin under ``chatd run``.
It checks who is connecting, bounds every request (size, nesting, time,
number at once) and relays requests to the daemon as JSON lines over a
socketpair (:mod:`chatd.control.channel`). A slow or hostile peer costs the
child, never the room.

The daemon never touches the control socket itself; :class:`AdminService`
only reads the socketpair, so nothing a local peer does can stall the room.
The service's child is reaped through the server's one ``waitpid`` loop
(:mod:`chatd.services`) and forked again, with backoff when it keeps dying
or the fork itself fails. A child that is alive but stopped answering (a
heartbeat over the socketpair) is killed and replaced too.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from daemon.daemon import close_all_open_files

from chatd import log as log_mod
from chatd.commands import execute
from chatd.control import files
from chatd.control.channel import MAX_REQUEST, LineBuffer, LineChannel, encode
from chatd.control.files import MAX_CONNECTIONS
from chatd.control.peers import group_members, peer_allowed, peer_credentials
from chatd.server import Server
from chatd.services import Backoff, Service, describe_status
from chatd.settings import ControlSettings

log = structlog.get_logger("chatd")

CONNECTION_TIMEOUT = 5.0
#: verbs a FIFO line or a terminal line may use, and how the rest of the line maps to args
LINE_VERBS = {"say": ("text",), "kick": ("name", "reason"), "reload": ()}

FIRST_READY_TIMEOUT = 10.0
#: The daemon asks the child for a sign of life this often over the socketpair...
HEARTBEAT_SECONDS = 2.0
#: ...and replaces it when this many questions in a row went unanswered.
HEARTBEAT_MISSES = 3
#: How long a stopping daemon waits for the child to end on SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0


class AdminStartError(Exception):
    """The first admin child could not serve; the message says why."""


def parse_line(line: str) -> dict[str, Any] | None:
    """A FIFO or terminal line (``say hello``, ``kick bob spam``) as a request; None if empty."""
    line = line.strip()
    if not line:
        return None
    verb, _, rest = line.partition(" ")
    names = LINE_VERBS.get(verb)
    if names is None:
        return {"cmd": verb, "args": {}}
    values = rest.split(" ", len(names) - 1) if names and rest else []
    return {"cmd": verb, "args": dict(zip(names, values, strict=False))}


# -- the admin child ------------------------------------------------------------------


@dataclass
class _Peer:
    channel: LineChannel
    deadline: float
    waiting: bool = False  # a request is with the daemon
    closing: bool = False
    last_active: float = 0.0  # when it connected or last sent something
    pid: int = 0
    uid: int = 0

    @property
    def idle(self) -> bool:
        """Connected, but no complete request yet: the one to drop when the table is full."""
        return not self.waiting and not self.closing


@dataclass
class AdminChild:
    """The loop of the forked admin child."""

    settings: ControlSettings
    channel: socket.socket  # to the daemon
    daemon_uid: int
    read_terminal: bool = False
    peers: dict[int, _Peer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.group_gid, self.members = group_members(self.settings.group)
        self.listener = files.create_socket(self.settings, self.group_gid)
        try:
            self.fifo = files.create_fifo(self.settings, self.group_gid)
        except OSError:
            self.listener.close()
            os.unlink(self.settings.socket)  # ours: we just bound it
            raise
        self._identities = self._current_identities()
        self._fifo_lines = LineBuffer(MAX_REQUEST)
        self._terminal_lines = LineBuffer(MAX_REQUEST)
        # lines any local peer can cause, each kind logged at a bounded rate
        self._log_bounded = log_mod.BoundedLog(log, {name: "warning" for name in (
            "control_refused", "control_peer_evicted", "control_peer_timeout",
            "control_line_too_long", "control_line_failed")})
        self._daemon = LineChannel(self.channel, max_depth=None)  # the daemon is trusted
        self._next_id = 0
        self._pending: dict[int, int | None] = {}  # request id -> peer fd (None: no reply)

    def serve(self) -> None:
        self.channel.setblocking(True)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.fifo, selectors.EVENT_READ, self._read_fifo)
        self.selector.register(self.channel, selectors.EVENT_READ, self._from_daemon)
        if self.read_terminal:
            self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, self._read_terminal)
        self._send_daemon({"event": "ready", "pid": os.getpid(), "socket": self.settings.socket})
        log.info("admin_child_serving", socket=self.settings.socket, fifo=self.settings.fifo)
        while True:
            for key, mask in self.selector.select(timeout=1.0):
                key.data(key, mask)
            self._expire_peers()
            self._recreate_missing_files()

    # -- files removed under our feet (runtime_dir wiped, tmp cleaners) -------------------

    def _current_identities(self) -> tuple[tuple[int, int] | None, ...]:
        def identity(path: str) -> tuple[int, int] | None:
            try:
                st = os.lstat(path)
            except OSError:
                return None
            return st.st_dev, st.st_ino

        return identity(self.settings.socket), identity(self.settings.fifo)

    def _recreate_missing_files(self) -> None:
        """A control socket or FIFO that was removed is created again, or the log says why."""
        if self._current_identities() == self._identities:
            return
        self.selector.unregister(self.listener)
        self.selector.unregister(self.fifo)
        self.listener.close()
        os.close(self.fifo)
        try:
            self.listener = files.create_socket(self.settings, self.group_gid)
            self.fifo = files.create_fifo(self.settings, self.group_gid)
        except OSError as exc:
            log.error("control_files_lost", error=exc.strerror or str(exc))
            raise SystemExit(1) from None  # the daemon starts another child, with backoff
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.fifo, selectors.EVENT_READ, self._read_fifo)
        self._identities = self._current_identities()
        log.warning("control_files_recreated", socket=self.settings.socket,
                    fifo=self.settings.fifo)

    # -- the daemon side ----------------------------------------------------------

    def _send_daemon(self, message: dict[str, Any]) -> None:
        self._daemon.send(message)  # a blocking socket: all of it, or an error

    def _relay(self, request: Any, peer_fd: int | None) -> None:
        if (not isinstance(request, dict) or not isinstance(request.get("cmd"), str)
                or not isinstance(request.get("args", {}), dict)):
            self._answer(peer_fd, {"ok": False, "error": 'malformed request: expected '
                                   '{"cmd": "...", "args": {...}}'})
            return
        self._next_id += 1
        self._pending[self._next_id] = peer_fd
        self._send_daemon({"id": self._next_id, "cmd": request["cmd"],
                           "args": request.get("args", {})})

    def _from_daemon(self, key: Any, mask: int) -> None:
        if not self._daemon.read():  # the daemon is gone: so are we
            log.info("admin_child_exiting", reason="daemon closed the channel")
            raise SystemExit(0)
        for line in self._daemon.take_lines():
            answer = self._daemon.decode(line)
            if answer.get("event") == "ping":  # the daemon's heartbeat: we are alive
                self._send_daemon({"event": "pong", "seq": answer.get("seq")})
                continue
            peer_fd = self._pending.pop(answer.pop("id", None), None)
            if peer_fd is None:
                if not answer.get("ok"):
                    self._log_bounded("control_line_failed", error=answer.get("error"))
                continue
            self._answer(peer_fd, answer)

    # -- socket peers ---------------------------------------------------------------

    def _accept(self, key: Any, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        pid, uid, gid = peer_credentials(conn)
        # who first: a refused stranger must never push out an allowed peer's connection
        if not peer_allowed(uid, gid, self.daemon_uid, self.group_gid, self.members):
            _try_send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                             "use the control socket"})
            conn.close()
            self._log_bounded("control_refused", reason="permission denied",
                              peer_pid=pid, uid=uid)
            return
        if len(self.peers) >= MAX_CONNECTIONS and not self._evict_idle_peer():
            _try_send(conn, {"ok": False, "error": "too many control connections, try again"})
            conn.close()
            self._log_bounded("control_refused", reason="too many connections",
                              peer_pid=pid, uid=uid)
            return
        now = time.monotonic()
        peer = _Peer(LineChannel(conn, max_line=MAX_REQUEST), now + CONNECTION_TIMEOUT,
                     last_active=now, pid=pid, uid=uid)
        self.peers[conn.fileno()] = peer
        self.selector.register(conn, selectors.EVENT_READ, self._peer_event)

    def _evict_idle_peer(self) -> bool:
        """Make room by closing the connection idle longest; False if every one is busy.

        Connections that only sit there would otherwise lock chatctl out
        until they time out, and a peer can open them faster than that.
        """
        idle = [peer for peer in self.peers.values() if peer.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda peer: peer.last_active)
        _try_send(victim.channel.sock, {"ok": False, "error": "closed: too many control "
                                        "connections, and this one had sent no request"})
        self._log_bounded("control_peer_evicted", reason="too many connections, idle longest",
                          peer_pid=victim.pid, uid=victim.uid)
        self._close(victim)
        return True

    def _peer_event(self, key: Any, mask: int) -> None:
        peer = self.peers.get(key.fd)
        if peer is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ and not peer.waiting and not peer.closing:
            try:
                still_open = peer.channel.read(65536)
            except OSError:
                still_open = False
            if not still_open:
                self._close(peer)
                return
            peer.last_active = time.monotonic()
            if peer.channel.too_long:  # known as soon as it is, newline or not
                self._answer(key.fd, {"ok": False,
                                      "error": f"request larger than {MAX_REQUEST} bytes"})
                return
            lines = peer.channel.take_lines()
            if lines:  # one request per connection: the first line
                peer.waiting = True
                try:
                    request = peer.channel.decode(lines[0])
                except ValueError as exc:
                    self._answer(key.fd, {"ok": False, "error": f"malformed request: {exc}"})
                    return
                self._relay(request, key.fd)

    def _answer(self, peer_fd: int | None, answer: dict[str, Any]) -> None:
        if peer_fd is None:
            if not answer.get("ok"):
                self._log_bounded("control_line_failed", error=answer.get("error"))
            return
        peer = self.peers.get(peer_fd)
        if peer is None:
            return
        peer.closing = True
        self._flush(peer, answer)

    def _flush(self, peer: _Peer, answer: dict[str, Any] | None = None) -> None:
        try:
            done = peer.channel.send(answer) if answer is not None else peer.channel.flush()
        except OSError:
            self._close(peer)
            return
        if not done:
            self.selector.modify(peer.channel.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self._peer_event)
        elif peer.closing:
            self._close(peer)

    def _close(self, peer: _Peer) -> None:
        fd = peer.channel.fileno()
        self.peers.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(peer.channel.sock)
        peer.channel.close()
        for request_id, waiting_fd in list(self._pending.items()):
            if waiting_fd == fd:
                self._pending[request_id] = None  # the answer, when it comes, goes nowhere

    def _expire_peers(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if now > peer.deadline:
                self._log_bounded("control_peer_timeout", peer_pid=peer.pid, uid=peer.uid)
                self._close(peer)

    # -- FIFO and terminal lines -------------------------------------------------------

    def _read_fifo(self, key: Any, mask: int) -> None:
        self._lines(os.read(self.fifo, 65536), self._fifo_lines, "fifo")

    def _read_terminal(self, key: Any, mask: int) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.selector.unregister(sys.stdin.fileno())
            return
        self._lines(data, self._terminal_lines, "terminal", default_verb="say")

    def _lines(self, data: bytes, splitter: LineBuffer, source: str,
               default_verb: str = "") -> None:
        lines, too_long = splitter.feed(data)
        for _ in range(too_long):
            self._log_bounded("control_line_too_long", source=source, limit=MAX_REQUEST)
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if default_verb and line.strip():
                line = f"{default_verb} {line}"
            request = parse_line(line)
            if request is not None:
                self._relay(request, None)


def _try_send(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.send(encode(answer))


def run_admin_child(settings: ControlSettings, channel: socket.socket, daemon_uid: int,
                    read_terminal: bool) -> int:
    """The admin child's whole life; returns its exit status."""
    # the daemon handles these (SIGUSR2: a handover restart), then stops us
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        child = AdminChild(settings, channel, daemon_uid, read_terminal)
    except OSError as exc:
        message = exc.strerror or str(exc)
        with contextlib.suppress(OSError):
            channel.sendall(encode({"event": "error", "error": message}))
        log.error("admin_child_failed", error=message)
        return 1
    try:
        child.serve()
    except SystemExit as exc:
        return int(exc.code or 0)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    return 0


def _child_main(channel: socket.socket, settings: ControlSettings, read_terminal: bool) -> None:
    """The admin child: keep only what it needs, serve, and never return into the daemon."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        sink = log_mod.current_sink()
        keep = {0, 1, 2, channel.fileno()}
        if sink is not None and sink.fileno() is not None:
            keep.add(sink.fileno())
        close_all_open_files(exclude=keep)
        with contextlib.suppress(Exception):
            import setproctitle  # optional: shows what the process is in ps

            setproctitle.setproctitle("chatd: admin child")
        code = run_admin_child(settings, channel, os.getuid(), read_terminal)
    except BaseException:  # noqa: BLE001 - the child must end here whatever happens
        with contextlib.suppress(Exception):
            log.exception("admin_child_crashed")
    finally:
        os._exit(code)


# -- the daemon's side ------------------------------------------------------------------


class AdminService(Service):
    """Forks the admin child, relays for it, and replaces it when it dies or hangs."""

    name = "admin"

    def __init__(self, server: Server, read_terminal: bool = False):
        self.server = server
        self.read_terminal = read_terminal
        self.pid: int | None = None
        self.channel: LineChannel | None = None
        self._spawned_at = 0.0
        self._backoff = Backoff(first=0.5, most=30.0, stable_after=10.0)
        self._respawn_at: float | None = None
        self._stopping = False
        self._next_ping = math.inf
        self._ping_seq = 0
        self._awaiting_pong = False
        self._unanswered = 0  # heartbeats in a row the child did not answer
        self._unanswered_since = 0.0
        self._child_closed = False  # the child closed its end: it is exiting

    def pids(self) -> tuple[int, ...]:
        return (self.pid,) if self.pid is not None else ()

    def status(self) -> dict[str, Any]:
        return {"admin_child_pid": self.pid}

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Fork the first child and wait until it serves; raises :class:`AdminStartError`."""
        try:
            self._spawn()
        except OSError as exc:
            raise AdminStartError(f"cannot start the admin child: {exc.strerror or exc}"
                                  ) from None
        try:
            first = self._first_message()
            if first.get("event") != "ready":
                raise AdminStartError(first.get("error", "the admin child failed"))
        except AdminStartError:
            self._abandon_child()
            raise
        self._watch()

    def _first_message(self) -> dict[str, Any]:
        assert self.channel is not None
        self.channel.sock.settimeout(FIRST_READY_TIMEOUT)
        try:
            line = self.channel.read_line()
        except TimeoutError:
            raise AdminStartError("the admin child did not start serving in time") from None
        except OSError:
            line = None
        finally:
            self.channel.sock.setblocking(False)
        if line is None:
            raise AdminStartError("the admin child exited during start-up")
        try:
            message = self.channel.decode(line)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            raise AdminStartError("the admin child said something unexpected at start-up")
        return message

    def _abandon_child(self) -> None:
        """A first child that did not serve: end it, reap it, and leave no files behind."""
        self._stopping = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(block=True)
        files.remove_stale_files(self.server.settings.control)

    def _spawn(self) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            for end in (parent_end, child_end):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:
            _child_main(child_end, self.server.settings.control, self.read_terminal)
        child_end.close()
        parent_end.setblocking(False)
        self.pid = pid
        self.channel = LineChannel(parent_end)
        self._child_closed = False
        self._spawned_at = time.monotonic()
        self._next_ping = self._spawned_at + HEARTBEAT_SECONDS
        self._awaiting_pong = False
        self._unanswered = 0
        log.info("admin_child_started", child_pid=pid)

    def child_exited(self, pid: int, status: int | None) -> None:
        """Our child is gone (the server reaped it): plan the next one, with backoff."""
        if pid != self.pid:
            return
        self.pid = None
        self._next_ping = math.inf
        if self.channel is not None:
            self.server.unwatch(self.channel.sock)
            self.channel.close()
            self.channel = None
        if self._stopping:
            return
        delay = self._backoff.next_delay(lasted=time.monotonic() - self._spawned_at)
        self._respawn_at = time.monotonic() + delay
        log.warning("admin_child_exited", child_pid=pid,
                    status=describe_status(status) if status is not None else "unknown",
                    respawn_in=round(delay, 1))

    def tick(self, now: float) -> None:
        if self._stopping:
            return
        if self.pid is None:
            if self._respawn_at is not None and now >= self._respawn_at:
                self._respawn(now)
        elif now >= self._next_ping:
            self._heartbeat(now)

    def _respawn(self, now: float) -> None:
        """Fork a new child; when that fails (EAGAIN at RLIMIT_NPROC, ENOMEM, EMFILE),
        say so and try again later, with backoff: the room goes on meanwhile."""
        try:
            self._spawn()
        except OSError as exc:
            self._retry_later(now, exc.strerror or str(exc))
            return
        except Exception as exc:
            self._retry_later(now, repr(exc))
            raise  # the server's guard logs where it came from
        self._respawn_at = None
        self._watch()

    def _retry_later(self, now: float, error: str) -> None:
        delay = self._backoff.next_delay()
        self._respawn_at = now + delay
        log.error("admin_child_fork_failed", error=error, retry_in=round(delay, 1))

    def _heartbeat(self, now: float) -> None:
        """Ask the child for a sign of life; replace it after ``HEARTBEAT_MISSES`` silences.

        What the child said meanwhile is read first: if the daemon itself stood
        still (SIGSTOP, a slow reload), the answers wait in the socketpair and
        count. Silences are counted per question, never by the clock alone.
        """
        self._receive()
        if self._child_closed:  # it is exiting: SIGCHLD does the rest
            return
        self._next_ping = now + HEARTBEAT_SECONDS
        if self._awaiting_pong:
            self._unanswered += 1
            if self._unanswered >= HEARTBEAT_MISSES:
                log.error("admin_child_hung", child_pid=self.pid, unanswered=self._unanswered,
                          seconds=round(now - self._unanswered_since, 1))
                self._next_ping = math.inf  # it is being replaced: ask no more
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)  # SIGCHLD: reaped, then replaced
                return
        else:
            self._unanswered_since = now
        self._ping_seq += 1
        self._awaiting_pong = True
        self._send({"event": "ping", "seq": self._ping_seq})

    def stop(self) -> None:
        """Graceful stop: end the child, reap it, remove the socket and FIFO."""
        self._stopping = True
        pid = self.pid
        if pid is not None:
            for signum in (signal.SIGTERM, signal.SIGCONT):  # a stopped child ends too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + STOP_TIMEOUT
            while not self._reap(block=False) and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._reap(block=True)
        files.remove_files(self.server.settings.control)

    def _reap(self, block: bool) -> bool:
        """Wait for our own child, never another's; True once it is gone."""
        pid = self.pid
        if pid is None:
            return True
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped already: its status is lost
            done, status = pid, None
        if done == 0:
            return False
        self.child_exited(pid, status)
        return True

    # -- the relay ------------------------------------------------------------------

    def _watch(self) -> None:
        channel = self.channel
        if channel is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.pending else 0)
        self.server.watch(channel.sock, events, self._on_channel)

    def _on_channel(self, mask: int) -> None:
        channel = self.channel
        if channel is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._send(None)
        if mask & selectors.EVENT_READ:
            self._receive()

    def _receive(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            still_open = channel.read()
        except OSError:
            still_open = False
        if not still_open:  # the child is gone; SIGCHLD does the rest
            self._child_closed = True
            self.server.unwatch(channel.sock)
            return
        for line in channel.take_lines():
            self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        assert self.channel is not None
        try:
            message = self.channel.decode(line)
        except (ValueError, RecursionError):  # the child checks requests; the room stays up
            message = None
        if not isinstance(message, dict):
            log.error("admin_channel_garbage")
            return
        if "event" in message:
            if message["event"] == "pong":
                self._awaiting_pong = False
                self._unanswered = 0
                return
            level = log.info if message["event"] == "ready" else log.error
            level("admin_child_" + str(message["event"]), **{k: v for k, v in message.items()
                                                            if k != "event"})
            return
        answer = execute(self.server, str(message.get("cmd")), message.get("args") or {})
        answer["id"] = message.get("id")
        self._send(answer)

    def _send(self, message: dict[str, Any] | None) -> None:
        """Send ``message`` (None: what waits) as far as the socketpair takes it now."""
        channel = self.channel
        if channel is None or self._child_closed:
            return
        try:
            if message is not None:
                channel.send(message)
            else:
                channel.flush()
        except OSError:  # the child is gone; SIGCHLD does the rest
            channel.discard_output()
        self._watch()
