"""The state blob: what a new process needs to go on serving the room where the old one stopped.

Both ways of restarting without dropping anyone use it: ``chatd restart``
sends it over the handover socket (:mod:`chatd.handover.transfer`), and
under systemd it waits in a memfd in the file-descriptor store. It is JSON
(UTF-8) with a format number, so that a blob from another chatd version, or
a damaged one, is recognised and refused as a whole: :func:`restore` either
takes all of it or leaves the server as fresh as it was.

Times in it are ages (the room's snapshot) or wall-clock times: monotonic
clocks are not comparable between machines, ages are.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog

from chatd.room import SnapshotError

if TYPE_CHECKING:
    from chatd.server import Server

log = structlog.get_logger("chatd")

#: Version of the blob's layout; :func:`restore` refuses any other.
STATE_FORMAT: Final = 1
#: The largest blob read back: a room of 100,000 people is about 20 MB.
MAX_STATE_BYTES: Final = 256 * 1024 * 1024


class StateError(ValueError):
    """A blob this chatd cannot take: unreadable, another format version, or corrupt."""


def capture(server: Server) -> bytes:
    """The server's state as a blob: the room, what plugins hand over, the counters.

    Call it with the room stopped (nothing read meanwhile), right before the
    socket goes to the new process: whatever arrives later waits in the socket.
    """
    now = time.monotonic()
    doc: dict[str, Any] = {
        "format": STATE_FORMAT,
        "from_pid": os.getpid(),
        "taken_at": time.time(),
        "started": server.started,
        "room": server.room.snapshot(now),
        "cookies": _cookie_secrets(server),
        "plugins": _plugin_states(server),
        "counters": dict(server.counters),
        "drops": dict(server.drops),
        "send_errors": dict(server.send_errors),
    }
    cluster = getattr(server, "cluster", None)
    if cluster is not None:
        # TODO(cluster): the node's position in the cluster (its id, what it published)
        # goes here once the cluster bridge exists; restore() passes it back unchanged.
        doc["cluster"] = getattr(cluster, "handover_state", lambda: None)()
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def restore(server: Server, blob: bytes) -> dict[str, Any]:
    """Put a :func:`capture` blob into ``server``, which must not have served yet.

    Everything is checked before anything changes: on :class:`StateError` the
    server is left fresh and untouched, and can start as if there had been no
    blob. A plugin that fails to take its part back is logged, never fatal.
    Returns what the log line says: ``sessions``, ``bytes``, ``from_pid``,
    ``taken_at``.
    """
    doc = _parse(blob)
    counters = {key: _counts(doc, key) for key in ("counters", "drops", "send_errors")}
    plugins = doc.get("plugins", {})
    if not isinstance(plugins, dict):
        raise StateError("corrupt state: 'plugins' is not a mapping")
    started, taken_at, from_pid = doc.get("started"), doc.get("taken_at"), doc.get("from_pid")
    if not (_is_number(started) and _is_number(taken_at)):
        raise StateError("corrupt state: 'started' and 'taken_at' must be times")
    if not isinstance(from_pid, int) or isinstance(from_pid, bool) or from_pid <= 0:
        raise StateError(f"corrupt state: bad 'from_pid' {from_pid!r}")
    secrets = _parse_cookies(doc.get("cookies"), server)
    room = doc.get("room")
    if not isinstance(room, Mapping):
        raise StateError("corrupt state: no room in it")
    try:
        server.room.restore(room, time.monotonic())
    except SnapshotError as exc:
        raise StateError(f"cannot restore the room: {exc}") from None
    # from here on nothing can fail: the checks are done
    if secrets is not None:
        server.room.cookies._secrets.update(secrets)
    for key, values in counters.items():
        getattr(server, key).update(values)
    server.started = float(started)
    server.started_monotonic = time.monotonic() - max(0.0, time.time() - server.started)
    server.taken_over = (time.time(), from_pid)
    server.plugins.handover_restore(plugins)
    return {"sessions": len(server.room), "bytes": len(blob), "from_pid": from_pid,
            "taken_at": float(taken_at)}


# -- helpers ----------------------------------------------------------------------------


def _parse(blob: bytes) -> dict[str, Any]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise StateError(f"state is {type(blob).__name__}, not bytes")
    if len(blob) > MAX_STATE_BYTES:
        raise StateError(f"state of {len(blob)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateError(f"unreadable state: {exc}") from None
    if not isinstance(doc, dict):
        raise StateError("unreadable state: not a JSON object")
    if doc.get("format") != STATE_FORMAT:
        raise StateError(f"state format {doc.get('format')!r}, this chatd reads {STATE_FORMAT}")
    return doc


def _counts(doc: Mapping[str, Any], key: str) -> Counter[str]:
    values = doc.get(key, {})
    if not isinstance(values, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
        raise StateError(f"corrupt state: {key!r} must map names to counts")
    return Counter(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _cookie_secrets(server: Server) -> dict[str, Any]:
    """The address-cookie secrets: a client between ``COOKIE`` and ``L`` still gets in."""
    jar = server.room.cookies
    return {"slot_seconds": jar.slot_seconds,
            "secrets": {str(slot): secret.hex() for slot, secret in jar._secrets.items()}}


def _parse_cookies(value: Any, server: Server) -> dict[int, bytes] | None:
    """The secrets to take over, or None when they do not apply (other slot length)."""
    if value is None:
        return None
    try:
        if value["slot_seconds"] != server.room.cookies.slot_seconds:
            return None
        secrets = {int(slot): bytes.fromhex(secret) for slot, secret in value["secrets"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StateError("corrupt state: bad 'cookies'") from None
    if any(len(secret) < 16 for secret in secrets.values()):
        raise StateError("corrupt state: cookie secret too short")
    return secrets


def _plugin_states(server: Server) -> dict[str, Any]:
    """What each plugin hands over, each checked on its own: one that gives something
    JSON cannot carry is logged and left out, the others go."""
    kept: dict[str, Any] = {}
    for name, value in server.plugins.handover_state().items():
        try:
            json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("plugin_state_not_handed_over", plugin=name, error=repr(exc))
            continue
        kept[name] = value
    return kept
