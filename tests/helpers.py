"""Test helpers: real chatd processes on free ports, and UDP users that talk to them.

Readiness is never guessed with sleeps: ``chatd run`` is started with a
``NOTIFY_SOCKET`` (an abstract AF_UNIX datagram socket) and the helper waits
for its ``READY=1``, exactly as systemd would.

The benchmarks (``benchmarks/common.py``) pick their ports and wait for their
servers with :func:`free_udp_port` and :class:`Notifications` from here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

CHATD = [sys.executable, "-m", "chatd"]


def read_log_events(path: Path | None) -> list[dict[str, Any]]:
    """The JSON log lines of ``path`` (none if it does not exist), skipping any other line."""
    if path is None or not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def state_of(pid: int) -> str | None:
    """The process state letter from /proc (``T`` stopped, ``Z`` zombie), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def free_udp_port() -> int:
    """A free UDP port below the kernel's ephemeral range.

    A port the kernel handed out (bind to port 0) goes back to its pool when
    closed, and any socket of any process sending meanwhile may take it
    before chatd binds it. Ports below the ephemeral range are never given
    out that way.
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free UDP port found")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Bounded poll: the predicate's first truthy value, or AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(directory: Path, overrides: dict | None = None, port: int | None = None) -> Path:
    """A real YAML file for a test server: loopback, a free port, everything under ``directory``."""
    settings = {
        "listen": {"host": "127.0.0.1", "port": port or free_udp_port()},
        "runtime_dir": str(directory / "run"),
        "log": {"level": "debug", "format": "json", "file": str(directory / "chatd.log")},
    }
    settings = merge(settings, overrides or {})
    path = directory / "chatd.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True))
    return path


class Notifications:
    """An abstract-namespace AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self):
        self.name = f"@chatd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.received: list[dict[str, str]] = []

    def wait(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict[str, str]:
        """The first notification (past or future) carrying ``key`` (with ``value``)."""
        for message in self.received:
            if key in message and (value is None or message[key] == value):
                self.received.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} notification within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if key in message and (value is None or message[key] == value):
                return message
            self.received.append(message)

    def wait_ready(self, proc: subprocess.Popen, timeout: float) -> str | None:
        """Wait for ``READY=1`` from ``proc``: None once it came, else why not (it exited,
        or ``timeout`` passed: then it is left running, for the caller to stop)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait("READY", "1", timeout=0.2)
                return None
            except AssertionError:
                pass
            if proc.poll() is not None:
                return f"exited with status {proc.returncode}"
            if time.monotonic() > deadline:
                return f"did not become ready within {timeout} s"

    def close(self) -> None:
        self.sock.close()


class ChatdProcess:
    """``chatd run`` in a subprocess, ready when it says READY=1."""

    def __init__(self, directory: Path, overrides: dict | None = None,
                 env: dict[str, str] | None = None, port: int | None = None,
                 wrapper: list[str] | None = None):
        self.directory = directory
        #: a command that runs chatd's argv after it (as ``sh -c '...; exec "$@"' sh``)
        self.wrapper = wrapper or []
        self.config = write_config(directory, overrides, port)
        data = yaml.safe_load(self.config.read_text())
        self.port: int = data["listen"]["port"]
        self.runtime_dir = Path(data["runtime_dir"])
        self.log_path = Path(data["log"]["file"]) if data["log"].get("file") else None
        self.notify = Notifications()
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.name, "PYTHONFAULTHANDLER": "1",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 15.0) -> ChatdProcess:
        self.proc = subprocess.Popen(
            [*self.wrapper, *CHATD, "run", "-c", str(self.config)], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        problem = self.notify.wait_ready(self.proc, timeout)
        if problem is None:
            return self
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: where is it stuck?
        problem = f"chatd {problem}"
        try:
            _, err = self.proc.communicate(timeout=10)
        finally:
            self.stop()
        log = self.log_path.read_text() if self.log_path and self.log_path.exists() else ""
        raise AssertionError(f"{problem}: {err.decode()}\n{log}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)
        self.notify.wait("RELOADING", "1")
        self.notify.wait("READY", "1")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if needed; always reaps. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        self.notify.close()
        return self.proc.returncode

    def log_events(self) -> list[dict[str, Any]]:
        return read_log_events(self.log_path)


class UdpUser:
    """One chat participant: its own UDP socket, speaking the wire protocol."""

    def __init__(self, server: tuple[str, int], name: str | None = None):
        self.server = server
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    @property
    def addr(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def send(self, data: bytes | str) -> None:
        self.sock.sendto(data.encode() if isinstance(data, str) else data, self.server)

    def recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        data, _ = self.sock.recvfrom(65536)
        return data

    def recv_text(self, timeout: float = 5.0) -> str:
        return self.recv(timeout).decode()

    def expect_nothing(self, timeout: float = 0.3) -> None:
        """Used only to prove a negative, after a positive barrier elsewhere."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected datagram {data!r}")

    def cookie(self) -> str:
        """Ask for an address cookie (``H``, padded to the size of the answer)."""
        self.send(b"H " + b"." * 62)
        data = self.recv()
        assert data.startswith(b"COOKIE "), data
        return data.split()[1].decode()

    def login(self, name: str | None = None, verify: bool = False) -> bytes:
        """``L name``; with ``verify``, with a cookie, as chat-client logs in."""
        if name is not None:
            self.name = name
        self.send(f"L {self.name} {self.cookie()}" if verify else f"L {self.name}")
        return self.recv()

    def join(self, name: str, verify: bool = False) -> UdpUser:
        answer = self.login(name, verify)
        assert answer == b"OK", answer
        return self

    def say(self, text: str) -> None:
        self.send(f"C {self.name} {text}")

    def ping(self) -> bytes:
        """A round trip through the server: a barrier that proves earlier datagrams were handled."""
        self.send(f"P {self.name}")
        while True:
            data = self.recv()
            if data == b"PONG":
                return data

    def quit(self) -> bytes:
        self.send(f"Q {self.name}")
        return self.recv()

    def drain(self, timeout: float = 0.05) -> list[bytes]:
        out = []
        self.sock.settimeout(timeout)
        while True:
            try:
                out.append(self.sock.recv(65536))
            except TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close()


