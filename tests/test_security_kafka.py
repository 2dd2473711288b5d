"""The worker against Kafka run as managed Kafka is: one broker for every case here, with TLS,
SASL (SCRAM and PLAIN), mutual TLS, and an authorizer that denies what no ACL allows; topics
made by the test as an admin would, and only the ACLs the README lists granted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest
import requests
import yaml
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import (
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePatternFilter,
    ResourceType,
)

from scripts.kafka_broker import BrokerError, free_port
from scripts.secure_broker import (
    KEY_PASSPHRASE,
    MTLS_PRINCIPAL,
    PLAIN_PASSWORD,
    PLAIN_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    SecureBroker,
)
from tests.conftest import TOKEN
from tests.helpers import cloudevent, purged_items, wait_for
from tests.kafka_helpers import all_committed, produce, worker_config

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

READ, WRITE, DESCRIBE = ACLOperation.READ, ACLOperation.WRITE, ACLOperation.DESCRIBE
PARTITIONS = "budget exchange silent; sharing the budget by partitions"
TOPIC, GROUP = ResourceType.TOPIC, ResourceType.GROUP


@pytest.fixture(scope="module")
def broker():
    b = SecureBroker()
    try:
        b.start()
    except BrokerError as exc:
        pytest.fail(f"could not start the secured broker: {exc}", pytrace=False)
    yield b
    b.cleanup()


class Setup:
    """A test's topics (made by the admin), its group, and the ACLs granted to its principal."""

    def __init__(self, broker: SecureBroker, principal: str, *, budget: bool = True) -> None:
        self.broker = broker
        self.principal = principal
        tag = uuid.uuid4().hex[:8]
        self.topic, self.dlq = f"cms-{tag}", f"dlq-{tag}"
        self.budget, self.group = f"budget-{tag}", f"g-{tag}"
        self.receipts = f"receipts-{tag}"
        topics = [NewTopic(self.topic, 2, 1), NewTopic(self.dlq, 1, 1)]
        topics.append(NewTopic(self.receipts, 2, 1))
        if budget:  # else missing: the worker would make it
            compacted = {"cleanup.policy": "compact,delete"}
            topics.append(NewTopic(self.budget, 1, 1, topic_configs=compacted))
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics(topics)
        admin.close()

    def grant(self, resource: ResourceType, name: str, *ops: ACLOperation) -> None:
        self.broker.grant(self.principal, resource, name, *ops)

    def grant_all(self, *, dlq_read: bool = True, receipts: bool = True) -> None:
        """The least privilege of the README's table, for every feature."""
        self.grant(TOPIC, self.topic, READ, DESCRIBE)
        self.grant(GROUP, self.group, READ, DESCRIBE)
        self.grant(TOPIC, self.dlq, WRITE, DESCRIBE, *([READ] if dlq_read else []))
        self.grant(TOPIC, self.budget, READ, WRITE, DESCRIBE)
        if receipts:
            self.grant(TOPIC, self.receipts, READ, WRITE, DESCRIBE)

    def revoke(self, resource: ResourceType, name: str, op: ACLOperation) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        pattern = ResourcePatternFilter(resource, name, ACLResourcePatternType.LITERAL)
        admin.delete_acls([ACLFilter(self.principal, "*", op, ACLPermissionType.ALLOW, pattern)])
        admin.close()


def config(tmp_path: Path, emulator, s: Setup, listener: str, security: dict, **over) -> str:
    kafka = {
        "bootstrap_servers": [s.broker.address(listener)],
        "topics": [s.topic],
        "dead_letter_topic": s.dlq,
        "group_id": s.group,
        "budget_topic": s.budget,
        "receipts_topic": s.receipts,
        "security": security,
    }
    path = worker_config(tmp_path, emulator, "unused:1", s.topic, s.dlq, s.group, **over)
    data = yaml.safe_load(Path(path).read_text())
    data["kafka"] = kafka
    Path(path).write_text(yaml.safe_dump(data))
    return path


def scram(broker: SecureBroker, **over) -> dict:
    return {
        "protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": SCRAM_USER,
        "sasl_password_env": "KAFKA_PASSWORD",
        "ssl_cafile": str(broker.certs.ca),
        **over,
    }


