"""ClusterLink against a real redis-server: several links (nodes) in one test process.

Each failure is made the way the world makes it: SIGSTOP/SIGCONT (a stall), SIGKILL and a
restart on the same port (a Redis that comes back empty), a TCP proxy between one link and
Redis that is stopped and started again (a node cut off), a link whose threads end
without any clean-up (a node that died).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from redisproc import RedisServer, TcpProxy
from structlog.testing import capture_logs

from chatd.cluster import link as link_module
from chatd.cluster.link import ClusterLink
from chatd.cluster.records import (
    ClaimAnswer,
    LinkState,
    NameInfo,
    NameLost,
    Presence,
    Remote,
)
from chatd.settings import ClusterSettings

TIMEOUT = 20.0


class Inbox:
    """A link and everything it handed over so far (drain() is polled, never waited on)."""

    def __init__(self, link: ClusterLink):
        self.link = link
        self.values: list = []

    def __getattr__(self, name: str):
        return getattr(self.link, name)

    def poll(self) -> list:
        self.values.extend(self.link.drain())
        return self.values

    def wait(self, predicate: Callable[[list], object], what: str, timeout: float = TIMEOUT):
        return wait_for(lambda: predicate(self.poll()), timeout=timeout, what=what)

    def of(self, kind: type) -> list:
        return [v for v in self.poll() if isinstance(v, kind)]

    def remotes(self, kind: str | None = None) -> list[Remote]:
        return [v for v in self.of(Remote) if kind is None or v.kind == kind]

    def answer(self, token: int) -> ClaimAnswer:
        return self.wait(lambda values: next(
            (v for v in values if isinstance(v, ClaimAnswer) and v.token == token), None),
            what=f"{self.link.node}: answer to claim {token}")

    def connected(self, count: int = 1, **match) -> None:
        def states(values):
            return [v for v in values if isinstance(v, LinkState) and v.connected
                    and all(getattr(v, k) == want for k, want in match.items())]
        self.wait(lambda values: len(states(values)) >= count,
                  what=f"{self.link.node}: connected ({count}, {match})")

    def disconnected(self) -> None:
        self.wait(lambda values: any(isinstance(v, LinkState) and not v.connected
                                     for v in values), what=f"{self.link.node}: disconnected")


@pytest.fixture
def make_link(redis_server) -> Iterator[Callable[..., Inbox]]:
    made: list[ClusterLink] = []

    def make(node: str, *, url: str | None = None, node_timeout: float = 10.0,
             start: bool = True, room: str = "main") -> Inbox:
        link = ClusterLink(ClusterSettings(redis=url or redis_server.url, room=room, node=node,
                                           node_timeout=node_timeout))
        made.append(link)
        inbox = Inbox(link)
        if start:
            link.start()
            inbox.connected()
        return inbox

    yield make
    stoppers = [threading.Thread(target=link.stop) for link in made]  # each waits up to ~2 s
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


@pytest.fixture
def proxy(redis_server) -> Iterator[TcpProxy]:
    relay = TcpProxy(redis_server.port).start()
    yield relay
    relay.stop()


def info(addr: str = "127.0.0.1:4000") -> NameInfo:
    return NameInfo(addr=addr, since="2026-01-01T00:00:00Z")


def said(inbox: Inbox, node: str) -> list[str]:
    """The ``n`` fields of the say records from ``node`` that ``inbox`` received, in order."""
    return [r.fields["n"] for r in inbox.remotes("say") if r.node == node]


def numbers(count: int, start: int = 0) -> list[str]:
    return [str(i) for i in range(start, start + count)]


def holders(redis_server) -> dict[str, str]:
    raw = redis_server.client().hgetall("chatd:{main}:names")
    return {name: json.loads(value)["node"] for name, value in raw.items()}


# ---- records ----

def test_records_arrive_once_in_order_and_never_back_to_their_publisher(make_link):
    a, b, c = make_link("a"), make_link("b"), make_link("c")
    for i in range(50):
        a.publish("say", n=str(i), text=f"line {i}")
    b.wait(lambda _: len(said(b, "a")) >= 50, "b: a's records")
    for i in range(30):
        b.publish("say", n=str(i))
    # a's own records came before b's in the stream: once b's are in, a skipped its own
    a.wait(lambda _: len(said(a, "b")) >= 30, "a: b's records")
    c.wait(lambda _: len(said(c, "a")) >= 50 and len(said(c, "b")) >= 30, "c: all records")
    assert said(b, "a") == numbers(50)
    assert said(c, "a") == numbers(50)
    assert said(c, "b") == numbers(30)
    assert said(a, "b") == numbers(30)
    assert said(a, "a") == [] and said(b, "b") == []
    first = b.remotes("say")[0]
    assert first.fields == {"n": "0", "text": "line 0"}  # node, kind, inc, seq are not fields
    # counted once Redis confirmed, which may be after the others have read them
    wait_for(lambda: (a.status()["published"], b.status()["published"]) == (50, 30),
             what="publishes confirmed")
    assert c.status()["received"] == 80 and c.status()["published"] == 0


def test_fileno_is_readable_while_values_wait(make_link):
    a, b = make_link("a"), make_link("b")
    b.poll()
    assert select.select([b.fileno()], [], [], 0)[0] == []
    a.publish("say", n="1")
    assert select.select([b.fileno()], [], [], TIMEOUT)[0] == [b.fileno()]
    assert [r.fields["n"] for r in b.link.drain()] == ["1"]
    assert select.select([b.fileno()], [], [], 0)[0] == []


def test_a_record_added_twice_is_delivered_once(make_link, redis_server):
    """A publish retried after a timeout may reach the stream twice: readers skip it."""
    b = make_link("b")
    client = redis_server.client()
    for seq in ("1", "2", "1", "2", "3"):
        client.xadd("chatd:{main}:stream",
                    {"node": "x", "kind": "say", "inc": "i1", "seq": seq, "n": seq})
    client.xadd("chatd:{main}:stream", {"node": "x", "kind": "say", "inc": "i2", "seq": "1",
                                        "n": "new"})
    b.wait(lambda _: "new" in said(b, "x"), "b: the new incarnation's record")
    assert said(b, "x") == ["1", "2", "3", "new"]


def test_reserved_field_names_are_refused(make_link):
    a = make_link("a", start=False)
    with pytest.raises(ValueError, match="reserved"):
        a.publish("say", seq="7")


def test_password_file_problems_are_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="cluster.password_file: cannot read"):
        ClusterLink(ClusterSettings(redis="redis://127.0.0.1:1/0", password_file=str(missing)))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ClusterLink(ClusterSettings(redis="redis://127.0.0.1:1/0", password_file=str(empty)))
    with pytest.raises(ValueError, match="cluster.redis"):
        ClusterLink(ClusterSettings(redis="http://127.0.0.1:1/0"))


def test_a_fifo_or_a_huge_file_as_password_file_is_refused_at_once(tmp_path):
    """A careless admin's password_file: a FIFO (open() would wait for a writer forever,
    and the node would never become ready) or a file far too large to be a password."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    began = time.monotonic()
    with pytest.raises(ValueError, match="is a FIFO, not a file"):
        ClusterLink(ClusterSettings(redis="redis://127.0.0.1:1/0", password_file=str(fifo)))
    assert time.monotonic() - began < 2
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (1 << 20))
    with pytest.raises(ValueError, match="too large"):
        ClusterLink(ClusterSettings(redis="redis://127.0.0.1:1/0", password_file=str(huge)))


