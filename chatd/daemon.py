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
from dataclasses import dataclass, replace

import structlog

from chatd import control, safefs, systemd
from chatd import log as log_mod
from chatd import pidfile as pidfile_mod
from chatd.admin import AdminStartError, AdminSupervisor
from chatd.config import Settings, describe_reload
from chatd.formats import format_addr
from chatd.pidfile import PidFile, State
from chatd.server import BindError, Server, bind_udp, tune_socket

log = structlog.get_logger("chatd")

PR_SET_CHILD_SUBREAPER = 36
EXIT_DENIED = 4  # stop/reload: permission denied (status: LSB "unknown")


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
    sock: socket.socket
    sink: log_mod.Sink
    identity: tuple[int, int] | None  # (uid, gid) to become, when configured
    log_file_default: str | None = None  # the log file when the config sets none


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
        control.group_members(settings.control.group)
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
        try:
            if settings.log.file is not None and identity is not None and os.geteuid() == 0:
                log_mod.prepare_log_file(settings.log.file, identity)
            sink = log_mod.configure(settings.log)
        except OSError as exc:
            raise StartError(f"cannot open log.file {settings.log.file}: {exc.strerror}") from None
        if pidfile.stale_pid is not None:
            log.warning("stale_pidfile_taken_over", pidfile=settings.pidfile,
                        old_pid=pidfile.stale_pid)
        try:
            sock = None if daemonize else systemd.activated_socket()
        except OSError as exc:
            raise StartError(f"socket activation: {exc}") from None
        if sock is not None:
            tune_socket(sock, settings.listen)
            log.info("socket_activation", fd=sock.fileno(), note="listen.* is ignored")
        else:
            try:
                sock = bind_udp(settings.listen)
            except BindError as exc:
                raise StartError(str(exc)) from None
    except BaseException:
        pidfile.release()
        raise
    return Prepared(settings, config_path, pidfile, sock, sink, identity, log_file_default)


def _serve(prepared: Prepared, notifier: systemd.Notifier, on_ready=None) -> int:
    """The daemon proper, shared by ``run`` and ``start``.

    Releasing the pidfile is its very last act: ``stop`` returns, and ``restart``
    binds the port again, the moment the lock is free.
    """
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
        server.admin = AdminSupervisor(server, read_terminal=on_ready is None and _stdin_is_tty())
        try:
            server.admin.start()
        except AdminStartError as exc:
            raise StartError(str(exc)) from None
        server.on_tick.append(lambda now: _keep_pidfile(prepared.pidfile))
        if on_ready is not None:
            server.on_ready.append(on_ready)
        return server.serve()
    finally:
        prepared.sock.close()  # the port first: it must be free once the lock is
        prepared.pidfile.release()


def _check_log_reopenable(settings: Settings) -> None:
    """Say at start-up, not after the first rotation, that logging would then stop."""
    path = settings.log.file
    problem = log_mod.reopen_problem(path) if path is not None else None
    if problem is not None:
        log.warning("log_file_not_reopenable", path=path, problem=problem,
                    hint="once logrotate moves the file away, lines go on to the moved file; "
                    "give chatd's user write access to the directory, or use copytruncate")


def _keep_pidfile(pidfile: PidFile) -> None:
    try:
        if pidfile.keep_published(os.getpid()):
            log.warning("pidfile_recreated", pidfile=pidfile.path)
    except OSError as exc:
        log.error("pidfile_lost", pidfile=pidfile.path, error=exc.strerror)


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
    prepared.pidfile.forget()  # the daemon holds the lock now (one open file, shared)
    return _await_daemon(prepared.settings, read_end, child)


def _daemon_child(prepared: Prepared, ready_fd: int) -> None:
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
            files_preserve=[prepared.sock.fileno(), prepared.pidfile.fileno(), ready_fd,
                            *([prepared.sink.fileno()] if prepared.sink.fileno() else [])],
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
        def ready() -> None:
            report(f"READY {format_addr(prepared.sock.getsockname())}")
            close_pipe()

        code = _serve(prepared, systemd.Notifier(address=""), on_ready=ready)
    except Exception as exc:
        log.exception("daemon_failed")
        report(f"ERROR {exc}")
    finally:
        os._exit(code)


