"""The room end to end: ``chatd run`` in a subprocess, real UDP on 127.0.0.1."""

import os
import signal

import pytest
from helpers import UdpUser, wait_for


def test_login_chat_fanout_and_quit(users):
    alice, bob, carol = users("alice"), users("bob"), users("carol")
    assert alice.recv_text() == "\nbob joined the room"
    alice.say("hello  everyone")
    assert bob.recv_text() == "\ncarol joined the room"
    assert bob.recv_text() == "\nalice says: hello  everyone"
    assert carol.recv_text() == "\nalice says: hello  everyone"
    assert alice.recv_text() == "\ncarol joined the room"
    carol.say("hi alice")  # the sender is excluded: alice's next line is carol's
    assert alice.recv_text() == "\ncarol says: hi alice"
    assert bob.quit() == b"\ncarol says: hi alice"
    assert bob.recv() == b"EXIT"
    assert alice.recv_text() == "\nbob left the room"


@pytest.mark.parametrize("other", ["alice", "Alice", "ALICE", "Ａｌｉｃｅ"])
def test_duplicate_names_refused(users, other):
    users("alice")
    intruder = users()
    assert intruder.login(other) == f"\nthe name {other} is already taken".encode()


def test_admin_name_refused_and_udp_admin_lines_not_broadcast(users):
    alice, bob = users("alice"), users("bob")
    alice.recv()  # bob joined
    stranger = users()
    assert stranger.login("admin") == b"\nthe name admin is already taken"
    stranger.send("C admin everyone must leave")
    bob.send("C admin i am the admin")
    bob.say("barrier")
    assert alice.recv_text() == "\nbob says: barrier"  # nothing came before it


def test_spoofed_chat_and_quit_from_a_third_address_are_dropped(users, chatd):
    alice, bob = users("alice"), users("bob")
    alice.recv()
    mallory = users()
    mallory.send("C alice send me your password")
    mallory.send("Q bob")
    bob.send("Q alice")
    alice.say("still here")
    assert bob.recv_text() == "\nalice says: still here"
    bob.say("me too")
    assert alice.recv_text() == "\nbob says: me too"
    dropped = [e for e in chatd.log_events() if e["event"] == "datagram_dropped"]
    assert {e["reason"] for e in dropped} >= {"no_session", "spoofed"}


def test_repeated_login_is_ok_again_and_other_name_refused(users):
    alice = users("alice")
    assert alice.login("alice") == b"OK"
    assert alice.login("bob") == b"\nthis address is already logged in as alice"


def test_keepalive_pong(users):
    assert users("alice").ping() == b"PONG"


def test_1024_byte_cap(users):
    alice, bob = users("alice"), users("bob")
    alice.recv()
    room = 1024 - len(b"\nalice says: ")
    alice.say("x" * room)
    assert len(bob.recv()) == 1024
    alice.say("x" * (room + 1))
    assert alice.recv_text() == "\nline not sent: longer than 1024 bytes"
    alice.say("é" * 600)
    assert alice.recv_text() == "\nline not sent: longer than 1024 bytes"


BAD_DATAGRAMS = [
    b"",
    b"\xff\xfe\xfd",
    b"L",
    b"C",
    b"Q",
    b"P",
    b"Z what",
    b"L " + b"a" * 40,
    b"L bad\x1bname",
    b"\x00" * 100,
    b"C alice " + b"x" * 65000,
    b"x" * 65507,
]


@pytest.mark.parametrize("junk", BAD_DATAGRAMS, ids=range(len(BAD_DATAGRAMS)))
def test_bad_datagrams_never_stop_the_room(users, junk):
    alice, bob = users("alice"), users("bob")
    alice.recv()
    alice.send(junk)
    users().send(junk)
    alice.drain()
    bob.say("still working")
    assert alice.recv_text() == "\nbob says: still working"


def test_zh_cn_exact_texts(make_chatd):
    server = make_chatd({"room": {"locale": "zh_CN"}})
    a, b, c = (UdpUser(server.addr) for _ in range(3))
    try:
        a.join("小明")
        b.join("小红")
        assert a.recv().decode() == "\n欢迎 小红 进入聊天室"
        b.say("你好")
        assert a.recv().decode() == "\n小红 说: 你好"
        assert c.login("小明").decode() == "该用户已存在"
        assert c.login("管理员").decode() == "该用户已存在"
        assert b.quit() == b"EXIT"
        assert a.recv().decode() == "\n小红 离开了聊天室"
    finally:
        for user in (a, b, c):
            user.close()


