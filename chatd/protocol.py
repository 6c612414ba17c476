"""The wire protocol: datagrams in, commands out; control words and text lines back.

Pure functions over bytes and strings, no I/O, so that every corner of the
protocol is tested with plain values. The wire format is the article's, kept
byte for byte so that its client works unmodified. The additions are ones an
old client never sends: ``P`` (keepalive), ``H`` (ask for an address cookie,
see :mod:`chatd.cookies`) and a cookie after the name in ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Clients in the article's style read with ``recvfrom(1024)``.
DEFAULT_MAX_DATAGRAM: Final = 1024

OK: Final = b"OK"
EXIT: Final = b"EXIT"
PONG: Final = b"PONG"
#: ``H`` as clients send it: padded, so that the answer is never larger than the question.
HELLO: Final = b"H " + b"." * 62
COOKIE_PREFIX: Final = b"COOKIE "


@dataclass(frozen=True, slots=True)
class Login:
    name: str
    cookie: str | None = None  # proof of the source address (chatd.cookies)


@dataclass(frozen=True, slots=True)
class Chat:
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Quit:
    name: str


@dataclass(frozen=True, slots=True)
class Ping:
    name: str


@dataclass(frozen=True, slots=True)
class Hello:
    """``H`` and padding: asks for an address cookie (the padding pays for the answer)."""


Command = Login | Chat | Quit | Ping | Hello

_NAMED_VERBS: Final = {"Q": Quit, "P": Ping}


class ProtocolError(ValueError):
    """A datagram that is not a command; ``reason`` is a stable code for counters and logs."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse(data: bytes) -> Command:
    """Turn one datagram into a command, or raise :class:`ProtocolError`.

    A single trailing newline is forgiven so that ``nc -u`` and ``echo`` work.
    The name is everything between the verb and the next space; the chat text
    is everything after that space, verbatim, spaces and all.
    """
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ProtocolError("empty")
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8") from None
    verb, sep, rest = line.partition(" ")
    if verb == "H":
        return Hello()
    if verb == "L":
        # a name has no whitespace: a second field can only be a cookie
        name, _, cookie = rest.partition(" ")
        if not name:
            raise ProtocolError("missing_name")
        return Login(name, cookie or None)
    if verb == "C":
        name, _, text = rest.partition(" ")
        if not name:
            raise ProtocolError("missing_name")
        return Chat(name, text)
    kind = _NAMED_VERBS.get(verb)
    if kind is None:
        raise ProtocolError("unknown_verb")
    if not sep or not rest:
        raise ProtocolError("missing_name")
    return kind(rest)


def encode(command: Command) -> bytes:
    """The datagram a client sends for ``command`` (used by clients and tests)."""
    match command:
        case Login(name, None):
            return f"L {name}".encode()
        case Login(name, cookie):
            return f"L {name} {cookie}".encode()
        case Chat(name, text):
            return f"C {name} {text}".encode()
        case Quit(name):
            return f"Q {name}".encode()
        case Ping(name):
            return f"P {name}".encode()
        case Hello():
            return b"H"
    raise TypeError(f"not a command: {command!r}")


def is_control_word(datagram: bytes) -> bool:
    """True for ``OK``, ``EXIT``, ``PONG`` and ``COOKIE …``: every other datagram is text
    for a person."""
    return datagram in (OK, EXIT, PONG) or datagram.startswith(COOKIE_PREFIX)


def cookie_of(datagram: bytes) -> str | None:
    """The token of a ``COOKIE <token>`` answer, else None."""
    if not datagram.startswith(COOKIE_PREFIX):
        return None
    token = datagram[len(COOKIE_PREFIX):]
    return token.decode("ascii") if token and token.isascii() and b" " not in token else None
