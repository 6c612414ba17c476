"""``/help``: every command the enabled plugins offer.

A plugin rather than a room rule, so that it is one more example of the
plugin API, and so that a room can replace it with its own.
"""

from __future__ import annotations

from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.text import lines, pack_one


class Help(Plugin):
    enabled_by_default = True

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"help": "/help - list the commands"}

    @hookimpl
    def chatd_command(self, name: str, command: str) -> bool | None:
        if command != "help":
            return None
        commands = self.room.commands()
        usages = ["commands:", *(commands[c] for c in sorted(commands))]
        if self.room.reply_budget(name) == 1:  # one datagram: the lines in it, as far as they go
            self.room.send(name, pack_one(usages, self.room.max_bytes, "\n"))
            return True
        for text in lines(usages, self.room.max_bytes):
            self.room.send(name, text)
        return True


PLUGIN = Help
