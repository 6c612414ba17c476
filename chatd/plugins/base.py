"""The base class of chatd plugins (optional: any class with the same shape works).

A plugin is a class: chatd reads its declared :attr:`Plugin.options` to check
the configuration without running anything, then makes one instance per
enabled plugin, handing it the plugin's own :class:`~chatd.plugins.api.RoomAPI`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from chatd.plugins.api import RoomAPI
from chatd.plugins.options import Option


class Plugin:
    """Subclass, declare ``options``, and mark hook methods with ``@hookimpl``."""

    #: option name -> :class:`Option`; anything else under ``plugins.NAME`` is an error
    options: ClassVar[Mapping[str, Option]] = {}
    #: on without a ``plugins:`` entry; honoured for built-ins only, since installing
    #: a package should not change what a room does until its operator says so
    enabled_by_default: ClassVar[bool] = False

    def __init__(self, room: RoomAPI):
        self.room = room

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> str | None:
        """A problem with the options taken together (each one is already valid), or None."""
        return None
