"""``make soak``: run the worker for a long while at a steady rate and watch what it holds.

A benchmark, not a test: one worker (and its planning process) against a real broker and the
emulator on the enterprise plan with its limits, fed ``--rate`` events a second for
``--minutes`` with a realistic mix: mostly new URLs, some repeats of recent ones (a page changed
again), some new tags, a few invalid records, and now and then a 503 from the API. Every 10 s it
samples both processes (RSS, PSS, open files, threads), the group's lag and the
publish-to-purge latency of what was purged in those 10 s. At the end it stops publishing, waits
for every offset to be committed, and counts what was lost: a change not followed by a purge
(every publish of a URL or tag must be followed by a purge of it), an invalid record not
dead-lettered.

It writes SOAK.md (the figures, the memory slopes after ``--warmup`` minutes, the latency of
the first and the last ten minutes) and SOAK.png (memory and latency over time).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench import (  # noqa: E402
    HOST,
    WORK,
    Emulator,
    Worker,
    _git,
    _pss_kib,
    _status_kib,
    config,
    machine,
    make_topics,
    ts,
)
from scripts.kafka_broker import Broker  # noqa: E402

SAMPLE_SECONDS = 10.0
INVALID, REPEATS, TAGS = 0.01, 0.20, 0.03  # shares of the events; the rest are new URLs
RECENT = 10_000  # repeats are drawn from this many most recent URLs
FAULT_EVERY = 30.0  # seconds between injected 503s


@dataclass
class Publisher:
    """Publishes the mix at a steady rate; remembers when each URL and tag was last changed."""

    bootstrap: str
    topic: str
    rate: float
    seconds: float
    pending: dict[str, list[float]] = field(default_factory=dict)  # item -> unpurged changes
    invalid: int = 0
    published: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(7)
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        recent: deque[int] = deque(maxlen=RECENT)
        new = 0
        start = time.monotonic()
        total = int(self.rate * self.seconds)
        for i in range(total):
            if (delay := start + i / self.rate - time.monotonic()) > 0:
                time.sleep(delay)
            draw = rng.random()
            if draw < INVALID:
                value, item = b"{not json", None
                self.invalid += 1
            elif draw < INVALID + TAGS:
                new += 1
                value = json.dumps({"type": "bench.tag", "data": {"n": new}}).encode()
                item = f"t-{new}"
            else:
                if draw < INVALID + TAGS + REPEATS and recent:
                    n = rng.choice(recent)
                else:
                    new += 1
                    n = new
                    recent.append(n)
                value = json.dumps({"type": "bench.url", "data": {"n": n}}).encode()
                item = f"https://{HOST}/p/{n}"
            if item is not None:
                with self.lock:
                    self.pending.setdefault(item, []).append(time.time())
            producer.send(self.topic, value)
            self.published += 1
        producer.flush()
        producer.close()
        self.done.set()

    def purged(self, item: str, at: float) -> list[float]:
        """``item`` was purged at ``at``: the latencies of the changes that purge covered."""
        with self.lock:
            changes = self.pending.get(item)
            if not changes:
                return []
            covered = [at - p for p in changes if p <= at]
            left = [p for p in changes if p > at]
            if left:
                self.pending[item] = left
            else:
                del self.pending[item]
            return covered


@dataclass
class Sample:
    t: float  # seconds since the start of publishing
    rss: tuple[float, float]  # MiB, worker and planning process
    pss: float  # MiB, both
    fds: tuple[int, int]
    threads: tuple[int, int]
    lag: int
    purged: int  # changes covered by a purge in this interval
    p50: float | None
    p99: float | None


def proc_figures(pid: int | None) -> tuple[float, float, int, int]:
    """RSS (MiB), PSS (MiB), open files, threads of ``pid``; zeros if it is gone."""
    if pid is None:
        return 0.0, 0.0, 0, 0
    try:
        return (
            _status_kib(pid, "VmRSS") / 1024,
            _pss_kib(pid) / 1024,
            len(list(Path(f"/proc/{pid}/fd").iterdir())),
            _status_kib(pid, "Threads"),
        )
    except OSError:
        return 0.0, 0.0, 0, 0


def child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


class Lag:
    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.group = group
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        parts = self.consumer.partitions_for_topic(topic) or set()
        self.tps = [TopicPartition(topic, p) for p in parts]

    def __call__(self) -> int:
        ends = self.consumer.end_offsets(self.tps)
        done = self.admin.list_group_offsets(self.group).get(self.group, {})
        return sum(end - (done[tp].offset if tp in done else 0) for tp, end in ends.items())

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MiB): MiB per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def soak(minutes: float, rate: float, warmup: float) -> dict[str, Any]:
    WORK.mkdir(exist_ok=True)
    broker = Broker().start()
    emulator = Emulator("enterprise", rate_limits=True)
    topic, group = "soak", "soak"
    try:
        make_topics(broker.bootstrap, topic, f"{topic}.dlq")
        cfg = config(
            WORK / "soak.yaml", broker.bootstrap, emulator, topic, group, "enterprise", 1.0, 500
        )
        worker = Worker(cfg)
        time.sleep(6)  # joined and assigned
        publisher = Publisher(broker.bootstrap, topic, rate, minutes * 60)
        lag = Lag(broker.bootstrap, group, topic)
        threading.Thread(target=publisher.run, daemon=True).start()
        start = time.monotonic()
        samples: list[Sample] = []
        latencies: list[tuple[float, float]] = []  # (publish time since start, latency)
        wall0 = time.time()
        seen, next_fault = 0, start + FAULT_EVERY
        while True:
            time.sleep(max(0.0, start + (len(samples) + 1) * SAMPLE_SECONDS - time.monotonic()))
            if time.monotonic() >= next_fault:
                faults = {"status": 503, "count": 1}
                requests.post(emulator.url + "/__emulator/faults", json=faults, timeout=10)
                next_fault += FAULT_EVERY
            new = requests.get(f"{emulator.url}/__emulator/purges?since={seen}", timeout=60).json()
            seen += len(new)
            interval: list[float] = []
            for p in new:
                at = ts(p["received_at"])
                for item in p["items"]:
                    for latency in publisher.purged(item, at):
                        interval.append(latency)
                        latencies.append((at - latency - wall0, latency))
            child = child_of(worker.proc.pid)
            w, c = proc_figures(worker.proc.pid), proc_figures(child)
            behind = lag()
            samples.append(
                Sample(
                    t=time.monotonic() - start,
                    rss=(w[0], c[0]),
                    pss=w[1] + c[1],
                    fds=(w[2], c[2]),
                    threads=(w[3], c[3]),
                    lag=behind,
                    purged=len(interval),
                    p50=percentile(interval, 0.5),
                    p99=percentile(interval, 0.99),
                )
            )
            s = samples[-1]
            print(
                f"{s.t / 60:6.1f} min  rss {s.rss[0]:6.1f} + {s.rss[1]:6.1f} MiB  pss {s.pss:6.1f}"
                f"  fds {s.fds}  threads {s.threads}  lag {s.lag:6d}  purged {s.purged:5d}"
                f"  p99 {s.p99 if s.p99 is None else round(s.p99, 2)}",
                flush=True,
            )
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.proc.returncode}")
            if publisher.done.is_set() and behind == 0:
                break
        # The last purges and dead letters.
        time.sleep(3)
        for p in requests.get(f"{emulator.url}/__emulator/purges?since={seen}", timeout=60).json():
            at = ts(p["received_at"])
            for item in p["items"]:
                for latency in publisher.purged(item, at):
                    latencies.append((at - latency - wall0, latency))
        end_pss = samples[-1].pss
        worker.stop()
        dead = dead_letters(broker.bootstrap, f"{topic}.dlq")
        lag.close()
    finally:
        emulator.stop()
        broker.cleanup()
    return {
        "minutes": minutes,
        "rate": rate,
        "warmup": warmup,
        "published": publisher.published,
        "invalid": publisher.invalid,
        "dead_letters": dead,
        "unpurged": sum(len(v) for v in publisher.pending.values()),
        "samples": samples,
        "latencies": latencies,
        "end_pss": end_pss,
    }


def dead_letters(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    count = sum(1 for _ in consumer)
    consumer.close()
    return count


def _commit() -> str:
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head} with uncommitted changes" if dirty else head


def report(r: dict[str, Any], png: Path) -> str:
    samples: list[Sample] = r["samples"]
    after = [s for s in samples if s.t >= r["warmup"] * 60]
    worker_slope = slope([(s.t / 60, s.rss[0]) for s in after])
    child_slope = slope([(s.t / 60, s.rss[1]) for s in after])
    span = r["minutes"] * 60
    first = [lat for at, lat in r["latencies"] if at < 600]
    last = [lat for at, lat in r["latencies"] if at >= span - 600]
    p99_first, p99_last = percentile(first, 0.99), percentile(last, 0.99)
    lost = r["unpurged"] + max(0, r["invalid"] - r["dead_letters"])
    rows = [
        ("RSS slope after warm-up, worker", f"{worker_slope:+.3f} MiB/min", "≤ 0.1"),
        ("RSS slope after warm-up, planning process", f"{child_slope:+.3f} MiB/min", "≤ 0.1"),
        ("PSS of both at the end", f"{r['end_pss']:.0f} MiB", "≤ 256"),
        ("p99 publish-to-purge, first 10 min", f"{p99_first:.2f} s", ""),
        ("p99 publish-to-purge, last 10 min", f"{p99_last:.2f} s", "within 10 % of the first"),
        ("changes not followed by a purge", str(r["unpurged"]), "0"),
        ("invalid records / dead letters", f"{r['invalid']} / {r['dead_letters']}", "equal"),
        ("lost in all", str(lost), "0"),
    ]
    s0, s1 = after[0] if after else samples[0], samples[-1]
    lines = [
        "# Soak",
        "",
        f"`make soak SOAK_MINUTES={r['minutes']:g} SOAK_RATE={r['rate']:g}` on {machine()}, "
        f"{time.strftime('%Y-%m-%d')}: {r['published']:,} events at {r['rate']:g}/s for "
        f"{r['minutes']:g} min (new URLs, {REPEATS:.0%} repeats of the last {RECENT:,}, "
        f"{TAGS:.0%} new tags, {INVALID:.0%} invalid; a 503 every {FAULT_EVERY:.0f} s), the "
        f"emulator on the enterprise plan with its limits, ledger on. Measured at commit "
        f"{r['commit']}.",
        "",
        "| figure | this run | bound |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Slopes: least squares of RSS over the 10-second samples from minute {r['warmup']:g} on. "
        "PSS counts each page shared by the two processes once. Latency: from the publish of a "
        "change to the arrival at the emulator of the first purge request that carries its URL or "
        "tag, grouped by publish time.",
        "",
        "| | worker | planning process |",
        "|---|---|---|",
        f"| RSS at minute {s0.t / 60:.0f} → end | {s0.rss[0]:.0f} → {s1.rss[0]:.0f} MiB | "
        f"{s0.rss[1]:.0f} → {s1.rss[1]:.0f} MiB |",
        f"| open files | {s0.fds[0]} → {s1.fds[0]} | {s0.fds[1]} → {s1.fds[1]} |",
        f"| threads | {s0.threads[0]} → {s1.threads[0]} | {s0.threads[1]} → {s1.threads[1]} |",
        "",
        f"Largest lag in any sample: {max(s.lag for s in samples):,} records.",
        "",
        f"![memory and latency over time]({png.name})",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples: list[Sample] = r["samples"]
    minutes = [s.t / 60 for s in samples]
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    mem.plot(minutes, [s.rss[0] for s in samples], label="worker RSS")
    mem.plot(minutes, [s.rss[1] for s in samples], label="planning process RSS")
    mem.plot(minutes, [s.pss for s in samples], label="PSS, both")
    mem.axvline(r["warmup"], color="grey", linestyle=":", label="end of warm-up")
    mem.set_ylabel("MiB")
    mem.legend(loc="lower right")
    mem.grid(alpha=0.3)
    lat.plot(minutes, [s.p50 for s in samples], label="p50")
    lat.plot(minutes, [s.p99 for s in samples], label="p99")
    lat.set_ylabel("publish to purge, s (per 10 s)")
    lat.set_xlabel("minutes")
    lat.legend(loc="upper right")
    lat.grid(alpha=0.3)
    fig.suptitle(f"soak: {r['rate']:g} events/s for {r['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--warmup", type=float, default=10.0, help="minutes before slopes count")
    parser.add_argument("--out", type=Path, default=ROOT / "SOAK.md")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or not 0 <= args.warmup < args.minutes:
        parser.error("--minutes and --rate must be > 0, --warmup within the run")
    commit = _commit()  # before anything is written: the run's own outputs are not changes
    result = soak(args.minutes, args.rate, args.warmup)
    result["commit"] = commit
    png = args.out.with_suffix(".png")
    plot(result, png)
    args.out.write_text(report(result, png))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
