"""The pidfile: "running" means "its flock is held", whatever the file says.

flock locks belong to the open file description, so a second ``open()`` of the
same path in this very process is a rival holder: most tests need no fork. One
test forks a real holder, to see the lock outlive nothing but its process.
"""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import pytest

from chatd import pidfile as pidfile_mod
from chatd.pidfile import AlreadyRunning, PidFile, State, probe


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "chatd.pid")


def test_probe_absent(path: str) -> None:
    assert probe(path).state is State.ABSENT


def test_probe_stale_when_nobody_holds_the_lock(path: str) -> None:
    Path(path).write_text("4242\n")
    found = probe(path)
    assert (found.state, found.pid) == (State.STALE, 4242)


def test_probe_running_while_another_open_file_holds_the_lock(path: str) -> None:
    Path(path).write_text("4242\n")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        found = probe(path)
        assert (found.state, found.pid) == (State.RUNNING, 4242)
    finally:
        os.close(fd)
    assert probe(path).state is State.STALE


def test_probe_unknown_when_the_path_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    found = probe(str(tmp_path / "file" / "chatd.pid"))  # ENOTDIR, even as root
    assert found.state is State.UNKNOWN
    assert found.error and "file" in found.error


def test_lock_held_by_a_forked_process_then_stale_once_it_is_killed(path: str) -> None:
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            holder = PidFile(path)
            holder.acquire()
            holder.write(os.getpid())
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"  # blocks until the child holds the lock
        found = probe(path)
        assert (found.state, found.pid) == (State.RUNNING, child)
        with pytest.raises(AlreadyRunning, match=f"already running \\(pid {child}\\)"):
            PidFile(path).acquire()
    finally:
        os.close(ready_r)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    found = probe(path)
    assert (found.state, found.pid) == (State.STALE, child)
    taker = PidFile(path)
    taker.acquire()
    try:
        assert taker.stale_pid == child
    finally:
        taker.release()


def test_acquire_write_release(path: str) -> None:
    mine = PidFile(path)
    mine.acquire()
    assert mine.stale_pid is None
    mine.write(12345)
    assert Path(path).read_text() == "12345\n"
    assert probe(path) == pidfile_mod.Probe(State.RUNNING, 12345)
    with pytest.raises(AlreadyRunning) as caught:
        PidFile(path).acquire()
    assert caught.value.pid == 12345
    mine.release()
    assert probe(path).state is State.ABSENT
    mine.release()  # twice is harmless


def test_write_keeps_the_path_locked_throughout(path: str, monkeypatch) -> None:
    """At the rename both the old and the new file are locked, and the temp file goes away."""
    mine = PidFile(path)
    mine.acquire()
    real_rename = os.rename
    seen: list[tuple[State, State]] = []

    def rename(src: str, dst: str) -> None:
        seen.append((probe(dst).state, probe(src).state))
        real_rename(src, dst)
        seen.append((probe(dst).state, State.ABSENT))

    monkeypatch.setattr(os, "rename", rename)
    try:
        mine.write(777)
    finally:
        monkeypatch.undo()
    try:
        assert seen == [(State.RUNNING, State.RUNNING), (State.RUNNING, State.ABSENT)]
        assert probe(path) == pidfile_mod.Probe(State.RUNNING, 777)
        assert os.listdir(os.path.dirname(path)) == ["chatd.pid"]  # no temp file left
        there, held = os.stat(path), os.fstat(mine.fileno())
        assert (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)
    finally:
        mine.release()


def test_acquire_does_not_trust_a_lock_on_a_file_renamed_away(path: str, monkeypatch) -> None:
    """A starter that opened the old pidfile just before the daemon's rename must not win."""
    daemon = PidFile(path)
    daemon.acquire()
    real_flock = fcntl.flock
    raced = []

    def flock(fd: int, operation: int) -> None:
        if not raced and operation & fcntl.LOCK_EX and fd != daemon.fd:
            raced.append(fd)
            daemon.write(999)  # renames a new file over the path, closes the old one
        real_flock(fd, operation)

    monkeypatch.setattr(pidfile_mod.fcntl, "flock", flock)
    try:
        with pytest.raises(AlreadyRunning) as caught:
            PidFile(path).acquire()
    finally:
        monkeypatch.undo()
        daemon.release()
    assert raced, "the race was not arranged"
    assert caught.value.pid == 999


def test_probe_does_not_call_stale_a_file_renamed_away(path: str, monkeypatch) -> None:
    daemon = PidFile(path)
    daemon.acquire()
    real_flock = fcntl.flock
    raced = []

    def flock(fd: int, operation: int) -> None:
        if not raced and operation & fcntl.LOCK_SH:
            raced.append(fd)
            daemon.write(998)
        real_flock(fd, operation)

    monkeypatch.setattr(pidfile_mod.fcntl, "flock", flock)
    try:
        found = probe(path)
    finally:
        monkeypatch.undo()
        daemon.release()
    assert raced, "the race was not arranged"
    assert (found.state, found.pid) == (State.RUNNING, 998)


def test_release_removes_only_our_own_file(path: str) -> None:
    mine = PidFile(path)
    mine.acquire()
    mine.write(111)
    os.unlink(path)  # someone removed ours and a new daemon made its own
    Path(path).write_text("222\n")
    mine.release()
    assert Path(path).read_text() == "222\n"
    assert mine.fd is None


def test_forget_lets_go_of_the_lock_but_keeps_the_file(path: str) -> None:
    """What a forked child of the daemon does, so that only the daemon holds the lock."""
    mine = PidFile(path)
    mine.acquire()
    mine.write(333)
    mine.forget()
    assert probe(path) == pidfile_mod.Probe(State.STALE, 333)
    mine.release()  # nothing left to release
    assert Path(path).exists()


# -- links planted in runtime_dir, and who really holds the lock (issue 13) ---------------------


def test_write_replaces_a_planted_temp_link_and_leaves_its_target_alone(path: str,
                                                                        tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's own file\n")
    os.symlink(precious, f"{path}.4321.tmp")  # the name write(4321) uses
    mine = PidFile(path)
    mine.acquire()
    try:
        mine.write(4321)
        assert Path(path).read_text() == "4321\n"
        assert not Path(path).is_symlink()
        assert precious.read_text() == "root's own file\n"
        assert sorted(os.listdir(tmp_path)) == ["chatd.pid", "precious"]
    finally:
        mine.release()


def test_a_pidfile_that_is_a_link_is_neither_followed_nor_locked(path: str,
                                                                 tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's own file\n")
    os.symlink(precious, path)
    with pytest.raises(OSError, match="symbolic link"):
        PidFile(path).acquire()
    found = probe(path)
    assert found.state is State.UNKNOWN and "symbolic link" in (found.error or "")
    assert precious.read_text() == "root's own file\n"


def test_probe_names_the_process_that_holds_the_lock(path: str) -> None:
    """From /proc/locks: the locker's pid, whatever pid the file names."""
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            fd = os.open(path, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b"1\n")  # a pid that is not the holder's
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        found = probe(path)
        assert (found.state, found.pid, found.holders) == (State.RUNNING, 1, (child,))
    finally:
        os.close(ready_r)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert probe(path).state is State.STALE
