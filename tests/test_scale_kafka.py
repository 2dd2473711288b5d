"""Scale-out and failure tests: several worker processes, one consumer group, a real broker."""

import json
import signal
import threading
import time
from datetime import datetime

import pytest
import requests

from scripts.kafka_broker import Broker
from tests.conftest import ZONE_A, ZONE_B
from tests.helpers import purged_items, wait_for
from tests.kafka_helpers import (
    Workers,
    all_committed,
    image_events,
    produce,
    read_all,
    worker_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_three_workers_joining_and_leaving_lose_nothing(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms", 6), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path, emulator, kafka_bootstrap, topic, dlq, group, coalesce={"window_seconds": 0.5}
    )
    n = 12_000
    events = image_events(n)
    workers = Workers(cfg, tmp_path)

    def stream():  # about 1,000 events a second for 12 seconds
        for start in range(0, n, 500):
            produce(kafka_bootstrap, topic, events[start : start + 500], key=None)
            time.sleep(0.5)

    producer = threading.Thread(target=stream)
    try:
        first = workers.start()
        producer.start()
        time.sleep(2)
        second = workers.start()
        time.sleep(2)
        workers.start()
        time.sleep(3)
        first.send_signal(signal.SIGTERM)  # leaves cleanly: drains and commits
        assert first.wait(timeout=60) == 0, workers.tail(0)
        time.sleep(2)
        second.send_signal(signal.SIGKILL)  # dies: its partitions move after the session timeout
        second.wait(timeout=10)
        producer.join()
        wait_for(
            lambda: all_committed(kafka_bootstrap, group, topic),
            timeout=120,
            what="the group to commit everything",
        )
    finally:
        producer.join()
        workers.stop_all()
    items = purged_items(emulator)
    expected = {f"https://img.example-cdn.net/u{i}" for i in range(n)}
    assert set(items) == expected, f"missing {len(expected - set(items))}"
    print(
        f"\nscale-out: {n} targets, {len(items) - n} duplicate purges "
        f"({(len(items) - n) / n:.1%}) across joins, a clean leave and a kill -9"
    )
    assert read_all(kafka_bootstrap, dlq, timeout_s=2) == []


@pytest.mark.parametrize(("plan", "urls_per_s"), [("free", 800), ("pro", 1500)])
def test_rate_budget_holds_across_three_replicas(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path, plan, urls_per_s
):
    emulator = emulator_factory(plan=plan)
    topic, dlq = make_topic("cms", 6), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        cloudflare={
            "base_url": emulator.api_url,
            "accounts": {"main": {"plan": plan}},
            "zones": [
                {"name": "a", "id": ZONE_A, "hosts": ["example.com"]},
                {"name": "cdn", "id": ZONE_B, "hosts": ["img.example-cdn.net"]},
            ],
        },
        coalesce={"window_seconds": 0.5},
    )
    n = urls_per_s * 12
    events = image_events(n)
    workers = Workers(cfg, tmp_path)
    try:
        # Three replicas up and settled (two partitions each), then a burst arrives, spread
        # evenly over the partitions: this measures how they split the account's budget.
        for _ in range(3):
            workers.start()
        # The shares settle before the assignment can: wait for both, or a burst may land on
        # one replica that a rebalance then interrupts mid-drain.
        in_group = settled(workers, 3, 6)
        wait_for(
            lambda: in_group() and all('"share": 0.333' in workers.log(i) for i in range(3)),
            timeout=60,
            what="three replicas with two partitions and a third of the budget each",
        )
        produce(kafka_bootstrap, topic, events, key=None, spread=6)
        wait_for(
            lambda: all_committed(kafka_bootstrap, group, topic),
            timeout=120,
            what="everything committed",
        )
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0, 0]
    urls, rate, busiest, r429 = url_rate(emulator)
    print(
        f"\n{plan}: 3 replicas sent {urls} URLs at {rate:.0f} URL/s "
        f"({rate / urls_per_s:.2f} of {urls_per_s}); 429s: {r429}"
    )
    assert r429 == 0
    assert rate >= 0.8 * urls_per_s
    # Cloudflare meters URLs per moving second: no second may hold more than the plan allows.
    assert busiest <= urls_per_s
    assert set(purged_items(emulator)) == {f"https://img.example-cdn.net/u{i}" for i in range(n)}


