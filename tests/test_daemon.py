"""``chatd start/stop/status/restart/reload``: a real classic Unix daemon (issue 3).

Every daemon a test starts is stopped by the ``daemons`` fixture's finalizer,
even when the test fails: ``chatd stop --kill``, then SIGKILL by pid as the
last resort. Readiness is ``chatd start`` returning; anything else is waited
for with ``wait_for`` (a bounded poll), never with a sleep.

On this machine pid 1 does not reap orphans, so a daemon that exited can
linger as a zombie of pid 1: "gone" means gone or a zombie, and whether chatd
runs is decided by the pidfile lock, as ``chatd status`` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CHATD, UdpUser, free_udp_port, read_log_events, wait_for, write_config

from chatd.pidfile import State, probe

pytestmark = pytest.mark.timeout(60)

#: Environment for the commands: no systemd hand-me-downs from whoever runs the tests.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                    "WATCHDOG_USEC", "WATCHDOG_PID", "CHATD_CONFIG")}


# -- /proc -------------------------------------------------------------------------------------


def proc_stat(pid: int) -> dict[str, Any] | None:
    """The fields of /proc/PID/stat that matter here, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return {"state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]),
            "session": int(fields[3]), "tty_nr": int(fields[4])}


def is_gone(pid: int) -> bool:
    """No such process, or a zombie (which pid 1 may never reap here)."""
    stat = proc_stat(pid)
    return stat is None or stat["state"] in ("Z", "X")


