"""``chatd restart`` hands the socket and the room to a new process (issue 16).

Real daemons (``chatd start``), real users on real sockets, stopped in the
``daemons`` fixture's finalizer. What a restart must keep: every line said
meanwhile, delivered once and in order; the sessions with their login times;
the article's client, which never logs in again. What it must survive: a new
process that cannot start, dies half-way, or cannot read the state; a local
stranger at the handover socket.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
from helpers import CHATD, UdpUser, wait_for
from test_article_client import SEED, _article_client
from test_daemon import ENV, Daemon, is_gone
from test_daemon import daemons as daemons  # noqa: F401 - the fixture, stopped at teardown

from chatd.handover import transfer
from chatd.pidfile import PidFile

pytestmark = pytest.mark.timeout(90)


def chatctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(daemon.config),
                           *args], env=ENV, capture_output=True, text=True, timeout=30)


def who(daemon: Daemon) -> dict[str, dict]:
    result = chatctl(daemon, "who", "--json")
    assert result.returncode == 0, result
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


def status(daemon: Daemon) -> dict:
    result = chatctl(daemon, "status", "--json")
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def seconds(iso: str) -> float:
    return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


class Receiver(threading.Thread):
    """Collects every datagram a user receives until told to stop."""

    def __init__(self, user: UdpUser):
        super().__init__(daemon=True)
        self.user = user
        self.texts: list[str] = []
        self.arrivals: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        self.user.sock.settimeout(0.1)
        while not self.done.is_set():
            try:
                data = self.user.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # the test closed the socket (it failed, or is done)
                return
            self.arrivals.append(time.monotonic())
            self.texts.append(data.decode())


class Sender(threading.Thread):
    """Says a numbered line every 10 ms until told to stop."""

    def __init__(self, user: UdpUser):
        super().__init__(daemon=True)
        self.user = user
        self.sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.user.say(f"line {self.sent}")
            self.sent += 1
            time.sleep(0.01)


def test_restart_hands_over_without_losing_a_line_or_a_user(daemons, tmp_path) -> None:
    daemon = daemons({"plugins": {"history": {"size": 5}}})
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    bob = UdpUser(daemon.addr).join("bob")
    article = None
    if SEED.exists():  # the article's own client, unmodified, logged in before the restart
        article = pexpect.spawn(sys.executable, [str(_article_client(tmp_path)), "127.0.0.1",
                                                 str(daemon.port)], encoding="utf-8", timeout=10)
        article.expect("请输入用户名:")
        article.sendline("carol")
        article.expect("@进入聊天室@")
    try:
        before = who(daemon)
        receiver, sender = Receiver(bob), Sender(alice)
        receiver.start()
        sender.start()
        wait_for(lambda: len(receiver.texts) >= 10, what="lines flowing")
        restarted = daemon.cli("restart")
        time.sleep(0.3)  # lines keep coming after the new process took over
        sender.done.set()
        sender.join()
        assert restarted.returncode == 0, restarted
        new = daemon.pid()
        assert new is not None and new != old
        assert re.search(rf"chatd restarted \(pid {new}, udp 127\.0\.0\.1:{daemon.port}\): "
                         rf"took over from pid {old}: {len(before)} sessions", restarted.stdout
                         ), restarted
        wanted = [f"\nalice says: line {n}" for n in range(sender.sent)]
        wait_for(lambda: len([t for t in receiver.texts if "line" in t]) >= sender.sent,
                 timeout=15, what="every line at bob")
        receiver.done.set()
        receiver.join()
        lines = [t for t in receiver.texts if "alice says" in t]
        assert lines == wanted  # each once, in order, none lost
        assert not any("shutting down" in t or "left the room" in t for t in receiver.texts)
        assert alice.ping() == b"PONG"  # still logged in: no "log in first"
        after = who(daemon)
        assert set(after) == set(before) == {"alice", "bob"} | ({"carol"} if article else set())
        for name, entry in before.items():
            assert abs(seconds(after[name]["login_time"]) - seconds(entry["login_time"])) <= 1
        state = status(daemon)
        assert state["pid"] == new and state["taken_over_from"] == old
        assert abs(seconds(state["started"]) - seconds(status_started(daemon, old))) <= 1
        assert wait_for(lambda: is_gone(old), what="the old daemon gone")
        if article is not None:  # it talks on, never having logged in again
            article.sendline("still here")
            assert bob.recv_text() == "\ncarol says: still here"
            bob.say("welcome back")
            article.expect("bob says: welcome back")
        done = [e for e in daemon.events("handover_done") if e["pid"] == new]
        assert done and done[0]["sessions"] == len(before) and done[0]["bytes"] > 0
        assert done[0]["ms"] >= 0 and done[0]["from_pid"] == old
    finally:
        if article is not None:
            article.close(force=True)
        alice.close()
        bob.close()


def status_started(daemon: Daemon, old: int) -> str:
    """When the first daemon started, from its server_started log line."""
    started = next(e for e in daemon.events("server_started") if e["pid"] == old)
    return started["timestamp"][:19] + "Z"


def test_history_survives_the_handover(daemons) -> None:
    daemon = daemons({"plugins": {"history": {"size": 5}}})
    daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        alice.say("before the restart")
        alice.ping()
        assert daemon.cli("restart").returncode == 0
        dave = UdpUser(daemon.addr)
        try:
            dave.join("dave", verify=True)
            assert dave.recv_text() == "\nalice says: before the restart"
        finally:
            dave.close()
    finally:
        alice.close()


def assert_old_serves_on(daemon: Daemon, old: int, user: UdpUser, result) -> None:
    assert result.returncode != 0, result
    assert daemon.pid() == old and not is_gone(old)
    assert user.ping() == b"PONG"
    assert "alice" in who(daemon)
    assert status(daemon)["pid"] == old


def test_a_broken_config_leaves_the_old_daemon_serving(daemons) -> None:
    daemon = daemons()
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        daemon.config.write_text(daemon.config.read_text() + "room: {max_users: lots}\n")
        result = daemon.cli("restart")
        assert "max_users" in result.stderr
        assert_old_serves_on(daemon, old, alice, result)
    finally:
        alice.close()


BOOM = '''
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl


class Boom(Plugin):
    @hookimpl
    def chatd_startup(self):
        raise RuntimeError("boom at start-up")
'''


def test_a_plugin_that_raises_at_startup_leaves_the_old_daemon_serving(daemons, tmp_path):
    site = tmp_path / "site"
    (site / "chatd_boom-1.dist-info").mkdir(parents=True)
    (site / "chatd_boom.py").write_text(BOOM)
    (site / "chatd_boom-1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: chatd-boom\nVersion: 1\n")
    (site / "chatd_boom-1.dist-info" / "entry_points.txt").write_text(
        "[chatd.plugins]\nboom = chatd_boom:Boom\n")
    daemon = daemons()
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        daemon.rewrite({"plugins": {"boom": True}})
        result = subprocess.run([*CHATD, "restart", "-c", str(daemon.config)],
                                env={**ENV, "PYTHONPATH": str(site)}, capture_output=True,
                                text=True, timeout=60)
        assert "plugin boom failed at start-up" in result.stderr and "boom at start-up" in \
            result.stderr, result
        assert "the running daemon goes on serving" in result.stderr
        assert_old_serves_on(daemon, old, alice, result)
    finally:
        alice.close()


def test_a_new_process_that_dies_mid_handover_leaves_the_old_one_serving(daemons) -> None:
    """Here the test is the new process: it takes the offer (socket, state) and vanishes
    without its acknowledgement, as a crash or a SIGKILL would leave it."""
    daemon = daemons()
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        conn, pid = transfer.connect(str(daemon.runtime_dir / "handover.sock"))
        assert pid == old
        deadline = time.monotonic() + 10
        transfer.send_frame(conn, {"op": "takeover", "protocol": transfer.PROTOCOL,
                                   "pid": os.getpid()}, deadline)
        offer, fds = transfer.recv_frame(conn, deadline)
        assert offer["op"] == "offer" and len(fds) == 2
        blob = transfer.recv_bytes(conn, offer["bytes"], deadline)
        assert b"alice" in blob
        alice.say("said while the room is paused")  # waits in the socket's buffer
        transfer.close_fds(fds)
        conn.close()
        assert alice.ping() == b"PONG"
        failed = wait_for(lambda: daemon.events("handover_failed"), what="handover_failed")
        assert failed[0]["peer_pid"] == os.getpid()
        assert_old_serves_on(daemon, old, alice, subprocess.CompletedProcess([], 1))
    finally:
        alice.close()


def test_a_state_the_new_process_cannot_read_fails_the_restart_cleanly(daemons, tmp_path):
    """Here the test is the old daemon, handing over a corrupt state: the new process
    says why and exits, it never crashes or serves half a room."""
    daemon = daemons()
    daemon.runtime_dir.mkdir(mode=0o755)
    holder = PidFile(str(daemon.pidfile))
    holder.acquire()
    listener = transfer.listen(str(daemon.runtime_dir / "handover.sock"))
    listener.setblocking(True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(daemon.addr)
    answers: list[dict] = []

    def old_daemon() -> None:
        conn, _ = listener.accept()
        with conn:
            deadline = time.monotonic() + 30
            transfer.recv_frame(conn, deadline)
            garbage = b'{"format": 1, "room": {"format": 1, "sessions": [{"name": 3}]}}'
            transfer.send_frame(conn, {"op": "offer", "bytes": len(garbage)}, deadline,
                                fds=[udp.fileno(), holder.fileno()])
            transfer.send_bytes(conn, garbage, deadline)
            answers.append(transfer.recv_frame(conn, deadline)[0])

    thread = threading.Thread(target=old_daemon, daemon=True)
    thread.start()
    try:
        holder.write(os.getpid())
        result = daemon.cli("restart")
        thread.join(30)
        assert result.returncode == 1, result
        assert "cannot read the running daemon's state" in result.stderr
        assert "chatd restart --fresh" in result.stderr
        assert answers and answers[0]["op"] == "fail"
        assert [e for e in daemon.events("takeover_failed")]
        assert not [e for e in daemon.log_events() if e.get("level") == "critical"
                    or "Traceback" in json.dumps(e)]
    finally:
        listener.close()
        udp.close()
        holder.release()


def test_fresh_restart_says_goodbye(daemons) -> None:
    daemon = daemons()
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        result = daemon.cli("restart", "--fresh")
        assert result.returncode == 0, result
        assert f"chatd stopped (pid {old})" in result.stdout
        assert alice.recv_text() == "\nthe server is shutting down"
        assert who(daemon) == {}
    finally:
        alice.close()


def test_a_planted_file_at_the_handover_socket_is_refused(daemons) -> None:
    daemon = daemons()
    daemon.runtime_dir.mkdir(mode=0o755)
    (daemon.runtime_dir / "handover.sock").symlink_to("/etc/passwd")
    old = daemon.start()  # the room serves all the same
    alice = UdpUser(daemon.addr).join("alice")
    try:
        assert daemon.events("handover_unavailable")
        result = daemon.cli("restart")
        assert "not a socket" in result.stderr
        assert_old_serves_on(daemon, old, alice, result)
        assert (daemon.runtime_dir / "handover.sock").is_symlink()
    finally:
        alice.close()


def test_the_handover_socket_refuses_another_user(shared, daemons, local_users) -> None:
    daemon = daemons(directory=shared / "d")
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    path = daemon.runtime_dir / "handover.sock"
    stranger = local_users()
    probe = ("import socket, struct, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "s.settimeout(10)\n"
             "try:\n"
             "    s.connect(sys.argv[1])\n"
             "except PermissionError:\n"
             "    print('denied'); sys.exit(0)\n"
             "body = b'{\"op\": \"takeover\", \"protocol\": 1, \"pid\": 1}'\n"
             "try:\n"
             "    s.sendall(struct.pack('>I', len(body)) + body)\n"
             "    print('closed' if s.recv(65536) == b'' else 'answered')\n"
             "except (BrokenPipeError, ConnectionResetError):\n"
             "    print('closed')\n")
    try:
        os.chmod(daemon.runtime_dir, 0o755)
        assert stranger.run([*stranger.python(), "-c", probe, str(path)]).stdout.strip() \
            == "denied"  # the file's mode: 0600
        os.chmod(path, 0o666)  # and even if it were open to all: SO_PEERCRED
        result = stranger.run([*stranger.python(), "-c", probe, str(path)])
        assert result.stdout.strip() == "closed", result
        refused = wait_for(lambda: daemon.events("handover_refused"), what="handover_refused")
        assert f"uid {stranger.uid}" in refused[0]["reason"]
        assert_old_serves_on(daemon, old, alice, subprocess.CompletedProcess([], 1))
    finally:
        alice.close()


def test_sigusr2_makes_the_daemon_hand_over_to_a_new_one(daemons) -> None:
    daemon = daemons()
    old = daemon.start()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        os.kill(old, 12)  # SIGUSR2
        new = wait_for(lambda: (daemon.pid() or old) != old and daemon.pid(),
                       timeout=30, what="a new pid in the pidfile")
        wait_for(lambda: is_gone(old), what="the old daemon gone")
        assert alice.ping() == b"PONG"
        wait_for(lambda: chatctl(daemon, "status", "--json").returncode == 0,
                 what="the new control socket")
        assert status(daemon)["taken_over_from"] == old
        assert daemon.pid() == new and "alice" in who(daemon)
        daemon.pids.add(new)
    finally:
        alice.close()


def test_stop_after_a_handover_leaves_nothing_behind(daemons) -> None:
    daemon = daemons()
    daemon.start()
    assert daemon.cli("restart").returncode == 0
    new = daemon.pid()
    alice = UdpUser(daemon.addr).join("alice")
    try:
        stopped = daemon.cli("stop")
        assert stopped.returncode == 0 and f"chatd stopped (pid {new})" in stopped.stdout
        assert alice.recv_text() == "\nthe server is shutting down"
        assert daemon.leftovers() == []
        assert not Path(daemon.runtime_dir / "handover.sock").exists()
    finally:
        alice.close()


def test_a_cluster_node_restarted_by_handover_keeps_its_users_names_and_records(
        daemons, redis_server, make_chatd) -> None:
    """Node n1 (a classic daemon) restarts by handover while alice on it and bob on n2
    both talk: each gets every line of the other once and in order, alice's name stays
    n1's (refused on n2), and n2 never saw alice leave."""
    cluster = {"redis": redis_server.url, "node_timeout": 10}
    plugins = {"ratelimit": False}
    daemon = daemons({"cluster": {**cluster, "node": "n1"}, "plugins": plugins})
    old = daemon.start()
    n2 = make_chatd({"cluster": {**cluster, "node": "n2"}, "plugins": plugins})
    alice = UdpUser(daemon.addr).join("alice")
    # each join reaches the other node through Redis: wait, or bob would hear alice join
    wait_for(lambda: "alice" in who(n2), timeout=20, interval=0.2, what="n2 to see alice")
    bob = UdpUser(n2.addr).join("bob")
    wait_for(lambda: set(who(daemon)) == {"alice", "bob"}, timeout=20, interval=0.2,
             what="n1 to see bob")
    alice.drain(0.2)
    at_alice, at_bob = Receiver(alice), Receiver(bob)
    from_alice, from_bob = Sender(alice), Sender(bob)
    for thread in (at_alice, at_bob, from_alice, from_bob):
        thread.start()
    try:
        wait_for(lambda: len(at_bob.texts) >= 10 and len(at_alice.texts) >= 10,
                 timeout=20, what="lines flowing both ways")
        restarted = daemon.cli("restart")
        assert restarted.returncode == 0, restarted
        wait_for(lambda: len(at_bob.texts) >= 10 + from_alice.sent // 2, timeout=20,
                 what="lines after the restart")
    finally:
        for sender in (from_alice, from_bob):
            sender.done.set()
            sender.join()
    sent_alice, sent_bob = from_alice.sent, from_bob.sent
    wait_for(lambda: sum(t.startswith("\nalice says: line") for t in at_bob.texts) >= sent_alice
             and sum(t.startswith("\nbob says: line") for t in at_alice.texts) >= sent_bob,
             timeout=30, what="every line on both sides")
    for receiver in (at_alice, at_bob):
        receiver.done.set()
        receiver.join()
    assert [t for t in at_bob.texts if t.startswith("\nalice says: ")] == [
        f"\nalice says: line {i}" for i in range(sent_alice)]
    assert [t for t in at_alice.texts if t.startswith("\nbob says: ")] == [
        f"\nbob says: line {i}" for i in range(sent_bob)]
    assert not [t for t in at_bob.texts + at_alice.texts if "left" in t or "joined" in t]
    assert daemon.pid() not in (None, old)
    assert UdpUser(n2.addr).login("alice") == b"\nthe name alice is already taken"
    assert alice.ping() == b"PONG"


def test_the_metrics_endpoint_serves_again_after_a_handover(daemons) -> None:
    """The new process binds metrics.listen once the old one (which held it) has gone."""
    import urllib.request

    from redisproc import free_tcp_port

    port = free_tcp_port()
    daemon = daemons({"metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon.start()
    UdpUser(daemon.addr).join("alice")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    assert "chatd_users 1.0" in scrape()
    restarted = daemon.cli("restart")
    assert restarted.returncode == 0, restarted

    def scraped_after() -> str | None:
        try:
            return scrape()
        except OSError:
            return None

    text = wait_for(scraped_after, timeout=20, what="the endpoint of the new process")
    assert "chatd_users 1.0" in text
    assert not [e for e in daemon.log_events() if e.get("event") == "metrics_unavailable"]
