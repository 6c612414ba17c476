"""The pidfile, where "running" means "its lock is held".

A pid in a file proves nothing (the process may be gone, or the pid reused),
but an ``flock`` dies with the process that holds it. So the daemon holds an
exclusive lock on the pidfile for its whole life and everyone else only asks
whether the lock is taken. ``flock`` (not ``lockf``) because its lock belongs
to the open file and survives the daemon's fork.

The pid is written atomically: into a new file that is locked first, then
renamed over the old one, so a reader never sees half a pid and the path is
never unlocked while the daemon lives.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from enum import Enum


class State(Enum):
    RUNNING = "running"  # lock held
    STALE = "stale"  # file present, nobody holds the lock (crash, SIGKILL, power cut)
    ABSENT = "absent"
    UNKNOWN = "unknown"  # cannot tell, e.g. permission denied


@dataclass(frozen=True)
class Probe:
    state: State
    pid: int | None = None
    error: str | None = None


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None):
        super().__init__(f"already running (pid {pid})" if pid else "already running")
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def probe(path: str) -> Probe:
    """Whether a daemon holds ``path``, without disturbing it."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Probe(State.ABSENT)
        except OSError as exc:
            return Probe(State.UNKNOWN, error=f"{path}: {exc.strerror}")
        try:
            pid = _read_pid(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return Probe(State.RUNNING, pid)
                return Probe(State.UNKNOWN, pid, error=f"{path}: {exc.strerror}")
            # Unlocked, but maybe only because the daemon just renamed its new pidfile
            # over the one we opened: the answer is only true of the file at ``path``.
            if _is_path_of(fd, path):
                return Probe(State.STALE, pid)
        finally:
            os.close(fd)


def _is_path_of(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one renamed over or unlinked)."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


class PidFile:
    """The daemon's side: take the lock, write the pid, remove the file on the way out."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AlreadyRunning`; a stale file is taken over.

        The lock only counts if it is on the file at ``path``: a daemon that was
        starting may have renamed its new pidfile over the one we opened and then
        let go of the old one, which we would then lock in vain. So check, and retry.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise AlreadyRunning(pid) from None
                raise
            if _is_path_of(fd, self.path):
                break
            os.close(fd)
        self.stale_pid = _read_pid(fd)
        self.fd = fd

    def write(self, pid: int) -> None:
        """Publish ``pid`` atomically, keeping the path locked throughout."""
        assert self.fd is not None, "acquire() first"
        tmp = f"{self.path}.{pid}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(self.fd)
        self.fd = fd

    def keep_published(self, pid: int) -> bool:
        """Write the pidfile again if it vanished (a wiped runtime_dir); True if it did.

        Otherwise ``chatd status`` and ``stop`` would report a running daemon as stopped.
        """
        if self.fd is None or _is_path_of(self.fd, self.path):
            return False
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self.write(pid)
        return True

    def release(self) -> None:
        """Remove the file if it is still ours, then let go of the lock."""
        if self.fd is None:
            return
        if _is_path_of(self.fd, self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def forget(self) -> None:
        """Close our descriptor without touching the file: for a forked child of the daemon.

        A child that kept it would hold the lock (it belongs to the open file, which
        the fork shares) and keep "running" true after the daemon died or stopped.
        """
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
