"""The loop's logic on the mock clock: the in-memory source and sink, and the emulator's model
of the API answered in memory (``MemoryApi``). Kafka and HTTP are proven in the integration
tests; here only the loop's public methods are used."""

import json
import threading
import time

import pytest

from tests.conftest import ZONE_A
from tests.helpers import MemoryApi, cloudevent, make_config, purges
from worker import app
from worker.clock import MockClock
from worker.events import Record
from worker.intake.memory import InMemorySource
from worker.outcome.dead_letters import header
from worker.outcome.memory import InMemorySink
from worker.planning.process import PlanningProcess
from worker.sending.accounts import Accounts


def step(loop):
    """One step, then (in real time) until its requests have been answered: the mock clock moves
    only when the loop waits, so a request must not stay out while it races ahead."""
    loop.step()
    deadline = time.monotonic() + 5
    while loop.sending.on_the_wire and time.monotonic() < deadline:
        time.sleep(0.0005)


def run_until_idle(loop, source, max_steps=5000):
    for _ in range(max_steps):
        step(loop)
        if loop.idle and all(source.positions[tp] == len(q) for tp, q in source.queues.items()):
            loop.outcome.commits.commit()
            return
    raise AssertionError("the loop did not go idle")


def build(
    records, remote=False, plan="pro", sink=None, clock=None, receipts=None, learned=None, **over
):
    """A loop over ``records`` on a mock clock, its purges answered by the API model;
    ``receipts`` and ``learned`` as ``app.build_loop`` takes them."""
    clock = clock or MockClock()
    api = MemoryApi(clock, plan)
    config = make_config(MemoryApi.URL, **over)
    source = InMemorySource(records, clock=clock)
    sink = sink or InMemorySink()
    cloudflare = Accounts(
        config.accounts,
        config.zones,
        clock,
        base_url=config.base_url,
        transport=lambda: api.transport,
    )
    process = PlanningProcess(config.planning).start() if remote else None
    loop = app.build_loop(
        config,
        source,
        sink,
        clock,
        cloudflare=cloudflare,
        process=process,
        receipts=receipts,
        learned=learned,
    )
    return loop, source, sink, api


# The loop plans records itself, or has a second process plan them: the outcome is the same.
planning = pytest.mark.parametrize("remote", [False, True], ids=["inline", "process"])


def rec(offset, value, partition=0, headers=()):
    return Record("cms", partition, offset, b"k", value, tuple(headers), 1_800_000_000_000)