def test_broker_restart_mid_stream_loses_nothing(emulator_factory, tmp_path, unique):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    broker = Broker().start()
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic("cms", 3, 1), NewTopic("dlq", 1, 1)])
        admin.close()
        group = f"g-{unique}"
        cfg = worker_config(
            tmp_path,
            emulator,
            broker.bootstrap,
            "cms",
            "dlq",
            group,
            coalesce={"window_seconds": 0.3},
        )
        n = 3000
        produce(broker.bootstrap, "cms", image_events(n, "a"), key=None)
        requests.post(emulator.url + "/__emulator/faults", json={"latency_ms": 100}, timeout=5)
        workers = Workers(cfg, tmp_path)
        worker = workers.start()
        try:
            wait_for(
                lambda: len(purged_items(emulator)) >= 300, timeout=60, what="purging to start"
            )
            broker.stop()
            time.sleep(5)
            broker.restart()
            requests.post(emulator.url + "/__emulator/faults", json={"clear": True}, timeout=5)
            produce(broker.bootstrap, "cms", image_events(500, "b"), key=None)
            wait_for(
                lambda: all_committed(broker.bootstrap, group, "cms"),
                timeout=120,
                what="commits after the broker came back",
            )
            assert worker.poll() is None, "the worker should have reconnected, not exited"
        finally:
            codes = workers.stop_all()
        assert codes == [0], workers.tail(0)
        expected = {f"https://img.example-cdn.net/a{i}" for i in range(n)}
        expected |= {f"https://img.example-cdn.net/b{i}" for i in range(500)}
        assert set(purged_items(emulator)) == expected
    finally:
        broker.cleanup()


PRO = 1500


def url_figures(emulator):
    """URLs purged, the busiest calendar second, and the 429s: what the emulator recorded."""
    urls, _, busiest, r429 = url_rate(emulator)
    return urls, busiest, r429


def url_rate(emulator):
    """URLs purged, their rate from the first request to the last, the busiest calendar second
    and the 429s."""
    purges = requests.get(emulator.url + "/__emulator/purges", timeout=10).json()
    statuses = [
        r["status"] for r in requests.get(emulator.url + "/__emulator/requests", timeout=10).json()
    ]
    per_second: dict[int, int] = {}
    times = []
    for p in purges:
        if p["kind"] == "files":
            t = datetime.fromisoformat(p["received_at"].replace("Z", "+00:00")).timestamp()
            times.append(t)
            per_second[int(t)] = per_second.get(int(t), 0) + len(p["items"])
    urls = sum(per_second.values())
    rate = urls / (max(times) - min(times))
    return urls, rate, max(per_second.values()), statuses.count(429)


def pro_account(emulator):
    return {
        "base_url": emulator.api_url,
        "accounts": {"main": {"plan": "pro", "files_per_request": 100}},
        "zones": [
            {"name": "a", "id": ZONE_A, "hosts": ["example.com"]},
            {"name": "cdn", "id": ZONE_B, "hosts": ["img.example-cdn.net"]},
        ],
    }


def settled(workers, count, partitions):
    """Every worker splits by demand and the group's assignment is done: the last assignment
    each worker logged adds up to all the partitions."""

    def check():
        total = 0
        for i in range(count):
            text = workers.log(i)
            lines = [json.loads(x) for x in text.splitlines() if '"partitions assigned"' in x]
            if '"decided_by": "demand"' not in text or not lines:
                return False
            total += len(lines[-1]["partitions"])
        return total == partitions

    return check


