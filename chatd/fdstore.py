"""``systemctl restart chatd`` without dropping anyone: systemd's file-descriptor store.

systemd runs a restart as a stop, then a start, with a new process; what it
keeps between the two is the service's fd store (``FDSTORE=1`` in sd_notify,
``FileDescriptorStoreMax=`` in the unit), which it passes to the next process
like socket-activated sockets (``LISTEN_FDS``, ``LISTEN_FDNAMES``). Under
systemd 252 the store survives ``systemctl restart`` and is emptied by
``systemctl stop``.

On the way down (:func:`hand_over`) the daemon has stopped reading; it puts
the UDP socket in the store as ``udp`` (unless a socket unit passed it:
systemd holds that one anyway), the room's state as a sealed memfd named
``state``, waits for systemd's receipt and exits without a goodbye. Datagrams
that arrive meanwhile wait in the socket, which never closes. On the way up
(:func:`inherit`) ``chatd run`` picks the fds by name, restores the state, and
asks systemd to drop what it used from the store (:func:`forget_stored`), so
that a later crash or start does not see it again.

The daemon cannot tell a restart from a stop by the SIGTERM, and a stop must
say goodbye. The unit's ``ExecStop=+chatd systemd-stop %n``
(:func:`stop_helper`, run as root before systemd's own SIGTERM) asks systemd
for the unit's job: ``restart`` (and an fd store big enough) sends the daemon
:data:`HANDOVER_SIGNAL`, anything else SIGTERM and with it the goodbye; then
it waits for the daemon to exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from chatd import systemd
from chatd.server import SHUTDOWN_FLUSH_SECONDS

if TYPE_CHECKING:
    from chatd.server import Server

log = structlog.get_logger("chatd")

UDP_NAME = "udp"
STATE_NAME = "state"
#: what a handover stores: the UDP socket and the state
NEEDED_STORE = 2
#: sent by ``chatd systemd-stop`` to the daemon: put everything in the fd store and exit
HANDOVER_SIGNAL = signal.SIGUSR1
#: a state memfd larger than this is not read (a room of a million users is far below it)
MAX_STATE_BYTES = 256 * 1024 * 1024
#: how long the stop helper waits for the daemon to hand over and exit
HANDOVER_WAIT_SECONDS = 60.0
_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
# Linux: the socket options that queue ICMP errors (see chatd.server.tune_socket)
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)


class StateFdError(ValueError):
    """The stored state fd could not be read (not a memfd, unsealed, too large)."""


# -- the state as a memfd -------------------------------------------------------------------


def write_state(blob: bytes) -> int:
    """A sealed memfd holding ``blob``; the caller closes it.

    Sealed (no write, grow, shrink, or further seals) because the fd store
    keeps it for a process that has not started yet: nobody holding a copy can
    change what it will read.
    """
    fd = os.memfd_create("chatd-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int, limit: int = MAX_STATE_BYTES) -> bytes:
    """What a state memfd holds; :class:`StateFdError` for anything else."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise StateFdError(f"not a memfd: {exc.strerror}") from None
    if seals & fcntl.F_SEAL_WRITE == 0:
        raise StateFdError("the memfd is not sealed against writing")
    size = os.fstat(fd).st_size
    if size > limit:
        raise StateFdError(f"{size} bytes, more than the {limit} read")
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# -- on the way up --------------------------------------------------------------------------


@dataclass
class Inherited:
    """What systemd passed to ``chatd run``, sorted out by name."""

    #: the socket to serve, if one was passed
    sock: socket.socket | None = None
    #: where it came from: "socket-unit" (chatd.socket) or "fdstore" (the last process)
    origin: str | None = None
    #: the last process's state blob, if one was stored and could be read
    state: bytes | None = None
    #: why a stored state could not be read
    state_problem: str | None = None
    #: names of what was taken from the fd store: removed from it once used
    stored: list[str] = field(default_factory=list)
    #: names of passed fds that chatd had no use for (closed)
    unused: list[str] = field(default_factory=list)


def inherit(passed: list[tuple[int, str]] | None = None) -> Inherited:
    """Sort the passed fds (default: :func:`chatd.systemd.passed_fds`) into an :class:`Inherited`.

    A socket unit's fd (any name but ours) wins over a stored ``udp``: it is the
    one systemd listens on while chatd is down. Raises OSError when the socket
    to serve is not a UDP socket. Every fd not used is closed.
    """
    passed = systemd.passed_fds() if passed is None else passed
    found = Inherited()
    sockets = [fd for fd, name in passed if name not in (UDP_NAME, STATE_NAME)]
    stored_udp = [fd for fd, name in passed if name == UDP_NAME]
    states = [fd for fd, name in passed if name == STATE_NAME]
    chosen = (sockets or stored_udp or [None])[0]
    try:
        if chosen is not None:
            found.sock = systemd.udp_socket_from_fd(chosen)
            found.origin = "socket-unit" if sockets else "fdstore"
        if states:
            try:
                found.state = read_state(states[0])
            except StateFdError as exc:
                found.state_problem = str(exc)
    finally:
        for fd, name in passed:
            if fd != chosen:
                with contextlib.suppress(OSError):
                    os.close(fd)
                if name not in (UDP_NAME, STATE_NAME):
                    found.unused.append(name)
    found.stored = sorted({name for _, name in passed if name in (UDP_NAME, STATE_NAME)})
    return found


