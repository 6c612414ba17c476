"""One room across several real ``chatd run`` nodes on a real redis-server (issue 15).

Every node here is a real process started through ``make_chatd`` with a ``cluster:``
section; every client a real UDP socket. Redis is the ``redis_server`` fixture's own
process, and the failures are done to it the way the world does them: SIGSTOP, SIGKILL
and a restart empty, a TCP proxy between a node and Redis that is stopped and started
(a node cut off). Each node and each proxy is stopped by a finalizer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import ChatdProcess, UdpUser, wait_for
from redisproc import free_tcp_port, needs_redis

pytestmark = needs_redis

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


class TcpProxy:
    """A TCP proxy in a thread: ``stop`` cuts every connection and refuses new ones (the
    node is cut off from Redis), ``start`` serves again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_tcp_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


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


def join_all(clients, servers: list[ChatdProcess], names: list[str]) -> list[UdpUser]:
    """Log each name in on its server (names[i] on servers[i]) and wait until every node
    knows every user: afterwards, every join notice has been sent."""
    users = [clients(server).join(name) for server, name in zip(servers, names, strict=True)]
    expected = {name: f"n{servers.index(server) + 1}"
                for server, name in zip(servers, names, strict=True)}
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
