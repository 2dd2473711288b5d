"""A client-side model of one account's purge budget, so the worker never causes a 429, on an
injected clock: flex requests (tags, hosts, prefixes, everything) on the documented token
bucket; URLs at most ``urls_per_second`` in any one-second window (Cloudflare meters a moving
second, and a bucket would let a second exceed the plan by its capacity). Each worker spends
its share of each (``set_share``); a 429 anyway slows it (``backoff.py``)."""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

from worker.clock import Clock
from worker.cloudflare.backoff import Backoff
from worker.cloudflare.meters import (
    MIN_WAIT_STEP,
    WINDOW,
    Bucket,
    FlexTickets,
    Ticket,
    Usage,
    Window,
)
from worker.cloudflare.tiers import PlanLimits
from worker.errors import Abandoned
from worker.targets import Kind

# Spend a little under the documented bucket: the server's and ours do not tick in lockstep, and
# a 429 costs far more than the few percent left unused.
SAFETY = 0.95
# URLs need less slack than the bucket: a request holds the window from its reservation until a
# second after it completed, which covers the second the server counts it in, so a worker alone
# on the account spends the plan's whole figure. Workers sharing it keep 2 %: each applies a
# split on its own clock.
URL_SAFETY = 0.98
MAX_WAIT_STEP = 0.05


