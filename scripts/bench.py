"""``make bench``: measure the worker against a real broker and the emulator; write BENCHMARKS.md.

Every figure comes from one run on this machine, at the commit the report names (a dirty tree
is refused). Sizes: a 120,000-event catch-up backlog, 50,000 URLs + 5,000 tags per plan for rate
adherence, 200 and 1,000 events/s for latency, a 1,000,000-event backlog for memory;
``BENCH_SCALE=0.1`` shrinks them all for a quick look.

Each figure is written next to its bound with the formula, both measured over the same span.
"""

from __future__ import annotations

import compileall
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.kafka_broker import Broker, free_port  # noqa: E402
from worker.kafka.consumer import FETCH_WAIT_MS  # noqa: E402

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
OUT = ROOT / os.environ.get("BENCH_OUT", "BENCHMARKS.md")
# Receipts are on, as by default, each group on its own topic (so no part's ledger learns another
# part's purges); BENCH_RECEIPTS=off measures the worker without them.
RECEIPTS = os.environ.get("BENCH_RECEIPTS", "on") != "off"
WORK = ROOT / ".bench"
TOKEN = "bench-token"
ZONE = "023e105f4ecef8ad9ca31a8372d0c353"
HOST = "www.example.com"


def n(count: int) -> int:
    return max(100, int(count * SCALE))


# -- plumbing ----------------------------------------------------------------------------------


class Emulator:
    def __init__(self, plan: str, rate_limits: bool) -> None:
        self.port = free_port()
        args = [
            sys.executable,
            "-m",
            "worker",
            "emulator",
            "--port",
            str(self.port),
            "--plan",
            plan,
            "--token",
            TOKEN,
            "--zone",
            ZONE,
        ]
        if not rate_limits:
            args.append("--no-rate-limit")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                requests.get(self.url + "/__emulator/purges", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("emulator did not start")

    def purges(self) -> list[dict[str, Any]]:
        return requests.get(self.url + "/__emulator/purges", timeout=60).json()  # type: ignore[no-any-return]

    def requests(self) -> list[dict[str, Any]]:
        return requests.get(self.url + "/__emulator/requests", timeout=60).json()  # type: ignore[no-any-return]

    def edge(self) -> list[dict[str, Any]]:
        return requests.get(self.url + "/__emulator/edge", timeout=60).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def per_second(times: list[float], counts: list[int]) -> dict[str, float]:
    """Items per second of the emulator's clock. ``busiest`` and ``median``: over the full
    seconds (the first and the last are partial and left out). ``overall``: the total ÷ (span +
    1 s), since Cloudflare counts items in any one-second window: a perfect sender of N items at R
    a second sends its last at ⌈N/R⌉ − 1 s and scores exactly R (÷ span alone would give it more)."""
    buckets: dict[int, int] = {}
    for at, count in zip(times, counts, strict=True):
        buckets[int(at)] = buckets.get(int(at), 0) + count
    first, last = min(buckets), max(buckets)
    full = [buckets.get(second, 0) for second in range(first + 1, last)]
    total = sum(counts)
    return {
        "busiest": float(max(full)) if full else float(total),
        "median": float(statistics.median(full)) if full else float(total),
        "overall": total / (max(times) - min(times) + 1.0),
    }


def make_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in names]
    )
    admin.close()


