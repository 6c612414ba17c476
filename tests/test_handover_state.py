"""The state blob of a restart (chatd.handover.state): what capture() takes, restore() gives
back whole, and a blob it cannot read leaves the new server fresh, never half restored."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from chatd import config
from chatd.handover.state import STATE_FORMAT, StateError, capture, restore
from chatd.server import Server

A, B = ("127.0.0.1", 40001), ("127.0.0.1", 40002)


@pytest.fixture
def make_server(tmp_path) -> Iterator:
    made: list[Server] = []

    def make(plugins: dict | None = None) -> Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        server = Server(config.from_mapping({"runtime_dir": str(tmp_path),
                                             "plugins": plugins or {}}), sock)
        made.append(server)
        return server

    yield make
    for server in made:
        server.sock.close()


def busy_server(make_server) -> Server:
    server = make_server({"history": {"size": 5}})
    server.start_plugins()
    server.apply(server.room.receive(A, b"L alice", 100.0))
    server.apply(server.room.receive(B, b"L bob", 101.0))
    server.apply(server.room.receive(A, b"C alice first", 102.0))
    server.apply(server.room.receive(B, b"C bob second", 103.0))
    return server


def test_capture_is_json_with_the_contracts_fields(make_server):
    server = busy_server(make_server)
    doc = json.loads(capture(server).decode("utf-8"))
    assert doc["format"] == STATE_FORMAT
    assert {"from_pid", "taken_at", "room", "plugins", "counters", "drops", "send_errors",
            "started"} <= set(doc)
    assert [s["name"] for s in doc["room"]["sessions"]] == ["alice", "bob"]
    assert doc["plugins"]["history"] == {"lines": [["alice", "first"], ["bob", "second"]]}
    assert doc["counters"]["chat_lines"] == 2


def test_restore_gives_back_room_history_counters_and_start_time(make_server):
    old = busy_server(make_server)
    old.started -= 3600  # it has been up an hour
    blob = capture(old)
    new = make_server({"history": {"size": 5}})
    new.start_plugins()
    summary = restore(new, blob)
    assert summary["sessions"] == 2 and summary["bytes"] == len(blob)
    assert [s.name for s in new.room.sessions()] == ["alice", "bob"]
    assert new.counters["chat_lines"] == 2
    assert new.started == old.started
    status = new.status()
    assert status["uptime"] >= 3599
    assert status["taken_over_from"] == summary["from_pid"]
    # nobody was told anything, and the history plugin replays the old lines to a newcomer
    assert new.room.flush().deliveries == []
    texts = verified_login(new, "carol", ("127.0.0.1", 40003), 200.0)
    assert texts == [b"OK", b"\nalice says: first", b"\nbob says: second"]


def test_plugin_state_given_at_startup_when_restored_before_it(make_server):
    """The systemd path may restore before serve() starts the plugins."""
    blob = capture(busy_server(make_server))
    new = make_server({"history": {"size": 5}})
    restore(new, blob)
    new.start_plugins()
    texts = verified_login(new, "carol", ("127.0.0.1", 40003), 200.0)
    assert texts == [b"OK", b"\nalice says: first", b"\nbob says: second"]


def test_address_cookies_issued_by_the_old_process_still_let_a_client_in(make_server):
    old = make_server()
    cookie = old.room.cookies.issue(A, 1000.0).split()[1].decode()
    new = make_server()
    restore(new, capture(old))
    assert new.room.cookies.check(A, cookie, 1000.0)


def verified_login(server: Server, name: str, addr, now: float) -> list[bytes]:
    """What ``addr`` receives when it logs in with an address cookie (as chat-client does:
    an unverified address gets only the short answers)."""
    token = server.room.cookies.issue(addr, now).split()[1].decode()
    step = server.room.receive(addr, f"L {name} {token}".encode(), now)
    return [d.payload for d in step.deliveries if addr in d.addrs]


def _edited(blob: bytes, **changes) -> bytes:
    doc = json.loads(blob)
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("damage", [
    lambda blob: blob[: len(blob) // 2],  # cut short
    lambda blob: b"\xff\xfe" + blob,  # not UTF-8
    lambda blob: b"[1, 2]",  # not an object
    lambda blob: _edited(blob, format=STATE_FORMAT + 1),  # another version
    lambda blob: _edited(blob, format=None),
    lambda blob: _edited(blob, room={"format": 1, "sessions": [{"name": "x"}]}),
    lambda blob: _edited(blob, room={"format": 99, "sessions": []}),
    lambda blob: _edited(blob, counters={"chat_lines": "many"}),
    lambda blob: _edited(blob, from_pid=-1),
    lambda blob: _edited(blob, cookies={"slot_seconds": 30.0, "secrets": {"1": "zz"}}),
    lambda blob: b"[" * 100_000,  # deep nesting
], ids=["truncated", "not-utf8", "not-object", "other-version", "no-version",
        "bad-session", "bad-room-format", "bad-counter", "bad-pid", "bad-cookie", "deep"])
def test_an_unreadable_blob_raises_and_leaves_the_server_fresh(make_server, damage):
    blob = damage(capture(busy_server(make_server)))
    new = make_server({"history": {"size": 5}})
    new.start_plugins()
    with pytest.raises(StateError):
        restore(new, blob)
    assert len(new.room) == 0
    assert not new.counters and new.taken_over is None
    # and it serves fresh: a login works as in any new room
    assert new.room.receive(A, b"L alice", 1.0).to(A) == [b"OK"]


def test_a_plugin_state_json_cannot_carry_is_left_out_not_fatal(make_server):
    server = busy_server(make_server)
    history = server.plugins._states["history"].instance
    history.lines.append(("alice", object()))  # a plugin bug
    doc = json.loads(capture(server))
    assert "history" not in doc["plugins"]
    assert [s["name"] for s in doc["room"]["sessions"]] == ["alice", "bob"]
