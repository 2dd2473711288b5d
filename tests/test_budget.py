"""Demand-based budget shares: the split, the snapshot every worker takes, the keeper, and a
simulation of several workers spending one account against a sliding-second meter."""

import math
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ZONE_B
from tests.helpers import make_config
from worker import app
from worker.clock import MockClock
from worker.cloudflare.ratelimit import URL_SAFETY
from worker.sending.shares import ShareKeeper
from worker.sending.split import (
    CUTOFF,
    EPOCH,
    JOINING_SHARE,
    REPORT_INTERVAL,
    REPORT_TTL,
    Board,
    Demand,
    Report,
    Shares,
    allocate,
    last_allowed,
    next_shares,
)
from worker.targets import Kind

# -- the split ------------------------------------------------------------------------------------


def test_a_hot_member_takes_all_but_the_idle_floors():
    shares = allocate({"a": 12.0, "b": 0.0, "c": 0.0})
    assert shares["a"] == pytest.approx(0.99)
    assert shares["b"] == shares["c"] == pytest.approx(0.005)


def test_idle_members_split_the_budget_evenly():
    assert allocate({"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 0.333, "b": 0.333, "c": 0.333}


def test_a_steady_stream_keeps_its_pace_beside_a_backlog():
    shares = allocate({"steady": 0.2, "backlog": 30.0})
    assert shares["steady"] == pytest.approx(0.25)  # what it wants, with headroom
    assert shares["backlog"] == pytest.approx(0.75)


def test_two_backlogs_split_evenly_whatever_their_size():
    assert allocate({"a": 3.0, "b": 40.0}) == {"a": 0.5, "b": 0.5}


def test_floors_stay_small_among_many_members():
    shares = allocate({f"m{i:02}": 0.0 for i in range(20)} | {"hot": 9.0})
    assert shares["hot"] >= 0.95 - 1e-9  # the floors together at most 5 %


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.floats(0, 50), min_size=1, max_size=12))
def test_shares_never_sum_above_the_budget_and_do_not_depend_on_order(wants):
    shares = allocate(wants)
    assert sum(shares.values()) <= 1.0 + 1e-9
    assert all(s > 0 for s in shares.values())
    assert allocate(dict(reversed(list(wants.items())))) == shares


# -- rises take only what was free -------------------------------------------------------------


def test_a_falling_share_falls_at_once_and_a_rising_one_takes_what_is_free():
    # A burst moves from a to b: a falls at once; b takes only what nobody was allowed.
    shares = next_shares({"a": 0.49, "b": 0.49, "c": 0.02}, {"a": 0.96, "b": 0.02, "c": 0.02})
    assert shares == {"a": 0.49, "b": 0.02, "c": 0.02}
    # A second later a's old share has left the window: b rises to its target.
    shares = next_shares({"a": 0.49, "b": 0.49, "c": 0.02}, {"a": 0.49, "b": 0.02, "c": 0.02})
    assert shares == {"a": 0.49, "b": 0.49, "c": 0.02}


def test_rises_share_the_free_budget_in_proportion():
    # Free: 1 - (0.1 + 0.3 + 0.5) = 0.1, for rises of 0.35 and 0.15.
    shares = next_shares({"a": 0.45, "b": 0.45, "c": 0.1}, {"a": 0.1, "b": 0.3, "c": 0.5})
    assert shares == {"a": pytest.approx(0.17), "b": pytest.approx(0.33), "c": 0.1}


def test_nothing_rises_while_a_members_last_share_is_unknown_or_a_leaver_still_counts():
    assert next_shares({"a": 0.9, "b": 0.1}, {"a": 0.1, "b": None})["a"] == pytest.approx(0.1)
    assert next_shares({"a": 1.0}, {"a": 0.5}, gone=0.5)["a"] == pytest.approx(0.5)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.booleans()), min_size=1, max_size=8))