def _await_daemon(settings: Settings, read_end: int, intermediate: int) -> int:
    """Wait for the daemon's word on the pipe, reaping the forks in between."""
    deadline = time.monotonic() + settings.daemon.start_timeout
    buffer = b""
    daemon_pid: int | None = None
    leader: int | None = None
    outcome: str | None = None
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
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith("PID "):
                    daemon_pid, leader = _parse_pid_line(text)
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
        print(f"chatd started (pid {daemon_pid}, udp {outcome[6:]})")
        return 0
    if outcome is None:
        limit = settings.daemon.start_timeout
        outcome = f"ERROR the daemon did not become ready within {limit:g} s"
        if daemon_pid is not None:
            _kill_quietly(daemon_pid, signal.SIGKILL)
    if _wait_unlocked(settings.pidfile, 5.0):
        _remove_stale(settings)  # a killed or crashed daemon could not remove it
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


def _wait_unlocked(path: str, timeout: float) -> bool:
    """Bounded poll until nobody holds the pidfile lock."""
    deadline = time.monotonic() + timeout
    while True:
        if pidfile_mod.probe(path).state is not State.RUNNING:
            return True
        if time.monotonic() >= deadline:
            return False
        _reap_children()
        time.sleep(0.02)


# -- chatd stop / status / reload -----------------------------------------------------


class Refused(Exception):
    """A pid that ``stop``/``status``/``reload`` will not signal; the message says why."""


def verified_pid(settings: Settings, found: pidfile_mod.Probe) -> int:
    """The pid to signal: the one the pidfile names, only if that very process holds the
    pidfile's lock and is chatd. Raises :class:`Refused` otherwise.

    Whoever can write the pidfile (the daemon's user, after killing its daemon) can
    name any pid in it, and keep the lock held by a process of its own; root's
    ``chatd stop --kill`` would then kill whatever that pid is.
    """
    path, pid, holders = settings.pidfile, found.pid, found.holders
    if holders is None:
        raise Refused(f"cannot tell which process holds the lock on {path} (/proc/locks "
                      f"cannot be read): not signalling pid {pid}")
    if pid is None or pid not in holders:
        held = ", ".join(str(h) for h in holders) or "a process out of sight"
        named = f"names pid {pid}" if pid is not None else "names no pid"
        raise Refused(f"{path} {named}, but its lock is held by pid {held}: refusing to signal "
                      "either (was chatd killed and its pidfile replaced?)")
    argv = process_argv(pid)
    if not looks_like_chatd(argv):
        shown = " ".join(argv)[:200] or "its command line cannot be read"
        raise Refused(f"pid {pid} holds the lock on {path} but is not chatd ({shown}): "
                      "refusing to signal it")
    return pid


def process_argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def looks_like_chatd(argv: list[str]) -> bool:
    """``chatd ...``, ``python /usr/bin/chatd ...`` or ``python -m chatd ...``."""
    return any(arg == "-mchatd" or os.path.basename(arg) == "chatd" for arg in argv[:4])


def _signal(pid: int, signum: int) -> None:
    """os.kill that ignores a process already gone; PermissionError goes to the caller."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _denied(pid: int) -> int:
    try:
        owner = safefs.user_name(os.stat(f"/proc/{pid}").st_uid)
    except OSError:
        owner = "another user"
    log_mod.print_stderr(f"chatd: permission denied: pid {pid} runs as {owner}; "
                         f"run this as root or as {owner}")
    return EXIT_DENIED


def _unknown_exit(found: pidfile_mod.Probe) -> int:
    return EXIT_DENIED if found.errno in (errno.EACCES, errno.EPERM) else 1


def stop(settings: Settings, timeout: float = 10.0, kill: bool = False) -> int:
    found = pidfile_mod.probe(settings.pidfile)
    if found.state is State.UNKNOWN:
        log_mod.print_stderr(f"chatd: cannot tell whether chatd runs: {found.error}")
        return _unknown_exit(found)
    if found.state is not State.RUNNING or found.pid is None:
        print("chatd: not running")
        return 0
    try:
        pid = verified_pid(settings, found)
        _signal(pid, signal.SIGTERM)
    except Refused as exc:
        log_mod.print_stderr(f"chatd: {exc}")
        return 1
    except PermissionError:
        return _denied(found.pid)
    if _wait_unlocked(settings.pidfile, timeout):
        print(f"chatd stopped (pid {pid})")
        return 0
    if kill:
        again = pidfile_mod.probe(settings.pidfile)
        try:
            # the same process still, holding the lock: not a pid reused meanwhile
            if again.state is State.RUNNING:
                if verified_pid(settings, again) != pid:
                    raise Refused(f"pid {pid} no longer holds the lock on {settings.pidfile}")
                _signal(pid, signal.SIGKILL)
        except Refused as exc:
            log_mod.print_stderr(f"chatd: {exc}")
            return 1
        except PermissionError:
            return _denied(pid)
        if _wait_unlocked(settings.pidfile, 5.0):
            _remove_stale(settings, control_files=True)
            print(f"chatd killed (pid {pid}) after {timeout:g} s")
            return 0
    log_mod.print_stderr(f"chatd: pid {pid} did not stop within {timeout:g} s"
                         + ("" if kill else "; use 'chatd stop --kill' to send SIGKILL"))
    return 1


def _remove_stale(settings: Settings, control_files: bool = False) -> None:
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
            control.remove_files(settings.control)
    finally:
        stale.release()


def process_uptime(pid: int) -> float | None:
    """Seconds since ``pid`` started, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            system_up = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return system_up - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n] or ["0s"]
    return " ".join(shown[:2])


