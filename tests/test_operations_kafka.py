"""A worker process as operators see it: /metrics moving, probes answering, secrets nowhere."""

import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from scripts.kafka_broker import free_port
from tests.conftest import TOKEN
from tests.helpers import cloudevent, purged_items, wait_for, write_config
from tests.kafka_helpers import all_committed, produce, read_all
from worker.outcome.dead_letters import header

pytestmark = pytest.mark.kafka


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_worker(cfg, token, log_level="info"):
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": token}
    env.pop("KAFKA_BOOTSTRAP", None)
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "-c", cfg],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_metrics_move_and_probes_answer(emulator, make_topic, kafka_bootstrap, unique, tmp_path):
    topic, dlq = make_topic("cms", 2), make_topic("dlq")
    mport, hport = free_port(), free_port()
    group = f"g-{unique}"
    cfg = write_config(
        tmp_path / "c.yaml",
        emulator.api_url,
        kafka={
            "bootstrap_servers": [kafka_bootstrap],
            "topics": [topic],
            "dead_letter_topic": dlq,
            "group_id": group,
        },
        observability={"metrics_port": mport, "health_port": hport},
    )
    proc = start_worker(cfg, TOKEN)
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{hport}/readyz") == 200, what="readyz")
        assert _get(f"http://127.0.0.1:{hport}/healthz") == 200
        assert _get(f"http://127.0.0.1:{hport}/nope") == 404
        before = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
        assert metric(before, "purge_worker_records_total") == 0
        produce(
            kafka_bootstrap,
            topic,
            [
                cloudevent("article.published", {"slug": f"s{i}", "locales": ["en", "de"], "id": i})
                for i in range(20)
            ]
            + [b"garbage"],
            key=None,
        )
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), what="commits")

        def settled():
            # The lag is reported every few seconds (from the start, partitions not read yet
            # included) and the demand counts the last second's sends: both fall to 0 soon
            # after the last commit, not at it.
            text = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
            demand = metric(text, "purge_worker_rate_budget_demand", account="main", budget="urls")
            lag = metric(text, "purge_worker_consumer_lag", topic=topic)
            return text if "purge_worker_consumer_lag{" in text and lag == demand == 0 else None

        text = wait_for(settled, timeout=20, what="lag and demand at 0")
        assert metric(text, "purge_worker_records_total", topic=topic, outcome="purged") == 20
        assert metric(text, "purge_worker_records_total", topic=topic, outcome="dead_lettered") == 1
        assert metric(text, "purge_worker_dead_letters_total", error_class="invalid_event") == 1
        assert metric(text, "purge_worker_targets_total", kind="files") == 20 * 4
        assert metric(text, "purge_worker_targets_total", kind="tags") == 20
        sent = metric(text, "purge_worker_items_sent_total")
        assert 0 < sent <= 20 * 5
        assert metric(text, "purge_worker_api_requests_total", status="2xx") >= 2
        assert metric(text, "purge_worker_api_request_seconds_count") >= 2
        assert metric(text, "purge_worker_event_age_seconds_count") == 20
        assert metric(text, "purge_worker_api_rate_limited_total") == 0
        assert metric(text, "purge_worker_pending_records") == 0
        assert metric(text, "purge_worker_last_record_timestamp_seconds") > 1.7e9
        # Alone on the account: the whole of it (decided by the budget exchange).
        assert metric(text, "purge_worker_rate_budget_share", account="main", budget="urls") == 1.0
        assert metric(text, "purge_worker_rate_budget_demand", account="main", budget="urls") == 0
        assert "purge_worker_rate_limiter_wait_seconds_total" in text
        assert "purge_worker_consumption_paused" in text
        assert metric(text, "purge_worker_consumer_lag", topic=topic) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    # JSON log lines about records carry their coordinates.
    dead = [line for line in err.splitlines() if '"record dead-lettered"' in line]
    assert dead and all(f'"topic": "{topic}"' in line and '"offset"' in line for line in dead)


def _get(url):
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


def test_the_token_appears_nowhere(emulator, make_topic, kafka_bootstrap, unique, tmp_path):
    secret = "sekrit-Tok3n-do-not-leak-9f8e7d"
    topic, dlq = make_topic("cms"), make_topic("dlq")
    mport, hport = free_port(), free_port()
    group = f"g-{unique}"
    cfg = write_config(
        tmp_path / "c.yaml",
        emulator.api_url,
        kafka={
            "bootstrap_servers": [kafka_bootstrap],
            "topics": [topic],
            "dead_letter_topic": dlq,
            "group_id": group,
        },
        observability={"metrics_port": mport, "health_port": hport, "log_level": "debug"},
        delivery={
            "dead_letter_guard": {"max_ratio": 1.0},
            "retry": {"budget_seconds": 1, "initial_backoff_seconds": 0.05},
        },
    )
    # The emulator does not know this token: every purge fails with 403 and is dead-lettered;
    # and like a misconfigured proxy, every error it answers quotes the request's headers.
    requests.post(
        emulator.url + "/__emulator/faults", json={"echo_headers": True}, timeout=5
    ).raise_for_status()
    proc = start_worker(cfg, secret, log_level="debug")
    try:
        produce(
            kafka_bootstrap,
            topic,
            [
                cloudevent("article.published", {"slug": f"s{i}", "locales": ["en"], "id": i})
                for i in range(5)
            ],
        )
        # A 503 too, so retry logs and retries-exhausted messages happen.
        requests.post(
            emulator.url + "/__emulator/faults", json={"status": 503, "count": 3}, timeout=5
        )
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), what="commits")
        metrics_text = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
        health_text = requests.get(f"http://127.0.0.1:{hport}/healthz", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    dead = read_all(kafka_bootstrap, dlq)
    assert dead and {header(r.headers, "purge.error.class") for r in dead} == {"api_rejected"}
    assert all("request headers" in (header(r.headers, "purge.error.message") or "") for r in dead)
    assert purged_items(emulator) == []
    assert '"level": "debug"' in err  # debug lines were really emitted
    everything = out + err + metrics_text + health_text
    everything += "".join(v.decode("utf-8", "replace") for r in dead for _, v in r.headers)
    assert secret not in everything
    assert "Bearer ***" in everything  # the echo was there, and redacted
    assert not re.search(r"Bearer\s+(?!\*\*\*)\S", everything)
