"""What the Redis side hands to the loop: plain, frozen values, made in the link's threads
and read in the loop (:meth:`chatd.cluster.link.ClusterLink.drain`).

A record on the room's stream is a flat mapping of text to text (Redis stream
fields). Each carries its publisher's ``node``, the publisher process's
incarnation ``inc`` and a per-incarnation sequence number ``seq``: the link
delivers each record once, in stream order, even when a publish was retried
after a timeout and so reached Redis twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Remote:
    """A record another node published (or ``node_gone``, which the reaping node's script
    wrote, delivered to every node including the reaper), in stream order, once."""

    node: str
    kind: str
    fields: Mapping[str, str]
    id: str  # the stream entry's id


@dataclass(frozen=True)
class ClaimAnswer:
    """The answer to :meth:`ClusterLink.claim`: the name is this node's, or ``holder``'s.

    ``provisional``: granted without asking Redis, which was unreachable; it is
    asserted on reconnect and may then be lost (:class:`NameLost`).
    """

    token: int
    name: str
    granted: bool
    holder: str | None = None
    provisional: bool = False


@dataclass(frozen=True)
class NameLost:
    """A name this node held provisionally was, on reconnect, found held by ``holder``.

    The rule is the same on every node: the claim that reached Redis first wins.
    """

    name: str
    holder: str


@dataclass(frozen=True)
class Presence:
    """Every name held in the room, read atomically with the stream position from which
    records follow: on first connect and after Redis came back empty. It replaces
    whatever the node knew of the other nodes' users."""

    holders: Mapping[str, Mapping[str, str]]  # name -> {"node", "addr", "since", ...}


@dataclass(frozen=True)
class LinkState:
    """Redis became reachable or unreachable (``reason`` says why, for the log);
    ``reset``: it came back empty (restarted without persistence)."""

    connected: bool
    reason: str = ""
    reset: bool = False


Inbound = Remote | ClaimAnswer | NameLost | Presence | LinkState

#: Fields every record has, set by the link (publishers may not use these names).
RESERVED_FIELDS = frozenset({"node", "kind", "inc", "seq"})


@dataclass(frozen=True)
class NameInfo:
    """What the names hash holds about a name besides its node."""

    addr: str
    since: str  # wall-clock login time, ISO 8601
    extra: Mapping[str, str] = field(default_factory=dict)
