"""The room's rules, with plain values: no sockets, the clock is an argument."""

from collections import Counter

import pytest

from chatd import config
from chatd.events import Dropped, LeaveReason, LoginRefused, Step, UserJoined, UserLeft
from chatd.room import Room, TextTooLong

A, B, C = ("10.0.0.1", 1001), ("10.0.0.2", 1002), ("10.0.0.3", 1003)


def make_room(**room) -> Room:
    return Room(config.from_mapping({"room": room}).room)


def drops(*steps: Step) -> Counter[str]:
    """What the server would count as dropped, by reason, from these steps."""
    return Counter(e.reason for step in steps for e in step.events if isinstance(e, Dropped))


def flat(step: Step) -> list[tuple[tuple, bytes]]:
    return [(addr, d.payload) for d in step.deliveries for addr in d.addrs]


def joined(room: Room, *pairs) -> Room:
    for addr, name in pairs:
        assert flat(room.receive(addr, f"L {name}".encode(), 0.0))[0] == (addr, b"OK")
    return room


def test_login_ok_then_others_hear_of_it():
    room = make_room()
    assert flat(room.receive(A, b"L alice", 0)) == [(A, b"OK")]
    step = room.receive(B, b"L bob", 0)
    assert flat(step) == [(B, b"OK"), (A, b"\nbob joined the room")]
    assert [s.name for s in room.sessions()] == ["alice", "bob"]
    assert step.events == [UserJoined("bob", B, verified=False)]


def test_repeated_login_same_name_same_address_is_ok_again():
    room = joined(make_room(), (A, "alice"))
    assert flat(room.receive(A, b"L Alice", 1)) == [(A, b"OK")]
    assert len(room) == 1


def test_other_name_from_logged_in_address_is_refused():
    room = joined(make_room(), (A, "alice"))
    assert flat(room.receive(A, b"L bob", 1)) == [
        (A, b"\nthis address is already logged in as alice")]
    assert room.session("bob") is None


@pytest.mark.parametrize("name", ["alice", "Alice", "ALICE", "Ａｌｉｃｅ"])
def test_duplicate_names_refused(name):
    room = joined(make_room(), (A, "alice"))
    assert flat(room.receive(B, f"L {name}".encode(), 0)) == [
        (B, f"\nthe name {name} is already taken".encode())]


def test_admin_name_is_reserved():
    room = make_room()
    assert flat(room.receive(A, b"L Admin", 0)) == [(A, b"\nthe name Admin is already taken")]


def test_invalid_name_says_why():
    room = make_room(max_name_length=5)
    assert flat(room.receive(A, b"L abcdef", 0)) == [
        (A, b"\ninvalid name: longer than 5 characters")]


def test_room_full():
    room = joined(make_room(max_users=2), (A, "alice"), (B, "bob"))
    assert flat(room.receive(C, b"L carol", 0)) == [
        (C, b"\nthe room is full (2 users), try again later")]


def test_chat_goes_to_everyone_but_the_sender_encoded_once():
    room = joined(make_room(), (A, "alice"), (B, "bob"), (C, "carol"))
    out = room.receive(A, b"C alice hi  there", 1).deliveries
    assert len(out) == 1
    assert out[0].payload == b"\nalice says: hi  there"
    assert sorted(out[0].addrs) == [B, C]


def test_chat_uses_the_session_name_not_the_datagram_spelling():
    room = joined(make_room(), (A, "Alice"), (B, "bob"))
    assert flat(room.receive(A, b"C ALICE hi", 1)) == [(B, b"\nAlice says: hi")]


def test_spoofed_commands_are_dropped_and_change_nothing():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    steps = [room.receive(C, b"C alice i am alice", 1), room.receive(B, b"C alice i am alice", 1),
             room.receive(B, b"Q alice", 1), room.receive(C, b"Q alice", 1),
             room.receive(B, b"P alice", 1)]
    assert all(step.deliveries == [] for step in steps)
    assert {s.name for s in room.sessions()} == {"alice", "bob"}
    assert drops(*steps) == {"spoofed": 3, "no_session": 2}


