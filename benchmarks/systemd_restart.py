"""The longest pause in delivery during ``systemctl restart chatd``, under a real systemd.

It boots the tests' sandbox (``tests/sandbox.py``: the machine's own systemd
as PID 1 of fresh namespaces, on a throw-away overlay of ``/``), installs
chatd inside with ``make install`` as ``tests/test_systemd_real.py`` does,
then restarts ``chatd.service`` ``--restarts`` times while bob says a
numbered line every 20 ms to alice (both UDP users inside the sandbox's
network). Per restart: the longest gap between two lines alice received,
lines lost, doubled or out of order, how long ``systemctl restart`` took, and
chatd's own figure (``pause_ms`` of ``handover_done``: from the old process's
capture to the new one's restore). Then the same with ``chatd.socket``.

Where the pause goes: systemd stops before it starts, so the next process's
start-up (``ExecStartPre=chatd check-config``, then ``chatd run``: two Python
start-ups) is inside the pause; the old process's part (stop reading,
capture, memfd, FDSTORE, barrier) is milliseconds. Nothing is lost: the
socket stays open in the fd store (or in chatd.socket) and the datagrams wait
in it. Needs root with CAP_SYS_ADMIN (the sandbox); ~60 s.

    sudo .venv/bin/python benchmarks/systemd_restart.py [--restarts 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import new_report, output, progress, table
from helpers import UdpUser, wait_for
from sandbox import unavailable
from test_systemd_real import (
    PORT,
    UNITS,
    Conversation,
    Machine,
    inner_python,
    install_inside,
    message,
)

INTERVAL = 0.02


def boot(workdir: Path) -> Machine:
    """The tests' sandbox with chatd installed by ``make install``; shut down on failure."""
    python = inner_python()
    if python is None:
        raise SystemExit("no system python3 with venv and ensurepip (python3-venv)")
    (workdir / "wheels").mkdir()
    (workdir / "sandbox").mkdir()
    machine = Machine(workdir / "sandbox")
    try:
        installed = install_inside(machine, workdir / "wheels", python)
    except BaseException:
        machine.shutdown()
        raise
    if installed.returncode != 0:
        machine.shutdown()
        raise SystemExit(f"make install failed inside:\n{installed.stdout}{installed.stderr}")
    return machine


def handover_pauses(machine: Machine, since: float) -> list[float]:
    out = machine.run("journalctl", "--no-pager", "-o", "json", "-u", "chatd.service",
                      f"--since=@{since:.0f}").stdout
    pauses = []
    for line in out.splitlines():
        entry = json.loads(line)
        text = message(entry)
        if '"handover_done"' in text:
            pauses.append(float(json.loads(text).get("pause_ms", "nan")))
    return pauses


def one_restart(machine: Machine, alice: UdpUser, bob: UdpUser) -> dict[str, Any]:
    with Conversation(bob, alice, INTERVAL) as talk:
        wait_for(lambda: len(talk.lines()) >= 10, timeout=30, what="the conversation going")
        before = machine.show("chatd.service", "MainPID")["MainPID"]
        # each restart is a start: StartLimitBurst=5 in 60 s would refuse the sixth
        machine.run("systemctl", "reset-failed", "chatd.service", check=True)
        began = time.monotonic()
        machine.run("systemctl", "restart", "chatd.service", check=True)
        took = time.monotonic() - began
        # talk on for a second after the new process serves
        wait_for(lambda: time.monotonic() - began > took + 1.0, timeout=30, interval=0.05)
        talk.finish()
    after = machine.show("chatd.service", "MainPID")["MainPID"]
    lines = talk.lines()
    others = [data for _, data in talk.heard if not data.startswith(b"\nbob says: line ")]
    return {
        "lines": talk.sent,
        "lost": len(set(range(talk.sent)) - set(lines)),
        "doubled": len(lines) - len(set(lines)),
        "in_order": lines == sorted(lines),
        "other_datagrams": len(others),
        "pid_changed": after not in ("0", before),
        "longest_pause_ms": round(talk.longest_pause() * 1000, 1),
        "systemctl_restart_s": round(took, 3),
    }


def measure(machine: Machine, start_unit: str, restarts: int) -> dict[str, Any]:
    machine.run("systemctl", "start", start_unit, check=True)
    alice = machine.in_network(lambda: UdpUser(("127.0.0.1", PORT), "alice"))
    bob = machine.in_network(lambda: UdpUser(("127.0.0.1", PORT), "bob"))
    try:
        for user in (alice, bob):
            user.send(f"L {user.name}")
            assert user.recv(30) == b"OK"
        alice.drain(0.2)
        since = time.time() - 1
        runs = []
        for number in range(restarts):
            run = one_restart(machine, alice, bob)
            progress(f"{start_unit} restart {number + 1}: longest pause "
                     f"{run['longest_pause_ms']:.0f} ms, {run['lost']} lost")
            runs.append(run)
        pauses = handover_pauses(machine, since)
        for run, pause in zip(runs, pauses, strict=False):
            run["chatd_pause_ms"] = pause
        longest = [run["longest_pause_ms"] for run in runs]
        return {
            "unit": start_unit,
            "runs": runs,
            "median_longest_pause_ms": round(statistics.median(longest), 1),
            "max_longest_pause_ms": max(longest),
            "lost": sum(run["lost"] for run in runs),
            "doubled": sum(run["doubled"] for run in runs),
            "all_in_order": all(run["in_order"] for run in runs),
            "other_datagrams": sum(run["other_datagrams"] for run in runs),
        }
    finally:
        alice.close()
        bob.close()
        machine.run("systemctl", "stop", *UNITS)


def print_tables(report: dict[str, Any]) -> None:
    print(f"systemctl restart chatd under systemd "
          f"({report['machine'].get('cpus', '?')} CPUs), a line every {INTERVAL * 1000:.0f} ms")
    rows = []
    for result in report["results"]:
        for number, run in enumerate(result["runs"], 1):
            rows.append((result["unit"], number, run["longest_pause_ms"],
                         run.get("chatd_pause_ms"), run["systemctl_restart_s"], run["lines"],
                         run["lost"], run["doubled"], run["other_datagrams"]))
    print(table(("unit started", "#", "longest pause ms", "chatd pause ms",
                 "systemctl s", "lines", "lost", "doubled", "other"), rows))
    for result in report["results"]:
        print(f"{result['unit']}: median longest pause {result['median_longest_pause_ms']} ms, "
              f"max {result['max_longest_pause_ms']} ms; lost {result['lost']}, "
              f"doubled {result['doubled']}, in order: {result['all_in_order']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=5, help="restarts per unit (default 5)")
    parser.add_argument("--quick", action="store_true", help="one restart per unit")
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = parser.parse_args()
    reason = unavailable()
    if reason is not None:
        print(f"systemd_restart.py: {reason}", file=sys.stderr)
        return 1
    restarts = 1 if args.quick else args.restarts
    with tempfile.TemporaryDirectory(prefix="chatd-bench-systemd-") as tmp:
        progress("booting the sandbox and installing chatd (~30 s)")
        machine = boot(Path(tmp))
        try:
            results = [measure(machine, unit, restarts)
                       for unit in ("chatd.service", "chatd.socket")]
        finally:
            machine.shutdown()
    report = new_report("systemd_restart", args, results=results)
    return output(report, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
