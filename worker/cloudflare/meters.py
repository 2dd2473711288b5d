"""The two meters an account's budget is kept on: a token bucket (tag, host, prefix and
everything requests) and a one-second window (URLs, which Cloudflare meters per moving second).
Both are plain arithmetic on times the caller passes in; ``ratelimit.py`` holds the lock and the
clock."""

from __future__ import annotations

from collections import deque

MIN_WAIT_STEP = 1e-4
WINDOW = 1.0
# A URL request's entry in the window, restamped when the request completes.
Ticket = list[float]


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``capacity``."""

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
        # Never a wait so small that adding it to a clock changes nothing (float rounding).
        return max((min(cost, self.capacity) - self.tokens) / self.rate, MIN_WAIT_STEP)

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens if they exist (0 returned); else the seconds until they would."""
        wait = self.wait_for(cost, now)
        if wait == 0:
            self.tokens -= cost
        return wait

    def learn(self, left: float, now: float, *, rise: bool) -> None:
        """The server says ``left`` tokens are left, less the requests it may not have counted
        yet. Fewer than here: others spent them (or this model ran ahead), so believed at once.
        More: believed only when ``rise`` (nobody else may spend them)."""
        self.refill(now)
        left = min(self.capacity, max(0.0, left))
        if left < self.tokens or rise:
            self.tokens = left


class FlexTickets:
    """Flex requests out and taken, so that an answer's count of the bucket is never taken to
    include requests the API may have taken after it (answers come back in any order). A
    ticket is [when, cost, its place among those taken, how many were out when it was taken]."""

    def __init__(self) -> None:
        self.out = 0
        self.taken = 0

    def take(self, now: float, cost: float) -> Ticket:
        self.taken += 1
        self.out += 1
        return [now, cost, float(self.taken), float(self.out - 1)]

    @staticmethod
    def made(ticket: Ticket) -> bool:
        """Whether ``ticket`` is a flex ticket (a URL request's is the window's entry)."""
        return len(ticket) == 4

    def done(self, ticket: Ticket) -> bool:
        """``ticket``'s request has ended; False if it is not a flex ticket."""
        if not self.made(ticket):
            return False
        self.out = max(0, self.out - 1)
        return True

    def after(self, ticket: Ticket | None) -> int:
        """Requests the API may have taken after ``ticket``'s: out then, or taken since."""
        if ticket is None or not self.made(ticket):
            return self.out
        return self.taken - int(ticket[2]) + int(ticket[3])


class Window:
    """What was sent in the last second; a send fits while that total stays within ``limit``.

    It starts full, as if the whole limit had just been spent: a worker that starts, restarts
    or joins others cannot know what the account spent in the second before (a predecessor may
    have spent all of it just now), and one second of waiting is the price of never adding a
    burst on top."""

    def __init__(self, limit: float, now: float) -> None:
        self.limit = limit
        # [when, URLs]: lists, so a request's entry can be restamped when it has completed.
        # Entries that stand for others' spending (the start, holds), not this worker's requests.
        self._others: list[list[float]] = [[now, limit]]
        self.sent: deque[list[float]] = deque(self._others)
        self.total = limit

    def _expire(self, now: float) -> None:
        while self.sent and self.sent[0][0] <= now - WINDOW:
            self.total -= self.sent.popleft()[1]
        if not self.sent:
            self.total = 0.0  # no float residue

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` fits in the window (0 if now). A request larger than the whole
        limit goes alone, once the window is empty."""
        self._expire(now)
        if self.total + cost <= self.limit + 1e-9 or not self.sent:
            return 0.0
        must_expire = self.total + min(cost, self.limit) - self.limit - 1e-9
        freed = 0.0
        for at, amount in self.sent:
            freed += amount
            if freed >= must_expire:
                return max(at + WINDOW - now, MIN_WAIT_STEP)
        return max(self.sent[-1][0] + WINDOW - now, MIN_WAIT_STEP)

    def take(self, cost: float, now: float) -> tuple[float, list[float] | None]:
        """Take ``cost`` if it fits (0 and the entry, to restamp later), else the wait."""
        wait = self.wait_for(cost, now)
        if wait > 0:
            return wait, None
        entry = [now, cost]
        self.sent.append(entry)
        self.total += cost
        return 0.0, entry

    def restamp(self, entry: list[float], now: float) -> None:
        """Count ``entry`` from ``now``: the request it stands for has completed, so the server
        had it by then. Counting from the reservation instead would let requests that left
        late (a busy machine) reach the server bunched into one second."""
        try:
            self.sent.remove(entry)
        except ValueError:  # it had already left the window: count it again, from now
            self.total += entry[1]
        entry[0] = now
        self.sent.append(entry)

    def forget_others(self, now: float) -> None:
        """Drop what was counted for others' spending (the start, holds): nobody spent lately."""
        self._expire(now)
        for entry in self._others:
            if any(e is entry for e in self.sent):
                self.sent.remove(entry)
                self.total -= entry[1]
        self._others = []
        if not self.sent:
            self.total = 0.0

    def hold(self, amount: float, now: float) -> None:
        """Count ``amount`` as spent now (by others)."""
        entry = [now, amount]
        self._others = [e for e in self._others if e[0] > now - WINDOW] + [entry]
        self.sent.append(entry)
        self.total += amount

    def spend_all(self, now: float) -> None:
        """Count the whole limit as spent now (after a 429: the server's window is full)."""
        self._expire(now)
        extra = max(0.0, self.limit - self.total)
        self.sent.append([now, extra])
        self.total += extra


# How far back what was taken is remembered, for the demand reported to the budget exchange.
USED_SPAN = 60.0


class Usage:
    """What was taken lately: (when, URLs, flex requests)."""

    def __init__(self) -> None:
        self._taken: deque[tuple[float, int, int]] = deque()

    def took(self, now: float, urls: int, flex: bool) -> None:
        self._taken.append((now, urls, int(flex)))
        # Pruned here too, not only when read: without the budget exchange nobody reads it.
        while self._taken[0][0] <= now - USED_SPAN:
            self._taken.popleft()

    def since(self, now: float, flex_span: float) -> tuple[int, int]:
        """URLs taken in the last second, flex requests in the last ``flex_span`` seconds (at
        most ``USED_SPAN``)."""
        span = max(WINDOW, min(flex_span, USED_SPAN))
        while self._taken and self._taken[0][0] <= now - span:
            self._taken.popleft()
        urls = sum(u for at, u, _ in self._taken if at > now - WINDOW)
        return urls, sum(f for _, _, f in self._taken)
