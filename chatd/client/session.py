"""The client side of the protocol, as a state machine with no I/O.

Both front ends feed it the same three things (datagrams from the server, the
passing of time, what the person asks for) and act on the events it returns;
it queues the datagrams to send. Time is an argument (monotonic seconds), so
the unit tests drive retries, keepalives and reconnections with a fake clock
instead of sleeping.

UDP loses datagrams, so every exchange that matters has a deadline: ``L`` is
retried, ``P`` is counted until it is answered, ``Q`` waits for ``EXIT`` only
so long. Every login proves the client's address first: ``H`` asks for a
cookie, and ``L name cookie`` follows as soon as it arrives (chatd.cookies).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from chatd import protocol
from chatd.client.sanitize import safe_line

#: ``L`` is sent this many times, ``timeout`` seconds apart, before giving up.
LOGIN_TRIES: Final = 3
#: This many unanswered ``P`` in a row and the connection is taken for lost.
MISSED_PONGS: Final = 3
#: The words that leave the room in terminal mode (the article's ``quit``, and ``/quit``).
QUIT_WORDS: Final = frozenset({"quit", "/quit"})


class State(enum.Enum):
    IDLE = "idle"  # not logged in: before the first L, or after a refusal
    LOGGING_IN = "logging in"
    IN_ROOM = "in the room"
    LOST = "connection lost"  # keepalives unanswered; L is retried until OK
    LEAVING = "leaving"  # Q sent, waiting for EXIT
    CLOSED = "closed"


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Joined:
    """The server said ``OK`` to our ``L``."""

    name: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The server answered ``L`` with a text (name taken, invalid, room full)."""

    text: str


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """Every ``L`` went unanswered."""


@dataclass(frozen=True, slots=True)
class Line:
    """A text line for the person, already made safe for a terminal."""

    text: str


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """Several keepalives went unanswered; the session retries ``L`` from now on."""


