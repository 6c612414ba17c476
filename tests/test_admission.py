"""Who gets in, and what an address that may be forged can get out of the room.

Plain values, no sockets: address cookies, replies capped for unverified
sessions, eviction of the longest silent session from a full room, and IPv6
hosts counted by prefix.
"""

from __future__ import annotations

from chatd import config
from chatd.cookies import REPLY_SIZE, CookieJar
from chatd.events import CookieIssued, Dropped, LeaveReason, RepliesCapped, Step, UserLeft
from chatd.hosts import host_key
from chatd.plugins import PluginManager
from chatd.room import Room

A, B, C, D = (("10.0.0.1", 1001), ("10.0.0.2", 1002), ("10.0.0.3", 1003), ("10.0.0.4", 1004))
HELLO = b"H " + b"." * 62


def make_room(plugins: bool = False, **room) -> Room:
    made = Room(config.from_mapping({"room": room}).room)
    if plugins:
        manager = PluginManager(made, {"ratelimit": False})
        made.hooks = manager
        manager.startup()
        made.flush()
    return made


def to(addr, step: Step) -> list[bytes]:
    return step.to(addr)


def cookie(room: Room, addr, now: float = 0.0) -> str:
    (reply,) = to(addr, room.receive(addr, HELLO, now))
    assert reply.startswith(b"COOKIE ")
    return reply.split()[1].decode()


def login(room: Room, addr, name: str, now: float = 0.0, verify: bool = False) -> list[bytes]:
    data = f"L {name} {cookie(room, addr, now)}" if verify else f"L {name}"
    return to(addr, room.receive(addr, data.encode(), now))


# -- cookies ----------------------------------------------------------------------------


def test_a_cookie_answer_is_never_larger_than_the_hello_that_asked():
    room = make_room()
    events = []
    for size in range(1, 80):
        hello = (b"H " + b"x" * size)[:size]
        answer = room.receive(A, hello, 0.0)
        assert sum(len(d.payload) * len(d.addrs) for d in answer.deliveries) <= size
        events += answer.events
    assert sum(isinstance(e, Dropped) and e.reason == "hello_too_short"
               for e in events) == REPLY_SIZE - 1
    assert sum(isinstance(e, CookieIssued) for e in events) == 80 - REPLY_SIZE


def test_a_verified_login_and_what_cookies_are_not_good_for():
    room = make_room()
    assert login(room, A, "alice", verify=True) == [b"OK"]
    assert room.session("alice").verified
    stolen = cookie(room, A)
    assert to(B, room.receive(B, f"L bob {stolen}".encode(), 0.0)) == [
        b"\ncookie expired: log in again"]  # issued to another address
    assert room.session("bob") is None
    old = cookie(room, C, now=0.0)
    assert to(C, room.receive(C, f"L carol {old}".encode(), 61.0)) == [
        b"\ncookie expired: log in again"]
    assert to(C, room.receive(C, f"L carol {old}".encode(), 59.0)) == [b"OK"]  # next slot


def test_the_secret_changes_every_slot_and_only_two_are_kept():
    jar = CookieJar(slot_seconds=30)
    tokens = [jar.issue(A, t * 30.0) for t in range(5)]
    assert len(set(tokens)) == 5
    assert len(jar._secrets) == 2


def test_a_plain_login_of_the_article_kind_is_unverified_by_default():
    room = make_room()
    assert login(room, A, "alice") == [b"OK"]
    assert not room.session("alice").verified


# -- require_verified -------------------------------------------------------------------


def test_require_verified_refuses_plain_logins_within_three_times_their_size():
    room = make_room(require_verified=True)
    silent = room.receive(A, b"L x", 0.0)
    assert silent.deliveries == []  # 3 bytes: a refusal would be 27
    assert RepliesCapped(A) in silent.events
    refusal = to(A, room.receive(A, b"L alice_the_great", 0.0))
    assert refusal == [b"\nverify your address first"]
    assert len(refusal[0]) <= 3 * len(b"L alice_the_great")
    assert len(room) == 0
    assert login(room, A, "alice", verify=True) == [b"OK"]


def test_a_forged_login_gets_its_victim_no_room_traffic_when_verification_is_required():
    room = make_room(require_verified=True)
    login(room, A, "alice", verify=True)
    login(room, B, "bob", verify=True)
    victim = ("192.0.2.9", 4444)
    sent = received = 0
    for name in ("x", "mallory", "a_rather_long_name_for_padding"):
        data = f"L {name}".encode()
        sent += len(data)
        received += sum(map(len, room.receive(victim, data, 1.0).to(victim)))
    for i in range(10):
        received += sum(map(len, room.receive(A, f"C alice hi {i}".encode(), 2).to(victim)))
    assert received <= 3 * sent
    assert room.session_at(victim) is None


# -- one datagram of reply for an unverified session ---------------------------------------


