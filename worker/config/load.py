"""Reading the config file: YAML read once at start-up, checked against the model
(``model.py``), and built into the settings the worker runs with (``settings.py``).

The only module that reads the environment. Every error is a ``ConfigError`` naming the file,
the key and the reason. See the README's "Configuration" section for every key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from worker.cloudflare.auth import Credentials, Secret
from worker.cloudflare.tiers import Tier, limits_for
from worker.config import kafka
from worker.config.addresses import check_base_url
from worker.config.bounds import MAX_FILE_BYTES, bounded
from worker.config.errors import from_validation_error
from worker.config.model import (
    AccountSection,
    ConfigFile,
    ZoneSection,
)
from worker.config.settings import AccountConfig, Config
from worker.errors import ConfigError, InvalidTarget
from worker.planning.routing import Zone
from worker.planning.rules.ruleset import Rule, RuleSet, compile_rules
from worker.targets import normalize_host


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ``ConfigError``."""
    env = os.environ if env is None else env
    source = str(path)
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(source, "", f"larger than {MAX_FILE_BYTES // 2**20} MiB: not a config")
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
    except RecursionError:
        raise ConfigError(source, "", "not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None


def parse(data: Any, source: str, env: Mapping[str, str]) -> Config:
    """Validate ``data`` (the parsed YAML) and build the config. Raises ``ConfigError``."""
    bounded(data, source)
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
        kafka=kafka.build(file.kafka, env, source),
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


def _account(name: str, a: AccountSection, env: Mapping[str, str], source: str) -> AccountConfig:
    tier = Tier(a.plan)
    base = limits_for(tier)
    overrides = {
        "urls_per_request": a.files_per_request,
        "flex_items_per_request": a.items_per_request,
        "urls_per_second": a.urls_per_second,
        "flex_refill_per_second": a.flex_refill_per_second,
        "flex_bucket": a.flex_bucket,
    }
    limits = base.with_overrides(**{k: v for k, v in overrides.items() if v is not None})
    where = f"cloudflare.accounts.{name}"
    token = env.get(a.token_env) if a.token_env else None
    _header_safe(token, a.token_env, f"{where}.token_env", source)
    creds = Credentials(token=Secret(token) if token else None)
    email, key = (env.get(a.email_env or ""), env.get(a.key_env or ""))
    _header_safe(email, a.email_env, f"{where}.email_env", source)
    _header_safe(key, a.key_env, f"{where}.key_env", source)
    if not token and email and key:
        creds = Credentials(email=email, key=Secret(key))
    return AccountConfig(
        name,
        tier,
        limits,
        creds,
        a.flex_cost == "item",
        a.token_env,
        budget_key=a.account_id or _credentials_key(creds, name),
        share=a.share or 1.0,
    )


def _header_safe(value: str | None, variable: str | None, key: str, source: str) -> None:
    """A credential goes into an HTTP header as it is: white space around it (a newline from
    ``echo``, a pasted secret) or a character outside printable ASCII would fail every request,
    or fail to send at all. Named by position, never quoted: it is a secret."""
    if not value:
        return
    if value != value.strip():
        raise ConfigError(
            source, key, f"the value of {variable} has white space before or after it: remove it"
        )
    bad = next((i for i, c in enumerate(value) if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        raise ConfigError(
            source,
            key,
            f"the value of {variable} has a character that is not printable ASCII at position "
            f"{bad + 1} of {len(value)}; Cloudflare credentials are ASCII",
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
        variants = tuple(z.url_variants.items())
        zones.append(Zone(name, z.id, account, tuple(h.lower() for h in z.hosts), variants))
    return tuple(zones)


def _rules(file: ConfigFile, source: str, allow_everything: bool) -> RuleSet:
    """Rules inline under ``rules``, and/or in YAML files listed under ``rules_files`` (each a
    list of rules; relative paths are relative to the config file). Names are unique across all."""
    base = Path(source).resolve().parent if Path(source).exists() else None
    names: set[str] = set()
    rules: list[Rule] = []
    files = file.rules_files
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
        if len(text) > MAX_FILE_BYTES:
            raise ConfigError(str(path), "", f"larger than {MAX_FILE_BYTES // 2**20} MiB")
        raw = _yaml(text, str(path))
        bounded(raw, str(path))
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
