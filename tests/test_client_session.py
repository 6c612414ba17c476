"""The client's protocol state machine and its sanitiser: plain values, a fake clock."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.client.pipe import split_lines
from chatd.client.sanitize import safe_line, safe_text
from chatd.client.session import (
    TRANSITIONS,
    ClientSession,
    Closed,
    ConnectionLost,
    Input,
    Joined,
    Line,
    LineTooLong,
    NoAnswer,
    NotConnected,
    Reconnected,
    Refused,
    State,
    name_error,
)
from chatd.protocol import HELLO


def joined(**kwargs) -> ClientSession:
    session = ClientSession(**kwargs)
    session.login("alice", now=0.0)
    session.take_datagrams()
    assert session.receive(b"OK", now=0.0) == [Joined("alice")]
    return session


# -- login ----------------------------------------------------------------------


def test_login_proves_the_address_then_sends_L_with_the_cookie_and_joins_on_OK():
    session = ClientSession()
    session.login("alice", now=0.0)
    (hello,) = session.take_datagrams()
    assert hello.startswith(b"H ") and len(hello) >= 29  # padded: the answer is no larger
    assert session.receive(b"COOKIE abc", now=0.05) == []
    assert session.take_datagrams() == [b"L alice abc"]
    assert session.receive(b"OK", now=0.1) == [Joined("alice")]
    assert session.state is State.IN_ROOM


def test_a_cookie_nobody_asked_for_is_ignored():
    session = joined()
    assert session.receive(b"COOKIE abc", now=1.0) == []
    assert session.take_datagrams() == []


def test_login_is_retried_then_gives_up():
    session = ClientSession(timeout=1.0, login_tries=3)
    session.login("alice", now=0.0)
    assert session.take_datagrams() == [HELLO]
    assert session.tick(0.5) == []
    assert session.take_datagrams() == []
    assert session.tick(1.0) == []
    assert session.take_datagrams() == [HELLO]
    assert session.tick(2.0) == []
    assert session.take_datagrams() == [HELLO]
    assert session.tick(3.0) == [NoAnswer()]
    assert session.take_datagrams() == []
    assert session.state is State.IDLE
    assert session.next_deadline() is None


def test_refusal_text_is_returned_and_another_name_can_be_tried():
    session = ClientSession()
    session.login("alice", now=0.0)
    assert session.receive(b"\nthe name alice is already taken", 0.1) == [
        Refused("the name alice is already taken")]
    assert session.state is State.IDLE
    session.login("alice2", now=0.2)
    assert session.take_datagrams() == [HELLO, HELLO]
    session.receive(b"COOKIE t", 0.25)
    assert session.take_datagrams() == [b"L alice2 t"]
    assert session.receive(b"OK", 0.3) == [Joined("alice2")]


def test_stray_control_words_during_login_are_not_refusals():
    session = ClientSession()
    session.login("alice", now=0.0)
    assert session.receive(b"PONG", 0.1) == []
    assert session.receive(b"EXIT", 0.1) == []
    assert session.state is State.LOGGING_IN


def test_duplicate_OK_after_a_retry_is_ignored():
    session = joined()
    assert session.receive(b"OK", 0.5) == []
    assert session.state is State.IN_ROOM


# -- chatting -------------------------------------------------------------------


def test_say_sends_the_text_verbatim():
    session = joined()
    session.say("  hello  world ")
    session.say("/who")
    assert session.take_datagrams() == [b"C alice   hello  world ", b"C alice /who"]


def test_too_long_line_is_refused_locally():
    session = joined(max_datagram=20)
    session.say("x" * (20 - len("C alice ")))  # exactly at the limit
    with pytest.raises(LineTooLong) as info:
        session.say("x" * (21 - len("C alice ")))
    assert (info.value.size, info.value.limit) == (21, 20)
    assert "21" in str(info.value) and "20" in str(info.value)
    assert session.take_datagrams() == [b"C alice " + b"x" * 12]


def test_limit_counts_bytes_not_characters():
    session = joined(max_datagram=12)
    with pytest.raises(LineTooLong):
        session.say("ééé")  # 8 + 6 bytes


def test_cannot_say_before_joining():
    with pytest.raises(NotConnected):
        ClientSession().say("hi")


def test_text_lines_are_made_safe():
    session = joined()
    assert session.receive(b"\nbob says: \x1b[2Jhi\xff", 1.0) == [
        Line("bob says: \\x1b[2Jhi\\xff")]


# -- keepalive and reconnection --------------------------------------------------


def test_keepalive_pings_and_pong_resets_the_count():
    session = joined(keepalive=10.0, missed_pongs=3)
    assert session.next_deadline() == 10.0
    for t in (10.0, 20.0, 30.0):
        assert session.tick(t) == []
        assert session.take_datagrams() == [b"P alice"]
        assert session.receive(b"PONG", t + 0.1) == []
    assert session.state is State.IN_ROOM


def test_missed_pongs_lose_the_connection_then_OK_reconnects():
    session = joined(keepalive=10.0, missed_pongs=3)
    for t in (10.0, 20.0, 30.0):
        assert session.tick(t) == []
        assert session.take_datagrams() == [b"P alice"]
    assert session.tick(40.0) == [ConnectionLost()]
    assert session.state is State.LOST
    assert session.take_datagrams() == [HELLO]
    with pytest.raises(NotConnected):
        session.say("hi")
    assert session.tick(45.0) == []
    assert session.tick(50.0) == []
    assert session.take_datagrams() == [HELLO]  # retried every keepalive, forever
    assert session.receive(b"OK", 50.1) == [Reconnected("alice")]
    assert session.state is State.IN_ROOM
    assert session.next_deadline() == pytest.approx(60.1)
    session.say("back")
    assert session.take_datagrams() == [b"C alice back"]


def test_keepalive_zero_never_pings():
    session = joined(keepalive=0.0)
    assert session.next_deadline() is None
    assert session.tick(1e9) == []
    assert session.take_datagrams() == []


# -- leaving ----------------------------------------------------------------------


def test_leave_sends_Q_and_EXIT_closes():
    session = joined(timeout=1.0)
    assert session.leave(5.0) == []
    assert session.take_datagrams() == [b"Q alice"]
    assert session.receive(b"\nlate line", 5.1) == [Line("late line")]
    assert session.receive(b"EXIT", 5.2) == [Closed(by_server=False)]
    assert session.state is State.CLOSED


def test_leave_gives_up_waiting_for_EXIT():
    session = joined(timeout=1.0)
    session.leave(5.0)
    assert session.tick(5.5) == []
    assert session.tick(6.0) == [Closed(by_server=False, confirmed=False)]


def test_EXIT_from_the_server_carries_the_reason():
    session = joined()
    session.receive(b"\nbob says: hi", 1.0)
    session.receive(b"\nthe server is shutting down", 2.0)
    assert session.receive(b"EXIT", 2.0) == [
        Closed(by_server=True, reason="the server is shutting down")]
    assert session.receive(b"\nafter the end", 3.0) == []


def test_leave_before_joining_just_closes():
    session = ClientSession()
    assert session.leave(0.0) == [Closed(by_server=False, confirmed=False)]
    assert session.take_datagrams() == []


# -- the machine as a whole ---------------------------------------------------------

SERVER_SAYS = [b"OK", b"EXIT", b"PONG", b"COOKIE tok", b"COOKIE ", b"\nbob says: hi",
               b"\nthe name is taken"]
ACTIONS = st.one_of(
    st.tuples(st.just("login"), st.sampled_from(["alice", "bob"])),
    st.tuples(st.just("cancel"), st.none()),
    st.tuples(st.just("say"), st.sampled_from(["hi", "x" * 600])),
    st.tuples(st.just("leave"), st.none()),
    st.tuples(st.just("receive"), st.sampled_from(SERVER_SAYS)),
    st.tuples(st.just("tick"), st.floats(0.0, 20.0)),
)


@given(st.lists(ACTIONS, max_size=40))
def test_any_sequence_keeps_the_machine_sound(actions):
    """Whatever happens in whatever order: only the person's impossible requests raise,
    a session with nothing to wait for has no deadline, and a closed one stays closed."""
    session = ClientSession(keepalive=5.0, timeout=1.0, max_datagram=512)
    now = 0.0
    for action, value in actions:
        closed = session.state is State.CLOSED
        if action == "login":
            allowed = session.state in (State.IDLE, State.LOGGING_IN)
            try:
                session.login(value, now)
            except RuntimeError:
                assert not allowed
        elif action == "cancel":
            session.cancel_login()
        elif action == "say":
            with contextlib.suppress(NotConnected, LineTooLong):
                session.say(value)
        elif action == "leave":
            session.leave(now)
        elif action == "receive":
            session.receive(value, now)
        else:
            now += value
            session.tick(now)
        if session.state in (State.IDLE, State.CLOSED):
            assert session.next_deadline() is None
        if closed:
            assert session.state is State.CLOSED and session.take_datagrams() == []
        session.take_datagrams()


def test_every_transition_of_the_table_leads_to_a_known_state():
    assert all(state in State and kind in Input and nxt in State
               for (state, kind), (nxt, _) in TRANSITIONS.items())
    assert not any(state is State.CLOSED for state, _ in TRANSITIONS)  # CLOSED is final


# -- names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "a\tb", "bob\n"])
def test_names_that_cannot_work_on_the_wire(name):
    assert name_error(name) is not None


def test_ordinary_names_are_left_to_the_server():
    assert name_error("Ålice_42") is None


# -- sanitising ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "shown"), [
    (b"\nbob says: hi\n", "bob says: hi"),
    (b"\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    (b"a\nb\rc\td\x00e\x7f", "a\\x0ab\\x0dc\\x09d\\x00e\\x7f"),
    ("c1:\u009b31m".encode(), "c1:\\x9b31m"),
    (b"bad \xff\xfe utf8 \xc3", "bad \\xff\\xfe utf8 \\xc3"),
    ("bidi \u202egnp.exe".encode(), "bidi \\u202egnp.exe"),
    ("sep\u2028x".encode(), "sep\\u2028x"),
    ("中文 说: ok ÿ 👍🏽".encode(), "中文 说: ok ÿ 👍🏽"),
    ("该用户已存在".encode(), "该用户已存在"),
])
def test_safe_line(raw, shown):
    assert safe_line(raw) == shown


@given(st.binary(max_size=200))
def test_safe_line_never_lets_a_control_character_through(data):
    line = safe_line(data)
    assert all(not (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) for c in line)
    assert "\u2028" not in line and "\u202e" not in line


@given(st.text(max_size=100))
def test_printable_text_is_untouched(text):
    if text.isprintable():
        assert safe_text(text) == text


def test_split_lines_keeps_the_partial_line():
    lines, rest = split_lines(b"one\r\ntwo\n\nth\xffree\npart")
    assert lines == ["one", "two", "", "th\ufffdree"]
    assert rest == b"part"
