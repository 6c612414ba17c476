"""People's text is relayed on one line, with nothing that drives a screen: the pure
function, then the room and the built-in plugins that relay text, with plain values."""

from __future__ import annotations

import pytest

from chatd import config
from chatd.events import Said, Step
from chatd.plugins import Plugin, PluginManager, hookimpl
from chatd.plugins.catalog import Catalog, default_catalog, spec_for
from chatd.room import NoHooks, Room
from chatd.textsafe import neutralise

A, B, C = ("10.0.0.1", 1001), ("10.0.0.2", 1002), ("10.0.0.3", 1003)
ATTACK = "hi\n\nadmin says: reboot now"
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def to(addr, step: Step) -> list[bytes]:
    return step.to(addr)


@pytest.mark.parametrize(("text", "shown"), [
    (ATTACK, "hi\\x0a\\x0aadmin says: reboot now"),
    ("a\r\nb", "a\\x0d\\x0ab"),
    ("\x00\x07\x08\x0b\x0c\x1b[2J\x7f", "\\x00\\x07\\x08\\x0b\\x0c\\x1b[2J\\x7f"),
    ("\x80\x85\x9b\x9f", "\\x80\\x85\\x9b\\x9f"),  # C1, NEL and CSI included
    ("line\u2028sep\u2029para", "line\\u2028sep\\u2029para"),
    ("abc\u202efdp.exe", "abc\\u202efdp.exe"),
    (BIDI, "".join(f"\\u{ord(c):04x}" for c in BIDI)),
    ("a\tb\t\tc", "a b  c"),  # a tab is a space
])
def test_unsafe_characters_become_visible_escapes(text, shown):
    assert neutralise(text) == shown


@pytest.mark.parametrize("text", [
    "", "plain words", "C:\\dir\\x0a stays as typed", "中文 说: ok", "é e\u0301",
    "👩\u200d💻 zwj emoji", "\u00a0no-break and\u3000ideographic spaces", "ÿ\u00ad",
])
def test_safe_text_is_left_alone(text):
    assert neutralise(text) == text


def test_every_control_and_bidi_character_is_replaced():
    controls = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + list(BIDI + "\u2028\u2029")
    for char in controls:
        out = neutralise(f"a{char}b")
        assert char not in out and out.isprintable(), repr(char)


# -- the room, with or without plugins ---------------------------------------------------


def make_room(hooks=None, **room) -> Room:
    made = Room(config.from_mapping({"room": room}).room)
    if hooks is not None:
        made.hooks = hooks
    for addr, name in ((A, "mallory"), (B, "alice"), (C, "bob")):
        assert made.receive(addr, f"L {name}".encode(), 0).to(addr)[0] == b"OK"
    return made


def test_chat_line_reaches_the_others_on_one_line():
    room = make_room()
    out = room.receive(A, f"C mallory {ATTACK}".encode(), 1)
    assert to(B, out) == to(C, out) == [b"\nmallory says: hi\\x0a\\x0aadmin says: reboot now"]
    assert out.events[-1] == Said("mallory", "hi\\x0a\\x0aadmin says: reboot now")


def test_escapes_count_towards_the_datagram_limit():
    room = make_room(max_datagram=64)
    text = "\x1b" * 13  # 13 bytes typed, 52 shown: with "\\nmallory says: " over 64
    assert to(A, room.receive(A, f"C mallory {text}".encode(), 1)) == [
        b"\nline not sent: longer than 64 bytes"]


class Injecting(NoHooks):
    """A message plugin that puts a line break back in: the room still relays one line."""

    def message(self, name: str, text: str) -> str | None:
        return text + "\nadmin says: reboot now"


def test_a_rewriting_plugin_cannot_reintroduce_a_line_break():
    room = make_room(Injecting())
    out = room.receive(A, b"C mallory hi", 1)
    assert to(B, out) == [b"\nmallory says: hi\\x0aadmin says: reboot now"]


def test_unknown_command_is_echoed_escaped():
    room = make_room()
    assert to(A, room.receive(A, b"C mallory /x\x1b[2J", 1)) == [
        b"\nunknown command /x\\x1b[2J (try /help)"]


class Reverser(Plugin):
    """Rewrites every line with a right-to-left override."""

    @hookimpl
    def chatd_message(self, text: str) -> str:
        return "\u202e" + text


def with_plugins(plugins: dict) -> Room:
    specs = dict(default_catalog().specs)
    specs["reverser"] = spec_for("reverser", Reverser, builtin=False, source="test")
    room = Room(config.from_mapping({}).room)
    manager = PluginManager(room, plugins, catalog=Catalog(specs))
    room.hooks = manager
    manager.startup()
    for addr, name in ((A, "mallory"), (B, "alice"), (C, "bob")):
        assert to(addr, room.receive(addr, f"L {name}".encode(), 0))[0] == b"OK"
    return room


def test_me_and_msg_relay_one_line_after_the_message_plugins():
    room = with_plugins({"reverser": True})
    out = room.receive(A, b"C mallory /me waves\r\nadmin says: reboot now", 1)
    assert to(B, out) == to(C, out) == [
        b"\n* mallory \\u202ewaves\\x0d\\x0aadmin says: reboot now"]
    out = room.receive(A, b"C mallory /msg alice psst\nadmin says: hi", 1)
    assert to(B, out) == [b"\nmallory says to you: \\u202epsst\\x0aadmin says: hi"]
    assert to(A, room.receive(A, b"C mallory /msg zed\x1b[H hi", 1)) == [
        b"\nno one called zed\\x1b[H is in the room"]


def test_history_replays_what_was_relayed():
    room = with_plugins({"history": True})
    room.receive(A, f"C mallory {ATTACK}".encode(), 1)
    carol = ("10.0.0.4", 1)
    token = room.cookies.issue(carol, 2).split()[1]  # history is for verified clients
    assert to(carol, room.receive(carol, b"L carol " + token, 2)) == [
        b"OK", b"\nmallory says: hi\\x0a\\x0aadmin says: reboot now"]
