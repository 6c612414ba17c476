"""The Prometheus endpoint (``metrics.listen``): GET /metrics, served by the admin child.

Where it runs, and why so. HTTP never runs on the UDP loop's time: the
endpoint lives in the admin child, in the child's own selectors loop, beside
the control socket, and asks the daemon for its status over the same
socketpair ``chatctl status`` uses. The daemon builds the status dict, as it
does for ``chatctl status``, and nothing more: the text is rendered here
(:func:`chatd.metrics.render`). Whatever an HTTP client does costs the admin
child at most, and the admin child is bounded:

- no threads: connections are non-blocking sockets in the child's loop, so
  nothing can pile up threads; at most :data:`MAX_CONNECTIONS` at once, and when
  another arrives the idle one quiet longest (no complete request yet, or answered
  already) is closed: a newcomer is refused only while all of them wait for the
  daemon's status;
- every connection has one deadline, :data:`CONNECTION_TIMEOUT` from its
  accept, for the request in and the answer out: a slowloris trickling one
  byte a second, or a client that never reads, is closed when it is up;
- a request head is at most :data:`MAX_REQUEST_HEAD` bytes (431 otherwise);
  after the answer, at most :data:`LINGER_BYTES` more are read and dropped, for
  at most :data:`LINGER_SECONDS`, before the connection is closed;
- the daemon is asked once for all the scrapes waiting at one moment, and a
  status younger than :data:`FRESH_SECONDS` is served again, so a flood of
  scrapes costs the room at most about one status a second;
- the daemon not answering (stopped, busy) gives 503 after
  :data:`STATUS_TIMEOUT`, never a hung child: the child keeps answering the
  daemon's heartbeat throughout.

prometheus_client's own server (``start_http_server``) was the other
candidate. It runs a thread per connection with no limit, and its socket
timeout is per ``recv``, so a slowloris resets it with every byte; and its
collector, in another thread, would have to reach the daemon through the
child's loop anyway. The HTTP needed here is one request per connection, GET
or HEAD of one path, answered with ``Connection: close``: small enough to
serve in the loop the child already has.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog

from chatd import log as log_mod
from chatd import metrics
from chatd.control.channel import recv_ready
from chatd.formats import format_addr

log = structlog.get_logger("chatd")

#: connections served at once
MAX_CONNECTIONS = 32
#: seconds from accept until the answer is sent, whatever the client does meanwhile
CONNECTION_TIMEOUT = 10.0
#: longest request line and headers, in bytes
MAX_REQUEST_HEAD = 8192
#: seconds to wait for the daemon's status before answering 503
STATUS_TIMEOUT = 5.0
#: a status this young is served again instead of asking the daemon once more
FRESH_SECONDS = 1.0
#: after the answer: what is still read and thrown away, and for how long at most, so that
#: closing with unread input (a reset) cannot destroy the answer on its way to the client
LINGER_BYTES = 64 * 1024
LINGER_SECONDS = 2.0
PATH = "/metrics"


class MetricsBindError(OSError):
    """``metrics.listen`` could not be bound; ``strerror`` says so, naming the key."""


def bind(listen: str) -> socket.socket:
    """A listening, non-blocking TCP socket on ``listen`` (``host:port``, ``[v6]:port``,
    ``:port`` for every address); raises :class:`MetricsBindError`."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise MetricsBindError(0, f"metrics.listen: cannot listen on {listen}: "
                               f"{exc.strerror}") from None
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        # a replaced admin child binds again at once, past its predecessor's TIME_WAITs;
        # a port someone listens on is still refused (EADDRINUSE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host is None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise MetricsBindError(exc.errno or 0, f"metrics.listen: cannot listen on {listen}: "
                               f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass
class _Connection:
    sock: socket.socket
    deadline: float
    since: float  # when it connected or last sent something
    head: bytes = b""
    out: bytes = b""
    waiting: bool = False  # a complete request waits for the daemon's status
    answering: bool = False  # the answer is being written
    head_only: bool = False  # HEAD: the headers of the answer, no body
    lingering: int = 0  # answered: bytes still to read and drop before closing

    @property
    def idle(self) -> bool:
        """No complete request yet, or answered already: the kind to close to make room."""
        return bool(self.lingering) or (not self.waiting and not self.answering)


