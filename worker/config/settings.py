"""The settings the worker runs with: the file's sections as validated, plus what comes from the
environment (secrets, overrides) and what start-up compiles (accounts, zones, rules).

Every part of the worker takes the section it needs, never the whole ``Config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ConfigDict, Field

from worker.cloudflare.auth import Credentials, Secret
from worker.cloudflare.tiers import PlanLimits, Tier
from worker.config.model import (
    DEFAULT_TOKEN_ENV,
    CoalesceSettings,
    DeliverySettings,
    KafkaSection,
    ObservabilitySettings,
    WarmingSettings,
)
from worker.planning.planner import PlanningSettings
from worker.planning.routing import Zone
from worker.planning.rules.ruleset import RuleSet


class KafkaSettings(KafkaSection):
    """The ``kafka`` section as the worker uses it: the file's keys (``bootstrap_servers`` from
    ``KAFKA_BOOTSTRAP`` when that is set) and the passwords read from their environment
    variables, which never appear in a repr or a dump."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    sasl_password: Secret | None = Field(default=None, exclude=True, repr=False)
    ssl_password: Secret | None = Field(default=None, exclude=True, repr=False)


@dataclass(frozen=True)
class AccountConfig:
    name: str
    tier: Tier
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
    kafka: KafkaSettings
    base_url: str
    accounts: Mapping[str, AccountConfig]
    zones: tuple[Zone, ...]
    coalesce: CoalesceSettings
    delivery: DeliverySettings
    observability: ObservabilitySettings
    warming: WarmingSettings
    rules: RuleSet

    @property
    def planning(self) -> PlanningSettings:
        """What the planner needs: rules, zones, how records are read and what policy says."""
        return PlanningSettings(
            rules=self.rules,
            zones=self.zones,
            max_record_bytes=self.kafka.max_record_bytes,
            event_type_field=self.kafka.event_type_field,
            unknown_zone=self.delivery.unknown_zone,
            no_rule_matched=self.delivery.no_rule_matched,
            use_event_time=self.coalesce.ledger.event_time == "event",
        )

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
        values += [p.reveal() for p in (self.kafka.sasl_password, self.kafka.ssl_password) if p]
        return [v for v in values if v]
