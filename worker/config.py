"""The configuration: YAML read once at start-up into frozen, typed objects.

This is the only module that reads the environment. Every error is a ``ConfigError`` naming the
file, the key and the reason. See the README's "Configuration" section for every key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worker.cloudflare.auth import Credentials, Secret
from worker.cloudflare.client import DEFAULT_BASE_URL
from worker.cloudflare.plans import Plan, PlanLimits, limits_for
from worker.cloudflare.retry import RetryPolicy
from worker.errors import ConfigError, InvalidTarget
from worker.events import DEFAULT_MAX_BYTES
from worker.ledger import LedgerSettings
from worker.routing import Zone
from worker.rules import RuleSet, compile_rules
from worker.schema import Section
from worker.targets import normalize_host

ZONE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_TOKEN_ENV = "CLOUDFLARE_API_TOKEN"  # noqa: S105 (a variable name, not a token)


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...]
    group_id: str
    dead_letter_topic: str
    client_id: str = "purge-worker"
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 500
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    max_record_bytes: int = DEFAULT_MAX_BYTES
    event_type_field: str = "type"

    def client_options(self) -> dict[str, Any]:
        """Connection options shared by the consumer, the producer and the admin client."""
        opts: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = (
                self.sasl_password.reveal() if self.sasl_password else None
            )
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
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


@dataclass(frozen=True)
class CoalesceConfig:
    window_seconds: float = 2.0
    max_pending_targets: int = 50_000
    max_pending_records: int = 20_000
    ledger: LedgerSettings = field(default_factory=LedgerSettings)


@dataclass(frozen=True)
class GuardConfig:
    """Stop when more than ``max_ratio`` of the last ``window_seconds``' records were dead-lettered
    (once at least ``min_records`` were seen in that window); 1.0 disables the guard."""

    max_ratio: float = 0.5
    min_records: int = 100
    window_seconds: float = 60.0


@dataclass(frozen=True)
class DeliveryConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 4
    unknown_zone: str = "dead_letter"  # or "drop"
    no_rule_matched: str = "skip"  # or "dead_letter"
    dry_run: bool = False
    allow_everything: bool = False
    drain_deadline_seconds: float = 20.0
    commit_interval_seconds: float = 1.0
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass(frozen=True)
class Config:
    source: str
    kafka: KafkaConfig
    base_url: str
    accounts: Mapping[str, AccountConfig]
    zones: tuple[Zone, ...]
    coalesce: CoalesceConfig
    delivery: DeliveryConfig
    rules: RuleSet
    metrics_port: int | None = 9464
    health_port: int | None = 8080
    log_format: str = "auto"
    log_level: str = "info"

    def missing_credentials(self) -> list[str]:
        """One message per account that has no usable credentials (empty when all are set)."""
        return [
            f"{self.source}: cloudflare.accounts.{a.name}: no API token "
            f"(set the environment variable {a.token_env or DEFAULT_TOKEN_ENV})"
            for a in self.accounts.values()
            if not a.credentials.headers()
        ]

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    return parse(data, source, env)


def parse(data: Any, source: str, env: Mapping[str, str]) -> Config:
    top = Section(data, "", source)
    kafka = _kafka(top.section("kafka"), env)
    cf = top.section("cloudflare")
    base_url = cf.get("base_url", str, DEFAULT_BASE_URL)
    base_url = env.get("CLOUDFLARE_BASE_URL") or base_url
    accounts = _accounts(cf.section("accounts"), env)
    zones = _zones(cf, accounts)
    cf.done()
    coalesce = _coalesce(top.section("coalesce"))
    delivery = _delivery(top.section("delivery"))
    rules = _rules(top, source, delivery.allow_everything)
    obs = top.section("observability")
    metrics_port = _port(obs, "metrics_port", 9464)
    health_port = _port(obs, "health_port", 8080)
    log_format = obs.choice("log_format", ("auto", "json", "console"), "auto")
    log_level = obs.choice("log_level", ("debug", "info", "warning", "error"), "info")
    obs.done()
    top.done()
    _check_rule_zones(rules, zones, source)
    return Config(
        source,
        kafka,
        base_url,
        accounts,
        zones,
        coalesce,
        delivery,
        rules,
        metrics_port,
        health_port,
        log_format,
        log_level,
    )


def _rules(top: Section, source: str, allow_everything: bool) -> RuleSet:
    """Rules inline under ``rules``, and/or in YAML files listed under ``rules_files`` (each a
    list of rules; relative paths are relative to the config file). Names are unique across all."""
    base = Path(source).resolve().parent if Path(source).exists() else None
    plugin_path = str(base) if base else None
    sets = []
    if top.has("rules") or not top.has("rules_files"):
        sets.append(
            compile_rules(
                top.raw("rules"), source, allow_everything=allow_everything, plugin_path=plugin_path
            )
        )
    for name in top.strings("rules_files", ()):
        path = Path(name) if Path(name).is_absolute() or base is None else base / name
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                source, "rules_files", f"cannot read {path}: {exc.strerror}"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), "", f"not valid YAML: {exc}") from None
        sets.append(
            compile_rules(
                raw if raw is not None else [],
                str(path),
                allow_everything=allow_everything,
                plugin_path=str(path.parent),
            )
        )
    rules = [r for s in sets for r in s.rules]
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(
                source, f"rules[{rule.name}]", "duplicate rule name across rule files"
            )
        seen.add(rule.name)
    return RuleSet(rules)


def _kafka(s: Section, env: Mapping[str, str]) -> KafkaConfig:
    servers = s.strings("bootstrap_servers", ("127.0.0.1:9092",))
    if env.get("KAFKA_BOOTSTRAP"):
        servers = tuple(env["KAFKA_BOOTSTRAP"].split(","))
    topics = s.strings("topics")
    if not topics:
        raise s.error("topics", "needs at least one topic")
    sec = s.section("security")
    protocol = sec.choice(
        "protocol", ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), "PLAINTEXT"
    )
    mechanism = sec.get("sasl_mechanism", str, None)
    password_env = sec.get("sasl_password_env", str, None)
    password = None
    if password_env:
        if not env.get(password_env):
            raise sec.error("sasl_password_env", f"environment variable {password_env} is not set")
        password = Secret(env[password_env])
    cfg = KafkaConfig(
        bootstrap_servers=servers,
        topics=topics,
        group_id=s.get("group_id", str, "purge-worker"),
        dead_letter_topic=s.get("dead_letter_topic", str, "purge-worker.dead-letter"),
        client_id=s.get("client_id", str, "purge-worker"),
        auto_offset_reset=s.choice("auto_offset_reset", ("earliest", "latest"), "earliest"),
        max_poll_records=s.integer("max_poll_records", 500, minimum=1),
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=sec.get("sasl_username", str, None),
        sasl_password=password,
        ssl_cafile=sec.get("ssl_cafile", str, None),
        max_record_bytes=s.integer("max_record_bytes", DEFAULT_MAX_BYTES, minimum=1),
        event_type_field=s.get("event_type_field", str, "type"),
    )
    sec.done()
    if cfg.dead_letter_topic in cfg.topics:
        raise s.error("dead_letter_topic", "must not be one of the consumed topics")
    s.done()
    return cfg


def _accounts(s: Section, env: Mapping[str, str]) -> dict[str, AccountConfig]:
    if not s.data:
        raise ConfigError(s.source, s.path, "needs at least one account")
    out = {}
    for name in list(s.data):
        a = s.section(name)
        plan = Plan(a.choice("plan", tuple(p.value for p in Plan), "free"))
        base = limits_for(plan)
        limits = base.with_overrides(
            urls_per_request=a.integer("files_per_request", base.urls_per_request, minimum=1),
            flex_items_per_request=a.integer(
                "items_per_request", base.flex_items_per_request, minimum=1
            ),
            urls_per_second=a.number("urls_per_second", base.urls_per_second, minimum=0.001),
            flex_refill_per_second=a.number(
                "flex_refill_per_second", base.flex_refill_per_second, minimum=0.0001
            ),
            flex_bucket=a.integer("flex_bucket", base.flex_bucket, minimum=1),
        )
        token_env = a.get("token_env", str, DEFAULT_TOKEN_ENV)
        email_env = a.get("email_env", str, None)
        key_env = a.get("key_env", str, None)
        token = env.get(token_env) if token_env else None
        creds = Credentials(token=Secret(token) if token else None)
        if not token and email_env and key_env and env.get(email_env) and env.get(key_env):
            creds = Credentials(email=env[email_env], key=Secret(env[key_env]))
        flex_cost = a.choice("flex_cost", ("request", "item"), "request")
        a.done()
        out[name] = AccountConfig(name, plan, limits, creds, flex_cost == "item", token_env)
    s.done()
    return out


def _zones(cf: Section, accounts: Mapping[str, AccountConfig]) -> tuple[Zone, ...]:
    raw = cf.raw("zones")
    if not isinstance(raw, list) or not raw:
        raise cf.error("zones", "must be a non-empty list of zones")
    zones: list[Zone] = []
    seen_hosts: dict[str, str] = {}
    for i, item in enumerate(raw):
        z = Section(item, f"cloudflare.zones[{i}]", cf.source)
        zone_id = z.get("id", str)
        if not ZONE_ID_RE.match(zone_id):
            raise z.error("id", f"{zone_id!r} is not a zone id (32 lowercase hex characters)")
        hosts = z.strings("hosts")
        for host in hosts:
            bare = host[2:] if host.startswith("*.") else host
            try:
                normalize_host(bare)
            except InvalidTarget as exc:
                raise z.error("hosts", str(exc)) from None
            if host.lower() in seen_hosts:
                raise z.error("hosts", f"{host} is already in zone {seen_hosts[host.lower()]}")
            seen_hosts[host.lower()] = zone_id
        name = z.get("name", str, hosts[0].removeprefix("*.") if hosts else zone_id)
        account = z.get("account", str, next(iter(accounts)) if len(accounts) == 1 else "")
        if account not in accounts:
            raise z.error(
                "account", f"{account!r} is not one of the accounts ({', '.join(accounts)})"
            )
        variants_sec = z.section("url_variants")
        variants = tuple((h, variants_sec.strings(h)) for h in list(variants_sec.data))
        variants_sec.done()
        z.done()
        zones.append(Zone(name, zone_id, account, tuple(h.lower() for h in hosts), variants))
    return tuple(zones)


def _coalesce(s: Section) -> CoalesceConfig:
    d = LedgerSettings()
    led = s.section("ledger")
    ledger = LedgerSettings(
        enabled=led.get("enabled", bool, d.enabled),
        margin_seconds=led.number("margin_seconds", d.margin_seconds, maximum=3600),
        max_entries=led.integer("max_entries", d.max_entries, minimum=1),
        event_time=led.choice("event_time", ("record", "event"), d.event_time),
    )
    led.done()
    cfg = CoalesceConfig(
        window_seconds=s.number("window_seconds", 2.0, maximum=300),
        max_pending_targets=s.integer("max_pending_targets", 50_000, minimum=1),
        max_pending_records=s.integer("max_pending_records", 20_000, minimum=1),
        ledger=ledger,
    )
    s.done()
    return cfg


def _delivery(s: Section) -> DeliveryConfig:
    r = s.section("retry")
    retry = RetryPolicy(
        initial_backoff=r.number("initial_backoff_seconds", 0.5, minimum=0.001),
        max_backoff=r.number("max_backoff_seconds", 30.0, minimum=0.001),
        budget_seconds=r.number("budget_seconds", 600.0),
    )
    r.done()
    g = s.section("dead_letter_guard")
    guard = GuardConfig(
        max_ratio=g.number("max_ratio", 0.5, maximum=1.0),
        min_records=g.integer("min_records", 100, minimum=1),
        window_seconds=g.number("window_seconds", 60.0, minimum=1),
    )
    g.done()
    cfg = DeliveryConfig(
        retry=retry,
        concurrency=s.integer("concurrency", 4, minimum=1),
        unknown_zone=s.choice("unknown_zone", ("dead_letter", "drop"), "dead_letter"),
        no_rule_matched=s.choice("no_rule_matched", ("skip", "dead_letter"), "skip"),
        dry_run=s.get("dry_run", bool, False),
        allow_everything=s.get("allow_everything", bool, False),
        drain_deadline_seconds=s.number("drain_deadline_seconds", 20.0),
        commit_interval_seconds=s.number("commit_interval_seconds", 1.0),
        guard=guard,
    )
    s.done()
    return cfg


def _port(s: Section, key: str, default: int) -> int | None:
    value = s.raw(key, default)
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise s.error(key, f"must be a TCP port (1..65535) or null, got {value!r}")
    return value


def _check_rule_zones(rules: RuleSet, zones: tuple[Zone, ...], source: str) -> None:
    names = {z.name.lower() for z in zones} | {z.id for z in zones}
    names |= {h for z in zones for h in z.hosts}
    for rule in rules.rules:
        zone = getattr(rule, "zone", None)
        if zone and zone.lower() not in names:
            raise ConfigError(
                source, f"rules[{rule.name}].zone", f"{zone!r} is not a configured zone"
            )
        # Tags and "everything" carry no host, so with several zones the rule must name one.
        if not zone and len(zones) > 1 and getattr(rule, "needs_zone", False):
            raise ConfigError(
                source,
                f"rules[{rule.name}].zone",
                f"the rule emits tags or everything, which name no host; with {len(zones)} zones "
                "configured, set the rule's zone",
            )
