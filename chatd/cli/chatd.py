"""``chatd``: run, start, stop and inspect the chat daemon."""

from __future__ import annotations

import argparse
import sys

import yaml

from chatd import __version__, daemon, fdstore
from chatd import config as config_mod
from chatd import log as log_mod
from chatd.cli import verbs
from chatd.plugins import check_settings

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    config_help = "configuration file (default: $CHATD_CONFIG, else built-in defaults)"
    # -c works before and after the command; the copy after it must not reset the first
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=config_help)
    parser = argparse.ArgumentParser(
        prog="chatd",
        description="A pluggable UDP group-chat daemon.",
        epilog="See chatd(8) and chatd.yaml(5).")
    parser.add_argument("-c", "--config", metavar="FILE", help=config_help)
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("run", parents=[common], help="serve in the foreground (systemd, debugging)")
    sub.add_parser("start", parents=[common],
                   help="start the background daemon; returns once it serves")
    stop = sub.add_parser("stop", parents=[common], help="stop the daemon (SIGTERM) and wait")
    restart = sub.add_parser(
        "restart", parents=[common],
        help="start a new daemon that takes the room over (nobody is logged out); "
        "--fresh: stop, then start")
    restart.add_argument("--fresh", action="store_true",
                         help="stop (everyone is told goodbye), then start with an empty room")
    for p in (stop, restart):
        p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                       help="seconds to wait for the daemon to exit (default 10)")
        p.add_argument("--kill", action="store_true",
                       help="send SIGKILL if it has not exited by then")
    sub.add_parser("status", parents=[common],
                   help="is it running? (LSB exit codes: 0 running, 1 dead, 3 stopped, 4 unknown)")
    sub.add_parser("reload", parents=[common], help="re-read the configuration file")
    sub.add_parser("check-config", parents=[common],
                   help="validate the configuration and print the effective settings")
    systemd_stop = sub.add_parser(
        "systemd-stop", parents=[common],
        help="ExecStop= of chatd.service: on `systemctl restart`, have the daemon hand its "
        "socket and users to systemd's fd store instead of saying goodbye")
    systemd_stop.add_argument("unit", nargs="?", default="chatd.service",
                              help="the unit being stopped (%%n; default chatd.service)")
    return parser


class _Dumper(yaml.SafeDumper):
    """Readable output: texts with newlines double-quoted, modes in octal."""


class _Octal(int):
    pass


_Dumper.add_representer(_Octal, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:int", f"0{v:03o}"))
_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style='"' if "\n" in v else None))


def effective_yaml(settings: config_mod.Settings) -> str:
    """The settings as a YAML file that ``-c`` would accept, every key spelled out."""
    nested: dict = {}
    for key, value in config_mod.as_flat_dict(settings).items():
        value = config_mod.shown(key, value)
        if key in config_mod.OCTAL_KEYS:
            value = _Octal(value)
        section, _, name = key.partition(".")
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[section] = value
    return yaml.dump(nested, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=100)


def _config_problem(path: str | None) -> str | None:
    """Why the file would keep the next process from starting, or None."""
    try:
        config_mod.load(path, check_plugins=check_settings)
    except config_mod.ConfigError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = config_mod.config_path(args.config)
    if args.command == "systemd-stop":  # a broken file must not keep it from stopping
        return fdstore.stop_helper(args.unit, check_config=lambda: _config_problem(path))
    try:
        if args.command in ("stop", "status", "reload"):
            # a broken file must not keep anyone from stopping or asking the daemon;
            # on reload the daemon itself says what is wrong with it
            settings, problem = config_mod.locate(path, check_plugins=check_settings)
            if problem is not None and args.command != "reload":
                log_mod.print_stderr(f"chatd: warning: {problem}", "warning")
        else:
            settings = config_mod.load(path, check_plugins=check_settings)
    except config_mod.ConfigError as exc:
        log_mod.print_stderr(f"chatd: config error: {exc}")
        return EXIT_USAGE
    if args.command == "check-config":
        try:
            daemon.preflight(settings)  # what start checks too: users, groups, directories
        except daemon.StartError as exc:
            print(f"chatd: config error: {settings.where(exc.key)}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"# {path or 'built-in defaults'}: OK; the effective configuration:")
        print(effective_yaml(settings), end="")
        return 0
    if args.command == "run":
        return daemon.run_foreground(settings, path)
    if args.command == "start":
        return daemon.start(settings, path)
    if args.command == "stop":
        return verbs.stop(settings, args.timeout, args.kill)
    if args.command == "reload":
        return verbs.reload(settings)
    if args.command == "restart" and not args.fresh:
        return daemon.restart(settings, path)
    if args.command == "restart":
        stopped = verbs.stop(settings, args.timeout, args.kill)
        return stopped if stopped != 0 else daemon.start(settings, path)
    return verbs.status(settings)


if __name__ == "__main__":
    sys.exit(main())
