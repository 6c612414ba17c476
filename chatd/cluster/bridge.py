"""The loop's side of a cluster: the room's steps out as records, other nodes' records in.

A service of the server (:mod:`chatd.services`), started only when
``cluster.redis`` is set. It never talks to Redis: :class:`ClusterLink` does,
in its own threads, and every call made here only queues work. What comes
back (records, claim answers, presence, the link's state) wakes the loop
through the link's file descriptor, which the server watches like any other.

Out: the clustered room emits :class:`~chatd.events.Relay` events (a join, a
line, a leave, a kick or a ``/msg`` for a user of another node) and
:class:`~chatd.events.ClaimWanted` for each login; :meth:`relay` runs after
the step's local deliveries went out, so local users never wait for Redis.

In: each record becomes deliveries to this node's users, rendered with this
node's templates, and keeps the room's replica of the other nodes' users.
"""

from __future__ import annotations

import json
import select
import selectors
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from chatd import log as log_mod
from chatd.cluster.link import ClusterLink
from chatd.cluster.records import (
    ClaimAnswer,
    Inbound,
    LinkState,
    NameInfo,
    NameLost,
    Presence,
    Remote,
)
from chatd.events import ClaimWanted, Event, NameReleased, Relay, Step
from chatd.formats import format_addr, iso_time
from chatd.names import MAX_NAME_LENGTH, name_problem
from chatd.server import Server
from chatd.services import Service
from chatd.settings import ClusterSettings

log = structlog.get_logger("chatd")

#: Seconds start-up waits, at most, to learn who the other nodes serve before it serves.
FIRST_PRESENCE_WAIT = 5.0


