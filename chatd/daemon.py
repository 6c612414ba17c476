"""Process management: run in the foreground, or start a classic double-forked daemon.

Everything that can fail, or needs root, happens before python-daemon's
``DaemonContext.open()``, in the process the person is watching: validate the
config, take the pidfile lock, bind the socket, open the log file, resolve
the user. Only then does it fork. The daemon reports back through a pipe
("PID n", then "READY addr" or "ERROR text"), so ``chatd start`` returns when
the room is really serving, or shows the daemon's own error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from chatd import fdstore, safefs, systemd
from chatd import log as log_mod
from chatd import pidfile as pidfile_mod
from chatd.admin import AdminService, AdminStartError
from chatd.config import Settings
from chatd.control import files, peers
from chatd.control.channel import LineBuffer
from chatd.formats import format_addr
from chatd.handover import state, transfer
from chatd.handover.giver import HandoverService, SelfRestart
from chatd.handover.takeover import Successor, TakeoverFailed, take_over
from chatd.pidfile import PidFile, State
from chatd.server import BindError, Server, bind_udp, tune_socket
from chatd.services import Service

log = structlog.get_logger("chatd")

PR_SET_CHILD_SUBREAPER = 36


class StartError(Exception):
    """Start-up failed; the message is for the person who typed the command.

    ``key`` is the setting at fault, if one is (``daemon.user``), so that
    ``check-config`` can name its line.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class Prepared:
    settings: Settings
    config_path: str | None
    pidfile: PidFile
    sock: socket.socket | None  # None for a takeover: the running daemon hands it over
    sink: log_mod.Sink
    identity: tuple[int, int] | None  # (uid, gid) to become, when configured
    log_file_default: str | None = None  # the log file when the config sets none
    #: ``metrics.listen``, bound before the fork (and before privileges drop); every
    #: admin child serves it in turn (chatd.metrics_http), the daemon never reads it
    metrics_sock: socket.socket | None = None
    inherited: fdstore.Inherited | None = None  # what systemd passed to `chatd run`


def default_log_file() -> str:
    if os.geteuid() == 0:
        return "/var/log/chatd/chatd.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "chatd", "chatd.log")


def resolve_identity(settings: Settings) -> tuple[int, int] | None:
    """The (uid, gid) of ``daemon.user``/``daemon.group``, or None to stay who we are."""
    user, group = settings.daemon.user, settings.daemon.group
    if user is None and group is None:
        return None
    try:
        entry = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.getuid())
    except KeyError:
        raise StartError(f"daemon.user: no such user {user!r}", "daemon.user") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError(f"daemon.group: no such group {group!r}",
                             "daemon.group") from None
    if os.geteuid() != 0 and (entry.pw_uid, gid) != (os.getuid(), os.getgid()):
        raise StartError("daemon.user and daemon.group need chatd to be started as root",
                         "daemon.user" if user is not None else "daemon.group")
    return entry.pw_uid, gid


def drop_privileges(identity: tuple[int, int] | None) -> None:
    if identity is None or os.geteuid() != 0:
        return
    uid, gid = identity
    name = pwd.getpwuid(uid).pw_name
    os.setgroups([])
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)


def resolve_control_group(settings: Settings) -> int | None:
    group = settings.control.group
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartError(f"control.group: no such group {group!r}") from None


def _make_runtime_dir(settings: Settings, identity: tuple[int, int] | None,
                      control_gid: int | None) -> None:
    """Create or check runtime_dir, and make it the daemon user's while we are still root.

    It must be a real directory (not a link), owned by root or the daemon's user,
    and writable by nobody else: whoever can write in it can swap the pidfile,
    the control socket or the FIFO. With ``control.group`` it gets that group and
    the set-group-ID bit, so the socket and FIFO the daemon's user creates in it
    later (also after a wipe) belong to the group without a chgrp it may not do.
    """
    path = settings.runtime_dir
    owner = identity[0] if identity is not None else os.geteuid()
    try:
        safefs.make_dir(path, 0o755)
        fd = safefs.open_private_dir(path, {0, owner})
    except safefs.UnsafePath as exc:
        raise StartError(f"refusing runtime_dir: {exc.strerror} (or set runtime_dir "
                         "in the config)") from None
    except OSError as exc:
        raise StartError(f"cannot create runtime_dir {path}: {exc.strerror}") from None
    try:
        if identity is not None and os.geteuid() == 0:
            uid, gid = identity
            os.fchown(fd, uid, control_gid if control_gid is not None else gid)
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.fchmod(fd, mode | stat.S_ISGID if control_gid is not None else mode & ~stat.S_ISGID)
    except OSError as exc:
        raise StartError(f"cannot give runtime_dir {path} to {safefs.user_name(owner)}: "
                         f"{exc.strerror}") from None
    finally:
        os.close(fd)
    if not os.access(path, os.W_OK) and identity is None:
        raise StartError(f"runtime_dir {path} is not writable (set runtime_dir in the config)")


