"""``chat-client`` end to end: real subprocesses, real sockets, real ``chatd run``.

Pipe mode is driven through stdin/stdout pipes, terminal mode under a
pseudo-terminal (pexpect). The other party is usually a :class:`UdpUser`,
which makes what reached the room easy to assert. Every wait is a bounded
poll on output the client produces, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pexpect
import pytest
from helpers import UdpUser, free_udp_port, wait_for

from chatd.client import net
from chatd.client.session import ClientSession, Joined
from chatd.protocol import HELLO

CLIENT = [sys.executable, "-m", "chatd.cli.client"]


class PipeClient:
    """``chat-client`` in pipe mode, its stdout and stderr collected line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [*CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        self.raw_stdout: list[bytes] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout, True),
                             daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr, False),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, lines: list[str], raw: bool) -> None:
        for line in iter(stream.readline, b""):
            if raw:
                self.raw_stdout.append(line)
            lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait_line(self, text: str, *, stream: str = "stdout", timeout: float = 5.0) -> str:
        lines = self.stdout if stream == "stdout" else self.stderr
        return wait_for(lambda: next((x for x in list(lines) if text in x), None),
                        timeout=timeout, what=f"{text!r} on {stream}; got {lines}")

    def wait(self, timeout: float = 5.0) -> int:
        rc = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(2)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., PipeClient]]:
    made: list[PipeClient] = []

    def make(*args: str) -> PipeClient:
        client = PipeClient(*args)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


@pytest.fixture
def udp_users() -> Iterator[Callable[[tuple[str, int]], UdpUser]]:
    made: list[UdpUser] = []

    def make(addr: tuple[str, int]) -> UdpUser:
        user = UdpUser(addr)
        made.append(user)
        return user

    yield make
    for user in made:
        user.close()


