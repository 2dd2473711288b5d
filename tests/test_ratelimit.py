"""The client-side budget model, on a mock clock (no sleeping)."""

import pytest

from worker.clock import MockClock
from worker.cloudflare.plans import Plan, limits_for
from worker.cloudflare.ratelimit import MIN_WAIT_STEP, SAFETY, AccountRateLimiter
from worker.targets import Kind


def test_flex_bucket_allows_its_burst_then_paces_at_refill_rate():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.PRO), clock)
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
    lim = AccountRateLimiter(limits_for(Plan.FREE), clock)
    for _ in range(23):
        assert lim.acquire(Kind.HOSTS, 1) == 0
    lim.acquire(Kind.HOSTS, 1)
    lim.acquire(Kind.HOSTS, 1)
    # Two requests past the burst wait about 1.25 refills of 12.6 s each.
    assert clock.monotonic() - 1000 == pytest.approx((2 - 0.75) / (5 / 60 * SAFETY), rel=0.01)


def test_url_budget_is_per_url_not_per_request():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.FREE), clock)
    sent = 0
    while clock.monotonic() - 1000 < 10:
        lim.acquire(Kind.FILES, 30)
        sent += 30
    elapsed = clock.monotonic() - 1000
    # Never more than the server's allowance (one second of burst plus the refill) ...
    assert sent <= 800 + 800 * elapsed
    # ... and a sustained rate close to the plan's URLs per second.
    assert sent / elapsed >= 800 * 0.9


def test_url_budget_starts_empty_so_a_joining_replica_adds_no_burst():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.PRO), clock, share=1 / 3)
    wait = lim.acquire(Kind.FILES, 30)
    assert 0 < wait <= 30 / (1500 / 3 * SAFETY) + 2 * MIN_WAIT_STEP  # step granularity


def test_share_scales_the_budget():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.PRO), clock, share=1 / 3)
    sent = 0
    while clock.monotonic() - 1000 < 30:
        lim.acquire(Kind.FILES, 30)
        sent += 30
    assert sent / 30 <= 1500 / 3 * 1.05
    lim.set_share(1.0)
    assert lim.state().share == 1.0


def test_429_blocks_for_retry_after_and_slows_down():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.PRO), clock)
    lim.on_rate_limited(Kind.TAGS, retry_after=7)
    assert lim.state().blocked_for == 7
    assert lim.acquire(Kind.FILES, 1) >= 7  # every kind waits: the account is throttled
    assert lim.state().factor == 0.5
    for _ in range(100):
        lim.on_success()
    assert lim.state().factor == 1.0


def test_flex_cost_per_item_option():
    clock = MockClock()
    lim = AccountRateLimiter(limits_for(Plan.PRO), clock, flex_cost_per_item=True)
    assert lim.acquire(Kind.TAGS, 20) == 0
    assert lim.acquire(Kind.TAGS, 20) > 0
