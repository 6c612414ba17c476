"""The wire format, with plain values."""

import pytest

from chatd import protocol
from chatd.protocol import Chat, Login, Ping, ProtocolError, Quit


@pytest.mark.parametrize(
    ("data", "command"),
    [
        (b"L alice", Login("alice")),
        (b"L alice\n", Login("alice")),
        (b"L alice\r\n", Login("alice")),
        (b"C alice hello", Chat("alice", "hello")),
        (b"C alice  two  spaces kept ", Chat("alice", " two  spaces kept ")),
        (b"C alice", Chat("alice", "")),
        (b"Q alice", Quit("alice")),
        (b"P alice", Ping("alice")),
        ("C 管理员 你好".encode(), Chat("管理员", "你好")),
    ],
)
def test_parse(data, command):
    assert protocol.parse(data) == command


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"\xff\xfe", "bad_utf8"),
        (b"X alice", "unknown_verb"),
        (b"hello", "unknown_verb"),
        (b"L", "missing_name"),
        (b"L ", "missing_name"),
        (b"C ", "missing_name"),
        (b"Q", "missing_name"),
    ],
)
def test_parse_refuses(data, reason):
    with pytest.raises(ProtocolError) as caught:
        protocol.parse(data)
    assert caught.value.reason == reason


@pytest.mark.parametrize("command", [Login("bob"), Chat("bob", "hi there"), Quit("bob"),
                                     Ping("bob")])
def test_encode_round_trips(command):
    assert protocol.parse(protocol.encode(command)) == command


def test_control_words():
    assert all(protocol.is_control_word(w) for w in (b"OK", b"EXIT", b"PONG"))
    assert not protocol.is_control_word(b"\nOK")
