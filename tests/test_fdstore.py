"""`systemctl restart` through systemd's fd store (chatd.fdstore), with systemd's side played here.

tests/test_systemd_real.py runs the real thing under systemd; these tests
are the fast ones: the names in ``$LISTEN_FDNAMES``, the sealed memfd, the
socket's error queue, the stop helper's decision, and two ``chatd run``
processes handing the room over through :class:`FdStore`, a notify socket
that keeps what ``FDSTORE=1`` sends, drops what ``FDSTOREREMOVE=1`` names,
answers ``BARRIER=1`` and passes the fds to the next process as systemd does
(fd 3 on, ``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CHATD, UdpUser, read_log_events, wait_for, write_config

from chatd import fdstore, systemd

# Puts the fds of argv[1] at 3, 4, ... and execs with LISTEN_PID = its own pid, as systemd does.
_ACTIVATE = (
    "import fcntl, os, sys\n"
    "fds = [int(f) for f in sys.argv[1].split(',') if f]\n"
    "high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 100) for f in fds]\n"
    "[os.close(f) for f in fds]\n"
    "[os.dup2(h, 3 + i) for i, h in enumerate(high)]\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ['LISTEN_FDS'] = str(len(fds))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


class FdStore:
    """systemd's notify socket and one service's fd store, served from a thread."""

    def __init__(self) -> None:
        self.name = f"@chatd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.05)
        self.stored: list[tuple[str, int]] = []  # (FDNAME, fd), in the order stored
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._running:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
            message = dict(line.split("=", 1) for line in data.decode().splitlines()
                           if "=" in line)
            with self._lock:
                self.messages.append(message)
                if message.get("FDSTORE") == "1":
                    self.stored.extend((message.get("FDNAME", "stored"), fd) for fd in fds)
                    fds = []
                elif message.get("FDSTOREREMOVE") == "1":
                    for name, fd in [e for e in self.stored if e[0] == message.get("FDNAME")]:
                        os.close(fd)
                        self.stored.remove((name, fd))
            for fd in fds:  # BARRIER=1's pipe, or fds nobody asked to store: closed
                os.close(fd)

    def wait(self, key: str, value: str, timeout: float = 15.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            with self._lock:
                return next((m for m in self.messages if m.get(key) == value), None)
        return wait_for(found, timeout=timeout, what=f"{key}={value}")

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.stored]

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()
        for _, fd in self.stored:
            with contextlib.suppress(OSError):
                os.close(fd)


class Service:
    """``chatd run`` processes as systemd starts them for one unit: the store's fds passed."""

    def __init__(self, directory: Path, store: FdStore, overrides: dict | None = None) -> None:
        self.config = write_config(directory, overrides)
        self.log = directory / "chatd.log"
        self.store = store
        self.procs: list[subprocess.Popen] = []

    @property
    def port(self) -> int:
        return yaml.safe_load(self.config.read_text())["listen"]["port"]

    def start(self, extra: list[tuple[str, int]] = ()) -> subprocess.Popen:
        """Start with ``extra`` (a socket unit's fds) and what the store holds, in that order."""
        passed = [*extra, *self.store.stored]
        fds = [fd for _, fd in passed]
        env = {**os.environ, "NOTIFY_SOCKET": self.store.name,
               "LISTEN_FDNAMES": ":".join(name for name, _ in passed)}
        argv = [*CHATD, "run", "-c", str(self.config)]
        if fds:
            argv = [sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds)), *argv]
        ready_before = sum(m.get("READY") == "1" for m in self.store.messages)
        proc = subprocess.Popen(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        wait_for(lambda: proc.poll() is not None
                 or sum(m.get("READY") == "1" for m in self.store.messages) > ready_before,
                 timeout=30, what="READY=1")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return proc

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in read_log_events(self.log) if e["event"] == name]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def store() -> Iterator[FdStore]:
    made = FdStore()
    yield made
    made.close()


@pytest.fixture
def service(tmp_path: Path, store: FdStore) -> Iterator[Service]:
    made = Service(tmp_path, store)
    yield made
    made.stop_all()


def restart(service: Service, old: subprocess.Popen,
            extra: list[tuple[str, int]] = ()) -> subprocess.Popen:
    """What `chatd systemd-stop` and systemd do on `systemctl restart`."""
    old.send_signal(fdstore.HANDOVER_SIGNAL)
    assert old.wait(30) == 0
    return service.start(extra)


# -- the names ------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "names", "expected"), [
    (2, "chatd.socket:state", ["chatd.socket", "state"]),
    (2, "udp:state", ["udp", "state"]),
    (1, None, ["unknown"]),  # a socket unit of an older systemd: no names at all
    (3, "a::c", ["a", "unknown", "c"]),
    (1, "udp:state", ["udp"]),  # more names than fds: the fds count
    (0, "", []),
])
def test_fd_names_follow_sd_listen_fds(count: int, names: str | None,
                                       expected: list[str]) -> None:
    assert systemd.fd_names(count, names) == expected


