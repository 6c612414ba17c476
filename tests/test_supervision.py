"""Supervision by pid: the server reaps every child and hands it to the service that forked
it; a child nobody claims is reaped and logged; an admin child that hangs is replaced; a
fork that fails is logged and tried again while the room goes on."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    CHATD,
    UdpUser,
    children_of,
    read_log_events,
    state_of,
    wait_for,
    write_config,
)
from structlog.testing import capture_logs

from chatd import config
from chatd.server import Server
from chatd.services import Backoff, Service, describe_status


def chatctl(config_path, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(config_path),
                           *args], capture_output=True, text=True, timeout=timeout)


def admin_child_pid(config_path) -> int | None:
    """The admin child's pid as ``chatctl status`` says it; None while nobody answers."""
    result = chatctl(config_path, "--timeout", "3", "status", "--json")
    return json.loads(result.stdout)["admin_child_pid"] if result.returncode == 0 else None


def events(log_path: Path, name: str) -> list[dict]:
    return [e for e in read_log_events(log_path) if e.get("event") == name]


# -- the server's one waitpid loop ------------------------------------------------------------


def test_a_child_nobody_forked_is_reaped_and_logged(make_chatd, tmp_path):
    """chatd started by a shell that had forked first (``cmd & exec chatd``) inherits that
    child. When it exits, the server reaps it and says so; the admin child is left alone."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    wrapper = ["sh", "-c", f'(read line < "{gate}"; exit 3) & exec "$@"', "sh"]
    server = make_chatd(wrapper=wrapper)
    admin = admin_child_pid(server.config)
    [stranger] = [pid for pid in children_of(server.proc.pid) if pid != admin]
    with open(gate, "w") as f:  # the stranger reads its line and exits
        f.write("go\n")
    [reaped] = wait_for(lambda: events(server.log_path, "unknown_child_exited"), timeout=15,
                        what="the unknown child's exit in the log")
    assert (reaped["child_pid"], reaped["status"]) == (stranger, "exit 3")
    assert state_of(stranger) is None  # reaped: not a zombie
    assert admin_child_pid(server.config) == admin  # not mistaken for the admin child
    assert not events(server.log_path, "admin_child_exited")


class Forks(Service):
    """A service with real children of its own."""

    name = "forks"

    def __init__(self):
        self.children: set[int] = set()
        self.exited: list[tuple[int, str]] = []

    def fork(self, code: int) -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        self.children.add(pid)
        return pid

    def pids(self):
        return self.children

    def child_exited(self, pid, status):
        self.children.discard(pid)
        self.exited.append((pid, describe_status(status)))


class Failing(Service):
    name = "failing"

    def tick(self, now):
        raise RuntimeError("a bug in a service")


@pytest.fixture
def bare_server(tmp_path) -> Iterator[Server]:
    """A Server on a real datagram socket, driven by the test instead of its loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "server"))
    sock.setblocking(False)
    server = Server(config.from_mapping({"runtime_dir": str(tmp_path)}), sock)
    try:
        yield server
    finally:
        server.selector.close()
        sock.close()


def test_each_exited_child_goes_to_the_service_that_forked_it(bare_server):
    mine, others = Forks(), Forks()
    bare_server.add_service(mine)
    bare_server.add_service(others)
    first, second = mine.fork(0), mine.fork(7)
    theirs = others.fork(5)

    def all_reaped() -> bool:
        bare_server._reap_children()  # what the loop does on SIGCHLD
        return len(mine.exited) + len(others.exited) == 3

    with capture_logs() as logs:
        wait_for(all_reaped, timeout=10, what="three children reaped")
    assert sorted(mine.exited) == sorted([(first, "exit 0"), (second, "exit 7")])
    assert others.exited == [(theirs, "exit 5")]
    assert not [e for e in logs if e["event"] == "unknown_child_exited"]
    for pid in (first, second, theirs):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # nothing left to reap: no zombie


