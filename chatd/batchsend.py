"""One payload to many UDP addresses in few system calls (``sendmmsg``).

Fan-out is the room's hot path, and on loopback the kernel's per-``sendto``
cost (system call entry, Python's address parsing) dominates it. Linux's
``sendmmsg(2)`` sends up to 1024 datagrams per call; here it is reached through
``ctypes`` so that chatd keeps no compiled extension.

Why the shapes below:

* Every ``struct mmsghdr`` is prebuilt once per address and cached as bytes:
  it points at the address's ``sockaddr`` (also cached) and at one ``iovec``
  owned by the sender, whose base and length are set per call. A call is then a
  ``join`` of cached bytes and one ``sendmmsg`` per 1024 addresses; Python does
  no per-address work beyond one dictionary lookup.
* The semantics are those of chatd's ``sendto`` loop on the same socket: a
  message that fails is counted under its errno name and skipped, and the rest
  is still sent. ``sendmmsg`` reports only the first failure of a call (and
  loses its errno if some messages went out), so the failed message is found
  by resending from the index where the kernel stopped.
* With ``IP_RECVERR`` a send can fail with an *earlier* datagram's ICMP error
  (``ECONNREFUSED`` and kin, :data:`DEFERRED_ERRNOS`): the datagram at hand was
  not sent, so it is retried once, as the server's ``sendto`` path does. When
  the kernel swallowed such an error (the call stopped early and the resend of
  that message just worked), it is counted as :data:`UNREPORTED`, so that the
  caller still knows to read the socket's error queue.
* A full send buffer (``EAGAIN``) stops the call: with an ``unsent`` list the
  addresses not yet served are handed back, in order, for the caller to send
  once the socket is writable again; without one they are counted and skipped.
* Where ``sendmmsg`` does not exist (not Linux, no such libc symbol, ``ENOSYS``
  under a seccomp filter), or an address is not a numeric IP literal of the
  socket's family, the very same ``sendto`` loop is used: never an exception.

A :class:`BatchSender` is not thread-safe (its ``iovec`` is shared by its
cached headers); :func:`send_to_many` uses one sender per thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

#: The kernel sends at most UIO_MAXIOV (1024) messages per call; more is truncated.
MAX_BATCH = 1024
#: From this many addresses on, one sendmmsg call beats a sendto loop (measured: below
#: it, the batched call's fixed cost of a few microseconds is not won back).
BATCH_MIN = 16
#: "The socket's send buffer is full": nothing more can go out until it drains.
_BLOCKED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
#: Cached headers per address family before the cache is dropped and rebuilt: bounds the
#: memory an endless churn of client addresses can take (~300 bytes each). Below this, the
#: bound is four times the largest fan-out seen (at least 4096): addresses of clients that
#: left are forgotten without a room of 10,000 rebuilding its headers on every line.
MAX_CACHED = 1 << 17

#: Errors a send reports on behalf of an earlier datagram (the socket's pending ICMP error).
DEFERRED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                             errno.EHOSTDOWN, errno.ENETDOWN})
#: The error name of a failure the kernel did not name (see the module docstring); the
#: datagram concerned was sent on the retry.
UNREPORTED = "unreported"

_ERRORS = (OSError, TypeError, ValueError, OverflowError)
#: Retries of a call interrupted by a signal before the message counts as failed.
_MAX_EINTR = 100


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_HDR_SIZE = ctypes.sizeof(_MMsgHdr)


def _load_sendmmsg() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_sendmmsg = _load_sendmmsg()


def _find_bytes_offset() -> int | None:
    """Where a bytes object's data starts, from its id(): a ctypes cast costs 2.4 µs a call.

    CPython only (id() is the address there); verified on probes, else None.
    """
    offset = None
    for probe in (b"chatd-probe-1", bytes(range(40))):
        address = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
        if address is None:
            return None
        found = address - id(probe)
        if offset is not None and found != offset:
            return None
        offset = found
    return offset


_BYTES_OFFSET = _find_bytes_offset()


def _bytes_address(data: bytes) -> int:
    if _BYTES_OFFSET is not None:
        return id(data) + _BYTES_OFFSET
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


try:  # the raw int: socket.socket.family wraps it in an enum, at 1 µs a call
    _raw_family = socket.socket.__mro__[1].family.__get__  # type: ignore[attr-defined]
except (AttributeError, IndexError):  # pragma: no cover - not CPython
    _raw_family = None


def available() -> bool:
    """True when this process can use ``sendmmsg`` (else the ``sendto`` loop serves)."""
    return _sendmmsg is not None


def errno_name(number: int | None) -> str:
    """The name the server's counters use: ``EAGAIN``, ``ECONNREFUSED``, or the number."""
    if number is None:
        return "unknown"
    return errno.errorcode.get(number, str(number))


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno_name(exc.errno)
    return type(exc).__name__


