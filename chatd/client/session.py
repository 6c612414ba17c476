"""The client side of the protocol, as a state machine with no I/O.

Both front ends feed it the same three things (datagrams from the server, the
passing of time, what the person asks for) and act on the events it returns;
it queues the datagrams to send. Time is an argument (monotonic seconds), so
the unit tests drive retries, keepalives and reconnections with a fake clock
instead of sleeping. Each of those inputs is an :class:`Input`, and one table,
:data:`TRANSITIONS`, says for every (state, input) the next state and what
to do (h11's style): the whole protocol, as seen from the client, on one page.

UDP loses datagrams, so every exchange that matters has a deadline: ``L`` is
retried, ``P`` is counted until it is answered, ``Q`` waits for ``EXIT`` only
so long. Every login proves the client's address first: ``H`` asks for a
cookie, and ``L name cookie`` follows as soon as it arrives (chatd.cookies).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

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


# -- what can happen ------------------------------------------------------------


class Input(enum.Enum):
    """What the session reacts to: the person asks, a datagram arrives, a deadline passes."""

    LOGIN = "login"  # the person: log in as a name
    CANCEL = "cancel"  # the person: stop waiting for the answer to a login
    SAY = "say"  # the person: one chat line
    LEAVE = "leave"  # the person: leave the room
    COOKIE = "cookie"  # the server: ``COOKIE token``, the answer to ``H``
    OK = "OK"
    EXIT = "EXIT"
    PONG = "PONG"
    STRAY = "stray"  # the server: a control word gone wrong (``COOKIE`` without a token)
    TEXT = "text"  # the server: a line for the person
    DUE = "due"  # the deadline passed, and the exchange has tries left
    SPENT = "spent"  # the deadline passed, and it has none


_WORDS: Final = {protocol.OK: Input.OK, protocol.EXIT: Input.EXIT, protocol.PONG: Input.PONG}


def classify(datagram: bytes) -> tuple[Input, str | bytes]:
    """What a datagram from the server is, and what the session needs of it."""
    cookie = protocol.cookie_of(datagram)
    if cookie is not None:
        return Input.COOKIE, cookie
    word = _WORDS.get(datagram)
    if word is not None:
        return word, datagram
    return (Input.STRAY if protocol.is_control_word(datagram) else Input.TEXT), datagram


# -- the machine ----------------------------------------------------------------


@dataclass
class ClientSession:
    """One person's session with one server.

    ``keepalive`` is the interval between ``P`` (0 turns keepalives and loss
    detection off); ``timeout`` is how long each ``L`` and the final ``Q`` wait
    for their answer.

    Every input goes through :data:`TRANSITIONS`: the pair (state, input)
    names the next state and the action, and a pair not in the table is
    ignored, except the person's ``login`` and ``say``, which raise.
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
        """Send ``L name`` (after ``H``); the answer (or its absence) comes back as an event."""
        self._step(Input.LOGIN, now, name)

    def cancel_login(self) -> None:
        """Stop waiting for an answer (the front end knows nobody is listening)."""
        self._step(Input.CANCEL, 0.0)

    def say(self, text: str) -> None:
        """Queue one chat line; raises :class:`NotSent` instead of sending what cannot work."""
        self._step(Input.SAY, 0.0, text)

    def leave(self, now: float) -> list[Event]:
        """Send ``Q`` and wait for ``EXIT``; leaving before joining just closes."""
        return self._step(Input.LEAVE, now)

    # -- what the network and the clock say -----------------------------------

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        """Everything one datagram from the server means."""
        kind, value = classify(datagram)
        return self._step(kind, now, value)

    def tick(self, now: float) -> list[Event]:
        """Whatever is due at ``now``: retries, keepalives, giving up."""
        if self._deadline is None or now < self._deadline:
            return []
        return self._step(Input.SPENT if self._spent() else Input.DUE, now)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (monotonic seconds), or None."""
        return self._deadline

    def take_datagrams(self) -> list[bytes]:
        """The datagrams to send now, in order; the queue is emptied."""
        out, self._outbox = self._outbox, []
        return out

    # -- the machine itself ---------------------------------------------------

    def _step(self, kind: Input, now: float, value: Any = None) -> list[Event]:
        transition = TRANSITIONS.get((self.state, kind))
        if transition is None:
            refusal = _REFUSED.get(kind)
            if refusal is not None:
                raise refusal(self.state)
            return []
        self.state, action = transition
        return action(self, now, value)

    def _spent(self) -> bool:
        """Whether the exchange the deadline belongs to has used up its tries: ``L`` after
        ``login_tries``, keepalives after ``missed_pongs`` unanswered, ``Q`` after one wait;
        a lost connection retries forever."""
        if self.state is State.LOGGING_IN:
            return self._tries >= self.login_tries
        if self.state is State.IN_ROOM:
            return self._unanswered >= self.missed_pongs
        return self.state is State.LEAVING

    def _send_login(self, now: float, every: float | None = None) -> None:
        """Start a login: the cookie's arrival sends the ``L`` itself."""
        self._outbox.append(protocol.HELLO)
        self._tries += 1
        self._deadline = now + (every if every is not None else self.timeout)

    def _enter_room(self, now: float) -> str:
        self._unanswered = 0
        self._tries = 0
        self._deadline = now + self.keepalive if self.keepalive > 0 else None
        assert self.name is not None
        return self.name

    # -- the actions: each gets the time and the input's value -------------------

    def _start_login(self, now: float, name: str) -> list[Event]:
        self.name = name
        self._tries = 0
        self._send_login(now)
        return []

    def _stop_waiting(self, now: float, _: Any) -> list[Event]:
        self._deadline = None
        return []

    def _queue_line(self, now: float, text: str) -> list[Event]:
        assert self.name is not None
        datagram = protocol.encode(protocol.Chat(self.name, text))
        if len(datagram) > self.max_datagram:
            raise LineTooLong(len(datagram), self.max_datagram)
        self._outbox.append(datagram)
        return []

    def _send_quit(self, now: float, _: Any) -> list[Event]:
        assert self.name is not None
        self._outbox.append(protocol.encode(protocol.Quit(self.name)))
        self._deadline = now + self.timeout
        return []

    def _close_unconfirmed(self, now: float, _: Any) -> list[Event]:
        self._deadline = None
        return [Closed(by_server=False, confirmed=False)]

    def _answer_cookie(self, now: float, cookie: str) -> list[Event]:
        assert self.name is not None
        self._outbox.append(protocol.encode(protocol.Login(self.name, cookie)))
        return []

    def _joined(self, now: float, _: Any) -> list[Event]:
        return [Joined(self._enter_room(now))]

    def _reconnected(self, now: float, _: Any) -> list[Event]:
        return [Reconnected(self._enter_room(now))]

    def _refused(self, now: float, datagram: bytes) -> list[Event]:
        self._deadline = None
        return [Refused(safe_line(datagram))]

    def _ignore(self, now: float, _: Any) -> list[Event]:
        return []

    def _pong(self, now: float, _: Any) -> list[Event]:
        self._unanswered = 0
        return []

    def _line(self, now: float, datagram: bytes) -> list[Event]:
        self._last_line = safe_line(datagram)
        return [Line(self._last_line)]

    def _closed_by_server(self, now: float, _: Any) -> list[Event]:
        self._deadline = None
        return [Closed(by_server=True, reason=self._last_line)]

    def _closed_as_asked(self, now: float, _: Any) -> list[Event]:
        self._deadline = None
        return [Closed(by_server=False)]

    def _retry_login(self, now: float, _: Any) -> list[Event]:
        self._send_login(now)
        return []

    def _no_answer(self, now: float, _: Any) -> list[Event]:
        self._deadline = None
        return [NoAnswer()]

    def _ping(self, now: float, _: Any) -> list[Event]:
        assert self.name is not None
        self._outbox.append(protocol.encode(protocol.Ping(self.name)))
        self._unanswered += 1
        self._deadline = now + self.keepalive
        return []

    def _lose(self, now: float, _: Any) -> list[Event]:
        self._send_login(now, every=self.keepalive)
        return [ConnectionLost()]

    def _login_again(self, now: float, _: Any) -> list[Event]:
        self._send_login(now, every=self.keepalive)
        return []