def daemon_uid(settings: Settings) -> int | None:
    """The uid of ``daemon.user``, whose control socket ``chatd`` and ``chatctl`` trust."""
    if settings.daemon.user is None:
        return None
    try:
        return pwd.getpwnam(settings.daemon.user).pw_uid
    except KeyError:
        return None


def _control_request(settings: Settings, cmd: str) -> tuple[dict | None, str]:
    """The daemon's answer through the control channel, or None and why it was not reached."""
    try:
        return control.request(settings.control.socket, cmd, timeout=5.0,
                               daemon_uid=daemon_uid(settings)), ""
    except control.ControlError as exc:
        return None, str(exc)


def status(settings: Settings) -> int:
    """LSB status codes: 0 running, 1 dead with a pidfile, 3 not running, 4 unknown."""
    found = pidfile_mod.probe(settings.pidfile)
    if found.state is State.UNKNOWN:
        log_mod.print_stderr(f"chatd: status unknown: {found.error}")
        return 4
    if found.state is State.ABSENT:
        print("chatd is not running")
        return 3
    if found.state is State.STALE:
        print(f"chatd is dead, but its pidfile remains ({settings.pidfile}, pid {found.pid})")
        return 1
    try:
        pid = verified_pid(settings, found)
    except Refused as exc:
        log_mod.print_stderr(f"chatd: status unknown: {exc}")
        return 4
    uptime = process_uptime(pid)
    up = f", up {format_duration(uptime)}" if uptime is not None else ""
    answer, problem = _control_request(settings, "status")
    if answer is None or not answer.get("ok"):
        why = problem or str(answer.get("error") if answer else "")
        print(f"chatd is running (pid {pid}{up}); control socket {settings.control.socket} "
              f"not answering" + (f" ({why})" if why else ""))
        return 0
    info = answer["result"]
    print(f"chatd is running (pid {pid}, udp {info['address']}{up})")
    print(f"users: {info['users']} of {info['max_users']}")
    counters = info.get("counters", {})
    drops = sum(info.get("drops", {}).values())
    print(f"datagrams: {counters.get('datagrams_in', 0)} in, "
          f"{counters.get('datagrams_out', 0)} out, {drops} dropped")
    return 0


def reload(settings: Settings) -> int:
    """Through the control channel when it answers (so errors are shown), else SIGHUP."""
    found = pidfile_mod.probe(settings.pidfile)
    if found.state is State.UNKNOWN:
        log_mod.print_stderr(f"chatd: cannot tell whether chatd runs: {found.error}")
        return _unknown_exit(found)
    if found.state is not State.RUNNING or found.pid is None:
        log_mod.print_stderr("chatd: not running")
        return 3
    try:
        pid = verified_pid(settings, found)
    except Refused as exc:
        log_mod.print_stderr(f"chatd: {exc}")
        return 1
    answer, _ = _control_request(settings, "reload")
    if answer is not None:
        if answer.get("ok"):
            changes = answer.get("result")
            done = describe_reload(changes) if isinstance(changes, dict) else "done"
            print(f"chatd reloaded (pid {pid}): {done}")
            return 0
        error = str(answer.get("error"))
        if error.startswith("permission denied"):
            log_mod.print_stderr(f"chatd: {error}")
            return EXIT_DENIED
        log_mod.print_stderr(f"chatd: reload refused, still running with the old settings: "
                             f"{error}")
        return 1
    try:
        _signal(pid, signal.SIGHUP)
    except PermissionError:
        return _denied(pid)
    print(f"chatd: reload requested (SIGHUP to pid {pid}); the log says how it went")
    return 0