def test_a_unix_socket_url_reaches_the_same_room(make_link, tmp_path):
    """cluster.redis: unix:///path?db=N, as for a Redis on the same host."""
    short = Path(tempfile.mkdtemp(prefix="chatd-redis-"))  # sun_path holds 107 bytes
    server = RedisServer(tmp_path / "unix-redis", unix_socket=short / "redis.sock")
    try:
        server.start()
        a = make_link("a", url=f"unix://{short}/redis.sock?db=3")
        b = make_link("b", url=f"redis://127.0.0.1:{server.port}/3")
        a.link.publish("say", n="over the unix socket")
        wait_for(lambda: said(b, "a") == ["over the unix socket"], what="the record over TCP")
    finally:
        server.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_a_password_file_is_used_and_a_wrong_password_said_once(redis_server, tmp_path):
    assert redis_server.command("CONFIG", "SET", "requirepass", "s3cret") == "+OK"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("wrong\n")
    links = [ClusterLink(ClusterSettings(redis=redis_server.url, node=node, password_file=str(f)))
             for node, f in (("a", good), ("b", bad))]
    a, b = (Inbox(link) for link in links)
    try:
        with capture_logs() as logs:
            for link in links:
                link.start()
            a.connected()
            b.disconnected()
            a.publish("say", n="1")
            wait_for(lambda: a.status()["published"] == 1, what="a: published")
        assert not b.status()["redis_connected"]
        assert "Auth" in b.of(LinkState)[0].reason or "auth" in b.of(LinkState)[0].reason
        assert [e["node"] for e in logs if e["event"] == "cluster_disconnected"] == ["b"]
    finally:
        for link in links:
            link.stop()