#: Longest path a Unix socket can be bound to (sun_path holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107


def preflight(settings: Settings) -> tuple[int, int] | None:
    """Every check of start-up that needs neither the port nor a change on disk.

    ``start`` and ``run`` begin with it, and ``check-config`` runs it too, so that
    ``ExecStartPre=`` refuses what start would refuse. Returns the (uid, gid) to
    become, as :func:`resolve_identity`; raises :class:`StartError`.
    """
    identity = resolve_identity(settings)
    try:
        peers.group_members(settings.control.group)
    except OSError as exc:
        raise StartError(str(exc.strerror), "control.group") from None
    path = settings.runtime_dir
    if os.path.isdir(path):
        # as root with daemon.user, start hands it over to that user instead
        if identity is None and not os.access(path, os.W_OK):
            raise StartError(f"runtime_dir {path} is not writable "
                             "(set runtime_dir in the config)", "runtime_dir")
    else:
        problem = _creation_problem(path, directory=True)
        if problem is not None:
            raise StartError(f"cannot create runtime_dir {path}: {problem}", "runtime_dir")
    if settings.log.file is not None:
        problem = _creation_problem(settings.log.file, directory=False)
        if problem is not None:
            raise StartError(f"cannot open log.file {settings.log.file}: {problem}", "log.file")
    sock_path = settings.control.socket
    if len(os.fsencode(sock_path)) > MAX_SOCKET_PATH:
        raise StartError(f"control.socket: {sock_path} is too long for a Unix socket "
                         f"(at most {MAX_SOCKET_PATH} bytes)", "control.socket")
    return identity


def _creation_problem(path: str, *, directory: bool) -> str | None:
    """Why creating ``path`` (or, when it exists, writing to it) would fail, as the
    system would say it, without creating anything; None when it would work."""
    if os.path.exists(path):
        if os.path.isdir(path) != directory:
            return os.strerror(errno.EEXIST if directory else errno.EISDIR)
        return None if os.access(path, os.W_OK) else os.strerror(errno.EACCES)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return os.strerror(errno.ENOTDIR)
    return None if os.access(parent, os.W_OK | os.X_OK) else os.strerror(errno.EACCES)


def prepare(settings: Settings, config_path: str | None, *, daemonize: bool) -> Prepared:
    """Do every fallible step of start-up while errors can still reach the person."""
    if config_path is not None:
        # the daemon's cwd is "/": a relative -c FILE would make every reload fail
        config_path = os.path.abspath(config_path)
    log_file_default = default_log_file() if daemonize else None
    if log_file_default is not None and settings.log.file is None:
        settings = replace(settings, log=replace(settings.log, file=log_file_default))
    identity = preflight(settings)
    _make_runtime_dir(settings, identity, resolve_control_group(settings))
    pidfile = PidFile(settings.pidfile)
    try:
        pidfile.acquire()
    except pidfile_mod.AlreadyRunning as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise StartError(f"cannot lock pidfile {settings.pidfile}: {exc.strerror}") from None
    try:
        sink = _open_log(settings, identity)
        if pidfile.stale_pid is not None:
            log.warning("stale_pidfile_taken_over", pidfile=settings.pidfile,
                        old_pid=pidfile.stale_pid)
        try:
            inherited = None if daemonize else fdstore.inherit()
        except OSError as exc:
            raise StartError(f"socket activation: {exc}") from None
        sock = inherited.sock if inherited is not None else None
        if sock is not None:
            tune_socket(sock, settings.listen)
            log.info("socket_activation" if inherited.origin == "socket-unit"
                     else "socket_from_fdstore", fd=sock.fileno(), note="listen.* is ignored")
        else:
            try:
                sock = bind_udp(settings.listen)
            except BindError as exc:
                raise StartError(str(exc)) from None
        metrics_sock = _bind_metrics(settings, sock)
    except BaseException:
        pidfile.release()
        raise
    return Prepared(settings, config_path, pidfile, sock, sink, identity, log_file_default,
                    metrics_sock=metrics_sock, inherited=inherited)


