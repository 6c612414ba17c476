"""``chatd stop``, ``status`` and ``reload``: find the running daemon, act on it, say how it went.

The pidfile names the daemon, but only a process that holds the pidfile's
lock and is chatd is ever signalled (:func:`verified_pid`). ``status`` and
``reload`` ask the daemon itself through the control channel when it answers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from chatd import daemon, safefs
from chatd import log as log_mod
from chatd import pidfile as pidfile_mod
from chatd.config import describe_reload
from chatd.control.client import ControlError, daemon_uid, request
from chatd.pidfile import State
from chatd.settings import Settings

EXIT_DENIED = 4  # stop/reload: permission denied (status: LSB "unknown")


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
    if daemon.wait_unlocked(settings.pidfile, timeout):
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
        if daemon.wait_unlocked(settings.pidfile, 5.0):
            daemon.remove_stale(settings, control_files=True)
            print(f"chatd killed (pid {pid}) after {timeout:g} s")
            return 0
    log_mod.print_stderr(f"chatd: pid {pid} did not stop within {timeout:g} s"
                         + ("" if kill else "; use 'chatd stop --kill' to send SIGKILL"))
    return 1


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


def _control_request(settings: Settings, cmd: str) -> tuple[dict | None, str]:
    """The daemon's answer through the control channel, or None and why it was not reached."""
    try:
        return request(settings.control.socket, cmd, timeout=5.0,
                       daemon_uid=daemon_uid(settings)), ""
    except ControlError as exc:
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
