"""Property-based tests: the coalescer never loses or duplicates, decoding never crashes."""

import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_config
from worker.clock import MockClock
from worker.errors import PermanentError
from worker.events import Record
from worker.intake.decode import decode
from worker.pending.coalescer import Coalescer
from worker.pending.cover import bare, covers
from worker.targets import Kind, Mode, Target

HOSTS = ["a.com", "b.com", "www.a.com"]
SEGMENTS = ["x", "y", "xy", "z"]


@st.composite
def targets(draw):
    kind = draw(st.sampled_from(["url", "url", "url", "prefix", "host", "tag", "everything"]))
    host = draw(st.sampled_from(HOSTS))
    path = "/".join(draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3)))
    if kind == "url":
        query = draw(st.sampled_from(["", "?q=1"]))
        headers = draw(st.sampled_from([None, {"CF-Device-Type": "mobile"}]))
        return Target.url(f"https://{host}/{path}{query}", headers)
    if kind == "prefix":
        return Target.prefix(f"{host}/{path}" + draw(st.sampled_from(["", "/"])))
    if kind == "host":
        return Target.host(host)
    if kind == "tag":
        return Target.tag(draw(st.sampled_from(["t1", "T1", "t2"])))
    return Target.everything("zone")


def covered(sent: list[Target], target: Target) -> bool:
    for s in sent:
        if s == target or s.kind is Kind.EVERYTHING:
            return True
        if target.kind is Kind.FILES:
            path = bare(target.value)
            if s.kind is Kind.HOSTS and path.split("/", 1)[0] == s.value:
                return True
            if s.kind is Kind.PREFIXES and covers(s.value, path):
                return True
        if target.kind is Kind.PREFIXES:
            if s.kind is Kind.HOSTS and target.value.split("/", 1)[0] == s.value:
                return True
            if s.kind is Kind.PREFIXES and covers(s.value, target.value):
                return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(targets(), st.integers(0, 20), st.floats(0, 3)), max_size=80),
    st.integers(1, 7),
)
def test_coalescer_covers_everything_respects_caps_and_never_repeats_in_a_flush(adds, cap):
    clock = MockClock()
    c = Coalescer(1.0, lambda zone, kind: cap, clock)
    sent_batches = []
    owners_in: Counter = Counter()
    for target, owner, wait in adds:
        clock.advance(wait)
        c.add("z", Mode.PURGE, target, owner)
        owners_in[owner] += 1
        sent_batches += c.due()
    sent_batches += c.flush_all()
    assert c.pending == 0
    sent = [p.target for b in sent_batches for p in b.items]
    for target, _, _ in adds:
        assert covered(sent, target), target  # nothing lost under subsumption
    owners_out: Counter = Counter()
    for batch in sent_batches:
        assert 1 <= len(batch.items) <= cap  # never over a request's cap
        assert len({p.target for p in batch.items}) == len(batch.items)  # no item twice
        assert {p.target.kind for p in batch.items} == {batch.kind} or batch.kind is Kind.EVERYTHING
        for p in batch.items:
            owners_out.update(p.owners)
    assert owners_out == owners_in  # every record's every target is accounted for exactly once


CONFIG = make_config("http://127.0.0.1:1/client/v4")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["article.published", "section.changed", "site.rebuilt", "image.updated", "x"]
        )
    },
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", 1]),
        "id": json_values,
        "source": json_values,
        "time": json_values,
        "data": st.fixed_dictionaries(
            {},
            optional={
                "slug": json_values,
                "locales": json_values,
                "id": json_values,
                "section": json_values,
                "host": json_values,
                "path": json_values,
            },
        ),
    },
)
header_lists = st.lists(
    st.tuples(
        st.sampled_from(["ce_specversion", "ce_type", "ce_id", "ce_source", "content-type", "x"]),
        st.binary(max_size=20),
    ),
    max_size=4,
)


def evaluate(value, headers=()):
    record = Record("cms", 0, 0, None, value, tuple(headers), None)
    try:
        event = decode(record, max_bytes=4096)
        plan = CONFIG.rules.evaluate(event)
        for rt in plan.targets:
            rt.target.item()
    except PermanentError:
        pass  # the documented outcome for bad input: dead-letter it


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), header_lists)
def test_arbitrary_bytes_never_escape_as_anything_but_documented_errors(value, headers):
    evaluate(value, headers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_like, header_lists)
def test_arbitrary_events_never_escape_as_anything_but_documented_errors(event, headers):
    evaluate(json.dumps(event).encode(), headers)
    evaluate(json.dumps(event.get("data")).encode(), headers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), event_like.map(lambda e: json.dumps(e).encode())))
def test_events_are_read_exactly_as_the_standard_parser_reads_them(value):
    try:
        expected = json.loads(value.decode("utf-8"))
    except ValueError:
        expected = None  # unreadable: a dead letter either way, as the decoder tests show
    try:
        body = decode(Record("cms", 0, 0, None, value, ())).body
    except PermanentError as exc:
        # Readable JSON may still be no event (a list, a CloudEvent lacking attributes).
        assert (expected is None) == str(exc).startswith("record value is")
    else:
        assert repr(body) == repr(expected)
