"""The room as a value: snapshot() survives JSON, and restore() rebuilds a room that behaves
exactly like the one it came from, whatever happens to both afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import config
from chatd.room import SNAPSHOT_VERSION, Room, SnapshotError

A, B, C = ("10.0.0.1", 1001), ("10.0.0.2", 1002), ("::1", 1003, 0, 0)


def make_room(**room) -> Room:
    return Room(config.from_mapping({"room": {"max_users": 3, "evict_idle_after": 50,
                                              "session_timeout": 30, "unreachable_grace": 5,
                                              "unreachable_after": 2, **room}}).room)


def through_json(snapshot: dict) -> dict:
    return json.loads(json.dumps(snapshot))


def test_a_snapshot_is_plain_data_with_a_format_version():
    room = make_room()
    room.receive(A, b"L alice", 0)
    room.receive(A, b"P alice", 5)
    room.receive(C, b"L bob", 7)
    snap = room.snapshot(10)
    assert snap == through_json(snap)
    assert snap["format"] == SNAPSHOT_VERSION
    assert [(s["name"], s["age"], s["idle"], s["keepalive"]) for s in snap["sessions"]] == [
        ("alice", 10, 5, True), ("bob", 3, 3, False)]


def test_restore_keeps_names_login_times_and_silence_but_tells_nobody():
    room = make_room()
    room.receive(A, b"L alice", 0)
    room.receive(B, b"L bob", 4)
    fresh = make_room()
    fresh.restore(through_json(room.snapshot(100)), now=1000)  # another clock altogether
    assert [(s.name, s.addr, s.joined_at, s.last_seen) for s in fresh.sessions()] == [
        ("alice", A, 900, 900), ("bob", B, 904, 904)]
    assert fresh.flush().deliveries == []
    assert fresh.receive(A, b"C alice hi", 1001).to(B) == [b"\nalice says: hi"]
    assert fresh.receive(C, b"L BOB", 1001).to(C) == [b"\nthe name BOB is already taken"]


@pytest.mark.parametrize("bad", [
    {"format": SNAPSHOT_VERSION + 1, "sessions": []},
    {"sessions": []},
    {"format": SNAPSHOT_VERSION},
    {"format": SNAPSHOT_VERSION, "sessions": [{"name": "x"}]},
    {"format": SNAPSHOT_VERSION, "sessions": "nope"},
    {"format": SNAPSHOT_VERSION, "sessions": [{"name": "a b", "addr": ["1.2.3.4", 5], "age": 0,
                                               "idle": 0, "keepalive": False, "verified": False,
                                               "unreachable": 0, "unreachable_ago": None}]},
    {"format": SNAPSHOT_VERSION, "sessions": [{"name": "a", "addr": [{"x": 1}, 5], "age": 0,
                                               "idle": 0, "keepalive": False, "verified": False,
                                               "unreachable": 0, "unreachable_ago": None}]},
    {"format": SNAPSHOT_VERSION, "sessions": 2 * [{"name": "a", "addr": ["1.2.3.4", 5],
                                                   "age": 0, "idle": 0, "keepalive": False,
                                                   "verified": False, "unreachable": 0,
                                                   "unreachable_ago": None}]},
])
def test_a_snapshot_it_cannot_read_is_refused_and_leaves_the_room_empty(bad):
    room = make_room()
    with pytest.raises(SnapshotError):
        room.restore(bad, now=0)
    assert len(room) == 0
    assert room.receive(A, b"L a", 1).to(A) == [b"OK"]


# -- restore(snapshot(room)) behaves like room ---------------------------------------------

ADDRS = [A, B, C, ("10.0.0.1", 2002)]
NAMES = ["alice", "bob", "carol", "dave", "Alice"]


@st.composite
def datagrams(draw):
    kind = draw(st.sampled_from("LCQPX"))
    name = draw(st.sampled_from(NAMES))
    if kind == "C":
        return f"C {name} {draw(st.sampled_from(['hi', '/who', '/nope', '']))}".encode()
    if kind == "X":
        return draw(st.sampled_from([b"", b"\xff", b"Z z"]))
    return f"{kind} {name}".encode()


# integer times: ages and restored times are then exact, as the rules compare them
moments = st.lists(st.tuples(st.integers(0, 40), st.sampled_from(ADDRS), datagrams(),
                             st.sampled_from(["datagram", "datagram", "expire", "icmp"])),
                   max_size=25)


def play(room: Room, moments, start: int) -> tuple[list, int]:
    """Feed ``moments`` to ``room`` from time ``start``; every output, in order."""
    now, out = start, []
    for gap, addr, data, what in moments:
        now += gap
        if what == "expire":
            step = room.expire(now)
        elif what == "icmp":
            step = room.unreachable(addr, now)
        else:
            step = room.receive(addr, data, now)
        out.append((step.deliveries, step.events))
    return out, now


@settings(max_examples=200, deadline=None)
@given(moments, moments, st.integers(0, 10_000))
def test_a_restored_room_behaves_like_the_original(before, after, elsewhere):
    original = make_room()
    _, now = play(original, before, 0)
    copy = make_room()
    copy.restore(through_json(original.snapshot(now)), now=elsewhere)
    expected, end = play(original, after, now)
    got, copy_end = play(copy, after, elsewhere)
    assert got == expected
    assert copy.snapshot(copy_end) == original.snapshot(end)