def _open_log(settings: Settings, identity: tuple[int, int] | None) -> log_mod.Sink:
    """Log to ``log.file`` (made ``daemon.user``'s first, as root), or to stderr."""
    try:
        if settings.log.file is not None and identity is not None and os.geteuid() == 0:
            log_mod.prepare_log_file(settings.log.file, identity)
        return log_mod.configure(settings.log)
    except OSError as exc:
        raise StartError(f"cannot open log.file {settings.log.file}: {exc.strerror}") from None


def _bind_metrics(settings: Settings, udp: socket.socket | None) -> socket.socket | None:
    """The ``metrics.listen`` socket, or None when it is off; the UDP socket (if any) is
    closed when it cannot be bound (start-up ends with the error naming the key)."""
    if settings.metrics.listen is None:
        return None
    from chatd.metrics_http import MetricsBindError, bind  # prometheus_client only if on

    try:
        return bind(settings.metrics.listen)
    except MetricsBindError as exc:
        if udp is not None:
            udp.close()
        raise StartError(str(exc.strerror), "metrics.listen") from None


def _serve(prepared: Prepared, notifier: systemd.Notifier,
           on_ready: Callable[[], None] | None = None) -> int:
    """The daemon proper, shared by ``run`` and ``start``.

    Releasing the pidfile is its very last act: ``stop`` returns, and ``restart``
    binds the port again, the moment the lock is free. After a handover the lock
    is not released but left to the process that took over (it has the same file).
    """
    assert prepared.sock is not None
    server: Server | None = None
    try:
        drop_privileges(prepared.identity)
        _check_log_reopenable(prepared.settings)
        prepared.pidfile.write(os.getpid())
        # A forked child (the admin child) would share the lock and keep "running" true
        # after the daemon was killed or had stopped; only the daemon may hold it.
        os.register_at_fork(after_in_child=prepared.pidfile.forget)
        server = Server(prepared.settings, prepared.sock, notifier=notifier,
                        config_path=prepared.config_path)
        server.log_file_default = prepared.log_file_default
        server.install_signals()
        server.add_service(PidfileKeeper(prepared.pidfile))
        try:
            server.add_service(AdminService(
                server, read_terminal=on_ready is None and _stdin_is_tty(),
                metrics_sock=prepared.metrics_sock))
        except AdminStartError as exc:
            raise StartError(str(exc)) from None
        restored = _systemd_take_over(server, prepared, notifier)
        if prepared.settings.cluster.enabled:
            bridge = _cluster_bridge(server)
            bridge.resume = restored.get("cluster") if restored else None
            server.add_service(bridge)
        if on_ready is not None:  # the classic daemon: chatd restart hands the room over
            server.add_service(SelfRestart(server))
            server.add_service(HandoverService(server, prepared.pidfile))
        _systemd_restart(server, prepared, notifier)
        return server.serve(ready=on_ready)
    finally:
        if prepared.inherited is not None and prepared.inherited.origin == "socket-unit":
            fdstore.quiet_errors(prepared.sock)  # systemd watches it again: no stale error
        prepared.sock.close()  # the port first: it must be free once the lock is
        if prepared.metrics_sock is not None:
            prepared.metrics_sock.close()
        _let_go(prepared.pidfile, server)


def _let_go(pidfile: PidFile, server: Server | None) -> None:
    if server is not None and server.handed_over:
        pidfile.forget()  # the new process holds the same lock and has published its pid
    else:
        pidfile.release()


def _cluster_bridge(server: Server) -> Service:
    """The cluster's service (only with ``cluster.redis``: a single node never loads
    chatd.cluster, nor Redis's client). Redis itself is reached later, by the link's
    threads: a Redis that is down at start-up does not stop the node from serving."""
    from chatd.cluster.bridge import ClusterBridge

    try:
        return ClusterBridge(server, server.settings.cluster)
    except ValueError as exc:
        raise StartError(str(exc), "cluster.redis") from None


def _systemd_take_over(server: Server, prepared: Prepared,
                       notifier: systemd.Notifier) -> dict[str, Any] | None:
    """`systemctl restart` keeps everyone (chatd.fdstore): take over what the last process
    stored; returns what was restored (None: a fresh room)."""
    if prepared.inherited is None:
        return None
    return fdstore.take_over(server, prepared.inherited, notifier, restore=state.restore)


