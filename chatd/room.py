"""The room: sessions, names and rules, with no I/O.

Every entry point turns its input into a list of :class:`Delivery` values
(one payload, encoded once, and the addresses it goes to) and appends what
happened to :attr:`Room.events`; the server does the sending and the logging.
Time comes in as an argument (monotonic seconds), so tests drive the clock.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from chatd import protocol
from chatd.config import RoomSettings
from chatd.cookies import CookieJar
from chatd.hosts import host_key
from chatd.names import confusable_keys, name_key, name_problem
from chatd.textsafe import neutralise

Addr = Hashable  # what recvfrom returns: (host, port) or (host, port, flow, scope)

#: Seconds between two ICMP reports that both count against one session. Anyone can
#: forge ICMP errors, and a burst of them must not be worth more than one report.
UNREACHABLE_SPACING = 10.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One datagram for one or many addresses."""

    payload: bytes
    addrs: Sequence[Addr]


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


class TextTooLong(ValueError):
    """An admin or plugin text that would not fit in one datagram."""


@dataclass
class Room:
    settings: RoomSettings
    hooks: RoomHooks = field(default_factory=NoHooks)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    #: what the room did that is not a drop (evictions, cookies, capped replies)
    counters: Counter[str] = field(default_factory=Counter)
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

    # -- entry points ------------------------------------------------------

    def receive(self, addr: Addr, data: bytes, now: float) -> list[Delivery]:
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
            self._leave(session, "quit", "left")
            self._out.append(Delivery(protocol.EXIT, (addr,)))
        return self._capped(addr)

    def expire(self, now: float) -> list[Delivery]:
        """Drop sessions that promised keepalives and then fell silent."""
        limit = self.settings.session_timeout
        stale = [
            s for s in self._by_addr.values() if s.keepalive and now - s.last_seen > limit
        ]
        for session in stale:
            self._leave(session, "timeout", "timed_out")
        return self._take()

    def unreachable(self, addr: Addr, now: float) -> list[Delivery]:
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
            self.drops["icmp_ignored"] += 1
            return self._take()
        session.unreachable += 1
        session.unreachable_at = now
        if session.unreachable >= limit:
            self._leave(session, "unreachable", "unreachable")
        return self._take()

    def pause(self, seconds: float, now: float) -> None:
        """The server did not read the socket for ``seconds`` (stopped, or busy):
        that was not the clients' silence, so nobody's clock ran meanwhile."""
        for session in self._by_addr.values():
            session.last_seen = min(now, session.last_seen + seconds)

    def next_expiry(self) -> float | None:
        """The monotonic time at which :meth:`expire` next has work, if ever."""
        times = [s.last_seen for s in self._by_addr.values() if s.keepalive]
        return min(times) + self.settings.session_timeout if times else None

    def admin_say(self, text: str) -> list[Delivery]:
        """The admin speaks to everyone; raises :class:`TextTooLong`."""
        payload = self._render("admin", name=self.settings.admin_name, text=text)
        self._check_fits(payload)
        self._out.append(Delivery(payload, list(self._by_addr)))
        self.events.append(("admin_said", {"users": len(self._by_addr)}))
        return self._take()

    def kick(self, name: str, reason: str) -> list[Delivery] | None:
        """Remove a user with a reason; None when nobody has that name."""
        return self._take() if self.queue_kick(name, reason) else None

    def shutdown(self) -> list[Delivery]:
        """Tell everyone the room is closing, then ``EXIT``; the room is empty afterwards."""
        addrs = list(self._by_addr)
        if addrs:
            self._out.append(Delivery(self._notice("shutdown"), addrs))
            self._out.append(Delivery(protocol.EXIT, addrs))
        for session in list(self._by_addr.values()):
            self._forget(session)
            self.events.append(
                ("user_left", {"name": session.name, "addr": session.addr, "reason": "shutdown"})
            )
        return self._take()

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
            return False
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

    def queue_kick(self, name: str, reason: str) -> bool:
        """Remove a user, queueing what that says to whom; False when there is no such user."""
        session = self._by_key.get(name_key(name))
        if session is None:
            return False
        self._send_text(session.addr, "kicked", reason=reason)
        self._out.append(Delivery(protocol.EXIT, (session.addr,)))
        self._leave(session, "kicked", "kick_notice", always=True, reason=reason)
        return True

    def render(self, key: str, **fields: Any) -> str:
        return self.settings.templates[key].format(**fields)

    def take_output(self) -> list[Delivery]:
        """Deliveries queued outside an entry point (by plugins at startup, say)."""
        return self._take()

    def __len__(self) -> int:
        return len(self._by_addr)

    # -- the rules ---------------------------------------------------------

    def _hello(self, addr: Addr, size: int, now: float) -> None:
        """``H``: answer with a cookie, never with more bytes than were sent."""
        reply = self.cookies.issue(addr, now)
        if len(reply) > size:
            self._drop("hello_too_short", addr, size=size, needed=len(reply))
            return
        self.counters["cookies_issued"] += 1
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
        if key in self._by_key or key == self.settings.admin_key:
            self._refuse(addr, name, "name_taken", "name_taken", name=name)
            return
        looks = confusable_keys(name)
        like = next((self._by_look[look] for look in looks if look in self._by_look), None)
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
            self.events.append(("login_refused", {"name": name, "addr": addr,
                                                  "reason": "plugin"}))
            return
        if evict is not None:
            self._evict(evict)
        self._out.append(Delivery(protocol.OK, (addr,)))
        if self._by_addr and self._announcing():
            self._out.append(Delivery(self._notice("joined", name=name), list(self._by_addr)))
        new = Session(name=name, key=key, addr=addr, looks=tuple(looks), joined_at=now,
                      last_seen=now, verified=verified, host=host)
        self._by_addr[addr] = new
        self._by_key[key] = new
        self._by_look.update(dict.fromkeys(looks, new))
        self._by_silence[addr] = new
        self._per_host[host] += 1
        self.events.append(("user_joined", {"name": name, "addr": addr, "verified": verified}))
        self.hooks.joined(name)

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
        self.counters["evicted_idle"] += 1
        self._send_text(session.addr, "evicted")
        self._out.append(Delivery(protocol.EXIT, (session.addr,)))
        self._leave(session, "evicted", "left")

    def _refuse_unverified(self, addr: Addr, wanted: str, why: str, size: int) -> None:
        """A refusal to an address nobody vouched for: at most three times the bytes it sent
        (RFC 9000, 8.1), so that a forged login reflects nothing worth forging."""
        payload = self._notice(why)
        if len(payload) <= 3 * size:
            self._out.append(Delivery(payload, (addr,)))
        else:
            self.counters["unverified_capped"] += 1
        self.events.append(("login_refused", {"name": wanted, "addr": addr, "reason": why}))

    def _capped(self, addr: Addr) -> list[Delivery]:
        """The output of one datagram, with at most one datagram of reply to a sender whose
        address is unproven: a forged request then costs its victim one datagram, no more."""
        session = self._by_addr.get(addr)
        if session is not None and session.verified:
            return self._take()
        out = self._take()
        replies = 0
        kept = []
        for delivery in out:
            if len(delivery.addrs) == 1 and delivery.addrs[0] == addr:
                replies += 1
                if replies > 1:
                    self.counters["unverified_capped"] += 1
                    continue
            kept.append(delivery)
        return kept

    def _chat(self, session: Session, text: str) -> None:
        if not text:
            self.drops["empty_text"] += 1
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
        self.events.append(("chat", {"name": session.name, "text": rewritten}))
        self.hooks.said(session.name, rewritten)

    def _leave(self, session: Session, why: str, template: str, always: bool = False,
               **fields: Any) -> None:
        self._forget(session)
        if self._by_addr and (always or self._announcing()):
            payload = self._notice(template, name=session.name, **fields)
            self._out.append(Delivery(payload, list(self._by_addr)))
        self.events.append(("user_left", {"name": session.name, "addr": session.addr,
                                          "reason": why}))
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
        self.events.append(("login_refused", {"name": wanted, "addr": addr, "reason": why}))

    def _drop(self, reason: str, addr: Addr, **details: Any) -> None:
        self.drops[reason] += 1
        self.events.append(("datagram_dropped", {"reason": reason, "addr": addr, **details}))

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
        return payload[:limit].decode("utf-8", "ignore").encode()

    def _check_fits(self, payload: bytes) -> None:
        if len(payload) > self.settings.max_datagram:
            raise TextTooLong(f"{len(payload)} bytes, at most {self.settings.max_datagram}")

    def _take(self) -> list[Delivery]:
        out, self._out = self._out, []
        return out


@functools.lru_cache(maxsize=4)  # only ever called with admin names: no stranger churns it
def _admin_looks(admin_name: str) -> frozenset[str]:
    return confusable_keys(admin_name)
