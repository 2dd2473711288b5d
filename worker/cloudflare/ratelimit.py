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
MAX_WAIT_STEP = 0.05
MIN_WAIT_STEP = 1e-4


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

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens exist (0 if now); takes nothing.

        A request larger than the whole bucket may go once the bucket is full, into debt."""
        self.refill(now)
        if self.tokens >= cost or self.tokens >= self.capacity:
            return 0.0
        return (min(cost, self.capacity) - self.tokens) / self.rate

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens if they exist (0 returned); else the seconds until they would."""
        wait = self.wait_for(cost, now)
        if wait == 0:
            self.tokens -= cost
        return wait


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
        # The flex bucket starts full: its refill can be minutes, and a lone worker should not wait
        # that long for its first tag purge. The URL budget starts empty: a replica joining while
        # others already spend the account's budget must not add a second's burst on top (it
        # refills in a second, so this costs almost nothing).
        self._flex.tokens = self._flex.capacity
        self._urls.tokens = 0.0

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
        """Take the budget for one request if it is there now (returns 0); otherwise take
        nothing and return how long until it would be."""
        return self._check(kind, items, take=True)

    def ready_in(self, kind: Kind, items: int) -> float:
        """Seconds until a request of ``items`` of ``kind`` could go; takes nothing."""
        return self._check(kind, items, take=False)

    def _check(self, kind: Kind, items: int, *, take: bool) -> float:
        with self._lock:
            now = self._clock.monotonic()
            blocked = self._blocked_until - now
            if blocked > 0:
                return blocked
            bucket = self._urls if kind.metered_per_item else self._flex
            cost = items if kind.metered_per_item or self._flex_cost_per_item else 1
            return bucket.take(cost, now) if take else bucket.wait_for(cost, now)

    def acquire(self, kind: Kind, items: int) -> float:
        """Block until a request of ``items`` of ``kind`` may be sent; return the seconds waited.

        Waits in short steps and looks again, so a lower share (after a rebalance) or a 429
        applies at once to requests already waiting, not only to later ones."""
        waited = 0.0
        while (wait := self.reserve(kind, items)) > 0:
            # Never a step so small that adding it to the clock changes nothing (float rounding).
            step = min(max(wait, MIN_WAIT_STEP), MAX_WAIT_STEP)
            self._clock.sleep(step)
            waited += step
        return waited

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
            bucket = self._urls if kind.metered_per_item else self._flex
            bucket.tokens = min(bucket.tokens, 0.0)

    def state(self) -> LimiterState:
        with self._lock:
            now = self._clock.monotonic()
            return LimiterState(self._share, self._factor, max(0.0, self._blocked_until - now))