def test_passed_fds_are_only_those_for_this_pid() -> None:
    """LISTEN_PID of another process (a parent that forgot to clear it): nothing is ours."""
    probe = ("import json, os; from chatd import systemd; "
             "print(json.dumps(systemd.passed_fds()))")

    def run(pid_expr: str) -> str:
        code = (f"import os, sys; os.environ['LISTEN_PID'] = {pid_expr}; "
                f"os.execv(sys.executable, [sys.executable, '-c', {probe!r}])")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fd = sock.fileno()
            env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "udp"}
            argv = [sys.executable, "-c", _ACTIVATE.replace(
                "os.environ['LISTEN_PID'] = str(os.getpid())\n", ""), str(fd),
                sys.executable, "-c", code]
            return subprocess.run(argv, env=env, pass_fds=[fd], capture_output=True,
                                  text=True, timeout=60, check=True).stdout.strip()

    assert run("str(os.getpid())") == '[[3, "udp"]]'
    assert run("'1'") == "[]"


# -- the state memfd ------------------------------------------------------------------------


def test_state_memfd_round_trip_is_sealed() -> None:
    blob = b'{"format": 1}' + bytes(range(256)) * 1000
    fd = fdstore.write_state(blob)
    try:
        assert fdstore.read_state(fd) == blob
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"changed", 0)  # F_SEAL_WRITE: nobody holding a copy can alter it
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL
    finally:
        os.close(fd)


def test_read_state_refuses_what_is_not_a_sealed_memfd(tmp_path: Path) -> None:
    unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    read_end, write_end = os.pipe()
    big = fdstore.write_state(b"x" * 100)
    try:
        with pytest.raises(fdstore.StateFdError, match="not sealed"):
            fdstore.read_state(unsealed)
        with pytest.raises(fdstore.StateFdError, match="not a memfd"):
            fdstore.read_state(read_end)
        with pytest.raises(fdstore.StateFdError, match="100 bytes"):
            fdstore.read_state(big, limit=99)
    finally:
        for fd in (unsealed, read_end, write_end, big):
            os.close(fd)


def test_inherit_prefers_the_socket_units_fd_and_closes_the_rest() -> None:
    unit_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stored_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    state = fdstore.write_state(b"the room")
    passed = [(unit_sock.detach(), "chatd.socket"), (stored_sock.detach(), "udp"),
              (state, "state"), (stray.detach(), "whatever")]
    found = fdstore.inherit(passed)
    try:
        assert found.sock is not None and found.sock.fileno() == passed[0][0]
        assert found.origin == "socket-unit"
        assert found.state == b"the room"
        assert found.stored == ["state", "udp"]  # both dropped from the store once used
        assert found.unused == ["whatever"]
        for fd, _ in passed[1:]:
            with pytest.raises(OSError) as closed:
                os.fstat(fd)
            assert closed.value.errno == errno.EBADF
    finally:
        if found.sock is not None:
            found.sock.close()


def test_inherit_takes_the_stored_socket_and_reports_an_unreadable_state() -> None:
    stored_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    found = fdstore.inherit([(stored_sock.detach(), "udp"), (unsealed, "state")])
    try:
        assert found.origin == "fdstore" and found.sock is not None
        assert found.state is None and "not sealed" in (found.state_problem or "")
    finally:
        assert found.sock is not None
        found.sock.close()


def test_inherit_refuses_a_stream_socket() -> None:
    stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError, match="not a UDP socket"):
        fdstore.inherit([(stream.fileno(), "chatd.socket")])
    stream.close()


