"""One plan for every command: what ``explain`` prints is exactly what ``run`` sends."""

import json
from pathlib import Path

import pytest
import requests

from tests.conftest import TOKEN
from tests.helpers import cloudevent, make_config
from worker import app
from worker.clock import SystemClock
from worker.commands.explain import explain
from worker.config.load import load
from worker.errors import InvalidEvent
from worker.events import Record
from worker.intake.decode import decode
from worker.intake.memory import InMemorySource
from worker.outcome.memory import InMemorySink
from worker.planning.planner import Planner
from worker.planning.rules import ruleset

ROOT = Path(__file__).resolve().parent.parent
EVENTS = sorted((ROOT / "examples" / "events").glob("*.json"))
EXAMPLE_ZONES = {
    "023e105f4ecef8ad9ca31a8372d0c353": "acc",
    "9a7806061c88ada191ed06f989cc3dac": "acc",
}


def _canon(kind, mode, zone_id, items):
    return (
        zone_id,
        kind,
        mode,
        tuple(sorted(json.dumps(i, sort_keys=True) for i in items)),
    )


@pytest.mark.parametrize("event_file", EVENTS, ids=lambda p: p.stem)
def test_explain_prints_exactly_what_run_sends(event_file, emulator_factory):
    emulator = emulator_factory(plan="enterprise", zones=EXAMPLE_ZONES)
    config = load(
        ROOT / "examples" / "config.yaml",
        env={"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_BASE_URL": emulator.api_url},
    )
    record = Record(config.kafka.topics[0], 0, 0, b"k", event_file.read_bytes(), ())
    plan, code = explain(record, config)
    assert code == 0 and plan["purges"], plan

    source, sink = InMemorySource([record]), InMemorySink()
    clock = SystemClock()
    pipeline = app.build_loop(config, source, sink, clock)
    for _ in range(400):
        pipeline.step()
        if pipeline.idle and source.positions[(record.topic, 0)] == 1:
            break
    pipeline.outcome.commits.commit()
    sent = requests.get(emulator.url + "/__emulator/purges", timeout=5).json()
    endpoint_mode = {"purge_cache": "purge", "invalidate_cache": "invalidate"}
    assert sorted(
        _canon(p["kind"], endpoint_mode[p["endpoint"]], p["zone_id"], p["items"]) for p in sent
    ) == sorted(_canon(p["kind"], p["mode"], p["zone_id"], p["items"]) for p in plan["purges"])
    assert sink.records == [] and source.committed == {(record.topic, 0): 1}


# -- the planner's memory ---------------------------------------------------------------------


def _article(event_id: str, **data) -> bytes:
    return cloudevent(
        "article.updated", {"id": 7, "slug": "s", "locales": ["en"], **data}, event_id
    )


def test_events_alike_in_what_the_rules_read_get_one_plan_made_once(monkeypatch):
    config = make_config("http://127.0.0.1:1")
    planner = Planner(config.planning)
    made = []
    evaluate = config.rules.evaluate
    monkeypatch.setattr(config.rules, "evaluate", lambda e: made.append(e.id) or evaluate(e))

    def plan(offset: int, value: bytes) -> list[str]:
        p = planner.plan(Record("cms", 0, offset, None, value, (), 1_000 + offset))
        assert p.event is not None and p.event.offset == offset  # the record's own event
        return sorted(str(t.target) for t in p.targets) + [str(e) for e in p.errors]

    first = plan(0, _article("e1"))
    assert plan(1, _article("e2")) == first and made == ["e1"]  # a new id, the same plan
    # Anything a rule reads makes its own plan: a field, the list a template fans out over.
    assert plan(2, _article("e3", slug="t")) != first and made == ["e1", "e3"]
    assert plan(3, _article("e4", locales=["en", "de"])) != first
    assert plan(4, _article("e5")) == first and made == ["e1", "e3", "e4"]
    # Failures are not remembered: each record that has them is planned (and dead-lettered).
    broken = cloudevent("article.updated", {"id": 7, "locales": ["en"]}, "e6")
    assert plan(5, broken) == plan(6, broken) and "slug" in plan(7, broken)[-1]
    assert made[-3:] == ["e6", "e6", "e6"]


