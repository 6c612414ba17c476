"""Configured words masked in chat lines: whole words, any case."""

from __future__ import annotations

import re

from chatd.plugins.api import RoomAPI
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option


def word_pattern(words: list[str]) -> re.Pattern[str] | None:
    """One regex for all words; ``\\b`` would fail on words that start or end with a
    non-word character, so the edges are spelt out with lookarounds."""
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class WordFilter(Plugin):
    options = {
        "words": Option(list, [], "the words to mask"),
        "mask": Option(str, "****", "what replaces each of them"),
    }

    def __init__(self, room: RoomAPI):
        super().__init__(room)
        self._compile()

    @hookimpl
    def chatd_reconfigure(self) -> None:
        self._compile()

    def _compile(self) -> None:
        self.pattern = word_pattern(self.room.options["words"])
        self.mask = self.room.options["mask"].replace("\\", "\\\\")  # literal, not a template

    @hookimpl
    def chatd_message(self, text: str) -> str | None:
        if self.pattern is None:
            return None
        masked, count = self.pattern.subn(self.mask, text)
        if not count:
            return None
        self.room.count("words_masked", count)
        return masked


PLUGIN = WordFilter
