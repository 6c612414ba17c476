"""Packing texts into datagrams: lists of users or commands can outgrow one."""

from __future__ import annotations

from collections.abc import Iterable

from chatd.textsafe import truncate_utf8


def cut(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` bytes of UTF-8, never inside a character."""
    data = text.encode()
    return text if len(data) <= limit else truncate_utf8(data, limit).decode()


def pack_one(parts: list[str], limit: int, sep: str = "\n") -> str:
    """As many of ``parts`` as fit in one text of ``limit`` bytes, ending with
    ``…and N more`` when some did not fit (for a reader who gets one datagram)."""
    sep_size = len(sep.encode())
    sizes = [len(part.encode()) for part in parts]
    total = 1 + sum(sizes) + sep_size * max(0, len(parts) - 1)  # 1: the leading "\n"
    if total <= limit:
        return "\n" + sep.join(parts)
    size, shown = 1, 0
    for part_size in sizes:
        tail = sep_size + len(f"…and {len(parts) - shown - 1} more".encode())
        if size + (sep_size if shown else 0) + part_size + tail > limit:
            break
        size += (sep_size if shown else 0) + part_size
        shown += 1
    return cut("\n" + sep.join([*parts[:shown], f"…and {len(parts) - shown} more"]), limit)


def pack(parts: Iterable[str], limit: int, sep: str = " ") -> list[str]:
    """Join ``parts`` with ``sep`` into texts that start with ``"\\n"`` and fit in ``limit`` bytes.

    For words on one line (names): a part is never split across two texts;
    one too long on its own is cut. Lines go one per text: see :func:`lines`.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0
    sep_size = len(sep.encode())
    for part in parts:
        part = cut(part, limit - 1)
        part_size = len(part.encode())
        if current and size + sep_size + part_size > limit:
            out.append("\n" + sep.join(current))
            current, size = [], 0
        size += part_size + (sep_size if current else 1)  # 1: the leading "\n"
        current.append(part)
    if current:
        out.append("\n" + sep.join(current))
    return out


def lines(parts: Iterable[str], limit: int) -> list[str]:
    """One text per line of ``parts``, each starting with ``"\\n"`` and cut to ``limit`` bytes.

    A reply of several lines (``/help``, the message of the day) goes as one
    datagram per line: every client shows it as lines, whereas chat-client
    shows a newline inside a datagram escaped, so that no text can pose as a
    line of its own. For the server's and the administrator's texts only:
    what people type stays one line.
    """
    return ["\n" + cut(line, limit - 1) for part in parts for line in part.splitlines() or [""]]
