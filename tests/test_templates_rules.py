"""Templates and rules as units: fan-out, filters, escapes, missing fields, match forms,
captures, plug-ins, and the per-rule render cache telling inputs apart."""

import pytest

from worker.errors import ConfigError, InvalidEvent, InvalidTarget
from worker.events import Event
from worker.planning.rules.mapping import StrictMapping
from worker.planning.rules.outcome import PartialTargets
from worker.planning.rules.ruleset import RuleSet, compile_rules
from worker.planning.templates import Template, TemplateError
from worker.targets import Kind, Mode, Target


def event(data=None, type_="article.updated", topic="cms", headers=None, key="k1", offset=7):
    body = {"type": type_, "id": "e1", "data": data or {}}
    return Event(body, "json", "e1", type_, None, topic, 0, offset, key, headers or {})


def render(text, ev, captures=None, caps=frozenset()):
    return Template(text, caps).render(ev, captures or {})


# -- templates ------------------------------------------------------------------------------------


def test_plain_paths_fan_out_and_index():
    ev = event({"slug": "a", "locales": ["en", "de"], "tags": ["x", "y"], "n": 3})
    assert render("https://w.com/{data.slug}", ev) == ["https://w.com/a"]
    assert render("/{data.locales[]}/{data.slug}", ev) == ["/en/a", "/de/a"]
    assert render("{data.locales[]}-{data.tags[]}", ev) == ["en-x", "en-y", "de-x", "de-y"]
    assert render("{data.locales[1]}", ev) == ["de"]
    assert render("n={data.n}", ev) == ["n=3"]


def test_filters_escapes_and_metadata():
    ev = event({"title": "Hello, World!", "path": "/a/b/"}, headers={"x-site": "news"})
    assert render("{data.title|slug}", ev) == ["hello-world"]
    assert render("{data.title|lower|urlencode}", ev) == ["hello%2C%20world%21"]
    assert render("{data.path|strip_slash}", ev) == ["a/b"]
    assert render("{{literal}}-{data.path|upper}", ev) == ["{literal}-/A/B/"]
    assert render("{kafka.topic}/{kafka.key}/{kafka.offset}/{kafka.headers.x-site}", ev) == [
        "cms/k1/7/news"
    ]


def test_missing_and_wrong_shaped_fields_are_invalid_events():
    ev = event({"list": [1], "obj": {"a": 1}, "flag": True})
    with pytest.raises(InvalidEvent, match=r"\{data.nope\} is missing"):
        render("{data.nope}", ev)
    with pytest.raises(InvalidEvent, match="is a list: write it with"):
        render("{data.list}", ev)
    with pytest.raises(InvalidEvent, match="is an object"):
        render("{data.obj}", ev)
    with pytest.raises(InvalidEvent, match="not a list"):
        render("{data.obj[]}", ev)
    assert render("{data.flag}", ev) == ["true"]
    with pytest.raises(InvalidEvent, match="fans out to 1000000"):
        render("{data.a[]}{data.b[]}", event({"a": list(range(1000)), "b": list(range(1000))}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{data.x|shout}", "unknown filter"),
        ("{match.nope}", "names no capture"),
        ("{kafka.nope}", "kafka.* is"),
        ("{data.x", "unbalanced brace"),
        ("{}", "empty placeholder"),
        ("{data.a b}", "bad path segment"),
    ],
)
def test_template_mistakes_are_caught_when_compiled(text, message):
    with pytest.raises(TemplateError, match=message):
        Template(text, frozenset())


# -- rules ----------------------------------------------------------------------------------------


def rules(raw, **kw):
    return compile_rules(
        raw, "rules.yaml", allow_everything=kw.pop("allow_everything", False), **kw
    )


def targets(rule_list, ev):
    out = []
    for rule in rule_list:
        result = rule.evaluate(ev)
        if result is not None:
            out += [(rt.target, rt.mode, rt.rule) for rt in result]
    return out


