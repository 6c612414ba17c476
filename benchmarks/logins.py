"""Logins: what a login costs chatd when they come from many distinct source addresses.

The ``ratelimit`` plugin keeps a login bucket per source address. Spoofed
sources cost an attacker nothing, so a flood of ``L``/``Q`` pairs from ever
new addresses is the case that matters: the cost of a login must not grow
with the number of addresses already seen, and neither may memory beyond a
cap.

No sockets: a real Room with the real plugin manager and chatd's default
plugins (``ratelimit`` with ``exempt: []``) is fed the datagrams the server
would hand it, in this process. What is measured is chatd's own work per
login, without the kernel's (which does not depend on the number of
sources). The plugin's clock is held still, so every source arrives within
the limiter's refill time, as from an attacker sending faster than the server
can answer (the server's speed must not slow the attack it is measured by).

After a warm-up round (1,000 sources, not reported), for each N (default
1,000 and 100,000), ``--rounds`` times with a new room:

* N distinct sources each send ``L`` then ``Q``; the cost of each ``L``
  (``room.receive``, ``perf_counter_ns``) is summed. Reported: the mean over
  all N (*per login*, the headline), the mean over the last tenth (*at N*:
  the marginal cost with ~N addresses tracked), and the time spent in the
  ratelimit plugin's own hooks per pair (the plugin manager's accounting).
  The median over the rounds is reported.
* the number of addresses the limiter tracks afterwards (its cap, if any).

Then memory: ``--memory-hosts`` addresses (default 100,000, the default cap)
log in through the plugin manager, and the limiter's table is measured
(``sys.getsizeof`` of it, its keys and values and their numbers, rounded to
pymalloc's blocks) and divided by the addresses tracked: for IPv4 and for
IPv6 addresses of 38 characters, each in a /64 of its own (the table is
keyed by the /64).
"""

from __future__ import annotations

import argparse
import array
import gc
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import common

from chatd import config
from chatd import log as chatd_log
from chatd.plugins import PluginManager
from chatd.room import Room

PORT = 40000
WARM_UP_SOURCES = 1000
#: as the other benchmarks run chatd: warnings and errors only, to stderr
SETTINGS = config.from_mapping({"log": {"level": "warning"}})


def ipv4_source(i: int) -> str:
    """Distinct addresses in 10.0.0.0/8 and 11.0.0.0/8 (up to 33 million)."""
    return f"{10 + (i >> 24)}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def ipv6_source(i: int) -> str:
    """Addresses as long as they come (38 characters, no group to compress), each in a /64
    of its own: ``ratelimit`` counts a /64 as one host (``room.ipv6_prefix``)."""
    groups = [0x1000 + (i >> shift & 0xfff) for shift in (12, 0, 60, 48, 36, 24)]
    return "2001:db8:" + ":".join(f"{g:x}" for g in groups)


class Chatd:
    """A room, its plugin manager and its ratelimit plugin, as the server builds them."""

    def __init__(self) -> None:
        self.room = Room(SETTINGS.room)
        self.manager = PluginManager(self.room, {"ratelimit": {"exempt": []}})
        self.room.hooks = self.manager
        self.manager.startup()
        self.limiter = self.manager._states["ratelimit"].instance
        self.limiter.clock = lambda: 1000.0

    def plugin_seconds(self) -> float:
        return self.manager._states["ratelimit"].seconds

    def cap(self) -> int | None:
        return self.limiter.room.options.get("max_tracked_hosts")


class GcPauses:
    """The cyclic garbage collector's pauses while in use: the longest, and their sum."""

    def __init__(self) -> None:
        self.started = 0
        self.longest = self.total = 0
        self.full = 0  # collections of the oldest generation

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter_ns()
            return
        pause = time.perf_counter_ns() - self.started
        self.total += pause
        self.longest = max(self.longest, pause)
        self.full += info["generation"] == 2


def one_round(n: int, round_index: int) -> dict[str, Any]:
    """N distinct sources, one L/Q pair each; the cost of every L."""
    gc.collect()  # what earlier rounds left is not this round's to collect
    with GcPauses() as pauses:
        result = _one_round(n, round_index)
    result.update(gc_ms=round(pauses.total / 1e6, 3), gc_max_ms=round(pauses.longest / 1e6, 3),
                  gc_full=pauses.full)
    return result


