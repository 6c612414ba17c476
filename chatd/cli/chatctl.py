"""``chatctl``: talk to a running chatd through its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from chatd import __version__
from chatd import config as config_mod
from chatd import log as log_mod
from chatd.control.client import ControlError, daemon_uid, request

EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED = 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatctl",
        description="Administer a running chatd: broadcast, list and kick users, "
                    "show status, reload the configuration.",
        epilog="Exit status: 0 done, 1 the daemon refused, 2 usage error, "
               "3 daemon not running, 4 permission denied or not chatd's socket. "
               "See chatctl(8).")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="chatd's configuration: its control socket, and daemon.user, "
                             "whose socket chatctl trusts")
    parser.add_argument("--socket", metavar="PATH",
                        help="the control socket itself (overrides the configuration's)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for an answer (default 10)")
    parser.add_argument("--version", action="version", version=f"chatctl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    say = sub.add_parser("say", help="broadcast TEXT to everyone, signed with the admin name")
    say.add_argument("text", nargs="+", metavar="TEXT")
    kick = sub.add_parser("kick", help="remove a user, telling them why")
    kick.add_argument("name", metavar="NAME", help="who to remove")
    # default=[]: without it argparse counts a "*" positional as required in its errors
    kick.add_argument("reason", nargs="*", default=[], metavar="REASON",
                      help="why, told to them and to the room (default: kicked by the admin)")
    for verb, text in (("who", "list the users: address, login time, idle time"),
                       ("status", "pid, uptime, address, users, counters"),
                       ("plugins", "loaded plugins, their state and failure counts")):
        sub.add_parser(verb, help=text).add_argument(
            "--json", action="store_true", help="machine-readable output")
    sub.add_parser("reload", help="re-read the configuration: prints what changed, what needs "
                   "a restart, or the error if it is invalid").add_argument(
        "--json", action="store_true", help="machine-readable output")
    return parser


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.verb == "say":
        return "say", {"text": " ".join(args.text)}
    if args.verb == "kick":
        return "kick", {"name": args.name, "reason": " ".join(args.reason)}
    return args.verb, {}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config_mod.locate(config_mod.config_path(args.config))[0]
    except config_mod.ConfigError as exc:
        if not args.socket:
            log_mod.print_stderr(f"chatctl: config error: {exc}")
            return EXIT_USAGE
        settings = None  # the socket is given: the file only says whom to trust
    path = args.socket or settings.control.socket
    cmd, cmd_args = _request(args)
    try:
        answer = request(path, cmd, cmd_args, timeout=args.timeout,
                         daemon_uid=daemon_uid(settings))
    except ControlError as exc:
        if exc.denied:
            log_mod.print_stderr(f"chatctl: {exc}")
            return EXIT_DENIED
        log_mod.print_stderr(f"chatctl: chatd is not running? {exc}")
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        error = str(answer.get("error", "refused"))
        log_mod.print_stderr(f"chatctl: {error}")
        # the admin child's peer check: like EACCES on the socket, only later
        return EXIT_DENIED if error.startswith("permission denied") else EXIT_REFUSED
    result = answer.get("result")
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(HUMAN[cmd](result))
    return 0


def _who(users: list[dict[str, Any]]) -> str:
    if not users:
        return "no users"
    rows = [("NAME", "ADDRESS", "LOGIN (UTC)", "IDLE", "VERIFIED")] + [
        (u["name"], u["addr"], u["login_time"], f"{u['idle']:.0f}s",
         "yes" if u.get("verified") else "no") for u in users]
    return _table(rows)


def _status(status: dict[str, Any]) -> str:
    lines = [
        f"pid:          {status['pid']} (admin child {status.get('admin_child_pid') or 'none'})",
        f"address:      udp {status['address']}",
        f"uptime:       {status['uptime']:.0f}s (since {status['started']})",
        *([f"taken over:   at {status['taken_over']} from pid {status['taken_over_from']}"]
          if status.get("taken_over") else []),
        f"users:        {status['users']} of {status['max_users']}",
        f"config:       {status.get('config') or 'built-in defaults'}",
        f"plugins:      {', '.join(status.get('plugins') or []) or 'none'}",
    ]
    for title, key in (("counters", "counters"), ("dropped", "drops"),
                       ("send errors", "send_errors")):
        values = status.get(key) or {}
        shown = ", ".join(f"{k} {v}" for k, v in sorted(values.items())) or "none"
        lines.append(f"{title + ':':<13} {shown}")
    lines.append(f"log errors:   {status.get('log_write_errors', 0)} lines not written")
    return "\n".join(lines)


def _plugins(plugins: list[dict[str, Any]]) -> str:
    if not plugins:
        return "no plugins"
    rows = [("PLUGIN", "STATE", "FAILURES", "CALLS", "HOOK TIME")] + [
        (p["name"], "on" if p["enabled"] else f"off ({p['reason']})", str(p["failures"]),
         str(p["calls"]), f"{p['seconds'] * 1000:.1f}ms") for p in plugins]
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


HUMAN = {
    "say": lambda r: f"said to {r['users']} users",
    "kick": lambda r: f"kicked {r['kicked']} ({r['reason']})",
    "who": _who,
    "status": _status,
    "reload": lambda r: "reloaded: " + (
        config_mod.describe_reload(r) if isinstance(r, dict) else str(r)),
    "plugins": _plugins,
}


if __name__ == "__main__":
    sys.exit(main())
