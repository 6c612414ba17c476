"""Structured logs: JSON lines (or a console rendering) to a file or stderr.

The sink never raises: a full disk or a deleted log file must not stop the
room, so write errors are counted instead (``chatctl status`` shows them).
Each line is written whole or not at all: one ``write`` on an ``O_APPEND``
descriptor, and the few bytes of a line cut short by a full disk are
truncated away again, so the file stays valid JSON lines.

A file that logrotate moved away is noticed (its inode changes) and
reopened, and ``copytruncate`` works too because the file is opened for
appending. If the new file cannot be opened (the daemon's user may not
create it), lines keep going to the old one, which says why. The file is
created 0640 (it holds names and addresses) and never through a symbolic
link: the daemon may still be root when it opens it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

from chatd import safefs
from chatd.formats import iso_time
from chatd.settings import LogSettings
from chatd.tokenbucket import TokenBucket

# syslog priorities, for journald's "<N>" prefixes on stderr
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
             "exception": 3, "fatal": 2, "msg": 6}

FILE_MODE = 0o640
DIR_MODE = 0o750


def open_log_file(path: str) -> int:
    """An ``O_APPEND`` descriptor on ``path``, made (with its directory) when missing."""
    safefs.make_dir(os.path.dirname(path), DIR_MODE)
    return safefs.open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)


def prepare_log_file(path: str, owner: tuple[int, int]) -> None:
    """As root, before dropping privileges to ``owner`` (uid, gid): make the log directory
    and file that do not exist yet ``owner``'s, so that after logrotate moved the file
    away the daemon may create it again. What exists already is left as it is."""
    directory = os.path.dirname(path)
    if safefs.make_dir(directory, DIR_MODE):
        os.chown(directory, *owner, follow_symlinks=False)
    try:
        fd = safefs.create_new(path, os.O_WRONLY | os.O_APPEND, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def reopen_problem(path: str) -> str | None:
    """Why this process could not open ``path`` again after a rotation, or None."""
    directory = os.path.dirname(path) or "."
    who = safefs.user_name(os.geteuid())
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{who} may not write {path}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{who} may not create files in {directory}"
    return None


class Sink:
    """Where rendered log lines go; one per process, replaced on reconfiguration."""

    def __init__(self, path: str | None, journal: bool = False, stream: TextIO | None = None):
        self.path = path
        self.journal = journal
        self.write_errors = 0
        self._stream = stream
        self._fd: int | None = None
        self._reopen_failed = False
        if path is not None:
            self._fd = open_log_file(path)

    def fileno(self) -> int | None:
        if self._fd is not None:
            return self._fd
        return self._stream.fileno() if self._stream is not None else None

    def write(self, level: str, line: str) -> None:
        try:
            if self.path is None:
                stream = self._stream or sys.stderr
                prefix = f"<{_PRIORITY.get(level, 6)}>" if self.journal else ""
                stream.write(f"{prefix}{line}\n")
                stream.flush()
                return
            self._reopen_if_moved()
            self._write_whole((line + "\n").encode("utf-8", "backslashreplace"))
        except (OSError, ValueError):
            self.write_errors += 1

    def _write_whole(self, data: bytes) -> None:
        """One line, all of it or nothing: a short write (a full disk) is taken back."""
        if self._fd is None:
            raise OSError(errno.EBADF, "no log file")
        written = os.write(self._fd, data)
        if written == len(data):
            return
        with contextlib.suppress(OSError):
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode) and st.st_size >= written:
                # O_APPEND put our bytes last; another writer on a full disk is unlikely
                os.ftruncate(self._fd, st.st_size - written)
        raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")

    def _reopen_if_moved(self) -> None:
        """One stat per line, as logging.handlers.WatchedFileHandler does: log lines are
        rare events (never one per delivery), and rotation then takes effect at once."""
        assert self.path is not None
        try:
            st = os.lstat(self.path)
            current = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if self._fd is not None and current is not None:
            mine = os.fstat(self._fd)
            if (mine.st_dev, mine.st_ino) == current:
                return
        try:
            fd = open_log_file(self.path)
        except OSError as exc:
            self._reopen_failed_once(exc)
            if self._fd is None:
                raise
            return  # better the old (rotated) file than nothing
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = fd
        self._reopen_failed = False

    def _reopen_failed_once(self, exc: OSError) -> None:
        """Count the failure, and say it once in the file still open, where someone looks."""
        self.write_errors += 1
        if self._reopen_failed or self._fd is None:
            return
        self._reopen_failed = True
        note = {"event": "log_reopen_failed", "path": self.path,
                "error": exc.strerror or str(exc), "level": "error",
                "timestamp": iso_time(),
                "pid": os.getpid(), "hint": "lines go on to this file until it can be "
                "reopened; give chatd's user write access to the log directory"}
        with contextlib.suppress(OSError):
            self._write_whole((json.dumps(note) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _SinkLogger:
    """The structlog "logger" at the end of the chain: hands each line to the sink."""

    def __init__(self, sink: Sink):
        self._sink = sink

    def __getattr__(self, level: str):
        sink = self._sink
        return lambda line: sink.write(level, line)


def _add_pid(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    event["pid"] = os.getpid()
    return event


_current: Sink | None = None


def configure(settings: LogSettings, *, stream: TextIO | None = None) -> Sink:
    """(Re)configure logging for this process; returns the sink, whose fd a daemon keeps open."""
    global _current
    stream = stream or sys.stderr
    journal = settings.file is None and _is_journal(stream)
    fmt = settings.format or ("console" if _isatty(stream) and not journal else "json")
    if _current is not None and _current.path == settings.file:
        sink = _current  # keep the open file: a reload that changes the level must not reopen
        sink.journal = journal
    else:
        sink = Sink(settings.file, journal=journal, stream=stream)
        if _current is not None:
            _current.close()
    _current = sink
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream) and settings.file is None)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_pid,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, settings.level.upper())
        ),
        logger_factory=lambda *args: _SinkLogger(sink),
        cache_logger_on_first_use=False,
    )
    return sink


def _is_journal(stream: TextIO) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected to journald;
    a child whose stderr was redirected elsewhere inherits the variable, not the stream."""
    dev, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return False
    return dev.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(inode))


