"""The configuration: YAML read once at start-up, checked against the model (``model.py``), and
built into the frozen objects the worker runs with.

This is the only package that reads the environment. Every error is a ``ConfigError`` naming the
file, the key and the reason. See the README's "Configuration" section for every key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from worker.cloudflare.auth import Credentials, Secret
from worker.cloudflare.tiers import Plan, PlanLimits, limits_for
from worker.config.errors import from_validation_error
from worker.config.model import (
    DEFAULT_TOKEN_ENV,
    AccountSection,
    CoalesceSettings,
    ConfigFile,
    DeliverySettings,
    GuardSettings,
    KafkaSection,
    KafkaSecurity,
    LedgerSettings,
    ObservabilitySettings,
    RetryPolicy,
    WarmingSettings,
    ZoneSection,
    check_base_url,
    strings,
)
from worker.errors import ConfigError, InvalidTarget
from worker.planning.routing import Zone
from worker.planning.rules.ruleset import Rule, RuleSet, compile_rules
from worker.targets import normalize_host

__all__ = [
    "DEFAULT_TOKEN_ENV",
    "AccountConfig",
    "CoalesceSettings",
    "Config",
    "DeliverySettings",
    "GuardSettings",
    "KafkaConfig",
    "LedgerSettings",
    "RetryPolicy",
    "WarmingSettings",
    "load",
    "parse",
]


@dataclass(frozen=True)
class KafkaConfig:
    """The ``kafka`` section with the SASL password read from its environment variable."""

    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...]
    group_id: str
    dead_letter_topic: str
    client_id: str
    auto_offset_reset: str
    max_poll_records: int
    max_record_bytes: int
    event_type_field: str
    budget_topic: str | None
    security: KafkaSecurity
    sasl_password: Secret | None

    def client_options(self) -> dict[str, Any]:
        """Connection options shared by the consumer, the producer and the admin client."""
        sec = self.security
        opts: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": sec.protocol,
        }
        if sec.sasl_mechanism:
            opts["sasl_mechanism"] = sec.sasl_mechanism
            opts["sasl_plain_username"] = sec.sasl_username
            opts["sasl_plain_password"] = (
                self.sasl_password.reveal() if self.sasl_password else None
            )
        if sec.ssl_cafile:
            opts["ssl_cafile"] = sec.ssl_cafile
        if sec.ssl_certfile:
            opts["ssl_certfile"] = sec.ssl_certfile
        if sec.ssl_keyfile:
            opts["ssl_keyfile"] = sec.ssl_keyfile
        return opts


@dataclass(frozen=True)
class AccountConfig:
    name: str
    plan: Plan
    limits: PlanLimits
    credentials: Credentials
    flex_cost_per_item: bool
    # Which environment variable was meant to hold the token, for error messages.
    token_env: str | None
    # What the budget exchange calls this account, and this group's most of its budget.
    budget_key: str = ""
    share: float = 1.0


@dataclass(frozen=True)
class Config:
    source: str
    kafka: KafkaConfig
    base_url: str
    accounts: Mapping[str, AccountConfig]
    zones: tuple[Zone, ...]
    coalesce: CoalesceSettings
    delivery: DeliverySettings
    observability: ObservabilitySettings
    warming: WarmingSettings
    rules: RuleSet

    @property
    def metrics_port(self) -> int | None:
        return self.observability.metrics_port

    @property
    def health_port(self) -> int | None:
        return self.observability.health_port

    @property
    def log_format(self) -> str:
        return self.observability.log_format

    @property
    def log_level(self) -> str:
        return self.observability.log_level

    def missing_credentials(self) -> list[str]:
        """One message per account that has no usable credentials (empty when all are set)."""
        return [
            f"{self.source}: cloudflare.accounts.{a.name}: no API token "
            f"(set the environment variable {a.token_env or DEFAULT_TOKEN_ENV})"
            for a in self.accounts.values()
            if not a.credentials.headers()
        ]

    def secrets(self) -> list[str]:
        """Every secret value, for the redactor."""
        values = [s for a in self.accounts.values() for s in a.credentials.secrets()]
        if self.kafka.sasl_password:
            values.append(self.kafka.sasl_password.reveal())
        return [v for v in values if v]


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ``ConfigError``."""
    env = os.environ if env is None else env
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    return parse(_yaml(text, source), source, env)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: plain YAML keeps the last silently,
    so a setting written twice would quietly not be the one the reader sees first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None


