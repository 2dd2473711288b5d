"""The config model: defaults written once, and every error names the file, the key and why."""

import copy
import math

import pytest

from tests.conftest import TOKEN
from tests.helpers import config_dict
from worker.config.load import load, parse
from worker.config.model import CoalesceSettings, DeliverySettings, LedgerSettings
from worker.config.schema import config_schema, section_schema
from worker.errors import ConfigError, RetryableError
from worker.kafka import client
from worker.kafka.client import KafkaError, connecting, options

ENV = {"CLOUDFLARE_API_TOKEN": TOKEN}
BASE = config_dict("http://127.0.0.1:1/client/v4")


def with_(path: str, value):
    """BASE with ``value`` at a dotted ``path`` (created as needed)."""
    data = copy.deepcopy(BASE)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {}) if not p.isdigit() else node[int(p)]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def error(data) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse(data, "site.yaml", ENV)
    return err.value


def test_defaults_come_from_the_model():
    data = with_("coalesce", {})
    data["delivery"] = {}
    config = parse(data, "site.yaml", ENV)
    assert config.coalesce == CoalesceSettings()
    assert config.coalesce.ledger == LedgerSettings()
    assert config.delivery.retry.budget_seconds == DeliverySettings().retry.budget_seconds
    assert config.kafka.max_poll_records == 500 and config.kafka.auto_offset_reset == "earliest"
    schema = section_schema("coalesce")
    assert schema["properties"]["window_seconds"]["default"] == CoalesceSettings().window_seconds


BAD = [
    ("kafka.bootstrap", "x", "kafka.bootstrap", "unknown key (did you mean 'bootstrap_servers'?)"),
    ("coalesce.zzz", 1, "coalesce.zzz", "unknown key; known keys: ledger, max_pending_records"),
    ("kafka.auto_offset_reset", "middle", "kafka.auto_offset_reset", "must be one of earliest"),
    ("coalesce.window_seconds", -1, "coalesce.window_seconds", "must be at least 0, got -1"),
    ("coalesce.window_seconds", 301, "coalesce.window_seconds", "must be at most 300, got 301"),
    ("delivery.retry.budget_seconds", math.nan, "delivery.retry.budget_seconds", "finite"),
    ("delivery.retry.budget_seconds", math.inf, "delivery.retry.budget_seconds", "finite"),
    ("cloudflare.accounts.main.urls_per_second", math.nan, "urls_per_second", "finite"),
    ("kafka.max_poll_records", "500", "kafka.max_poll_records", "must be an integer, got str"),
    ("kafka.max_poll_records", True, "kafka.max_poll_records", "must be an integer, got bool"),
    ("delivery.dry_run", "yes", "delivery.dry_run", "must be true or false, got str"),
    ("kafka.topics", [1], "kafka.topics", "must be a string or a list of strings"),
    ("kafka.topics", [], "kafka.topics", "needs at least one topic"),
    ("cloudflare.zones.0.id", "NOT-A-ZONE", "cloudflare.zones[0].id", "is not a zone id"),
    ("cloudflare.zones.0.hosts", [], "cloudflare.zones[0].hosts", "at least 1"),
    ("cloudflare.zones.0.hosts", ["a b"], "cloudflare.zones[0].hosts", "not a valid host"),
    ("cloudflare.zones.1.hosts", ["example.com"], "zones[1].hosts", "already in zone"),
    ("cloudflare.zones.0.account", "other", "zones[0].account", "is not one of the accounts"),
    ("cloudflare.accounts", {}, "cloudflare.accounts", "must have at least 1 entries"),
    ("cloudflare.accounts.main.plan", "gold", "accounts.main.plan", "must be one of free"),
    (
        "delivery.retry",
        {"initial_backoff_seconds": 60, "max_backoff_seconds": 30},
        "delivery.retry",
        "initial_backoff_seconds (60.0) is above max_backoff_seconds (30.0)",
    ),
    ("kafka.dead_letter_topic", "cms", "kafka.dead_letter_topic", "must not be one of"),
    ("kafka.budget_topic", "cms", "kafka.budget_topic", "must not be a consumed topic"),
    ("kafka.budget_topic", "", "kafka.budget_topic", "at least 1"),
    ("cloudflare.accounts.main.share", 0, "accounts.main.share", "must be more than 0"),
    ("cloudflare.accounts.main.share", 1.5, "accounts.main.share", "at most 1"),
    ("observability.metrics_port", 70000, "observability.metrics_port", "at most 65535"),
    ("observability.health_port", "8080", "observability.health_port", "must be an integer"),
    ("kafka", "cms", "kafka", "must be a mapping, got str"),
    ("delivery.unknown_zone", "ignore", "delivery.unknown_zone", "must be one of dead_letter"),
]


