"""The client-side budget model, on a mock clock (no sleeping)."""

import pytest

from worker.clock import MockClock
from worker.cloudflare.ratelimit import MAX_WAIT_STEP, SAFETY, URL_SAFETY, AccountRateLimiter
from worker.cloudflare.tiers import Tier, limits_for
from worker.targets import Kind


def test_flex_bucket_allows_its_burst_then_paces_at_refill_rate():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock, start_full=True)
    waits = [lim.acquire(Kind.TAGS, 100) for _ in range(23)]
    assert waits == [0.0] * 23  # 25 * 0.95 = 23.75 tokens to start
    before = clock.monotonic()
    for _ in range(10):
        lim.acquire(Kind.TAGS, 1)
    elapsed = clock.monotonic() - before
    # 10 more requests at 5/s * 0.95: roughly 2 s (minus the 0.75 token left over).
    assert elapsed == pytest.approx((10 - 0.75) / (5 * SAFETY), rel=0.01)


def test_free_plan_flex_refill_is_per_minute():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.FREE), clock, start_full=True)
    for _ in range(23):
        assert lim.acquire(Kind.HOSTS, 1) == 0
    lim.acquire(Kind.HOSTS, 1)
    lim.acquire(Kind.HOSTS, 1)
    # Two requests past the burst wait about 1.25 refills of 12.6 s each.
    assert clock.monotonic() - 1000 == pytest.approx((2 - 0.75) / (5 / 60 * SAFETY), rel=0.01)


def test_a_starting_worker_assumes_the_flex_bucket_is_spent():
    # A restart after a burst: the account's bucket may be empty, so the first tag purge waits
    # one refill interval, and the bucket fills from there at the plan's rate.
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.FREE), clock)
    first = lim.acquire(Kind.TAGS, 1)
    assert first == pytest.approx(1 / (5 / 60 * SAFETY), rel=0.02)
    for _ in range(4):
        lim.acquire(Kind.TAGS, 1)
    # Five requests in five refill intervals: never ahead of what the server refilled.
    assert clock.monotonic() - 1000 == pytest.approx(5 / (5 / 60 * SAFETY), rel=0.02)


def test_after_a_429_the_full_rate_returns_within_a_minute():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(10)
    lim.on_rate_limited(Kind.TAGS, retry_after=1)
    lim.on_rate_limited(Kind.TAGS, retry_after=1)  # twice: the rate is at its floor
    assert lim.state().factor == pytest.approx(0.25)
    clock.advance(30)
    lim.reserve(Kind.TAGS, 1)
    assert 0.55 < lim.state().factor < 0.7  # half way back after half the time
    clock.advance(31)
    lim.reserve(Kind.TAGS, 1)
    assert lim.state().factor == 1.0


def test_url_budget_is_per_url_not_per_request():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.FREE), clock)
    lim.acquire(Kind.FILES, 30)  # the first second counts as spent (see below)
    start = clock.monotonic()
    sent = 30
    while clock.monotonic() - start < 10:
        lim.acquire(Kind.FILES, 30)
        sent += 30
    elapsed = clock.monotonic() - start
    # Never more than the server's allowance (one second's worth plus the rate) ...
    assert sent <= 800 + 800 * elapsed
    # ... and a sustained rate close to the plan's URLs per second.
    assert sent / elapsed >= 800 * 0.9


def test_a_starting_or_joining_worker_adds_no_burst():
    # What the account spent in the second before is unknown (a predecessor may have spent all
    # of it just now), so the first URL request waits for a whole window to pass.
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock, share=1 / 3)
    wait = lim.acquire(Kind.FILES, 30)
    assert 1.0 <= wait <= 1.0 + MAX_WAIT_STEP
    assert lim.acquire(Kind.FILES, 30) == 0  # then at the full rate


def test_share_scales_the_budget():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock, share=1 / 3)
    sent = 0
    while clock.monotonic() - 1000 < 30:
        lim.acquire(Kind.FILES, 30)
        sent += 30
    assert sent / 30 <= 1500 / 3 * 1.05
    lim.set_share(1.0)
    assert lim.state().share == 1.0


