"""The man pages: clean mdoc, and complete against the code they describe.

A page that lags behind the code is worse than none, so these tests compare
the pages with the argparse parsers, the configuration schema and the
plugin catalog: a new subcommand, option, key or plugin option fails here
until its page says what it does.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from chatd import config as config_mod
from chatd.cli import chatctl as chatctl_cli
from chatd.cli import chatd as chatd_cli
from chatd.plugins.catalog import default_catalog

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = ("chatd.8", "chatctl.8", "chatd.yaml.5")
MANDOC = shutil.which("mandoc")


def page(name: str) -> str:
    return (MAN / name).read_text(encoding="utf-8")


@pytest.mark.skipif(MANDOC is None, reason="mandoc is absent (apt-get install mandoc)")
@pytest.mark.parametrize("name", PAGES)
def test_page_lints_clean(name: str) -> None:
    result = subprocess.run([MANDOC, "-Tlint", "-Wwarning", str(MAN / name)],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _flag(option: str) -> str:
    """``--timeout`` as mdoc writes it: ``Fl -timeout``; ``-c``: ``Fl c``."""
    return f"Fl {option[1:]}"


def _documented_options(parser: argparse.ArgumentParser, text: str, skip: set[str]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        for option in action.option_strings:
            if option not in skip:
                assert _flag(option) in text, f"{parser.prog}: {option} is not documented"
        if not action.option_strings and action.metavar:
            assert f"Ar {action.metavar.lower()}" in text, (parser.prog, action.metavar)


@pytest.mark.parametrize(("name", "parser"), [("chatd.8", chatd_cli._parser()),
                                              ("chatctl.8", chatctl_cli._parser())])
def test_every_command_and_option_is_documented(name: str, parser: argparse.ArgumentParser
                                                ) -> None:
    text = page(name)
    _documented_options(parser, text, skip=set())
    for command, sub in _subcommands(parser).items():
        assert re.search(rf"^\.It Cm {re.escape(command)}\b", text, re.M), \
            f"{name}: {command} has no entry"
        _documented_options(sub, text, skip={"-h", "--help", "-c", "--config"})


def _default_text(key: str, value: object) -> str:
    """A key's default as the page writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{}"
    if key in ("daemon.umask", "control.mode"):
        return f"0{value:03o}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@pytest.mark.parametrize("key", list(config_mod.SCHEMA))
def test_every_config_key_is_documented_with_its_default_and_reload(key: str) -> None:
    match = re.search(rf"^\.It Cm {re.escape(key)} Pq (.*)$", page("chatd.yaml.5"), re.M)
    assert match, f"chatd.yaml(5) has no entry for {key}"
    kind, default, when = [part.strip() for part in match.group(1).rsplit(" , ", 2)]
    assert kind
    assert default == f"default Li {_default_text(key, config_mod.DEFAULTS[key])}"
    assert when == ("restart" if config_mod.needs_restart(key) else "reload")


def test_every_builtin_plugin_and_option_is_documented() -> None:
    text = page("chatd.yaml.5")
    builtins = {name: spec for name, spec in default_catalog().specs.items()
                if spec.source == "builtin"}
    starts = {}
    for name, spec in builtins.items():
        state = "on by default" if spec.enabled_by_default else "off by default"
        match = re.search(rf"^\.It Cm {name} Pq {state}$", text, re.M)
        assert match, f"chatd.yaml(5) has no entry '{name} ({state})'"
        starts[name] = match.start()
    ends = sorted(starts.values())[1:] + [len(text)]
    for name, start in starts.items():
        block = text[start:ends[sorted(starts.values()).index(start)]]
        for option in builtins[name].options:
            assert re.search(rf"^\.It Cm {option} Pq", block, re.M), \
                f"chatd.yaml(5): plugin {name} does not document its option {option}"
        if not builtins[name].options:
            assert "No options." in block, name


@pytest.mark.skipif(MANDOC is None, reason="mandoc is absent (apt-get install mandoc)")
def test_control_protocol_examples_render_as_json() -> None:
    # mdoc takes quotes on a macro line as argument delimiters and drops them,
    # so an example that reads well in the source can render as broken JSON.
    rendered = subprocess.run([MANDOC, "-Tutf8", str(MAN / "chatctl.8")], capture_output=True,
                              text=True, timeout=30, check=True).stdout
    plain = re.sub(".\b", "", rendered)  # overstrike bold and underline
    protocol = plain[plain.index("\nPROTOCOL"):]
    protocol = protocol[:re.search(r"\n[A-Z][A-Z ]+\n", protocol[1:]).start() + 1]
    examples = [line.strip() for line in protocol.splitlines() if line.strip().startswith("{")]
    assert len(examples) == 3, examples
    request, *answers = (json.loads(example) for example in examples)
    assert request["cmd"] in _subcommands(chatctl_cli._parser())
    assert [answer["ok"] for answer in answers] == [True, False]
