"""The client's UDP socket, and the blocking login both front ends start with.

The socket is *connected* to the server: the kernel then drops datagrams from
any other address (nobody else can send us ``EXIT``), and an ICMP "port
unreachable" comes back as ``ConnectionRefusedError``, which tells at once
that nothing listens on a candidate address.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from chatd import protocol
from chatd.client.session import ClientSession, Joined, NoAnswer, Refused
from chatd.formats import format_addr

RECV_SIZE = 65536


class Unreachable(Exception):
    """The server cannot be reached; the message is for the person."""


def no_answer_message(host: str, port: int) -> str:
    return f"no answer from {format_addr((host, port))} — is chatd running?"


def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """Every (family, address) ``host`` names, in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unreachable(f"cannot resolve {host}: {exc}") from None
    seen: list[tuple[int, tuple]] = []
    for family, _, _, _, addr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, addr) not in seen:
            seen.append((family, addr))
    if not seen:
        raise Unreachable(f"cannot resolve {host}: no IPv4 or IPv6 address")
    return seen


def open_socket(family: int, addr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def send_all(sock: socket.socket, datagrams: list[bytes]) -> None:
    """Send, ignoring the errors UDP is allowed to have: the session's timers cover loss."""
    for datagram in datagrams:
        with contextlib.suppress(OSError):
            sock.send(datagram)


def receive_all(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` (an ICMP error in between is skipped)."""
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(RECV_SIZE))
        except (BlockingIOError, InterruptedError):
            return out
        except ConnectionRefusedError:
            continue
        except OSError:
            return out


@dataclass
class Link:
    """The way to the server: the candidate addresses, and the socket once one answered."""

    host: str
    port: int
    candidates: list[tuple[int, tuple]]
    sock: socket.socket | None = None

    @classmethod
    def resolve(cls, host: str, port: int) -> Link:
        return cls(host, port, resolve(host, port))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Interrupted:
    """The login was abandoned because a signal asked the client to stop."""


LoginResult = Joined | Refused | NoAnswer | Interrupted


def login(link: Link, session: ClientSession, name: str,
          clock: Callable[[], float] = time.monotonic,
          interrupt: socket.socket | None = None) -> LoginResult:
    """Log in as ``name``, blocking until the server answers or every try is spent.

    The first time, each candidate address is tried in turn (``localhost``
    often means ``::1`` first, while chatd listens on IPv4 by default); the
    first one that answers anything is kept for the rest of the session.
    ``interrupt`` becoming readable (a signal wakeup socket) abandons the login.
    """
    if link.sock is not None:
        return _login_on(link.sock, session, name, clock, interrupt)
    for family, addr in link.candidates:
        try:
            sock = open_socket(family, addr)
        except OSError:
            continue
        result = _login_on(sock, session, name, clock, interrupt)
        if isinstance(result, NoAnswer):  # nobody there, but a later candidate may be
            sock.close()
            continue
        link.sock = sock
        return result
    return NoAnswer()


def _login_on(sock: socket.socket, session: ClientSession, name: str,
              clock: Callable[[], float], interrupt: socket.socket | None) -> LoginResult:
    """One login over one socket; an ICMP "port unreachable" ends it at once."""
    receive_all(sock)  # a stale answer to an earlier try is not the answer to this one
    session.login(name, clock())
    send_all(sock, session.take_datagrams())
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            if interrupt is not None:
                selector.register(interrupt, selectors.EVENT_READ)
            while True:
                deadline = session.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - clock())
                ready = [key.fileobj for key, _ in selector.select(timeout)]
                if interrupt is not None and ready == [interrupt]:  # an answer comes first
                    _abandon(sock, session, name)
                    return Interrupted()
                if sock in ready:
                    try:
                        data = sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionRefusedError:
                        session.cancel_login()  # nothing listens there
                        return NoAnswer()
                    except OSError:
                        continue
                    events = session.receive(data, clock())
                else:
                    events = session.tick(clock())
                send_all(sock, session.take_datagrams())
                for event in events:
                    if isinstance(event, Joined | Refused | NoAnswer):
                        return event
    except KeyboardInterrupt:
        _abandon(sock, session, name)
        raise


def _abandon(sock: socket.socket, session: ClientSession, name: str) -> None:
    """Stop a login half way; ``Q`` in case the ``OK`` is already on its way.

    Without it the server could keep a session nobody uses (one that never
    sent a keepalive never times out). A ``Q`` from an address without a
    session is simply dropped by the server.
    """
    session.cancel_login()
    send_all(sock, [protocol.encode(protocol.Quit(name))])