def test_429_blocks_for_retry_after_and_slows_down():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    lim.on_rate_limited(Kind.TAGS, retry_after=7)
    assert lim.state().blocked_for == 7
    assert lim.state().factor == 0.5
    assert lim.acquire(Kind.FILES, 1) >= 7  # every kind waits: the account is throttled
    assert 0.5 < lim.state().factor < 0.6  # and the rate has begun to climb back
    clock.advance(60)  # a minute without another 429: back to the full rate
    lim.on_success()
    assert lim.state().factor == 1.0


def test_flex_cost_per_item_option():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock, flex_cost_per_item=True, start_full=True)
    assert lim.acquire(Kind.TAGS, 20) == 0
    assert lim.acquire(Kind.TAGS, 20) > 0


def _worst_second(sends):
    worst, start = 0.0, 0
    total = 0.0
    for t, n in sends:
        total += n
        while sends[start][0] <= t - 1.0:
            total -= sends[start][1]
            start += 1
        worst = max(worst, total)
    return worst


def test_no_one_second_window_holds_more_than_the_budget_and_the_rate_holds():
    import random

    rng = random.Random(7)
    clock = MockClock()
    # Two workers of one account with half the budget each, one restarting half-way.
    a = AccountRateLimiter(limits_for(Tier.PRO), clock, share=0.5)
    b = AccountRateLimiter(limits_for(Tier.PRO), clock, share=0.5)
    sends = []
    while clock.monotonic() - 1000 < 20:
        if abs(clock.monotonic() - 1010) < 0.01:
            b = AccountRateLimiter(limits_for(Tier.PRO), clock, share=0.5)  # a restart
        for lim in (a, b):
            n = rng.choice([1, 30, 100])
            if lim.reserve(Kind.FILES, n) == 0:
                sends.append((clock.monotonic(), n))
        clock.advance(0.01)
    assert _worst_second(sends) <= 1500 * URL_SAFETY + 1e-6
    assert sum(n for _, n in sends) / 20 >= 0.9 * 1500 * URL_SAFETY


def test_after_a_429_the_url_window_counts_as_full():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(2)
    assert lim.reserve(Kind.FILES, 100) == 0
    lim.on_rate_limited(Kind.FILES, retry_after=0.2)
    clock.advance(0.5)  # Retry-After is over, but the server's window was full half a second ago
    assert 0.4 < lim.ready_in(Kind.FILES, 100) <= 0.5 + 1e-9


def test_a_url_request_counts_from_when_it_completed():
    # A request that left late (a busy machine) may reach the server late: it counts in the
    # window from its completion, so the next second's requests cannot land beside it.
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(1.0)
    wait, ticket = lim.reserve_ticket(Kind.FILES, 1450)
    assert wait == 0 and ticket is not None
    clock.advance(0.3)
    lim.completed(ticket)
    clock.advance(0.75)  # 1.05 s after the reservation, 0.75 s after completion
    assert lim.ready_in(Kind.FILES, 100) == pytest.approx(0.25)


def test_budget_gained_from_a_new_share_is_spendable_a_window_later():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(5)  # constructed long before partitions arrive (a slow group join)
    lim.set_share(1 / 3)  # the first share: its budget was someone else's a moment ago
    assert lim.ready_in(Kind.FILES, 100) == pytest.approx(1.0)
    clock.advance(1)
    assert lim.reserve(Kind.FILES, 400) == 0
    lim.set_share(0.2)  # a lower share applies at once ...
    assert lim.ready_in(Kind.FILES, 100) > 0.9
    clock.advance(1)
    lim.set_share(1.0)  # ... a higher one a window later
    assert lim.reserve(Kind.FILES, 280) == 0  # the 0.2 (285 URLs) it had is there now
    assert lim.ready_in(Kind.FILES, 300) == pytest.approx(1.0)


def test_room_is_offered_only_while_the_share_is_steady():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(1)
    assert lim.reserve(Kind.FILES, 1400) == 0
    assert lim.room(Kind.FILES) == int(1500 * URL_SAFETY) - 1400
    lim.set_share(0.5)
    clock.advance(1.5)
    assert lim.room(Kind.FILES) == 0  # shares just moved: keep the slack
    clock.advance(1)
    assert lim.room(Kind.FILES) == int(1500 * URL_SAFETY * 0.5)
    assert lim.room(Kind.TAGS) == 0