def _systemd_restart(server: Server, prepared: Prepared, notifier: systemd.Notifier) -> None:
    """Be ready to store the socket and the state for the next process."""
    if notifier.enabled:
        origin = prepared.inherited.origin if prepared.inherited is not None else None
        fdstore.handle_restart(server, notifier, store_socket=origin != "socket-unit",
                               capture=state.capture)


def _check_log_reopenable(settings: Settings) -> None:
    """Say at start-up, not after the first rotation, that logging would then stop."""
    path = settings.log.file
    problem = log_mod.reopen_problem(path) if path is not None else None
    if problem is not None:
        log.warning("log_file_not_reopenable", path=path, problem=problem,
                    hint="once logrotate moves the file away, lines go on to the moved file; "
                    "give chatd's user write access to the directory, or use copytruncate")


class PidfileKeeper(Service):
    """Publishes the pidfile again, each tick, when it was removed (runtime_dir wiped)."""

    name = "pidfile"

    def __init__(self, pidfile: PidFile):
        self.pidfile = pidfile

    def tick(self, now: float) -> None:
        try:
            if self.pidfile.keep_published(os.getpid()):
                log.warning("pidfile_recreated", pidfile=self.pidfile.path)
        except OSError as exc:
            log.error("pidfile_lost", pidfile=self.pidfile.path, error=exc.strerror)


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


# -- chatd run ------------------------------------------------------------------


def run_foreground(settings: Settings, config_path: str | None) -> int:
    try:
        prepared = prepare(settings, config_path, daemonize=False)
        notifier = systemd.Notifier()
        systemd.forget_environment()
        return _serve(prepared, notifier)
    except StartError as exc:
        log_mod.print_stderr(f"chatd: {exc}")
        return 1


# -- chatd start ----------------------------------------------------------------


