"""Retries with capped, jittered exponential backoff, driven by tenacity on an injected clock.

Only ``RetryableError`` is retried. A time budget, not an attempt count, bounds the retrying: a long
outage should hold records back (the consumer pauses) rather than drain them to the dead-letter
topic, and only a budget that runs out turns into ``RetriesExhausted``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

from worker.clock import Clock
from worker.config.model import RetryPolicy
from worker.errors import Abandoned, RateLimited, RetriesExhausted, RetryableError

T = TypeVar("T")
__all__ = ["RetryPolicy", "call_with_retries"]


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    clock: Clock,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    cancel: threading.Event | None = None,
) -> T:
    """Call ``fn`` until it succeeds, fails permanently, or the budget is spent.

    Raises: whatever permanent error ``fn`` raises, ``RetriesExhausted``, or ``Abandoned`` when
    ``cancel`` is set during a backoff. Blocks while waiting.
    """
    start = clock.monotonic()

    def sleep(seconds: float) -> None:
        if cancel is None:
            clock.sleep(seconds)
        elif clock.wait(cancel, seconds):
            raise Abandoned("stopping: retry abandoned")

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        delay = policy.backoff(state.attempt_number)
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        # Never sleep past the budget: the last attempt happens at the deadline, not after it.
        remaining = policy.budget_seconds - (clock.monotonic() - start)
        return max(0.0, min(delay, remaining))

    def stop(state: tenacity.RetryCallState) -> bool:
        return clock.monotonic() - start >= policy.budget_seconds

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                sleep = state.next_action.sleep if state.next_action else 0.0
                on_retry(exc, state.attempt_number, sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RetryableError),
        wait=wait,
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=False,
    )
    try:
        return retrying(fn)
    except tenacity.RetryError as err:
        last = err.last_attempt.exception() or RuntimeError("no attempt made")
        raise RetriesExhausted(last, err.last_attempt.attempt_number) from None