def test_the_outbox_is_bounded_and_sent_on_connect(make_link, monkeypatch):
    monkeypatch.setattr(link_module, "OUTBOX_MAX", 5)
    a = make_link("a", start=False)
    b = make_link("b")
    for i in range(8):
        a.publish("say", n=str(i))
    assert a.status()["outbox"] == 5 and a.status()["dropped_outbox"] == 3
    a.link.start()
    b.wait(lambda _: len(said(b, "a")) >= 5, "b: the queued records")
    assert said(b, "a") == numbers(5)
    wait_for(lambda: a.status()["outbox"] == 0, what="a: outbox empty")


# ---- names ----

def test_a_name_claimed_by_three_links_at_once_is_granted_to_exactly_one(make_link,
                                                                          redis_server):
    links = [make_link(n) for n in ("a", "b", "c")]
    names = [f"user{i}" for i in range(20)]
    barrier = threading.Barrier(3)

    def race(index: int) -> None:
        barrier.wait()
        for token, name in enumerate(names):
            links[index].claim(name, info(f"127.0.0.{index}:1"), token)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    owners = holders(redis_server)
    for token, name in enumerate(names):
        answers = {link.node: link.answer(token) for link in links}
        winners = [node for node, answer in answers.items() if answer.granted]
        assert len(winners) == 1, (name, answers)
        assert owners[name] == winners[0]
        for node, answer in answers.items():
            assert answer.name == name and not answer.provisional
            if node != winners[0]:
                assert answer.holder == winners[0]


def test_claim_again_release_and_take_from(make_link, redis_server):
    a, b, c = make_link("a"), make_link("b"), make_link("c")
    a.claim("ann", info(), 1)
    assert a.answer(1).granted
    a.claim("ann", info(), 2)  # its own name: granted again
    assert a.answer(2).granted
    b.claim("ann", info(), 3)
    assert b.answer(3) == ClaimAnswer(3, "ann", granted=False, holder="a")
    b.release("ann")  # not b's: nothing happens
    c.claim("ann", info(), 4, take_from="b")  # b does not hold it
    assert c.answer(4) == ClaimAnswer(4, "ann", granted=False, holder="a")
    c.claim("ann", info("127.0.0.9:9"), 5, take_from="a")  # adoption from a
    assert c.answer(5).granted
    assert holders(redis_server) == {"ann": "c"}
    raw = json.loads(redis_server.client().hget("chatd:{main}:names", "ann"))
    assert raw["addr"] == "127.0.0.9:9" and raw["since"] == "2026-01-01T00:00:00Z"
    c.claim("bob", info(), 6, take_from="a")  # free, but adoption needs the holder
    assert c.answer(6) == ClaimAnswer(6, "bob", granted=False, holder=None)
    c.release("ann")
    wait_for(lambda: holders(redis_server) == {}, what="ann released")
    b.claim("ann", info(), 7)
    assert b.answer(7).granted
    assert holders(redis_server) == {"ann": "b"}


def test_first_connect_brings_presence(make_link):
    a = make_link("a")
    a.claim("ann", NameInfo("127.0.0.1:5", "2026-01-01T00:00:00Z", {"client": "x"}), 1)
    assert a.answer(1).granted
    a.publish("say", n="before")
    wait_for(lambda: a.status()["published"] == 1, what="a: published")
    b = make_link("b")
    a.publish("say", n="after")
    b.wait(lambda _: said(b, "a") == ["after"], "b: the record after its snapshot")
    presence = b.of(Presence)
    assert len(presence) == 1
    assert presence[0].holders == {"ann": {"node": "a", "addr": "127.0.0.1:5",
                                           "since": "2026-01-01T00:00:00Z", "client": "x"}}
    assert b.values.index(presence[0]) < b.values.index(b.remotes()[0])


