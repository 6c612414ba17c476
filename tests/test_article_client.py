"""The original article's client works against chatd unmodified.

The first test replays its exchange byte for byte. The second runs the
article's own client code, read at test time from the reference copy of the
article (it is not part of this project), under a pseudo-terminal.
"""

import re
import socket
import sys
from pathlib import Path

import pexpect
import pytest
from helpers import UdpUser

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "original-article.txt"


def test_the_articles_exchange_byte_for_byte(chatd):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # as the article's client does
    s.settimeout(5)
    other = UdpUser(chatd.addr)
    try:
        other.join("bob")
        s.sendto(b"L bob", chatd.addr)
        data, _ = s.recvfrom(1024)
        assert data.decode() != "OK"  # the refusal is one datagram, printed as is
        s.sendto(b"L alice", chatd.addr)
        data, _ = s.recvfrom(1024)
        assert data.decode() == "OK"
        assert other.recv_text() == "\nalice joined the room"
        s.sendto(("C %s %s" % ("alice", "how are you")).encode(), chatd.addr)  # noqa: UP031
        assert other.recv_text() == "\nalice says: how are you"
        other.say("fine")
        data, _ = s.recvfrom(1024)
        assert data.decode() == "\nbob says: fine"
        s.sendto(b"Q alice", chatd.addr)
        data, _ = s.recvfrom(1024)
        assert data.decode() == "EXIT"
        assert other.recv_text() == "\nalice left the room"
    finally:
        s.close()
        other.close()


def _article_client(tmp_path: Path) -> Path:
    text = SEED.read_text(encoding="utf-8")
    match = re.search(r"^客户端:\n(.*?)^相关文章", text, re.S | re.M)
    assert match, "the client part of the article was not found"
    path = tmp_path / "article_client.py"
    path.write_text(match.group(1), encoding="utf-8")
    return path


@pytest.mark.skipif(not SEED.exists(), reason=f"reference article not present at {SEED}")
def test_the_articles_own_client_unmodified(make_chatd, tmp_path):
    server = make_chatd({"room": {"locale": "zh_CN"}})
    client_path = _article_client(tmp_path)
    bob = UdpUser(server.addr)
    child = pexpect.spawn(sys.executable, [str(client_path), "127.0.0.1", str(server.port)],
                          encoding="utf-8", timeout=10)
    try:
        bob.join("bob")
        child.expect("请输入用户名:")
        child.sendline("bob")
        child.expect("该用户已存在")
        child.expect("请输入用户名:")
        child.sendline("alice")
        child.expect("@进入聊天室@")
        assert bob.recv().decode() == "\n欢迎 alice 进入聊天室"
        bob.say("你好 alice")
        child.expect("bob 说: 你好 alice")
        child.sendline("hello bob")
        assert bob.recv().decode() == "\nalice 说: hello bob"
        child.sendline("quit")
        child.expect(pexpect.EOF)
        assert bob.recv().decode() == "\nalice 离开了聊天室"
    finally:
        child.close(force=True)
        bob.close()