def produce(
    bootstrap: str, topic: str, values: list[bytes], *, spread_over: float | None = None
) -> float:
    """Produce ``values``; with ``spread_over`` (seconds), stamp them evenly over that long
    before now, as the records of a backlog built up during an outage are."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        batch_size=512 * 1024,
        acks=1,
        max_in_flight_requests_per_connection=5,
        enable_idempotence=False,
    )
    start = time.perf_counter()
    now_ms = int(time.time() * 1000)
    step_ms = (spread_over or 0) * 1000 / max(1, len(values))
    for i, v in enumerate(values):
        stamp = int(now_ms - (spread_over or 0) * 1000 + i * step_ms) if spread_over else None
        producer.send(topic, v, timestamp_ms=stamp)
    producer.flush(timeout=600)
    producer.close()
    return time.perf_counter() - start


def config(
    path: Path,
    bootstrap: str,
    emulator: Emulator,
    topic: str,
    group: str,
    plan: str,
    window: float,
    files_cap: int,
    *,
    unlimited: bool = False,
    metrics_port: int | None = None,
    planning: str = "auto",
    receipts: bool = RECEIPTS,
) -> Path:
    account: dict[str, Any] = {"plan": plan, "files_per_request": files_cap}
    if unlimited:
        # The emulator runs without limits here, and so does the worker: this measures the
        # worker's own speed, not the plan's budget.
        account.update(urls_per_second=1e9, flex_refill_per_second=1e9, flex_bucket=10**9)
    data = {
        "kafka": {
            "bootstrap_servers": [bootstrap],
            "topics": [topic],
            "group_id": group,
            "dead_letter_topic": f"{topic}.dlq",
            "max_poll_records": 2000,
            "receipts_topic": f"{group}.receipts" if receipts else None,
            # Each group its own budget exchange: a drain must not hear the worker of the drain
            # before it (which spent another emulator's budget) and wait for it to leave.
            "budget_topic": f"{group}.shares",
        },
        "cloudflare": {
            "base_url": emulator.url + "/client/v4",
            "accounts": {"main": account},
            "zones": [
                {"name": "example.com", "id": ZONE, "hosts": ["example.com", "*.example.com"]}
            ],
        },
        "coalesce": {"window_seconds": window},
        "delivery": {"concurrency": 4, "planning": planning},
        "observability": {
            "metrics_port": metrics_port,
            "health_port": None,
            "log_level": "warning",
        },
        "rules": [
            {
                "name": "articles",
                "match": {"type": "article.updated"},
                "urls": [f"https://{HOST}/a/{{data.pages[]}}"],
                "tags": ["article-{data.id}"],
            },
            {
                "name": "bench",
                "match": {"type": "bench.url"},
                "urls": [f"https://{HOST}/p/{{data.n}}"],
            },
            {"name": "bench-tag", "match": {"type": "bench.tag"}, "tags": ["t-{data.n}"]},
        ],
    }
    path.write_text(yaml.safe_dump(data))
    return path


class Worker:
    def __init__(self, cfg: Path, stages: tuple[Path, int] | None = None) -> None:
        """``stages``: run it with a clock on each stage of its loop (``bench_stages.py``),
        written to that file once it has read that many records and is stopped."""
        env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
        env.pop("KAFKA_BOOTSTRAP", None)
        self.log = (WORK / f"{cfg.stem}.log").open("w")
        clocked = ["scripts/bench_stages.py", str(stages[0]), str(stages[1])] if stages else []
        self.proc = subprocess.Popen(
            [sys.executable, *(clocked or ["-m", "worker"]), "run", "-c", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.started = time.perf_counter()
        self.peak_rss_kib = 0  # the worker process's own VmHWM
        self.child_peak_rss_kib = 0  # its planning process's VmHWM (shares pages with it)
        self.peak_pss_kib = 0  # the most both held at once, shared pages counted once

    def sample_rss(self) -> None:
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            self.peak_rss_kib = max(self.peak_rss_kib, _status_kib(pid, "VmHWM"))
            pss = _pss_kib(pid)
            for child in children:
                self.child_peak_rss_kib = max(
                    self.child_peak_rss_kib, _status_kib(int(child), "VmHWM")
                )
                pss += _pss_kib(int(child))
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: each page shared by n processes counts 1/n in each."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class Commits:
    """When a group has committed every record of a topic: asked of the broker every ``STEP`` by
    one admin client, made before the reader starts (so making it costs the reader nothing). A
    span ends at the first answer showing everything committed, at most one ``STEP`` and one
    round trip (a few ms here) after the commit itself; every reader is timed with it alike."""

    STEP = 0.02

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        self.ends = consumer.end_offsets(tps)
        consumer.close()

    def done(self, group: str) -> bool:
        try:
            offsets = self.admin.list_group_offsets(group).get(group, {})
        except KafkaError:
            return False
        return all(
            offsets[tp].offset >= end if tp in offsets else end == 0
            for tp, end in self.ends.items()
        )

    def wait(self, group: str, tick: Any = None, timeout: float = 3600) -> float:
        """``time.perf_counter()`` when ``group`` had committed it all; ``tick`` is called
        every 0.2 s meanwhile (sampling memory, reading metrics)."""
        deadline = time.perf_counter() + timeout
        ticked = 0.0
        while time.perf_counter() < deadline:
            if tick is not None and time.perf_counter() - ticked >= 0.2:
                tick()
                ticked = time.perf_counter()
            if self.done(group):
                return time.perf_counter()
            time.sleep(self.STEP)
        raise RuntimeError(f"{group} did not finish in {timeout}s")

    def close(self) -> None:
        self.admin.close()


def wait_committed(
    bootstrap: str, group: str, topic: str, worker: Worker | None = None, timeout: float = 3600
) -> float:
    commits = Commits(bootstrap, topic)
    try:
        return commits.wait(group, worker.sample_rss if worker else None, timeout)
    finally:
        commits.close()


def article_events(count: int, distinct: int) -> tuple[list[bytes], int]:
    """CMS events, each 1–3 page URLs and a tag, over about ``distinct`` targets in all."""
    values, targets = [], 0
    articles = distinct // 3
    for i in range(count):
        art = (i * 7919) % articles
        pages = [f"{art}-{k}" for k in range(1 + i % 3)]
        targets += len(pages) + 1
        values.append(
            json.dumps(
                {"type": "article.updated", "id": f"e{i}", "data": {"id": art, "pages": pages}}
            ).encode()
        )
    return values, targets


def backlog_events(
    count: int, articles: int, *, unmatched_every: int = 0
) -> tuple[list[bytes], int, int]:
    """CloudEvents from a CMS, each touching 1–3 pages of one article and the article's tag;
    with the distinct URLs and tags among them. ``unmatched_every``: all but every n-th event
    is a page view, which no rule matches."""
    values, pages, tags = [], set(), set()
    for i in range(count):
        art = (i * 7919) % articles
        mine = [f"{art}-{k}" for k in range(1 + i % 3)]
        viewed = unmatched_every and i % unmatched_every
        if not viewed:
            pages.update(mine)
            tags.add(art)
        values.append(
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": f"e{i}",
                    "source": "/cms",
                    "type": "article.viewed" if viewed else "article.updated",
                    "time": datetime.now(UTC).isoformat(),
                    "data": {"id": art, "pages": mine},
                }
            ).encode()
        )
    return values, len(pages), len(tags)


# -- the benchmarks -----------------------------------------------------------------------------


# A reader that does the least any consumer must: poll, decode each value, commit. Run as a process
# and timed from its start until it has committed everything, as the worker is. It fetches as the
# worker does (``FETCH_WAIT_MS``): with Kafka's 500 ms, two runs in three waited half a second at
# the backlog's end, and a bound made of such runs flatters the worker.
BARE_READER = """
import sys
import msgspec
from kafka import KafkaConsumer, TopicPartition
bootstrap, topic, group, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = KafkaConsumer(
    topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
    enable_auto_commit=False, max_poll_records=2000, fetch_max_wait_ms=FETCH_WAIT_MS,
)
decode = msgspec.json.decode
seen = 0
while seen < total:
    for records in consumer.poll(timeout_ms=1000).values():
        for record in records:
            decode(record.value)
        seen += len(records)
consumer.commit()
consumer.close()
""".replace("FETCH_WAIT_MS", str(FETCH_WAIT_MS))


def bare_reader_process(bootstrap: str, topic: str, total: int, group: str) -> float:
    """Seconds from starting a bare reader's process until its group has committed ``total``
    records (``BARE_READER``), by the same watch as the worker's."""
    commits = Commits(bootstrap, topic)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_READER, bootstrap, topic, group, str(total)], cwd=ROOT
    )
    try:
        return commits.wait(group, timeout=600) - started
    finally:
        proc.wait(timeout=60)
        commits.close()


