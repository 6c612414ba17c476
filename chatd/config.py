"""YAML configuration: one file in, typed and frozen settings out.

Every key has a built-in default, so chatd runs with no file at all. A key
that is unknown or of the wrong type is an error that names the key path and
its line, because the person reading it is fixing a file in an editor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from chatd.names import name_key
from chatd.templates import ADMIN_NAMES, LOCALES, template_problem

ENV_CONFIG = "CHATD_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for a person."""


@dataclass(frozen=True)
class ListenSettings:
    host: str = "0.0.0.0"
    port: int = 8888
    rcvbuf: int = 4 * 1024 * 1024
    sndbuf: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str | None = None  # None: console on a terminal, json otherwise
    file: str | None = None  # None: stderr


@dataclass(frozen=True)
class RoomSettings:
    locale: str = "en"
    admin_name: str = ADMIN_NAMES["en"]
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
    templates: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(LOCALES["en"]))

    @property
    def admin_key(self) -> str:
        return name_key(self.admin_name)


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
class Settings:
    listen: ListenSettings
    log: LogSettings
    room: RoomSettings
    daemon: DaemonSettings
    control: ControlSettings
    runtime_dir: str
    plugins: Mapping[str, Any]
    source: str | None = None  # the file these came from, if any

    @property
    def pidfile(self) -> str:
        return os.path.join(self.runtime_dir, "chatd.pid")


def default_runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/chatd"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "chatd")
    return f"/tmp/chatd-{os.getuid()}"


