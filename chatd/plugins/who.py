"""``/who``: who is in the room, told to the asker only."""

from __future__ import annotations

from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.text import pack, pack_one


class Who(Plugin):
    enabled_by_default = True

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"who": "/who - list the people in the room"}

    @hookimpl
    def chatd_command(self, name: str, command: str) -> bool | None:
        if command != "who":
            return None
        names = self.room.users()
        parts = [f"in the room ({len(names)}):", *names]
        if self.room.reply_budget(name) == 1:
            self.room.send(name, pack_one(parts, self.room.max_bytes, " "))
            return True
        # a big room does not fit in one datagram: names are never split across two
        for text in pack(parts, self.room.max_bytes, " "):
            self.room.send(name, text)
        return True


PLUGIN = Who
