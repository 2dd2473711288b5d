"""The strong peer ``make bench`` runs beside the worker: the purge consumer a competent engineer
would write in an afternoon with the same libraries, so the worker is compared with something a
user could have instead, not with a strawman.

What it does, per poll (up to 2,000 records): map each CMS event to its page URLs and its
article tag, drop repeats within the poll, cut the rest into full requests (the plan's cap per
request), send them four at a time through a client-side limiter (URLs: at most the plan's
URL/s in any one-second window, counted from each request's completion; tags: the plan's token
bucket, starting full), honour Retry-After on a 429, and commit the poll once every request of
it was accepted. It stops when every partition's committed offset has reached the end it saw
at start. It knows nothing of earlier polls: a target repeated across polls is purged again.

    python scripts/bench_peer.py BOOTSTRAP TOPIC GROUP API_URL ZONE TOKEN PLAN
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import msgspec
import requests
from kafka import KafkaConsumer, TopicPartition

PLANS = {
    "enterprise": {"url_per_s": 3000, "files_cap": 500, "bucket": 500, "refill": 50},
    "pro": {"url_per_s": 1500, "files_cap": 100, "bucket": 25, "refill": 5},
}
HOST = "www.example.com"
TAGS_CAP = 100
CONCURRENCY = 4


class Limiter:
    """URLs in any one-second window (by completion), and a token bucket for tag requests."""

    def __init__(self, url_per_s: float, bucket: float, refill: float) -> None:
        self.url_per_s, self.bucket, self.refill = url_per_s, bucket, refill
        self.tokens, self.at = bucket, time.monotonic()
        self.sent: deque[list[float]] = deque()
        self.lock = threading.Lock()

    def take(self, kind: str, n: int) -> list[float] | None:
        while True:
            with self.lock:
                now = time.monotonic()
                if kind == "files":
                    while self.sent and self.sent[0][0] <= now - 1.0:
                        self.sent.popleft()
                    if sum(c for _, c in self.sent) + n <= self.url_per_s:
                        entry = [now, float(n)]
                        self.sent.append(entry)
                        return entry
                else:
                    self.tokens = min(self.bucket, self.tokens + (now - self.at) * self.refill)
                    self.at = now
                    if self.tokens >= 1:
                        self.tokens -= 1
                        return None
            time.sleep(0.005)

    def done(self, entry: list[float] | None) -> None:
        if entry is not None:
            with self.lock:
                entry[0] = time.monotonic()  # counts from completion
                self.sent = deque(sorted(self.sent))


def main() -> int:
    bootstrap, topic, group, api, zone, token, plan = sys.argv[1:8]
    limits = PLANS[plan]
    limiter = Limiter(limits["url_per_s"], limits["bucket"], limits["refill"])
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    url = f"{api}/client/v4/zones/{zone}/purge_cache"
    counts = {"requests": 0, "items": 0, "r429": 0}

    def send(kind: str, items: list[str]) -> None:
        while True:
            entry = limiter.take(kind, len(items))
            try:
                resp = session.post(url, json={kind: items}, timeout=30)
            finally:
                limiter.done(entry)
            counts["requests"] += 1
            if resp.status_code == 429:
                counts["r429"] += 1
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            if resp.status_code >= 500:
                time.sleep(1)
                continue
            resp.raise_for_status()
            counts["items"] += len(items)
            return

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=2000,
    )
    parts = consumer.partitions_for_topic(topic) or set()
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
    decode = msgspec.json.decode
    pool = ThreadPoolExecutor(CONCURRENCY)
    done: dict[TopicPartition, int] = {}
    while any(done.get(tp, 0) < end for tp, end in ends.items()):
        batches = consumer.poll(timeout_ms=1000)
        urls: dict[str, None] = {}
        tags: dict[str, None] = {}
        for tp, records in batches.items():
            for r in records:
                data = decode(r.value).get("data") or {}
                for page in data.get("pages", ()):
                    urls[f"https://{HOST}/a/{page}"] = None
                if "id" in data:
                    tags[f"article-{data['id']}"] = None
            done[tp] = records[-1].offset + 1
        jobs = []
        for kind, items, cap in (
            ("files", list(urls), limits["files_cap"]),
            ("tags", list(tags), TAGS_CAP),
        ):
            for i in range(0, len(items), cap):
                jobs.append(pool.submit(send, kind, items[i : i + cap]))
        for job in jobs:
            job.result()
        if batches:
            consumer.commit()
    consumer.close()
    pool.shutdown()
    print(msgspec.json.encode(counts).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