def parse(data: Any, source: str, env: Mapping[str, str]) -> Config:
    """Validate ``data`` (the parsed YAML) and build the config. Raises ``ConfigError``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", f"must be a mapping, got {type(data).__name__}")
    try:
        file = ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, source, ConfigFile) from None
    accounts = {
        name: _account(name, a, env, source) for name, a in file.cloudflare.accounts.items()
    }
    zones = _zones(file.cloudflare.zones, accounts, source)
    rules = _rules(file, source, file.delivery.allow_everything)
    _check_rule_zones(rules.rules, zones, source)
    return Config(
        source=source,
        kafka=_kafka(file.kafka, env, source),
        base_url=_base_url(file.cloudflare.base_url, env, source),
        accounts=accounts,
        zones=zones,
        coalesce=file.coalesce,
        delivery=file.delivery,
        observability=file.observability,
        warming=file.warming,
        rules=rules,
    )


def _base_url(configured: str, env: Mapping[str, str], source: str) -> str:
    override = env.get("CLOUDFLARE_BASE_URL")
    if not override:
        return configured
    try:
        return check_base_url(override)
    except ValueError as exc:
        raise ConfigError(source, "cloudflare.base_url", f"CLOUDFLARE_BASE_URL: {exc}") from None


def _kafka(s: KafkaSection, env: Mapping[str, str], source: str) -> KafkaConfig:
    servers = strings(s.bootstrap_servers)
    if env.get("KAFKA_BOOTSTRAP"):
        servers = tuple(env["KAFKA_BOOTSTRAP"].split(","))
    topics = strings(s.topics)
    if not topics:
        raise ConfigError(source, "kafka.topics", "needs at least one topic")
    if s.dead_letter_topic in topics:
        raise ConfigError(
            source, "kafka.dead_letter_topic", "must not be one of the consumed topics"
        )
    if s.budget_topic is not None and s.budget_topic in (*topics, s.dead_letter_topic):
        raise ConfigError(
            source, "kafka.budget_topic", "must not be a consumed topic or the dead-letter topic"
        )
    password = None
    password_env = s.security.sasl_password_env
    if password_env:
        if not env.get(password_env):
            raise ConfigError(
                source,
                "kafka.security.sasl_password_env",
                f"environment variable {password_env} is not set",
            )
        password = Secret(env[password_env])
    return KafkaConfig(
        bootstrap_servers=servers,
        topics=topics,
        group_id=s.group_id,
        dead_letter_topic=s.dead_letter_topic,
        client_id=s.client_id,
        auto_offset_reset=s.auto_offset_reset,
        max_poll_records=s.max_poll_records,
        max_record_bytes=s.max_record_bytes,
        event_type_field=s.event_type_field,
        budget_topic=s.budget_topic,
        security=s.security,
        sasl_password=password,
    )


def _account(name: str, a: AccountSection, env: Mapping[str, str], source: str) -> AccountConfig:
    plan = Plan(a.plan)
    base = limits_for(plan)
    overrides = {
        "urls_per_request": a.files_per_request,
        "flex_items_per_request": a.items_per_request,
        "urls_per_second": a.urls_per_second,
        "flex_refill_per_second": a.flex_refill_per_second,
        "flex_bucket": a.flex_bucket,
    }
    limits = base.with_overrides(**{k: v for k, v in overrides.items() if v is not None})
    token = env.get(a.token_env) if a.token_env else None
    creds = Credentials(token=Secret(token) if token else None)
    email, key = (env.get(a.email_env or ""), env.get(a.key_env or ""))
    if not token and email and key:
        creds = Credentials(email=email, key=Secret(key))
    return AccountConfig(
        name,
        plan,
        limits,
        creds,
        a.flex_cost == "item",
        a.token_env,
        budget_key=a.account_id or _credentials_key(creds, name),
        share=a.share or 1.0,
    )


def _credentials_key(creds: Credentials, name: str) -> str:
    """A name for the account that every group using the same credentials derives alike. A
    salted, truncated digest: it tells nobody anything about the token."""
    material = "\0".join(["purge-worker budget", *(creds.secrets() or [f"unset:{name}"])])
    return "credentials-" + hashlib.sha256(material.encode()).hexdigest()[:16]


def _zones(
    raw: list[ZoneSection], accounts: Mapping[str, AccountConfig], source: str
) -> tuple[Zone, ...]:
    zones: list[Zone] = []
    seen_hosts: dict[str, str] = {}
    for i, z in enumerate(raw):
        where = f"cloudflare.zones[{i}]"
        for host in z.hosts:
            bare = host[2:] if host.startswith("*.") else host
            try:
                normalize_host(bare)
            except InvalidTarget as exc:
                raise ConfigError(source, f"{where}.hosts", str(exc)) from None
            if host.lower() in seen_hosts:
                raise ConfigError(
                    source,
                    f"{where}.hosts",
                    f"{host} is already in zone {seen_hosts[host.lower()]}",
                )
            seen_hosts[host.lower()] = z.id
        account = z.account or (next(iter(accounts)) if len(accounts) == 1 else "")
        if account not in accounts:
            raise ConfigError(
                source,
                f"{where}.account",
                f"{account!r} is not one of the accounts ({', '.join(accounts)})",
            )
        name = z.name or z.hosts[0].removeprefix("*.")
        variants = tuple((h, strings(v)) for h, v in z.url_variants.items())
        zones.append(Zone(name, z.id, account, tuple(h.lower() for h in z.hosts), variants))
    return tuple(zones)


def _rules(file: ConfigFile, source: str, allow_everything: bool) -> RuleSet:
    """Rules inline under ``rules``, and/or in YAML files listed under ``rules_files`` (each a
    list of rules; relative paths are relative to the config file). Names are unique across all."""
    base = Path(source).resolve().parent if Path(source).exists() else None
    names: set[str] = set()
    rules: list[Rule] = []
    files = strings(file.rules_files)
    if file.rules is not None or not files:
        rules += compile_rules(
            file.rules or [],
            source,
            allow_everything=allow_everything,
            plugin_path=str(base) if base else None,
            taken=names,
            max_targets=file.delivery.max_targets_per_record,
        )
    for name in files:
        path = Path(name) if Path(name).is_absolute() or base is None else base / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                source, "rules_files", f"cannot read {path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(str(path), "", f"not UTF-8 text (byte {exc.start})") from None
        raw = _yaml(text, str(path))
        rules += compile_rules(
            raw if raw is not None else [],
            str(path),
            allow_everything=allow_everything,
            plugin_path=str(path.parent),
            taken=names,
            max_targets=file.delivery.max_targets_per_record,
        )
    return RuleSet(rules, file.delivery.max_targets_per_record)


def _check_rule_zones(rules: list[Rule], zones: tuple[Zone, ...], source: str) -> None:
    names = {z.name.lower() for z in zones} | {z.id for z in zones}
    names |= {h for z in zones for h in z.hosts}
    for rule in rules:
        if rule.zone and rule.zone.lower() not in names:
            raise ConfigError(
                source, f"rules[{rule.name}].zone", f"{rule.zone!r} is not a configured zone"
            )
        # Tags and "everything" carry no host, so with several zones the rule must name one.
        if not rule.zone and len(zones) > 1 and rule.needs_zone:
            raise ConfigError(
                source,
                f"rules[{rule.name}].zone",
                f"the rule emits tags or everything, which name no host; with {len(zones)} zones "
                "configured, set the rule's zone",
            )