def test_udp_admin_datagram_is_not_broadcast():
    room = joined(make_room(), (A, "alice"))
    assert room.receive(C, b"C admin hello all", 1).deliveries == []


def test_quit_sends_exit_and_tells_the_others():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    assert flat(room.receive(B, b"Q bob", 1)) == [(A, b"\nbob left the room"), (B, b"EXIT")]
    assert room.session("bob") is None


def test_ping_answers_pong():
    room = joined(make_room(), (A, "alice"))
    assert flat(room.receive(A, b"P alice", 1)) == [(A, b"PONG")]
    assert room.receive(B, b"P nobody", 1).deliveries == []


def test_only_sessions_that_pinged_time_out():
    room = joined(make_room(session_timeout=10), (A, "alice"), (B, "bob"), (C, "carol"))
    room.receive(A, b"P alice", 5)
    room.receive(C, b"P carol", 5)
    room.receive(C, b"C carol still here", 14)
    assert flat(room.expire(15)) == []  # 10 s after alice's P: not yet
    out = flat(room.expire(15.5))
    assert (B, b"\nalice left the room (timed out)") in out
    assert room.session("alice") is None
    assert room.session("bob") is not None  # never pinged: never expires
    assert room.session("carol") is not None  # spoke at 14
    assert room.expire(1000) and room.session("carol") is None
    assert room.session("bob") is not None


