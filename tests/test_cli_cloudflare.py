"""`purge-worker purge`, `cache` and `emulator` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from scripts.kafka_broker import free_port
from tests.conftest import TOKEN, ZONE_A, kafka_threads_since
from worker.cli import main


@pytest.fixture
def config(tmp_path, emulator, monkeypatch):
    # Receipts off: these tests are about the API's side (one below keeps them, Kafka away).
    return write_config(tmp_path, emulator, monkeypatch, "receipts_topic: null")


def write_config(tmp_path, emulator, monkeypatch, kafka=""):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    path = tmp_path / "config.yaml"
    path.write_text(f"""
kafka: {{topics: [cms], bootstrap_servers: ["127.0.0.1:{free_port()}"], {kafka}}}
cloudflare:
  base_url: {emulator.api_url}
  accounts: {{main: {{plan: pro}}}}
  zones:
    - id: {ZONE_A}
      name: example
      hosts: [example.com, "*.example.com"]
rules:
  - name: r
    tags: ["t"]
""")
    return str(path)


def recorded(emulator):
    return requests.get(emulator.url + "/__emulator/purges", timeout=5).json()


def test_purge_every_selector_is_batched_and_printed(config, emulator, capsys):
    urls = [f"https://www.example.com/a/{i}" for i in range(35)]
    argv = [
        "purge",
        "-c",
        config,
        "--tag",
        "T1",
        "--host",
        "img.example.com",
        "--prefix",
        "www.example.com/blog/",
        "--invalidate",
    ]
    for u in urls:
        argv += ["--url", u]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # 35 URLs at the default cap of 30 per request: two requests.
    assert [(line["kind"], len(line["items"])) for line in lines] == [
        ("files", 30),
        ("files", 5),
        ("tags", 1),
        ("hosts", 1),
        ("prefixes", 1),
    ]
    got = recorded(emulator)
    assert {p["endpoint"] for p in got} == {"invalidate_cache"}
    assert sorted(i for p in got if p["kind"] == "files" for i in p["items"]) == sorted(urls)
    assert ["t1"] in [p["items"] for p in got]


def test_purge_with_kafka_away_purges_warns_once_and_leaves_nothing_running(
    tmp_path, emulator, monkeypatch, capsys
):
    """Receipts on, no broker: the purge goes, the receipts are lost with one warning, and the
    command leaves no thread behind (a client that cannot start used to keep reconnecting)."""
    config = write_config(tmp_path, emulator, monkeypatch)
    before = set(threading.enumerate())
    started = time.monotonic()
    assert main(["purge", "-c", config, "--url", "https://www.example.com/away"]) == 0
    took = time.monotonic() - started
    out = capsys.readouterr()
    assert [json.loads(line)["items"] for line in out.out.splitlines()] == [
        ["https://www.example.com/away"]
    ]
    assert recorded(emulator)[-1]["items"] == ["https://www.example.com/away"]
    assert out.err.count("receipts not written") == 1, out.err
    # The worker's Kafka threads and kafka-python's (the emulator's own threads come and go).
    left = kafka_threads_since(before)
    assert not left, f"still running after the command returned in {took:.1f} s: {left}"


def test_purge_everything_needs_yes(config, emulator, capsys):
    assert main(["purge", "-c", config, "--everything", "--zone", "example"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["purge", "-c", config, "--everything", "--zone", "example", "--yes"]) == 0
    assert recorded(emulator)[-1]["kind"] == "everything"


def test_purge_bad_input_exits_2_with_one_line(config, capsys):
    for argv in (
        ["--url", "notaurl"],
        ["--tag", "has space"],
        ["--url", "https://other.org/x"],
        [],
    ):
        assert main(["purge", "-c", config, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["purge", "-c", config, "--frobnicate"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_purge_with_bad_token_exits_1_and_hides_token(config, monkeypatch, capsys):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "wrong-token-abcdef")
    assert main(["purge", "-c", config, "--url", "https://example.com/x"]) == 1
    out = capsys.readouterr()
    assert "10000" in out.out
    assert "wrong-token-abcdef" not in out.out + out.err


def test_cache_commands(config, capsys):
    assert main(["cache", "-c", config, "reserve", "get"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == "off"
    assert (
        main(["cache", "-c", config, "variants", "edit", "--value", '{"webp": ["image/avif"]}'])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["value"] == {"webp": ["image/avif"]}
    assert main(["cache", "-c", config, "smart-tiered", "edit", "--value", "on"]) == 0
    capsys.readouterr()
    assert main(["cache", "-c", config, "smart-tiered", "delete"]) == 0
    capsys.readouterr()
    assert main(["cache", "-c", config, "regional-tiered", "edit", "--value", "on"]) == 0
    capsys.readouterr()
    assert main(["cache", "-c", config, "reserve", "clear"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "In-progress"
    assert main(["cache", "-c", config, "reserve", "status"]) == 0
    capsys.readouterr()
    assert main(["cache", "-c", config, "regional-tiered", "delete"]) == 2
    assert main(["cache", "-c", config, "reserve", "edit", "--value", "maybe"]) == 2
    assert main(["cache", "-c", config, "reserve", "edit"]) == 2


def test_emulator_command_serves_until_sigterm():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "emulator",
            "--port",
            "0",
            "--plan",
            "free",
            "--token",
            "tok",
            "--zone",
            ZONE_A,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        line = proc.stdout.readline()
        assert "emulator: Cloudflare API on http://127.0.0.1:" in line
        api = line.split(" on ", 1)[1].split(" ", 1)[0]
        resp = requests.post(
            f"{api}/zones/{ZONE_A}/purge_cache",
            json={"tags": ["x"]},
            headers={"Authorization": "Bearer tok"},
            timeout=5,
        )
        assert resp.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
