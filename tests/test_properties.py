"""Property tests: whatever arrives, from wherever, the core holds its invariants."""

import contextlib
import unicodedata
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import config, protocol
from chatd.names import confusable_keys, name_key
from chatd.room import Room
from chatd.skeleton import data_path, parse, skeleton

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
    assert name_key(room.settings.admin_name) not in keys
    looks = [look for s in room.sessions() for look in confusable_keys(s.name)]
    assert len(looks) == len(set(looks)), "two sessions look alike"
    assert not set(looks) & confusable_keys(room.settings.admin_name)
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
        deliveries = room.receive(addr, data, float(now)).deliveries
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


# -- nobody passes for the admin, and no line starts a second one ----------------------------

#: prototype -> the characters TR39 confuses with it, from the data chatd uses
LOOKALIKES: dict[str, list[str]] = defaultdict(list)
for _source, _prototype in parse(data_path().read_text(encoding="utf-8").splitlines())[1].items():
    LOOKALIKES[_prototype].append(_source)


def disguised(word: str):
    """``word`` with any of its characters swapped for one TR39 confuses with it."""
    options = [sorted({c, skeleton(c), *LOOKALIKES[skeleton(c)]}) for c in word]
    return st.tuples(*[st.sampled_from(o) for o in options]).map("".join)


#: what must never reach another person inside a line: C0, DEL, C1, line and paragraph
#: separators, bidi controls (an oracle of its own, not chatd's table)
def unsafe(char: str) -> bool:
    return (unicodedata.category(char) in ("Cc", "Zl", "Zp")
            or unicodedata.bidirectional(char) in ("LRE", "RLE", "LRO", "RLO", "PDF",
                                                    "LRI", "RLI", "FSI", "PDI")
            or char in "\u200e\u200f\u061c")


SPEAKERS = st.one_of(
    st.text(min_size=1, max_size=12),
    disguised("admin"), disguised("alice"),
    st.sampled_from(["admin", "Admin", "ADMIN", "\u0430dmin", "\u0410DMIN", "admin\u3164",
                     "ad\u034fmin", "admin:", "admins", "adm1n", "AD\u039cIN", "\u0391lice",
                     "AIice"]),
)


@settings(max_examples=400, deadline=None)
@given(SPEAKERS, st.text(max_size=80))
def test_no_chat_line_passes_for_an_admin_line(name, text):
    room = Room(config.from_mapping({}).room)  # the default: en
    alice, speaker = ("10.0.0.1", 1), ("10.0.0.2", 2)
    room.receive(alice, b"L alice", 0.0)
    answer = room.receive(speaker, f"L {name}".encode(), 0.0)
    if not answer.deliveries or answer.deliveries[0].payload != b"OK":
        return
    name = room.sessions()[-1].name  # as the room parsed it
    admin = room.settings.admin_name
    assert not confusable_keys(name) & confusable_keys(admin)
    assert skeleton(name_key(name)) != skeleton(name_key(admin))  # the plain TR39 test too
    admin_prefix = room.render("admin", name=admin, text="").encode()
    for delivery in room.receive(speaker, f"C {name} {text}".encode(), 1.0).deliveries:
        if alice not in delivery.addrs:
            continue
        line = delivery.payload.decode()
        assert line.startswith("\n") and not delivery.payload.startswith(admin_prefix)
        assert not any(unsafe(c) for c in line[1:]), line


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["admin", "ADMIN", "Admin", "alice", "ALICE", "mallory"]).flatmap(disguised))
def test_disguised_names_are_refused(name):
    room = Room(config.from_mapping({}).room)
    room.receive(("10.0.0.1", 1), b"L alice", 0.0)
    room.receive(("10.0.0.1", 2), b"L mallory", 0.0)
    assert room.receive(("10.0.0.3", 3), f"L {name}".encode(), 0.0).deliveries[0].payload != b"OK"
    assert len(room) == 2
