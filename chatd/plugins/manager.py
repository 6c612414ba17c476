"""The plugin manager: turns the room's hook calls into guarded plugin calls.

pluggy finds and validates the hook implementations; chatd calls them
itself, one by one, because pluggy stops at the first exception and one
plugin's bug must not take the room down. Each call is timed and counted; a
plugin that fails ``max_failures`` times in a row is switched off.
"""

from __future__ import annotations

import logging
import operator
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import pluggy
import structlog

from chatd.plugins import hookspecs
from chatd.plugins.api import RoomAPI
from chatd.plugins.catalog import Catalog, PluginSpec, default_catalog, resolve
from chatd.plugins.markers import PROJECT
from chatd.plugins.options import PluginConfigError
from chatd.room import Addr, NoHooks, Room
from chatd.tokenbucket import TokenBucket

log = structlog.get_logger("chatd")

#: A hook call slower than this is logged (the room waits for every hook).
SLOW_HOOK_SECONDS = 0.05
#: Consecutive failures after which a plugin is switched off until the next reload.
MAX_FAILURES_IN_ROW = 5

#: The hooks called for every enabled plugin; the others are per-plugin life cycle.
CHAT_HOOKS = ("chatd_login", "chatd_joined", "chatd_message", "chatd_command",
              "chatd_said", "chatd_left")

_FAILED = object()  # what a guarded call returns when the plugin raised


class PluginState:
    """One plugin of the catalog: whether it runs, why, and what it has cost."""

    __slots__ = ("spec", "api", "instance", "enabled", "reason", "options", "calls",
                 "seconds", "failures", "failures_in_row", "slow_calls", "commands",
                 "log_rate")

    def __init__(self, spec: PluginSpec, api: RoomAPI):
        self.spec = spec
        self.api = api
        self.instance: Any = None
        self.enabled = False
        self.reason = "default"
        self.options: dict[str, Any] | None = None
        self.calls = 0
        self.seconds = 0.0
        self.failures = 0
        self.failures_in_row = 0
        self.slow_calls = 0
        self.commands: dict[str, str] = {}
        #: failures and slowness are logged at a bounded rate: they can happen per line
        self.log_rate = TokenBucket(1.0, 10.0, time.monotonic())


class _Impl:
    """One hook implementation, ready to call with the hook's arguments in order."""

    __slots__ = ("state", "hook", "call")

    def __init__(self, state: PluginState, hook: str, call: Callable[..., Any]):
        self.state = state
        self.hook = hook
        self.call = call


def _adapt(impl: pluggy.HookImpl, spec_args: tuple[str, ...]) -> Callable[..., Any]:
    """A callable taking every argument of the hook, for an implementation that
    (as pluggy allows) asks for only some of them."""
    function = impl.function
    if tuple(impl.argnames) == spec_args:
        return function
    picks = [spec_args.index(name) for name in impl.argnames]
    # hooks run per chat line: no per-call list building for the common shapes
    if not picks:
        return lambda *args: function()
    if len(picks) == 1:
        (pick,) = picks
        return lambda *args: function(args[pick])
    getter = operator.itemgetter(*picks)
    return lambda *args: function(*getter(args))


