"""The tightest Python server for chatd's protocol subset: the in-language limit.

A dict of names, a blocking ``recvfrom``, a plain ``sendto`` loop and nothing
else: no validation, no logging, no identity check, no plugins. ``L`` -> ``OK``;
``C`` -> ``"\\n{name} says: {text}"`` to every other user; ``Q`` -> ``EXIT``.
chatd is measured against it side by side, so that its figures read as "this
much of what Python can do at all" rather than as absolute numbers that change
with the machine.

Ready when bound: prints ``ready HOST PORT`` on stdout and, when
``NOTIFY_SOCKET`` is set, sends ``READY=1`` there (as chatd does). SIGTERM
ends it (the default action: there is nothing to clean up).

``--sendmmsg`` swaps the ``sendto`` loop for :func:`chatd.batchsend.send_to_many`
(the batching experiment); without it this file needs nothing but the stdlib.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


def serve(host: str, port: int, buffers: int, batched: bool) -> None:
    """Never returns; the loop is as plain as Python allows on purpose."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # the same buffers chatd asks for by default, so that neither drops where the other would not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    sock.bind((host, port))
    print("ready", *sock.getsockname(), flush=True)
    notify_ready()
    send_to_many = None
    if batched:
        from chatd.batchsend import send_to_many
    users: dict[bytes, tuple[str, int]] = {}
    recv, send = sock.recvfrom, sock.sendto
    while True:
        data, addr = recv(65536)
        verb = data[:2]
        if verb == b"C ":
            name, _, text = data[2:].partition(b" ")
            line = b"\n" + name + b" says: " + text
            if send_to_many is not None:
                send_to_many(sock, line, [a for a in users.values() if a != addr])
                continue
            for other in users.values():
                if other != addr:
                    try:  # not contextlib.suppress: this is the hot loop, try costs nothing
                        send(line, other)
                    except OSError:
                        continue
        elif verb == b"L ":
            users[data[2:]] = addr
            with contextlib.suppress(OSError):
                send(b"OK", addr)
        elif verb == b"Q ":
            users.pop(data[2:], None)
            with contextlib.suppress(OSError):
                send(b"EXIT", addr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--buffers", type=int, default=4 * 1024 * 1024, metavar="BYTES",
                        help="SO_RCVBUF and SO_SNDBUF (default: chatd's default, 4 MiB)")
    parser.add_argument("--sendmmsg", action="store_true",
                        help="fan out with chatd.batchsend.send_to_many instead of sendto")
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.buffers, args.sendmmsg)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"baseline_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
