"""The admin control channel (filled in with the admin child)."""

from __future__ import annotations


def attach(server) -> None:
    return None
