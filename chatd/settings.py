"""The typed, frozen settings every part of chatd is given: plain values, nothing more.

A leaf module on purpose: it imports nothing of chatd, so any module may take
its settings from here without pulling in the YAML reader (:mod:`chatd.config`)
or anything that reader checks against. The defaults of the fields are the
defaults of the configuration keys; :mod:`chatd.config` reads them from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class ListenSettings:
    host: str = "0.0.0.0"
    port: int = 8888
    rcvbuf: int = 4 * 1024 * 1024
    sndbuf: int = 4 * 1024 * 1024
    #: SO_REUSEPORT: several nodes of one cluster on one host share the port
    reuseport: bool = False


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str | None = None  # None: console on a terminal, json otherwise
    file: str | None = None  # None: stderr


@dataclass(frozen=True)
class RoomSettings:
    locale: str = "en"
    admin_name: str = "admin"  # the configuration's default follows the locale
    max_users: int = 1000
    max_name_length: int = 32
    max_datagram: int = 1024
    session_timeout: float = 90.0
    max_sessions_per_ip: int = 100
    announce_limit: int = 200
    unreachable_after: int = 3
    evict_idle_after: float = 600.0  # 0: a full room never evicts
    ipv6_prefix: int = 64  # per-address limits count an IPv6 /64 as one host
    require_verified: bool = False  # True: only clients that echoed an address cookie
    unreachable_grace: float = 60.0
    #: every text the room sends, by name: chatd.config fills in the locale's texts
    #: with the file's ``room.templates`` over them (see chatd.templates)
    templates: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class DaemonSettings:
    user: str | None = None
    group: str | None = None
    umask: int = 0o022
    start_timeout: float = 10.0


@dataclass(frozen=True)
class ControlSettings:
    socket: str  # absolute path
    fifo: str  # absolute path
    mode: int = 0o660
    group: str | None = None


@dataclass(frozen=True)
class ClusterSettings:
    redis: str | None = None  # None: a single node, no Redis anywhere
    password_file: str | None = None
    room: str = "main"
    node: str | None = None  # clustered: by default the host name and the UDP port
    node_timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.redis is not None


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None  # "host:port" of the Prometheus endpoint; None: off


@dataclass(frozen=True)
class Settings:
    listen: ListenSettings
    log: LogSettings
    room: RoomSettings
    daemon: DaemonSettings
    control: ControlSettings
    runtime_dir: str
    plugins: Mapping[str, Any]
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str | None = None  # the file these came from, if any
    #: the line of each key path in ``source``, for errors found after parsing
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def pidfile(self) -> str:
        return os.path.join(self.runtime_dir, "chatd.pid")

    def where(self, key: str | None) -> str:
        """``FILE, line N`` for ``key``, as config errors begin."""
        if self.source is None:
            return "built-in defaults"
        line = self.lines.get(key) if key else None
        return f"{self.source}, line {line}" if line else self.source
