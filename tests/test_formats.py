"""How addresses and moments are written: one spelling for the server, chatctl and the client."""

from __future__ import annotations

from chatd.formats import format_addr, iso_time


def test_addresses_with_a_port_bracket_ipv6_hosts():
    assert format_addr(("127.0.0.1", 9000)) == "127.0.0.1:9000"
    assert format_addr(("::1", 9000, 0, 0)) == "[::1]:9000"
    assert format_addr(("fe80::1%eth0", 5, 0, 2)) == "[fe80::1%eth0]:5"
    assert format_addr(("chat.example", 9000)) == "chat.example:9000"
    assert format_addr("/run/chatd/control.sock") == "/run/chatd/control.sock"


def test_moments_are_utc_to_the_second():
    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1_700_000_000.9) == "2023-11-14T22:13:20Z"
    assert len(iso_time()) == len("2026-11-30T15:04:05Z") and iso_time().endswith("Z")
