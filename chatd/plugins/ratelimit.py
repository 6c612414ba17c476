"""Token buckets: chat lines and commands per session, logins per source address.

The default limits are far above any typist's: they stop scripts and floods,
not people. Excess is dropped and counted, and the sender is told once per
burst (not once per dropped line, which would feed the flood). Loopback is
exempt by default: it is the host's own tools, tests and benchmarks.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

from chatd.plugins.api import RoomAPI
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option

#: Idle login buckets are forgotten once there are more addresses than this.
MAX_HOSTS = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network_problem(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"not an address or network: {value!r}"
    return None


def host_of(addr: Any) -> str:
    """The address people are limited by: the host, with IPv4-mapped IPv6 unwrapped."""
    host = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class Bucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per line."""

    __slots__ = ("tokens", "stamp", "warned")

    def __init__(self, burst: float, now: float):
        self.tokens = burst
        self.stamp = now
        self.warned = False

    def take(self, now: float, rate: float, burst: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * rate
        self.tokens = burst if tokens > burst else tokens
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.warned = False
            return True
        return False


_EXEMPT = object()  # the bucket of a session that is never limited


class RateLimit(Plugin):
    enabled_by_default = True
    options = {
        "lines_per_second": Option(float, 10.0, "chat lines and commands per session, sustained",
                                   min=0.001),
        "line_burst": Option(int, 20, "lines a session may send at once", min=1),
        "logins_per_minute": Option(float, 20.0, "logins per source address, sustained",
                                    min=0.001),
        "login_burst": Option(int, 20, "logins an address may make at once", min=1),
        "exempt": Option(list, ["127.0.0.0/8", "::1"], "addresses or networks never limited",
                         check=_network_problem),
        "warning": Option(str, "\nslow down: some of your lines were not sent",
                          "told to a sender once per burst of dropped lines"),
        "refusal": Option(str, "\ntoo many logins from your address, try again later",
                          "told to a refused login"),
    }

    #: monotonic seconds; tests replace it
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, room: RoomAPI):
        super().__init__(room)
        self.sessions: dict[str, Any] = {}
        self.hosts: dict[str, Bucket] = {}
        self._configure()

    @hookimpl
    def chatd_reconfigure(self) -> None:
        if self.room.options != self._applied:  # an unrelated reload keeps the buckets
            self._configure()

    def _configure(self) -> None:
        options = self._applied = dict(self.room.options)
        self.line_rate = options["lines_per_second"]
        self.line_burst = float(options["line_burst"])
        self.login_rate = options["logins_per_minute"] / 60.0
        self.login_burst = float(options["login_burst"])
        self.exempt: list[Network] = [ipaddress.ip_network(n, strict=False)
                                      for n in options["exempt"]]
        self.sessions.clear()  # new limits and exemptions apply from a fresh start
        self.hosts.clear()

    def is_exempt(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self.exempt)

    # -- lines and commands ------------------------------------------------------

    def _allow_line(self, name: str) -> bool:
        bucket = self.sessions.get(name)
        if bucket is None:
            user = self.room.user(name)
            exempt = user is not None and self.is_exempt(host_of(user.addr))
            bucket = _EXEMPT if exempt else Bucket(self.line_burst, self.clock())
            self.sessions[name] = bucket
        if bucket is _EXEMPT or bucket.take(self.clock(), self.line_rate, self.line_burst):
            return True
        if not bucket.warned:
            bucket.warned = True
            self.room.send(name, self.room.options["warning"])
            self.room.count("warnings")
        return False

    @hookimpl(tryfirst=True)
    def chatd_message(self, name: str) -> bool | None:
        if self._allow_line(name):
            return None
        self.room.count("lines_dropped")
        return False

    @hookimpl(tryfirst=True)
    def chatd_command(self, name: str) -> bool | None:
        if self._allow_line(name):
            return None
        self.room.count("commands_dropped")
        return True  # handled: swallowed

    @hookimpl
    def chatd_left(self, name: str) -> None:
        self.sessions.pop(name, None)

    # -- logins ------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def chatd_login(self, addr: Any) -> str | None:
        host = host_of(addr)
        bucket = self.hosts.get(host)
        now = self.clock()
        if bucket is None:
            if self.is_exempt(host):
                return None
            if len(self.hosts) >= MAX_HOSTS:
                self._forget_idle_hosts(now)
            bucket = self.hosts[host] = Bucket(self.login_burst, now)
        if bucket.take(now, self.login_rate, self.login_burst):
            return None
        self.room.count("logins_refused")
        return self.room.options["refusal"]

    def _forget_idle_hosts(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket: forget those."""
        full = self.login_burst / self.login_rate
        for host in [h for h, b in self.hosts.items() if now - b.stamp >= full]:
            del self.hosts[host]


PLUGIN = RateLimit