def _become_subreaper() -> None:
    """Orphans of our own forks come back to us, so we can reap them: no zombie anywhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def start(settings: Settings, config_path: str | None) -> int:
    try:
        prepared = prepare(settings, config_path, daemonize=True)
    except StartError as exc:
        log_mod.print_stderr(f"chatd: {exc}")
        return 1
    read_end, write_end = os.pipe()
    _become_subreaper()
    child = os.fork()
    if child == 0:  # the intermediate; python-daemon forks twice more and exits here
        os.close(read_end)
        _daemon_child(prepared, write_end)
        os._exit(1)  # not reached
    os.close(write_end)
    prepared.sock.close()
    if prepared.metrics_sock is not None:
        prepared.metrics_sock.close()
    prepared.pidfile.forget()  # the daemon holds the lock now (one open file, shared)
    return _await_daemon(prepared.settings, read_end, child)


def _daemon_child(prepared: Prepared, ready_fd: int, takeover: bool = False) -> None:
    import daemon as python_daemon

    pipe: list[int] = [ready_fd]  # emptied once closed: its number may then be reused

    def report(line: str) -> None:
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.write(fd, (line + "\n").encode())

    def close_pipe() -> None:
        while pipe:
            with contextlib.suppress(OSError):
                os.close(pipe.pop())

    try:
        context = python_daemon.DaemonContext(
            detach_process=True,  # explicit: its auto-detection skips the fork under init
            umask=prepared.settings.daemon.umask,
            working_directory="/",
            files_preserve=[ready_fd,
                            *([] if takeover else [prepared.sock.fileno(),
                                                   prepared.pidfile.fileno()]),
                            *([prepared.sink.fileno()] if prepared.sink.fileno() else []),
                            *([prepared.metrics_sock.fileno()] if prepared.metrics_sock
                              else [])],
            signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
        )
        context.open()
    except Exception as exc:
        report(f"ERROR cannot daemonize: {exc}")
        os._exit(1)
    # from here on: the daemon, an orphan in its own session; its session id is the pid
    # of python-daemon's middle process, which the starter must reap (see _await_daemon)
    report(f"PID {os.getpid()} {os.getsid(0)}")
    systemd.forget_environment()
    code = 1
    try:
        def ready(sock: socket.socket | None = None) -> None:
            sock = sock or prepared.sock
            assert sock is not None
            report(f"READY {format_addr(sock.getsockname())}")
            close_pipe()

        if takeover:
            code = _serve_takeover(prepared, report, ready)
        else:
            code = _serve(prepared, systemd.Notifier(address=""), on_ready=ready)
    except Exception as exc:
        log.exception("daemon_failed")
        report(f"ERROR {exc}")
    finally:
        os._exit(code)


def _await_daemon(settings: Settings, read_end: int, intermediate: int,
                  takeover: bool = False) -> int:
    """Wait for the daemon's word on the pipe, reaping the forks in between.

    ``takeover``: the new daemon of ``chatd restart``; the old one holds the pidfile
    throughout, and serves on when the new one fails.
    """
    deadline = time.monotonic() + settings.daemon.start_timeout
    lines = LineBuffer(limit=None)
    daemon_pid: int | None = None
    leader: int | None = None
    outcome: str | None = None
    handed: str | None = None
    try:
        while outcome is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([read_end], [], [], min(remaining, 0.2))
            _reap_children()
            if not ready:
                continue
            chunk = os.read(read_end, 4096)
            if not chunk:
                outcome = outcome or "ERROR the daemon exited during start-up (see the log)"
                break
            for line in lines.feed(chunk)[0]:
                text = line.decode(errors="replace")
                if text.startswith("PID "):
                    daemon_pid, leader = _parse_pid_line(text)
                elif text.startswith("HANDOVER "):
                    handed = text.removeprefix("HANDOVER ")
                else:
                    outcome = text
    finally:
        os.close(read_end)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(intermediate, 0)
    if leader is not None and leader not in (daemon_pid, os.getpid()):
        # Orphaned by the intermediate, it is our child now (we are a subreaper) and
        # exits right after its fork. WNOHANG polls could miss it and leave it to
        # pid 1, which is not always a reaper. ECHILD: already reaped, or no subreaper.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(leader, 0)
    if outcome is not None and outcome.startswith("READY "):
        _reap_children()
        if takeover:
            print(f"chatd restarted (pid {daemon_pid}, udp {outcome[6:]}): {handed}")
        else:
            print(f"chatd started (pid {daemon_pid}, udp {outcome[6:]})")
        return 0
    if outcome is None:
        limit = settings.daemon.start_timeout
        outcome = f"ERROR the daemon did not become ready within {limit:g} s"
        if daemon_pid is not None:
            _kill_quietly(daemon_pid, signal.SIGKILL)
    if takeover:
        _reap_children()
        log_mod.print_stderr(f"chatd: restart failed: {outcome.removeprefix('ERROR ')}")
        log_mod.print_stderr("chatd: the running daemon goes on serving, as it was")
        return 1
    if wait_unlocked(settings.pidfile, 5.0):
        remove_stale(settings)  # a killed or crashed daemon could not remove it
    _reap_children()
    log_mod.print_stderr(f"chatd: {outcome.removeprefix('ERROR ')}")
    return 1


def _parse_pid_line(text: str) -> tuple[int, int | None]:
    """``PID n [sid]`` -> (n, sid): the daemon's pid and its session leader's."""
    fields = [int(f) for f in text.split()[1:3]]
    return fields[0], (fields[1] if len(fields) > 1 else None)


def _kill_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def wait_unlocked(path: str, timeout: float) -> bool:
    """Bounded poll until nobody holds the pidfile lock (reaping what ``start`` forked)."""
    deadline = time.monotonic() + timeout
    while True:
        if pidfile_mod.probe(path).state is not State.RUNNING:
            return True
        if time.monotonic() >= deadline:
            return False
        _reap_children()
        time.sleep(0.02)


def remove_stale(settings: Settings, control_files: bool = False) -> None:
    """Remove what a SIGKILLed daemon left: its pidfile, so that status says "stopped",
    and (``control_files``: it was ours, it served them) the control socket and FIFO.

    Holding the pidfile lock meanwhile makes this safe against a daemon starting at
    the same moment: it cannot get past acquire(), and release() only removes the
    pidfile if it is still the one we locked.
    """
    stale = PidFile(settings.pidfile)
    try:
        stale.acquire()
    except (pidfile_mod.AlreadyRunning, OSError):
        return
    try:
        if control_files:
            files.remove_files(settings.control)
            _remove_socket_file(transfer.socket_path(settings.runtime_dir))
    finally:
        stale.release()


def _remove_socket_file(path: str) -> None:
    """A dead daemon's handover socket (a socket, never whatever else is at that name)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


# -- chatd restart: a handover -------------------------------------------------------------


