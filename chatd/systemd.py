"""The two systemd protocols chatd speaks: sd_notify and socket activation.

Both are short, documented and stable (sd_notify(3), sd_listen_fds(3)), so
they are implemented here rather than pulled in as a dependency. Notifying is
best-effort: without systemd, or with a notify socket that went away or whose
queue is full, the daemon runs exactly the same.
"""

from __future__ import annotations

import os
import socket
import time

LISTEN_FDS_START = 3

#: what a child process must not inherit: notifying and the sockets are the daemon's
SYSTEMD_ENVIRONMENT = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                       "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends ``KEY=VALUE`` datagrams to ``$NOTIFY_SOCKET``; a no-op without one.

    Only the process that made the notifier sends: a forked child (the admin
    child) inherits the object but its ``notify`` does nothing, because
    systemd takes a datagram from another pid as a lie about the main process.
    The socket is non-blocking, because a service manager that stopped
    reading its queue must not stall the room.
    """

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._pid = os.getpid()
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address and (address.startswith(("/", "@"))):
            # an address starting with "@" is in the abstract namespace
            self._address = "\0" + address[1:] if address.startswith("@") else address
            try:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            except OSError:
                self._sock = None
        watchdog = os.environ.get("WATCHDOG_USEC")
        watchdog_pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if (watchdog and watchdog.isdigit() and int(watchdog) > 0
                and watchdog_pid in (None, str(os.getpid()))):
            self.watchdog_interval = int(watchdog) / 2e6  # ping at half the timeout

    def notify(self, **fields: object) -> bool:
        """Send one notification; True when it was sent."""
        if self._sock is None or self._address is None or os.getpid() != self._pid:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
            return True
        except OSError:  # gone, refused, queue full (EAGAIN): best-effort
            return False

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)


def forget_environment() -> None:
    """Child processes must neither notify nor think the sockets are theirs."""
    for key in SYSTEMD_ENVIRONMENT:
        os.environ.pop(key, None)


def activated_socket() -> socket.socket | None:
    """The UDP socket systemd passed us (fd 3), if ``LISTEN_PID`` names this process.

    Raises OSError when fd 3 is not a UDP socket: serving something else
    (a stream socket, a Unix socket) would fail later and less clearly.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    fd = LISTEN_FDS_START
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"socket activation passed fd {fd}, which is not a socket: "
                                 f"{exc.strerror}") from None
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise OSError(f"socket activation passed fd {fd}, which is not a UDP socket "
                      "(use ListenDatagram= with an IP address or a port)")
    os.set_inheritable(fd, False)
    return sock
