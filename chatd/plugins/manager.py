"""The plugin manager: plugins on and off, and the room's hooks called through pluggy.

Every hook is called as pluggy means it to be, ``pm.hook.<name>(**kwargs)``:
pluggy finds, validates and orders the implementations. What chatd adds sits
in pluggy's seam for it, the inner hookexec (:meth:`PluginManager._hookexec`,
in place of pluggy's ``_multicall``, which stops at the first exception):
each implementation is called on its own, timed and counted, an exception or
an answer outside the spec is logged as a failure and taken as no answer,
and a plugin that fails ``max_failures`` times in a row is switched off.
How answers combine (``firstresult``, chains) and what they may be comes
from the hookspecs (:mod:`chatd.plugins.contract`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pluggy
import structlog

from chatd.plugins import hookspecs
from chatd.plugins.api import RoomAPI
from chatd.plugins.catalog import Catalog, PluginSpec, default_catalog, resolve
from chatd.plugins.contract import Contract
from chatd.plugins.markers import PROJECT
from chatd.plugins.options import PluginConfigError
from chatd.room import Addr, NoHooks, Room
from chatd.tokenbucket import TokenBucket

log = structlog.get_logger("chatd")

#: A hook call slower than this is logged (the room waits for every hook).
SLOW_HOOK_SECONDS = 0.05
#: Consecutive failures after which a plugin is switched off until the next reload.
MAX_FAILURES_IN_ROW = 5



class PluginState:
    """One plugin of the catalog: whether it runs, why, and what it has cost."""

    __slots__ = ("spec", "api", "instance", "enabled", "reason", "options", "calls",
                 "seconds", "failures", "failures_in_row", "slow_calls", "commands",
                 "log_rate", "startup_error")

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
        #: why it could not start (its factory or ``chatd_startup`` raised), last time
        self.startup_error: str | None = None


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
        self._pm._inner_hookexec = self._hookexec  # pluggy's seam for the call loop
        hooks = self._pm.hook
        self._contracts = {name: Contract.of(getattr(hooks, name))
                           for name in dir(hooks) if name.startswith("chatd_")}
        self._states = {
            name: PluginState(spec, RoomAPI(name, room, {}, self.all_commands, self.message))
            for name, spec in self.catalog.specs.items()
        }
        self._started = False
        #: what plugins handed over from the previous process, until each is enabled
        self._handed_over: dict[str, Any] = {}
        #: the hooks some enabled plugin implements: calling one nobody does costs
        #: pluggy's call path (about a microsecond) for nothing, at every chat line
        self._implemented: frozenset[str] = frozenset()
        # the hook callers, looked up once: they are called for every datagram
        self._login = hooks.chatd_login
        self._joined = hooks.chatd_joined
        self._message = hooks.chatd_message
        self._command = hooks.chatd_command
        self._said = hooks.chatd_said
        self._left = hooks.chatd_left
        for problem in self.catalog.ignored:
            log.warning("plugin_ignored", problem=problem)
        for name, spec in self.catalog.specs.items():
            if spec.error is not None:
                log.warning("plugin_unusable", plugin=name, error=spec.error)

    # -- life cycle --------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    def startup(self) -> None:
        self._started = True
        self._apply(self._wanted)
        self._drop_unclaimed()

    def startup_problems(self) -> list[tuple[str, str]]:
        """(plugin, error) for each plugin the settings want that failed to start: a new
        process taking the room over (chatd restart) refuses to, rather than run without it."""
        return [(name, state.startup_error) for name, state in self._states.items()
                if state.startup_error is not None
                and self._wanted.get(name, (None, ""))[0] is not None]

    def handover_state(self) -> dict[str, Any]:
        """What each enabled plugin hands to the next process (``chatd_handover_state``)."""
        states = {}
        for name, state in self._states.items():
            if state.enabled:
                value = self._call_own(state, "chatd_handover_state")
                if value is not None:
                    states[name] = value
        return states

    def handover_restore(self, states: Mapping[str, Any]) -> None:
        """Give each plugin what it handed over (``chatd_handover_restore``): now if it runs,
        else when :meth:`startup` enables it; a plugin not enabled here never gets it."""
        self._handed_over = dict(states)
        if self._started:
            for state in self._states.values():
                if state.enabled:
                    self._give_back(state)
            self._drop_unclaimed()

    def _drop_unclaimed(self) -> None:
        for name in self._handed_over:
            log.info("plugin_state_ignored", plugin=name, reason="plugin not enabled")
        self._handed_over = {}

    def _give_back(self, state: PluginState) -> None:
        name = state.spec.name
        if name in self._handed_over:
            self._call_own(state, "chatd_handover_restore",
                           saved=self._handed_over.pop(name))

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
        state.startup_error = None
        try:
            if state.spec.factory is None:
                raise RuntimeError(state.spec.error)
            instance = state.spec.factory(state.api)
            self._register(name, instance)
        except Exception as exc:
            state.failures += 1
            state.enabled, state.reason = False, "error"
            state.startup_error = repr(exc)
            log.error("plugin_failed", plugin=name, hook="__init__", error=repr(exc),
                      traceback=traceback.format_exc())
            return
        state.instance, state.enabled, state.reason = instance, True, reason
        self._reorder()
        log.info("plugin_enabled", plugin=name, options=options, source=state.spec.source)
        self._call_own(state, "chatd_startup", room=state.api)
        self._ask_commands(state)
        if self._handed_over and state.enabled:
            self._give_back(state)

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

    def _reorder(self) -> None:
        """Make pluggy's order the catalog's, after a plugin was added.

        Among implementations of one rank (``tryfirst``, plain, ``trylast``)
        pluggy calls the last registered first; registering the enabled
        plugins again, in reverse catalog order, makes the built-ins run
        first, in a fixed order, whatever order reloads turned them on in.
        """
        enabled = [state for state in self._states.values() if state.enabled]
        for state in enabled:
            self._pm.unregister(state.instance)
        for state in reversed(enabled):
            self._pm.register(state.instance, name=state.spec.name)
        self._note_implemented()

    def _note_implemented(self) -> None:
        self._implemented = frozenset(
            name for name in self._contracts if getattr(self._pm.hook, name).get_hookimpls())

    def _disable(self, state: PluginState, reason: str) -> None:
        if not state.enabled:
            return
        state.enabled, state.reason = False, reason
        log.log(logging.WARNING if reason == "failures" else logging.INFO, "plugin_disabled",
                plugin=state.spec.name, reason=reason, failures=state.failures)
        self._call_own(state, "chatd_shutdown", room=state.api)
        self._pm.unregister(state.instance)
        self._note_implemented()
        state.instance = None
        state.commands = {}

    def _reconfigure(self, state: PluginState, options: dict[str, Any], reason: str) -> None:
        """A reload: a plugin with ``chatd_reconfigure`` adapts in place (and may re-read
        its files); one without it is restarted, and only when its options changed."""
        changed = options != state.options
        if not self._own_impls(state, "chatd_reconfigure"):
            if changed:
                self._disable(state, "reconfigure")
                self._enable(state, options, reason)
            return
        state.options = options
        state.api._set_options(options)
        self._call_own(state, "chatd_reconfigure", room=state.api)
        self._ask_commands(state)
        if changed:
            log.info("plugin_reconfigured", plugin=state.spec.name, options=options)

    def _ask_commands(self, state: PluginState) -> None:
        commands = self._call_own(state, "chatd_commands")
        if commands is not None:  # the contract checked it is a mapping of str to str
            state.commands = {k.lower(): v for k, v in commands.items()}

    def _own_impls(self, state: PluginState, hook: str) -> list[pluggy.HookImpl]:
        return [impl for impl in getattr(self._pm.hook, hook).get_hookimpls()
                if impl.plugin is state.instance]

    def _call_own(self, state: PluginState, hook: str, **kwargs: Any) -> Any:
        """A life-cycle hook of one plugin, its answer: pluggy's dispatch with that plugin's
        implementation only, so the same guard (and pluggy's tracing) applies."""
        impls = self._own_impls(state, hook)
        if not impls:
            return None
        answers = self._pm._hookexec(hook, impls, kwargs, self._contracts[hook].firstresult)
        return answers[0] if isinstance(answers, list) and answers else None

    # -- the guard: pluggy's inner hookexec -------------------------------------------

    def _hookexec(self, hook_name: str, hook_impls: Sequence[pluggy.HookImpl],
                  caller_kwargs: Mapping[str, Any], firstresult: bool) -> Any:
        """What pluggy's ``_multicall`` does, one implementation at a time under the guard.

        Implementations come in pluggy's order (called last to first, as
        pluggy does). Answers combine as the spec says: ``firstresult``, a
        chain (:func:`chatd.plugins.markers.chain`), or a list of every answer.
        """
        contract = self._contracts[hook_name]
        chained = contract.chain
        if chained is not None:
            caller_kwargs = dict(caller_kwargs)
        answers = []
        for impl in reversed(hook_impls):
            answer = self._call(impl, contract, caller_kwargs)
            if answer is None:
                continue
            if chained is not None:
                if answer is False:
                    return False
                caller_kwargs[chained] = answer
            elif firstresult:
                return answer
            else:
                answers.append(answer)
        if chained is not None:
            return caller_kwargs[chained]
        return None if firstresult else answers

    def _call(self, impl: pluggy.HookImpl, contract: Contract,
              kwargs: Mapping[str, Any]) -> Any:
        """One implementation: its answer, or None when it raised or broke the contract
        (logged and counted)."""
        state = self._states[impl.plugin_name]
        args = [kwargs[name] for name in impl.argnames]
        clock = self._clock
        start = clock()
        try:
            if impl.kwargnames:
                answer = impl.function(*args, **{k: kwargs[k] for k in impl.kwargnames
                                                 if k in kwargs})
            else:
                answer = impl.function(*args)
        except Exception as exc:
            state.calls += 1
            state.seconds += clock() - start
            self._failed(state, contract.name, exc)
            return None
        elapsed = clock() - start
        state.calls += 1
        state.seconds += elapsed
        if elapsed > self.slow_seconds:
            state.slow_calls += 1
            if state.log_rate.take(time.monotonic()):
                log.warning("plugin_slow", plugin=state.spec.name, hook=contract.name,
                            ms=round(elapsed * 1000, 1), threshold_ms=self.slow_seconds * 1000)
        problem = None if answer is None else contract.problem(answer)
        if problem is not None:
            self._failed(state, contract.name, problem)
            return None
        if state.failures_in_row:
            state.failures_in_row = 0
        return answer

    def _failed(self, state: PluginState, hook: str, exc: BaseException) -> None:
        if hook == "chatd_startup":
            state.startup_error = repr(exc)
        state.failures += 1
        state.failures_in_row += 1
        if state.log_rate.take(time.monotonic()):
            log.error("plugin_failed", plugin=state.spec.name, hook=hook, error=repr(exc),
                      failures_in_row=state.failures_in_row,
                      traceback="".join(traceback.format_exception(exc)))
        if state.enabled and state.failures_in_row >= self.max_failures:
            self._disable(state, "failures")

    # -- the room's hooks: each one a pluggy hook call (skipped when nobody implements it) --

    def login(self, name: str, addr: Addr) -> str | None:
        """A plugin's refusal text, or None to let the login in."""
        if "chatd_login" not in self._implemented:
            return None
        refusal = self._login(name=name, addr=addr)
        return None if refusal is None else refusal or "\nlogin refused"

    def joined(self, name: str) -> None:
        if "chatd_joined" in self._implemented:
            self._joined(name=name)

    def message(self, name: str, text: str) -> str | Literal[False]:
        """The line as the plugins leave it, or False when one of them dropped it."""
        if "chatd_message" not in self._implemented:
            return text
        return self._message(name=name, text=text)

    def command(self, name: str, command: str, args: str) -> bool:
        """Whether a plugin handled the command."""
        if "chatd_command" not in self._implemented:
            return False
        return self._command(name=name, command=command.lower(), args=args) is True

    def said(self, name: str, text: str) -> None:
        if "chatd_said" in self._implemented:
            self._said(name=name, text=text)

    def left(self, name: str, reason: str) -> None:
        if "chatd_left" in self._implemented:
            self._left(name=name, reason=reason)

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
