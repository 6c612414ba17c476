"""Passing for the admin or for someone else, against a real chatd over UDP.

A chat text with line breaks used to print a fake admin line on the
article's client and ``nc``, which print datagrams raw; a name spelt with a
Cyrillic or Greek letter used to pass for ``admin`` or ``alice``.
"""

from helpers import UdpUser


def test_a_chat_text_cannot_start_a_fake_admin_line(users):
    alice = users("alice")
    mallory = users("mallory")
    assert alice.recv_text() == "\nmallory joined the room"
    mallory.send("C mallory hi\n\nadmin says: reboot now")
    line = alice.recv()
    assert line == b"\nmallory says: hi\\x0a\\x0aadmin says: reboot now"
    assert b"\n" not in line[1:] and b"\r" not in line
    mallory.send("C mallory /me waves\r\nadmin says: reboot now\n")  # nc's newline is forgiven
    assert alice.recv() == b"\n* mallory waves\\x0d\\x0aadmin says: reboot now"
    mallory.send("C mallory /msg alice \u202ewon reboot\n\n")
    assert alice.recv() == b"\nmallory says to you: \\u202ewon reboot\\x0a"
    mallory.say("end")  # the next datagram alice gets: nothing came in between
    assert alice.recv() == b"\nmallory says: end"


def test_lookalike_names_are_refused_while_the_real_one_is_in(users):
    alice = users("alice")
    stranger = users()
    for name, like in (("\u0430dmin", "admin"), ("\u0391lice", "alice"), ("AIice", "alice")):
        assert stranger.login(name) == f"\nthe name {name} looks too much like {like}".encode()
    assert alice.quit() == b"EXIT"
    assert stranger.login("\u0391lice") == b"OK"  # alice has left: the name is free
    assert alice.login("alice") == "\nthe name alice looks too much like \u0391lice".encode()


def test_names_that_merely_differ_are_welcome(users):
    bob = users("bob")
    users("rob")  # users() asserts the OK
    users("bobby")
    b0b = users()
    assert b0b.login("b0b") == b"\nthe name b0b looks too much like bob"  # TR39: 0 is O
    bob.quit()
    assert b0b.login("b0b") == b"OK"


def test_zh_cn_refuses_lookalikes_with_the_articles_words(make_chatd):
    server = make_chatd({"room": {"locale": "zh_CN"}})
    user = UdpUser(server.addr)
    try:
        assert user.login("\u0430dmin") == b"OK"  # admin is nobody there: 管理员 is
        other = UdpUser(server.addr)
        try:
            assert other.login("admin") == "该用户已存在".encode()
        finally:
            other.close()
    finally:
        user.close()