# -- real unprivileged users (the local_users fixture in conftest.py makes them) -------------


class LocalUser:
    """A real user made with useradd, and commands run as that user.

    The interpreter running the tests may lie where other users cannot reach
    (under /root): :meth:`python` is one they can run, with chatd and its
    dependencies importable from this checkout and its environment.
    """

    def __init__(self, name: str, groups: tuple[str, ...] = ()):
        import grp
        import pwd

        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.groups = groups
        self.extra_gids = [grp.getgrnam(g).gr_gid for g in groups]
        self._python: list[str] | None = None

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """``argv`` as this user (its own group and ``groups`` only), output as text."""
        base = {k: v for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "CHATD_CONFIG",
                             "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "PYTHONPATH")}
        return subprocess.run(argv, user=self.uid, group=self.gid, extra_groups=self.extra_gids,
                              env={**base, "HOME": "/nonexistent", **(env or {})}, cwd="/",
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """A long-running process of this user (the caller ends and reaps it)."""
        return subprocess.Popen(argv, user=self.uid, group=self.gid,
                                extra_groups=self.extra_gids, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)

    def python(self) -> list[str]:
        if self._python is None:
            self._python = _python_for(self)
        return self._python

    def chatd(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run([*self.python(), "-m", "chatd", *args], **kwargs)

    def chatctl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run([*self.python(), "-m", "chatd.cli.chatctl", *args], **kwargs)


def _python_for(user: LocalUser) -> list[str]:
    import shutil
    import sysconfig

    import pytest

    repo = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([repo, sysconfig.get_paths()["purelib"]])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if not candidate:
            continue
        argv = ["env", f"PYTHONPATH={path}", candidate]
        probe = user.run([*argv, "-c", "import chatd.cli.chatctl, structlog, yaml, daemon"])
        if probe.returncode == 0:
            return argv
    pytest.skip(f"no {version} that user {user.name} may run with chatd importable "
                f"({sys.executable} is out of its reach)")
    raise AssertionError("not reached")
