"""What the benchmarks share: servers in subprocesses, a many-socket load generator, stats.

Why it is built this way:

* Servers are real processes started the way an operator would (``chatd run -c
  FILE``), ready when they say ``READY=1`` on a ``NOTIFY_SOCKET`` (the
  baseline speaks the same protocol): nothing waits by sleeping. Ports and
  the notify socket come from the tests' helpers (``tests/helpers.py``): a
  port below the kernel's ephemeral range, which no other socket can be
  handed meanwhile.
* Every server runs in its own session, is stopped by PID (SIGTERM, then
  SIGKILL to its process group) in ``finally`` blocks and is always reaped.
* Latency is the kernel's receive timestamp (``SO_TIMESTAMPNS``) minus the send
  time written into the chat text. So the load process can read everything
  *after* the server is done (it asks a barrier: user 0 logs in again, and the
  ``OK`` comes after all earlier deliveries), instead of competing with the
  server for the two cores while it works, and the figures are still exact.
* Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

import chatd
from chatd.formats import iso_time

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HOST = "127.0.0.1"

sys.path.insert(0, str(REPO / "tests"))  # one home for port picking and notify listening
from helpers import Notifications, free_udp_port  # noqa: E402

#: Linux (generic and x86) values; the socket module does not export them.
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
_ANC_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")

#: Seconds before an unanswered login is sent again. Loopback hardly loses anything, but a
#: server busy with a backlog answers late: retrying early would only add work.
LOGIN_RETRY = 10.0

#: chatd itself; the baseline (a plain ``sendto`` loop, what the targets are measured
#: against); the baseline fanning out with chatd's own ``sendmmsg`` sender (for information).
SERVER_KINDS = ("chatd", "baseline", "baseline-mmsg")


# -- the machine -------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare figures across machines."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": iso_time(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (10 ms resolution)."""
    data = Path(f"/proc/{pid}/stat").read_text()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- servers -----------------------------------------------------------------------


def chatd_config(workdir: Path, port: int, max_users: int) -> Path:
    """A config for benchmarking: loopback, quiet logs, room big enough, no rate limit.

    Only what would stop the benchmark itself is changed: every simulated user is
    on 127.0.0.1 (``max_sessions_per_ip: 0``, no limit) and speaks as fast as it
    can (no ``ratelimit`` plugin). Everything else, ``room.announce_limit``
    included, is chatd's default.
    """
    settings: dict[str, Any] = {
        "listen": {"host": HOST, "port": port},
        "runtime_dir": str(workdir / "run"),
        "log": {"level": "warning", "format": "json", "file": str(workdir / "chatd.log")},
        "room": {"max_users": max(max_users, 1), "max_sessions_per_ip": 0},
        "plugins": {"ratelimit": False},
    }
    path = workdir / "chatd.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


class Server:
    """One server under test in a subprocess: chatd, the baseline, or the batched baseline."""

    def __init__(self, kind: str, workdir: Path, max_users: int):
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r} (known: {', '.join(SERVER_KINDS)})")
        self.kind = kind
        self.workdir = workdir / kind
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.addr = (HOST, self.port)
        self.config: Path | None = None
        if kind == "chatd":
            self.config = chatd_config(self.workdir, self.port, max_users)
            self.command = [sys.executable, "-m", "chatd", "run", "-c", str(self.config)]
        else:
            self.command = [sys.executable, str(BENCH_DIR / "baseline_server.py"),
                            "--host", HOST, "--port", str(self.port)]
            if kind == "baseline-mmsg":
                self.command.append("--sendmmsg")
        self.proc: subprocess.Popen | None = None
        self._notify: Notifications | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        self._notify = Notifications()
        env = {**os.environ, "NOTIFY_SOCKET": self._notify.name}
        out = open(self.workdir / "output.txt", "wb")  # noqa: SIM115 - the child owns a copy
        try:
            self.proc = subprocess.Popen(self.command, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            out.close()
        problem = self._notify.wait_ready(self.proc, timeout)
        if problem is not None:
            self.stop()
            tail = (self.workdir / "output.txt").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.kind} {problem}\n{tail}")
        return self

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return proc_rss_bytes(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; then SIGKILL to what is left of its process group; reaped.

        The group is signalled while the server is a zombie, not yet reaped:
        until then its PID, which is also the group's id, cannot be reused by
        some other process.
        """
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                if not _exited(proc.pid, timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    _exited(proc.pid, 5.0)
                # anything it forked (chatd's admin child) is in its process group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if self._notify is not None:
            self._notify.close()
            self._notify = None


def _exited(pid: int, timeout: float) -> bool:
    """Has our child ``pid`` exited (within ``timeout`` s)? It is left unreaped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class Servers:
    """Starts servers and guarantees they are all stopped, whatever happens.

    On exit the servers are stopped first and only then is anything else
    closed (the users' sockets): a server that says goodbye to everyone on
    SIGTERM must not reach the next run's sockets on recycled port numbers.
    """

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="chatd-bench-")
        self.workdir = Path(self._tmp.name)
        self._servers: list[Server] = []
        self._closers: list[Any] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            for server in reversed(self._servers):
                with contextlib.suppress(Exception):
                    server.stop()
            for close in reversed(self._closers):
                with contextlib.suppress(Exception):
                    close()
        finally:
            self._tmp.cleanup()

    def start(self, kind: str, max_users: int) -> Server:
        server = Server(kind, self.workdir, max_users)
        self._servers.append(server)
        return server.start()

    def callback(self, close: Any) -> None:
        """Run ``close()`` on exit, after every server has stopped."""
        self._closers.append(close)