def test_match_forms_and_captures():
    [rule] = rules(
        [
            {
                "name": "r",
                "match": {
                    "topic": "cms",
                    "type": ["article.updated", "article.published"],
                    "fields": {
                        "data.path": {"regex": "^/(?P<section>[a-z]+)/"},
                        "data.status": "published",
                        "data.id": {"in": [42, 43]},
                        "data.legacy": {"exists": False},
                    },
                },
                "urls": ["https://w.com/{match.section}/{data.id}"],
                "mode": "invalidate",
            }
        ]
    )
    good = {"path": "/sport/x", "status": "published", "id": "42"}  # "42" matches 42 as text
    assert targets([rule], event(good)) == [
        (Target.url("https://w.com/sport/42"), Mode.INVALIDATE, "r")
    ]
    for bad in (
        {**good, "status": "draft"},
        {**good, "path": "/9/x"},
        {**good, "id": 44},
        {**good, "legacy": 1},
    ):
        assert rule.evaluate(event(bad)) is None, bad
    assert rule.evaluate(event(good, type_="article.deleted")) is None
    assert rule.evaluate(event(good, topic="other")) is None


def test_the_render_cache_tells_inputs_apart():
    [rule] = rules(
        [{"name": "r", "urls": ["https://w.com/{data.v}"], "tags": ["t-{data.v}"], "zone": "z"}]
    )
    seen = [targets([rule], event({"v": v}))[0][0].value for v in (1, "1", True, 1.0, "1", 1)]
    assert seen == [
        "https://w.com/1",
        "https://w.com/1",
        "https://w.com/true",
        "https://w.com/1.0",
        "https://w.com/1",
        "https://w.com/1",
    ]
    # An event whose render fails is not remembered: the next one like it fails too.
    for _ in range(2):
        with pytest.raises(PartialTargets) as failed:
            rule.evaluate(event({}))
        assert [type(e) for e in failed.value.errors] == [InvalidEvent, InvalidEvent]


def test_the_render_cache_reads_below_a_fan_out():
    # What a template reads below ``[]`` is the whole list: two events whose items differ
    # only in the field under the fan-out must not share a rendering.
    [rule] = rules([{"name": "r", "urls": ["https://w.com/{data.items[].url}"]}])
    for name in ("one", "two", "one"):
        [(target, _, _)] = targets([rule], event({"items": [{"url": name}]}))
        assert target.value == f"https://w.com/{name}"
    [rule] = rules([{"name": "r", "urls": ["https://w.com/{data.items[0].url}"]}])
    for name in ("one", "two"):
        [(target, _, _)] = targets([rule], event({"items": [{"url": name}]}))
        assert target.value == f"https://w.com/{name}"


def test_one_bad_target_leaves_the_others_standing():
    [rule] = rules(
        [
            {
                "name": "r",
                "urls": ["https://w.com/{data.slug}"],
                "tags": ["{data.tags[]}"],
                "zone": "z",
            }
        ]
    )
    plan = RuleSet([rule]).evaluate(event({"slug": "s", "tags": ["ok", "not ok", "fine"]}))
    assert [t.target.value for t in plan.targets] == ["https://w.com/s", "ok", "fine"]
    assert len(plan.errors) == 1 and "rule r:" in str(plan.errors[0])
    assert isinstance(plan.errors[0], InvalidTarget) and "not ok" in str(plan.errors[0])
    missing = RuleSet([rule]).evaluate(event({"tags": ["ok"]}))
    assert [t.target.value for t in missing.targets] == ["ok"]
    assert isinstance(missing.errors[0], InvalidEvent) and missing.fired == ["r"]


def test_the_render_cache_follows_headers_and_captures():
    [rule] = rules(
        [
            {
                "name": "r",
                "match": {"fields": {"data.p": {"regex": "^(?P<s>[a-z]+)"}}},
                "urls": [
                    {
                        "url": "https://w.com/{match.s}",
                        "headers": {"CF-Device-Type": ["{data.device}"]},
                    }
                ],
            }
        ]
    )
    a = targets([rule], event({"p": "abc1", "device": "mobile"}))
    b = targets([rule], event({"p": "xyz1", "device": "mobile"}))
    c = targets([rule], event({"p": "abc1", "device": "tablet"}))
    assert [t[0] for t in a] == [Target.url("https://w.com/abc", {"CF-Device-Type": "mobile"})]
    assert [t[0] for t in b] == [Target.url("https://w.com/xyz", {"CF-Device-Type": "mobile"})]
    assert [t[0] for t in c] == [Target.url("https://w.com/abc", {"CF-Device-Type": "tablet"})]