def test_stop_deletes_this_nodes_names_unless_kept(make_link, redis_server):
    a, b, c = make_link("a"), make_link("b"), make_link("c")
    a.claim("ann", info(), 1)
    b.claim("bob", info(), 2)
    assert a.answer(1).granted and b.answer(2).granted
    a.publish("say", n="last words")
    a.link.stop()
    assert holders(redis_server) == {"bob": "b"}
    assert "a" not in redis_server.client().hgetall("chatd:{main}:nodes")
    c.wait(lambda _: said(c, "a") == ["last words"], "c: a's last record, sent on stop")
    b.link.stop(keep_names=True)
    assert holders(redis_server) == {"bob": "b"}
    assert "b" in redis_server.client().hgetall("chatd:{main}:nodes")


# ---- node loss ----

def test_a_dead_nodes_names_are_reaped_once_with_one_node_gone(make_link, redis_server):
    a = make_link("a", node_timeout=1)
    b, c = make_link("b", node_timeout=1), make_link("c", node_timeout=1)
    a.claim("ann", info(), 1)
    a.claim("amy", info(), 2)
    b.claim("bob", info(), 3)
    assert a.answer(1).granted and a.answer(2).granted and b.answer(3).granted
    assert set(holders(redis_server)) == {"ann", "amy", "bob"}
    a.link._abandon()  # dies: no clean-up at all
    for inbox in (b, c):
        inbox.wait(lambda _, i=inbox: i.remotes("node_gone"), f"{inbox.node}: node_gone")
    # one more reaping round on both survivors: still exactly one record
    wait_for(lambda: b.status()["nodes"] == {"b": {"alive": True}, "c": {"alive": True}},
             what="b: a gone from the nodes")
    c.publish("say", n="barrier")
    b.wait(lambda _: said(b, "c") == ["barrier"], "b: barrier")
    for inbox in (b, c):
        gone = inbox.remotes("node_gone")
        assert len(gone) == 1
        assert gone[0].fields["gone"] == "a"
        assert sorted(json.loads(gone[0].fields["names"])) == ["amy", "ann"]
    assert holders(redis_server) == {"bob": "b"}
    c.claim("ann", info(), 4)
    assert c.answer(4).granted


# ---- Redis trouble ----

def test_a_stalled_redis_delays_nothing_and_loses_nothing(make_link, redis_server):
    a, b = make_link("a"), make_link("b")
    a.claim("ann", info(), 1)
    assert a.answer(1).granted
    with capture_logs() as logs:
        redis_server.pause()
        try:
            slowest = 0.0
            sent = 0
            end = time.monotonic() + 5
            while time.monotonic() < end:  # the stall's length, not a synchronisation
                began = time.perf_counter()
                a.publish("say", n=str(sent))
                a.claim(f"name{sent}", info(), 100 + sent)
                slowest = max(slowest, time.perf_counter() - began)
                sent += 1
                time.sleep(0.1)
            a.disconnected()  # noticed within the stall, and said so
        finally:
            redis_server.resume()
        assert slowest < 0.05
        a.connected(count=2)
        b.wait(lambda _: len(said(b, "a")) >= sent, "b: the records published meanwhile")
        a.publish("say", n="after")
        b.wait(lambda _: said(b, "a")[-1:] == ["after"], "b: the record after")
    assert said(b, "a") == [*numbers(sent), "after"]
    for token in range(100, 100 + sent):
        assert a.answer(token).granted
    assert not a.of(NameLost)
    assert holders(redis_server)[f"name{sent - 1}"] == "a"
    a_down = [e for e in logs if e["event"] == "cluster_disconnected" and e["node"] == "a"]
    assert len(a_down) == 1
    assert a.status()["reconnects"] >= 1 and a.status()["redis_connected"]


