"""``/me waves``: an action, shown to the room as ``* alice waves``."""

from __future__ import annotations

from chatd.plugins.api import TextTooLong
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl


class Me(Plugin):
    enabled_by_default = True

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"me": "/me ACTION - tell the room what you are doing"}

    @hookimpl
    def chatd_command(self, name: str, command: str, args: str) -> bool | None:
        if command != "me":
            return None
        if not args.strip():
            self.room.send(name, "\nusage: /me ACTION")
            return True
        action = self.room.rewrite(name, args)  # word filters and rate limits apply here too
        if action is False:
            return True
        try:
            # like a chat line, it goes to the others: the sender's client shows what it typed
            self.room.broadcast(f"\n* {name} {action}", exclude=[name])
        except TextTooLong:
            self.room.send(name, f"\naction not sent: longer than {self.room.max_bytes} bytes")
        return True


PLUGIN = Me
