"""What a plugin may do to the room: the whole of it, on purpose small.

Each plugin gets its own :class:`RoomAPI`, carrying its name, options,
logger and counters, so that nothing a plugin does needs the server's or the
room's internals, and those can change without breaking plugins. Everything
sent here is queued and goes out when the hook returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import structlog

from chatd.hosts import host_key
from chatd.room import Addr, Room, TextTooLong
from chatd.textsafe import neutralise

__all__ = ["RoomAPI", "TextTooLong", "User"]


@dataclass(frozen=True, slots=True)
class User:
    """A person in the room, as a plugin sees them (a copy: changing it changes nothing)."""

    name: str
    addr: Addr
    #: logged in with an address cookie; an unverified address may be forged, so it gets
    #: one datagram of reply per datagram it sends (see :meth:`RoomAPI.reply_budget`)
    verified: bool = False
    #: in a cluster, the node serving a user of another node (None: this node's user)
    node: str | None = None


class RoomAPI:
    """The room as one plugin sees it.

    ``name``: the plugin's name. ``options``: its options, defaults filled in
    (read-only; replaced on reload). ``log``: a structlog logger that adds
    ``plugin=<name>`` to every event. ``counters``: numbers ``chatctl plugins``
    shows (bump them with :meth:`count`).
    """

    def __init__(self, name: str, room: Room, options: Mapping[str, Any],
                 commands: Callable[[], dict[str, str]],
                 rewrite: Callable[[str, str], str | Literal[False]]):
        self.name = name
        self.options: Mapping[str, Any] = MappingProxyType(dict(options))
        self.log = structlog.get_logger("chatd", plugin=name)
        self.counters: Counter[str] = Counter()
        self._room = room
        self._commands = commands
        self._rewrite = rewrite

    # -- who is there ----------------------------------------------------------

    def users(self) -> list[str]:
        """The names in the room, in the order they joined (in a cluster: this node's users,
        then the other nodes' ones)."""
        return [s.name for s in self._room.sessions()] + [
            r.name for r in self._room.remote_users()]

    def user(self, name: str) -> User | None:
        """The person called ``name`` (compared as the room compares names), or None.

        In a cluster, a user of another node too (``node`` says which): :meth:`send`
        and :meth:`kick` reach them there."""
        session = self._room.session(name)
        if session is not None:
            return User(session.name, session.addr, session.verified)
        remote = self._room.replica.get(name) if self._room.replica is not None else None
        return None if remote is None else User(remote.name, remote.addr, True, remote.node)

    def __len__(self) -> int:
        """Everyone in the room (in a cluster: on every node)."""
        return self._room.population()

    def host(self, addr: Addr) -> str:
        """The host ``addr`` counts as for limits per address: an IPv4 address, or an IPv6
        prefix of ``room.ipv6_prefix`` bits (chatd.hosts)."""
        return host_key(addr, self._room.settings.ipv6_prefix)

    def reply_budget(self, name: str) -> int | None:
        """How many datagrams an answer to ``name`` may take: 1 when ``name``'s address is
        unverified (the room drops any more), None for no limit. A long answer to a limited
        user should fit in one datagram and say what it left out."""
        user = self.user(name)
        return 1 if user is not None and not user.verified else None

    # -- saying things ---------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        """The largest datagram the room sends; longer texts raise :class:`TextTooLong`."""
        return self._room.settings.max_datagram

    def send(self, name: str, text: str) -> bool:
        """Queue ``text`` for one person; False when nobody has that name.

        Raises :class:`TextTooLong` when ``text`` exceeds :attr:`max_bytes`
        encoded; start texts with ``"\\n"`` as the room's own do.
        """
        return self._room.send(name, text)

    def broadcast(self, text: str, exclude: Iterable[str] = ()) -> None:
        """Queue ``text`` for everybody but the names in ``exclude``; may raise TextTooLong."""
        self._room.broadcast(text, exclude)

    def kick(self, name: str, reason: str) -> bool:
        """Remove a person (they are told ``reason``); False when nobody has that name.

        Kicking the sender from ``chatd_message`` does not stop the line:
        return ``False`` as well to drop it.
        """
        return self._room.kick(name, reason)

    def render(self, template: str, **fields: Any) -> str:
        """One of the room's templates (``chat``, ``joined``, ...) in the configured locale."""
        return self._room.render(template, **fields)

    def rewrite(self, name: str, text: str) -> str | Literal[False]:
        """``text`` as the room's ``chatd_message`` plugins leave it; False when one dropped it
        (as in ``chatd_message`` itself: None is never an answer here).

        For commands that carry a line of chat (``/me``, ``/msg``), so that
        word filters and rate limits apply to those lines too. Like a chat
        line, the result is on one line with no control or bidi characters
        (each shown as an escape such as ``\\x0a``): safe to relay.
        """
        rewritten = self._rewrite(name, text)
        return False if rewritten is False else neutralise(rewritten)

    # -- the other plugins, and bookkeeping --------------------------------------

    def commands(self) -> dict[str, str]:
        """Every command the enabled plugins offer, command -> one-line usage."""
        return self._commands()

    def count(self, key: str, amount: int = 1) -> None:
        """Add to one of this plugin's counters (shown by ``chatctl plugins``)."""
        self.counters[key] += amount

    def _set_options(self, options: Mapping[str, Any]) -> None:
        self.options = MappingProxyType(dict(options))
