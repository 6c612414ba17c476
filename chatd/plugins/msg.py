"""``/msg bob text``: a private message to one person."""

from __future__ import annotations

from chatd.plugins.api import TextTooLong
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.text import cut
from chatd.textsafe import neutralise


class Msg(Plugin):
    enabled_by_default = True

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"msg": "/msg NAME TEXT - say TEXT to NAME only"}

    @hookimpl
    def chatd_command(self, name: str, command: str, args: str) -> bool | None:
        if command != "msg":
            return None
        target, _, text = args.lstrip(" ").partition(" ")
        if not target or not text.strip():
            self.room.send(name, "\nusage: /msg NAME TEXT")
            return True
        user = self.room.user(target)
        if user is None:
            self.room.send(name, cut(f"\nno one called {neutralise(target)} is in the room",
                                     self.room.max_bytes))
            return True
        rewritten = self.room.rewrite(name, text)
        if rewritten is False:
            return True
        try:
            self.room.send(user.name, f"\n{name} says to you: {rewritten}")
        except TextTooLong:
            self.room.send(name, f"\nmessage not sent: longer than {self.room.max_bytes} bytes")
            return True
        self.room.count("messages")
        return True


PLUGIN = Msg