def test_events_become_exactly_the_expected_purges():
    records = [
        rec(0, cloudevent("article.published", {"slug": "a", "locales": ["en", "de"], "id": 1})),
        rec(1, cloudevent("article.updated", {"slug": "a", "locales": ["en"], "id": 1})),  # dupes
        rec(2, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": "x.jpg"})),
        rec(3, b'{"type": "unrelated"}'),
    ]
    pipeline, source, sink, api = build(records)
    run_until_idle(pipeline, source)
    assert sorted(api.items("files")) == sorted(
        [
            "https://www.example.com/en/a",
            "https://www.example.com/de/a",
            json.dumps(
                {"url": "https://m.example.com/a", "headers": {"CF-Device-Type": "mobile"}},
                sort_keys=True,
            ),
            json.dumps(
                {"url": "https://m.example.com/a", "headers": {"CF-Device-Type": "tablet"}},
                sort_keys=True,
            ),
            "https://img.example-cdn.net/x.jpg",
        ]
    )
    assert api.items("tags") == ["article-1"]
    assert source.committed == {("cms", 0): 4}
    assert sink.records == []


@planning
def test_records_no_rule_fires_for_finish_at_once_between_purged_ones(remote):
    """A stream of page views with an update among them: the views finish as soon as they are
    planned (nothing pending for them, none dead-lettered), the update once purged, and every
    offset commits."""
    views = [rec(i, cloudevent("page.viewed", {"n": i})) for i in (0, 1, 3, 4)]
    update = rec(2, cloudevent("article.updated", {"slug": "a", "locales": ["en"], "id": 1}))
    pipeline, source, sink, api = build([*views[:2], update, *views[2:]], remote=remote)
    try:
        for _ in range(50):
            step(pipeline)
            if pipeline.planning.waiting or len(pipeline.outcome.records) > 1:
                continue
            break
        # The update waits for its window; the views around it are finished.
        assert len(pipeline.outcome.records) == 1
        assert pipeline.outcome.records.committable() == {("cms", 0): 2}
        # Its URL, the two cache-key variants of its mobile page, its tag: nothing of the views.
        assert pipeline.pending.size == 4
        run_until_idle(pipeline, source)
        assert source.committed == {("cms", 0): 5}
        assert len(api.items("files")) == 3 and api.items("tags") == ["article-1"]
        assert sink.records == []
    finally:
        pipeline.planning.close()


def test_subsumption_host_swallows_urls_and_prefix_swallows_longer():
    records = [
        rec(0, cloudevent("article.published", {"slug": "a", "locales": ["en"], "id": 1})),
        rec(1, cloudevent("section.changed", {"section": "en"})),
        rec(2, cloudevent("site.rebuilt", {"host": "m.example.com"})),
    ]
    pipeline, source, _, api = build(records)
    run_until_idle(pipeline, source)
    got = {(p["kind"], json.dumps(p["items"])) for p in api.purges()}
    # www.example.com/en/a is under prefix www.example.com/en/; m.example.com URLs under the host.
    assert got == {
        ("prefixes", '["www.example.com/en/"]'),
        ("hosts", '["m.example.com"]'),
        ("tags", '["article-1"]'),
    }
    assert source.committed == {("cms", 0): 3}


@planning
def test_poison_records_are_dead_lettered_with_headers_and_good_ones_purged(remote):
    good = cloudevent("article.published", {"slug": "ok", "locales": ["en"], "id": 7})
    records = [
        rec(0, b"\xff\xfe not utf8"),
        rec(1, b"{not json"),
        rec(2, good),
        rec(3, cloudevent("article.published", {"locales": ["en"], "id": 8})),  # no slug
        rec(4, cloudevent("image.updated", {"host": "evil.org", "path": "x"})),
        rec(
            5, cloudevent("article.published", {"slug": "s", "locales": ["en"], "id": "has space"})
        ),
        rec(6, b"x" * 2000, headers=[("trace", b"t-1")]),
    ]
    pipeline, source, sink, api = build(
        records,
        remote,
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_record_bytes": 1000},
    )
    run_until_idle(pipeline, source)
    pipeline.drain()
    classes = {r.offset: header(h, "purge.error.class") for r, h in sink.records}
    assert classes == {
        0: "invalid_event",
        1: "invalid_event",
        3: "invalid_event",
        4: "unknown_zone",
        5: "invalid_target",
        6: "invalid_event",
    }
    r6, h6 = next((r, h) for r, h in sink.records if r.offset == 6)
    assert r6.value == b"x" * 2000 and r6.key == b"k"
    assert h6[0] == ("trace", b"t-1")  # original headers first, unchanged
    for name in (
        "purge.error.message",
        "purge.original.topic",
        "purge.original.partition",
        "purge.original.offset",
        "purge.original.timestamp",
        "purge.attempts",
        "purge.failed_at",
    ):
        assert header(h6, name), name
    assert header(h6, "purge.original.offset") == "6"
    assert "over the limit" in header(h6, "purge.error.message")
    assert "https://www.example.com/en/ok" in api.items()
    assert source.committed == {("cms", 0): 7}


def test_rejected_url_in_batch_dead_letters_only_its_record():
    records = [
        rec(i, cloudevent("article.published", {"slug": s, "locales": ["en"], "id": i}))
        for i, s in enumerate(["a", "b", "bad", "c"])
    ]
    pipeline, source, sink, api = build(records)
    api.fault(reject_items=["https://www.example.com/en/bad"], reject_code=1012)
    run_until_idle(pipeline, source)
    assert [
        (r.offset, header(h, "purge.error.class"), header(h, "purge.error.code"))
        for r, h in sink.records
    ] == [(2, "api_rejected", "1012")]
    urls = api.items("files")
    for s in "abc":
        assert f"https://www.example.com/en/{s}" in urls
    assert source.committed == {("cms", 0): 4}


def test_backpressure_pauses_and_resumes():
    records = [
        rec(i, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"{i}"}))
        for i in range(50)
    ]
    pipeline, source, _, api = build(
        records,
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 10},
        coalesce={"window_seconds": 5, "max_pending_records": 20, "max_pending_targets": 1000},
    )
    run_until_idle(pipeline, source)
    assert source.pause_count >= 1 and not source.paused
    assert len(api.items("files")) == 50