@dataclass
class MetricsEndpoint:
    """The HTTP side of ``metrics.listen``, run by the admin child's selectors loop.

    ``ask_status()`` sends the daemon one ``status`` request; its answer comes back
    through :meth:`on_status`. :meth:`tick` runs the deadlines, at least once a second.
    """

    listener: socket.socket
    selector: selectors.BaseSelector
    ask_status: Callable[[], None]
    connections: dict[int, _Connection] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._asked_at: float | None = None  # a status request is with the daemon
        self._fresh: tuple[float, bytes] | None = None  # (when, rendered text)
        self._log_bounded = log_mod.BoundedLog(log, {name: "warning" for name in (
            "metrics_peer_timeout", "metrics_peer_evicted", "metrics_refused",
            "metrics_bad_request")})

    def start(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()

    # -- connections --------------------------------------------------------------------

    def _accept(self, key: Any, mask: int) -> None:
        try:
            sock, peer = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and the like: the next accept may work
            self._log_bounded("metrics_refused", reason=exc.strerror or str(exc))
            return
        sock.setblocking(False)
        if len(self.connections) >= MAX_CONNECTIONS and not self._evict_idle():
            with contextlib.suppress(OSError):
                sock.send(_response(503, b"too many connections, try again\n"))
            sock.close()
            self._log_bounded("metrics_refused", reason="too many connections",
                              peer=format_addr(peer))
            return
        now = self.clock()
        conn = _Connection(sock, deadline=now + CONNECTION_TIMEOUT, since=now)
        self.connections[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, self._on_connection)

    def _evict_idle(self) -> bool:
        """Close the idle connection (no complete request yet, or answered already) that
        has been quiet longest; False if none is: every one is then answered within
        :data:`STATUS_TIMEOUT` and makes room."""
        idle = [conn for conn in self.connections.values() if conn.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda conn: conn.since)
        self._log_bounded("metrics_peer_evicted", reason="too many connections, idle longest",
                          peer=_peer_of(victim.sock))
        self._close(victim)
        return True

    def _on_connection(self, key: Any, mask: int) -> None:
        conn = self.connections.get(key.fd)
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._write(conn)
            return
        if conn.lingering:
            self._linger(conn)
            return
        if conn.waiting or conn.answering:  # one request per connection: the rest is unread
            return
        data = recv_ready(conn.sock, MAX_REQUEST_HEAD + 1 - len(conn.head))
        if data is None:
            return
        if not data:
            self._close(conn)
            return
        conn.head += data
        conn.since = self.clock()
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            end = conn.head.find(b"\n\n")
        if end < 0:
            if len(conn.head) > MAX_REQUEST_HEAD:
                self._log_bounded("metrics_bad_request", reason="request head too large",
                                  peer=_peer_of(conn.sock))
                self._answer(conn, 431, b"request header fields too large\n")
            return
        self._request(conn, conn.head[:end].decode("latin-1"))

    def _pause(self, conn: _Connection) -> None:
        """Waiting for the daemon: stop watching for input (a client that sends more must
        not spin the loop); the deadline still runs."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)

    def _request(self, conn: _Connection, head: str) -> None:
        request_line = head.split("\n", 1)[0].strip()
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._log_bounded("metrics_bad_request", reason="not an HTTP/1 request line",
                              peer=_peer_of(conn.sock))
            self._answer(conn, 400, b"bad request\n")
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            self._answer(conn, 405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
            return
        conn.head_only = method == "HEAD"
        if urlsplit(target).path != PATH:
            self._answer(conn, 404, f"not found: metrics are at {PATH}\n".encode())
            return
        now = self.clock()
        if self._fresh is not None and now - self._fresh[0] < FRESH_SECONDS:
            self._answer(conn, 200, self._fresh[1], content_type=metrics.CONTENT_TYPE)
            return
        conn.waiting = True
        self._pause(conn)
        if self._asked_at is None:
            self._asked_at = now
            self.ask_status()

    # -- the daemon's answer -------------------------------------------------------------

    def on_status(self, answer: dict[str, Any]) -> None:
        """The daemon answered a ``status`` request: every waiting scrape gets the text."""
        self._asked_at = None
        waiting = [conn for conn in self.connections.values() if conn.waiting]
        if not answer.get("ok") or not isinstance(answer.get("result"), dict):
            for conn in waiting:
                self._answer(conn, 503, f"chatd did not give its status: "
                             f"{answer.get('error', 'no result')}\n".encode())
            return
        body = metrics.render(answer["result"])
        self._fresh = (self.clock(), body)
        for conn in waiting:
            self._answer(conn, 200, body, content_type=metrics.CONTENT_TYPE)

    def tick(self) -> None:
        """Deadlines: scrapes the daemon kept waiting, connections past their time."""
        now = self.clock()
        if self._asked_at is not None and now - self._asked_at > STATUS_TIMEOUT:
            self._asked_at = None  # a late answer is still served, if anyone waits then
            for conn in list(self.connections.values()):
                if conn.waiting:
                    self._answer(conn, 503, b"chatd did not answer in time\n")
        for conn in list(self.connections.values()):
            if now > conn.deadline:
                if not conn.lingering:  # a lingering one was answered: nothing to say
                    self._log_bounded("metrics_peer_timeout", peer=_peer_of(conn.sock))
                self._close(conn)

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, conn: _Connection, code: int, body: bytes, *,
                content_type: str = "text/plain; charset=utf-8", extra: str = "") -> None:
        conn.waiting = False
        conn.answering = True
        conn.out = _response(code, body, content_type=content_type, extra=extra,
                             head_only=conn.head_only)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            try:
                self.selector.modify(conn.sock, selectors.EVENT_WRITE, self._on_connection)
            except KeyError:
                self.selector.register(conn.sock, selectors.EVENT_WRITE, self._on_connection)
            return
        # all sent: say so, then read what the client still sends until it closes too
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = LINGER_BYTES
        conn.deadline = min(conn.deadline, self.clock() + LINGER_SECONDS)
        try:
            self.selector.modify(conn.sock, selectors.EVENT_READ, self._on_connection)
        except KeyError:
            self.selector.register(conn.sock, selectors.EVENT_READ, self._on_connection)

    def _linger(self, conn: _Connection) -> None:
        data = recv_ready(conn.sock, min(conn.lingering, 16384))
        if data is None:
            return
        conn.lingering -= len(data)
        if not data or conn.lingering <= 0:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self.connections.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _response(code: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              extra: str = "", head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


def _peer_of(sock: socket.socket) -> str:
    try:
        return format_addr(sock.getpeername())
    except OSError:
        return "unknown"
