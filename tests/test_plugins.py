"""Plugins through real UDP against ``chatd run``: built-ins, a third-party package
loaded from its entry point, a broken plugin, reload and restart.

The third-party plugins live in tests/plugin_pkg, a package of their own; pip
installs it into a directory that only these tests' servers see, so that they
are found exactly as an operator's would be, and never by a chatd run from the
test environment.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import CHATD, ChatdProcess, UdpUser, write_config

PKG = Path(__file__).parent / "plugin_pkg"
TEST_PLUGINS = {"shout", "broken"}

_PROBE = """
import importlib.metadata as m
names = {e.name for e in m.entry_points(group="chatd.plugins")}
print(sorted(names))
import chatd_test_plugins
print(chatd_test_plugins.__file__)
"""


def _probe(env: dict[str, str] | None = None) -> tuple[set[str], Path | None]:
    """The plugin names and the test package a fresh interpreter finds (servers are fresh too)."""
    found = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           env=env, timeout=60)
    lines = found.stdout.splitlines()
    names = set(ast.literal_eval(lines[0])) if lines else set()
    return names, Path(lines[1]) if found.returncode == 0 and len(lines) > 1 else None


@pytest.fixture(scope="module")
def plugin_pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """tests/plugin_pkg, pip-installed where only the processes these tests start look.

    Installed into the test environment, the test plugins would show in every
    chatd run from it (``make run``'s too). So pip puts them in a directory of
    their own, found through PYTHONPATH, and the servers find them by their
    entry points exactly as they would find an operator's.
    """
    source = tmp_path_factory.mktemp("plugin-src") / "plugin_pkg"
    # pip builds in the source tree: a copy keeps build/ and *.egg-info out of ours
    shutil.copytree(PKG, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("plugin-site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--disable-pip-version-check", "--target", str(site), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
        names, package = _probe()
        assert names >= TEST_PLUGINS and package is not None, "tests/plugin_pkg did not install"
        assert package.resolve().is_relative_to(site.resolve()), package
        yield


def test_the_test_plugins_stay_out_of_the_environment() -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    names, package = _probe(env)
    assert not names & TEST_PLUGINS and package is None, (
        f"{sys.prefix} has the test plugins installed ({package}): every chatd run from it "
        "lists them; remove them with: pip uninstall chatd-test-plugins")


@pytest.fixture
def people() -> Iterator[Callable[..., list[UdpUser]]]:
    """``people(server, "alice", "bob")``: joined users whose join notices are read; they
    log in as chat-client does, with an address cookie."""
    made: list[UdpUser] = []

    def join(server: ChatdProcess, *names: str) -> list[UdpUser]:
        users = [UdpUser(server.addr).join(name, verify=True) for name in names]
        made.extend(users)
        for user in users:
            user.ping()  # reads (and discards) the "X joined" notices before its PONG
        return users

    yield join
    for user in made:
        user.close()


def next_is_pong(user: UdpUser) -> None:
    """Nothing was queued for ``user`` but the answer to this ping (a barrier and a check)."""
    user.send(f"P {user.name}")
    assert user.recv() == b"PONG"


# -- the built-in commands, and a third-party plugin from its entry point ------------------


def test_who_me_msg_help(make_chatd, people, plugin_pkg):
    server = make_chatd({"plugins": {"shout": {"lines": False}}})
    alice, bob, carol = people(server, "alice", "bob", "carol")

    alice.say("/who")
    assert alice.recv_text() == "\nin the room (3): alice bob carol"
    next_is_pong(alice)
    next_is_pong(bob)  # the answer goes to the asker only

    alice.say("/me waves")
    assert bob.recv_text() == "\n* alice waves"
    assert carol.recv_text() == "\n* alice waves"
    next_is_pong(alice)

    alice.say("/msg Bob meet me at 5")
    assert bob.recv_text() == "\nalice says to you: meet me at 5"
    next_is_pong(alice)
    next_is_pong(carol)

    alice.say("/msg nobody hello?")
    assert alice.recv_text() == "\nno one called nobody is in the room"

    alice.say("/help")
    assert alice.recv_text() == "\ncommands:"
    usages = [alice.recv_text() for _ in range(5)]  # one datagram per line
    for usage, start in zip(usages, ("/help - ", "/me ACTION - ", "/msg NAME TEXT - ",
                                      "/shout TEXT - ", "/who - "), strict=True):
        assert usage.startswith("\n" + start) and "\n" not in usage[1:], usage
    next_is_pong(alice)

    alice.say("/frobnicate")
    assert alice.recv_text() == "\nunknown command /frobnicate (try /help)"


def test_third_party_plugin_loads_from_yaml(make_chatd, people, plugin_pkg):
    server = make_chatd({"plugins": {"shout": {"prefix": ">> "}}})
    alice, bob = people(server, "alice", "bob")
    alice.say("hello there")
    assert bob.recv_text() == "\nalice says: HELLO THERE"
    alice.say("/shout hi all")
    assert bob.recv_text() == "\n>> ALICE: HI ALL"
    assert alice.recv_text() == "\n>> ALICE: HI ALL"
    enabled = [e for e in server.log_events() if e["event"] == "plugin_enabled"]
    assert {"plugin": "shout", "source": "chatd-test-plugins 0.1.0"}.items() <= next(
        e for e in enabled if e["plugin"] == "shout").items()


# -- motd and history ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["text", "file"])
def test_motd_follows_ok(make_chatd, tmp_path, source):
    message = "welcome to the room\nbe nice"
    if source == "file":
        (tmp_path / "motd.txt").write_text(message + "\n")
        options = {"file": str(tmp_path / "motd.txt")}
    else:
        options = {"text": message}
    server = make_chatd({"plugins": {"motd": options}})
    user = UdpUser(server.addr)
    try:
        assert user.login("alice", verify=True) == b"OK"
        assert user.recv_text() == "\nwelcome to the room"
        assert user.recv_text() == "\nbe nice"
        next_is_pong(user)
    finally:
        user.close()


@pytest.mark.parametrize("swap", ["fifo", "huge"])
def test_a_motd_file_swapped_for_a_fifo_or_a_huge_file_cannot_stop_the_room(make_chatd, tmp_path,
                                                                          swap):
    """Before: the reload read a FIFO there forever, and the room stood still."""
    motd = tmp_path / "motd.txt"
    motd.write_text("welcome\n")
    server = make_chatd({"plugins": {"motd": {"file": str(motd)}}})
    motd.unlink()
    if swap == "fifo":
        os.mkfifo(motd)
    else:
        motd.write_bytes(b"x" * (1 << 20))
    server.reload()  # READY=1 again: the loop is not stuck on the file
    user = UdpUser(server.addr)
    try:
        assert user.login("alice", verify=True) == b"OK"
        next_is_pong(user)  # no message of the day: it was refused, and said so
    finally:
        user.close()
    failures = [e for e in server.log_events()
                if e.get("event") == "plugin_failed" and e.get("plugin") == "motd"]
    assert failures and ("FIFO" in failures[-1]["error"] or "too large" in failures[-1]["error"])


def test_history_replays_after_ok_and_survives_a_restart(make_chatd, people, tmp_path):
    overrides = {"plugins": {"history": {"size": 3, "path": str(tmp_path / "history.db")}}}
    first = make_chatd(overrides)
    (alice,) = people(first, "alice")
    for i in range(5):
        alice.say(f"line {i}")
    alice.ping()
    bob = UdpUser(first.addr)
    try:
        assert bob.login("bob", verify=True) == b"OK"
        assert [bob.recv_text() for _ in range(3)] == [
            "\nalice says: line 2", "\nalice says: line 3", "\nalice says: line 4"]
        next_is_pong(bob)
    finally:
        bob.close()
    assert first.stop() == 0

    second = make_chatd(overrides)
    carol = UdpUser(second.addr)
    try:
        assert carol.login("carol", verify=True) == b"OK"
        assert [carol.recv_text() for _ in range(3)] == [
            "\nalice says: line 2", "\nalice says: line 3", "\nalice says: line 4"]
        next_is_pong(carol)
    finally:
        carol.close()


# -- ratelimit -------------------------------------------------------------------------------


def test_ratelimit_drops_excess_lines_and_logins(make_chatd, people):
    server = make_chatd({"plugins": {"ratelimit": {
        "exempt": [], "line_burst": 3, "lines_per_second": 0.01,
        "login_burst": 3, "logins_per_minute": 0.01}}})
    alice, bob = people(server, "alice", "bob")
    for i in range(6):
        alice.say(f"flood {i}")
    assert [bob.recv_text() for _ in range(3)] == [
        "\nalice says: flood 0", "\nalice says: flood 1", "\nalice says: flood 2"]
    assert alice.recv_text() == "\nslow down: some of your lines were not sent"
    next_is_pong(alice)  # one warning per burst, not one per dropped line
    next_is_pong(bob)

    (carol,) = people(server, "carol")  # the third login from 127.0.0.1 is within the burst
    dave = UdpUser(server.addr)
    try:
        assert dave.login("dave") == b"\ntoo many logins from your address, try again later"
    finally:
        dave.close()
    next_is_pong(carol)


def test_ratelimit_is_on_by_default_and_can_be_turned_off(make_chatd):
    on = make_chatd()
    off = make_chatd({"plugins": {"ratelimit": False}})
    on_events = {e["plugin"] for e in on.log_events() if e["event"] == "plugin_enabled"}
    off_events = {e["plugin"] for e in off.log_events() if e["event"] == "plugin_enabled"}
    assert on_events == {"ratelimit", "who", "me", "msg", "help"}
    assert off_events == {"who", "me", "msg", "help"}


# -- isolation -------------------------------------------------------------------------------


def test_broken_plugin_is_logged_disabled_and_the_room_works(make_chatd, people, plugin_pkg):
    server = make_chatd({"plugins": {"broken": True}})
    alice, bob = people(server, "alice", "bob")
    for text in ("hello", "still here"):
        alice.say(text)
        assert bob.recv_text() == f"\nalice says: {text}"
    alice.say("/who")
    assert alice.recv_text() == "\nin the room (2): alice bob"
    bob.quit()
    assert alice.recv_text() == "\nbob left the room"

    events = server.log_events()
    failed = [e for e in events if e["event"] == "plugin_failed"]
    assert failed and all(e["plugin"] == "broken" for e in failed)
    assert "BrokenOnPurpose: startup" in failed[0]["traceback"]
    (disabled,) = [e for e in events if e["event"] == "plugin_disabled"]
    assert (disabled["plugin"], disabled["reason"], disabled["failures"]) == (
        "broken", "failures", 5)
    assert len(failed) == 6  # five in a row, then the shutdown it was given on the way out


# -- reload ------------------------------------------------------------------------------------


def test_reload_enables_wordfilter_and_disables_who_without_dropping_anyone(
        make_chatd, people):
    server = make_chatd()
    alice, bob = people(server, "alice", "bob")
    alice.say("darn it")
    assert bob.recv_text() == "\nalice says: darn it"

    write_config(server.directory, {"plugins": {"wordfilter": {"words": ["darn"]},
                                                "who": False}}, port=server.port)
    server.reload()

    alice.say("Darn it, darned DARN")
    assert bob.recv_text() == "\nalice says: **** it, darned ****"
    alice.say("/who")
    assert alice.recv_text() == "\nunknown command /who (try /help)"
    next_is_pong(alice)  # a PONG only answers a session: both are still in
    next_is_pong(bob)
    events = server.log_events()
    assert not [e for e in events if e["event"] == "user_left"]
    assert {(e["plugin"], e["reason"]) for e in events if e["event"] == "plugin_disabled"} == {
        ("who", "config")}


# -- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("plugins", "key", "words"), [
    ({"nope": True}, "plugins.nope", "unknown plugin"),
    ({"history": {"size": "many"}}, "plugins.history.size", "expected an integer"),
    ({"history": {"sizes": 3}}, "plugins.history.sizes", "unknown option"),
    ({"shout": {"lines": "yes"}}, "plugins.shout.lines", "expected true or false"),
])
def test_check_config_rejects_bad_plugin_settings(tmp_path, plugin_pkg, plugins, key, words):
    path = tmp_path / "chatd.yaml"
    path.write_text(yaml.safe_dump({"plugins": plugins}))
    done = subprocess.run([*CHATD, "check-config", "-c", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stdout
    assert f": {key}: " in done.stderr and words in done.stderr
    assert "line " in done.stderr


def test_check_config_accepts_third_party_options(tmp_path, plugin_pkg):
    path = write_config(tmp_path, {"plugins": {"shout": {"lines": False}, "history": True}})
    done = subprocess.run([*CHATD, "check-config", "-c", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "shout:" in done.stdout
