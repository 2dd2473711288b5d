"""A client-side model of one account's purge budget, so the worker never causes a 429.

Two budgets, on an injected clock:

- flex requests (tags, hosts, prefixes, everything): the documented token bucket and refill rate;
- URLs: at most ``urls_per_second`` in any one-second window. Cloudflare meters URLs as a
  per-second moving average, and a token bucket lets a window exceed that by its capacity (a
  bucket holding one 100-URL request on a 1,500 URL/s plan still allows 1,525 in some second).

When several workers share an account, each spends only its share of each budget (``set_share``:
from the demand exchange, or the partitions it owns). A 429 anyway blocks every caller until
Retry-After and lowers the rate for a while (multiplicative decrease, additive recovery), because
it means someone else spends the budget too.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from worker.clock import Clock
from worker.cloudflare.meters import MIN_WAIT_STEP, WINDOW, Bucket, Ticket, Window
from worker.cloudflare.tiers import PlanLimits
from worker.errors import Abandoned
from worker.targets import Kind

# Spend a little under the documented budget: the server's window and ours do not tick in
# lockstep (requests arrive a little after they leave), and a 429 costs far more than the few
# percent left unused.
SAFETY = 0.95
# URLs need less slack: a URL request counts in the window from when it *completed*, which is
# never before it reached the server, so the worker's window already runs behind the server's.
URL_SAFETY = 0.98
MIN_FACTOR = 0.25
DECREASE = 0.5
# After a 429 the rate climbs back to the full budget over this long, if no other 429 comes:
# a per-success step made a slow plan (free: one tag request per 12 s) crawl for many minutes.
RECOVERY_SECONDS = 60.0
MAX_WAIT_STEP = 0.05
# How far back what was taken is remembered, for the demand reported to the budget exchange.
USED_SPAN = 60.0


@dataclass(frozen=True)
class LimiterState:
    share: float
    flex_share: float
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
        start_full: bool = False,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._url_share = share
        self._flex_share = share
        self._factor = 1.0
        self._limited_at = -math.inf
        self._factor_at_limit = 1.0
        self._blocked_until = 0.0
        self._flex_cost_per_item = flex_cost_per_item
        # Per-request caps the API turned out to enforce below the configured ones.
        self._caps: dict[Kind, int] = {}
        self._shared = False  # set_share not called yet
        # What was taken lately, for the demand this worker reports: (when, URLs, flex requests).
        self._used: deque[tuple[float, int, int]] = deque()
        self._share_set_at = -math.inf
        now = clock.monotonic()
        self._flex = Bucket(1.0, 1.0, now)
        self._urls = Window(self._url_limit(), now)
        self._resize(now)
        # The flex bucket starts empty: a worker (re)started after a burst cannot know what the
        # account has left, and assuming a full bucket cost four 429s on the free plan. The
        # price is one refill interval before the first tag purge (12 s on free, 0.2 s on pro).
        self._flex.tokens = self._flex.capacity if start_full else 0.0

    def _url_limit(self) -> float:
        return self._limits.urls_per_second * URL_SAFETY * self._url_share * self._factor

    def _resize(self, now: float) -> None:
        flex_rate = self._limits.flex_refill_per_second * SAFETY * self._flex_share * self._factor
        # A worker's burst is its share of the bucket, never less than one request, so a
        # full-size request can always eventually pass.
        flex_cap = max(1.0, self._limits.flex_bucket * self._flex_share * SAFETY)
        self._flex.refill(now)
        self._flex.rate = max(flex_rate, 1e-6)
        self._flex.capacity = flex_cap
        self._flex.tokens = min(self._flex.tokens, flex_cap)
        self._urls.limit = max(self._url_limit(), 1e-6)

    def set_share(
        self, share: float, flex_share: float | None = None, *, hold: bool = True
    ) -> None:
        """Spend only this fraction (0 < share <= 1) of the account's URL budget, and of its flex
        bucket (``flex_share``, the same when not given), from now on.

        With ``hold``, URL budget gained (the first share, or a larger one) is spendable only a
        window from now: whoever spent it before still has its last second of requests in the
        server's window. Without, the caller knows that nobody else may spend it (the budget
        exchange's split)."""
        with self._lock:
            now = self._clock.monotonic()
            before = 0.0 if not self._shared else self._urls.limit
            # A nudge (shares follow demand every second) is no move worth holding back for.
            if abs(share - self._url_share) > 0.01 or not self._shared:
                self._share_set_at = now
            self._shared = True
            self._url_share = min(1.0, max(share, 0.001))
            self._flex_share = min(1.0, max(share if flex_share is None else flex_share, 0.001))
            self._resize(now)
            if self._urls.limit > before and (hold or before == 0.0):
                self._urls.hold(self._urls.limit - before, now)

    def reserve(self, kind: Kind, items: int) -> float:
        """Take the budget for one request if it is there now (returns 0); otherwise take
        nothing and return how long until it would be."""
        return self.reserve_ticket(kind, items)[0]

    def reserve_ticket(self, kind: Kind, items: int) -> tuple[float, Ticket | None]:
        """``reserve``, also returning a ticket to hand to ``completed`` when the request ends
        (None for requests whose budget needs no restamping)."""
        with self._lock:
            return self._budget(kind, items, take=True)

    def ready_in(self, kind: Kind, items: int) -> float:
        """Seconds until a request of ``items`` of ``kind`` could go; takes nothing."""
        with self._lock:
            return self._budget(kind, items, take=False)[0]

    def _budget(self, kind: Kind, items: int, *, take: bool) -> tuple[float, Ticket | None]:
        """The wait for a request of ``items`` of ``kind`` (0: it may go now), taking the budget
        when ``take`` and it is there. Call with the lock held."""
        now = self._clock.monotonic()
        blocked = self._blocked_until - now
        if blocked > 0:
            return blocked, None
        if self._factor < 1.0:
            self._recover(now)
        if not take:
            if kind.metered_per_item:
                return self._urls.wait_for(items, now), None
            return self._flex.wait_for(items if self._flex_cost_per_item else 1, now), None
        if kind.metered_per_item:
            wait, ticket = self._urls.take(items, now)
        else:
            wait = self._flex.take(items if self._flex_cost_per_item else 1, now)
            ticket = None
        if wait == 0:
            url = kind.metered_per_item
            self._used.append((now, items if url else 0, 0 if url else 1))
            # Pruned here too, not only when read: without the budget exchange nobody reads it.
            while self._used[0][0] <= now - USED_SPAN:
                self._used.popleft()
        return wait, ticket

    def used(self, now: float, flex_span: float) -> tuple[int, int]:
        """URLs taken in the last second and flex requests in the last ``flex_span`` seconds
        (at most ``USED_SPAN``)."""
        flex_span = min(flex_span, USED_SPAN)
        with self._lock:
            while self._used and self._used[0][0] <= now - max(WINDOW, flex_span):
                self._used.popleft()
            urls = sum(u for at, u, _ in self._used if at > now - WINDOW)
            return urls, sum(f for _, _, f in self._used)

    def largest(self, kind: Kind) -> int:
        """The most items of ``kind`` one request may carry within this worker's budget: a URL
        request never larger than its share of a second (a small share would otherwise send a
        whole request into a second that holds less), flex requests as the cap allows."""
        if not kind.metered_per_item:
            return self.cap(kind)
        with self._lock:
            return min(self.cap(kind), max(1, int(self._urls.limit + 1e-9)))

    def room(self, kind: Kind) -> int:
        """How many items of ``kind`` could go in one request right now (URLs only: a flex
        request costs the same whatever its size). None while shares move: filling a window to
        the last URL leaves no slack for the requests another worker still has in flight."""
        if not kind.metered_per_item:
            return 0
        with self._lock:
            now = self._clock.monotonic()
            if self._blocked_until > now or now - self._share_set_at < 2 * WINDOW:
                return 0
            self._urls.wait_for(0, now)  # expires what has left the window
            return max(0, int(self._urls.limit - self._urls.total + 1e-9))

    def completed(self, ticket: Ticket | None) -> None:
        """The request a ticket was taken for has ended (answered or failed)."""
        if ticket is not None:
            with self._lock:
                self._urls.restamp(ticket, self._clock.monotonic())

    def acquire(self, kind: Kind, items: int) -> float:
        """Block until a request of ``items`` of ``kind`` may be sent; return the seconds waited.

        Waits in short steps and looks again, so a lower share (after a rebalance) or a 429
        applies at once to requests already waiting, not only to later ones."""
        return self.acquire_ticket(kind, items)[0]

    def acquire_ticket(
        self, kind: Kind, items: int, cancel: threading.Event | None = None
    ) -> tuple[float, Ticket | None]:
        """``acquire``, also returning the ticket (see ``reserve_ticket``). Raises ``Abandoned``
        if ``cancel`` is set while waiting."""
        waited = 0.0
        while True:
            wait, ticket = self.reserve_ticket(kind, items)
            if wait <= 0:
                return waited, ticket
            # Never a step so small that adding it to the clock changes nothing (float rounding).
            step = min(max(wait, MIN_WAIT_STEP), MAX_WAIT_STEP)
            if cancel is None:
                self._clock.sleep(step)
            elif self._clock.wait(cancel, step):
                raise Abandoned("stopping: wait for rate budget abandoned")
            waited += step

    def learn_cap(self, kind: Kind, items: int) -> None:
        """The API refused a request of more than ``items`` of ``kind``: cut no larger ones."""
        with self._lock:
            self._caps[kind] = max(1, min(items, self._caps.get(kind, items)))

    def cap(self, kind: Kind) -> int:
        """Items per request of ``kind``: the plan's cap, or a smaller one the API enforced."""
        return min(self._limits.per_request(kind), self._caps.get(kind, 1 << 30))

    def on_success(self) -> None:
        with self._lock:
            if self._factor < 1.0:
                self._recover(self._clock.monotonic())

    def _recover(self, now: float) -> None:
        """Climb back from the rate a 429 left, linearly over ``RECOVERY_SECONDS``."""
        progress = min(1.0, (now - self._limited_at) / RECOVERY_SECONDS)
        factor = self._factor_at_limit + (1.0 - self._factor_at_limit) * progress
        if factor - self._factor >= 0.01 or (factor >= 1.0 > self._factor):
            self._factor = factor
            self._resize(now)

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the API's ``Ratelimit`` header said none is left);
        the rate is not lowered, since nothing was refused."""
        with self._lock:
            self._blocked_until = max(self._blocked_until, self._clock.monotonic() + seconds)

    def on_rate_limited(self, kind: Kind, retry_after: float | None) -> None:
        """A 429 arrived: stop every caller for Retry-After, empty the bucket, slow down."""
        with self._lock:
            now = self._clock.monotonic()
            pause = retry_after if retry_after is not None else 1.0
            self._blocked_until = max(self._blocked_until, now + pause)
            self._factor = max(MIN_FACTOR, self._factor * DECREASE)
            self._factor_at_limit = self._factor
            self._limited_at = now
            self._resize(now)
            if kind.metered_per_item:
                self._urls.spend_all(now)
            else:
                self._flex.tokens = min(self._flex.tokens, 0.0)

    def state(self) -> LimiterState:
        with self._lock:
            now = self._clock.monotonic()
            blocked = max(0.0, self._blocked_until - now)
            return LimiterState(self._url_share, self._flex_share, self._factor, blocked)
