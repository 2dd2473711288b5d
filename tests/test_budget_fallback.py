"""What a worker spends when the budget exchange falls silent (``worker.sending.fallback``).

Two keepers share a pro account through a board, as the exchange topic shares reports. The
worker cut off stops reaching the board at once and finds its exchange unhealthy
``SILENT_AFTER`` later, as the Kafka exchange does; the other keeps hearing the board. At every
step the two shares given to the limiters must add up to at most the budget, and the joining
share that a worker outside every split spends by design (the rate limiter's margin covers it).
A worker cut off sends nothing at all: the other, hearing nobody, spends the plan's whole URL
figure, with no margin.
"""

from __future__ import annotations

import pytest

from tests.test_budget import Board, FakeExchange, pro_config, urls
from worker import app
from worker.clock import MockClock
from worker.kafka.exchange import SILENT_AFTER
from worker.sending.shares import ShareKeeper
from worker.sending.split import JOINING_SHARE, REPORT_TTL

T0 = 1_800_000_000.0
STEP = 0.05
HEARTBEAT = 3.0
MOST = 1.0 + JOINING_SHARE + 1e-9  # the consumer hears the group coordinator this often


class CutExchange(FakeExchange):
    """Cut off from ``cut_at`` (wall) until ``back_at``: its reports reach nobody, and it tells
    so ``SILENT_AFTER`` later."""

    cut_at = float("inf")
    back_at = float("inf")

    def _cut(self, delay: float = 0.0) -> bool:
        now = self.clock.time()
        return self.cut_at + delay <= now < self.back_at

    def healthy(self):
        return not self._cut(SILENT_AFTER)

    def _send(self, account, report):
        if not self._cut():
            super()._send(account, report)


class Consumer:
    """When the consumer last heard from Kafka: a heartbeat every 3 s while Kafka answers."""

    def __init__(self, clock, started):
        self.clock, self.started = clock, started
        self.cut_at = float("inf")

    def contact(self):
        now = self.clock.monotonic()
        heard = min(now, self.cut_at)
        return self.started + (heard - self.started) // HEARTBEAT * HEARTBEAT


def pair(clock):
    board = Board()
    out = {}
    for member in ("a", "b"):
        accounts = app.accounts(pro_config(), clock)
        exchange = CutExchange(board, member, clock)
        consumer = Consumer(clock, clock.monotonic())
        keeper = ShareKeeper(accounts, clock, exchange=exchange, contact=consumer.contact)
        out[member] = (keeper, exchange, consumer)
        keeper.limiter = accounts.limiters["main"]
    return out


def run(workers, clock, seconds):
    """Both look every step, both with a backlog; returns each step's (a's, b's) URL share, a
    share of 0 for a worker whose limiter sends nothing."""
    seen = []
    for _ in range(round(seconds / STEP)):
        for keeper, _, _ in workers.values():
            keeper.update(urls(50_000), 1, 2)
        seen.append(tuple(spent(workers[m][0]) for m in ("a", "b")))
        clock.advance(STEP)
    return seen


def spent(keeper):
    return 0.0 if keeper.limiter.state().blocked_for > 0 else keeper.shares()["main"].urls


def test_a_worker_cut_off_from_kafka_spends_almost_nothing_while_the_other_takes_all():
    """Before, the cut-off worker fell back to its part of the partitions (half) while the other
    took the whole budget: 1.5 of it for as long as the group kept the partition."""
    clock = MockClock(wall=T0)
    workers = pair(clock)
    steady = run(workers, clock, 6.0)
    assert steady[-1] == pytest.approx((0.5, 0.5), abs=0.01)
    a, exchange, consumer = workers["a"]
    exchange.cut_at = clock.time()
    consumer.cut_at = clock.monotonic()
    seen = run(workers, clock, 15.0)
    assert max(x + y for x, y in seen) <= MOST
    assert a.mode == "cut off"
    assert seen[-1] == (0.0, pytest.approx(1.0, abs=0.01))
    # From the moment it found the exchange silent, it sent nothing.
    first = round(SILENT_AFTER / STEP)
    assert {x for x, _ in seen[first:]} == {0.0}
    assert max(y for _, y in seen[first:]) == pytest.approx(1.0, abs=0.01)


def test_a_worker_whose_exchange_alone_fails_shares_by_partitions_after_a_wait():
    """The exchange is down for both while Kafka answers: both spend almost nothing until their
    consumers hear Kafka again and the others have had time to notice, then half each."""
    clock = MockClock(wall=T0)
    workers = pair(clock)
    run(workers, clock, 6.0)
    for _, exchange, _ in workers.values():
        exchange.cut_at = clock.time()
    seen = run(workers, clock, SILENT_AFTER + HEARTBEAT + REPORT_TTL + 1.0)
    assert max(x + y for x, y in seen) <= MOST
    assert min(x + y for x, y in seen) == 0.0  # held back meanwhile
    assert seen[-1] == (0.5, 0.5)
    assert {keeper.mode for keeper, _, _ in workers.values()} == {"partitions"}


def test_a_worker_cut_off_takes_its_share_again_once_back():
    clock = MockClock(wall=T0)
    workers = pair(clock)
    run(workers, clock, 6.0)
    a, exchange, consumer = workers["a"]
    exchange.cut_at = clock.time()
    consumer.cut_at = clock.monotonic()
    seen = run(workers, clock, 8.0)
    exchange.back_at = clock.time()
    consumer.cut_at = float("inf")
    seen += run(workers, clock, 10.0)
    assert max(x + y for x, y in seen) <= MOST
    assert a.mode == "demand"
    assert seen[-1] == pytest.approx((0.5, 0.5), abs=0.01)
