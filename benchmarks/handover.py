"""The pause users see during ``chatd restart``: the longest gap in delivery at a receiver.

One ``chatd start`` daemon (the classic daemon: a restart is a handover), with
``--sessions`` users logged in (the state handed over grows with them). User
``alice`` says a numbered line every ``--interval`` ms; ``bob`` receives,
timestamping each datagram as it arrives (a thread that does nothing else).
Then ``chatd restart`` runs ``--restarts`` times. For each, reported: the
longest gap between two consecutive lines at bob from the moment the restart
began to 0.5 s after it returned (the room's pause, plus the send interval and
the scheduler's noise), what the daemon itself logged as its pause
(``handover_done`` ``ms``: stop reading -> the new process said ``ready``),
and every line checked: lost, duplicated, out of order. The figures are the
median and the max over the restarts. Goal: longest gap under 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import HOST, chatd_config, free_udp_port, machine_info, raise_nofile

CHATD = [sys.executable, "-m", "chatd"]


class Receiver(threading.Thread):
    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.lines: list[tuple[float, int]] = []  # (arrival, number)
        self.done = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.05)
        while not self.done.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            at = time.monotonic()
            text = data.decode(errors="replace")
            if " says: n" in text:
                self.lines.append((at, int(text.rsplit("n", 1)[1])))


class Sender(threading.Thread):
    def __init__(self, sock: socket.socket, addr: tuple[str, int], interval: float):
        super().__init__(daemon=True)
        self.sock, self.addr, self.interval = sock, addr, interval
        self.sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.done.is_set():
            self.sock.sendto(f"C alice n{self.sent}".encode(), self.addr)
            self.sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def login(addr: tuple[str, int], name: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(5)
    sock.sendto(f"L {name}".encode(), addr)
    answer = sock.recv(2048)
    if answer != b"OK":
        raise SystemExit(f"login of {name} refused: {answer!r}")
    return sock


def chatd(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CHATD, *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def handover_logs(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines() if log.exists() else []:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "handover_done":
                events.append(event)
    return events


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(args.sessions + 64)
    workdir = Path(tempfile.mkdtemp(prefix="chatd-bench-handover-"))
    port = free_udp_port()
    config = chatd_config(workdir, port, args.sessions + 2)
    text = config.read_text().replace("level: warning", "level: info")
    config.write_text(text)
    addr = (HOST, port)
    started = chatd(config, "start")
    if started.returncode != 0:
        raise SystemExit(f"chatd start failed: {started.stderr}")
    pids: set[int] = set()
    crowd: list[socket.socket] = []
    try:
        pids.add(int((workdir / "run" / "chatd.pid").read_text()))
        for i in range(args.sessions):
            crowd.append(login(addr, f"u{i}"))
        for sock in crowd:  # nobody reads them: small buffers, so they cost nothing
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        alice, bob = login(addr, "alice"), login(addr, "bob")
        bob.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        receiver, sender = Receiver(bob), Sender(alice, addr, args.interval / 1000)
        receiver.start()
        sender.start()
        time.sleep(0.5)
        windows = []
        for n in range(args.restarts):
            began = time.monotonic()
            result = chatd(config, "restart")
            ended = time.monotonic()
            if result.returncode != 0:
                raise SystemExit(f"chatd restart failed: {result.stderr}")
            pids.add(int((workdir / "run" / "chatd.pid").read_text()))
            print(f"restart {n + 1}: {result.stdout.strip()}", file=sys.stderr)
            windows.append((began, ended))
            time.sleep(0.5 + args.settle)
        sender.done.set()
        sender.join()
        deadline = time.monotonic() + 10
        while (not receiver.lines or receiver.lines[-1][1] < sender.sent - 1) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        receiver.done.set()
        receiver.join()
        numbers = [number for _, number in receiver.lines]
        restarts = []
        for began, ended in windows:
            during = [at for at, _ in receiver.lines if began <= at <= ended + 0.5]
            gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
            restarts.append({"longest_gap_ms": round(max(gaps, default=0.0) * 1000, 1),
                             "restart_command_s": round(ended - began, 2)})
        for restart, event in zip(restarts, handover_logs(workdir / "chatd.log"), strict=False):
            restart["daemon_pause_ms"] = event.get("ms")
            restart["state_bytes"] = event.get("bytes")
            restart["sessions"] = event.get("sessions")
        gaps = [r["longest_gap_ms"] for r in restarts]
        pauses = [r["daemon_pause_ms"] for r in restarts if r.get("daemon_pause_ms") is not None]
        return {
            "benchmark": "handover",
            "machine": machine_info(),
            "sessions": args.sessions + 2,
            "interval_ms": args.interval,
            "lines_sent": sender.sent,
            "lines_received": len(numbers),
            "lost": sender.sent - len(set(numbers)),
            "duplicated": len(numbers) - len(set(numbers)),
            "in_order": numbers == sorted(numbers),
            "restarts": restarts,
            "median": {"longest_gap_ms": statistics.median(gaps),
                       "daemon_pause_ms": statistics.median(pauses) if pauses else None},
            "max": {"longest_gap_ms": max(gaps),
                    "daemon_pause_ms": max(pauses) if pauses else None},
        }
    finally:
        for sock in crowd:
            sock.close()
        stopped = chatd(config, "stop", "--kill", "--timeout", "5")
        if stopped.returncode != 0:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100,
                        help="users logged in besides alice and bob (default 100; each "
                        "line goes to all of them: 1000 at 2 ms is 500,000 deliveries/s, "
                        "more than chatd sends)")
    parser.add_argument("--restarts", type=int, default=5, help="restarts (default 5)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="ms between alice's lines (default 2)")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="extra seconds between restarts (default 0.5)")
    parser.add_argument("--quick", action="store_true", help="10 sessions, 1 restart")
    parser.add_argument("--json", action="store_true", help="the full report as JSON")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.restarts, args.settle = 10, 1, 0.0
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"chatd restart with {report['sessions']} sessions, a line every "
          f"{report['interval_ms']:g} ms, {len(report['restarts'])} restarts")
    for n, r in enumerate(report["restarts"], 1):
        print(f"  restart {n}: longest gap at a receiver {r['longest_gap_ms']} ms, "
              f"daemon's pause {r.get('daemon_pause_ms')} ms, state {r.get('state_bytes')} "
              f"bytes, command {r['restart_command_s']} s")
    print(f"longest gap: median {report['median']['longest_gap_ms']} ms, "
          f"max {report['max']['longest_gap_ms']} ms (goal < 100 ms)")
    print(f"lines: {report['lines_sent']} sent, {report['lost']} lost, "
          f"{report['duplicated']} duplicated, in order: {report['in_order']}")


if __name__ == "__main__":
    main()
