"""The control channel: the admin child's side, and the client side used by ``chatctl``.

The admin child is forked by the daemon and owns everything a local admin
can reach: the Unix socket (``control.sock``), the FIFO, and a terminal on
stdin under ``chatd run``. It checks who is connecting, bounds every request
(size, nesting, time, number at once) and relays requests to the daemon as JSON lines
over a socketpair. A slow or hostile peer costs the child, never the room.

Wire format, both on the control socket and the socketpair: one JSON object
per line. Request ``{"cmd": "say", "args": {"text": "hi"}}``; answer
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
On the socketpair the child adds an ``"id"`` that the daemon echoes back.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import structlog

from chatd import log as log_mod
from chatd import safefs
from chatd.settings import ControlSettings

log = structlog.get_logger("chatd")

#: longest request line, and longest FIFO or terminal line, in bytes (without the newline)
MAX_REQUEST = 64 * 1024
#: deepest nesting of arrays and objects in a request; a real one needs 2
MAX_DEPTH = 32
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
#: verbs a FIFO line or a terminal line may use, and how the rest of the line maps to args
LINE_VERBS = {"say": ("text",), "kick": ("name", "reason"), "reload": ()}


class ControlError(Exception):
    """The control socket could not be used; the message names it.

    ``errno`` is EACCES or EPERM when the caller may not use it (permission
    denied, or a socket chatd's users did not make), else why it was not reached.
    """

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code

    @property
    def denied(self) -> bool:
        return self.errno in (errno.EACCES, errno.EPERM)


# -- the client side ------------------------------------------------------------


def request(path: str, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 10.0, daemon_uid: int | None = None) -> dict[str, Any]:
    """One request, one answer. Raises :class:`ControlError` when nobody answers at ``path``,
    or when whoever serves it is not root, the caller, or chatd's user ``daemon_uid``
    (see :func:`trusted_servers`): an admin's words go to chatd or nowhere."""
    path = os.path.abspath(path)
    payload = json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n"
    trusted = trusted_servers(path, daemon_uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except PermissionError:
            raise ControlError(f"permission denied: {path}", errno.EACCES) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the control socket {path}: {exc.strerror}",
                               exc.errno) from None
        # the process that listens, as the kernel saw it: no file swapped in since counts
        server_uid = peer_credentials(sock)[1]
        if server_uid not in trusted:
            raise ControlError(_untrusted(path, server_uid), errno.EPERM)
        try:
            # a refused peer is cut off at once: the reason is still waiting to be read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError(f"no answer on the control socket {path} within {timeout:g} s"
                               ) from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}", exc.errno) from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"control socket {path} gave no valid answer") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"control socket {path} gave no valid answer")
    return answer


def trusted_servers(path: str, daemon_uid: int | None) -> frozenset[int]:
    """The uids that may serve the control socket at ``path``, or :class:`ControlError`.

    Root, the caller and chatd's user (``daemon.user``); and the owner of the
    socket's directory when root made that directory for it, as systemd's
    ``RuntimeDirectory=`` does for a ``DynamicUser=`` (the directory is not
    writable by others and lies in a root-owned directory nobody else may write).
    Anyone else could have put a socket there (a ``/tmp/chatd-UID`` made first by
    another user) to read what the admin says and answer "ok".
    """
    trusted = {0, os.getuid()} | ({daemon_uid} if daemon_uid is not None else set())
    try:
        st = os.lstat(path)
    except PermissionError:
        raise ControlError(f"permission denied: {path}", errno.EACCES) from None
    except OSError as exc:
        raise ControlError(f"cannot reach the control socket {path}: {exc.strerror}",
                           exc.errno) from None
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(f"refusing the control socket {path}: it is a symbolic link",
                           errno.EPERM)
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"cannot reach the control socket {path}: not a socket",
                           errno.ENOTSOCK)
    if st.st_uid not in trusted and _made_by_root_for(os.path.dirname(path), st.st_uid):
        trusted.add(st.st_uid)
    if st.st_uid not in trusted:
        raise ControlError(_untrusted(path, st.st_uid), errno.EPERM)
    return frozenset(trusted)


