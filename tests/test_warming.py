"""Warming and verification: the emulator's edge, the `warm` rule key, the warmer against a real
HTTP server, and the whole loop through a real broker."""

import json
import time

import pytest
import requests

from tests.conftest import TOKEN, ZONE_A
from tests.helpers import cloudevent, make_config, purged_items, wait_for
from tests.kafka_helpers import Workers, all_committed, produce, worker_config
from worker.clock import SystemClock
from worker.commands.explain import explain
from worker.errors import ConfigError
from worker.events import Record
from worker.outcome.warming import Warmer
from worker.planning.planner import Planner

PAGE = "https://www.example.com/a/1"


def edge_get(emulator, url, **headers):
    path = url.split("://", 1)[1].split("/", 1)[1]
    host = url.split("://", 1)[1].split("/", 1)[0]
    resp = requests.get(f"{emulator.url}/{path}", headers={"Host": host, **headers}, timeout=5)
    return resp.status_code, resp.headers["CF-Cache-Status"]


def purge(emulator, body):
    resp = requests.post(
        f"{emulator.api_url}/zones/{ZONE_A}/purge_cache",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text


# -- the emulator's edge --------------------------------------------------------------------------


def test_the_edge_misses_once_hits_until_purged_then_misses_again(emulator):
    assert edge_get(emulator, PAGE) == (200, "MISS")
    assert edge_get(emulator, PAGE) == (200, "HIT")
    purge(emulator, {"files": [PAGE]})
    assert edge_get(emulator, PAGE) == (200, "MISS")
    assert edge_get(emulator, PAGE) == (200, "HIT")


def test_the_edge_keeps_variants_apart_and_purges_by_tag_host_and_prefix(emulator):
    edge_get(emulator, PAGE, **{"CF-Device-Type": "mobile"})
    edge_get(emulator, PAGE)
    purge(emulator, {"files": [{"url": PAGE, "headers": {"CF-Device-Type": "mobile"}}]})
    assert edge_get(emulator, PAGE)[1] == "HIT"  # the plain variant was not purged
    assert edge_get(emulator, PAGE, **{"CF-Device-Type": "mobile"})[1] == "MISS"
    requests.post(
        f"{emulator.url}/__emulator/edge/tags", json={"url": PAGE, "tags": ["a-1"]}, timeout=5
    )
    purge(emulator, {"tags": ["a-1"]})
    assert edge_get(emulator, PAGE)[1] == "MISS"
    purge(emulator, {"hosts": ["www.example.com"]})
    assert edge_get(emulator, PAGE)[1] == "MISS"
    purge(emulator, {"prefixes": ["www.example.com/a"]})
    assert edge_get(emulator, PAGE)[1] == "MISS"
    purge(emulator, {"prefixes": ["www.example.com/ab"]})  # not on a path boundary
    assert edge_get(emulator, PAGE)[1] == "HIT"


def test_an_origin_error_is_not_cached(emulator):
    requests.post(f"{emulator.url}/__emulator/faults", json={"edge_status": 503}, timeout=5)
    assert edge_get(emulator, PAGE) == (503, "MISS")
    assert edge_get(emulator, PAGE) == (503, "MISS")


# -- the rule key ---------------------------------------------------------------------------------


def warm_config(api_url, rules, **warming):
    return make_config(api_url, rules=rules, warming={"delay_seconds": 0.2, **warming})


def record(data, type_="article.updated"):
    return Record("cms", 0, 0, None, cloudevent(type_, data), (), None)


def test_warm_true_warms_each_purged_url_per_variant_and_a_list_warms_what_it_names():
    rules = [
        {
            "name": "page",
            "match": {"type": "article.updated"},
            "urls": [
                {
                    "url": "https://www.example.com/a/{data.id}",
                    "headers": {"CF-Device-Type": ["mobile", "desktop"]},
                }
            ],
            "warm": True,
        },
        {
            "name": "tagged",
            "match": {"type": "article.updated"},
            "tags": ["article-{data.id}"],
            "zone": "example.com",
            "warm": ["https://www.example.com/list/{data.id}"],
        },
    ]
    config = warm_config("http://127.0.0.1:9", rules)
    plan = Planner(config.planning).plan(record({"id": "7"}))
    warm = [(r.target.value, dict(r.target.headers)) for r in plan.warm]
    assert warm == [
        ("https://www.example.com/a/7", {"CF-Device-Type": "mobile"}),
        ("https://www.example.com/a/7", {"CF-Device-Type": "desktop"}),
        ("https://www.example.com/list/7", {}),
    ]
    # The list's URL is warmed, not purged.
    assert "https://www.example.com/list/7" not in [r.target.value for r in plan.targets]
    out, code = explain(record({"id": "7"}), config)
    assert (
        code == 0
        and {"zone": "example.com", "url": "https://www.example.com/list/7"} in out["warm"]
    )


@pytest.mark.parametrize(
    ("warm", "reason"),
    [("yes", "must be true, false or a list"), ([], "must be true, false or a list")],
)
def test_a_bad_warm_key_names_the_rule(warm, reason):
    rules = [{"name": "r", "match": {"type": "x"}, "urls": ["https://example.com/"], "warm": warm}]
    with pytest.raises(ConfigError) as err:
        warm_config("http://127.0.0.1:9", rules)
    assert "rules[r].warm" in str(err.value) and reason in str(err.value)


def test_warm_true_needs_urls_to_warm():
    rules = [{"name": "r", "match": {"type": "x"}, "tags": ["t"], "zone": "example.com"}]
    rules[0]["warm"] = True
    with pytest.raises(ConfigError, match="it has none"):
        warm_config("http://127.0.0.1:9", rules)


# -- the warmer, against a real HTTP server -------------------------------------------------------


def routed(config, *urls):
    plan = Planner(config.planning)
    from worker.planning.planner import RecordPlan
    from worker.targets import Target

    return plan.route_warm([Target.url(u) for u in urls], RecordPlan()).warm


def test_the_warmer_waits_the_delay_paces_each_zone_and_reads_the_cache_status(emulator):
    rules = [{"name": "r", "match": {"type": "x"}, "urls": ["https://www.example.com/"]}]
    config = warm_config(
        emulator.api_url, rules, via=emulator.url, requests_per_second=10, delay_seconds=0.5
    )
    urls = [f"https://www.example.com/p/{i}" for i in range(6)]
    for u in urls[:3]:
        edge_get(emulator, u)  # cached before: these answer HIT (the purge "did not happen")
    warmer = Warmer(config.warming, SystemClock()).start()
    try:
        start = time.monotonic()
        assert warmer.submit(routed(config, *urls)) == 6
        assert warmer.submit(routed(config, *urls)) == 0  # already waiting
        wait_for(lambda: len(requests.get(emulator.url + "/__emulator/edge").json()) >= 9)
        took = time.monotonic() - start
    finally:
        warmer.close()
    log = requests.get(emulator.url + "/__emulator/edge", timeout=5).json()[3:]
    assert [e["cache_status"] for e in log] == ["HIT"] * 3 + ["MISS"] * 3
    assert {e["user_agent"] for e in log} == {"purge-worker cache warmer"}
    # Six requests at 10/s after a 0.5 s delay: at least 0.5 + 5 * 0.1 s.
    assert took >= 1.0


def test_a_full_queue_drops_its_oldest_urls(emulator):
    rules = [{"name": "r", "match": {"type": "x"}, "urls": ["https://www.example.com/"]}]
    config = warm_config(emulator.api_url, rules, via=emulator.url, queue_size=3, delay_seconds=60)
    warmer = Warmer(config.warming, SystemClock())  # not started: nothing leaves the queue
    urls = [f"https://www.example.com/p/{i}" for i in range(5)]
    assert warmer.submit(routed(config, *urls)) == 5
    assert warmer.queued == 3
    kept = [job.url for q in warmer._queues.values() for job in q]
    assert kept == urls[2:]


# -- the whole loop, through a real broker --------------------------------------------------------

WARM_RULES = [
    {
        "name": "article",
        "match": {"type": "article.updated"},
        "urls": ["https://www.example.com/a/{data.id}"],
        "tags": ["article-{data.id}"],
        "zone": "example.com",
        "warm": True,
    },
    {
        "name": "section",
        "match": {"type": "section.changed"},
        "tags": ["section-{data.id}"],
        "zone": "example.com",
        "warm": ["https://www.example.com/s/{data.id}"],
    },
]


def edge_log(emulator):
    return requests.get(emulator.url + "/__emulator/edge", timeout=5).json()


@pytest.mark.kafka
def test_purged_pages_are_warmed_and_a_purge_that_missed_is_caught(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        rules=WARM_RULES,
        coalesce={"window_seconds": 0.2},
        warming={"via": emulator.url, "delay_seconds": 0.5, "requests_per_second": 20},
    )
    # The section page is cached, tagged with another section's tag: purging section-5 misses
    # it, which is what warming is there to notice.
    edge_get(emulator, "https://www.example.com/s/5")
    requests.post(
        f"{emulator.url}/__emulator/edge/tags",
        json={"url": "https://www.example.com/s/5", "tags": ["section-6"]},
        timeout=5,
    )
    for i in range(10):
        edge_get(emulator, f"https://www.example.com/a/{i}")  # cached before the change
    events = [cloudevent("article.updated", {"id": str(i)}, f"e{i}") for i in range(10)]
    events.append(cloudevent("section.changed", {"id": "5"}, "s5"))
    workers = Workers(cfg, tmp_path)
    try:
        workers.start()
        published = time.monotonic()
        produce(kafka_bootstrap, topic, events)
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=60, what="commit")
        wait_for(lambda: len(edge_log(emulator)) >= 11 + 11, timeout=30, what="warm requests")
        warmed_by = time.monotonic() - published
    finally:
        codes = workers.stop_all()
    assert codes == [0]
    assert len(purged_items(emulator, "files")) == 10
    warm = edge_log(emulator)[11:]
    assert {e["user_agent"] for e in warm} == {"purge-worker cache warmer"}
    status = {e["url"]: e["cache_status"] for e in warm}
    assert all(status[f"www.example.com/a/{i}"] == "MISS" for i in range(10))
    assert status["www.example.com/s/5"] == "HIT"
    # After warming, the next visitor is served from the cache.
    assert edge_get(emulator, "https://www.example.com/a/3") == (200, "HIT")
    log = workers.log(0)
    caught = [json.loads(x) for x in log.splitlines() if "did not take effect" in x]
    assert [c["url"] for c in caught] == ["https://www.example.com/s/5"]
    print(f"\nwarmed 11 URLs {warmed_by:.1f} s after publishing (delay 0.5 s, 20/s)")


