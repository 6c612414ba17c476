"""The plugin manager and the built-ins with a real Room and plain values: no sockets.

Test plugins are added to a catalog of their own, next to the built-ins,
so nothing here depends on what is installed.
"""

from __future__ import annotations

import inspect
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
from structlog.testing import capture_logs

from chatd import config
from chatd.events import Step
from chatd.plugins import (
    Option,
    Plugin,
    PluginConfigError,
    PluginManager,
    check_settings,
    hookimpl,
    hookspecs,
)
from chatd.plugins import history as history_mod
from chatd.plugins.catalog import Catalog, default_catalog, spec_for
from chatd.plugins.contract import fits
from chatd.plugins.ratelimit import ip_of
from chatd.plugins.text import cut, lines, pack
from chatd.plugins.wordfilter import word_pattern
from chatd.room import Room

A, B, C = ("10.0.0.1", 1001), ("10.0.0.2", 1002), ("10.0.0.3", 1003)
CALLS: list[tuple[str, str]] = []  # what the test plugins saw, in order


def flat(step: Step) -> list[tuple[Any, bytes]]:
    return [(addr, d.payload) for d in step.deliveries for addr in d.addrs]


def to(addr, step: Step) -> list[bytes]:
    return step.to(addr)


# -- test plugins --------------------------------------------------------------------


class Upper(Plugin):
    @hookimpl
    def chatd_message(self, text: str) -> str:
        CALLS.append(("upper", text))
        return text.upper()


class Dropper(Plugin):
    """Drops lines containing "drop"; asks for only one of the hook's arguments."""

    @hookimpl(tryfirst=True)
    def chatd_message(self, text: str) -> bool | None:
        CALLS.append(("dropper", text))
        return False if "drop" in text else None


class Doorman(Plugin):
    options = {"refuse": Option(str, "mallory", "who is kept out")}

    @hookimpl
    def chatd_login(self, name: str) -> str | None:
        CALLS.append(("doorman", name))
        return "\ngo away" if name == self.room.options["refuse"] else None


class Bouncer(Plugin):
    @hookimpl(trylast=True)
    def chatd_login(self, name: str) -> str | None:
        CALLS.append(("bouncer", name))
        return "\nnot you either"


class Flaky(Plugin):
    """Raises in chatd_message while ``fail`` is true; keeps a count of instances."""

    fail = True
    made = 0

    def __init__(self, room):
        super().__init__(room)
        Flaky.made += 1

    @hookimpl
    def chatd_message(self, text: str) -> str | None:
        if Flaky.fail:
            raise ValueError(f"flaky on {text!r}")
        return None


class Keeper(Plugin):
    """Has chatd_reconfigure: keeps its instance (and memory) when options change."""

    options = {"n": Option(int, 1)}
    made = 0

    def __init__(self, room):
        super().__init__(room)
        Keeper.made += 1
        self.seen = room.options["n"]

    @hookimpl
    def chatd_reconfigure(self, room) -> None:
        self.seen = room.options["n"]

    @hookimpl
    def chatd_commands(self) -> dict[str, str]:
        return {"Keep": f"/keep - n is {self.seen}"}

    @hookimpl
    def chatd_command(self, name: str, command: str, args: str) -> bool | None:
        if command != "keep":
            return None
        self.room.send(name, f"\nkept {self.seen} {args}")
        return True


class Typo(Plugin):
    @hookimpl
    def chatd_mesage(self, text: str) -> None:  # not a hook: refused at enable
        return None


class Slow(Plugin):
    @hookimpl
    def chatd_said(self, name: str) -> None:
        return None


class Sloppy(Plugin):
    """Answers outside the hookspecs' annotations."""

    @hookimpl
    def chatd_command(self, command: str) -> Any:
        return "yes" if command == "sloppy" else None

    @hookimpl
    def chatd_message(self, text: str) -> Any:
        return 42 if text.lower() == "answer" else None


class Wrapper(Plugin):
    """A new-style hook wrapper: chatd's call loop does not run wrappers, so it is refused."""

    @hookimpl(wrapper=True)
    def chatd_message(self, text: str) -> Any:
        return (yield)