def test_quiet_errors_leaves_no_error_for_systemd_to_see() -> None:
    """systemd drops a stored fd on EPOLLERR: an ICMP error queued by a client that went away
    just before the restart would have cost the socket, and every datagram waiting in it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR, as chatd.server sets it
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    gone_addr = gone.getsockname()
    gone.close()
    poller = select.poll()
    poller.register(sock, 0)
    try:
        sock.sendto(b"hello?", gone_addr)
        wait_for(lambda: poller.poll(0), timeout=10, what="the ICMP error")
        assert poller.poll(0)[0][1] & select.POLLERR
        fdstore.quiet_errors(sock)
        assert not poller.poll(0)
        sock.sendto(b"again?", gone_addr)  # no longer queued at all
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a round trip
            probe.bind(("127.0.0.1", 0))
            sock.sendto(b"ping", probe.getsockname())
            probe.settimeout(5)
            assert probe.recv(16) == b"ping"
        assert not poller.poll(100)
    finally:
        sock.close()


# -- the stop helper ------------------------------------------------------------------------


def _systemd_says(answers: dict[str, dict[str, str]]):
    def query(target: str, *props: str) -> dict[str, str]:
        return {p: answers[target][p] for p in props if p in answers[target]}
    return query


@pytest.mark.parametrize(("job_type", "store", "hand_over"), [
    ("restart", "4", True),
    ("stop", "4", False),        # systemctl stop, a shutdown, a conflicting unit's start
    ("restart", "0", False),     # a drop-in emptied FileDescriptorStoreMax=: nothing kept
    ("restart", "1", False),     # room for the socket or the state, not both
])
def test_stop_decision_hands_over_only_on_a_restart_with_room(
        job_type: str, store: str, hand_over: bool) -> None:
    query = _systemd_says({"chatd.service": {"Job": "42", "FileDescriptorStoreMax": store},
                           "42": {"JobType": job_type}})
    decided, why = fdstore.stop_decision("chatd.service", query)
    assert decided is hand_over, why
    assert "42" in why


def test_stop_decision_without_a_job_says_goodbye() -> None:
    query = _systemd_says({"chatd.service": {"Job": "", "FileDescriptorStoreMax": "4"}})
    assert fdstore.stop_decision("chatd.service", query) == (
        False, "no job is pending for the unit")


@pytest.fixture
def daemon_stand_in(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A process that writes down the signal that ended it: SIGTERM or SIGUSR1."""
    marker = tmp_path / "signal"
    code = ("import signal, sys, time\n"
            f"def got(n, f): open({str(marker)!r}, 'w').write(signal.Signals(n).name); "
            "sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, got); signal.signal(signal.SIGUSR1, got)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc, marker
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


RESTARTING = _systemd_says({"chatd.service": {"Job": "7", "FileDescriptorStoreMax": "4"},
                            "7": {"JobType": "restart"}})


@pytest.mark.parametrize(("problem", "expected"), [
    (None, "SIGUSR1"),
    ("line 3: room.max_users: expected an integer, got 'lots'", "SIGTERM"),
])
def test_stop_helper_hands_over_only_if_the_next_process_can_start(
        daemon_stand_in, problem: str | None, expected: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """systemd stops before it starts: a file the next process would refuse gets the
    goodbye, not a room handed to a process that never comes."""
    proc, marker = daemon_stand_in
    assert fdstore.stop_helper("chatd.service", str(proc.pid), check_config=lambda: problem,
                               query=RESTARTING) == 0
    assert proc.wait(10) == 0
    assert marker.read_text() == expected
    if problem is not None:
        assert problem in capsys.readouterr().out


def test_stop_helper_without_systemd_stops_with_sigterm(daemon_stand_in) -> None:
    """No systemd to ask (or no job: nothing is restarting it): SIGTERM and the goodbye."""
    proc, marker = daemon_stand_in
    env = {**os.environ, "MAINPID": str(proc.pid)}
    done = subprocess.run([*CHATD, "systemd-stop", "chatd.service"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"SIGTERM to pid {proc.pid}" in done.stdout
    assert proc.wait(10) == 0  # the helper waited for it: it has exited
    assert marker.read_text() == "SIGTERM"


def test_stop_helper_without_a_main_process_does_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAINPID"}
    done = subprocess.run([*CHATD, "systemd-stop"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "no main process" in done.stdout


# -- two processes, one room ----------------------------------------------------------------


def test_restart_through_the_fd_store_keeps_everyone(service: Service, store: FdStore) -> None:
    old = service.start()
    addr = ("127.0.0.1", service.port)
    alice, bob = UdpUser(addr).join("alice"), UdpUser(addr).join("bob")
    assert alice.recv_text() == "\nbob joined the room"

    old.send_signal(fdstore.HANDOVER_SIGNAL)
    assert old.wait(30) == 0
    assert store.names() == ["udp", "state"]
    bob.say("said while nobody served")  # waits in the stored socket
    new = service.start()

    assert alice.recv_text(10) == "\nbob says: said while nobody served"
    alice.say("still here")
    assert bob.recv_text(10) == "\nalice says: still here"
    assert bob.ping() == b"PONG"
    alice.expect_nothing()  # no goodbye, no EXIT, no "joined" either
    wait_for(lambda: store.names() == [], what="the used fds dropped from the store")
    done = service.events("handover_done")
    assert done and done[-1]["via"] == "systemd" and done[-1]["sessions"] == 2
    assert done[-1]["from_pid"] == old.pid and done[-1]["socket"] == "fdstore"
    assert service.events("handed_over")[-1]["sessions"] == 2
    assert new.pid != old.pid
    for user in (alice, bob):
        user.close()


def chatctl_who(config: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(config),
                             "who", "--json"],
                            capture_output=True, text=True, timeout=30)
    return [user["name"] for user in json.loads(result.stdout or "[]")]


def test_a_cluster_node_restarted_through_the_fd_store_keeps_its_users_and_names(
        tmp_path: Path, store: FdStore, redis_server, make_chatd) -> None:
    """`systemctl restart chatd@n1`: alice stays n1's (refused on n2), a line bob says on
    n2 meanwhile reaches her once, and n2 never hears her leave or join."""
    cluster = {"redis": redis_server.url, "node_timeout": 10}
    n1 = Service(tmp_path, store, {"cluster": {**cluster, "node": "n1"}})
    n2 = make_chatd({"cluster": {**cluster, "node": "n2"}})
    try:
        old = n1.start()
        alice = UdpUser(("127.0.0.1", n1.port)).join("alice")
        wait_for(lambda: "alice" in chatctl_who(n2.config), timeout=20, interval=0.2,
                 what="n2 to know alice")  # else bob could hear her join, through Redis
        bob = UdpUser(n2.addr).join("bob")
        assert alice.recv_text(20) == "\nbob joined the room"
        old.send_signal(fdstore.HANDOVER_SIGNAL)
        assert old.wait(30) == 0
        bob.say("said while n1 restarted")
        n1.start()
        assert alice.recv_text(20) == "\nbob says: said while n1 restarted"
        alice.say("back")
        assert bob.recv_text(20) == "\nalice says: back"
        alice.expect_nothing()  # the line came once
        bob.expect_nothing()  # no leave, no join
        assert UdpUser(n2.addr).login("alice") == b"\nthe name alice is already taken"
        assert n1.events("handover_done")[-1]["sessions"] == 1
    finally:
        n1.stop_all()


def test_restart_with_a_socket_unit_stores_only_the_state(
        service: Service, store: FdStore) -> None:
    unit_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unit_sock.bind(("127.0.0.1", 0))
    addr = unit_sock.getsockname()
    old = service.start(extra=[("chatd.socket", unit_sock.fileno())])
    alice = UdpUser(addr).join("alice")

    new = restart(service, old, extra=[("chatd.socket", unit_sock.fileno())])
    assert [m.get("FDNAME") for m in store.messages if m.get("FDSTORE")] == ["state"]
    assert alice.ping() == b"PONG"  # still logged in: an unknown user gets no PONG
    assert service.events("handover_done")[-1]["socket"] == "socket-unit"
    assert service.events("socket_activation")
    assert new.poll() is None
    alice.close()
    unit_sock.close()


def test_an_unreadable_state_starts_fresh(service: Service, store: FdStore) -> None:
    """Another version's blob, or a damaged one: logged, and the room starts empty."""
    old = service.start()
    old.send_signal(fdstore.HANDOVER_SIGNAL)
    assert old.wait(30) == 0
    with store._lock:
        index = next(i for i, (name, _) in enumerate(store.stored) if name == "state")
        os.close(store.stored[index][1])
        store.stored[index] = ("state", fdstore.write_state(b'{"format": 999}'))
    service.start()
    problem = wait_for(lambda: service.events("handover_state_unreadable"),
                       what="the unreadable state logged")
    assert "format" in problem[0]["error"]
    assert UdpUser(("127.0.0.1", service.port)).login("carol") == b"OK"  # serving, fresh
    wait_for(lambda: store.names() == [], what="the stale state dropped from the store")


def test_a_handover_that_fails_says_goodbye(tmp_path: Path) -> None:
    """FDSTORE=1 that cannot be sent (the notify socket is gone): the users are told."""
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@chatd-test-{uuid.uuid4().hex}"
    notify.bind("\0" + name[1:])
    proc = subprocess.Popen([*CHATD, "run", "-c", str(config)],
                            env={**os.environ, "NOTIFY_SOCKET": name},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        notify.settimeout(30)
        while b"READY=1" not in notify.recv(4096):
            pass
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        notify.close()  # systemd went away
        proc.send_signal(fdstore.HANDOVER_SIGNAL)
        assert alice.recv(10) == b"\nthe server is shutting down"
        assert alice.recv(10) == b"EXIT"
        assert proc.wait(30) == 0
        events = read_log_events(tmp_path / "chatd.log")
        assert any(e["event"] == "handover_failed" for e in events)
        alice.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigterm_still_says_goodbye_under_systemd(service: Service, store: FdStore) -> None:
    old = service.start()
    alice = UdpUser(("127.0.0.1", service.port)).join("alice")
    old.send_signal(signal.SIGTERM)
    assert alice.recv(10) == b"\nthe server is shutting down"
    assert alice.recv(10) == b"EXIT"
    assert old.wait(30) == 0
    assert store.names() == []  # nothing stored: the next start is a fresh one
    alice.close()


def test_wait_exit_sees_a_process_end() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    began = time.monotonic()
    assert fdstore.wait_exit(proc.pid, 30)
    assert time.monotonic() - began < 30
    proc.wait()
