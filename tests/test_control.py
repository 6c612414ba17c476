"""The control channel: the admin child, its socket and FIFO, and chatctl."""

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pexpect
import pytest
import yaml
from helpers import Notifications, UdpUser, children_of, state_of, wait_for, write_config

from chatd.control import channel
from chatd.control.client import request
from chatd.control.files import MAX_CONNECTIONS
from chatd.log import BOUNDED_BURST, BOUNDED_PER_SECOND


def chatctl(server, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(server.config),
                           *args], capture_output=True, text=True, timeout=timeout)


def chatctl_json(server, *args):
    result = chatctl(server, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_request(path, data: bytes, timeout=5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # a refused peer may be cut off before it writes
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return json.loads(answer)


def test_say_who_kick(users, chatd):
    alice, bob = users("alice"), users("bob")
    alice.recv()
    result = chatctl(chatd, "say", "meeting", "at", "noon")
    assert result.returncode == 0, result.stderr
    assert "said to 2 users" in result.stdout
    for user in (alice, bob):
        assert user.recv_text() == "\nadmin says: meeting at noon"
    who = chatctl_json(chatd, "who")
    assert sorted(u["name"] for u in who) == ["alice", "bob"]
    assert all(u["addr"].startswith("127.0.0.1:") and "login_time" in u and "idle" in u
               for u in who)
    human = chatctl(chatd, "who").stdout
    assert "alice" in human and "NAME" in human
    result = chatctl(chatd, "kick", "bob", "too", "loud")
    assert result.returncode == 0, result.stderr
    assert bob.recv_text() == "\nyou were removed from the room: too loud"
    assert bob.recv() == b"EXIT"
    assert alice.recv_text() == "\nbob was removed from the room: too loud"
    assert [u["name"] for u in chatctl_json(chatd, "who")] == ["alice"]
    missing = chatctl(chatd, "kick", "nobody")
    assert missing.returncode == 1 and "no such user: nobody" in missing.stderr


def test_say_too_long_is_refused(users, chatd):
    users("alice")
    result = chatctl(chatd, "say", "x" * 2000)
    assert result.returncode == 1 and "too long" in result.stderr


def test_status_counters_move(users, chatd):
    before = chatctl_json(chatd, "status")
    assert before["pid"] == chatd.proc.pid
    assert before["address"] == f"127.0.0.1:{chatd.port}"
    assert before["admin_child_pid"] in children_of(chatd.proc.pid)
    alice, bob = users("alice"), users("bob")
    alice.say("one")
    bob.send(b"\xff")
    bob.ping()
    after = chatctl_json(chatd, "status")
    assert after["users"] == 2
    assert after["counters"]["datagrams_in"] >= before["counters"].get("datagrams_in", 0) + 4
    assert after["counters"]["datagrams_out"] > before["counters"].get("datagrams_out", 0)
    assert after["drops"]["bad_utf8"] == 1
    human = chatctl(chatd, "status").stdout
    assert "users:        2 of 1000" in human and "bad_utf8 1" in human


def test_chatd_status_uses_the_channel(users, chatd):
    users("alice")
    result = subprocess.run([sys.executable, "-m", "chatd", "status", "-c", str(chatd.config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert f"udp 127.0.0.1:{chatd.port}" in result.stdout and "users: 1 of 1000" in result.stdout


def test_reload_reports_the_validation_error(users, chatd):
    alice = users("alice")
    good = chatd.config.read_text()
    chatd.config.write_text(good + "room:\n  max_users: lots\n")
    result = chatctl(chatd, "reload")
    assert result.returncode == 1
    assert "room.max_users: expected an integer" in result.stderr
    chatd.config.write_text(good.replace("level: debug", "level: info"))
    result = chatctl(chatd, "reload")
    assert result.returncode == 0 and "reloaded" in result.stdout
    assert alice.ping() == b"PONG"  # still logged in


def test_fifo_line_is_broadcast(users, chatd):
    alice = users("alice")
    fifo = chatd.runtime_dir / "control.fifo"
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o620
    with open(fifo, "w") as f:
        f.write("say backup at 2am\n")
    assert alice.recv_text() == "\nadmin says: backup at 2am"
    with open(fifo, "w") as f:
        f.write("kick alice bye now\n")
    assert alice.recv_text() == "\nyou were removed from the room: bye now"


def test_socket_mode(make_chatd):
    server = make_chatd({"control": {"mode": "0600"}})
    assert stat.S_IMODE((server.runtime_dir / "control.sock").stat().st_mode) == 0o600
    default = make_chatd()
    assert stat.S_IMODE((default.runtime_dir / "control.sock").stat().st_mode) == 0o660


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_peer_of_another_uid_is_refused(make_chatd):
    # a directory "nobody" can reach, so that only the peer check can refuse it
    shared = tempfile.mkdtemp(prefix="chatd-test-", dir="/tmp")
    os.chmod(shared, 0o755)
    path = os.path.join(shared, "control.sock")
    try:
        server = make_chatd({"control": {"mode": "0666", "socket": path}})
        answer = as_nobody(lambda: raw_request(path, b'{"cmd": "who"}\n'))
        assert answer.get("ok") is False, answer
        assert "permission denied" in answer["error"]
        wait_for(lambda: any(e["event"] == "control_refused" for e in server.log_events()),
                 what="control_refused in the log")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_admin_child_respawns_after_sigkill(users, chatd):
    alice = users("alice")
    first = chatctl_json(chatd, "status")["admin_child_pid"]
    os.kill(first, signal.SIGKILL)

    def new_child():
        result = chatctl(chatd, "status", "--json")
        if result.returncode != 0:
            return None
        pid = json.loads(result.stdout)["admin_child_pid"]
        return pid if pid not in (None, first) else None

    second = wait_for(new_child, timeout=15, what="a new admin child")
    assert state_of(second) not in (None, "Z")
    assert all(state_of(pid) != "Z" for pid in children_of(chatd.proc.pid))
    assert first not in children_of(chatd.proc.pid)
    assert [u["name"] for u in chatctl_json(chatd, "who")] == ["alice"]
    assert alice.ping() == b"PONG"


def test_admin_child_exits_when_the_daemon_is_killed(make_chatd):
    server = make_chatd()
    child = chatctl_json(server, "status")["admin_child_pid"]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_for(lambda: state_of(child) in (None, "Z"), timeout=10, what="the admin child to exit")


def test_silent_and_garbage_peers_do_not_block(users, chatd):
    alice = users("alice")
    path = chatd.runtime_dir / "control.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(path))
    try:
        started = time.monotonic()
        result = chatctl(chatd, "say", "despite the silent one")
        assert result.returncode == 0, result.stderr
        assert alice.recv_text() == "\nadmin says: despite the silent one"
        assert time.monotonic() - started < 4  # well under the 5 s peer timeout
        garbage = raw_request(path, b"this is not json\n")
        assert garbage["ok"] is False and "malformed request" in garbage["error"]
        shape = raw_request(path, b"[1, 2]\n")
        assert shape["ok"] is False and "malformed request" in shape["error"]
        unknown = raw_request(path, b'{"cmd": "dance"}\n')
        assert unknown["ok"] is False and "unknown command" in unknown["error"]
        assert raw_request(path, b'{"cmd": "who"}\n')["ok"] is True
    finally:
        silent.close()


def test_chatctl_against_a_stopped_daemon(make_chatd):
    server = make_chatd()
    server.stop()
    result = chatctl(server, "who")
    assert result.returncode == 3
    assert str(server.runtime_dir / "control.sock") in result.stderr


def test_chatctl_usage_error():
    result = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "dance"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2


def test_kick_usage_says_only_the_name_is_required():
    result = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "kick"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "required: NAME\n" in result.stderr, result.stderr


def test_kick_without_a_reason(users, chatd):
    alice = users("alice")
    result = chatctl(chatd, "kick", "alice")
    assert result.returncode == 0, result.stderr
    assert alice.recv_text() == "\nyou were removed from the room: kicked by the admin"
    assert alice.recv() == b"EXIT"


def test_graceful_stop_removes_socket_and_fifo_and_reaps_the_child(make_chatd):
    server = make_chatd()
    child = chatctl_json(server, "status")["admin_child_pid"]
    assert server.stop() == 0
    assert not (server.runtime_dir / "control.sock").exists()
    assert not (server.runtime_dir / "control.fifo").exists()
    assert not (server.runtime_dir / "chatd.pid").exists()
    assert state_of(child) is None  # reaped by the daemon, not a zombie


def test_plugins_lists_state_and_failures(make_chatd):
    server = make_chatd({"plugins": {"wordfilter": {"words": ["darn"]}, "ratelimit": False}})
    plugins = {p["name"]: p for p in chatctl_json(server, "plugins")}
    assert plugins["wordfilter"]["enabled"] and plugins["who"]["enabled"]
    assert not plugins["ratelimit"]["enabled"] and plugins["ratelimit"]["reason"] == "config"
    assert all("failures" in p and "calls" in p for p in plugins.values())
    human = chatctl(server, "plugins").stdout
    assert "wordfilter" in human and "off (config)" in human


def test_run_reports_a_control_socket_it_cannot_create(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = write_config(tmp_path, {"control": {"socket": str(blocker / "control.sock")}})
    result = subprocess.run([sys.executable, "-m", "chatd", "run", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot create control socket" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "chatd.pid").exists()


def test_lines_typed_at_chatd_run_are_said(tmp_path):
    """As in the article's server: under ``chatd run`` in a terminal, typed lines go to all."""
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    notify = Notifications()
    child = pexpect.spawn(sys.executable, ["-m", "chatd", "run", "-c", str(config)],
                          env={**os.environ, "NOTIFY_SOCKET": notify.name}, timeout=15)
    alice = UdpUser(("127.0.0.1", port))
    try:
        notify.wait("READY", "1")
        alice.join("alice")
        child.sendline("hello from the console")
        assert alice.recv_text() == "\nadmin says: hello from the console"
        child.sendintr()  # Ctrl-C stops the server gracefully
        assert alice.recv_text() == "\nthe server is shutting down"
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)
        alice.close()
        notify.close()


# -- limits of the control channel --------------------------------------------------------


def write_fifo(path, data: bytes, chunk: int = 4096) -> None:
    """Write ``data`` in pieces, as a long line really arrives: a pipe write is atomic
    only up to PIPE_BUF, so the reader sees it in several reads."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:chunk]):]
    finally:
        os.close(fd)


def events_named(server, name):
    return [e for e in server.log_events() if e["event"] == name]


def test_line_buffer_drops_an_over_long_line_whole():
    splitter = channel.LineBuffer(limit=8)
    assert splitter.feed(b"say hi\nsay") == ([b"say hi"], 0)
    assert splitter.feed(b" 12345") == ([], 1)  # "say 12345" is 9 bytes: from here on dropped
    assert splitter.feed(b"kick bob") == ([], 0)  # still the same line, never a line of its own
    assert splitter.feed(b"\nsay ok\n") == ([b"say ok"], 0)
    assert splitter.feed(b"123456789\nabc\n") == ([b"abc"], 1)  # whole and over: dropped too
    assert splitter.feed(b"1234") == ([], 0)
    assert splitter.feed(b"5678\n") == ([b"12345678"], 0)  # exactly at the limit: kept
    attack = b"say " + b"A" * 20 + b"kick bob\nsay ok\n"
    lines, too_long = [], 0
    for byte in attack:  # however the reads fall
        got, dropped = splitter.feed(bytes([byte]))
        lines += got
        too_long += dropped
    assert (lines, too_long) == ([b"say ok"], 1)


@pytest.mark.parametrize("padding", [b"A", b" "], ids=["letters", "spaces"])
def test_fifo_never_runs_the_tail_of_an_over_long_line(users, chatd, padding):
    alice, bob = users("alice"), users("bob")
    assert alice.recv_text() == "\nbob joined the room"
    fifo = chatd.runtime_dir / "control.fifo"
    write_fifo(fifo, b"say " + padding * (128 * 1024) + b"kick bob\n")
    write_fifo(fifo, b"say after\n")
    assert bob.recv_text() == "\nadmin says: after"  # not "you were removed ..."
    assert alice.recv_text() == "\nadmin says: after"
    assert sorted(u["name"] for u in chatctl_json(chatd, "who")) == ["alice", "bob"]
    # chatctl's answer came after the daemon's answers to the FIFO lines, so the log is complete
    assert events_named(chatd, "control_line_failed") == []  # no tail ran as a line either
    [too_long] = events_named(chatd, "control_line_too_long")
    assert too_long["source"] == "fifo"


def test_fifo_line_at_the_limit_is_run(users, chatd):
    alice = users("alice")
    fifo = chatd.runtime_dir / "control.fifo"
    at_limit = b"say hi" + b" " * (channel.MAX_REQUEST - len(b"say hi"))
    write_fifo(fifo, at_limit + b"\n")
    write_fifo(fifo, b"say no" + b" " * (channel.MAX_REQUEST + 1 - len(b"say no")) + b"\n")
    write_fifo(fifo, b"say after\n")
    assert alice.recv_text() == "\nadmin says: hi"
    assert alice.recv_text() == "\nadmin says: after"


@pytest.mark.parametrize(("text", "depth"), [
    ('{"cmd": "who", "args": {}}', 2),
    ('{"a": "[[{ \\" [[", "b": [[1]], "c": "\\\\"}', 3),  # brackets and escapes in strings
    ('"[[[[', 0),  # an unclosed string runs to the end, as the parser reads it
    ("[" * 10_000, 10_000),
])
def test_nesting_depth_matches_the_parser(text, depth):
    assert channel.nesting_depth(text) == depth


def test_deeply_nested_request_is_answered_and_the_child_lives(chatd):
    path = chatd.runtime_dir / "control.sock"
    child = chatctl_json(chatd, "status")["admin_child_pid"]

    def status_with(arg: bytes) -> dict:
        return raw_request(path, b'{"cmd": "status", "args": {"x": ' + arg + b"}}\n")

    huge = raw_request(path, b"[" * 100_000 + b"\n")
    assert huge["ok"] is False and "larger than" in huge["error"]
    deep = status_with(b"[" * 30_000 + b"]" * 30_000)  # well within the size limit
    assert deep["ok"] is False
    assert f"nested deeper than {channel.MAX_DEPTH} levels" in deep["error"]
    inner = channel.MAX_DEPTH - 2  # the request object and its args are two levels
    assert status_with(b"[" * inner + b"]" * inner)["ok"] is True
    over = status_with(b"[" * (inner + 1) + b"]" * (inner + 1))
    assert over["ok"] is False and "nested deeper" in over["error"]
    assert status_with(b'"' + b"[{" * 1000 + b'\\"[{"')["ok"] is True  # inside a string
    assert raw_request(path, b'{"cmd": "who", "args": {}}\xff\n')["ok"] is False
    assert chatctl_json(chatd, "status")["admin_child_pid"] == child


def test_idle_connections_do_not_lock_chatctl_out(chatd):
    path = str(chatd.runtime_dir / "control.sock")
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            held.append(sock)
        answer = request(path, "status")
        assert answer["ok"] is True, answer
        held[0].settimeout(5)
        notice = json.loads(held[0].recv(65536))  # the oldest idle one made room
        assert notice["ok"] is False and "too many control connections" in notice["error"]
        [evicted] = events_named(chatd, "control_peer_evicted")
        assert evicted["peer_pid"] == os.getpid()
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def reachable_socket(tmp_path):
    """A control socket path in a directory anybody can enter, so only the peer check refuses."""
    shared = tempfile.mkdtemp(prefix="chatd-test-", dir="/tmp")
    os.chmod(shared, 0o755)
    yield os.path.join(shared, "control.sock")
    shutil.rmtree(shared, ignore_errors=True)


def as_nobody(work):
    """Run ``work()`` in a forked child that became "nobody"; its JSON-able result."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result = work()
        except BaseException as exc:  # reported to the parent, which fails the test
            result = {"exception": repr(exc)}
        finally:
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    assert not (isinstance(result, dict) and "exception" in result), result
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_refused_peers_are_logged_at_a_bounded_rate(make_chatd, reachable_socket):
    server = make_chatd({"control": {"mode": "0666", "socket": reachable_socket}})
    before = server.log_path.stat().st_size
    flood = 2000

    def refused() -> bool:
        answer = raw_request(reachable_socket, b'{"cmd": "who"}\n')
        return "permission denied" in answer.get("error", "")

    started = time.monotonic()
    assert as_nobody(lambda: sum(refused() for _ in range(flood))) == flood

    def flood_accounted_for():
        """Every refusal of the flood is in the log, as a line of its own or in a count; the
        last ones are counted when a later refusal is logged, so keep being refused."""
        assert as_nobody(refused)
        lines = events_named(server, "control_refused")
        return sum(1 + e.get("suppressed_since_last", 0) for e in lines) >= flood and lines

    lines = wait_for(flood_accounted_for, timeout=30, interval=0.1,
                     what="the flood's refusals to be logged or counted")
    elapsed = time.monotonic() - started
    assert any(e.get("suppressed_since_last", 0) > 0 for e in lines)
    assert len(lines) <= BOUNDED_BURST + BOUNDED_PER_SECOND * elapsed + 1
    assert server.log_path.stat().st_size - before < 64 * 1024
def test_reload_says_what_it_applied_and_what_needs_a_restart(users, chatd):
    alice = users("alice")
    data = yaml.safe_load(chatd.config.read_text())
    other_port = chatd.port + 1 if chatd.port < 65535 else chatd.port - 1
    data["listen"]["port"] = other_port
    data["room"] = {"max_users": 5, "templates": {"chat": "\n{name}> {text}"}}
    data["control"] = {"mode": 0o600}
    chatd.config.write_text(yaml.safe_dump(data))
    result = chatctl(chatd, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "reloaded: applied room.max_users, room.templates.chat; needs a restart, kept: "
        f"listen.port = {chatd.port} (file says {other_port}), "
        "control.mode = 0660 (file says 0600)\n")
    # the second time nothing is applied any more, and the restart is still needed
    assert chatctl_json(chatd, "reload") == {"applied": [], "restart_needed": [
        {"key": "listen.port", "kept": chatd.port, "wanted": other_port},
        {"key": "control.mode", "kept": 0o660, "wanted": 0o600}]}
    assert chatctl_json(chatd, "status")["max_users"] == 5
    assert alice.ping() == b"PONG"  # still on the old port
    reloaded = [e for e in chatd.log_events() if e["event"] == "reloaded"]
    assert reloaded[0]["applied"] == ["room.max_users", "room.templates.chat"]
    assert reloaded[0]["restart_needed"] == ["listen.port", "control.mode"]
    chatd.config.write_text(yaml.safe_dump({**data, "listen": {"host": "127.0.0.1",
                                                                "port": chatd.port}}))
    assert chatctl(chatd, "reload").stdout == (
        "reloaded: needs a restart, kept: control.mode = 0660 (file says 0600)\n")


def test_an_unexpected_error_on_reload_keeps_the_room_and_its_settings(users, chatd):
    """A log.file with a NUL byte passes validation but cannot be opened: ValueError, not
    OSError. Neither SIGHUP nor chatctl may let that stop the room or half-apply the file."""
    alice = users("alice")
    data = yaml.safe_load(chatd.config.read_text())
    data["log"]["file"] = str(chatd.directory / "new\0.log")
    data["room"] = {"max_users": 1}
    chatd.config.write_text(yaml.safe_dump(data))
    chatd.reload()
    failed = wait_for(lambda: [e for e in chatd.log_events() if e["event"] == "reload_failed"],
                      what="reload_failed in the old log")
    assert "null byte" in failed[0]["error"]
    result = chatctl(chatd, "reload")
    assert result.returncode == 1
    assert "reload failed (ValueError: embedded null byte); nothing was changed" in result.stderr
    assert chatd.proc.poll() is None
    users("bob")  # max_users is still 1000
    assert alice.ping() == b"PONG"
    assert chatctl_json(chatd, "status")["max_users"] == 1000