class Leaves(Plugin):
    """Records the reasons chatd_left is called with."""

    @hookimpl
    def chatd_left(self, name: str, reason: str) -> None:
        CALLS.append(("left", reason))


def make(plugins: dict | None = None, *, clock=None, **extra) -> tuple[Room, PluginManager]:
    CALLS.clear()
    Flaky.fail, Flaky.made, Keeper.made = True, 0, 0
    specs = dict(default_catalog().specs)
    for name, cls in {"upper": Upper, "dropper": Dropper, "doorman": Doorman,
                      "bouncer": Bouncer, "flaky": Flaky, "keeper": Keeper, "typo": Typo,
                      "slow": Slow, "sloppy": Sloppy, "leaves": Leaves,
                      "wrapper": Wrapper}.items():
        specs[name] = spec_for(name, cls, builtin=False, source="test")
    room = Room(config.from_mapping({}).room)
    kwargs: dict[str, Any] = {"catalog": Catalog(specs), **extra}
    if clock is not None:
        kwargs["clock"] = clock
    manager = PluginManager(room, plugins or {}, **kwargs)
    room.hooks = manager
    manager.startup()
    room.flush()
    return room, manager


def verified_login(room: Room, addr, name: str, now: float = 0.0) -> bytes:
    """``L name COOKIE``: a client that proved its address gets more than one datagram back."""
    token = room.cookies.issue(addr, now).split()[1].decode()
    return f"L {name} {token}".encode()


def join(room: Room, *pairs) -> None:
    for addr, name in pairs:
        assert to(addr, room.receive(addr, verified_login(room, addr, name), 0.0))[0] == b"OK"


def state(manager: PluginManager, name: str) -> dict[str, Any]:
    return next(p for p in manager.describe() if p["name"] == name)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("plugins", [
    {}, {"history": True}, {"history": None}, {"history": {}}, {"ratelimit": False},
    {"history": {"size": 5, "path": "/tmp/h.db"}, "wordfilter": {"words": ["darn"]}},
    {"motd": {"text": "hi"}}, {"ratelimit": {"lines_per_second": 2, "exempt": []}},
])
def test_good_plugin_settings(plugins):
    check_settings(plugins)


@pytest.mark.parametrize(("plugins", "path", "words"), [
    ({"nope": True}, "plugins.nope", "unknown plugin"),
    ({"history": 3}, "plugins.history", "expected a mapping"),
    ({"history": {"sise": 3}}, "plugins.history.sise", "unknown option"),
    ({"history": {"size": "3"}}, "plugins.history.size", "expected an integer"),
    ({"history": {"size": True}}, "plugins.history.size", "expected an integer"),
    ({"history": {"size": 0}}, "plugins.history.size", "at least 1"),
    ({"history": {"path": "h.db"}}, "plugins.history.path", "absolute path"),
    ({"wordfilter": {"words": "darn"}}, "plugins.wordfilter.words", "list"),
    ({"ratelimit": {"exempt": ["nonsense"]}}, "plugins.ratelimit.exempt", "nonsense"),
    ({"motd": True}, "plugins.motd", "exactly one of text and file"),
])
def test_bad_plugin_settings_name_the_key(plugins, path, words):
    with pytest.raises(PluginConfigError) as caught:
        check_settings(plugins)
    assert caught.value.path == path
    assert words in str(caught.value)


def test_config_error_names_plugin_key_and_line():
    text = "room:\n  max_users: 5\nplugins:\n  history:\n    size: many\n"
    with pytest.raises(config.ConfigError, match=r"line 5: plugins\.history\.size: expected"):
        config.parse(text, "chatd.yaml", check_plugins=check_settings)


def test_defaults_and_reasons():
    _, manager = make({"who": False, "history": {"size": 3}})
    states = {p["name"]: (p["enabled"], p["reason"]) for p in manager.describe()}
    assert states["ratelimit"] == (True, "default")
    assert states["who"] == (False, "config")
    assert states["history"] == (True, "config")
    assert states["wordfilter"] == (False, "default")
    assert state(manager, "history")["options"] == {"size": 3, "path": None}


# -- hook semantics ----------------------------------------------------------------------