def test_three_replicas_with_all_traffic_on_one_partition_reach_the_plans_rate(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    """The replica holding the hot partition takes what the idle ones do not want."""
    emulator = emulator_factory(plan="pro")
    topic, dlq = make_topic("cms", 6), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        cloudflare=pro_account(emulator),
        coalesce={"window_seconds": 0.5},
    )
    # Forty seconds' worth: the split takes a second or two to follow a burst that arrives at
    # an idle group, and the figure is about the rate after that.
    n = PRO * 40
    workers = Workers(cfg, tmp_path)
    try:
        for _ in range(3):
            workers.start()
        wait_for(settled(workers, 3, 6), timeout=60, what="group settled, split by demand")
        produce(kafka_bootstrap, topic, image_events(n), key=None, partition=0)
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=200, what="drained")
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0, 0]
    urls, rate, busiest, r429 = url_rate(emulator)
    print(
        f"\nskewed, 3 replicas: {urls} URLs at {rate:.0f}/s ({rate / PRO:.2f} of {PRO}), "
        f"busiest second {busiest}, 429s {r429}"
    )
    assert set(purged_items(emulator)) == {f"https://img.example-cdn.net/u{i}" for i in range(n)}
    assert r429 == 0
    assert busiest <= PRO
    assert rate >= 0.9 * PRO


def test_two_groups_on_one_account_share_its_budget_without_429s(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    """Two sites, two consumer groups, one Cloudflare account: one budget topic, one split."""
    emulator = emulator_factory(plan="pro")
    exchange = f"budget-{unique}"
    workers, groups = Workers(None, tmp_path), []
    for site in ("news", "shop"):
        topic, dlq = make_topic(f"cms-{site}", 3), make_topic(f"dlq-{site}")
        group = f"{site}-{unique}"
        groups.append((group, topic))
        workers.cfg = worker_config(
            tmp_path,
            emulator,
            kafka_bootstrap,
            topic,
            dlq,
            group,
            path=tmp_path / f"{site}.yaml",
            budget_topic=exchange,
            cloudflare=pro_account(emulator),
            coalesce={"window_seconds": 0.5},
        )
        workers.start()
    n = PRO * 15  # long enough that the first second's split weighs little
    try:
        wait_for(settled(workers, 2, 6), timeout=60, what="groups settled, split by demand")
        # Both sites publish at once (one after the other, the first group would drain alone
        # for the second or so the other's events take to write, and the rate would measure
        # the producer).
        events = [image_events(n, site) for site in ("news", "shop")]
        writers = [
            threading.Thread(
                target=produce, args=(kafka_bootstrap, topic, values), kwargs={"key": None}
            )
            for (_, topic), values in zip(groups, events, strict=True)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        for group, topic in groups:
            wait_for(
                lambda g=group, t=topic: all_committed(kafka_bootstrap, g, t),
                timeout=150,
                what=f"{group} drained",
            )
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0]
    urls, rate, busiest, r429 = url_rate(emulator)
    print(
        f"\ntwo groups: {urls} URLs at {rate:.0f}/s together ({rate / PRO:.2f} of {PRO}), "
        f"busiest second {busiest}, 429s {r429}"
    )
    expected = {f"https://img.example-cdn.net/{s}{i}" for s in ("news", "shop") for i in range(n)}
    assert set(purged_items(emulator)) == expected
    assert r429 == 0
    assert busiest <= PRO
    assert rate >= 0.9 * PRO


def test_replicas_joining_mid_drain_repeat_almost_nothing_and_lose_nothing(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    """When the group starts rebalancing, the busy worker sends nothing new, lets its requests in
    flight end and commits what they finish before it rejoins (when it sees the rebalance
    between polls; the unit tests hold that step); finished records of partitions that move are
    committed before they move, and nothing is lost. The budget split follows demand, not
    partitions, so handovers cost no 429 and no second goes above the plan. The issue's goal:
    at most 0.5 % purged twice (4.8 % before commit-on-handover; 100-300 of 30,000 when requests
    in flight at the handover were redone by the new owner)."""
    emulator = emulator_factory(plan="pro")
    topic, dlq = make_topic("cms", 6), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        cloudflare={
            "base_url": emulator.api_url,
            "accounts": {"main": {"plan": "pro", "files_per_request": 100}},
            "zones": [
                {"name": "a", "id": ZONE_A, "hosts": ["example.com"]},
                {"name": "cdn", "id": ZONE_B, "hosts": ["img.example-cdn.net"]},
            ],
        },
        coalesce={"window_seconds": 0.5},
    )
    n = PRO * 20
    produce(kafka_bootstrap, topic, image_events(n), key=None)
    workers = Workers(cfg, tmp_path)
    try:
        workers.start()
        wait_for(lambda: len(purged_items(emulator)) >= PRO * 4, timeout=60, what="draining")
        workers.start()
        workers.start()
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=150, what="drained")
    finally:
        codes = workers.stop_all()
    assert codes == [0, 0, 0]
    items = purged_items(emulator)
    assert set(items) == {f"https://img.example-cdn.net/u{i}" for i in range(n)}
    repeated = len(items) - n
    _, busiest, r429 = url_figures(emulator)
    print(
        f"\njoining mid-drain: {repeated} of {n} purged twice ({repeated / n:.2%}), "
        f"busiest second {busiest} URLs, 429s {r429}"
    )
    assert "committed finished records before handing partitions over" in workers.log(0)
    assert repeated <= 0.005 * n
    assert r429 == 0
    assert busiest <= PRO


