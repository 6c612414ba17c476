"""The texts the room sends to people, per locale, and their checking.

Texts start with ``\\n`` like the article's, because its client prints raw
datagrams in the middle of its own prompt line. ``zh_CN`` reproduces the
article's texts exactly (including its login refusal, which has no newline).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Final

#: Every template, with the fields it may use.
FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "joined": frozenset({"name"}),
    "chat": frozenset({"name", "text"}),
    "admin": frozenset({"name", "text"}),
    "left": frozenset({"name"}),
    "timed_out": frozenset({"name"}),
    "unreachable": frozenset({"name"}),
    "name_taken": frozenset({"name"}),
    "name_confusable": frozenset({"name", "like"}),
    "name_invalid": frozenset({"name", "reason"}),
    "other_session": frozenset({"name"}),
    "room_full": frozenset({"max_users"}),
    "too_many_sessions": frozenset({"limit"}),
    "too_long": frozenset({"limit"}),
    "unknown_command": frozenset({"command"}),
    "kicked": frozenset({"reason"}),
    "kick_notice": frozenset({"name", "reason"}),
    "shutdown": frozenset(),
    "evicted": frozenset(),
    "verify_required": frozenset(),
    "cookie_invalid": frozenset(),
    "name_lost": frozenset({"name"}),
}

LOCALES: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {
        "joined": "\n{name} joined the room",
        "chat": "\n{name} says: {text}",
        "admin": "\n{name} says: {text}",
        "left": "\n{name} left the room",
        "timed_out": "\n{name} left the room (timed out)",
        "unreachable": "\n{name} left the room (unreachable)",
        "name_taken": "\nthe name {name} is already taken",
        "name_confusable": "\nthe name {name} looks too much like {like}",
        "name_invalid": "\ninvalid name: {reason}",
        "other_session": "\nthis address is already logged in as {name}",
        "room_full": "\nthe room is full ({max_users} users), try again later",
        "too_many_sessions": "\ntoo many sessions from your address (at most {limit})",
        "too_long": "\nline not sent: longer than {limit} bytes",
        "unknown_command": "\nunknown command /{command} (try /help)",
        "kicked": "\nyou were removed from the room: {reason}",
        "kick_notice": "\n{name} was removed from the room: {reason}",
        "shutdown": "\nthe server is shutting down",
        "evicted": "\nyou were removed from the room: silent too long while it was full",
        "verify_required": "\nverify your address first",
        "cookie_invalid": "\ncookie expired: log in again",
        "name_lost": "\nthe name {name} was taken on another server while this one was "
                     "cut off: log in again",
    },
    "zh_CN": {
        "joined": "\n欢迎 {name} 进入聊天室",
        "chat": "\n{name} 说: {text}",
        "admin": "\n{name} 说: {text}",
        "left": "\n{name} 离开了聊天室",
        "timed_out": "\n{name} 离开了聊天室 (超时)",
        "unreachable": "\n{name} 离开了聊天室 (无法送达)",
        "name_taken": "该用户已存在",
        "name_confusable": "该用户已存在",  # chatd's addition: the article's refusal again
        "name_invalid": "\n用户名无效: {reason}",
        "other_session": "\n该地址已作为 {name} 登录",
        "room_full": "\n聊天室已满 ({max_users} 人), 请稍后再试",
        "too_many_sessions": "\n来自你的地址的会话过多 (最多 {limit} 个)",
        "too_long": "\n消息未发送: 超过 {limit} 字节",
        "unknown_command": "\n未知命令 /{command} (试试 /help)",
        "kicked": "\n你已被移出聊天室: {reason}",
        "kick_notice": "\n{name} 被移出聊天室: {reason}",
        "shutdown": "\n服务器正在关闭",
        "evicted": "\n聊天室已满, 你因长时间未发言被移出",
        "verify_required": "\n请先验证地址",
        "cookie_invalid": "\n验证已过期, 请重新登录",
        "name_lost": "\n名字 {name} 在本服务器断线期间已被他人使用, 请重新登录",
    },
}

ADMIN_NAMES: Final[Mapping[str, str]] = {"en": "admin", "zh_CN": "管理员"}


def template_problem(key: str, text: str) -> str | None:
    """Why ``text`` cannot serve as template ``key``, or None when it can."""
    allowed = FIELDS.get(key)
    if allowed is None:
        return f"unknown template (known: {', '.join(sorted(FIELDS))})"
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        return f"bad format string: {exc}"
    unknown = fields - allowed
    if unknown:
        names = ", ".join(sorted(f"{{{f}}}" for f in unknown))
        usable = ", ".join(sorted(f"{{{f}}}" for f in allowed)) or "none"
        return f"unknown field {names} (usable: {usable})"
    return None