def test_message_chain_rewrites_in_turn_and_drop_stops_it():
    room, _ = make({"upper": True, "dropper": True})
    join(room, (A, "alice"), (B, "bob"))
    assert to(B, room.receive(A, b"C alice hello", 1)) == [b"\nalice says: HELLO"]
    assert CALLS == [("dropper", "hello"), ("upper", "hello")]  # tryfirst ran first
    CALLS.clear()
    assert to(B, room.receive(A, b"C alice please drop this", 1)) == []
    assert CALLS == [("dropper", "please drop this")]  # nobody after a drop is asked


def test_a_dropped_line_is_false_everywhere_never_none():
    room, manager = make({"dropper": True})
    join(room, (A, "alice"))
    assert manager.message("alice", "please drop this") is False
    assert manager.message("alice", "keep this") == "keep this"
    assert manager._states["me"].api.rewrite("alice", "drop it") is False


def test_hooks_are_called_through_pluggy():
    """Every hook call goes through pluggy's hook relay: its monitoring sees them all."""
    room, manager = make({"upper": True, "doorman": True})
    seen: list[str] = []
    undo = manager._pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: seen.append(hook), lambda *args: None)
    try:
        join(room, (A, "alice"), (B, "bob"))
        assert to(B, room.receive(A, b"C alice hi", 1)) == [b"\nalice says: HI"]
        room.receive(A, b"C alice /who", 1)
        room.receive(B, b"Q bob", 1)
    finally:
        undo()
    assert {"chatd_login", "chatd_message", "chatd_command", "chatd_left"} <= set(seen)


def test_answers_outside_the_spec_are_failures_not_answers():
    room, manager = make({"sloppy": True, "upper": True})
    join(room, (A, "alice"), (B, "bob"))
    with capture_logs() as logs:
        # "yes" is not True: the command is not taken as handled
        assert to(A, room.receive(A, b"C alice /sloppy", 1)) == [
            b"\nunknown command /sloppy (try /help)"]
        # 42 is no text: the line goes on as if sloppy had not answered
        assert to(B, room.receive(A, b"C alice answer", 1)) == [b"\nalice says: ANSWER"]
    failed = [e for e in logs if e["event"] == "plugin_failed"]
    assert [e["hook"] for e in failed] == ["chatd_command", "chatd_message"]
    assert "returned 'yes', not Literal[True] | None" in failed[0]["error"]
    assert state(manager, "sloppy")["failures"] == 2


def test_plugins_run_in_catalog_order_whatever_order_they_were_enabled_in():
    room, manager = make({"dropper": False, "upper": True})
    manager.reconfigure({"dropper": True, "upper": True})  # dropper comes later, runs first
    join(room, (A, "alice"), (B, "bob"))
    room.receive(A, b"C alice hello", 1)
    assert CALLS == [("dropper", "hello"), ("upper", "hello")]
    CALLS.clear()
    manager.reconfigure({"dropper": True, "upper": True, "doorman": True, "bouncer": True})
    room.receive(C, b"L carol", 1)
    assert CALLS == [("doorman", "carol"), ("bouncer", "carol")]


def test_chatd_left_is_called_with_the_reasons_its_spec_names():
    doc = hookspecs.chatd_left.__doc__ or ""
    documented = set(re.findall(r"``(\w+)``", doc.split("``reason`` is")[1].split("Not called")[0]))
    settings = config.from_mapping({"room": {"max_users": 2, "evict_idle_after": 5,
                                             "unreachable_after": 1, "unreachable_grace": 1,
                                             "session_timeout": 10}})
    room = Room(settings.room)
    specs = {**default_catalog().specs, "leaves": spec_for("leaves", Leaves, builtin=False,
                                                           source="test")}
    manager = PluginManager(room, {"leaves": True}, catalog=Catalog(specs))
    room.hooks = manager
    manager.startup()
    CALLS.clear()
    join(room, (A, "alice"), (B, "bob"))
    room.receive(A, b"Q alice", 1)                                     # quit
    room.receive(A, verified_login(room, A, "alice", 1), 1)
    room.kick("alice", "enough")                                        # kicked
    room.receive(A, verified_login(room, A, "alice", 20), 20)
    room.receive(C, verified_login(room, C, "carol", 20), 20)           # bob evicted
    room.receive(A, b"P alice", 21)
    room.expire(40)                                                     # alice: timeout
    room.unreachable(C, 40)                                             # carol: unreachable
    assert {reason for hook, reason in CALLS if hook == "left"} == documented
    assert documented == {"quit", "kicked", "evicted", "timeout", "unreachable"}


