"""The daemon's side of the control channel: it forks and supervises the admin child,
and executes the requests the child relays.

The daemon never touches the control socket itself; it only reads JSON lines
from a socketpair, so nothing a local peer does can stall the room. The
child is reaped on SIGCHLD and forked again, with backoff when it keeps
dying. No zombie is ever left: every fork is waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from daemon.daemon import close_all_open_files

from chatd import control
from chatd import log as log_mod
from chatd.formats import format_addr, iso_time
from chatd.room import TextTooLong
from chatd.server import Server

log = structlog.get_logger("chatd")

FIRST_READY_TIMEOUT = 10.0
STABLE_AFTER = 10.0  # a child that lived this long resets the backoff
MAX_BACKOFF = 30.0


class AdminStartError(Exception):
    """The first admin child could not serve; the message says why."""


class AdminSupervisor:
    """Forks the admin child, relays for it, and replaces it when it dies."""

    def __init__(self, server: Server, read_terminal: bool = False):
        self.server = server
        self.read_terminal = read_terminal
        self.pid: int | None = None
        self.channel: socket.socket | None = None
        self._inbox = b""
        self._outbox = b""
        self._spawned_at = 0.0
        self._failures = 0
        self._respawn_at: float | None = None
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Fork the first child and wait until it serves; raises :class:`AdminStartError`."""
        self._spawn()
        try:
            first = self._first_message()
            if first.get("event") != "ready":
                raise AdminStartError(first.get("error", "the admin child failed"))
        except AdminStartError:
            self._abandon_child()
            raise
        self.server.watch(self.channel, selectors.EVENT_READ, self._on_channel)
        self.server.on_child_exit = self.reap
        self.server.on_tick.append(self._maybe_respawn)
        self.server.on_shutdown.append(self.stop)

    def _first_message(self) -> dict[str, Any]:
        assert self.channel is not None
        self.channel.settimeout(FIRST_READY_TIMEOUT)
        try:
            while b"\n" not in self._inbox:
                chunk = self.channel.recv(65536)
                if not chunk:
                    raise AdminStartError("the admin child exited during start-up")
                self._inbox += chunk
        except TimeoutError:
            raise AdminStartError("the admin child did not start serving in time") from None
        finally:
            self.channel.setblocking(False)
        line, self._inbox = self._inbox.split(b"\n", 1)
        return json.loads(line)

    def _abandon_child(self) -> None:
        """A first child that did not serve: end it, reap it, and leave no files behind."""
        self._stopping = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(block=True)
        control.remove_stale_files(self.server.settings.control)

    def _spawn(self) -> None:
        parent_end, child_end = socket.socketpair()
        for end in (parent_end, child_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        settings = self.server.settings.control
        pid = os.fork()
        if pid == 0:
            _child_main(child_end, settings, self.read_terminal)
        child_end.close()
        self.pid = pid
        self.channel = parent_end
        self._spawned_at = time.monotonic()
        self._inbox = self._outbox = b""
        log.info("admin_child_started", child_pid=pid)

    def reap(self) -> None:
        """SIGCHLD: collect every exited child; plan a new admin child if ours died."""
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid != self.pid:
                continue
            self._child_gone(pid, status)
            if block:
                return

    def _child_gone(self, pid: int, status: int) -> None:
        self.pid = None
        if self.channel is not None:
            self.server.unwatch(self.channel)
            self.channel.close()
            self.channel = None
        if self._stopping:
            return
        lived = time.monotonic() - self._spawned_at
        self._failures = 1 if lived >= STABLE_AFTER else self._failures + 1
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (self._failures - 1))
        self._respawn_at = time.monotonic() + delay
        log.warning("admin_child_exited", child_pid=pid, status=_describe_status(status),
                    respawn_in=round(delay, 1))

    def _maybe_respawn(self, now: float) -> None:
        if self._respawn_at is None or now < self._respawn_at or self._stopping:
            return
        self._respawn_at = None
        self._spawn()
        assert self.channel is not None
        self.channel.setblocking(False)
        self.server.watch(self.channel, selectors.EVENT_READ, self._on_channel)

    def stop(self) -> None:
        """Graceful stop: end the child, reap it, remove the socket and FIFO."""
        self._stopping = True
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while self.pid is not None and time.monotonic() < deadline:
                self._reap(block=False)
                if self.pid is not None:
                    time.sleep(0.01)
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._reap(block=True)
        control.remove_files(self.server.settings.control)

    # -- the relay ------------------------------------------------------------------

    def _on_channel(self, mask: int) -> None:
        channel = self.channel
        if channel is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = channel.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the child is gone; SIGCHLD does the rest
            self.server.unwatch(channel)
            return
        self._inbox += data
        while b"\n" in self._inbox:
            line, self._inbox = self._inbox.split(b"\n", 1)
            self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # the child checks requests; the room stays up
            message = None
        if not isinstance(message, dict):
            log.error("admin_channel_garbage")
            return
        if "event" in message:
            level = log.info if message["event"] == "ready" else log.error
            level("admin_child_" + str(message["event"]), **{k: v for k, v in message.items()
                                                            if k != "event"})
            return
        answer = execute(self.server, str(message.get("cmd")), message.get("args") or {})
        answer["id"] = message.get("id")
        self._outbox += json.dumps(answer, default=str).encode() + b"\n"
        self._flush()

    def _flush(self) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            sent = channel.send(self._outbox)
            self._outbox = self._outbox[sent:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._outbox = b""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0)
        self.server.watch(channel, events, self._on_channel)


