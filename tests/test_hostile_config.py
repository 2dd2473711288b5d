"""Hostile configs and credentials: each is refused by ``check`` with one line naming the file,
the key and the reason, in bounded time and memory, and no secret is printed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TOKEN
from tests.helpers import config_dict, write_config
from worker.commands import check
from worker.config.load import load

ROOT = Path(__file__).resolve().parent.parent


def _check(path: Path | str, env: dict[str, str] | None = None, timeout: float = 30):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "check", "-c", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )
    return proc, time.monotonic() - started


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- size: aliases, lists, texts, the file --------------------------------------------------------

ALIAS_BOMB = """\
kafka: {topics: [cms], group_id: g, dead_letter_topic: dlq}
cloudflare:
  base_url: http://127.0.0.1:1/client/v4
  accounts: {main: {plan: pro}}
  zones: [{name: example.com, id: 023e105f4ecef8ad9ca31a8372d0c353, hosts: [www.example.com]}]
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
rules:
  - name: bomb
    match: {type: x, fields: {data.x: *i}}
    urls: ["https://www.example.com/"]
"""


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1_000
    proc, took = _check(path)
    line = _one_line(proc)
    assert str(path) in line and "expands to more than 1,000,000 values" in line
    assert took < 5, f"{took:.1f} s"


def test_a_self_referring_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    data = yaml.safe_dump(config_dict("http://127.0.0.1:1/client/v4"))
    path.write_text(data + "x: &x [1, *x]\n")
    line = _one_line(_check(path)[0])
    assert "x[1]: refers to itself" in line


def test_a_match_value_must_be_a_scalar(tmp_path):
    data = config_dict("http://127.0.0.1:1/client/v4")
    data["rules"][0]["match"] = {"type": "x", "fields": {"data.x": [["nested"], "ok"]}}
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "rules[article].match.fields.data.x" in line and "not a list" in line
    data["rules"][0]["match"] = {"type": "x", "fields": {"data.x": {"in": [{"a": 1}]}}}
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "match value must be a text" in line and "not a dict" in line


def test_a_rule_with_more_literal_targets_than_a_record_may_purge_is_refused(tmp_path):
    data = config_dict("http://127.0.0.1:1/client/v4")
    data["rules"] = [
        {
            "name": "many",
            "match": {"type": "x"},
            "zone": "example.com",
            "tags": [f"t{i}" for i in range(10_001)],
        }
    ]
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "rules[many].tags" in line and "at least 10001 targets" in line
    assert "max_targets_per_record (10000)" in line


def test_huge_lists_texts_and_files_are_refused_with_their_key(tmp_path):
    data = config_dict("http://127.0.0.1:1/client/v4")
    data["rules"][0]["description"] = "x" * 70_000
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "rules[0].description" in line and "a text of 70000 characters" in line

    data = config_dict("http://127.0.0.1:1/client/v4")
    data["extra_list"] = list(range(100_001))
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "extra_list" in line and "a list of 100001 items" in line

    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (4 * 2**20) + "\n")
    line = _one_line(_check(big)[0])
    assert "larger than 4 MiB" in line


def write_config_data(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, width=10**9))
    return path


# -- regular expressions --------------------------------------------------------------------------


def test_a_regex_that_would_backtrack_forever_matches_in_linear_time(tmp_path):
    data = config_dict("http://127.0.0.1:1/client/v4")
    data["rules"] = [
        {
            "name": "redos",
            "match": {"type": "x", "fields": {"data.x": {"regex": "^(a+)+$"}}},
            "urls": ["https://www.example.com/ok"],
        }
    ]
    config = write_config_data(tmp_path, data)
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"type": "x", "data": {"x": "a" * 5_000 + "!"}}))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "explain", "-c", str(config), str(event)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN},
        timeout=60,
        cwd=ROOT,
    )
    took = time.monotonic() - started
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["purges"] == []  # it does not match, and says so quickly
    assert took < 5, f"{took:.1f} s"


@pytest.mark.parametrize("pattern", [r"^(?=a)a", r"(a)\1", r"(?<!x)y"])
def test_a_regex_the_linear_engine_cannot_run_is_refused_naming_the_rule(tmp_path, pattern):
    data = config_dict("http://127.0.0.1:1/client/v4")
    data["rules"][0]["match"] = {"type": "x", "fields": {"data.x": {"regex": pattern}}}
    line = _one_line(_check(write_config_data(tmp_path, data))[0])
    assert "rules[article].match.fields.data.x.regex" in line
    assert "linear-time" in line


# -- credentials and addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("tok-with-euro-€-sign", "not printable ASCII at position 15 of 20"),
        ("  spaced-token ", "white space before or after it"),
        ("token-with-newline\n", "white space before or after it"),
    ],
)
def test_a_token_that_cannot_go_into_a_header_is_refused_without_printing_it(
    tmp_path, token, reason
):
    path = write_config(tmp_path / "c.yaml", "http://127.0.0.1:1/client/v4")
    proc, _ = _check(path, env={"CLOUDFLARE_API_TOKEN": token})
    line = _one_line(proc)
    assert "cloudflare.accounts.main.token_env" in line and "CLOUDFLARE_API_TOKEN" in line
    assert reason in line
    assert token.strip() not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("base_url", "reason", "secret"),
    [
        ("https://user:hunter2@api.example.com/client/v4", "user name or password", "hunter2"),
        ("https://api.example.com/client/v4?key=s3cret", "query or fragment", "s3cret"),
        ("https://api.example.com/client/v4#frag", "query or fragment", None),
        ("https://api.example.com:99999/client/v4", "is not a URL", None),
    ],
)
def test_a_base_url_with_credentials_or_a_query_is_refused(tmp_path, base_url, reason, secret):
    path = write_config(tmp_path / "c.yaml", base_url)
    proc, _ = _check(path)
    line = _one_line(proc)
    assert "cloudflare.base_url" in line and reason in line
    if secret:
        assert secret not in proc.stderr


def test_check_online_names_the_address_it_could_not_reach(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config(tmp_path / "c.yaml", f"http://127.0.0.1:{port}/client/v4")
    failures = check._check_tokens(load(path, env={"CLOUDFLARE_API_TOKEN": TOKEN}))
    assert len(failures) == 1
    assert f"http://127.0.0.1:{port}/client/v4/user/tokens/verify" in failures[0]
    assert "Connection refused" in failures[0]
