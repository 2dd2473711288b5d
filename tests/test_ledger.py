"""The purge ledger: what an accepted purge already covers, in flight or done, and forgetting."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.pending.bucket import Pending
from worker.pending.cover import covers, prefixes_covering
from worker.pending.ledger import COVERED, LedgerSettings, PurgeLedger
from worker.targets import Kind, Mode, Target

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
    sent_from_pending(stage, ledger, Kind.FILES, at=SENT + 100)  # a, as the dispatcher sends it
    assert stage.add("r5", plan_of(shared, SENT - 6)) == 0
    assert stage.add("r6", plan_of(shared, SENT + 50)) == 1  # a's later send covers it, b's not


def sent_from_pending(stage, ledger, kind, at):
    """What the dispatcher does: take a kind's pending items, send them, settle them accepted."""
    batch = stage.coalescer.take(Z, P, kind, 1000)
    ledger.sending(Z, P, batch.items, at)
    ledger.settled(Z, P, batch.items, at, {item.target for item in batch.items})


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


POOL = [
    Target.url("https://example.com/a/1"),
    Target.url("https://example.com/a/2"),
    Target.url("https://example.com/b/1"),
    Target.tag("t1"),
    Target.tag("t2"),
    Target.prefix("example.com/a"),
    Target.host("example.com"),
]
# Lists records share, as the planning process hands them out: the same object every time.
SHARED = [routed(*(POOL[i] for i in ids)) for ids in [(0,), (0, 3), (1, 2, 4), (0, 1), (3, 4)]]
SHARED += [routed(POOL[5], POOL[0]), routed(POOL[6]), routed(POOL[2], POOL[3])]