def restart(settings: Settings, config_path: str | None) -> int:
    """``chatd restart``: a new daemon, ready first, takes the socket and the room over.

    When no daemon runs, it is a plain start. Whatever goes wrong before the old
    daemon has handed over, it serves on and this returns 1 with the new one's error.
    """
    if pidfile_mod.probe(settings.pidfile).state is not State.RUNNING:
        print("chatd: not running; starting it")
        return start(settings, config_path)
    try:
        prepared = _prepare_takeover(settings, config_path)
    except StartError as exc:
        log_mod.print_stderr(f"chatd: restart failed: {exc}")
        log_mod.print_stderr("chatd: the running daemon goes on serving, as it was")
        return 1
    read_end, write_end = os.pipe()
    _become_subreaper()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        _daemon_child(prepared, write_end, takeover=True)
        os._exit(1)  # not reached
    os.close(write_end)
    return _await_daemon(prepared.settings, read_end, child, takeover=True)


def _prepare_takeover(settings: Settings, config_path: str | None) -> Prepared:
    """What :func:`prepare` does, but for the pidfile and the port: the running daemon
    keeps those until it hands them over."""
    if config_path is not None:
        config_path = os.path.abspath(config_path)
    log_file_default = default_log_file()
    if settings.log.file is None:
        settings = replace(settings, log=replace(settings.log, file=log_file_default))
    identity = preflight(settings)
    _make_runtime_dir(settings, identity, resolve_control_group(settings))
    sink = _open_log(settings, identity)
    return Prepared(settings, config_path, PidFile(settings.pidfile), None, sink, identity,
                    log_file_default)


def _serve_takeover(prepared: Prepared, report: Callable[[str], None],
                    ready: Callable[[socket.socket], None]) -> int:
    """The new daemon of ``chatd restart``: ready first, then the room, then serve.

    Any failure before the old daemon says ``go`` ends this process with an
    ``ERROR`` line for ``chatd restart``; the old daemon serves on.
    """
    drop_privileges(prepared.identity)
    _check_log_reopenable(prepared.settings)
    server = Server(prepared.settings, None, notifier=systemd.Notifier(address=""),  # type: ignore[arg-type]
                    config_path=prepared.config_path)
    server.log_file_default = prepared.log_file_default
    # made now, started once the room is ours: a bad cluster setting fails the restart
    try:
        bridge = (_cluster_bridge(server) if prepared.settings.cluster.enabled else None)
    except StartError as exc:
        report(f"ERROR {exc}")
        return 1
    server.start_plugins()
    problems = server.plugins.startup_problems()
    if problems:
        report("ERROR " + "; ".join(f"plugin {name} failed at start-up: {error}"
                                     for name, error in problems))
        return 1
    try:
        conn, summary = take_over(server, prepared.pidfile)
    except TakeoverFailed as exc:
        log.error("takeover_failed", error=str(exc))
        report(f"ERROR {exc}")
        return 1
    sock = server.sock
    prepared.sock = sock
    log.info("handover_done", from_pid=summary["from_pid"], sessions=summary["sessions"],
             bytes=summary["bytes"], ms=summary["ms"], total_ms=summary["total_ms"])
    try:
        prepared.pidfile.write(os.getpid())
        os.register_at_fork(after_in_child=prepared.pidfile.forget)
        tune_socket(sock, prepared.settings.listen)
        server.install_signals()
        server.add_service(PidfileKeeper(prepared.pidfile))
        if bridge is not None:
            bridge.resume = summary["cluster"]  # None from a single node: a fresh start
            server.add_service(bridge)

        def old_gone() -> None:
            """The old daemon and its admin child have gone: their files are free, and
            so is the metrics port."""
            try:
                prepared.metrics_sock = _bind_metrics(prepared.settings, None)
            except StartError as exc:
                log.error("metrics_unavailable", error=str(exc))
            try:
                server.add_service(AdminService(server, metrics_sock=prepared.metrics_sock))
            except AdminStartError as exc:
                log.error("admin_child_failed", error=str(exc))
            server.add_service(SelfRestart(server))
            server.add_service(HandoverService(server, prepared.pidfile))
            report(f"HANDOVER took over from pid {summary['from_pid']}: "
                   f"{summary['sessions']} sessions, {summary['bytes']} bytes, "
                   f"{summary['ms']} ms pause")
            ready(sock)

        server.add_service(Successor(server, conn, summary["from_pid"], old_gone))
        return server.serve()
    finally:
        sock.close()
        if prepared.metrics_sock is not None:
            prepared.metrics_sock.close()
        _let_go(prepared.pidfile, server)
