"""Pipe mode: stdin lines become chat lines, room lines become stdout lines.

Made for bots and scripts: one received datagram is one stdout line, flushed
at once; the client's own notices and errors go to stderr so they never mix
with the room's text; no colour, no prompt. The loop is a plain selector over
the socket, stdin and a signal wakeup socket, with the session's next
deadline as the select timeout.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TextIO

from chatd.client import EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, net
from chatd.client.session import ClientSession, Event, Line, NoAnswer, NotSent, Refused, State
from chatd.client.texts import status_text

#: Bytes kept of a stdin line not yet ended: more than any datagram can carry.
MAX_PENDING = 65536

#: Signals that mean "leave the room now" (the supervisor of a bot sends TERM).
LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class PipeOutput:
    """stdout for the room's lines, stderr for the client's own; survives a closed stdout."""

    def __init__(self, stdout: BinaryIO, stderr: TextIO, prog: str = "chat-client"):
        self.stdout = stdout
        self.stderr = stderr
        self.prog = prog
        self.broken = False

    def line(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stdout.write(text.encode("utf-8", "backslashreplace") + b"\n")
            self.stdout.flush()
        except OSError:  # EPIPE mostly; EIO when a terminal went away
            # The reader went away. Point fd 1 at /dev/null so that the
            # interpreter's final flush does not complain, then leave the room.
            self.broken = True
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stdout.fileno())
                os.close(devnull)

    def status(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"{self.prog}: {text}", file=self.stderr, flush=True)


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete lines (CR LF or LF, undecodable bytes replaced) and the rest of ``buffer``."""
    *complete, rest = buffer.split(b"\n")
    return [_decode(raw) for raw in complete], rest


def _decode(raw: bytes) -> str:
    # The server drops invalid UTF-8 whole; U+FFFD at least gets the line through.
    return raw.removesuffix(b"\r").decode("utf-8", errors="replace")


@contextlib.contextmanager
def _signals_to(sock: socket.socket) -> Iterator[None]:
    """Turn the leave signals into bytes on ``sock``, for the selector to see."""
    previous_fd = signal.set_wakeup_fd(sock.fileno(), warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, _ignore) for signum in LEAVE_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)


def _ignore(signum: int, frame: object) -> None:
    """The wakeup fd has already carried the signal to the loop."""


def run(link: net.Link, session: ClientSession, name: str, out: PipeOutput,
        stdin_fd: int = 0, clock: Callable[[], float] = time.monotonic) -> int:
    """Log in, then chat until stdin ends, a signal, or the server's ``EXIT``.

    Returns the exit status. The signals are caught before the login, so that
    one arriving just after ``OK`` still leaves the room instead of leaving a
    session behind.
    """
    wake_r, wake_w = socket.socketpair()
    for s in (wake_r, wake_w):
        s.setblocking(False)
    with wake_r, wake_w, _signals_to(wake_w):
        result = net.login(link, session, name, clock, interrupt=wake_r)
        if isinstance(result, net.Interrupted):
            return EXIT_INTERRUPTED
        if isinstance(result, NoAnswer):
            out.status(net.no_answer_message(link.host, link.port))
            return EXIT_UNREACHABLE
        if isinstance(result, Refused):
            out.status(result.text)
            return EXIT_UNREACHABLE
        return _chat(link, session, out, stdin_fd, wake_r, clock)


def _chat(link: net.Link, session: ClientSession, out: PipeOutput, stdin_fd: int,
          wake_r: socket.socket, clock: Callable[[], float]) -> int:
    sock = link.sock
    assert sock is not None and session.state is State.IN_ROOM
    # poll, unlike epoll, accepts a regular file as stdin (``chat-client < lines.txt``).
    selector = selectors.PollSelector()
    selector.register(sock, selectors.EVENT_READ, "net")
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    stdin_open = True
    try:
        selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
    except (OSError, ValueError):  # no stdin at all (closed fd)
        stdin_open = False
    pending = b""
    overlong = False  # the start of the current stdin line was thrown away
    events: list[Event] = []

    def leave() -> None:
        nonlocal stdin_open
        if stdin_open:
            selector.unregister(stdin_fd)
            stdin_open = False
        events.extend(session.leave(clock()))

    def typed(text: str) -> None:
        if session.state not in (State.IN_ROOM, State.LOST):
            return  # leaving: the rest of stdin is not sent
        if text.strip() == "/quit":
            leave()
        elif text:
            try:
                session.say(text)
            except NotSent as exc:
                out.status(str(exc))

    def got_input(chunk: bytes) -> None:
        nonlocal pending, overlong
        lines, pending = split_lines(pending + chunk)
        for index, text in enumerate(lines):
            if index == 0 and overlong:  # the end of a line too long to keep
                out.status(f"line not sent: more than {MAX_PENDING} bytes")
                overlong = False
            else:
                typed(text)
        if len(pending) > MAX_PENDING:  # memory stays bounded
            pending, overlong = b"", True

    with selector:
        if not stdin_open:
            leave()
        while session.state is not State.CLOSED:
            deadline = session.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            for key, _ in selector.select(timeout):
                if key.data == "net":
                    for data in net.receive_all(sock):
                        events.extend(session.receive(data, clock()))
                elif key.data == "signal":
                    with contextlib.suppress(OSError):
                        wake_r.recv(512)
                    leave()
                elif key.data == "stdin" and stdin_open:
                    try:
                        chunk = os.read(stdin_fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        out.status(f"cannot read stdin: {exc.strerror}")
                        chunk = b""
                    if chunk:
                        got_input(chunk)
                    else:
                        if overlong:
                            out.status(f"line not sent: more than {MAX_PENDING} bytes")
                        elif pending:
                            typed(_decode(pending))
                        pending = b""
                        leave()
            events.extend(session.tick(clock()))
            net.send_all(sock, session.take_datagrams())
            for event in events:
                _show(event, out)
            events.clear()
            if out.broken and session.state in (State.IN_ROOM, State.LOST):
                leave()
                net.send_all(sock, session.take_datagrams())
    return EXIT_OK


def _show(event: Event, out: PipeOutput) -> None:
    if isinstance(event, Line):
        out.line(event.text)
        return
    text = status_text(event)
    if text is not None:
        out.status(text)