def test_old_or_new_shares_never_add_up_above_the_budget(rows):
    """Whatever the targets, if last epoch's shares fit, each member's larger of old and new
    shares fit too: a second straddling the boundary stays within the budget."""
    old_total = sum(o for _, o, _ in rows)
    allowed = {f"m{i}": o / max(1.0, old_total) for i, (_, o, _) in enumerate(rows)}
    targets = allocate({f"m{i}": t * 3 for i, (t, _, _) in enumerate(rows)})
    known = {m: (a if rows[i][2] else None) for i, (m, a) in enumerate(allowed.items())}
    new = next_shares(targets, known)
    # Members whose last share was unknown take at most what they had (they know it).
    new = {m: (min(new[m], allowed[m]) if known[m] is None else new[m]) for m in new}
    assert sum(max(allowed[m], new[m]) for m in new) <= 1.0 + 1e-6


# -- the snapshot ---------------------------------------------------------------------------------


def report(at, urls, epoch=None, allowed=0.0, left=False):
    return Report(at, Demand(urls, 0), epoch, allowed, left)


def test_a_snapshot_takes_each_members_latest_report_sent_before_the_cutoff():
    board = Board()
    t = 1000.0
    board.record("acc", "a", report(t - 0.9, 1))
    board.record("acc", "a", report(t - CUTOFF - 0.01, 2))
    board.record("acc", "a", report(t - 0.1, 3))  # too late for the boundary at t
    board.record("acc", "b", report(t - 0.2, 5))  # b's only report: too late too
    assert {m: r.demand.urls for m, r in board.snapshot("acc", t).items()} == {"a": 2}
    later = board.snapshot("acc", t + EPOCH)
    assert {m: r.demand.urls for m, r in later.items()} == {"a": 3, "b": 5}
    assert board.snapshot("other", t) == {}


def test_a_silent_member_drops_out():
    board = Board()
    board.record("acc", "a", report(100.0, 1))
    board.record("acc", "b", report(100.0, 1))
    assert set(board.snapshot("acc", 101.0)) == {"a", "b"}
    assert board.snapshot("acc", 100.0 + REPORT_TTL) == {}


def test_reports_out_of_order_are_ignored():
    board = Board()
    board.record("acc", "a", report(100.0, 1))
    board.record("acc", "a", report(99.0, 9))
    assert board.snapshot("acc", 101.0)["a"].demand.urls == 1


def test_what_a_member_was_allowed_is_read_from_its_newest_report_before_the_boundary():
    board, t, epoch = Board(), 1000.0, 1000
    # Gave its even share back after the cutoff: the newer, lower figure counts.
    board.record("acc", "idle", report(t - 0.9, 0, epoch=999, allowed=0.333))
    board.record("acc", "idle", report(t - 0.2, 0, epoch=999, allowed=0.005))
    # Applied the last split only after the cutoff: known from its newer report.
    board.record("acc", "slow", report(t - 0.9, 0, epoch=998, allowed=0.005))
    board.record("acc", "slow", report(t - 0.1, 0, epoch=999, allowed=0.2))
    # Never said what it had in the ending epoch: unknown (it may have risen).
    board.record("acc", "silent", report(t - 0.9, 0, epoch=998, allowed=0.005))
    # Its report stamped at the boundary already carries the new split: not counted.
    board.record("acc", "hot", report(t - 0.5, 9, epoch=999, allowed=0.333))
    board.record("acc", "hot", report(t, 9, epoch=1000, allowed=0.99))
    live = board.snapshot("acc", t)
    assert live["idle"].allowed == 0.333 and live["slow"].epoch == 998
    assert last_allowed(live, board.newest("acc", t), epoch) == {
        "idle": 0.005,
        "slow": 0.2,
        "silent": None,
        "hot": 0.333,
    }


# -- the keeper -----------------------------------------------------------------------------------


