"""Plugin options: how a plugin declares them and how ``plugins:`` entries are checked.

A plugin lists its options as :class:`Option` values so that ``chatd
check-config`` can reject a typo or a wrong type before anything runs, with
the key path (``plugins.history.size``) that the config error names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number",
               str: "a non-empty string", list: "a list of non-empty strings"}


class PluginConfigError(ValueError):
    """A bad ``plugins:`` entry; ``path`` is the key path, e.g. ``plugins.history.size``."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Option:
    """One option of a plugin.

    ``type`` is ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of
    non-empty strings). A ``None`` default makes the option optional (it may
    be left out or set to ``null``). ``check`` sees the converted value and
    returns a problem ("must be an absolute path") or None.
    """

    type: type
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = None

    def convert(self, value: Any) -> Any:
        """The value to use; raises ValueError with a phrase for the config error."""
        if value is None and self.default is None:
            return None
        kind = self.type
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind in (int, float):
            ok = isinstance(value, int if kind is int else int | float) and not isinstance(
                value, bool)
        elif kind is str:
            ok = isinstance(value, str) and value != ""
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ValueError(f"expected {_TYPE_WORDS.get(kind, kind.__name__)}, got {value!r}")
        if kind is float:
            value = float(value)
        if kind in (int, float):
            if self.min is not None and value < self.min:
                raise ValueError(f"must be at least {self.min}, got {value}")
            if self.max is not None and value > self.max:
                raise ValueError(f"must be at most {self.max}, got {value}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(problem)
        return list(value) if kind is list else value


def absolute_path(value: str) -> str | None:
    """The daemon runs from ``/``: a relative path would not mean what the writer thought."""
    return None if os.path.isabs(value) else f"must be an absolute path, got {value!r}"


def effective_options(plugin: str, schema: Mapping[str, Option], value: Any) -> dict[str, Any]:
    """The options a ``plugins.NAME`` value asks for, defaults filled in.

    ``true``, ``null`` and ``{}`` all mean "on, with the defaults" (``null`` is
    what ``history:`` with nothing after it reads as).
    """
    if value is True or value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise PluginConfigError(f"plugins.{plugin}",
                                f"expected a mapping of options, true or false, got {value!r}")
    out = {key: option.default for key, option in schema.items()}
    for key, raw in value.items():
        option = schema.get(key) if isinstance(key, str) else None
        if option is None:
            known = ", ".join(schema) or "none"
            raise PluginConfigError(f"plugins.{plugin}.{key}",
                                    f"unknown option (known options of {plugin}: {known})")
        try:
            out[key] = option.convert(raw)
        except ValueError as exc:
            raise PluginConfigError(f"plugins.{plugin}.{key}", str(exc)) from None
    return out
