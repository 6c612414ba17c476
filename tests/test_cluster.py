"""One room across several real ``chatd run`` nodes on a real redis-server (issue 15).

Every node here is a real process started through ``make_chatd`` with a ``cluster:``
section; every client a real UDP socket. Redis is the ``redis_server`` fixture's own
process, and the failures are done to it the way the world does them: SIGSTOP, SIGKILL
and a restart empty, a TCP proxy between a node and Redis that is stopped and started
(a node cut off). Each node and each proxy is stopped by a finalizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import yaml
from helpers import ChatdProcess, UdpUser, free_udp_port, wait_for
from redisproc import REDIS_SERVER, TcpProxy, free_tcp_port

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (scripts/test-deps.sh installs it)")

#: generous bounds: a slow, shared machine; every wait below is a bounded poll
SLOW = 20.0


# -- helpers ----------------------------------------------------------------------------


def chatctl(server: ChatdProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(server.config),
                           *args], capture_output=True, text=True, timeout=30)


def chatctl_json(server: ChatdProcess, *args: str):
    result = chatctl(server, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def cluster_config(url: str, node: str, node_timeout: float = 10, **extra) -> dict:
    return {"cluster": {"redis": url, "node": node, "node_timeout": node_timeout},
            "plugins": {"ratelimit": False}, **extra}


def who(server: ChatdProcess) -> dict[str, str]:
    """name -> node, as ``chatctl who`` on ``server`` says."""
    return {u["name"]: u.get("node") for u in chatctl_json(server, "who")}


def wait_who(server: ChatdProcess, expected: dict[str, str], what: str = "") -> None:
    wait_for(lambda: who(server) == expected, timeout=SLOW, interval=0.2,
             what=what or f"chatctl who on {server.port} to be {expected}")


def expect_line(user: UdpUser, wanted: str, timeout: float = SLOW) -> list[str]:
    """Read until ``wanted`` arrives; returns what came before it (bounded)."""
    before: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{user.name} never got {wanted!r}; got {before}")
        try:
            text = user.recv_text(timeout=remaining)
        except TimeoutError:
            continue
        if text == wanted:
            return before
        before.append(text)


def received(user: UdpUser, timeout: float) -> list[str]:
    """Everything that arrives within ``timeout`` of silence."""
    return [data.decode() for data in user.drain(timeout)]


@pytest.fixture
def proxies() -> Iterator[Callable[[int], TcpProxy]]:
    made: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        proxy = TcpProxy(port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., UdpUser]]:
    made: list[UdpUser] = []

    def make(server: ChatdProcess, name: str | None = None) -> UdpUser:
        user = UdpUser(server.addr, name)
        made.append(user)
        return user

    yield make
    for user in made:
        user.close()


@pytest.fixture
def nodes(make_chatd, redis_server) -> Callable[..., list[ChatdProcess]]:
    """``nodes(3)``: that many nodes n1, n2, ... on the test's Redis."""

    def make(count: int, node_timeout: float = 10, url: str | None = None,
             **extra) -> list[ChatdProcess]:
        return [make_chatd(cluster_config(url or redis_server.url, f"n{i + 1}", node_timeout,
                                          **extra)) for i in range(count)]

    return make


def node_of(server: ChatdProcess) -> str:
    return yaml.safe_load(server.config.read_text())["cluster"]["node"]


def join_all(clients, servers: list[ChatdProcess], names: list[str]) -> list[UdpUser]:
    """Log each name in on its server (names[i] on servers[i]) and wait until every node
    knows every user: afterwards, every join notice has been sent."""
    users = [clients(server).join(name) for server, name in zip(servers, names, strict=True)]
    expected = {name: node_of(server) for server, name in zip(servers, names, strict=True)}
    for server in set(servers):
        wait_who(server, expected)
    for user in users:
        user.drain(0.2)
    return users


# -- the tests --------------------------------------------------------------------------