def test_docs_list_every_hook_as_its_spec_has_it():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    rows = {line.split("`")[1]: line for line in docs.splitlines()
            if line.startswith("| `chatd_")}
    specs = {name: getattr(hookspecs, name) for name in dir(hookspecs)
             if name.startswith("chatd_")}
    assert {row.split("(")[0] for row in rows} == set(specs)
    for row in rows:
        name = row.split("(")[0]
        assert row == f"{name}({', '.join(inspect.signature(specs[name]).parameters)})"
    left = rows[next(r for r in rows if r.startswith("chatd_left"))]
    doc = hookspecs.chatd_left.__doc__ or ""
    reasons = re.findall(r"``(\w+)``", doc.split("``reason`` is")[1].split("Not called")[0])
    assert re.findall(r"`(\w+)`", left.split("|")[2]) == reasons


def test_contract_checks_the_forms_hookspecs_use():
    assert fits("x", str | None) and fits(None, str | None) and not fits(1, str | None)
    assert fits(False, Literal[False]) and not fits(0, Literal[False])
    assert fits(True, Literal[True] | None) and not fits("yes", Literal[True] | None)
    assert fits({"a": "b"}, Mapping[str, str]) and not fits({"a": 1}, Mapping[str, str])
    assert not fits(["a"], Mapping[str, str])


def test_login_first_refusal_wins():
    room, _ = make({"doorman": True, "bouncer": True})
    assert to(A, room.receive(A, b"L mallory", 0)) == [b"\ngo away"]
    assert CALLS == [("doorman", "mallory")]  # bouncer (trylast) never asked
    assert room.session("mallory") is None
    CALLS.clear()
    assert to(B, room.receive(B, b"L bob", 0)) == [b"\nnot you either"]
    assert CALLS == [("doorman", "bob"), ("bouncer", "bob")]


def test_commands_are_case_insensitive_and_unknown_ones_are_said_so():
    room, _ = make({"keeper": {"n": 7}})
    join(room, (A, "alice"))
    assert to(A, room.receive(A, b"C alice /KEEP x y", 1)) == [b"\nkept 7 x y"]
    assert to(A, room.receive(A, b"C alice /nope", 1)) == [
        b"\nunknown command /nope (try /help)"]


def test_help_lists_commands_of_enabled_plugins_only():
    room, manager = make({"keeper": True, "me": False})
    join(room, (A, "alice"))
    texts = to(A, room.receive(A, b"C alice /help", 1))
    assert [t.decode() for t in texts] == [  # a datagram per line: every client shows lines
        "\ncommands:", "\n/help - list the commands", "\n/keep - n is 1",
        "\n/msg NAME TEXT - say TEXT to NAME only", "\n/who - list the people in the room"]
    assert state(manager, "keeper")["commands"] == ["keep"]


# -- isolation -------------------------------------------------------------------------------


def test_failing_plugin_is_logged_skipped_and_disabled_after_five_in_a_row():
    room, manager = make({"flaky": True, "upper": True})
    join(room, (A, "alice"), (B, "bob"))
    with capture_logs() as logs:
        for i in range(4):
            # the room carries on as if flaky had not answered: upper still runs
            assert to(B, room.receive(A, f"C alice hi {i}".encode(), 1)) == [
                f"\nalice says: HI {i}".encode()]
        assert state(manager, "flaky")["failures_in_row"] == 4
        assert state(manager, "flaky")["enabled"]
        room.receive(A, b"C alice five", 1)
    failed = [e for e in logs if e["event"] == "plugin_failed"]
    assert len(failed) == 5
    assert failed[0]["plugin"] == "flaky" and failed[0]["hook"] == "chatd_message"
    assert "ValueError: flaky on 'HI 0'" in failed[0]["traceback"]
    assert any(e["event"] == "plugin_disabled" and e["reason"] == "failures" for e in logs)
    described = state(manager, "flaky")
    assert (described["enabled"], described["reason"], described["failures"]) == (
        False, "failures", 5)
    assert described["calls"] == 5
    with capture_logs() as logs:
        assert to(B, room.receive(A, b"C alice after", 1)) == [b"\nalice says: AFTER"]
    assert logs == []