def test_dead_letter_guard_stops_instead_of_draining_the_topic():
    from worker.errors import DeadLetterGuardTripped

    records = [rec(i, b"garbage") for i in range(300)]
    pipeline, source, sink, _ = build(
        records,
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 50},
        delivery={"dead_letter_guard": {"max_ratio": 0.5, "min_records": 10}},
    )
    with pytest.raises(DeadLetterGuardTripped, match="dead-lettered"):
        run_until_idle(pipeline, source)
    # The share is judged over the records that arrived (the first poll's 50): half of them at
    # most are dead-lettered, then it stops; the rest of the topic waits.
    assert len(sink.records) == 25
    assert source.positions[("cms", 0)] == 50
    assert source.committed.get(("cms", 0), 0) <= len(sink.records)


def test_the_guard_judges_the_stream_not_the_order_outcomes_come_back_in():
    """A backlog with 30 % invalid records: the invalid ones finish at once, the valid ones only
    once purged. Judged by arrival, the share is 30 %: nothing trips, everything is purged."""
    records = [
        rec(
            i,
            b"garbage" if i % 10 < 3 else cloudevent("site.rebuilt", {"host": f"h{i}.example.com"}),
        )
        for i in range(400)
    ]
    pipeline, source, sink, api = build(
        records, delivery={"dead_letter_guard": {"max_ratio": 0.5, "min_records": 50}}
    )
    run_until_idle(pipeline, source)
    assert len(sink.records) == 120 and len(api.items("hosts")) == 280
    assert source.committed == {("cms", 0): 400}


def test_dead_letter_write_failure_holds_the_offset():
    records = [rec(0, b"garbage"), rec(1, cloudevent("site.rebuilt", {"host": "www.example.com"}))]
    pipeline, source, sink, _ = build(records)
    sink.fail_next = 1
    pipeline.step()
    pipeline.outcome.commits.commit()
    assert source.committed.get(("cms", 0)) is None  # record 0 not confirmed: nothing commits
    run_until_idle(pipeline, source)  # the write is tried again after a pause
    assert len(sink.records) == 1 and source.committed == {("cms", 0): 2}


def test_dead_letter_writes_tried_again_count_once_against_the_guard():
    """A quarter of the records bad, their writes refused ten times over (Kafka away): each is
    one dead letter to the guard, however often its write is tried, and nothing trips."""
    records = [
        rec(
            i,
            b"garbage" if i % 4 == 0 else cloudevent("site.rebuilt", {"host": f"h{i}.example.com"}),
        )
        for i in range(40)
    ]
    pipeline, source, sink, api = build(
        records, delivery={"dead_letter_guard": {"max_ratio": 0.5, "min_records": 10}}
    )
    sink.fail_next = 100
    for _ in range(5000):
        if sink.fail_next == 0:
            break
        step(pipeline)
    assert sink.fail_next == 0  # every try was refused
    run_until_idle(pipeline, source)
    assert len(sink.records) == 10 and len(api.items("hosts")) == 30
    assert source.committed == {("cms", 0): 40}


def test_dry_run_sends_nothing_and_finishes_every_record(emulator):
    """Shadow mode: the client's transport answers in the process, so nothing reaches the API
    (here the HTTP emulator), and every record is finished and committed all the same."""
    clock = MockClock()
    config = make_config(emulator.api_url, delivery={"dry_run": True})
    records = [rec(i, cloudevent("site.rebuilt", {"host": f"h{i}.example.com"})) for i in range(3)]
    source = InMemorySource(records, clock=clock)
    loop = app.build_loop(config, source, InMemorySink(), clock)
    run_until_idle(loop, source)
    assert purges(emulator) == [] and source.committed == {("cms", 0): 3}