def _sockaddr(family: int, addr: Any) -> bytes | None:
    """``struct sockaddr_in``/``sockaddr_in6`` for a numeric address (``sockaddr_un`` for a
    path: the datagram sockets tests use to fill a send buffer), else None (use sendto)."""
    if family == socket.AF_UNIX and isinstance(addr, str) and 0 < len(addr.encode()) < 108:
        return struct.pack("=H", socket.AF_UNIX) + addr.encode() + b"\0"
    if not isinstance(addr, tuple):
        return None
    try:
        if family == socket.AF_INET and len(addr) == 2:
            host, port = addr
            packed = socket.inet_pton(socket.AF_INET, host)
            return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), packed)
        if family == socket.AF_INET6 and 2 <= len(addr) <= 4:
            host, port, flowinfo, scope_id = (*addr, 0, 0)[:4]
            if "%" in host:  # "fe80::1%eth0": let sendto resolve the scope name
                return None
            packed = socket.inet_pton(socket.AF_INET6, host)
            return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(port),
                               socket.htonl(flowinfo), packed, scope_id)
    except (OSError, TypeError, ValueError, OverflowError, struct.error):
        return None
    return None


class _HeaderCache(dict):
    """addr -> prebuilt ``mmsghdr`` bytes (or None when the address must go through sendto)."""

    def __init__(self, family: int, iov_address: int):
        super().__init__()
        self.family = family
        self.iov_address = iov_address
        #: the sockaddr bytes the headers point into: kept alive as long as the headers
        self.names: dict[Hashable, bytes] = {}

    def __missing__(self, addr: Hashable) -> bytes | None:
        name = _sockaddr(self.family, addr)
        header: bytes | None = None
        if name is not None:
            hdr = _MMsgHdr()
            # bytes objects never move in CPython: the pointer stays valid while cached
            hdr.msg_hdr.msg_name = _bytes_address(name)
            hdr.msg_hdr.msg_namelen = len(name)
            hdr.msg_hdr.msg_iov = self.iov_address
            hdr.msg_hdr.msg_iovlen = 1
            header = bytes(hdr)
            self.names[addr] = name
        self[addr] = header
        return header


