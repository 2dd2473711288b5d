"""Plans found by an event's data bytes (``worker.planning.envelope``) are exactly the plans the
whole way makes, whatever the event: odd envelopes, bad times, headers, replayed records, rules
that read outside the data."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import make_config
from tests.test_planproc import same
from worker.events import Record
from worker.planning import envelope
from worker.planning.planner import Planned, Planner

RULES = [
    {
        "name": "articles",
        "match": {"type": "article.updated", "fields": {"data.kind": "news"}},
        "urls": ["https://www.example.com/a/{data.pages[]}"],
        "tags": ["article-{data.id}"],
        "zone": "example.com",
    },
    {"name": "images", "match": {"type": "image.updated"}, "urls": ["https://{data.host}/i"]},
    # Replayed dead letters are planned by the topic they came from.
    {
        "name": "shop",
        "match": {"topic": "shop", "type": "article.updated"},
        "tags": ["shop-{data.id}"],
        "zone": "example.com",
    },
    # Reads outside the data: events of this type always go the whole way.
    {
        "name": "by-source",
        "match": {"type": "feed.updated", "fields": {"source": "/cms"}},
        "tags": ["feed-{data.id}"],
        "zone": "example.com",
    },
]

DATA = st.sampled_from(
    [
        {"id": 1, "kind": "news", "pages": ["p1", "p2"]},
        {"id": 1, "kind": "news", "pages": ["p1"]},
        {"id": "1", "kind": "news", "pages": ["p1"]},
        {"id": 2, "kind": "blog", "pages": ["p2"]},
        {"id": 3, "kind": "news", "pages": "p3"},  # not a list: an error, never remembered
        {"id": None, "kind": "news", "pages": []},
        {"host": "www.example.com"},
        {"host": "evil.org"},  # no such zone
        {},
        [1, 2],
        None,
    ]
)
BINARY = {"specversion": "1.0", "id": "b1", "source": "/bin", "type": "image.updated"}
TIMES = st.sampled_from(
    [None, "2026-11-27T10:00:00Z", "2026-11-27T10:00:00.5+01:00", "yesterday", 1.8e9, 1.8e12]
)


@st.composite
def values(draw: st.DrawFn) -> bytes:
    event = {
        # Mostly events the envelope can be read from, the odd one not.
        "specversion": draw(st.sampled_from(["1.0"] * 5 + ["0.3"] * 2 + [1])),
        "id": draw(st.sampled_from(["e1", "e2", "e3"] * 3 + ["", 7])),
        "source": draw(st.sampled_from(["/cms", "/shop"] * 4 + [""])),
        "type": draw(
            st.sampled_from(
                ["article.updated"] * 4 + ["image.updated", "feed.updated", "page.viewed", 3]
            )
        ),
    }
    time = draw(TIMES)
    if time is not None:
        event["time"] = time
    if draw(st.integers(0, 9)):
        event["data"] = draw(DATA)
    text = json.dumps(event, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if draw(st.integers(0, 9)) == 0:  # the data twice: the last one is the event's
        text = text[:-1] + ', "data": ' + json.dumps(draw(DATA)) + "}"
    if draw(st.integers(0, 19)) == 0:
        text = text.replace('"kind"', '"ki\\u006ed"')  # the same value, other bytes
    if draw(st.integers(0, 19)) == 0:
        text = text[:-1]  # not JSON
    return text.encode()


@st.composite
def records(draw: st.DrawFn) -> Record:
    value = draw(values())
    headers = draw(
        st.sampled_from(
            [()] * 8
            + [
                (("content-type", b"application/json"),),
                # Binary mode: the attributes are headers, the whole value is the data.
                tuple((f"ce_{k}", v.encode()) for k, v in BINARY.items()),
            ]
        )
    )
    stamp = draw(st.sampled_from([1_800_000_000_000, None]))
    record = Record("cms", 0, draw(st.integers(0, 99)), None, value, headers, stamp)
    if draw(st.integers(0, 4)) == 0:  # a replayed dead letter: rules see where it came from
        origin = Record(draw(st.sampled_from(["shop", "cms"])), 2, 5, None, value, headers, stamp)
        record = Record("cms.dlq", 0, 1, None, value, headers, stamp, origin=origin)
    return record


@settings(max_examples=300, deadline=None)
@given(st.lists(records(), min_size=5, max_size=40), st.booleans())
def test_a_plan_found_by_data_is_the_plan_made_the_whole_way(
    batch: list[Record], event_time: bool
) -> None:
    ledger = {"event_time": "event" if event_time else "record"}
    config = make_config("http://127.0.0.1:1", rules=RULES, coalesce={"ledger": ledger})
    planner = Planner(config.planning)
    for record in batch * 2:  # the second time round, every remembered plan is found
        fresh = Planner(config.planning)
        same(planner.planned(record), Planned.of(fresh.plan(record), event_time))


def test_an_event_like_one_before_it_is_planned_from_its_envelope(monkeypatch):
    config = make_config("http://127.0.0.1:1", rules=RULES)
    planner = Planner(config.planning)
    body = {"specversion": "1.0", "source": "/cms", "type": "article.updated"}
    data = {"id": 4, "kind": "news", "pages": ["x"]}
    first = json.dumps({**body, "id": "e1", "data": data}).encode()
    planner.planned(Record("cms", 0, 0, None, first, (), 1_800_000_000_000))
    decoded = []
    monkeypatch.setattr(planner, "_decode", lambda r: decoded.append(r) or None)
    again = json.dumps({**body, "id": "e2", "time": "2026-11-27T10:00:00Z", "data": data})
    plan = planner.planned(Record("cms", 0, 1, None, again.encode(), (), 1_800_000_000_000))
    assert not decoded  # found by its data's bytes: the event was not decoded
    assert plan.event_id == "e2" and plan.event_time == 1_795_773_600.0
    assert [r.target.value for r in plan.targets] == [
        "https://www.example.com/a/x",
        "article-4",
    ]


def _event(data: object = None, **attrs: object) -> bytes:
    body = {"specversion": "1.0", "id": "e1", "source": "/cms", "type": "article.updated"}
    return json.dumps({**body, **attrs, "data": data or ARTICLE}).encode()


ARTICLE = {"id": 9, "kind": "news", "pages": ["p"]}
STAMP = 1_800_000_000_000


@pytest.mark.parametrize(
    "second",
    [
        # Binary mode: the value is the data; the headers say what the event is.
        Record(
            "cms", 0, 1, None, _event(), tuple((f"ce_{k}", v.encode()) for k, v in BINARY.items())
        ),
        Record("cms", 0, 1, None, _event(specversion="0.3"), (), STAMP),
        Record("cms", 0, 1, None, _event(id=""), (), STAMP),
        Record("cms", 0, 1, None, _event(time="not a time"), (), STAMP),
        Record("cms", 0, 1, None, _event(time="2026-11-27T10:00:00Z"), (), None),
        Record("cms", 0, 1, None, _event(type="feed.updated", source="/shop"), (), STAMP),
        Record(
            "cms.dlq",
            0,
            1,
            None,
            _event(),
            (),
            STAMP,
            origin=Record("shop", 0, 7, None, _event(), (), STAMP),
        ),
        Record("cms", 0, 1, None, _event(type="image.updated"), (), STAMP),
    ],
    ids=[
        "binary",
        "specversion",
        "no-id",
        "bad-time",
        "no-stamp",
        "reads-source",
        "replayed",
        "other-type",
    ],
)
@pytest.mark.parametrize("event_time", [False, True])
def test_an_event_like_a_remembered_one_in_its_data_gets_its_own_plan(second, event_time):
    ledger = {"event_time": "event" if event_time else "record"}
    config = make_config("http://127.0.0.1:1", rules=RULES, coalesce={"ledger": ledger})
    planner = Planner(config.planning)
    replayed = Record("cms", 0, 3, None, _event(), (), STAMP)
    for first in (
        Record("cms", 0, 0, None, _event(), (), STAMP),
        Record("cms", 0, 0, None, _event(type="feed.updated"), (), STAMP),
        Record("cms.dlq", 0, 0, None, _event(), (), STAMP, origin=replayed),
    ):  # each remembered by its data
        planner.planned(first)
        planner.planned(first)
    fresh = Planner(config.planning)
    same(planner.planned(second), Planned.of(fresh.plan(second), event_time))


def _article(n: int, data: dict) -> Record:
    value = json.dumps(
        {
            "specversion": "1.0",
            "id": f"e{n}",
            "source": "/cms",
            "type": "article.updated",
            "data": data,
        }
    ).encode()
    return Record("cms", 0, n, None, value, (), STAMP)


def test_a_topic_whose_data_vary_in_what_the_rules_do_not_read_is_planned_the_whole_way():
    config = make_config("http://127.0.0.1:1", rules=RULES)
    planner = Planner(config.planning)
    judge = lambda: planner._by_data._judges["cms"]  # noqa: E731
    data = {"kind": "news", "pages": ["p"]}
    # Ten articles, each update with its own version: the first ten plans are new (no
    # judgement), the next JUDGED misses rest the topic, and five records go the whole way.
    for n in range(10 + envelope.JUDGED + 5):
        record = _article(n, {**data, "id": n % 10, "version": n})
        same(planner.planned(record), Planned.of(Planner(config.planning).plan(record), False))
    assert judge().resting == envelope.RESTING - 5
    # Once rested, it looks again: data that repeat are found by them.
    judge().resting = 0
    for n in range(envelope.JUDGED):
        planner.planned(_article(n, {**data, "id": n % 10}))
    assert judge().resting == 0


def test_a_backlogs_first_pass_of_new_plans_does_not_stop_the_look_ups():
    config = make_config("http://127.0.0.1:1", rules=RULES)
    planner = Planner(config.planning)
    data = {"kind": "news", "pages": ["p"]}
    for n in range(3 * envelope.JUDGED):  # every article new, then each again
        planner.planned(_article(n, {**data, "id": n % envelope.JUDGED}))
    assert planner._by_data._judges["cms"].resting == 0