# -- value checkers: each returns the converted value or raises ValueError with
#    a phrase that completes "room.max_users: ..." -------------------------


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _number(low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return float(value)

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return check


def _mode(value: Any) -> int:
    """Modes are octal; YAML reads ``0660`` as octal already, and ``"0660"`` is accepted too."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"expected an octal mode such as 0660, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"expected an octal mode such as 0660, got {value!r}")
    return value


def _mapping(value: Any) -> dict:
    if value is None:  # "plugins:" with nothing after it
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    return value


#: Every key, its checker and its default; the documentation in etc/chatd.yaml
#: and chatd.yaml(5) follows this table.
SCHEMA: Mapping[str, tuple[Callable[[Any], Any], Any]] = {
    "listen.host": (_text, ListenSettings.host),
    "listen.port": (_int(0, 65535), ListenSettings.port),
    "listen.rcvbuf": (_int(4096, 1 << 30), ListenSettings.rcvbuf),
    "listen.sndbuf": (_int(4096, 1 << 30), ListenSettings.sndbuf),
    "runtime_dir": (_optional(_text), None),
    "log.level": (_choice(*LOG_LEVELS), LogSettings.level),
    "log.format": (_optional(_choice("json", "console")), None),
    "log.file": (_optional(_text), None),
    "room.locale": (_choice(*LOCALES), "en"),
    "room.admin_name": (_optional(_text), None),
    "room.max_users": (_int(1, 1_000_000), RoomSettings.max_users),
    "room.max_name_length": (_int(1, 256), RoomSettings.max_name_length),
    "room.max_datagram": (_int(64, 65507), RoomSettings.max_datagram),
    "room.session_timeout": (_number(1, 86400 * 365), RoomSettings.session_timeout),
    "room.max_sessions_per_ip": (_int(0, 1_000_000), RoomSettings.max_sessions_per_ip),
    "room.announce_limit": (_int(0, 1_000_000), RoomSettings.announce_limit),
    "room.unreachable_after": (_int(0, 1_000_000), RoomSettings.unreachable_after),
    "room.evict_idle_after": (_number(0, 86400 * 365), RoomSettings.evict_idle_after),
    "room.ipv6_prefix": (_int(0, 128), RoomSettings.ipv6_prefix),
    "room.require_verified": (_bool, RoomSettings.require_verified),
    "room.unreachable_grace": (_number(0, 86400 * 365), RoomSettings.unreachable_grace),
    "room.templates": (_mapping, {}),
    "daemon.user": (_optional(_text), None),
    "daemon.group": (_optional(_text), None),
    "daemon.umask": (_mode, DaemonSettings.umask),
    "daemon.start_timeout": (_number(0.1, 3600), DaemonSettings.start_timeout),
    "control.socket": (_optional(_text), None),
    "control.fifo": (_optional(_text), None),
    "control.mode": (_mode, ControlSettings.mode),
    "control.group": (_optional(_text), None),
    "plugins": (_mapping, {}),
}

#: Keys read once at start-up; a reload that changes them keeps the old value.
RESTART_ONLY = ("listen.", "runtime_dir", "daemon.", "control.")

SECTIONS = frozenset(key.split(".")[0] for key in SCHEMA if "." in key)


class _Located:
    """Where each key path stands in the file, for error messages."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source = source
        self.lines = lines

    def error(self, path: str, message: str) -> ConfigError:
        line = self.lines.get(path)
        where = f"{self.source}, line {line}" if line else self.source
        return ConfigError(f"{where}: {path}: {message}")


def _key_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            lines[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path + ".", lines)


def parse(text: str, source: str = "<config>") -> Settings:
    """Settings from YAML text; raises :class:`ConfigError`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    lines: dict[str, int] = {}
    if node is not None:
        _key_lines(node, "", lines)
    return from_mapping({} if data is None else data, _Located(source, lines), source)


def from_mapping(data: Any, where: _Located | None = None, source: str | None = None) -> Settings:
    where = where or _Located(source or "<config>", {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where.source}: the top level must be a mapping of keys")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise where.error(key, f"expected a mapping, got {value!r}")
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    values = {}
    for path, value in flat.items():
        if path not in SCHEMA:
            raise where.error(path, "unknown key" + _suggestion(path))
        check = SCHEMA[path][0]
        try:
            values[path] = check(value)
        except ValueError as exc:
            raise where.error(path, str(exc)) from None
    get = lambda path: values.get(path, SCHEMA[path][1])  # noqa: E731
    return _build(get, where, source)


def _suggestion(path: str) -> str:
    section = path.split(".")[0]
    known = [k for k in SCHEMA if k.startswith(section + ".")]
    if known:
        return f" (known keys in {section}: {', '.join(k.split('.', 1)[1] for k in known)})"
    return f" (known top-level keys: {', '.join(sorted(SECTIONS | {'runtime_dir', 'plugins'}))})"


def _build(get: Callable[[str], Any], where: _Located, source: str | None) -> Settings:
    locale = get("room.locale")
    templates = dict(LOCALES[locale])
    for key, text in get("room.templates").items():
        if not isinstance(text, str):
            raise where.error(f"room.templates.{key}", f"expected a string, got {text!r}")
        problem = template_problem(str(key), text)
        if problem:
            raise where.error(f"room.templates.{key}", problem)
        templates[str(key)] = text
    from chatd.plugins import PluginConfigError, check_settings

    try:
        check_settings(get("plugins"))
    except PluginConfigError as exc:
        raise where.error(exc.path, str(exc)) from None
    runtime_dir = os.path.abspath(get("runtime_dir") or default_runtime_dir())
    room = RoomSettings(
        locale=locale,
        admin_name=get("room.admin_name") or ADMIN_NAMES[locale],
        max_users=get("room.max_users"),
        max_name_length=get("room.max_name_length"),
        max_datagram=get("room.max_datagram"),
        session_timeout=get("room.session_timeout"),
        max_sessions_per_ip=get("room.max_sessions_per_ip"),
        announce_limit=get("room.announce_limit"),
        unreachable_after=get("room.unreachable_after"),
        evict_idle_after=get("room.evict_idle_after"),
        ipv6_prefix=get("room.ipv6_prefix"),
        require_verified=get("room.require_verified"),
        unreachable_grace=get("room.unreachable_grace"),
        templates=MappingProxyType(templates),
    )
    for path in ("control.socket", "control.fifo", "log.file"):
        value = get(path)
        if value is not None and not os.path.isabs(value):
            raise where.error(path, f"must be an absolute path, got {value!r}")
    return Settings(
        listen=ListenSettings(
            host=get("listen.host"),
            port=get("listen.port"),
            rcvbuf=get("listen.rcvbuf"),
            sndbuf=get("listen.sndbuf"),
        ),
        log=LogSettings(level=get("log.level"), format=get("log.format"), file=get("log.file")),
        room=room,
        daemon=DaemonSettings(
            user=get("daemon.user"),
            group=get("daemon.group"),
            umask=get("daemon.umask"),
            start_timeout=get("daemon.start_timeout"),
        ),
        control=ControlSettings(
            socket=get("control.socket") or os.path.join(runtime_dir, "control.sock"),
            fifo=get("control.fifo") or os.path.join(runtime_dir, "control.fifo"),
            mode=get("control.mode"),
            group=get("control.group"),
        ),
        runtime_dir=runtime_dir,
        plugins=MappingProxyType(dict(get("plugins"))),
        source=source,
    )


def config_path(cli_value: str | None) -> str | None:
    """The file to read: ``-c`` first, then ``$CHATD_CONFIG``, else none (built-in defaults)."""
    return cli_value or os.environ.get(ENV_CONFIG) or None


def load(path: str | None) -> Settings:
    """Settings from ``path``, or the built-in defaults when ``path`` is None."""
    if path is None:
        return from_mapping({})
    path = os.path.abspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give another with -c FILE)") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, source=path)


def locate(path: str | None) -> tuple[Settings, ConfigError | None]:
    """Settings good enough to find a running daemon's files, and the error if the file
    does not validate.

    Lenient on purpose: ``chatd stop``, ``status`` and ``reload`` (and ``chatctl``)
    must still reach the daemon after someone broke its file: reload, to hear
    what is wrong with it; stop, to stop it anyway. Only ``runtime_dir``,
    ``control.socket``/``control.fifo`` and ``daemon.user`` are taken from an
    invalid file.
    """
    try:
        return load(path), None
    except ConfigError as exc:
        if path is None:
            raise
        error = exc
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise error from None
    raw = raw if isinstance(raw, dict) else {}
    control = raw.get("control") if isinstance(raw.get("control"), dict) else {}
    wanted: dict[str, Any] = {"control": {k: control[k] for k in ("socket", "fifo")
                                          if isinstance(control.get(k), str)}}
    daemon = raw.get("daemon") if isinstance(raw.get("daemon"), dict) else {}
    if isinstance(daemon.get("user"), str):
        wanted["daemon"] = {"user": daemon["user"]}  # whose control socket to trust
    if isinstance(raw.get("runtime_dir"), str):
        wanted["runtime_dir"] = raw["runtime_dir"]
    try:
        return from_mapping(wanted, source=path), error
    except ConfigError:
        raise error from None


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Key paths whose change needs a restart, to be logged and ignored on reload."""
    flat_old, flat_new = as_flat_dict(old), as_flat_dict(new)
    return [k for k in flat_new if k.startswith(RESTART_ONLY) and flat_old[k] != flat_new[k]]


def as_flat_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as ``{"room.max_users": 1000, ...}`` (for check-config)."""
    out: dict[str, Any] = {}
    for section in ("listen", "log", "room", "daemon", "control"):
        obj = getattr(settings, section)
        for name in obj.__dataclass_fields__:
            value = getattr(obj, name)
            out[f"{section}.{name}"] = dict(value) if isinstance(value, Mapping) else value
    out["runtime_dir"] = settings.runtime_dir
    out["plugins"] = dict(settings.plugins)
    return out
