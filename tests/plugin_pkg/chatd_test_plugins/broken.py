"""``broken``: raises in every hook, to prove the room carries on without it."""

from __future__ import annotations

from typing import Any

from chatd.plugins import Plugin, hookimpl


class BrokenOnPurpose(RuntimeError):
    pass


class Broken(Plugin):
    @hookimpl
    def chatd_startup(self) -> None:
        raise BrokenOnPurpose("startup")

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        raise BrokenOnPurpose("commands")

    @hookimpl
    def chatd_login(self, name: str, addr: Any) -> str | None:
        raise BrokenOnPurpose("login")

    @hookimpl
    def chatd_joined(self, name: str) -> None:
        raise BrokenOnPurpose("joined")

    @hookimpl
    def chatd_message(self, name: str, text: str) -> str | None:
        raise BrokenOnPurpose("message")

    @hookimpl
    def chatd_command(self, name: str, command: str, args: str) -> bool | None:
        raise BrokenOnPurpose("command")

    @hookimpl
    def chatd_said(self, name: str, text: str) -> None:
        raise BrokenOnPurpose("said")

    @hookimpl
    def chatd_left(self, name: str, reason: str) -> None:
        raise BrokenOnPurpose("left")

    @hookimpl
    def chatd_shutdown(self) -> None:
        raise BrokenOnPurpose("shutdown")