# -- the load: many users, one process -------------------------------------------------


class Users:
    """``n`` chat users, one UDP socket each, in this process, on one epoll.

    User 0 is the speaker; every other user only listens. Names are
    ``<prefix><index>``, so that two groups can share a server.
    """

    def __init__(self, n: int, server: tuple[str, int], prefix: str = "u", rcvbuf: int = 1 << 18):
        self.n = n
        self.server = server
        self.names = [f"{prefix}{i}" for i in range(n)]
        self.socks: list[socket.socket] = []
        self.epoll = select.epoll()
        self.by_fd: dict[int, socket.socket] = {}
        try:
            for _ in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                sock.bind((HOST, 0))
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.by_fd[sock.fileno()] = sock
        except BaseException:
            self.close()
            raise
        self.set_rcvbuf(rcvbuf)
        self.seq = 0  # of the next chat line: lines of earlier runs are recognised as stale

    def set_rcvbuf(self, size: int, socks: Sequence[socket.socket] | None = None) -> None:
        for sock in self.socks if socks is None else socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def capacity(self) -> int:
        """Datagrams a listener can hold (a small one takes ~830 bytes of buffer on loopback)."""
        return self.socks[-1].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 1024

    def close(self) -> None:
        self.epoll.close()
        for sock in self.socks:
            sock.close()

    # -- logging in --------------------------------------------------------------

    def login(self, window: int, timeout: float) -> tuple[int, int, float]:
        """Log users in, ``window`` at a time, for at most ``timeout`` s.

        Returns (logged in within the time, logged in at all, seconds from the
        first ``L`` to the last ``OK`` in time). When time runs out no more
        ``L`` is sent, and the ones in flight are counted once the server
        has handled them (so that the room size is known exactly).

        A socket is watched only until its ``OK``: what the room sends later
        (chatd's join notices, one per later login while the room is within
        ``room.announce_limit``) is left to the kernel, which drops it once the
        small receive buffer is full, instead of costing the load process a
        read each. :meth:`settle` clears it all afterwards.
        """
        server, epoll = self.server, self.epoll
        pending: dict[int, tuple[int, float]] = {}  # fd -> (index, sent at)
        next_index = logged = 0
        started = time.monotonic()
        deadline = started + timeout
        last_ok = started
        while logged < self.n:
            now = time.monotonic()
            if now >= deadline:
                break
            while len(pending) < window and next_index < self.n:
                sock = self.socks[next_index]
                sock.sendto(f"L {self.names[next_index]}".encode(), server)
                epoll.register(sock.fileno(), select.EPOLLIN)
                pending[sock.fileno()] = (next_index, now)
                next_index += 1
            for fd, _ in epoll.poll(min(0.2, max(0.0, deadline - now))):
                try:
                    data, source = self.by_fd[fd].recvfrom(2048)
                except BlockingIOError:
                    continue
                if source != server:
                    continue
                if data != b"OK":
                    raise RuntimeError(f"login refused: {data!r}")
                epoll.unregister(fd)
                del pending[fd]
                logged += 1
                last_ok = time.monotonic()
            now = time.monotonic()
            for fd, (index, sent) in list(pending.items()):
                if now - sent > LOGIN_RETRY:  # lost on the way (UDP): L is idempotent
                    pending[fd] = (index, now)
                    self.by_fd[fd].sendto(f"L {self.names[index]}".encode(), server)
        in_time = logged
        if pending:
            self.set_rcvbuf(1 << 22, self.socks[:1])
            self.barrier()
            for fd in pending:
                epoll.unregister(fd)
                with contextlib.suppress(BlockingIOError):
                    if self.by_fd[fd].recv(2048) == b"OK":  # the first datagram of a session
                        logged += 1
        return in_time, logged, last_ok - started

    def barrier(self, timeout: float = 120.0) -> int:
        """Returns once the server has handled everything sent before: user 0 logs in again.

        Both chatd and the baseline answer a repeated ``L`` from the same
        address with ``OK`` and nothing else; a server handles datagrams in
        order, so that ``OK`` comes after every earlier delivery. Returns the
        kernel's arrival time of that ``OK`` (ns since the epoch).

        The ``L`` is never resent: a second ``OK`` would arrive later and end
        the *next* barrier early. Loopback does not lose it (the servers'
        receive buffers are megabytes); a server that never answers is an error.
        """
        sock = self.socks[0]
        sock.sendto(f"L {self.names[0]}".encode(), self.server)
        deadline = time.monotonic() + timeout
        sock.setblocking(True)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"barrier: no OK within {timeout} s")
                sock.settimeout(remaining)
                try:
                    data, ancdata, _, source = sock.recvmsg(2048, _ANC_SPACE)
                except TimeoutError:
                    continue
                if data == b"OK" and source == self.server:
                    sec, nsec = _TIMESPEC.unpack(ancdata[0][2])
                    return sec * 1_000_000_000 + nsec
        finally:
            sock.setblocking(False)

    def drain(self) -> int:
        """Read and discard everything queued on every socket; returns the count."""
        count = 0
        for sock in self.socks:
            recv = sock.recv
            while True:
                try:
                    recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                count += 1
        return count

    def settle(self, rcvbuf: int) -> int:
        """After logins: wait for the server to finish, empty every queue, grow the buffers."""
        # user 0 must not drop the OK behind a pile of join notices: room for them all
        self.set_rcvbuf(1 << 22, self.socks[:1])
        self.barrier()
        dropped = self.drain()
        self.set_rcvbuf(rcvbuf)
        return dropped

    # -- chat ---------------------------------------------------------------------

    def say(self) -> None:
        """One chat line from user 0 carrying its sequence number and its send time."""
        seq, self.seq = self.seq, self.seq + 1
        self.socks[0].sendto(f"C {self.names[0]} {seq} {time.time_ns()}".encode(), self.server)

    def harvest(self, first_seq: int, sink: Lines) -> None:
        """Read every queued chat line from every listener, without epoll: the server is idle."""
        unpack = _TIMESPEC.unpack
        lats = sink.latencies
        for sock in self.socks[1:]:
            recvmsg = sock.recvmsg
            while True:
                try:
                    data, ancdata, _, _ = recvmsg(2048, _ANC_SPACE)
                except (BlockingIOError, InterruptedError):
                    break
                try:
                    _, seq, sent = data.rsplit(b" ", 2)
                    if int(seq) < first_seq:
                        sink.stale += 1
                        continue
                    sec, nsec = unpack(ancdata[0][2])
                except (ValueError, IndexError, struct.error):
                    sink.other += 1
                    continue
                arrived = sec * 1_000_000_000 + nsec
                lats.append(arrived - int(sent))
                sink.count += 1
                if arrived > sink.last_arrival:
                    sink.last_arrival = arrived


