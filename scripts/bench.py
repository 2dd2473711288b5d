"""``make bench``: measure the worker against a real broker and the emulator; write BENCHMARKS.md.

Every figure comes from one run on this machine. Sizes follow the benchmark plan (200,000-event
catch-up, 50,000 URLs + 5,000 tags per plan, 200 events/s for latency, a 1,000,000-event backlog
for memory); ``BENCH_SCALE=0.1`` shrinks them all for a quick look.
"""

from __future__ import annotations

import cProfile
import io
import json
import math
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
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

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
OUT = ROOT / os.environ.get("BENCH_OUT", "BENCHMARKS.md")
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

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def make_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in names]
    )
    admin.close()


def produce(bootstrap: str, topic: str, values: list[bytes]) -> float:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        batch_size=512 * 1024,
        acks=1,
        max_in_flight_requests_per_connection=5,
        enable_idempotence=False,
    )
    start = time.perf_counter()
    for v in values:
        producer.send(topic, v)
    producer.flush(timeout=600)
    producer.close()
    return time.perf_counter() - start


def committed_all(bootstrap: str, group: str, topic: str) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    ends = consumer.end_offsets(tps)
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except KafkaError:
        return False
    finally:
        admin.close()
    done = {tp: meta.offset for tp, meta in offsets.items()}
    return all(done.get(tp, 0) >= end for tp, end in ends.items())


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
        },
        "cloudflare": {
            "base_url": emulator.url + "/client/v4",
            "accounts": {"main": account},
            "zones": [
                {"name": "example.com", "id": ZONE, "hosts": ["example.com", "*.example.com"]}
            ],
        },
        "coalesce": {"window_seconds": window},
        "delivery": {"concurrency": 4},
        "observability": {"metrics_port": None, "health_port": None, "log_level": "warning"},
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
    def __init__(self, cfg: Path) -> None:
        env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN}
        env.pop("KAFKA_BOOTSTRAP", None)
        self.log = (WORK / f"{cfg.stem}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "-c", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.started = time.perf_counter()
        self.peak_rss_kib = 0

    def sample_rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except OSError:
            pass

    def stop(self) -> None:
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def wait_committed(
    bootstrap: str, group: str, topic: str, worker: Worker | None = None, timeout: float = 3600
) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if worker:
            worker.sample_rss()
        if committed_all(bootstrap, group, topic):
            return time.perf_counter()
        time.sleep(0.5)
    raise RuntimeError(f"{group} did not finish {topic} in {timeout}s")


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


# -- the benchmarks -----------------------------------------------------------------------------


def bare_consumer(bootstrap: str, topic: str, total: int) -> float:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        max_poll_records=2000,
    )
    seen = 0
    start = time.perf_counter()
    while seen < total:
        for records in consumer.poll(timeout_ms=1000).values():
            seen += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return total / elapsed


def catch_up(bootstrap: str) -> dict[str, Any]:
    total = n(200_000)
    values, targets = article_events(total, distinct=max(300, n(20_000)))
    topic, group = "bench-catchup", "bench-catchup"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    produce(bootstrap, topic, values)
    bare = bare_consumer(bootstrap, topic, total)
    emulator = Emulator("enterprise", rate_limits=False)
    window = 1.0
    cfg = config(
        WORK / "catchup.yaml",
        bootstrap,
        emulator,
        topic,
        group,
        "enterprise",
        window,
        500,
        unlimited=True,
    )
    worker = Worker(cfg)
    done = wait_committed(bootstrap, group, topic, worker)
    worker.stop()
    purges = emulator.purges()
    emulator.stop()
    first = min(ts(p["received_at"]) for p in purges)
    last = max(ts(p["received_at"]) for p in purges)
    wall = done - worker.started
    items = sum(len(p["items"]) for p in purges)
    distinct = len(
        {
            (p["kind"], i if isinstance(i, str) else json.dumps(i))
            for p in purges
            for i in p["items"]
        }
    )
    minimum = 0
    for kind in {p["kind"] for p in purges}:
        cap = 500 if kind == "files" else 100
        minimum += math.ceil(sum(len(p["items"]) for p in purges if p["kind"] == kind) / cap)
    worker_rate = total / max(1e-9, last - first + window)
    return {
        "events": total,
        "targets_from_rules": targets,
        "bare_events_per_s": bare,
        "worker_events_per_s": worker_rate,
        "worker_wall_s": wall,
        "ratio": worker_rate / bare,
        "requests": len(purges),
        "items_sent": items,
        "distinct_items": distinct,
        "min_requests_for_items": minimum,
    }


