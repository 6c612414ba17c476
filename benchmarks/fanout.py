"""Fan-out: one user speaks, N-1 listen; chatd against the tightest Python server.

The servers (``--servers``): chatd; the baseline, a plain ``sendto`` loop, which
the targets are measured against; and, for information, the same baseline
fanning out with ``sendmmsg`` as chatd does (``baseline-mmsg``).

For each room size N, every server kind is started once on 127.0.0.1 and
gets its own N users (one UDP socket each, all in this one process). Then
runs alternate between the servers (A B C A B C ..., ``--rounds``
times) and the median of each figure is reported, because a shared two-core
machine is noisy and alternation spreads the noise over all of them.

* saturating: lines are sent as fast as possible in bounded windows: W lines
  (about ``--window`` deliveries), then a barrier (user 0 logs in again; the
  ``OK`` comes once the server has sent everything before it), then the load
  process reads what arrived. deliveries/s counts the time from a window's
  first send to that ``OK``: the server's time alone, with a core to itself
  (the load process sleeps meanwhile). Whatever did not arrive by then was
  lost, and shows in the delivered fraction.
* paced: a fixed offered rate (by default half of chatd's own saturation
  rate at that N), lines sent on schedule for ``--duration`` s; receive
  buffers hold the whole run, which is read after a final barrier. This is
  the latency test.

Latency is the kernel's receive timestamp minus the send time written in the
line, so reading late does not distort it. Server CPU is utime+stime from
/proc/PID/stat; deliveries per CPU second is the server's efficiency, the
figure least disturbed by a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import common
from common import Lines, Server, Servers, Users

LOGIN_WINDOW = 256
LOGIN_RCVBUF = 16 * 1024  # small while logging in: join notices are dropped by the kernel
RUN_RCVBUF = 2 * 1024 * 1024  # then room for a whole window or paced run per listener
#: chatd against the plain sendto-loop baseline (the targets), and the baseline fanning out
#: with sendmmsg, as chatd does: how much of chatd's lead is batching, how much is left.
DEFAULT_SERVERS = ("chatd", "baseline", "baseline-mmsg")


def saturating(server: Server, users: Users, deliveries: int, window_deliveries: int,
               timeout: float) -> dict[str, Any]:
    """Send ``deliveries`` worth of lines in bounded windows; figures for this one run.

    A window is W lines sent back to back, then a barrier (user 0 logs in
    again and waits for its ``OK``, which the server sends only after the
    window's deliveries); only then does the load process read what arrived.
    So during a window the server has a core to itself and the time from the
    first send to the ``OK`` is the server's alone.
    """
    per_line = users.n - 1
    lines = max(1, deliveries // per_line)
    window = max(1, min(256, window_deliveries // per_line))
    sink = Lines()
    busy_ns = 0
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    sent = 0
    while sent < lines:
        count = min(window, lines - sent)
        first = users.seq
        started = time.time_ns()
        for _ in range(count):
            users.say()
        sent += count
        busy_ns += users.barrier(timeout) - started
        users.harvest(first, sink)
    cpu = server.cpu_seconds() - cpu0
    expected = lines * per_line
    return {
        "lines": lines,
        "window": window,
        "expected": expected,
        "delivered": sink.count,
        "delivered_fraction": round(sink.count / expected, 6),
        "deliveries_per_s": round(sink.count / (busy_ns / 1e9), 1) if busy_ns > 0 else 0.0,
        **common.latency_summary(sink.latencies),
        "wall_s": round(time.monotonic() - wall0, 3),
        "cpu_s": round(cpu, 3),
        "deliveries_per_cpu_s": round(sink.count / cpu, 1) if cpu > 0 else None,
    }


def paced(server: Server, users: Users, rate: float, duration: float,
          timeout: float) -> dict[str, Any]:
    """Offer ``rate`` lines/s for ``duration`` s; read everything once the server is done.

    Nothing is read while lines are offered: the receive buffers are sized
    to hold the whole run and latency comes from kernel timestamps, so the
    load process sleeps between sends instead of competing with the server
    for the two cores (remote clients would not compete either).
    """
    per_line = users.n - 1
    lines = max(1, min(round(rate * duration), users.capacity()))
    interval = 1.0 / rate
    expected = lines * per_line
    sink = Lines()
    first = users.seq
    cpu0 = server.cpu_seconds()
    started = time.monotonic()
    for i in range(lines):
        delay = started + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        users.say()
    send_s = time.monotonic() - started
    users.barrier(timeout)
    busy_s = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu0
    users.harvest(first, sink)
    return {
        "lines": lines,
        "offered_lines_per_s": round(rate, 1),
        "offered_deliveries_per_s": round(rate * per_line, 1),
        "achieved_lines_per_s": round(lines / send_s, 1) if send_s > 0 else None,
        "expected": expected,
        "delivered": sink.count,
        "delivered_fraction": round(sink.count / expected, 6),
        **common.latency_summary(sink.latencies),
        "cpu_s": round(cpu, 3),
        "cpu_fraction": round(cpu / busy_s, 3),
    }


def run_size(n: int, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    """Every measurement at room size ``n``: servers started once, runs interleaved."""
    results: list[dict[str, Any]] = []
    with Servers() as servers:
        groups: dict[str, tuple[Server, Users]] = {}
        for kind in args.servers:
            server = servers.start(kind, max_users=n + 10)
            users = Users(n, server.addr, prefix="u", rcvbuf=LOGIN_RCVBUF)
            servers.callback(users.close)
            logged, _, seconds = users.login(LOGIN_WINDOW, timeout=args.login_timeout)
            if logged < n:
                raise RuntimeError(f"{kind}: only {logged} of {n} users logged in "
                                   f"within {args.login_timeout} s")
            users.settle(rcvbuf=RUN_RCVBUF)
            log(f"  {kind}: {n} users logged in in {seconds:.2f} s")
            groups[kind] = (server, users)

        saturated: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.servers}
        for round_ in range(args.rounds):
            for kind, (server, users) in groups.items():
                run = saturating(server, users, args.deliveries, args.window, args.timeout)
                saturated[kind].append(run)
                log(f"  saturating round {round_ + 1} {kind}: "
                    f"{run['deliveries_per_s']:,.0f} deliveries/s")
        for kind, runs in saturated.items():
            results.append({"n": n, "mode": "saturating", "server": kind,
                            "median": common.median_of(runs), "runs": runs})

        if args.paced_fraction > 0:
            reference = "chatd" if "chatd" in saturated else args.servers[0]
            sat = common.median_of(saturated[reference])["deliveries_per_s"]
            rate = args.paced_rate or sat * args.paced_fraction
            lines_per_s = max(1.0, rate / (n - 1))
            paced_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.servers}
            for round_ in range(args.rounds):
                for kind, (server, users) in groups.items():
                    run = paced(server, users, lines_per_s, args.duration, args.timeout)
                    paced_runs[kind].append(run)
                    log(f"  paced round {round_ + 1} {kind}: p99 {run['p99_ms']} ms, "
                        f"fraction {run['delivered_fraction']}")
            for kind, runs in paced_runs.items():
                results.append({"n": n, "mode": "paced", "server": kind,
                                "rate_basis": f"{args.paced_fraction} x {reference} saturation"
                                if not args.paced_rate else "--paced-rate",
                                "median": common.median_of(runs), "runs": runs})
    return results


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saturating figures of each server against the baseline (the targets), and of chatd
    against the batched baseline too where it ran (for information)."""
    by_key = {(r["n"], r["server"]): r["median"] for r in results if r["mode"] == "saturating"}
    pairs = [(server, "baseline") for server in ("chatd", "baseline-mmsg")]
    pairs.append(("chatd", "baseline-mmsg"))
    out = []
    for n in dict.fromkeys(n for n, _ in by_key):
        for server, reference in pairs:
            a, b = by_key.get((n, server)), by_key.get((n, reference))
            if a is None or b is None:
                continue
            row = {"n": n, "mode": "saturating", "server": server, "reference": reference}
            for metric in ("deliveries_per_s", "deliveries_per_cpu_s"):
                x, y = a.get(metric), b.get(metric)
                row[metric] = round(x / y, 3) if x and y else None
            out.append(row)
    return out


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"fan-out benchmark - {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, "
          f"{m['date']}; medians of {report['params']['rounds']} interleaved rounds")
    for n in report["params"]["sizes"]:
        rows = []
        for r in report["results"]:
            if r["n"] != n:
                continue
            md = r["median"]
            mode = r["mode"] if r["mode"] == "saturating" else (
                f"paced {md['offered_lines_per_s']:g}/s")
            rate = md.get("deliveries_per_s") or md.get("offered_deliveries_per_s")
            rows.append([mode, r["server"], rate, md["delivered_fraction"], md["p50_ms"],
                         md["p99_ms"], md["max_ms"], md["cpu_s"],
                         md.get("deliveries_per_cpu_s"), md.get("cpu_fraction")])
        print(f"\nN = {n} users ({n - 1} deliveries per line)")
        print(common.table(["mode", "server", "deliveries/s", "delivered", "p50 ms", "p99 ms",
                            "max ms", "cpu s", "per cpu-s", "cpu share"], rows))
    if report["ratios"]:
        print("\nsaturating ratios (chatd / baseline: >= 0.8 is the target, >= 1.0 the stretch;"
              " the rest for information)")
        print(common.table(["N", "server", "against", "deliveries/s ratio", "per-cpu-s ratio"],
                           [[r["n"], r["server"], r["reference"], r["deliveries_per_s"],
                             r["deliveries_per_cpu_s"]] for r in report["ratios"]]))
    print("\n(paced rows: 'deliveries/s' is the offered rate; 'cpu share' is the server's CPU "
          "time over the run's wall time)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[100, 1000], help="room sizes N, comma-separated (100,1000)")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(DEFAULT_SERVERS),
                        help=f"comma-separated, of: {', '.join(common.SERVER_KINDS)} "
                             f"(default {','.join(DEFAULT_SERVERS)})")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--deliveries", type=int, default=150_000,
                        help="deliveries per saturating run (150000)")
    parser.add_argument("--window", type=int, default=20_000,
                        help="deliveries per saturating window, at most 256 lines (20000)")
    parser.add_argument("--paced-fraction", type=float, default=0.5,
                        help="paced rate as a fraction of chatd's saturation rate (0.5; 0 skips)")
    parser.add_argument("--paced-rate", type=float, default=None, metavar="DELIVERIES_PER_S",
                        help="a fixed paced rate instead")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per paced run (1.5)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a server may take to finish a window or run (60)")
    parser.add_argument("--login-timeout", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="tiny and fast: for the smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.deliveries, args.duration = [20], 1, 2_000, 0.2
    for kind in args.servers:
        if kind not in common.SERVER_KINDS:
            parser.error(f"unknown server {kind!r}")
    if min(args.sizes) < 2 or args.rounds < 1:
        parser.error("sizes must be >= 2 and rounds >= 1")
    common.raise_nofile(sum(args.sizes) * len(args.servers) + 256)

    log = common.progress

    report = common.new_report("fanout", args, results=[])
    for n in args.sizes:
        log(f"N = {n}")
        report["results"] += run_size(n, args, log)
    report["ratios"] = ratios(report["results"])
    return common.output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