def forget_stored(notifier: systemd.Notifier, names: list[str]) -> None:
    """Ask systemd to drop ``names`` from the fd store: used once, they must not come back
    (a later crash or start would restore a room that has moved on)."""
    for name in names:
        notifier.notify(FDSTOREREMOVE=1, FDNAME=name)


def take_over(server: Server, inherited: Inherited, notifier: systemd.Notifier,
              restore: Callable[[Server, bytes], dict[str, Any]]) -> dict[str, Any] | None:
    """Restore the last process's state into ``server`` (which has not served yet); returns
    what :func:`chatd.handover.state.restore` said, or None for a fresh room.

    A state that cannot be read or restored is logged and the room starts
    fresh: a restart must never turn into a crash loop. What was taken from
    the store is then dropped from it.
    """
    if inherited.unused:
        log.warning("passed_fds_unused", names=inherited.unused, note="closed")
    if inherited.state_problem is not None:
        log.error("handover_state_unreadable", via="systemd", error=inherited.state_problem,
                  note="starting with an empty room")
    summary: dict[str, Any] | None = None
    if inherited.state is not None:
        began = time.monotonic()
        try:
            summary = restore(server, inherited.state)
        except Exception as exc:  # StateError, or anything else: never a crash
            log.error("handover_state_unreadable", via="systemd", bytes=len(inherited.state),
                      error=str(exc) or type(exc).__name__, note="starting with an empty room")
        else:
            taken_at = summary.get("taken_at")
            pause = {"pause_ms": round((time.time() - taken_at) * 1000, 1)} if isinstance(
                taken_at, (int, float)) else {}
            logged = {k: v for k, v in summary.items() if k not in ("taken_at", "cluster")}
            log.info("handover_done", via="systemd", socket=inherited.origin,
                     restore_ms=round((time.monotonic() - began) * 1000, 1), **pause, **logged)
    forget_stored(notifier, inherited.stored)
    return summary


def handle_restart(server: Server, notifier: systemd.Notifier, *, store_socket: bool,
                   capture: Callable[[Server], bytes]) -> None:
    """On :data:`HANDOVER_SIGNAL`, hand the room over to the fd store and stop silently.

    From the loop, between datagrams: stop reading (what arrives waits in the
    socket), send what the room already accepted, then :func:`hand_over`. If
    that fails the daemon stops as on SIGTERM, with the goodbye: the next
    process starts fresh, and nobody is left believing they are still in.
    """
    def on_signal() -> None:
        server.pause_reading()
        server.notifier.stopping()
        server.apply(server.room.flush())
        server.drain_backlog(SHUTDOWN_FLUSH_SECONDS)
        try:
            summary = hand_over(notifier, server.sock, lambda: capture(server),
                                store_socket=store_socket)
        except Exception as exc:  # whatever it was: the users get their goodbye instead
            log.error("handover_failed", via="systemd", error=str(exc) or type(exc).__name__,
                      note="saying goodbye instead")
            server.stop(f"{HANDOVER_SIGNAL.name} (handover failed)")
            return
        log.info("handed_over", via="systemd", sessions=len(server.room), **summary)
        server.handed_over = True
        server.stop(f"{HANDOVER_SIGNAL.name} (handover)")

    server.handle_signal(HANDOVER_SIGNAL, on_signal)


# -- on the way down ------------------------------------------------------------------------


