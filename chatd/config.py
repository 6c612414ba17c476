"""YAML configuration: one file in, typed and frozen settings out.

Every key has a built-in default, so chatd runs with no file at all. A key
that is unknown or of the wrong type is an error that names the key path and
its line, because the person reading it is fixing a file in an editor.

Each key is written once, in :data:`SCHEMA` with its check; the settings it
becomes, and its default, are the dataclasses of :mod:`chatd.settings`, built
from the checked keys by their field names. Configuration knows no plugin:
whoever runs plugins passes the check of their options in (``check_plugins``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.resolver import Resolver

from chatd import safefs
from chatd.names import MAX_NAME_LENGTH
from chatd.settings import (
    ClusterSettings,
    ControlSettings,
    DaemonSettings,
    ListenSettings,
    LogSettings,
    MetricsSettings,
    RoomSettings,
    Settings,
)
from chatd.templates import ADMIN_NAMES, LOCALES, template_problem

ENV_CONFIG = "CHATD_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Largest configuration file read: a file is read whole, in the room's loop on reload.
MAX_FILE_BYTES = 1 << 20
#: Most nodes (keys, values, list items) in a file, each use of an alias counting
#: everything it stands for: a "billion laughs" file stops here, not in the memory.
MAX_NODES = 10_000
#: Deepest nesting of mappings and lists (the top-level mapping is level 1).
MAX_DEPTH = 32


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for a person."""


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


def _redis_url(value: Any) -> str:
    """``redis://``, ``rediss://`` (TLS) or ``unix://``, as redis-py reads them."""
    value = _text(value)
    scheme = value.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix") or "://" not in value:
        raise ValueError("expected a URL such as redis://127.0.0.1:6379/0 or "
                         f"unix:///run/redis/redis.sock, got {hide_password(value)!r}")
    return value


def hide_password(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (in the user part or a
    ``password=`` parameter): what check-config, reload's answer and errors may print,
    which end up in terminals, journals and tickets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that cannot be parsed>"
    hidden = url
    user, at, host = parts.netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        hidden = hidden.replace(parts.netloc, f"{name}:***@{host}" if colon else f"***@{host}", 1)
    fields = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in fields):
        query = "&".join(f"{key}={'***' if key == 'password' else value}" for key, value in fields)
        hidden = hidden.replace(f"?{parts.query}", f"?{query}", 1)
    return hidden


#: Keys whose value may carry a secret: shown through their function, never as they are.
SECRET_KEYS: Mapping[str, Callable[[str], str]] = {"cluster.redis": hide_password}


def shown(key: str, value: Any) -> Any:
    """A setting as it may be printed or logged (see :data:`SECRET_KEYS`)."""
    hide = SECRET_KEYS.get(key)
    return hide(value) if hide is not None and isinstance(value, str) else value