# Plan figures the bound is computed from (Cloudflare's documented limits).
PLANS = {
    "enterprise": {"url_per_s": 3000, "files_cap": 500, "bucket": 500, "refill": 50},
    "pro": {"url_per_s": 1500, "files_cap": 100, "bucket": 25, "refill": 5},
}
BACKLOG_TOPIC = "bench-backlog"
BACKLOG_AGE = 600.0  # seconds over which an aged backlog's records are stamped, ending now
RUNS = 3  # each catch-up, burst and ingest figure: its median and spread over this many runs


@dataclass
class Workload:
    """A topic to drain, and what a reader must do with it."""

    name: str
    topic: str
    events: int
    distinct_urls: int
    distinct_tags: int
    # Process start to all committed, of the bare reader (poll, decode, commit), one per run.
    bare_spans_s: list[float] = field(default_factory=list)

    @property
    def bare_span_s(self) -> float:
        return min(self.bare_spans_s) if self.bare_spans_s else 0.0


def workload(
    bootstrap: str,
    name: str,
    topic: str,
    values: list[bytes],
    urls: int,
    tags: int,
    *,
    aged: bool = True,
    bare: bool = True,
) -> Workload:
    """Produce ``values`` to a new topic of three partitions. ``aged``: stamped over the ten
    minutes before now (what built up during an outage); else stamped as produced, seconds
    before the drain (a bulk re-publish). ``bare``: time the bare reader on it too."""
    make_topics(bootstrap, topic, f"{topic}.dlq")
    produce(bootstrap, topic, values, spread_over=BACKLOG_AGE if aged else None)
    work = Workload(name, topic, len(values), urls, tags)
    if bare:
        work.bare_spans_s = [
            bare_reader_process(bootstrap, topic, work.events, f"{topic}-bare-{i}")
            for i in range(RUNS)
        ]
    return work


def aged_backlog(bootstrap: str) -> Workload:
    values, urls, tags = backlog_events(n(120_000), max(100, n(6_000)))
    return workload(bootstrap, "aged backlog", BACKLOG_TOPIC, values, urls, tags)


def unmatched_backlog(bootstrap: str) -> Workload:
    values, urls, tags = backlog_events(n(120_000), max(100, n(6_000)), unmatched_every=10)
    return workload(bootstrap, "mostly unmatched", "bench-unmatched", values, urls, tags)


def unique_backlog(bootstrap: str) -> Workload:
    count = n(30_000)
    values = [json.dumps({"type": "bench.url", "data": {"n": i}}).encode() for i in range(count)]
    return workload(bootstrap, "unique targets", "bench-unique", values, count, 0)


def fresh_burst(bootstrap: str, run: int, read: list[float]) -> Workload:
    """A bulk re-publish: 120,000 events over 32,000 targets, produced just before the drain.
    ``read``: the bare reader's spans on the aged backlog (as many events, as large)."""
    values, urls, tags = backlog_events(n(120_000), max(100, n(8_000)))
    topic = f"bench-burst-{run}"
    work = workload(bootstrap, "fresh burst", topic, values, urls, tags, aged=False, bare=False)
    work.bare_spans_s = read
    return work


def _metric(url: str, name: str) -> float:
    try:
        text = requests.get(url, timeout=2).text
    except requests.RequestException:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def ideal_bound(work: Workload, plan: str | None) -> float:
    """When an ideal sender, starting with the process, is done: it reads the topic as fast as
    the bare reader; its last URL goes at ⌈N/R⌉ − 1 s (the plan counts URLs in any one-second
    window); its last tag request once the bucket's B requests are spent and the rest refilled
    at r a second: (requests − B) / r."""
    if plan is None:
        return work.bare_span_s
    figures = PLANS[plan]
    tag_requests = math.ceil(work.distinct_tags / 100)
    return max(
        work.bare_span_s,
        math.ceil(work.distinct_urls / figures["url_per_s"]) - 1.0,
        max(0, tag_requests - figures["bucket"]) / figures["refill"],
    )


def catch_up(
    bootstrap: str,
    work: Workload,
    plan: str | None,
    planning: str = "auto",
    *,
    receipts: bool = RECEIPTS,
    run: str = "",
) -> dict[str, Any]:
    """``work`` drained by one worker. ``plan``: the emulator and the worker enforce that
    plan's limits; None: no limits anywhere (the worker's own speed). ``planning``: the
    worker's ``delivery.planning``; ``receipts``: whether it writes receipts; ``run`` tells
    repeated drains of one topic apart (each a group of its own)."""
    figures = PLANS[plan or "enterprise"]
    name = plan or "unlimited"
    group = f"{work.topic}-{name}-{planning}{run}"
    emulator = Emulator(plan or "enterprise", rate_limits=plan is not None)
    cfg = config(
        WORK / f"{group}.yaml",
        bootstrap,
        emulator,
        work.topic,
        group,
        plan or "enterprise",
        1.0,
        figures["files_cap"],
        unlimited=plan is None,
        metrics_port=(metrics_port := free_port()),
        planning=planning,
        receipts=receipts,
    )
    commits = Commits(bootstrap, work.topic)
    worker = Worker(cfg)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    first_record = last_record = None

    def tick() -> None:
        nonlocal first_record, last_record
        worker.sample_rss()
        finished = _metric(metrics_url, "purge_worker_records_total")
        now = time.perf_counter()
        if finished and first_record is None:
            first_record = now
        if finished >= work.events and last_record is None:
            last_record = now

    done = commits.wait(group, tick)
    commits.close()
    worker.stop()
    reqs, purges = emulator.requests(), emulator.purges()
    emulator.stop()
    wall = done - worker.started
    items = sum(len(p["items"]) for p in purges)
    kinds: dict[str, set[str]] = {}
    for p in purges:
        kinds.setdefault(p["kind"], set()).update(
            i if isinstance(i, str) else json.dumps(i) for i in p["items"]
        )
    distinct = sum(len(v) for v in kinds.values())
    urls, tags = len(kinds.get("files", ())), len(kinds.get("tags", ()))
    bound = ideal_bound(work, plan)
    processing = (last_record or done) - (first_record or worker.started)
    return {
        "workload": work.name,
        "plan": name,
        "events": work.events,
        "wall_s": wall,
        "bound_s": bound,
        "ratio": bound / wall,
        "worker_events_per_s": work.events / max(1e-9, processing),
        # Same span for both: process start to every offset committed.
        "worker_span_events_per_s": work.events / wall,
        "bare_span_events_per_s": work.events / work.bare_span_s if work.bare_span_s else 0.0,
        "requests": len(purges),
        "min_requests": math.ceil(urls / figures["files_cap"]) + math.ceil(tags / 100),
        "items_sent": items,
        "distinct_items": distinct,
        "expected_distinct": work.distinct_urls + work.distinct_tags,
        "r429": sum(1 for r in reqs if r["status"] == 429),
    }


