"""Faults that must not stop the room: a dying admin child, signal storms, a lost log
file, a wiped runtime directory, a wall clock that jumps, and a loop that stood still."""

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import UdpUser, wait_for

from chatd.control.client import request
from chatd.log import Sink

FAKETIME_LIBS = [Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                 Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1")]
FAKETIME = next((p for p in FAKETIME_LIBS if p.exists()), None)


def chatctl(server, *args):
    return subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(server.config),
                           *args], capture_output=True, text=True, timeout=30)


def status(server) -> dict:
    result = chatctl(server, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pair(server):
    alice, bob = UdpUser(server.addr), UdpUser(server.addr)
    alice.join("alice")
    bob.join("bob")
    assert alice.recv_text() == "\nbob joined the room"
    return alice, bob


def exchange(alice, bob, count, label):
    """``count`` lines each way; every one must arrive, in order."""
    for i in range(count):
        alice.say(f"{label} a{i}")
        assert bob.recv_text() == f"\nalice says: {label} a{i}"
        bob.say(f"{label} b{i}")
        assert alice.recv_text() == f"\nbob says: {label} b{i}"


def test_admin_child_killed_under_chat_load(make_chatd):
    server = make_chatd()
    alice, bob = pair(server)
    try:
        first = status(server)["admin_child_pid"]
        exchange(alice, bob, 50, "before")
        os.kill(first, signal.SIGKILL)
        exchange(alice, bob, 200, "during")
        def new_child():
            result = chatctl(server, "status", "--json")
            return result.returncode == 0 and json.loads(result.stdout)["admin_child_pid"] != first

        wait_for(new_child, timeout=15, what="a new admin child")
        exchange(alice, bob, 50, "after")
        assert chatctl(server, "say", "still in charge").returncode == 0
        assert alice.recv_text() == "\nadmin says: still in charge"
    finally:
        alice.close()
        bob.close()


def test_a_burst_of_100_sighups_while_users_chat(make_chatd):
    server = make_chatd()
    alice, bob = pair(server)
    try:
        for i in range(100):
            os.kill(server.proc.pid, signal.SIGHUP)
            if i % 10 == 0:
                exchange(alice, bob, 1, f"hup{i}")
        exchange(alice, bob, 20, "after")
        assert server.proc.poll() is None
        reloads = wait_for(lambda: [e for e in server.log_events() if e["event"] == "reloaded"],
                           what="a reload in the log")
        assert 1 <= len(reloads) <= 100
        assert status(server)["users"] == 2
    finally:
        alice.close()
        bob.close()


def test_log_on_a_full_disk(make_chatd):
    server = make_chatd({"log": {"file": "/dev/full"}})
    alice, bob = pair(server)
    try:
        exchange(alice, bob, 20, "full")
        assert chatctl(server, "who").returncode == 0
        # the lines it could not write are counted, and shown
        assert status(server)["log_write_errors"] >= 40
        shown = chatctl(server, "status").stdout
        assert re.search(r"^log errors: +\d+ lines not written$", shown, re.MULTILINE), shown
    finally:
        alice.close()
        bob.close()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 KiB tmpfs, to be filled up: a real full disk."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs",
                              str(mountpoint)], capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True, timeout=30)


def test_a_full_disk_leaves_whole_lines_only(small_filesystem):
    """A line that no longer fits is written not at all, rather than in part."""
    path = small_filesystem / "chatd.log"
    sink = Sink(str(path))
    try:
        sink.write("info", json.dumps({"event": "first"}))
        filler = os.open(small_filesystem / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):  # every free block but the log's own
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        for i in range(6):  # the first fits in the log's last block; the next do not
            sink.write("info", json.dumps({"event": f"line{i}", "pad": "x" * 3000}))
        assert sink.write_errors >= 1
        data = path.read_bytes()
        assert data.endswith(b"\n")
        events = [json.loads(line)["event"] for line in data.splitlines()]
        assert events[:2] == ["first", "line0"]
        os.unlink(small_filesystem / "filler")  # room again: logging goes on
        sink.write("info", json.dumps({"event": "after"}))
        assert json.loads(path.read_bytes().splitlines()[-1])["event"] == "after"
    finally:
        sink.close()


def test_the_log_file_is_not_world_readable(make_chatd):
    server = make_chatd({"log": {"level": "info"}})
    assert stat.S_IMODE(server.log_path.stat().st_mode) == 0o640
    server.log_path.unlink()
    counter = iter(range(1000))
    wait_for(lambda: _logged_after_joining(server, f"recreated{next(counter)}"),
             timeout=15, what="logging to a new file")
    assert stat.S_IMODE(server.log_path.stat().st_mode) == 0o640


def _logged_after_joining(server, tag: str) -> bool:
    """Make a log line happen (a login) and see whether it reached the file at log.file."""
    user = UdpUser(server.addr)
    try:
        user.join(tag)
        user.quit()
    finally:
        user.close()
    try:
        return f'"{tag}"' in server.log_path.read_text()
    except FileNotFoundError:
        return False


def test_log_file_deleted_is_recreated(make_chatd):
    server = make_chatd({"log": {"level": "info"}})
    server.log_path.unlink()
    counter = iter(range(1000))
    wait_for(lambda: _logged_after_joining(server, f"after_delete{next(counter)}"),
             timeout=15, what="logging to a new file")


