"""Within an epoch: idle members give their share back when another wants budget, and the one
that wants it takes it back before the next boundary. Three replicas of one hot partition lost
about a second of budget per burst waiting for boundaries (0.88 to 0.90 of pro's URL rate)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_budget import Meter, Wire, keeper_for, spend, urls
from worker.clock import MockClock
from worker.sending.split import (
    CUTOFF,
    EPOCH,
    FLOOR,
    REPORT_INTERVAL,
    Board,
    Demand,
    Report,
    allocate,
    news,
    taken_back,
)

T0 = 1_800_000_000.0


def given_back(at, epoch=5, allowed=FLOOR, urls=0.0, left=False):
    return Report(at, Demand(urls, 0.0), epoch, allowed, left)


# -- the arithmetic -------------------------------------------------------------------------------


def test_what_everyone_else_gave_back_is_taken_up_to_what_the_split_would_give():
    reports = {"b": given_back(5.1), "c": given_back(5.2), "me": given_back(5.0, urls=3.0)}
    share = taken_back("me", 3.0, reports, 5, 5.3)
    assert share == pytest.approx(allocate({"b": 0.0, "c": 0.0, "me": 3.0})["me"])
    assert share == pytest.approx(1 - 2 * FLOOR)
    # A small want takes what the split would give it, not everything.
    small = taken_back("me", 0.2, reports, 5, 5.3)
    assert small == pytest.approx(allocate({"b": 0.0, "c": 0.0, "me": 0.2})["me"])
    assert small < 0.9


@pytest.mark.parametrize(
    "report",
    [
        given_back(5.1, urls=0.01),  # still wants budget
        given_back(5.1, epoch=4),  # said so last epoch: may have risen at this boundary
        given_back(5.1, allowed=0.333),  # holds more than a floor
        given_back(4.5, left=True),  # stopped half a second ago: its requests still count
        given_back(5.1, epoch=None),  # shares by partitions
    ],
)
def test_nothing_is_taken_while_any_other_member_has_not_given_back(report):
    reports = {"b": given_back(5.1), "c": report}
    assert taken_back("me", 3.0, reports, 5, 5.3) == 0.0


def test_a_member_that_stopped_two_epochs_ago_no_longer_counts():
    reports = {"b": given_back(5.1), "c": given_back(3.2, left=True)}
    assert taken_back("me", 3.0, reports, 5, 5.3) == pytest.approx(1 - FLOOR)


def test_alone_there_is_nothing_to_take_back():
    assert taken_back("me", 3.0, {"me": given_back(5.0, urls=3.0)}, 5, 5.3) == 0.0


# -- the keepers ----------------------------------------------------------------------------------


def run(keepers, backlog, seconds, *, step=0.01, on_tick=None, clock):
    """Every keeper looks every step (the loops wake for reports); returns the hot one's URL
    share by time since the start, rounded to the step."""
    shares = {}
    for tick in range(int(seconds / step)):
        now = round(tick * step, 2)
        if on_tick:
            on_tick(now)
        for member, (keeper, _, _) in keepers.items():
            keeper.update(urls(backlog.get(member, 0)), 1, 6)
        shares[now] = keepers["hot"][0].shares()["main"].urls
        clock.advance(step)
    return shares


def three(clock):
    board = Board()
    return {m: keeper_for(clock, board, m) for m in ("hot", "b", "c")}


def test_idle_members_keep_their_even_share_until_someone_wants_budget():
    clock = MockClock(wall=T0)
    keepers = three(clock)
    run(keepers, {}, 4.5, clock=clock)
    assert {m: k.shares()["main"].urls for m, (k, _, _) in keepers.items()} == {
        "hot": 0.333,
        "b": 0.333,
        "c": 0.333,
    }


def burst_on_hot(burst_at, seconds):
    """Three idle members until ``burst_at``, then a burst on "hot"; the keepers, and hot's URL
    share by time."""
    clock = MockClock(wall=T0)
    keepers = three(clock)
    backlog = {}
    shares = run(
        keepers,
        backlog,
        seconds,
        clock=clock,
        on_tick=lambda now: backlog.update(hot=50_000) if now == burst_at else None,
    )
    return keepers, shares


@pytest.mark.parametrize("burst_at", [4.2, 4.5])
def test_a_burst_takes_what_the_idle_give_back_before_the_boundary(burst_at):
    """At once its even share; within a report or two (its own, then theirs) everything but the
    floors, in the same epoch while the boundary is more than ``CUTOFF`` away."""
    keepers, shares = burst_on_hot(burst_at, 5.0)
    assert shares[burst_at] == 0.333  # spendable at once: the idle kept it
    assert shares[round(burst_at + REPORT_INTERVAL + 0.01, 2)] == pytest.approx(1 - 2 * FLOOR)
    assert [k.shares()["main"].urls for m, (k, _, _) in keepers.items() if m != "hot"] == [
        FLOOR,
        FLOOR,
    ]


def test_a_burst_in_the_last_cutoff_of_an_epoch_takes_it_just_after_the_boundary():
    _, shares = burst_on_hot(5 - CUTOFF / 2, 5.2)
    assert shares[4.95] == 0.333  # the next split must read what is taken: not taken yet
    assert shares[5.05] == pytest.approx(1 - 2 * FLOOR)  # its snapshot knew nothing of it


def test_a_member_that_gave_back_does_not_take_back_in_the_same_epoch():
    """Once it said it gave back, a member stays at its floor until the boundary even when
    every other member gives back too: another may be counting on that report to take it all."""
    clock = MockClock(wall=T0 + 3.0)
    board = Board()
    hot, _, exchange = keeper_for(clock, board, "hot")
    key = exchange.board_key

    def others(wants):
        epoch = math.floor(clock.time())
        b = Report(clock.time(), Demand(2.0 if wants else 0.0, 0.0), epoch, 0.5 if wants else FLOOR)
        board.record(key, "b", b)
        board.record(key, "c", given_back(clock.time(), epoch))

    while clock.time() < T0 + 5.05:  # b wants budget: at the boundary, the idle hot gives back
        others(wants=True)
        hot.update(urls(0), 1, 6)
        clock.advance(0.01)
    assert hot.shares()["main"].urls == FLOOR
    while clock.time() < T0 + 5.55:  # now b and c give back, and hot has a burst
        others(wants=False)
        hot.update(urls(50_000), 1, 6)
        clock.advance(0.01)
    assert hot.shares()["main"].urls == FLOOR
    clock.advance(0.5)
    others(wants=False)
    hot.update(urls(50_000), 1, 6)  # the next boundary: its demand was in the snapshot
    assert hot.shares()["main"].urls == pytest.approx(1 - 2 * FLOOR)


@settings(max_examples=40, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(
            st.floats(0.0, 6.0).map(lambda t: round(t, 2)),
            st.sampled_from(["hot", "b", "c"]),
            st.integers(200, 6_000),
        ),
        min_size=1,
        max_size=5,
    ),
    skews=st.tuples(*[st.floats(-0.1, 0.1)] * 3),
    looks=st.tuples(*[st.sampled_from([0.01, 0.13, 0.5])] * 3),
    delay=st.sampled_from([0.0, 0.03, 0.1, 0.25]),
)
def test_giving_and_taking_back_never_overrun_the_account(bursts, skews, looks, delay):
    """Bursts of any size on any member at any time, wall clocks up to 0.2 s apart, reports
    delivered up to a quarter of a second late, idle loops that look every step, every report,
    or twice a second: in no sliding second do the three send more than pro's 1,500 URLs, and
    every burst is sent."""
    clock = MockClock(wall=T0 + 3.0)
    board, wire = Board(), Wire(clock, delay)
    members = ("hot", "b", "c")
    keepers = {
        m: keeper_for(clock, board, m, skew=s, wire=wire)
        for m, s in zip(members, skews, strict=True)
    }
    look = dict(zip(members, looks, strict=True))
    skew = dict(zip(members, skews, strict=True))
    backlog = dict.fromkeys(members, 0)
    last_look = dict.fromkeys(members, -math.inf)
    meter = Meter()
    step = 0.01
    for tick in range(int(24 / step)):
        now = round(tick * step, 2)
        wire.deliver()
        for at, member, n in bursts:
            if at == now:
                backlog[member] += n
        for member, (keeper, accounts, _) in keepers.items():
            wall = clock.time() + skew[member]
            boundary = math.floor(wall / EPOCH) > math.floor((wall - step) / EPOCH)
            if backlog[member] or boundary or now - last_look[member] >= look[member] - 1e-9:
                last_look[member] = now
                keeper.update(urls(backlog[member]), 1, 6)
                limiter = accounts.limiters["main"]
                backlog[member] -= spend(limiter, backlog[member], meter, clock.monotonic())
        clock.advance(step)
    assert meter.worst <= 1500
    assert not any(backlog.values())


def test_a_report_goes_out_at_once_when_it_says_what_others_act_on():
    old = Report(1.0, Demand(2.0, 0.1), 5, 0.333)
    assert news(None, old)
    assert news(old, old._replace(allowed=0.005))  # gave back, or took back
    assert news(old, old._replace(epoch=6))
    assert news(old, old._replace(left=True))
    assert news(old, old._replace(demand=Demand(0.0, 0.1)))  # no longer wants budget
    assert news(old._replace(demand=Demand(0.0, 0.1)), old)  # wants budget
    assert not news(old, old._replace(at=2.0, demand=Demand(3.5, 0.4)))  # wants more: on time


def test_an_idle_member_holding_its_even_share_looks_again_at_each_report():
    """It must give its share back soon after another member wants it, so its loop wakes for
    that; at the floor, or sharing by partitions, it wakes for boundaries only."""
    clock = MockClock(wall=T0)
    keepers = three(clock)
    run(keepers, {}, 4.55, clock=clock)
    keeper, _, exchange = keepers["b"]
    assert keeper.shares()["main"].urls == 0.333
    assert keeper.next_change() <= clock.time() + REPORT_INTERVAL / 2
    exchange.up = False
    keeper.update(urls(0), 2, 6)
    assert keeper.mode == "partitions"
    assert keeper.next_change() == T0 + 5.0
