"""Reliability under faults, as an operator meets them: a real broker, worker processes, the
emulator's faults. Every test counts what was lost: each id purged or on the dead-letter topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from scripts.kafka_broker import Broker, free_port
from tests.conftest import TOKEN, ZONE_A
from tests.helpers import cloudevent, purged_items, purges, wait_for
from tests.kafka_helpers import (
    RunningWorker,
    Workers,
    all_committed,
    committed,
    image_events,
    kafka_config,
    produce,
    read_all,
    worker_config,
)
from worker.outcome.dead_letters import header

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def statuses(emulator) -> list[int]:
    return [
        r["status"] for r in requests.get(emulator.url + "/__emulator/requests", timeout=10).json()
    ]


def fault(emulator, **spec) -> None:
    requests.post(emulator.url + "/__emulator/faults", json=spec, timeout=5).raise_for_status()


# -- shutdown on time ----------------------------------------------------------------------------


def test_sigterm_during_an_api_outage_exits_within_the_drain_deadline_and_loses_nothing(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms", 2), make_topic("dlq")
    group = f"g-{unique}"
    deadline = 5.0
    hport = free_port()
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        delivery={
            "drain_deadline_seconds": deadline,
            "retry": {"budget_seconds": 600, "initial_backoff_seconds": 0.5},
        },
        # Probes on, to see that health answers until the process ends.
        observability={"health_port": hport},
    )
    n = 200
    fault(emulator, status=503, seconds=120)
    produce(kafka_bootstrap, topic, image_events(n), key=None)
    workers = Workers(cfg, tmp_path)
    proc = workers.start()
    wait_for(lambda: len(statuses(emulator)) >= 3, timeout=60, what="purges failing")
    health = []
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    while proc.poll() is None and time.monotonic() - sent < 60:
        try:
            health.append(
                requests.get(f"http://127.0.0.1:{hport}/healthz", timeout=0.5).status_code
            )
        except requests.RequestException:
            health.append(None)
        time.sleep(0.2)
    took = time.monotonic() - sent
    print(f"\nSIGTERM during an outage: exited after {took:.1f} s (deadline {deadline} s)")
    assert proc.poll() is not None, workers.tail(0)
    assert took <= deadline + 2, f"exited {took:.1f} s after SIGTERM (deadline {deadline} s)"
    assert health and health[0] == 200  # answered while draining
    assert not all_committed(kafka_bootstrap, group, topic)  # nothing purged: nothing committed
    # The outage ends; a new worker purges everything from the last commit: nothing lost.
    fault(emulator, clear=True)
    workers.start()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=90, what="commits")
    finally:
        workers.stop_all()
    assert set(purged_items(emulator)) == {f"https://img.example-cdn.net/u{i}" for i in range(n)}


# -- dead letters --------------------------------------------------------------------------------


def test_a_missing_dead_letter_topic_stops_start_up_with_one_line(
    emulator, make_topic, kafka_bootstrap, unique, tmp_path
):
    topic = make_topic("cms")
    cfg = worker_config(
        tmp_path, emulator, kafka_bootstrap, topic, f"no-such-dlq-{unique}", f"g-{unique}"
    )
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
    env.pop("KAFKA_BOOTSTRAP", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run", "-c", cfg],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert time.monotonic() - started < 30
    last = proc.stderr.strip().splitlines()[-1]
    assert f"no-such-dlq-{unique} does not exist" in last


def test_mixed_failures_purge_every_valid_target_and_dead_letter_the_rest(
    emulator, make_topic, kafka_bootstrap, unique, tmp_path
):
    """One rule for every failure class: valid targets go, the record is dead-lettered naming
    each target that failed and why."""
    from tests.helpers import make_config

    rules = [
        {
            "name": "mixed",
            "match": {"type": "mixed"},
            "urls": ["https://{data.host}/{data.path}"],
            "tags": ["{data.tag}"],
            "zone": "example.com",
        }
    ]
    config = make_config(emulator.api_url, rules=rules, coalesce={"window_seconds": 0.2})
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    fault(emulator, reject_items=["https://www.example.com/rejected"])
    events = [
        # an unknown host beside a good tag
        cloudevent("mixed", {"host": "elsewhere.org", "path": "a", "tag": "good-1"}, "unknown"),
        # an invalid tag (a space) beside a good URL
        cloudevent("mixed", {"host": "www.example.com", "path": "b", "tag": "bad tag"}, "invalid"),
        # a URL the API rejects beside a good tag
        cloudevent(
            "mixed", {"host": "www.example.com", "path": "rejected", "tag": "good-3"}, "rejected"
        ),
        # all good
        cloudevent("mixed", {"host": "www.example.com", "path": "c", "tag": "good-4"}, "fine"),
    ]
    produce(kafka_bootstrap, topic, events, key=None)
    worker = RunningWorker(kafka_config(config, kafka_bootstrap, topic, dlq, group))
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), what="commits")
    finally:
        worker.stop()
    purged = set(purged_items(emulator))
    assert purged >= {"good-1", "https://www.example.com/b", "good-3", "good-4"}
    assert "https://www.example.com/c" in purged
    assert "https://www.example.com/rejected" not in purged
    dead = {json.loads(r.value)["id"]: r for r in read_all(kafka_bootstrap, dlq)}
    assert set(dead) == {"unknown", "invalid", "rejected"}
    classes = {i: header(r.headers, "purge.error.class") for i, r in dead.items()}
    assert classes == {
        "unknown": "unknown_zone",
        "invalid": "invalid_target",
        "rejected": "api_rejected",
    }
    assert "elsewhere.org" in header(dead["unknown"].headers, "purge.error.message")
    assert "bad tag" in header(dead["invalid"].headers, "purge.error.message")
    assert "rejected" in header(dead["rejected"].headers, "purge.error.message")


def test_fifty_rejected_items_cost_about_k_log_n_requests(emulator_factory):
    """Only item rejections are bisected: 50 bad URLs among 500 cost at most 50·⌈log2 500⌉+1
    requests; an auth rejection costs one."""
    from worker.clock import SystemClock
    from worker.cloudflare.auth import Credentials, Secret
    from worker.cloudflare.client import CloudflareClient
    from worker.cloudflare.ratelimit import AccountRateLimiter
    from worker.cloudflare.retry import RetryPolicy
    from worker.cloudflare.tiers import Tier, limits_for
    from worker.sending.purger import Destination, Purger
    from worker.targets import Kind, Mode, Target

    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    urls = [f"https://www.example.com/p{i}" for i in range(500)]
    bad = set(urls[5::10])
    assert len(bad) == 50
    fault(emulator, reject_items=sorted(bad))

    def dest(token: str) -> Destination:
        client = CloudflareClient(Credentials(token=Secret(token)), base_url=emulator.api_url)
        limiter = AccountRateLimiter(limits_for(Tier.ENTERPRISE), SystemClock(), start_full=True)
        return Destination(ZONE_A, "example.com", client, limiter)

    purger = Purger(RetryPolicy(budget_seconds=5), SystemClock())
    result = purger.send(dest(TOKEN), Kind.FILES, Mode.PURGE, [Target.url(u) for u in urls])
    assert {t.value for t, _ in result.failed} == bad
    assert {t.value for t in result.accepted} == set(urls) - bad
    print(f"\n50 rejected of 500: {result.requests} requests (bound {50 * 9 + 1})")
    assert result.requests <= 50 * 9 + 1, result.requests
    wrong = purger.send(dest("wrong-token"), Kind.FILES, Mode.PURGE, [Target.url(u) for u in urls])
    assert wrong.requests == 1 and len(wrong.failed) == 500


# -- the guard across restarts -------------------------------------------------------------------


def test_a_crash_loop_moves_about_one_guards_worth_to_the_dead_letter_topic(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    min_records, ratio, poll = 40, 0.5, 10
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        max_poll_records=poll,
        delivery={
            "dead_letter_guard": {"min_records": min_records, "max_ratio": ratio},
            "drain_deadline_seconds": 5,
        },
    )
    # A bad deploy: 80 % of the records are invalid.
    values = []
    for i in range(1000):
        if i % 5 == 0:
            values.append(
                cloudevent(
                    "image.updated", {"host": "img.example-cdn.net", "path": f"ok{i}"}, f"e{i}"
                )
            )
        else:
            values.append(b"{not json")
    produce(kafka_bootstrap, topic, values, key=None)
    workers = Workers(cfg, tmp_path)
    dead_after = []
    for start in range(4):
        proc = workers.start()
        assert proc.wait(timeout=120) == 1, workers.tail(start)
        dead_after.append(len(read_all(kafka_bootstrap, dlq, timeout_s=2)))
    print(f"\ndead letters after each of 4 starts: {dead_after}")
    # Without memory each start dead-letters a guard's worth again (~32 here, ~130 in all).
    assert dead_after[-1] <= min_records * ratio + 2 * poll, dead_after
    assert dead_after[-1] - dead_after[0] <= poll, dead_after
    # Nothing lost: every record below the committed offset was purged or dead-lettered.
    done = committed(kafka_bootstrap, group, topic).get(0, 0)
    dead = {int(header(r.headers, "purge.original.offset")) for r in read_all(kafka_bootstrap, dlq)}
    purged = set(purged_items(emulator))
    for offset in range(done):
        if offset % 5 == 0:
            assert f"https://img.example-cdn.net/ok{offset}" in purged, offset
        else:
            assert offset in dead, offset


# -- the budget after a restart ------------------------------------------------------------------


def test_a_restart_after_a_tag_burst_on_the_free_plan_gets_no_429(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="free")
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        cloudflare__accounts={"main": {"plan": "free"}},
        coalesce={"window_seconds": 0},
    )
    # Another client (or the previous run) spent the account's whole tag bucket just now.
    for i in range(25):
        r = requests.post(
            f"{emulator.api_url}/zones/{ZONE_A}/purge_cache",
            json={"tags": [f"burst-{i}"]},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        assert r.status_code == 200
    events = [
        cloudevent("article.published", {"slug": f"s{i}", "locales": [], "id": i}, f"e{i}")
        for i in range(2)
    ]
    produce(kafka_bootstrap, topic, events, key=None, partition=0)
    workers = Workers(cfg, tmp_path)
    workers.start()
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=90, what="commits")
    finally:
        workers.stop_all()
    assert statuses(emulator).count(429) == 0
    tags = [
        p for p in purges(emulator) if p["kind"] == "tags" and p["items"][0].startswith("article")
    ]
    assert tags, "the events' tags were purged"


# -- replay ----------------------------------------------------------------------------------------


def test_replay_interrupted_with_ctrl_c_exits_130_quickly_and_resumes(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="free")
    topic, dlq = make_topic("cms"), make_topic("dlq")
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        f"g-{unique}",
        cloudflare__accounts={"main": {"plan": "free"}},
    )
    # Dead letters whose replay needs the free plan's slow tag budget: it takes minutes.
    from worker.errors import InvalidEvent
    from worker.events import Record
    from worker.outcome.dead_letters import headers_for

    values, hdrs = [], []
    for i in range(20):
        value = cloudevent("article.published", {"slug": f"s{i}", "locales": [], "id": i}, f"e{i}")
        values.append(value)
        hdrs.append(
            headers_for(
                Record(topic, 0, i, None, value, ()), [InvalidEvent("x")], failed_at=time.time()
            )
        )
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for value, h in zip(values, hdrs, strict=True):
        producer.send(dlq, value=value, headers=h)
    producer.flush()
    producer.close()
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
    env.pop("KAFKA_BOOTSTRAP", None)
    argv = [sys.executable, "-m", "worker", "replay", "-c", cfg, "--from", dlq]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: len(statuses(emulator)) >= 1, timeout=60, what="replay purging")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    print(f"\nreplay returned {took:.2f} s after Ctrl-C, exit {proc.returncode}")
    assert proc.returncode == 130, err
    assert took <= 2.5, f"took {took:.1f} s"
    assert "run again to resume" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["scanned"] >= 1


# -- a broker outage -------------------------------------------------------------------------------


def test_a_broker_outage_never_stalls_purging_and_readyz_says_so(
    emulator_factory, tmp_path, unique
):
    """The broker dies for 30 s with records in memory and commits due: purges keep going,
    /healthz stays up (the loop is alive), /readyz turns 503, and once the broker is back
    everything is committed; nothing is lost."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    broker = Broker().start()
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic("cms", 2, 1), NewTopic("dlq", 1, 1)])
        admin.close()
        group = f"g-{unique}"
        hport = free_port()
        cfg = worker_config(
            tmp_path,
            emulator,
            broker.bootstrap,
            "cms",
            "dlq",
            group,
            # One URL a request, a request at a time, 150 ms each: purging takes ~40 s.
            cloudflare__accounts={"main": {"plan": "enterprise", "files_per_request": 1}},
            delivery={"concurrency": 1},
            coalesce={"window_seconds": 0.1},
            observability={"health_port": hport, "ready_kafka_timeout_seconds": 5},
        )
        n = 250
        fault(emulator, latency_ms=150)
        produce(broker.bootstrap, "cms", image_events(n), key=None)
        workers = Workers(cfg, tmp_path)
        worker = workers.start()

        def probe(path: str) -> int | None:
            try:
                return requests.get(f"http://127.0.0.1:{hport}{path}", timeout=1).status_code
            except requests.RequestException:
                return None

        try:
            wait_for(lambda: len(purged_items(emulator)) >= 20, timeout=60, what="purging")
            wait_for(lambda: probe("/readyz") == 200, timeout=30, what="ready")
            broker.kill()
            down_at = time.monotonic()
            before = len(purged_items(emulator))
            ready, healthy = [], []
            while time.monotonic() - down_at < 30:
                ready.append(probe("/readyz"))
                healthy.append(probe("/healthz"))
                time.sleep(1)
            during = len(purged_items(emulator)) - before
            broker.restart()
            wait_for(
                lambda: all_committed(broker.bootstrap, group, "cms"),
                timeout=120,
                what="commits after the broker came back",
            )
            assert worker.poll() is None, workers.tail(0)
        finally:
            codes = workers.stop_all()
        assert codes == [0], workers.tail(0)
        print(f"\nbroker down 30 s: {during} URLs purged meanwhile; readyz {ready}")
        # Purging went on at its pace (about 6/s here) while the broker was away.
        assert during >= 100, during
        assert all(h == 200 for h in healthy), healthy
        assert 503 in ready[-20:], ready
        assert set(purged_items(emulator)) == {
            f"https://img.example-cdn.net/u{i}" for i in range(n)
        }
    finally:
        broker.cleanup()