def test_a_redis_restarted_empty_is_repopulated(make_link, redis_server):
    a, b = make_link("a"), make_link("b")
    a.claim("ann", info(), 1)
    b.claim("bob", info(), 2)
    assert a.answer(1).granted and b.answer(2).granted
    a.publish("say", n="0")
    b.wait(lambda _: said(b, "a") == ["0"], "b: a's first record")
    redis_server.restart()
    for inbox in (a, b):
        inbox.connected(reset=True)
    wait_for(lambda: holders(redis_server) == {"ann": "a", "bob": "b"},
             what="names asserted again")
    assert set(redis_server.client().hgetall("chatd:{main}:nodes")) == {"a", "b"}
    for inbox, own in ((a, "ann"), (b, "bob")):
        reset = next(v for v in inbox.values if isinstance(v, LinkState) and v.reset)
        after = inbox.values[inbox.values.index(reset):]
        presence = next(v for v in after if isinstance(v, Presence))
        assert own in presence.holders  # taken after its own names were asserted again
    a.publish("say", n="1")
    b.wait(lambda _: said(b, "a")[-1:] == ["1"], "b: a's record after the restart")
    assert said(b, "a") == ["0", "1"]
    assert not a.of(NameLost) and not b.of(NameLost)


def test_nodes_whose_heartbeats_expired_in_one_redis_outage_do_not_reap_each_other(
        make_link, redis_server, proxy):
    """After Redis stalled longer than node_timeout every heartbeat has expired: the node
    that reconnects first must leave the others time to reconnect (b is 2 s later here)."""
    a = make_link("a", node_timeout=1)
    b = make_link("b", url=proxy.url, node_timeout=1)
    a.claim("ann", info(), 1)
    b.claim("bob", info(), 2)
    assert a.answer(1).granted and b.answer(2).granted
    redis_server.pause()
    try:
        proxy.stop()
        a.disconnected()
        b.disconnected()
        time.sleep(2)  # the stall: longer than node_timeout, every heartbeat expires
    finally:
        redis_server.resume()
    a.connected(count=2)
    time.sleep(2)  # b reconnects later: a window in which a reaps every second
    proxy.start()
    b.connected(count=2)
    a.publish("say", n="barrier")
    b.wait(lambda _: said(b, "a") == ["barrier"], "b: a record after both are back")
    assert holders(redis_server) == {"ann": "a", "bob": "b"}
    assert not a.remotes("node_gone") and not b.remotes("node_gone")


def test_stop_is_bounded_while_redis_stalls(make_link, redis_server):
    a = make_link("a")
    a.claim("ann", info(), 1)
    assert a.answer(1).granted
    redis_server.pause()
    try:
        a.publish("say", n="lost in the stall")
        began = time.monotonic()
        a.link.stop()
        assert time.monotonic() - began < 5
    finally:
        redis_server.resume()


def test_names_released_and_claimed_again_while_cut_off_end_as_last_asked(make_link, proxy,
                                                                          redis_server):
    a = make_link("a", url=proxy.url)
    a.claim("ann", info(), 1)
    a.claim("amy", info(), 2)
    assert a.answer(1).granted and a.answer(2).granted
    proxy.stop()
    a.disconnected()
    a.release("ann")
    a.claim("ann", info("127.0.0.1:7"), 3)  # logged in again meanwhile
    a.release("amy")
    assert a.answer(3).provisional
    proxy.start()
    a.connected(count=2)
    wait_for(lambda: holders(redis_server) == {"ann": "a"}, what="ann a's again, amy free")
    assert holders(redis_server) == {"ann": "a"}
    raw = json.loads(redis_server.client().hget("chatd:{main}:names", "ann"))
    assert raw["addr"] == "127.0.0.1:7"
    assert not a.of(NameLost)


def test_a_link_cut_off_catches_up_on_reconnect(make_link, proxy):
    a = make_link("a")
    b = make_link("b", url=proxy.url)
    with capture_logs() as logs:
        proxy.stop()
        b.disconnected()
        for i in range(40):
            a.publish("say", n=str(i))
            b.publish("say", n=str(i))  # queued while cut off
        wait_for(lambda: a.status()["published"] == 40, what="a: published")
        assert b.status()["outbox"] == 40
        proxy.start()
        b.connected(count=2)
        b.wait(lambda _: len(said(b, "a")) >= 40, "b: a's records")
        a.wait(lambda _: len(said(a, "b")) >= 40, "a: b's records")
    assert said(b, "a") == numbers(40)
    assert said(a, "b") == numbers(40)
    events = [(e["event"], e["node"]) for e in logs if e["event"].startswith("cluster_")]
    assert events.count(("cluster_disconnected", "b")) == 1
    assert events.count(("cluster_connected", "b")) == 1
    # b's thread counts its outbox down once Redis confirmed: maybe after a has read them
    wait_for(lambda: b.status()["outbox"] == 0, what="b: outbox confirmed")
    assert b.status()["reconnects"] == 1


