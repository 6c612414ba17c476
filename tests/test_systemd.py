"""chatd under systemd: the unit files, socket activation, sd_notify, journald and systemctl.

systemd talks to chatd through small protocols (an environment, fd 3,
datagrams on a Unix socket, a PID file) whose mistakes are silent: a unit
that verifies with warnings, a READY=1 sent by the wrong process, a notify
socket that blocks the loop. Each test here plays systemd's side for real.
systemd is not pid 1 on a developer's machine or in CI, so the systemctl
tests use docker-systemctl-replacement, which starts units the same way
(fork, environment, notify socket, PID file) without a running systemd.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CHATD, ChatdProcess, UdpUser, free_udp_port, wait_for, write_config

from chatd import config as config_mod
from chatd import fdstore
from chatd.control.client import request

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ("chatd.service", "chatd.socket", "chatd-forking.service")
VENV_BIN = Path(sys.executable).parent  # holds the project's `chatd` script
INSTALLED_CONFIG = "/etc/chatd/chatd.yaml"


def _tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


SYSTEMD_ANALYZE = _tool("systemd-analyze")
SOCKET_ACTIVATE = _tool("systemd-socket-activate")
SYSTEMCTL = _tool("systemctl3")

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is absent (Debian package systemd)")


def render_unit(name: str, directory: Path, config: str = INSTALLED_CONFIG) -> Path:
    """A unit as `make install` writes it, with ExecStart pointing at this venv's chatd."""
    text = (UNIT_DIR / name).read_text()
    text = text.replace("@BINDIR@", str(VENV_BIN)).replace(INSTALLED_CONFIG, config)
    path = directory / name
    path.write_text(text)
    return path


def unit_settings(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit template (sections merged: the keys do not collide here)."""
    settings: dict[str, list[str]] = {}
    for line in (UNIT_DIR / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def json_lines(path: Path) -> list[dict[str, Any]]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for a reaper does not count."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class CredNotifications:
    """systemd's notify socket, recording who sent each datagram (SO_PASSCRED).

    systemd itself checks the sender's pid against the main pid
    (NotifyAccess=main); recording it lets a test prove that only the daemon,
    never its admin child, notifies.
    """

    def __init__(self) -> None:
        self.name = f"@chatd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.seen: list[dict[str, Any]] = []  # every message, with "_pid" and "_at"
        self._unread: list[dict[str, Any]] = []

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        message: dict[str, Any] = dict(
            line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        message["_at"] = time.monotonic()
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                message["_pid"] = struct.unpack("3i", payload[:12])[0]
        self.seen.append(message)
        return message

    def wait(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict[str, Any]:
        """The next message (received or still to come) that carries ``key`` (= ``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self._unread:
                if key in message and value in (None, message[key]):
                    self._unread = self._unread[self._unread.index(message) + 1:]
                    return message
            self._unread.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} notification within {timeout} s; "
                                     f"seen: {self.seen}")
            message = self._receive(remaining)
            if message is not None:
                self._unread.append(message)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def spawned():
    """Start processes for a test and always end them (by pid) afterwards."""
    procs: list[subprocess.Popen] = []

    def spawn(argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kwargs)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def chatd_run(config: Path) -> list[str]:
    return [*CHATD, "run", "-c", str(config)]


def wait_serving(addr: tuple[str, int], name: str = "probe") -> UdpUser:
    """Bounded poll until a login is answered: the readiness signal when nobody hears READY."""
    user = UdpUser(addr, name)

    def answered() -> bool:
        user.send(f"L {name}")
        try:
            return user.recv(timeout=0.2) == b"OK"
        except TimeoutError:
            return False

    wait_for(answered, timeout=15, what=f"chatd answering on {addr}")
    return user


# -- the unit files -------------------------------------------------------------------------


def test_units_are_templates_for_make_install() -> None:
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert set(re.findall(r"@[A-Z_]+@", text)) <= {"@BINDIR@"}, name
        for key, values in unit_settings(name).items():
            if key.startswith("Exec") and "chatd" in " ".join(values):
                # after systemd's prefixes ("+": run as root), if any
                assert all(re.match(r"[-+:!]*@BINDIR@/chatd ", v) for v in values), (name, key)


