"""The only code that talks to Redis: two threads beside the loop, which never waits on them.

Every public method returns at once: it puts work on a queue (publishes, claims, releases,
kept in call order) or takes what waits (:meth:`ClusterLink.drain`). The *io* thread owns
one connection: it connects (with backoff), keeps the heartbeat, reaps dead nodes and sends
the queue in batches. The *reader* thread owns another: ``XREAD BLOCK`` on the room's
stream from the last id it saw. Both hand their results to the loop through one deque and
a socketpair whose read end (:meth:`ClusterLink.fileno`) the loop's selector watches.

Nothing is lost across Redis trouble: a publish stays queued until Redis acknowledged it,
and after a failure the unacknowledged batch is sent again on reconnect. That may add a
record twice to the stream; readers skip it, since every record carries its publisher's
``(node, inc, seq)`` and sequence numbers are sent in order on one connection at a time.
Reading resumes from the last id seen, so a node cut off for a while catches up, unless
``MAXLEN`` trimmed entries meanwhile (a *gap*, counted and logged).

Names: a claim is decided by a Lua script (see :mod:`chatd.cluster.scripts`), so two
nodes racing for one name never both win. While Redis is unreachable a claim is granted
provisionally; on reconnect every name this node holds is asserted again: a free name is
taken again silently, a name another node took meanwhile is lost (:class:`NameLost`).
The claim that reached Redis first wins.

What the loop sees, in order: ``LinkState(connected=True)`` and a :class:`Presence` on
first connect, then the other nodes' records (``node_gone`` from every node, this one's
reaping included). After Redis came back empty (``reset=True``) a fresh Presence follows,
taken once this node's names are back: it lists the names of the nodes that reconnected
before this one; those reconnecting later assert theirs silently, so a bridge that wants
every node to know its users again re-publishes them on a reset. Reading then starts at
the new stream's beginning, so records published to the new Redis before this node got
back arrive after the Presence (they may repeat what it already shows). The same holds
after :meth:`ClusterLink.resume_from`: records after the resumed position follow.

Heartbeats: ``SET alive:NODE PX node_timeout`` every node_timeout/5 (at most 2 s). Every
second each node checks the others' and reaps one whose key expired, in one script that
only one node can win; right after a reconnect it waits a while first, since the other
nodes' heartbeats expired in the same outage and they may still be reconnecting.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatd import safefs
from chatd.cluster import scripts
from chatd.cluster.records import (
    RESERVED_FIELDS,
    ClaimAnswer,
    Inbound,
    LinkState,
    NameInfo,
    NameLost,
    Presence,
    Remote,
)
from chatd.settings import ClusterSettings

log = structlog.get_logger("chatd")

#: the stream's approximate bound (``XADD MAXLEN ~``): how far a node cut off may fall behind
STREAM_MAXLEN = 100_000
#: publishes kept while Redis is unreachable; beyond, new ones are dropped and counted
OUTBOX_MAX = 100_000
#: queued operations sent in one pipeline
BATCH = 500
#: names asserted again per pipeline on reconnect
ASSERT_BATCH = 1000
#: XREAD waits at most this long for news: also the longest a stop() waits for the reader
READ_BLOCK_MS = 250
READ_COUNT = 1000
#: the reader pauses while this many values wait for the loop (Redis keeps the rest)
INBOUND_HIGH = 50_000
#: socket timeout of the io connection: how long a stalled Redis goes unnoticed at most
IO_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
#: how long stop() keeps sending what is queued, and then the bound on the clean-up
STOP_FLUSH = 1.0
STOP_JOIN = 2.5
#: how often the nodes hash is checked for nodes whose heartbeat expired
REAP_INTERVAL = 1.0
#: after a reconnect, no reaping for node_timeout + this: long enough for the other nodes,
#: whose heartbeats expired in the same Redis outage, to reconnect (backoff + timeouts)
REAP_GRACE = BACKOFF_MAX + 2 * IO_TIMEOUT + CONNECT_TIMEOUT
#: incarnations remembered per node for duplicate detection
INCS_PER_NODE = 4

_NO_ID = "0-0"
_ERRORS = (redis.RedisError, OSError)


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class _Publish:
    fields: dict[str, str]


@dataclass(eq=False)
class _Claim:
    name: str
    info: NameInfo
    token: int
    take_from: str | None
    answered: bool = False  # a provisional answer went out: now it is only asserted


@dataclass
class _Release:
    name: str


_Op = _Publish | _Claim | _Release


@dataclass
class _Counters:
    published: int = 0
    received: int = 0
    reconnects: int = 0
    dropped_outbox: int = 0
    gaps: int = 0
    lag_seconds: float | None = None
    nodes: dict[str, dict[str, bool]] = field(default_factory=dict)


#: Longest password file read: a password is a line, and a huge file is a mistake.
PASSWORD_FILE_LIMIT = 4096


def read_password_file(path: str) -> str:
    """The password in ``cluster.password_file``: its first line. A FIFO named by mistake
    is refused at once, never waited on, and so is a file too large to be one."""
    try:
        data = safefs.read_regular_file(path, PASSWORD_FILE_LIMIT)
        text = data.decode("utf-8")
    except safefs.NotRegularFile as e:
        raise ValueError(f"cluster.password_file: {path} is {e.kind}, not a file") from e
    except safefs.FileTooLarge as e:
        raise ValueError(f"cluster.password_file: {path} is too large ({e.size} bytes; "
                         f"a password file has one line of at most {PASSWORD_FILE_LIMIT})") from e
    except OSError as e:
        raise ValueError(f"cluster.password_file: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"cluster.password_file: {path} is not UTF-8 text") from e
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise ValueError(f"cluster.password_file: {path} is empty")
    return password


class ClusterLink:
    """One node's connection to the room on Redis (see the module's docstring)."""

    def __init__(self, settings: ClusterSettings) -> None:
        if not settings.redis:
            raise ValueError("cluster.redis is not set")
        password = read_password_file(settings.password_file) if settings.password_file else None
        self.node = settings.node or socket.gethostname()
        self.room = settings.room
        self.node_timeout = float(settings.node_timeout)
        if self.node_timeout <= 0:
            raise ValueError("cluster.node_timeout must be positive")
        prefix = f"chatd:{{{self.room}}}"
        self._prefix = prefix
        self.k_stream = f"{prefix}:stream"
        self.k_names = f"{prefix}:names"
        self.k_nodes = f"{prefix}:nodes"
        self.k_alive = self._alive_key(self.node)
        self.inc = secrets.token_hex(8)
        options: dict[str, Any] = {
            "decode_responses": True, "socket_connect_timeout": CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
        if password is not None:
            options["password"] = password
        try:
            self._io = redis.Redis.from_url(settings.redis, socket_timeout=IO_TIMEOUT, **options)
            self._rd = redis.Redis.from_url(
                settings.redis, socket_timeout=READ_BLOCK_MS / 1000 + 1.5, **options)
        except ValueError as e:
            raise ValueError(f"cluster.redis: {e}") from e
        self._s_claim = self._io.register_script(scripts.CLAIM)
        self._s_release = self._io.register_script(scripts.RELEASE)
        self._s_heartbeat = self._io.register_script(scripts.HEARTBEAT)
        self._s_reap = self._io.register_script(scripts.REAP)
        self._s_leave = self._io.register_script(scripts.LEAVE)
        self._s_snapshot = self._io.register_script(scripts.SNAPSHOT)
        self._beat_interval = min(self.node_timeout / 5, 2.0)
        self._since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the io thread waits for work here
        self._came_up = threading.Condition(self._lock)  # the reader waits for a connection
        self._stop_event = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._inbound: deque[Inbound] = deque()
        self._signalled = False
        self._ops: deque[_Op] = deque()
        self._outbox = 0  # publishes among _ops
        self._held: dict[str, _Claim] = {}  # the names this node holds: the claim that won
        self._seq = 0
        self._last_id = _NO_ID
        self._seen: dict[str, OrderedDict[str, int]] = {}
        self._resumed = False
        self._up: bool | None = None  # None: not connected yet, no failure either
        self._ever_up = False
        self._gen = 0  # bumped on each (re)connect: the reader's position may have moved
        self._run_id: str | None = None
        self._reap_after = 0.0
        self._outbox_full_logged = False
        self._stopping = False
        self._abandoned = False
        self._frozen = False  # a handover is under way: what is read now is the next process's
        self._keep_names = False
        self._stop_deadline = 0.0
        self._counters = _Counters()
        self._threads: list[threading.Thread] = []

    def _alive_key(self, node: str) -> str:
        return f"{self._prefix}:alive:{node}"

    # ---- the loop's side: every method returns at once ----

    def start(self) -> None:
        """Start the threads; connecting happens in them."""
        if self._threads:
            raise RuntimeError("ClusterLink already started")
        self._threads = [
            threading.Thread(target=self._io_loop, name=f"cluster-io-{self.node}", daemon=True),
            threading.Thread(target=self._read_loop, name=f"cluster-read-{self.node}",
                             daemon=True)]
        for thread in self._threads:
            thread.start()

    def fileno(self) -> int:
        """Readable while values wait for :meth:`drain`."""
        return self._wake_r.fileno()

    def drain(self) -> list[Inbound]:
        """Every value waiting, in order; never blocks."""
        with self._lock:
            values = list(self._inbound)
            self._inbound.clear()
            if self._signalled:
                self._signalled = False
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while self._wake_r.recv(4096):
                        pass
        return values

    def publish(self, kind: str, **fields: str) -> None:
        """Queue one record; records are added to the stream in call order."""
        clash = RESERVED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"record fields {sorted(clash)} are reserved")
        with self._lock:
            if self._outbox >= OUTBOX_MAX:
                self._counters.dropped_outbox += 1
                if not self._outbox_full_logged:
                    self._outbox_full_logged = True
                    log.warning("cluster_outbox_full", room=self.room, node=self.node,
                                limit=OUTBOX_MAX)
                return
            self._seq += 1
            record = {"node": self.node, "kind": kind, "inc": self.inc, "seq": str(self._seq)}
            record.update(fields)
            self._ops.append(_Publish(record))
            self._outbox += 1
            self._work.notify()

    def claim(self, name: str, info: NameInfo, token: int, take_from: str | None = None) -> None:
        """Ask for ``name``; the answer comes as ``ClaimAnswer(token, ...)``.

        Free -> this node's; held by this node -> granted; held by another -> refused with
        its holder; with ``take_from``, granted only if that node holds it. While Redis is
        unreachable: granted at once, provisionally, and asserted on reconnect.
        """
        op = _Claim(name, info, token, take_from)
        with self._lock:
            if self._up is False:
                self._answer_provisionally(op)
            self._ops.append(op)
            self._work.notify()

    def release(self, name: str) -> None:
        """Give ``name`` up (in Redis only if this node still holds it)."""
        with self._lock:
            self._held.pop(name, None)
            self._ops.append(_Release(name))
            self._work.notify()

    def status(self) -> dict:
        """Figures for ``chatctl status`` and the metrics. ``lag_seconds``: for the newest
        record read, how long after its stream id's time (Redis's clock) it was read."""
        with self._lock:
            c = self._counters
            return {
                "node": self.node, "room": self.room, "redis_connected": self._up is True,
                "reconnects": c.reconnects, "published": c.published, "received": c.received,
                "outbox": self._outbox, "dropped_outbox": c.dropped_outbox, "gaps": c.gaps,
                "lag_seconds": c.lag_seconds,
                "nodes": {node: dict(state) for node, state in c.nodes.items()}}

    def position(self) -> dict:
        """Where reading stands, for a handover restart (:meth:`resume_from`). It counts
        what the reader handed over, drained or not: take it after stop() and a last drain()."""
        with self._lock:
            seen = {node: [next(reversed(incs)), incs[next(reversed(incs))]]
                    for node, incs in self._seen.items() if incs}
            return {"last_id": self._last_id, "seen": seen}

    def freeze(self) -> tuple[list[Inbound], dict]:
        """For a handover restart: every value read so far, and the position right after
        the last record among them. Reading stops there (a record read meanwhile is left
        for whoever resumes from that position), so the next process, resuming there,
        misses nothing and doubles nothing. :meth:`thaw` undoes it: the handover failed."""
        with self._lock:
            self._frozen = True
        return self.drain(), self.position()

    def thaw(self) -> None:
        """Read on from where :meth:`freeze` stopped."""
        with self._lock:
            self._frozen = False

    def resume_from(self, position: Mapping) -> None:
        """Continue reading where another process's link stopped (before :meth:`start`)."""
        if self._threads:
            raise RuntimeError("resume_from() must come before start()")
        try:
            last_id = str(position["last_id"])
            _id(last_id)
            seen = {str(node): OrderedDict([(str(inc), int(seq))])
                    for node, (inc, seq) in dict(position.get("seen", {})).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a cluster link position: {e}") from e
        with self._lock:
            self._last_id = last_id
            self._seen = seen
            self._resumed = True

    def stop(self, *, keep_names: bool = False) -> None:
        """Send what is queued (for about a second), then, unless ``keep_names`` (a handover
        restart continues this node), delete this node's names, heartbeat and nodes entry.
        Waits at most a few seconds."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._keep_names = keep_names
            self._stop_deadline = time.monotonic() + STOP_FLUSH
            self._wake_all()
        self._join()

    def _abandon(self) -> None:
        """Stop the threads as if the process had died: nothing sent, nothing deleted.
        For tests of node loss."""
        with self._lock:
            self._stopping = True
            self._abandoned = True
            self._wake_all()
        self._join()

    def _wake_all(self) -> None:
        self._stop_event.set()
        self._work.notify_all()
        self._came_up.notify_all()

    def _join(self) -> None:
        deadline = time.monotonic() + STOP_JOIN
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- shared between the threads (call with the lock held) ----

    def _push(self, value: Inbound) -> None:
        self._inbound.append(value)
        if not self._signalled:
            self._signalled = True
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._wake_w.send(b"\0")

    def _answer_provisionally(self, op: _Claim) -> None:
        op.answered = True
        self._held[op.name] = op
        self._push(ClaimAnswer(op.token, op.name, granted=True, provisional=True))

    def _mark_down(self, reason: str) -> None:
        """Redis is unreachable: say so once, and answer waiting claims provisionally."""
        with self._lock:
            if self._up is False or self._abandoned:
                return
            self._up = False
            self._outbox_full_logged = False
            self._push(LinkState(connected=False, reason=reason))
            for op in self._ops:
                if isinstance(op, _Claim) and not op.answered:
                    self._answer_provisionally(op)
            self._work.notify_all()
        log.warning("cluster_disconnected", room=self.room, node=self.node, reason=reason)

    # ---- the io thread ----

    def _io_loop(self) -> None:
        backoff = BACKOFF_FIRST
        next_beat = next_reap = 0.0
        try:
            while not self._abandoned:
                with self._lock:
                    if self._stopping and (time.monotonic() >= self._stop_deadline
                                           or not self._up or not self._ops):
                        break  # flushed, or nothing can be flushed
                    up = self._up is True
                if not up:
                    try:
                        self._connect()
                    except Exception as e:  # noqa: BLE001 - the thread must outlive any error
                        self._failed(e)
                        self._stop_event.wait(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        continue
                    backoff = BACKOFF_FIRST
                    next_beat = time.monotonic() + self._beat_interval
                try:
                    now = time.monotonic()
                    if now >= next_beat:
                        self._heartbeat()
                        next_beat = now + self._beat_interval
                    if now >= next_reap:
                        self._reap()
                        next_reap = now + REAP_INTERVAL
                    if not self._send_batch():
                        with self._lock:
                            if not self._ops and not self._stopping and self._up:
                                self._work.wait(max(0.0, min(next_beat, next_reap)
                                                    - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - the thread must outlive any error
                    self._failed(e)
                    self._stop_event.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
            if not self._abandoned:
                self._leave()
        finally:
            self._io.close()

    def _failed(self, error: Exception) -> None:
        """Redis trouble; anything else is a bug, logged, and handled the same way (all is
        sent again after a reconnect) rather than ending the thread."""
        if not isinstance(error, _ERRORS):
            log.error("cluster_link_error", room=self.room, node=self.node,
                      reason=_reason(error), exc_info=error)
        self._mark_down(_reason(error))

    def _connect(self) -> None:
        """Connect, refresh the heartbeat, find out whether Redis came back empty or trimmed
        what this node had not read yet, and assert every name this node holds; then say
        so, with a fresh snapshot of the names on first connect and after a reset (taken
        after this node's own names are back, so it lists them, and those of the nodes
        that reconnected before it; nodes reconnecting later assert theirs silently)."""
        io = self._io
        run_id = str(io.info("server").get("run_id", ""))
        fresh = self._heartbeat() == 1
        with self._lock:
            last_id = self._last_id
            first = not self._ever_up
            resumed = self._resumed
        newest = io.xrevrange(self.k_stream, "+", "-", count=1)
        newest_id = newest[0][0] if newest else _NO_ID
        run_changed = self._run_id is not None and run_id != self._run_id
        reset = (last_id != _NO_ID and _id(newest_id) < _id(last_id)) or (run_changed and fresh)
        gap = False
        if not reset and last_id != _NO_ID and (resumed or not first):
            gap = self._trimmed_after(last_id)
        self._assert_names()
        snapshot = self._s_snapshot(keys=[self.k_names, self.k_stream]) if first or reset \
            else None
        self._run_id = run_id
        with self._lock:
            if self._abandoned:
                return
            if reset:
                self._last_id = _NO_ID
            elif first and not resumed and snapshot is not None:
                self._last_id = snapshot[0]
            if gap:
                self._counters.gaps += 1
            if self._ever_up:
                self._counters.reconnects += 1
                # the other nodes' heartbeats may have expired in the same outage: give
                # them time to reconnect too before reaping any of them
                self._reap_after = time.monotonic() + self.node_timeout + REAP_GRACE
            self._ever_up = True
            self._up = True
            self._gen += 1
            self._push(LinkState(connected=True, reset=reset))
            if snapshot is not None:
                self._push(Presence(self._holders(snapshot[1])))
            self._came_up.notify_all()
        log.info("cluster_connected", room=self.room, node=self.node, reset=reset,
                 rejoined=fresh and not first and not reset)
        if gap:
            log.warning("cluster_gap", room=self.room, node=self.node, after=last_id,
                        maxlen=STREAM_MAXLEN)

    def _trimmed_after(self, last_id: str) -> bool:
        """Whether MAXLEN trimmed entries this node had not read: the entry it read last is
        gone (trimming takes whole macro nodes from the front, so the ones after it in its
        node went too; when it was the last of its node this counts a gap that was none).
        ``max-deleted-entry-id`` does not help: trimming leaves it alone (Redis 7.0)."""
        oldest = self._io.xrange(self.k_stream, "-", "+", count=1)
        return bool(oldest) and _id(oldest[0][0]) > _id(last_id)

    @staticmethod
    def _holders(flat: list) -> dict[str, dict[str, str]]:
        holders: dict[str, dict[str, str]] = {}
        for name, value in zip(flat[::2], flat[1::2], strict=True):
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if isinstance(data, dict):
                holders[name] = {str(k): str(v) for k, v in data.items()}
        return holders

    def _heartbeat(self) -> int:
        entry = json.dumps({"since": self._since, "inc": self.inc})
        return int(self._s_heartbeat(keys=[self.k_alive, self.k_nodes],
                                     args=[self.node, int(self.node_timeout * 1000), entry]))

    def _reap(self) -> None:
        """Check every node's heartbeat; reap those whose heartbeat expired."""
        nodes = list(self._io.hgetall(self.k_nodes))
        pipe = self._io.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(self._alive_key(node))
        alive = dict(zip(nodes, (bool(n) for n in pipe.execute()), strict=True))
        alive[self.node] = True
        with self._lock:
            self._counters.nodes = {node: {"alive": up} for node, up in sorted(alive.items())}
        if time.monotonic() < self._reap_after:
            return
        for node, up in alive.items():
            if up:
                continue
            names = self._s_reap(
                keys=[self._alive_key(node), self.k_nodes, self.k_names, self.k_stream],
                args=[node, self.node, self.inc, STREAM_MAXLEN])
            if names:
                log.info("cluster_node_reaped", room=self.room, node=self.node, gone=node,
                         names=len(json.loads(names)))

    def _claim_args(self, op: _Claim, strict: bool) -> list:
        value = dict(op.info.extra)
        value.update(node=self.node, addr=op.info.addr, since=op.info.since)
        return [op.name, self.node, json.dumps(value), op.take_from or "",
                "1" if strict else "0"]

    def _send_batch(self) -> bool:
        """Send the head of the queue in one pipeline; False when there was nothing."""
        with self._lock:
            batch = list(islice(self._ops, BATCH))
            strict = [isinstance(op, _Claim) and not op.answered for op in batch]
        if not batch:
            return False
        pipe = self._io.pipeline(transaction=False)
        for op, is_strict in zip(batch, strict, strict=True):
            if isinstance(op, _Publish):
                pipe.xadd(self.k_stream, op.fields, maxlen=STREAM_MAXLEN, approximate=True)
            elif isinstance(op, _Claim):
                self._s_claim(keys=[self.k_names], args=self._claim_args(op, is_strict),
                              client=pipe)
            else:
                self._s_release(keys=[self.k_names], args=[op.name, self.node], client=pipe)
        results = pipe.execute(raise_on_error=False)
        failed: list[str] = []
        with self._lock:
            for op, result in zip(batch, results, strict=True):
                self._ops.popleft()
                if isinstance(result, Exception):
                    failed.append(_reason(result))
                if isinstance(op, _Publish):
                    self._outbox -= 1
                    if isinstance(result, Exception):
                        self._counters.dropped_outbox += 1
                    else:
                        self._counters.published += 1
                elif isinstance(op, _Claim):
                    if isinstance(result, Exception):
                        result = [0, ""]
                    self._settle_claim(op, int(result[0]) == 1, str(result[1] or ""))
        for reason in failed[:1]:
            log.error("cluster_command_failed", room=self.room, node=self.node, reason=reason,
                      count=len(failed))
        return True

    def _settle_claim(self, op: _Claim, granted: bool, holder: str) -> None:
        """Redis decided ``op`` (lock held): answer it, or, if it was answered provisionally
        and another node holds the name, tell the loop the name is lost."""
        if not op.answered:
            op.answered = True
            if granted:
                self._held[op.name] = op
            self._push(ClaimAnswer(op.token, op.name, granted,
                                   holder=None if granted else (holder or None)))
        elif not granted and self._held.get(op.name) is op:
            del self._held[op.name]
            self._push(NameLost(op.name, holder))

    def _assert_names(self) -> None:
        """After a (re)connect: take again every name this node holds."""
        with self._lock:
            held = list(self._held.values())
        for start in range(0, len(held), ASSERT_BATCH):
            chunk = held[start:start + ASSERT_BATCH]
            pipe = self._io.pipeline(transaction=False)
            for op in chunk:
                self._s_claim(keys=[self.k_names], args=self._claim_args(op, False),
                              client=pipe)
            results = pipe.execute()
            with self._lock:
                for op, (granted, holder) in zip(chunk, results, strict=True):
                    if int(granted) != 1 and self._held.get(op.name) is op:
                        del self._held[op.name]
                        self._push(NameLost(op.name, str(holder or "")))

    def _leave(self) -> None:
        """The end of a stop: unless keeping names, delete this node's entries."""
        with self._lock:
            if self._keep_names or self._up is not True:
                return
        try:
            self._s_leave(keys=[self.k_alive, self.k_nodes, self.k_names], args=[self.node])
        except _ERRORS as e:
            log.warning("cluster_leave_failed", room=self.room, node=self.node,
                        reason=_reason(e))

    # ---- the reader thread ----

    def _read_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._gen:
                        self._came_up.wait(0.5)
                    if self._stopping:
                        return
                    gen, last_id = self._gen, self._last_id
                    busy = len(self._inbound) >= INBOUND_HIGH or self._frozen
                if busy:
                    self._stop_event.wait(0.05)
                    continue
                try:
                    reply = self._rd.xread({self.k_stream: last_id}, count=READ_COUNT,
                                           block=READ_BLOCK_MS)
                except _ERRORS as e:
                    with self._lock:
                        current = self._gen
                    if current == gen:
                        self._mark_down(_reason(e))
                        with self._lock:
                            while not self._stopping and self._gen == gen:
                                self._came_up.wait(0.5)
                    continue
                if reply:
                    self._take(gen, reply[0][1])
        finally:
            self._rd.close()

    def _take(self, gen: int, entries: list) -> None:
        now = time.time()
        with self._lock:
            if self._gen != gen or self._abandoned or self._frozen:
                return  # a reconnect may have moved the position: read again from there
            for entry_id, fields in entries:
                self._last_id = entry_id
                node = fields.get("node", "")
                kind = fields.get("kind", "")
                if kind != "node_gone":
                    if self._duplicate(node, fields.get("inc", ""), fields.get("seq", "")):
                        continue
                    if node == self.node:
                        continue
                own = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
                self._push(Remote(node, kind, own, entry_id))
                self._counters.received += 1
                self._counters.lag_seconds = max(0.0, now - _id(entry_id)[0] / 1000)

    def _duplicate(self, node: str, inc: str, seq_text: str) -> bool:
        """Whether ``(node, inc, seq)`` was seen already; remembers it if not."""
        try:
            seq = int(seq_text)
        except ValueError:
            return False
        incs = self._seen.setdefault(node, OrderedDict())
        if seq <= incs.get(inc, 0):
            return True
        incs[inc] = seq
        incs.move_to_end(inc)
        while len(incs) > INCS_PER_NODE:
            incs.popitem(last=False)
        return False
