"""Address validation: a stateless cookie proves that a client receives at its source address.

Anyone can put someone else's address on a UDP datagram. Without a check,
a forged ``L x`` makes the room send its whole traffic to a victim, and a
forged ``/who`` makes it answer 8 bytes with a full datagram or more:
a reflector and an amplifier. DTLS (HelloVerifyRequest) and QUIC (Retry)
solve this the same way, and so does chatd:

1. the client sends ``H`` padded with anything to at least the size of the
   answer (so the answer never amplifies);
2. the server answers ``COOKIE <token>``, a keyed MAC over the client's
   address and the current time slot, remembering nothing;
3. the client logs in with ``L <name> <token>``; the server recomputes the MAC
   and only a client that really receives at that address can know it.

The secret is fresh random bytes per time slot and only the previous slot's
secret is kept, so a token is good for one to two slots and a leaked secret
is worthless a slot later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable, Hashable
from typing import Final

#: Seconds per slot: a token is accepted in the slot that issued it and the next one.
SLOT_SECONDS: Final = 30.0
#: Bytes of the MAC kept (128 bits: forging one is guessing).
MAC_BYTES: Final = 16
#: The answer's verb; ``COOKIE`` + space + token is what a client must pad its ``H`` to.
REPLY_PREFIX: Final = b"COOKIE "
TOKEN_LENGTH: Final = len(base64.urlsafe_b64encode(bytes(MAC_BYTES)).rstrip(b"="))
REPLY_SIZE: Final = len(REPLY_PREFIX) + TOKEN_LENGTH


class CookieJar:
    """Issues and checks tokens; holds two secrets and nothing per address."""

    def __init__(self, slot_seconds: float = SLOT_SECONDS,
                 random_bytes: Callable[[int], bytes] = os.urandom):
        self.slot_seconds = slot_seconds
        self._random = random_bytes
        self._secrets: dict[int, bytes] = {}

    def issue(self, addr: Hashable, now: float) -> bytes:
        """The ``COOKIE <token>`` datagram for ``addr``."""
        slot = int(now // self.slot_seconds)
        return REPLY_PREFIX + self._token(self._secret(slot), addr)

    def check(self, addr: Hashable, token: str, now: float) -> bool:
        """Whether ``token`` was issued to ``addr`` in this slot or the one before."""
        if len(token) != TOKEN_LENGTH:
            return False
        given = token.encode("ascii", "replace")
        slot = int(now // self.slot_seconds)
        for candidate in (slot, slot - 1):
            secret = self._secrets.get(candidate)
            if secret is not None and hmac.compare_digest(self._token(secret, addr), given):
                return True
        return False

    def _secret(self, slot: int) -> bytes:
        secret = self._secrets.get(slot)
        if secret is None:
            secret = self._secrets[slot] = self._random(32)
            for old in [s for s in self._secrets if s < slot - 1]:
                del self._secrets[old]
        return secret

    @staticmethod
    def _token(secret: bytes, addr: Hashable) -> bytes:
        mac = hmac.new(secret, repr(addr).encode(), hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(mac).rstrip(b"=")
