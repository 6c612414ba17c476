"""The login limiter under many source addresses: bounded memory, fixed work per login.

Spoofed sources cost an attacker nothing, so the table of login buckets has a
hard cap (``max_tracked_hosts``) and evicts the least recently seen address.
Most tests drive a real Room with the real plugin manager and plugin, with
the plugin's clock a plain value (so "before the bucket refilled" is exact);
the last one runs a daemon and logs in from real 127.0.0.x addresses.

Timing is never asserted. That a login costs the same at any table size is
shown by the work it does: a new address at the cap evicts exactly one entry,
and at most ``IDLE_FORGOTTEN_PER_LOGIN`` refilled buckets are forgotten per
login, never a scan of the table.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from chatd import config
from chatd.plugins import PluginConfigError, PluginManager, check_settings
from chatd.plugins.ratelimit import IDLE_FORGOTTEN_PER_LOGIN
from chatd.room import Room

REFUSAL = b"\ntoo many logins from your address, try again later"


class Limiter:
    """A room whose only limit on logins is ``ratelimit`` with the given options."""

    def __init__(self, **options):
        self.room = Room(config.from_mapping({}).room)
        self.manager = PluginManager(self.room, {"ratelimit": {"exempt": [], **options}})
        self.room.hooks = self.manager
        self.manager.startup()
        self.plugin = self.manager._states["ratelimit"].instance
        self.now = 0.0
        self.plugin.clock = lambda: self.now

    def login(self, host: str) -> bytes:
        """``L`` then ``Q`` from ``host`` (so the room stays empty); the answer to the ``L``."""
        addr = (host, 4000)
        answer = self.room.receive(addr, b"L visitor", self.now).to(addr)
        self.room.receive(addr, b"Q visitor", self.now)
        return answer[0]

    def tracked(self) -> list[str]:
        """The tracked addresses, least recently seen first."""
        return list(self.plugin.hosts)

    @property
    def evicted(self) -> int:
        return self.plugin.room.counters["hosts_evicted"]


def hosts(first: int, count: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(first, first + count)]


def test_an_ipv6_host_is_limited_by_its_prefix_not_by_each_address():
    """One machine owns a /64 and can send from a fresh address each time."""
    limiter = Limiter(login_burst=2, logins_per_minute=1)
    assert limiter.login("2001:db8:1:2::1") == b"OK"
    assert limiter.login("2001:db8:1:2::2") == b"OK"
    assert limiter.login("2001:db8:1:2:ffff::3") == REFUSAL
    assert limiter.login("2001:db8:1:3::1") == b"OK"  # another /64: another host
    assert limiter.tracked() == ["2001:db8:1:2::/64", "2001:db8:1:3::/64"]


def test_the_table_stays_at_the_cap_however_many_sources_arrive():
    limiter = Limiter(max_tracked_hosts=50)
    sources = hosts(0, 150)
    for host in sources:
        assert limiter.login(host) == b"OK"
    assert len(limiter.plugin.hosts) == 50
    assert limiter.tracked() == sources[100:]  # the most recent ones
    assert limiter.evicted == 100  # none had refilled: each eviction is counted


def test_an_address_that_keeps_trying_stays_limited_while_others_arrive():
    """Eviction is by last use, not by arrival: a limited address that keeps trying stays in."""
    limiter = Limiter(max_tracked_hosts=50, login_burst=2, logins_per_minute=0.01)
    victim = "192.0.2.7"
    assert [limiter.login(victim) for _ in range(3)] == [b"OK", b"OK", REFUSAL]
    others = iter(hosts(0, 1000))
    for _ in range(3):  # 147 other addresses in all: first-in-first-out would have dropped it
        for _ in range(49):
            assert limiter.login(next(others)) == b"OK"
        assert limiter.login(victim) == REFUSAL
    assert len(limiter.plugin.hosts) == 50 and limiter.evicted == 98
    # left alone for a table's worth of other addresses, it is forgotten: a fresh burst
    for _ in range(50):
        limiter.login(next(others))
    assert victim not in limiter.plugin.hosts
    assert limiter.login(victim) == b"OK"


def test_a_new_address_at_the_cap_evicts_exactly_the_least_recently_seen():
    limiter = Limiter(max_tracked_hosts=50)
    sources = hosts(0, 50)
    for host in sources:
        limiter.login(host)
    limiter.login(sources[0])  # seen again: now the most recent
    assert limiter.tracked() == sources[1:] + sources[:1]
    newcomers = hosts(1000, 20)
    for count, host in enumerate(newcomers, 1):
        before = limiter.tracked()
        assert limiter.login(host) == b"OK"
        assert limiter.tracked() == before[1:] + [host]  # one out, one in
        assert limiter.evicted == count
    assert limiter.tracked()[-21:] == sources[:1] + newcomers
    before = limiter.tracked()
    limiter.login(sources[0])  # an address already tracked evicts nothing
    assert sorted(limiter.tracked()) == sorted(before) and limiter.evicted == 20


def test_refilled_buckets_are_forgotten_a_few_per_login_oldest_first():
    limiter = Limiter(max_tracked_hosts=50, login_burst=20, logins_per_minute=20)
    refill = limiter.plugin.refill_seconds
    assert refill == 60.0
    old = hosts(0, 30)
    for host in old:
        limiter.login(host)
    limiter.now = 30.0
    recent = hosts(100, 10)  # these have not refilled by the time the old ones have
    for host in recent:
        limiter.login(host)
    limiter.now = refill + 1.0
    fresh = iter(hosts(1000, 100))
    for logins in range(1, 16):
        limiter.login(next(fresh))
        assert len(limiter.plugin.hosts) == 40 - (IDLE_FORGOTTEN_PER_LOGIN - 1) * logins
    assert limiter.tracked()[:10] == recent  # the old ones are gone; the recent ones kept
    for _ in range(10):
        limiter.login(next(fresh))
    assert limiter.tracked()[:10] == recent and limiter.evicted == 0


def test_a_login_forgets_no_more_than_a_fixed_number_of_refilled_buckets():
    limiter = Limiter(max_tracked_hosts=1000)
    for host in hosts(0, 1000):
        limiter.login(host)
    limiter.now = limiter.plugin.refill_seconds  # every bucket has refilled
    limiter.login("192.0.2.1")
    assert len(limiter.plugin.hosts) == 1000 - IDLE_FORGOTTEN_PER_LOGIN + 1
    assert limiter.evicted == 0  # refilled buckets forgotten lose nothing: not counted


def test_exempt_addresses_take_no_room_in_the_table():
    limiter = Limiter(max_tracked_hosts=5, exempt=["10.0.0.0/8"])
    for host in hosts(0, 20):
        assert limiter.login(host) == b"OK"
    assert limiter.tracked() == []


@pytest.mark.parametrize(("value", "problem"), [(0, "must be at least 1"),
                                              (-1, "must be at least 1"),
                                              (1.5, "expected an integer"),
                                              ("many", "expected an integer")])
def test_max_tracked_hosts_must_be_a_positive_integer(value, problem):
    check_settings({"ratelimit": {"max_tracked_hosts": 1}})
    with pytest.raises(PluginConfigError, match=problem) as error:
        check_settings({"ratelimit": {"max_tracked_hosts": value}})
    assert error.value.path == "plugins.ratelimit.max_tracked_hosts"


def login_from(server, host: str, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(5)
        sock.sendto(f"L {name}".encode(), server.addr)
        return sock.recv(2048)


def test_the_daemon_keeps_the_most_recently_seen_addresses(make_chatd):
    server = make_chatd({"plugins": {"ratelimit": {
        "exempt": [], "login_burst": 1, "logins_per_minute": 0.01, "max_tracked_hosts": 3}}})
    victim = "127.0.0.2"
    names = iter(f"v{i}" for i in range(100))
    assert login_from(server, victim, next(names)) == b"OK"
    assert login_from(server, victim, next(names)) == REFUSAL
    for host in ("127.0.0.3", "127.0.0.4"):  # the table is full
        assert login_from(server, host, next(names)) == b"OK"
    assert login_from(server, victim, next(names)) == REFUSAL  # now the most recently seen
    assert login_from(server, "127.0.0.5", next(names)) == b"OK"  # pushes out 127.0.0.3
    assert login_from(server, victim, next(names)) == REFUSAL
    for host in ("127.0.0.6", "127.0.0.7", "127.0.0.8"):
        assert login_from(server, host, next(names)) == b"OK"
    assert login_from(server, victim, next(names)) == b"OK"  # forgotten: a fresh burst
    result = subprocess.run([sys.executable, "-m", "chatd.cli.chatctl", "-c", str(server.config),
                             "plugins", "--json"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    plugin = next(p for p in json.loads(result.stdout) if p["name"] == "ratelimit")
    assert plugin["counters"] == {"logins_refused": 3, "hosts_evicted": 5}
