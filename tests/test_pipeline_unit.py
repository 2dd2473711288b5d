"""The pipeline's logic with in-memory Kafka stand-ins and the real emulator over HTTP."""

import json
import time

import pytest
import requests

from tests.conftest import ZONE_A
from tests.helpers import cloudevent, make_config, purged_items, purges
from worker import app
from worker.clock import SystemClock
from worker.events import Record
from worker.intake.memory import InMemorySource
from worker.outcome.dead_letters import header
from worker.outcome.memory import InMemorySink
from worker.planning.process import PlanningProcess


def run_until_idle(pipeline, source, max_steps=2000):
    for _ in range(max_steps):
        pipeline.step()
        if pipeline.idle and all(source.positions[tp] == len(q) for tp, q in source.queues.items()):
            pipeline.outcome.commits.commit()
            return
    raise AssertionError("pipeline did not go idle")


def build(emulator, records, remote=False, **over):
    config = make_config(emulator.api_url, **over)
    source = InMemorySource(records)
    sink = InMemorySink()
    clock = SystemClock()
    planner = PlanningProcess(config.planning).start() if remote else None
    pipeline = app.build_loop(config, source, sink, clock, process=planner)
    return pipeline, source, sink


# The loop plans records itself, or has a second process plan them: the outcome is the same.
planning = pytest.mark.parametrize("remote", [False, True], ids=["inline", "process"])


def rec(offset, value, partition=0, headers=()):
    return Record("cms", partition, offset, b"k", value, tuple(headers), 1_800_000_000_000)


def test_events_become_exactly_the_expected_purges(emulator):
    records = [
        rec(0, cloudevent("article.published", {"slug": "a", "locales": ["en", "de"], "id": 1})),
        rec(1, cloudevent("article.updated", {"slug": "a", "locales": ["en"], "id": 1})),  # dupes
        rec(2, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": "x.jpg"})),
        rec(3, b'{"type": "unrelated"}'),
    ]
    pipeline, source, sink = build(emulator, records)
    run_until_idle(pipeline, source)
    assert sorted(purged_items(emulator, "files")) == sorted(
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
    assert purged_items(emulator, "tags") == ["article-1"]
    assert source.committed == {("cms", 0): 4}
    assert sink.records == []


def test_subsumption_host_swallows_urls_and_prefix_swallows_longer(emulator):
    records = [
        rec(0, cloudevent("article.published", {"slug": "a", "locales": ["en"], "id": 1})),
        rec(1, cloudevent("section.changed", {"section": "en"})),
        rec(2, cloudevent("site.rebuilt", {"host": "m.example.com"})),
    ]
    pipeline, source, _ = build(emulator, records)
    run_until_idle(pipeline, source)
    got = {(p["kind"], json.dumps(p["items"])) for p in purges(emulator)}
    # www.example.com/en/a is under prefix www.example.com/en/; m.example.com URLs under the host.
    assert got == {
        ("prefixes", '["www.example.com/en/"]'),
        ("hosts", '["m.example.com"]'),
        ("tags", '["article-1"]'),
    }
    assert source.committed == {("cms", 0): 3}


@planning
def test_poison_records_are_dead_lettered_with_headers_and_good_ones_purged(emulator, remote):
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
    pipeline, source, sink = build(
        emulator,
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
    assert "https://www.example.com/en/ok" in purged_items(emulator)
    assert source.committed == {("cms", 0): 7}


def test_rejected_url_in_batch_dead_letters_only_its_record(emulator):
    requests.post(
        emulator.url + "/__emulator/faults",
        json={"reject_items": ["https://www.example.com/en/bad"], "reject_code": 1012},
        timeout=5,
    )
    records = [
        rec(i, cloudevent("article.published", {"slug": s, "locales": ["en"], "id": i}))
        for i, s in enumerate(["a", "b", "bad", "c"])
    ]
    pipeline, source, sink = build(emulator, records)
    run_until_idle(pipeline, source)
    assert [
        (r.offset, header(h, "purge.error.class"), header(h, "purge.error.code"))
        for r, h in sink.records
    ] == [(2, "api_rejected", "1012")]
    urls = purged_items(emulator, "files")
    for s in "abc":
        assert f"https://www.example.com/en/{s}" in urls
    assert source.committed == {("cms", 0): 4}


def test_backpressure_pauses_and_resumes(emulator):
    records = [
        rec(i, cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"{i}"}))
        for i in range(50)
    ]
    pipeline, source, _ = build(
        emulator,
        records,
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 10},
        coalesce={"window_seconds": 5, "max_pending_records": 20, "max_pending_targets": 1000},
    )
    run_until_idle(pipeline, source)
    assert source.pause_count >= 1 and not source.paused
    assert len(purged_items(emulator, "files")) == 50


def test_dead_letter_guard_stops_instead_of_draining_the_topic(emulator):
    from worker.errors import DeadLetterGuardTripped

    records = [rec(i, b"garbage") for i in range(30)]
    pipeline, source, sink = build(
        emulator, records, delivery={"dead_letter_guard": {"max_ratio": 0.5, "min_records": 10}}
    )
    with pytest.raises(DeadLetterGuardTripped, match="dead-lettered"):
        run_until_idle(pipeline, source)
    assert len(sink.records) < 10
    assert source.committed.get(("cms", 0), 0) <= len(sink.records)


