"""Hooks: what the plugin hooks cost one chat line, in this process, without sockets.

A real Room with the real plugin manager; ``alice`` and ``bob`` are logged
in from 127.0.0.1 (so that ``ratelimit``, exempt there by default, is asked
and lets every line through). For each plugin set:

* *hooks*: ``chatd_message`` then ``chatd_said``, called as the room calls
  them for a chat line (``manager.message``, ``manager.said``): the price of
  the plugin layer per line, guard and accounting included;
* *line*: a whole ``C alice …`` datagram through ``room.receive`` (parsing,
  the hooks, rendering; no sending), for scale.

Plugin sets: *none* (every plugin off: the call path alone), *default* (the
built-ins that are on by default: ``ratelimit`` answers ``chatd_message``,
nobody ``chatd_said``), *busy* (also ``wordfilter`` on ``chatd_message`` and
``history``, in memory, on ``chatd_said``). Each figure is the fastest of
``--rounds`` rounds of ``--lines`` lines, in ns per line: the least disturbed
by other work on the machine.

For reference, *pluggy call*: one ``pm.hook.<name>(a=…, b=…)`` call of a
hook nobody implements, on a bare pluggy ``PluginManager`` (pluggy's own
dispatch: argument checks, the copy of the implementation list, its hookexec).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import pluggy

from chatd import config
from chatd import log as chatd_log
from chatd.plugins import PluginManager
from chatd.plugins.catalog import default_catalog
from chatd.room import Room

SETTINGS = config.from_mapping({"log": {"level": "warning"}})
A, B = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
TEXT = "hello there, how is everyone doing today?"

PLUGIN_SETS: dict[str, dict[str, Any]] = {
    "none": {name: False for name in default_catalog().specs},
    "default": {},
    "busy": {"wordfilter": {"words": ["darn", "heck"]}, "history": {"size": 50}},
}


def make_room(plugins: dict[str, Any]) -> tuple[Room, PluginManager]:
    room = Room(SETTINGS.room)
    manager = PluginManager(room, plugins)
    room.hooks = manager
    manager.startup()
    for addr, name in ((A, "alice"), (B, "bob")):
        room.receive(addr, f"L {name}".encode(), 0.0)
    room.flush()
    return room, manager


def time_hooks(manager: PluginManager, lines: int) -> int:
    """ns for ``lines`` lines' worth of message + said hook calls."""
    message, said = manager.message, manager.said
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(lines):
        said("alice", message("alice", TEXT))
    return clock() - started


def time_lines(room: Room, lines: int) -> int:
    """ns for ``lines`` chat datagrams through the room (their deliveries are not sent)."""
    receive = room.receive
    datagram = f"C alice {TEXT}".encode()
    events = getattr(room, "events", None)
    clock = time.perf_counter_ns
    total = 0
    for _ in range(lines // 1000):  # the room's event list is emptied now and then, as live
        started = clock()
        for _ in range(1000):
            receive(A, datagram, 1.0)
        total += clock() - started
        if isinstance(events, list):
            events.clear()
    return total


def time_pluggy_call(lines: int) -> int:
    """ns for ``lines`` calls of an unimplemented hook through a bare pluggy manager."""
    marker = pluggy.HookspecMarker("bench")

    class Spec:
        @marker
        def bench_hook(self, name: str, text: str) -> None:
            """A hook of two arguments, like chatd_said."""

    manager = pluggy.PluginManager("bench")
    manager.add_hookspecs(Spec)
    hook = manager.hook.bench_hook
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(lines):
        hook(name="alice", text=TEXT)
    return clock() - started


def fastest(measure: Callable[[int], int], lines: int, rounds: int) -> float:
    best = min(_quiet(measure, lines) for _ in range(rounds))
    return round(best / lines, 1)


def _quiet(measure: Callable[[int], int], lines: int) -> int:
    gc.collect()
    gc.disable()  # a collection in the middle of a round measures the collector
    try:
        return measure(lines)
    finally:
        gc.enable()


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    report = common.new_report("hooks", args, results=[])
    chatd_log.configure(SETTINGS.log)
    report["pluggy_call_ns"] = fastest(time_pluggy_call, args.lines, args.rounds)
    log(f"  pluggy call: {report['pluggy_call_ns']} ns")
    for name, plugins in PLUGIN_SETS.items():
        room, manager = make_room(plugins)
        fastest(lambda n, m=manager: time_hooks(m, n), 1000, 1)  # warm up
        hooks_ns = fastest(lambda n, m=manager: time_hooks(m, n), args.lines, args.rounds)
        line_ns = fastest(lambda n, r=room: time_lines(r, n), args.lines, args.rounds)
        enabled = [p["name"] for p in manager.describe() if p["enabled"]]
        manager.shutdown()
        report["results"].append({"plugins": name, "enabled": enabled,
                                  "hooks_ns_per_line": hooks_ns, "line_ns": line_ns})
        log(f"  {name}: hooks {hooks_ns} ns, line {line_ns} ns per line")
    return report


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"hooks benchmark - {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, "
          f"{m['date']}; fastest of {report['params']['rounds']} rounds of "
          f"{report['params']['lines']:,} lines; chatd: {report['chatd']}")
    print(common.table(["plugins", "message+said ns/line", "room.receive ns/line", "enabled"],
                       [[r["plugins"], r["hooks_ns_per_line"], r["line_ns"],
                         ",".join(r["enabled"]) or "-"] for r in report["results"]]))
    print(f"one call of an unimplemented hook through pluggy: {report['pluggy_call_ns']} ns")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="lines per round (200000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the fastest counts (5)")
    parser.add_argument("--quick", action="store_true", help="tiny and fast: for the smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.rounds = 2000, 1
    if args.lines < 1000 or args.rounds < 1:
        parser.error("--lines must be at least 1000 and --rounds at least 1")
    args.lines -= args.lines % 1000

    log = common.progress

    report = run(args, log)
    return common.output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
