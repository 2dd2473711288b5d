"""The configuration file's shape: every key, its type, bounds and default, written once.

These models are what YAML is validated against, what ``purge-worker config-schema`` exports as
JSON Schema (and the Helm chart's schema embeds), and, for the sections that need nothing from
the environment, the settings objects the worker runs with. Unknown keys are errors; numbers
must be finite; strings are never silently turned into numbers.

Rules are validated by ``worker.planning.rules`` (their language is richer than a schema), so
here they are only "a list of mappings".
"""

from __future__ import annotations

import ipaddress
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from worker.config.addresses import check_base_url

ZONE_ID_PATTERN = r"^[0-9a-f]{32}$"
DEFAULT_TOKEN_ENV = "CLOUDFLARE_API_TOKEN"  # noqa: S105 (a variable name, not a token)
DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
# Defaults other modules share (decoding, rules): written here once.
MAX_RECORD_BYTES = 1024 * 1024
EVENT_TYPE_FIELD = "type"
MAX_TARGETS_PER_RECORD = 10_000
Port = Annotated[int, Field(ge=1, le=65535)]


def _listed(value: Any) -> Any:
    """One string or a list of strings, as a tuple: a single topic or host needs no list."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    kind = "null" if value is None else type(value).__name__
    if isinstance(value, list | tuple):
        kind = "a list holding " + next(type(v).__name__ for v in value if not isinstance(v, str))
    raise ValueError(f"must be a string or a list of strings, got {kind}")


# Written as a string or a list in the file; a tuple in the settings.
Strings = Annotated[
    tuple[str, ...], BeforeValidator(_listed, json_schema_input_type=list[str] | str)
]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, validate_default=False
    )


# -- kafka ----------------------------------------------------------------------------------------


class KafkaSecurity(Section):
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    # The password is never in the file: this names the environment variable holding it.
    sasl_password_env: str | None = None
    # The CA that signed the brokers' certificates (default: the system's CAs).
    ssl_cafile: str | None = None
    # A client certificate and its key, for brokers that authenticate clients by TLS.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # The environment variable holding the passphrase of an encrypted ssl_keyfile.
    ssl_password_env: str | None = None


class KafkaSection(Section):
    bootstrap_servers: Strings = ("127.0.0.1:9092",)
    topics: Strings = Field(description="required: the topics to consume")
    group_id: str = "purge-worker"
    dead_letter_topic: str = "purge-worker.dead-letter"
    client_id: str = "purge-worker"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: int = Field(default=500, ge=1)
    max_record_bytes: int = Field(default=MAX_RECORD_BYTES, ge=1)
    event_type_field: str = EVENT_TYPE_FIELD
    # Where workers tell each other their demand for each account's budget (worker.sending.shares).
    # Every worker group on the cluster that spends the same Cloudflare account must use the same
    # topic. null: each replica takes its part of the partitions, as if demand were even.
    budget_topic: str | None = Field(default="purge-worker.sending.shares", min_length=1)
    # A receipt (a CloudEvent) per accepted purge request and per dead letter: the purge ledger
    # is restored from it after a restart or a handover, `trace` reads it, a CMS may consume it.
    # null: no receipts.
    receipts_topic: str | None = Field(default="purge-worker.receipts", min_length=1)
    security: KafkaSecurity = KafkaSecurity()


# -- cloudflare -----------------------------------------------------------------------------------


class AccountSection(Section):
    plan: Literal["free", "pro", "business", "enterprise"] = "free"
    token_env: str = DEFAULT_TOKEN_ENV
    email_env: str | None = None
    key_env: str | None = None
    # The plan's figures unless set (see cloudflare.plans).
    files_per_request: int | None = Field(default=None, ge=1)
    items_per_request: int | None = Field(default=None, ge=1)
    urls_per_second: float | None = Field(default=None, gt=0)
    flex_refill_per_second: float | None = Field(default=None, gt=0)
    flex_bucket: int | None = Field(default=None, ge=1)
    flex_cost: Literal["request", "item"] = "request"
    # What every worker group spending this Cloudflare account calls it when sharing the budget
    # (the account id is a good choice). Default: a digest of the credentials, so groups that use
    # the same token find each other and groups with different tokens never do.
    account_id: str | None = Field(default=None, min_length=1, max_length=200)
    # The part of the account's budget this worker group may spend at most, when others spend
    # the rest where the budget topic cannot see them (another Kafka cluster, a CMS plug-in).
    share: float | None = Field(default=None, gt=0, le=1)


class ZoneSection(Section):
    name: str | None = None
    id: str = Field(pattern=ZONE_ID_PATTERN)
    account: str | None = None
    hosts: list[str] = Field(min_length=1)
    url_variants: dict[str, Strings] = {}

    @field_validator("id", mode="before")
    @classmethod
    def _zone_id(cls, value: Any) -> Any:
        import re  # noqa: PLC0415 (only for this message)

        if isinstance(value, str) and not re.match(ZONE_ID_PATTERN, value):
            raise ValueError(f"{value!r} is not a zone id (32 lowercase hex characters)")
        return value


class CloudflareSection(Section):
    base_url: str = DEFAULT_BASE_URL
    accounts: dict[str, AccountSection] = Field(min_length=1)
    zones: list[ZoneSection] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_base_url(value)


# -- coalescing and delivery ---------------------------------------------------------------------


class LedgerSettings(Section):
    """The purge ledger (see ``worker.pending.ledger``)."""

    enabled: bool = True
    margin_seconds: float = Field(default=5.0, ge=0, le=3600)
    max_entries: int = Field(default=100_000, ge=1)
    # When a change happened: the Kafka record's timestamp, or the event's own time field.
    event_time: Literal["record", "event"] = "record"
    # How far back a starting worker reads the receipts topic to restore the ledger.
    restore_seconds: float = Field(default=3600.0, ge=0, le=7 * 24 * 3600)


class CoalesceSettings(Section):
    window_seconds: float = Field(default=2.0, ge=0, le=300)
    max_pending_targets: int = Field(default=50_000, ge=1)
    # A fresh burst's records wait together for their purges to be sent once; past this many,
    # reading pauses and the burst's targets wait out the ledger's margin instead (later, not
    # twice). A waiting record costs ~0.9 KB (the record itself a third of it).
    max_pending_records: int = Field(default=100_000, ge=1)
    ledger: LedgerSettings = LedgerSettings()


class RetryPolicy(Section):
    """Capped, jittered exponential backoff within a time budget (``worker.cloudflare.retry``)."""

    initial_backoff_seconds: float = Field(default=0.5, ge=0.001)
    max_backoff_seconds: float = Field(default=30.0, ge=0.001)
    budget_seconds: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.initial_backoff_seconds > self.max_backoff_seconds:
            raise ValueError(
                f"initial_backoff_seconds ({self.initial_backoff_seconds}) is above "
                f"max_backoff_seconds ({self.max_backoff_seconds})"
            )
        return self

    def backoff(self, attempt: int) -> float:
        """Equal-jitter backoff for the given attempt number (1 = after the first failure): half
        the capped exponential delay, plus a random part of the other half. Unlike full jitter it
        never retries almost at once, which would spend the shared budget on a failing API."""
        ceiling = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not cryptography)


class GuardSettings(Section):
    """Stop when more than ``max_ratio`` of the last ``window_seconds``' records were dead-lettered
    (once at least ``min_records`` were seen in that window); 1.0 disables the guard."""

    max_ratio: float = Field(default=0.5, ge=0, le=1)
    min_records: int = Field(default=100, ge=1)
    window_seconds: float = Field(default=60.0, ge=1)

    @property
    def off(self) -> bool:
        return self.max_ratio >= 1.0


class DeliverySettings(Section):
    concurrency: int = Field(default=4, ge=1, le=64)
    retry: RetryPolicy = RetryPolicy()
    unknown_zone: Literal["dead_letter", "drop"] = "dead_letter"
    no_rule_matched: Literal["skip", "dead_letter"] = "skip"
    allow_everything: bool = False
    # What one record may purge, counted before zone variants: a plug-in or a fan-out gone wrong
    # dead-letters its record in bounded time and memory instead of spending the budget.
    max_targets_per_record: int = Field(default=MAX_TARGETS_PER_RECORD, ge=1, le=1_000_000)
    dry_run: bool = False
    drain_deadline_seconds: float = Field(default=20.0, ge=0)
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    dead_letter_guard: GuardSettings = GuardSettings()
    # Where records are decoded and planned: a second process on another core (a backlog is
    # CPU-bound), or the loop's own; auto picks the process when two CPUs are usable.
    planning: Literal["auto", "process", "inline"] = "auto"


class ObservabilitySettings(Section):
    metrics_port: Port | None = 9464
    health_port: Port | None = 8080
    # Loopback unless told otherwise: a laptop's worker is not a server for its network. In a
    # pod the kubelet and the scrapers come from outside, so the chart sets 0.0.0.0.
    listen_address: str = "127.0.0.1"
    # /readyz answers 503 once Kafka has not been heard from (heartbeat, records, commits) for
    # this long; /healthz stays about the loop being alive.
    ready_kafka_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("listen_address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address (e.g. 127.0.0.1, or 0.0.0.0 for every interface)"
            ) from None
        return value


# -- the file -------------------------------------------------------------------------------------


class WarmingSettings(Section):
    """Fetching purged URLs again through Cloudflare, for rules with ``warm``
    (``worker.outcome.warming``): best effort, paced per zone, never in the way of a purge or a
    commit."""

    enabled: bool = True
    delay_seconds: float = Field(default=2.0, ge=0, le=300)
    concurrency: int = Field(default=4, ge=1, le=64)
    # Per zone: warming is for the site's visitors, never a load test of its origin.
    requests_per_second: float = Field(default=10.0, gt=0, le=10_000)
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # URLs waiting; when full the oldest is dropped (and counted).
    queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    user_agent: str = Field(default="purge-worker cache warmer", min_length=1, max_length=200)
    # Send warm requests to this address with each URL's host in the Host header, instead of to
    # the URL's host (a particular edge or proxy; the emulator in tests). null: the URL itself.
    via: str | None = None

    @field_validator("via")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_base_url(value)


class ConfigFile(Section):
    kafka: KafkaSection
    cloudflare: CloudflareSection
    coalesce: CoalesceSettings = CoalesceSettings()
    delivery: DeliverySettings = DeliverySettings()
    warming: WarmingSettings = WarmingSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    # Validated by worker.planning.rules.ruleset when compiled: a list of rule mappings.
    rules: list[dict[str, Any]] | None = None
    rules_files: Strings = ()

    @model_validator(mode="before")
    @classmethod
    def _ports_zero_is_off(cls, data: Any) -> Any:
        # ``metrics_port: 0`` has always meant "off", like null.
        obs = data.get("observability") if isinstance(data, dict) else None
        if isinstance(obs, dict):
            for key in ("metrics_port", "health_port"):
                if obs.get(key) == 0 and not isinstance(obs.get(key), bool):
                    obs = {**obs, key: None}
            data = {**data, "observability": obs}
        return data
