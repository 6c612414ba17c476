"""The pluggy markers of the ``chatd`` project, in a module of their own.

Plugins import :data:`hookimpl` from :mod:`chatd.plugins`; it lives here so
that the built-ins can import it without importing the manager.
"""

from __future__ import annotations

import pluggy

PROJECT = "chatd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
