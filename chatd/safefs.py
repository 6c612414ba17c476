"""Files in directories that someone else may have prepared: never follow a symbolic
link, and never trust a directory that another user can write to.

chatd often runs as root and always writes into ``runtime_dir`` and the log
directory. Whoever can write in such a directory can put a symbolic link
where chatd expects its own file and have chatd truncate, chown or append to
whatever the link points at. So the directory is checked first (a real
directory, owned by root or chatd's own user, writable by nobody else), and
every file chatd opens in it is opened with ``O_NOFOLLOW``; a temporary file
is created with ``O_EXCL`` besides, so that it is always a new file.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Collection


class UnsafePath(OSError):
    """A path chatd refuses to use; ``strerror`` says why and what to do."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link as the last component of ``path``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(errno.ELOOP, f"{path} is a symbolic link, which chatd does not "
                             "follow: remove it") from None
        raise


def create_new(path: str, flags: int, mode: int = 0o600) -> int:
    """A file that did not exist before (``O_CREAT|O_EXCL``, links refused too)."""
    return open_nofollow(path, flags | os.O_CREAT | os.O_EXCL, mode)


def make_dir(path: str, mode: int) -> bool:
    """Create ``path`` (parents as needed) with exactly ``mode``, whatever the umask;
    False if it was there already (then it is left as it is, for the caller to check)."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, mode)  # the umask may take bits away, never add any
    except FileExistsError:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def dir_problem(path: str, st: os.stat_result, allowed_uids: Collection[int]) -> str | None:
    """Why ``st`` (an ``lstat`` of ``path``) is no safe place for chatd's files, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link (chatd does not follow one here): remove it"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in allowed_uids:
        owners = " or ".join(user_name(uid) for uid in sorted(set(allowed_uids)))
        return (f"{path} belongs to {user_name(st.st_uid)}, not to {owners}: anyone could have "
                "made it; remove it, or choose another directory")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002))
                           if st.st_mode & bit)
        return (f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
                "run chmod go-w on it, or choose another directory")
    return None


def check_private_dir(path: str, allowed_uids: Collection[int]) -> os.stat_result:
    """Raise :class:`UnsafePath` unless ``path`` is a directory (not a link) owned by one
    of ``allowed_uids`` and writable by nobody else; returns its ``lstat``."""
    st = os.lstat(path)
    problem = dir_problem(path, st, allowed_uids)
    if problem is not None:
        raise UnsafePath(errno.EPERM, problem)
    return st


def open_private_dir(path: str, allowed_uids: Collection[int]) -> int:
    """An ``O_DIRECTORY`` descriptor on ``path`` once it passes :func:`check_private_dir`,
    for ``fchown``/``fchmod`` that cannot be redirected by a link swapped in meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            check_private_dir(path, allowed_uids)  # the precise reason
        raise
    try:
        problem = dir_problem(path, os.fstat(fd), allowed_uids)
        if problem is not None:
            raise UnsafePath(errno.EPERM, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotRegularFile(ValueError):
    """A path that names a FIFO, a device, a socket or a directory; ``kind`` says which."""

    def __init__(self, kind: str):
        super().__init__(f"not a regular file ({kind})")
        self.kind = kind


class FileTooLarge(ValueError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"too large ({size} bytes, at most {limit})")
        self.size = size
        self.limit = limit


def read_regular_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Files an administrator names (the configuration, a message of the day) are
    read by the daemon's loop: opened without blocking, so that a FIFO given by
    mistake is refused instead of waiting for a writer forever, and read only
    up to the limit, so that a huge file costs nothing. Raises OSError,
    :class:`NotRegularFile` or :class:`FileTooLarge`.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(file_kind(info.st_mode))
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(max(info.st_size, len(data)), limit)
    return data


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"
