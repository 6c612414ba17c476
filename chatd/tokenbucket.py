"""The one token bucket: ``rate`` tokens a second, at most ``burst`` saved up.

Everything chatd rate-limits uses it: log lines a stranger or a local peer
can cause (:class:`chatd.log.BoundedLog`), a failing plugin's log lines,
and the ratelimit plugin's chat lines and logins. Time is passed in, never
read here, so the arithmetic is pure and testable with plain numbers.
"""

from __future__ import annotations


def refill(tokens: float, stamp: float, now: float, rate: float, burst: float) -> float:
    """The tokens a bucket holds at ``now`` that held ``tokens`` at ``stamp``.

    For tables that keep buckets as plain ``(tokens, stamp)`` tuples, which
    Python's cyclic garbage collector does not track (see the ratelimit plugin).
    """
    tokens += (now - stamp) * rate
    return burst if tokens > burst else tokens


class TokenBucket:
    """A bucket that starts full; :meth:`take` spends one token, or refuses and counts it.

    ``refused`` counts the refusals since the caller last reset it: a bounded
    log reports them as the lines it left out, the ratelimit plugin warns a
    sender on the first one of a burst.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.refused = 0

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        self.refused += 1
        return False

    def take_refused(self) -> int:
        """The refusals counted so far, and start counting again from zero."""
        count, self.refused = self.refused, 0
        return count
