"""The message of the day, sent to each person who joins, right after their ``OK``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from chatd import safefs
from chatd.plugins.api import RoomAPI
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option, absolute_path
from chatd.plugins.text import lines

#: A message of the day longer than this is refused: it is read in the room's loop, and every
#: person who joins gets it.
MAX_FILE_BYTES: Final = 64 * 1024


class Motd(Plugin):
    options = {
        "text": Option(str, None, "the message itself"),
        "file": Option(str, None, "an absolute path to read it from (re-read on reload)",
                       check=absolute_path),
    }

    def __init__(self, room: RoomAPI):
        super().__init__(room)
        self.lines: list[str] = []

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> str | None:
        if (options["text"] is None) == (options["file"] is None):
            return "give exactly one of text and file"
        return None

    @hookimpl
    def chatd_startup(self) -> None:
        self._load()

    @hookimpl
    def chatd_reconfigure(self) -> None:
        self._load()

    def _load(self) -> None:
        # read once, not per join: a missing file is one logged failure, not one per person
        self.lines = []
        path = self.room.options["file"]
        if path is None:
            text = self.room.options["text"]
        else:  # a regular file, read without blocking: a FIFO there must not stop the room
            text = safefs.read_regular_file(path, MAX_FILE_BYTES).decode("utf-8", "replace")
        self.lines = text.strip("\n").splitlines()

    @hookimpl
    def chatd_joined(self, name: str) -> None:
        if self.lines:
            # cut per join: room.max_datagram may change on reload
            for text in lines(self.lines, self.room.max_bytes):
                self.room.send(name, text)


PLUGIN = Motd
