"""``chatd``: run, start, stop and inspect the chat daemon."""

from __future__ import annotations

import argparse
import sys

import yaml

from chatd import __version__
from chatd import config as config_mod

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help="configuration file (default: $CHATD_CONFIG, else built-in defaults)")
    parser = argparse.ArgumentParser(
        prog="chatd", parents=[common],
        description="A pluggable UDP group-chat daemon.",
        epilog="See chatd(8) and chatd.yaml(5).")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("run", parents=[common], help="serve in the foreground (systemd, debugging)")
    sub.add_parser("check-config", parents=[common],
                   help="validate the configuration and print the effective settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = config_mod.config_path(args.config)
    try:
        settings = config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(f"chatd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"# {path or 'built-in defaults'}: OK")
        print(yaml.safe_dump(config_mod.as_flat_dict(settings), allow_unicode=True,
                             sort_keys=False), end="")
        return 0
    from chatd import daemon

    return daemon.run_foreground(settings, path)


if __name__ == "__main__":
    sys.exit(main())
