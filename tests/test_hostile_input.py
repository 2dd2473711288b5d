"""Hostile input and secrets: what a security reviewer and a careless user would try.

Each test goes through the path users run: the command line (in-process or as a process), the
config loader, the planner that ``run`` uses, and the emulator over HTTP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import TOKEN
from tests.helpers import config_dict, make_config, write_config
from worker.cli import main
from worker.events import Record
from worker.planning.planner import Planner
from worker.targets import Target

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
EXAMPLE_ZONES = ("023e105f4ecef8ad9ca31a8372d0c353", "9a7806061c88ada191ed06f989cc3dac")


def _echo_faults(emulator, status: int = 400, count: int = 50) -> None:
    """Every error the emulator answers quotes the request's headers, token included."""
    requests.post(
        emulator.url + "/__emulator/faults",
        json={"echo_headers": True, "status": status, "count": count},
        timeout=5,
    ).raise_for_status()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP",)}
    return {**env, **extra}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
        cwd=ROOT,
    )


# -- 1. secrets echoed back by the API --------------------------------------------------------


def test_purge_output_never_carries_the_token_the_api_echoed(emulator, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", emulator.api_url)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    _echo_faults(emulator)
    proc = _cli(
        "purge",
        "-c",
        cfg,
        "--url",
        "https://www.example.com/a",
        env=_env(CLOUDFLARE_API_TOKEN=TOKEN),
    )
    assert proc.returncode == 1
    line = json.loads(proc.stdout.splitlines()[0])
    error = line["failed"][0]["error"]
    assert "request headers" in error  # the API really echoed them
    assert TOKEN not in proc.stdout + proc.stderr
    assert not re.search(r"Bearer\s+(?!\*\*\*)\S", proc.stdout + proc.stderr)


@pytest.mark.kafka
def test_check_online_output_never_carries_the_token(
    emulator, tmp_path, kafka_bootstrap, make_topic
):
    topic, dlq = make_topic("cms"), make_topic("dlq")
    kafka = {"bootstrap_servers": [kafka_bootstrap], "topics": [topic], "dead_letter_topic": dlq}
    cfg = write_config(tmp_path / "c.yaml", emulator.api_url, kafka=kafka)
    _echo_faults(emulator, status=400)
    proc = _cli("check", "-c", cfg, "--online", env=_env(CLOUDFLARE_API_TOKEN=TOKEN))
    assert proc.returncode == 1
    assert "token check failed" in proc.stdout and "request headers" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr


def test_dead_letter_headers_are_redacted_even_for_texts_from_elsewhere():
    from worker.errors import ApiRejected
    from worker.observe import logs
    from worker.outcome.dead_letters import header, headers_for

    secret = "a-secret-registered-for-this-test"
    logs.register_secrets([secret])
    record = Record("t", 0, 5, None, b"{}", ())
    hdrs = headers_for(record, [ApiRejected(400, message=f"proxy said: {secret}")], failed_at=0)
    assert secret not in (header(hdrs, "purge.error.message") or "")
    assert "***" in (header(hdrs, "purge.error.message") or "")


def test_stdlib_log_lines_are_json_and_redacted(capsys):
    import logging

    from worker.observe import logs

    logs.register_secrets(["sasl-password-for-this-test"])
    logs.configure("json", "info")
    logging.getLogger("kafka.conn").warning("auth with sasl-password-for-this-test failed")
    logging.getLogger("kafka.conn").info("chatter below warning is not shown")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = json.loads(err[0])
    assert line["level"] == "warning" and line["logger"] == "kafka.conn"
    assert "sasl-password-for-this-test" not in err[0] and "***" in line["event"]


# -- 2. what one record can cost -------------------------------------------------------------


# The child reports its own peak from /proc/self/status at exit. wait4's ru_maxrss is not the
# child's alone: Linux carries the peak of the memory it was forked with (the test process, which
# grows past 300 MiB late in the suite) across exec.
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _report():
    with open('/proc/self/status') as status:
        peak = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(os.environ['PEAK_RSS_FILE'], 'w') as out:
        out.write(peak)
atexit.register(_report)
sys.argv[0] = 'worker'
runpy.run_module('worker', run_name='__main__', alter_sys=True)
"""


def _run_measured(args: list[str], tmp_path: Path) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and the worker process's own peak RSS (VmHWM) in MiB."""
    peak_file = tmp_path / "peak-rss-kib"
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(PEAK_RSS_FILE=str(peak_file)),
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr, int(peak_file.read_text()) / 1024


def test_a_gallery_of_two_billion_images_is_dead_lettered_in_bounded_time_and_memory(tmp_path):
    event = {
        "specversion": "1.0",
        "id": "g1",
        "source": "cms",
        "type": "gallery.updated",
        "data": {"id": 9, "slug": "huge", "image_count": 2_000_000_000},
    }
    path = tmp_path / "gallery.json"
    path.write_text(json.dumps(event))
    started = time.monotonic()
    code, out, err, rss_mib = _run_measured(["explain", "-c", str(EXAMPLE), str(path)], tmp_path)
    elapsed = time.monotonic() - started
    assert code == 2
    plan = json.loads(out)
    assert plan["dead_letter"] is True
    assert plan["errors"][0]["class"] == "invalid_target"
    assert "max_targets_per_record" in plan["errors"][0]["message"]
    assert "dead-lettered" in err and len(err.strip().splitlines()) == 1
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert rss_mib < 300, f"peak RSS {rss_mib:.0f} MiB"


def test_the_cap_applies_to_fan_outs_and_is_configurable():
    rules = [
        {
            "name": "many",
            "match": {"type": "x"},
            "urls": [
                {
                    "url": "https://www.example.com/{data.ids[]}",
                    "headers": {"Accept-Language": "{data.langs[]}"},
                }
            ],
        }
    ]
    config = make_config("http://127.0.0.1:1", rules=rules, delivery={"max_targets_per_record": 50})
    planner = Planner(config.planning)
    body = {"type": "x", "data": {"ids": list(range(10)), "langs": ["en", "de", "fr", "it", "es"]}}
    ok = planner.plan(Record("cms", 0, 0, None, json.dumps(body).encode(), ()))
    assert not ok.errors and len(ok.targets) == 50
    body["data"]["ids"] = list(range(11))
    over = planner.plan(Record("cms", 0, 1, None, json.dumps(body).encode(), ()))
    assert over.targets == [] and over.errors[0].error_class == "invalid_target"
    assert "more than 50 targets" in str(over.errors[0])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Target.url("https://www.example.com/" + "a" * 900_000), "characters long"),
        (
            lambda: Target.url("https://www.example.com/", {"Accept-Language": "x" * 100_000}),
            "characters long",
        ),
        (lambda: Target.prefix("www.example.com/" + "a" * 10_000), "characters long"),
        (lambda: Target.tag("t" * 2000), "1..1024"),
    ],
)
def test_oversized_targets_are_invalid(make, message):
    from worker.errors import InvalidTarget

    with pytest.raises(InvalidTarget, match=message):
        make()


