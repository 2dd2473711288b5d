"""Receipts against the real broker and the emulator: a crash loop and a handover re-send almost
nothing an accepted purge covered, and ``trace`` answers from the topic. (A receipts topic the
worker may not use: ``test_security_kafka.py``; the format and the ledger's rule: the unit tests
in ``test_receipts.py``.)"""

import collections
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.conftest import TOKEN
from tests.helpers import cloudevent, purges, wait_for
from tests.kafka_helpers import Workers, all_committed, worker_config
from worker.clock import parse_rfc3339
from worker.receipts import PURGED, events_of, purge_of, read

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def aged_events(bootstrap, topic, n, *, prefix="r", partitions=1, age=60.0, bad=()):
    """``n`` one-URL events whose records are ``age`` seconds old (a backlog after an outage:
    older than the ledger's margin), spread over ``partitions``; offsets in ``bad`` name a host
    no zone takes (their records are dead-lettered, with their event ids)."""
    stamp = int((time.time() - age) * 1000)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    for i in range(n):
        host = "elsewhere.example.org" if i in bad else "img.example-cdn.net"
        value = cloudevent("image.updated", {"host": host, "path": f"{prefix}{i}"}, f"{prefix}{i}")
        producer.send(topic, value=value, partition=i % partitions, timestamp_ms=stamp)
    producer.flush()
    producer.close()


def url_counts(emulator):
    """How many times each URL was purged (the emulator records accepted purges)."""
    counts = collections.Counter()
    for p in purges(emulator):
        counts.update(i if isinstance(i, str) else i["url"] for i in p["items"])
    return counts


def receipts(bootstrap, topic):
    """Every receipt on ``topic``: (record timestamp in seconds, CloudEvent)."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
    )
    out = [(r.timestamp / 1000, read(r.value)) for r in consumer]
    consumer.close()
    return [(at, r) for at, r in out if r is not None]


def write_receipt(sink, url):
    """One accepted purge of ``url``'s receipt, written by ``g/writer``."""
    from worker.receipts import Purge, purge_receipt
    from worker.targets import Kind, Mode, Target

    now = time.time()
    purge = Purge("cdn", "z", Mode.PURGE, Kind.FILES, (Target.url(url),), now, now, (), ())
    sink.submit(*purge_receipt(purge, "purge-worker/g", "g/writer"))


def purged_count(emulator):
    return sum(len(p["items"]) for p in purges(emulator))


def test_sigkill_four_times_in_a_drain_purges_almost_nothing_twice(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    n = 5000
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    emulator.state.set_faults({"latency_ms": 150})
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(tmp_path, emulator, kafka_bootstrap, topic, dlq, group)
    aged_events(kafka_bootstrap, topic, n)
    workers = Workers(cfg, tmp_path)
    kills = []
    for kill in range(4):
        before = purged_count(emulator)
        proc = workers.start()
        wait_for(
            lambda b=before: purged_count(emulator) >= b + 500,
            90,
            what=f"worker {kill} purging",
        )
        proc.kill()  # SIGKILL: no drain, no last commit
        kills.append(time.time())
        proc.wait(10)
    workers.start()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), 180, what="all committed")
    finally:
        assert workers.stop_all()[-1] == 0, workers.tail(4)
    counts = url_counts(emulator)
    expected = {f"https://img.example-cdn.net/r{i}" for i in range(n)}
    assert set(counts) == expected  # nothing lost
    twice = {url for url, c in counts.items() if c > 1}
    # A request still on the wire when its worker died reached the API (the emulator handles it
    # after its latency), but no answer came back, so no receipt could be written; one answered
    # in the last milliseconds had its receipt still on the way. Their URLs are rightly sent
    # again (4 requests of 30 URLs are on the wire at any moment here). Nothing else may repeat:
    # without receipts, about half of all ids were purged twice this way.
    first = {}
    for p in purges(emulator):
        for item in p["items"]:
            first.setdefault(item, parse_rfc3339(p["received_at"]))
    on_the_wire = {u for u in twice if any(k - 0.25 <= first[u] <= k + 1.0 for k in kills)}
    print(
        f"\n{len(twice)} of {n} ids purged more than once ({len(on_the_wire)} were on the wire "
        f"at a kill); {sum(counts.values())} items sent"
    )
    assert not twice - on_the_wire, sorted(twice - on_the_wire)[:10]
    assert "purge ledger restored from receipts" in workers.log(4)


