"""The room: sessions, names and rules, with no I/O.

Every entry point returns one :class:`~chatd.events.Step`: the datagrams to
send (one payload, encoded once, and the addresses it goes to) and typed
events saying what happened; the server counts, logs and sends. Plugins act
through the same outbox, never on the room's internals. Time comes in as an
argument (monotonic seconds), so tests drive the clock. The room's state is a
value too: :meth:`Room.snapshot` and :meth:`Room.restore`.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from chatd import protocol
from chatd.cookies import CookieJar
from chatd.events import (
    Addr,
    AdminSaid,
    ClaimWanted,
    CookieIssued,
    Delivery,
    Dropped,
    Event,
    LeaveReason,
    LoginRefused,
    NameReleased,
    Relay,
    RepliesCapped,
    Said,
    Step,
    UserJoined,
    UserLeft,
)
from chatd.formats import format_addr
from chatd.hosts import host_key
from chatd.names import confusable_keys, name_key, name_problem
from chatd.settings import RoomSettings
from chatd.textsafe import neutralise, truncate_utf8

if TYPE_CHECKING:  # a single node never loads the replica of a cluster's other nodes
    from chatd.replica import RemoteUser, Replica

#: Version of :meth:`Room.snapshot`'s format; :meth:`Room.restore` refuses others.
SNAPSHOT_VERSION: Final = 1

#: Seconds between two ICMP reports that both count against one session. Anyone can
#: forge ICMP errors, and a burst of them must not be worth more than one report.
UNREACHABLE_SPACING = 10.0

#: Cluster: seconds a login (or an adoption) waits for the cluster's answer before it is
#: forgotten (the client asks again). The link answers at once while Redis is unreachable,
#: so this only bounds what an answer lost on the way would hold.
CLAIM_TIMEOUT = 15.0
#: Cluster: datagrams kept, per address, while the session at that address is adopted.
ADOPT_HELD = 16
#: Cluster: logins and adoptions waiting for an answer at once, at most.
MAX_PENDING = 10_000
#: The template a remote user's leave is told with, by the reason its node gave.
_LEAVE_TEMPLATES = {LeaveReason.TIMEOUT: "timed_out", LeaveReason.UNREACHABLE: "unreachable",
                    LeaveReason.KICKED: "kick_notice"}


@dataclass(slots=True)
class Session:
    name: str
    key: str
    addr: Addr
    looks: tuple[str, ...]  # confusable_keys(name): no one else may have one of them
    joined_at: float  # monotonic seconds
    last_seen: float  # monotonic seconds
    keepalive: bool = False  # has sent P at least once: only then can it time out
    unreachable: int = 0  # delivery failures reported by the kernel since it last spoke
    verified: bool = False  # logged in with an address cookie: its address is its own
    host: str = ""  # what per-host limits count it against (chatd.hosts)
    unreachable_at: float | None = None  # monotonic time of the last report that counted


@dataclass(slots=True)
class PendingLogin:
    """Cluster: a login that passed every local check and waits for its name's claim;
    or, with ``take_from``, a session of another node being adopted (``held``: its
    datagrams, handled once the session is ours)."""

    token: int
    name: str
    key: str
    addr: Addr
    looks: tuple[str, ...]
    verified: bool
    host: str
    started: float
    take_from: str | None = None
    held: list[bytes] = field(default_factory=list)


class RoomHooks(Protocol):
    """What the room asks of its extensions (the plugin manager implements it)."""

    def login(self, name: str, addr: Addr) -> str | None: ...  # a refusal text, or None

    def joined(self, name: str) -> None: ...

    def message(self, name: str, text: str) -> str | Literal[False]: ...  # new text, or False

    def command(self, name: str, command: str, args: str) -> bool: ...  # True when handled

    def said(self, name: str, text: str) -> None: ...  # a line went to the room

    def left(self, name: str, reason: str) -> None: ...


class NoHooks:
    """A room with no extensions: every hook says "carry on"."""

    def login(self, name: str, addr: Addr) -> str | None:
        return None

    def joined(self, name: str) -> None:
        return None

    def message(self, name: str, text: str) -> str | Literal[False]:
        return text

    def command(self, name: str, command: str, args: str) -> bool:
        return False

    def said(self, name: str, text: str) -> None:
        return None

    def left(self, name: str, reason: str) -> None:
        return None


class SnapshotError(ValueError):
    """A snapshot this room cannot restore; the message says why."""


class TextTooLong(ValueError):
    """An admin or plugin text that would not fit in one datagram."""


@dataclass
class Room:
    settings: RoomSettings
    hooks: RoomHooks = field(default_factory=NoHooks)
    cookies: CookieJar = field(default_factory=CookieJar)

    def __post_init__(self) -> None:
        self._by_addr: dict[Addr, Session] = {}
        self._by_key: dict[str, Session] = {}
        self._by_look: dict[str, Session] = {}
        _admin_looks(self.settings.admin_name)  # loads the data now, not at the first login
        self._per_host: Counter[Any] = Counter()
        #: sessions by when they were last heard from, longest silent first
        self._by_silence: OrderedDict[Addr, Session] = OrderedDict()
        self._out: list[Delivery] = []
        self._events: list[Event] = []
        #: cluster only (enable_cluster): the other nodes' users, and logins awaiting a claim
        self.replica: Replica | None = None
        self._pending: dict[int, PendingLogin] = {}
        self._pending_addrs: dict[Addr, PendingLogin] = {}
        self._pending_keys: dict[str, PendingLogin] = {}
        self._tokens = itertools.count(1)

    # -- entry points ------------------------------------------------------

    def receive(self, addr: Addr, data: bytes, now: float) -> Step:
        """Everything one datagram from ``addr`` causes."""
        session = self._by_addr.get(addr)
        if len(data) > self.settings.max_datagram:
            self._drop("too_large", addr)
            if session is not None:
                self._send_text(addr, "too_long", limit=self.settings.max_datagram)
            return self._take()
        try:
            command = protocol.parse(data)
        except protocol.ProtocolError as exc:
            self._drop(exc.reason, addr)
            return self._take()
        if isinstance(command, protocol.Hello):
            self._hello(addr, len(data), now)
            return self._take()
        if session is None and self.replica is not None and self._adopting(addr, command,
                                                                            data, now):
            return self._take()
        if isinstance(command, protocol.Login):
            self._login(addr, session, command, len(data), now)
            return self._capped(addr)
        if session is None:
            self._drop("no_session", addr)
            return self._take()
        if name_key(command.name) != session.key:
            self._drop("spoofed", addr, claimed=command.name, holder=session.name)
            return self._take()
        self._heard(session, now)
        if isinstance(command, protocol.Chat):
            self._chat(session, command.text)
        elif isinstance(command, protocol.Ping):
            session.keepalive = True
            self._out.append(Delivery(protocol.PONG, (addr,)))
        else:
            self._leave(session, LeaveReason.QUIT, "left")
            self._out.append(Delivery(protocol.EXIT, (addr,)))
        return self._capped(addr)

    def expire(self, now: float) -> Step:
        """Drop sessions that promised keepalives and then fell silent."""
        limit = self.settings.session_timeout
        stale = [
            s for s in self._by_addr.values() if s.keepalive and now - s.last_seen > limit
        ]
        for session in stale:
            self._leave(session, LeaveReason.TIMEOUT, "timed_out")
        if self._pending:
            for pending in [p for p in self._pending.values()
                            if now - p.started > CLAIM_TIMEOUT]:
                self._unpend(pending)
                self._drop("claim_timeout", pending.addr, name=pending.name)
        return self._take()

    def unreachable(self, addr: Addr, now: float) -> Step:
        """The kernel says datagrams to ``addr`` cannot be delivered (ICMP errors).

        A client that vanished without ``Q`` (crash, closed laptop) would
        otherwise stay in the room forever if it never sent keepalives. But
        anyone can forge an ICMP error naming any address, so a report is
        believed only about a session silent for ``unreachable_grace`` seconds
        (one that sends keepalives never is), and only one report per
        :data:`UNREACHABLE_SPACING` seconds counts: a burst is worth one.
        """
        session = self._by_addr.get(addr)
        limit = self.settings.unreachable_after
        if session is None or not limit:
            return self._take()
        if now - session.last_seen < self.settings.unreachable_grace or (
                session.unreachable_at is not None
                and now - session.unreachable_at < UNREACHABLE_SPACING):
            self._drop("icmp_ignored", addr)
            return self._take()
        session.unreachable += 1
        session.unreachable_at = now
        if session.unreachable >= limit:
            self._leave(session, LeaveReason.UNREACHABLE, "unreachable")
        return self._take()

    def pause(self, seconds: float, now: float) -> None:
        """The server did not read the socket for ``seconds`` (stopped, or busy):
        that was not the clients' silence, so nobody's clock ran meanwhile."""
        for session in self._by_addr.values():
            session.last_seen = min(now, session.last_seen + seconds)

    def admin_say(self, text: str) -> Step:
        """The admin speaks to everyone; raises :class:`TextTooLong`."""
        payload = self._render("admin", name=self.settings.admin_name, text=text)
        self._check_fits(payload)
        self._out.append(Delivery(payload, list(self._by_addr)))
        self._events.append(AdminSaid(len(self._by_addr)))
        if self.replica is not None:
            self._events.append(Relay("admin", {"text": text}))
        return self._take()

    def shutdown(self) -> Step:
        """Tell everyone the room is closing, then ``EXIT``; the room is empty afterwards."""
        addrs = list(self._by_addr)
        if addrs:
            self._out.append(Delivery(self._notice("shutdown"), addrs))
            self._out.append(Delivery(protocol.EXIT, addrs))
        for session in list(self._by_addr.values()):
            self._forget(session)
            self._events.append(UserLeft(session.name, session.addr, LeaveReason.SHUTDOWN))
            if self.replica is not None:
                self._relay_leave(session.name, LeaveReason.SHUTDOWN)
        return self._take()

    def flush(self) -> Step:
        """What was queued outside the other entry points: by plugins at start-up or on
        reload, or by :meth:`kick` on the admin's behalf."""
        return self._take()

    # -- the room as a value --------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything needed to rebuild the room elsewhere (a new process, a new host), as
        plain JSON-safe data. Times are ages relative to ``now``: monotonic clocks differ
        between processes and machines, ages do not."""
        return {
            "format": SNAPSHOT_VERSION,
            "sessions": [{
                "name": s.name,
                "addr": list(s.addr) if isinstance(s.addr, tuple) else s.addr,
                "age": now - s.joined_at,
                "idle": now - s.last_seen,
                "keepalive": s.keepalive,
                "verified": s.verified,
                "unreachable": s.unreachable,
                "unreachable_ago": None if s.unreachable_at is None else now - s.unreachable_at,
            } for s in self._by_addr.values()],  # in join order
        }

    def restore(self, snapshot: Mapping[str, Any], now: float) -> None:
        """Rebuild the sessions of :meth:`snapshot` in this (empty) room, silently: nobody
        joined, so nobody is told and no plugin hears of it. Raises :class:`SnapshotError`
        for a format it does not know or data that does not add up; the room is then
        left empty."""
        if self._by_addr:
            raise SnapshotError("restore needs an empty room")
        try:
            if snapshot.get("format") != SNAPSHOT_VERSION:
                raise SnapshotError(f"snapshot format {snapshot.get('format')!r}, "
                                    f"this chatd reads {SNAPSHOT_VERSION}")
            sessions = [_session_from(entry, now, self.settings.ipv6_prefix)
                        for entry in snapshot["sessions"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"malformed snapshot: {exc!r}") from None
        try:
            for session in sessions:
                if session.addr in self._by_addr or session.key in self._by_key:
                    raise SnapshotError(f"{session.name!r} twice in the snapshot")
                self._add(session)
        except SnapshotError:
            for session in list(self._by_addr.values()):
                self._forget(session)
            raise
        order = sorted(self._by_silence.values(), key=lambda s: s.last_seen)
        self._by_silence = OrderedDict((s.addr, s) for s in order)

    def reconfigure(self, settings: RoomSettings) -> None:
        """New limits and templates; sessions stay."""
        self.settings = settings

    # -- the API plugins use (through chatd.plugins) -------------------------

    def session_at(self, addr: Addr) -> Session | None:
        return self._by_addr.get(addr)

    def sessions(self) -> list[Session]:
        return list(self._by_addr.values())

    def session(self, name: str) -> Session | None:
        return self._by_key.get(name_key(name))

    def send(self, name: str, text: str) -> bool:
        """Queue ``text`` for one user; False when there is no such user."""
        session = self.session(name)
        if session is None:
            remote = self.replica.get(name) if self.replica is not None else None
            if remote is None:
                return False
            self._check_fits(text.encode())
            self._events.append(Relay("msg", {"to": remote.name, "at": remote.node,
                                              "text": text}))
            return True
        payload = text.encode()
        self._check_fits(payload)
        self._out.append(Delivery(payload, (session.addr,)))
        return True

    def broadcast(self, text: str, exclude: Iterable[str] = ()) -> None:
        """Queue ``text`` for everyone but the names in ``exclude``."""
        payload = text.encode()
        self._check_fits(payload)
        skip = {name_key(n) for n in exclude}
        self._out.append(Delivery(payload, [s.addr for s in self._by_addr.values()
                                            if s.key not in skip]))
        if self.replica is not None:
            self._events.append(Relay("broadcast", {"text": text,
                                                    "exclude": json.dumps(sorted(exclude))}))

    def kick(self, name: str, reason: str) -> bool:
        """Remove a user, queueing what that says to whom; False when there is no such user.

        From a plugin's hook the output goes out with the step of the datagram being
        handled; from anywhere else, with the next :meth:`flush`."""
        session = self._by_key.get(name_key(name))
        if session is None:
            remote = self.replica.get(name) if self.replica is not None else None
            if remote is None:
                return False
            self._events.append(Relay("kick", {"name": remote.name, "at": remote.node,
                                               "reason": reason}))
            return True
        self._send_text(session.addr, "kicked", reason=reason)
        self._out.append(Delivery(protocol.EXIT, (session.addr,)))
        self._leave(session, LeaveReason.KICKED, "kick_notice", always=True, reason=reason)
        return True

    def render(self, key: str, **fields: Any) -> str:
        return self.settings.templates[key].format(**fields)

    def __len__(self) -> int:
        return len(self._by_addr)

    def population(self) -> int:
        """Everyone in the room: this node's users and, in a cluster, the others'."""
        return len(self._by_addr) + (len(self.replica) if self.replica is not None else 0)

    # -- the cluster (only after enable_cluster; chatd.cluster.bridge drives it) -----------

    def enable_cluster(self) -> None:
        """This room is one node's part of a cluster's room: logins wait for a claim
        (:class:`ClaimWanted`), what the others must hear is emitted as :class:`Relay`
        events, and the other nodes' users are kept in :attr:`replica`."""
        if self.replica is None:
            from chatd.replica import Replica

            self.replica = Replica()

    def remote_users(self) -> list[RemoteUser]:
        return list(self.replica) if self.replica is not None else []

    def claim_answered(self, token: int, granted: bool, now: float) -> Step:
        """The cluster's answer to a :class:`ClaimWanted`: the login goes on or is refused;
        an adoption makes the session ours and handles what it held."""
        pending = self._pending.get(token)
        if pending is None:  # forgotten meanwhile (timed out): nobody wants the name now
            return self._take()
        self._unpend(pending)
        if pending.take_from is not None:
            return self._adopted(pending, granted, now)
        if not granted:
            self._refuse(pending.addr, pending.name, "name_taken", "name_taken",
                         name=pending.name)
            return self._take()
        if pending.addr in self._by_addr or pending.key in self._by_key:
            # the address or the name got a session meanwhile (an adoption): not twice
            self._events.append(NameReleased(pending.name))
            self._refuse(pending.addr, pending.name, "name_taken", "name_taken",
                         name=pending.name)
            return self._take()
        if len(self._by_addr) >= self.settings.max_users:
            evict = self._longest_idle(now)
            if evict is None:
                self._events.append(NameReleased(pending.name))
                self._refuse(pending.addr, pending.name, "room_full", "room_full",
                             max_users=self.settings.max_users)
                return self._take()
            self._evict(evict)
        self._admit(Session(name=pending.name, key=pending.key, addr=pending.addr,
                            looks=pending.looks, joined_at=now, last_seen=now,
                            verified=pending.verified, host=pending.host))
        return self._capped(pending.addr)

    def remote_join(self, name: str, node: str, addr: str, since: str,
                    quiet: bool = False) -> Step:
        """``node`` says ``name`` joined; the local users are told, unless ``quiet``
        (a node telling again who it serves) or the name is one of ours here (a
        conflict the cluster resolves: see :meth:`name_lost`)."""
        replica = self._replica()
        known = replica.get(name)
        replica.add(name, node, addr, since)
        if not quiet and known is None and self.session(name) is None and self._by_addr \
                and self._announcing():
            self._out.append(Delivery(self._notice("joined", name=name), list(self._by_addr)))
        return self._take()

    def remote_leave(self, name: str, node: str, reason: str, detail: str = "") -> Step:
        """``node``'s user ``name`` left; ignored unless ``node`` is the one serving it."""
        replica = self._replica()
        known = replica.get(name)
        if known is None or known.node != node:
            return self._take()
        replica.remove(name)
        if self.session(name) is None:
            self._announce_leave(known.name, reason, detail)
        return self._take()

    def remote_say(self, name: str, text: str) -> Step:
        """A chat line spoken on another node, told with this node's template; plugins
        hear it as said (``chatd_said``: ``history`` replays the whole room's lines)."""
        text = neutralise(text)
        if self._by_addr:
            payload = self._fit(self._render("chat", name=name, text=text))
            self._out.append(Delivery(payload, list(self._by_addr)))
        self.hooks.said(name, text)
        return self._take()

    def remote_admin(self, text: str) -> Step:
        if self._by_addr:
            payload = self._fit(self._render("admin", name=self.settings.admin_name,
                                             text=text))
            self._out.append(Delivery(payload, list(self._by_addr)))
        return self._take()

    def remote_text(self, text: str, exclude: Iterable[str] = ()) -> Step:
        """A plugin's broadcast on another node (``/me``): the same text here."""
        skip = {name_key(n) for n in exclude}
        addrs = [s.addr for s in self._by_addr.values() if s.key not in skip]
        if addrs:
            self._out.append(Delivery(self._fit(text.encode()), addrs))
        return self._take()

    def remote_send(self, to: str, text: str) -> Step:
        """A plugin on another node sent ``text`` to our user ``to`` (``/msg``)."""
        session = self.session(to)
        if session is not None:
            self._out.append(Delivery(self._fit(text.encode()), (session.addr,)))
        return self._take()

    def adopted_elsewhere(self, name: str, node: str, addr: str) -> Step:
        """``node`` adopted the session of ``name`` (the kernel sends its datagrams there
        now): ours, if we had it, goes silently; the replica follows."""
        session = self.session(name)
        if session is not None:
            self._forget(session)
        replica = self._replica()
        known = replica.get(name)
        replica.add(name, node, addr, known.since if known is not None else "")
        return self._take()

    def node_gone(self, node: str, names: Iterable[str]) -> Step:
        """``node`` stopped answering and its names were freed: each of its users leaves."""
        replica = self._replica()
        for name in names:
            known = replica.get(name)
            if known is not None and known.node == node:
                replica.remove(name)
                if self.session(name) is None:
                    self._announce_leave(known.name, LeaveReason.TIMEOUT.value)
        for known in replica.of_node(node):  # joined after the reaping read the names
            replica.remove(known.name)
            self._announce_leave(known.name, LeaveReason.TIMEOUT.value)
        return self._take()

    def replace_remote(self, holders: Mapping[str, Mapping[str, str]], own_node: str) -> None:
        """Every name the cluster holds (read at once): the replica becomes exactly the
        other nodes' ones, silently (a fresh view, not news)."""
        replica = self._replica()
        replica.clear()
        for name, info in holders.items():
            node = str(info.get("node", ""))
            if node != own_node or self.session(name) is None:
                replica.add(name, node, str(info.get("addr", "")), str(info.get("since", "")))

    def forget_remote(self, name: str, node: str) -> Step:
        """A name ``node`` held with no session behind it (a previous incarnation's), gone:
        told like a leave."""
        return self.remote_leave(name, node, LeaveReason.TIMEOUT.value)

    def name_lost(self, name: str) -> Step:
        """A name this node granted while cut off from Redis was another node's first: our
        session under it is told so and ends (``EXIT``: log in again, with another name)."""
        session = self.session(name)
        if session is not None:
            self._send_text(session.addr, "name_lost", name=session.name)
            self._out.append(Delivery(protocol.EXIT, (session.addr,)))
            self._leave(session, LeaveReason.NAME_LOST, "left")
        return self._take()

    def _replica(self) -> Replica:
        if self.replica is None:
            raise RuntimeError("not a clustered room (enable_cluster)")
        return self.replica

    def _announce_leave(self, name: str, reason: str, detail: str = "") -> None:
        if not self._by_addr or not (reason == LeaveReason.KICKED or self._announcing()):
            return
        template = _LEAVE_TEMPLATES.get(LeaveReason(reason) if reason in
                                        LeaveReason._value2member_map_ else None, "left")
        self._out.append(Delivery(self._notice(template, name=name, reason=detail),
                                  list(self._by_addr)))

    def _relay_leave(self, name: str, why: LeaveReason, detail: str = "") -> None:
        self._events.append(Relay("leave", {"name": name, "reason": why.value,
                                            "detail": detail}))

    def _pend(self, pending: PendingLogin) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._drop("claims_full", pending.addr, name=pending.name)
            return
        self._pending[pending.token] = pending
        self._pending_addrs[pending.addr] = pending
        self._pending_keys[pending.key] = pending
        self._events.append(ClaimWanted(pending.token, pending.name, pending.addr,
                                        pending.take_from))

    def _unpend(self, pending: PendingLogin) -> None:
        del self._pending[pending.token]
        if self._pending_addrs.get(pending.addr) is pending:
            del self._pending_addrs[pending.addr]
        if self._pending_keys.get(pending.key) is pending:
            del self._pending_keys[pending.key]

    def _adopting(self, addr: Addr, command: protocol.Command, data: bytes,
                  now: float) -> bool:
        """A datagram from an address with no session here: held if that address's session
        is being adopted, or the start of an adoption if another node serves it (the
        kernel's choice among nodes sharing a port changed). False: handle it as usual."""
        pending = self._pending_addrs.get(addr)
        if pending is not None and pending.take_from is not None:
            if len(pending.held) < ADOPT_HELD:
                pending.held.append(data)
            else:
                self._drop("adoption_backlog", addr)
            return True
        replica = self.replica
        remote = replica.at(format_addr(addr)) if replica is not None else None
        if remote is None or pending is not None or name_key(command.name) != remote.key:
            return False
        self._pend(PendingLogin(next(self._tokens), remote.name, remote.key, addr,
                                remote.looks, False, host_key(addr, self.settings.ipv6_prefix),
                                now, take_from=remote.node, held=[data]))
        return True

    def _adopted(self, pending: PendingLogin, granted: bool, now: float) -> Step:
        if not granted or pending.addr in self._by_addr or pending.key in self._by_key:
            for _ in pending.held:
                self._drop("no_session", pending.addr)
            return self._take()
        if self.replica is not None:
            self.replica.remove(pending.name)
        self._add(Session(name=pending.name, key=pending.key, addr=pending.addr,
                          looks=pending.looks, joined_at=now, last_seen=now,
                          host=pending.host))
        self._events.append(Relay("adopt", {"name": pending.name, "from": pending.take_from or "",
                                            "addr": format_addr(pending.addr)}))
        step = self._take()
        for data in pending.held:
            step = step + self.receive(pending.addr, data, now)
        return step

    # -- the rules ---------------------------------------------------------

    def _hello(self, addr: Addr, size: int, now: float) -> None:
        """``H``: answer with a cookie, never with more bytes than were sent."""
        reply = self.cookies.issue(addr, now)
        if len(reply) > size:
            self._drop("hello_too_short", addr, size=size, needed=len(reply))
            return
        self._events.append(CookieIssued(addr))
        self._out.append(Delivery(reply, (addr,)))

    def _login(self, addr: Addr, session: Session | None, command: protocol.Login,
               size: int, now: float) -> None:
        name = command.name
        verified = command.cookie is not None
        if verified and not self.cookies.check(addr, command.cookie or "", now):
            self._refuse_unverified(addr, name, "cookie_invalid", size)
            return
        if (self.settings.require_verified and not verified
                and not (session is not None and session.verified)):
            self._refuse_unverified(addr, name, "verify_required", size)
            return
        key = name_key(name)
        if session is not None:
            if session.key == key:  # our OK was lost: say it again
                self._heard(session, now)
                session.verified = session.verified or verified
                self._out.append(Delivery(protocol.OK, (addr,)))
            else:
                self._refuse(addr, name, "other_session", "other_session", name=session.name)
            return
        problem = name_problem(name, self.settings.max_name_length)
        if problem is not None:
            self._refuse(addr, name, "name_invalid", "name_invalid", name=name, reason=problem)
            return
        replica = self.replica
        if replica is not None and addr in self._pending_addrs:
            self._drop("login_pending", addr, name=name)  # the answer is on its way
            return
        if key in self._by_key or key == name_key(self.settings.admin_name) or (
                replica is not None
                and (key in self._pending_keys or replica.by_key(key) is not None)):
            self._refuse(addr, name, "name_taken", "name_taken", name=name)
            return
        looks = confusable_keys(name)
        like: Session | RemoteUser | None = next(
            (self._by_look[look] for look in looks if look in self._by_look), None)
        if like is None and replica is not None:
            like = replica.like(looks)
        if like is not None or looks & _admin_looks(self.settings.admin_name):
            like_name = self.settings.admin_name if like is None else like.name
            self._refuse(addr, name, "name_confusable", "name_confusable", name=name,
                         like=like_name)
            return
        evict = None
        if len(self._by_addr) >= self.settings.max_users:
            evict = self._longest_idle(now)
            if evict is None:
                self._refuse(addr, name, "room_full", "room_full",
                             max_users=self.settings.max_users)
                return
        host = host_key(addr, self.settings.ipv6_prefix)
        per_ip = self.settings.max_sessions_per_ip
        if per_ip and self._per_host[host] >= per_ip:
            self._refuse(addr, name, "too_many_sessions", "too_many_sessions", limit=per_ip)
            return
        refusal = self.hooks.login(name, addr)
        if refusal is not None:
            self._out.append(Delivery(self._fit(refusal.encode()), (addr,)))
            self._events.append(LoginRefused(name, addr, "plugin"))
            return
        if replica is not None:  # the cluster decides: the OK waits for the claim
            self._pend(PendingLogin(next(self._tokens), name, key, addr, tuple(looks),
                                    verified, host, now))
            return
        if evict is not None:
            self._evict(evict)
        self._admit(Session(name=name, key=key, addr=addr, looks=tuple(looks), joined_at=now,
                            last_seen=now, verified=verified, host=host))

    def _admit(self, session: Session) -> None:
        """The login succeeded: ``OK``, the notice to the others, and the session."""
        self._out.append(Delivery(protocol.OK, (session.addr,)))
        if self._by_addr and self._announcing():
            self._out.append(Delivery(self._notice("joined", name=session.name),
                                      list(self._by_addr)))
        self._add(session)
        self._events.append(UserJoined(session.name, session.addr, session.verified))
        if self.replica is not None:
            self._events.append(Relay("join", {"name": session.name,
                                               "addr": format_addr(session.addr)}))
        self.hooks.joined(session.name)

    def _add(self, session: Session) -> None:
        self._by_addr[session.addr] = session
        self._by_key[session.key] = session
        self._by_look.update(dict.fromkeys(session.looks, session))
        self._by_silence[session.addr] = session
        self._per_host[session.host] += 1

    def _heard(self, session: Session, now: float) -> None:
        """A word from the client: it is alive, whatever the kernel reported before."""
        session.last_seen = now
        session.unreachable = 0
        session.unreachable_at = None
        self._by_silence.move_to_end(session.addr)

    def _longest_idle(self, now: float) -> Session | None:
        """The session a login into a full room may replace: silent for ``evict_idle_after``
        and not keepalive (a client that sends ``P`` is present, however quiet its person)."""
        limit = self.settings.evict_idle_after
        if not limit:
            return None
        for session in self._by_silence.values():
            if now - session.last_seen < limit:
                return None
            if not session.keepalive:
                return session
        return None

    def _evict(self, session: Session) -> None:
        self._send_text(session.addr, "evicted")
        self._out.append(Delivery(protocol.EXIT, (session.addr,)))
        self._leave(session, LeaveReason.EVICTED, "left")

    def _refuse_unverified(self, addr: Addr, wanted: str, why: str, size: int) -> None:
        """A refusal to an address nobody vouched for: at most three times the bytes it sent
        (RFC 9000, 8.1), so that a forged login reflects nothing worth forging."""
        payload = self._notice(why)
        if len(payload) <= 3 * size:
            self._out.append(Delivery(payload, (addr,)))
        else:
            self._events.append(RepliesCapped(addr))
        self._events.append(LoginRefused(wanted, addr, why))

    def _capped(self, addr: Addr) -> Step:
        """The output of one datagram, with at most one datagram of reply to a sender whose
        address is unproven: a forged request then costs its victim one datagram, no more."""
        session = self._by_addr.get(addr)
        if session is not None and session.verified:
            return self._take()
        replies = 0
        kept = []
        for delivery in self._out:
            if len(delivery.addrs) == 1 and delivery.addrs[0] == addr:
                replies += 1
                if replies > 1:
                    continue
            kept.append(delivery)
        if replies > 1:
            self._events.append(RepliesCapped(addr, replies - 1))
        self._out = kept
        return self._take()

    def _chat(self, session: Session, text: str) -> None:
        if not text:
            self._drop("empty_text", session.addr)
            return
        if text.startswith("/") and text[1:2].isalpha():
            command, _, args = text[1:].partition(" ")
            if not self.hooks.command(session.name, command, args):
                self._send_text(session.addr, "unknown_command", command=neutralise(command))
            return
        rewritten = self.hooks.message(session.name, text)
        if rewritten is False:
            return
        rewritten = neutralise(rewritten)  # after the plugins, so that none can undo it
        payload = self._render("chat", name=session.name, text=rewritten)
        if len(payload) > self.settings.max_datagram:
            self._send_text(session.addr, "too_long", limit=self.settings.max_datagram)
            return
        sender = session.addr
        self._out.append(Delivery(payload, [a for a in self._by_addr if a != sender]))
        self._events.append(Said(session.name, rewritten))
        if self.replica is not None:
            self._events.append(Relay("say", {"name": session.name, "text": rewritten}))
        self.hooks.said(session.name, rewritten)

    def _leave(self, session: Session, why: LeaveReason, template: str, always: bool = False,
               **fields: Any) -> None:
        self._forget(session)
        if self._by_addr and (always or self._announcing()):
            payload = self._notice(template, name=session.name, **fields)
            self._out.append(Delivery(payload, list(self._by_addr)))
        self._events.append(UserLeft(session.name, session.addr, why))
        if self.replica is not None:
            self._relay_leave(session.name, why, fields.get("reason", ""))
        self.hooks.left(session.name, why)

    def _announcing(self) -> bool:
        """Joins and leaves are news in a room, and most of the traffic in a crowd
        (n logins would cost n²/2 notices): they are announced up to a size."""
        limit = self.settings.announce_limit  # counting the one who comes or goes
        return not limit or len(self._by_addr) < limit

    def _forget(self, session: Session) -> None:
        del self._by_addr[session.addr]
        del self._by_key[session.key]
        del self._by_silence[session.addr]
        for look in session.looks:
            del self._by_look[look]
        host = session.host
        self._per_host[host] -= 1
        if not self._per_host[host]:
            del self._per_host[host]

    def _refuse(self, addr: Addr, wanted: str, why: str, template: str, **fields: Any) -> None:
        self._send_text(addr, template, **fields)
        self._events.append(LoginRefused(wanted, addr, why))

    def _drop(self, reason: str, addr: Addr, **details: Any) -> None:
        self._events.append(Dropped(reason, addr, details))

    def _send_text(self, addr: Addr, template: str, **fields: Any) -> None:
        self._out.append(Delivery(self._notice(template, **fields), (addr,)))

    def _render(self, template: str, **fields: Any) -> bytes:
        return self.settings.templates[template].format(**fields).encode()

    def _notice(self, template: str, **fields: Any) -> bytes:
        return self._fit(self._render(template, **fields))

    def _fit(self, payload: bytes) -> bytes:
        """Server texts (not people's lines) are shortened, at a character boundary, to fit."""
        limit = self.settings.max_datagram
        if len(payload) <= limit or payload in (protocol.OK, protocol.EXIT):
            return payload
        return truncate_utf8(payload, limit)

    def _check_fits(self, payload: bytes) -> None:
        if len(payload) > self.settings.max_datagram:
            raise TextTooLong(f"{len(payload)} bytes, at most {self.settings.max_datagram}")

    def _take(self) -> Step:
        step = Step(self._out, self._events)
        self._out, self._events = [], []
        return step