def profile_pipeline(bootstrap: str) -> str:
    """Where the worker's time goes: the pipeline in-process under cProfile, on a smaller run."""
    from worker import logs
    from worker.clock import SystemClock
    from worker.config import load
    from worker.pipeline import Pipeline
    from worker.source import KafkaDeadLetterSink, KafkaSource
    from worker.wiring import Accounts

    total = n(50_000)
    values, _ = article_events(total, distinct=max(300, n(5_000)))
    topic, group = "bench-profile", "bench-profile"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    produce(bootstrap, topic, values)
    emulator = Emulator("enterprise", rate_limits=False)
    cfg = load(
        config(
            WORK / "profile.yaml",
            bootstrap,
            emulator,
            topic,
            group,
            "enterprise",
            1.0,
            500,
            unlimited=True,
        ),
        env={"CLOUDFLARE_API_TOKEN": TOKEN},
    )
    logs.configure("json", "warning")  # as in production: no per-record log lines
    clock = SystemClock()
    pipeline = Pipeline(
        cfg, KafkaSource(cfg.kafka), KafkaDeadLetterSink(cfg.kafka), Accounts(cfg, clock), clock
    )
    stop = threading.Event()
    profiler = cProfile.Profile()

    def watch() -> None:
        wait_committed(bootstrap, group, topic)
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    profiler.enable()
    pipeline.run(stop)
    profiler.disable()
    emulator.stop()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(lines[start : start + 15])


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
    times = [ts(p["received_at"]) for p in files]
    sent = sum(len(p["items"]) for p in files)
    rate = sent / max(1e-9, max(times) - min(times))
    statuses = [r["status"] for r in reqs]
    return {
        "plan": plan,
        "urls": urls,
        "tags": tags,
        "requests": len(statuses),
        "r429": statuses.count(429),
        "share_429": statuses.count(429) / max(1, len(statuses)),
        "url_per_s": rate,
        "fraction": rate / urls_per_s,
        "tag_requests": sum(1 for p in purges if p["kind"] == "tags"),
    }


def latency(bootstrap: str) -> dict[str, Any]:
    per_s, seconds, window = 200, max(10, int(30 * min(1, SCALE * 3))), 1.0
    topic, group = "bench-latency", "bench-latency"
    make_topics(bootstrap, topic, f"{topic}.dlq")
    emulator = Emulator("enterprise", rate_limits=False)
    cfg = config(
        WORK / "latency.yaml",
        bootstrap,
        emulator,
        topic,
        group,
        "enterprise",
        window,
        500,
        unlimited=True,
    )
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
    emulator.stop()
    lat.sort()
    return {
        "events": per_s * seconds,
        "per_s": per_s,
        "window": window,
        "purged": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[int(0.99 * (len(lat) - 1))],
        "max": lat[-1],
    }


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