class PluginManager(NoHooks):
    """Implements the room's hooks by asking the enabled plugins.

    ``startup()`` enables what the settings ask for, ``reconfigure()`` applies
    new settings live, ``shutdown()`` switches everything off.
    """

    def __init__(self, room: Room, settings: Mapping[str, Any], *,
                 catalog: Catalog | None = None,
                 slow_seconds: float = SLOW_HOOK_SECONDS,
                 max_failures: int = MAX_FAILURES_IN_ROW,
                 clock: Callable[[], float] = time.perf_counter):
        self.room = room
        self.catalog = catalog if catalog is not None else default_catalog()
        self.slow_seconds = slow_seconds
        self.max_failures = max_failures
        self._clock = clock
        self._wanted = resolve(settings, self.catalog)
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._states = {
            name: PluginState(spec, RoomAPI(name, room, {}, self.all_commands, self.message))
            for name, spec in self.catalog.specs.items()
        }
        self._started = False
        self._login: tuple[_Impl, ...] = ()
        self._joined: tuple[_Impl, ...] = ()
        self._message: tuple[_Impl, ...] = ()
        self._command: tuple[_Impl, ...] = ()
        self._said: tuple[_Impl, ...] = ()
        self._left: tuple[_Impl, ...] = ()
        for problem in self.catalog.ignored:
            log.warning("plugin_ignored", problem=problem)
        for name, spec in self.catalog.specs.items():
            if spec.error is not None:
                log.warning("plugin_unusable", plugin=name, error=spec.error)

    # -- life cycle --------------------------------------------------------------

    def startup(self) -> None:
        self._started = True
        self._apply(self._wanted)

    def shutdown(self) -> None:
        for state in self._states.values():
            if state.enabled:
                self._disable(state, "stopped")
        self._started = False

    def reconfigure(self, settings: Mapping[str, Any]) -> None:
        """New ``plugins:`` settings, applied live: no session is touched."""
        try:
            wanted = resolve(settings, self.catalog)
        except PluginConfigError as exc:  # config.py checked already; be safe anyway
            log.error("plugins_reconfigure_failed", key=exc.path, error=str(exc))
            return
        self._wanted = wanted
        if self._started:
            self._apply(wanted)

    def _apply(self, wanted: Mapping[str, tuple[dict | None, str]]) -> None:
        """Bring every plugin to what ``wanted`` says; a reload retries failed plugins."""
        for name, state in self._states.items():
            options, reason = wanted.get(name, (None, "default"))
            if options is None:
                if state.enabled:
                    self._disable(state, reason)
                else:
                    state.reason = reason
            elif not state.enabled:
                self._enable(state, options, reason)
            else:
                self._reconfigure(state, options, reason)
                if state.enabled:  # a restart that failed keeps its "error"
                    state.reason = reason

    def _enable(self, state: PluginState, options: dict[str, Any], reason: str) -> None:
        name = state.spec.name
        state.options = options
        state.api._set_options(options)
        state.failures_in_row = 0
        try:
            if state.spec.factory is None:
                raise RuntimeError(state.spec.error)
            instance = state.spec.factory(state.api)
            self._register(name, instance)
        except Exception as exc:
            state.failures += 1
            state.enabled, state.reason = False, "error"
            log.error("plugin_failed", plugin=name, hook="__init__", error=repr(exc),
                      traceback=traceback.format_exc())
            return
        state.instance, state.enabled, state.reason = instance, True, reason
        self._rebuild()
        log.info("plugin_enabled", plugin=name, options=options, source=state.spec.source)
        self._call_own(state, "chatd_startup", state.api)
        self._ask_commands(state)

    def _register(self, name: str, instance: Any) -> None:
        """Register with pluggy, which checks each hook's name and arguments."""
        self._pm.register(instance, name=name)
        try:
            self._pm.check_pending()
            for caller in self._pm.get_hookcallers(instance) or ():
                for impl in caller.get_hookimpls():
                    if impl.plugin is instance and (impl.hookwrapper or impl.wrapper):
                        raise pluggy.PluginValidationError(
                            instance, f"{caller.name}: hook wrappers are not supported")
        except Exception:
            self._pm.unregister(instance)
            raise

    def _disable(self, state: PluginState, reason: str) -> None:
        if not state.enabled:
            return
        state.enabled, state.reason = False, reason
        log.log(logging.WARNING if reason == "failures" else logging.INFO, "plugin_disabled",
                plugin=state.spec.name, reason=reason, failures=state.failures)
        self._call_own(state, "chatd_shutdown", state.api)
        self._pm.unregister(state.instance)
        state.instance = None
        state.commands = {}
        self._rebuild()

    def _reconfigure(self, state: PluginState, options: dict[str, Any], reason: str) -> None:
        """A reload: a plugin with ``chatd_reconfigure`` adapts in place (and may re-read
        its files); one without it is restarted, and only when its options changed."""
        changed = options != state.options
        if self._own_impl(state, "chatd_reconfigure") is None:
            if changed:
                self._disable(state, "reconfigure")
                self._enable(state, options, reason)
            return
        state.options = options
        state.api._set_options(options)
        self._call_own(state, "chatd_reconfigure", state.api)
        self._ask_commands(state)
        if changed:
            log.info("plugin_reconfigured", plugin=state.spec.name, options=options)

    def _ask_commands(self, state: PluginState) -> None:
        result = self._call_own(state, "chatd_commands")
        if isinstance(result, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in result.items()):
            state.commands = {k.lower(): v for k, v in result.items()}
        elif result is not None and result is not _FAILED:
            self._failed(state, "chatd_commands", TypeError(
                f"chatd_commands returned {result!r}, not a dict of str -> str"))

    def _own_impl(self, state: PluginState, hook: str) -> _Impl | None:
        caller = getattr(self._pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin is state.instance:
                return _Impl(state, hook, _adapt(impl, tuple(caller.spec.argnames)))
        return None

    def _call_own(self, state: PluginState, hook: str, *args: Any) -> Any:
        impl = self._own_impl(state, hook)
        return None if impl is None else self._guarded(impl, args)

    def _rebuild(self) -> None:
        """Refresh the per-hook call lists: tryfirst, then catalog order, then trylast."""
        order = {name: i for i, name in enumerate(self._states)}
        for hook in CHAT_HOOKS:
            caller = getattr(self._pm.hook, hook)
            spec_args = tuple(caller.spec.argnames)
            impls = sorted(caller.get_hookimpls(), key=lambda i: (
                0 if i.tryfirst else 2 if i.trylast else 1, order[i.plugin_name]))
            setattr(self, "_" + hook.removeprefix("chatd_"), tuple(
                _Impl(self._states[i.plugin_name], hook, _adapt(i, spec_args)) for i in impls))

    # -- the guard -----------------------------------------------------------------

    def _guarded(self, impl: _Impl, args: tuple[Any, ...]) -> Any:
        """Call one implementation; ``_FAILED`` when it raised (logged and counted)."""
        state = impl.state
        clock = self._clock
        start = clock()
        try:
            result = impl.call(*args)
        except Exception as exc:
            state.calls += 1
            state.seconds += clock() - start
            self._failed(state, impl.hook, exc)
            return _FAILED
        elapsed = clock() - start
        state.calls += 1
        state.seconds += elapsed
        if state.failures_in_row:
            state.failures_in_row = 0
        if elapsed > self.slow_seconds:
            state.slow_calls += 1
            if state.log_rate.take(time.monotonic()):
                log.warning("plugin_slow", plugin=state.spec.name, hook=impl.hook,
                            ms=round(elapsed * 1000, 1), threshold_ms=self.slow_seconds * 1000)
        return result

    def _failed(self, state: PluginState, hook: str, exc: BaseException) -> None:
        state.failures += 1
        state.failures_in_row += 1
        if state.log_rate.take(time.monotonic()):
            log.error("plugin_failed", plugin=state.spec.name, hook=hook, error=repr(exc),
                      failures_in_row=state.failures_in_row,
                      traceback="".join(traceback.format_exception(exc)))
        if state.enabled and state.failures_in_row >= self.max_failures:
            self._disable(state, "failures")

    # -- the room's hooks ------------------------------------------------------------

    def login(self, name: str, addr: Addr) -> str | None:
        for impl in self._login:
            result = self._guarded(impl, (name, addr))
            if result is None or result is _FAILED:
                continue
            if isinstance(result, str):
                return result or "\nlogin refused"
            self._failed(impl.state, impl.hook, TypeError(f"returned {result!r}, not a str"))
        return None

    def joined(self, name: str) -> None:
        for impl in self._joined:
            self._guarded(impl, (name,))

    def message(self, name: str, text: str) -> str | None:
        """The line as the plugins leave it, or None when one of them dropped it."""
        for impl in self._message:
            result = self._guarded(impl, (name, text))
            if result is None or result is _FAILED:
                continue
            if isinstance(result, str):
                text = result
            elif result is False:
                return None
            else:
                self._failed(impl.state, impl.hook,
                             TypeError(f"returned {result!r}, not a str, False or None"))
        return text

    def command(self, name: str, command: str, args: str) -> bool:
        command = command.lower()
        for impl in self._command:
            result = self._guarded(impl, (name, command, args))
            if result is not None and result is not _FAILED and result is not False:
                return True
        return False

    def said(self, name: str, text: str) -> None:
        for impl in self._said:
            self._guarded(impl, (name, text))

    def left(self, name: str, reason: str) -> None:
        for impl in self._left:
            self._guarded(impl, (name, reason))

    # -- what the plugins offer, and what they did -------------------------------------

    def all_commands(self) -> dict[str, str]:
        """Every command of every enabled plugin (the first plugin to offer one keeps it)."""
        out: dict[str, str] = {}
        for state in self._states.values():
            if state.enabled:
                for command, usage in state.commands.items():
                    out.setdefault(command, usage)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One entry per known plugin, for ``chatctl plugins``; plain JSON-able values."""
        return [{
            "name": name,
            "enabled": state.enabled,
            "reason": state.reason,
            "source": state.spec.source,
            "error": state.spec.error,
            "options": dict(state.options) if state.options is not None else None,
            "calls": state.calls,
            "seconds": round(state.seconds, 6),
            "slow_calls": state.slow_calls,
            "failures": state.failures,
            "failures_in_row": state.failures_in_row,
            "commands": sorted(state.commands),
            "counters": dict(state.api.counters),
        } for name, state in self._states.items()]