def test_a_failing_service_tick_is_logged_counted_and_the_others_still_run(bare_server):
    ticked = []

    class Counting(Service):
        def tick(self, now):
            ticked.append(now)

    bare_server.add_service(Failing())
    bare_server.add_service(Counting())
    with capture_logs() as logs:
        bare_server._tick(100.0)
        bare_server._tick(101.0)
    assert ticked == [100.0, 101.0]
    assert bare_server.counters["internal_errors"] == 2
    failed = [e for e in logs if e["event"] == "service_failed"]
    assert failed and failed[0]["service"] == "failing" and failed[0]["call"] == "tick"


def test_backoff_doubles_up_to_its_limit_and_starts_over_after_a_stable_run():
    backoff = Backoff(first=0.5, most=4.0, stable_after=10.0)
    assert [backoff.next_delay(lasted=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.next_delay(lasted=60.0) == 0.5


# -- the admin child: hung, and a fork that fails ---------------------------------------------


def test_a_hung_admin_child_is_replaced(make_chatd):
    server = make_chatd()
    alice = UdpUser(server.addr).join("alice")
    hung = admin_child_pid(server.config)
    os.kill(hung, signal.SIGSTOP)  # alive, but it answers nothing any more
    try:
        replaced = wait_for(
            lambda: [e for e in events(server.log_path, "admin_child_started")
                     if e["child_pid"] != hung], timeout=60, interval=0.2,
            what="a new admin child in place of the hung one")
        new = wait_for(lambda: admin_child_pid(server.config), timeout=30,
                       what="chatctl to be answered again")
        assert new == replaced[0]["child_pid"] != hung
        [verdict] = events(server.log_path, "admin_child_hung")
        assert verdict["child_pid"] == hung
        wait_for(lambda: state_of(hung) is None, timeout=10, what="the hung child reaped")
        said = chatctl(server.config, "say", "back in charge")
        assert said.returncode == 0, said.stderr
        assert alice.recv_text() == "\nadmin says: back in charge"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
        alice.close()


def test_a_fork_that_fails_is_logged_and_tried_again(shared, local_users):
    """An unprivileged daemon under RLIMIT_NPROC 2: itself and its admin child. Another
    process of its user takes the admin child's place, so forking the next one fails with
    EAGAIN. The room goes on, and once that process is gone an admin child serves again."""
    chatd_user = local_users()
    config_path = write_config(shared, {"daemon": {"user": chatd_user.name}})
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    started = subprocess.run(
        [*CHATD, "start", "-c", str(config_path)], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NPROC, (2, hard)))
    assert started.returncode == 0, started.stderr
    log_path = shared / "chatd.log"
    alice = squatter = None
    try:
        status = json.loads(chatctl(config_path, "status", "--json").stdout)
        daemon, first = status["pid"], status["admin_child_pid"]
        alice = UdpUser(("127.0.0.1", int(status["address"].rsplit(":", 1)[1]))).join("alice")
        squatter = chatd_user.popen(["sleep", "600"])  # the user's third process
        os.kill(first, signal.SIGKILL)
        failures = wait_for(lambda: len(events(log_path, "admin_child_fork_failed")) >= 2 and
                            events(log_path, "admin_child_fork_failed"), timeout=30,
                            what="two failed forks in the log")
        assert all(f["error"] == os.strerror(errno.EAGAIN) for f in failures)
        assert failures[1]["retry_in"] > failures[0]["retry_in"]  # backing off
        assert alice.ping() == b"PONG"  # the room goes on meanwhile
        assert admin_child_pid(config_path) is None
        squatter.kill()
        squatter.wait(10)
        second = wait_for(lambda: admin_child_pid(config_path), timeout=60,
                          what="an admin child once a fork works again")
        assert second != first
        assert state_of(daemon) not in (None, "Z")
        assert alice.ping() == b"PONG"
    finally:
        if squatter is not None and squatter.poll() is None:
            squatter.kill()
            squatter.wait(10)
        if alice is not None:
            alice.close()
        subprocess.run([*CHATD, "stop", "--kill", "--timeout", "5", "-c", str(config_path)],
                       capture_output=True, timeout=60)
