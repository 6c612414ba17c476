"""Cluster: one room on one node without Redis, and on one, two and three nodes sharing a Redis.

Every server runs on this one machine, so on a two-core host the cluster's
total cannot grow with its nodes: the nodes, Redis and the load process share
the same two cores. What this benchmark reports is therefore what a node and
Redis *cost* per line, and what crossing Redis adds to a line's latency:

* **burst**: the speaker (a user of node 1) sends ``--burst`` lines back to back;
  deliveries/s is every line delivered to every listener, on every node, over
  the time from the first send to the last arrival. Lines that never arrive
  within ``--timeout`` are reported as lost.
* **paced**: ``--rate`` lines/s for ``--duration`` s. Latency (kernel receive
  timestamp minus the send time written in the line) separately for listeners
  on the speaker's node (*local*) and on the other nodes (*remote*: through
  the stream); CPU seconds per 1,000 lines of each node and of redis-server
  (utime+stime from /proc).

Users are spread evenly over the nodes (``--users`` in all); the speaker
is user 0 of node 1. A fresh redis-server (no persistence, on a free port) is
started for the run and stopped at the end, as every node is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import common
import yaml
from common import Lines, Server, Servers, Users

sys.path.insert(0, str(common.REPO / "tests"))
from redisproc import REDIS_SERVER, RedisServer  # noqa: E402

from chatd.control.client import ControlError, request  # noqa: E402

LAYOUTS = ("single", "cluster-1", "cluster-2", "cluster-3")


def start_node(servers: Servers, index: int, layout: str, redis: RedisServer | None,
               max_users: int) -> Server:
    """A chatd node; with ``redis``, one node of the room named after the layout."""
    server = Server("chatd", servers.workdir / layout / f"node{index}", max_users)
    servers._servers.append(server)  # stopped on exit, whatever happens
    if redis is not None:
        assert server.config is not None
        settings = yaml.safe_load(server.config.read_text())
        settings["cluster"] = {"redis": redis.url, "room": layout, "node": f"n{index}",
                               "node_timeout": 10}
        server.config.write_text(yaml.safe_dump(settings))
    return server.start()


def control_socket(server: Server) -> str:
    return str(server.workdir / "run" / "control.sock")


def cluster_users(server: Server) -> int:
    """Users in the whole room as this node sees them (its own if it is not clustered)."""
    try:
        status = request(control_socket(server), "status", timeout=5)["result"]
    except (ControlError, KeyError):
        return -1
    cluster = status.get("cluster") or {}
    return int(cluster.get("users_total", status.get("users", -1)))


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def collect(groups: list[Users], first_seq: int, expected: int, timeout: float
            ) -> tuple[list[Lines], bool]:
    """Read chat lines on every listener until ``expected`` arrived in all (or ``timeout``)."""
    sinks = [Lines() for _ in groups]
    deadline = time.monotonic() + timeout
    while True:
        for users, sink in zip(groups, sinks, strict=True):
            users.harvest(first_seq, sink)
        if sum(s.count for s in sinks) >= expected:
            return sinks, True
        if time.monotonic() >= deadline:
            return sinks, False
        time.sleep(0.005)


def run_layout(layout: str, args: argparse.Namespace, redis: RedisServer | None
               ) -> dict[str, Any]:
    nodes = 1 if layout == "single" else int(layout.split("-")[1])
    per_node = max(2, args.users // nodes)
    with Servers() as servers:
        started = [start_node(servers, i + 1, layout, redis, args.users * 2)
                   for i in range(nodes)]
        groups: list[Users] = []
        for i, server in enumerate(started):
            users = Users(per_node, server.addr, prefix=f"n{i + 1}u", rcvbuf=16 * 1024)
            servers.callback(users.close)
            groups.append(users)
            users.login(window=128, timeout=args.timeout)
        total = per_node * nodes
        if redis is not None:
            for server in started:
                wait_until(lambda s=server: cluster_users(s) >= total, args.timeout,
                           "every node to see every user")
        for users in groups:
            users.settle(2 * 1024 * 1024)
        speaker = groups[0]
        listeners = total - nodes  # Users.harvest reads every user but each group's first

        # burst
        first = speaker.seq
        t0 = time.time_ns()
        for _ in range(args.burst):
            speaker.say()
        sinks, complete = collect(groups, first, args.burst * listeners, args.timeout)
        last = max(s.last_arrival for s in sinks)
        delivered = sum(s.count for s in sinks)
        burst = {"deliveries": delivered, "expected": args.burst * listeners,
                 "deliveries_per_s": round(delivered / max(1e-9, (last - t0) / 1e9)),
                 "complete": complete}
        for users in groups:
            users.drain()

        # paced
        cpu_before = [s.cpu_seconds() for s in started]
        redis_before = common.proc_cpu_seconds(redis.proc.pid) if redis and redis.proc else 0.0
        first = speaker.seq
        lines = max(1, int(args.rate * args.duration))
        interval = 1.0 / args.rate
        start = time.monotonic()
        for i in range(lines):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            speaker.say()
        sinks, complete = collect(groups, first, lines * listeners, args.timeout)
        cpu = [s.cpu_seconds() - b for s, b in zip(started, cpu_before, strict=True)]
        redis_cpu = (common.proc_cpu_seconds(redis.proc.pid) - redis_before
                     if redis and redis.proc else None)
        local = common.latency_summary(sinks[0].latencies)
        remote = common.latency_summary([x for s in sinks[1:] for x in s.latencies])
        per_k = 1000 / lines
        return {
            "layout": layout, "nodes": nodes, "users": total,
            "burst_lines": args.burst, **{f"burst_{k}": v for k, v in burst.items()},
            "paced_lines": lines, "paced_complete": complete,
            "local_p50_ms": local["p50_ms"], "local_p99_ms": local["p99_ms"],
            "remote_p50_ms": remote["p50_ms"], "remote_p99_ms": remote["p99_ms"],
            "node_cpu_s_per_1k_lines": [round(c * per_k, 4) for c in cpu],
            "redis_cpu_s_per_1k_lines": (round(redis_cpu * per_k, 4)
                                         if redis_cpu is not None else None),
        }


def print_tables(report: dict[str, Any]) -> None:
    rows = report["results"]
    print(f"# {report['note']}\n")
    print(common.table(
        ["layout", "users", "burst deliveries/s", "complete", "local p50 ms", "local p99 ms",
         "remote p50 ms", "remote p99 ms", "node CPU s/1k lines", "redis CPU s/1k lines"],
        [[r["layout"], r["users"], r["burst_deliveries_per_s"], r["burst_complete"],
          r["local_p50_ms"], r["local_p99_ms"], r["remote_p50_ms"], r["remote_p99_ms"],
          " ".join(f"{c:.3f}" for c in r["node_cpu_s_per_1k_lines"]),
          r["redis_cpu_s_per_1k_lines"]] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS),
                        help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--users", type=int, default=300, help="users in all (300)")
    parser.add_argument("--burst", type=int, default=1000, help="lines in the burst (1000)")
    parser.add_argument("--rate", type=float, default=100.0, help="paced lines/s (100)")
    parser.add_argument("--duration", type=float, default=5.0, help="paced seconds (5)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="tiny and fast: for the smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.burst, args.rate, args.duration = 12, 50, 50.0, 0.5
        args.layouts = ["single", "cluster-2"]
    if REDIS_SERVER is None and any(layout != "single" for layout in args.layouts):
        parser.error("redis-server is not installed (apt-get install redis-server)")
    common.raise_nofile(args.users * 2 + 256)
    results = []
    with Servers() as holder:
        redis = RedisServer(Path(holder.workdir) / "redis")
        holder.callback(redis.stop)
        redis.start()
        for layout in args.layouts:
            common.progress(f"cluster: {layout}, {args.users} users")
            results.append(run_layout(layout, args, None if layout == "single" else redis))
    note = (f"{os.cpu_count()} CPUs: nodes, redis-server and the load share them, so the total "
            "cannot scale with nodes here; compare per-node CPU per line and the remote latency")
    report = common.new_report("cluster", args, note=note, results=results)
    return common.output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
