"""Smoke tests of the benchmark scripts: they run, print JSON of the right shape, leave nothing.

Figures are never asserted: the machine is shared and noisy. What is checked
is that ``--quick --json`` works end to end against real servers, that the
report has the keys the README and ``make bench`` rely on, and that every
server a script started is gone afterwards (each run carries a unique marker
in its environment, which its servers inherit).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import Notifications, free_udp_port

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.timeout(120)


def processes_with(marker: str) -> list[int]:
    found = []
    needle = f"CHATD_BENCH_MARK={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def run_quick(script: str, *extra: str) -> dict:
    marker = uuid.uuid4().hex
    env = {**os.environ, "CHATD_BENCH_MARK": marker}
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", *extra],
                            capture_output=True, text=True, timeout=100, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert processes_with(marker) == [], "a benchmark left a server running"
    return json.loads(result.stdout)


def check_machine(report: dict) -> None:
    assert {"cpus", "cpu_model", "python", "date"} <= set(report["machine"])


def test_fanout_quick_reports_the_servers_side_by_side():
    report = run_quick("fanout.py")
    assert report["benchmark"] == "fanout"
    check_machine(report)
    seen = {(r["mode"], r["server"]) for r in report["results"]}
    assert seen == {(mode, server) for mode in ("saturating", "paced")
                    for server in ("chatd", "baseline", "baseline-mmsg")}
    for result in report["results"]:
        median = result["median"]
        assert {"delivered_fraction", "p50_ms", "p99_ms", "max_ms", "cpu_s"} <= set(median)
        if result["mode"] == "saturating":
            assert {"deliveries_per_s", "deliveries_per_cpu_s"} <= set(median)
        else:
            assert {"offered_deliveries_per_s", "achieved_lines_per_s"} <= set(median)
        assert result["runs"]
    ratio = report["ratios"][0]
    assert (ratio["server"], ratio["reference"]) == ("chatd", "baseline")
    assert {"deliveries_per_s", "deliveries_per_cpu_s"} <= set(ratio)
    assert {(r["server"], r["reference"]) for r in report["ratios"]} == {
        ("chatd", "baseline"), ("baseline-mmsg", "baseline"), ("chatd", "baseline-mmsg")}


def test_fanout_runs_only_the_servers_asked_for():
    report = run_quick("fanout.py", "--servers", "chatd,baseline")
    assert {r["server"] for r in report["results"]} == {"chatd", "baseline"}
    assert [(r["server"], r["reference"]) for r in report["ratios"]] == [("chatd", "baseline")]


def test_an_unknown_server_kind_is_refused():
    result = subprocess.run([sys.executable, str(BENCH / "fanout.py"), "--quick",
                             "--servers", "chatd,chatd-mmsg"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "chatd-mmsg" in result.stderr


def test_scale_quick_reports_logins_memory_fanout_and_chatctl():
    report = run_quick("scale.py")
    assert report["benchmark"] == "scale"
    check_machine(report)
    assert [r["server"] for r in report["results"]] == ["chatd", "baseline"]
    for result in report["results"]:
        assert {"sessions", "logins_per_s", "login_complete", "rss_per_session_bytes",
                "fanout", "chatctl_status_ms", "chatctl_who_ms"} <= set(result)
        assert {"all_received_ms", "delivered_fraction"} <= set(result["fanout"])


def test_logins_quick_reports_the_cost_per_login_at_two_sizes_and_the_memory():
    report = run_quick("logins.py")
    assert report["benchmark"] == "logins"
    check_machine(report)
    assert [r["sources"] for r in report["results"]] == [100, 1000]
    for result in report["results"]:
        median = result["median"]
        assert {"per_login_us", "at_n_us", "p99_us", "max_ms", "plugin_us_per_pair",
                "gc_max_ms", "gc_full", "tracked", "max_tracked_hosts"} <= set(median)
        assert median["logins_ok"] == result["sources"]  # nobody limited: distinct sources
        assert median["tracked"] == result["sources"]
    assert report["ratio"]["sources"] == [100, 1000]
    assert {"per_login", "at_n"} <= set(report["ratio"])
    memory = {m["family"]: m for m in report["memory"]}
    assert set(memory) == {"ipv4", "ipv6"}
    assert all(m["tracked"] == m["sources"] and m["bytes_per_host"] > 0
               for m in memory.values())


def test_hooks_quick_reports_the_cost_of_a_line_per_plugin_set():
    report = run_quick("hooks.py")
    assert report["benchmark"] == "hooks"
    check_machine(report)
    results = {r["plugins"]: r for r in report["results"]}
    assert set(results) == {"none", "default", "busy"}
    assert results["none"]["enabled"] == []
    assert "ratelimit" in results["default"]["enabled"]
    assert {"wordfilter", "history"} <= set(results["busy"]["enabled"])
    assert all(r["hooks_ns_per_line"] > 0 and r["line_ns"] > 0 for r in results.values())
    assert report["pluggy_call_ns"] > 0


def test_the_baseline_server_speaks_the_protocol_subset():
    """What fanout measures it by: L -> OK, C -> the line to every other user, Q -> EXIT."""
    notify = Notifications()
    port = free_udp_port()
    command = [sys.executable, str(BENCH / "baseline_server.py"), "--port", str(port)]
    proc = subprocess.Popen(command, env={**os.environ, "NOTIFY_SOCKET": notify.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    users = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        notify.wait("READY", "1")
        server = ("127.0.0.1", port)
        for index, user in enumerate(users):
            user.settimeout(5)
            user.sendto(f"L u{index}".encode(), server)
            assert user.recv(1024) == b"OK"
        users[0].sendto(b"C u0 hello there", server)
        assert [u.recv(1024) for u in users[1:]] == [b"\nu0 says: hello there"] * 2
        users[2].sendto(b"Q u2", server)
        assert users[2].recv(1024) == b"EXIT"
        users[0].sendto(b"L u0", server)  # the barrier the benchmarks use: OK again, no line
        assert users[0].recv(1024) == b"OK"
        users[1].sendto(b"C u1 bye", server)
        assert users[0].recv(1024) == b"\nu1 says: bye"
        users[2].setblocking(False)
        with pytest.raises(BlockingIOError):
            users[2].recv(1024)
    finally:
        for user in users:
            user.close()
        proc.kill()
        proc.communicate(timeout=10)
        notify.close()


def test_handover_quick_reports_the_longest_pause_and_loses_nothing():
    report = run_quick("handover.py")
    assert report["benchmark"] == "handover"
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["in_order"]
    assert len(report["restarts"]) == 1
    assert report["restarts"][0]["longest_gap_ms"] > 0
    assert report["restarts"][0]["daemon_pause_ms"] is not None


def test_cluster_quick_compares_a_single_node_with_two_nodes_on_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test-deps.sh installs it)")
    report = run_quick("cluster.py")
    assert report["benchmark"] == "cluster"
    by_layout = {r["layout"]: r for r in report["results"]}
    assert set(by_layout) == {"single", "cluster-2"}
    for result in by_layout.values():
        assert result["burst_complete"] and result["paced_complete"]
        assert result["burst_deliveries"] == result["burst_expected"]
    assert by_layout["single"]["remote_p50_ms"] is None
    assert by_layout["cluster-2"]["remote_p50_ms"] > 0
    assert by_layout["cluster-2"]["redis_cpu_s_per_1k_lines"] is not None