def test_too_long_line_refused_whole_and_fits_otherwise():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    overhead = len(b"\nalice says: ")
    fits = "é" * ((1024 - overhead) // 2)
    assert flat(room.receive(A, f"C alice {fits}".encode(), 1))[0][1].endswith(fits.encode())
    too_long = fits + "é"
    assert flat(room.receive(A, f"C alice {too_long}".encode(), 1)) == [
        (A, b"\nline not sent: longer than 1024 bytes")]


def test_oversized_datagram_dropped_with_error_line():
    room = joined(make_room(), (A, "alice"))
    first = room.receive(A, b"C alice " + b"x" * 65000, 1)
    assert flat(first) == [(A, b"\nline not sent: longer than 1024 bytes")]
    second = room.receive(B, b"x" * 65000, 1)
    assert second.deliveries == []
    assert drops(first, second) == {"too_large": 2}


@pytest.mark.parametrize("data", [b"", b"\xff", b"Z", b"L", b"C", b"Q ", b"\x00" * 10])
def test_junk_never_raises(data):
    room = joined(make_room(), (A, "alice"))
    room.receive(A, data, 1)
    room.receive(B, data, 1)
    assert len(room) == 1


def test_zh_cn_reproduces_the_article():
    room = joined(make_room(locale="zh_CN"), (A, "小明"))
    assert flat(room.receive(B, "L 小红".encode(), 0))[1] == (A, "\n欢迎 小红 进入聊天室".encode())
    assert flat(room.receive(A, "C 小明 你好".encode(), 0)) == [(B, "\n小明 说: 你好".encode())]
    assert flat(room.receive(C, "L 小明".encode(), 0)) == [(C, "该用户已存在".encode())]
    assert flat(room.receive(C, "L 管理员".encode(), 0)) == [(C, "该用户已存在".encode())]
    assert flat(room.admin_say("开会了")) == [(A, "\n管理员 说: 开会了".encode()),
                                             (B, "\n管理员 说: 开会了".encode())]
    assert flat(room.receive(B, "Q 小红".encode(), 0)) == [(A, "\n小红 离开了聊天室".encode()),
                                                          (B, b"EXIT")]


def test_admin_say_and_kick():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    assert flat(room.admin_say("hello")) == [(A, b"\nadmin says: hello"),
                                            (B, b"\nadmin says: hello")]
    with pytest.raises(TextTooLong):
        room.admin_say("x" * 2000)
    assert room.kick("nobody", "x") is False
    assert room.flush() == Step()
    assert room.kick("BOB", "spam") is True
    assert flat(room.flush()) == [
        (B, b"\nyou were removed from the room: spam"), (B, b"EXIT"),
        (A, b"\nbob was removed from the room: spam")]
    assert room.session("bob") is None


def test_shutdown_notice_then_exit_to_everyone():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    out = room.shutdown().deliveries
    assert [d.payload for d in out] == [b"\nthe server is shutting down", b"EXIT"]
    assert all(sorted(d.addrs) == [A, B] for d in out)
    assert len(room) == 0


def test_reconfigure_keeps_sessions_and_changes_templates():
    room = joined(make_room(), (A, "alice"), (B, "bob"))
    new = config.from_mapping({"room": {"templates": {"chat": "<{name}> {text}"}}}).room
    room.reconfigure(new)
    assert flat(room.receive(A, b"C alice hi", 1)) == [(B, b"<alice> hi")]


def test_notices_are_cut_at_a_character_boundary_not_mid_character():
    long_template = "\n" + "é" * 600 + " {name} joined"
    room = joined(make_room(templates={"joined": long_template}), (A, "alice"))
    payload = flat(room.receive(B, b"L bob", 0))[1][1]
    assert len(payload) <= 1024
    payload.decode("utf-8")  # would raise if cut mid-character


def test_joins_and_leaves_are_not_announced_in_a_crowd():
    room = joined(make_room(announce_limit=2), (A, "alice"), (B, "bob"))
    assert flat(room.receive(C, b"L carol", 0)) == [(C, b"OK")]  # 2 already: a crowd
    assert flat(room.receive(C, b"Q carol", 0)) == [(C, b"EXIT")]
    assert flat(room.receive(B, b"Q bob", 0)) == [(A, b"\nbob left the room"), (B, b"EXIT")]
    room = joined(make_room(announce_limit=1), (A, "alice"), (B, "bob"))
    room.kick("bob", "x")
    assert flat(room.flush())[-1] == (A, b"\nbob was removed from the room: x")


# -- ICMP "unreachable" reports: anyone can forge them ---------------------------------

def gone(room: Room, name: str) -> bool:
    return room.session(name) is None


def test_reports_about_a_session_that_spoke_within_the_grace_are_ignored():
    room = joined(make_room(unreachable_after=3, unreachable_grace=60), (A, "alice"), (B, "bob"))
    room.receive(A, b"C alice hi", 100)
    steps = [room.unreachable(A, tenth / 10)  # ten forged reports a second, for 60 s after
             for tenth in range(1000, 1600)]   # her line
    assert all(step.deliveries == [] for step in steps)
    assert not gone(room, "alice")
    assert drops(*steps) == {"icmp_ignored": 600}


def test_a_burst_of_reports_counts_once_and_a_vanished_client_still_goes():
    room = joined(make_room(unreachable_after=3, unreachable_grace=60), (A, "alice"), (B, "bob"))
    # silent for 60 s: believed, but 10 s count as one report
    steps = [room.unreachable(A, tenth / 10) for tenth in range(600, 800)]
    assert not gone(room, "alice") and drops(*steps) == {"icmp_ignored": 198}  # 60, 70 counted
    last = room.unreachable(A, 80)
    assert flat(last) == [(B, b"\nalice left the room (unreachable)")]
    assert last.events == [UserLeft("alice", A, LeaveReason.UNREACHABLE)]


def test_a_word_from_the_session_starts_the_count_again():
    room = joined(make_room(unreachable_after=2, unreachable_grace=60), (A, "alice"), (B, "bob"))
    room.unreachable(A, 60)  # counts: silent since 0
    room.receive(A, b"L alice", 65)  # a repeated login is a word too
    room.unreachable(A, 124.9)  # within the grace of that word
    room.unreachable(A, 125)  # the first report of a new count
    assert not gone(room, "alice")
    room.unreachable(A, 135)
    assert gone(room, "alice")


def test_keepalive_sessions_outlive_any_number_of_forged_reports():
    room = joined(make_room(unreachable_after=1, unreachable_grace=60), (A, "alice"))
    for second in range(3600):  # a P every 30 s (chat-client's default), a report every second
        if second % 30 == 0:
            room.receive(A, b"P alice", second)
        room.unreachable(A, second + 0.5)
    assert not gone(room, "alice")


def test_no_grace_believes_a_report_at_once_but_still_spaces_them():
    room = joined(make_room(unreachable_after=2, unreachable_grace=0), (A, "alice"))
    room.receive(A, b"C alice hi", 5)
    room.unreachable(A, 5)
    room.unreachable(A, 14.9)
    assert not gone(room, "alice")
    room.unreachable(A, 15)
    assert gone(room, "alice")


def test_reports_about_strangers_or_with_the_rule_off_change_nothing():
    room = joined(make_room(unreachable_after=0, unreachable_grace=0), (A, "alice"))
    for second in range(100):
        assert room.unreachable(A, second) == Step() and room.unreachable(B, second) == Step()
    assert not gone(room, "alice")


def test_a_pause_of_the_server_is_nobodys_silence():
    room = joined(make_room(session_timeout=10), (A, "alice"), (B, "bob"))
    room.receive(A, b"P alice", 0)
    room.receive(B, b"P bob", 8)
    room.pause(20, now=28)  # the server stood still from 8 to 28
    assert room.expire(28) == Step() and len(room) == 2
    assert room.expire(30) == Step()  # alice: 0 + 20 of the pause + 10
    assert flat(room.expire(30.5)) == [(B, b"\nalice left the room (timed out)")]
    assert room.session("bob").last_seen == 28  # never later than now
# -- names that look like another's --------------------------------------------------------


@pytest.mark.parametrize("name", ["\u0430dmin", "\u0410DMIN", "adm\u0456n", "\u0430d\u034fmin"])
def test_names_that_look_like_the_admins_are_refused(name):
    room = make_room()
    step = room.receive(A, f"L {name}".encode(), 0)
    assert flat(step) == [(A, f"\nthe name {name} looks too much like admin".encode())]
    assert step.events == [LoginRefused(name, A, "name_confusable")]
    assert len(room) == 0


def test_a_name_like_one_in_the_room_is_refused_while_its_holder_is_in():
    room = joined(make_room(), (A, "alice"))
    assert flat(room.receive(B, "L \u0391lice".encode(), 1)) == [
        (B, "\nthe name \u0391lice looks too much like alice".encode())]
    assert flat(room.receive(B, b"L AIice", 1)) == [
        (B, b"\nthe name AIice looks too much like alice")]
    room.receive(A, b"Q alice", 2)
    assert flat(room.receive(B, "L \u0391lice".encode(), 3)) == [(B, b"OK")]
    assert flat(room.receive(A, b"L alice", 4)) == [
        (A, "\nthe name alice looks too much like \u0391lice".encode())]


def test_names_that_merely_differ_are_welcome():
    room = joined(make_room(), (A, "bob"), (B, "bobby"), (C, "rob"))
    assert len(room) == 3
    # TR39 confuses 0 with O, and names ignore case: b0b is bob
    assert flat(room.receive(("10.0.0.4", 1), b"L b0b", 1)) == [
        (("10.0.0.4", 1), b"\nthe name b0b looks too much like bob")]


def test_a_kicked_or_timed_out_name_is_free_again():
    room = joined(make_room(session_timeout=5), (A, "alice"), (B, "mallory"))
    room.receive(A, b"P alice", 1)
    room.expire(10)
    room.kick("mallory", "x")
    room.flush()
    assert len(room) == 0
    assert flat(room.receive(C, "L \u0430lice".encode(), 11)) == [(C, b"OK")]
    assert flat(room.receive(A, b"L rnallory", 11))[0] == (A, b"OK")
    assert sorted(s.name for s in room.sessions()) == ["rnallory", "\u0430lice"]


def test_zh_cn_refuses_lookalikes_with_the_articles_words():
    room = joined(make_room(locale="zh_CN"), (A, "bob"))
    assert flat(room.receive(B, "L b\u043eb".encode(), 0)) == [(B, "该用户已存在".encode())]


def test_a_chat_line_never_starts_a_second_line():
    room = joined(make_room(), (A, "mallory"), (B, "alice"))
    assert flat(room.receive(A, b"C mallory hi\n\nadmin says: reboot now", 1)) == [
        (B, b"\nmallory says: hi\\x0a\\x0aadmin says: reboot now")]