def test_three_nodes_one_room(nodes, clients):
    n1, n2, n3 = nodes(3)
    alice, bob, carol = join_all(clients, [n1, n2, n3], ["alice", "bob", "carol"])
    alice.say("hello from n1")
    for user in (bob, carol):
        expect_line(user, "\nalice says: hello from n1")
    carol.say("/me waves")
    for user in (alice, bob):
        expect_line(user, "\n* carol waves")
    bob.say("/msg alice psst")
    expect_line(alice, "\nbob says to you: psst")
    bob.say("/who")
    listing = bob.recv_text(timeout=SLOW)
    assert listing.startswith("\nin the room (3):"), listing
    for name in ("alice", "bob", "carol"):
        assert name in listing
    # a name held on another node is refused here, as are names too like it
    assert clients(n3).login("ALICE") == b"\nthe name ALICE is already taken"
    assert clients(n2).login("a1ice").startswith(b"\nthe name a1ice looks too much like")
    carol.quit()
    for user in (alice, bob):
        expect_line(user, "\ncarol left the room")
    wait_who(n1, {"alice": "n1", "bob": "n2"})
    assert clients(n1).login("carol") == b"OK"  # the name is free again


def test_name_race_on_three_nodes_has_exactly_one_winner(nodes, clients):
    servers = nodes(3)
    racers = [clients(server, "alice") for server in servers for _ in range(6)]
    for racer in racers:  # all at once: none waits for an answer before the next asks
        racer.send("L alice")
    answers = [racer.recv(timeout=SLOW) for racer in racers]
    assert answers.count(b"OK") == 1, answers
    assert set(answers) == {b"OK", b"\nthe name alice is already taken"}, answers
    winner = servers[[i // 6 for i, a in enumerate(answers) if a == b"OK"][0]]
    for server in servers:
        wait_who(server, {"alice": f"n{servers.index(winner) + 1}"})


def test_admin_say_who_kick_across_nodes(nodes, clients):
    n1, n2, n3 = nodes(3)
    alice, bob, carol = join_all(clients, [n1, n2, n3], ["alice", "bob", "carol"])
    result = chatctl(n2, "say", "meeting", "at", "noon")
    assert result.returncode == 0, result.stderr
    assert "said to 3 users" in result.stdout
    for user in (alice, bob, carol):
        expect_line(user, "\nadmin says: meeting at noon")
    listing = chatctl(n1, "who")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[-1] == "NODE", header
    assert sorted((row.split()[0], row.split()[-1]) for row in rows) == [
        ("alice", "n1"), ("bob", "n2"), ("carol", "n3")]
    result = chatctl(n1, "kick", "carol", "spamming")  # carol is on n3
    assert result.returncode == 0, result.stderr
    expect_line(carol, "\nyou were removed from the room: spamming")
    expect_line(carol, "EXIT")
    for user in (alice, bob):
        expect_line(user, "\ncarol was removed from the room: spamming")
    for server in (n1, n2, n3):
        wait_who(server, {"alice": "n1", "bob": "n2"})
    status = chatctl_json(n3, "status")["cluster"]
    assert status["node"] == "n3" and status["redis_connected"] is True
    assert status["users_total"] == 2 and status["users_local"] == 0
    assert status["nodes_alive"] == 3
    human = chatctl(n3, "status").stdout
    assert "cluster:" in human and "3 nodes alive" in human, human
    assert chatctl(n2, "kick", "nobody").returncode == 1


def test_a_killed_node_s_users_leave_once_and_free_their_names(nodes, clients):
    n1, n2 = nodes(2, node_timeout=2)
    alice, bob = join_all(clients, [n1, n2], ["alice", "bob"])
    n2.proc.kill()
    n2.proc.wait(10)
    expect_line(alice, "\nbob left the room (timed out)", timeout=2 + SLOW)
    wait_who(n1, {"alice": "n1"})
    assert clients(n1).login("bob") == b"OK"  # the dead node's name is free
    assert "\nbob left the room (timed out)" not in received(alice, 1.0)


def test_a_stalled_redis_delays_no_local_line_and_loses_nothing(nodes, clients, redis_server):
    n1, n2 = nodes(2, node_timeout=30)
    alice, bob, carol = join_all(clients, [n1, n1, n2], ["alice", "bob", "carol"])
    redis_server.pause()
    try:
        stalled = time.monotonic()
        for i in range(3):
            alice.say(f"during the stall {i}")
            carol.say(f"carol during the stall {i}")
        for i in range(3):  # on alice's own node: at once, while Redis is still stopped
            expect_line(bob, f"\nalice says: during the stall {i}", timeout=4)
        assert time.monotonic() - stalled < 5, "local lines waited for Redis"
        time.sleep(max(0.0, 5 - (time.monotonic() - stalled)))  # the stall lasts 5 s
    finally:
        redis_server.resume()
    for i in range(3):  # every line, in order, exactly once
        expect_line(carol, f"\nalice says: during the stall {i}")
        expect_line(alice, f"\ncarol says: carol during the stall {i}")
        expect_line(bob, f"\ncarol says: carol during the stall {i}")
    alice.ping()
    assert not any("during the stall" in line for line in received(carol, 1.0))


def test_redis_restarted_empty_is_filled_again(nodes, clients, redis_server):
    n1, n2 = nodes(2, node_timeout=30)
    alice, bob = join_all(clients, [n1, n2], ["alice", "bob"])
    redis_server.restart()
    names = wait_for(lambda: (lambda held: held if set(held) == {"alice", "bob"} else None)(
        redis_server.client().hgetall("chatd:{main}:names")), timeout=SLOW, interval=0.2,
        what="the names back in the new Redis")
    assert json.loads(names["alice"])["node"] == "n1"
    assert json.loads(names["bob"])["node"] == "n2"
    assert clients(n1).login("bob") == b"\nthe name bob is already taken"
    wait_for(lambda: chatctl_json(n1, "status")["cluster"]["redis_connected"], timeout=SLOW,
             interval=0.2, what="n1 connected again")
    deadline = time.monotonic() + SLOW  # lines flow again, both ways
    while True:
        alice.say("after the restart")
        if "\nalice says: after the restart" in received(bob, 1.0):
            break
        assert time.monotonic() < deadline, "no line from n1 reached n2 after the restart"
    bob.say("me too")
    expect_line(alice, "\nbob says: me too")
    dave = clients(n2).join("dave")
    expect_line(alice, "\ndave joined the room")
    assert dave.name == "dave"


def test_a_node_cut_off_for_10s_catches_up_both_ways(nodes, clients, redis_server, proxies,
                                                     make_chatd):
    proxy = proxies(redis_server.port)
    n1 = make_chatd(cluster_config(redis_server.url, "n1", node_timeout=30))
    n2 = make_chatd(cluster_config(proxy.url, "n2", node_timeout=30))
    alice, bob, carol = join_all(clients, [n1, n2, n2], ["alice", "bob", "carol"])
    proxy.stop()
    wait_for(lambda: not chatctl_json(n2, "status")["cluster"]["redis_connected"],
             timeout=SLOW, interval=0.2, what="n2 to notice it is cut off")
    cut = time.monotonic()
    # one name taken on both sides meanwhile: n2 grants it provisionally, n1 through Redis
    zed_n2 = clients(n2).join("zed")
    zed_n1 = clients(n1).join("zed")
    for i in range(5):
        alice.say(f"n1 line {i}")
        bob.say(f"n2 line {i}")
        expect_line(carol, f"\nbob says: n2 line {i}")  # n2's own users are served meanwhile
        time.sleep(1.5)
    time.sleep(max(0.0, 10 - (time.monotonic() - cut)))
    assert not any("n1 line" in line for line in received(bob, 0.2))
    proxy.start()
    for i in range(5):  # each line once, in the order spoken
        expect_line(bob, f"\nalice says: n1 line {i}")
        expect_line(alice, f"\nbob says: n2 line {i}")
    alice.ping()
    bob.ping()
    assert not any("line" in line for line in received(bob, 1.0) + received(alice, 0.2))
    events = [e["event"] for e in n2.log_events()]
    assert events.count("cluster_disconnected") == 1, "logged once, not once per line"
    # the claim that reached Redis first won: n2's zed is told and asked to log in again
    expect_line(zed_n2, "\nthe name zed was taken on another server while this one was cut "
                        "off: log in again")
    expect_line(zed_n2, "EXIT")
    for server in (n1, n2):
        wait_who(server, {"alice": "n1", "bob": "n2", "carol": "n2", "zed": "n1"})
    zed_n1.ping()


def test_reuseport_nodes_share_a_port_and_adopt_a_restarted_node_s_users(
        make_chatd, redis_server, clients):
    port = free_udp_port()
    config = {"listen": {"reuseport": True}}
    n1 = make_chatd(cluster_config(redis_server.url, "n1", node_timeout=10, **config),
                    port=port)
    n2 = make_chatd(cluster_config(redis_server.url, "n2", node_timeout=10, **config),
                    port=port)
    users = [clients(n1).join(f"user{i}") for i in range(12)]
    placed = wait_for(lambda: (lambda w: w if len(w) == 12 else None)(who(n1)), timeout=SLOW,
                      interval=0.2, what="every user known on n1")
    on = {node: [u for u in users if placed[u.name] == node] for node in ("n1", "n2")}
    victim, survivor = (n1, n2) if len(on["n1"]) >= len(on["n2"]) else (n2, n1)
    moved = on["n1"] if victim is n1 else on["n2"]
    stay = on["n2"] if victim is n1 else on["n1"]
    victim.proc.kill()
    victim.proc.wait(10)
    for user in moved:  # the kernel gives their datagrams to the survivor: it adopts them
        assert user.ping() == b"PONG"
    survivor_node = "n2" if victim is n1 else "n1"
    wait_who(survivor, {u.name: survivor_node for u in users})
    moved[0].say("still here")
    for user in stay + moved[1:]:
        expect_line(user, f"\n{moved[0].name} says: still here")
    for user in users:  # nobody was told anyone left or joined
        assert not any("left the room" in t or "joined" in t for t in received(user, 0.3))
    victim.start()  # the same node again; the kernel may hand users back to it
    for user in users:
        assert user.ping() == b"PONG"
    final = wait_for(lambda: (lambda w: w if len(w) == 12 else None)(who(survivor)),
                     timeout=SLOW, interval=0.2, what="12 users after the restart")
    assert set(final) == {u.name for u in users}
    users[-1].say("after the restart")
    for user in users[:-1]:
        expect_line(user, f"\n{users[-1].name} says: after the restart")


def imported_modules(make_chatd, tmp_path, overrides: dict | None, name: str) -> set[str]:
    """The modules a real ``chatd run`` imported by the time it served a login (Python's
    own import log: ``PYTHONPROFILEIMPORTTIME``, its stderr sent to a file)."""
    trace = tmp_path / f"{name}.imports"
    server = make_chatd(overrides, env={"PYTHONPROFILEIMPORTTIME": "1"},
                        wrapper=["sh", "-c", f'exec "$@" 2>"{trace}"', "sh"])
    user = UdpUser(server.addr).join("alice")
    user.say("hello")
    user.ping()
    user.close()
    server.stop()
    return {line.rsplit("|", 1)[-1].strip() for line in trace.read_text().splitlines()
            if line.startswith("import time:")}


def test_a_single_node_loads_no_cluster_code(make_chatd, redis_server, tmp_path):
    """Without ``cluster:`` neither chatd.cluster nor Redis's client is imported; with it,
    both are (the same check, on a clustered node, proves the check sees them)."""
    single = imported_modules(make_chatd, tmp_path, None, "single")
    assert "chatd.server" in single
    assert not {m for m in single if m.startswith(("chatd.cluster", "chatd.replica", "redis"))}
    clustered = imported_modules(make_chatd, tmp_path,
                                 cluster_config(redis_server.url, "n1"), "clustered")
    assert {"chatd.cluster.bridge", "redis"} <= clustered


def test_a_node_serves_its_own_users_while_redis_is_unreachable(make_chatd, clients):
    closed = free_tcp_port()  # nothing listens there
    n1 = make_chatd(cluster_config(f"redis://127.0.0.1:{closed}/0", "n1"))
    alice, bob = clients(n1).join("alice"), clients(n1).join("bob")
    expect_line(alice, "\nbob joined the room")
    alice.say("anyone?")
    expect_line(bob, "\nalice says: anyone?")
    status = chatctl_json(n1, "status")["cluster"]
    assert status["redis_connected"] is False
    assert "NOT CONNECTED" in chatctl(n1, "status").stdout


def test_history_replays_lines_said_on_every_node(nodes, clients):
    n1, n2 = nodes(2, plugins={"ratelimit": False, "history": {"size": 3}})
    alice, bob = join_all(clients, [n1, n2], ["alice", "bob"])
    alice.say("from n1")
    expect_line(bob, "\nalice says: from n1")
    bob.say("from n2")
    expect_line(alice, "\nbob says: from n2")
    carol = clients(n1)
    assert carol.login("carol", verify=True) == b"OK"
    assert [carol.recv_text(timeout=SLOW) for _ in range(2)] == [
        "\nalice says: from n1", "\nbob says: from n2"]


def test_records_no_node_would_write_cannot_stop_or_fool_a_node(nodes, clients, redis_server):
    """Whoever can write into the room's stream (a buggy node of another version, a
    stranger with Redis access) sends records with fields missing, JSON that is not JSON
    or nested 100,000 deep, a megabyte of text, control characters, names no login would
    allow: the node serves on, its users see no forged line, and the log stays bounded."""
    (n1,) = nodes(1)
    alice = clients(n1).join("alice")
    stream = "chatd:{main}:stream"
    junk = [
        {"kind": "say"},  # no name, no text
        {"kind": "say", "name": "mallory"},  # no text
        {"kind": "node_gone", "gone": "n9", "names": "not json"},
        {"kind": "broadcast", "text": "x", "exclude": "[" * 100_000},
        {"kind": "join", "name": "admin says:\nhi", "addr": "1.2.3.4:5"},
        {"kind": "say", "name": "evil\u202e", "text": "reversed"},
        {"kind": "say", "name": "m" * 300, "text": "too long a name"},
        {"kind": "no such kind"},
    ]
    client = redis_server.client()
    for seq, fields in enumerate(junk * 50, start=1):
        client.xadd(stream, {"node": "n9", "inc": "x", "seq": str(seq), **fields})
    client.xadd(stream, {"node": "n9", "inc": "x", "seq": "1000", "kind": "say",
                         "name": "mallory", "text": "a bell \x07 and\nnewline " + "y" * 1_000_000})
    client.xadd(stream, {"node": "n9", "inc": "x", "seq": "1001", "kind": "say",
                         "name": "mallory", "text": "still heard"})
    seen = []
    while "still heard" not in "".join(seen):
        seen.append(alice.recv_text(timeout=SLOW))
    assert alice.ping() == b"PONG"
    long_line = next(t for t in seen if t.startswith("\nmallory says: a bell"))
    assert "\\x07" in long_line and "\\x0a" in long_line and len(long_line.encode()) <= 1024
    assert not [t for t in seen if "admin says" in t or "evil" in t or "reversed" in t
                or "too long a name" in t]
    refused = [e for e in n1.log_events() if e["event"].startswith("cluster_record_")]
    assert refused and len(refused) < 100  # 400 bad records: logged at a bounded rate