def test_tags_waiting_for_budget_do_not_hold_back_urls():
    # One tag per request and a bucket of one: every tag request after the first waits ~12 s.
    rules = [
        {
            "name": "tagged",
            "match": {"type": "tagged"},
            "tags": ["t-{data.n}"],
            "zone": "example.com",
        },
        {
            "name": "image",
            "match": {"type": "image.updated"},
            "urls": ["https://{data.host}/{data.path}"],
        },
    ]
    over = {
        "rules": rules,
        "cloudflare": {
            "base_url": MemoryApi.URL,
            "accounts": {"main": {"plan": "free", "items_per_request": 1, "flex_bucket": 1}},
            "zones": [
                {"name": "example.com", "id": ZONE_A, "hosts": ["example.com", "*.example.com"]}
            ],
        },
    }
    tags = [rec(i, cloudevent("tagged", {"n": i})) for i in range(10)]
    pipeline, source, _, api = build(tags, plan="free", **over)
    clock = source.clock
    start = clock.monotonic()
    while clock.monotonic() - start < 1:  # the tag batches are formed and start waiting
        step(pipeline)
    for i in range(10, 20):
        source.add(
            rec(i, cloudevent("image.updated", {"host": "www.example.com", "path": f"p{i}"}))
        )
    start = clock.monotonic()
    while clock.monotonic() - start < 4 and len(api.items("files")) < 10:
        step(pipeline)
    assert len(api.items("files")) == 10  # URLs went out within seconds ...
    assert len(api.items("tags")) <= 2  # ... while the tags wait for their budget
    assert 429 not in api.statuses()


@planning
def test_a_backlog_with_repeats_purges_each_target_once_and_commits_all(remote):
    clock = MockClock()
    old_ms = int((clock.time() - 600) * 1000)  # produced ten minutes before the worker runs
    distinct = [f"p{i}" for i in range(40)]
    records = [
        Record(
            "cms",
            i % 2,
            i // 2,
            b"k",
            cloudevent("image.updated", {"host": "www.example.com", "path": distinct[i % 40]}),
            (),
            old_ms + i,
        )
        for i in range(1200)
    ]
    # Batches large enough that, with a planning process, the next is read while one is planned.
    pipeline, source, sink, api = build(
        records,
        remote,
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 150},
    )
    clock = source.clock
    for _ in range(3000):
        step(pipeline)
        clock.advance(0.05)
        if pipeline.idle and all(source.positions[tp] == len(q) for tp, q in source.queues.items()):
            break
    pipeline.outcome.commits.commit()
    sent = api.items("files")
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in distinct)
    assert source.committed == {("cms", 0): 600, ("cms", 1): 600}
    assert sink.records == []

    # A change after those purges is purged again, once.
    newer_ms = int((clock.time() + 60) * 1000)
    for i in range(10):
        source.add(
            Record(
                "cms",
                0,
                600 + i,
                b"k",
                cloudevent("image.updated", {"host": "www.example.com", "path": "p1"}),
                (),
                newer_ms,
            )
        )
    for _ in range(200):
        step(pipeline)
        clock.advance(0.05)
        if pipeline.idle and source.positions[("cms", 0)] == 610:
            break
    pipeline.outcome.commits.commit()
    assert api.items("files").count("https://www.example.com/p1") == 2
    assert source.committed[("cms", 0)] == 610
    pipeline.drain()


