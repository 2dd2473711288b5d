"""Hostile events, arguments and plug-ins: text that is not text, times that are not times,
plug-ins that try to end the process, output that goes nowhere. Each gives one clear line or a
dead letter with its reason; never a traceback, never "internal error"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TOKEN
from tests.helpers import config_dict, make_config
from worker.config.load import load
from worker.events import Record
from worker.planning.planner import Planner

ROOT = Path(__file__).resolve().parent.parent
API = "http://127.0.0.1:1/client/v4"


def _run(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        check=False,
        capture_output=True,
        input=stdin,
        env={**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN},
        timeout=60,
        cwd=ROOT,
    )


def _plan(rules: list[dict], body: bytes):
    config = make_config(API, rules=rules)
    return Planner(config.planning).plan(Record("cms", 0, 0, None, body, ()))


URL_RULE = [
    {"name": "page", "match": {"type": "x"}, "urls": ["https://www.example.com/{data.slug}"]}
]


# -- text that is not text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "data", "where"),
    [
        (URL_RULE, {"slug": "a\ud800b"}, "URL"),
        (
            [{"name": "p", "match": {"type": "x"}, "prefixes": ["www.example.com/{data.slug}/"]}],
            {"slug": "a\udcffb"},
            "prefix",
        ),
        (
            [
                {
                    "name": "h",
                    "match": {"type": "x"},
                    "urls": [
                        {"url": "https://www.example.com/", "headers": {"X-Lang": "{data.slug}"}}
                    ],
                }
            ],
            {"slug": "\ud83d"},
            "cache-key header",
        ),
    ],
)
def test_a_lone_surrogate_in_an_event_is_an_invalid_target(rules, data, where):
    body = json.dumps({"type": "x", "data": data}).encode()  # JSON escapes it: "\ud800"
    plan = _plan(rules, body)
    assert plan.targets == []
    assert [e.error_class for e in plan.errors] == ["invalid_target"]
    message = str(plan.errors[0])
    assert where in message and "lone surrogate" in message and "internal" not in message


def test_an_argument_that_is_not_utf8_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_dict(API)))
    proc = _run("purge", "-c", str(config), "--dry-run", "--url", b"https://www.example.com/\xff")
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not valid text" in err


def test_output_to_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "config-schema"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the output comes (`| true`)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err


# -- values that are not what they claim ----------------------------------------------------------


@pytest.mark.parametrize("time_value", ["yesterday", float("nan"), float("inf"), [1], "2026-13-45"])
def test_an_event_time_that_is_not_a_time_is_an_invalid_event(time_value):
    body = json.dumps({"type": "x", "time": time_value, "data": {"slug": "s"}}).encode()
    plan = _plan(URL_RULE, body)
    assert [e.error_class for e in plan.errors] == ["invalid_event"]
    assert "is not a time" in str(plan.errors[0])


def test_a_valid_event_time_is_still_read():
    for value in ("2026-01-02T03:04:05Z", 1_767_323_045, 1_767_323_045_000):
        body = json.dumps({"type": "x", "time": value, "data": {"slug": "s"}}).encode()
        plan = _plan(URL_RULE, body)
        assert not plan.errors
        assert plan.event.time == pytest.approx(1_767_323_045)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_never_become_a_page(value):
    body = json.dumps({"type": "x", "data": {"slug": value}}).encode()
    plan = _plan(URL_RULE, body)
    assert plan.targets == []
    assert [e.error_class for e in plan.errors] == ["invalid_event"]
    assert "not a value to put in a target" in str(plan.errors[0])


# -- plug-ins that try to end the process ----------------------------------------------------------

PLUGINS = """
import sys

def exits(event):
    sys.exit(3)

def interrupts(event):
    raise KeyboardInterrupt

def generator_exits(event):
    yield from ()
    raise SystemExit("from a generator")

def fine(event):
    return {"urls": ["https://www.example.com/fine"]}
"""


@pytest.mark.parametrize(
    ("function", "raised"),
    [
        ("exits", "SystemExit"),
        ("interrupts", "KeyboardInterrupt"),
        ("generator_exits", "SystemExit"),
    ],
)
def test_a_plugin_that_ends_the_process_only_dead_letters_its_event(tmp_path, function, raised):
    module = f"hostile_plugins_{function}"  # one per test: this process imports each once
    (tmp_path / f"{module}.py").write_text(PLUGINS)
    data = config_dict(API)
    data["rules"] = [
        {"name": "bad", "match": {"type": "x"}, "plugin": f"{module}:{function}"},
        {"name": "good", "match": {"type": "y"}, "plugin": f"{module}:fine"},
    ]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps({"type": "x", "data": {}}))
    good.write_text(json.dumps({"type": "y", "data": {}}))
    proc = _run("explain", "-c", str(config), str(bad))
    plan = json.loads(proc.stdout)
    assert proc.returncode == 2
    assert plan["dead_letter"] is True
    assert plan["errors"][0]["class"] == "invalid_event"
    assert f"plugin rule bad raised {raised}" in plan["errors"][0]["message"]
    # In the worker's own process: the event is dead-lettered and the next one planned.
    planner = Planner(load(config, env={"CLOUDFLARE_API_TOKEN": TOKEN}).planning)
    failed = planner.plan(Record("cms", 0, 0, None, bad.read_bytes(), ()))
    assert [e.error_class for e in failed.errors] == ["invalid_event"]
    after = planner.plan(Record("cms", 0, 1, None, good.read_bytes(), ()))
    assert not after.errors and after.targets


# -- start-up -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["explain", "--help"]])
def test_help_loads_no_client_library(argv):
    """`--help` imports only what it prints: no Kafka client, no API client, no metrics, no
    config model (each command's module is imported when that command runs)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "worker", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = {"kafka", "requests", "prometheus_client"}
    if argv == ["--help"] or argv == ["--version"]:
        heavy |= {"pydantic", "structlog", "yaml"}
    assert not imported & heavy, sorted(imported & heavy)


def test_run_leaves_the_http_library_to_load_beside_the_group_join():
    """``run``'s modules do not import ``requests`` (~40 ms): it loads on a thread while the
    consumer connects and joins its group, which mostly waits on the network."""
    code = (
        "import sys, worker.commands.run; print(sorted({'requests', 'urllib3'} & set(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.stdout.strip() == "[]"
