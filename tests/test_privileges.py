"""Files, privileges and local users (issue 13, items 7 to 11).

chatd often starts as root, in directories other local users may have
prepared. None of them may steer it: no link is followed, no directory
another user could write is used, no pid is signalled on a pidfile's word
alone, and no admin text goes to a socket chatd's users did not make. And
the setups the README describes work for the real, unprivileged users they
are meant for; these tests make such users with useradd (the
``local_users`` fixture) and run the commands as them.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import CHATD, UdpUser, free_udp_port, read_log_events, wait_for, write_config

from chatd.pidfile import State, probe

pytestmark = pytest.mark.timeout(120)

ENV = {k: v for k, v in os.environ.items()
       if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                    "WATCHDOG_USEC", "WATCHDOG_PID", "CHATD_CONFIG")}


def as_root(*args: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``chatd ARGS -c CONFIG`` as whoever runs the tests."""
    return subprocess.run([*CHATD, *args, "-c", str(config)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def chatctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CHATD[:2], "chatd.cli.chatctl", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def configs(shared: Path) -> Iterator[Callable[..., Path]]:
    """``configs(overrides)``: a config file in ``shared``; whatever it started is stopped."""
    made: list[Path] = []

    def make(overrides: dict | None = None) -> Path:
        made.append(write_config(shared, overrides))
        return made[-1]

    yield make
    for config in made:
        with contextlib.suppress(subprocess.TimeoutExpired):
            as_root("stop", "--kill", "--timeout", "5", config=config)


def started(config: Path) -> None:
    result = as_root("start", config=config)
    assert result.returncode == 0, result.stderr


# -- item 7: symbolic links and unsafe directories ---------------------------------------------


def test_runtime_dir_that_is_a_symlink_is_refused_and_its_target_left_alone(
        shared, local_users, configs) -> None:
    chatd_user = local_users()
    target = shared / "root-owned"
    target.mkdir(mode=0o755)
    (shared / "run").symlink_to(target)
    config = configs({"daemon": {"user": chatd_user.name}})
    result = as_root("start", config=config)
    assert result.returncode == 1
    assert "refusing runtime_dir" in result.stderr and "symbolic link" in result.stderr
    assert "Traceback" not in result.stderr
    assert (target.stat().st_uid, target.stat().st_gid) == (0, 0)  # not chowned
    assert os.listdir(target) == []


@pytest.mark.parametrize("how", ["owned by another user", "group-writable", "world-writable"])
def test_runtime_dir_someone_else_could_write_is_refused(shared, configs, request, how) -> None:
    run = shared / "run"
    run.mkdir()
    if how == "owned by another user":
        other = request.getfixturevalue("local_users")()
        os.chown(run, other.uid, other.gid)
        expected = f"belongs to {other.name}"
    else:
        mode = 0o775 if how == "group-writable" else 0o777
        run.chmod(mode)
        who = "its group" if how == "group-writable" else "its group and others"
        expected = f"is writable by {who} (mode {mode:04o})"
    config = configs()
    result = as_root("start", config=config)
    assert result.returncode == 1
    assert f"refusing runtime_dir: {run} " in result.stderr and expected in result.stderr
    assert os.listdir(run) == []  # nothing made in it, nothing locked


def test_log_file_that_is_a_symlink_is_refused(shared, configs) -> None:
    precious = shared / "precious"
    precious.write_text("root's own file\n")
    link = shared / "chatd.log"
    link.symlink_to(precious)
    config = configs({"log": {"file": str(link)}})
    result = as_root("start", config=config)
    assert result.returncode == 1
    assert f"cannot open log.file {link}" in result.stderr and "symbolic link" in result.stderr
    assert precious.read_text() == "root's own file\n"


def test_a_link_swapped_in_for_a_rotated_log_is_not_followed(shared, configs) -> None:
    config = configs({"log": {"level": "info"}})
    started(config)
    log = shared / "chatd.log"
    precious = shared / "precious"
    precious.write_text("root's own file\n")
    log.rename(shared / "chatd.log.1")
    log.symlink_to(precious)
    assert chatctl("-c", str(config), "reload").returncode == 0  # logs "reloaded"
    rotated = shared / "chatd.log.1"
    wait_for(lambda: any(e["event"] == "reloaded" for e in read_log_events(rotated)),
             what="the reload logged to the file still open")
    events = [e["event"] for e in read_log_events(rotated)]
    assert "log_reopen_failed" in events
    assert precious.read_text() == "root's own file\n"
    assert log.is_symlink()


# -- item 8: a runtime_dir made first by another user ------------------------------------------


def _serve_as(user, path: Path) -> tuple[int, int, int]:
    """A control socket at ``path`` served by ``user`` (in a forked child): it records what it
    is told. Returns (pid, stop_fd, report_fd): write to stop_fd, then read the report."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report = b"nothing"
        try:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            os.umask(0)
            path.parent.mkdir(mode=0o777, exist_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen(4)
            os.write(ready_w, b"r")
            readable, _, _ = select.select([listener, stop_r], [], [], 60)
            if listener in readable:
                conn, _ = listener.accept()
                conn.settimeout(5)
                report = b"told: " + conn.recv(65536)
                conn.sendall(b'{"ok": true, "result": {"users": 0}}\n')
        except BaseException as exc:  # reported to the test, which fails
            report = f"error: {exc!r}".encode()
        finally:
            os.write(report_w, report)
            os._exit(0)
    for fd in (ready_w, stop_r, report_w):
        os.close(fd)
    ready = os.read(ready_r, 1)
    os.close(ready_r)
    if ready != b"r":
        os.close(stop_w)
        report = os.read(report_r, 65536).decode()
        os.close(report_r)
        os.waitpid(pid, 0)
        raise AssertionError(f"the planted socket could not be served: {report}")
    return pid, stop_w, report_r


def test_default_runtime_dir_made_first_by_another_user(shared, local_users) -> None:
    """Without $XDG_RUNTIME_DIR a user's default runtime_dir is /tmp/chatd-UID, which
    anyone may create first: chatd refuses it, and chatctl will not talk to a socket there."""
    admin, mallory = local_users(), local_users()
    planted = Path(f"/tmp/chatd-{admin.uid}")
    shutil.rmtree(planted, ignore_errors=True)  # a uid of a user deleted earlier: stale
    pid, stop_fd, report_fd = _serve_as(mallory, planted / "control.sock")
    try:
        said = admin.chatctl("say", "the root password is hunter2")
        assert said.returncode == 4, said
        assert f"refusing the control socket {planted / 'control.sock'}" in said.stderr
        assert mallory.name in said.stderr
        logs = shared / "adminlogs"
        logs.mkdir()
        os.chown(logs, admin.uid, admin.gid)
        config = shared / "admin.yaml"  # no runtime_dir: the default
        config.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1",
                                                     "port": free_udp_port()},
                                          "log": {"file": str(logs / "chatd.log")}}))
        start = admin.chatd("start", "-c", str(config))
        assert start.returncode == 1, start
        assert f"refusing runtime_dir: {planted} belongs to {mallory.name}" in start.stderr
        assert sorted(os.listdir(planted)) == ["control.sock"]
    finally:
        with contextlib.suppress(BrokenPipeError):  # it has reported already
            os.write(stop_fd, b"x")
        report = os.read(report_fd, 65536)
        os.close(stop_fd)
        os.close(report_fd)
        os.waitpid(pid, 0)
        shutil.rmtree(planted, ignore_errors=True)
    assert report == b"nothing"  # not even a connection: nothing was said to mallory


# -- item 9: stop --kill aimed at another process ---------------------------------------------


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) is not installed")
@pytest.mark.parametrize("named", ["a victim", "the lock holder"])
def test_stop_kill_signals_nothing_but_a_chatd_holding_the_lock(
        shared, local_users, configs, named) -> None:
    """The daemon's user killed its daemon, named another pid in the pidfile and holds the
    lock itself: root's ``chatd stop --kill`` must not kill that pid."""
    chatd_user = local_users()
    run = shared / "run"
    run.mkdir()
    os.chown(run, chatd_user.uid, chatd_user.gid)
    config = configs({"daemon": {"user": chatd_user.name}})
    pidfile = run / "chatd.pid"
    victim = subprocess.Popen(["sleep", "300"])  # root's: chatd's user may not signal it
    holder = chatd_user.popen(["flock", "--exclusive", "--nonblock", str(pidfile),
                               "sleep", "300"], start_new_session=True)  # flock forks sleep
    try:
        wait_for(lambda: probe(str(pidfile)).state is State.RUNNING, what="the planted lock")
        named_pid = victim.pid if named == "a victim" else holder.pid
        planted = chatd_user.run(["sh", "-c", f"echo {named_pid} > {pidfile}"])
        assert planted.returncode == 0, planted.stderr
        result = as_root("stop", "--kill", "--timeout", "1", config=config)
        assert result.returncode == 1, result
        if named == "a victim":
            assert f"names pid {victim.pid}, but its lock is held by pid {holder.pid}" \
                in result.stderr
        else:
            assert f"pid {holder.pid} holds the lock on {pidfile} but is not chatd" \
                in result.stderr
        assert "refusing to signal" in result.stderr
        status = as_root("status", config=config)
        assert status.returncode == 4 and "refusing to signal" in status.stderr
        reload = as_root("reload", config=config)
        assert reload.returncode == 1 and "refusing to signal" in reload.stderr
        assert victim.poll() is None and holder.poll() is None
    finally:
        victim.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        for proc in (victim, holder):
            proc.wait(10)


# -- item 10: the README's daemon.user + control.group example, as real users -------------------


def test_readme_daemon_user_and_control_group_example(shared, local_users, configs) -> None:
    admins = local_users.group()
    chatd_user = local_users()
    alice = local_users(groups=(admins,))  # an admin: a member of control.group
    outsider = local_users()
    config = configs({"daemon": {"user": chatd_user.name, "group": chatd_user.name},
                      "control": {"group": admins}})
    started(config)
    run = shared / "run"
    admins_gid = grp.getgrnam(admins).gr_gid
    sock, fifo = run / "control.sock", run / "control.fifo"
    assert (sock.stat().st_gid, stat.S_IMODE(sock.stat().st_mode)) == (admins_gid, 0o660)
    assert (fifo.stat().st_gid, stat.S_IMODE(fifo.stat().st_mode)) == (admins_gid, 0o620)
    assert (run.stat().st_uid, run.stat().st_gid) == (chatd_user.uid, admins_gid)
    port = json.loads(chatctl("-c", str(config), "status", "--json").stdout)["address"]
    bob = UdpUser(("127.0.0.1", int(port.rsplit(":", 1)[1])))
    try:
        bob.join("bob")
        said = alice.chatctl("-c", str(config), "say", "hello from alice")
        assert said.returncode == 0, said
        assert bob.recv_text() == "\nadmin says: hello from alice"
        # root, without the config: the socket of a directory root made for chatd's user
        assert chatctl("--socket", str(sock), "who").returncode == 0
        # the FIFO takes the group's lines too
        with_fifo = alice.run(["sh", "-c", f"echo 'say via the fifo' > {fifo}"])
        assert with_fifo.returncode == 0, with_fifo.stderr
        assert bob.recv_text() == "\nadmin says: via the fifo"
    finally:
        bob.close()
    # item 11: anyone else is told "permission denied", exit status 4, no traceback
    who = outsider.chatctl("-c", str(config), "who")
    assert (who.returncode, who.stderr.strip()) == (4, f"chatctl: permission denied: {sock}")
    for command in ("reload", "stop"):
        result = outsider.chatd(command, "-c", str(config))
        assert result.returncode == 4, result
        assert "permission denied" in result.stderr and "Traceback" not in result.stderr
    assert probe(str(run / "chatd.pid")).state is State.RUNNING
    stopped = as_root("stop", config=config)
    assert stopped.returncode == 0, stopped


def test_log_reopened_after_rotation_under_daemon_user(shared, local_users, configs) -> None:
    chatd_user = local_users()
    log = shared / "logs" / "chatd.log"
    config = configs({"daemon": {"user": chatd_user.name},
                      "log": {"file": str(log), "level": "info"}})
    started(config)
    for path in (log, log.parent):
        assert path.stat().st_uid == chatd_user.uid
    assert stat.S_IMODE(log.stat().st_mode) == 0o640  # item 11: names and addresses inside
    assert not any(e["event"] == "log_file_not_reopenable" for e in read_log_events(log))
    log.rename(log.with_name("chatd.log.1"))  # what logrotate does, without "create"
    reloaded = chatctl("-c", str(config), "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(lambda: any(e["event"] == "reloaded" for e in read_log_events(log)),
             what="the reload logged to a new file")
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert log.stat().st_uid == chatd_user.uid
    rotated = read_log_events(log.with_name("chatd.log.1"))
    assert not any(e["event"] == "log_reopen_failed" for e in rotated)


def test_an_existing_log_directory_chatd_cannot_write_is_reported(
        shared, local_users, configs) -> None:
    """chatd does not take over a directory it did not make; it says what will go wrong."""
    chatd_user = local_users()
    log = shared / "chatd.log"  # in a directory of root's, 0755
    config = configs({"daemon": {"user": chatd_user.name}, "log": {"file": str(log)}})
    started(config)
    assert shared.stat().st_uid == 0
    warning = [e for e in read_log_events(log) if e["event"] == "log_file_not_reopenable"]
    assert warning and f"may not create files in {shared}" in warning[0]["problem"]


def test_chatctl_refused_by_the_peer_check_exits_4(shared, local_users, configs) -> None:
    """A socket anyone may connect to (control.mode 0666): the admin child's check refuses."""
    outsider = local_users()
    config = configs({"control": {"mode": 0o666}})
    started(config)
    result = outsider.chatctl("-c", str(config), "say", "hello")
    assert result.returncode == 4, result
    assert "permission denied" in result.stderr
    reload = outsider.chatd("reload", "-c", str(config))
    assert reload.returncode == 4, reload
    assert "permission denied" in reload.stderr and "Traceback" not in reload.stderr