def test_success_resets_the_failures_in_a_row():
    room, manager = make({"flaky": True})
    join(room, (A, "alice"), (B, "bob"))
    with capture_logs():
        for _ in range(4):
            room.receive(A, b"C alice x", 1)
        Flaky.fail = False
        room.receive(A, b"C alice y", 1)
        Flaky.fail = True
        for _ in range(4):
            room.receive(A, b"C alice z", 1)
    described = state(manager, "flaky")
    assert described["enabled"] and described["failures"] == 8
    assert described["failures_in_row"] == 4


def test_reload_retries_a_plugin_disabled_for_failures():
    room, manager = make({"flaky": True})
    join(room, (A, "alice"))
    with capture_logs():
        for _ in range(5):
            room.receive(A, b"C alice x", 1)
    assert state(manager, "flaky")["reason"] == "failures"
    manager.reconfigure({"flaky": True})
    assert state(manager, "flaky")["enabled"]
    assert Flaky.made == 2


def test_plugin_with_an_unknown_hook_is_refused_at_enable():
    with capture_logs() as logs:
        _, manager = make({"typo": True})
    described = state(manager, "typo")
    assert (described["enabled"], described["reason"]) == (False, "error")
    assert any(e["event"] == "plugin_failed" and "chatd_mesage" in e["error"] for e in logs)


def test_a_hook_wrapper_is_refused_at_enable_and_the_room_goes_on():
    with capture_logs() as logs:
        room, manager = make({"wrapper": True, "upper": True})
    described = state(manager, "wrapper")
    assert (described["enabled"], described["reason"]) == (False, "error")
    assert any(e["event"] == "plugin_failed" and "wrappers are not supported" in e["error"]
               for e in logs)
    join(room, (A, "alice"), (B, "bob"))
    assert to(B, room.receive(A, b"C alice hi", 1)) == [b"\nalice says: HI"]


def test_slow_hook_is_logged_and_counted():
    ticks = iter(range(1000))
    _, manager = make({"slow": True}, clock=lambda: next(ticks) * 0.06, slow_seconds=0.05)
    room = manager.room
    join(room, (A, "alice"), (B, "bob"))
    with capture_logs() as logs:
        room.receive(A, b"C alice hi", 1)
    slow = [e for e in logs if e["event"] == "plugin_slow"]
    assert slow and {e["plugin"] for e in slow} <= {"slow", "ratelimit"}
    assert any(e["plugin"] == "slow" and e["hook"] == "chatd_said" for e in slow)
    described = state(manager, "slow")
    assert described["slow_calls"] == 1 and described["calls"] == 1
    assert described["seconds"] == pytest.approx(0.06)


# -- reconfiguration ---------------------------------------------------------------------------


def test_reconfigure_enables_disables_and_keeps_sessions():
    room, manager = make()
    join(room, (A, "alice"), (B, "bob"))
    manager.reconfigure({"wordfilter": {"words": ["darn"]}, "who": False})
    room.flush()
    assert to(B, room.receive(A, b"C alice Darn it", 1)) == [b"\nalice says: **** it"]
    assert to(A, room.receive(A, b"C alice /who", 1)) == [
        b"\nunknown command /who (try /help)"]
    assert [s.name for s in room.sessions()] == ["alice", "bob"]
    manager.reconfigure({})
    assert to(B, room.receive(A, b"C alice Darn it", 1)) == [b"\nalice says: Darn it"]


def test_reconfigure_options_in_place_or_by_restart():
    _, manager = make({"keeper": {"n": 1}, "doorman": True})
    manager.reconfigure({"keeper": {"n": 2}, "doorman": {"refuse": "eve"}})
    assert Keeper.made == 1  # it has chatd_reconfigure: same instance, new options
    assert manager.all_commands()["keep"] == "/keep - n is 2"
    room = manager.room
    assert to(A, room.receive(A, b"L eve", 0)) == [b"\ngo away"]  # doorman was restarted


