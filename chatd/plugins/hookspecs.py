"""The hooks a chatd plugin may implement: this module is the plugin contract.

Each function documents one hook; a plugin implements any subset of them as
methods marked with :data:`chatd.plugins.hookimpl` and may accept only the
arguments it needs. chatd calls them through pluggy (``pm.hook.<name>``), and
what is written here is what the calls do, not a description beside them:
the manager reads each spec's markers and return annotation
(:mod:`chatd.plugins.contract`).

* **None is no answer**, in every hook: the room carries on as if the plugin
  had not been asked.
* **Guarded.** Each implementation is called on its own. An exception, or an
  answer that does not fit the return annotation below, is logged and
  counted as a failure and taken as no answer; a plugin that fails 5 times
  in a row is switched off until the next reload.
* **Ordered** as pluggy orders them: ``tryfirst=True`` first, ``trylast=True``
  last, the others in catalog order (built-ins, then installed plugins by name).
* ``firstresult=True`` hooks stop at the first answer; the chat-line hook is
  a chain (:func:`chatd.plugins.markers.chain`); every other hook asks everyone.
* Hook wrappers (``wrapper=True``, ``hookwrapper=True``) are refused.

``room`` is always the plugin's own :class:`chatd.plugins.api.RoomAPI`.
Names are the names people logged in with, as the room knows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from chatd.plugins.api import RoomAPI
from chatd.plugins.markers import chain, hookspec

# -- life cycle (called for one plugin at a time) ------------------------------


@hookspec
def chatd_startup(room: RoomAPI) -> None:
    """The plugin is on: at server start, or when a reload turned it on.

    Open files and databases here rather than in ``__init__``: what is sent
    here goes out before the room serves anybody.
    """


@hookspec
def chatd_shutdown(room: RoomAPI) -> None:
    """The plugin is going off: server stop, a reload that turned it off,
    or too many failures. The people are still in the room when the server
    stops, so a goodbye sent here reaches them.
    """


@hookspec
def chatd_reconfigure(room: RoomAPI) -> None:
    """The configuration was reloaded; ``room.options`` has this plugin's options,
    changed or not. Re-read files here (a message of the day, say).

    Optional: a plugin without it is restarted instead when its options
    changed (shutdown, a new instance, startup), losing what it kept in memory.
    """


@hookspec
def chatd_handover_state() -> Any:
    """The room is being handed to a new chatd process (``chatd restart``, ``systemctl
    restart``): return what the people would miss if it were lost, the last lines said,
    say, as JSON-safe data (dicts with string keys, lists, strings, numbers, booleans).

    Called with the room stopped, just before the new process takes over: keep it
    quick. The new process gives it to ``chatd_handover_restore`` of the plugin of
    the same name. ``chatd_shutdown`` follows as at a stop, but nothing it sends
    is delivered: nobody was told goodbye.
    """


@hookspec
def chatd_handover_restore(saved: Any) -> None:
    """What ``chatd_handover_state`` of this plugin returned in the old process, given
    back in the new one after ``chatd_startup``. It may come from an older version of
    the plugin: check it, and ignore what does not fit. A failure here is logged; the
    plugin then runs with what it has.
    """


@hookspec
def chatd_commands() -> Mapping[str, str]:
    """The slash commands this plugin answers, ``{"who": "/who - list the users"}``.

    Asked once when the plugin starts (and after a reconfiguration); ``/help``
    and ``chatctl plugins`` show them.
    """
    return {}


# -- the chat (called for every plugin that implements them) -------------------


@hookspec(firstresult=True)
def chatd_login(name: str, addr: Any) -> str | None:
    """Someone wants to join as ``name`` from ``addr`` (what ``recvfrom`` gave).

    The room's own rules (valid name, not taken, room not full) have passed.
    Return a text to refuse (it is sent to ``addr`` as it is, so start it with
    ``"\\n"``; an empty text refuses with chatd's own words); ``None`` lets the
    next plugin decide. The first refusal wins.
    """


@hookspec
def chatd_joined(name: str) -> None:
    """``name`` is in the room and has had its ``OK``: whatever is sent to it
    now (a message of the day, history) arrives after that ``OK``.
    """


@hookspec
@chain("text")
def chatd_message(name: str, text: str) -> str | Literal[False] | None:
    """A chat line on its way to the room (also the text of ``/me`` and ``/msg``,
    through ``RoomAPI.rewrite``).

    Return ``None`` to leave it alone, a new text to rewrite it, or ``False``
    to drop it (nobody sees it, later plugins are not asked). A chain:
    plugins are asked in turn, each getting ``text`` as the previous one left
    it; ``tryfirst=True`` puts a plugin ahead (rate limits, say). Control and
    bidi characters are escaped after the last plugin. Called for every line,
    so keep it cheap.
    """


@hookspec(firstresult=True)
def chatd_command(name: str, command: str, args: str) -> Literal[True] | None:
    """A slash command: ``/msg bob hi`` is ``command="msg"``, ``args="bob hi"``.

    ``command`` is lower case; ``args`` is everything after the first space,
    verbatim. Return ``True`` when this plugin handled it (answer with
    ``room.send``), ``None`` to let the next plugin see it. The first ``True``
    wins; when nobody handles it the sender is told the command is unknown.
    """


@hookspec
def chatd_said(name: str, text: str) -> None:
    """A chat line went out to the room, as it was finally sent (after rewrites).

    In a cluster it is called on every node for every line of the room, the
    lines of other nodes' users too (so that ``history`` replays the whole room):
    a plugin that answers lines should answer its own node's speakers only
    (``room.user(name).node`` is None for them).
    """


@hookspec
def chatd_left(name: str, reason: str) -> None:
    """``name`` is out of the room: ``reason`` is ``quit``, ``timeout``, ``kicked``,
    ``unreachable`` (the kernel reported its address unreachable) or ``evicted`` (a
    login into the full room replaced it after a long silence).

    Not called at server stop (``chatd_shutdown`` is).
    """