def test_a_starting_worker_has_read_every_report_before_its_own_once_it_reads_its_own_back(
    make_topic, kafka_bootstrap
):
    """The budget topic is one ordered log: a worker that has read its own first report back
    has read every report written before it, so it may decide it is alone without waiting
    out the delivery bound; one that starts after it hears it."""
    from worker.clock import SystemClock
    from worker.config.settings import KafkaSettings
    from worker.kafka.exchange import KafkaBudgetExchange
    from worker.sending.split import Demand, Report

    topic = make_topic("shares")
    settings = KafkaSettings(bootstrap_servers=[kafka_bootstrap], topics=["cms"], group_id="g")
    report = {"acct": Report(0.0, Demand(1.0, 0.0), -1, 0.001)}
    first = KafkaBudgetExchange(settings, topic, SystemClock())
    first.publish(report)
    first.start()
    second = None
    try:
        wait_for(lambda: first.read_back, timeout=20, what="the first report read back")
        assert first.caught_up
        assert first.board.heard("acct", 0.0) == {first.member}
        second = KafkaBudgetExchange(settings, topic, SystemClock())
        second.publish(report)
        second.start()
        wait_for(lambda: second.read_back, timeout=20, what="the second report read back")
        assert second.board.heard("acct", 0.0) == {first.member, second.member}
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_report_the_others_act_on_goes_out_at_once(make_topic, kafka_bootstrap):
    """A member giving its share back (or wanting budget) is waited for by a burst elsewhere:
    its report goes when published, not at the next quarter-second send."""
    import statistics

    from worker.clock import SystemClock
    from worker.config.settings import KafkaSettings
    from worker.kafka.exchange import KafkaBudgetExchange
    from worker.sending.split import Demand, Report

    topic = make_topic("shares")
    settings = KafkaSettings(bootstrap_servers=[kafka_bootstrap], topics=["cms"], group_id="g")
    sender = KafkaBudgetExchange(settings, topic, SystemClock())
    reader = KafkaBudgetExchange(settings, topic, SystemClock())
    sender.publish({"acct": Report(0.0, Demand(0.0, 0.0), 5, 0.333)})
    reader.publish({"acct": Report(0.0, Demand(0.0, 0.0), 5, 0.333)})
    sender.start()
    reader.start()

    def seen():
        return reader.board.latest("acct", 0.0).get(sender.member)

    took = []
    try:
        wait_for(lambda: seen() is not None, timeout=20, what="the sender's report read")
        for i in range(6):
            last = seen()
            # Right after a periodic send arrived: the next one is a quarter second away.
            wait_for(lambda last=last: seen() != last, 5, 0.002, "a periodic send")
            allowed = 0.005 if i % 2 == 0 else 0.333
            published = time.monotonic()
            sender.publish({"acct": Report(0.0, Demand(0.0, 0.0), 5, allowed)})
            wait_for(lambda a=allowed: seen().allowed == a, 5, 0.002, "the new share read")
            took.append(time.monotonic() - published)
    finally:
        sender.close()
        reader.close()
    print(f"\nread by the other member after {[round(t, 3) for t in took]} s")
    assert statistics.median(took) < 0.15
