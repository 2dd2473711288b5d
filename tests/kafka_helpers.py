"""Helpers for tests against the real broker: produce, read back, committed offsets, workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from tests.conftest import TOKEN
from tests.helpers import cloudevent, write_config
from worker import app
from worker.clock import SystemClock
from worker.config.settings import Config
from worker.kafka.consumer import KafkaSource
from worker.kafka.dead_letters import KafkaDeadLetterSink


def produce(
    bootstrap: str, topic: str, values, key=b"k", headers=(), partition=None, spread=None
) -> None:
    """Write ``values``: to ``partition``, or round-robin over ``spread`` partitions (one burst
    reaching them all at once), or as the key decides."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    futures = [
        producer.send(
            topic,
            value=v,
            key=key,
            headers=list(headers),
            partition=i % spread if spread else partition,
        )
        for i, v in enumerate(values)
    ]
    for f in futures:
        f.get(timeout=30)
    producer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    ends = consumer.end_offsets(parts)
    consumer.close()
    return {tp.partition: off for tp, off in ends.items()}


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except KafkaError:  # the group's coordinator is not there yet: nothing committed
        return {}
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def all_committed(bootstrap: str, group: str, topic: str) -> bool:
    ends = end_offsets(bootstrap, topic)
    done = committed(bootstrap, group, topic)
    return all(done.get(p, 0) >= end for p, end in ends.items() if end > 0)


def read_all(bootstrap: str, topic: str, timeout_s: float = 5.0) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=int(timeout_s * 1000),
        enable_auto_commit=False,
    )
    records = list(consumer)
    consumer.close()
    return records


def kafka_config(config: Config, bootstrap: str, topic: str, dlq: str, group: str) -> Config:
    kafka = config.kafka.model_copy(
        update={
            "bootstrap_servers": (bootstrap,),
            "topics": (topic,),
            "dead_letter_topic": dlq,
            "group_id": group,
        }
    )
    return replace(config, kafka=kafka)


class RunningWorker:
    """The production loop with the real Kafka source and sink, on a thread."""

    def __init__(self, config: Config) -> None:
        clock = SystemClock()
        self.loop = app.build_loop(
            config, KafkaSource(config.kafka), KafkaDeadLetterSink(config.kafka), clock
        )
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error


# Every worker process a test started, so none outlives its test (``conftest``).
STARTED: list[subprocess.Popen] = []


class Workers:
    def __init__(self, cfg, tmp_path):
        self.cfg = cfg
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self):
        env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
        env.pop("KAFKA_BOOTSTRAP", None)
        log = (self.tmp_path / f"worker-{len(self.procs)}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "-c", self.cfg],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        STARTED.append(proc)
        return proc

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append("hung")
        return codes

    def log(self, i):
        """Worker ``i``'s whole log: what a test looks for may be early in a long run."""
        return (self.tmp_path / f"worker-{i}.log").read_text()

    def tail(self, i):
        """The end of worker ``i``'s log, for a failure message."""
        return self.log(i)[-20000:]


def image_events(n, prefix="u"):
    return [
        cloudevent(
            "image.updated", {"host": "img.example-cdn.net", "path": f"{prefix}{i}"}, f"e{i}"
        )
        for i in range(n)
    ]


def worker_config(
    tmp_path,
    emulator,
    bootstrap,
    topic,
    dlq,
    group,
    *,
    path=None,
    max_poll_records=200,
    observability=None,
    budget_topic=None,
    receipts_topic=None,
    **over,
):
    """A worker's config file for these topics: ports off unless ``observability`` sets them;
    the group's own budget exchange and receipts unless ``budget_topic`` or ``receipts_topic``
    names a shared one; ``over`` as for
    ``write_config`` (``cloudflare__accounts={...}`` replaces one key)."""
    kafka = {
        "bootstrap_servers": [bootstrap],
        "topics": [topic],
        "dead_letter_topic": dlq,
        "group_id": group,
        "max_poll_records": max_poll_records,
        # Each test its own exchange, so no test's workers count another's.
        "budget_topic": budget_topic or f"budget-{group}",
        # Each group its own receipts too: no test's ledger learns another test's purges.
        "receipts_topic": receipts_topic or f"receipts-{group}",
    }
    return write_config(
        path or tmp_path / "c.yaml",
        emulator.api_url,
        kafka=kafka,
        observability={"metrics_port": None, "health_port": None, **(observability or {})},
        **over,
    )