def recv_until(user: UdpUser, text: str, timeout: float = 5.0) -> str:
    """The first datagram containing ``text``; others (joins, pongs) are skipped."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{text!r} never arrived; got {seen}")
        try:
            data = user.recv(remaining).decode("utf-8", "replace")
        except TimeoutError:
            continue
        if text in data:
            return data
        seen.append(data)


def port_args(server) -> list[str]:
    return ["127.0.0.1", str(server.port)]


# -- command line -------------------------------------------------------------------


def test_help_explains_the_arguments():
    done = subprocess.run([*CLIENT, "--help"], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0
    for word in ("HOST", "PORT", "--name", "--keepalive", "--timeout", "--max-datagram",
                 "pipe mode", "exit status"):
        assert word in done.stdout


@pytest.mark.parametrize("args", [
    ["127.0.0.1", "notaport", "--name", "x"],
    ["127.0.0.1", "70000", "--name", "x"],
    ["--keepalive", "-1", "--name", "x"],
    ["--name", "two words"],
    [],  # pipe mode without --name
])
def test_usage_errors_exit_2(args):
    done = subprocess.run([*CLIENT, *args], capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert "usage: chat-client" in done.stderr
    assert "Traceback" not in done.stderr


# -- unreachable servers --------------------------------------------------------------


def test_no_server_exits_1():
    port = free_udp_port()
    started = time.monotonic()
    done = subprocess.run([*CLIENT, "127.0.0.1", str(port), "--name", "ann", "--timeout", "0.3"],
                          capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert f"no answer from 127.0.0.1:{port} — is chatd running?" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 5


def test_silent_server_gets_three_tries_then_exit_1():
    """A host that drops datagrams (no ICMP error comes back): L is retried, then give up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        port = black_hole.getsockname()[1]
        done = subprocess.run(
            [*CLIENT, "127.0.0.1", str(port), "--name", "ann", "--timeout", "0.2"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        black_hole.settimeout(0)
        tries = []
        while True:
            try:
                tries.append(black_hole.recv(100))
            except BlockingIOError:
                break
    assert done.returncode == 1
    assert "no answer from" in done.stderr
    assert tries == [HELLO] * 3


def test_login_falls_back_to_the_next_address(chatd, users):
    """Like ``localhost`` giving ``::1`` first while chatd listens on IPv4 only."""
    watcher = users("watcher")
    dead = ("127.0.0.1", free_udp_port())
    link = net.Link("localhost", chatd.port,
                    [(socket.AF_INET, dead), (socket.AF_INET, chatd.addr)])
    try:
        started = time.monotonic()
        result = net.login(link, ClientSession(timeout=5.0), "ann")
        assert result == Joined("ann")
        assert time.monotonic() - started < 2  # the refused port did not cost 3 × 5 s
        assert link.sock is not None and link.sock.getpeername() == chatd.addr
        recv_until(watcher, "ann joined the room")
    finally:
        link.close()


def test_taken_name_is_refused_with_the_servers_text(chatd, users, clients):
    users("ann")
    client = clients(*port_args(chatd), "--name", "ANN")
    assert client.wait() == 1
    assert client.stderr == ["chat-client: the name ANN is already taken"]
    assert client.stdout == []


# -- pipe mode ------------------------------------------------------------------------


def test_pipe_mode_two_clients_talk_and_leave(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann", "--timeout", "5")
    recv_until(watcher, "ann joined the room")
    bob = clients(*port_args(chatd), "--name", "bob", "--timeout", "5")
    recv_until(watcher, "bob joined the room")
    ann.wait_line("bob joined the room")

    ann.send("hello bob,  two spaces")
    assert bob.wait_line("ann says:") == "ann says: hello bob,  two spaces"
    bob.send("hi ann")
    assert ann.wait_line("bob says:") == "bob says: hi ann"

    started = time.monotonic()
    ann.close_stdin()
    assert ann.wait() == 0
    # --timeout is 5 s: leaving this fast means the client heard EXIT, it did not time out.
    assert time.monotonic() - started < 3
    bob.wait_line("ann left the room")
    recv_until(watcher, "ann left the room")
    assert ann.stderr == []
    assert all("\x1b" not in line for line in ann.stdout + bob.stdout)


def test_pipe_mode_sends_commands_and_slash_quit_leaves(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann")
    recv_until(watcher, "ann joined the room")
    ann.send("/nosuchcommand")
    ann.wait_line("unknown command /nosuchcommand")
    ann.send("quit")  # only a word in pipe mode: bots may say it
    assert recv_until(watcher, "ann says:") == "\nann says: quit"
    ann.send("/quit")
    ann.send("never sent")
    assert ann.wait() == 0
    assert recv_until(watcher, "ann") == "\nann left the room"
    watcher.expect_nothing()


def test_pipe_mode_shows_a_reply_of_several_lines_as_lines(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann")
    recv_until(watcher, "ann joined the room")
    ann.send("/help")
    ann.wait_line("/who - list the people in the room")
    shown = ann.stdout[ann.stdout.index("commands:") + 1:]
    assert [line.split(" - ")[0] for line in shown] == [
        "/help", "/me ACTION", "/msg NAME TEXT", "/who"], shown


def test_too_long_line_is_refused_locally(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann", "--max-datagram", "64")
    recv_until(watcher, "ann joined the room")
    ann.send("x" * 57)  # "C ann " + 57 bytes = 63
    ann.send("y" * 59)  # 65 bytes: refused
    ann.send("after")
    ann.wait_line("line not sent: 65 bytes", stream="stderr")
    assert recv_until(watcher, "ann says:") == "\nann says: " + "x" * 57
    assert recv_until(watcher, "ann says:") == "\nann says: after"


def test_pipe_mode_reads_a_regular_file(chatd, users, tmp_path):
    """stdin a file (no epoll there), CR LF, a line beyond memory's bound, no final newline."""
    watcher = users("watcher")
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"one\r\n" + b"z" * 300_000 + b"\n\ntwo, no newline")
    with lines.open("rb") as stdin:
        done = subprocess.run([*CLIENT, *port_args(chatd), "--name", "ann"], stdin=stdin,
                              capture_output=True, timeout=10)
    assert done.returncode == 0
    assert done.stderr == b"chat-client: line not sent: more than 65536 bytes\n"
    assert [d for d in watcher.drain(0.2) if b"ann" in d] == [
        b"\nann joined the room", b"\nann says: one", b"\nann says: two, no newline",
        b"\nann left the room"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_pipe_mode_signal_leaves_the_room(chatd, users, clients, signum):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann")
    recv_until(watcher, "ann joined the room")
    watcher.say("ready?")
    ann.wait_line("watcher says: ready?")  # the client is in its loop, past the login
    ann.proc.send_signal(signum)
    assert ann.wait() == 0
    assert recv_until(watcher, "ann") == "\nann left the room"
    assert ann.stderr == []


def test_pipe_mode_closed_stdout_leaves_without_a_traceback(chatd, users):
    watcher = users("watcher")
    proc = subprocess.Popen([*CLIENT, *port_args(chatd), "--name", "ann"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        recv_until(watcher, "ann joined the room")
        proc.stdout.close()  # the bot reading the client died
        watcher.say("anyone there?")
        assert recv_until(watcher, "ann") == "\nann left the room"
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0
        assert err == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def test_server_shutdown_prints_the_reason_and_exits_0(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann")
    recv_until(watcher, "ann joined the room")
    chatd.stop()
    assert ann.wait() == 0
    assert ann.stdout[-1] == "the server is shutting down"
    assert ann.stderr == ["chat-client: the server ended the session: the server is shutting down"]


def test_kick_prints_the_reason_and_exits_0(chatd, users, clients):
    watcher = users("watcher")
    ann = clients(*port_args(chatd), "--name", "ann")
    recv_until(watcher, "ann joined the room")
    kicked = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(chatd.config),
                             "kick", "ann", "off", "topic"], capture_output=True, timeout=30)
    assert kicked.returncode == 0, kicked.stderr
    assert ann.wait() == 0
    assert ann.stdout[-1] == "you were removed from the room: off topic"
    assert ann.stderr == [
        "chat-client: the server ended the session: you were removed from the room: off topic"]


@pytest.mark.timeout(30)
def test_reconnects_after_a_server_restart(make_chatd, udp_users, clients):
    old = make_chatd()
    watcher = udp_users(old.addr).join("watcher")
    ann = clients(*port_args(old), "--name", "ann", "--keepalive", "0.2", "--timeout", "0.3")
    recv_until(watcher, "ann joined the room")

    old.proc.kill()  # a crash: no shutdown notice, the sessions are simply gone
    old.proc.wait(5)
    ann.wait_line("connection lost, retrying…", stream="stderr")
    ann.send("lost in the void")  # refused locally while the connection is lost
    ann.wait_line("line not sent: connection lost", stream="stderr")

    new = make_chatd(port=old.port)
    ann.wait_line("reconnected as ann", stream="stderr", timeout=10)
    bob = udp_users(new.addr).join("bob")
    ann.send("back again")
    assert recv_until(bob, "ann says:") == "\nann says: back again"
    assert ann.proc.poll() is None


def test_hostile_server_text_is_shown_escaped(clients):
    """A fake server: answers L with OK, then sends a clear-screen and invalid UTF-8."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake:
        fake.bind(("127.0.0.1", 0))
        fake.settimeout(5)
        ann = clients("127.0.0.1", str(fake.getsockname()[1]), "--name", "ann")
        data, client_addr = fake.recvfrom(1024)
        assert data == HELLO
        fake.sendto(b"COOKIE tok", client_addr)
        assert fake.recvfrom(1024)[0] == b"L ann tok"
        fake.sendto(b"OK", client_addr)
        fake.sendto(b"\nmallory says: \x1b[2J\x1b]0;pwned\x07 bad \xff\xfe end\r\n", client_addr)
        fake.sendto("\ncafé \u009b2J 中文".encode(), client_addr)
        ann.wait_line("中文")
        ann.close_stdin()
        assert fake.recvfrom(1024)[0] == b"Q ann"
        fake.sendto(b"EXIT", client_addr)
        assert ann.wait() == 0
    assert ann.stdout == [
        "mallory says: \\x1b[2J\\x1b]0;pwned\\x07 bad \\xff\\xfe end",
        "café \\x9b2J 中文",
    ]
    raw = b"".join(ann.raw_stdout)
    assert not any(b < 0x20 and b != 0x0A for b in raw) and b"\x7f" not in raw
    assert b"\xc2\x9b" not in raw


# -- terminal mode ----------------------------------------------------------------------


def spawn_terminal(*args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    return pexpect.spawn(CLIENT[0], [*CLIENT[1:], *args], env=env, timeout=5,
                         dimensions=(24, 100), encoding="utf-8", codec_errors="replace")


@pytest.fixture
def terminals() -> Iterator[Callable[..., pexpect.spawn]]:
    made: list[pexpect.spawn] = []

    def make(*args: str) -> pexpect.spawn:
        child = spawn_terminal(*args)
        made.append(child)
        return child

    yield make
    for child in made:
        child.close(force=True)


#: prompt_toolkit draws with cursor movements and colour resets between the words.
ESCAPES = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\s)*"


def expect_screen(child: pexpect.spawn, *parts: str) -> None:
    """``parts`` on screen in order, separated by nothing but escape sequences and spaces."""
    child.expect(ESCAPES.join(re.escape(p) for p in parts))


def exit_status(child: pexpect.spawn) -> int | None:
    child.expect(pexpect.EOF, timeout=5)
    child.close()
    return child.exitstatus


def test_terminal_incoming_line_does_not_clobber_typing(chatd, users, terminals):
    bob = users("bob")
    child = terminals(*port_args(chatd))
    expect_screen(child, "your name:")
    child.send("bob\r")
    child.expect_exact("the name bob is already taken")
    expect_screen(child, "your name:")
    child.send("alice\r")
    child.expect_exact("you are in the room as alice")
    recv_until(bob, "alice joined the room")

    child.send("hello wo")
    child.expect_exact("hello wo")  # the half line is in the prompt's buffer
    bob.say("incoming!")
    child.expect_exact("bob says: incoming!")
    expect_screen(child, "alice>", "hello wo")  # the prompt and the half line are redrawn below
    child.send("rld\r")
    child.sendcontrol("d")  # typed at once: no gap between prompts where keys get lost
    assert recv_until(bob, "alice says:") == "\nalice says: hello world"
    assert recv_until(bob, "alice") == "\nalice left the room"
    expect_screen(child, "alice>", "hello world")  # the sent line is echoed above the prompt
    assert exit_status(child) == 0


@pytest.mark.parametrize("keys", ["quit\r", "/quit\r", "\x03"], ids=["quit", "/quit", "ctrl-c"])
def test_terminal_ways_to_leave(chatd, users, terminals, keys):
    bob = users("bob")
    child = terminals(*port_args(chatd), "--name", "alice")
    expect_screen(child, "alice>")
    recv_until(bob, "alice joined the room")
    child.send(keys)
    assert recv_until(bob, "alice") == "\nalice left the room"
    assert exit_status(child) == 0


def test_terminal_shows_help_as_lines(chatd, users, terminals):
    child = terminals(*port_args(chatd), "--name", "alice")
    expect_screen(child, "alice>")
    child.send("/help\r")
    child.expect_exact("commands:")
    child.expect(r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*/help - list the commands")
    child.expect_exact("/who - list the people in the room")
    assert "\\x0a" not in child.before
    child.sendcontrol("d")
    assert exit_status(child) == 0


@pytest.mark.parametrize("report", ["\x1b[Mxyz", "\x1b[5M", "\x1b[<0;1M"])
def test_terminal_stray_mouse_report_loses_nothing(chatd, users, terminals, report):
    # Mouse reports the client never asked for (a program left reporting on, or
    # typed by hand) once crashed prompt_toolkit's mouse handler mid-line.
    bob = users("bob")
    child = terminals(*port_args(chatd))
    expect_screen(child, "your name:")
    child.send(report + "alice\r")
    child.expect_exact("you are in the room as alice")
    expect_screen(child, "alice>")
    child.send("hello ")
    child.expect_exact("hello")
    child.send(report + "world\r")
    assert recv_until(bob, "alice says:") == "\nalice says: hello world"
    expect_screen(child, "alice>")  # the next prompt: ^D typed before it could go to none
    child.sendcontrol("d")
    assert recv_until(bob, "alice") == "\nalice left the room"
    assert exit_status(child) == 0
    assert "Unhandled exception" not in child.before


def test_terminal_shutdown_while_prompting(chatd, users, terminals):
    users("bob")
    child = terminals(*port_args(chatd), "--name", "alice")
    expect_screen(child, "alice>")
    child.send("half typed")
    child.expect_exact("half typed")
    chatd.stop()
    child.expect_exact("the server ended the session: the server is shutting down")
    assert exit_status(child) == 0