@dataclass(frozen=True, slots=True)
class Reconnected:
    """``OK`` again after a loss (the server may have restarted and forgotten us)."""

    name: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over.

    ``by_server`` is True when the server sent ``EXIT`` without being asked
    (kick, shutdown); ``reason`` is then the text line that came just before.
    ``confirmed`` is False when our ``Q`` was never answered.
    """

    by_server: bool
    reason: str | None = None
    confirmed: bool = True


Event = Joined | Refused | NoAnswer | Line | ConnectionLost | Reconnected | Closed


# -- errors for what the person asked -----------------------------------------


class NotSent(Exception):
    """A line the person typed that the client refuses to send; the message says why."""


class LineTooLong(NotSent):
    def __init__(self, size: int, limit: int):
        super().__init__(
            f"line not sent: {size} bytes as a datagram, the server accepts at most {limit}"
        )
        self.size = size
        self.limit = limit


class NotConnected(NotSent):
    def __init__(self, state: State):
        super().__init__(f"line not sent: {state.value}")
        self.state = state


def name_error(name: str) -> str | None:
    """Why ``name`` cannot even be sent, or None; the server judges the rest.

    The name is one field of a space-separated datagram, and the server strips
    a trailing newline from ``L`` but not from ``C``: a name with whitespace
    could never chat even if it were accepted.
    """
    if not name:
        return "a name cannot be empty"
    if any(c.isspace() for c in name):
        return "a name is one word: no spaces"
    return None


# -- the machine ----------------------------------------------------------------


@dataclass
class ClientSession:
    """One person's session with one server.

    ``keepalive`` is the interval between ``P`` (0 turns keepalives and loss
    detection off); ``timeout`` is how long each ``L`` and the final ``Q`` wait
    for their answer.
    """

    keepalive: float = 30.0
    timeout: float = 1.0
    max_datagram: int = protocol.DEFAULT_MAX_DATAGRAM
    login_tries: int = LOGIN_TRIES
    missed_pongs: int = MISSED_PONGS
    state: State = State.IDLE
    name: str | None = None
    _outbox: list[bytes] = field(default_factory=list, repr=False)
    _deadline: float | None = field(default=None, repr=False)
    _tries: int = field(default=0, repr=False)
    _unanswered: int = field(default=0, repr=False)
    _last_line: str | None = field(default=None, repr=False)

    # -- what the person asks -----------------------------------------------

    def login(self, name: str, now: float) -> None:
        """Send ``L name``; the answer (or its absence) comes back as an event."""
        if self.state not in (State.IDLE, State.LOGGING_IN):
            raise RuntimeError(f"cannot log in while {self.state.value}")
        self.name = name
        self.state = State.LOGGING_IN
        self._tries = 0
        self._send_login(now)

    def cancel_login(self) -> None:
        """Stop waiting for an answer (the front end knows nobody is listening)."""
        if self.state is State.LOGGING_IN:
            self.state = State.IDLE
            self._deadline = None

    def say(self, text: str) -> None:
        """Queue one chat line; raises :class:`NotSent` instead of sending what cannot work."""
        if self.state is not State.IN_ROOM:
            raise NotConnected(self.state)
        assert self.name is not None
        datagram = protocol.encode(protocol.Chat(self.name, text))
        if len(datagram) > self.max_datagram:
            raise LineTooLong(len(datagram), self.max_datagram)
        self._outbox.append(datagram)

    def leave(self, now: float) -> list[Event]:
        """Send ``Q`` and wait for ``EXIT``; leaving before joining just closes."""
        if self.state in (State.IN_ROOM, State.LOST):
            assert self.name is not None
            self._outbox.append(protocol.encode(protocol.Quit(self.name)))
            self.state = State.LEAVING
            self._deadline = now + self.timeout
            return []
        if self.state in (State.IDLE, State.LOGGING_IN):
            self.state = State.CLOSED
            self._deadline = None
            return [Closed(by_server=False, confirmed=False)]
        return []

    # -- what the network and the clock say -----------------------------------

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        """Everything one datagram from the server means."""
        state = self.state
        cookie = protocol.cookie_of(datagram)
        if cookie is not None:
            if state in (State.LOGGING_IN, State.LOST):
                assert self.name is not None
                self._outbox.append(protocol.encode(protocol.Login(self.name, cookie)))
            return []
        if state is State.LOGGING_IN:
            if datagram == protocol.OK:
                self._enter_room(now)
                assert self.name is not None
                return [Joined(self.name)]
            if protocol.is_control_word(datagram):
                return []
            self.state = State.IDLE
            self._deadline = None
            return [Refused(safe_line(datagram))]
        if state in (State.IN_ROOM, State.LOST, State.LEAVING):
            if datagram == protocol.EXIT:
                by_server = state is not State.LEAVING
                self.state = State.CLOSED
                self._deadline = None
                return [Closed(by_server=by_server,
                               reason=self._last_line if by_server else None)]
            if datagram == protocol.PONG:
                self._unanswered = 0
                return []
            if datagram == protocol.OK:
                if state is State.LOST:
                    self._enter_room(now)
                    assert self.name is not None
                    return [Reconnected(self.name)]
                return []  # a duplicate answer to a retried L
            line = safe_line(datagram)
            self._last_line = line
            return [Line(line)]
        return []  # IDLE or CLOSED: nothing we asked for

    def tick(self, now: float) -> list[Event]:
        """Whatever is due at ``now``: retries, keepalives, giving up."""
        if self._deadline is None or now < self._deadline:
            return []
        state = self.state
        if state is State.LOGGING_IN:
            if self._tries >= self.login_tries:
                self.state = State.IDLE
                self._deadline = None
                return [NoAnswer()]
            self._send_login(now)
            return []
        if state is State.IN_ROOM:
            if self._unanswered >= self.missed_pongs:
                self.state = State.LOST
                self._send_login(now, every=self.keepalive)
                return [ConnectionLost()]
            assert self.name is not None
            self._outbox.append(protocol.encode(protocol.Ping(self.name)))
            self._unanswered += 1
            self._deadline = now + self.keepalive
            return []
        if state is State.LOST:
            self._send_login(now, every=self.keepalive)
            return []
        if state is State.LEAVING:
            self.state = State.CLOSED
            self._deadline = None
            return [Closed(by_server=False, confirmed=False)]
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (monotonic seconds), or None."""
        return self._deadline

    def take_datagrams(self) -> list[bytes]:
        """The datagrams to send now, in order; the queue is emptied."""
        out, self._outbox = self._outbox, []
        return out

    # -- internals ------------------------------------------------------------

    def _send_login(self, now: float, every: float | None = None) -> None:
        """Start a login: the cookie's arrival sends the ``L`` itself."""
        self._outbox.append(protocol.HELLO)
        self._tries += 1
        self._deadline = now + (every if every is not None else self.timeout)

    def _enter_room(self, now: float) -> None:
        self.state = State.IN_ROOM
        self._unanswered = 0
        self._tries = 0
        self._deadline = now + self.keepalive if self.keepalive > 0 else None