def print_stderr(message: str, level: str = "error") -> None:
    """A command's message for the person who ran it, on stderr.

    Under systemd (``ExecStartPre=chatd check-config``, ``ExecStart=chatd run``)
    stderr is the journal, which files an unprefixed line at priority info:
    ``journalctl -p warning`` and ``systemctl status`` would then hide the one
    line that says why the service failed. So, there, every line starts with
    the priority of ``level``, as the daemon's own log lines do.
    """
    prefix = f"<{_PRIORITY.get(level, 3)}>" if _is_journal(sys.stderr) else ""
    sys.stderr.write("".join(f"{prefix}{line}\n" for line in message.split("\n")))
    sys.stderr.flush()


def current_sink() -> Sink | None:
    return _current


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


#: Lines of one kind others can cause, at most: this many a second on average...
BOUNDED_PER_SECOND = 5.0
#: ...and this many at once.
BOUNDED_BURST = 20.0


class BoundedLog:
    """Log lines others can cause, each kind at a bounded rate, with counts of what was left out.

    Used for what a stranger (a datagram) or a local peer (the control socket)
    can cause, so that a flood of junk costs a few log lines a second, not the
    disk; the next line written of a kind says how many were left out since
    (``suppressed_since_last``).
    """

    def __init__(self, logger: Any, levels: Mapping[str, str],
                 per_second: float = BOUNDED_PER_SECOND, burst: float = BOUNDED_BURST,
                 clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._clock = clock
        self._per_second, self._burst = per_second, burst
        now = clock()
        #: name -> (bucket, level): ``levels`` names each kind and its level ("warning", ...)
        self._kinds = {name: (TokenBucket(per_second, burst, now), level)
                       for name, level in levels.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._kinds

    def __call__(self, name: str, /, **fields: Any) -> None:
        kind = self._kinds.get(name)
        if kind is None:  # a kind nobody listed is bounded too (at info), never an error
            kind = self._kinds[name] = (TokenBucket(self._per_second, self._burst,
                                                    self._clock()), "info")
        bucket, level = kind
        if not bucket.take(self._clock()):
            return
        suppressed = bucket.take_refused()
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        getattr(self._logger, level)(name, **fields)