# -- 3. hosts come from config, not from event data -------------------------------------------


def _plan_example(event_type: str, data: dict) -> object:
    from worker.config.load import load

    config = load(EXAMPLE, env={"CLOUDFLARE_API_TOKEN": TOKEN})
    body = {"specversion": "1.0", "id": "e", "source": "cms", "type": event_type, "data": data}
    return Planner(config.planning).plan(
        Record("cms.content", 0, 0, None, json.dumps(body).encode(), ())
    )


def test_an_alias_cannot_move_a_purge_to_another_zone_with_the_shipped_config():
    article = {
        "id": 1,
        "slug": "s",
        "section": "world",
        "locales": ["en"],
        "author_ids": [],
        "aliases": ["@img.example-cdn.net/renditions/"],
    }
    plan = _plan_example("article.updated", article)
    assert not plan.errors
    assert {r.zone.name for r in plan.targets} == {"example.com"}
    assert "https://www.example.com/@img.example-cdn.net/renditions" in {
        r.target.value for r in plan.targets
    }


@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("@img.example-cdn.net/renditions/", "user information"),
        (".evil.example.net/x", "changed the host"),
        (":8443@img.example-cdn.net/", "user information"),
        (":8443/x", "changed the host"),  # the template owns the port too
    ],
)
def test_a_template_that_spells_its_host_keeps_it(alias, reason):
    rules = [
        {
            "name": "alias",
            "match": {"type": "x"},
            "urls": ["https://www.example.com{data.alias}"],
        }
    ]
    config = make_config("http://127.0.0.1:1", rules=rules)
    body = json.dumps({"type": "x", "data": {"alias": alias}}).encode()
    plan = Planner(config.planning).plan(Record("cms", 0, 0, None, body, ()))
    assert plan.targets == []
    assert plan.errors and plan.errors[0].error_class == "invalid_target"
    assert reason in str(plan.errors[0])