def test_units_agree_with_chatd() -> None:
    """The units' paths and port are chatd's own: they cannot drift apart silently."""
    notify, forking = unit_settings("chatd.service"), unit_settings("chatd-forking.service")
    sock = unit_settings("chatd.socket")
    assert notify["Type"] == ["notify"] and forking["Type"] == ["forking"]
    assert notify["ExecStart"] == [f"@BINDIR@/chatd run -c {INSTALLED_CONFIG}"]
    # systemctl restart keeps everyone (chatd.fdstore): the helper reads the same file
    assert notify["ExecStop"] == [f"+@BINDIR@/chatd systemd-stop -c {INSTALLED_CONFIG} %n"]
    assert int(notify["FileDescriptorStoreMax"][0]) >= fdstore.NEEDED_STORE
    assert forking["ExecStart"] == [f"@BINDIR@/chatd start -c {INSTALLED_CONFIG}"]
    for unit in (notify, forking):
        assert unit["ExecStartPre"] == [f"@BINDIR@/chatd check-config -c {INSTALLED_CONFIG}"]
        assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert unit["RuntimeDirectory"] == ["chatd"]
        assert unit["DynamicUser"] == ["yes"]
    runtime_dir = "/run/chatd"
    as_root = config_mod.from_mapping({"runtime_dir": runtime_dir})
    assert forking["PIDFile"] == [as_root.pidfile]
    assert sock["ListenDatagram"] == [str(config_mod.DEFAULTS["listen.port"])]
    # the loop pings from a 1 s tick, at half the interval: shorter would starve the watchdog
    watchdog = notify["WatchdogSec"][0]
    assert watchdog.endswith("s") and float(watchdog[:-1]) >= 3


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_cleanly(name: str, tmp_path: Path) -> None:
    for unit in UNITS:  # chatd.socket needs its service beside it
        render_unit(unit, tmp_path)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # verify warns on stderr and still exits 0


@needs_analyze
def test_exposure_scores_are_the_documented_ones(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "systemd.md").read_text()
    for name in ("chatd.service", "chatd-forking.service"):
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager",
             str(render_unit(name, tmp_path))],
            capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert match, result.stdout + result.stderr
        documented = re.search(rf"\|\s*`{re.escape(name)}`\s*\|\s*(\d+\.\d+)", docs)
        assert documented, f"docs/systemd.md has no exposure row for {name}"
        assert documented.group(1) == match.group(1), name


# -- socket activation ----------------------------------------------------------------------

# Puts the passed socket at fd 3 and execs with LISTEN_PID = its own pid, as systemd does.
_ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
             "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")


def test_socket_activation_serves_fd_3_and_ignores_listen(tmp_path: Path, spawned) -> None:
    activated = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    activated.bind(("127.0.0.1", 0))
    port = activated.getsockname()[1]
    configured = free_udp_port()
    config = write_config(tmp_path, port=configured)
    notes = CredNotifications()
    env = {**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notes.name}
    fd = activated.fileno()
    proc = spawned([sys.executable, "-c", _ACTIVATE, str(fd), *chatd_run(config)], env,
                   pass_fds=(fd,))
    activated.close()  # chatd holds it now
    try:
        ready = notes.wait("READY", "1")
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith(f"serving 127.0.0.1:{port}")
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        bob = UdpUser(("127.0.0.1", port)).join("bob")
        assert alice.recv_text() == "\nbob joined the room"
        bob.say("through fd 3")
        assert alice.recv_text() == "\nbob says: through fd 3"
        # listen.port was never bound: it is still free for anyone
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", configured))
        events = json_lines(tmp_path / "chatd.log")
        activation = [e for e in events if e["event"] == "socket_activation"]
        assert activation and activation[0]["fd"] == 3
        started = [e for e in events if e["event"] == "server_started"]
        assert started[0]["port"] == port
    finally:
        notes.close()