def test_dead_letter_write_failure_holds_the_offset(emulator):
    records = [rec(0, b"garbage"), rec(1, cloudevent("site.rebuilt", {"host": "www.example.com"}))]
    pipeline, source, sink = build(emulator, records)
    sink.fail_next = 1
    pipeline.step()
    pipeline.outcome.commits.commit()
    assert source.committed.get(("cms", 0)) is None  # record 0 not confirmed: nothing commits
    run_until_idle(pipeline, source)  # the write is tried again after a pause
    assert len(sink.records) == 1 and source.committed == {("cms", 0): 2}


def test_dry_run_sends_nothing(emulator):
    records = [rec(0, cloudevent("site.rebuilt", {"host": "www.example.com"}))]
    pipeline, source, _ = build(emulator, records, delivery={"dry_run": True})
    run_until_idle(pipeline, source)
    assert purges(emulator) == [] and source.committed == {("cms", 0): 1}
    assert ZONE_A


def test_tags_waiting_for_budget_do_not_hold_back_urls(emulator_factory):
    import time

    emulator = emulator_factory(plan="free")
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
            "base_url": emulator.api_url,
            "accounts": {"main": {"plan": "free", "items_per_request": 1, "flex_bucket": 1}},
            "zones": [
                {"name": "example.com", "id": ZONE_A, "hosts": ["example.com", "*.example.com"]}
            ],
        },
    }
    tags = [rec(i, cloudevent("tagged", {"n": i})) for i in range(10)]
    pipeline, source, _ = build(emulator, tags, **over)
    start = time.monotonic()
    while time.monotonic() - start < 1:  # the tag batches are formed and start waiting
        pipeline.step()
    for i in range(10, 20):
        source.add(
            rec(i, cloudevent("image.updated", {"host": "www.example.com", "path": f"p{i}"}))
        )
    start = time.monotonic()
    while time.monotonic() - start < 4 and len(purged_items(emulator, "files")) < 10:
        pipeline.step()
    assert len(purged_items(emulator, "files")) == 10  # URLs went out within seconds ...
    assert len(purged_items(emulator, "tags")) <= 2  # ... while the tags wait for their budget
    statuses = [
        r["status"] for r in requests.get(emulator.url + "/__emulator/requests", timeout=5).json()
    ]
    assert 429 not in statuses


@planning
def test_a_backlog_with_repeats_purges_each_target_once_and_commits_all(emulator, remote):
    from worker.clock import MockClock

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
    config = make_config(
        emulator.api_url,
        # Batches large enough that, with a planning process, the next is read while one is
        # planned.
        kafka={"topics": ["cms"], "dead_letter_topic": "dlq", "max_poll_records": 150},
    )
    source, sink = InMemorySource(records), InMemorySink()
    planner = PlanningProcess(config.planning).start() if remote else None
    pipeline = app.build_loop(config, source, sink, clock, process=planner)
    for _ in range(3000):
        pipeline.step()
        clock.advance(0.05)
        if pipeline.idle and all(source.positions[tp] == len(q) for tp, q in source.queues.items()):
            break
    pipeline.outcome.commits.commit()
    sent = purged_items(emulator, "files")
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
        pipeline.step()
        clock.advance(0.05)
        if pipeline.idle and source.positions[("cms", 0)] == 610:
            break
    pipeline.outcome.commits.commit()
    assert purged_items(emulator, "files").count("https://www.example.com/p1") == 2
    assert source.committed[("cms", 0)] == 610
    pipeline.drain()


def test_a_revocation_lets_requests_in_flight_end_and_offers_their_records_for_commit(emulator):
    """The group rebalances while a purge is on the wire: the worker sends nothing new, and the
    revocation (which the Kafka client runs while the loop waits in poll) lets the request end
    and finishes its records, so it can commit them (their next owner would purge them again)."""
    first = [
        rec(i, cloudevent("image.updated", {"host": "www.example.com", "path": f"a{i}"}))
        for i in range(10)
    ]
    pipeline, source, _ = build(emulator, first, coalesce={"window_seconds": 0})
    requests.post(emulator.url + "/__emulator/faults", json={"latency_ms": 400}, timeout=5)
    for _ in range(100):  # a starting worker waits for its first budget
        pipeline.step()
        if pipeline.sending.in_flight:
            break
    assert pipeline.sending.in_flight == 1
    assert source.finished_offsets == {}

    source.rebalancing = True
    for i in range(10, 20):
        data = {"host": "www.example.com", "path": f"a{i}"}
        source.add(rec(i, cloudevent("image.updated", data)))
    pipeline.step()  # polls the new records, sends nothing
    assert source.settle is not None
    # While the loop runs, the hook touches nothing and lets the revocation go on.
    with pipeline._lock:
        assert source.settle() is True
    assert pipeline.sending.in_flight == 1
    # The revocation, as the client runs it: the hook again and again, for at most two seconds.
    deadline = time.monotonic() + 2
    while not source.settle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipeline.sending.in_flight == 0
    assert source.finished_offsets == {("cms", 0): 10}
    for _ in range(5):
        pipeline.step()
    assert len(purged_items(emulator)) == 10  # the records polled meanwhile wait
    assert pipeline.pending.size == 10

    source.rebalancing = False
    requests.post(emulator.url + "/__emulator/faults", json={"latency_ms": 0}, timeout=5)
    run_until_idle(pipeline, source)
    assert sorted(purged_items(emulator)) == sorted(
        f"https://www.example.com/a{i}" for i in range(20)
    )
    assert source.committed == {("cms", 0): 20}
