"""chatd.batchsend against real sockets on loopback: every receiver gets the payload once.

The ``sendto`` loop is the reference: whatever the batched path does, it must
send the same datagrams and count the same errors. Sends on loopback are
synchronous (the datagram is in the receiver's queue when the call returns),
so "nothing more arrived" is checked with a non-blocking read, not a sleep.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from chatd import batchsend
from chatd.batchsend import BatchSender, send_to_many

PAYLOAD = "\nalice says: héllo".encode()


class Receivers:
    """Bound UDP sockets with room for a few datagrams each."""

    def __init__(self, count: int, family: int = socket.AF_INET, host: str = "127.0.0.1"):
        self.socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            self.socks.append(sock)
            sock.bind((host, 0))
        self.addrs = [s.getsockname() for s in self.socks]

    def expect_once(self, payload: bytes) -> None:
        """Each socket holds exactly one datagram, ``payload``."""
        for sock in self.socks:
            sock.settimeout(2.0)
            assert sock.recv(65536) == payload
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(65536)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def receivers() -> Iterator[type[Receivers]]:
    made: list[Receivers] = []

    def make(*args, **kwargs) -> Receivers:
        made.append(Receivers(*args, **kwargs))
        return made[-1]

    yield make  # type: ignore[misc]
    for group in made:
        group.close()


@pytest.fixture
def sender_sock() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    yield sock
    sock.close()


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_sendmmsg = pytest.mark.skipif(not batchsend.available(), reason="no sendmmsg here")


@needs_sendmmsg
def test_many_receivers_get_the_payload_exactly_once(receivers, sender_sock):
    group = receivers(1100)  # more than one kernel batch of 1024
    sent, errors = send_to_many(sender_sock, PAYLOAD, group.addrs)
    assert (sent, errors) == (1100, Counter())
    group.expect_once(PAYLOAD)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_small_batches_split_the_list_without_loss_or_repeat(receivers, sender_sock, batch):
    group = receivers(50)
    sent, errors = BatchSender(batch=batch, min_batch=1).send(sender_sock, PAYLOAD, group.addrs)
    assert (sent, errors) == (50, Counter())
    group.expect_once(PAYLOAD)


def test_cached_headers_are_reused_and_follow_new_payloads(receivers, sender_sock):
    group = receivers(20)
    sender = BatchSender(min_batch=1)
    for payload in (b"first", b"second, longer than the first", b"x"):
        assert sender.send(sender_sock, payload, group.addrs) == (20, Counter())
        group.expect_once(payload)
        for sock in group.socks:
            sock.setblocking(True)


def test_one_address_and_no_address(receivers, sender_sock):
    group = receivers(1)
    assert send_to_many(sender_sock, PAYLOAD, []) == (0, Counter())
    assert send_to_many(sender_sock, PAYLOAD, group.addrs) == (1, Counter())
    group.expect_once(PAYLOAD)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_receivers_with_two_and_four_tuples(receivers):
    group = receivers(30, socket.AF_INET6, "::1")
    addrs = [a if i % 2 else a[:2] for i, a in enumerate(group.addrs)]
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        assert send_to_many(sock, PAYLOAD, addrs) == (30, Counter())
    group.expect_once(PAYLOAD)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv4_mapped_receivers_on_a_dual_stack_socket(receivers):
    """What chatd's default dual-stack socket sees: IPv4 clients as ``::ffff:a.b.c.d``."""
    group = receivers(10)
    addrs = [(f"::ffff:{host}", port, 0, 0) for host, port in group.addrs]
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        assert send_to_many(sock, PAYLOAD, addrs) == (10, Counter())
    group.expect_once(PAYLOAD)


def _mixed_addresses(group: Receivers) -> list:
    """Good receivers with bad addresses between them: in the kernel batch and outside it."""
    good = group.addrs
    return [
        ("127.0.0.1", 0),  # EINVAL from the kernel, in the middle of a batch
        good[0],
        ("255.255.255.255", good[1][1]),  # EACCES: broadcast without SO_BROADCAST
        good[1],
        ["127.0.0.1", good[2][1]],  # unhashable: goes through sendto, which accepts lists
        good[2],
        ("::1", good[3][1]),  # IPv6 literal on an IPv4 socket
        ("localhost", good[3][1]),  # a name: sendto resolves it (good[3]'s only copy)
        ("127.0.0.1", 70000),  # port out of range
        ("127.0.0.1",),  # malformed
        None,
        *good[4:],
        ("127.0.0.1", 0),  # a failure as the very last message
    ]