def test_a_name_taken_while_cut_off_is_lost_on_reconnect(make_link, proxy, redis_server):
    a = make_link("a", url=proxy.url)
    b = make_link("b")
    proxy.stop()
    a.disconnected()
    began = time.perf_counter()
    a.claim("zed", info(), 1)
    a.claim("yan", info(), 2)
    assert time.perf_counter() - began < 0.05
    assert a.answer(1) == ClaimAnswer(1, "zed", granted=True, provisional=True)
    assert a.answer(2) == ClaimAnswer(2, "yan", granted=True, provisional=True)
    b.claim("zed", info(), 3)
    assert b.answer(3).granted
    proxy.start()
    a.wait(lambda values: any(isinstance(v, NameLost) for v in values), "a: NameLost")
    wait_for(lambda: holders(redis_server) == {"zed": "b", "yan": "a"}, what="yan asserted")
    assert a.of(NameLost) == [NameLost("zed", "b")]


def test_a_node_cut_off_longer_than_node_timeout_is_reaped_and_rejoins(make_link, proxy,
                                                                        redis_server):
    a = make_link("a", url=proxy.url, node_timeout=1)
    b = make_link("b", node_timeout=1)
    a.claim("ann", info(), 1)
    assert a.answer(1).granted
    proxy.stop()
    b.wait(lambda _: b.remotes("node_gone"), "b: node_gone for a")
    assert json.loads(b.remotes("node_gone")[0].fields["names"]) == ["ann"]
    assert holders(redis_server) == {}
    proxy.start()
    a.wait(lambda _: a.remotes("node_gone"), "a: the node_gone naming itself")
    assert a.remotes("node_gone")[0].fields["gone"] == "a"
    wait_for(lambda: holders(redis_server) == {"ann": "a"}, what="ann asserted again")
    assert "a" in redis_server.client().hgetall("chatd:{main}:nodes")
    assert not a.of(NameLost)


def test_entries_trimmed_while_cut_off_are_counted_as_a_gap(make_link, proxy, monkeypatch):
    monkeypatch.setattr(link_module, "STREAM_MAXLEN", 10)
    a = make_link("a")
    b = make_link("b", url=proxy.url)
    a.publish("say", n="first")
    b.wait(lambda _: said(b, "a") == ["first"], "b: the first record")
    proxy.stop()
    b.disconnected()
    for i in range(500):
        a.publish("say", n=str(i))
    wait_for(lambda: a.status()["published"] == 501, what="a: published")
    proxy.start()
    b.wait(lambda _: said(b, "a")[-1:] == ["499"], "b: the newest record")
    assert b.status()["gaps"] == 1
    assert len(said(b, "a")) < 501


# ---- handover ----

def test_resume_from_a_position_misses_and_doubles_nothing(make_link):
    a, b = make_link("a"), make_link("b")
    for i in range(10):
        a.publish("say", n=str(i))
    b.wait(lambda _: len(said(b, "a")) >= 10, "b: the first records")
    position = b.position()
    assert position["seen"]["a"][1] == 10
    b.link.stop(keep_names=True)
    for i in range(10, 20):
        a.publish("say", n=str(i))
    successor = make_link("b", start=False)
    successor.link.resume_from(json.loads(json.dumps(position)))
    successor.link.start()
    successor.wait(lambda _: len(said(successor, "a")) >= 10, "successor: the rest")
    a.publish("say", n="barrier")
    successor.wait(lambda _: said(successor, "a")[-1:] == ["barrier"], "successor: barrier")
    assert said(successor, "a") == [*numbers(10, 10), "barrier"]
    with pytest.raises(ValueError, match="position"):
        make_link("c", start=False).link.resume_from({"seen": {}})