@functools.lru_cache(maxsize=4)  # only ever called with admin names: no stranger churns it
def _admin_looks(admin_name: str) -> frozenset[str]:
    return confusable_keys(admin_name)


def _session_from(entry: Mapping[str, Any], now: float, ipv6_prefix: int) -> Session:
    """One session of a snapshot, checked as strictly as a login would check it."""
    name = entry["name"]
    raw = entry["addr"]
    addr = tuple(raw) if isinstance(raw, list) else raw
    if not isinstance(name, str) or name_problem(name, 1 << 16) is not None:
        raise SnapshotError(f"bad name {name!r}")
    if not (isinstance(addr, str) or (isinstance(addr, tuple) and len(addr) in (2, 4) and all(
            isinstance(part, str | int) and not isinstance(part, bool) for part in addr))):
        raise SnapshotError(f"bad address {raw!r}")
    ago = entry["unreachable_ago"]
    return Session(
        name=name, key=name_key(name), addr=addr, looks=tuple(confusable_keys(name)),
        joined_at=now - float(entry["age"]), last_seen=now - float(entry["idle"]),
        keepalive=bool(entry["keepalive"]), verified=bool(entry["verified"]),
        unreachable=int(entry["unreachable"]), host=host_key(addr, ipv6_prefix),
        unreachable_at=None if ago is None else now - float(ago))
