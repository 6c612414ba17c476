"""Which plugins exist: the built-ins, and those installed under the ``chatd.plugins``
entry-point group, found with pluggy's ``load_setuptools_entrypoints``.

The catalog is read once per process: the config check needs each plugin's
declared options before any plugin runs. A package installed later is seen
after a restart, not a reload.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from chatd.plugins.markers import PROJECT
from chatd.plugins.options import Option, PluginConfigError, effective_options

GROUP = "chatd.plugins"

#: Built-in plugins in the order their hooks run (``tryfirst``/``trylast`` aside).
BUILTINS = ("ratelimit", "wordfilter", "motd", "history", "who", "me", "msg", "help")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin that can be enabled: its factory, declared options and origin."""

    name: str
    factory: Callable[..., Any] | None
    options: Mapping[str, Option] = field(default_factory=dict)
    enabled_by_default: bool = False
    source: str = "builtin"
    #: why this plugin cannot be used (an entry point that failed to load), or None
    error: str | None = None

    def check(self, value: Any) -> dict[str, Any] | None:
        """The options ``plugins.NAME: value`` asks for; None when it turns the plugin off."""
        if value is False:
            return None
        if self.error is not None:
            raise PluginConfigError(f"plugins.{self.name}", self.error)
        options = effective_options(self.name, self.options, value)
        check = getattr(self.factory, "check_options", None)
        problem = check(options) if check is not None else None
        if problem:
            raise PluginConfigError(f"plugins.{self.name}", problem)
        return options


def spec_for(name: str, factory: Any, *, builtin: bool, source: str) -> PluginSpec:
    """A spec from a plugin class; a factory of the wrong shape becomes an unusable spec."""
    if not callable(factory):
        return PluginSpec(name, None, source=source,
                          error=f"{factory!r} is not a plugin class")
    options = getattr(factory, "options", {})
    if not isinstance(options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Option) for k, v in options.items()):
        return PluginSpec(name, None, source=source,
                          error="its options are not a mapping of name -> Option")
    default = bool(getattr(factory, "enabled_by_default", False)) and builtin
    return PluginSpec(name, factory, dict(options), default, source)


@dataclass(frozen=True)
class Catalog:
    """The plugins by name, and what was ignored while looking for them (to be logged)."""

    specs: Mapping[str, PluginSpec]
    ignored: tuple[str, ...] = ()


def _builtin_specs() -> dict[str, PluginSpec]:
    specs = {}
    for name in BUILTINS:
        module = importlib.import_module(f"chatd.plugins.{name}")
        specs[name] = spec_for(name, module.PLUGIN, builtin=True, source="builtin")
    return specs


def _entry_point_specs(taken: set[str]) -> tuple[dict[str, PluginSpec], list[str]]:
    """Third-party plugins; one that fails to import is kept as an unusable spec.

    A scratch pluggy manager does the loading: its blocked names keep a
    package from replacing a built-in, and it remembers each plugin's
    distribution for ``chatctl plugins``. Nothing is ever called through it.
    """
    loader = pluggy.PluginManager(PROJECT)
    for name in taken:
        loader.set_blocked(name)
    specs: dict[str, PluginSpec] = {}
    ignored: list[str] = []
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: ep.name):
        name = ep.name
        if name in taken:
            ignored.append(f"entry point {name} = {ep.value}: a built-in has that name")
            continue
        if name in specs:
            continue
        try:
            loader.load_setuptools_entrypoints(GROUP, name=name)
        except Exception as exc:  # a broken package must not stop the others
            specs[name] = PluginSpec(name, None, source="entry point",
                                     error=f"cannot load: {exc.__class__.__name__}: {exc}")
    for factory, dist in loader.list_plugin_distinfo():
        name = loader.get_name(factory)
        source = f"{dist.metadata['name']} {dist.version}"
        specs[name] = spec_for(name, factory, builtin=False, source=source)
    return dict(sorted(specs.items())), ignored


@functools.cache
def default_catalog() -> Catalog:
    """Every plugin this process can enable, built-ins first, then third parties by name."""
    specs = _builtin_specs()
    third_party, ignored = _entry_point_specs(set(specs))
    return Catalog({**specs, **third_party}, tuple(ignored))


def resolve(settings: Mapping[str, Any], catalog: Catalog) -> dict[str, tuple[dict | None, str]]:
    """For every plugin: the options to enable it with (None: off) and why.

    The reason is ``config`` when the ``plugins:`` mapping names the plugin,
    else ``default``. Raises :class:`PluginConfigError` naming the bad key.
    """
    specs = catalog.specs
    for name in settings:
        if not isinstance(name, str) or name not in specs:
            raise PluginConfigError(f"plugins.{name}",
                                    f"unknown plugin (known: {', '.join(specs)})")
    out: dict[str, tuple[dict | None, str]] = {}
    for name, spec in specs.items():
        if name in settings:
            out[name] = (spec.check(settings[name]), "config")
        else:
            out[name] = (spec.check({}) if spec.enabled_by_default else None, "default")
    return out


def check_settings(settings: Mapping[str, Any]) -> None:
    """Raise :class:`PluginConfigError` for an unknown plugin or a bad option."""
    resolve(settings, default_catalog())