def test_invalid_targets_and_everything():
    [rule] = rules([{"name": "r", "tags": ["{data.t}"], "zone": "z"}])
    with pytest.raises(PartialTargets) as failed:
        rule.evaluate(event({"t": "has space"}))
    assert failed.value.targets == []
    assert "only printable ASCII" in str(failed.value.errors[0])
    with pytest.raises(ConfigError, match="allow_everything"):
        rules([{"name": "e", "everything": True, "zone": "z"}])
    [rule] = rules([{"name": "e", "everything": True, "zone": "z"}], allow_everything=True)
    assert targets([rule], event()) == [(Target.everything("z"), Mode.PURGE, "e")]
    assert rule.needs_zone


def test_rule_names_are_unique_across_files():
    taken: set[str] = set()
    rules([{"name": "a", "hosts": ["w.com"]}], taken=taken)
    with pytest.raises(ConfigError, match="duplicate rule name 'a'"):
        rules([{"name": "a", "hosts": ["x.com"]}], taken=taken)


# -- plug-ins -------------------------------------------------------------------------------------


def urls_for(event, base):
    return [Target.url(f"{base}/{event.body['data']['slug']}"), Target.tag("t1")]


def as_dict(event):
    return {"urls": ["https://w.com/d"], "tags": ["T2"]}


def broken(event):
    raise KeyError("slug")


def everything(event):
    return [Target.everything("z")]


def test_plugins():
    [ok, d, bad, evil] = rules(
        [
            {
                "name": "ok",
                "plugin": f"{__name__}:urls_for",
                "options": {"base": "https://w.com"},
                "zone": "main",
            },
            {"name": "d", "plugin": f"{__name__}:as_dict"},
            {"name": "bad", "plugin": f"{__name__}:broken"},
            {"name": "evil", "plugin": f"{__name__}:everything"},
        ]
    )
    got = targets([ok], event({"slug": "s"}))
    assert got == [
        (Target.url("https://w.com/s"), Mode.PURGE, "ok"),
        (Target.tag("t1", "main"), Mode.PURGE, "ok"),  # the rule's zone for its tags
    ]
    assert [t[0].kind for t in targets([d], event())] == [Kind.FILES, Kind.TAGS]
    with pytest.raises(InvalidEvent, match="plugin rule bad raised KeyError"):
        bad.evaluate(event())
    with pytest.raises(PartialTargets, match="may not purge everything"):
        evil.evaluate(event())
    # A plug-in may read anything of an event: no plan is remembered for a rule set with one.
    [declarative] = rules([{"name": "r", "urls": ["https://w.com/{data.slug}"]}])
    assert RuleSet([declarative]).reads == (("data", "slug"),)
    assert RuleSet([ok]).reads is None and RuleSet([declarative, d]).reads is None


def test_a_rule_set_says_what_its_rules_read():
    [rule] = rules(
        [
            {
                "name": "r",
                "match": {
                    "type": "a",
                    "fields": {
                        "data.kind": "page",
                        "kafka.key": {"exists": True},
                        "data.n": {"regex": "(?P<n>[0-9]+)"},
                    },
                },
                "urls": ["https://w.com/{data.items[].url}/{match.n}"],
                "tags": ["t-{data.id|lower}"],
            }
        ]
    )
    assert RuleSet([rule]).reads == (
        ("data", "kind"),
        ("kafka", "key"),
        ("data", "n"),
        ("data", "items"),
        ("data", "id"),
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"plugin": "nomodule_xyz:f"}, "cannot import"),
        ({"plugin": "yaml"}, "must look like"),
        ({"plugin": "yaml:nothing_here"}, "has no function"),
        ({"plugin": "os:system"}, "standard library"),
        ({"plugin": "sys:exit"}, "standard library"),
        ({"plugin": "subprocess:run"}, "standard library"),
        ({"plugin": "yaml:safe_load", "options": {"x": 1}}, "does not accept"),
    ],
)
def test_plugin_mistakes_stop_start_up(spec, message):
    with pytest.raises(ConfigError, match=message):
        rules([{"name": "p", **spec}])


def test_section_reader_names_unknown_keys():
    s = StrictMapping({"urlz": 1}, "rules[r]", "f.yaml")
    s.raw("urls", None)
    with pytest.raises(
        ConfigError, match=r"rules\[r\].urlz: unknown key \(did you mean 'urls'\?\)"
    ):
        s.done()
