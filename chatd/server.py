"""The event loop: one selectors loop over the UDP socket, signals and what services watch.

It is thin on purpose. The room decides, the loop applies: each datagram
becomes deliveries (a payload encoded once, and its addresses) that the loop
sends with ``sendto``. Signals arrive as bytes on a wakeup socket and are
handled between datagrams, never inside a handler. What runs beside the room
(the admin child, the pidfile) are services (:mod:`chatd.services`): the loop
ticks them, reaps every child and hands it to the service that forked it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import selectors
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from chatd import config as config_mod
from chatd import log as log_mod
from chatd.batchsend import DEFERRED_ERRNOS, UNREPORTED, errno_name, send_to_many
from chatd.config import ListenSettings, Settings
from chatd.events import (
    CookieIssued,
    Delivery,
    Dropped,
    Event,
    LeaveReason,
    RepliesCapped,
    Said,
    Step,
    UserLeft,
)
from chatd.formats import format_addr, iso_time
from chatd.plugins import PluginManager, check_settings
from chatd.room import Room
from chatd.services import Service, describe_status
from chatd.systemd import Notifier

log = structlog.get_logger("chatd")

RECV_BUFFER = 65536
#: Datagrams read per wakeup before the loop looks at its other inputs again.
BATCH = 256
TICK_SECONDS = 1.0
#: The loop went this long without waiting for input (SIGSTOP, a slow reload, a
#: starved host): a stall, which it catches up on before anything can expire.
STALL_SECONDS = 1.0
#: Datagrams read, at most, when catching up after a stall (a full receive buffer).
CATCH_UP_LIMIT = 64 * 1024

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

# Linux: ask for ICMP errors on the socket's error queue, with the address they concern
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
# Linux: buffer sizes beyond net.core.rmem_max/wmem_max, for root (not in Python's socket)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
#: Send errors that mean "read the socket's error queue" (see chatd.batchsend).
_DEFERRED_NAMES = frozenset(map(errno_name, DEFERRED_ERRNOS)) | {UNREPORTED}
#: Datagrams kept for later while the socket's send buffer is full; past this the
#: newest are dropped (and counted), so that a stuck network cannot eat the memory.
MAX_BACKLOG = 1_000_000
#: How long a stopping server waits for a full send buffer to take what is left.
SHUTDOWN_FLUSH_SECONDS = 2.0


class BindError(Exception):
    """The UDP socket could not be set up; the message names the address."""


def bind_udp(listen: ListenSettings) -> socket.socket:
    """A bound, non-blocking UDP socket for ``listen``; raises :class:`BindError`."""
    where = format_addr((listen.host, listen.port))
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_DGRAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind udp {where}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        if family == socket.AF_INET6:
            # serve IPv4 too where the system allows dual-stack
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind udp {where}: {exc.strerror}") from None
    tune_socket(sock, listen)
    return sock


def tune_socket(sock: socket.socket, listen: ListenSettings) -> None:
    """Large buffers absorb bursts (as root beyond the kernel's rmem_max cap); ICMP errors
    are queued with the address they concern, so vanished clients can be dropped."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, listen.rcvbuf),
                               (SO_SNDBUFFORCE, socket.SO_SNDBUF, listen.sndbuf)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # not root (EPERM), or not Linux
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


class Server:
    """Serves one room on one UDP socket until told to stop."""

    def __init__(self, settings: Settings, sock: socket.socket, *,
                 notifier: Notifier | None = None, config_path: str | None = None):
        self.settings = settings
        self.sock = sock
        self.config_path = config_path
        self.notifier = notifier or Notifier(address="")
        self.room = Room(settings.room)
        self.plugins = PluginManager(self.room, settings.plugins)
        self.room.hooks = self.plugins
        self.started = time.time()
        self.started_monotonic = time.monotonic()
        self.counters: Counter[str] = Counter()
        #: datagrams (and ICMP reports) the room threw away, by reason
        self.drops: Counter[str] = Counter()
        self.send_errors: Counter[str] = Counter()
        self.selector = selectors.DefaultSelector()
        self._stop_reason: str | None = None
        # events any stranger can cause (a forged L and Q is a join and a leave), each
        # kind logged at a bounded rate with a count of what was left out
        self._stranger_logs = log_mod.BoundedLog(log, {"datagram_dropped": "warning",
                                                       "datagram_failed": "exception",
                                                       "login_refused": "info",
                                                       "user_joined": "info",
                                                       "user_left": "info"})
        self._icmp_pending = False  # an ICMP error was reported: drain the error queue
        self._signalled = False  # a signal arrived and waits for the loop
        self._backlog: deque[tuple[bytes, Sequence[Any]]] = deque()
        self._backlog_size = 0  # datagrams in the backlog
        self._next_tick = 0.0
        self._next_watchdog = 0.0
        self._signal_r, self._signal_w = socket.socketpair()
        #: signals beyond the built-in ones, and what the loop calls for each
        self._signal_callbacks: dict[int, Callable[[], None]] = {}
        #: what runs beside the room, in the order started (see :meth:`add_service`)
        self.services: list[Service] = []
        # what the loop itself can fail at, each kind logged at a bounded rate
        self._loop_logs = log_mod.BoundedLog(log, {"service_failed": "exception",
                                                   "unknown_child_exited": "warning"})
        #: the log file used when the file sets none (``chatd start`` has one), kept on reload
        self.log_file_default: str | None = None
        #: (wall time, pid): when this process took the room over and from which process
        self.taken_over: tuple[float, int] | None = None
        #: the room went to a new process (chatd.handover): stop without a goodbye
        self.handed_over = False

    # -- set-up ---------------------------------------------------------------

    def install_signals(self) -> None:
        for sock in (self._signal_r, self._signal_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, self._note_signal)
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signals)

    def watch(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(mask)`` from the loop when ``fileobj`` is ready for ``events``."""
        try:
            self.selector.modify(fileobj, events, callback)
        except KeyError:
            self.selector.register(fileobj, events, callback)

    def unwatch(self, fileobj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fileobj)

    def handle_signal(self, signum: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop (never inside the handler) when ``signum`` arrives."""
        self._signal_callbacks[signum] = callback
        signal.signal(signum, self._note_signal)

    def pause_reading(self) -> None:
        """Stop reading the UDP socket: what arrives waits in its buffer (a handover)."""
        self.unwatch(self.sock)

    def resume_reading(self) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._backlog else 0)
        self.watch(self.sock, events, self._on_socket)

    def drain_backlog(self, timeout: float) -> None:
        """Send what a full send buffer kept back, for at most ``timeout`` seconds."""
        self._drain_backlog(timeout)

    def add_service(self, service: Service) -> None:
        """Start ``service`` now (an error goes to the caller: start-up fails) and run it
        with the loop from then on: ticked, told of its children's exits, stopped last."""
        service.start()
        self.services.append(service)

    @property
    def address(self) -> str:
        return format_addr(self.sock.getsockname())

    # -- the loop -------------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); returns the exit status.

        ``ready`` is called once the room serves (the readiness pipe of ``chatd start``).
        """
        self.selector.register(self.sock, selectors.EVENT_READ, self._on_socket)
        self.start_plugins()
        self.apply(self.room.flush())
        host, port = self.sock.getsockname()[:2]
        log.info("server_started", host=host, port=port, pid=os.getpid(),
                 config=self.config_path)
        self.notifier.ready(self.status_line())
        if ready is not None:
            ready()
        listened = time.monotonic()  # the loop was waiting for input until then
        while self._stop_reason is None:
            now = time.monotonic()
            if now - listened > STALL_SECONDS:
                self._catch_up(now - listened)
                now = time.monotonic()
            if now >= self._next_tick:
                self._tick(now)
            timeout = max(0.0, self._next_tick - now)
            ready = self.selector.select(timeout)
            # not later than its timeout: a select that took longer was stopped
            listened = min(time.monotonic(), now + timeout)
            for key, mask in ready:
                key.data(mask)
                if self._stop_reason is not None:
                    break
        self._shutdown()
        return 0

    def start_plugins(self) -> None:
        """Start the plugins, once: a process taking the room over does it before it has
        the socket (:mod:`chatd.handover`), :meth:`serve` otherwise."""
        if not self.plugins.started:
            self.plugins.startup()

    def stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _tick(self, now: float) -> None:
        # a short WatchdogSec needs pings more often than once a second
        self._next_tick = now + min(TICK_SECONDS, self.notifier.watchdog_interval or TICK_SECONDS)
        self.apply(self.room.expire(now))
        interval = self.notifier.watchdog_interval
        if interval and now >= self._next_watchdog:
            self._next_watchdog = now + interval
            self.notifier.notify(WATCHDOG=1, STATUS=self.status_line())
        for service in self.services:
            self._guarded(service, "tick", service.tick, now)

    def _catch_up(self, stalled: float) -> None:
        """The loop did not run for ``stalled`` seconds. That is no client's silence,
        and what they sent meanwhile waits in the receive buffer: read it before any
        session can expire (or its datagrams would be dropped as ``no_session``)."""
        self.counters["loop_stalls"] += 1
        log.warning("loop_stalled", seconds=round(stalled, 1))
        self.room.pause(stalled, time.monotonic())
        for _ in range(CATCH_UP_LIMIT // BATCH):
            if self._signalled or not select.select([self.sock], [], [], 0)[0]:
                break
            self._on_datagrams()

    def _on_socket(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_backlog()
        if mask & selectors.EVENT_READ:
            self._on_datagrams()

    def _on_datagrams(self) -> None:
        recv, room, counters = self.sock.recvfrom, self.room, self.counters
        for _ in range(BATCH):
            if self._signalled:  # a signal waits: let the loop see it now
                break
            try:
                data, addr = recv(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the pending ICMP error of an earlier datagram
                self._note_send_error(exc)
                continue
            counters["datagrams_in"] += 1
            try:
                self.apply(room.receive(addr, data, time.monotonic()))
            except Exception:  # a datagram can never stop the server
                counters["internal_errors"] += 1
                self._log_bounded("datagram_failed", {"addr": format_addr(addr)})
        if self._icmp_pending:
            self._drain_error_queue()

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        """Send each payload to each of its addresses; errors are counted, never raised.

        A fan-out goes out with sendmmsg (chatd.batchsend), one system call per
        1024 addresses: the per-call cost, not Python, dominates a big room.
        What a full send buffer keeps back waits, in order, until the socket is
        writable: nothing the room accepted is lost to a burst.
        """
        for delivery in deliveries:
            if self._backlog:
                self._hold(delivery.payload, delivery.addrs)
                continue
            unsent = self._send(delivery.payload, delivery.addrs)
            if unsent:
                self._hold(delivery.payload, unsent)

    def _send(self, payload: bytes, addrs: Sequence[Any]) -> list[Any]:
        """Send now; returns the addresses a full send buffer kept waiting."""
        unsent: list[Any] = []
        sent, errors = send_to_many(self.sock, payload, addrs, unsent)
        self.counters["datagrams_out"] += sent
        if errors:
            self.send_errors.update(errors)
            if not _DEFERRED_NAMES.isdisjoint(errors):
                self._icmp_pending = True  # the error queue says who is unreachable
        return unsent

    def _hold(self, payload: bytes, addrs: Sequence[Any]) -> None:
        if self._backlog_size + len(addrs) > MAX_BACKLOG:
            self.send_errors["backlog_full"] += len(addrs)
            return
        if not self._backlog:
            self.watch(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_socket)
        self._backlog.append((payload, addrs))
        self._backlog_size += len(addrs)
        self.counters["backlogged"] += len(addrs)

    def _drain_backlog(self, timeout: float) -> None:
        """On the way out: give what still waits (the goodbyes, say) a bounded chance."""
        deadline = time.monotonic() + timeout
        while self._backlog:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.send_errors["lost_at_shutdown"] += self._backlog_size
                return
            _, writable, _ = select.select([], [self.sock], [], remaining)
            if writable:
                self._flush_backlog()

    def _flush_backlog(self) -> None:
        while self._backlog:
            payload, addrs = self._backlog.popleft()
            self._backlog_size -= len(addrs)
            unsent = self._send(payload, addrs)
            if unsent:  # still full: wait for the next writable event
                self._backlog.appendleft((payload, unsent))
                self._backlog_size += len(unsent)
                return
        self.watch(self.sock, selectors.EVENT_READ, self._on_socket)

    def _note_send_error(self, exc: OSError) -> None:
        self.send_errors[errno_name(exc.errno)] += 1
        if exc.errno in DEFERRED_ERRNOS:
            self._icmp_pending = True

    def _drain_error_queue(self) -> None:
        """Each queued ICMP error names the address a datagram could not reach."""
        self._icmp_pending = False
        for _ in range(BATCH):
            try:
                _, _, _, addr = self.sock.recvmsg(1, 512, MSG_ERRQUEUE)
            except OSError:
                return
            self.counters["unreachable_reports"] += 1
            self.apply(self.room.unreachable(addr, time.monotonic()))
        self._icmp_pending = True  # more than a batch: the rest on the next wakeup

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped for this socket (full receive buffer), if known."""
        inode = os.fstat(self.sock.fileno()).st_ino
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if len(fields) > 12 and fields[9] == str(inode):
                            return int(fields[12])
            except (OSError, StopIteration, ValueError):
                continue
        return None

    # -- logging what the room did ----------------------------------------------

    def apply(self, step: Step) -> None:
        """The one place where what the room did takes effect: count each event, log it
        (first: whoever gets a reply finds its log line), then send the datagrams."""
        for event in step.events:
            self._count(event)
            self._log(event)
        self.deliver(step.deliveries)

    def _count(self, event: Event) -> None:
        match event:
            case Dropped(reason=reason):
                self.drops[reason] += 1
            case Said():
                self.counters["chat_lines"] += 1
            case UserLeft(reason=LeaveReason.EVICTED):
                self.counters["evicted_idle"] += 1
            case CookieIssued():
                self.counters["cookies_issued"] += 1
            case RepliesCapped(count=count):
                self.counters["unverified_capped"] += count

    def _log(self, event: Event) -> None:
        name = event.log_as
        if not name:
            return  # counted only
        if isinstance(event, Said) and self.settings.log.level != "debug":
            return  # people's text, at debug only: skip the logger's cost otherwise
        fields = event.fields()
        if "addr" in fields:
            fields["addr"] = format_addr(fields["addr"])
        if isinstance(event, Said):
            log.debug(name, **fields)
        elif event.stranger:
            self._log_bounded(name, fields)
        else:
            log.info(name, **fields)

    def _log_bounded(self, name: str, fields: dict[str, Any]) -> None:
        self._stranger_logs(name, **fields)

    # -- signals ----------------------------------------------------------------

    def _note_signal(self, signum: int, frame: Any) -> None:
        """Only a note: the wakeup fd has already carried the signal to the loop."""
        self._signalled = True

    def _on_signals(self, mask: int = selectors.EVENT_READ) -> None:
        self._signalled = False
        try:
            data = self._signal_r.recv(512)
        except BlockingIOError:
            return
        received = set(data)  # a burst of one signal is handled once
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum in received:
                self.stop(signal.Signals(signum).name)
        if signal.SIGCHLD in received:
            self._reap_children()
        if signal.SIGHUP in received and self._stop_reason is None:
            self.reload()
        for signum, callback in self._signal_callbacks.items():
            if signum in received and self._stop_reason is None:
                callback()

    def _reap_children(self) -> None:
        """Collect every child that exited, and tell the service that forked it.

        The one ``waitpid`` of the daemon, as in gunicorn's arbiter: no service
        waits for "any child" (it would take another's), and a child nobody
        claims (a plugin's subprocess left behind) is reaped and logged, so
        none stays a zombie. A plugin that runs a command should wait for it
        in its hook (``subprocess.run``): the loop reaps only between hooks.
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = next((s for s in self.services if pid in s.pids()), None)
            if owner is None:
                self._loop_logs("unknown_child_exited", child_pid=pid,
                                status=describe_status(status))
            else:
                self._guarded(owner, "child_exited", owner.child_exited, pid, status)

    def _guarded(self, service: Service, what: str, call: Callable[..., None],
                 *args: Any) -> None:
        """A service's call under the datagrams' guard: a failure is counted and logged
        (with its traceback, at a bounded rate), and the room goes on."""
        try:
            call(*args)
        except Exception:
            self.counters["internal_errors"] += 1
            self._loop_logs("service_failed", service=service.name, call=what)

    def reload(self) -> tuple[bool, str | dict[str, Any]]:
        """Re-read the config file; on any error keep running as before and say why.

        Returns (True, what changed: see :func:`chatd.config.reload_changes`) or
        (False, the error).
        """
        self.notifier.reloading()
        try:
            ok, outcome = self._reload()
        finally:
            self.notifier.ready(self.status_line())
        return ok, outcome

    def _reload(self) -> tuple[bool, str | dict[str, Any]]:
        old = self.settings
        try:
            new = config_mod.load(self.config_path, check_plugins=check_settings)
            if new.log.file is None and self.log_file_default is not None:
                new = dataclasses.replace(
                    new, log=dataclasses.replace(new.log, file=self.log_file_default))
            changes = config_mod.reload_changes(old, new)
            merged = config_mod.keep_restart_only(old, new)
            try:
                log_mod.configure(merged.log)
            except OSError as exc:
                raise config_mod.ConfigError(f"log.file: {exc}") from None
            self.settings = merged
            self.room.reconfigure(merged.room)
            self.plugins.reconfigure(merged.plugins)
            self.apply(self.room.flush())
        except config_mod.ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return False, str(exc)
        except Exception as exc:  # whatever it was, the room goes on as it was
            log.exception("reload_failed", error=repr(exc))
            self._restore(old)
            return False, f"reload failed ({type(exc).__name__}: {exc}); nothing was changed"
        for kept in changes["restart_needed"]:
            log.warning("reload_needs_restart", key=kept["key"], kept=kept["kept"],
                        wanted=kept["wanted"])
        log.info("reloaded", config=self.config_path, applied=changes["applied"],
                 restart_needed=[kept["key"] for kept in changes["restart_needed"]])
        return True, changes

    def _restore(self, old: Settings) -> None:
        """Undo a reload that failed half-way, as far as it got (the log is reconfigured
        just before the settings change: until then nothing has)."""
        if self.settings is old:
            return
        self.settings = old
        self.room.reconfigure(old.room)
        for undo in (lambda: log_mod.configure(old.log),
                     lambda: self.plugins.reconfigure(old.plugins)):
            with contextlib.suppress(Exception):
                undo()

    # -- status and stop ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``chatctl status`` shows: identity, load and every counter."""
        return {
            "pid": os.getpid(),
            "address": self.address,
            "uptime": round(time.monotonic() - self.started_monotonic, 1),
            "started": iso_time(self.started),
            "users": len(self.room),
            "max_users": self.settings.room.max_users,
            "config": self.config_path,
            "counters": dict(self.counters),
            "drops": dict(self.drops),
            "send_errors": dict(self.send_errors),
            "kernel_drops": self.kernel_drops(),
            "backlog": self._backlog_size,
            "plugins": [p["name"] for p in self.plugins.describe() if p.get("enabled")],
            "log_write_errors": _log_write_errors(),
            **({"taken_over": iso_time(self.taken_over[0]),
                "taken_over_from": self.taken_over[1]} if self.taken_over else {}),
            **{key: value for service in self.services for key, value in service.status().items()},
        }

    def status_line(self) -> str:
        return f"serving {self.address}, {len(self.room)} users"

    def _shutdown(self) -> None:
        if self.handed_over:
            self._shutdown_handed_over()
            return
        log.info("server_stopping", reason=self._stop_reason, users=len(self.room))
        self.notifier.stopping()
        self.plugins.shutdown()
        self.apply(self.room.flush())
        self.apply(self.room.shutdown())
        self._drain_backlog(SHUTDOWN_FLUSH_SECONDS)
        for service in reversed(self.services):
            self._guarded(service, "stop", service.stop)
        signal.set_wakeup_fd(-1)
        self.selector.close()


    def _shutdown_handed_over(self) -> None:
        """The room lives on in another process: no goodbye, nothing more on the socket.
        Plugins close what they opened; whatever they send on the way is dropped."""
        log.info("server_stopping", reason=self._stop_reason, users=len(self.room),
                 handed_over=True)
        self.unwatch(self.sock)
        self.plugins.shutdown()
        self.room.flush()
        for service in reversed(self.services):
            self._guarded(service, "stop", service.stop)
        signal.set_wakeup_fd(-1)
        self.selector.close()


def _log_write_errors() -> int:
    """Log lines this process could not write (full disk, unwritable file), since start."""
    sink = log_mod.current_sink()
    return sink.write_errors if sink is not None else 0
