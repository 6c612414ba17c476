"""Configuration: defaults, the documented example, and errors that name key and line."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatd import config
from chatd.plugins import check_settings
from chatd.settings import DaemonSettings, ListenSettings, LogSettings, RoomSettings, Settings
from chatd.templates import LOCALES

ROOT = Path(__file__).resolve().parent.parent


def check_config(path: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)


def test_defaults_need_no_file():
    settings = config.load(None)
    assert (settings.listen.host, settings.listen.port) == ("0.0.0.0", 8888)
    assert settings.room.max_users == 1000 and settings.room.session_timeout == 90
    assert settings.room.admin_name == "admin"


def test_documented_example_loads_and_equals_the_defaults():
    example = config.load(str(ROOT / "etc" / "chatd.yaml"))
    defaults = config.load(None)
    assert config.as_flat_dict(example) == config.as_flat_dict(defaults)


def test_every_schema_key_is_documented_in_the_example():
    text = (ROOT / "etc" / "chatd.yaml").read_text()
    for key in config.SCHEMA:
        assert f"{key.split('.')[-1]}:" in text, key


def test_zh_cn_locale_and_template_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('room:\n  locale: zh_CN\n  templates:\n    left: "\\n{name} 走了"\n')
    room = config.load(str(path)).room
    assert room.admin_name == "管理员"
    assert room.templates["chat"] == "\n{name} 说: {text}"
    assert room.templates["left"] == "\n{name} 走了"


def test_octal_modes_as_number_or_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('daemon:\n  umask: 0027\ncontrol:\n  mode: "0600"\n')
    settings = config.load(str(path))
    assert settings.daemon.umask == 0o027 and settings.control.mode == 0o600


def test_env_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATD_CONFIG", str(tmp_path / "x.yaml"))
    assert config.config_path(None) == str(tmp_path / "x.yaml")
    assert config.config_path("/other.yaml") == "/other.yaml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen:\n  port: 8888\n  hots: x\n", "line 3: listen.hots: unknown key"),
        ("room:\n  max_users: lots\n", "line 2: room.max_users: expected an integer, got 'lots'"),
        ("room:\n  max_users: 0\n", "room.max_users: must be between 1 and"),
        ("log:\n  level: loud\n", "line 2: log.level: expected one of debug"),
        ("listen: [1, 2]\n", "line 1: listen: expected a mapping"),
        ("colour: blue\n", "line 1: colour: unknown key"),
        ("room:\n  templates:\n    chat: '{nick} {text}'\n",
         "line 3: room.templates.chat: unknown field {nick}"),
        ("room:\n  templates:\n    chit: 'x'\n", "room.templates.chit: unknown template"),
        ("log:\n  file: relative.log\n", "log.file: must be an absolute path"),
        ("room: {max_users: 3\n", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_errors_name_the_key_and_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: 1\n  host: [oops\n")
    with pytest.raises(config.ConfigError, match=r"line \d+: not valid YAML"):
        config.load(str(path))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("listen:\n  hots: x\n", "listen.hots: unknown key"),
        ("room:\n  max_users: many\n", "room.max_users: expected an integer"),
        ("room: [\n", "not valid YAML"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = check_config(missing)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "no such file" in result.stderr


def test_run_with_bad_config_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nonsense: 1\n")
    result = subprocess.run([sys.executable, "-m", "chatd", "run", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "nonsense: unknown key" in result.stderr


def test_check_config_prints_a_config_that_loads_back(tmp_path):
    result = check_config(ROOT / "etc" / "chatd.yaml")
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    again = check_config(printed)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == result.stdout.splitlines()[1:]


# -- hostile and mistaken files (issue 13) -------------------------------------------------------


def billion_laughs() -> str:
    """The 1 KB file of the issue: nine levels of ten aliases each, under an unknown key."""
    lines = ["lol:", "  m0: &m0 {k0: x, k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x, "
             "k9: x}"]
    for level in range(1, 10):
        keys = ", ".join(f"k{i}: *m{level - 1}" for i in range(10))
        lines.append(f"  m{level}: &m{level} {{{keys}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["libyaml", "python"])
def parser(request, monkeypatch):
    """Both ways chatd may parse: libyaml's scanner where PyYAML has it, else PyYAML's own."""
    if request.param == "python":
        monkeypatch.setattr(config, "_Loader", config._PureLoader)
    elif config._Loader is config._PureLoader:
        pytest.skip("PyYAML built without libyaml")
    return request.param


@pytest.mark.timeout(10)
def test_billion_laughs_is_refused_at_once(tmp_path, parser):
    path = tmp_path / "lol.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 1100
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    message = str(caught.value)
    assert f"{path}, line " in message and ": lol.m" in message
    assert "more than 10000 keys, values and list items" in message


@pytest.mark.timeout(10)
def test_check_config_refuses_billion_laughs(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text(billion_laughs())
    result = check_config(path)
    assert result.returncode == 2
    assert "billion laughs" in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path, parser):
    path = tmp_path / "loop.yaml"
    path.write_text("plugins: &a\n  x: *a\n")
    with pytest.raises(config.ConfigError, match=r"line 2: plugins.x: the alias \*a is inside"):
        config.load(str(path))


def test_aliases_and_merge_keys_within_bounds_work(tmp_path, parser):
    path = tmp_path / "c.yaml"
    path.write_text("room:\n  <<: {max_name_length: 9}\n  max_users: &n 50\n"
                    "  announce_limit: *n\n")
    room = config.load(str(path)).room
    assert (room.max_users, room.announce_limit, room.max_name_length) == (50, 50, 9)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("depth", [600, 100_000])
def test_deep_nesting_is_a_clear_error(tmp_path, parser, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("plugins: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    message = str(caught.value)
    assert f"{path}, line 1: " in message
    # PyYAML's own parser reaches chatd's bound; libyaml stops at 1000 levels on its own
    assert ("plugins: nested more than 32 levels deep" in message
            or "exceeded maximum nesting depth" in message)


def test_nesting_bound_in_block_style_names_the_key(tmp_path, parser):
    path = tmp_path / "deep.yaml"
    path.write_text("plugins:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(40)))
    with pytest.raises(config.ConfigError,
                       match=r"line 32: plugins\.k0\.k1\.[k0-9.…]+: nested more than 32 levels"):
        config.load(str(path))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("depth", [600, 100_000])
def test_check_config_refuses_deep_nesting_without_a_traceback(tmp_path, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("plugins: " + "[" * depth + "]" * depth + "\n")
    result = check_config(path)
    assert result.returncode == 2
    assert "nest" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: {port: 8888, port: 9999}\n",
         "line 1: listen.port: duplicate key (first at line 1)"),
        ("room:\n  max_users: 3\nlog:\n  level: info\nroom:\n  max_users: 4\n",
         "line 5: room: duplicate key (first at line 1)"),
        ("listen:\n  port: 1\n  'port': 2\n",
         "line 3: listen.port: duplicate key (first at line 2)"),
        ("plugins:\n  wordfilter:\n    words: [a]\n    words: [b]\n",
         "line 4: plugins.wordfilter.words: duplicate key (first at line 3)"),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, expected):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value) == f"{path}, {expected}"


def test_the_daemons_files_are_found_despite_a_duplicate_key(tmp_path):
    """chatd stop and chatctl still reach a daemon whose file someone broke that way."""
    path = tmp_path / "dup.yaml"
    path.write_text(f"runtime_dir: {tmp_path}/run\nroom: {{}}\nroom: {{}}\n")
    settings, problem = config.locate(str(path))
    assert settings.control.socket == f"{tmp_path}/run/control.sock"
    assert problem is not None and "room: duplicate key" in str(problem)


def test_size_cap_at_one_mebibyte(tmp_path):
    path = tmp_path / "big.yaml"
    body = "room:\n  max_users: 7\n"
    filler = "#" * 99 + "\n"
    padding = config.MAX_FILE_BYTES - len(body)
    path.write_text(body + filler * (padding // 100) + "#" * (padding % 100))
    assert path.stat().st_size == config.MAX_FILE_BYTES
    assert config.load(str(path)).room.max_users == 7
    with path.open("a") as f:
        f.write("#")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert str(caught.value) == (f"{path}: too large (1048577 bytes); a configuration file "
                                 "may have at most 1048576 bytes (1 MiB)")
    with pytest.raises(config.ConfigError, match="too large"):
        config.locate(str(path))  # not read in full to find the daemon's files either
    result = check_config(path)
    assert result.returncode == 2 and "too large (1048577 bytes)" in result.stderr


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "chatd.yaml"
    os.mkfifo(fifo)
    result = check_config(fifo)
    assert result.returncode == 2
    assert f"{fifo}: not a regular file (a FIFO)" in result.stderr
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.locate(str(fifo))


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read: Is a directory"):
        config.load(str(tmp_path))


def test_values_quoted_in_errors_are_shortened(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("listen: '" + "x" * 100_000 + "'\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    message = str(caught.value)
    assert "line 1: listen: expected a mapping, got 'xxx" in message
    assert len(message) < len(str(path)) + 450 and message.endswith("…")


@pytest.mark.parametrize(
    ("value", "problem"),
    [("1" * 5000, "Exceeds the limit"), ("2024-02-30", "day is out of range for month")],
)
def test_a_value_python_cannot_convert_names_its_line(tmp_path, parser, value, problem):
    path = tmp_path / "value.yaml"
    path.write_text(f"listen:\n  port: {value}\n")
    with pytest.raises(config.ConfigError, match=rf"line 2: not valid YAML: {problem}"):
        config.load(str(path))


# -- check-config checks what start checks, short of the port (issue 13) ---------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("daemon:\n  user: nosuchuser\n", "line 2: daemon.user: no such user 'nosuchuser'"),
        ("daemon:\n  group: nosuchgroup\n", "line 2: daemon.group: no such group 'nosuchgroup'"),
        ("control:\n  group: nosuchgroup\n",
         "line 2: control.group: no such group 'nosuchgroup'"),
        ("runtime_dir: {tmp}/a-file/run\n",
         "line 1: cannot create runtime_dir {tmp}/a-file/run: Not a directory"),
        ("runtime_dir: {tmp}/a-file\n",
         "line 1: cannot create runtime_dir {tmp}/a-file: File exists"),
        ("log:\n  file: {tmp}/a-file/chatd.log\n",
         "line 2: cannot open log.file {tmp}/a-file/chatd.log: Not a directory"),
        ("log:\n  file: {tmp}\n", "line 2: cannot open log.file {tmp}: Is a directory"),
        ("runtime_dir: {tmp}/" + "d" * 100 + "\n",
         ": control.socket: {tmp}/" + "d" * 100 + "/control.sock is too long for a Unix socket"),
    ],
)
def test_check_config_refuses_what_start_would(tmp_path, text, expected):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "c.yaml"
    text = text.format(tmp=tmp_path)
    if "runtime_dir" not in text:
        text += f"runtime_dir: {tmp_path}/run\n"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"chatd: config error: {path}")
    assert expected.format(tmp=tmp_path) in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # checked, not created


def test_check_config_passes_what_start_accepts_and_creates_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"runtime_dir: {tmp_path}/run/chatd\nlog:\n  file: {tmp_path}/log/chatd.log\n"
                    "daemon:\n  user: root\n")
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# -- one spelling of each key; plugin options checked by whoever runs plugins (issue 14) ----------


def test_every_key_is_a_settings_field_and_every_field_a_key():
    fields = {f"{section}.{field.name}" for section, kind in config.SECTIONS.items()
              for field in dataclasses.fields(kind)}
    top = {field.name for field in dataclasses.fields(Settings)} - {*config.SECTIONS, "source",
                                                                     "lines"}
    assert set(config.SCHEMA) == fields | top
    assert set(config.DERIVED) <= set(config.SCHEMA)


def test_defaults_are_the_fields_defaults():
    settings = config.load(None)
    assert settings.listen == ListenSettings()
    assert settings.log == LogSettings()
    assert settings.daemon == DaemonSettings()
    assert settings.room == dataclasses.replace(RoomSettings(), templates=LOCALES["en"])
    assert config.DEFAULTS["room.max_users"] == RoomSettings.max_users


def test_a_bad_plugin_option_is_checked_only_by_the_caller_that_says_how(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("room:\n  max_users: 5\nplugins:\n  history:\n    size: many\n")
    assert config.load(str(path)).plugins == {"history": {"size": "many"}}
    with pytest.raises(config.ConfigError, match=r"line 5: plugins\.history\.size: expected"):
        config.load(str(path), check_plugins=check_settings)
    with pytest.raises(config.ConfigError, match=r"line 4: plugins\.nosuch: unknown plugin"):
        config.parse("plugins:\n  who: true\n\n  nosuch: {}\n", check_plugins=check_settings)


@pytest.mark.parametrize("command", ["check-config", "run", "start"])
def test_chatd_refuses_a_bad_plugin_option_naming_its_line(tmp_path, command):
    path = tmp_path / "c.yaml"
    path.write_text(f"runtime_dir: {tmp_path}/run\nlisten:\n  host: 127.0.0.1\n  port: 0\n"
                    "plugins:\n  wordfilter:\n    words: darn\n")
    result = subprocess.run([sys.executable, "-m", "chatd", command, "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"chatd: config error: {path}, line 7: plugins.wordfilter.words: "
                             "expected a list of non-empty strings, got 'darn'\n")
    assert not (tmp_path / "run").exists()


def test_stop_warns_of_a_bad_plugin_option_and_goes_on(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"runtime_dir: {tmp_path}/run\nplugins:\n  who: maybe\n")
    result = subprocess.run([sys.executable, "-m", "chatd", "stop", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert f"{path}, line 3: plugins.who:" in result.stderr
    assert "warning" in result.stderr and "not running" in result.stdout + result.stderr


def test_cluster_and_metrics_keys_are_checked_naming_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  redis: redis://127.0.0.1:6390/0\n  node: n1\n"
                    "metrics:\n  listen: 127.0.0.1:9464\n")
    settings = config.load(str(path))
    assert settings.cluster.enabled and settings.cluster.node == "n1"
    assert settings.metrics.listen == "127.0.0.1:9464"
    assert not config.load(None).cluster.enabled
    for text, line, key in (("cluster:\n  redis: http://x\n", 2, "cluster.redis"),
                            ("cluster:\n  node: 'a b'\n", 2, "cluster.node"),
                            ("\nmetrics:\n  listen: 9464\n", 3, "metrics.listen")):
        path.write_text(text)
        with pytest.raises(config.ConfigError, match=f"line {line}: {key}: expected"):
            config.load(str(path))


def test_a_reload_keeps_exactly_the_restart_only_keys(tmp_path, monkeypatch):
    old = config.load(None)
    path = tmp_path / "c.yaml"
    path.write_text(f"listen:\n  port: 9999\nruntime_dir: {tmp_path}\ndaemon:\n  umask: 0077\n"
                    "control:\n  mode: 0600\nroom:\n  max_users: 7\nlog:\n  level: debug\n"
                    "plugins:\n  who: false\n")
    new = config.load(str(path))
    merged = config.keep_restart_only(old, new)
    assert (merged.listen, merged.runtime_dir, merged.daemon, merged.control) == (
        old.listen, old.runtime_dir, old.daemon, old.control)
    assert (merged.room, merged.log, merged.plugins) == (new.room, new.log, new.plugins)
    assert config.restart_only_changes(old, merged) == []
    assert config.restart_only_changes(old, new) == [
        "listen.port", "daemon.umask", "control.socket", "control.fifo", "control.mode",
        "runtime_dir"]
    # the one list decides: a single key of a section, and a section no longer in it
    monkeypatch.setattr(config, "RESTART_ONLY", ("listen", "room.max_users"))
    merged = config.keep_restart_only(old, new)
    assert merged.room == dataclasses.replace(new.room, max_users=old.room.max_users)
    assert (merged.listen, merged.daemon, merged.runtime_dir) == (
        old.listen, new.daemon, new.runtime_dir)
    assert config.restart_only_changes(old, new) == ["listen.port", "room.max_users"]


def test_a_redis_password_is_never_printed(tmp_path):
    """check-config runs as ExecStartPre= (its output goes to the journal), reload answers
    whoever asked and is logged, and an error is pasted into tickets: none shows it."""
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  redis: redis://app:s3cret@127.0.0.1:6379/0?password=s3cret\n")
    shown = subprocess.run([sys.executable, "-m", "chatd", "check-config", "-c", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "redis: redis://app:***@127.0.0.1:6379/0?password=***" in shown.stdout
    assert "s3cret" not in shown.stdout + shown.stderr
    path.write_text("cluster:\n  redis: http://:s3cret@127.0.0.1/0\n")
    with pytest.raises(config.ConfigError) as refused:
        config.load(str(path))
    assert "s3cret" not in str(refused.value) and ":***@" in str(refused.value)
    old = config.load(None)
    path.write_text("cluster:\n  redis: unix:///run/redis.sock?password=s3cret\n")
    changes = config.reload_changes(old, config.load(str(path)))
    assert changes["restart_needed"][0]["wanted"] == "unix:///run/redis.sock?password=***"
    assert "s3cret" not in config.describe_reload(changes)
