"""Structured logs: JSON lines (or a console rendering) to a file or stderr.

The sink never raises: a full disk or a deleted log file must not stop the
room, so write errors are counted instead. A file that logrotate moved away
is noticed (its inode changes) and reopened, and ``copytruncate`` works too
because the file is opened for appending.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog

from chatd.config import LogSettings

# syslog priorities, for journald's "<N>" prefixes on stderr
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
             "exception": 3, "fatal": 2, "msg": 6}


class Sink:
    """Where rendered log lines go; one per process, replaced on reconfiguration."""

    def __init__(self, path: str | None, journal: bool = False, stream: TextIO | None = None):
        self.path = path
        self.journal = journal
        self.write_errors = 0
        self._stream = stream
        self._file: TextIO | None = None
        if path is not None:
            self._file = self._open(path)

    @staticmethod
    def _open(path: str) -> TextIO:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - kept open

    def fileno(self) -> int | None:
        target = self._file or self._stream
        return target.fileno() if target is not None else None

    def write(self, level: str, line: str) -> None:
        try:
            if self.path is None:
                stream = self._stream or sys.stderr
                prefix = f"<{_PRIORITY.get(level, 6)}>" if self.journal else ""
                stream.write(f"{prefix}{line}\n")
                stream.flush()
                return
            self._reopen_if_moved()
            assert self._file is not None
            self._file.write(line + "\n")
        except (OSError, ValueError):
            self.write_errors += 1

    def _reopen_if_moved(self) -> None:
        """One stat per line, as logging.handlers.WatchedFileHandler does: log lines are
        rare events (never one per delivery), and rotation then takes effect at once."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if self._file is not None and current is not None:
            mine = os.fstat(self._file.fileno())
            if (mine.st_dev, mine.st_ino) == current:
                return
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                self.write_errors += 1
        self._file = self._open(self.path)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


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


class BoundedRate:
    """At most ``per_second`` events on average (bursts up to ``burst``); counts what it refuses.

    Used for lines a stranger can cause (dropped datagrams), so that a flood
    of junk costs a few log lines a second, not the disk.
    """

    def __init__(self, per_second: float = 5.0, burst: float = 20.0):
        self.per_second = per_second
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.per_second)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count