def _child_main(channel: socket.socket, settings: Any, read_terminal: bool) -> None:
    """The admin child: keep only what it needs, serve, and never return into the daemon."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        sink = log_mod.current_sink()
        keep = {0, 1, 2, channel.fileno()}
        if sink is not None and sink.fileno() is not None:
            keep.add(sink.fileno())
        close_all_open_files(exclude=keep)
        with contextlib.suppress(Exception):
            import setproctitle  # optional: shows what the process is in ps

            setproctitle.setproctitle("chatd: admin child")
        code = control.run_admin_child(settings, channel, os.getuid(), read_terminal)
    except BaseException:  # noqa: BLE001 - the child must end here whatever happens
        with contextlib.suppress(Exception):
            log.exception("admin_child_crashed")
    finally:
        os._exit(code)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


# -- the commands -------------------------------------------------------------------------


def _ok(result: Any = None) -> dict[str, Any]:
    return {"ok": True, "result": result}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _text_arg(args: dict[str, Any], name: str) -> str | None:
    value = args.get(name)
    return value if isinstance(value, str) and value.strip() else None


def cmd_say(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    text = _text_arg(args, "text")
    if text is None:
        return _error("say needs a text")
    try:
        step = server.room.admin_say(text)
    except TextTooLong as exc:
        return _error(f"text too long: {exc}")
    server.apply(step)
    return _ok({"users": len(server.room)})


def cmd_who(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    now_wall, now = time.time(), time.monotonic()
    return _ok([
        {"name": s.name, "addr": format_addr(s.addr),
         "login_time": iso_time(now_wall - (now - s.joined_at)),
         "idle": round(now - s.last_seen, 1), "keepalive": s.keepalive,
         "verified": s.verified}
        for s in server.room.sessions()
    ])


def cmd_kick(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    name = _text_arg(args, "name")
    if name is None:
        return _error("kick needs a name")
    reason = _text_arg(args, "reason") or "kicked by the admin"
    if not server.room.kick(name, reason):
        return _error(f"no such user: {name}")
    server.apply(server.room.flush())
    return _ok({"kicked": name, "reason": reason})


def cmd_status(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    return _ok(server.status())


def cmd_reload(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    ok, message = server.reload()
    return _ok(message) if ok else _error(message)


def cmd_plugins(server: Server, args: dict[str, Any]) -> dict[str, Any]:
    return _ok(server.plugins.describe())


COMMANDS: dict[str, Callable[[Server, dict[str, Any]], dict[str, Any]]] = {
    "say": cmd_say,
    "who": cmd_who,
    "kick": cmd_kick,
    "status": cmd_status,
    "reload": cmd_reload,
    "plugins": cmd_plugins,
}


def execute(server: Server, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one admin request; never raises (an error is an answer)."""
    handler = COMMANDS.get(cmd)
    if handler is None:
        return _error(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    if not isinstance(args, dict):
        return _error("args must be a mapping")
    try:
        return handler(server, args)
    except Exception as exc:  # an admin request must not stop the room either
        log.exception("admin_command_failed", cmd=cmd)
        return _error(f"internal error: {exc}")