def repeated(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn`` run ``RUNS`` times, one after another; the run with the median wall time, and
    every run's wall time and ratio for the spread."""
    runs = [fn(*args, **kwargs, run=f"-{i}") for i in range(RUNS)]
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    median = dict(ordered[len(ordered) // 2])
    median["runs_wall_s"] = [r["wall_s"] for r in runs]
    median["runs_ratio"] = [r["ratio"] for r in runs]
    median["runs_items"] = [r["items_sent"] for r in runs]
    return median


def burst(bootstrap: str, aged: Workload, plan: str, run: str) -> dict[str, Any]:
    """A fresh burst, produced right before each drain."""
    work = fresh_burst(bootstrap, int(run.strip("-") or 0), aged.bare_spans_s)
    return catch_up(bootstrap, work, plan, run=run)


def strong_peer(bootstrap: str, work: Workload, plan: str) -> dict[str, Any]:
    """The peer of ``scripts/bench_peer.py`` drains ``work`` to the end, timed as the worker is
    (process start to all committed)."""
    emulator = Emulator(plan, rate_limits=True)
    group = f"{work.topic}-peer-{plan}"
    commits = Commits(bootstrap, work.topic)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_peer.py"),
            *(bootstrap, work.topic, group, emulator.url, ZONE, TOKEN, plan),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    done = commits.wait(group, timeout=3600)
    commits.close()
    out, _ = proc.communicate(timeout=120)
    purges = emulator.purges()
    emulator.stop()
    counts = json.loads(out.strip().splitlines()[-1])
    return {
        "plan": plan,
        "wall_s": done - started,
        "bound_s": ideal_bound(work, plan),
        "requests": counts["requests"],
        "r429": counts["r429"],
        "items_sent": sum(len(p["items"]) for p in purges),
        "distinct_items": work.distinct_urls + work.distinct_tags,
    }


# The bare reader with a clock on its polls and on its decoding (thread CPU), for the breakdown:
# kafka-python's fetch is what every reader pays; the bare reader's records are read by
# kafka-python, the worker's by ``worker.kafka.records``.
def _edited(text: str, *edits: tuple[str, str]) -> str:
    """``text`` with each (old, new) replaced; an ``old`` not there stops the bench (a silent
    miss would report a clock that never ran as zero)."""
    for old, new in edits:
        if old not in text:
            raise RuntimeError(f"bench script edit found nothing to replace: {old!r}")
        text = text.replace(old, new)
    return text


BARE_STAGES = _edited(
    BARE_READER,
    ("seen = 0", "import json, time\npoll_cpu = decode_cpu = 0.0\nseen = 0"),
    (
        "    for records in consumer.poll(timeout_ms=1000).values():",
        "    cpu = time.thread_time()\n    batches = consumer.poll(timeout_ms=1000)\n"
        "    poll_cpu += time.thread_time() - cpu\n    cpu = time.thread_time()\n"
        "    for records in batches.values():",
    ),
    (
        "        seen += len(records)",
        "        seen += len(records)\n    decode_cpu += time.thread_time() - cpu",
    ),
    (
        "consumer.close()",
        "consumer.close()\nprint(json.dumps({'poll_cpu_s': poll_cpu, 'decode_cpu_s': decode_cpu, "
        "'cpu_s': time.process_time()}))",
    ),
)


def stage_costs(bootstrap: str, work: Workload, run: str = "") -> dict[str, Any]:
    """One drain of ``work`` (no limits) with a clock on each stage of the worker's loop
    (``scripts/bench_stages.py``), and one bare reader with a clock on its polls; ``run`` tells
    repeated drains apart (each a group of its own)."""
    group = f"{work.topic}-stages{run}"
    emulator = Emulator("enterprise", rate_limits=False)
    cfg = config(
        WORK / f"{group}.yaml",
        bootstrap,
        emulator,
        work.topic,
        group,
        "enterprise",
        1.0,
        PLANS["enterprise"]["files_cap"],
        unlimited=True,
    )
    out = WORK / f"{group}.json"
    started = time.time()  # the marks are wall-clock times; the span is on the same clock
    worker = Worker(cfg, stages=(out, work.events))
    committed_s = wait_committed(bootstrap, group, work.topic) - worker.started
    worker.stop()
    emulator.stop()
    report = json.loads(out.read_text())
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            BARE_STAGES,
            bootstrap,
            work.topic,
            f"{group}-bare",
            str(work.events),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    marks = report["marks"]
    return {
        **report,
        "workload": work.name,
        "events": work.events,
        "first_record_s": marks["first_record"] - started,
        "all_read_s": marks["all_read"] - started,
        "committed_s": committed_s,
        "bare": json.loads(bare.stdout.strip().splitlines()[-1]),
    }


def rate_limits(bootstrap: str, plan: str, urls_per_s: float) -> dict[str, Any]:
    urls, tags = n(50_000), n(5_000)
    topic, group = f"bench-rate-{plan}", f"bench-rate-{plan}"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    values = [json.dumps({"type": "bench.url", "data": {"n": i}}).encode() for i in range(urls)]
    values += [json.dumps({"type": "bench.tag", "data": {"n": i}}).encode() for i in range(tags)]
    produce(bootstrap, topic, values)
    emulator = Emulator(plan, rate_limits=True)
    cfg = config(WORK / f"rate-{plan}.yaml", bootstrap, emulator, topic, group, plan, 1.0, 100)
    worker = Worker(cfg)
    wait_committed(bootstrap, group, topic, worker)
    worker.stop()
    reqs, purges = emulator.requests(), emulator.purges()
    emulator.stop()
    files = [p for p in purges if p["kind"] == "files"]
    rates = per_second([ts(p["received_at"]) for p in files], [len(p["items"]) for p in files])
    statuses = [r["status"] for r in reqs]
    return {
        "plan": plan,
        "urls": urls,
        "tags": tags,
        "requests": len(statuses),
        "r429": statuses.count(429),
        "share_429": statuses.count(429) / max(1, len(statuses)),
        "url_per_s": rates["overall"],
        "fraction": rates["overall"] / urls_per_s,
        "median_fraction": rates["median"] / urls_per_s,
        "busiest_fraction": rates["busiest"] / urls_per_s,
        "tag_requests": sum(1 for p in purges if p["kind"] == "tags"),
    }


def scale_out(bootstrap: str, replicas: int) -> dict[str, Any]:
    """A burst of URLs all on one partition of six, drained by ``replicas`` workers of one
    group on the pro plan: how much of the account's budget the replica holding the hot
    partition gets while the others idle."""
    urls, plan_rate = n(30_000), 1500
    topic = group = f"bench-scale-{replicas}"
    make_topics(bootstrap, topic, partitions=6)
    make_topics(bootstrap, f"{topic}.dlq")
    emulator = Emulator("pro", rate_limits=True)
    cfg = config(
        WORK / f"scale-{replicas}.yaml", bootstrap, emulator, topic, group, "pro", 0.5, 100
    )
    workers = []
    for i in range(replicas):
        copy = WORK / f"scale-{replicas}-{i}.yaml"
        copy.write_text(cfg.read_text())
        workers.append(Worker(copy))
    time.sleep(10)  # the group settled and the first split made (both take a few seconds)
    values = [json.dumps({"type": "bench.url", "data": {"n": i}}).encode() for i in range(urls)]
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024)
    for v in values:
        producer.send(topic, v, partition=0)
    producer.flush(timeout=600)
    producer.close()
    wait_committed(bootstrap, group, topic)
    for w in workers:
        w.stop()
    reqs, purges = emulator.requests(), emulator.purges()
    emulator.stop()
    files = [p for p in purges if p["kind"] == "files"]
    counts = [len(p["items"]) for p in files]
    rates = per_second([ts(p["received_at"]) for p in files], counts)
    return {
        "replicas": replicas,
        "urls": urls,
        "sent": sum(counts),
        "r429": [r["status"] for r in reqs].count(429),
        "url_per_s": rates["overall"],
        "fraction": rates["overall"] / plan_rate,
        "median_fraction": rates["median"] / plan_rate,
        "busiest_second": int(rates["busiest"]),
    }


def latency(bootstrap: str, per_s: int, warm_cap: float | None = None) -> dict[str, Any]:
    """Publish-to-purge latency at a steady rate. ``warm_cap``: every purged URL is also warmed
    (through the emulator's edge) at most this many a second, to show warming costs purges
    nothing."""
    seconds, window = max(10, int(30 * min(1, SCALE * 3))), 1.0
    name = f"{per_s}" + (f"-warm{warm_cap:g}" if warm_cap else "")
    topic, group = f"bench-latency-{name}", f"bench-latency-{name}"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    emulator = Emulator("enterprise", rate_limits=False)
    cfg = config(
        WORK / f"latency-{name}.yaml",
        bootstrap,
        emulator,
        topic,
        group,
        "enterprise",
        window,
        500,
        unlimited=True,
    )
    if warm_cap:
        data = yaml.safe_load(cfg.read_text())
        data["warming"] = {
            "via": emulator.url,
            "delay_seconds": 0.5,
            "requests_per_second": warm_cap,
        }
        for rule in data["rules"]:
            if rule["name"] == "bench":
                rule["warm"] = True
        cfg.write_text(yaml.safe_dump(data))
    worker = Worker(cfg)
    time.sleep(6)  # joined and assigned
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    published: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(per_s * seconds):
        due = start + i / per_s
        if (delay := due - time.perf_counter()) > 0:
            time.sleep(delay)
        published[f"https://{HOST}/p/{i}"] = time.time()
        producer.send(topic, json.dumps({"type": "bench.url", "data": {"n": i}}).encode())
    producer.flush()
    producer.close()
    wait_committed(bootstrap, group, topic, worker)
    worker.stop()
    lat = []
    for p in emulator.purges():
        for item in p["items"]:
            if item in published:
                lat.append(ts(p["received_at"]) - published[item])
    warm = emulator.edge() if warm_cap else []
    emulator.stop()
    lat.sort()
    out = {
        "events": per_s * seconds,
        "per_s": per_s,
        "window": window,
        "purged": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[int(0.99 * (len(lat) - 1))],
        "max": lat[-1],
    }
    if warm_cap:
        # The warm rate in the busiest full seconds (the first and last are partial).
        per_second: dict[int, int] = {}
        for w in warm:
            second = int(ts(w["received_at"]))
            per_second[second] = per_second.get(second, 0) + 1
        full = sorted(per_second.values())[1:-1] or list(per_second.values())
        out.update(
            warm_cap=warm_cap,
            warmed=len(warm),
            warm_per_s=statistics.median(full) if full else 0.0,
            warm_busiest_s=max(per_second.values(), default=0),
            warm_misses=sum(1 for w in warm if w["cache_status"] == "MISS"),
        )
    return out


def memory(bootstrap: str) -> dict[str, Any]:
    total = n(1_000_000)
    topic, group = "bench-memory", "bench-memory"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    values, _ = article_events(total, distinct=max(300, n(100_000)))
    produce(bootstrap, topic, values)
    del values
    emulator = Emulator("enterprise", rate_limits=False)
    cfg = config(
        WORK / "memory.yaml",
        bootstrap,
        emulator,
        topic,
        group,
        "enterprise",
        2.0,
        500,
        unlimited=True,
    )
    worker = Worker(cfg)
    done = wait_committed(bootstrap, group, topic, worker)
    worker.stop()
    emulator.stop()
    return {
        "events": total,
        "peak_rss_mib": worker.peak_rss_kib / 1024,
        "child_peak_rss_mib": worker.child_peak_rss_kib / 1024,
        "peak_pss_mib": worker.peak_pss_kib / 1024,
        "seconds": done - worker.started,
    }


# -- report -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {int(mem) / 1024 / 1024:.0f} GiB RAM, "
        f"Python {platform.python_version()}, Linux {platform.release()}"
    )


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "–".join(fmt.format(v) for v in (min(values), max(values)))


def stages_section(st: dict[str, Any]) -> list[str]:
    """Where one drain spends its time, stage by stage."""
    events, bare = st["events"], st["bare"]
    per = 1e6 / events  # seconds over the drain → µs a record
    loop_cpu = sum(cpu for _, cpu, _ in st["stages"].values())
    loop_wall = sum(wall for wall, _, _ in st["stages"].values())
    start_cpu = st["marks"]["first_record_thread_cpu_s"]
    others = st["process_cpu_s"] - st["loop_thread_cpu_s"]
    lines = [
        f"Where one drain of the {st['workload']} spends its time (no limits; the worker as a "
        "process, "
        "with a clock on each stage of its loop: `scripts/bench_stages.py`). Timeline, from "
        f"process start: first records read at {st['first_record_s']:.2f} s, all "
        f"{events:,} read at {st['all_read_s']:.2f} s, all committed at "
        f"{st['committed_s']:.2f} s. Start-up cost the loop's thread {start_cpu:.2f} s of CPU "
        "before the first records.",
        "",
        "| on the loop's thread, from the first step | CPU s | µs a record | wall s |",
        "|---|---|---|---|",
    ]
    for label, (wall, cpu, _) in st["stages"].items():
        lines.append(f"| {label} | {cpu:.2f} | {cpu * per:.1f} | {wall:.2f} |")
    planning = st["planning_process_cpu_s"]
    lines += [
        f"| **all stages** | **{loop_cpu:.2f}** | **{loop_cpu * per:.1f}** | {loop_wall:.2f} |",
        f"| *the bare reader's Kafka poll, for comparison* | {bare['poll_cpu_s']:.2f} | "
        f"{bare['poll_cpu_s'] * per:.1f} | |",
        f"| *the bare reader's decoding* | {bare['decode_cpu_s']:.2f} | "
        f"{bare['decode_cpu_s'] * per:.1f} | |",
        "",
        f"Beside the loop's thread: the worker's other threads (Kafka I/O, requests, receipts, "
        f"metrics) {others:.2f} s of CPU in all, start-up included; the planning process "
        + (f"{planning:.2f} s ({planning * per:.1f} µs a record)" if planning else "none")
        + f". The bare reader used {bare['cpu_s']:.2f} s of CPU in all. µs a record = CPU ÷ "
        f"{events:,}. Own time: a stage's time without the stages it calls (the rest is the "
        "step's own). Wall beyond CPU is waiting: for the planning process, for Kafka, for "
        "the interpreter lock (which the other threads hold meanwhile), or for a core (the "
        "planning process, the broker and the emulator run on the same two).",
    ]
    walls = sorted(st.get("request_wall_s", []))
    if "pended_records" in st and walls:
        lines += [
            "",
            f"Of the {events:,} records, {st['pended_records']:,} met their targets one by one "
            "(some target not yet known purged: each is looked up in the ledger, joins what is "
            "pending or in flight, or is made pending, and the record waits); the rest were "
            "finished at once (their targets all purged already, or none). The first kind costs "
            "more, and how many there are depends on how soon the first purges are accepted: "
            f"{len(walls)} purge requests, each {statistics.mean(walls) * 1000:.1f} ms on its "
            f"thread on average (median {statistics.median(walls) * 1000:.1f}, longest "
            f"{walls[-1] * 1000:.1f}), at most `delivery.concurrency` at once.",
        ]
    return lines


def report(results: dict[str, Any], took: float) -> str:
    works, catch, peers = results["workloads"], results["catch_up"], results["peer"]
    aged = works["aged backlog"]
    ingest, lats, mem, rates = (
        results["ingest"],
        results["latency"],
        results["memory"],
        results["rates"],
    )
    inline, burst, unique = results["ingest_inline"], results["burst"], results["unique"]
    repeats = aged["events"] * 3 / (aged["distinct_urls"] + aged["distinct_tags"])
    burst_runs = ", ".join(
        f"{i / max(1, burst['distinct_items']):.2f}" for i in burst["runs_items"]
    )
    lines = [
        "# Benchmarks",
        "",
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {results['commit']} with `make bench`"
        + (f" (BENCH_SCALE={SCALE})" if SCALE != 1 else "")
        + f", {took / 60:.1f} minutes in all. Each benchmark ran alone, one after another.",
        f"Machine: {machine()}.",
        "Against a real Apache Kafka 4.1.1 broker (KRaft, one node, `-Xmx512m`) and the emulator, "
        "each in its own process on this machine.",
        "",
        "**How spans are measured.** Every reader (the worker, the bare reader, the strong peer) "
        "is a process of its own, timed from just before it is started until a watcher sees "
        "every offset of the topic committed for its group: one admin client, made before the "
        "reader starts, asks the broker every 20 ms (the span ends at most 20 ms and one round "
        "trip after the commit). Every process runs from compiled bytecode, as installed "
        "packages do (the bench compiles the worker's modules before its first run). "
        f"Figures marked *median* are the middle of {RUNS} runs, one "
        "after another, with every run's figure beside it.",
        "",
        "## 1. Catch-up against enforced limits",
        "",
        f"**Aged backlog.** A topic (3 partitions) of {aged['events']:,} CMS CloudEvents, each "
        "touching 1–3 pages of an article and the article's tag, stamped over the ten minutes "
        f"before the drain (as after an outage): {aged['distinct_urls']:,} distinct URLs and "
        f"{aged['distinct_tags']:,} distinct tags, so every target repeats about {repeats:.0f} "
        "times. One worker drains it, the emulator enforcing the plan's limits; a 1 s window, "
        "the plan's per-request caps, 4 requests at a time.",
        "",
        "The bound is when an ideal sender starting with the process would be done: the longest "
        "of the bare reader's span (poll, decode, commit; the fastest of its runs), ⌈distinct "
        "URLs ÷ the plan's URL/s⌉ − 1 s (the plan counts URLs in any one-second window, so the "
        "last URL goes at that second), and (tag requests − the bucket) ÷ the refill rate. "
        "Ratio = bound ÷ the worker's span.",
        "",
        "| plan | bound | worker span, median (runs) | **bound ÷ span** (runs) | items sent ÷ distinct | requests ÷ minimum | 429s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in [*catch, unique]:
        label = c["plan"] + (" (unique targets)" if c is unique else "")
        lines.append(
            f"| {label} | {c['bound_s']:.1f} s | {c['wall_s']:.2f} s ({_spread(c['runs_wall_s'])}) | "
            f"**{c['ratio']:.2f}** ({_spread(c['runs_ratio'])}) | "
            f"{c['items_sent']:,} ÷ {c['distinct_items']:,} = **{c['items_sent'] / max(1, c['distinct_items']):.2f}** | "
            f"{c['requests']:,} ÷ {c['min_requests']:,} = {c['requests'] / max(1, c['min_requests']):.2f} | {c['r429']} |"
        )
    uw = works["unique targets"]
    lines += [
        "",
        f"**Unique targets** (last row): {uw['events']:,} events, each one URL of its own, aged "
        "as above: nothing to coalesce, the budget is all. Every distinct target was purged in "
        "the median runs: "
        + ", ".join(
            f"{c['plan']} {c['distinct_items']:,} of {c['expected_distinct']:,}"
            for c in [*catch, unique]
        )
        + ".",
        "",
        f"**Fresh burst.** A bulk re-publish: {burst['events']:,} events over "
        f"{burst['expected_distinct']:,} targets, produced right before each drain (records seconds "
        "old, younger than the purge ledger's 5 s margin), enterprise limits. "
        f"Items sent ÷ distinct **{burst['items_sent'] / max(1, burst['distinct_items']):.2f}** "
        f"(runs: {burst_runs}); "
        f"bound {burst['bound_s']:.1f} s, span {burst['wall_s']:.2f} s ({_spread(burst['runs_wall_s'])}), "
        f"**bound ÷ span {burst['ratio']:.2f}** ({_spread(burst['runs_ratio'])}); "
        f"{burst['r429']} × 429.",
        "",
        "**A strong peer on the aged backlog**, run to the end and timed as the worker is: the "
        "consumer a competent engineer would write with the same libraries "
        "(`scripts/bench_peer.py`: each poll's targets deduplicated and cut into full requests, "
        "a client-side limiter at the plan's limits, 4 requests at a time, Retry-After honoured, "
        "a commit per poll; no memory across polls). One run each.",
        "",
        "| plan | peer span | items sent | requests (429s) | worker span (median) | worker items sent |",
        "|---|---|---|---|---|---|",
    ]
    for peer, c in zip(peers, catch, strict=True):
        lines.append(
            f"| {peer['plan']} | {peer['wall_s']:.1f} s | {peer['items_sent']:,} | "
            f"{peer['requests']:,} ({peer['r429']}) | {c['wall_s']:.2f} s | {c['items_sent']:,} |"
        )
    lines += [
        "",
        "## 2. Ingest",
        "",
        "A topic drained with no limits anywhere (emulator and worker), so the worker's own "
        "per-event cost is all that is measured, against the bare reader (a kafka-python "
        "consumer that polls, decodes each value with msgspec and commits once at the end; it "
        f"lets the broker hold a fetch {FETCH_WAIT_MS} ms, as the worker does) over "
        "the same span. Two workloads: the aged backlog above, and one of as many events where 9 "
        "of 10 are page views no rule matches. The worker plans in its second process "
        "(`delivery.planning: auto` on two cores). Events/s = events ÷ span; ratio = the bare "
        "reader's fastest span ÷ the worker's median span.",
        "",
        "| workload | bare reader span (runs) | worker span, median (runs) | events/s, bare / worker | **ratio** |",
        "|---|---|---|---|---|",
    ]
    for g in ingest:
        w = works[g["workload"]]
        bare = min(w["bare_spans_s"])
        lines.append(
            f"| {g['workload']} | {bare:.2f} s ({', '.join(f'{x:.2f}' for x in w['bare_spans_s'])}) | "
            f"{g['wall_s']:.2f} s ({', '.join(f'{x:.2f}' for x in g['runs_wall_s'])}) | "
            f"{g['events'] / bare:,.0f} / {g['events'] / g['wall_s']:,.0f} | **{bare / g['wall_s']:.2f}** |"
        )
    lines += [
        "",
        f"The aged backlog with `planning: inline` (one process, one run): {inline['wall_s']:.2f} s "
        f"(ratio {min(aged['bare_spans_s']) / inline['wall_s']:.2f}).",
        "",
        *stages_section(results["stages"]),
        "",
        "## 3. Rate-limit adherence",
        "",
        "A burst of URL and tag purges on each plan, the emulator enforcing that plan's limits "
        "(URLs as a per-second budget, tags as a token bucket); 100 URLs per request.",
        "",
        "| plan | URLs + tags | requests | 429s (share) | URL/s overall | **of the plan** | median full second | busiest full second |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        lines.append(
            f"| {r['plan']} | {r['urls']:,} + {r['tags']:,} | {r['requests']:,} | "
            f"{r['r429']} ({r['share_429']:.1%}) | {r['url_per_s']:,.0f} | **{r['fraction']:.2f}** | "
            f"{r['median_fraction']:.2f} | {r['busiest_fraction']:.2f} |"
        )
    lines += [
        "",
        "URL/s overall = URLs ÷ (last request − first request + 1 s), by the emulator's clock: a "
        "perfect sender scores exactly the plan's rate (dividing by the span alone would give it "
        "more). Full seconds leave out the first and the last, which are partial. Goals: no 429s, "
        "and at least 0.95 of the plan's URL/s.",
        "",
        "### Scale-out: all traffic on one partition",
        "",
        "A burst of URLs all on one partition of six (pro plan, 100 URLs per request), drained "
        "by one worker and by three replicas of one group sharing the account's budget by "
        "demand. URL/s overall = URLs ÷ (last request − first request + 1 s), as the emulator "
        "received them.",
        "",
        "| replicas | URLs sent | URL/s overall | **of the plan** | median full second | busiest second | 429s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.get("scale", []):
        lines.append(
            f"| {r['replicas']} | {r['sent']:,} | {r['url_per_s']:,.0f} | **{r['fraction']:.2f}** | "
            f"{r['median_fraction']:.2f} | {r['busiest_second']:,} | {r['r429']} |"
        )
    lines += [
        "",
        "Goal: three replicas as fast as one (≥ 0.9 of the plan), no 429s, no second above "
        "the plan.",
        "",
        "## 4. Latency",
        "",
        "Events at a steady rate, one URL each, a 1 s window; publish-to-purge time from the "
        "producer's clock to the emulator's receipt. Goal: p99 ≤ window + 0.5 s.",
        "",
        "| events/s | events | p50 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    for lat in lats:
        lines.append(
            f"| {lat['per_s']:,} | {lat['purged']:,} | {lat['p50']:.2f} s | **{lat['p99']:.2f} s** | {lat['max']:.2f} s |"
        )
    warm = results.get("warming")
    if warm:
        base = next((x for x in lats if x["per_s"] == warm["per_s"]), None)
        lines += [
            "",
            "### With warming",
            "",
            f"The same run at {warm['per_s']} events/s with every purged URL warmed through the "
            f"emulator's edge (delay 0.5 s, cap {warm['warm_cap']:g} requests/s for the zone): "
            f"{warm['warmed']:,} warm requests, {warm['warm_misses']:,} of them MISS (the purge "
            f"took effect); **{warm['warm_per_s']:.0f} warm requests/s** in a typical full second "
            f"(busiest {warm['warm_busiest_s']}) against the cap of {warm['warm_cap']:g}. Purge "
            f"latency p50 {warm['p50']:.2f} s, **p99 {warm['p99']:.2f} s**"
            + (f" (without warming, same run: p99 {base['p99']:.2f} s)." if base else "."),
            "",
            "Goal: warm requests held at the cap, purge p99 within 0.1 s of the run without.",
        ]
    lines += [
        "",
        "## 5. Memory",
        "",
        f"Through a {mem['events']:,}-event backlog with the default backlog limits and the "
        f"purge ledger on, it took {mem['seconds']:.0f} s. The worker and its planning process "
        "together, sampled every 0.5 s, shared pages counted once (the sum of their PSS, what "
        f"the pod is charged): **{mem['peak_pss_mib']:.0f} MiB at most** (goal ≤ 256 MiB). "
        f"Each alone, its peak RSS (VmHWM, shared pages in both): worker "
        f"{mem['peak_rss_mib']:.0f} MiB, planning process {mem['child_peak_rss_mib']:.0f} MiB.",
        "",
    ]
    return "\n".join(lines)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def compiled() -> None:
    """The worker's bytecode written before any run, as in the image (pip compiles what it
    installs), where the bare reader's kafka-python already is. A checkout run with
    PYTHONDONTWRITEBYTECODE (as this machine and the image set it) never writes it, and each
    worker process would compile its ~90 modules from source first: about 0.09 s of every span."""
    if not compileall.compile_dir(ROOT / "worker", quiet=1):
        raise RuntimeError("the worker's modules did not compile")


def main() -> int:
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no") and OUT.name == "BENCHMARKS.md":
        # Figures must belong to a commit someone can check out: not to edits no one can see.
        print("make bench: the tree has uncommitted changes; commit them first", file=sys.stderr)
        return 2
    WORK.mkdir(exist_ok=True)
    compiled()
    broker = Broker().start()
    started = time.perf_counter()
    results: dict[str, Any] = {"commit": commit}

    def step(name: str, fn: Any, *args: Any) -> Any:
        print(f"{name} …", flush=True)
        out = fn(*args)
        shown = out if isinstance(out, dict | list) else str(getattr(out, "__dict__", out))
        print(json.dumps(shown) if not isinstance(shown, str) else shown[:300], flush=True)
        return out

    try:
        bootstrap = broker.bootstrap
        aged = step("aged backlog: produce, bare reader", aged_backlog, bootstrap)
        unmatched = step("mostly unmatched: produce, bare reader", unmatched_backlog, bootstrap)
        unique = step("unique targets: produce", unique_backlog, bootstrap)
        results["workloads"] = {w.name: w.__dict__ for w in (aged, unmatched, unique)}
        results["catch_up"] = [
            step(f"catch-up, aged, {plan}", repeated, catch_up, bootstrap, aged, plan)
            for plan in ("enterprise", "pro")
        ]
        results["unique"] = step(
            "catch-up, unique, enterprise", repeated, catch_up, bootstrap, unique, "enterprise"
        )
        results["burst"] = step(
            "fresh burst, enterprise", repeated, burst, bootstrap, aged, "enterprise"
        )
        results["ingest"] = [
            step(f"ingest, {w.name}", repeated, catch_up, bootstrap, w, None)
            for w in (aged, unmatched)
        ]
        results["ingest_inline"] = step(
            "ingest, aged, planning inline", catch_up, bootstrap, aged, None, "inline"
        )
        results["peer"] = [
            step(f"strong peer, {plan}", strong_peer, bootstrap, aged, plan)
            for plan in ("enterprise", "pro")
        ]
        results["stages"] = step("stages of the loop", stage_costs, bootstrap, aged)
        results["rates"] = [
            step(f"rate limits, {plan}", rate_limits, bootstrap, plan, r)
            for plan, r in (("free", 800), ("pro", 1500))
        ]
        results["scale"] = [
            step(f"scale-out, {r} replica(s)", scale_out, bootstrap, r) for r in (1, 3)
        ]
        results["latency"] = [step(f"latency, {r}/s", latency, bootstrap, r) for r in (200, 1000)]
        results["warming"] = step("latency with warming, 200/s", latency, bootstrap, 200, 50.0)
        results["memory"] = step("memory", memory, bootstrap)
    finally:
        broker.cleanup()
    OUT.write_text(report(results, time.perf_counter() - started))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
