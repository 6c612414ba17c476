"""User names: what is allowed, and when two names are the same name.

Two names are one name when they are equal after NFKC normalisation and
casefolding, so ``Alice``, ``alice`` and ``Ａｌｉｃｅ`` cannot be three people.
"""

from __future__ import annotations

import unicodedata

# Control, format (zero-width tricks), surrogate, private-use, unassigned, and
# line/paragraph separators: none of them belongs in a name people must read.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def name_key(name: str) -> str:
    """The form under which names are compared."""
    return unicodedata.normalize("NFKC", name).casefold()


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