def all_processes() -> Iterator[tuple[int, dict[str, Any]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                yield int(entry), stat


def zombie_children(parent: int) -> list[int]:
    return [pid for pid, stat in all_processes()
            if stat["ppid"] == parent and stat["state"] == "Z"]


def processes_using(config: Path) -> list[int]:
    """Live processes whose command line names ``config``: the daemon and any child it forked."""
    found = []
    for pid, stat in all_processes():
        if stat["state"] in ("Z", "X") or pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(config).encode() in cmdline.split(b"\0"):
            found.append(pid)
    return found


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``: a daemon and the children it forked (whatever
    they call themselves), even once orphaned."""
    return [pid for pid, stat in all_processes()
            if stat["session"] == sid and stat["state"] not in ("Z", "X")]


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


# -- the daemon under test ---------------------------------------------------------------------


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    pid: int  # of the command itself
    seconds: float


@dataclass
class Daemon:
    """One configuration and the commands run against it."""

    directory: Path
    config: Path
    port: int
    runtime_dir: Path
    log_path: Path
    #: what ``-c`` gets: the absolute path, or a relative one resolved from ``directory``
    config_arg: str = ""
    #: every daemon pid seen, for the finalizer's last resort
    pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.config_arg = self.config_arg or str(self.config)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pidfile(self) -> Path:
        return self.runtime_dir / "chatd.pid"

    def cli(self, *args: str, config: str | None = None, timeout: float = 30,
            tty: bool = False) -> Result:
        """Run ``chatd ARGS -c CONFIG``; with ``tty``, in a new session whose
        controlling terminal (and stdin) is a pseudo-terminal, as from a shell."""
        began = time.monotonic()
        master, slave = os.openpty() if tty else (-1, -1)
        try:
            proc = subprocess.Popen(
                [*CHATD, *args, "-c", config or self.config_arg], cwd=self.directory, env=ENV,
                stdin=slave if tty else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=tty,
                preexec_fn=_take_terminal if tty else None)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"chatd {' '.join(args)} hung: {out} {err}") from None
        finally:
            for fd in (master, slave):
                if fd >= 0:
                    os.close(fd)
        result = Result(proc.returncode, out, err, proc.pid, time.monotonic() - began)
        self.remember_pid()
        return result

    def start(self) -> int:
        """``chatd start`` that must succeed; returns the daemon's pid."""
        result = self.cli("start")
        assert result.returncode == 0, result
        pid = self.pid()
        assert pid is not None
        assert f"chatd started (pid {pid}, udp 127.0.0.1:{self.port})" in result.stdout
        return pid

    def pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def remember_pid(self) -> None:
        pid = self.pid()
        if pid is not None:
            self.pids.add(pid)

    def probe(self) -> State:
        return probe(str(self.pidfile)).state

    def leftovers(self) -> list[str]:
        """What a stopped daemon must not leave in runtime_dir."""
        if not self.runtime_dir.is_dir():
            return []
        return sorted(name for name in os.listdir(self.runtime_dir)
                      if name.startswith("chatd.pid") or name.endswith((".sock", ".fifo")))

    def log_events(self) -> list[dict[str, Any]]:
        return read_log_events(self.log_path)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def rewrite(self, overrides: dict) -> None:
        write_config(self.directory, overrides, port=self.port)

    def finalize(self) -> None:
        """Stop whatever may still run, however the test ended."""
        self.remember_pid()
        with contextlib.suppress(AssertionError):  # a hung stop: the SIGKILLs below
            self.cli("stop", "--kill", "--timeout", "5", config=str(self.config))
        for pid in self.pids:
            # kill by pid only, and only if that pid still runs with our config
            if not is_gone(pid) and pid in processes_using(self.config):
                os.kill(pid, signal.SIGKILL)


def _take_terminal() -> None:
    """In the child, after setsid: make stdin (a pty) the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemons(overrides)`` is a configuration (and its directory); stopped at teardown."""
    made: list[Daemon] = []

    def make(overrides: dict | None = None, *, directory: Path | None = None,
             port: int | None = None, config_arg: str = "") -> Daemon:
        directory = directory or tmp_path / f"d{len(made)}"
        directory.mkdir(exist_ok=True)
        config = write_config(directory, overrides, port=port)
        data = yaml.safe_load(config.read_text())
        # no log.file: chatd start logs to $XDG_STATE_HOME/chatd/chatd.log
        log_path = Path(data["log"]["file"] or directory / "state" / "chatd" / "chatd.log")
        daemon = Daemon(directory, config, data["listen"]["port"], Path(data["runtime_dir"]),
                        log_path, config_arg=config_arg)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.finalize()


@pytest.fixture
def users() -> Iterator[Callable[[tuple[str, int], str], UdpUser]]:
    made: list[UdpUser] = []

    def make(addr: tuple[str, int], name: str) -> UdpUser:
        user = UdpUser(addr, name)
        made.append(user)
        return user.join(name)

    yield make
    for user in made:
        user.close()


def next_text(user: UdpUser, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
    """The first datagram ``user`` receives that satisfies ``predicate`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no such datagram")
        text = user.recv_text(remaining)
        if predicate(text):
            return text


def assert_chat_works(daemon: Daemon, users, tag: str) -> None:
    """Two fresh users log in and one's chat line reaches the other."""
    alice = users(daemon.addr, f"alice{tag}")
    bob = users(daemon.addr, f"bob{tag}")
    alice.say(f"hello from {tag}")
    assert next_text(bob, lambda t: "hello" in t) == f"\nalice{tag} says: hello from {tag}"


def assert_no_zombies(*parents: int) -> None:
    for parent in (os.getpid(), *parents):
        assert zombie_children(parent) == [], f"zombie children of {parent}"


def assert_stopped(daemon: Daemon, pid: int, sid: int) -> None:
    assert is_gone(pid)
    assert session_members(sid) == [], "a child of the daemon outlived it"
    assert daemon.probe() is State.ABSENT
    assert daemon.leftovers() == []
    assert processes_using(daemon.config) == []
    assert_no_zombies()


# -- start -------------------------------------------------------------------------------------


def test_start_detaches_like_a_classic_daemon(daemons, users) -> None:
    daemon = daemons({"daemon": {"umask": 0o027}})
    result = daemon.cli("start", tty=True)  # from a shell: the terminal must not follow
    assert result.returncode == 0, result
    match = re.fullmatch(r"chatd started \(pid (\d+), udp 127\.0\.0\.1:(\d+)\)\n", result.stdout)
    assert match, result.stdout
    pid = int(match[1])
    assert int(match[2]) == daemon.port
    assert daemon.pid() == pid
    assert daemon.probe() is State.RUNNING
    stat = proc_stat(pid)
    assert stat is not None and stat["state"] not in ("Z", "X")
    assert stat["session"] != pid, "a session leader could acquire a controlling terminal"
    assert stat["tty_nr"] == 0
    assert stat["ppid"] != result.pid
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert status_field(pid, "Umask") == "0027"
    # the session leader between the starter and the daemon was reaped, not left to pid 1
    leader = proc_stat(stat["session"])
    assert leader is None or leader["state"] != "Z"
    assert_chat_works(daemon, users, "1")
    assert_no_zombies(pid)
    status = daemon.cli("status")
    assert status.returncode == 0
    assert f"chatd is running (pid {pid}" in status.stdout


def test_second_start_fails_and_the_first_keeps_serving(daemons, users) -> None:
    daemon = daemons()
    pid = daemon.start()
    again = daemon.cli("start")
    assert again.returncode != 0
    assert f"already running (pid {pid})" in again.stderr
    assert daemon.pid() == pid
    assert not is_gone(pid)
    assert_chat_works(daemon, users, "2")
    assert_no_zombies(pid)


# -- stop and status ---------------------------------------------------------------------------


def test_stop_leaves_nothing_behind_and_stopping_again_is_fine(daemons) -> None:
    daemon = daemons()
    pid = daemon.start()
    sid = os.getsid(pid)
    stopped = daemon.cli("stop")
    assert stopped.returncode == 0, stopped
    assert f"chatd stopped (pid {pid})" in stopped.stdout
    assert_stopped(daemon, pid, sid)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(daemon.addr)  # the port is free as soon as `stop` returns (restart needs it)
    status = daemon.cli("status")
    assert status.returncode == 3
    assert "not running" in status.stdout
    again = daemon.cli("stop")
    assert again.returncode == 0
    assert "not running" in again.stdout
    assert any(e.get("pid") == pid for e in daemon.events("server_stopping"))


def test_killed_daemon_is_dead_for_status_and_start_takes_its_pidfile_over(daemons, users) -> None:
    daemon = daemons()
    old = daemon.start()
    sid = os.getsid(old)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.probe() is State.STALE, timeout=10, what="the lock to go")
    # a child of the daemon (the admin child) must notice and not linger as an orphan
    wait_for(lambda: session_members(sid) == [], timeout=10, what="the daemon's children to go")
    status = daemon.cli("status")
    assert status.returncode == 1
    assert f"pid {old}" in status.stdout
    new = daemon.start()
    assert new != old
    taken = daemon.events("stale_pidfile_taken_over")
    assert [e["old_pid"] for e in taken] == [old]
    assert_chat_works(daemon, users, "3")
    assert_no_zombies(new)


def test_stop_timeout_then_kill(daemons) -> None:
    """A stopped (SIGSTOP) process cannot act on SIGTERM: the simplest daemon that ignores it."""
    daemon = daemons()
    pid = daemon.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        slow = daemon.cli("stop", "--timeout", "0.3")
        assert slow.returncode == 1
        assert f"pid {pid} did not stop within 0.3 s" in slow.stderr
        assert "--kill" in slow.stderr
        assert not is_gone(pid)
        assert daemon.probe() is State.RUNNING
        killed = daemon.cli("stop", "--timeout", "0.3", "--kill")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert killed.returncode == 0, killed
    assert f"chatd killed (pid {pid})" in killed.stdout
    assert is_gone(pid)
    # --kill leaves no pidfile claiming a dead daemon behind, nor its control files
    assert daemon.probe() is State.ABSENT
    assert daemon.leftovers() == []
    assert daemon.cli("status").returncode == 3
    assert_no_zombies()


def test_fresh_restart_gives_a_new_daemon_that_serves(daemons, users) -> None:
    daemon = daemons()
    old = daemon.start()
    sid = os.getsid(old)
    restarted = daemon.cli("restart", "--fresh")
    assert restarted.returncode == 0, restarted
    new = daemon.pid()
    assert new is not None and new != old
    assert f"chatd stopped (pid {old})" in restarted.stdout
    assert f"chatd started (pid {new}, udp 127.0.0.1:{daemon.port})" in restarted.stdout
    assert is_gone(old)
    assert session_members(sid) == []
    assert_chat_works(daemon, users, "4")
    assert_no_zombies(new)


# -- failed starts -----------------------------------------------------------------------------


def assert_failed_start_left_nothing(daemon: Daemon) -> None:
    assert daemon.probe() is State.ABSENT
    assert daemon.leftovers() == []
    assert processes_using(daemon.config) == []
    assert_no_zombies()


def test_port_already_taken(daemons) -> None:
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        daemon = daemons(port=port)
        result = daemon.cli("start", timeout=15)
        assert result.returncode != 0
        assert f"127.0.0.1:{port}" in result.stderr
        assert result.seconds < 10
        assert_failed_start_left_nothing(daemon)


def test_unwritable_runtime_dir(daemons, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    daemon = daemons({"runtime_dir": str(blocker / "run")})
    result = daemon.cli("start")
    assert result.returncode != 0
    assert f"cannot create runtime_dir {blocker / 'run'}" in result.stderr
    assert processes_using(daemon.config) == []
    assert_no_zombies()


def test_bad_config_names_the_key(daemons) -> None:
    daemon = daemons({"listen": {"hots": "127.0.0.1"}})
    result = daemon.cli("start")
    assert result.returncode == 2
    assert "listen.hots" in result.stderr
    assert "unknown key" in result.stderr
    assert_failed_start_left_nothing(daemon)


# -- reload ------------------------------------------------------------------------------------


def test_reload_applies_templates_and_log_level_keeping_users(daemons, users) -> None:
    """Also with ``-c`` relative to the starting directory: the daemon itself lives in ``/``."""
    daemon = daemons({"log": {"level": "warning"}}, config_arg="chatd.yaml")
    pid = daemon.start()
    alice = users(daemon.addr, "alice")
    bob = users(daemon.addr, "bob")
    daemon.rewrite({"room": {"templates": {"chat": "\n{name} >> {text}"}},
                    "log": {"level": "debug"}})
    reloaded = daemon.cli("reload")
    assert reloaded.returncode == 0, reloaded
    assert reloaded.stdout == (f"chatd reloaded (pid {pid}): "
                               "applied log.level, room.templates.chat\n")
    sent = iter(range(1000))

    def new_template_seen() -> bool:
        n = next(sent)
        alice.say(f"line {n}")
        text = next_text(bob, lambda t: f"line {n}" in t)
        return text == f"\nalice >> line {n}"

    wait_for(new_template_seen, timeout=10, what="the new chat template")
    # the new level is in force: the reload is logged (info), and so are chat lines (debug),
    # which the daemon writes just after sending them

    def chat_logged_after_reload() -> bool:
        names = [e.get("event") for e in daemon.log_events()]
        return "reloaded" in names and "chat" in names[names.index("reloaded"):]

    wait_for(chat_logged_after_reload, timeout=5, what="a chat line logged after the reload")
    assert not daemon.events("reload_failed")

    # a file that does not validate: `chatd reload` fails naming key and line (whether the
    # command or the daemon found the problem) ...
    daemon.rewrite({"room": {"colour": "red"}})
    refused = daemon.cli("reload")
    assert refused.returncode != 0
    assert "chatd.yaml, line" in refused.stderr and "room.colour" in refused.stderr
    # ... and so does one that is not even YAML ...
    daemon.config.write_text("log:\n  level: [not valid\n  yaml: here")
    refused = daemon.cli("reload")
    assert refused.returncode != 0
    assert "chatd.yaml" in refused.stderr
    # ... and a SIGHUP from elsewhere (kill -HUP, logrotate) finds the daemon keeping its settings
    failures = len(daemon.events("reload_failed"))
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: len(daemon.events("reload_failed")) > failures, timeout=10,
             what="reload_failed")
    alice.say("still here")
    assert next_text(bob, lambda t: "still here" in t) == "\nalice >> still here"
    assert daemon.pid() == pid
    assert daemon.probe() is State.RUNNING  # `chatd status` cannot read the broken file either
    assert_no_zombies(pid)
    daemon.rewrite({})  # so that the finalizer's `chatd stop` can read it


def test_reload_keeps_the_default_log_file_of_start(open_dir: Path, daemons) -> None:
    """Without log.file, chatd start logs to $XDG_STATE_HOME/chatd/chatd.log; reloading
    the same file keeps logging there (not to stderr, which a daemon has on /dev/null)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv, to run as a user whose default log is not /var/log")
    nobody = pwd.getpwnam("nobody")
    daemon = daemons({"log": {"file": None}}, directory=open_dir)
    os.chown(open_dir, nobody.pw_uid, nobody.pw_gid)

    def as_nobody(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
             *CHATD, *args, "-c", str(daemon.config)], cwd=open_dir, capture_output=True,
            text=True, timeout=30, env={**ENV, "XDG_STATE_HOME": str(open_dir / "state")})

    started = as_nobody("start")
    assert started.returncode == 0, started.stderr
    daemon.remember_pid()
    assert daemon.events("server_started")
    daemon.rewrite({"log": {"file": None}, "room": {"max_users": 5}})
    reloaded = as_nobody("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.endswith("): applied room.max_users\n")
    wait_for(lambda: daemon.events("reloaded"), timeout=10, what="the reload in the default log")
    assert daemon.events("reloaded")[-1]["applied"] == ["room.max_users"]
    stopped = as_nobody("stop")
    assert stopped.returncode == 0, stopped.stderr


# -- privileges --------------------------------------------------------------------------------


def test_unknown_user_is_a_clear_error(daemons) -> None:
    daemon = daemons({"daemon": {"user": "no-such-user-chatd"}})
    result = daemon.cli("start")
    assert result.returncode != 0
    assert "no such user" in result.stderr
    assert "no-such-user-chatd" in result.stderr
    assert_failed_start_left_nothing(daemon)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory that an unprivileged daemon can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="chatd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_drops_privileges_to_nobody(open_dir: Path, daemons, users) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")
    daemon = daemons({"daemon": {"user": "nobody"}}, directory=open_dir)
    pid = daemon.start()
    sid = os.getsid(pid)
    uids = status_field(pid, "Uid").split()
    assert uids == [str(nobody.pw_uid)] * 4
    assert status_field(pid, "Gid").split() == [str(nobody.pw_gid)] * 4
    assert daemon.runtime_dir.stat().st_uid == nobody.pw_uid
    assert_chat_works(daemon, users, "5")
    stopped = daemon.cli("stop")
    assert stopped.returncode == 0, stopped
    assert_stopped(daemon, pid, sid)
