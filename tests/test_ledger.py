"""The purge ledger: what an accepted purge already covers, in flight or done, and forgetting."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.pending.bucket import Pending
from worker.pending.cover import covers, prefixes_covering
from worker.pending.ledger import COVERED, LedgerSettings, PurgeLedger
from worker.targets import Mode, Target

Z = "z" * 32
P = Mode.PURGE
SENT = 10_000.0


def purged(ledger: PurgeLedger, *targets: Target, at: float = SENT, zone: str = Z) -> None:
    items = [Pending(t, ["r"]) for t in targets]
    ledger.sending(zone, P, items, at)
    ledger.settled(zone, P, items, at, set(targets))


def test_a_target_is_covered_only_for_events_older_than_the_send_minus_the_margin():
    ledger = PurgeLedger(LedgerSettings(margin_seconds=5))
    url = Target.url("https://a.com/x")
    purged(ledger, url)
    assert ledger.check(Z, P, url, SENT - 60) is COVERED
    assert ledger.check(Z, P, url, SENT - 5.5) is COVERED
    assert ledger.check(Z, P, url, SENT - 5) is None  # inside the margin: purge again
    assert ledger.check(Z, P, url, SENT + 1) is None  # a newer change: purge again
    assert ledger.check(Z, P, url, None) is None  # no event time: always purge


def test_other_zone_mode_and_cache_key_are_not_covered():
    ledger = PurgeLedger(LedgerSettings())
    url = Target.url("https://a.com/x")
    purged(ledger, url)
    old = SENT - 60
    assert ledger.check("y" * 32, P, url, old) is None
    assert ledger.check(Z, Mode.INVALIDATE, url, old) is None
    assert (
        ledger.check(Z, P, Target.url("https://a.com/x", {"CF-Device-Type": "mobile"}), old) is None
    )
    assert ledger.check(Z, P, Target.url("https://a.com/x?y=1"), old) is None


def test_covering_purges_count():
    ledger = PurgeLedger(LedgerSettings())
    old = SENT - 60
    purged(ledger, Target.prefix("a.com/blog"), Target.host("b.com"))
    assert ledger.check(Z, P, Target.url("https://a.com/blog/1?p=2"), old) is COVERED
    assert ledger.check(Z, P, Target.url("https://a.com/blog?p=2"), old) is COVERED
    assert ledger.check(Z, P, Target.prefix("a.com/blog/2024/"), old) is COVERED
    assert ledger.check(Z, P, Target.url("https://a.com/blogroll"), old) is None
    assert ledger.check(Z, P, Target.url("https://a.com/"), old) is None
    with_headers = Target.url("https://b.com/x", {"CF-Device-Type": "mobile"})
    assert ledger.check(Z, P, with_headers, old) is COVERED
    assert ledger.check(Z, P, Target.prefix("b.com/y/"), old) is COVERED
    assert ledger.check(Z, P, Target.tag("t1"), old) is None
    purged(ledger, Target.everything("zone"))
    assert ledger.check(Z, P, Target.tag("t1"), old) is COVERED
    assert ledger.check(Z, P, Target.host("c.com"), old) is COVERED


def test_an_in_flight_purge_is_joined_and_its_outcome_decides():
    ledger = PurgeLedger(LedgerSettings())
    url = Target.url("https://a.com/x")
    item = Pending(url, ["r1"])
    ledger.sending(Z, P, [item], SENT)
    assert ledger.check(Z, P, url, SENT - 60) is item  # join it, do not send again
    assert ledger.check(Z, P, url, SENT) is None  # newer than the send: needs its own purge
    ledger.settled(Z, P, [item], SENT, accepted=set())  # it failed
    assert ledger.check(Z, P, url, SENT - 60) is None
    ledger.sending(Z, P, [item], SENT)
    ledger.settled(Z, P, [item], SENT, accepted={url})
    assert ledger.check(Z, P, url, SENT - 60) is COVERED


def test_a_newer_send_of_the_same_item_is_not_cleared_by_the_older_one_ending():
    ledger = PurgeLedger(LedgerSettings())
    url = Target.url("https://a.com/x")
    first, second = Pending(url, ["r1"]), Pending(url, ["r2"])
    ledger.sending(Z, P, [first], SENT)
    ledger.sending(Z, P, [second], SENT + 30)
    ledger.settled(Z, P, [first], SENT, accepted=set())
    assert ledger.check(Z, P, url, SENT + 10) is second


def test_eviction_and_restart_fall_back_to_purging():
    ledger = PurgeLedger(LedgerSettings(max_entries=2))
    a, b, c = (Target.url(f"https://a.com/{n}") for n in "abc")
    purged(ledger, a)
    purged(ledger, b)
    assert ledger.check(Z, P, a, SENT - 60) is COVERED  # touching a makes b the oldest
    purged(ledger, c)
    assert len(ledger) == 2
    assert ledger.check(Z, P, b, SENT - 60) is None
    assert ledger.check(Z, P, a, SENT - 60) is COVERED
    assert PurgeLedger(LedgerSettings()).check(Z, P, a, SENT - 60) is None  # a restart


def test_a_later_send_moves_the_time_forward_never_back():
    ledger = PurgeLedger(LedgerSettings())
    url = Target.url("https://a.com/x")
    purged(ledger, url, at=SENT)
    purged(ledger, url, at=SENT - 100)
    assert ledger.check(Z, P, url, SENT - 20) is COVERED


def test_switched_off_it_never_covers():
    ledger = PurgeLedger(LedgerSettings(enabled=False))
    url = Target.url("https://a.com/x")
    purged(ledger, url)
    assert ledger.check(Z, P, url, SENT - 60) is None
    assert len(ledger) == 0


SEG = st.sampled_from(["a", "b", "ab", ""])


@given(
    st.lists(SEG, min_size=1, max_size=4),
    st.lists(SEG, min_size=1, max_size=4),
    st.sampled_from(["", "?q=1"]),
)
def test_prefix_enumeration_agrees_with_the_coalescers_covers(path_segs, prefix_segs, query):
    path = "h.com/" + "/".join(path_segs) + query
    prefix = "h.com/" + "/".join(prefix_segs)
    enumerated = set(prefixes_covering(path)) | {path}
    assert covers(prefix, path) == (prefix in enumerated)


# -- records that share a plan's list of targets ---------------------------------------------------


def pending_stage(max_entries: int = 100_000):
    from worker.clock import MockClock
    from worker.pending.coalescer import Coalescer
    from worker.pending.stage import PendingTargets

    ledger = PurgeLedger(LedgerSettings(margin_seconds=5.0, max_entries=max_entries))
    return PendingTargets(Coalescer(0.5, lambda zone, kind: 30, MockClock()), ledger), ledger


def plan_of(targets, event_time):
    from worker.planning.planner import Planned

    return Planned("e", event_time, event_time, False, targets, [], [], [])


def routed(*targets):
    from worker.planning.planner import Routed
    from worker.planning.routing import Zone

    zone = Zone("z", Z, "main", ())
    return [Routed(zone, P, t) for t in targets]


def test_records_sharing_a_plan_get_the_ledgers_verdict_target_by_target():
    # The planning process gives records with the same plan one list; the stage remembers when
    # its targets were purged. Each record must still get exactly the ledger's own verdict.
    stage, ledger = pending_stage()
    a, b = Target.url("https://example.com/a"), Target.tag("t")
    shared = routed(a, b)
    purged(ledger, a, b, at=SENT)
    assert stage.add("r1", plan_of(shared, SENT - 10)) == 0
    assert stage.add("r2", plan_of(shared, SENT - 10)) == 0  # now remembered
    assert stage.add("r3", plan_of(shared, SENT - 6)) == 0
    assert stage.add("r4", plan_of(shared, SENT - 4)) == 2  # within the margin: both again
    purged(ledger, a, at=SENT + 100)  # a later send only widens what is covered
    assert stage.add("r5", plan_of(shared, SENT - 6)) == 0
    assert stage.add("r6", plan_of(shared, SENT + 50)) == 1  # a's later send covers it, b's not


def test_a_forgotten_entry_ends_what_the_stage_remembered():
    stage, ledger = pending_stage(max_entries=2)
    a, b, c = (Target.url(f"https://example.com/{n}") for n in "abc")
    shared = routed(a, b)
    purged(ledger, a, b, at=SENT)
    assert stage.add("r1", plan_of(shared, SENT - 10)) == 0
    assert stage.add("r2", plan_of(shared, SENT - 10)) == 0
    purged(ledger, c, at=SENT)  # the ledger holds two entries: the oldest, a, is forgotten
    assert ledger.check(Z, P, a, SENT - 10) is None
    assert stage.add("r3", plan_of(shared, SENT - 10)) == 1  # a is sent again


def test_a_covered_shared_plan_is_judged_without_looking_up_each_target(monkeypatch):
    stage, ledger = pending_stage()
    shared = routed(*(Target.url(f"https://example.com/{n}") for n in range(3)))
    purged(ledger, *(r.target for r in shared), at=SENT)
    stage.add("r1", plan_of(shared, SENT - 10))
    stage.add("r2", plan_of(shared, SENT - 10))

    def no_lookups(*args):
        raise AssertionError("looked up")

    monkeypatch.setattr(ledger, "check", no_lookups)
    assert stage.add("r3", plan_of(shared, SENT - 10)) == 0
    with pytest.raises(AssertionError, match="looked up"):  # a copy of the list is not shared
        stage.add("r4", plan_of(list(shared), SENT - 10))


def test_a_plan_covered_by_a_host_purge_is_not_asked_about_again(monkeypatch):
    # Its targets have no send of their own to remember: every record is judged target by
    # target, and the stage does not look for their sends again with each one.
    stage, ledger = pending_stage()
    shared = routed(*(Target.url(f"https://example.com/{n}") for n in range(3)))
    purged(ledger, Target.host("example.com"), at=SENT)
    asked = []
    real = ledger.purged_since
    monkeypatch.setattr(ledger, "purged_since", lambda targets: asked.append(1) or real(targets))
    for n in range(5):
        assert stage.add(f"r{n}", plan_of(shared, SENT - 10)) == 0
    assert len(asked) == 1


def test_targets_count_as_repeating_until_steps_have_measured_them():
    # A young backlog's first full requests wait for the measure: sent before the first repeat
    # was read, they all went again.
    stage, _ = pending_stage()

    def step(name, paths):
        stage.begin()
        for n, path in enumerate(paths):
            stage.add(
                f"{name}-{n}", plan_of(routed(Target.url(f"https://example.com/{path}")), SENT)
            )
        stage.flush_metrics()

    assert stage.repeating
    for s in range(4):
        step(f"s{s}", [f"{s}/{n}" for n in range(10)])
    assert not stage.repeating  # four steps of targets met once each
    step("again", [f"3/{n}" for n in range(10)])  # the last step's ten again, still pending
    assert stage.repeating


def test_records_judged_by_their_shared_list_are_counted_like_the_others():
    from worker.observe import metrics

    def counted(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, {"kind": "files", **labels}) or 0.0

    stage, ledger = pending_stage()
    shared = routed(*(Target.url(f"https://example.com/m{n}") for n in range(3)))
    purged(ledger, *(r.target for r in shared), at=SENT)
    before = (
        counted("purge_worker_targets_total"),
        counted("purge_worker_targets_already_purged_total", how="sent"),
    )
    stage.begin()
    assert not stage.covered(plan_of(shared, SENT - 10))  # a list not met before
    assert stage.add("r1", plan_of(shared, SENT - 10)) == 0  # target by target: remembered
    assert all(stage.covered(plan_of(shared, SENT - 10)) for _ in range(6))  # by the list
    assert not stage.covered(plan_of(shared, SENT - 4))  # within the margin: not by the list
    stage.flush_metrics()
    after = (
        counted("purge_worker_targets_total"),
        counted("purge_worker_targets_already_purged_total", how="sent"),
    )
    assert (after[0] - before[0], after[1] - before[1]) == (7 * 3, 7 * 3)


def test_a_record_pended_without_the_shortcut_still_counts_as_the_newest_seen():
    # The loop skips ``covered`` for records it keeps a state of anyway (a failure, warming,
    # debug logs); how young the backlog is must still count them.
    stage, _ = pending_stage()
    assert not stage.young(SENT)
    stage.pend("r1", plan_of(routed(Target.url("https://example.com/n")), SENT))
    assert stage.young(SENT + 1) and not stage.young(SENT + 6)


def test_a_run_of_plans_is_sifted_in_one_pass():
    # What waits for nothing ends here: no rule fired, or every target was purged after the
    # record's margin (judged by the list). The rest is left for ``pend``, in its order.
    from worker.errors import InvalidEvent
    from worker.planning.planner import SKIPPED

    stage, ledger = pending_stage()
    shared = routed(*(Target.url(f"https://example.com/s{n}") for n in range(3)))
    purged(ledger, *(r.target for r in shared), at=SENT)
    assert stage.add("r0", plan_of(shared, SENT - 10)) == 0  # the list is remembered
    plans = [
        SKIPPED,  # outside the run sifted
        plan_of(shared, SENT - 10),
        SKIPPED,
        plan_of(routed(Target.url("https://example.com/new")), SENT - 10),
        plan_of(shared, SENT - 4),  # within the margin of the purge
        plan_of(shared, SENT - 10)._replace(errors=[InvalidEvent("bad")]),
        plan_of(shared, SENT - 20),
    ]
    ages: list[float] = []
    assert stage.sift(plans, 1, 7, SENT + 5, ages) == ([3, 4, 5], 1, 2)
    assert ages == [15.0, 25.0]
    assert stage.young(SENT) and not stage.young(SENT + 2)  # the newest sifted: SENT - 4