@pytest.mark.parametrize("use_sendmmsg", [True, False], ids=["sendmmsg", "sendto"])
def test_errors_are_counted_never_raised_and_the_rest_still_goes(receivers, sender_sock,
                                                                 use_sendmmsg):
    group = receivers(12)
    addrs = _mixed_addresses(group)
    reference = Counter()
    expected_sent = batchsend._sendto_loop(sender_sock, PAYLOAD, addrs, reference)
    for sock in group.socks:  # the reference run delivered once: read it
        assert sock.recv(65536) == PAYLOAD
    assert reference["EINVAL"] == 2 and reference["EACCES"] == 1
    assert expected_sent == 12

    sent, errors = BatchSender(batch=4, use_sendmmsg=use_sendmmsg, min_batch=1).send(
        sender_sock, PAYLOAD, addrs)
    assert (sent, errors) == (expected_sent, reference)
    group.expect_once(PAYLOAD)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def recverr_sock() -> Iterator[socket.socket]:
    """A sender like chatd's: ICMP errors are queued and reported by the next send."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVERR", 11), 1)
    yield sock
    sock.close()


@pytest.mark.parametrize("use_sendmmsg", [True, False], ids=["sendmmsg", "sendto"])
def test_a_pending_icmp_error_does_not_cost_the_next_datagram(receivers, recverr_sock,
                                                             use_sendmmsg):
    """The datagram that reports an earlier one's ECONNREFUSED was not sent: it is retried."""
    group = receivers(6)
    gone = ("127.0.0.1", closed_port())
    recverr_sock.sendto(b"x", gone)  # loopback answers with ICMP port unreachable at once
    sender = BatchSender(use_sendmmsg=use_sendmmsg, min_batch=1)
    assert sender.send(recverr_sock, PAYLOAD, group.addrs) == (6, Counter({"ECONNREFUSED": 1}))
    group.expect_once(PAYLOAD)


@needs_sendmmsg
def test_an_icmp_error_in_the_middle_of_a_batch_is_flagged_and_costs_nothing(receivers,
                                                                             recverr_sock):
    group = receivers(6)
    gone = ("127.0.0.1", closed_port())
    addrs = [*group.addrs[:3], gone, *group.addrs[3:]]
    sent, errors = BatchSender(min_batch=1).send(recverr_sock, PAYLOAD, addrs)
    # the kernel swallowed the ECONNREFUSED (messages had gone out): counted as unreported
    assert (sent, errors) == (7, Counter({batchsend.UNREPORTED: 1}))
    group.expect_once(PAYLOAD)
    # and the ICMP report itself waits on the error queue, for the server to read
    _, _, _, addr = recverr_sock.recvmsg(1, 512, getattr(socket, "MSG_ERRQUEUE", 0x2000))
    assert addr == gone


def test_a_payload_too_large_fails_for_each_address(receivers, sender_sock):
    group = receivers(5)
    sent, errors = send_to_many(sender_sock, b"x" * 70000, group.addrs)
    assert (sent, errors) == (0, Counter({"EMSGSIZE": 5}))


