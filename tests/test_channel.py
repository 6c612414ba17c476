"""The control channel's framing, over real socketpairs: JSON lines both ways, bounded."""

from __future__ import annotations

import socket

import pytest

from chatd.control.channel import MAX_DEPTH, LineChannel, decode, encode


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_messages_cross_whole_however_the_bytes_arrive(pair):
    left, right = pair
    receiver = LineChannel(right)
    data = encode({"cmd": "say", "args": {"text": "hi"}}) + encode({"id": 2, "ok": True})
    for i in range(len(data)):  # one byte at a time
        left.send(data[i:i + 1])
        assert receiver.read()
    assert [receiver.decode(line) for line in receiver.take_lines()] == [
        {"cmd": "say", "args": {"text": "hi"}}, {"id": 2, "ok": True}]
    assert receiver.take_lines() == []


def test_a_full_socket_keeps_the_rest_until_it_is_writable(pair):
    left, right = pair
    left.setblocking(False)
    right.setblocking(False)
    sender, receiver = LineChannel(left), LineChannel(right, max_depth=None)
    big = {"result": "x" * 4_000_000}  # more than both socket buffers hold
    assert sender.send(big) is False and sender.pending
    got = []
    while sender.pending or not got:
        assert receiver.read()
        got += receiver.take_lines()
        sender.flush()
    assert [receiver.decode(line) for line in got] == [big]


def test_an_over_long_line_is_counted_and_dropped_before_its_newline(pair):
    left, right = pair
    receiver = LineChannel(right, max_line=10)
    left.sendall(b"0123456789A")  # 11 bytes, no newline yet
    assert receiver.read() and receiver.too_long == 1
    left.sendall(b"BC\n{}\n")
    assert receiver.read()
    assert receiver.take_lines() == [b"{}"]  # the tail of the long one never became a line


def test_read_line_waits_for_a_whole_line_and_says_when_the_other_end_closed(pair):
    left, right = pair
    right.settimeout(5)
    receiver = LineChannel(right)
    left.sendall(b'{"event": "ready"}\n{"ev')
    assert receiver.decode(receiver.read_line()) == {"event": "ready"}
    left.close()
    assert receiver.read_line() is None  # a line cut short is no line


def test_decode_says_what_is_wrong():
    with pytest.raises(ValueError, match="not UTF-8"):
        decode(b'{"cmd": "\xff"}')
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        decode(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert decode(b"[" * 100 + b"]" * 100, max_depth=None)  # a trusted end: no bound
    with pytest.raises(ValueError):
        decode(b"this is not json")