class FakeExchange:
    """Reports go straight onto a board shared by every fake worker."""

    def __init__(self, board, member, clock, skew=0.0, wire=None):
        self.board, self.member, self.clock, self.skew = board, member, clock, skew
        self.wire = wire  # None: on the board at once
        self.up = True
        self.closed = False
        self.first_sent = None
        self.at = 0.0
        self.caught_up = True
        self.read_back = False

    def publish(self, reports):
        # What is published twice in one instant goes out once, as the latest of it.
        at = max(self.clock.time() + self.skew, self.at + 1e-6)
        self.at = at
        if self.first_sent is None:
            self.first_sent = at
        self.last = reports
        for account, r in reports.items():
            self._send(account, r._replace(at=at))

    def healthy(self):
        return self.up

    def close(self, timeout):
        self.closed = True
        at = self.clock.time() + self.skew
        for account, r in self.last.items():
            self._send(account, r._replace(at=at, left=True))

    def _send(self, account, report):
        if self.wire is None:
            self.board.record(account, self.member, report)
        else:
            self.wire.send(self.board, account, self.member, report)


class Wire:
    """Reports reach the board ``delay`` seconds after they are sent, as Kafka delivers them
    (``deliver`` each step)."""

    def __init__(self, clock, delay):
        self.clock, self.delay, self.queue = clock, delay, deque()

    def send(self, board, account, member, report):
        self.queue.append((self.clock.monotonic() + self.delay, board, account, member, report))

    def deliver(self):
        while self.queue and self.queue[0][0] <= self.clock.monotonic() + 1e-9:
            _, board, account, member, report = self.queue.popleft()
            board.record(account, member, report)


class SkewedClock:
    """The same monotonic time; a wall clock a little off, as on another host."""

    def __init__(self, base, skew):
        self.base, self.skew = base, skew

    def monotonic(self):
        return self.base.monotonic()

    def time(self):
        return self.base.time() + self.skew

    def sleep(self, seconds):
        self.base.sleep(seconds)

    def wait(self, event, seconds):
        return self.base.wait(event, seconds)


def pro_config(**account):
    return make_config(
        "http://127.0.0.1:9",
        cloudflare__accounts={"main": {"plan": "pro", "files_per_request": 100, **account}},
    )


def keeper_for(clock, board, member, config=None, skew=0.0, wire=None):
    accounts = app.accounts(config or pro_config(), clock)
    key = accounts.settings["main"].budget_key
    exchange = FakeExchange(board, member, clock, skew, wire)
    exchange.board_key = key
    keeper = ShareKeeper(accounts, SkewedClock(clock, skew), exchange=exchange)
    return keeper, accounts, exchange


def urls(n):
    return lambda: {(ZONE_B, Kind.FILES): n} if n else {}


def test_a_new_worker_spends_almost_nothing_until_it_is_in_a_snapshot():
    clock = MockClock(wall=1_800_000_000.0)
    keeper, accounts, _ = keeper_for(clock, Board(), "a")
    assert keeper.shares()["main"] == Shares(JOINING_SHARE, JOINING_SHARE)
    keeper.update(urls(5000), 1, 1)
    assert keeper.mode == "demand"
    assert keeper.shares()["main"] == Shares(JOINING_SHARE, JOINING_SHARE)
    for _ in range(12):
        clock.advance(REPORT_INTERVAL)
        keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == 1.0  # alone on the account
    assert accounts.limiters["main"].state().share == 1.0


def test_the_keeper_splits_by_demand_and_caps_by_the_groups_share():
    clock = MockClock(wall=1_800_000_000.0)
    board = Board()
    hot, _, _ = keeper_for(clock, board, "hot", pro_config(share=0.5))
    idle, _, _ = keeper_for(clock, board, "idle", pro_config(share=0.5))
    for _ in range(16):
        clock.advance(REPORT_INTERVAL)
        hot.update(urls(5000), 1, 2)
        idle.update(urls(0), 1, 2)
    assert hot.shares()["main"].urls == pytest.approx(0.995 * 0.5)
    assert idle.shares()["main"].urls == pytest.approx(0.005 * 0.5)