class LimiterState(NamedTuple):
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
        self._backoff = Backoff()
        self._flex_cost_per_item = flex_cost_per_item
        # Per-request caps the API turned out to enforce below the configured ones.
        self._caps: dict[Kind, int] = {}
        self._shared = False  # set_share not called yet
        # What was taken lately, for the demand this worker reports: (when, URLs, flex requests).
        self._used = Usage()
        self._share_set_at = -math.inf
        # Flex requests out, and whether the exchange says nobody else spends the account.
        self._flex_out = FlexTickets()
        self._alone = False
        self._synced = False  # the bucket was set from the API's count, alone
        now = clock.monotonic()
        self._flex = Bucket(1.0, 1.0, now)
        self._urls = Window(self._url_limit(), now)
        self._resize(now)
        # The flex bucket starts empty: a worker (re)started after a burst cannot know what the
        # account has left (a full one cost four 429s on free) until an answer says it.
        self._flex.tokens = self._flex.capacity if start_full else 0.0

    def _url_limit(self) -> float:
        safety = 1.0 if self._alone else URL_SAFETY
        return self._limits.urls_per_second * safety * self._url_share * self._backoff.factor

    def _resize(self, now: float) -> None:
        # Alone and following the API's count, the bucket needs no slack: each answer resets it.
        safety = 1.0 if self._alone and self._synced else SAFETY
        scale = safety * self._flex_share * self._backoff.factor
        flex_rate = self._limits.flex_refill_per_second * scale
        # A worker's burst is its share of the bucket, never less than one request, so a
        # full-size request can always eventually pass.
        flex_cap = max(1.0, self._limits.flex_bucket * self._flex_share * safety)
        self._flex.refill(now)
        self._flex.rate = max(flex_rate, 1e-6)
        self._flex.capacity = flex_cap
        self._flex.tokens = min(self._flex.tokens, flex_cap)
        self._urls.limit = max(self._url_limit(), 1e-6)

    def set_share(
        self, share: float, flex_share: float | None = None, *, hold: bool = True
    ) -> None:
        """Spend this fraction (0 < share <= 1) of the account's URL budget, and of its flex
        bucket (``flex_share``; the same when not given), from now on. With ``hold``, URL budget
        gained is spendable only a window from now: whoever spent it before still has its last
        second of requests in the server's window. Without, the caller knows nobody else may
        spend it (the budget exchange's split)."""
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

    def reserve(self, kind: Kind, items: int) -> float:  # the wait (0: taken)
        return self.reserve_ticket(kind, items)[0]

    def reserve_ticket(self, kind: Kind, items: int) -> tuple[float, Ticket | None]:
        """``reserve``, with a ticket to hand to ``completed`` when the request ends."""
        with self._lock:
            return self._budget(kind, items, take=True)

    def ready_in(self, kind: Kind, items: int) -> float:
        """Seconds until a request of ``items`` of ``kind`` could go; takes nothing."""
        with self._lock:
            return self._budget(kind, items, take=False)[0]

    def _budget(self, kind: Kind, items: int, *, take: bool) -> tuple[float, Ticket | None]:
        """The wait for ``items`` of ``kind`` (0: may go now), taken if ``take``; lock held."""
        now = self._clock.monotonic()
        blocked = self._backoff.blocked_until - now
        if blocked > 0:
            return blocked, None
        if self._backoff.recover(now):
            self._resize(now)
        if not take:
            if kind.metered_per_item:
                return self._urls.wait_for(items, now), None
            return self._flex.wait_for(items if self._flex_cost_per_item else 1, now), None
        if kind.metered_per_item:
            wait, ticket = self._urls.take(items, now)
        else:
            cost = items if self._flex_cost_per_item else 1
            wait = self._flex.take(cost, now)
            ticket = self._flex_out.take(now, float(cost)) if wait == 0 else None
        if wait == 0:
            self._used.took(now, items if kind.metered_per_item else 0, not kind.metered_per_item)
        return wait, ticket

    def used(self, now: float, flex_span: float) -> tuple[int, int]:
        """URLs taken in the last second and flex requests in the last ``flex_span`` seconds."""
        with self._lock:
            return self._used.since(now, flex_span)

    def seconds_for(self, kind: Kind, items: int) -> float:
        """Seconds of this worker's budget that ``items`` of ``kind`` take at its full rate."""
        with self._lock:
            if kind.metered_per_item:
                return items / self._urls.limit
            requests = -(-items // self.cap(kind))
            return requests / self._flex.rate

    def largest(self, kind: Kind) -> int:
        """The most items of ``kind`` one request may carry within this worker's budget: a URL
        request never larger than its share of a second (a small share would otherwise send a
        whole request into a second that holds less), flex requests as the cap allows."""
        if not kind.metered_per_item:
            return self.cap(kind)
        with self._lock:
            return min(self.cap(kind), max(1, int(self._urls.limit + 1e-9)))

    def room(self, kind: Kind) -> int:
        """URLs that could go in one request now; none while shares move (filling a window to
        the last URL leaves no slack for requests another worker still has in flight)."""
        if not kind.metered_per_item:
            return 0
        with self._lock:
            now = self._clock.monotonic()
            if self._backoff.blocked_until > now or now - self._share_set_at < 2 * WINDOW:
                return 0
            self._urls.wait_for(0, now)  # expires what has left the window
            return max(0, int(self._urls.limit - self._urls.total + 1e-9))

    def completed(self, ticket: Ticket | None) -> None:
        """The request a ticket was taken for has ended (answered or failed)."""
        with self._lock:
            if ticket is not None and not self._flex_out.done(ticket):
                self._urls.restamp(ticket, self._clock.monotonic())

    def set_alone(self, alone: bool) -> None:
        """The budget exchange heard nobody else: what the API says is left is all ours."""
        with self._lock:
            if alone != self._alone:
                self._alone, self._synced = alone, False
                self._resize(self._clock.monotonic())

    def hold_window(self) -> None:
        """Spend no URLs for a window from now (another worker's last second may be full)."""
        with self._lock:
            now = self._clock.monotonic()
            self._urls.hold(self._urls.limit, now)

    def idle_account(self) -> None:
        """Nobody spent the account for seconds: the URL window forgets others' spend."""
        with self._lock:
            self._urls.forget_others(self._clock.monotonic())

    def learn_left(
        self, kind: Kind, remaining: int | None, reset: float | None, ticket: Ticket | None
    ) -> None:
        """The answer to ``ticket``'s request said ``remaining`` was left when the API took it
        (``Ratelimit: "default";r=..;t=..``). Flex: the bucket follows it, less every request
        the API may have taken after it (out when it was taken, or taken since: answers come
        back in any order), up only alone (``Bucket.learn``). URLs: none left means wait."""
        if remaining is None:
            return
        if kind.metered_per_item:
            if remaining == 0 and reset:
                self.pause(reset)
        elif not self._flex_cost_per_item:  # else the API's count is not in tokens
            with self._lock:
                others = self._flex_out.after(ticket)
                alone = self._alone and self._flex_share >= 1.0
                now = self._clock.monotonic()
                self._flex.learn(remaining - others, now, rise=alone)
                if alone and not self._synced:
                    self._synced = True
                    self._resize(now)

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
            now = self._clock.monotonic()
            if self._backoff.recover(now):
                self._resize(now)

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the API's ``Ratelimit`` header said none is left);
        the rate is not lowered, since nothing was refused."""
        with self._lock:
            self._backoff.pause(self._clock.monotonic() + seconds)

    def on_rate_limited(self, kind: Kind, retry_after: float | None) -> None:
        """A 429 arrived: stop every caller for Retry-After, empty the bucket, slow down."""
        with self._lock:
            now = self._clock.monotonic()
            self._backoff.limited(now, retry_after if retry_after is not None else 1.0)
            self._resize(now)
            if kind.metered_per_item:
                self._urls.spend_all(now)
            else:
                self._flex.tokens = min(self._flex.tokens, 0.0)

    def state(self) -> LimiterState:
        with self._lock:
            now = self._clock.monotonic()
            blocked = max(0.0, self._backoff.blocked_until - now)
            return LimiterState(self._url_share, self._flex_share, self._backoff.factor, blocked)