class _BlockingSink(InMemorySink):
    """A sink whose first write waits until ``release`` is set (the loop holds its lock then)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def submit(self, record, headers):
        self.entered.set()
        self.release.wait(5)
        return super().submit(record, headers)


def test_a_revocation_lets_requests_in_flight_end_and_offers_their_records_for_commit():
    """The group rebalances while a purge is on the wire: the worker sends nothing new, and the
    revocation (which the Kafka client runs while the loop waits in poll) lets the request end
    and finishes its records, so it can commit them (their next owner would purge them again)."""
    first = [
        rec(i, cloudevent("image.updated", {"host": "www.example.com", "path": f"a{i}"}))
        for i in range(10)
    ]
    sink = _BlockingSink()
    loop, source, _, api = build(first, sink=sink, coalesce={"window_seconds": 0})
    api.gate.clear()  # the request stays on the wire until the gate opens
    for _ in range(100):  # a starting worker waits for its first budget
        loop.step()
        if loop.sending.in_flight:
            break
    assert loop.sending.in_flight == 1
    assert source.finished_offsets == {}

    source.rebalancing = True
    for i in range(10, 20):
        data = {"host": "www.example.com", "path": f"a{i}"}
        source.add(rec(i, cloudevent("image.updated", data)))
    loop.step()  # polls the new records, sends nothing
    # While the loop runs (here: inside a dead-letter write, with its lock held), the hook
    # touches nothing and lets the revocation go on.
    source.add(rec(20, b"garbage"))
    stepping = threading.Thread(target=loop.step)
    stepping.start()
    assert sink.entered.wait(5)
    assert source.settle is not None and source.settle() is True
    assert loop.sending.in_flight == 1
    sink.release.set()
    stepping.join(5)

    # The revocation, as the client runs it inside poll: the hook again and again, for at most
    # two seconds, while the request ends; the partition is assigned straight back.
    threading.Timer(0.3, api.gate.set).start()
    source.revoke({("cms", 0)}, back=True)
    started = time.monotonic()
    loop.step()
    assert time.monotonic() - started < 2
    assert loop.sending.in_flight == 0
    assert source.committed == {("cms", 0): 10}
    for _ in range(5):
        loop.step()
    assert len(api.items()) == 10  # the records polled meanwhile wait
    assert loop.pending.size == 10

    source.rebalancing = False
    run_until_idle(loop, source)
    assert sorted(api.items()) == sorted(f"https://www.example.com/a{i}" for i in range(20))
    assert source.committed == {("cms", 0): 21}


def test_a_poll_that_returns_between_revocation_and_assignment_sends_nothing():
    """The rebalance begins inside a poll that returns before the group answers (Kafka's poll
    gives up while the join is pending): the revocation has committed, so what the worker sent
    now would be past the committed offsets of partitions that may be another replica's, and
    their next owner would purge it again. Nothing goes until the rebalance is over."""
    records = [
        rec(i, cloudevent("image.updated", {"host": "www.example.com", "path": f"j{i}"}))
        for i in range(10)
    ]
    loop, source, _, api = build(records, coalesce={"window_seconds": 1.0})
    loop.step()
    assert loop.pending.size == 10 and api.items() == []  # their window is still open
    # The window closes; the next step decides before its poll that nothing holds it, and its
    # poll runs the revocation.
    loop.clock.advance(1.0)
    source.revoke({("cms", 0)}, back=True, joining=True)
    loop.step()
    assert source.rebalancing and source.committed == {}
    for _ in range(5):
        loop.step()
    assert api.items() == [] and loop.pending.size == 10
    source.rebalancing = False
    run_until_idle(loop, source)
    assert sorted(api.items()) == sorted(f"https://www.example.com/j{i}" for i in range(10))
    assert source.committed == {("cms", 0): 10}


def test_the_last_record_in_flight_is_committed_at_once_not_at_the_next_interval():
    records = [
        rec(i, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"c{i}"}))
        for i in range(5)
    ]
    loop, source, _, api = build(records, delivery={"commit_interval_seconds": 3600})
    for _ in range(200):
        step(loop)
        if loop.idle and source.positions[("cms", 0)] == 5:
            break
    step(loop)  # the step after the last record finished: nothing in flight any more
    assert len(api.items("files")) == 5
    assert source.committed.get(("cms", 0)) == 5  # no explicit commit, an hour's interval
    # While records are in flight, the interval holds: a commit per step would load the broker.
    more = rec(5, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": "c5"}))
    source.add(more)
    step(loop)
    assert loop.outcome.records and source.committed[("cms", 0)] == 5


def _burst(clock, paths, repeats, *, age=0.0, over=0.0):
    """Records of ``paths`` ``repeats`` times over, the repeats in later parts of the topic;
    produced evenly over ``over`` seconds ending ``age`` seconds before now."""
    values = [
        cloudevent("image.updated", {"host": "www.example.com", "path": p})
        for _ in range(repeats)
        for p in paths
    ]
    start, step = clock.time() - age - over, over / len(values)
    return [
        Record("cms", 0, i, b"k", v, (), int((start + i * step) * 1000))
        for i, v in enumerate(values)
    ]


def _drain_burst(records, clock, plan="pro", remote=False, **over):
    pipeline, source, _, api = build(
        records,
        remote=remote,
        plan=plan,
        clock=clock,
        cloudflare__accounts={"main": {"plan": plan}},
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 100},
        **over,
    )
    first_send = None
    for _ in range(4000):
        step(pipeline)
        if first_send is None and api.items("files"):
            first_send = clock.monotonic()
        clock.advance(0.05)
        if pipeline.idle and source.positions[("cms", 0)] == len(records):
            break
    pipeline.outcome.commits.commit()
    assert source.committed == {("cms", 0): len(records)}
    pipeline.drain()
    return api.items("files"), first_send


@planning
def test_a_fresh_burst_the_budget_cannot_send_at_once_is_read_before_it_is_sent(remote):
    # 1,000 URLs (more than a second of the free plan's budget), each six times over three
    # seconds of reading, all younger than the ledger's margin: a purge sent before a repeat
    # is read would not cover it (the ledger's rule), so the targets wait for the rest. With
    # the planning process the loop reads ahead of the plans: records read whose plans have
    # not come are still to come.
    clock = MockClock()
    paths = [f"p{i}" for i in range(1000)]
    sent, _ = _drain_burst(_burst(clock, paths, 6), clock, plan="free", remote=remote)
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in paths)


def test_a_fresh_burst_is_held_until_read_though_what_was_read_grows_old_meanwhile():
    # Produced over 1 s ending 3 s before the drain, read over 3 s: the newest record read is
    # older than the ledger's margin (5 s) from 1.5 s on, but the 3,000 still unread are
    # younger, and each repeats every path again. A purge sent when the records read grow old
    # would not cover them.
    clock = MockClock()
    paths = [f"p{i}" for i in range(1000)]
    sent, _ = _drain_burst(_burst(clock, paths, 6, age=3.0, over=1.0), clock, plan="free")
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in paths)


@planning
def test_a_fresh_burst_larger_than_the_records_that_may_wait_is_still_sent_once(remote):
    # Reading pauses at 2,500 waiting records, 3,500 before the end. The hold goes on while it
    # is paused, up to the ledger's margin: a purge sent then covers every record the burst
    # had (ended rather the hold: each target sent again for its repeats still unread).
    clock = MockClock()
    paths = [f"p{i}" for i in range(1000)]
    sent, _ = _drain_burst(
        _burst(clock, paths, 6),
        clock,
        plan="free",
        remote=remote,
        coalesce={"max_pending_records": 2500},
    )
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in paths)


def test_with_budget_to_spare_a_fresh_burst_waits_for_nothing_but_its_window():
    clock = MockClock()
    started = clock.monotonic()
    paths = [f"p{i}" for i in range(40)]
    sent, first_send = _drain_burst(_burst(clock, paths, 150), clock)
    assert first_send is not None and first_send - started < 2.5  # window 1 s + start
    assert len(sent) > len(paths)  # repeats read after a purge went again: latency first


def test_a_fresh_burst_of_targets_that_do_not_repeat_waits_for_nothing():
    clock = MockClock()
    started = clock.monotonic()
    paths = [f"p{i}" for i in range(6000)]
    sent, first_send = _drain_burst(_burst(clock, paths, 1), clock, plan="free")
    assert first_send is not None and first_send - started < 2.5
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in paths)


def test_an_aged_backlog_the_budget_cannot_send_at_once_waits_for_nothing():
    clock = MockClock()
    started = clock.monotonic()
    paths = [f"p{i}" for i in range(3000)]
    sent, first_send = _drain_burst(_burst(clock, paths, 2, age=600), clock, plan="free")
    assert first_send is not None and first_send - started < 2.5
    assert sorted(sent) == sorted(f"https://www.example.com/{p}" for p in paths)


def test_a_request_that_ended_during_the_poll_frees_its_thread_before_the_step_pends():
    """With budget to spare a backlog's requests wait on the loop, not the API: one that ended
    while the loop polled hands its thread the next batch before the step goes on with the
    records the poll returned, rather than at the step's end (one turn a step sent a backlog's
    tag requests four a step, a second and more of a drain)."""
    images = "image.updated"
    first = [
        rec(i, cloudevent(images, {"host": "www.example.com", "path": f"t{i}"})) for i in range(250)
    ]
    loop, source, _, api = build(first, coalesce={"window_seconds": 0}, delivery={"concurrency": 1})
    for _ in range(100):  # a starting worker waits for its first budget
        step(loop)
        if loop.sending.in_flight:
            break
    # One request is out (and has ended, uncollected); more batches of the 250 URLs are due.
    assert loop.sending.in_flight == 1 and not loop.sending.on_the_wire
    assert loop.pending.size >= 50

    seen: list[str] = []
    sent, pend = loop.sending.send, loop.pending.pend
    loop.sending.send = lambda **kw: seen.append("send") or sent(**kw)  # type: ignore[method-assign]
    loop.pending.pend = lambda *a: seen.append("pend") or pend(*a)  # type: ignore[method-assign]
    source.add(rec(250, cloudevent(images, {"host": "www.example.com", "path": "t250"})))
    api.gate.clear()  # the next request stays on the wire
    try:
        loop.step()
        assert seen.index("send") < seen.index("pend")
        assert loop.sending.in_flight == 1 and loop.sending.on_the_wire
    finally:
        api.gate.set()
    run_until_idle(loop, source)
    assert sorted(api.items()) == sorted(f"https://www.example.com/t{i}" for i in range(251))


def _image(offset, path):
    return rec(offset, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": path}))


def test_a_backlog_read_to_its_end_sends_what_it_left_pending_without_waiting_out_its_window():
    """Nothing more can join what a backlog left pending once all of it is read: it goes then,
    not a window later. A trickle, never a poll's worth behind, keeps its window."""
    backlog = [_image(i, f"b{i % 20}") for i in range(1500)]  # 20 URLs, under a request's 30
    loop, source, _, api = build(backlog, coalesce={"window_seconds": 30})
    start = loop.clock.monotonic()
    for _ in range(300):
        step(loop)
        if loop.idle:
            break
    assert sorted(api.items()) == sorted(f"https://img.example-cdn.net/b{i}" for i in range(20))
    assert loop.clock.monotonic() - start < 5  # the window is 30 s

    trickle = [_image(i, f"t{i}") for i in range(5)]
    loop, source, _, api = build(trickle, coalesce={"window_seconds": 30})
    for _ in range(300):
        step(loop)
        if source.positions[("cms", 0)] == 5 and loop.clock.monotonic() > 20:
            break
    assert api.items() == [] and loop.pending.size == 5  # still in their window
    run_until_idle(loop, source)
    assert len(api.items()) == 5


@planning
def test_a_backlog_of_a_poll_per_partition_is_a_backlog_too(remote):
    """Three partitions of a poll's worth (500) each: every poll reads one. Only the partitions
    read from counted as behind, so this backlog never looked like one (nor did it while its
    first plans were still on their way from the planning process), and its last window was
    waited out."""
    spread = [
        rec(
            i, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"s{i % 20}"}), p
        )
        for p in range(3)
        for i in range(500)
    ]
    loop, _, _, api = build(spread, remote=remote, coalesce={"window_seconds": 30})
    start = loop.clock.monotonic()
    try:
        for _ in range(300):
            step(loop)
            if loop.idle:
                break
    finally:
        loop.planning.close()
    assert sorted(api.items()) == sorted(f"https://img.example-cdn.net/s{i}" for i in range(20))
    assert loop.clock.monotonic() - start < 5  # the window is 30 s