def test_who_for_an_unverified_session_is_one_datagram_that_says_what_it_left_out():
    room = make_room(plugins=True, max_datagram=100)
    for i in range(30):
        login(room, ("10.0.1.1", i), f"user{i:02d}", verify=True)
    login(room, A, "mallory")
    (answer,) = to(A, room.receive(A, b"C mallory /who", 1.0))
    assert len(answer) <= 100
    assert answer.decode().endswith("more")
    assert "…and " in answer.decode()
    verified = to(("10.0.1.1", 0), room.receive(("10.0.1.1", 0), b"C user00 /who", 1.0))
    assert len(verified) > 1


def test_help_for_an_unverified_session_is_one_datagram():
    room = make_room(plugins=True, max_datagram=64)
    login(room, A, "mallory")
    (answer,) = to(A, room.receive(A, b"C mallory /help", 1.0))
    assert len(answer) <= 64 and "more" in answer.decode()


def test_the_room_caps_replies_a_careless_plugin_sends_to_an_unverified_session():
    room = make_room(plugins=True, max_datagram=64)
    login(room, A, "mallory")
    help_plugin = room.hooks._states["help"].instance  # type: ignore[attr-defined]
    help_plugin.room.reply_budget = lambda name: None  # it ignores the budget
    step = room.receive(A, b"C mallory /help", 1.0)
    assert len(step.to(A)) == 1
    assert any(isinstance(e, RepliesCapped) and e.count >= 1 for e in step.events)


# -- eviction from a full room --------------------------------------------------------------


def test_a_full_room_evicts_the_longest_silent_session_for_a_newcomer():
    room = make_room(max_users=3, evict_idle_after=600)
    login(room, A, "quiet", now=0)
    login(room, B, "talker", now=0)
    login(room, C, "pinger", now=0)
    room.receive(C, b"P pinger", 1)  # keepalive: never evicted
    room.receive(B, b"C talker hi", 500)
    assert login(room, D, "newcomer", now=599) == [b"\nthe room is full (3 users), try again later"]
    out = room.receive(D, b"L newcomer", 700)
    assert to(D, out) == [b"OK"]
    assert to(A, out) == [b"\nyou were removed from the room: silent too long while it was full",
                          b"EXIT"]
    assert b"\nquiet left the room" in to(B, out)
    assert room.session("quiet") is None and room.session("newcomer") is not None
    assert UserLeft("quiet", A, LeaveReason.EVICTED) in out.events


def test_keepalive_sessions_and_recent_speakers_are_never_evicted():
    room = make_room(max_users=2, evict_idle_after=600)
    login(room, A, "pinger", now=0)
    room.receive(A, b"P pinger", 0)
    login(room, B, "talker", now=0)
    room.receive(B, b"C talker hi", 100)
    assert login(room, C, "newcomer", now=650) == [
        b"\nthe room is full (2 users), try again later"]
    assert len(room) == 2


def test_eviction_can_be_switched_off_and_a_refused_newcomer_evicts_nobody():
    room = make_room(max_users=1, evict_idle_after=0)
    login(room, A, "quiet", now=0)
    assert login(room, B, "bob", now=10_000) == [b"\nthe room is full (1 users), try again later"]
    room = make_room(max_users=1)
    login(room, A, "quiet", now=0)
    assert login(room, B, "quiet", now=10_000) == [b"\nthe name quiet is already taken"]
    assert login(room, B, "bad name", now=10_000)[0].startswith(b"\ncookie")  # "name cookie"
    assert room.session("quiet") is not None


def test_logins_that_never_speak_cannot_lock_the_room_for_good():
    room = make_room(max_users=100, max_sessions_per_ip=0, evict_idle_after=600)
    for i in range(100):
        login(room, (f"10.9.{i % 50}.1", 2000 + i), f"squat{i}", now=0)
    assert login(room, A, "real", now=1)[0].startswith(b"\nthe room is full")
    assert login(room, A, "real", now=601) == [b"OK"]


# -- IPv6 hosts by prefix ---------------------------------------------------------------------


def test_ipv6_addresses_of_one_prefix_are_one_host():
    room = make_room(max_sessions_per_ip=2)
    host = "2001:db8:1:2:"
    assert login(room, (host + ":1", 5, 0, 0), "a") == [b"OK"]
    assert login(room, (host + "ffff:1:2:3", 5, 0, 0), "b") == [b"OK"]
    assert login(room, (host + "aaaa::9", 5, 0, 0), "c") == [
        b"\ntoo many sessions from your address (at most 2)"]
    assert login(room, ("2001:db8:1:3::1", 5, 0, 0), "d") == [b"OK"]
    wide = make_room(max_sessions_per_ip=1, ipv6_prefix=128)
    assert login(wide, (host + ":1", 5, 0, 0), "a") == [b"OK"]
    assert login(wide, (host + ":2", 5, 0, 0), "b") == [b"OK"]


def test_host_keys():
    assert host_key(("::ffff:192.0.2.1", 1, 0, 0)) == "192.0.2.1"
    assert host_key(("192.0.2.1", 1)) == "192.0.2.1"
    assert host_key(("2001:db8::1", 1, 0, 0)) == host_key(("2001:db8::ffff", 9, 0, 0))
    assert host_key(("2001:db8::1", 1, 0, 0), 128) != host_key(("2001:db8::2", 1, 0, 0), 128)
    assert host_key("/run/x.sock") == "/run/x.sock"
