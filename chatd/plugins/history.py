"""The last lines of the room, replayed to each person who joins (after their ``OK``).

With ``path`` the lines are also kept in SQLite, so a restart does not
forget them. Writes use WAL with ``synchronous=NORMAL``: one chat line must
not cost an fsync, and losing the last lines at a power cut is acceptable.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque

from chatd.plugins.api import RoomAPI, TextTooLong
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option, absolute_path
from chatd.textsafe import neutralise

#: Old rows are deleted once this many lines were added past ``size``, not on every line.
TRIM_EVERY = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    name TEXT NOT NULL,
    text TEXT NOT NULL
)
"""


class LineStore:
    """The SQLite side: append lines, read the newest back."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: one line, one write
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(_SCHEMA)
        except sqlite3.Error:
            self.db.close()
            raise
        self._added = 0

    def newest(self, size: int) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT name, text FROM lines ORDER BY id DESC LIMIT ?", (size,))
        return list(reversed(rows.fetchall()))

    def add(self, name: str, text: str, size: int) -> None:
        cursor = self.db.execute("INSERT INTO lines (at, name, text) VALUES (?, ?, ?)",
                                 (time.time(), name, text))
        self._added += 1
        if self._added >= TRIM_EVERY:
            self._added = 0
            self.db.execute("DELETE FROM lines WHERE id <= ?", (cursor.lastrowid - size,))

    def close(self) -> None:
        self.db.close()


class History(Plugin):
    options = {
        "size": Option(int, 50, "how many lines to keep and replay", min=1, max=10_000),
        "path": Option(str, None, "an absolute path of an SQLite file keeping the lines",
                       check=absolute_path),
    }

    def __init__(self, room: RoomAPI):
        super().__init__(room)
        self.lines: deque[tuple[str, str]] = deque(maxlen=room.options["size"])
        self.store: LineStore | None = None
        self.path: str | None = None

    @hookimpl
    def chatd_startup(self) -> None:
        self._open(self.room.options["path"])

    @hookimpl
    def chatd_reconfigure(self) -> None:
        self.lines = deque(self.lines, maxlen=self.room.options["size"])
        if self.room.options["path"] != self.path:
            self._close()
            self._open(self.room.options["path"])

    @hookimpl
    def chatd_shutdown(self) -> None:
        self._close()

    def _open(self, path: str | None) -> None:
        if path is None:
            return
        self.store, self.path = LineStore(path), path
        self.lines.clear()
        self.lines.extend(self.store.newest(self.room.options["size"]))

    def _close(self) -> None:
        store, self.store, self.path = self.store, None, None
        if store is not None:
            store.close()

    @hookimpl
    def chatd_handover_state(self) -> dict:
        return {"lines": [list(line) for line in self.lines]}

    @hookimpl
    def chatd_handover_restore(self, saved: dict) -> None:
        """The old process's lines replace what was read at start-up (the same, or newer
        than the SQLite file when there is one)."""
        lines = saved.get("lines") if isinstance(saved, dict) else None
        if not isinstance(lines, list):
            return
        kept = [(line[0], line[1]) for line in lines
                if isinstance(line, list) and len(line) == 2
                and all(isinstance(part, str) for part in line)]
        self.lines.clear()
        self.lines.extend(kept)

    @hookimpl
    def chatd_said(self, name: str, text: str) -> None:
        self.lines.append((name, text))
        if self.store is not None:
            self.store.add(name, text, self.room.options["size"])

    @hookimpl
    def chatd_joined(self, name: str) -> None:
        for speaker, text in list(self.lines):
            try:
                # lines kept by an older chatd may hold control characters
                self.room.send(name, self.room.render("chat", name=speaker,
                                                      text=neutralise(text)))
            except TextTooLong:  # it fitted when said; the template or limit has changed
                continue
        if self.lines:
            self.room.count("replays")


PLUGIN = History