def test_without_the_exchange_the_share_is_the_part_of_the_partitions():
    clock = MockClock(wall=1_800_000_000.0)
    keeper, _, exchange = keeper_for(clock, Board(), "a")
    exchange.up = False
    keeper.update(urls(10), 2, 6)
    assert keeper.mode == "joining"  # still connecting: no partition share yet
    clock.advance(REPORT_TTL)
    keeper.update(urls(10), 2, 6)
    assert keeper.mode == "partitions"
    assert keeper.shares()["main"].urls == pytest.approx(1 / 3)
    exchange.up = True
    for _ in range(12):
        clock.advance(REPORT_INTERVAL)
        keeper.update(urls(10), 2, 6)
    assert keeper.mode == "demand"
    assert keeper.shares()["main"].urls == 1.0


def test_a_fixed_share_never_moves():
    clock = MockClock()
    accounts = app.accounts(pro_config(), clock)
    keeper = ShareKeeper(accounts, clock, fixed=0.5)
    keeper.update(urls(10), 1, 1)
    assert keeper.shares()["main"] == Shares(0.5, 0.5)
    assert keeper.next_change() is None


# -- several workers, one account: never above the plan in any sliding second ------------------


class Meter:
    """URLs per sliding second, as the server counts them."""

    def __init__(self):
        self.sent: deque[tuple[float, int]] = deque()
        self.total = 0
        self.worst = 0

    def add(self, at, n):
        self.sent.append((at, n))
        self.total += n
        while self.sent[0][0] <= at - 1.0:
            self.total -= self.sent.popleft()[1]
        self.worst = max(self.worst, self.total)


def spend(limiter, backlog, meter, now):
    """Send what ``limiter`` allows of ``backlog`` URLs now, cut as the dispatcher cuts
    requests (never above the worker's share of a second; the rest of a second filled), each
    counted by ``meter``. Returns the URLs sent."""
    sent = 0
    while backlog > sent:
        size = min(limiter.largest(Kind.FILES), backlog - sent)
        wait, ticket = limiter.reserve_ticket(Kind.FILES, size)
        if wait > 0 and (room := limiter.room(Kind.FILES)) >= 10:
            size = min(room, size)  # the rest of the second, as the dispatcher does
            wait, ticket = limiter.reserve_ticket(Kind.FILES, size)
        if wait > 0:
            break
        limiter.completed(ticket)
        meter.add(now, size)
        sent += size
    return sent


@pytest.mark.parametrize("skews", [(0.0, 0.0, 0.0), (0.0, 0.15, -0.15)])
def test_workers_whose_demand_moves_never_overrun_the_account_together(skews):
    """Three workers on one pro account: bursts move from one to another, a worker leaves and
    another joins, and wall clocks differ by up to 0.3 s. In no sliding second do they send more
    than the plan allows, and the busy ones use most of it. Requests are cut as the dispatcher
    cuts them (never above the worker's share of a second; the rest of a second filled)."""
    clock = MockClock(wall=1_800_000_000.3)
    board = Board()
    workers = {m: keeper_for(clock, board, m, skew=s) for m, s in zip("abc", skews, strict=True)}
    meter = Meter()
    backlog = dict.fromkeys("abcd", 0)
    # (from second, member, URLs added to its backlog)
    script = [(1, "a", 20_000), (9, "b", 9_000), (14, "c", 4_000), (16, "c", 4_000)]
    sent_while_busy, busy_time = 0, 0.0
    step = 0.01
    for tick in range(int(40 / step)):
        now = tick * step
        for at, member, n in script:
            if abs(now - at) < step / 2:
                backlog[member] += n
        if abs(now - 20) < step / 2:  # a leaves cleanly, d joins with a backlog of its own
            workers["a"][2].close(0)
            del workers["a"]
            backlog["a"] = 0
            workers["d"] = keeper_for(clock, board, "d", skew=0.05)
            backlog["d"] += 8_000
        busy = any(backlog[m] for m in workers)
        for member, (keeper, accounts, _) in sorted(workers.items()):
            keeper.update(urls(backlog[member]), 1, 3)
            sent = spend(accounts.limiters["main"], backlog[member], meter, clock.monotonic())
            backlog[member] -= sent
            sent_while_busy += sent
        if busy:
            busy_time += step
        clock.advance(step)
    assert not any(backlog.values())
    assert meter.worst <= 1500
    # Each of the seven share changes here costs about half a second of budget: the worker
    # whose share fell waits until its last second at the old share has left the window, and
    # the gain is held for a window.
    rate = sent_while_busy / busy_time
    assert rate >= 0.8 * 1500 * URL_SAFETY, f"{rate:.0f} URL/s while busy"


