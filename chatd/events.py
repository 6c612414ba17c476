"""What the room did, as values: the one output of every room entry point.

The room decides and says so with a :class:`Step`: the datagrams to send
(:class:`Delivery`) and the events that happened, small frozen dataclasses.
The server applies a step in one place: it counts, logs and sends. Nothing in
here does I/O, so the room stays testable with plain values (h11's style).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Addr = Hashable  # what recvfrom returns: (host, port) or (host, port, flow, scope)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One datagram for one or many addresses."""

    payload: bytes
    addrs: Sequence[Addr]


class LeaveReason(enum.StrEnum):
    """Why someone is no longer in the room (plugins' ``chatd_left`` gets the value)."""

    QUIT = "quit"  # said Q
    TIMEOUT = "timeout"  # sent keepalives, then fell silent
    KICKED = "kicked"  # by the admin or a plugin
    UNREACHABLE = "unreachable"  # the kernel kept reporting its address unreachable
    EVICTED = "evicted"  # silent too long while the full room had a newcomer
    SHUTDOWN = "shutdown"  # the server stopped
    NAME_LOST = "name_lost"  # cluster: its name turned out to be another node's (see docs)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of the room's events. ``log_as`` names the log line; ``stranger`` marks events
    anyone on the network can cause, which are logged at a bounded rate."""

    log_as: ClassVar[str] = ""
    stranger: ClassVar[bool] = True

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class UserJoined(Event):
    log_as: ClassVar[str] = "user_joined"
    name: str
    addr: Addr
    verified: bool = False


@dataclass(frozen=True, slots=True)
class UserLeft(Event):
    log_as: ClassVar[str] = "user_left"
    name: str
    addr: Addr
    reason: LeaveReason


@dataclass(frozen=True, slots=True)
class LoginRefused(Event):
    log_as: ClassVar[str] = "login_refused"
    name: str
    addr: Addr
    reason: str  # the template's name: name_taken, room_full, plugin, ...


@dataclass(frozen=True, slots=True)
class Dropped(Event):
    """A datagram (or an ICMP report) the room threw away; ``reason`` is a stable code."""

    log_as: ClassVar[str] = "datagram_dropped"
    reason: str
    addr: Addr
    details: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "addr": self.addr, **self.details}


@dataclass(frozen=True, slots=True)
class Said(Event):
    """A chat line went to the room (logged at debug level only: it is people's text)."""

    log_as: ClassVar[str] = "chat"
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class AdminSaid(Event):
    log_as: ClassVar[str] = "admin_said"
    stranger: ClassVar[bool] = False
    users: int


@dataclass(frozen=True, slots=True)
class CookieIssued(Event):
    """An address cookie went out (counted, not logged: anyone can ask for one)."""

    addr: Addr


@dataclass(frozen=True, slots=True)
class RepliesCapped(Event):
    """Replies to an address that has not proved itself were held back (counted, not logged)."""

    addr: Addr
    count: int = 1


@dataclass(frozen=True, slots=True)
class Relay(Event):
    """Something the other nodes of a cluster must hear (a join, a line, a kick there).

    Only a clustered room emits these; the cluster bridge publishes each as one
    record of ``kind`` with ``fields`` (text to text), in the order they come.
    """

    stranger: ClassVar[bool] = False
    kind: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class ClaimWanted(Event):
    """A clustered room asks for ``name`` cluster-wide before it answers the login at
    ``addr``; ``take_from``: the node whose session at ``addr`` this node adopts.
    The answer comes back through :meth:`chatd.room.Room.claim_answered` with ``token``."""

    stranger: ClassVar[bool] = False
    token: int
    name: str
    addr: Addr
    take_from: str | None = None


@dataclass(frozen=True, slots=True)
class NameReleased(Event):
    """A clustered room no longer needs ``name`` it claimed (nobody is left holding it)."""

    stranger: ClassVar[bool] = False
    name: str


@dataclass(frozen=True, slots=True)
class Step:
    """Everything one call into the room caused, in order."""

    deliveries: list[Delivery] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __add__(self, other: Step) -> Step:
        return Step(self.deliveries + other.deliveries, self.events + other.events)

    def to(self, addr: Addr) -> list[bytes]:
        """The payloads ``addr`` gets, in order (for tests and tools)."""
        return [d.payload for d in self.deliveries if addr in d.addrs]
