"""Dead letters replayed after fixing the cause, through the real broker and the emulator."""

import json

import pytest

from tests.conftest import TOKEN
from tests.helpers import cloudevent, config_dict, purged_items, wait_for
from tests.kafka_helpers import (
    RunningWorker,
    all_committed,
    committed,
    end_offsets,
    produce,
    read_all,
)
from worker.cli import main
from worker.outcome.dead_letters import header

pytestmark = pytest.mark.kafka

BROKEN_RULE = {
    "name": "image",
    "match": {"type": "image.updated"},
    "urls": ["https://img.example-cdn.net/{data.file}"],
}  # events carry data.path


def write(tmp_path, name, data):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def dead_lettered(emulator, make_topic, kafka_bootstrap, unique, tmp_path, monkeypatch):
    """A worker with a broken rule dead-letters 40 image events (and purges 5 articles)."""
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    topic, dlq = make_topic("cms", 2), make_topic("dlq", 2)
    kafka = {
        "bootstrap_servers": [kafka_bootstrap],
        "topics": [topic],
        "dead_letter_topic": dlq,
        "group_id": f"g-{unique}",
    }
    data = config_dict(
        emulator.api_url, kafka=kafka, delivery={"dead_letter_guard": {"max_ratio": 1.0}}
    )
    rules = [r for r in data["rules"] if r["name"] != "image"] + [BROKEN_RULE]
    broken = write(tmp_path, "broken.yaml", {**data, "rules": rules})
    fixed = write(tmp_path, "fixed.yaml", data)
    images = [
        cloudevent("image.updated", {"host": "img.example-cdn.net", "path": f"p{i}.jpg"}, f"i{i}")
        for i in range(40)
    ]
    articles = [
        cloudevent("article.published", {"slug": f"s{i}", "locales": ["en"], "id": i})
        for i in range(5)
    ]
    produce(kafka_bootstrap, topic, images + articles, key=None, headers=[("tenant", b"news")])
    from worker.config.load import load

    worker = RunningWorker(load(broken))
    try:
        wait_for(lambda: all_committed(kafka_bootstrap, kafka["group_id"], topic), what="commits")
    finally:
        worker.stop()
    dead = read_all(kafka_bootstrap, dlq)
    assert len(dead) == 40
    assert {header(r.headers, "purge.error.class") for r in dead} == {"invalid_event"}
    return {"broken": broken, "fixed": fixed, "topic": topic, "dlq": dlq}


def test_replay_after_fixing_the_rules_purges_everything_and_drains(
    dead_lettered, emulator, kafka_bootstrap, capsys
):
    d = dead_lettered
    before = end_offsets(kafka_bootstrap, d["dlq"])
    assert main(["replay", "-c", d["fixed"], "--from", d["dlq"], "--group", "r1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["replayed"] == 40 and summary["failed_again"] == 0 and summary["skipped"] == 0
    assert {f"https://img.example-cdn.net/p{i}.jpg" for i in range(40)} <= set(
        purged_items(emulator)
    )
    assert end_offsets(kafka_bootstrap, d["dlq"]) == before  # nothing dead-lettered again
    assert committed(kafka_bootstrap, "r1", d["dlq"]) == before  # the replay group reached the end
    # Run again: nothing left to replay.
    assert main(["replay", "-c", d["fixed"], "--from", d["dlq"], "--group", "r1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scanned"] == 0


def test_interrupted_replay_resumes_without_loss(dead_lettered, emulator, kafka_bootstrap, capsys):
    d = dead_lettered
    args = ["replay", "-c", d["fixed"], "--from", d["dlq"], "--group", "r2"]
    assert main([*args, "--max", "15"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["replayed"] == 15
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["replayed"] + second["replayed"] >= 40
    assert {f"https://img.example-cdn.net/p{i}.jpg" for i in range(40)} <= set(
        purged_items(emulator)
    )


def test_replay_failing_again_increments_attempts(dead_lettered, kafka_bootstrap, capsys):
    d = dead_lettered
    before = sum(end_offsets(kafka_bootstrap, d["dlq"]).values())
    assert (
        main(["replay", "-c", d["broken"], "--from", d["dlq"], "--group", "r3", "--max", "3"]) == 1
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failed_again"] == 3
    dead = read_all(kafka_bootstrap, d["dlq"])
    assert len(dead) == before + 3
    again = [r for r in dead if header(r.headers, "purge.attempts") == "2"]
    assert len(again) == 3
    for r in again:
        assert header(r.headers, "purge.original.topic") == d["topic"]  # not the dead-letter topic
        assert r.headers[0] == ("tenant", b"news")
        assert [k for k, _ in r.headers].count("purge.error.class") == 1


def test_republish_with_filters_and_dry_run(dead_lettered, kafka_bootstrap, capsys, make_topic):
    d = dead_lettered
    target = make_topic("republished")
    dry = [
        "replay",
        "-c",
        d["fixed"],
        "--from",
        d["dlq"],
        "--group",
        "r4",
        "--mode",
        "republish",
        "--to",
        target,
        "--class",
        "invalid_event",
        "--dry-run",
    ]
    assert main(dry) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 41 and json.loads(lines[0])["would"] == f"republish to {target}"
    assert read_all(kafka_bootstrap, target, timeout_s=2) == []
    assert committed(kafka_bootstrap, "r4", d["dlq"]) == {}
    assert (
        main(
            [
                "replay",
                "-c",
                d["fixed"],
                "--from",
                d["dlq"],
                "--group",
                "r5",
                "--mode",
                "republish",
                "--to",
                target,
                "--class",
                "unknown_zone",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["skipped"] == 40
    assert (
        main(
            [
                "replay",
                "-c",
                d["fixed"],
                "--from",
                d["dlq"],
                "--group",
                "r6",
                "--mode",
                "republish",
                "--to",
                target,
                "--since",
                "2020-01-01T00:00:00Z",
            ]
        )
        == 0
    )
    out = read_all(kafka_bootstrap, target)
    assert len(out) == 40
    assert all(r.headers == [("tenant", b"news")] for r in out)  # purge.* headers stripped
    assert main(["replay", "-c", d["fixed"], "--from", d["dlq"], "--since", "yesterday"]) == 2
