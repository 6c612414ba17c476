"""Network text to text that is safe to put on a terminal.

Anyone in the room can send any bytes, and a terminal obeys escape sequences:
clearing the screen, moving the cursor to fake a line from the admin, setting
the window title, even answering back on some terminals. So every control
character is shown as a visible escape (``\\x1b``) instead of being written.
Invalid UTF-8 is shown the same way (``errors="backslashreplace"``) rather than
as U+FFFD, so what was actually received stays visible and diagnosable.
"""

from __future__ import annotations

import unicodedata
from typing import Final

#: Categories that move the cursor or the line: C0, DEL and C1 (Cc), line and
#: paragraph separators (Zl, Zp).
_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Zl", "Zp"})

#: Bidirectional overrides and isolates reorder what follows them on screen
#: ("Trojan Source"); other format characters (ZWJ in emoji) are harmless.
_BIDI_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def is_unsafe(char: str) -> bool:
    """True for a character that must never reach a terminal as it is."""
    return char in _BIDI_CONTROLS or unicodedata.category(char) in _ESCAPED_CATEGORIES


def safe_text(text: str) -> str:
    """``text`` with every unsafe character replaced by its visible escape."""
    if text.isprintable():  # the common case, and isprintable() implies safety
        return text
    return "".join(_escape(c) if is_unsafe(c) else c for c in text)


def safe_line(datagram: bytes) -> str:
    """One server datagram as one printable line.

    The server's texts start with a newline (the article's client printed raw
    datagrams over its prompt); those surrounding newlines are layout, not
    content, so they go. Newlines inside are content and are escaped, so that
    one datagram is always exactly one line.
    """
    text = datagram.decode("utf-8", errors="backslashreplace")
    return safe_text(text.strip("\r\n"))