@pytest.mark.skipif(SOCKET_ACTIVATE is None,
                    reason="systemd-socket-activate is absent (Debian package systemd)")
def test_systemd_socket_activate_starts_chatd_on_the_first_datagram(tmp_path: Path,
                                                                      spawned) -> None:
    port = free_udp_port()
    config = write_config(tmp_path, port=free_udp_port())
    proc = spawned([SOCKET_ACTIVATE, "--datagram", "-l", f"127.0.0.1:{port}",
                    *chatd_run(config)], dict(os.environ))
    assert proc.stderr is not None
    buffered = b""
    deadline = time.monotonic() + 15
    while b"Listening on" not in buffered:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"systemd-socket-activate said: {buffered!r}"
        ready, _, _ = select.select([proc.stderr], [], [], remaining)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"systemd-socket-activate exited: {buffered!r}"
            buffered += chunk
    # the first datagram makes it exec chatd, which then reads that same datagram
    alice = UdpUser(("127.0.0.1", port))
    alice.send("L alice")
    assert alice.recv(timeout=15) == b"OK"
    bob = UdpUser(("127.0.0.1", port)).join("bob")
    assert alice.recv_text() == "\nbob joined the room"
    events = json_lines(tmp_path / "chatd.log")
    assert any(e["event"] == "socket_activation" for e in events)
    assert [e["pid"] for e in events if e["event"] == "server_started"] == [proc.pid]
    bob.close()
    alice.close()


# -- sd_notify ------------------------------------------------------------------------------


def test_notify_ready_watchdog_reload_stopping_from_the_main_process_only(
        tmp_path: Path, spawned) -> None:
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    notes = CredNotifications()
    env = {**os.environ, "NOTIFY_SOCKET": notes.name, "WATCHDOG_USEC": "2000000"}
    proc = spawned(chatd_run(config), env)
    try:
        ready = notes.wait("READY", "1")
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == f"serving 127.0.0.1:{port}, 0 users"
        # READY means serving: the very next datagram is answered
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        first, second = notes.wait("WATCHDOG", "1"), notes.wait("WATCHDOG", "1")
        assert second["_at"] > first["_at"] and first["STATUS"].startswith("serving ")

        proc.send_signal(signal.SIGHUP)
        reloading = notes.wait("RELOADING", "1")
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 <= now_usec - int(reloading["MONOTONIC_USEC"]) < 15_000_000
        assert notes.wait("READY", "1")["STATUS"] == f"serving 127.0.0.1:{port}, 1 users"

        # a reload through the admin child: still the daemon that notifies
        status = request(str(tmp_path / "run" / "control.sock"), "status")["result"]
        admin_pid = status["admin_child_pid"]
        assert admin_pid and admin_pid != proc.pid
        assert request(str(tmp_path / "run" / "control.sock"), "reload")["ok"]
        notes.wait("RELOADING", "1")
        notes.wait("READY", "1")
        alice.ping()

        proc.send_signal(signal.SIGTERM)
        notes.wait("STOPPING", "1")
        assert proc.wait(10) == 0
        senders = {message.get("_pid") for message in notes.seen}
        assert senders == {proc.pid}, notes.seen
        alice.close()
    finally:
        notes.close()


def test_short_watchdog_is_pinged_at_half_its_interval(tmp_path: Path, spawned) -> None:
    config = write_config(tmp_path)
    notes = CredNotifications()
    env = {**os.environ, "NOTIFY_SOCKET": notes.name, "WATCHDOG_USEC": "1000000"}
    spawned(chatd_run(config), env)
    try:
        notes.wait("READY", "1")
        pings = [notes.wait("WATCHDOG", "1", timeout=5)["_at"] for _ in range(4)]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 1.0, gaps  # pinged every 0.5 s; systemd kills after 1 s without
    finally:
        notes.close()


