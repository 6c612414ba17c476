"""The control channel's wire format: JSON lines over a stream socket.

One JSON object per line, both on the control socket (``chatctl`` and the
admin child) and on the socketpair (the admin child and the daemon). What
comes from a local peer is bounded before it is parsed: a line's length
(:data:`MAX_REQUEST`) and its nesting (:data:`MAX_DEPTH`, counted without
parsing). The same line splitting serves the FIFO and a terminal, whose
lines are words, not JSON (:class:`LineBuffer`).
"""

from __future__ import annotations

import json
import re
import socket
from collections import deque
from itertools import accumulate
from typing import Any

#: longest request line, and longest FIFO or terminal line, in bytes (without the newline)
MAX_REQUEST = 64 * 1024
#: deepest nesting of arrays and objects in a request; a real one needs 2
MAX_DEPTH = 32



def recv_ready(sock: socket.socket, size: int) -> bytes | None:
    """One ``recv`` on a non-blocking socket: None when it has nothing now, ``b""`` when
    the peer closed or the connection failed (either way it is over), else the bytes."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""

class LineBuffer:
    """Cuts a byte stream into lines of at most ``limit`` bytes (None: any length).

    A longer line is dropped whole, up to and including its newline. Keeping
    only its tail would run text the writer never meant as a command
    (``say <128 KiB of padding> kick bob``), so once a line is over the limit
    everything up to the next newline is skipped. It is counted as soon as it
    is known to be too long, before its newline arrives.
    """

    def __init__(self, limit: int | None = MAX_REQUEST):
        self.limit = limit
        self._partial = b""
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """The complete lines in ``data``, and how many over-long lines began to be dropped."""
        lines: list[bytes] = []
        too_long = 0
        limit = self.limit
        while data:
            cut = data.find(b"\n")
            if self._discarding:
                if cut < 0:
                    return lines, too_long
                self._discarding = False
                data = data[cut + 1:]
                continue
            if cut < 0:
                self._partial += data
                if limit is not None and len(self._partial) > limit:
                    self._partial = b""
                    self._discarding = True
                    too_long += 1
                return lines, too_long
            line, self._partial, data = self._partial + data[:cut], b"", data[cut + 1:]
            if limit is not None and len(line) > limit:
                too_long += 1
            else:
                lines.append(line)
        return lines, too_long


# a JSON string, closed or not: brackets inside it are text
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, counted without parsing it.

    The json module recurses once per level and a deep enough request would
    end the admin child with RecursionError; counting first keeps the bound
    independent of the interpreter's recursion limit and of the stack in use.
    Brackets inside strings are skipped as the parser skips them. Up to the
    first error the parser would stop at, the count equals its depth, so it
    is never lower. The work is done in C (regular expressions, accumulate):
    a 64 KiB line of brackets costs milliseconds.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(0, max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0))


def encode(message: Any) -> bytes:
    """One message as one line (what JSON cannot say, such as a path object, as text)."""
    return json.dumps(message, default=str).encode() + b"\n"


def decode(line: bytes, max_depth: int | None = MAX_DEPTH) -> Any:
    """One line as JSON; ValueError says what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if max_depth is not None and nesting_depth(text) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return json.loads(text)


class LineChannel:
    """JSON lines over one stream socket, buffered both ways.

    It works the same on a non-blocking socket in a selector loop (:meth:`read`
    takes what one ``recv`` gives; :meth:`send` writes what the socket takes
    and keeps the rest for :meth:`flush` once it is writable) and on a blocking
    one (:meth:`read_line` waits for a whole line, within the socket's timeout;
    :meth:`send` writes everything). Errors of the socket (``OSError``, and
    ``TimeoutError`` on a socket with a timeout) go to the caller, who knows
    what a lost peer means.

    ``max_line`` bounds what the other end may send in one line (None: it is
    trusted); longer lines are dropped whole and counted in :attr:`too_long`.
    """

    def __init__(self, sock: socket.socket, *, max_line: int | None = None,
                 max_depth: int | None = MAX_DEPTH):
        self.sock = sock
        self.max_depth = max_depth
        #: lines dropped so far because they were longer than ``max_line``
        self.too_long = 0
        self._splitter = LineBuffer(max_line)
        self._lines: deque[bytes] = deque()
        self._outbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- in ------------------------------------------------------------------------

    def read(self, size: int = 1 << 20) -> bool:
        """One ``recv``; the lines it completed wait in :meth:`take_lines`.

        False once the other end has closed; True otherwise, also when a
        non-blocking socket had nothing to give.
        """
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        lines, too_long = self._splitter.feed(data)
        self._lines.extend(lines)
        self.too_long += too_long
        return True

    def take_lines(self) -> list[bytes]:
        """The complete lines read so far, oldest first; they are the caller's now."""
        lines = list(self._lines)
        self._lines.clear()
        return lines

    def read_line(self) -> bytes | None:
        """On a blocking socket: the next whole line, or None if the other end closed first."""
        while not self._lines:
            if not self.read():
                return None
        return self._lines.popleft()

    def decode(self, line: bytes) -> Any:
        """A line as JSON, within this channel's nesting bound; ValueError says what is wrong."""
        return decode(line, self.max_depth)

    # -- out -----------------------------------------------------------------------

    def send(self, message: Any) -> bool:
        """Queue one message and write what the socket takes; True once all of it went out."""
        self._outbox += encode(message)
        return self.flush()

    def flush(self) -> bool:
        """Write what waits; True once nothing does (a blocking socket takes all of it)."""
        while self._outbox:
            try:
                sent = self.sock.send(self._outbox)
            except (BlockingIOError, InterruptedError):
                return False
            del self._outbox[:sent]
        return True

    @property
    def pending(self) -> bool:
        """Output is waiting for the socket to become writable."""
        return bool(self._outbox)

    def discard_output(self) -> None:
        """Forget what waits: the other end is gone."""
        self._outbox.clear()

    def close(self) -> None:
        self.sock.close()
