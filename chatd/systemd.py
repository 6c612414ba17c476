"""The two systemd protocols chatd speaks: sd_notify and socket activation.

Both are short, documented and stable (sd_notify(3), sd_listen_fds(3)), so
they are implemented here rather than pulled in as a dependency. Notifying is
best-effort: without systemd, or with a notify socket that went away or whose
queue is full, the daemon runs exactly the same.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Sequence

LISTEN_FDS_START = 3
#: at most this many fds are taken from LISTEN_FDS: more is a mistake, not a service
MAX_PASSED_FDS = 64
#: what sd_listen_fds_with_names(3) calls an fd that came without a name
UNKNOWN_NAME = "unknown"

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

    @property
    def enabled(self) -> bool:
        """Whether this process can notify systemd at all."""
        return self._sock is not None and self._address is not None and os.getpid() == self._pid

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

    def notify_with_fds(self, fds: Sequence[int], timeout: float = 5.0, **fields: object) -> None:
        """Send one notification carrying ``fds`` (``FDSTORE=1``, ``BARRIER=1``).

        Unlike :meth:`notify` this one matters (a handover depends on it), so it
        waits up to ``timeout`` for room in a full queue and raises OSError when
        it cannot send. Python's ``socket.send_fds`` ignores its address
        argument, hence ``sendmsg`` here.
        """
        if not self.enabled:
            raise OSError("no notify socket: not started by systemd (NOTIFY_SOCKET)")
        assert self._sock is not None and self._address is not None
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.sendmsg([message], rights, 0, self._address)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OSError("the notify socket's queue stayed full") from None
                select.select([], [self._sock], [], min(remaining, 0.05))

    def barrier(self, timeout: float = 5.0) -> None:
        """Return once systemd has processed every notification sent before (sd_notify_barrier).

        A process that exits right after ``FDSTORE=1`` may be gone before systemd
        reads the message, which it then drops (it can no longer tell whose it
        was): systemd closes the pipe's write end passed with ``BARRIER=1`` only
        after the earlier messages, so the read end's hang-up is the receipt.
        Raises OSError when no receipt came within ``timeout``.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self.notify_with_fds([write_end], timeout, BARRIER=1)
            finally:
                os.close(write_end)
            poller = select.poll()
            poller.register(read_end, 0)  # POLLHUP is always reported
            if not poller.poll(timeout * 1000):
                raise OSError(f"systemd did not confirm the notifications within {timeout} s")
        finally:
            os.close(read_end)

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


def fd_names(count: int, names: str | None) -> list[str]:
    """The name of each of ``count`` passed fds, from ``$LISTEN_FDNAMES`` (sd_listen_fds(3)).

    The names are colon-separated, in fd order: a socket unit's fds first (named
    by ``FileDescriptorName=``, else the socket unit's name), then the fd
    store's (named by ``FDNAME=``). Missing or empty names are ``unknown``, as
    ``sd_listen_fds_with_names`` reports them; extra names are ignored.
    """
    given = names.split(":") if names else []
    return [given[i] if i < len(given) and given[i] else UNKNOWN_NAME for i in range(count)]


def passed_fds() -> list[tuple[int, str]]:
    """The fds systemd passed to this process, with their names; ``[]`` when none.

    Only when ``$LISTEN_PID`` names this process: the variables of a parent that
    forgot to clear them do not make its fds ours. Each fd gets close-on-exec,
    as sd_listen_fds does.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    count = max(0, min(count, MAX_PASSED_FDS))
    names = fd_names(count, os.environ.get("LISTEN_FDNAMES"))
    passed = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            os.set_inheritable(fd, False)
        except OSError:  # not open after all: nothing to take from it
            continue
        passed.append((fd, name))
    return passed


def udp_socket_from_fd(fd: int) -> socket.socket:
    """A socket object for a passed fd that must be a UDP socket; OSError otherwise.

    Serving something else (a stream socket, a Unix socket) would fail later and
    less clearly.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"systemd passed fd {fd}, which is not a socket: "
                                 f"{exc.strerror}") from None
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise OSError(f"systemd passed fd {fd}, which is not a UDP socket "
                      "(use ListenDatagram= with an IP address or a port)")
    return sock
