"""The users other nodes of a cluster serve, as this node knows them: a replica, no I/O.

A clustered room (:meth:`chatd.room.Room.enable_cluster`) keeps one, fed by
the other nodes' records, so that the checks that make a name unique
(taken, too alike) and the lists of who is there (``/who``, ``chatctl who``,
``/msg``) see the whole room. It is plain data indexed three ways: by name
key, by confusable key and by address (a datagram from an address a remote
user had is a session to adopt, not a stranger). A single node never makes
one, so nothing here costs anything there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from chatd.names import confusable_keys, name_key


@dataclass(slots=True)
class RemoteUser:
    name: str
    key: str
    node: str
    addr: str  # as chatd.formats.format_addr writes it
    since: str  # wall-clock login time, ISO 8601 (as the serving node said)
    looks: tuple[str, ...]


class Replica:
    """Remote users by name key, confusable key and address; the last record about a name wins."""

    def __init__(self) -> None:
        self._by_key: dict[str, RemoteUser] = {}
        self._by_look: dict[str, RemoteUser] = {}
        self._by_addr: dict[str, RemoteUser] = {}

    def add(self, name: str, node: str, addr: str, since: str) -> RemoteUser:
        """Record ``name`` as ``node``'s user (replacing what was known of that name)."""
        self.remove(name)
        user = RemoteUser(name, name_key(name), node, addr, since,
                          tuple(confusable_keys(name)))
        self._by_key[user.key] = user
        self._by_look.update(dict.fromkeys(user.looks, user))
        if addr:
            self._by_addr[addr] = user
        return user

    def remove(self, name: str) -> RemoteUser | None:
        user = self._by_key.pop(name_key(name), None)
        if user is None:
            return None
        for look in user.looks:
            if self._by_look.get(look) is user:
                del self._by_look[look]
        if self._by_addr.get(user.addr) is user:
            del self._by_addr[user.addr]
        return user

    def clear(self) -> None:
        self._by_key.clear()
        self._by_look.clear()
        self._by_addr.clear()

    def get(self, name: str) -> RemoteUser | None:
        return self._by_key.get(name_key(name))

    def by_key(self, key: str) -> RemoteUser | None:
        return self._by_key.get(key)

    def like(self, looks: frozenset[str]) -> RemoteUser | None:
        """A remote user whose name looks like one with confusable keys ``looks``."""
        return next((self._by_look[look] for look in looks if look in self._by_look), None)

    def at(self, addr: str) -> RemoteUser | None:
        return self._by_addr.get(addr)

    def of_node(self, node: str) -> list[RemoteUser]:
        return [user for user in self._by_key.values() if user.node == node]

    def __iter__(self) -> Iterator[RemoteUser]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)
