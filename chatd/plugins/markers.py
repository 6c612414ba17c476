"""The pluggy markers of the ``chatd`` project, in a module of their own.

Plugins import :data:`hookimpl` from :mod:`chatd.plugins`; it lives here so
that the built-ins can import it without importing the manager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pluggy

PROJECT = "chatd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: the attribute :func:`chain` puts on a hookspec function
CHAIN_ATTRIBUTE = "chatd_chain"

F = TypeVar("F", bound=Callable[..., Any])


def chain(argument: str) -> Callable[[F], F]:
    """Mark a hookspec whose implementations run as a chain over ``argument``.

    pluggy passes the same arguments to every implementation; in a chain each
    one gets ``argument`` as the previous one left it: an answer of ``None``
    leaves it as it is, ``False`` ends the chain (the hook call returns
    ``False`` and later implementations are not asked), any other answer
    replaces it. The hook call returns the final value.
    """
    def mark(function: F) -> F:
        setattr(function, CHAIN_ATTRIBUTE, argument)
        return function
    return mark
