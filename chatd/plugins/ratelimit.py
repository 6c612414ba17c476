"""Token buckets: chat lines and commands per session, logins per source address.

The default limits are far above any typist's: they stop scripts and floods,
not people. Excess is dropped and counted, and the sender is told once per
burst (not once per dropped line, which would feed the flood). Loopback is
exempt by default: it is the host's own tools, tests and benchmarks.

Source addresses cost an attacker nothing to spoof, so neither the memory
kept per address nor the cost of a login may grow with their number: login
buckets live in a table of bounded size, least recently seen forgotten first.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from chatd.hosts import host_key
from chatd.plugins.api import RoomAPI
from chatd.plugins.base import Plugin
from chatd.plugins.markers import hookimpl
from chatd.plugins.options import Option
from chatd.tokenbucket import TokenBucket, refill

#: Refilled login buckets forgotten, oldest first, each time a new address is tracked: more
#: than the one added, so the table shrinks back when the crowd goes, at a fixed cost per login.
IDLE_FORGOTTEN_PER_LOGIN = 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network_problem(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"not an address or network: {value!r}"
    return None


def ip_of(addr: Any) -> str:
    """The IP address of ``addr``, IPv4-mapped IPv6 unwrapped: what exemptions match."""
    return host_key(addr, ipv6_prefix=128).removesuffix("/128")


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
        "max_tracked_hosts": Option(int, 100_000,
                                    "addresses whose login buckets are kept, the least recently "
                                    "seen forgotten first; ~300 bytes each (~30 MB at 100,000)",
                                    min=1),
    }

    #: monotonic seconds; tests replace it
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, room: RoomAPI):
        super().__init__(room)
        self.sessions: dict[str, Any] = {}
        #: address -> (tokens, stamp) of its login bucket, least recently seen first
        self.hosts: OrderedDict[str, tuple[float, float]] = OrderedDict()
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
        self.refill_seconds = self.login_burst / self.login_rate
        self.max_hosts = options["max_tracked_hosts"]
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
            exempt = user is not None and self.is_exempt(ip_of(user.addr))
            bucket = _EXEMPT if exempt else TokenBucket(self.line_rate, self.line_burst,
                                                        self.clock())
            self.sessions[name] = bucket
        if bucket is _EXEMPT:
            return True
        if bucket.take(self.clock()):
            if bucket.refused:
                bucket.refused = 0  # the next burst of dropped lines is told again
            return True
        if bucket.refused == 1:  # the first line of this burst dropped
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
        """A token bucket per address, kept as a ``(tokens, stamp)`` tuple, not a
        :class:`~chatd.tokenbucket.TokenBucket`.

        A tuple of floats is untracked by Python's cyclic garbage collector,
        so a table of 100,000 adds nothing to its full collections; as many
        bucket objects add tens of milliseconds to each, and a flood of new
        addresses is what triggers them.
        """
        host = self.room.host(addr)  # an IPv6 /64 (room.ipv6_prefix) is one host
        hosts = self.hosts
        now = self.clock()
        saved = hosts.get(host)
        if saved is None:
            if self.is_exempt(ip_of(addr)):
                return None
            self._make_room(now)
            tokens = self.login_burst
        else:
            tokens, stamp = saved
            tokens = refill(tokens, stamp, now, self.login_rate, self.login_burst)
            hosts.move_to_end(host)
        allowed = tokens >= 1.0
        hosts[host] = (tokens - 1.0 if allowed else tokens, now)
        if allowed:
            return None
        self.room.count("logins_refused")
        return self.room.options["refusal"]

    def _make_room(self, now: float) -> None:
        """Before a new address is tracked: a fixed amount of work, whatever the table's size.

        The table is ordered by last login (every login moves its address to
        the end), so its oldest entries are the first to have refilled, and a
        refilled bucket is the same as no bucket: up to
        ``IDLE_FORGOTTEN_PER_LOGIN`` of them are forgotten. At
        ``max_tracked_hosts`` the least recently seen address is forgotten
        too, refilled or not: memory stays bounded however many sources there
        are (spoofed ones cost nothing to make).

        What forgetting a bucket that had not refilled gives away: that
        address's next login starts from a full burst again. So a flood of
        fresh sources can only make the limiter more lenient, never refuse
        anybody: to reset one address's bucket it takes ``max_tracked_hosts``
        logins from other addresses after that address's last attempt, each
        of which had its own burst anyway. Such evictions are counted
        (``hosts_evicted``), so that an operator sees the cap being reached.
        """
        hosts = self.hosts
        for _ in range(IDLE_FORGOTTEN_PER_LOGIN):
            if not hosts or now - next(iter(hosts.values()))[1] < self.refill_seconds:
                break
            hosts.popitem(last=False)
        if len(hosts) >= self.max_hosts:
            _, (_, stamp) = hosts.popitem(last=False)
            if now - stamp < self.refill_seconds:
                self.room.count("hosts_evicted")


PLUGIN = RateLimit