def report(results: dict[str, Any], took: float) -> str:
    c, lat, mem = results["catch_up"], results["latency"], results["memory"]
    rates = results["rates"]
    lines = [
        "# Benchmarks",
        "",
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `make bench`"
        + (f" (BENCH_SCALE={SCALE})" if SCALE != 1 else "")
        + f", {took / 60:.1f} minutes in all.",
        f"Machine: {machine()}.",
        "Against a real Apache Kafka 4.1.1 broker (KRaft, one node, `-Xmx512m`) and the emulator, "
        "each in its own process on this machine.",
        "",
        "## 1. Catch-up throughput",
        "",
        f"A topic (3 partitions) pre-filled with {c['events']:,} CMS events, each 1–3 URLs and a tag "
        f"over about {results['distinct']:,} distinct targets ({c['targets_from_rules']:,} targets "
        "from the rules); emulator and worker without rate limits, enterprise caps, a 1 s window.",
        "",
        "| reader | events/s |",
        "|---|---|",
        f"| bare kafka-python consumer (poll only) | {c['bare_events_per_s']:,.0f} |",
        f"| purge-worker (decode, rules, coalesce, purge, commit) | {c['worker_events_per_s']:,.0f} |",
        f"| ratio | **{c['ratio']:.2f}** (goal ≥ 0.7) |",
        "",
        f"Worker events/s counts from the first purge to the last plus one window; its wall time "
        f"from process start to the last commit was {c['worker_wall_s']:.1f} s.",
        "",
        "Where the worker's time goes (cProfile of the pipeline in-process on a smaller run, by "
        "own time):",
        "",
        "```",
        results["profile"],
        "```",
        "",
        "## 2. API efficiency",
        "",
        f"Same run: {c['targets_from_rules']:,} targets from rules became {c['items_sent']:,} items "
        f"sent ({c['distinct_items']:,} distinct) in {c['requests']:,} requests. The fewest requests "
        f"that could carry those items at the per-request caps: {c['min_requests_for_items']:,}, so "
        f"requests ÷ minimum = **{c['requests'] / max(1, c['min_requests_for_items']):.2f}** (goal 1.00).",
        "",
        "## 3. Rate-limit adherence",
        "",
        "A burst of URL and tag purges on each plan, the emulator enforcing that plan's limits "
        "(URLs as a per-second budget, tags as a token bucket); 100 URLs per request.",
        "",
        "| plan | URLs + tags | requests | 429s (share) | URL/s achieved | of the plan's limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rates:
        lines.append(
            f"| {r['plan']} | {r['urls']:,} + {r['tags']:,} | {r['requests']:,} | "
            f"{r['r429']} ({r['share_429']:.1%}) | {r['url_per_s']:,.0f} | **{r['fraction']:.2f}** |"
        )
    lines += [
        "",
        "Goals: no 429s, and at least 0.9 of the plan's URL/s.",
        "",
        "## 4. Latency",
        "",
        f"{lat['per_s']} events/s for {lat['events'] // lat['per_s']} s, one URL each, a "
        f"{lat['window']:.0f} s window; publish-to-purge time from the producer's clock to the "
        f"emulator's receipt ({lat['purged']:,} purges matched):",
        "",
        f"p50 **{lat['p50']:.2f} s**, p99 **{lat['p99']:.2f} s**, max {lat['max']:.2f} s "
        f"(goal p99 ≤ window + 1 s = {lat['window'] + 1:.0f} s).",
        "",
        "## 5. Memory",
        "",
        f"Peak RSS (VmHWM) of the worker process through a {mem['events']:,}-event backlog with "
        f"the default backlog limits: **{mem['peak_rss_mib']:.0f} MiB** (goal ≤ 256 MiB); it took "
        f"{mem['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    WORK.mkdir(exist_ok=True)
    broker = Broker().start()
    started = time.perf_counter()
    try:
        bootstrap = broker.bootstrap
        results: dict[str, Any] = {"distinct": max(300, n(20_000))}
        print("catch-up throughput …", flush=True)
        results["catch_up"] = catch_up(bootstrap)
        print(json.dumps(results["catch_up"]), flush=True)
        print("profile …", flush=True)
        results["profile"] = profile_pipeline(bootstrap)
        print("rate limits (free and pro in parallel) …", flush=True)
        rates: dict[str, dict[str, Any]] = {}
        threads = [
            threading.Thread(
                target=lambda p=p, r=r: rates.__setitem__(p, rate_limits(bootstrap, p, r))
            )
            for p, r in (("free", 800), ("pro", 1500))
        ]
        for t in threads:
            t.start()
        print("latency …", flush=True)
        results["latency"] = latency(bootstrap)
        print(json.dumps(results["latency"]), flush=True)
        for t in threads:
            t.join()
        results["rates"] = [rates["free"], rates["pro"]]
        print(json.dumps(results["rates"]), flush=True)
        print("memory …", flush=True)
        results["memory"] = memory(bootstrap)
        print(json.dumps(results["memory"]), flush=True)
    finally:
        broker.cleanup()
    OUT.write_text(report(results, time.perf_counter() - started))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
