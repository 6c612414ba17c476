"""Scale: 10,000 sessions in one room (logins, memory per session, one line to all).

For each server (chatd, and the baseline for reference) on 127.0.0.1:

* login throughput: N users (one UDP socket each, all in this process) log
  in, 256 in flight at a time; logins/s is the count over the time from the
  first ``L`` to the last ``OK``. The login phase is bounded
  (``--login-timeout``): what got in by then is reported, never waited out.
* memory: the server's VmRSS (/proc/PID/status) before and after the logins,
  divided by the number of sessions.
* fan-out: one chat line to everyone, ``--fanout-repeats`` times: the time
  until the last user received it (kernel receive timestamp minus the send
  time in the line) and the fraction that arrived; the load process reads
  only after the server has answered a barrier (bounded by
  ``--fanout-timeout``), so that it does not compete for the CPUs.
* ``chatctl status --json`` and ``chatctl who`` wall time (interpreter start-up
  included) against the full room, for chatd, if this chatd has a working
  ``chatctl``; "n/a" otherwise.

10,000 sockets need RLIMIT_NOFILE above 10,000: the soft limit is raised up
to the hard limit, and N is lowered (and the report says so) if that is not
enough.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import Lines, Server, Servers, Users

LOGIN_WINDOW = 256
LOGIN_RCVBUF = 4096  # the kernel doubles it; join notices beyond a few are dropped, not read
LISTEN_RCVBUF = 1 << 16
FD_MARGIN = 256


def chatctl_latency(server: Server, repeats: int) -> dict[str, Any]:
    """Median wall time of ``chatctl status --json`` and ``who``; None where it does not work."""
    script = Path(sys.executable).with_name("chatctl")
    out: dict[str, Any] = {"chatctl_status_ms": None, "chatctl_who_ms": None, "chatctl_note": ""}
    if not script.exists() or server.config is None:
        out["chatctl_note"] = "no chatctl in this environment"
        return out
    base = [str(script), "-c", str(server.config)]
    for key, variants in (("chatctl_status_ms", [["status", "--json"]]),
                          ("chatctl_who_ms", [["who", "--json"], ["who"]])):
        for args in variants:
            times = []
            for _ in range(repeats):
                started = time.monotonic()
                try:
                    result = subprocess.run(base + args, capture_output=True, timeout=30,
                                            cwd=common.REPO)
                except subprocess.TimeoutExpired:
                    break
                if result.returncode != 0:
                    out["chatctl_note"] = (f"chatctl {' '.join(args)}: exit {result.returncode}: "
                                           + result.stderr.decode(errors="replace")[-200:].strip())
                    break
                times.append(time.monotonic() - started)
            if len(times) == repeats:
                out[key] = round(statistics.median(times) * 1000, 1)
                break
    return out


def fanout_once(users: Users, receivers: int, timeout: float) -> dict[str, Any]:
    """One line to everyone; read only once the server is done (the barrier), as in fanout.py,
    so that the load process does not compete with the server for the CPUs meanwhile."""
    sink = Lines()
    first = users.seq
    sent_ns = time.time_ns()
    users.say()
    users.barrier(timeout)
    users.harvest(first, sink)
    return {
        "expected": receivers,
        "delivered": sink.count,
        "delivered_fraction": round(sink.count / receivers, 6) if receivers else None,
        "all_received_ms": round((sink.last_arrival - sent_ns) / 1e6, 3)
        if sink.count == receivers and sink.count else None,
        **common.latency_summary(sink.latencies),
    }


def run_server(kind: str, n: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with Servers() as servers:
        server = servers.start(kind, max_users=n + 10)
        users = Users(n, server.addr, prefix="s", rcvbuf=LOGIN_RCVBUF)
        servers.callback(users.close)
        rss_before = server.rss_bytes()
        cpu_before = server.cpu_seconds()
        in_time, logged, seconds = users.login(LOGIN_WINDOW, args.login_timeout)
        login_cpu = server.cpu_seconds() - cpu_before
        users.settle(LISTEN_RCVBUF)
        rss_after = server.rss_bytes()
        log(f"  {kind}: {in_time} of {n} logged in within {seconds:.2f} s"
            + (f" ({logged} once the server caught up)" if logged != in_time else ""))
        result: dict[str, Any] = {
            "server": kind,
            "sessions_wanted": n,
            "sessions": logged,
            "logins_in_time": in_time,
            "login_s": round(seconds, 3),
            "logins_per_s": round(in_time / seconds, 1) if seconds > 0 else None,
            "login_complete": in_time == n,
            "login_cpu_s": round(login_cpu, 3),
            "rss_before_kib": rss_before // 1024,
            "rss_after_kib": rss_after // 1024,
            "rss_per_session_bytes": round((rss_after - rss_before) / logged, 1)
            if logged else None,
        }
        runs = [fanout_once(users, logged - 1, args.fanout_timeout)
                for _ in range(args.fanout_repeats)]
        result["fanout"] = common.median_of(runs)
        result["fanout_runs"] = runs
        log(f"  {kind}: one line to {logged - 1}: {result['fanout']['all_received_ms']} ms")
        if kind == "chatd":
            result.update(chatctl_latency(server, args.chatctl_repeats))
        else:
            result.update({"chatctl_status_ms": None, "chatctl_who_ms": None,
                           "chatctl_note": "not chatd"})
    return result


def print_tables(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"scale benchmark - {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, "
          f"{m['date']}")
    if report["note"]:
        print(f"note: {report['note']}")
    rows = []
    for r in report["results"]:
        f = r["fanout"]
        rows.append([r["server"], f"{r['logins_in_time']}/{r['sessions_wanted']}", r["login_s"],
                     r["logins_per_s"], r["rss_per_session_bytes"], f["all_received_ms"],
                     f["delivered_fraction"], r["chatctl_status_ms"], r["chatctl_who_ms"]])
    print(common.table(["server", "logged in", "login s", "logins/s", "RSS B/session",
                        "fan-out ms", "delivered", "status ms", "who ms"], rows))
    for r in report["results"]:
        if r.get("chatctl_note"):
            print(f"{r['server']}: {r['chatctl_note']}")
    print("targets: <= 2048 B/session, 10,000 logins in <= 2 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--sessions", type=int, default=10_000, help="sessions (10000)")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=["chatd", "baseline"],
                        help=f"comma-separated, of: {', '.join(common.SERVER_KINDS)}")
    parser.add_argument("--login-timeout", type=float, default=30.0,
                        help="seconds allowed for the logins (30)")
    parser.add_argument("--fanout-repeats", type=int, default=3)
    parser.add_argument("--fanout-timeout", type=float, default=60.0,
                        help="seconds the server may take to send one line to everyone (60)")
    parser.add_argument("--chatctl-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny and fast: for the smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.login_timeout, args.fanout_repeats = 200, 10.0, 1
        args.chatctl_repeats = 1
    for kind in args.servers:
        if kind not in common.SERVER_KINDS:
            parser.error(f"unknown server {kind!r}")
    if args.sessions < 2:
        parser.error("at least 2 sessions")

    log = common.progress

    note = ""
    limit = common.raise_nofile(args.sessions + FD_MARGIN)
    n = args.sessions
    if limit < n + FD_MARGIN:
        n = max(2, limit - FD_MARGIN)
        note = (f"RLIMIT_NOFILE allows {limit} descriptors: {n} sessions instead of "
                f"{args.sessions}")
        log(note)
    report = common.new_report("scale", args, note=note, results=[])
    report["params"]["sessions_used"] = n
    for kind in args.servers:
        report["results"].append(run_server(kind, n, args, log))
    return common.output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