def random_ops(seed: int, count: int = 400) -> list[tuple]:
    """Records with event times around the clock (the ledger's margin is 5 s, so a request
    sent a few steps before covers some and not others), sends of a kind or of everything,
    requests ending (some items refused), receipts learned, partitions revoked."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:
            ops.append(("add", rng.randrange(len(SHARED)), rng.randint(-12, 8)))
        elif roll < 0.75:
            ops.append(("send", rng.choice([Kind.FILES, Kind.TAGS, None]), rng.randint(1, 3)))
        elif roll < 0.92:
            ops.append(("settle", rng.randint(0, 1), 0))
        elif roll < 0.97:
            ops.append(("learn", rng.randrange(len(POOL)), rng.randint(-10, 30)))
        else:
            ops.append(("discard", rng.randrange(4), 0))
    return ops


@pytest.mark.parametrize("seed", range(40))
def test_records_riding_on_pending_items_get_what_the_ledger_would_say(seed):
    """A record whose list of targets an earlier record sent to the pending set rides on the
    same items without asking the ledger target by target: every answer, every item's owners
    and every send must be what asking the ledger each time gives."""
    ops = random_ops(seed)
    stages = [pending_stage(), pending_stage()]
    stages[1][0]._rides.take = lambda *args: None  # asks the ledger target by target, always
    learned: list[list] = [[], []]
    flying: list[list] = [[], []]  # requests sent and not yet ended, oldest first
    ended: list = []
    for (stage, _), box in zip(stages, learned, strict=True):
        stage._learned = lambda box=box: [box.pop() for _ in range(len(box))]
    now = SENT
    for n, (op, a, b) in enumerate(ops):
        seen = []
        for (stage, ledger), box, flights in zip(stages, learned, flying, strict=True):
            if op == "add":
                stage.learn()
                seen.append(stage.add((n, a), plan_of(SHARED[a], now + b)))
            elif op == "send":
                for kind in [a] if a else list(Kind):  # None: every kind, as a drain sends
                    if stage.coalescer.count(Z, P, kind):
                        items = stage.coalescer.take(Z, P, kind, b if a else 100).items
                        ledger.sending(Z, P, items, now)
                        flights.append((items, now))
            elif op == "settle" and flights:
                items, sent_at = flights.pop(0)
                accepted = {i.target for i in items[a:]}  # the first one failed, or none did
                ledger.settled(Z, P, items, sent_at, accepted)
                seen.append(owners(items))
                ended.append(items)  # receipts may still hold them
            elif op == "learn":
                target = POOL[a]
                box.append(((Z, P, target.kind, target.value, target.headers), now + b))
            elif op == "discard":
                seen.append(stage.discard(lambda owner, a=a: owner[0] % 4 == a))
        assert not seen or seen[0] == seen[1]
        if op != "add":
            now += 1.0  # records are read in steps; the clock moves between them
    left = [
        owners(i for b in stage.coalescer.flush_all() for i in b.items)
        + [owners(items) for items, _ in flights]
        for (stage, _), flights in zip(stages, flying, strict=True)
    ]
    assert left[0] == left[1]


def owners(items):
    return sorted((str(item.target), sorted(map(str, item.owners))) for item in items)


def test_a_record_does_not_ride_on_an_item_in_flight_or_taken_over():
    """Records with one list of targets ride on the items the first one went to, while those
    wait in the pending set. Once one is sent, or a target covering it takes it over, the next
    record is judged by the ledger again: an item in flight covers only what came before it."""
    stage, ledger = pending_stage()
    a = Target.url("https://example.com/a/1")
    shared = routed(a, Target.tag("t"))
    assert stage.add("r1", plan_of(shared, SENT)) == 2
    assert stage.add("r2", plan_of(shared, SENT)) == 2  # rides
    items = stage.coalescer.take(Z, P, Kind.FILES, 10).items
    assert [sorted(i.owners) for i in items] == [["r1", "r2"]]
    ledger.sending(Z, P, items, SENT - 60)  # sent before r3's event: it cannot cover r3
    assert stage.add("r3", plan_of(shared, SENT)) == 2
    assert items[0].owners == ["r1", "r2"]  # r3's URL waits for a request of its own
    assert stage.coalescer.count(Z, P, Kind.FILES) == 1

    other = routed(Target.url("https://example.com/a/2"), Target.tag("u"))
    assert stage.add("r4", plan_of(other, SENT)) == 2
    stage.add("r5", plan_of(routed(Target.prefix("example.com/a")), SENT))  # takes a/2 over
    assert stage.add("r6", plan_of(other, SENT)) == 2
    (prefix,) = stage.coalescer.take(Z, P, Kind.PREFIXES, 10).items
    assert sorted(prefix.owners) == ["r3", "r4", "r5", "r6"]  # r6 joined the prefix, not a/2


def test_a_record_rides_on_a_request_in_flight_only_until_it_ends():
    stage, ledger = pending_stage()
    shared = routed(Target.url("https://example.com/a/1"))
    assert stage.add("r1", plan_of(shared, SENT)) == 1
    (item,) = stage.coalescer.take(Z, P, Kind.FILES, 10).items
    ledger.sending(Z, P, [item], SENT + 1)
    assert stage.add("r2", plan_of(shared, SENT - 10)) == 1  # joins the request in flight
    assert stage.add("r3", plan_of(shared, SENT - 9)) == 1  # rides on it
    assert item.owners == ["r1", "r2", "r3"]
    ledger.settled(Z, P, [item], SENT + 1, {item.target})
    assert stage.add("r4", plan_of(shared, SENT - 9)) == 0  # the ledger's entry covers it
    assert stage.add("r5", plan_of(shared, SENT - 3)) == 1  # too young for it: pending again
    assert item.owners == ["r1", "r2", "r3"]
    assert stage.coalescer.count(Z, P, Kind.FILES) == 1


def test_a_second_request_for_a_target_ends_the_riding_on_it():
    """Records too young for a request in flight send their target again; when the first
    request ends, its entry covers older records, which then finish at once."""
    stage, ledger = pending_stage()
    shared = routed(Target.url("https://example.com/a/1"))
    stage.add("r1", plan_of(shared, SENT))
    first = stage.coalescer.take(Z, P, Kind.FILES, 10).items
    ledger.sending(Z, P, first, SENT + 1)
    assert stage.add("r2", plan_of(routed(*(r.target for r in shared)), SENT + 10)) == 1
    second = stage.coalescer.take(Z, P, Kind.FILES, 10).items
    ledger.sending(Z, P, second, SENT + 20)  # the first is still in flight
    assert stage.add("r3", plan_of(shared, SENT - 10)) == 1  # joins the second
    ledger.settled(Z, P, first, SENT + 1, {first[0].target})
    assert stage.add("r4", plan_of(shared, SENT - 8)) == 0  # the first one's entry covers it
    assert second[0].owners == ["r2", "r3"]


def test_a_record_does_not_ride_on_a_host_request_its_url_was_sent_after():
    stage, ledger = pending_stage()
    url = Target.url("https://example.com/a/1")
    shared = routed(url)
    stage.add("r1", plan_of(routed(Target.host("example.com")), SENT))
    host = stage.coalescer.take(Z, P, Kind.HOSTS, 10).items
    ledger.sending(Z, P, host, SENT + 1)
    assert stage.add("r2", plan_of(shared, SENT - 10)) == 1  # joins the host's request
    assert stage.add("r3", plan_of(routed(url), SENT + 10)) == 1  # too young for it
    own = stage.coalescer.take(Z, P, Kind.FILES, 10).items
    ledger.sending(Z, P, own, SENT + 20)
    assert stage.add("r4", plan_of(shared, SENT - 8)) == 1
    assert own[0].owners == ["r3", "r4"]  # the ledger's answer: the URL's own request