@pytest.mark.parametrize("where", ["abstract-nobody", "not-a-socket", "full-queue"])
def test_a_broken_notify_socket_never_breaks_the_daemon(where: str, tmp_path: Path,
                                                         spawned) -> None:
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    keep: socket.socket | None = None
    if where == "abstract-nobody":
        address = f"@chatd-test-nobody-{uuid.uuid4().hex}"
    elif where == "not-a-socket":
        address = str(tmp_path / "notify")
        Path(address).write_text("")
    else:  # a manager that stopped reading: its queue holds max_dgram_qlen (10) datagrams
        address = f"@chatd-test-full-{uuid.uuid4().hex}"
        keep = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep.bind("\0" + address[1:])
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    proc = spawned(chatd_run(config), env)
    try:
        user = wait_serving(("127.0.0.1", port))
        control = str(tmp_path / "run" / "control.sock")
        for _ in range(8):  # each reload notifies twice: more than the queue holds
            assert request(control, "reload", timeout=5)["ok"]
        proc.send_signal(signal.SIGHUP)
        user.ping()
        assert request(control, "status", timeout=5)["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        user.close()
    finally:
        if keep is not None:
            keep.close()


# -- logging under systemd ------------------------------------------------------------------


def test_journal_stream_gets_syslog_priority_prefixes(tmp_path: Path, spawned) -> None:
    """Under systemd stderr is the journal: each line starts with its priority, "<6>" etc."""
    config = write_config(tmp_path, {"log": {"file": None, "format": "json"}})
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    notes = CredNotifications()
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        st = os.fstat(stderr.fileno())  # as journald: the stream chatd's stderr is
        env = {**os.environ, "NOTIFY_SOCKET": notes.name,
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = spawned(chatd_run(config), env, stderr=stderr)
    try:
        notes.wait("READY", "1")
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        stranger = UdpUser(("127.0.0.1", port))
        stranger.send("C alice not me")  # dropped: a warning
        alice.ping()
        config.write_text(config.read_text() + "\nno_such_key: 1\n")
        proc.send_signal(signal.SIGHUP)  # the reload fails: an error
        notes.wait("RELOADING", "1")
        notes.wait("READY", "1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        alice.close()
        stranger.close()
    finally:
        notes.close()
    by_event: dict[str, str] = {}
    for line in stderr_path.read_text().splitlines():
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, f"not a journal line: {line!r}"
        by_event.setdefault(json.loads(match.group(2))["event"], match.group(1))
    assert by_event["server_started"] == "6"
    assert by_event["datagram_dropped"] == "4"
    assert by_event["reload_failed"] == "3"


def test_inherited_journal_stream_of_another_stream_adds_no_prefixes(tmp_path: Path,
                                                                     spawned) -> None:
    """A JOURNAL_STREAM that names some other stream (inherited, stderr redirected)."""
    config = write_config(tmp_path, {"log": {"file": None, "format": "json"}})
    notes = CredNotifications()
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        env = {**os.environ, "NOTIFY_SOCKET": notes.name, "JOURNAL_STREAM": "8:123456"}
        proc = spawned(chatd_run(config), env, stderr=stderr)
    try:
        notes.wait("READY", "1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        notes.close()
    lines = stderr_path.read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines


def stderr_under_journald(tmp_path: Path, argv: list[str],
                          journal_stream: str | None = None) -> str:
    """A command's stderr when it is the stream systemd connected to journald."""
    path = tmp_path / "stderr"
    with path.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": journal_stream or f"{st.st_dev}:{st.st_ino}"}
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, timeout=60)
    assert result.returncode != 0, argv
    return path.read_text()


def test_command_errors_reach_the_journal_as_errors(tmp_path: Path) -> None:
    """ExecStartPre=chatd check-config and ExecStart=chatd run/start say why a start failed
    on stderr; at journald's default priority (info) `journalctl -p warning` hid it."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("room:\n  max_users: lots\n")
    err = stderr_under_journald(tmp_path, [*CHATD, "check-config", "-c", str(broken)])
    assert re.fullmatch(rf"<3>chatd: config error: {re.escape(str(broken))}, line 2: "
                        r"room\.max_users: expected an integer, got 'lots'\n", err), err
    err = stderr_under_journald(tmp_path, [*CHATD, "status", "-c", str(broken)])
    assert err.startswith("<4>chatd: warning: "), err

    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        for command in ("run", "start"):
            directory = tmp_path / command
            directory.mkdir()
            config = write_config(directory, port=port)
            err = stderr_under_journald(tmp_path, [*CHATD, command, "-c", str(config)])
            assert re.fullmatch(r"<3>chatd: .*\n", err) and str(port) in err, err

    chatctl = [str(VENV_BIN / "chatctl"), "--socket", str(tmp_path / "nothing.sock"), "who"]
    err = stderr_under_journald(tmp_path, chatctl)
    assert err.startswith("<3>chatctl: chatd is not running?"), err


def test_command_errors_elsewhere_carry_no_prefix(tmp_path: Path) -> None:
    """On a terminal, or a stderr redirected away from the journal, nothing changes."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("room:\n  max_users: lots\n")
    err = stderr_under_journald(tmp_path, [*CHATD, "check-config", "-c", str(broken)],
                                journal_stream="8:123456")
    assert err.startswith("chatd: config error: "), err


# -- a runtime directory that changed hands -------------------------------------------------


def test_stop_is_clean_when_the_runtime_dir_changed_owner() -> None:
    """systemd chowns a RuntimeDirectory= to the DynamicUser of whichever unit starts with it;
    a daemon that then cannot remove its control socket and FIFO says so, and still exits 0
    (it used to die of the PermissionError, and systemd recorded a failure)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run chatd as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")
    directory = Path(tempfile.mkdtemp(prefix="chatd-test-"))  # pytest's tmp_path is 0700
    directory.chmod(0o755)
    server = ChatdProcess(directory, {"daemon": {"user": "nobody"}})
    try:
        server.start()
        control = config_mod.load(str(server.config)).control
        assert server.runtime_dir.stat().st_uid == nobody.pw_uid
        os.chown(server.runtime_dir, 0, 0)  # mode 0755: nobody can no longer unlink in it
        status = server.stop()
        events = server.log_events()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    assert status == 0
    left = {e["path"]: e["error"] for e in events if e["event"] == "control_file_not_removed"}
    assert left == {control.socket: "Permission denied", control.fifo: "Permission denied"}


# -- the hardening the units promise ----------------------------------------------------------

# MemoryDenyWriteExecute=yes in the units: the kernel's PR_SET_MDWE is the same rule
_MDWE = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
         "sys.exit(3) if libc.prctl(65, 1, 0, 0, 0) != 0 else None; "
         "os.execv(sys.argv[1], sys.argv[1:])")


def test_daemon_runs_with_memory_deny_write_execute(tmp_path: Path, spawned) -> None:
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    notes = CredNotifications()
    env = {**os.environ, "NOTIFY_SOCKET": notes.name}
    proc = spawned([sys.executable, "-c", _MDWE, *chatd_run(config)], env)
    try:
        wait_for(lambda: proc.poll() is not None or notes._receive(0.1) is not None,
                 timeout=15, what="READY=1 or an exit")
        if proc.poll() == 3:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        assert proc.poll() is None, proc.communicate(timeout=5)[1].decode()
        assert notes.seen[0].get("READY") == "1", notes.seen
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        alice.say("/who")
        assert "alice" in alice.recv_text()
        alice.close()
    finally:
        notes.close()


# -- systemctl: the units end to end --------------------------------------------------------


def _systemctl(root: Path, *args: str) -> subprocess.CompletedProcess:
    assert SYSTEMCTL is not None
    # MinimumYield: how long it idles after forking a command (0.5 s by default)
    return subprocess.run([SYSTEMCTL, f"--root={root}", "-c", "MinimumYield=0.05", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(SYSTEMCTL is None, reason="docker-systemctl-replacement is not installed "
                                              "(pip install docker-systemctl-replacement)")
@pytest.mark.parametrize("unit", ["chatd.service", "chatd-forking.service"])
def test_systemctl_start_status_reload_stop(unit: str, tmp_path: Path) -> None:
    """start -> active and serving; reload applies the file; stop -> inactive, nothing left.

    The replacement runs units as root under --root: PIDFile= and
    RuntimeDirectory= land inside the root, while User=, DynamicUser= and the
    sandboxing directives are ignored (it says so), so the unit files are used
    as installed, with only the paths to chatd and its config changed.
    """
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "etc" / "chatd").mkdir(parents=True)
    port = free_udp_port()
    runtime_dir = root / "run" / "chatd"
    log_file = root / "var" / "log" / "chatd" / "chatd.log"
    config = write_config(root / "etc" / "chatd", {
        "runtime_dir": str(runtime_dir),
        "log": {"file": str(log_file), "level": "info"},
    }, port=port)
    render_unit(unit, root / "etc" / "systemd" / "system", config=str(config))
    pids: list[int] = []
    try:
        started = _systemctl(root, "start", unit)
        assert started.returncode == 0, started.stderr
        assert _systemctl(root, "is-active", unit).stdout.strip() == "active"
        alice = UdpUser(("127.0.0.1", port)).join("alice")
        bob = UdpUser(("127.0.0.1", port)).join("bob")
        assert alice.recv_text() == "\nbob joined the room"
        bob.say("hello from systemd")
        assert alice.recv_text() == "\nbob says: hello from systemd"
        status = request(str(runtime_dir / "control.sock"), "status")["result"]
        pids = [status["pid"], status["admin_child_pid"]]
        assert (runtime_dir / "chatd.pid").read_text().strip() == str(status["pid"])
        shown = _systemctl(root, "status", unit)
        assert "active (running)" in shown.stdout, shown.stdout + shown.stderr

        # reload: the file's new limit applies to the next login, nobody is dropped
        data = yaml.safe_load(config.read_text())
        data.setdefault("room", {})["max_users"] = 2
        config.write_text(yaml.safe_dump(data))
        reloaded = _systemctl(root, "reload", unit)
        assert reloaded.returncode == 0, reloaded.stderr
        wait_for(lambda: any(e["event"] == "reloaded" for e in json_lines(log_file)),
                 what="the reloaded log line")  # ExecReload= is kill -HUP: asynchronous
        carol = UdpUser(("127.0.0.1", port))
        assert carol.login("carol") == b"\nthe room is full (2 users), try again later"
        alice.ping()

        stopped = _systemctl(root, "stop", unit)
        assert stopped.returncode == 0, stopped.stderr
        assert bob.recv_text() == "\nthe server is shutting down"
        assert bob.recv() == b"EXIT"
        assert _systemctl(root, "is-active", unit).stdout.strip() == "inactive"
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=10,
                 what="the daemon and its admin child to exit")
        assert not (runtime_dir / "chatd.pid").exists()
        for user in (alice, bob, carol):
            user.close()
    finally:
        _systemctl(root, "stop", unit)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_cluster_node_template_unit(tmp_path: Path) -> None:
    """chatd@.service: one cluster node per instance, its own config and runtime dir, and
    otherwise chatd.service's settings (the sandbox is not weaker for a cluster node)."""
    node, plain = unit_settings("chatd@.service"), unit_settings("chatd.service")
    assert node["ExecStart"] == ["@BINDIR@/chatd run -c /etc/chatd/%i.yaml"]
    assert node["ExecStartPre"] == ["@BINDIR@/chatd check-config -c /etc/chatd/%i.yaml"]
    assert node["RuntimeDirectory"] == ["chatd/%i"]
    assert node["ExecStop"] == ["+@BINDIR@/chatd systemd-stop -c /etc/chatd/%i.yaml %n"]
    differing = {"Description", "ExecStart", "ExecStartPre", "ExecStop", "RuntimeDirectory",
                 "StateDirectory", "LogsDirectory", "After", "Wants"}
    assert {k: v for k, v in node.items() if k not in differing} == {
        k: v for k, v in plain.items() if k not in differing}
    if SYSTEMD_ANALYZE is None:
        return
    text = (UNIT_DIR / "chatd@.service").read_text().replace("@BINDIR@", str(VENV_BIN))
    (tmp_path / "chatd@.service").write_text(text)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no",
                             str(tmp_path / "chatd@.service") + ":chatd@n1.service"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