def test_a_closed_socket_is_counted_not_raised(receivers):
    group = receivers(3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    sent, errors = send_to_many(sock, PAYLOAD, group.addrs)
    assert sent == 0 and sum(errors.values()) == 3 and set(errors) == {"EBADF"}


def test_fallback_when_sendmmsg_is_missing(receivers, sender_sock, monkeypatch):
    monkeypatch.setattr(batchsend, "_sendmmsg", None)
    assert not batchsend.available()
    sender = BatchSender(min_batch=1)
    assert not sender.use_sendmmsg
    group = receivers(40)
    assert sender.send(sender_sock, PAYLOAD, group.addrs) == (40, Counter())
    group.expect_once(PAYLOAD)


@needs_sendmmsg
def test_enosys_switches_to_sendto_for_the_rest(receivers, sender_sock, monkeypatch):
    """A seccomp filter may refuse the call: what the kernel did send is not sent twice."""
    real = batchsend._sendmmsg
    calls = []

    def first_works_then_enosys(fd, vector, count, flags):
        calls.append(count)
        if len(calls) == 1:
            return real(fd, vector, min(count, 5), flags)
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(batchsend, "_sendmmsg", first_works_then_enosys)
    sender = BatchSender(min_batch=1)
    group = receivers(30)
    assert sender.send(sender_sock, PAYLOAD, group.addrs) == (30, Counter())
    group.expect_once(PAYLOAD)
    assert not sender.use_sendmmsg and len(calls) == 2


@needs_sendmmsg
def test_partial_sends_resume_where_the_kernel_stopped(receivers, sender_sock, monkeypatch):
    real = batchsend._sendmmsg
    calls = []

    def at_most_three(fd, vector, count, flags):
        calls.append(count)
        return real(fd, vector, min(count, 3), flags)

    monkeypatch.setattr(batchsend, "_sendmmsg", at_most_three)
    group = receivers(20)
    # the kernel stops early only on an error it then does not name: each is counted
    assert BatchSender(min_batch=1).send(sender_sock, PAYLOAD, group.addrs) == (
        20, Counter({batchsend.UNREPORTED: 6}))
    group.expect_once(PAYLOAD)
    assert len(calls) == 7


@needs_sendmmsg
def test_interrupted_calls_are_retried(receivers, sender_sock, monkeypatch):
    real = batchsend._sendmmsg
    calls = []

    def interrupted_once(fd, vector, count, flags):
        calls.append(count)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return real(fd, vector, count, flags)

    monkeypatch.setattr(batchsend, "_sendmmsg", interrupted_once)
    group = receivers(10)
    assert BatchSender(min_batch=1).send(sender_sock, PAYLOAD, group.addrs) == (10, Counter())
    group.expect_once(PAYLOAD)


def test_the_cache_is_bounded(receivers, sender_sock, monkeypatch):
    """Clients come and go: their cached headers are dropped, never a sent datagram."""
    monkeypatch.setattr(batchsend, "MAX_CACHED", 8)
    sender = BatchSender(min_batch=1)
    for _ in range(3):
        group = receivers(10)
        assert sender.send(sender_sock, PAYLOAD, group.addrs) == (10, Counter())
        group.expect_once(PAYLOAD)
        assert len(sender._caches[socket.AF_INET]) <= 8 + 10


@pytest.mark.parametrize("payload", [bytearray(PAYLOAD), memoryview(PAYLOAD)],
                         ids=["bytearray", "memoryview"])
def test_other_bytes_like_payloads(receivers, sender_sock, payload):
    group = receivers(20)
    assert send_to_many(sender_sock, payload, group.addrs) == (20, Counter())
    group.expect_once(PAYLOAD)


def test_a_text_payload_is_an_error_not_an_exception(receivers, sender_sock):
    group = receivers(3)
    assert send_to_many(sender_sock, "text", group.addrs) == (0, Counter({"TypeError": 3}))


@pytest.mark.parametrize("min_batch", [1, 1000], ids=["sendmmsg", "sendto"])
def test_a_full_send_buffer_hands_back_the_unsent_addresses_in_order(tmp_path, min_batch):
    """AF_UNIX datagram sockets block when the receiver's queue is full (UDP on loopback
    never does), so they stand in for a NIC whose queue is full."""
    receivers = []
    for i in range(3):
        r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        r.bind(str(tmp_path / f"r{i}"))
        receivers.append(r)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    addrs = [str(tmp_path / f"r{i % 3}") for i in range(300)]
    try:
        unsent: list = []
        sent, errors = BatchSender(min_batch=min_batch).send(sender, PAYLOAD, addrs, unsent)
        assert 0 < sent < 300 and errors == Counter({"EAGAIN": 1})
        assert unsent == addrs[sent:]
        assert send_to_many(sender, PAYLOAD, addrs[:5]) == (0, Counter({"EAGAIN": 5}))
    finally:
        for sock in (*receivers, sender):
            sock.close()
