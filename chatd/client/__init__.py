"""``chat-client``: the terminal and pipe client of the chat room.

The protocol side (:mod:`.session`) is sans-I/O so that logins, keepalives
and reconnections are tested with plain values and a fake clock; the two
front ends (:mod:`.terminal`, :mod:`.pipe`) only move bytes and lines.
Nothing from the network reaches a terminal without :mod:`.sanitize`.
"""

from typing import Final

#: Exit statuses, shared by both front ends and the command line.
EXIT_OK: Final = 0  # left the room, or the server ended the session
EXIT_UNREACHABLE: Final = 1  # no answer, cannot resolve, or --name refused
EXIT_USAGE: Final = 2  # argparse's own
EXIT_INTERRUPTED: Final = 130  # a signal before joining
