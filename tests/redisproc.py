"""A real ``redis-server`` for the cluster tests: on a free port, in a temp dir, with no
persistence, stopped by pid when the test ends (see the ``redis_server`` fixture).

Never a mock: every cluster test talks to this process, and the failure tests act on it
the way the world would: SIGSTOP (a stall), SIGKILL and a restart on the same port
(a Redis that comes back empty), ``CLIENT KILL`` (a cut connection). The benchmarks
use it too, so it needs nothing but the standard library and redis-py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

from helpers import wait_for

REDIS_SERVER = shutil.which("redis-server")


def free_tcp_port() -> int:
    """A free TCP port below the ephemeral range (see tests.helpers.free_udp_port)."""
    for _ in range(1000):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port")


class RedisServer:
    """One redis-server process; :meth:`restart` brings it back empty on the same port."""

    def __init__(self, directory: Path, port: int | None = None,
                 unix_socket: Path | None = None):
        self.directory = directory
        self.port = port or free_tcp_port()
        self.unix_socket = unix_socket  # listened on too, when given (mode 0700)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
             "--logfile", str(self.directory / "redis.log"),
             *(["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
               if self.unix_socket else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10, what=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            return self.command("PING") == "+PONG"
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command in RESP, its reply's first line: enough for the tests' checks,
        and no client library between the test and the server."""
        request = f"*{len(args)}\r\n" + "".join(
            f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(request.encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode(errors="replace").split("\r\n")[0]

    def client(self):
        """A redis-py client for checks that need whole replies."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=5)

    def pause(self) -> None:
        """SIGSTOP: a Redis that stalls (connections stay open, nothing answers)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and wait: everything it held is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> RedisServer:
        """Killed and started again on the same port: a Redis that comes back empty."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()


class TcpProxy:
    """A TCP proxy in front of Redis, in threads: ``stop`` cuts every connection and
    refuses new ones (a node cut off from Redis), ``start`` serves again on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_tcp_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
