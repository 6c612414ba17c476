"""Plugins: hooks (pluggy), the manager that calls them safely, and the built-ins.

What a plugin author needs is importable from here: :data:`hookimpl`,
:class:`Plugin`, :class:`Option`, :class:`RoomAPI`, :class:`TextTooLong`.
What the server and the config need: :class:`PluginManager`,
:func:`check_settings`, :class:`PluginConfigError`. See docs/plugins.md.
"""

from __future__ import annotations

from chatd.plugins.api import RoomAPI, TextTooLong, User
from chatd.plugins.base import Plugin
from chatd.plugins.catalog import GROUP, check_settings
from chatd.plugins.manager import PluginManager
from chatd.plugins.markers import hookimpl, hookspec
from chatd.plugins.options import Option, PluginConfigError, absolute_path

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