class BatchSender:
    """Sends one payload to many addresses; owns its ``iovec`` and its header caches."""

    def __init__(self, batch: int = MAX_BATCH, use_sendmmsg: bool = True,
                 min_batch: int = BATCH_MIN):
        self.batch = max(1, min(batch, MAX_BATCH))
        self.min_batch = max(1, min_batch)
        self.use_sendmmsg = use_sendmmsg and _sendmmsg is not None
        self._iov = _IOVec()
        self._caches: dict[int, _HeaderCache] = {}
        self._largest = 0  # the most addresses in one call so far
        #: the vector handed to the kernel: allocated once, filled by a memoryview copy
        self._vector = ctypes.create_string_buffer(_HDR_SIZE * self.batch)
        self._vector_address = ctypes.addressof(self._vector)
        self._vector_view = memoryview(self._vector).cast("B")

    def send(self, sock: socket.socket, payload: bytes, addrs: Sequence[Any],
             unsent: list[Any] | None = None) -> tuple[int, Counter[str]]:
        """(datagrams sent, failures by errno name); never raises. See the module
        docstring for ``unsent``."""
        errors: Counter[str] = Counter()
        if not addrs:
            return 0, errors
        if type(payload) is not bytes:  # the header points into an exact bytes object
            try:
                payload = bytes(payload)
            except _ERRORS as exc:
                errors[_error_name(exc)] += len(addrs)
                return 0, errors
        if not self.use_sendmmsg or len(addrs) < self.min_batch:
            return _sendto_loop(sock, payload, addrs, errors, unsent), errors
        try:
            fd = sock.fileno()
            family = _raw_family(sock) if _raw_family is not None else int(sock.family)
        except _ERRORS as exc:
            errors[_error_name(exc)] += len(addrs)
            return 0, errors
        if len(addrs) > self._largest:
            self._largest = len(addrs)
        cache = self._caches.get(family)
        if cache is None:
            cache = self._caches[family] = _HeaderCache(family, ctypes.addressof(self._iov))
        elif len(cache) >= min(MAX_CACHED, max(4096, 4 * self._largest)):
            cache.clear()  # between calls only: the headers of a call point into the cache
            cache.names.clear()
        try:
            headers = list(map(cache.__getitem__, addrs))
        except TypeError:  # an unhashable address somewhere: sendto will report it
            headers = [_lookup(cache, a) for a in addrs]
        sent = 0
        batched: Sequence[Any] = addrs
        if None in headers:  # rare: names, scoped or malformed addresses go one by one
            slow = [a for a, h in zip(addrs, headers, strict=True) if h is None]
            batched = [a for a, h in zip(addrs, headers, strict=True) if h is not None]
            headers = [h for h in headers if h is not None]
            sent = _sendto_loop(sock, payload, slow, errors, unsent)
            if unsent:  # the socket is full: the rest waits too
                unsent.extend(batched)
                return sent, errors
        if headers:
            sent += self._send_headers(sock, fd, payload, headers, batched, errors, unsent)
        return sent, errors

    def _send_headers(self, sock: socket.socket, fd: int, payload: bytes, headers: list[bytes],
                      addrs: Sequence[Any], errors: Counter[str],
                      unsent: list[Any] | None) -> int:
        """``headers[i]`` is the cached header of ``addrs[i]``."""
        iov = self._iov
        iov.iov_base = _bytes_address(payload)  # ``payload`` lives until we return
        iov.iov_len = len(payload)
        view, vector = self._vector_view, self._vector_address
        sent = 0
        total = len(headers)
        start = 0
        step = self.batch
        interrupted = 0
        stopped_early = False  # the last call sent some, then failed without saying why
        retried = -1  # the index whose deferred error has had its one retry
        while start < total:
            end = min(start + step, total)
            joined = b"".join(headers[start:end])
            view[:len(joined)] = joined
            done = _sendmmsg(fd, vector, end - start, 0)
            if done > 0:
                if stopped_early:
                    errors[UNREPORTED] += 1
                stopped_early = done < end - start
                sent += done
                start += done
                continue
            stopped_early = False
            number = ctypes.get_errno() if done < 0 else None
            if number == errno.EINTR and interrupted < _MAX_EINTR:
                interrupted += 1
                continue
            if number == errno.ENOSYS:  # sendmmsg blocked or missing: never try again
                self.use_sendmmsg = False
                return sent + _sendto_loop(sock, payload, addrs[start:], errors, unsent)
            errors[errno_name(number)] += 1
            if number in _BLOCKED and unsent is not None:
                unsent.extend(addrs[start:])
                return sent
            if number in DEFERRED_ERRNOS and retried != start:
                retried = start  # an earlier datagram's error: this one gets one more try
                continue
            start += 1  # the message at ``start`` failed: skip it
        return sent


def _lookup(cache: _HeaderCache, addr: Any) -> bytes | None:
    try:
        return cache[addr]
    except TypeError:  # unhashable: never cached, sendto reports the error
        return None


def _sendto_loop(sock: socket.socket, payload: bytes, addrs: Sequence[Any],
                 errors: Counter[str], unsent: list[Any] | None = None) -> int:
    """The portable path, and the reference the batched one must match."""
    send = sock.sendto
    sent = 0
    for index, addr in enumerate(addrs):
        try:
            send(payload, addr)
            sent += 1
        except OSError as exc:
            errors[_error_name(exc)] += 1
            if exc.errno in _BLOCKED and unsent is not None:
                unsent.extend(addrs[index:])
                return sent
            if exc.errno in DEFERRED_ERRNOS:  # an earlier datagram's error: retry once
                try:
                    send(payload, addr)
                    sent += 1
                except _ERRORS as again:
                    errors[_error_name(again)] += 1
        except _ERRORS as exc:
            errors[_error_name(exc)] += 1
    return sent


_local = threading.local()


def send_to_many(sock: socket.socket, payload: bytes, addrs: Sequence[Any],
                 unsent: list[Any] | None = None) -> tuple[int, Counter[str]]:
    """Send ``payload`` to every address in ``addrs``; (sent, errors by errno name).

    Never raises: each failed datagram is counted and the others still go out;
    with ``unsent``, the addresses a full send buffer kept waiting are put there.
    """
    sender = getattr(_local, "sender", None)
    if sender is None:
        sender = _local.sender = BatchSender()
    return sender.send(sock, payload, addrs, unsent)