@pytest.mark.parametrize(
    ("path", "value", "key", "reason"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD]
)
def test_every_mistake_names_file_key_and_reason(path, value, key, reason):
    err = error(with_(path, value))
    text = str(err)
    assert text.startswith("site.yaml: ") and key in err.key and reason in text, text
    assert "\n" not in text


def test_missing_required_keys():
    data = copy.deepcopy(BASE)
    del data["kafka"]["topics"]
    assert str(error(data)) == "site.yaml: kafka.topics: is required"
    data = copy.deepcopy(BASE)
    del data["cloudflare"]
    assert str(error(data)) == "site.yaml: cloudflare: is required"


def test_sasl_password_must_be_in_the_environment():
    data = with_(
        "kafka.security",
        {
            "protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "u",
            "sasl_password_env": "KPW",
        },
    )
    assert "environment variable KPW is not set" in str(error(data))
    config = parse(data, "site.yaml", {**ENV, "KPW": "hunter2-secret"})
    assert options(config.kafka)["sasl_plain_password"] == "hunter2-secret"
    assert "hunter2-secret" in config.secrets()


def test_clients_made_after_one_reached_a_cluster_are_told_its_version(monkeypatch):
    monkeypatch.setattr(client, "_VERSIONS", {})
    config = parse(BASE, "s", ENV).kafka
    other = parse(with_("kafka.bootstrap_servers", ["elsewhere:9092"]), "s", ENV).kafka
    assert "api_version" not in options(config)  # the first client probes

    class Refused:
        def __init__(self) -> None:
            raise KafkaError("no broker")

    with pytest.raises(RetryableError):
        connecting(Refused, config, "connecting")
    assert "api_version" not in options(config)  # nothing learned from a failure

    class Connected:
        def __init__(self) -> None:
            self.config = {"api_version": (4, 1)}

    connecting(Connected, config, "connecting")
    assert options(config)["api_version"] == (4, 1)
    assert "api_version" not in options(other)  # another cluster is probed


def test_port_zero_or_null_turns_a_listener_off():
    config = parse(with_("observability", {"metrics_port": 0, "health_port": None}), "s", ENV)
    assert config.observability.metrics_port is None
    assert config.observability.health_port is None


def test_file_level_errors(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"kafka: {topics: [caf\xe9]}\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8"):
        load(bad, ENV)
    with pytest.raises(ConfigError, match=r"top level\): must be a mapping"):
        parse(["a"], "s.yaml", ENV)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.yaml", ENV)


def test_the_schema_is_self_contained_and_closed():
    schema = config_schema()
    text = str(schema)
    assert "$ref" not in text and "$defs" not in text
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"kafka", "cloudflare"}
    assert section_schema("delivery")["properties"]["retry"]["additionalProperties"] is False


def test_groups_sharing_a_token_find_each_other_without_publishing_it():
    def key(data, token):
        return parse(data, "site.yaml", {"CLOUDFLARE_API_TOKEN": token}).accounts["main"]

    same = key(BASE, "tok-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").budget_key
    assert same == key(BASE, "tok-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").budget_key
    assert same != key(BASE, "tok-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").budget_key
    assert "aaaa" not in same
    named = with_("cloudflare.accounts.main", {"plan": "pro", "account_id": "acc-1", "share": 0.5})
    account = key(named, TOKEN)
    assert (account.budget_key, account.share) == ("acc-1", 0.5)
    assert parse(BASE, "site.yaml", {"CLOUDFLARE_API_TOKEN": TOKEN}).kafka.budget_topic == (
        "purge-worker.sending.shares"
    )
