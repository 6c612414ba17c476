"""What a hookspec promises, read from the spec itself: how its answers combine, what they may be.

The manager calls every hook through pluggy with its own inner hookexec;
this module is how that hookexec knows, hook by hook, what pluggy's own
``_multicall`` would have known and what chatd adds, without a table kept
by hand beside the specs:

* ``firstresult`` (pluggy's marker): the first answer that is not ``None`` ends the call;
* ``chain`` (chatd's marker, :func:`chatd.plugins.markers.chain`): each
  implementation gets one argument as the one before it left it (``chatd_message``);
* the return annotation: an answer that does not fit it is the plugin's bug,
  logged and counted like an exception, and taken as no answer.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import pluggy

from chatd.plugins.markers import CHAIN_ATTRIBUTE


@dataclass(frozen=True, slots=True)
class Contract:
    """One hook's rules, as its spec states them."""

    name: str
    firstresult: bool
    #: the argument passed along a chain (``markers.chain``), or None
    chain: str | None
    #: the return annotation, as written in the spec (for messages)
    returns: str
    #: None when every answer fits the spec, else a check of one (non-None) answer
    check: Callable[[Any], bool] | None

    @classmethod
    def of(cls, caller: pluggy.HookCaller) -> Contract:
        spec = caller.spec
        if spec is None:
            raise ValueError(f"{caller.name} has no hookspec")
        function = spec.function
        hint = typing.get_type_hints(function).get("return", Any)
        firstresult = bool(spec.opts.get("firstresult"))
        chained = getattr(function, CHAIN_ATTRIBUTE, None)
        if chained is not None and (firstresult or chained not in spec.argnames):
            raise ValueError(f"{caller.name}: a chain needs one of the hook's arguments, "
                             "and is not firstresult")
        written = function.__annotations__.get("return", "Any")
        return cls(caller.name, firstresult, chained,
                   written if isinstance(written, str) else repr(written),
                   _checker(hint))

    def problem(self, answer: Any) -> TypeError | None:
        """Why ``answer`` breaks this hook's contract, or None when it keeps it."""
        if answer is None or self.check is None or self.check(answer):
            return None
        return TypeError(f"{self.name} returned {answer!r}, not {self.returns}")


def _checker(hint: Any) -> Callable[[Any], bool] | None:
    """A test of an answer against ``hint``; None when the answer does not matter.

    A hook annotated ``-> None`` has nothing to say and any answer is ignored,
    as pluggy ignores ``None``; ``Any`` accepts everything.
    """
    if hint is Any or hint is None or hint is type(None):
        return None
    return lambda value: fits(value, hint)


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the type ``hint`` names: the forms hookspecs use
    (classes, unions, ``Literal``, ``Mapping[K, V]``/``dict[K, V]``)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is None:
        return isinstance(value, hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return any(fits(value, arg) for arg in args)
    if origin is Literal:  # True is not 1: compare type and value
        return any(type(value) is type(arg) and value == arg for arg in args)
    if not isinstance(value, origin):
        return False
    if isinstance(value, Mapping) and len(args) == 2:
        key, item = args
        return all(fits(k, key) and fits(v, item) for k, v in value.items())
    return True