def _one_round(n: int, round_index: int) -> dict[str, Any]:
    chatd = Chatd()
    receive = chatd.room.receive
    clock = time.perf_counter_ns
    first = round_index * n  # new addresses every round (a new room anyway)
    costs = array.array("q", bytes(8 * n))  # ns per L; not a list of ints: no work for the GC
    answered = 0
    plugin_before = chatd.plugin_seconds()
    for index in range(n):
        addr = (ipv4_source(first + index), PORT)
        started = clock()
        out = receive(addr, b"L visitor", 0.0)
        costs[index] = clock() - started
        if out.deliveries and out.deliveries[0].payload == b"OK":
            answered += 1
        receive(addr, b"Q visitor", 0.0)
    plugin = chatd.plugin_seconds() - plugin_before
    tail = costs[n - max(1, n // 10):]
    ordered = sorted(costs)
    return {
        "sources": n,
        "logins_ok": answered,
        "per_login_us": round(sum(costs) / n / 1000, 3),
        "at_n_us": round(sum(tail) / len(tail) / 1000, 3),
        "p99_us": round(common.percentile(ordered, 99) / 1000, 3),
        "max_ms": round(ordered[-1] / 1e6, 3),
        "plugin_us_per_pair": round(plugin / n * 1e6, 3),
        "tracked": len(chatd.limiter.hosts),
        "max_tracked_hosts": chatd.cap(),
    }


def memory_per_host(count: int, source: Callable[[int], str]) -> dict[str, Any]:
    """Bytes the limiter's table holds per tracked address: the table, its keys and values."""
    chatd = Chatd()
    ticks = itertools.count()
    chatd.limiter.clock = lambda: 1000.0 + next(ticks) * 1e-6  # a stamp of its own each, as live
    login = chatd.manager.login
    for i in range(count):
        login("visitor", (source(i), PORT))
    hosts = chatd.limiter.hosts
    size = deep_size(hosts)
    return {"sources": count, "tracked": len(hosts),
            "bytes_per_host": round(size / len(hosts), 1) if hosts else None,
            "table_mib": round(size / 2**20, 2), "example": next(reversed(hosts), None)}


def deep_size(table: dict[str, Any]) -> int:
    """``table`` with its keys and values, down to their floats; shared objects counted once.

    ``sys.getsizeof`` of an ``OrderedDict`` includes its linked-list nodes.
    Small objects are rounded up to pymalloc's 16-byte blocks.
    """
    seen: set[int] = set()
    total = 0
    todo: list[Any] = [table]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, bool):
            continue
        seen.add(id(obj))
        size = sys.getsizeof(obj)
        total += -(-size // 16) * 16 if size <= 512 else size
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, tuple | list):
            todo.extend(obj)
        else:
            todo.extend(getattr(obj, slot) for slot in getattr(type(obj), "__slots__", ())
                        if hasattr(obj, slot))
    return total


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    report = common.new_report("logins", args, results=[], memory=[])
    chatd_log.configure(SETTINGS.log)
    one_round(WARM_UP_SOURCES, 0)  # first calls and caches: not what is measured
    for n in args.sources:
        runs = []
        for r in range(args.rounds):
            started = time.monotonic()
            runs.append(one_round(n, r))
            log(f"  {n:,} sources, round {r + 1}: {runs[-1]['per_login_us']} us per login, "
                f"{runs[-1]['at_n_us']} us at N ({time.monotonic() - started:.1f} s)")
        report["results"].append({"sources": n, "median": common.median_of(runs), "runs": runs})
    low, high = report["results"][0]["median"], report["results"][-1]["median"]
    report["ratio"] = {
        "sources": [low["sources"], high["sources"]],
        "per_login": round(high["per_login_us"] / low["per_login_us"], 3),
        "at_n": round(high["at_n_us"] / low["at_n_us"], 3),
    }
    for family, source in (("ipv4", ipv4_source), ("ipv6", ipv6_source)):
        memory = memory_per_host(args.memory_hosts, source)
        memory["family"] = family
        report["memory"].append(memory)
        log(f"  memory, {family}: {memory['bytes_per_host']} B per address")
    return report


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"logins benchmark - {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, "
          f"{m['date']}; median of {report['params']['rounds']} rounds; chatd: {report['chatd']}")
    rows = []
    for r in report["results"]:
        m = r["median"]
        rows.append([r["sources"], m["per_login_us"], m["at_n_us"], m["p99_us"], m["max_ms"],
                     m["plugin_us_per_pair"], m["gc_max_ms"], m["gc_full"], m["logins_ok"],
                     m["tracked"], m["max_tracked_hosts"]])
    print(common.table(["sources", "us/login", "us/login at N", "p99 us", "max ms",
                        "ratelimit us/pair", "GC max ms", "full GCs", "OK", "tracked", "cap"],
                       rows))
    ratio = report["ratio"]
    print(f"ratio {ratio['sources'][1]:,} / {ratio['sources'][0]:,} sources: "
          f"per login {ratio['per_login']}, at N {ratio['at_n']} (target: <= 2)")
    print(common.table(["family", "addresses", "tracked", "B/address", "table MiB", "example"],
                       [[x["family"], x["sources"], x["tracked"], x["bytes_per_host"],
                         x["table_mib"], x["example"]] for x in report["memory"]]))


def _sizes(text: str) -> list[int]:
    sizes = [int(part.replace("_", "")) for part in text.split(",")]
    if len(sizes) < 2 or min(sizes) < 10:
        raise argparse.ArgumentTypeError("at least two sizes, each at least 10")
    return sorted(sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=_sizes, default=[1000, 100_000],
                        help="comma-separated numbers of distinct sources (1000,100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (3)")
    parser.add_argument("--memory-hosts", type=int, default=100_000,
                        help="addresses for the memory measurement (100000)")
    parser.add_argument("--quick", action="store_true", help="tiny and fast: for the smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sources, args.rounds, args.memory_hosts = [100, 1000], 1, 1000
    if args.rounds < 1 or args.memory_hosts < 1:
        parser.error("--rounds and --memory-hosts must be at least 1")

    log = common.progress

    report = run(args, log)
    return common.output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
