"""Every long-lived structure has a bound (README, "Memory"), and each bound holds.

Fed far more distinct input than any bound: the structure's size stays within it, whatever the
input's shape (one target per event or thousands), and metric label sets stay a function of the
config, not of the events.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc

import pytest

from tests.helpers import MemoryApi, make_config
from tests.test_pipeline_unit import build, rec, run_until_idle
from worker import errors
from worker.clock import MockClock
from worker.cloudflare.meters import USED_SPAN
from worker.cloudflare.ratelimit import AccountRateLimiter
from worker.cloudflare.tiers import Tier, limits_for
from worker.config.model import GuardSettings, LedgerSettings
from worker.events import Record
from worker.observe import metrics
from worker.outcome.guard import DeadLetterGuard
from worker.outcome.warming import CACHE_STATUSES, _cache_status
from worker.pending.bucket import Pending
from worker.pending.ledger import PurgeLedger
from worker.planning import planner as planner_module
from worker.planning.memo import Memo
from worker.planning.planner import Planner
from worker.planning.rules import declarative
from worker.targets import CACHE_SIZE, Kind, Mode, Target, normalize_tag, normalize_url


def test_a_memo_starts_over_at_either_bound():
    memo: Memo[tuple[int, ...]] = Memo(max_entries=3, max_weight=10, weight=len)
    for i in range(3):
        memo.put(i, (i,))
    assert len(memo) == 3 and memo.weight == 3
    memo.put(3, (3,))  # a fourth entry: starts over
    assert len(memo) == 1 and memo.get(0) is None and memo.get(3) == (3,)
    memo.put(4, tuple(range(9)))  # 1 + 9 = 10: fits exactly
    assert memo.weight == 10 and memo.restarts == 1
    memo.put(5, (5,))  # over the weight: starts over
    assert memo.weight == 1 and memo.restarts == 2
    memo.put(6, tuple(range(11)))  # heavier than the whole memo: not kept, nothing lost
    assert memo.get(6) is None and memo.get(5) == (5,)
    memo.put(5, (1, 2))  # replacing an entry reweighs it
    assert memo.weight == 2 and len(memo) == 1


def _event(n: int, type_: str = "article.published", **data: object) -> bytes:
    return json.dumps(
        {"specversion": "1.0", "id": f"e{n}", "source": "cms", "type": type_, "data": data}
    ).encode()


def test_the_planning_caches_hold_their_bounds_for_any_shape_of_input():
    rules = [
        {
            "name": "article",
            "match": {"type": "article.published"},
            "urls": ["https://www.example.com/{data.slug}"],
            "tags": ["article-{data.id}"],
            "zone": "example.com",
        },
        {
            "name": "gallery",
            "match": {"type": "gallery.updated"},
            "urls": [
                "https://www.example.com/g/{data.slug}/{data.pages[]}",
                "https://www.example.com/print/{data.slug}/{data.pages[]}",
            ],
        },
    ]
    config = make_config(MemoryApi.URL, rules=rules)
    planner = Planner(config.planning)
    plans, routes = planner._plans, planner._routes
    renders = [rule._rendered for rule in config.planning.rules.rules]
    sizes: list[tuple[int, int, int, int]] = []

    def check() -> None:
        for memo in (plans, planner._data_plans):  # by what the rules read; by the data
            assert len(memo) <= planner_module.PLAN_CACHE_SIZE
            assert memo.weight <= planner_module.PLAN_CACHE_TARGETS
        assert len(routes) <= planner_module.ROUTE_CACHE_SIZE
        assert routes.weight <= planner_module.ROUTE_CACHE_TARGETS
        for memo in renders:
            assert len(memo) <= declarative.RENDER_CACHE_SIZE
            assert memo.weight <= declarative.RENDER_CACHE_TARGETS
        sizes.append((len(plans), plans.weight, len(routes), routes.weight))

    # Many small plans: more distinct articles than the plan and route memos hold.
    for n in range(planner_module.ROUTE_CACHE_SIZE + 5_000):
        record = Record("cms", 0, n, None, _event(n, slug=f"a{n}", id=n), ())
        assert planner.planned(record).targets  # as the loop plans: remembered by data too
        assert not planner.plan(record).errors
        if n % 1_000 == 0:
            check()
    assert plans.restarts >= 1 and routes.restarts >= 1 and planner._data_plans.restarts >= 1
    # Few heavy plans: 2,000 targets each (two templates over 1,000 pages), far fewer entries
    # than the count bound allows.
    for n in range(200):
        pages = [f"p{i}" for i in range(1_000)]
        body = _event(n, "gallery.updated", slug=f"g{n}", pages=pages)
        plan = planner.plan(Record("cms", 0, n, None, body, ()))
        assert len(plan.targets) == 2_000
        check()
    assert max(s[1] for s in sizes) <= planner_module.PLAN_CACHE_TARGETS


def test_the_planning_caches_at_their_bounds_fit_the_documented_memory():
    """README, "Memory": the planning memos full of one-URL plans take under 48 MiB (planned
    as the loop plans them: remembered by what the rules read and by the events' data)."""
    rules = [
        {
            "name": "article",
            "match": {"type": "article.published"},
            "urls": ["https://www.example.com/articles/{data.slug}"],
        }
    ]
    config = make_config(MemoryApi.URL, rules=rules)
    planner = Planner(config.planning)
    # Past every bound once, so the figure is the structures at their fullest.
    count = planner_module.ROUTE_CACHE_SIZE - 1
    bodies = [_event(n, slug=f"an-article-slug-of-usual-length-{n:08d}") for n in range(count)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, body in enumerate(bodies):
            planner.planned(Record("cms", 0, n, None, body, ()))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(planner._routes) == count and len(planner._data_plans) > 0
    assert held < 48 * 2**20, f"{held / 2**20:.1f} MiB"


def test_the_ledger_remembers_at_most_max_entries():
    ledger = PurgeLedger(LedgerSettings(max_entries=1_000))
    for n in range(5_000):
        item = Pending(Target(Kind.FILES, f"https://www.example.com/{n}"))
        ledger.sending("z", Mode.PURGE, [item], sent_at=float(n))
        ledger.settled("z", Mode.PURGE, [item], float(n), accepted={item.target})
        assert len(ledger) <= 1_000
    assert len(ledger) == 1_000
    assert not ledger._in_flight  # every request ended: nothing held for it


def test_receipts_waiting_for_the_broker_and_for_the_ledger_hold_their_bounds(monkeypatch):
    """The writer keeps at most ``MAX_QUEUED`` receipts while Kafka is away (the rest are
    dropped and counted); the feed keeps at most the ledger's size for the loop to learn."""
    from kafka.errors import KafkaError

    from worker.config.settings import KafkaSettings
    from worker.kafka import receipt_feed, receipts

    settings = KafkaSettings(bootstrap_servers=["127.0.0.1:9"], topics=["cms"], group_id="g")

    def kafka_away(self: receipts.KafkaReceiptSink) -> None:
        # Still connecting until the sink closes. (A real client to a dead address would
        # outlive the test, and its backoff's use of ``random`` upsets Hypothesis in the next.)
        with self._cond:
            self._cond.wait_for(lambda: self._stopping)
        raise KafkaError("no broker")

    monkeypatch.setattr(receipts.KafkaReceiptSink, "_connect", kafka_away)
    dropped = metrics.RECEIPTS.labels("dropped")._value.get()
    sink = receipts.KafkaReceiptSink(settings, "receipts")
    try:
        for n in range(receipts.MAX_QUEUED + 500):
            sink.submit(b"k", b"%d" % n)
        assert len(sink._queue) <= receipts.MAX_QUEUED
        assert metrics.RECEIPTS.labels("dropped")._value.get() - dropped >= 500
    finally:
        sink.close(timeout=5.0)
    assert not sink._thread.is_alive()
    feed = receipt_feed.ReceiptFeed(settings, "receipts", since=0.0, max_entries=100)
    key = ("z", Mode.PURGE, Kind.TAGS, "t", ())
    feed._entries.extend((key, float(n)) for n in range(1_000))
    assert len(feed.take()) == 100


def test_normalised_targets_are_remembered_up_to_the_cache_size():
    for fn in (normalize_url, normalize_tag):
        assert fn.cache_info().maxsize == CACHE_SIZE
    for n in range(CACHE_SIZE + 100):
        normalize_tag(f"t{n}")
    assert normalize_tag.cache_info().currsize <= CACHE_SIZE


def test_the_guard_keeps_one_counter_per_second_of_its_window():
    clock = MockClock()
    settings = GuardSettings(window_seconds=30)
    guard = DeadLetterGuard(settings, clock)
    for _ in range(600):  # ten minutes of arrivals, one batch a second, no dead letter to ask
        guard.arrived(100, clock.monotonic())
        clock.advance(1.0)
    assert len(guard._seconds) <= math.ceil(settings.window_seconds) + 1
    for _ in range(600):  # and with dead letters
        guard.arrived(100, clock.monotonic())
        guard.dead(clock.monotonic())
        clock.advance(1.0)
    assert len(guard._seconds) <= math.ceil(settings.window_seconds) + 1


def test_a_cache_status_from_outside_never_makes_a_new_label():
    assert {_cache_status(v) for v in ("HIT", "miss", " Expired ", None)} == {
        "hit",
        "miss",
        "expired",
        "none",
    }
    assert {_cache_status(f"weird-{n}") for n in range(100)} == {"other"}
    assert "other" not in CACHE_STATUSES


def _error_classes() -> list[type[errors.PermanentError]]:
    out, todo = [], [errors.PermanentError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def _label_sets() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    out: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.labels:
                out.setdefault(family.name, set()).add(tuple(sorted(sample.labels.items())))
    return out


def test_metric_label_sets_come_from_the_config_not_from_events():
    """Hostile events (distinct types, hosts, bodies, error texts) make label sets only of the
    config's names and fixed vocabularies (kinds, classes, outcomes, status classes), never of
    event data: the number of series is bounded by the config."""

    def records(start: int, count: int) -> list[Record]:
        out = []
        for n in range(start, start + count):
            shape = n % 5
            if shape == 0:
                value = _event(n, "article.published", slug=f"s{n}", locales=["en"], id=n)
            elif shape == 1:
                value = _event(n, f"type-{n}")  # no rule matches
            elif shape == 2:
                value = f"not json {n}".encode()
            elif shape == 3:
                value = _event(n, "image.updated", host=f"h{n}.unknown-{n}.net", path="x.jpg")
            else:
                value = _event(n, "article.published", slug=f"{n}\x00", locales=["en"], id=n)
            out.append(rec(n, value))
        return out

    delivery = {"no_rule_matched": "dead_letter", "dead_letter_guard": {"max_ratio": 1.0}}
    loop, source, _, _ = build(records(0, 500), delivery=delivery)
    run_until_idle(loop, source)
    first = _label_sets()
    for record in records(500, 2_000):
        source.add(record)
    run_until_idle(loop, source)
    after = _label_sets()
    allowed = {
        "topic": {"cms"},
        "partition": {"0"},
        "outcome": {"purged", "dead_lettered", "skipped"},
        "zone": {"example.com", "cdn"},
        "account": {"main"},
        "budget": {"urls", "flex"},
        "kind": {kind.value for kind in Kind},
        "how": {"sent", "in_flight"},
        "status": {"2xx", "4xx", "429", "5xx", "error"},
        "error_class": {cls.error_class for cls in _error_classes()},
    }
    for family, sets in after.items():
        for labels in sets - first.get(family, set()):
            for name, value in labels:
                if name != "le":  # a histogram's fixed buckets
                    assert value in allowed[name], (family, name, value)


def test_the_rate_limiter_forgets_what_it_took_even_when_nobody_asks():
    """Without the budget exchange nothing reads the limiter's record of what it took: it must
    still forget it (a worker with ``budget_topic: null`` grew by one entry per request)."""
    clock = MockClock()
    limiter = AccountRateLimiter(limits_for(Tier.ENTERPRISE), clock, start_full=True)
    for _ in range(3_000):
        wait, _ = limiter.reserve_ticket(Kind.TAGS, 1)
        clock.advance(max(wait, 0.1))
    assert len(limiter._used._taken) <= USED_SPAN / 0.1 + 1


_HOLES = """
import sys
from worker.runtime import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
del bytearray(4 << 20)[:]  # one large block freed: glibc's default raises its threshold here
base = rss()
blocks = [bytearray(512 << 10) for _ in range(60)]
keep = bytearray(256 << 10)  # one more after them: below it, the heap cannot shrink
del blocks
print(rss() - base)
"""


@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_freed_large_tables_go_back_to_the_system(mode):
    """The resident memory of a process that freed large tables: with the worker's malloc
    setting they are returned at once; glibc's default keeps them (which the soak showed as
    steps), so this test would notice the setting going missing."""
    out = subprocess.run(
        [sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, check=True
    )
    kept_kib = int(out.stdout)
    if mode == "tuned":
        assert kept_kib < 4096, kept_kib
    else:
        assert kept_kib > 16384, kept_kib  # the effect the setting exists for


def test_what_the_envelope_look_up_remembers_per_topic_and_type_holds_its_bound():
    from worker.planning import envelope

    planner = Planner(make_config(MemoryApi.URL).planning)
    by_data = planner._by_data
    for n in range(envelope.KEPT + 500):  # replayed dead letters name any topic they like
        value = _event(n, f"t{n}", slug="s")
        origin = Record(f"topic-{n}", 0, n, None, value, ())
        planner.planned(Record("cms.dlq", 0, n, None, value, (), origin=origin))
        assert len(by_data._judges) <= envelope.KEPT
        assert len(by_data._depends) <= envelope.KEPT
    assert len(by_data._judges) < envelope.KEPT and len(by_data._depends) < envelope.KEPT
