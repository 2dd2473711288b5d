"""How fast ``purge-worker trace`` answers on a receipts topic of 1,000,000 receipts.

The workload, fixed before any run: a fresh broker, a receipts topic of 6 partitions (as the
worker makes it), 1,000,000 purge receipts made by the worker's own ``purge_receipt``, each for 5
URLs and their 5 events, their record timestamps spread evenly over the last 6 days (about 1.9
receipts a second). Three questions, each asked 3 times as a user would, ``python -m worker
trace`` in a process of its own, timed from the process's start to its exit:

- an event: the receipt at a position drawn by a seeded generator, asked with ``--event-id`` and
  the hour after its time (a CMS knows when it published its event: ``--since T-5m --until
  T+1h``);
- a URL purged within the last day, with the default span (``--since 24h``: 1/6 of the topic);
- the same event without a span (``--since 7d``: the whole topic), to show what the span saves.

    python scripts/bench_trace.py        # prints a Markdown table; `make bench-trace`
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from scripts.bench import _git, machine  # noqa: E402
from scripts.kafka_broker import Broker  # noqa: E402
from worker.clock import rfc3339  # noqa: E402
from worker.receipts import EventRef, Purge, purge_receipt  # noqa: E402
from worker.targets import Kind, Mode, Target  # noqa: E402

N = 1_000_000
SPAN = 6 * 24 * 3600.0
PER_RECEIPT = 5
RUNS = 3
TOPIC = "purge-worker.receipts"
ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"


def receipt(i: int, at: float) -> tuple[bytes, bytes]:
    first = i * PER_RECEIPT
    purge = Purge(
        zone="example.com",
        zone_id=ZONE_ID,
        mode=Mode.PURGE,
        kind=Kind.FILES,
        targets=tuple(
            Target(Kind.FILES, f"https://www.example.com/p/{n}")
            for n in range(first, first + PER_RECEIPT)
        ),
        sent_at=at - 0.2,
        accepted_at=at,
        request_ids=(f"{i:x}-EMU",),
        events=tuple(
            EventRef(f"evt-{n}", "cms", n % 12, n // 12) for n in range(first, first + PER_RECEIPT)
        ),
    )
    return purge_receipt(purge, "purge-worker/bench")


def fill(bootstrap: str, now: float) -> float:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(TOPIC, 6, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=1 << 20, acks=1)
    started = time.monotonic()
    step = SPAN / N
    for i in range(N):
        at = now - SPAN + i * step
        key, value = receipt(i, at)
        producer.send(TOPIC, key=key, value=value, timestamp_ms=int(at * 1000))
    producer.flush()
    producer.close()
    return time.monotonic() - started


def timed(config: Path, args: list[str]) -> tuple[float, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "trace", "-c", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return time.monotonic() - started, proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    broker = Broker().start()
    try:
        now = time.time()
        filled = fill(broker.bootstrap, now)
        print(f"{N:,} receipts written in {filled:.1f} s", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "c.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "kafka": {"bootstrap_servers": [broker.bootstrap], "topics": ["cms"]},
                        "cloudflare": {
                            "accounts": {"main": {"plan": "enterprise"}},
                            "zones": [
                                {"name": "example.com", "id": ZONE_ID, "hosts": ["www.example.com"]}
                            ],
                        },
                        "rules": [],
                    }
                )
            )
            rng = random.Random(25)
            k = rng.randrange(N)
            at = now - SPAN + k * (SPAN / N)
            recent = N - 1 - rng.randrange(N // 6)
            event = f"evt-{k * PER_RECEIPT + 2}"
            url = f"https://www.example.com/p/{recent * PER_RECEIPT + 1}"
            questions = [
                (
                    f"event `{event}`, the hour after its time",
                    [
                        "--event-id",
                        event,
                        "--since",
                        rfc3339(at - 300),
                        "--until",
                        rfc3339(at + 3600),
                    ],
                    f"{3900 / SPAN * N:,.0f}",
                ),
                ("URL purged in the last day, `--since 24h`", ["--url", url], f"{N // 6:,}"),
                (
                    f"event `{event}`, `--since 7d`",
                    ["--event-id", event, "--since", "7d"],
                    f"{N:,}",
                ),
            ]
            rows = []
            for what, args, span in questions:
                times = []
                for _ in range(RUNS):
                    seconds, code, out = timed(config, args)
                    if code != 0:
                        raise SystemExit(f"trace {args} exited {code}:\n{out[-2000:]}")
                    times.append(seconds)
                rows.append((what, span, times))
    finally:
        broker.cleanup()
    commit = _git("rev-parse", "--short", "HEAD")
    print(f"`python scripts/bench_trace.py` on {machine()}, commit {commit}: {N:,} receipts")
    print("over 6 days on 6 partitions; wall time of `purge-worker trace` from process start to")
    print(f"exit, {RUNS} runs each (bound: under 2 s for an event's purge).\n")
    print("| question | receipts in the span | median | runs |")
    print("|---|---|---|---|")
    for what, span, times in rows:
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {what} | {span} | {statistics.median(times):.2f} s | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
