"""The admin commands: what the daemon executes for ``chatctl``, the FIFO and a terminal.

Requests arrive from the admin child over the socketpair (see
:mod:`chatd.admin`), already bounded and from a checked peer. Each command
acts on the room and answers ``{"ok": true, "result": ...}`` or ``{"ok":
false, "error": "..."}``; none raises, and none can stop the room.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from chatd.formats import format_addr, iso_time
from chatd.room import TextTooLong
from chatd.server import Server

log = structlog.get_logger("chatd")


def _ok(result: Any = None) -> dict[str, Any]:
    return {"ok": True, "result": result}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _text_arg(args: dict[str, Any], name: str) -> str | None:
    value = args.get(name)
    return value if isinstance(value, str) and value.strip() else None


def cmd_say(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    text = _text_arg(args, "text")
    if text is None:
        return _error("say needs a text")
    try:
        step = server.room.admin_say(text)
    except TextTooLong as exc:
        return _error(f"text too long: {exc}")
    server.apply(step)
    return _ok({"users": server.room.population()})


def cmd_who(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    """Every user; in a cluster, with the node serving each, the other nodes' too (their
    idle time and flags are theirs to know: None here)."""
    now_wall, now = time.time(), time.monotonic()
    node = {"node": server.bridge.node} if server.bridge is not None else {}
    users = [
        {"name": s.name, "addr": format_addr(s.addr),
         "login_time": iso_time(now_wall - (now - s.joined_at)),
         "idle": round(now - s.last_seen, 1), "keepalive": s.keepalive,
         "verified": s.verified, **node}
        for s in server.room.sessions()
    ]
    users += [{"name": r.name, "addr": r.addr, "login_time": r.since, "idle": None,
               "keepalive": None, "verified": None, "node": r.node}
              for r in server.room.remote_users()]
    return _ok(users)


def cmd_kick(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    name = _text_arg(args, "name")
    if name is None:
        return _error("kick needs a name")
    reason = _text_arg(args, "reason") or "kicked by the admin"
    replica = server.room.replica
    remote = replica.get(name) if replica is not None and not server.room.session(name) else None
    if not server.room.kick(name, reason):
        return _error(f"no such user: {name}")
    server.apply(server.room.flush())  # a user of another node: its node acts on the record
    result = {"kicked": name, "reason": reason}
    if server.bridge is not None:
        result["node"] = remote.node if remote is not None else server.bridge.node
    return _ok(result)


def cmd_status(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    return _ok(server.status())


def cmd_reload(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    ok, message = server.reload()
    return _ok(message) if ok else _error(message)


def cmd_plugins(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    return _ok(server.plugins.describe())


COMMANDS: dict[str, Callable[[Server, dict[str, Any]], dict[str, Any]]] = {
    "say": cmd_say,
    "who": cmd_who,
    "kick": cmd_kick,
    "status": cmd_status,
    "reload": cmd_reload,
    "plugins": cmd_plugins,
}


def execute(server: Server, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one admin request; never raises (an error is an answer)."""
    handler = COMMANDS.get(cmd)
    if handler is None:
        return _error(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    if not isinstance(args, dict):
        return _error("args must be a mapping")
    try:
        return handler(server, args)
    except Exception as exc:  # an admin request must not stop the room either
        log.exception("admin_command_failed", cmd=cmd)
        return _error(f"internal error: {exc}")
