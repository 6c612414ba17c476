"""People's text made safe to relay: one line, that cannot pass for someone else's.

Chat text reaches other people's screens as it is, and the article's client
and ``nc`` print datagrams raw: a line break inside a text would start a line
that looks like the server's own (``admin says: reboot now``), a carriage
return or an escape sequence would overwrite what is on screen, and a bidi
override would reorder it. So before any text a person typed goes to others,
every such character becomes a visible escape in the style of
``chat-client``'s display (``\\x0a``, ``\\x1b``, ``\\u202e``). A tab becomes a
space: it moves nothing but the cursor to the right, and pasted text keeps its
look. Backslashes are left alone, so the escapes show what was sent but cannot
be told apart from the same characters typed: they are for people, not for
decoding.
"""

from __future__ import annotations

import re
from typing import Final

#: C0 controls, DEL and C1 controls (NEL included), the line and paragraph
#: separators, and the bidi controls: marks, embeddings, overrides and isolates.
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\t":
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def neutralise(text: str) -> str:
    """``text`` on one line, with nothing in it that moves, clears or reorders a screen."""
    if text.isprintable():  # the common case; every unsafe character is unprintable
        return text
    return _UNSAFE.sub(_visible, text)



def truncate_utf8(data: bytes, limit: int) -> bytes:
    """``data`` (UTF-8) shortened to at most ``limit`` bytes, never inside a character."""
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()