Action = Callable[[ClientSession, float, Any], list[Event]]
#: (state, input) -> (next state, action). What is not here is ignored, but for
#: ``login`` and ``say`` (:data:`_REFUSED`).
TRANSITIONS: Final[dict[tuple[State, Input], tuple[State, Action]]] = {
    (State.IDLE, Input.LOGIN): (State.LOGGING_IN, ClientSession._start_login),
    (State.IDLE, Input.LEAVE): (State.CLOSED, ClientSession._close_unconfirmed),

    (State.LOGGING_IN, Input.LOGIN): (State.LOGGING_IN, ClientSession._start_login),
    (State.LOGGING_IN, Input.CANCEL): (State.IDLE, ClientSession._stop_waiting),
    (State.LOGGING_IN, Input.LEAVE): (State.CLOSED, ClientSession._close_unconfirmed),
    (State.LOGGING_IN, Input.COOKIE): (State.LOGGING_IN, ClientSession._answer_cookie),
    (State.LOGGING_IN, Input.OK): (State.IN_ROOM, ClientSession._joined),
    # a stray control word is no refusal
    (State.LOGGING_IN, Input.EXIT): (State.LOGGING_IN, ClientSession._ignore),
    (State.LOGGING_IN, Input.PONG): (State.LOGGING_IN, ClientSession._ignore),
    (State.LOGGING_IN, Input.STRAY): (State.LOGGING_IN, ClientSession._ignore),
    (State.LOGGING_IN, Input.TEXT): (State.IDLE, ClientSession._refused),
    (State.LOGGING_IN, Input.DUE): (State.LOGGING_IN, ClientSession._retry_login),
    (State.LOGGING_IN, Input.SPENT): (State.IDLE, ClientSession._no_answer),

    (State.IN_ROOM, Input.SAY): (State.IN_ROOM, ClientSession._queue_line),
    (State.IN_ROOM, Input.LEAVE): (State.LEAVING, ClientSession._send_quit),
    # a duplicate answer to a retried L
    (State.IN_ROOM, Input.OK): (State.IN_ROOM, ClientSession._ignore),
    (State.IN_ROOM, Input.EXIT): (State.CLOSED, ClientSession._closed_by_server),
    (State.IN_ROOM, Input.PONG): (State.IN_ROOM, ClientSession._pong),
    (State.IN_ROOM, Input.STRAY): (State.IN_ROOM, ClientSession._line),
    (State.IN_ROOM, Input.TEXT): (State.IN_ROOM, ClientSession._line),
    (State.IN_ROOM, Input.DUE): (State.IN_ROOM, ClientSession._ping),
    (State.IN_ROOM, Input.SPENT): (State.LOST, ClientSession._lose),

    (State.LOST, Input.LEAVE): (State.LEAVING, ClientSession._send_quit),
    (State.LOST, Input.COOKIE): (State.LOST, ClientSession._answer_cookie),
    (State.LOST, Input.OK): (State.IN_ROOM, ClientSession._reconnected),
    (State.LOST, Input.EXIT): (State.CLOSED, ClientSession._closed_by_server),
    (State.LOST, Input.PONG): (State.LOST, ClientSession._pong),
    (State.LOST, Input.STRAY): (State.LOST, ClientSession._line),
    (State.LOST, Input.TEXT): (State.LOST, ClientSession._line),
    (State.LOST, Input.DUE): (State.LOST, ClientSession._login_again),

    (State.LEAVING, Input.EXIT): (State.CLOSED, ClientSession._closed_as_asked),
    (State.LEAVING, Input.PONG): (State.LEAVING, ClientSession._pong),
    (State.LEAVING, Input.STRAY): (State.LEAVING, ClientSession._line),
    (State.LEAVING, Input.TEXT): (State.LEAVING, ClientSession._line),
    (State.LEAVING, Input.SPENT): (State.CLOSED, ClientSession._close_unconfirmed),
}

#: what asking for the impossible raises, by input; other inputs out of place are ignored
_REFUSED: Final[dict[Input, Callable[[State], Exception]]] = {
    Input.LOGIN: lambda state: RuntimeError(f"cannot log in while {state.value}"),
    Input.SAY: NotConnected,
}