class ClusterBridge(Service):
    """Joins this node's room to the cluster's (see the module's docstring)."""

    name = "cluster"

    def __init__(self, server: Server, settings: ClusterSettings,
                 link: ClusterLink | None = None):
        self.server = server
        #: what a handover restart brought (see :meth:`handover_state`): where the previous
        #: process of this node stopped reading, and who the other nodes serve
        self.resume: Mapping[str, Any] | None = None
        self.room = server.room
        self.apply = server.apply
        self.settings = settings
        self.link = link if link is not None else ClusterLink(settings)  # ValueError: config
        self.node = self.link.node
        #: names held by this node in Redis that no session here has (a previous process of
        #: this node, killed): adoptable until the deadline, then freed and told as leaves
        self._orphans: dict[str, float] = {}
        self._records: dict[str, Callable[[Remote], Step | None]] = {
            "join": self._on_join, "leave": self._on_leave, "say": self._on_say,
            "admin": self._on_admin, "broadcast": self._on_broadcast, "msg": self._on_msg,
            "kick": self._on_kick, "adopt": self._on_adopt, "node_gone": self._on_node_gone,
        }
        self._logs = log_mod.BoundedLog(log, {"cluster_record_failed": "exception",
                                              "cluster_record_unknown": "warning",
                                              "cluster_record_refused": "warning"})

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        self.room.enable_cluster()
        self.server.bridge = self
        if self.resume is not None:  # a handover: known already, and nothing to wait for
            self.link.resume_from(self.resume["position"])
            self.room.replace_remote(self.resume["replica"], self.node)
            self.link.start()
        else:
            self.link.start()
            self._await_presence(min(FIRST_PRESENCE_WAIT, self.settings.node_timeout))
        self.server.watch(self.link.fileno(), selectors.EVENT_READ, self._on_link)
        log.info("cluster_started", node=self.node, room=self.settings.room,
                 users_elsewhere=self.room.population())

    def _await_presence(self, timeout: float) -> None:
        """Before the room serves, learn who the other nodes serve (bounded): a datagram
        from one of their users, which the kernel may give this new node (reuseport), is
        then a session to adopt, not a stranger's. A Redis that is down is not waited for:
        the node serves its own users meanwhile."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([self.link.fileno()], [], [], remaining)[0]:
                break
            items = self.link.drain()
            for item in items:
                self._inbound(item)
            if any(isinstance(i, Presence) or (isinstance(i, LinkState) and not i.connected)
                   for i in items):
                return
        log.warning("cluster_presence_late", waited=timeout)

    def stop(self) -> None:
        """After the room said goodbye (its leaves are queued): flush them, free our names;
        or, when the room went to a new process of this node, keep them for it."""
        self.server.unwatch(self.link.fileno())
        self.server.bridge = None
        self.link.stop(keep_names=self.server.handed_over)

    def handover_state(self) -> dict[str, Any]:
        """For a handover restart, with the room stopped: apply what was read so far, then
        say where reading stopped and who the other nodes serve (JSON-safe). The new
        process reads on from there (:attr:`resume`): no record missed or doubled."""
        items, position = self.link.freeze()
        for item in items:
            try:
                self._inbound(item)
            except Exception:
                self._logs("cluster_record_failed", item=repr(item)[:200])
        replica = self.room.replica or ()
        return {"position": position,
                "replica": {user.name: {"node": user.node, "addr": user.addr,
                                        "since": user.since} for user in replica}}

    def thaw(self) -> None:
        """The handover failed: this process serves on and reads on where it stopped."""
        self.link.thaw()

    def tick(self, now: float) -> None:
        for name, deadline in list(self._orphans.items()):
            if now >= deadline:
                del self._orphans[name]
                if self.room.session(name) is None:
                    self.link.release(name)
                    self.link.publish("leave", name=name, reason="timeout", detail="")
                    self.apply(self.room.forget_remote(name, self.node))

    def status(self) -> dict[str, Any]:
        link = self.link.status()
        nodes = link.get("nodes") or {}
        replica = self.room.replica
        return {"cluster": {
            **link,
            "nodes_alive": sum(1 for n in nodes.values() if n.get("alive")),
            "users_local": len(self.room),
            "users_remote": len(replica) if replica is not None else 0,
            "users_total": self.room.population(),
        }}

    # -- out: what the room did -----------------------------------------------------------

    def relay(self, events: Iterable[Event]) -> None:
        """Publish what a step said the cluster must hear (after its local deliveries)."""
        link = self.link
        for event in events:
            if isinstance(event, Relay):
                fields = event.fields
                if event.kind == "join":
                    fields = {**fields, "since": iso_time()}
                link.publish(event.kind, **fields)
                if event.kind == "leave" and fields.get("reason") != "name_lost":
                    link.release(fields["name"])
                elif event.kind == "adopt" or event.kind == "join":
                    self._orphans.pop(fields["name"], None)
            elif isinstance(event, ClaimWanted):
                link.claim(event.name, NameInfo(addr=format_addr(event.addr), since=iso_time()),
                           event.token, take_from=event.take_from)
            elif isinstance(event, NameReleased):
                link.release(event.name)

    # -- in: what the link brings ----------------------------------------------------------

    def _on_link(self, mask: int) -> None:
        for item in self.link.drain():
            try:
                self._inbound(item)
            except Exception:  # one bad record must not stop the room
                self._logs("cluster_record_failed", item=repr(item)[:200])

    def _inbound(self, item: Inbound) -> None:
        now = time.monotonic()
        if isinstance(item, Remote):
            handler = self._records.get(item.kind)
            if handler is None:
                self._logs("cluster_record_unknown", kind=item.kind, node=item.node)
                return
            problem = _name_problem(item)
            if problem is not None:
                self._logs("cluster_record_refused", kind=item.kind, node=item.node,
                           problem=problem)
                return
            step = handler(item)
            if step is not None:
                self.apply(step)
        elif isinstance(item, ClaimAnswer):
            self.apply(self.room.claim_answered(item.token, item.granted, now))
        elif isinstance(item, NameLost):
            log.warning("cluster_name_lost", name=item.name, holder=item.holder)
            self.apply(self.room.name_lost(item.name))
        elif isinstance(item, Presence):
            self.room.replace_remote(item.holders, self.node)
            deadline = now + self.settings.node_timeout
            for name, info in item.holders.items():
                if info.get("node") == self.node and self.room.session(name) is None:
                    self._orphans.setdefault(name, deadline)
        elif isinstance(item, LinkState) and item.connected and item.reset:
            self._tell_again(quiet=True)

    def _tell_again(self, quiet: bool) -> None:
        """Redis came back empty (``quiet``: nobody left, the others just forgot), or it
        dropped this node as dead (its users were told as gone): say who is here again."""
        for session in self.room.sessions():
            self.link.publish("join", name=session.name, addr=format_addr(session.addr),
                              since=iso_time(), **({"again": "1"} if quiet else {}))
        log.info("cluster_presence_published", users=len(self.room))

    # -- records, by kind ------------------------------------------------------------------

    def _on_join(self, record: Remote) -> Step:
        f = record.fields
        return self.room.remote_join(f["name"], record.node, f.get("addr", ""),
                                     f.get("since", ""), quiet=f.get("again") == "1")

    def _on_leave(self, record: Remote) -> Step:
        f = record.fields
        return self.room.remote_leave(f["name"], record.node, f.get("reason", "quit"),
                                      f.get("detail", ""))

    def _on_say(self, record: Remote) -> Step:
        return self.room.remote_say(record.fields["name"], record.fields["text"])

    def _on_admin(self, record: Remote) -> Step:
        return self.room.remote_admin(record.fields["text"])

    def _on_broadcast(self, record: Remote) -> Step:
        exclude = json.loads(record.fields.get("exclude") or "[]")
        return self.room.remote_text(record.fields["text"], [str(n) for n in exclude])

    def _on_msg(self, record: Remote) -> Step | None:
        if record.fields.get("at") != self.node:
            return None
        return self.room.remote_send(record.fields["to"], record.fields["text"])

    def _on_kick(self, record: Remote) -> Step | None:
        if record.fields.get("at") != self.node:
            return None
        self.room.kick(record.fields["name"], record.fields.get("reason", ""))
        return self.room.flush()

    def _on_adopt(self, record: Remote) -> Step:
        f = record.fields
        return self.room.adopted_elsewhere(f["name"], record.node, f.get("addr", ""))

    def _on_node_gone(self, record: Remote) -> Step:
        gone = record.fields["gone"]
        names = [str(n) for n in json.loads(record.fields.get("names") or "[]")]
        log.warning("cluster_node_gone", gone=gone, names=len(names))
        step = self.room.node_gone(gone, names)
        if gone == self.node:  # we were cut off too long and reaped: say who is here again
            self._tell_again(quiet=False)
        return step


def _name_problem(record: Remote) -> str | None:
    """What is wrong with a record's user name, if it has one: a name no node would have
    let log in (whitespace, controls, too long) never reaches this node's users, whoever
    wrote the record into Redis."""
    name = record.fields.get("name")
    if name is None:
        return None
    problem = name_problem(name, MAX_NAME_LENGTH)
    return None if problem is None else f"name {name[:40]!r}: {problem}"