def _made_by_root_for(directory: str, uid: int) -> bool:
    try:
        mine, parent = os.lstat(directory), os.lstat(os.path.dirname(directory))
    except OSError:
        return False
    return (stat.S_ISDIR(mine.st_mode) and mine.st_uid == uid and not mine.st_mode & 0o022
            and parent.st_uid == 0 and not parent.st_mode & 0o022)


def _untrusted(path: str, uid: int) -> str:
    return (f"refusing the control socket {path}: it is served by {safefs.user_name(uid)}, "
            "not by root, you or chatd's user (daemon.user), so it is not chatd's")


def parse_line(line: str) -> dict[str, Any] | None:
    """A FIFO or terminal line (``say hello``, ``kick bob spam``) as a request; None if empty."""
    line = line.strip()
    if not line:
        return None
    verb, _, rest = line.partition(" ")
    names = LINE_VERBS.get(verb)
    if names is None:
        return {"cmd": verb, "args": {}}
    values = rest.split(" ", len(names) - 1) if names and rest else []
    return {"cmd": verb, "args": dict(zip(names, values, strict=False))}


class LineSplitter:
    """Cuts a byte stream (the FIFO, a terminal) into lines of at most ``limit`` bytes.

    A longer line is dropped whole, up to and including its newline. Keeping
    only its tail would run text the writer never meant as a command
    (``say <128 KiB of padding> kick bob``), so once a line is over the limit
    everything up to the next newline is skipped.
    """

    def __init__(self, limit: int = MAX_REQUEST):
        self.limit = limit
        self._partial = b""
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """The complete lines in ``data``, and how many over-long lines began to be dropped."""
        lines: list[bytes] = []
        too_long = 0
        while data:
            cut = data.find(b"\n")
            if self._discarding:
                if cut < 0:
                    return lines, too_long
                self._discarding = False
                data = data[cut + 1:]
                continue
            if cut < 0:
                self._partial += data
                if len(self._partial) > self.limit:
                    self._partial = b""
                    self._discarding = True
                    too_long += 1
                return lines, too_long
            line, self._partial, data = self._partial + data[:cut], b"", data[cut + 1:]
            if len(line) > self.limit:
                too_long += 1
            else:
                lines.append(line)
        return lines, too_long


# a JSON string, closed or not: brackets inside it are text
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, counted without parsing it.

    The json module recurses once per level and a deep enough request would
    end the admin child with RecursionError; counting first keeps the bound
    independent of the interpreter's recursion limit and of the stack in use.
    Brackets inside strings are skipped as the parser skips them. Up to the
    first error the parser would stop at, the count equals its depth, so it
    is never lower. The work is done in C (regular expressions, accumulate):
    a 64 KiB line of brackets costs milliseconds.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(0, max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0))


def decode_request(line: bytes) -> Any:
    """One request line as JSON; ValueError says what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(text)


# -- peer checks --------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def group_members(group: str | None) -> tuple[int | None, frozenset[str]]:
    if group is None:
        return None, frozenset()
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        raise OSError(errno.EINVAL, f"control.group: no such group {group!r}") from None
    return entry.gr_gid, frozenset(entry.gr_mem)


def peer_allowed(uid: int, gid: int, daemon_uid: int, group_gid: int | None,
                 members: frozenset[str]) -> bool:
    """Root, the daemon's own user, and members of ``control.group``."""
    if uid in (0, daemon_uid):
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return name in members or pwd.getpwnam(name).pw_gid == group_gid


# -- creating the socket and the FIFO safely ------------------------------------------


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _chgrp(path: str, gid: int | None, fd: int | None = None) -> None:
    """Give ``path`` (or the FIFO open at ``fd``) to ``control.group``; never through a link.

    Usually there is nothing to do: chatd gives runtime_dir that group (set-group-ID)
    before it drops privileges, and what is created in it inherits the group.
    """
    if gid is None:
        return
    st = os.fstat(fd) if fd is not None else os.lstat(path)
    if st.st_gid == gid:
        return
    try:
        if fd is not None:
            os.fchown(fd, -1, gid)
        else:
            os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        group = grp.getgrgid(gid).gr_name
        raise OSError(errno.EPERM, f"cannot give {path} to group {group}: "
                      f"{safefs.user_name(os.geteuid())} is not a member; keep the control "
                      "socket and FIFO in runtime_dir (chatd gives it that group), or add "
                      "the user to the group") from None


