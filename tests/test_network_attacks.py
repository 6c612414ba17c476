"""Attacks from the network, reproduced against a real chatd: forged sources, squatters, floods.

Each test is the attack as an outsider runs it; loopback (127.0.0.0/8) plays
the internet. Forging a source address needs a raw socket, so those tests
need root and skip otherwise.
"""

from __future__ import annotations

import socket

from helpers import UdpUser, read_log_events, wait_for
from spoof import Forger, needs_raw


def _victim() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.77", 0))
    sock.setblocking(False)
    return sock


def _bytes_waiting(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@needs_raw
def test_forged_logins_reflect_nothing_when_verification_is_required(make_chatd):
    """Before: a forged ``L x`` got the victim ``OK`` and then every line of the room."""
    server = make_chatd({"room": {"require_verified": True}})
    alice = UdpUser(server.addr).join("alice", verify=True)
    bob = UdpUser(server.addr).join("bob", verify=True)
    alice.drain()
    victim, forger = _victim(), Forger()
    try:
        sent = 0
        for name in ("x", "mallory", "a_name_long_enough_to_earn_a_refusal"):
            datagram = f"L {name}".encode()
            forger.udp(victim.getsockname(), server.addr, datagram)
            sent += len(datagram)
        for i in range(20):
            alice.say(f"line {i}")
        assert [bob.recv_text() for _ in range(20)][-1] == "\nalice says: line 19"
        alice.ping()  # every forged datagram was handled before this answer
        received = _bytes_waiting(victim)
        assert sum(map(len, received)) <= 3 * sent
        assert not any(b"says" in data or data == b"OK" for data in received)
        assert b"\nverify your address first" in received
    finally:
        for closable in (alice, bob, victim, forger):
            closable.close()


def test_an_unverified_session_gets_one_datagram_per_request(make_chatd):
    """Before: 8 bytes of ``/who`` came back as a datagram per 1024 bytes of names."""
    server = make_chatd({"room": {"max_datagram": 128}})
    crowd = [UdpUser(server.addr).join(f"member{i:02d}", verify=True) for i in range(40)]
    mallory = UdpUser(server.addr).join("mallory")
    try:
        for _ in range(5):
            mallory.say("/who")
        mallory.say("/help")
        answers = _until_pong(mallory)
        assert len(answers) == 6
        assert all(len(a) <= 128 for a in answers)
        assert all("…and " in a.decode() for a in answers[:5])
        member = crowd[0]
        member.drain()
        member.say("/who")
        assert len(_until_pong(member)) > 1  # a verified client gets the whole list
    finally:
        for user in (*crowd, mallory):
            user.close()


def test_a_room_filled_by_silent_logins_lets_a_real_user_in(make_chatd):
    """Before: 20 logins from each of 10 addresses kept the room full for good."""
    server = make_chatd({"room": {"max_users": 200, "evict_idle_after": 1,
                                  "announce_limit": 1}})
    squatters = []
    try:
        for i in range(200):
            squatter = UdpUser(server.addr)
            squatter.sock.close()
            squatter.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            squatter.sock.bind((f"127.0.4.{i % 10 + 1}", 0))
            squatters.append(squatter.join(f"squat{i}"))
        real = UdpUser(server.addr)
        squatters.append(real)
        assert real.login("real").startswith(b"\nthe room is full")
        wait_for(lambda: real.login("real") == b"OK", timeout=15, interval=0.3,
                 what="a login that evicts a silent squatter")
        evicted = [s for s in squatters[:200] if s.drain(0.01)]
        assert len(evicted) == 1
        real.ping()
    finally:
        for user in squatters:
            user.close()


def test_a_flood_of_joins_and_leaves_cannot_grow_the_log(make_chatd):
    """Before: every forged L and Q pair wrote two lines (2.5 GB an hour at line rate)."""
    server = make_chatd({"log": {"level": "info"}, "room": {"announce_limit": 1}})
    witness = UdpUser(server.addr).join("witness")
    before = server.log_path.stat().st_size
    try:
        for batch in range(20):
            for i in range(batch * 500, batch * 500 + 500):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((f"127.5.{i // 250}.{i % 250 + 1}", 0))
                    sock.sendto(f"L u{i}".encode(), server.addr)
                    sock.sendto(f"Q u{i}".encode(), server.addr)
            witness.ping()  # the batch was handled: the kernel's buffer never overflows
        assert [u["name"] for u in _users(server)] == ["witness"]
    finally:
        witness.close()
    grown = server.log_path.stat().st_size - before
    assert grown < 256 * 1024, grown
    events = read_log_events(server.log_path)
    assert any(e.get("event") in ("user_joined", "user_left") and e.get("suppressed_since_last")
               for e in events)


def _until_pong(user: UdpUser) -> list[bytes]:
    """Every datagram up to the answer to a ``P`` sent now: what the earlier requests got."""
    user.send(f"P {user.name}")
    out = []
    while (data := user.recv()) != b"PONG":
        out.append(data)
    return out


def _users(server) -> list:
    from chatd.control.client import request

    return request(str(server.runtime_dir / "control.sock"), "who")["result"]