def quiet_errors(sock: socket.socket) -> None:
    """Stop queueing ICMP errors on ``sock`` and clear those queued.

    systemd drops a stored fd on EPOLLERR, and a socket unit that sees it while
    chatd is down fails ("unexpected poll event"): a client that vanished just
    before the restart must cost neither. The next process turns it on again.
    """
    for level, option in ((socket.IPPROTO_IP, _IP_RECVERR), (socket.IPPROTO_IPV6, _IPV6_RECVERR)):
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, 0)
    for _ in range(100_000):
        try:
            sock.recvmsg(1, 512, _MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            break
    with contextlib.suppress(OSError):
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading it clears it


def hand_over(notifier: systemd.Notifier, sock: socket.socket, capture: Callable[[], bytes], *,
              store_socket: bool) -> dict[str, Any]:
    """Put ``sock`` (if ``store_socket``) and ``capture()``'s blob in the fd store.

    Returns what was handed over, for the log. Raises (OSError, or whatever
    ``capture`` raises) when it could not: the caller then says goodbye as on
    any stop, and a state that may have reached the store is removed from it
    first, so that nobody is both told goodbye and kept.
    """
    began = time.monotonic()
    blob = capture()
    memfd = write_state(blob)
    try:
        quiet_errors(sock)
        if store_socket:
            notifier.notify_with_fds([sock.fileno()], FDSTORE=1, FDNAME=UDP_NAME)
        try:
            notifier.notify_with_fds([memfd], FDSTORE=1, FDNAME=STATE_NAME)
            notifier.barrier()
        except BaseException:
            forget_stored(notifier, [STATE_NAME])
            raise
    finally:
        os.close(memfd)
    return {"bytes": len(blob), "socket_stored": store_socket,
            "ms": round((time.monotonic() - began) * 1000, 1)}


# -- chatd systemd-stop: ExecStop= of chatd.service -----------------------------------------


def _systemctl(*args: str) -> str:
    systemctl = shutil.which("systemctl") or "/bin/systemctl"
    result = subprocess.run([systemctl, *args], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit {result.returncode}"
        raise OSError(f"systemctl {' '.join(args)}: {why}")
    return result.stdout


def show(target: str, *props: str) -> dict[str, str]:
    """``systemctl show`` of a unit or a job id, as a dict."""
    out = _systemctl("show", target, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def stop_decision(unit: str, query: Callable[..., dict[str, str]] = show) -> tuple[bool, str]:
    """(hand over?, why): a handover only for a ``restart`` job with room in the fd store.

    The job is what the person asked for: ``systemctl restart`` and
    ``try-restart`` run a restart job (its stop half runs ExecStop=);
    ``systemctl stop``, a shutdown, a conflicting unit's start run a stop job.
    """
    props = query(unit, "Job", "FileDescriptorStoreMax")
    job = props.get("Job", "").strip()
    if not job:
        return False, "no job is pending for the unit"
    job_type = query(job, "JobType").get("JobType", "")
    if job_type != "restart":
        return False, f"job {job} is a {job_type or 'unknown'} job"
    store = props.get("FileDescriptorStoreMax", "0")
    if not store.isdigit() or int(store) < NEEDED_STORE:
        return False, (f"job {job} is a restart, but FileDescriptorStoreMax={store} "
                       f"(at least {NEEDED_STORE} is needed)")
    return True, f"job {job} is a restart"


def wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (within ``timeout``)."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        finally:
            os.close(pidfd)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


def stop_helper(unit: str, mainpid: str | None = None,
                check_config: Callable[[], str | None] | None = None,
                query: Callable[..., dict[str, str]] = show) -> int:
    """``chatd systemd-stop [-c FILE] UNIT``: stop the daemon, by a handover on a restart.

    A restart job gets :data:`HANDOVER_SIGNAL`, anything else SIGTERM (the
    goodbye); then it waits for the daemon to exit, as ExecStop= should. Under
    systemd the old process cannot wait for the new one to be ready, so the
    configuration the new one will read is checked first (``check_config``
    says what is wrong with it): a file that would fail the start gets the
    goodbye, not a room nobody will serve. It never fails the stop: whatever
    goes wrong (no systemd to ask, a daemon already gone) it says so and goes
    for the goodbye, the safe way; a daemon that does not exit in time is left
    to systemd's SIGTERM and SIGKILL.
    """
    mainpid = os.environ.get("MAINPID", "") if mainpid is None else mainpid
    if not mainpid.isdigit() or int(mainpid) <= 1:
        print(f"chatd systemd-stop: {unit} has no main process; nothing to do")
        return 0
    pid = int(mainpid)
    try:
        handing_over, why = stop_decision(unit, query)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        handing_over, why = False, f"cannot ask systemd ({exc})"
    problem = check_config() if handing_over and check_config is not None else None
    if problem is not None:
        handing_over, why = False, f"{why}, but the next process cannot start: {problem}"
    signum = HANDOVER_SIGNAL if handing_over else signal.SIGTERM
    what = "a handover to the fd store" if handing_over else "goodbye"
    try:
        os.kill(pid, signum)
    except OSError as exc:
        print(f"chatd systemd-stop: {why}; cannot signal pid {pid}: {exc.strerror}")
        return 0
    began = time.monotonic()
    if wait_exit(pid, HANDOVER_WAIT_SECONDS):
        print(f"chatd systemd-stop: {why}: {signal.Signals(signum).name} to pid {pid} "
              f"({what}); it exited in {time.monotonic() - began:.3f} s")
    else:
        print(f"chatd systemd-stop: {why}: {signal.Signals(signum).name} to pid {pid} "
              f"({what}); it did not exit within {HANDOVER_WAIT_SECONDS:.0f} s")
    return 0