def test_shutdown_disables_everything():
    room, manager = make({"upper": True})
    manager.shutdown()
    assert not any(p["enabled"] for p in manager.describe())
    join(room, (A, "alice"), (B, "bob"))
    assert to(B, room.receive(A, b"C alice quiet", 1)) == [b"\nalice says: quiet"]


# -- built-ins, unit by unit ---------------------------------------------------------------------


def test_word_pattern_whole_words_any_case():
    pattern = word_pattern(["darn", "c++", "heck"])
    assert pattern.sub("****", "Darn, DARN! darned c++ heck's heckle") == (
        "****, ****! darned **** ****'s heckle")
    assert word_pattern([]) is None


def test_wordfilter_mask_is_literal():
    room, _ = make({"wordfilter": {"words": ["x"], "mask": r"\1"}})
    join(room, (A, "alice"), (B, "bob"))
    assert to(B, room.receive(A, b"C alice a x b", 1)) == [b"\nalice says: a \\1 b"]


def test_ip_of_unwraps_ipv4_mapped_addresses():
    assert ip_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    assert ip_of(("10.1.2.3", 5)) == "10.1.2.3"
    assert ip_of(("fe80::1%eth0", 5, 0, 2)) == "fe80::1"


def test_ratelimit_drops_warns_once_per_burst_and_counts():
    now = [0.0]
    room, manager = make({"ratelimit": {"lines_per_second": 1, "line_burst": 2}})
    limiter = manager._states["ratelimit"].instance
    limiter.clock = lambda: now[0]
    join(room, (A, "alice"), (B, "bob"))
    heard, told = [], []
    for i in range(5):
        out = room.receive(A, f"C alice {i}".encode(), 1)
        heard += to(B, out)
        told += to(A, out)
    assert heard == [b"\nalice says: 0", b"\nalice says: 1"]
    assert told == [b"\nslow down: some of your lines were not sent"]
    now[0] = 1.0
    assert to(B, room.receive(A, b"C alice again", 1)) == [b"\nalice says: again"]
    assert to(A, room.receive(A, b"C alice /who", 1)) == [  # commands take tokens too
        b"\nslow down: some of your lines were not sent"]
    assert state(manager, "ratelimit")["counters"] == {
        "lines_dropped": 3, "commands_dropped": 1, "warnings": 2}


def test_ratelimit_logins_per_address_and_exemptions():
    room, manager = make({"ratelimit": {"logins_per_minute": 1, "login_burst": 2,
                                        "exempt": ["10.0.0.3"]}})
    manager._states["ratelimit"].instance.clock = lambda: 0.0
    assert to(A, room.receive(A, b"L a1", 0)) == [b"OK"]
    assert to(("10.0.0.1", 2), room.receive(("10.0.0.1", 2), b"L a2", 0)) == [b"OK"]
    assert to(("10.0.0.1", 3), room.receive(("10.0.0.1", 3), b"L a3", 0)) == [
        b"\ntoo many logins from your address, try again later"]
    assert to(B, room.receive(B, b"L b1", 0)) == [b"OK"]  # another address, another bucket
    for port in range(5):
        assert to(("10.0.0.3", port), room.receive(("10.0.0.3", port),
                                                    f"L c{port}".encode(), 0))[0] == b"OK"
    assert state(manager, "ratelimit")["counters"] == {"logins_refused": 1}


def test_history_keeps_size_lines_and_trims_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(history_mod, "TRIM_EVERY", 3)
    path = str(tmp_path / "h.db")
    room, manager = make({"history": {"size": 2, "path": path}})
    join(room, (A, "alice"))
    for i in range(7):
        room.receive(A, f"C alice line {i}".encode(), 1)
    assert to(B, room.receive(B, verified_login(room, B, "bob", 1), 1)) == [
        b"OK", b"\nalice says: line 5", b"\nalice says: line 6"]
    manager.shutdown()
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM lines").fetchone()[0]
    assert 2 <= rows < 7


def test_history_resizes_on_reload_without_forgetting():
    room, manager = make({"history": {"size": 5}})
    join(room, (A, "alice"))
    for i in range(4):
        room.receive(A, f"C alice {i}".encode(), 1)
    manager.reconfigure({"history": {"size": 2}})
    assert to(B, room.receive(B, verified_login(room, B, "bob", 1), 1)) == [
        b"OK", b"\nalice says: 2", b"\nalice says: 3"]