def test_userinfo_urls_are_invalid_targets():
    from worker.errors import InvalidTarget

    with pytest.raises(InvalidTarget, match="user information"):
        Target.url("https://user:pw@www.example.com/")


# -- 4. international names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://faß.de/x", "https://xn--fa-hia.de/x"),
        ("https://Bücher.example/", "https://xn--bcher-kva.example/"),
        ("https://MÜNCHEN.de/", "https://xn--mnchen-3ya.de/"),
    ],
)
def test_hosts_are_normalised_with_uts46(raw, expected):
    assert Target.url(raw).value == expected


def test_faß_de_and_fass_de_are_different_hosts():
    assert Target.host("faß.de").value != Target.host("fass.de").value


# -- 5. one validation for check and run -----------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def _yaml_with(tmp_path: Path, edit) -> str:
    data = config_dict("http://127.0.0.1:8787/client/v4")
    edit(data)
    return _write(tmp_path, yaml.safe_dump(data))


def _account(**kv):
    def edit(d):
        d["cloudflare"]["accounts"]["main"].update(kv)

    return edit


CASES = {
    "nan rate": (_account(urls_per_second=float("nan")), "urls_per_second"),
    "inf rate": (_account(flex_refill_per_second=float("inf")), "flex_refill_per_second"),
    "no hosts": (
        lambda d: d["cloudflare"]["zones"][0].update(hosts=[]),
        "cloudflare.zones[0].hosts",
    ),
    "backoff order": (
        lambda d: d["delivery"]["retry"].update(initial_backoff_seconds=60, max_backoff_seconds=5),
        "delivery.retry",
    ),
    "ftp base_url": (
        lambda d: d["cloudflare"].update(base_url="ftp://api.example.com/"),
        "cloudflare.base_url",
    ),
    "not a url": (lambda d: d["cloudflare"].update(base_url="not a url"), "cloudflare.base_url"),
    "ftp template": (
        lambda d: d["rules"][0].update(urls=["ftp://www.example.com/{data.slug}"]),
        "rules[article].urls",
    ),
    "listen address": (
        lambda d: d["observability"].update(listen_address="everywhere"),
        "observability.listen_address",
    ),
    "cap zero": (
        lambda d: d["delivery"].update(max_targets_per_record=0),
        "delivery.max_targets_per_record",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["check", "run", "purge"])
def test_check_run_and_purge_refuse_the_same_bad_configs(tmp_path, case, command, capsys):
    edit, key = CASES[case]
    path = _yaml_with(tmp_path, edit)
    argv = {
        "check": ["check", "-c", path],
        "run": ["run", "-c", path],
        "purge": ["purge", "-c", path, "--url", "https://www.example.com/x"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert path in err[0] and key in err[0], err[0]


def test_duplicate_keys_and_non_utf8_are_one_line_errors(tmp_path, capsys):
    dup = _write(tmp_path, yaml.safe_dump(config_dict("http://x")) + "coalesce: {}\n")
    assert main(["check", "-c", dup]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'coalesce'" in err and len(err.strip().splitlines()) == 1
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes("kafka: {topics: [caf\xe9]}\n".encode("latin-1"))
    assert main(["check", "-c", str(raw)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and len(err.strip().splitlines()) == 1


def test_a_bad_base_url_from_the_environment_is_a_config_error(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path / "c.yaml", "http://127.0.0.1:8787/client/v4")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_BASE_URL", "ftp://proxy/")
    assert main(["check", "-c", path]) == 2
    assert "CLOUDFLARE_BASE_URL" in capsys.readouterr().err


def test_purge_without_a_token_sends_nothing(emulator, tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path / "c.yaml", emulator.api_url)
    monkeypatch.delenv("CLOUDFLARE_API_TOKEN", raising=False)
    assert main(["purge", "-c", path, "--url", "https://www.example.com/x"]) == 2
    assert "no API token" in capsys.readouterr().err
    recorded = requests.get(emulator.url + "/__emulator/requests", timeout=5).json()
    assert recorded == []


def test_purge_dry_run_accepts_nothing(emulator, tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path / "c.yaml", emulator.api_url)
    monkeypatch.delenv("CLOUDFLARE_API_TOKEN", raising=False)  # a dry run needs no token
    assert main(["purge", "-c", path, "--url", "https://www.example.com/x", "--dry-run"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["dry_run"] is True and line["would_send"] == 1 and "accepted" not in line
    assert requests.get(emulator.url + "/__emulator/requests", timeout=5).json() == []


# -- 6. listen addresses and ports -----------------------------------------------------------


def test_a_busy_metrics_port_is_one_line_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(
            tmp_path / "c.yaml",
            "http://127.0.0.1:8787/client/v4",
            observability={"metrics_port": port, "health_port": None},
        )
        proc = _cli("run", "-c", path, env=_env(CLOUDFLARE_API_TOKEN=TOKEN))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "observability.metrics_port" in err[0] and "in use" in err[0]


def test_the_default_listen_address_is_loopback_and_the_chart_opens_it():
    from worker.config.model import ObservabilitySettings

    assert ObservabilitySettings().listen_address == "127.0.0.1"
    helpers = (ROOT / "helm" / "purge-worker" / "templates" / "_helpers.tpl").read_text()
    assert '"listen_address" "0.0.0.0"' in helpers


# -- 7. plug-in modules ---------------------------------------------------------------------


def test_a_module_next_to_the_config_never_shadows_the_standard_library(tmp_path):
    marker = tmp_path / "shadow-ran"
    (tmp_path / "netrc.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "plugins.py").write_text(
        "def urls(event):\n    return {'urls': ['https://www.example.com/p']}\n"
    )
    data = config_dict("http://127.0.0.1:8787/client/v4")
    data["rules"] = [{"name": "p", "match": {"type": "x"}, "plugin": "plugins:urls"}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    code = (
        "import sys\nfrom worker.config.load import load\n"
        f"load({str(cfg)!r}, env={{'CLOUDFLARE_API_TOKEN': 't'}})\n"
        "import netrc\nprint(netrc.__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert str(tmp_path) not in proc.stdout


def test_a_plugin_named_like_a_standard_module_is_a_config_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "netrc.py").write_text("def urls(event):\n    return []\n")
    data = config_dict("http://127.0.0.1:8787/client/v4")
    data["rules"] = [{"name": "p", "match": {"type": "x"}, "plugin": "netrc:urls"}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    assert main(["check", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "rules[p].plugin" in err and "rename" in err


# -- 9. the command-line contract --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "-c", str(EXAMPLE), "reserve", "get", "--zone", "nosuch.com"],
        ["cache", "-c", str(EXAMPLE), "reserve", "get"],
        ["emulator", "--port", "70000"],
        ["emulator", "--port", "x"],
        ["emulator", "--zone", "not-a-zone"],
        ["run", "-c", str(EXAMPLE), "--metrics-port", "-1"],
        ["purge", "-c", str(EXAMPLE), "--header", "nonsense", "--url", "https://x.example.com/"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv):
    proc = _cli(*argv, env=_env(CLOUDFLARE_API_TOKEN=TOKEN))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bare_call_prints_usage_and_help_shows_defaults():
    bare = _cli()
    assert bare.returncode == 2 and "usage: purge-worker" in bare.stderr
    helped = _cli("emulator", "--help")
    assert helped.returncode == 0 and "(default: 8787)" in helped.stdout


def test_explain_says_on_stderr_why_it_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    proc = _cli("explain", "-c", str(EXAMPLE), str(bad))
    assert proc.returncode == 2
    assert "invalid_event" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for raw in block.splitlines():
            line = raw.split("  #", 1)[0].strip()
            if line.startswith("purge-worker "):
                commands.append(line)
    return commands


def test_the_readme_shows_commands():
    assert len(_readme_commands()) >= 8


@pytest.mark.kafka
def test_every_command_in_the_readme_works_with_the_shipped_config(
    emulator_factory, kafka_bootstrap, tmp_path
):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    emu = emulator_factory("pro", zones=dict.fromkeys(EXAMPLE_ZONES, "acc"))
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    for name in ("cms.content", "cms.content.purge-dlq", "purge-worker.receipts"):
        with contextlib.suppress(TopicAlreadyExistsError):
            admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    admin.close()
    env = _env(
        CLOUDFLARE_API_TOKEN=TOKEN,
        CLOUDFLARE_BASE_URL=emu.api_url,
        KAFKA_BOOTSTRAP=kafka_bootstrap,
    )
    ran = 0
    for command in _readme_commands():
        argv = shlex.split(command)[1:]
        argv = [str(EXAMPLE) if a == "config.yaml" else a for a in argv]
        if argv[0] in ("run", "emulator"):
            continue  # long-running: covered by `make run` and the pipeline tests
        if argv[:3] == ["cache", "-c", str(EXAMPLE)] and argv[3:5] == ["reserve", "clear"]:
            # The README says it needs Cache Reserve off first: do as it says.
            off = ["cache", "-c", str(EXAMPLE), "reserve", "edit", "--zone", "example.com"]
            assert _cli(*off, "--value", "off", env=env).returncode == 0
        proc = _cli(*argv, env=env, timeout=120)
        if argv[0] == "trace" and proc.returncode == 1:
            # Nothing found is an answer (exit 1, like grep): no README purge covers it.
            assert "0 receipts" in proc.stderr, f"{command}\n{proc.stdout}\n{proc.stderr}"
        else:
            assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        ran += 1
    assert ran >= 8
    assert requests.get(emu.url + "/__emulator/purges", timeout=5).json()


def test_the_readme_quotes_only_messages_the_worker_prints():
    """Each message the Troubleshooting table quotes (its first column: what the user sees) is
    one the worker's code can print; placeholders ({…}, …, A/B alternatives) are skipped over."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Troubleshooting") : text.index("## Kubernetes")]
    source = "\n".join(p.read_text() for p in (ROOT / "worker").rglob("*.py"))
    quoted = [
        q
        for row in table.splitlines()
        if row.startswith("| ") and not row.startswith("| symptom")
        for q in re.findall(r'"([^"]+)"', row.split(" | ")[0])
    ]
    assert len(quoted) >= 7
    for message in quoted:
        for part in re.split(r"…|\{[^}]*\}", message):
            words = part.split()
            cut = next((i for i, w in enumerate(words) if "/" in w), len(words))
            fragment = " ".join(words[:cut]).strip()
            if len(fragment) >= 6:
                assert fragment in source, f"the README quotes {message!r}; no code prints it"


def test_the_readme_gives_the_emulators_token():
    from worker.commands import emulator

    parser = argparse.ArgumentParser()
    emulator.add_arguments(parser)
    token = parser.parse_args([]).token
    assert f"CLOUDFLARE_API_TOKEN={token}" in (ROOT / "README.md").read_text()
