"""How chatd writes an address and a moment for people and logs: one spelling of each.

Leaf module: it imports nothing of chatd, so the server, the admin side, the
log and the client can all use it.
"""

from __future__ import annotations

import time
from typing import Any


def format_addr(addr: Any) -> str:
    """``host:port`` for what ``recvfrom`` or ``getsockname`` returned; ``[host]:port`` when
    the host is an IPv6 address, so that the port stands apart. Anything else as ``str``."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def iso_time(wall: float | None = None) -> str:
    """``wall`` (seconds since the epoch; now when None) in UTC, to the second:
    ``2026-11-30T15:04:05Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
