"""``chat-client``: join a chatd room from a terminal, or from a pipe as a bot."""

from __future__ import annotations

import argparse
import os
import sys

from chatd import __version__, protocol
from chatd.client import EXIT_INTERRUPTED, EXIT_UNREACHABLE
from chatd.client.session import LOGIN_TRIES, MISSED_PONGS, name_error

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888

_DESCRIPTION = """\
Join the chat room served by chatd at HOST:PORT.

When stdin and stdout are a terminal, the client asks for a name (unless
--name is given) and shows a prompt; lines from the room appear above it
without disturbing what you type. Leave with quit, /quit, Ctrl-D or Ctrl-C.
Other lines starting with / (such as /who) are commands for the server.

Otherwise it runs in pipe mode, for bots and scripts: --name is required,
every stdin line is sent as a chat line (/quit leaves), every line from the
room is printed to stdout as one line and flushed at once, and the client's
own notices go to stderr. End of input leaves the room.

Text from the network is never passed to the terminal as is: control
characters and escape sequences are shown escaped (\\x1b), invalid UTF-8 as
\\xNN escapes."""

_EPILOG = f"""\
keepalive: a P is sent every --keepalive seconds; after {MISSED_PONGS} unanswered in a
row the client says "connection lost, retrying…" and sends L with the same
name until the server answers, then says "reconnected as NAME".

exit status: 0 after leaving or being told to leave (kick, shutdown);
1 when the server cannot be reached or refuses --name;
2 for usage errors; 130 when interrupted before joining.

See chat-client(1), chatd(8), chatctl(8)."""


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def _seconds(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < 0 or (
                value == 0 and not allow_zero):
            low = "0 or more" if allow_zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {low} seconds: {text!r}")
        return value
    return parse


def _datagram_size(text: str) -> int:
    try:
        size = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if not 16 <= size <= 65507:
        raise argparse.ArgumentTypeError(f"must be 16 to 65507 bytes: {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-client", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", metavar="HOST", nargs="?", default=DEFAULT_HOST,
                        help=f"server name or address (default {DEFAULT_HOST})")
    parser.add_argument("port", metavar="PORT", nargs="?", default=DEFAULT_PORT, type=_port,
                        help=f"server UDP port (default {DEFAULT_PORT})")
    parser.add_argument("-n", "--name", metavar="NAME",
                        help="log in as NAME without asking; required in pipe mode; "
                             "exit 1 if the server refuses it")
    parser.add_argument("-k", "--keepalive", metavar="SECONDS", type=_seconds(True),
                        default=30.0,
                        help="seconds between keepalives, fractions allowed; 0 turns "
                             "keepalives and reconnection off (default 30)")
    parser.add_argument("-t", "--timeout", metavar="SECONDS", type=_seconds(False),
                        default=1.0,
                        help=f"how long each login try (of {LOGIN_TRIES}) and the final "
                             "leave wait for the server's answer (default 1)")
    parser.add_argument("--max-datagram", metavar="BYTES", type=_datagram_size,
                        default=protocol.DEFAULT_MAX_DATAGRAM,
                        help="refuse, without sending, a line whose datagram "
                             "'C NAME TEXT' is longer than this; match the server's "
                             "room.max_datagram (default %(default)s)")
    parser.add_argument("--version", action="version", version=f"chat-client {__version__}")
    return parser


def _terminal_mode() -> bool:
    try:
        return os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):  # closed or replaced streams
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    terminal = _terminal_mode()
    if args.name is not None and (problem := name_error(args.name)) is not None:
        parser.error(f"--name: {problem}")
    if not terminal and args.name is None:
        parser.error("--name is required when stdin or stdout is not a terminal (pipe mode)")
    try:
        return _run(args, terminal)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # no socket, no terminal: say so, no traceback
        print(f"chat-client: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _run(args: argparse.Namespace, terminal: bool) -> int:
    from chatd.client import net
    from chatd.client.session import ClientSession

    try:
        link = net.Link.resolve(args.host, args.port)
    except net.Unreachable as exc:
        print(f"chat-client: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    session = ClientSession(keepalive=args.keepalive, timeout=args.timeout,
                            max_datagram=args.max_datagram)
    try:
        if terminal:
            from chatd.client import terminal as terminal_mode

            return terminal_mode.run(link, session, args.name)
        from chatd.client import pipe

        return pipe.run(link, session, args.name,
                        pipe.PipeOutput(sys.stdout.buffer, sys.stderr))
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
