"""The message of the day, sent to each person who joins, right after their ``OK``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatd.plugins.api import RoomAPI
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option, absolute_path
from chatd.plugins.text import lines


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
        text = self.room.options["text"] if path is None else Path(path).read_text("utf-8")
        self.lines = text.strip("\n").splitlines()

    @hookimpl
    def chatd_joined(self, name: str) -> None:
        if self.lines:
            # cut per join: room.max_datagram may change on reload
            for text in lines(self.lines, self.room.max_bytes):
                self.room.send(name, text)


PLUGIN = Motd
