import itertools

import pytest

from worker.clock import MockClock
from worker.cloudflare.retry import RetryPolicy, call_with_retries
from worker.errors import ApiRejected, ApiUnavailable, RateLimited, RetriesExhausted


def test_retries_until_success_with_capped_backoff():
    clock = MockClock()
    calls = []

    def fn():
        calls.append(clock.monotonic())
        if len(calls) < 6:
            raise ApiUnavailable(503)
        return "ok"

    policy = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=4, budget_seconds=100)
    assert call_with_retries(fn, policy, clock) == "ok"
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(0.5 <= g <= 4 for g in gaps)
    assert max(gaps) >= 2  # it grew


def test_permanent_errors_are_not_retried():
    clock = MockClock()
    calls = []

    def fn():
        calls.append(1)
        raise ApiRejected(400)

    with pytest.raises(ApiRejected):
        call_with_retries(fn, RetryPolicy(), clock)
    assert len(calls) == 1


def test_budget_runs_out_into_retries_exhausted():
    clock = MockClock()

    def fn():
        raise ApiUnavailable(502)

    with pytest.raises(RetriesExhausted) as err:
        call_with_retries(
            fn,
            RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=5, budget_seconds=60),
            clock,
        )
    assert err.value.attempts > 10
    assert 60 <= clock.monotonic() - 1000 <= 61
    assert err.value.error_class == "retries_exhausted"


def test_retry_after_is_honoured():
    clock = MockClock()
    calls = []

    def fn():
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise RateLimited(retry_after=9)
        return 1

    call_with_retries(fn, RetryPolicy(initial_backoff_seconds=0.1), clock)
    assert calls[1] - calls[0] >= 9
