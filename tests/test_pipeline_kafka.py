"""The pipeline through a real Kafka broker and the emulator over HTTP."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import TOKEN
from tests.helpers import cloudevent, make_config, purged_items, purges, wait_for, write_config
from tests.kafka_helpers import (
    RunningWorker,
    all_committed,
    committed,
    kafka_config,
    produce,
    read_all,
)
from worker.outcome.dead_letters import header

pytestmark = pytest.mark.kafka

EVERYTHING_RULES = [
    {
        "name": "article",
        "match": {"type": "article.published"},
        "urls": [
            "https://www.example.com/{data.locales[]}/{data.slug}",
            {
                "url": "https://m.example.com/{data.slug}",
                "headers": {"CF-Device-Type": ["mobile", "tablet"]},
            },
        ],
        "tags": ["article-{data.id}", "author-{data.authors[]}"],
        "zone": "example.com",
    },
    {
        "name": "section",
        "match": {"type": "section.changed"},
        "prefixes": ["www.example.com/{data.section}/"],
        "urls": ["https://www.example.com/{data.section}/{data.pages[]}"],
    },
    {
        "name": "site",
        "match": {"type": "site.rebuilt"},
        "hosts": ["{data.host}"],
        "urls": ["https://{data.host}/"],
    },
    {"name": "cdn-reset", "match": {"type": "cdn.reset"}, "everything": True, "zone": "cdn"},
    {
        "name": "plain-json",
        "match": {"type": "legacy.page", "fields": {"data.kind": "page"}},
        "urls": ["https://www.example.com/p/{data.path}"],
        "mode": "invalidate",
    },
]


def setup(emulator, make_topic, kafka_bootstrap, unique, partitions=3, **over):
    topic = make_topic("cms", partitions)
    dlq = make_topic("dlq")
    config = make_config(emulator.api_url, **over)
    return kafka_config(config, kafka_bootstrap, topic, dlq, f"g-{unique}"), topic, dlq


def test_events_through_kafka_end_as_exactly_the_expected_purges(
    emulator, make_topic, kafka_bootstrap, unique
):
    config, topic, dlq = setup(
        emulator,
        make_topic,
        kafka_bootstrap,
        unique,
        rules=EVERYTHING_RULES,
        delivery={"allow_everything": True},
    )
    produce(
        kafka_bootstrap,
        topic,
        [
            cloudevent(
                "article.published",
                {"slug": "a", "locales": ["en", "de"], "id": 1, "authors": [7, 9]},
            ),
            cloudevent("section.changed", {"section": "sport", "pages": ["x", "y?z=1"]}),
            cloudevent("site.rebuilt", {"host": "amp.example.com"}),
            cloudevent("cdn.reset", {}),
            json.dumps({"type": "legacy.page", "data": {"kind": "page", "path": "about"}}).encode(),
        ],
    )
    # Binary-mode CloudEvent: attributes in ce_ headers, the data as the value.
    produce(
        kafka_bootstrap,
        topic,
        [json.dumps({"slug": "b", "locales": ["fr"], "id": 2, "authors": []}).encode()],
        headers=[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"b-1"),
            ("ce_source", b"/cms"),
            ("ce_type", b"article.published"),
        ],
    )
    worker = RunningWorker(config)
    try:
        wait_for(
            lambda: all_committed(kafka_bootstrap, config.kafka.group_id, topic), what="commits"
        )
    finally:
        worker.stop()
    by_kind = {}
    for p in purges(emulator):
        by_kind.setdefault((p["kind"], p["endpoint"]), []).extend(
            json.dumps(i, sort_keys=True) if isinstance(i, dict) else i for i in p["items"]
        )

    def dev(slug, device):
        item = {"url": f"https://m.example.com/{slug}", "headers": {"CF-Device-Type": device}}
        return json.dumps(item, sort_keys=True)

    assert sorted(by_kind[("files", "purge_cache")]) == sorted(
        [
            "https://www.example.com/en/a",
            "https://www.example.com/de/a",
            "https://www.example.com/fr/b",
            dev("a", "mobile"),
            dev("a", "tablet"),
            dev("b", "mobile"),
            dev("b", "tablet"),
        ]
    )  # the section's pages went under its prefix, amp's home page under its host
    assert sorted(by_kind[("tags", "purge_cache")]) == [
        "article-1",
        "article-2",
        "author-7",
        "author-9",
    ]
    assert by_kind[("prefixes", "purge_cache")] == ["www.example.com/sport/"]
    assert by_kind[("hosts", "purge_cache")] == ["amp.example.com"]
    assert by_kind[("everything", "purge_cache")] == []
    assert by_kind[("files", "invalidate_cache")] == ["https://www.example.com/p/about"]
    assert len(by_kind) == 6
    assert read_all(kafka_bootstrap, dlq, timeout_s=2) == []


def test_poison_records_reach_the_dead_letter_topic_with_headers(
    emulator, make_topic, kafka_bootstrap, unique
):
    config, topic, dlq = setup(
        emulator,
        make_topic,
        kafka_bootstrap,
        unique,
        partitions=1,
        kafka={"topics": ["x"], "max_record_bytes": 4096},
    )
    bad_url = "https://www.example.com/en/rejected"
    requests.post(
        emulator.url + "/__emulator/faults",
        json={"reject_items": [bad_url], "reject_code": 1012},
        timeout=5,
    )
    good = [
        cloudevent("article.published", {"slug": f"g{i}", "locales": ["en"], "id": i})
        for i in range(3)
    ]
    values = [
        good[0],
        b"not json at all",
        b"\xc3\x28 invalid utf8",
        b"[" * 10 + b"]" * 10,  # JSON, but not an object
        b"{" + b'"a":"' + b"x" * 5000 + b'"}',  # oversized
        good[1],
        cloudevent("article.published", {"locales": ["en"], "id": 99}),  # missing slug
        cloudevent("image.updated", {"host": "foreign.org", "path": "p"}),  # no zone
        cloudevent("article.published", {"slug": "t", "locales": ["en"], "id": "bad tag"}),
        cloudevent("section.changed", {"section": "a?b"}),  # prefix with a query
        cloudevent("article.published", {"slug": "rejected", "locales": ["en"], "id": 5}),
        good[2],
    ]
    produce(kafka_bootstrap, topic, values, key=b"the-key", headers=[("origin", b"cms-1")])
    worker = RunningWorker(config)
    try:
        wait_for(
            lambda: all_committed(kafka_bootstrap, config.kafka.group_id, topic), what="commits"
        )
    finally:
        worker.stop()
    dead = read_all(kafka_bootstrap, dlq)
    got = {
        r.headers and header(r.headers, "purge.original.offset"): header(
            r.headers, "purge.error.class"
        )
        for r in dead
    }
    assert got == {
        "1": "invalid_event",
        "2": "invalid_event",
        "3": "invalid_event",
        "4": "invalid_event",
        "6": "invalid_event",
        "7": "unknown_zone",
        "8": "invalid_target",
        "9": "invalid_target",
        "10": "api_rejected",
    }
    for r in dead:
        assert r.key == b"the-key"
        assert r.headers[0] == ("origin", b"cms-1")
        assert r.value == values[int(header(r.headers, "purge.original.offset"))]
        assert header(r.headers, "purge.original.topic") == topic
        assert header(r.headers, "purge.original.partition") == "0"
        assert header(r.headers, "purge.attempts") == "1"
        assert header(r.headers, "purge.failed_at").endswith("Z")
        assert int(header(r.headers, "purge.original.timestamp")) > 0
    rejected = next(r for r in dead if header(r.headers, "purge.original.offset") == "10")
    assert header(rejected.headers, "purge.error.code") == "1012"
    assert "rejected" in header(rejected.headers, "purge.error.message")
    urls = purged_items(emulator, "files")
    for i in range(3):
        assert f"https://www.example.com/en/g{i}" in urls
    assert bad_url not in urls


def test_an_outage_loses_nothing_and_dead_letters_nothing(
    emulator, make_topic, kafka_bootstrap, unique
):
    config, topic, dlq = setup(
        emulator,
        make_topic,
        kafka_bootstrap,
        unique,
        delivery={
            "retry": {
                "initial_backoff_seconds": 0.2,
                "max_backoff_seconds": 1,
                "budget_seconds": 120,
            }
        },
    )
    requests.post(
        emulator.url + "/__emulator/faults", json={"status": 503, "seconds": 6}, timeout=5
    )
    n = 150
    produce(
        kafka_bootstrap,
        topic,
        [
            cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"i{i}.jpg"})
            for i in range(n)
        ],
    )
    worker = RunningWorker(config)
    try:
        wait_for(
            lambda: all_committed(kafka_bootstrap, config.kafka.group_id, topic),
            timeout=60,
            what="commits after the outage",
        )
    finally:
        worker.stop()
    statuses = [
        r["status"] for r in requests.get(emulator.url + "/__emulator/requests", timeout=5).json()
    ]
    assert statuses.count(503) >= 3  # it really went through an outage
    assert set(purged_items(emulator, "files")) == {
        f"https://img.example-cdn.net/i{i}.jpg" for i in range(n)
    }
    assert read_all(kafka_bootstrap, dlq, timeout_s=2) == []


def test_kill_9_mid_stream_then_restart_purges_everything(
    emulator, make_topic, kafka_bootstrap, unique, tmp_path
):
    topic = make_topic("cms", 3)
    dlq = make_topic("dlq")
    group = f"g-{unique}"
    cfg = write_config(
        tmp_path / "c.yaml",
        emulator.api_url,
        kafka={
            "bootstrap_servers": [kafka_bootstrap],
            "topics": [topic],
            "dead_letter_topic": dlq,
            "group_id": group,
            "max_poll_records": 100,
        },
        coalesce={"window_seconds": 0.3},
    )
    n = 3000
    produce(
        kafka_bootstrap,
        topic,
        [
            cloudevent(
                "image.updated", {"host": "img.example-cdn.net", "path": f"k{i}"}, id_=f"e{i}"
            )
            for i in range(n)
        ],
        key=None,
    )
    # Slow the API down so the kill lands mid-stream.
    requests.post(emulator.url + "/__emulator/faults", json={"latency_ms": 150}, timeout=5)
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
    env.pop("KAFKA_BOOTSTRAP", None)
    cmd = [sys.executable, "-m", "worker", "run", "-c", cfg]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: sum(committed(kafka_bootstrap, group, topic).values()) > 0,
            timeout=60,
            what="first commits",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    purged_before = len(purged_items(emulator))
    committed_before = sum(committed(kafka_bootstrap, group, topic).values())
    assert purged_before < n, "the kill came too late to test anything"
    requests.post(emulator.url + "/__emulator/faults", json={"clear": True}, timeout=5)
    second = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: all_committed(kafka_bootstrap, group, topic), timeout=90, what="all commits"
        )
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err[-2000:]
    items = purged_items(emulator)
    expected = {f"https://img.example-cdn.net/k{i}" for i in range(n)}
    assert set(items) == expected  # every target purged at least once
    duplicates = len(items) - len(expected)
    print(
        f"\nkill -9 after {purged_before} of {n} purged ({committed_before} records committed): "
        f"{duplicates} duplicate purges on restart"
    )
    assert read_all(kafka_bootstrap, dlq, timeout_s=2) == []


def test_a_backlog_with_repeats_is_purged_once_per_target_and_fully_committed(
    emulator_factory, make_topic, kafka_bootstrap, unique
):
    """A backlog (events from ten minutes ago) touching 40 URLs and 10 tags 2,400 times, drained
    against the pro plan's limits: each target purged exactly once, every offset committed. The
    second half arrives after the first purges went out, so the pending set alone cannot
    collapse it: the purge ledger has to know those targets are already purged."""
    import time

    from kafka import KafkaProducer

    emulator = emulator_factory(plan="pro")
    rules = [
        {
            "name": "article",
            "match": {"type": "article.updated"},
            "urls": ["https://www.example.com/{data.locales[]}/{data.slug}"],
            "tags": ["article-{data.id}"],
            "zone": "example.com",
        }
    ]
    config, topic, dlq = setup(
        emulator,
        make_topic,
        kafka_bootstrap,
        unique,
        rules=rules,
        cloudflare={
            "base_url": emulator.api_url,
            "accounts": {"main": {"plan": "pro", "files_per_request": 100}},
            "zones": [
                {
                    "name": "example.com",
                    "id": "023e105f4ecef8ad9ca31a8372d0c353",
                    "hosts": ["example.com", "*.example.com"],
                },
            ],
        },
    )
    ten_minutes_ago = int((time.time() - 600) * 1000)

    def backlog(start: int) -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        for i in range(start, start + 1200):
            n = i % 20
            event = cloudevent(
                "article.updated", {"slug": f"s{n}", "locales": ["en", "de"], "id": n // 2}
            )
            producer.send(topic, value=event, key=f"{n}".encode(), timestamp_ms=ten_minutes_ago + i)
        producer.flush()
        producer.close()

    backlog(0)
    worker = RunningWorker(config)
    try:
        wait_for(lambda: len(purged_items(emulator)) >= 50, what="the first wave purged")
        backlog(1200)
        wait_for(
            lambda: all_committed(kafka_bootstrap, config.kafka.group_id, topic),
            timeout=60,
            what="every offset committed",
        )
    finally:
        worker.stop()
    files, tags = purged_items(emulator, "files"), purged_items(emulator, "tags")
    assert sorted(files) == sorted(
        f"https://www.example.com/{loc}/s{n}" for n in range(20) for loc in ("en", "de")
    )
    assert sorted(tags) == sorted(f"article-{n}" for n in range(10))
    assert read_all(kafka_bootstrap, dlq, timeout_s=2) == []
    statuses = [
        r["status"] for r in requests.get(emulator.url + "/__emulator/requests", timeout=5).json()
    ]
    assert 429 not in statuses
