"""A client-side model of one account's purge budget, so the worker never causes a 429.

Two budgets, both token buckets on an injected clock:

- flex requests (tags, hosts, prefixes, everything): the documented bucket and refill rate;
- URLs: ``urls_per_second`` refill with one second of burst, matching a per-second moving average.

When several replicas share an account, each spends only ``share`` of it (set from the partitions
it owns). A 429 anyway blocks every caller until Retry-After and lowers the rate for a while
(multiplicative decrease, additive recovery), because it means someone else spends the budget too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from worker.clock import Clock
from worker.cloudflare.plans import PlanLimits
from worker.targets import Kind

# Spend a little under the documented budget: the server's moving average and our bucket do not
# tick in lockstep, and a 429 costs far more than the few percent left unused.
SAFETY = 0.95
MIN_FACTOR = 0.25
DECREASE = 0.5
RECOVERY_PER_SUCCESS = 0.02


class _Bucket:
    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def reserve(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens (going into debt if needed); return seconds until they exist."""
        self.refill(now)
        self.tokens -= cost
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(frozen=True)
class LimiterState:
    share: float
    factor: float
    blocked_for: float


class AccountRateLimiter:
    """Thread-safe. ``acquire`` blocks (through the clock) until the request may be sent."""

    def __init__(
        self,
        limits: PlanLimits,
        clock: Clock,
        *,
        share: float = 1.0,
        flex_cost_per_item: bool = False,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._share = share
        self._factor = 1.0
        self._blocked_until = 0.0
        self._flex_cost_per_item = flex_cost_per_item
        now = clock.monotonic()
        self._flex = _Bucket(1.0, 1.0, now)
        self._urls = _Bucket(1.0, 1.0, now)
        self._resize(now)
        # Start with full buckets, as the server's do.
        self._flex.tokens = self._flex.capacity
        self._urls.tokens = self._urls.capacity

    def _resize(self, now: float) -> None:
        scale = self._share * self._factor
        flex_rate = self._limits.flex_refill_per_second * SAFETY * scale
        url_rate = self._limits.urls_per_second * SAFETY * scale
        # A replica's burst is its share of the bucket, never less than one request's worth, so a
        # full-size request can always eventually pass.
        flex_cap = max(1.0, self._limits.flex_bucket * self._share * SAFETY)
        url_cap = max(float(self._limits.urls_per_request), url_rate)
        for bucket, rate, cap in (
            (self._flex, flex_rate, flex_cap),
            (self._urls, url_rate, url_cap),
        ):
            bucket.refill(now)
            bucket.rate = max(rate, 1e-6)
            bucket.capacity = cap
            bucket.tokens = min(bucket.tokens, cap)

    def set_share(self, share: float) -> None:
        """Spend only this fraction (0 < share <= 1) of the account's budget from now on."""
        share = min(1.0, max(share, 0.01))
        with self._lock:
            self._share = share
            self._resize(self._clock.monotonic())

    def reserve(self, kind: Kind, items: int) -> float:
        """Reserve budget for one request; return how long the caller must wait before sending."""
        with self._lock:
            now = self._clock.monotonic()
            blocked = max(0.0, self._blocked_until - now)
            if kind is Kind.FILES:
                wait = self._urls.reserve(items, now + blocked)
            else:
                cost = items if self._flex_cost_per_item else 1
                wait = self._flex.reserve(cost, now + blocked)
            return blocked + wait

    def acquire(self, kind: Kind, items: int) -> float:
        """Block until a request of ``items`` of ``kind`` may be sent; return the seconds waited."""
        wait = self.reserve(kind, items)
        if wait > 0:
            self._clock.sleep(wait)
        return wait

    def on_success(self) -> None:
        with self._lock:
            if self._factor < 1.0:
                self._factor = min(1.0, self._factor + RECOVERY_PER_SUCCESS)
                self._resize(self._clock.monotonic())

    def on_rate_limited(self, kind: Kind, retry_after: float | None) -> None:
        """A 429 arrived: stop every caller for Retry-After, empty the bucket, slow down."""
        with self._lock:
            now = self._clock.monotonic()
            pause = retry_after if retry_after is not None else 1.0
            self._blocked_until = max(self._blocked_until, now + pause)
            self._factor = max(MIN_FACTOR, self._factor * DECREASE)
            self._resize(now)
            bucket = self._urls if kind is Kind.FILES else self._flex
            bucket.tokens = min(bucket.tokens, 0.0)

    def state(self) -> LimiterState:
        with self._lock:
            now = self._clock.monotonic()
            return LimiterState(self._share, self._factor, max(0.0, self._blocked_until - now))
