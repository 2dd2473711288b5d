"""`explain` and `check` as documented, including on broken configs."""

import json
import textwrap

import pytest
import yaml

from tests.conftest import TOKEN, ZONE_A
from tests.helpers import config_dict, write_config
from worker.cli import main
from worker.config.load import load
from worker.kafka import admin


@pytest.fixture
def cfg(tmp_path, emulator):
    return write_config(tmp_path / "config.yaml", emulator.api_url)


def test_explain_prints_the_plan_and_the_rules_that_fired(cfg, tmp_path, capsys):
    event = tmp_path / "e.json"
    event.write_text(
        json.dumps(
            {
                "specversion": "1.0",
                "id": "x1",
                "source": "/cms",
                "type": "article.published",
                "data": {"slug": "s", "locales": ["en", "de"], "id": 3},
            }
        )
    )
    assert main(["explain", "-c", cfg, str(event)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rules_fired"] == ["article"]
    assert plan["event"] == {
        "id": "x1",
        "type": "article.published",
        "format": "cloudevents",
        "topic": "cms",
    }
    kinds = {(p["zone_id"], p["kind"]): p["items"] for p in plan["purges"]}
    assert kinds[(ZONE_A, "tags")] == ["article-3"]
    assert "https://www.example.com/de/s" in kinds[(ZONE_A, "files")]
    assert plan["dead_letter"] is False


def test_explain_reads_stdin_and_reports_a_bad_event(cfg, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"{broken")))
    assert main(["explain", "-c", cfg, "-"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["errors"][0]["class"] == "invalid_event" and plan["dead_letter"] is True


def test_explain_missing_file_is_a_usage_error(cfg, capsys):
    assert main(["explain", "-c", cfg, "/nonexistent.json"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent.json" in err and err.count("\n") == 1


def test_check_ok(cfg, capsys, monkeypatch):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    assert main(["check", "-c", cfg]) == 0
    assert "OK: 4 rules, 2 zones" in capsys.readouterr().out


def test_check_fails_like_run_when_the_token_variable_is_unset(cfg, capsys, monkeypatch):
    monkeypatch.delenv("CLOUDFLARE_API_TOKEN", raising=False)
    assert main(["check", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert "no API token" in err and "CLOUDFLARE_API_TOKEN" in err
    assert len(err.strip().splitlines()) == 1


BROKEN = [
    (
        {"kafka": {"topics": ["a"], "bootstrap": "x"}},
        "kafka.bootstrap",
        "did you mean 'bootstrap_servers'",
    ),
    ({"coalesce": {"window_seconds": -1}}, "coalesce.window_seconds", "at least"),
    (
        {
            "rules": [
                {
                    "name": "r",
                    "match": {"fields": {"data.x": {"regex": "(["}}},
                    "urls": ["https://a.com/"],
                }
            ]
        },
        "rules[r].match.fields.data.x",
        "invalid regular expression",
    ),
    (
        {"rules": [{"name": "r", "urls": ["https://a.com/{match.nope}"]}]},
        "rules[r].urls",
        "names no capture",
    ),
    (
        {"rules": [{"name": "r", "urls": ["https://a.com/{data.x|shout}"]}]},
        "rules[r].urls",
        "unknown filter",
    ),
    (
        {"rules": [{"name": "r", "urls": ["https://a.com/{data.x"]}]},
        "rules[r].urls",
        "unbalanced brace",
    ),
    (
        {"rules": [{"name": "r", "plugin": "no_such_module_xyz:f"}]},
        "rules[r].plugin",
        "cannot import",
    ),
    (
        {"rules": [{"name": "r", "plugin": "yaml:safe_load", "options": {"bogus_option": 1}}]},
        "rules[r].options",
        "does not accept",
    ),
    ({"rules": [{"name": "r", "urlz": ["https://a.com/"]}]}, "rules[r].urlz", "unknown key"),
    (
        {"rules": [{"name": "r", "everything": True, "zone": "cdn"}]},
        "rules[r].everything",
        "allow_everything",
    ),
    ({"rules": [{"name": "r", "tags": ["t"]}]}, "rules[r].zone", "set the rule's zone"),
    ({"rules": [{"name": "r", "match": {"type": "x"}}]}, "rules[r].urls", "produces no targets"),
]


@pytest.mark.parametrize(("override", "key", "reason"), BROKEN, ids=[b[1] for b in BROKEN])
def test_check_names_file_key_and_reason(tmp_path, emulator, capsys, override, key, reason):
    data = config_dict(emulator.api_url)
    for section, value in override.items():
        data[section] = value if section == "rules" else {**data[section], **value}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(path) in err and key in err and reason in err, err


def test_bad_zone_id_and_bad_yaml(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent("""
        kafka: {topics: [a]}
        cloudflare:
          accounts: {m: {plan: pro}}
          zones: [{id: "NOT-A-ZONE", hosts: [a.com]}]
        rules: []
    """)
    )
    assert main(["check", "-c", str(path)]) == 2
    assert "cloudflare.zones[0].id" in capsys.readouterr().err
    path.write_text("kafka: [unclosed\n")
    assert main(["check", "-c", str(path)]) == 2
    assert "line" in capsys.readouterr().err


@pytest.mark.kafka
def test_check_online(tmp_path, emulator, kafka_bootstrap, make_topic, capsys, monkeypatch):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    kafka = {"bootstrap_servers": [kafka_bootstrap], "topics": [topic], "dead_letter_topic": dlq}
    cfg = write_config(tmp_path / "c.yaml", emulator.api_url, kafka=kafka)
    assert main(["check", "-c", cfg, "--online"]) == 0
    assert "every API token is active" in capsys.readouterr().out
    cfg = write_config(
        tmp_path / "c2.yaml", emulator.api_url, kafka={**kafka, "topics": ["missing-topic-xyz"]}
    )
    assert main(["check", "-c", cfg, "--online"]) == 1
    assert "missing-topic-xyz does not exist" in capsys.readouterr().out
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "bad-token-1234")
    cfg = write_config(tmp_path / "c3.yaml", emulator.api_url, kafka=kafka)
    assert main(["check", "-c", cfg, "--online"]) == 1
    out = capsys.readouterr().out
    assert "10000" in out and "bad-token-1234" not in out


@pytest.mark.kafka
def test_only_check_online_asks_whether_a_missing_topic_may_be_made(
    tmp_path, emulator, kafka_bootstrap, make_topic, monkeypatch
):
    """``run`` leaves a missing budget or receipts topic to the part that makes it (asking costs
    a round trip to the controller on the way to the first records); ``check --online`` asks."""
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    topic, dlq = make_topic("cms"), make_topic("dlq")
    kafka = {
        "bootstrap_servers": [kafka_bootstrap],
        "topics": [topic],
        "dead_letter_topic": dlq,
        "budget_topic": f"{topic}.shares",
    }
    settings = load(write_config(tmp_path / "c.yaml", emulator.api_url, kafka=kafka)).kafka
    asked: list[str] = []
    monkeypatch.setattr(admin, "_may_create", lambda _admin, name: asked.append(name) or False)
    assert admin.verify(settings, ask_create=False) == []
    assert asked == []
    problems = admin.verify(settings)
    made = {f"{topic}.shares", settings.receipts_topic}
    assert len(asked) == 2 and set(asked) == made
    assert [p.fatal for p in problems] == [False, False]
    assert all("may not create it" in p.line for p in problems)


def test_rules_files_are_merged_and_errors_name_the_rules_file(
    tmp_path, emulator, capsys, monkeypatch
):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    data = config_dict(emulator.api_url)
    extra = [{"name": "extra", "match": {"type": "x"}, "hosts": ["www.example.com"]}]
    (tmp_path / "more-rules.yaml").write_text(yaml.safe_dump(extra))
    data["rules_files"] = ["more-rules.yaml"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(path)]) == 0
    assert "5 rules" in capsys.readouterr().out
    del data["rules"]
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(path)]) == 0
    (tmp_path / "more-rules.yaml").write_text(yaml.safe_dump([{"name": "bad", "urlz": []}]))
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "more-rules.yaml" in err and "rules[bad].urlz" in err
    data["rules_files"] = ["missing.yaml"]
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