def test_a_remembered_plan_is_the_plan_made_afresh():
    config = make_config("http://127.0.0.1:1")
    planner = Planner(config.planning)
    events = [
        cloudevent(
            "article.updated", {"id": i % 3, "slug": f"s{i % 2}", "locales": ["en"]}, f"e{i}"
        )
        for i in range(12)
    ]
    for offset, value in enumerate(events * 2):
        record = Record("cms", 0, offset, None, value, ())
        kept, fresh = (
            planner.plan(record),
            Planner(make_config("http://127.0.0.1:1").planning).plan(record),
        )
        assert (kept.fired, kept.targets, kept.warm) == (fresh.fired, fresh.targets, fresh.warm)


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "x", "n": NaN}',
        '{"type": "x", "n": 1180591620717411303424}',
        '{"type": "\\ud800"}',
    ],
    ids=["nan", "big-int", "lone-surrogate"],
)
def test_the_decoder_reads_what_the_standard_parser_reads(text):
    event = decode(Record("cms", 0, 0, None, text.encode(), ()))
    assert repr(event.body) == repr(json.loads(text))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"type": "caf\xe9"}', "record value is not UTF-8: invalid continuation byte at byte 13"),
        (b'{"type": ', "record value is not JSON: Expecting value: line 1 column 10 (char 9)"),
        (b"[" * 100_000 + b"]" * 100_000, "record value is JSON nested too deeply"),
    ],
    ids=["latin-1", "truncated", "deep"],
)
def test_the_decoder_says_why_a_value_is_unreadable(value, reason):
    with pytest.raises(InvalidEvent) as failed:
        decode(Record("cms", 0, 0, None, value, ()))
    assert str(failed.value) == reason


RULES_BY_TYPE = [
    {
        "name": "news",
        "match": {"type": {"regex": "^article\\.(?P<what>\\w+)$"}, "fields": {"data.kind": "news"}},
        "urls": ["https://www.example.com/{match.what}/{data.slug}"],
    },
    {
        "name": "images",
        "match": {"type": "image.updated"},
        "tags": ["img-{data.id}"],
        "zone": "example.com",
    },
]


def test_events_no_rule_can_match_share_one_plan_whatever_their_fields(monkeypatch):
    """A page view no rule matches has one plan, made once: only what the rules that can match
    an event's topic and type read tells its plans apart (each article viewed had its own)."""
    config = make_config("http://127.0.0.1:1", rules=RULES_BY_TYPE)
    planner = Planner(config.planning)
    made = []
    evaluate = config.rules.evaluate
    monkeypatch.setattr(config.rules, "evaluate", lambda e: made.append(e.type) or evaluate(e))
    for n in range(50):
        view = cloudevent("page.viewed", {"id": n, "slug": f"s{n}", "kind": "news"}, f"v{n}")
        assert planner.planned(Record("cms", 0, n, None, view, ())).skipped
    assert made == ["page.viewed"]
    # Where a rule can match, what it reads still tells plans apart: its fields, its captures.
    for n, (type_, kind, slug) in enumerate(
        [
            ("article.updated", "news", "a"),
            ("article.updated", "blog", "a"),
            ("article.deleted", "news", "a"),
            ("article.updated", "news", "b"),
            ("image.updated", "news", "a"),
        ]
        * 2
    ):
        value = cloudevent(type_, {"id": 3, "slug": slug, "kind": kind}, f"e{n}")
        record = Record("cms", 0, 100 + n, None, value, ())
        fresh = Planner(make_config("http://127.0.0.1:1", rules=RULES_BY_TYPE).planning)
        kept, made_afresh = planner.planned(record), fresh.planned(record)
        assert kept[:4] == made_afresh[:4] and list(kept.targets) == list(made_afresh.targets)
        assert not kept.errors and not made_afresh.errors
    assert made.count("article.updated") == 3 and made.count("image.updated") == 1


def test_what_the_rules_read_per_type_is_remembered_within_a_bound():
    config = make_config("http://127.0.0.1:1", rules=RULES_BY_TYPE)
    rules = config.rules
    for n in range(ruleset.READERS_KEPT + 10):
        assert rules.reads_for("cms", f"t{n}") == ()  # no rule can match any of them
    assert len(rules._reads_for) <= ruleset.READERS_KEPT
    assert rules.reads_for("cms", "article.x") == (("data", "kind"), ("data", "slug"))
    assert rules.reads_for("cms", None) == ()