def test_a_replica_taking_over_a_killed_workers_partitions_resends_nothing_receipted(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    n = 4000
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    emulator.state.set_faults({"latency_ms": 150})
    topic, dlq = make_topic("cms", partitions=4), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(tmp_path, emulator, kafka_bootstrap, topic, dlq, group)
    aged_events(kafka_bootstrap, topic, n, partitions=4)
    workers = Workers(cfg, tmp_path)
    a = workers.start()
    wait_for(lambda: purged_count(emulator) >= 500, 60, what="worker A purging")
    workers.start()
    wait_for(
        lambda: workers.log(1).count("partitions assigned") >= 1 and purged_count(emulator) >= 1500,
        60,
        what="worker B assigned and purging",
    )
    a.kill()
    killed = time.time()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), 180, what="all committed")
    finally:
        workers.stop_all()
    counts = url_counts(emulator)
    assert set(counts) == {f"https://img.example-cdn.net/r{i}" for i in range(n)}
    # What the topic held before A died: every item of it is purged, whoever reads its record.
    receipted = set()
    for at, r in receipts(kafka_bootstrap, f"receipts-{group}"):
        purge = purge_of(r) if r["type"] == PURGED else None
        if purge is not None and at < killed:
            receipted |= {t.value for t in purge.targets}
    resent = set()
    for p in purges(emulator):
        if parse_rfc3339(p["received_at"]) > killed:
            resent |= set(p["items"]) & receipted
    print(f"\n{len(receipted)} items receipted before the kill; re-sent after it: {len(resent)}")
    assert len(receipted) >= 1000
    assert not resent, sorted(resent)[:10]


def cli(command, cfg, *args):
    """``purge-worker COMMAND -c CFG ARGS…`` as a user runs it, on the config's broker."""
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
    env.pop("KAFKA_BOOTSTRAP", None)
    return subprocess.run(
        [sys.executable, "-m", "worker", command, "-c", str(cfg), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def trace(cfg, *args):
    return cli("trace", cfg, *args)


def test_trace_answers_for_an_event_a_url_a_host_purge_and_a_dead_letter(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(tmp_path, emulator, kafka_bootstrap, topic, dlq, group)
    aged_events(kafka_bootstrap, topic, 50, prefix="t", bad={7})
    site = cloudevent("site.rebuilt", {"host": "www.example.com"}, "rebuild-1")
    KafkaProducer(bootstrap_servers=kafka_bootstrap).send(topic, value=site).get(10)
    workers = Workers(cfg, tmp_path)
    workers.start()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), 60, what="all committed")
        wait_for(
            lambda: len(receipts(kafka_bootstrap, f"receipts-{group}")) >= 3, 30, what="receipts"
        )
    finally:
        assert workers.stop_all() == [0], workers.tail(0)

    found = trace(cfg, "--event-id", "t12", "--json")
    assert found.returncode == 0, found.stderr
    (line,) = [json.loads(x) for x in found.stdout.splitlines()]
    data = line["receipt"]["data"]
    assert line["receipt"]["type"] == PURGED and "https://img.example-cdn.net/t12" in data["items"]
    assert {"id": "t12", "topic": topic, "partition": 0, "offset": 12} in events_of(line["receipt"])

    dead = trace(cfg, "--event-id", "t7")
    assert dead.returncode == 0, dead.stderr
    assert "dead-lettered" in dead.stdout and f"to {dlq}" in dead.stdout, dead.stdout

    url = trace(cfg, "--url", "https://img.example-cdn.net/t30", "--since", "10m")
    assert url.returncode == 0 and "matched: the URL" in url.stdout, url.stdout + url.stderr
    covered = trace(cfg, "--url", "https://www.example.com/any/page", "--json")
    assert [json.loads(x)["matched"] for x in covered.stdout.splitlines()] == ["its host"]

    none = trace(cfg, "--url", "https://img.example-cdn.net/never")
    assert none.returncode == 1 and none.stdout == "", none.stdout
    assert "0 receipts" in none.stderr
    early = trace(cfg, "--event-id", "t12", "--until", "1h")  # a span before any receipt
    assert early.returncode == 1
    bad = trace(cfg, "--url", "https://x", "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_an_ad_hoc_purge_leaves_a_receipt_that_trace_finds_and_workers_learn(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(tmp_path, emulator, kafka_bootstrap, topic, dlq, group)
    # Changes made a minute ago, then purged by hand: the worker that reads their records later
    # has nothing left to send for them.
    aged_events(kafka_bootstrap, topic, 20, prefix="a")
    urls = [f"https://img.example-cdn.net/a{i}" for i in range(20)]
    by_hand = cli("purge", cfg, *[arg for url in urls for arg in ("--url", url)])
    assert by_hand.returncode == 0, by_hand.stderr
    found = trace(cfg, "--url", urls[3], "--json")
    assert found.returncode == 0, found.stderr
    (line,) = [json.loads(x) for x in found.stdout.splitlines()]
    assert line["receipt"]["data"]["events"] == [] and urls[3] in line["receipt"]["data"]["items"]
    assert "/purge/" in line["receipt"]["member"]

    workers = Workers(cfg, tmp_path)
    workers.start()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), 60, what="all committed")
    finally:
        assert workers.stop_all() == [0], workers.tail(0)
    assert url_counts(emulator) == dict.fromkeys(urls, 1)  # the hand's purge only


