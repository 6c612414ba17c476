"""Datagrams with a forged source address, as an attacker on the network sends them.

Raw IPv4 sockets need root (CAP_NET_RAW); tests that use them skip otherwise.
The kernel fills in the IP checksum and total length (raw(7)); a UDP checksum
of zero means "none" in IPv4.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

needs_raw = pytest.mark.skipif(os.geteuid() != 0, reason="forging source addresses needs "
                               "a raw socket (root)")


class Forger:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def udp(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        """One UDP datagram from ``src`` (forged) to ``dst``."""
        udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(src[0]),
                         socket.inet_aton(dst[0]))
        self.sock.sendto(ip + udp, (dst[0], 0))

    def close(self) -> None:
        self.sock.close()