def test_session_timeout_only_after_a_ping(make_chatd):
    server = make_chatd({"room": {"session_timeout": 1}})
    pinger, silent, watcher = (UdpUser(server.addr) for _ in range(3))
    try:
        watcher.join("watcher")
        silent.join("silent")
        pinger.join("pinger")
        assert pinger.ping() == b"PONG"
        assert watcher.recv_text() == "\nsilent joined the room"
        assert watcher.recv_text() == "\npinger joined the room"
        assert watcher.recv_text(timeout=10) == "\npinger left the room (timed out)"
        silent.say("I never pinged and I am still here")
        assert watcher.recv_text() == "\nsilent says: I never pinged and I am still here"
    finally:
        for user in (pinger, silent, watcher):
            user.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_tells_everyone_and_exits_0(make_chatd, signum):
    server = make_chatd()
    alice, bob = UdpUser(server.addr), UdpUser(server.addr)
    try:
        alice.join("alice")
        bob.join("bob")
        alice.recv()
        server.signal(signum)
        for user in (alice, bob):
            assert user.recv_text() == "\nthe server is shutting down"
            assert user.recv() == b"EXIT"
        assert server.proc.wait(10) == 0
        assert server.notify.wait("STOPPING", "1")
        events = [e["event"] for e in server.log_events()]
        assert "server_stopping" in events and "server_started" in events
    finally:
        alice.close()
        bob.close()


def test_logs_are_json_lines_with_the_required_fields(users, chatd):
    alice = users("alice")
    alice.say("secret words")
    alice.quit()

    def events_through_user_left():  # EXIT is sent before the event is logged
        events = chatd.log_events()
        return events if any(e["event"] == "user_left" for e in events) else None

    events = wait_for(events_through_user_left, what="user_left in the log")
    started = next(e for e in events if e["event"] == "server_started")
    assert started["port"] == chatd.port and started["pid"] == chatd.proc.pid
    assert started["timestamp"].endswith("Z") and started["level"] == "info"
    joined = next(e for e in events if e["event"] == "user_joined")
    assert joined["name"] == "alice" and joined["addr"].startswith("127.0.0.1:")
    left = next(e for e in events if e["event"] == "user_left")
    assert left["reason"] == "quit"
    chat = [e for e in events if e["event"] == "chat"]
    assert chat and all(e["level"] == "debug" for e in chat)


def test_chat_text_not_logged_at_info(make_chatd):
    server = make_chatd({"log": {"level": "info"}})
    alice = UdpUser(server.addr)
    try:
        alice.join("alice")
        alice.say("top secret")
        alice.ping()
        assert "top secret" not in server.log_path.read_text()
    finally:
        alice.close()


def test_junk_flood_is_logged_at_a_bounded_rate(users, chatd):
    alice, bob = users("alice"), users("bob")
    alice.recv()
    junk = users()
    for _ in range(2000):
        junk.send(b"\xff junk")
    bob.ping()
    bob.say("after the flood")
    assert alice.recv_text() == "\nbob says: after the flood"
    dropped = [e for e in chatd.log_events() if e["event"] == "datagram_dropped"]
    assert 1 <= len(dropped) <= 100


# -- reloading a hostile or broken file (issue 13) ------------------------------------------------


def _laughs() -> str:
    lines = ["lol:", "  m0: &m0 {k0: x, k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x, "
             "k9: x}"]
    lines += [f"  m{n}: &m{n} {{" + ", ".join(f"k{i}: *m{n - 1}" for i in range(10)) + "}"
              for n in range(1, 10)]
    return "\n".join(lines) + "\n"


HOSTILE_FILES = {
    "600 levels deep": ("plugins: " + "[" * 600 + "]" * 600 + "\n", "nested more than 32"),
    "100000 levels deep": ("plugins: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest"),
    "billion laughs": (_laughs(), "more than 10000 keys, values and list items"),
    "duplicate key": ("listen: {port: 1, port: 2}\n", "listen.port: duplicate key"),
    "2 MiB": ("#" * (2 << 20) + "\n", f"too large ({(2 << 20) + 1} bytes)"),
    "a FIFO": (None, "not a regular file (a FIFO)"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_sighup_with_a_hostile_file_keeps_the_room_serving(users, chatd, name):
    text, error = HOSTILE_FILES[name]
    alice = users("alice")
    if text is None:
        chatd.config.unlink()
        os.mkfifo(chatd.config)  # nobody will ever write to it
    else:
        chatd.config.write_text(text)
    chatd.reload()  # RELOADING=1, then READY=1
    failed = wait_for(lambda: [e for e in chatd.log_events() if e["event"] == "reload_failed"],
                      what="reload_failed")
    assert error in failed[0]["error"]
    assert alice.ping() == b"PONG"
    users("bob")  # joins: the room still takes logins
    assert chatd.proc.poll() is None


@pytest.mark.timeout(60)
def test_sighup_with_a_bad_plugin_option_names_its_line_and_changes_nothing(users, chatd):
    alice = users("alice")
    text = chatd.config.read_text() + "room:\n  max_users: 1\nplugins:\n  history:\n    size: 0\n"
    chatd.config.write_text(text)
    chatd.reload()
    failed = wait_for(lambda: [e for e in chatd.log_events() if e["event"] == "reload_failed"],
                      what="reload_failed")
    line = len(text.splitlines())
    assert f"{chatd.config}, line {line}: plugins.history.size: must be at least 1" in (
        failed[0]["error"])
    assert alice.ping() == b"PONG"
    users("bob")  # max_users: 1 was not applied either
    assert not [e for e in chatd.log_events() if e["event"] == "reloaded"]
