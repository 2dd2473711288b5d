"""Every Prometheus metric purge-worker exports, in one place, with small fixed label sets.

Label values come from closed sets (outcomes, kinds, status classes, error classes) or from
configuration (topic, zone name): never from event content, never a secret.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)
_P = "purge_worker_"

# Records taken from Kafka, by how they ended: purged, dead_lettered, skipped (no rule fired).
RECORDS = Counter(
    _P + "records_total", "Records processed", ["topic", "outcome"], registry=REGISTRY
)
# Targets the rules produced, before coalescing.
TARGETS = Counter(
    _P + "targets_total", "Purge targets produced by rules", ["kind"], registry=REGISTRY
)
# Items actually sent in purge requests, after dedupe and subsumption (ratio with TARGETS).
ITEMS_SENT = Counter(
    _P + "items_sent_total", "Items sent in purge requests", ["kind"], registry=REGISTRY
)
# Targets not sent because an accepted purge sent after their event already covers them (the
# purge ledger), or that joined such a purge still in flight.
TARGETS_ALREADY_PURGED = Counter(
    _P + "targets_already_purged_total",
    "Targets not sent again: a later purge already covers them",
    ["kind", "how"],
    registry=REGISTRY,
)
# Items the purge ledger remembers (bounded by coalesce.ledger.max_entries).
LEDGER_ENTRIES = Gauge(
    _P + "purge_ledger_entries", "Items the purge ledger remembers", registry=REGISTRY
)
# Items the ledger learned from the receipts topic (at start, and from other workers since).
LEDGER_RESTORED = Counter(
    _P + "purge_ledger_restored_total",
    "Ledger entries learned from receipts written by this or other workers",
    registry=REGISTRY,
)
# Receipts by outcome: written (confirmed by the broker), failed, dropped (queue full, or the
# topic unwritable meanwhile).
RECEIPTS = Counter(
    _P + "receipts_total", "Purge and dead-letter receipts", ["outcome"], registry=REGISTRY
)
for _outcome in ("written", "failed", "dropped"):
    RECEIPTS.labels(_outcome)
# Purge API requests by zone, selector and HTTP status class (2xx, 4xx, 429, 5xx, error).
REQUESTS = Counter(
    _P + "api_requests_total", "Purge API requests", ["zone", "kind", "status"], registry=REGISTRY
)
# Wall time of each purge API request.
REQUEST_SECONDS = Histogram(
    _P + "api_request_seconds",
    "Purge API request latency",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
# Retries of purge requests after a retryable failure.
RETRIES = Counter(_P + "api_retries_total", "Purge request retries", ["kind"], registry=REGISTRY)
# 429 answers: should stay at zero; a rise means another client shares the account's budget.
RATE_LIMITED = Counter(_P + "api_rate_limited_total", "429 answers from the API", registry=REGISTRY)
# Batches the API refused as too large: the per-request cap changed under us.
CAP_REJECTED = Counter(
    _P + "api_cap_rejected_total",
    "Requests refused for too many items",
    ["kind"],
    registry=REGISTRY,
)
# Time spent waiting for the client-side rate limiter.
LIMITER_WAIT = Counter(
    _P + "rate_limiter_wait_seconds_total", "Seconds waited for rate budget", registry=REGISTRY
)
# Dead-letter records written, by purge.error.class.
DEAD_LETTERS = Counter(
    _P + "dead_letters_total",
    "Records written to the dead-letter topic",
    ["error_class"],
    registry=REGISTRY,
)
# Targets and records waiting in the coalescer or in flight.
PENDING_TARGETS = Gauge(
    _P + "pending_targets", "Targets pending in the coalescer", registry=REGISTRY
)
PENDING_RECORDS = Gauge(_P + "pending_records", "Records not yet committable", registry=REGISTRY)


class StepHistogram:
    """A histogram the loop adds a step's values to at once. prometheus_client's takes ~1 µs an
    observation (a lock, then a walk of the buckets), a tenth of what the loop spends on a record
    in a backlog; here a step's values are counted into their buckets first, then added under
    one lock. Exposed as prometheus_client's own are (buckets, count, sum)."""

    def __init__(
        self, name: str, doc: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._doc = name, doc
        self._bounds = (*buckets, math.inf)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_all(self, values: Iterable[float]) -> None:
        """Observe each of ``values`` (a negative one, a clock's skew, as zero)."""
        bounds, counts, total = self._bounds, [0] * len(self._bounds), 0.0
        for value in values:  # each purged record of a backlog: no call it can do without
            seen = value if value > 0.0 else 0.0
            counts[bisect_left(bounds, seen)] += 1  # the first bucket whose bound is ≥ it
            total += seen
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = self._counts, self._sum
        cumulative = itertools.accumulate(counts)
        # The bounds as prometheus_client writes them: 1.0, not 1; +Inf last.
        labels = ["+Inf" if b == math.inf else repr(float(b)) for b in self._bounds]
        yield HistogramMetricFamily(
            self._name,
            self._doc,
            buckets=list(zip(labels, cumulative, strict=True)),
            sum_value=total,
        )


# Event age at purge: now minus the event's own time (the lag to alert on).
EVENT_AGE = StepHistogram(
    _P + "event_age_seconds",
    "Seconds from the event's time to its purge being accepted",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
# Consumer lag per partition: log end offset minus the committed position.
CONSUMER_LAG = Gauge(
    _P + "consumer_lag", "Records behind the log end", ["topic", "partition"], registry=REGISTRY
)
# Unix time of the last record processed; "now - this" grows when stuck, with or without events.
LAST_RECORD_TIME = Gauge(
    _P + "last_record_timestamp_seconds", "When the last record was processed", registry=REGISTRY
)
# Unix time of the last poll loop iteration (liveness).
LAST_POLL_TIME = Gauge(
    _P + "last_poll_timestamp_seconds", "When the poll loop last ran", registry=REGISTRY
)
# Whether consumption is paused for backpressure (1) or running (0).
PAUSED = Gauge(_P + "consumption_paused", "1 while partitions are paused", registry=REGISTRY)
# This worker's share of each account's budgets (budget: urls, flex), and what it wants of them
# (a fraction of each; above 1 when it could use more than the whole account), which the budget
# exchange splits the account by.
BUDGET_SHARE = Gauge(
    _P + "rate_budget_share",
    "This worker's share of the account's purge budget",
    ["account", "budget"],
    registry=REGISTRY,
)
BUDGET_DEMAND = Gauge(
    _P + "rate_budget_demand",
    "What this worker wants of the account's purge budget, as a fraction of it",
    ["account", "budget"],
    registry=REGISTRY,
)


def child(metric: Counter, *labels: str) -> Counter:
    """``metric.labels(*labels)``, looked up once: the hot loop counts per record and target."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


_CHILDREN: dict[tuple[int, tuple[str, ...]], Counter] = {}


def status_class(status: int | None) -> str:
    """Collapse an HTTP status into the small label set of REQUESTS."""
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


# Warming (``worker.outcome.warming``): requests by what the edge answered (``CF-Cache-Status``
# lowercased; ``error`` when no answer came), HITs right after a purge (the purge did not take
# effect), URLs waiting and URLs dropped from a full queue.
WARM_REQUESTS = Counter(
    _P + "warm_requests_total",
    "Warm requests by the edge's cache status",
    ["zone", "cache_status"],
    registry=REGISTRY,
)
WARM_HIT_AFTER_PURGE = Counter(
    _P + "warm_hit_after_purge_total",
    "Warm requests answered HIT right after a purge",
    ["zone"],
    registry=REGISTRY,
)
WARM_QUEUE = Gauge(_P + "warm_queue", "URLs waiting to be warmed", registry=REGISTRY)
WARM_DROPPED = Counter(
    _P + "warm_dropped_total", "URLs dropped from a full warm queue", ["zone"], registry=REGISTRY
)


def forget_lag(topic: str, partition: int) -> None:
    """Remove a partition's lag series once it is another worker's: a stale value would read as
    lag that never moves (and sums of the series would count it twice)."""
    with contextlib.suppress(KeyError):  # never reported
        CONSUMER_LAG.remove(topic, str(partition))
