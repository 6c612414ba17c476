"""Configuration: defaults, the documented example, and errors that name key and line."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatd import config

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
