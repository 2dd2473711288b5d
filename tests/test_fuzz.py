"""Fuzzing what users hand the worker: any config a YAML file can hold is accepted or refused
with a ``ConfigError``; any event is planned or dead-lettered with a named class. Never another
exception, never "internal error", and within a time and memory cap."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TOKEN
from tests.helpers import config_dict, make_config
from worker.config.load import parse
from worker.errors import ConfigError
from worker.events import Record
from worker.planning.planner import Planner

API = "http://127.0.0.1:1/client/v4"

# Texts with what breaks naive code: lone surrogates, controls, separators, very long runs.
TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.sampled_from(
        ["", " ", "a/b", "../x", "%2F", ":8443/x", "@evil.net", "*", "\x00", "a" * 3000]
    ),
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)

RULES = [
    {
        "name": "article",
        "match": {"type": ["article.published", "article.updated"]},
        "urls": [
            "https://www.example.com/{data.locales[]}/{data.slug}",
            {"url": "https://m.example.com/{data.slug}", "headers": {"X-Lang": "{data.lang}"}},
        ],
        "tags": ["article-{data.id}"],
        "zone": "example.com",
    },
    {"name": "host", "match": {"type": "site.rebuilt"}, "hosts": ["{data.host}"]},
    {"name": "prefix", "match": {"type": "section.changed"}, "prefixes": ["{data.prefix}"]},
    {
        "name": "regex",
        "match": {"type": "page.moved", "fields": {"data.path": {"regex": "^/(?P<s>[a-z]+)/"}}},
        "urls": ["https://www.example.com/{s}/{data.slug}"],
    },
]
PLANNER = Planner(make_config(API, rules=RULES).planning)
FIELDS = ("slug", "locales", "id", "lang", "host", "prefix", "path")
TYPES = ["article.published", "site.rebuilt", "section.changed", "page.moved", "other"]


@st.composite
def events(draw: Any) -> bytes:
    if draw(st.booleans()):
        # Shaped like what the rules read, with hostile values where the rules look: these
        # reach the templates, the targets and the matcher rather than stopping at a missing key.
        data = {
            "slug": draw(SCALAR),
            "locales": draw(st.lists(SCALAR, min_size=1, max_size=3)),
            "id": draw(SCALAR),
            "lang": draw(SCALAR),
            "host": draw(SCALAR),
            "prefix": draw(SCALAR),
            "path": draw(st.one_of(SCALAR, TEXT.map(lambda t: f"/abc/{t}"))),
        }
    else:
        data = draw(st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, VALUE)))
    body: dict[str, Any] = {"type": draw(st.sampled_from(TYPES)), "data": data}
    if draw(st.booleans()):
        body["time"] = draw(SCALAR)
    if draw(st.booleans()):
        body.update(specversion="1.0", id=draw(TEXT), source="cms")
    return json.dumps(body).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_any_event_is_planned_or_dead_lettered_with_a_named_class(value):
    started = time.monotonic()
    plan = PLANNER.plan(Record("cms", 0, 0, None, value, ()))
    assert time.monotonic() - started < 1.0
    for error in plan.errors:
        assert error.error_class in {"invalid_event", "invalid_target", "unknown_zone"}, error
        assert "internal error" not in str(error), error


CONFIG_KEYS = st.sampled_from(
    ["kafka", "cloudflare", "rules", "coalesce", "delivery", "observability", "warming", "x"]
)


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    data = config_dict(API)
    # Inside the sample config first, then (maybe) whole top-level keys replaced: a replaced
    # section is not a mapping to reach into any more.
    places = draw(
        st.lists(st.sampled_from(["rule", "match", "section", "top"]), min_size=1, max_size=3)
    )
    for where in sorted(places, key=lambda p: p == "top"):
        if where == "top":
            data[draw(CONFIG_KEYS)] = draw(VALUE)
        elif where == "rule":
            key = draw(st.sampled_from(["urls", "tags", "hosts", "prefixes", "zone", "mode"]))
            data["rules"][0][key] = draw(VALUE)
        elif where == "match":
            data["rules"][0]["match"] = {"type": "x", "fields": {"data.x": draw(VALUE)}}
        else:
            section = draw(st.sampled_from(["coalesce", "delivery", "observability"]))
            data.setdefault(section, {})[draw(TEXT)] = draw(VALUE)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_config_is_accepted_or_refused_with_a_config_error(data):
    tracemalloc.start()
    started = time.monotonic()
    try:
        parse(data, "fuzz.yaml", {"CLOUDFLARE_API_TOKEN": TOKEN})
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0
    assert peak < 64 * 2**20