def _fill(fd: int) -> None:
    """Write to a non-blocking pipe until it takes not one more byte."""
    for size in (65536, 4096, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(fd, b"x" * size)


def _drain(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return data


def test_a_reply_goes_out_after_its_log_line(make_chatd):
    # The log file is a pipe that the test fills: the daemon's next log line
    # blocks in write() until the test reads, so what was sent before it shows.
    server = make_chatd({"log": {"level": "info"}}, start=False)
    os.mkfifo(server.log_path)
    reader = os.open(server.log_path, os.O_RDONLY | os.O_NONBLOCK)
    filler = os.open(server.log_path, os.O_WRONLY | os.O_NONBLOCK)
    alice = UdpUser(server.addr)
    try:
        server.start()
        _drain(reader)
        _fill(filler)
        alice.send("L alice")
        alice.expect_nothing(timeout=1.0)  # no OK while its "joined" line cannot be written
        log = bytearray()

        def joined_logged() -> bool:
            log.extend(_drain(reader))
            return b'"alice"' in log

        wait_for(joined_logged, timeout=15, what="the joined line")
        assert alice.recv() == b"OK"
    finally:
        os.close(reader)  # a writer still blocked gets EPIPE: the daemon can stop
        os.close(filler)
        alice.close()


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_logrotate(make_chatd, tmp_path, mode):
    server = make_chatd({"log": {"level": "info"}})
    assert _logged_after_joining(server, "before_rotation")
    # "user_left" is logged just after EXIT is sent: let it land before the rotation
    wait_for(lambda: any(e.get("event") == "user_left" and e.get("name") == "before_rotation"
                         for e in server.log_events()), what="user_left before the rotation")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{server.log_path} {{\n  rotate 2\n  {mode}\n  missingok\n}}\n")
    subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)], check=True,
                   timeout=30)
    rotated = Path(f"{server.log_path}.1")
    assert "before_rotation" in rotated.read_text()
    counter = iter(range(1000))
    wait_for(lambda: _logged_after_joining(server, f"after_rotation{next(counter)}"),
             timeout=15, what="logging to the new file")
    new_lines = server.log_path.read_text()
    assert "\0" not in new_lines  # copytruncate: no hole before the new lines
    assert "before_rotation" not in new_lines
    assert "after_rotation" not in rotated.read_text()


def test_runtime_dir_removed_while_running(make_chatd):
    server = make_chatd()
    alice, bob = pair(server)
    try:
        shutil.rmtree(server.runtime_dir)
        exchange(alice, bob, 5, "wiped")
        wait_for(lambda: chatctl(server, "who").returncode == 0, timeout=15,
                 what="the control socket to be recreated")
        assert (server.runtime_dir / "control.fifo").exists()
        events = {e["event"] for e in server.log_events()}
        assert {"control_files_recreated", "pidfile_recreated"} <= events
        assert (server.runtime_dir / "chatd.pid").read_text().strip() == str(server.proc.pid)
        status = subprocess.run([sys.executable, "-m", "chatd", "status", "-c",
                                 str(server.config)], capture_output=True, timeout=30)
        assert status.returncode == 0
    finally:
        alice.close()
        bob.close()


@pytest.mark.skipif(FAKETIME is None, reason="libfaketime is not installed")
@pytest.mark.timeout(90)
def test_wall_clock_jumps_do_not_expire_sessions(make_chatd, tmp_path):
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    server = make_chatd({"room": {"session_timeout": 5}}, env={
        "LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1"})
    alice, bob = pair(server)
    try:
        assert alice.ping() == b"PONG" and bob.ping() == b"PONG"
        for jump in ("+3d", "-3d", "+0"):
            offset.write_text(jump + "\n")
            # the server's own monotonic uptime shows two of its 1-second ticks have run
            started = status(server)["uptime"]
            wait_for(lambda start=started: status(server)["uptime"] - start > 2.2, timeout=10,
                     what="two ticks of the server")
            assert alice.ping() == b"PONG" and bob.ping() == b"PONG"
            exchange(alice, bob, 1, f"jump{jump}")
        assert status(server)["users"] == 2
    finally:
        alice.close()
        bob.close()


@pytest.mark.timeout(90)
def test_a_stopped_loop_expires_nobody_and_delivers_what_was_queued(make_chatd):
    session_timeout = 4
    server = make_chatd({"room": {"session_timeout": session_timeout}})
    control_socket = str(server.runtime_dir / "control.sock")
    alice, bob = pair(server)

    def server_uptime() -> float:
        return request(control_socket, "status")["result"]["uptime"]

    try:
        assert alice.ping() == b"PONG" and bob.ping() == b"PONG"  # both can time out now
        server.signal(signal.SIGSTOP)
        try:
            for i in range(5):
                alice.say(f"queued {i}")
            time.sleep(2 * session_timeout)  # the stall is the fault under test
        finally:
            server.signal(signal.SIGCONT)
        for i in range(5):
            assert bob.recv_text(timeout=10) == f"\nalice says: queued {i}"
        # nobody speaks until the loop has ticked (expired whoever it would) since it resumed
        resumed = server_uptime()
        wait_for(lambda: server_uptime() - resumed > 1.5, timeout=10, what="a tick of the server")
        assert alice.ping() == b"PONG" and bob.ping() == b"PONG"
        who = request(control_socket, "who")
        assert sorted(user["name"] for user in who["result"]) == ["alice", "bob"]
        assert [text for text in alice.drain() + bob.drain() if b"left the room" in text] == []
        assert status(server)["counters"]["loop_stalls"] >= 1
    finally:
        alice.close()
        bob.close()
