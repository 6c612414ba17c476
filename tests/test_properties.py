"""Property tests: whatever arrives, from wherever, the core holds its invariants."""

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import config, protocol
from chatd.names import name_key
from chatd.room import Room

ADDRS = [("10.0.0.1", 1), ("10.0.0.1", 2), ("10.0.0.2", 1), ("::1", 5, 0, 0), ("10.0.0.3", 9)]
NAMES = ["alice", "Alice", "ＡＬＩＣＥ", "bob", "admin", "Admin", "管理员", "a b", "x" * 40,
         "e\u0301", "\u00e9", "z\x1b", ""]
TEXTS = st.one_of(st.text(max_size=50), st.just("x" * 1100), st.just("é" * 600),
                  st.sampled_from(["/who", "/me waves", "/", "//x", " "]))


@st.composite
def datagrams(draw):
    kind = draw(st.sampled_from("LCQPX"))
    if kind == "X":
        return draw(st.binary(max_size=1500))
    name = draw(st.sampled_from(NAMES))
    if kind == "C":
        return f"C {name} {draw(TEXTS)}".encode()
    data = f"{kind} {name}".encode()
    return data + draw(st.sampled_from([b"", b"\n", b"\r\n", b" extra"]))


traffic = st.lists(st.tuples(st.sampled_from(ADDRS), datagrams()), max_size=60)


def snapshot(room: Room) -> set:
    return {(s.addr, s.name) for s in room.sessions()}


def check_invariants(room: Room, deliveries) -> None:
    keys = [s.key for s in room.sessions()]
    assert len(keys) == len(set(keys)), "two sessions share a name"
    assert room.settings.admin_key not in keys
    assert len(room) <= room.settings.max_users
    for delivery in deliveries:
        assert len(delivery.payload) <= room.settings.max_datagram
        delivery.payload.decode("utf-8")


@settings(max_examples=300, deadline=None)
@given(traffic, st.integers(1, 4), st.sampled_from(["en", "zh_CN"]))
def test_any_traffic_keeps_the_invariants(steps, max_users, locale):
    room = Room(config.from_mapping({"room": {"max_users": max_users, "locale": locale,
                                              "max_sessions_per_ip": 2}}).room)
    for now, (addr, data) in enumerate(steps):
        before = snapshot(room)
        holder = next((s for s in room.sessions() if s.addr == addr), None)
        deliveries = room.receive(addr, data, float(now))
        check_invariants(room, deliveries)
        try:
            command = protocol.parse(data)
        except protocol.ProtocolError:
            assert snapshot(room) == before
            continue
        if isinstance(command, protocol.Login):
            continue
        spoofed = holder is None or name_key(command.name) != holder.key
        oversized = len(data) > room.settings.max_datagram
        if spoofed or oversized:
            assert snapshot(room) == before, "a spoofed or oversized command changed the room"
            if spoofed and not oversized:
                assert deliveries == []
        if isinstance(command, protocol.Chat) and not spoofed:
            for delivery in deliveries:
                if addr in delivery.addrs:  # only an error line may go back to the sender
                    assert delivery.addrs == (addr,)
                    assert not delivery.payload.startswith(f"\n{holder.name} ".encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=70000))
def test_any_bytes_never_raise_out_of_the_core(data):
    room = Room(config.from_mapping({}).room)
    room.receive(("10.0.0.9", 1), b"L someone", 0.0)
    room.receive(("10.0.0.9", 1), data, 1.0)
    room.receive(("10.0.0.8", 1), data, 1.0)
    room.expire(1000.0)
    with contextlib.suppress(protocol.ProtocolError):
        protocol.parse(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(NAMES), max_size=20))
def test_names_stay_unique_under_normalisation(names):
    room = Room(config.from_mapping({}).room)
    for i, name in enumerate(names):
        room.receive(("10.1.0.1", i), f"L {name}".encode(), 0.0)
    keys = [name_key(s.name) for s in room.sessions()]
    assert len(keys) == len(set(keys))