def test_a_burst_beside_idle_members_whose_loops_look_late_gets_the_budget_at_one_boundary():
    """Idle loops look at a boundary and then seldom (here 0.7 s later, past the next cutoff),
    and give back what the split spread to them only then. The next split reads that from their
    newest report, so a burst that began before the cutoff takes all but the floors at the next
    boundary, not one later (three replicas of one hot partition lost a second of budget to
    this, at times two)."""
    clock = MockClock(wall=1_800_000_000.0)
    board = Board()
    hot, _, _ = keeper_for(clock, board, "hot")
    idle = [keeper_for(clock, board, m)[0] for m in ("b", "c")]
    step, backlog, shares = 0.05, 0, {}
    for tick in range(int(8 / step)):
        now = tick * step
        if tick == int(5.1 / step):
            backlog = 50_000  # after the boundary at 5 s, before the cutoff of the one at 6 s
        hot.update(urls(backlog), 1, 6)
        if tick % int(1 / step) in (0, int(0.7 / step)):
            for keeper in idle:
                keeper.update(urls(0), 1, 6)
        shares[round(now, 2)] = hot.shares()["main"].urls
        clock.advance(step)
    assert shares[5.5] < 0.34  # the split at 5 s did not know of the burst
    assert shares[6.0] == pytest.approx(0.99)


def test_a_worker_that_hears_nobody_takes_the_account_without_waiting_for_a_boundary():
    clock = MockClock(wall=1_800_000_000.05)  # just after a boundary: the next is 0.95 s away
    keeper, _, _ = keeper_for(clock, Board(), "a")
    keeper.update(urls(5000), 1, 1)
    clock.advance(CUTOFF)
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == 1.0
    assert math.floor(clock.time()) == 1_800_000_000  # still the same second


def test_workers_starting_together_wait_for_the_split():
    clock = MockClock(wall=1_800_000_000.05)
    board = Board()
    a, _, _ = keeper_for(clock, board, "a")
    b, _, _ = keeper_for(clock, board, "b")
    for _ in range(3):
        a.update(urls(5000), 1, 2)
        b.update(urls(5000), 1, 2)
        clock.advance(0.2)
    assert a.shares()["main"].urls == b.shares()["main"].urls == JOINING_SHARE


def test_a_worker_reports_from_the_start_and_alone_sends_urls_at_once():
    # The first report goes out when the keeper is made, not at the loop's first look, so a
    # lone worker takes the account CUTOFF after it; nobody reported for seconds, so nobody's
    # requests are in the URL window either: the window's start-up spend is dropped.
    clock = MockClock(wall=1_800_000_000.05)
    keeper, accounts, exchange = keeper_for(clock, Board(), "a")
    assert exchange.first_sent == clock.time()
    limiter = accounts.limiters["main"]
    clock.advance(CUTOFF)
    assert limiter.ready_in(Kind.FILES, 100) > 0.5  # the window started full
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == 1.0
    assert limiter.reserve(Kind.FILES, 1000) == 0  # the plan's whole second, at once
    assert limiter.reserve(Kind.FILES, 500) == 0
    assert limiter.ready_in(Kind.FILES, 1) > 0.9  # and no more


