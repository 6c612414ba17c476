"""The pidfile, where "running" means "its lock is held".

A pid in a file proves nothing (the process may be gone, or the pid reused),
but an ``flock`` dies with the process that holds it. So the daemon holds an
exclusive lock on the pidfile for its whole life and everyone else only asks
whether the lock is taken. ``flock`` (not ``lockf``) because its lock belongs
to the open file and survives the daemon's fork.

The pid is written atomically: into a new file that is locked first, then
renamed over the old one, so a reader never sees half a pid and the path is
never unlocked while the daemon lives.

Neither file is opened through a symbolic link, and the temporary one is
always a new file: whoever could plant a link in runtime_dir would otherwise
have the daemon (often root) truncate and write the file it points at.

What a pidfile says is not proof either: anyone who can write it can name
any pid. Before a pid is signalled, ``chatd stop`` asks the kernel which
process holds the lock (:func:`lock_holders`, from /proc/locks) and whether
that process is chatd.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from dataclasses import dataclass, field
from enum import Enum

from chatd import safefs


class State(Enum):
    RUNNING = "running"  # lock held
    STALE = "stale"  # file present, nobody holds the lock (crash, SIGKILL, power cut)
    ABSENT = "absent"
    UNKNOWN = "unknown"  # cannot tell, e.g. permission denied


@dataclass(frozen=True)
class Probe:
    state: State
    pid: int | None = None  # what the file says
    error: str | None = None
    #: RUNNING: the pids holding the lock, per the kernel; None when it cannot be told
    holders: tuple[int, ...] | None = field(default=None, compare=False)
    #: UNKNOWN: the errno behind ``error``
    errno: int | None = field(default=None, compare=False)


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
            fd = safefs.open_nofollow(path, os.O_RDONLY)
        except FileNotFoundError:
            return Probe(State.ABSENT)
        except safefs.UnsafePath as exc:
            return Probe(State.UNKNOWN, error=exc.strerror, errno=exc.errno)
        except OSError as exc:
            return Probe(State.UNKNOWN, error=f"{path}: {exc.strerror}", errno=exc.errno)
        try:
            pid = _read_pid(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return Probe(State.RUNNING, pid, holders=lock_holders(fd))
                return Probe(State.UNKNOWN, pid, error=f"{path}: {exc.strerror}",
                             errno=exc.errno)
            # Unlocked, but maybe only because the daemon just renamed its new pidfile
            # over the one we opened: the answer is only true of the file at ``path``.
            if _is_path_of(fd, path):
                return Probe(State.STALE, pid)
        finally:
            os.close(fd)


def lock_holders(fd: int) -> tuple[int, ...] | None:
    """The pids holding an ``flock`` on the file open at ``fd``, from /proc/locks.

    An flock line shows the pid that took the lock (``F_GETLK`` and
    ``F_OFD_GETLK`` see only POSIX locks). None when /proc/locks cannot be read.
    """
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    holders = []
    for line in lines:
        # "3: FLOCK  ADVISORY  WRITE 1234 fe:00:2146334 0 EOF"; a waiter has "->" after "3:"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            with contextlib.suppress(ValueError):
                holders.append(int(fields[4]))
    return tuple(holders)


def is_file_at(fd: int, path: str) -> bool:
    """Whether the file open at ``fd`` is the one at ``path`` now."""
    return _is_path_of(fd, path)


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
            fd = safefs.open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def adopt(self, fd: int) -> None:
        """Hold the pidfile through ``fd``, a descriptor of it that the running daemon
        handed over (chatd restart): the lock is the open file's, so it is held
        throughout; :meth:`write` then publishes our pid under a lock of our own."""
        assert self.fd is None, "already holding a pidfile"
        if not _is_path_of(fd, self.path):
            raise OSError(errno.ESTALE, f"the descriptor handed over is not {self.path}")
        self.fd = fd

    def write(self, pid: int) -> None:
        """Publish ``pid`` atomically, keeping the path locked throughout."""
        assert self.fd is not None, "acquire() first"
        tmp, fd = _new_temp_file(f"{self.path}.{pid}")
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
        directory = os.path.dirname(self.path)
        safefs.make_dir(directory, 0o755)
        safefs.check_private_dir(directory, {0, os.geteuid()})
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


def _new_temp_file(prefix: str) -> tuple[str, int]:
    """A new ``PREFIX.tmp`` (or ``PREFIX.RANDOM.tmp``), created here and now: whatever was
    at that name before (a leftover of a crash, or a planted link) is removed, not opened."""
    tmp = f"{prefix}.tmp"
    for _ in range(10):
        try:
            return tmp, safefs.create_new(tmp, os.O_RDWR, 0o644)
        except FileExistsError:
            _unlink(tmp)
        tmp = f"{prefix}.{secrets.token_hex(4)}.tmp"
    raise FileExistsError(errno.EEXIST, f"cannot create a temporary file next to {prefix}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
