"""What the server runs beside the room: services, and the children they fork.

The server's loop (:mod:`chatd.server`) owns SIGCHLD, as gunicorn's arbiter
does: one ``waitpid`` loop collects every exited child and hands each pid
to the service that forked it (:meth:`Service.pids`), so no service ever
reaps another's child. Each service is started before the room serves,
ticked once a second, told when one of its children exited, and stopped
after the room said goodbye; every one of those calls runs under the same
guard as a datagram, so a service that fails is logged, never the end of
the room.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection
from typing import Any


class Service:
    """One thing the server runs beside the room; every method may be left as it is."""

    #: what the log calls it
    name = "service"

    def start(self) -> None:
        """Before the room serves; an exception here stops start-up, saying why."""

    def tick(self, now: float) -> None:
        """About once a second, with the loop's monotonic clock."""

    def pids(self) -> Collection[int]:
        """The children this service forked and has not yet been told about."""
        return ()

    def child_exited(self, pid: int, status: int) -> None:
        """One of :meth:`pids` exited and was reaped; ``status`` as ``os.waitpid`` gives it."""

    def stop(self) -> None:
        """After the room said goodbye: end and reap its children."""

    def status(self) -> dict[str, Any]:
        """What it adds to ``chatctl status``."""
        return {}


class Backoff:
    """Delays between attempts that keep failing: ``first``, doubled each time, up to ``most``.

    A success that lasted ``stable_after`` seconds (a child that lived that
    long) starts the sequence over.
    """

    def __init__(self, first: float = 0.5, most: float = 30.0, stable_after: float = 10.0):
        self.first = first
        self.most = most
        self.stable_after = stable_after
        self.failures = 0

    def next_delay(self, lasted: float = 0.0) -> float:
        """The delay before the next attempt, after one that failed after ``lasted`` seconds."""
        self.failures = 1 if lasted >= self.stable_after else self.failures + 1
        return min(self.most, self.first * 2 ** (self.failures - 1))


def describe_status(status: int) -> str:
    """A wait status as a person reads it: ``exit 1``, ``killed by SIGKILL``."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exit {os.waitstatus_to_exitcode(status)}"
