"""User names: what is allowed, and when two names are the same name.

Two names are one name when they are equal after NFKC normalisation and
casefolding, so ``Alice``, ``alice`` and ``Ａｌｉｃｅ`` cannot be three people.
Two names are too alike when they share a confusable key: ``аdmin``
(Cyrillic ``а``) cannot pass for ``admin``, nor ``Αlice`` (Greek ``Α``) for ``alice``.
"""

from __future__ import annotations

import unicodedata

from chatd.skeleton import skeleton

# Control, format (zero-width tricks), surrogate, private-use, unassigned, and
# line/paragraph separators: none of them belongs in a name people must read.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


#: The longest name any node may allow (the bound of ``room.max_name_length``).
MAX_NAME_LENGTH = 256


def name_key(name: str) -> str:
    """The form under which names are compared."""
    return unicodedata.normalize("NFKC", name).casefold()


def confusable_keys(name: str) -> frozenset[str]:
    """The forms under which names are compared for looking alike: two names
    look alike when they share one.

    A TR39 skeleton tells whether two strings look alike as they are written;
    names ignore case, so a name must not look like another one written in
    any case either. The skeletons are case-sensitive (``I`` maps to ``l``,
    ``0`` to ``O``), so three spellings count: the name as typed, its
    :func:`name_key` and that key in capitals, each skeletonised, casefolded
    and skeletonised again. ``AIice`` (capital i) meets ``alice`` through the
    first, ``АDMIN`` (Cyrillic А) meets ``admin`` through the second, ``ADΜIN``
    (Greek Μ) and ``adm1n`` meet it through the third (as ``ADMIN``). Names
    with one :func:`name_key` always share a key.
    """
    key = name_key(name)
    return frozenset(_folded_skeleton(form) for form in {name, key, key.upper()})


def _folded_skeleton(text: str) -> str:
    return skeleton(skeleton(text).casefold())


def name_problem(name: str, max_length: int) -> str | None:
    """Why ``name`` cannot be used, or None when it can."""
    if not name:
        return "empty"
    if len(name) > max_length:
        return f"longer than {max_length} characters"
    for char in name:
        if char.isspace():
            return "contains whitespace"
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return "contains control characters"
    return None
