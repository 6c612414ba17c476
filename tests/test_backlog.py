"""A full send buffer loses nothing: deliveries wait, in order, until the socket drains.

UDP on loopback never fills a send buffer, so these tests give the server an
AF_UNIX datagram socket, which blocks when its receiver's queue is full, as a
NIC's queue would under a large fan-out.
"""

import selectors
import socket

from chatd import config
from chatd.room import Delivery
from chatd.server import Server


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_a_burst_beyond_the_send_buffer_arrives_whole_and_in_order(tmp_path):
    settings = config.from_mapping({"runtime_dir": str(tmp_path)})
    server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_sock.bind(str(tmp_path / "server"))
    server_sock.setblocking(False)
    receivers = []
    for name in ("a", "b"):
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(tmp_path / name))
        receiver.setblocking(False)
        receivers.append(receiver)
    server = Server(settings, server_sock)
    try:
        lines = [f"line {i}".encode() for i in range(400)]
        everyone = [str(tmp_path / "a"), str(tmp_path / "b")] * 10  # a fan-out of 20
        server.deliver([Delivery(line, everyone) for line in lines])
        assert server.status()["backlog"] > 0
        assert server.send_errors["EAGAIN"] >= 1
        got: dict[int, list[bytes]] = {0: [], 1: []}
        for _ in range(100_000):
            for i, receiver in enumerate(receivers):
                got[i] += drain(receiver)
            if not server.status()["backlog"]:
                break
            server._on_socket(selectors.EVENT_WRITE)  # as the loop does once writable
        for i, receiver in enumerate(receivers):
            got[i] += drain(receiver)
        expected = [line for line in lines for _ in range(10)]
        assert got[0] == expected and got[1] == expected
        assert server.counters["datagrams_out"] == 400 * 20
        assert "backlog_full" not in server.send_errors
    finally:
        server.selector.close()
        for sock in (server_sock, *receivers):
            sock.close()


def test_what_waits_at_shutdown_gets_a_bounded_chance(tmp_path):
    settings = config.from_mapping({"runtime_dir": str(tmp_path)})
    server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_sock.bind(str(tmp_path / "server"))
    server_sock.setblocking(False)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(tmp_path / "stuck"))  # never read: its queue stays full
    server = Server(settings, server_sock)
    try:
        server.deliver([Delivery(f"{i}".encode(), [str(tmp_path / "stuck")])
                        for i in range(100)])
        waiting = server.status()["backlog"]
        assert waiting > 0
        server._drain_backlog(0.2)
        assert server.send_errors["lost_at_shutdown"] == waiting
    finally:
        server.selector.close()
        for sock in (server_sock, stuck):
            sock.close()