@pytest.mark.kafka
def test_warming_never_holds_back_commits_with_a_failing_origin_or_a_full_queue(
    emulator_factory, make_topic, kafka_bootstrap, unique, tmp_path
):
    emulator = emulator_factory(plan="enterprise", rate_limits=False)
    requests.post(f"{emulator.url}/__emulator/faults", json={"edge_status": 503}, timeout=5)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        rules=WARM_RULES,
        coalesce={"window_seconds": 0.2},
        warming={
            "via": emulator.url,
            "delay_seconds": 0,
            "requests_per_second": 1,
            "queue_size": 5,
            "concurrency": 1,
        },
    )
    n = 300
    events = [cloudevent("article.updated", {"id": str(i)}, f"e{i}") for i in range(n)]
    workers = Workers(cfg, tmp_path)
    try:
        workers.start()
        wait_for(lambda: "worker started" in workers.log(0), timeout=30, what="start")
        start = time.monotonic()
        produce(kafka_bootstrap, topic, events)
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), timeout=60, what="commit")
        took = time.monotonic() - start
        warm_requests = len(edge_log(emulator))
    finally:
        codes = workers.stop_all()
    assert codes == [0]
    assert len(set(purged_items(emulator, "files"))) == n
    # At one warm request a second the queue holds 5 of 300 URLs: everything committed long
    # before warming could have got through them, and no record waited for it.
    assert warm_requests < 30
    assert took < 20, took
    assert "dead-lettered" not in workers.log(0)


def test_purge_warm_prints_what_the_edge_answered(emulator, tmp_path, monkeypatch, capsys):
    from tests.helpers import write_config
    from worker.cli import main

    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    cfg = write_config(
        tmp_path / "c.yaml",
        emulator.api_url,
        warming={"via": emulator.url, "delay_seconds": 0.1},
    )
    edge_get(emulator, PAGE)
    edge_get(emulator, PAGE, **{"CF-Device-Type": "mobile"})
    assert main(["purge", "-c", cfg, "--url", PAGE, "--warm"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    warm = [x for x in lines if x.get("warm")]
    assert warm == [
        {"warm": True, "zone": "example.com", "url": PAGE, "status": 200, "cache_status": "miss"}
    ]
    # Only the variant purged was warmed; the mobile one stayed cached.
    assert edge_get(emulator, PAGE, **{"CF-Device-Type": "mobile"})[1] == "HIT"