def test_what_the_api_says_is_left_lowers_the_bucket_always_and_raises_it_only_alone():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)  # starts empty
    clock.advance(0.5)  # 2.4 tokens refilled
    tickets = [lim.reserve_ticket(Kind.TAGS, 100)[1] for _ in range(2)]
    assert lim.reserve(Kind.TAGS, 100) > 0
    # Not known to be alone: an answer saying 20 are left may be owed to others.
    lim.learn_left(Kind.TAGS, 20, 4, tickets[0])
    assert lim.reserve(Kind.TAGS, 100) > 0
    lim.set_alone(True)
    # The request taken after it may not be counted in the 20 yet.
    lim.learn_left(Kind.TAGS, 20, 4, tickets[0])
    burst = [lim.reserve_ticket(Kind.TAGS, 100) for _ in range(19)]
    assert [wait for wait, _ in burst] == [0.0] * 19
    assert lim.reserve(Kind.TAGS, 100) > 0
    for _, ticket in [*burst, (0, tickets[0]), (0, tickets[1])]:
        lim.completed(ticket)
    # Fewer left than the model thinks (someone else spent them): believed at once, alone or not.
    lim.set_alone(False)
    clock.advance(1.0)  # 4.75 tokens back
    late = lim.reserve_ticket(Kind.TAGS, 100)[1]
    lim.learn_left(Kind.TAGS, 1, 4, late)
    lim.completed(late)
    assert lim.reserve(Kind.TAGS, 100) == 0
    assert lim.reserve(Kind.TAGS, 100) > 0


def test_the_bucket_never_rises_above_this_workers_part_of_it():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    lim.set_alone(True)
    clock.advance(0.3)
    ticket = lim.reserve_ticket(Kind.TAGS, 1)[1]
    lim.learn_left(Kind.TAGS, 1000, 0, ticket)  # nonsense from the API: capped at the bucket
    lim.completed(ticket)
    assert sum(lim.reserve(Kind.TAGS, 1) == 0 for _ in range(30)) == int(25 * SAFETY)


def test_no_urls_left_waits_for_the_reset():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(2)
    lim.learn_left(Kind.FILES, 0, 3, None)
    assert lim.ready_in(Kind.FILES, 1) == pytest.approx(3)


def test_alone_and_following_the_apis_count_the_bucket_refills_at_the_plans_full_rate():
    def pace(alone):
        clock = MockClock()
        lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
        lim.set_alone(alone)
        clock.advance(0.3)
        ticket = lim.reserve_ticket(Kind.TAGS, 1)[1]
        lim.learn_left(Kind.TAGS, 0, 5, ticket)  # the bucket is spent
        lim.completed(ticket)
        start = clock.monotonic()
        for _ in range(10):
            lim.acquire(Kind.TAGS, 1)
        return clock.monotonic() - start

    assert pace(alone=True) == pytest.approx(10 / 5, rel=0.02)
    assert pace(alone=False) == pytest.approx(10 / (5 * SAFETY), rel=0.02)


def test_urls_are_spent_to_the_plans_limit_alone_and_with_two_percent_spare_when_shared():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    clock.advance(1)
    assert lim.reserve(Kind.FILES, 1000) == 0
    assert lim.reserve(Kind.FILES, 471) > 0  # shared (or not known to be alone): 98 %
    lim.set_alone(True)
    assert lim.reserve(Kind.FILES, 500) == 0
    lim.set_alone(False)  # another worker appeared: less at once
    clock.advance(1)
    assert lim.reserve(Kind.FILES, 1000) == 0
    assert lim.reserve(Kind.FILES, 471) > 0


def test_an_answer_is_never_taken_to_count_requests_the_api_may_have_taken_after_it():
    # Answers come back in any order: a request taken after this one may be answered first, yet
    # the API took it after this one, so this answer's count does not include it.
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Tier.PRO), clock)
    lim.set_alone(True)
    clock.advance(1.0)
    first = lim.reserve_ticket(Kind.TAGS, 1)[1]
    second = lim.reserve_ticket(Kind.TAGS, 1)[1]
    lim.completed(second)  # answered first
    lim.learn_left(Kind.TAGS, 3, 1, first)  # 3 left after the first: 2 after the second
    lim.completed(first)
    assert [lim.reserve(Kind.TAGS, 1) == 0 for _ in range(3)] == [True, True, False]