def test_who_splits_a_long_list_without_splitting_names():
    room = Room(config.from_mapping({"room": {"max_datagram": 64}}).room)
    manager = PluginManager(room, {"ratelimit": False})
    room.hooks = manager
    manager.startup()
    names = [f"user{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        room.receive(("10.0.1.1", i), verified_login(room, ("10.0.1.1", i), name), 0)
    texts = [p.decode() for p in to(("10.0.1.1", 0),
                                     room.receive(("10.0.1.1", 0), b"C user00 /who", 1))]
    assert len(texts) > 1 and all(len(t.encode()) <= 64 and t.startswith("\n") for t in texts)
    assert " ".join(t[1:] for t in texts).split() == ["in", "the", "room", "(20):", *names]


def test_pack_and_cut():
    assert pack(["ab", "cd", "ef"], 6, " ") == ["\nab cd", "\nef"]
    assert pack([], 10) == []
    assert pack(["x" * 20], 8) == ["\n" + "x" * 7]
    assert cut("héllo", 2) == "h"


def test_lines_are_one_text_each():
    assert lines(["one", "two\nthree", ""], 10) == ["\none", "\ntwo", "\nthree", "\n"]
    assert lines(["x" * 20], 8) == ["\n" + "x" * 7]
    assert lines([], 10) == []


def test_msg_and_me_go_through_the_message_plugins():
    room, _ = make({"wordfilter": {"words": ["darn"]}})
    join(room, (A, "alice"), (B, "bob"), (C, "carol"))
    out = room.receive(A, b"C alice /msg BOB darn it", 1)
    assert to(B, out) == [b"\nalice says to you: **** it"] and to(C, out) == []
    out = room.receive(A, b"C alice /me says darn", 1)
    assert to(B, out) == to(C, out) == [b"\n* alice says ****"] and to(A, out) == []
    assert to(A, room.receive(A, b"C alice /msg zed hi", 1)) == [
        b"\nno one called zed is in the room"]
    assert to(A, room.receive(A, b"C alice /msg bob", 1)) == [b"\nusage: /msg NAME TEXT"]


def test_motd_file_is_reread_on_every_reload(tmp_path):
    motd = tmp_path / "motd.txt"
    motd.write_text("first\n")
    settings = {"motd": {"file": str(motd)}}
    room, manager = make(settings)
    assert to(A, room.receive(A, verified_login(room, A, "alice"), 0)) == [b"OK", b"\nfirst"]
    motd.write_text("second\nline two\n")
    manager.reconfigure(settings)  # same options: the file is read again all the same
    assert to(B, room.receive(B, verified_login(room, B, "bob"), 0)) == [
        b"OK", b"\nsecond", b"\nline two"]


def test_unrelated_reload_keeps_the_rate_limit_buckets():
    settings = {"ratelimit": {"exempt": [], "line_burst": 1, "lines_per_second": 0.001}}
    room, manager = make(settings)
    join(room, (A, "alice"), (B, "bob"))
    assert to(B, room.receive(A, b"C alice one", 1)) == [b"\nalice says: one"]
    manager.reconfigure({**settings, "who": False})
    assert to(B, room.receive(A, b"C alice two", 1)) == []  # still out of tokens
    manager.reconfigure({"ratelimit": {**settings["ratelimit"], "line_burst": 2}})
    assert to(B, room.receive(A, b"C alice three", 1)) == [b"\nalice says: three"]


def test_plugin_logger_names_the_plugin_and_describe_is_json():
    import json

    _, manager = make({"keeper": True})
    with capture_logs() as logs:
        manager._states["keeper"].api.log.info("hello", n=1)
    assert logs == [{"event": "hello", "n": 1, "plugin": "keeper", "log_level": "info"}]
    described = json.loads(json.dumps(manager.describe()))
    assert [p["name"] for p in described][:8] == [
        "ratelimit", "wordfilter", "motd", "history", "who", "me", "msg", "help"]
    assert set(described[0]) >= {"name", "enabled", "reason", "failures", "calls", "seconds",
                                 "commands", "counters", "source"}