def test_a_topic_made_by_another_writer_meanwhile_is_used_not_an_error(
    make_topic, kafka_bootstrap, monkeypatch
):
    """The receipts writer and feed (and every replica) may each find the topic missing and make
    it at once: the one the broker answers "already exists" goes on with it."""
    from kafka import KafkaAdminClient

    from worker.config.settings import KafkaSettings
    from worker.kafka import admin

    topic = make_topic("receipts")
    settings = KafkaSettings(bootstrap_servers=[kafka_bootstrap], topics=["cms"], group_id="g")
    # As the loser of the race sees it: missing when described, there when it is made.
    monkeypatch.setattr(
        KafkaAdminClient, "describe_topics", lambda self, topics: [{"error_code": admin.MISSING}]
    )
    assert admin.ensure_topic(settings, topic, 6, {}, "any layout") is False


def test_a_new_owners_wait_ends_once_the_receipts_written_before_it_are_read(
    make_topic, kafka_bootstrap
):
    """A worker given partitions waits on the feed's ``mark`` before their records meet its
    ledger: the previous owner wrote its last receipts as it let them go (its revocation waits
    until they are written), so the mark must not be set before those are read and handed over,
    and it must not cost the handover more than a poll or two."""
    from worker.config.settings import KafkaSettings
    from worker.kafka.receipt_feed import ReceiptFeed
    from worker.kafka.receipts import KafkaReceiptSink

    topic = make_topic("receipts")
    settings = KafkaSettings(bootstrap_servers=[kafka_bootstrap], topics=["cms"], group_id="g")
    sink = KafkaReceiptSink(settings, topic, "g/writer")
    feed = ReceiptFeed(settings, topic, time.time() - 60, 1000, member="g/reader").start()
    waits = []
    try:
        assert feed.mark().wait(15)  # the restore: a mark made while the feed starts waits for it
        for n in range(8):
            url = f"https://img.example-cdn.net/m{n}"
            write_receipt(sink, url)
            wait_for(sink.written, 10, what="the receipt written")
            started = time.monotonic()
            assert feed.mark().wait(5)
            waits.append(time.monotonic() - started)
            assert [key[3] for key, _ in feed.take()] == [url]  # read and handed over already
        idle = []  # nothing new written: the feed has read it all, and says so at once
        for _ in range(5):
            started = time.monotonic()
            assert feed.mark().wait(5)
            idle.append(time.monotonic() - started)
    finally:
        feed.close()
        sink.close(timeout=1.0)
    print(f"\nmark waits: {', '.join(f'{w * 1000:.0f} ms' for w in waits)}")
    print(f"mark waits, nothing new: {', '.join(f'{w * 1000:.0f} ms' for w in idle)}")
    assert max(waits) < 1.0  # a poll (100 ms) and the end offsets, with room for a slow CI
    # The end offsets asked beside the feed's fetch, not behind it (which took 50 to 200 ms).
    assert statistics.median(idle) < 0.05


def test_a_caught_up_feed_looks_about_once_a_second_and_at_once_for_a_mark(
    make_topic, kafka_bootstrap
):
    """Caught up and with nobody waiting, the feed reads what was written since about once a
    second: reading each receipt back as it was written cost a backlog's ingest a tenth (a fetch
    round and a thread's wake beside a busy loop, for receipts its own ledger knows). A mark
    still ends the pause at once."""
    from worker.config.settings import KafkaSettings
    from worker.kafka.receipt_feed import FOLLOW_EVERY, ReceiptFeed
    from worker.kafka.receipts import KafkaReceiptSink

    topic = make_topic("receipts")
    settings = KafkaSettings(bootstrap_servers=[kafka_bootstrap], topics=["cms"], group_id="g")
    sink = KafkaReceiptSink(settings, topic, "g/writer")
    feed = ReceiptFeed(settings, topic, time.time() - 60, 10_000, member="g/reader").start()

    def write(n):
        write_receipt(sink, f"https://img.example-cdn.net/f{n}")

    try:
        assert feed.mark().wait(15)  # restored: caught up
        feed.take()
        # A receipt every 50 ms for 3 s; the entries the loop takes every 20 ms come in lumps.
        lumps, learned, n = 0, 0, 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            if (time.monotonic() - started) >= n * 0.05:
                write(n)
                n += 1
            got = feed.take()
            lumps += bool(got)
            learned += len(got)
            time.sleep(0.02)
        # A mark in the middle of a pause is served in a poll, not at the pause's end.
        write(n)
        wait_for(sink.written, 10, what="the receipt written")
        time.sleep(0.05)  # the feed is in its pause now, whatever it read last
        marked = time.monotonic()
        assert feed.mark().wait(5)
        mark_wait = time.monotonic() - marked
        learned += len(feed.take())
    finally:
        feed.close()
        sink.close(timeout=1.0)
    print(f"\n{n + 1} receipts learned in {lumps} lumps; the mark waited {mark_wait * 1000:.0f} ms")
    assert learned == n + 1  # nothing is lost to the pause
    assert lumps <= 3.0 / FOLLOW_EVERY + 2  # a look a second (each look ~60 lumps before)
    assert mark_wait < 0.5 * FOLLOW_EVERY