def _private_parent(path: str) -> None:
    """The directory of the socket or FIFO: made if missing, refused if another user could
    swap files in it (see :mod:`chatd.safefs`)."""
    directory = os.path.dirname(path)
    safefs.make_dir(directory, 0o755)
    safefs.check_private_dir(directory, {0, os.geteuid()})


def create_socket(settings: ControlSettings, gid: int | None) -> socket.socket:
    """Bind the control socket: never stealing a live one, never world-writable for an instant."""
    path = settings.socket
    try:
        return _bind_control_socket(path, settings.mode, gid)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create control socket {path}: "
                      f"{exc.strerror or exc}") from None


def _bind_control_socket(path: str, mode: int, gid: int | None) -> socket.socket:
    _private_parent(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if _socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # bind() makes the file with exactly this mode: no chmod by path afterwards, and
        # nobody can connect before listen(), so the group is set in time
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        _chgrp(path, gid)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def create_fifo(settings: ControlSettings, gid: int | None) -> int:
    """The FIFO, opened read-write so that it never reports end-of-file between writers."""
    path = settings.fifo
    try:
        return _open_fifo(path, gid)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create control FIFO {path}: "
                      f"{exc.strerror or exc}") from None


def _open_fifo(path: str, gid: int | None) -> int:
    _private_parent(path)
    if os.path.lexists(path) and not stat.S_ISFIFO(os.lstat(path).st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO")
    old = os.umask(0o177)
    try:
        os.mkfifo(path, 0o600)  # the group may write only once the group is right
    except FileExistsError:
        pass
    finally:
        os.umask(old)
    fd = safefs.open_nofollow(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a FIFO")
        _chgrp(path, gid, fd)
        os.fchmod(fd, 0o620)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_files(settings: ControlSettings) -> None:
    """Remove the socket and FIFO unless a live process serves that socket."""
    if os.path.lexists(settings.socket) and _socket_is_live(settings.socket):
        return
    remove_files(settings)


def remove_files(settings: ControlSettings) -> None:
    """Remove the socket and FIFO, or log why not: this runs on the way out, where an
    error would cost the clean exit (a runtime_dir chowned to another user, say)."""
    for path in (settings.socket, settings.fifo):
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            log.warning("control_file_not_removed", path=path, error=exc.strerror or str(exc))


# -- the admin child ------------------------------------------------------------------


@dataclass
class _Peer:
    sock: socket.socket
    deadline: float
    inbox: bytes = b""
    outbox: bytes = b""
    waiting: bool = False  # a request is with the daemon
    closing: bool = False
    last_active: float = 0.0  # when it connected or last sent something
    pid: int = 0
    uid: int = 0

    @property
    def idle(self) -> bool:
        """Connected, but no complete request yet: the one to drop when the table is full."""
        return not self.waiting and not self.closing


@dataclass
class AdminChild:
    """The loop of the forked admin child."""

    settings: ControlSettings
    channel: socket.socket  # to the daemon
    daemon_uid: int
    read_terminal: bool = False
    peers: dict[int, _Peer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.group_gid, self.members = group_members(self.settings.group)
        self.listener = create_socket(self.settings, self.group_gid)
        try:
            self.fifo = create_fifo(self.settings, self.group_gid)
        except OSError:
            self.listener.close()
            os.unlink(self.settings.socket)  # ours: we just bound it
            raise
        self._identities = self._current_identities()
        self._fifo_lines = LineSplitter()
        self._terminal_lines = LineSplitter()
        # lines any local peer can cause, each kind logged at a bounded rate
        self._peer_logs = {name: log_mod.BoundedRate() for name in (
            "control_refused", "control_peer_evicted", "control_peer_timeout",
            "control_line_too_long", "control_line_failed")}
        self._channel_buffer = b""
        self._next_id = 0
        self._pending: dict[int, int | None] = {}  # request id -> peer fd (None: no reply)

    def serve(self) -> None:
        self.channel.setblocking(True)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.fifo, selectors.EVENT_READ, self._read_fifo)
        self.selector.register(self.channel, selectors.EVENT_READ, self._from_daemon)
        if self.read_terminal:
            self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, self._read_terminal)
        self._send_daemon({"event": "ready", "pid": os.getpid(), "socket": self.settings.socket})
        log.info("admin_child_serving", socket=self.settings.socket, fifo=self.settings.fifo)
        while True:
            for key, mask in self.selector.select(timeout=1.0):
                key.data(key, mask)
            self._expire_peers()
            self._recreate_missing_files()

    # -- files removed under our feet (runtime_dir wiped, tmp cleaners) -------------------

    def _current_identities(self) -> tuple[tuple[int, int] | None, ...]:
        def identity(path: str) -> tuple[int, int] | None:
            try:
                st = os.lstat(path)
            except OSError:
                return None
            return st.st_dev, st.st_ino

        return identity(self.settings.socket), identity(self.settings.fifo)

    def _recreate_missing_files(self) -> None:
        """A control socket or FIFO that was removed is created again, or the log says why."""
        if self._current_identities() == self._identities:
            return
        self.selector.unregister(self.listener)
        self.selector.unregister(self.fifo)
        self.listener.close()
        os.close(self.fifo)
        try:
            self.listener = create_socket(self.settings, self.group_gid)
            self.fifo = create_fifo(self.settings, self.group_gid)
        except OSError as exc:
            log.error("control_files_lost", error=exc.strerror or str(exc))
            raise SystemExit(1) from None  # the daemon starts another child, with backoff
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.fifo, selectors.EVENT_READ, self._read_fifo)
        self._identities = self._current_identities()
        log.warning("control_files_recreated", socket=self.settings.socket,
                    fifo=self.settings.fifo)

    def _log_bounded(self, name: str, **fields: Any) -> None:
        """A warning a local peer can cause: a flood of them costs a few lines a second."""
        rate = self._peer_logs[name]
        if not rate.allow():
            return
        suppressed = rate.take_suppressed()
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        log.warning(name, **fields)

    # -- the daemon side ----------------------------------------------------------

    def _send_daemon(self, message: dict[str, Any]) -> None:
        self.channel.sendall(json.dumps(message).encode() + b"\n")

    def _relay(self, request: Any, peer_fd: int | None) -> None:
        if (not isinstance(request, dict) or not isinstance(request.get("cmd"), str)
                or not isinstance(request.get("args", {}), dict)):
            self._answer(peer_fd, {"ok": False, "error": 'malformed request: expected '
                                   '{"cmd": "...", "args": {...}}'})
            return
        self._next_id += 1
        self._pending[self._next_id] = peer_fd
        self._send_daemon({"id": self._next_id, "cmd": request["cmd"],
                           "args": request.get("args", {})})

    def _from_daemon(self, key: Any, mask: int) -> None:
        data = self.channel.recv(1 << 20)
        if not data:  # the daemon is gone: so are we
            log.info("admin_child_exiting", reason="daemon closed the channel")
            raise SystemExit(0)
        self._channel_buffer += data
        while b"\n" in self._channel_buffer:
            line, self._channel_buffer = self._channel_buffer.split(b"\n", 1)
            answer = json.loads(line)
            peer_fd = self._pending.pop(answer.pop("id", None), None)
            if peer_fd is None:
                if not answer.get("ok"):
                    self._log_bounded("control_line_failed", error=answer.get("error"))
                continue
            self._answer(peer_fd, answer)

    # -- socket peers ---------------------------------------------------------------

    def _accept(self, key: Any, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        pid, uid, gid = peer_credentials(conn)
        # who first: a refused stranger must never push out an allowed peer's connection
        if not peer_allowed(uid, gid, self.daemon_uid, self.group_gid, self.members):
            _try_send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                             "use the control socket"})
            conn.close()
            self._log_bounded("control_refused", reason="permission denied",
                              peer_pid=pid, uid=uid)
            return
        if len(self.peers) >= MAX_CONNECTIONS and not self._evict_idle_peer():
            _try_send(conn, {"ok": False, "error": "too many control connections, try again"})
            conn.close()
            self._log_bounded("control_refused", reason="too many connections",
                              peer_pid=pid, uid=uid)
            return
        now = time.monotonic()
        peer = _Peer(conn, now + CONNECTION_TIMEOUT, last_active=now, pid=pid, uid=uid)
        self.peers[conn.fileno()] = peer
        self.selector.register(conn, selectors.EVENT_READ, self._peer_event)

    def _evict_idle_peer(self) -> bool:
        """Make room by closing the connection idle longest; False if every one is busy.

        Connections that only sit there would otherwise lock chatctl out
        until they time out, and a peer can open them faster than that.
        """
        idle = [peer for peer in self.peers.values() if peer.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda peer: peer.last_active)
        _try_send(victim.sock, {"ok": False, "error": "closed: too many control connections, "
                                "and this one had sent no request"})
        self._log_bounded("control_peer_evicted", reason="too many connections, idle longest",
                          peer_pid=victim.pid, uid=victim.uid)
        self._close(victim)
        return True

    def _peer_event(self, key: Any, mask: int) -> None:
        peer = self.peers.get(key.fd)
        if peer is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ and not peer.waiting and not peer.closing:
            try:
                data = peer.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(peer)
                return
            peer.last_active = time.monotonic()
            peer.inbox += data
            line, newline, _ = peer.inbox.partition(b"\n")
            if len(line) > MAX_REQUEST:  # also when the newline came in the same read
                self._answer(key.fd, {"ok": False,
                                      "error": f"request larger than {MAX_REQUEST} bytes"})
            elif newline:
                peer.waiting = True
                try:
                    request = decode_request(line)
                except ValueError as exc:
                    self._answer(key.fd, {"ok": False, "error": f"malformed request: {exc}"})
                    return
                self._relay(request, key.fd)

    def _answer(self, peer_fd: int | None, answer: dict[str, Any]) -> None:
        if peer_fd is None:
            if not answer.get("ok"):
                self._log_bounded("control_line_failed", error=answer.get("error"))
            return
        peer = self.peers.get(peer_fd)
        if peer is None:
            return
        peer.outbox += json.dumps(answer).encode() + b"\n"
        peer.closing = True
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        try:
            sent = peer.sock.send(peer.outbox)
            peer.outbox = peer.outbox[sent:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(peer)
            return
        if peer.outbox:
            self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self._peer_event)
        elif peer.closing:
            self._close(peer)

    def _close(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        self.peers.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(peer.sock)
        peer.sock.close()
        for request_id, waiting_fd in list(self._pending.items()):
            if waiting_fd == fd:
                self._pending[request_id] = None  # the answer, when it comes, goes nowhere

    def _expire_peers(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if now > peer.deadline:
                self._log_bounded("control_peer_timeout", peer_pid=peer.pid, uid=peer.uid)
                self._close(peer)

    # -- FIFO and terminal lines -------------------------------------------------------

    def _read_fifo(self, key: Any, mask: int) -> None:
        self._lines(os.read(self.fifo, 65536), self._fifo_lines, "fifo")

    def _read_terminal(self, key: Any, mask: int) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.selector.unregister(sys.stdin.fileno())
            return
        self._lines(data, self._terminal_lines, "terminal", default_verb="say")

    def _lines(self, data: bytes, splitter: LineSplitter, source: str,
               default_verb: str = "") -> None:
        lines, too_long = splitter.feed(data)
        for _ in range(too_long):
            self._log_bounded("control_line_too_long", source=source, limit=MAX_REQUEST)
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if default_verb and line.strip():
                line = f"{default_verb} {line}"
            request = parse_line(line)
            if request is not None:
                self._relay(request, None)


def _try_send(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.send(json.dumps(answer).encode() + b"\n")


def run_admin_child(settings: ControlSettings, channel: socket.socket, daemon_uid: int,
                    read_terminal: bool) -> int:
    """The admin child's whole life; returns its exit status."""
    for signum in (signal.SIGINT, signal.SIGHUP):  # the daemon handles these, then stops us
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        child = AdminChild(settings, channel, daemon_uid, read_terminal)
    except OSError as exc:
        message = exc.strerror or str(exc)
        with contextlib.suppress(OSError):
            channel.sendall(json.dumps({"event": "error", "error": message}).encode() + b"\n")
        log.error("admin_child_failed", error=message)
        return 1
    try:
        child.serve()
    except SystemExit as exc:
        return int(exc.code or 0)
    except (BrokenPipeError, ConnectionResetError):
        return 0
    return 0