class Lines:
    """What came back from a run: latencies in ns, and what did not count."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.count = 0
        self.stale = 0  # lines of an earlier window that arrived late
        self.other = 0  # anything that is not a benchmark chat line
        self.last_arrival = 0


# -- numbers -------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def latency_summary(latencies_ns: list[int]) -> dict[str, float | None]:
    values = sorted(latencies_ns)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": round(percentile(values, 50) / 1e6, 3),
            "p99_ms": round(percentile(values, 99) / 1e6, 3),
            "max_ms": round(values[-1] / 1e6, 3)}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median over runs (numbers only; None where any run has none)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = round(statistics.median(values), 6)
        else:
            out[key] = values[0] if len(set(map(str, values))) == 1 else None
    return out


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table: readable in a terminal and in a Markdown code block."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if value < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def new_report(benchmark: str, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """What every report starts with: the benchmark, the machine, the parameters, which
    chatd tree was measured; then ``fields``."""
    return {
        "benchmark": benchmark,
        "machine": machine_info(),
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "chatd": str(Path(chatd.__file__).parent),
        **fields,
    }


def progress(message: str) -> None:
    """A line of progress, to stderr: stdout is for the report."""
    print(message, file=sys.stderr, flush=True)


def output(report: dict[str, Any], as_json: bool,
           print_tables: Callable[[dict[str, Any]], None]) -> int:
    """The report on stdout, as JSON or as the script's tables; the exit status."""
    if as_json:
        dump_json(report)
    else:
        print_tables(report)
    return 0


def dump_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, allow_nan=False, default=str)
    sys.stdout.write("\n")
