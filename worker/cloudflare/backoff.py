"""What a 429 does to an account's rate: every caller waits out Retry-After, and the rate drops
(multiplicative decrease) and climbs back over a minute if no other 429 comes, because a 429
means someone else spends the budget too. Plain arithmetic on times the caller passes in; the
limiter (``ratelimit.py``) holds the lock and the clock."""

from __future__ import annotations

import math

MIN_FACTOR = 0.25
DECREASE = 0.5
# After a 429 the rate climbs back to the full budget over this long, if no other 429 comes:
# a per-success step made a slow plan (free: one tag request per 12 s) crawl for many minutes.
RECOVERY_SECONDS = 60.0


class Backoff:
    def __init__(self) -> None:
        self.factor = 1.0  # of the share's rate, after 429s
        self.blocked_until = 0.0
        self._limited_at = -math.inf
        self._factor_at_limit = 1.0

    def pause(self, until: float) -> None:
        """Send nothing before ``until``."""
        self.blocked_until = max(self.blocked_until, until)

    def limited(self, now: float, pause: float) -> None:
        """A 429: wait ``pause``, and lower the rate."""
        self.pause(now + pause)
        self.factor = max(MIN_FACTOR, self.factor * DECREASE)
        self._factor_at_limit = self.factor
        self._limited_at = now

    def recover(self, now: float) -> bool:
        """Climb back linearly over ``RECOVERY_SECONDS``; True if the factor moved visibly."""
        if self.factor >= 1.0:
            return False
        progress = min(1.0, (now - self._limited_at) / RECOVERY_SECONDS)
        factor = self._factor_at_limit + (1.0 - self._factor_at_limit) * progress
        if factor - self.factor >= 0.01 or factor >= 1.0:
            self.factor = factor
            return True
        return False