def mtls(broker: SecureBroker, **over) -> dict:
    return {
        "protocol": "SSL",
        "ssl_cafile": str(broker.certs.ca),
        "ssl_certfile": str(broker.certs.client_cert),
        "ssl_keyfile": str(broker.certs.client_key),
        **over,
    }


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN, "KAFKA_PASSWORD": SCRAM_PASSWORD}
    out.pop("KAFKA_BOOTSTRAP", None)
    return {**out, **extra}


def start(cfg: str, log: Path, **extra_env: str) -> subprocess.Popen:
    """A worker process. Its stdin stays open (a pipe nobody writes to), as in a container run
    with ``-i``: nothing may wait for a prompt there."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "-c", cfg],
            env=env(**extra_env),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9
    finally:
        closed(proc)


def closed(proc: subprocess.Popen) -> subprocess.Popen:
    if proc.stdin is not None:
        proc.stdin.close()
    return proc


def purge_through(cfg: str, tmp_path: Path, emulator, s: Setup, n: int, prefix: str, **env_extra):
    """A worker drains ``n`` events produced while it runs, is stopped cleanly, and purged
    every one of their URLs; returns its log."""
    log_path = tmp_path / "worker.log"
    worker = start(cfg, log_path, **env_extra)
    try:
        produce(s.broker.bootstrap, s.topic, events(n, prefix), key=None, spread=2)
        wait_for(
            lambda: all_committed(s.broker.bootstrap, s.group, s.topic), 60, what="all committed"
        )
    finally:
        assert stop(worker) == 0, log_path.read_text()[-3000:]
    assert set(purged_items(emulator)) == urls(n, prefix)
    return log_path.read_text()


def events(n: int, prefix: str) -> list[bytes]:
    data = [{"host": "img.example-cdn.net", "path": f"{prefix}{i}"} for i in range(n)]
    return [cloudevent("image.updated", d, f"{prefix}{i}") for i, d in enumerate(data)]


def urls(n: int, prefix: str) -> set[str]:
    return {f"https://img.example-cdn.net/{prefix}{i}" for i in range(n)}


def test_least_privilege_with_scram_purges_and_shares_the_budget_through_the_exchange(
    broker, emulator, tmp_path
):
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant_all()
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    worker = start(cfg, tmp_path / "worker.log")
    try:
        produce(broker.bootstrap, s.topic, events(40, "s"), key=None, spread=2)
        wait_for(
            lambda: all_committed(broker.bootstrap, s.group, s.topic), 60, what="all committed"
        )
        log = (tmp_path / "worker.log").read_text()
        wait_for(
            lambda: '"decided_by": "demand"' in (tmp_path / "worker.log").read_text(),
            30,
            what="the budget split by demand through the exchange",
        )
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert set(purged_items(emulator)) == urls(40, "s")
    reader = KafkaConsumer(
        s.budget, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )  # fmt: skip
    reports = [r for r in reader if r.key and b"|" in r.key]
    reader.close()
    assert reports, "no budget reports reached the topic"
    denied = broker.denials(f"User:{SCRAM_USER}")
    assert not [d for d in denied if "operation = Create" in d], denied
    assert SCRAM_PASSWORD not in log


@pytest.mark.parametrize("how", ["plain", "mtls", "mtls-encrypted-key"])
def test_plain_and_mutual_tls_purge_as_well(broker, emulator, tmp_path, how):
    principal = f"User:{PLAIN_USER}" if how == "plain" else MTLS_PRINCIPAL
    s = Setup(broker, principal)
    s.grant_all()
    extra = {}
    if how == "plain":
        security = scram(broker, sasl_mechanism="PLAIN", sasl_username=PLAIN_USER)
        extra["KAFKA_PASSWORD"] = PLAIN_PASSWORD
    elif how == "mtls":
        security = mtls(broker)
    else:
        security = mtls(
            broker,
            ssl_keyfile=str(broker.certs.client_key_encrypted),
            ssl_password_env="KAFKA_KEY_PASSPHRASE",
        )
        extra["KAFKA_KEY_PASSPHRASE"] = KEY_PASSPHRASE
    cfg = config(tmp_path, emulator, s, "SASL_SSL" if how == "plain" else "MTLS", security)
    log = purge_through(cfg, tmp_path, emulator, s, 6, how, **extra)
    assert PLAIN_PASSWORD not in log and KEY_PASSPHRASE not in log


REFUSALS = {
    "wrong password": ("SASL_SSL", "scram", {}, {"KAFKA_PASSWORD": "not-the-password"},
                       "authentication failed for user 'worker'"),
    "wrong CA": ("SASL_SSL", "scram", {"ssl_cafile": "other-ca.pem"}, {},
                 "certificate is not trusted"),
    "another host's certificate": ("OTHERHOST", "mtls", {}, {},
                                   "does not name the address connected to"),
    "no client certificate": ("MTLS", "mtls", {"ssl_certfile": None, "ssl_keyfile": None}, {},
                              "TLS handshake failed"),
    "encrypted key, no passphrase": ("MTLS", "mtls", {"ssl_keyfile": "client-encrypted.key"}, {},
                                     "ssl_keyfile is encrypted: set"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_stops_start_up_within_seconds_naming_its_cause(broker, emulator, tmp_path, case):
    listener, kind, change, extra_env, cause = REFUSALS[case]
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant_all()
    security = scram(broker) if kind == "scram" else mtls(broker)
    for key, value in change.items():
        security[key] = str(broker.certs.dir / value) if value else None
    security = {k: v for k, v in security.items() if v is not None}
    cfg = config(tmp_path, emulator, s, listener, security)
    started = time.monotonic()
    worker = start(cfg, tmp_path / "worker.log", **extra_env)
    try:
        code = closed(worker).wait(20)
    except subprocess.TimeoutExpired:
        code = stop(worker)
    took = time.monotonic() - started
    log = (tmp_path / "worker.log").read_text()
    assert code == 1, log[-3000:]
    assert took < 10, f"{case}: took {took:.1f} s"
    last = log.strip().splitlines()[-1]
    assert cause in last, last
    assert "Traceback" not in log
    assert "Enter PEM pass phrase" not in log
    for secret in (SCRAM_PASSWORD, KEY_PASSPHRASE, "not-the-password"):
        assert secret not in log


def test_a_topic_it_may_not_describe_is_named_as_such_not_as_missing(broker, emulator, tmp_path):
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant(TOPIC, s.topic, READ, DESCRIBE)
    s.grant(GROUP, s.group, READ, DESCRIBE)
    s.grant(TOPIC, s.budget, READ, WRITE, DESCRIBE)  # nothing on the dead-letter topic
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    worker = start(cfg, tmp_path / "worker.log")
    code = closed(worker).wait(30)
    last = (tmp_path / "worker.log").read_text().strip().splitlines()[-1]
    assert code == 1
    assert f"topic {s.dlq}: not authorized to Describe it" in last, last
    assert "does not exist" not in last


def test_a_dead_letter_write_refused_recovers_when_access_returns_and_readyz_says_so(
    broker, emulator, tmp_path
):
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant_all(dlq_read=False)  # the guard starts unseeded, and says so
    port = free_port()
    cfg = config(
        tmp_path, emulator, s, "SASL_SSL", scram(broker), observability={"health_port": port}
    )
    worker = start(cfg, tmp_path / "worker.log")

    def ready() -> int | None:
        try:
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
        except requests.RequestException:
            return None

    try:
        wait_for(lambda: ready() == 200, 30, what="ready")
        s.revoke(TOPIC, s.dlq, WRITE)
        produce(broker.bootstrap, s.topic, [b"not json"] * 3 + events(5, "r"), key=None)
        wait_for(lambda: ready() == 503, 30, what="readyz 503 while dead letters fail")
        assert not all_committed(broker.bootstrap, s.group, s.topic)
        s.grant(TOPIC, s.dlq, WRITE)
        wait_for(lambda: ready() == 200, 60, what="ready again once Write is granted")
        wait_for(
            lambda: all_committed(broker.bootstrap, s.group, s.topic), 30, what="all committed"
        )
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    log = (tmp_path / "worker.log").read_text()
    assert "dead-letter guard reads it back" in log  # the warning about Read on the topic
    reader = KafkaConsumer(
        s.dlq, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )  # fmt: skip
    assert len([r for r in reader if r.value == b"not json"]) >= 3
    reader.close()
    assert set(purged_items(emulator)) >= urls(5, "r")


def test_a_receipts_topic_it_may_not_use_costs_one_warning_and_nothing_else(
    broker, emulator, tmp_path
):
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant_all(receipts=False)
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    log = purge_through(cfg, tmp_path, emulator, s, 30, "n")
    # Said once each, however many receipts were dropped: the writer's and the feed's warning.
    assert log.count("receipts not written") == 1, log[-3000:]
    assert log.count("receipts not read") == 1, log[-3000:]
    # A feed that cannot read holds no assignment up: nothing there to wait for.
    assert "receipts still unread after the wait" not in log
    assert f"topic {s.receipts}: not authorized" in log  # start-up's access check names it


def test_a_budget_topic_refused_mid_run_falls_back_to_partitions_and_purges_on(
    broker, emulator, tmp_path
):
    """Write on the budget topic taken away while the worker is in the split (the other tests
    here refuse it from the start): its reports stop, it says so and shares by partitions, and
    everything produced afterwards is purged. The client's warning about each refused report
    (four a second) is said once, not 121 times in 30 s."""
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant_all()
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    log_path = tmp_path / "worker.log"
    worker = start(cfg, log_path)
    try:
        wait_for(lambda: '"decided_by": "demand"' in log_path.read_text(), 30, what="the split")
        s.revoke(TOPIC, s.budget, WRITE)
        wait_for(lambda: PARTITIONS in log_path.read_text(), 30, what="partitions")
        produce(broker.bootstrap, s.topic, events(30, "x"), key=None, spread=2)
        wait_for(
            lambda: all_committed(broker.bootstrap, s.group, s.topic), 60, what="all committed"
        )
    finally:
        assert stop(worker) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert set(purged_items(emulator)) == urls(30, "x")
    assert log.index('"decided_by": "demand"') < log.index("budget reports not sent")
    assert log.index("budget reports not sent") < log.index(PARTITIONS)
    # Once, then at most once a minute with the count held back (a slow run may pass a minute).
    refused = [
        json.loads(line) for line in log.splitlines() if "Failed to produce messages" in line
    ]
    assert refused and "held_back" not in refused[0], log[-3000:]
    times = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) for r in refused]
    assert all((b - a).total_seconds() >= 60 for a, b in pairwise(times)), times
    assert all(r["held_back"] > 0 for r in refused[1:]), refused


def test_a_missing_budget_topic_it_may_not_create_is_named_and_the_budget_goes_by_partitions(
    broker, emulator, tmp_path
):
    """``check --online`` asks the broker whether the principal may create the topic; ``run``
    leaves that to the exchange, which makes the topic (here: may not) and says so naming the
    ACL; the worker purges on (sharing the budget by partitions)."""
    s = Setup(broker, f"User:{SCRAM_USER}", budget=False)
    s.grant_all()  # Describe on the budget topic's name: a missing topic is told as missing
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    cmd = [sys.executable, "-m", "worker", "check", "-c", cfg, "--online"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert f"topic {s.budget} does not exist" in proc.stdout, proc.stdout + proc.stderr
    assert "this principal may not create it" in proc.stdout
    log = purge_through(cfg, tmp_path, emulator, s, 10, "m")
    unavailable = [line for line in log.splitlines() if "budget exchange unavailable" in line]
    assert unavailable and "may not create it" in unavailable[0], log[-3000:]
    assert "grant Read, Write and Describe" in unavailable[0]


def test_check_online_names_every_acl_the_worker_lacks(broker, emulator, tmp_path):
    s = Setup(broker, f"User:{SCRAM_USER}")
    s.grant(TOPIC, s.topic, READ, DESCRIBE)
    s.grant(TOPIC, s.dlq, DESCRIBE)  # no Write, no Read
    cfg = config(tmp_path, emulator, s, "SASL_SSL", scram(broker))
    cmd = [sys.executable, "-m", "worker", "check", "-c", cfg, "--online"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    text = "\n".join(fails)
    assert f"group {s.group}" in text
    assert f"topic {s.dlq}: not authorized to Write" in text
    assert f"topic {s.budget}: not authorized to Describe" in text
    assert f"topic {s.receipts}: not authorized to Describe" in text
    s.grant_all()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the ACLs allow what the worker does" in proc.stdout
