"""Hostile input against a live daemon: junk floods, spoofing, limits, vanished clients."""

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers import UdpUser, wait_for


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def chatctl_json(server, *args):
    result = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(server.config),
                             *args, "--json"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.7:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif data:
            del data[rng.randrange(len(data))]
    return bytes(data)


def junk(rng: random.Random) -> bytes:
    seeds = [b"L alice", b"C alice hi there", b"Q bob", b"P carol", b"C admin x",
             "L 管理员".encode(), b"L " + b"n" * 40, b"C bob " + b"y" * 2000]
    roll = rng.random()
    if roll < 0.3:
        return os.urandom(rng.randrange(0, 1500))
    if roll < 0.8:
        return mutate(rng, rng.choice(seeds))
    return rng.choice(seeds)


@pytest.mark.timeout(120)
def test_live_fuzz_keeps_serving_and_delivers_every_real_line(make_chatd):
    server = make_chatd({"log": {"level": "info"}})
    rng = random.Random(1234)
    alice, bob = UdpUser(server.addr), UdpUser(server.addr)
    attackers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    try:
        alice.join("alice")
        bob.join("bob")
        assert alice.recv_text() == "\nbob joined the room"
        for attacker in attackers:
            attacker.bind(("127.0.0.1", 0))
        rss_before = rss_kib(server.proc.pid)
        sent_junk = 0
        for round_no in range(60):
            for _ in range(500):
                rng.choice(attackers).sendto(junk(rng), server.addr)
                sent_junk += 1
            speaker, listener = (alice, bob) if round_no % 2 else (bob, alice)
            speaker.say(f"real line {round_no}")
            while True:  # junk sessions may join meanwhile; the real line must come
                text = listener.recv_text(timeout=10)
                if text == f"\n{speaker.name} says: real line {round_no}":
                    break
                assert "real line" not in text, text
        assert sent_junk == 30_000
        assert alice.ping() == b"PONG" and bob.ping() == b"PONG"
        status = chatctl_json(server, "status")
        assert status["counters"]["datagrams_in"] > 10_000
        assert sum(status["drops"].values()) > 5_000
        assert rss_kib(server.proc.pid) - rss_before < 20 * 1024
        assert server.log_path.stat().st_size < 512 * 1024
    finally:
        for sock in [*attackers]:
            sock.close()
        alice.close()
        bob.close()


def test_sessions_per_ip_limit(make_chatd):
    server = make_chatd({"room": {"max_sessions_per_ip": 2}})
    users = [UdpUser(server.addr) for _ in range(3)]
    try:
        users[0].join("one")
        users[1].join("two")
        assert users[2].login("three") == b"\ntoo many sessions from your address (at most 2)"
        users[0].quit()
        assert users[2].login("three") == b"OK"
    finally:
        for user in users:
            user.close()


def test_vanished_client_is_dropped_after_unreachable_reports(make_chatd):
    server = make_chatd({"room": {"unreachable_after": 1, "unreachable_grace": 1}})
    alice, ghost = UdpUser(server.addr), UdpUser(server.addr)
    try:
        alice.join("alice")
        ghost.join("ghost")
        alice.recv()
        ghost.close()  # gone without a Q: its port now answers with ICMP errors

        def ghost_left():
            alice.say("anyone there?")
            for text in alice.drain(timeout=0.2):
                if text == b"\nghost left the room (unreachable)":
                    return True
            return False

        wait_for(ghost_left, timeout=20, what="the unreachable session to be dropped")
        status = chatctl_json(server, "status")
        assert status["users"] == 1
        assert status["counters"]["unreachable_reports"] >= 1
        assert status["send_errors"].get("ECONNREFUSED", 0) >= 1
    finally:
        alice.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forged_port_unreachable(sender: tuple[str, int], receiver: tuple[str, int]) -> bytes:
    """An ICMP "port unreachable" claiming that a UDP datagram from ``sender`` to
    ``receiver`` bounced: what any host on the path (or anyone at all) can send."""
    udp = struct.pack("!HHHH", sender[1], receiver[1], 8 + 16, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 16, 0, 0x4000, 64, socket.IPPROTO_UDP,
                     0, socket.inet_aton(sender[0]), socket.inet_aton(receiver[0]))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    body = ip + udp
    unreachable, port = 3, 3
    icmp = struct.pack("!BBHI", unreachable, port, 0, 0) + body
    return icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]


@pytest.mark.timeout(60)
def test_forged_icmp_errors_cannot_remove_someone_who_talks(make_chatd):
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        pytest.skip("forging ICMP errors needs a raw socket: run as root (or with CAP_NET_RAW)")
    server = make_chatd()  # the defaults: unreachable_after 3, unreachable_grace 60
    alice, bob = UdpUser(server.addr), UdpUser(server.addr)
    try:
        alice.join("alice")
        bob.join("bob")
        assert alice.recv_text() == "\nbob joined the room"
        forged = forged_port_unreachable(server.addr, alice.addr)
        for i in range(5):  # 20 forged errors in bursts, while alice talks every 0.5 s
            for _ in range(4):
                raw.sendto(forged, ("127.0.0.1", 0))
            alice.say(f"line {i}")
            assert bob.recv_text() == f"\nalice says: line {i}"
            time.sleep(0.5)  # the pace of her talk, part of the scene
        assert alice.ping() == b"PONG" and bob.ping() == b"PONG"
        assert [t for t in alice.drain() + bob.drain() if b"left the room" in t] == []
        status = chatctl_json(server, "status")
        assert status["users"] == 2
        assert status["drops"]["icmp_ignored"] == status["counters"]["unreachable_reports"] > 0
    finally:
        raw.close()
        alice.close()
        bob.close()


def test_status_reports_kernel_drops(chatd):
    status = chatctl_json(chatd, "status")
    assert isinstance(status["kernel_drops"], int)
