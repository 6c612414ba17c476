"""Plugins: hooks (pluggy), the manager that calls them safely, and the built-ins.

What a plugin author needs is importable from here: :data:`hookimpl`,
:class:`Plugin`, :class:`Option`, :class:`RoomAPI`, :class:`TextTooLong`.
What the server and the programs that read a configuration need:
:class:`PluginManager`, :func:`check_settings`, :class:`PluginConfigError`.
See docs/plugins.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatd.plugins.api import RoomAPI, TextTooLong, User
from chatd.plugins.base import Plugin
from chatd.plugins.catalog import GROUP, check_settings
from chatd.plugins.markers import hookimpl, hookspec
from chatd.plugins.options import Option, PluginConfigError, absolute_path

if TYPE_CHECKING:
    from chatd.plugins.manager import PluginManager

__all__ = [
    "GROUP",
    "Option",
    "Plugin",
    "PluginConfigError",
    "PluginManager",
    "RoomAPI",
    "TextTooLong",
    "User",
    "absolute_path",
    "check_settings",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    """:class:`PluginManager` on first use: importing this package (a plugin for
    :data:`hookimpl`, a program for :func:`check_settings`) does not load the manager
    and the logging it brings."""
    if name == "PluginManager":
        from chatd.plugins.manager import PluginManager

        return PluginManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
