"""The dispatcher on the mock clock: batches are cut when the budget can send them, not when
they fill, oldest window first, and a kind without budget never holds back another kind."""

import threading

import pytest

from worker.clock import MockClock
from worker.cloudflare.client import PurgeAccepted
from worker.cloudflare.ratelimit import URL_SAFETY, AccountRateLimiter
from worker.cloudflare.retry import RetryPolicy
from worker.cloudflare.tiers import PlanLimits
from worker.pending.coalescer import Coalescer
from worker.pending.ledger import COVERED, LedgerSettings, PurgeLedger
from worker.sending.dispatcher import Dispatcher
from worker.sending.purger import Destination, Purger
from worker.targets import Kind, Mode, Target

ZA, ZB = "a" * 32, "b" * 32
P = Mode.PURGE
WINDOW = 2.0


class RecordingClient:
    """Stands in for the API client: records each request's kind and items, accepts them all."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Kind, list]] = []
        self.lock = threading.Lock()

    def purge(self, zone_id, kind, items, mode=Mode.PURGE):
        with self.lock:
            self.sent.append((zone_id, kind, list(items)))
        return PurgeAccepted("id", None)


def build(*, urls_per_second=100.0, flex_bucket=10, flex_refill=1.0, cap=10, concurrency=2):
    clock = MockClock()
    limits = PlanLimits(flex_refill, flex_bucket, cap, urls_per_second / URL_SAFETY, cap)
    limiter = AccountRateLimiter(limits, clock, start_full=True)
    client = RecordingClient()
    dests = {z: Destination(z, z[:1], client, limiter) for z in (ZA, ZB)}
    coalescer = Coalescer(WINDOW, lambda zone, kind: cap, clock)
    ledger = PurgeLedger(LedgerSettings())
    dispatcher = Dispatcher(
        coalescer,
        dests,
        Purger(RetryPolicy(), clock),
        ledger,
        clock,
        concurrency=concurrency,
    )
    return clock, coalescer, dispatcher, client, ledger


def settle(dispatcher):
    done = []
    while dispatcher.in_flight:
        done += dispatcher.collect(timeout=1.0)
    return done


def urls(n, start=0, host="a.com"):
    return [Target.url(f"https://{host}/{i}") for i in range(start, start + n)]


def test_with_budget_a_full_request_goes_at_once_and_the_rest_waits_for_its_window():
    clock, coalescer, dispatcher, client, _ = build()
    clock.advance(1)  # the URL budget starts empty; one second refills it
    for i, t in enumerate(urls(15)):
        coalescer.add(ZA, P, t, i)
    assert dispatcher.dispatch() == 1
    settle(dispatcher)
    assert [len(items) for _, _, items in client.sent] == [10]
    assert dispatcher.dispatch() == 0  # 5 left: not a request's worth, window still open
    clock.advance(WINDOW)
    assert dispatcher.dispatch() == 1
    settle(dispatcher)
    assert [len(items) for _, _, items in client.sent] == [10, 5]
    assert coalescer.pending == 0


def test_without_budget_targets_stay_pending_and_repeats_collapse_into_them():
    clock, coalescer, dispatcher, client, _ = build(urls_per_second=10.0, cap=10)
    # The budget allows one request of 10 per second; 40 distinct URLs arrive 5 times over.
    for _round in range(5):
        for i, t in enumerate(urls(40)):
            coalescer.add(ZA, P, t, (_round, i))
        dispatcher.dispatch()
        settle(dispatcher)
        clock.advance(0.2)
    assert coalescer.pending <= 40
    for _ in range(60):
        clock.advance(0.5)
        dispatcher.dispatch()
        settle(dispatcher)
    sent = [t for _, _, items in client.sent for t in items]
    assert sorted(sent) == sorted(t.value for t in urls(40))  # each URL exactly once
    assert all(len(items) == 10 for _, _, items in client.sent)


def test_a_kind_without_budget_does_not_hold_back_another_kind():
    clock, coalescer, dispatcher, client, _ = build(flex_bucket=1, flex_refill=0.01)
    clock.advance(1)
    coalescer.add(ZA, P, Target.tag("t0"), 0)
    clock.advance(WINDOW)
    assert dispatcher.dispatch() == 1  # the one flex token
    settle(dispatcher)
    coalescer.add(ZA, P, Target.tag("t1"), 1)  # no flex budget for ~100 s
    for i, t in enumerate(urls(3)):
        coalescer.add(ZA, P, t, 10 + i)
    clock.advance(WINDOW)
    assert dispatcher.dispatch() == 1
    settle(dispatcher)
    assert [k for _, k, _ in client.sent] == [Kind.TAGS, Kind.FILES]
    assert coalescer.count(ZA, P, Kind.TAGS) == 1  # still pending, still deduplicating


def test_oldest_window_goes_first_when_budget_is_short():
    clock, coalescer, dispatcher, client, _ = build(urls_per_second=10.0, cap=10)
    for i, t in enumerate(urls(10, host="b.com")):
        coalescer.add(ZB, P, t, i)
    clock.advance(0.5)
    for i, t in enumerate(urls(10, host="a.com")):
        coalescer.add(ZA, P, t, 100 + i)
    clock.advance(0.6)  # one request's worth of budget
    assert dispatcher.dispatch() == 1
    settle(dispatcher)
    assert client.sent[0][0] == ZB


def test_never_more_requests_in_flight_than_threads():
    clock, coalescer, dispatcher, _, _ = build(urls_per_second=1e6, cap=1, concurrency=2)
    clock.advance(1)
    for i, t in enumerate(urls(10)):
        coalescer.add(ZA, P, t, i)
    assert dispatcher.dispatch() == 2
    assert dispatcher.in_flight <= 2
    settle(dispatcher)
    dispatcher.close()


def test_sent_batches_enter_the_ledger_in_flight_then_as_purged():
    clock, coalescer, dispatcher, _, ledger = build()
    clock.advance(1)
    url = urls(1)[0]
    coalescer.add(ZA, P, url, "r")
    clock.advance(WINDOW)
    old = clock.time() - 60
    assert dispatcher.dispatch() == 1
    joined = ledger.check(ZA, P, url, old)
    assert joined is not None and joined is not COVERED  # in flight: join it
    settle(dispatcher)
    assert ledger.check(ZA, P, url, old) is COVERED
    assert ledger.check(ZA, P, url, clock.time()) is None


def test_drain_sends_partial_batches_before_their_window_ends():
    clock, coalescer, dispatcher, client, _ = build()
    clock.advance(1)
    for i, t in enumerate(urls(3)):
        coalescer.add(ZA, P, t, i)
    assert dispatcher.dispatch() == 0
    assert dispatcher.dispatch(drain=True) == 1
    settle(dispatcher)
    assert len(client.sent[0][2]) == 3


def test_it_says_when_refused_budget_comes_back():
    clock, coalescer, dispatcher, _, _ = build(urls_per_second=10.0, cap=10)
    for i, t in enumerate(urls(10)):
        coalescer.add(ZA, P, t, i)
    assert dispatcher.dispatch() == 0  # the URL window starts full
    assert dispatcher.budget_at == pytest.approx(clock.monotonic() + 1.0)
    clock.advance(1.0)
    assert dispatcher.dispatch() == 1 and dispatcher.budget_at is None
    settle(dispatcher)


def test_under_a_backlog_the_rest_of_a_seconds_budget_goes_in_a_smaller_request():
    # 76 URLs a second with 10 a request: seven full requests fit, and then one of six.
    clock, coalescer, dispatcher, client, _ = build(urls_per_second=76.0, cap=10, concurrency=8)
    for i, t in enumerate(urls(200)):
        coalescer.add(ZA, P, t, i)
    clock.advance(1.0)  # the window starts full
    dispatcher.dispatch()
    settle(dispatcher)
    dispatcher.dispatch()
    settle(dispatcher)
    sizes = [len(items) for _, _, items in client.sent]
    assert sum(sizes) == 76 and sizes.count(10) == 7 and 6 in sizes


def test_a_ratelimit_header_saying_none_is_left_pauses_the_account_until_its_reset():
    from worker.cloudflare.client import ratelimit_header

    assert ratelimit_header('"default";r=0;t=7') == (0, 7.0)
    assert ratelimit_header('"default";r=12;t=30') == (12, 30.0)
    assert ratelimit_header('"default";r=x;t=1') == (None, None)
    assert ratelimit_header(None) == (None, None)

    clock, coalescer, dispatcher, client, _ = build()
    client.purge = lambda zone_id, kind, items, mode=Mode.PURGE: PurgeAccepted("id", None, 0, 7.0)
    clock.advance(1)
    for t in urls(10):
        coalescer.add(ZA, P, t, "r")
    assert dispatcher.dispatch() == 1
    settle(dispatcher)
    for t in urls(10, start=10):
        coalescer.add(ZA, P, t, "r2")
    clock.advance(1)
    assert dispatcher.dispatch() == 0  # the header said the limit is spent: nothing goes
    assert dispatcher.budget_at == pytest.approx(clock.monotonic() + 6, abs=0.05)
    clock.advance(6)
    assert dispatcher.dispatch() == 1
