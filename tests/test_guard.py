"""The dead-letter guard on a mock clock: shares judged by when records arrived, figures carried
from one run to the next."""

from __future__ import annotations

import pytest

from worker.clock import MockClock
from worker.config.model import GuardSettings
from worker.errors import DeadLetterGuardTripped
from worker.outcome.guard import DeadLetterGuard

LIMIT = GuardSettings(max_ratio=0.5, min_records=10, window_seconds=60)


def guard(clock: MockClock) -> DeadLetterGuard:
    return DeadLetterGuard(LIMIT, clock)


def dead_letter(g: DeadLetterGuard, arrived_at: float) -> None:
    g.check(arrived_at)
    g.dead(arrived_at)


def test_a_share_under_the_limit_never_trips_whatever_order_outcomes_come_in():
    clock = MockClock()
    g = guard(clock)
    at = clock.monotonic()
    g.arrived(100, at)
    for _ in range(40):  # the bad ones finish first, the good ones much later
        dead_letter(g, at)
    assert g.window() == (100, 40)


def test_the_share_over_the_limit_trips_at_the_dead_letter_that_crosses_it():
    clock = MockClock()
    g = guard(clock)
    at = clock.monotonic()
    g.arrived(20, at)
    for _ in range(10):
        dead_letter(g, at)
    with pytest.raises(DeadLetterGuardTripped, match="11 of the 20"):
        g.check(at)


def test_records_older_than_the_window_no_longer_count():
    clock = MockClock()
    g = guard(clock)
    g.arrived(20, clock.monotonic())
    for _ in range(10):
        dead_letter(g, clock.monotonic())
    clock.advance(61)
    assert g.window() == (0, 0)
    g.arrived(20, clock.monotonic())
    dead_letter(g, clock.monotonic())  # would trip if the old ones still counted


def test_a_successor_goes_on_from_figures_under_the_limit():
    clock = MockClock()
    first = guard(clock)
    first.arrived(100, clock.monotonic())
    for _ in range(30):
        dead_letter(first, clock.monotonic())
    text = first.header()
    assert text == "arrived=100 dead=30"
    clock.advance(5)
    second = guard(clock)
    assert second.seed(text, age=5)
    second.arrived(10, clock.monotonic())
    dead_letter(second, clock.monotonic())  # 31 of 110: goes on
    assert second.window() == (110, 31)


def test_a_successor_of_a_run_over_the_limit_stops_at_its_first_dead_letter_until_the_window_ends():
    clock = MockClock()
    second = guard(clock)
    assert second.seed("arrived=100 dead=50", age=10)  # at the limit: the next was over
    second.arrived(500, clock.monotonic())  # its own arrivals would dilute the share
    with pytest.raises(DeadLetterGuardTripped, match="last run"):
        second.check(clock.monotonic())
    clock.advance(51)  # the predecessor's window is over: judged on its own again
    second.arrived(20, clock.monotonic())
    dead_letter(second, clock.monotonic())


@pytest.mark.parametrize(
    "text,age",
    [("arrived=10 dead=20", 1), ("nonsense", 1), ("arrived=x dead=1", 1), ("arrived=9 dead=9", 61)],
)
def test_figures_that_are_not_figures_or_too_old_are_ignored(text, age):
    g = guard(MockClock())
    assert not g.seed(text, age)
    assert g.window() == (0, 0)