def test_a_worker_that_has_not_read_the_exchange_yet_is_not_alone():
    clock = MockClock(wall=1_800_000_000.05)
    keeper, _, exchange = keeper_for(clock, Board(), "a")
    exchange.caught_up = False  # reports written before it started may be unread
    clock.advance(CUTOFF)
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == JOINING_SHARE
    exchange.caught_up = True
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == 1.0


def test_a_worker_that_read_its_first_report_back_needs_no_delivery_bound():
    # Every report before its own is read: one that heard nobody is alone at once; one that
    # heard another (whose clock runs ahead, so its report seems to come from the future) is not.
    clock = MockClock(wall=1_800_000_000.05)
    keeper, _, exchange = keeper_for(clock, Board(), "a")
    clock.advance(0.05)
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == JOINING_SHARE  # not read back yet, CUTOFF not over
    exchange.read_back = True
    keeper.update(urls(5000), 1, 1)
    assert keeper.shares()["main"].urls == 1.0

    board = Board()
    keeper_for(clock, board, "b", skew=0.3)
    c, _, late = keeper_for(clock, board, "c")
    late.read_back = True
    clock.advance(0.05)
    c.update(urls(5000), 1, 2)
    assert c.shares()["main"].urls == JOINING_SHARE


def test_a_lone_worker_keeps_slack_as_soon_as_it_hears_another():
    # Alone it spends the plan's whole URL figure; the moment another worker's report arrives
    # it keeps 2 % spare, before any split moves the shares.
    clock = MockClock(wall=1_800_000_000.05)
    board = Board()
    a, accounts, _ = keeper_for(clock, board, "a")
    clock.advance(CUTOFF)
    a.update(urls(5000), 1, 1)
    limiter = accounts.limiters["main"]
    assert limiter.reserve(Kind.FILES, 1000) == 0
    assert limiter.reserve(Kind.FILES, 500) == 0
    clock.advance(1.01)
    keeper_for(clock, board, "b")  # its first report goes out as it starts
    clock.advance(0.2)
    a.update(urls(5000), 1, 2)
    assert a.shares()["main"].urls == 1.0  # the split has not moved yet
    assert limiter.reserve(Kind.FILES, 1000) == 0
    assert limiter.reserve(Kind.FILES, 471) > 0
    assert limiter.reserve(Kind.FILES, 470) == 0


def test_a_worker_joining_one_that_was_alone_spends_nothing_for_a_window():
    # The worker alone may have spent the plan's whole second just before it heard this one.
    clock = MockClock(wall=1_800_000_000.05)
    board = Board()
    a, _, _ = keeper_for(clock, board, "a")
    clock.advance(CUTOFF)
    a.update(urls(5000), 1, 1)
    clock.advance(2.0)
    a.update(urls(5000), 1, 1)
    b, accounts, _ = keeper_for(clock, board, "b")
    clock.advance(CUTOFF + 0.01)
    b.update(urls(5000), 1, 2)
    assert b.shares()["main"].urls == JOINING_SHARE
    clock.advance(0.9)
    a.update(urls(5000), 1, 2)
    b.update(urls(5000), 1, 2)
    # Started 1.3 s ago, so its start-up window is over; the hold from hearing the other is not.
    assert accounts.limiters["main"].ready_in(Kind.FILES, 1) > 0
    clock.advance(0.2)
    assert accounts.limiters["main"].ready_in(Kind.FILES, 1) == 0


def test_a_worker_that_hears_another_keeps_the_window_it_started_with():
    clock = MockClock(wall=1_800_000_000.05)
    board = Board()
    keeper_for(clock, board, "b")
    clock.advance(0.1)
    a, accounts, _ = keeper_for(clock, board, "a")
    clock.advance(CUTOFF)
    a.update(urls(5000), 1, 2)
    assert a.shares()["main"].urls == JOINING_SHARE
    assert accounts.limiters["main"].ready_in(Kind.FILES, 1) > 0.4
