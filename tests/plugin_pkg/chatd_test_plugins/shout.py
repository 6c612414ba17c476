"""``shout``: upper-cases chat lines (``lines: true``) and offers ``/shout TEXT``."""

from __future__ import annotations

from chatd.plugins import Option, Plugin, TextTooLong, hookimpl


class Shout(Plugin):
    options = {
        "lines": Option(bool, True, "upper-case every chat line"),
        "prefix": Option(str, "!", "put before each shouted line"),
    }

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"shout": "/shout TEXT - say TEXT loudly"}

    @hookimpl
    def chatd_message(self, text: str) -> str | None:
        return text.upper() if self.room.options["lines"] else None

    @hookimpl
    def chatd_command(self, name: str, command: str, args: str) -> bool | None:
        if command != "shout":
            return None
        try:
            self.room.broadcast(f"\n{self.room.options['prefix']}{name.upper()}: {args.upper()}")
        except TextTooLong:
            self.room.send(name, "\ntoo loud")
        self.room.count("shouts")
        return True
