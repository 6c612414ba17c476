"""What a "host" is, for limits per address.

One machine can send from many addresses: every port of one IPv4 address,
and on IPv6 usually a whole /64 (privacy addresses pick a new one at will).
Limits per host (sessions, logins) therefore count an IPv4 address, or an
IPv6 prefix, as one host; an IPv4-mapped IPv6 address is its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

DEFAULT_IPV6_PREFIX = 64


def host_key(addr: Any, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The host that ``addr`` (what ``recvfrom`` returned) counts against."""
    host = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)  # not an IP address (a Unix socket path in tests): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False))
    return str(ip)