def _host_port(value: Any) -> str:
    """``127.0.0.1:9464``, ``[::1]:9464`` or ``:9464`` (every address)."""
    value = _text(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535 or (
            host.startswith("[") != host.endswith("]")):
        raise ValueError(f"expected host:port such as 127.0.0.1:9464, got {value!r}")
    return value


def _node_name(value: Any) -> str:
    value = _text(value)
    if len(value) > 64 or not all(c.isalnum() or c in "-_.:" for c in value):
        raise ValueError("expected at most 64 letters, digits and - _ . :, "
                         f"got {value!r}")
    return value


def _absolute_path(value: Any) -> str:
    value = _text(value)
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


class _KeyProblem(ValueError):
    """A checker's error about a key below the one it checks: ``path`` names it in full
    (``room.templates.chat``). :class:`chatd.plugins.PluginConfigError` is one in kind."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _templates(value: Any) -> dict:
    overrides = _mapping(value)
    for key, text in overrides.items():
        problem = (template_problem(str(key), text) if isinstance(text, str)
                   else f"expected a string, got {text!r}")
        if problem:
            raise _KeyProblem(f"room.templates.{key}", problem)
    return {str(key): text for key, text in overrides.items()}


#: Every key and its checker; the documentation in etc/chatd.yaml and
#: chatd.yaml(5) follows this table. A key's default is its field's in
#: :mod:`chatd.settings` (``room.max_users`` is ``RoomSettings.max_users``),
#: unless :data:`DERIVED` says otherwise.
SCHEMA: Mapping[str, Callable[[Any], Any]] = {
    "listen.host": _text,
    "listen.port": _int(0, 65535),
    "listen.rcvbuf": _int(4096, 1 << 30),
    "listen.sndbuf": _int(4096, 1 << 30),
    "listen.reuseport": _bool,
    "runtime_dir": _optional(_text),
    "log.level": _choice(*LOG_LEVELS),
    "log.format": _optional(_choice("json", "console")),
    "log.file": _optional(_absolute_path),
    "room.locale": _choice(*LOCALES),
    "room.admin_name": _optional(_text),
    "room.max_users": _int(1, 1_000_000),
    "room.max_name_length": _int(1, MAX_NAME_LENGTH),
    "room.max_datagram": _int(64, 65507),
    "room.session_timeout": _number(1, 86400 * 365),
    "room.max_sessions_per_ip": _int(0, 1_000_000),
    "room.announce_limit": _int(0, 1_000_000),
    "room.unreachable_after": _int(0, 1_000_000),
    "room.evict_idle_after": _number(0, 86400 * 365),
    "room.ipv6_prefix": _int(0, 128),
    "room.require_verified": _bool,
    "room.unreachable_grace": _number(0, 86400 * 365),
    "room.templates": _templates,
    "daemon.user": _optional(_text),
    "daemon.group": _optional(_text),
    "daemon.umask": _mode,
    "daemon.start_timeout": _number(0.1, 3600),
    "control.socket": _optional(_absolute_path),
    "control.fifo": _optional(_absolute_path),
    "control.mode": _mode,
    "control.group": _optional(_text),
    "plugins": _mapping,
    "cluster.redis": _optional(_redis_url),
    "cluster.password_file": _optional(_absolute_path),
    "cluster.room": _node_name,
    "cluster.node": _optional(_node_name),
    "cluster.node_timeout": _number(1, 3600),
    "metrics.listen": _optional(_host_port),
}

#: Keys whose value is not simply what the file says: the default the file would
#: spell (null: "follows from the others"), and how the value is made from the
#: checked values. The rules run in this order, each seeing what those before it made.
DERIVED: Mapping[str, tuple[Any, Callable[[Mapping[str, Any]], Any]]] = {
    "runtime_dir": (None, lambda v: os.path.abspath(v["runtime_dir"] or default_runtime_dir())),
    "room.admin_name": (None, lambda v: v["room.admin_name"] or ADMIN_NAMES[v["room.locale"]]),
    "room.templates": ({}, lambda v: MappingProxyType({**LOCALES[v["room.locale"]],
                                                       **v["room.templates"]})),
    "control.socket": (None, lambda v: v["control.socket"]
                       or os.path.join(v["runtime_dir"], "control.sock")),
    "control.fifo": (None, lambda v: v["control.fifo"]
                     or os.path.join(v["runtime_dir"], "control.fifo")),
    "plugins": ({}, lambda v: MappingProxyType(dict(v["plugins"]))),
    # only a clustered node has a name: a single node's port change is no name change
    "cluster.node": (None, lambda v: v["cluster.node"] or (
        f"{socket.gethostname()}:{v['listen.port']}" if v["cluster.redis"] else None)),
}

#: The sections of the file and the settings each becomes; a key outside them
#: (``runtime_dir``) is a field of :class:`~chatd.settings.Settings` itself.
SECTIONS: Mapping[str, type] = {"listen": ListenSettings, "log": LogSettings,
                                "room": RoomSettings, "daemon": DaemonSettings,
                                "control": ControlSettings, "cluster": ClusterSettings,
                                "metrics": MetricsSettings}


def _field_default(key: str) -> Any:
    section, _, name = key.rpartition(".")
    found = {f.name: f for f in dataclasses.fields(SECTIONS[section] if section else Settings)}
    field = found[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if field.default is dataclasses.MISSING:
        raise TypeError(f"{key}: its field has no default and DERIVED has no rule for it")
    return field.default


#: The default of every key, as the file would spell it.
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    key: DERIVED[key][0] if key in DERIVED else _field_default(key) for key in SCHEMA})

#: Keys read once at start-up; a reload that changes them keeps the old value. A
#: name without a dot is a whole section (or a top-level key).
RESTART_ONLY = ("listen", "runtime_dir", "daemon", "control", "cluster", "metrics")

#: Keys whose value is a file mode, written in octal.
OCTAL_KEYS = frozenset(key for key, check in SCHEMA.items() if check is _mode)


class _Located:
    """Where each key path stands in the file, for error messages."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source = source
        self.lines = lines

    def error(self, path: str, message: str) -> ConfigError:
        line = self.lines.get(path)
        where = f"{self.source}, line {line}" if line else self.source
        # a value quoted in the message may be a megabyte long: it is not for the log
        return ConfigError(f"{where}: {_shorten(path, 100)}: {_shorten(message, 300)}")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- reading YAML with bounds -------------------------------------------------------


class _Refused(Exception):
    """Valid YAML that chatd will not read: too deep, too many nodes, a key given twice."""

    def __init__(self, mark: Any, path: str, message: str):
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None
        self.path = path


class _Bounds:
    """Composition that counts: nesting depth, and nodes with each alias expanded.

    PyYAML composes recursively (600 levels of ``[`` exhaust Python's stack) and
    keeps one node per anchor however often it is used; whoever walks the data
    afterwards sees every use in full, 10**9 of them for a 1 KB "billion laughs"
    file. So composition stops at :data:`MAX_DEPTH` levels and :data:`MAX_NODES`
    nodes counted as if every alias were written out. The size of an anchored
    node is known when its alias is met, unless the alias is inside it.
    """

    def _start_bounds(self) -> None:
        self._depth = 0
        self._nodes = 0
        self._path: list[str | None] = []
        self._sizes: dict[yaml.Node, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()  # type: ignore[attr-defined]
        key = index.value if isinstance(index, yaml.ScalarNode) else None
        self._path.append(key if parent is not None else None)
        try:
            if isinstance(event, AliasEvent):
                target = self.anchors.get(event.anchor)  # type: ignore[attr-defined]
                if target is not None:
                    size = self._sizes.get(target)
                    if size is None:
                        self._refuse(event, f"the alias *{event.anchor} is inside its own anchor")
                    self._count(size, event)
                return super().compose_node(parent, index)  # type: ignore[misc]
            self._depth += 1
            if self._depth > MAX_DEPTH:
                self._refuse(event, f"nested more than {MAX_DEPTH} levels deep")
            before = self._nodes
            self._count(1, event)
            node = super().compose_node(parent, index)  # type: ignore[misc]
            self._depth -= 1
            if event.anchor is not None:
                self._sizes[node] = self._nodes - before
            return node
        finally:
            self._path.pop()

    def _count(self, nodes: int, event: Any) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            self._refuse(event, f"more than {MAX_NODES} keys, values and list items, each "
                                "alias counted as all it stands for (a \"billion laughs\"?)")

    def _refuse(self, event: Any, message: str) -> None:
        keys = self._path[1:]
        path = ".".join(keys[:keys.index(None)] if None in keys else keys)
        raise _Refused(event.start_mark, path, message)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except ValueError as exc:  # int() of 5000 digits, February 30th
            raise ConstructorError(None, None, str(exc), node.start_mark) from None


class _PureLoader(_Bounds, yaml.SafeLoader):
    """Python's own parser: slower, used where PyYAML was built without libyaml."""


try:
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _Loader: type = _PureLoader
else:
    class _Loader(_Bounds, Composer, CParser, SafeConstructor, Resolver):  # type: ignore[no-redef]
        """libyaml scans and parses (1 MiB of text in milliseconds); Python composes,
        within bounds, and constructs as :class:`yaml.SafeLoader` does."""

        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


def _read_yaml(text: str, source: str, *, strict: bool = True) -> tuple[Any, dict[str, int]]:
    """The data in ``text`` and the line of each key path; raises :class:`ConfigError`.

    Parsed once, within bounds; ``strict`` refuses duplicate keys.
    """
    loader = _Loader(text)
    try:
        loader._start_bounds()
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is not None:
            _walk(node, lines, strict)
        data = None if node is None else loader.construct_document(node)
    except _Refused as exc:
        where = f"{source}, line {exc.line}" if exc.line else source
        path = f"{_shorten(exc.path, 100)}: " if exc.path else ""
        raise ConfigError(f"{where}: {path}{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {_shorten(problem, 300)}") from None
    finally:
        loader.dispose()
    return data, lines


def _walk(root: yaml.Node, lines: dict[str, int], strict: bool) -> None:
    """Record the line of each key path; with ``strict``, refuse a key given twice.

    Iterative, and over at most :data:`MAX_NODES` nodes: composition checked that.
    """
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{prefix[:-1]}[{i}].") for i, item in enumerate(node.value))
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list as a key: construction refuses it, naming the line
            path = f"{prefix}{key_node.value}"
            same = (key_node.tag, key_node.value)  # "port" and port are the same key
            if same in seen and strict:
                raise _Refused(key_node.start_mark, path,
                               f"duplicate key (first at line {seen[same]})")
            seen.setdefault(same, line)
            lines.setdefault(path, line)
            stack.append((value_node, path + "."))


#: Checks the ``plugins:`` mapping (:func:`chatd.plugins.check_settings`): raises
#: ValueError, whose ``path`` attribute, if any, names the key (``plugins.history.size``).
PluginCheck = Callable[[Mapping[str, Any]], object]


def parse(text: str, source: str = "<config>", *,
          check_plugins: PluginCheck | None = None) -> Settings:
    """Settings from YAML text; raises :class:`ConfigError`.

    ``plugins:`` is checked only as far as ``check_plugins`` goes: configuration
    knows no plugin, so whoever runs them says what their options may be.
    """
    data, lines = _read_yaml(text, source)
    return from_mapping({} if data is None else data, _Located(source, lines), source,
                        check_plugins=check_plugins)


def from_mapping(data: Any, where: _Located | None = None, source: str | None = None, *,
                 check_plugins: PluginCheck | None = None) -> Settings:
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
    values = dict(DEFAULTS)
    for path, value in flat.items():
        if path not in SCHEMA:
            raise where.error(path, "unknown key" + _suggestion(path))
        try:
            values[path] = SCHEMA[path](value)
        except ValueError as exc:
            raise where.error(getattr(exc, "path", path), str(exc)) from None
    if check_plugins is not None:
        try:
            check_plugins(values["plugins"])
        except ValueError as exc:
            raise where.error(getattr(exc, "path", "plugins"), str(exc)) from None
    return _build(values, where, source)


def _suggestion(path: str) -> str:
    section = path.split(".")[0]
    known = [k for k in SCHEMA if k.startswith(section + ".")]
    if known:
        return f" (known keys in {section}: {', '.join(k.split('.', 1)[1] for k in known)})"
    top = {key.split(".")[0] for key in SCHEMA}
    return f" (known top-level keys: {', '.join(sorted(top))})"


def _build(values: dict[str, Any], where: _Located, source: str | None) -> Settings:
    """The settings from every key's checked value: each section's dataclass takes
    the keys of its fields, :class:`Settings` the top-level ones."""
    for key, (_, rule) in DERIVED.items():
        values[key] = rule(values)
    sections = {name: kind(**{field.name: values[f"{name}.{field.name}"]
                              for field in dataclasses.fields(kind)})
                for name, kind in SECTIONS.items()}
    top = {key: value for key, value in values.items() if "." not in key}
    return Settings(**sections, **top, source=source,
                    lines=MappingProxyType(dict(where.lines)))


def config_path(cli_value: str | None) -> str | None:
    """The file to read: ``-c`` first, then ``$CHATD_CONFIG``, else none (built-in defaults)."""
    return cli_value or os.environ.get(ENV_CONFIG) or None


def load(path: str | None, *, check_plugins: PluginCheck | None = None) -> Settings:
    """Settings from ``path``, or the built-in defaults when ``path`` is None.

    Every program that runs plugins or reports on a file passes ``check_plugins``
    (see :func:`parse`); without it a bad plugin option goes unnoticed here.
    """
    if path is None:
        return from_mapping({}, check_plugins=check_plugins)
    path = os.path.abspath(path)
    return parse(_read_file(path), source=path, check_plugins=check_plugins)


def _read_file(path: str) -> str:
    """The text of the file at ``path``: a regular file of at most :data:`MAX_FILE_BYTES`
    (a FIFO given by mistake is refused, never waited on: see chatd.safefs)."""
    try:
        data = safefs.read_regular_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give another with -c FILE)") from None
    except safefs.NotRegularFile as exc:
        if exc.kind == "a directory":
            raise ConfigError(f"{path}: cannot read: Is a directory") from None
        raise ConfigError(f"{path}: not a regular file ({exc.kind}); "
                          "give a configuration file") from None
    except safefs.FileTooLarge as exc:
        raise ConfigError(f"{path}: too large ({exc.size} bytes); a configuration file may have "
                          f"at most {MAX_FILE_BYTES} bytes (1 MiB)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def locate(path: str | None, *, check_plugins: PluginCheck | None = None,
           ) -> tuple[Settings, ConfigError | None]:
    """Settings good enough to find a running daemon's files, and the error if the file
    does not validate.

    Lenient on purpose: ``chatd stop``, ``status`` and ``reload`` (and ``chatctl``)
    must still reach the daemon after someone broke its file: reload, to hear
    what is wrong with it; stop, to stop it anyway. Only ``runtime_dir``,
    ``control.socket``/``control.fifo`` and ``daemon.user`` are taken from an
    invalid file. The bounds on reading hold here too: a file chatd refuses to
    parse is not parsed. ``check_plugins`` is for the error only (see :func:`load`).
    """
    try:
        return load(path, check_plugins=check_plugins), None
    except ConfigError as exc:
        if path is None:
            raise
        error = exc
    try:
        raw, _ = _read_yaml(_read_file(os.path.abspath(path)), path, strict=False)
    except ConfigError:
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


def needs_restart(key: str) -> bool:
    """Whether ``key`` (``listen.port``) is read only at start-up: see :data:`RESTART_ONLY`."""
    return key in RESTART_ONLY or key.split(".")[0] in RESTART_ONLY


def keep_restart_only(old: Settings, new: Settings) -> Settings:
    """``new``, but with the value of ``old`` for every key of :data:`RESTART_ONLY`:
    the settings a reload applies."""
    kept: dict[str, Any] = {}
    for key in RESTART_ONLY:
        section, _, name = key.partition(".")
        if not name:
            kept[section] = getattr(old, section)
        else:
            kept[section] = dataclasses.replace(kept.get(section, getattr(new, section)),
                                                **{name: getattr(getattr(old, section), name)})
    return dataclasses.replace(new, **kept)


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Key paths whose change needs a restart, to be logged and ignored on reload."""
    flat_old, flat_new = as_flat_dict(old), as_flat_dict(new)
    return [k for k in flat_new if needs_restart(k) and flat_old[k] != flat_new[k]]


def reload_changes(old: Settings, new: Settings) -> dict[str, Any]:
    """What reloading ``new`` over ``old`` does, for the person who asked:
    ``applied``, the key paths that change now (``room.templates.chat``, ``plugins.motd``
    for a mapping), and ``restart_needed``, each key a restart would change, with the
    value ``kept`` and the one the file ``wanted``."""
    flat_old, flat_new = as_flat_dict(old), as_flat_dict(new)
    restart = restart_only_changes(old, new)
    applied: list[str] = []
    for key, value in flat_new.items():
        before = flat_old[key]
        if key in restart or value == before:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            applied += [f"{key}.{k}" for k in sorted(value.keys() | before.keys(), key=str)
                        if value.get(k) != before.get(k)]
        else:
            applied.append(key)
    return {"applied": applied,
            "restart_needed": [{"key": k, "kept": shown(k, flat_old[k]),
                                "wanted": shown(k, flat_new[k])} for k in restart]}


def format_value(key: str, value: Any) -> str:
    """A setting as the file would spell it: modes in octal."""
    if key in OCTAL_KEYS and isinstance(value, int):
        return f"0{value:03o}"
    return "null" if value is None else str(value)


def describe_reload(changes: Mapping[str, Any]) -> str:
    """``applied room.max_users; needs a restart, kept: listen.port = 8888 (file says 9999)``"""
    applied = changes.get("applied") or []
    kept = changes.get("restart_needed") or []
    parts = [f"applied {', '.join(applied)}"] if applied else []
    if kept:
        parts.append("needs a restart, kept: " + ", ".join(
            f"{k['key']} = {format_value(k['key'], k['kept'])} "
            f"(file says {format_value(k['key'], k['wanted'])})" for k in kept))
    return "; ".join(parts) or "nothing changed"


def as_flat_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as ``{"room.max_users": 1000, ...}`` (for check-config)."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        obj = getattr(settings, section)
        for field in dataclasses.fields(obj):
            out[f"{section}.{field.name}"] = getattr(obj, field.name)
    out.update((key, getattr(settings, key)) for key in SCHEMA if "." not in key)
    return {key: dict(value) if isinstance(value, Mapping) else value
            for key, value in out.items()}
