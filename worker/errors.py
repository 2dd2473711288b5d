"""One exception root for purge-worker; retryable versus permanent is a type, not a string.

    PurgeWorkerError
    ├── ConfigError              bad config or rules: stops start-up (exit 2); names file and key
    ├── UsageError               bad command-line input (exit 2)
    ├── RetryableError           worth trying again later
    │   ├── TransportError       connection refused, reset, timed out
    │   └── ApiUnavailable       408, 409, 429 (RateLimited), 5xx
    │       └── RateLimited      429; carries Retry-After
    ├── PermanentError           retrying cannot help; the record goes to the dead-letter topic
    │   ├── InvalidEvent         undecodable record or an event the rules cannot use
    │   ├── NoRuleMatched        no rule fired (dead-lettered only when configured)
    │   ├── InvalidTarget        a URL, tag, host or prefix the API would refuse
    │   ├── UnknownZone          a target for a host in no configured zone
    │   ├── ApiRejected          other 4xx, with Cloudflare's error codes
    │   └── RetriesExhausted     the retry budget ran out
    ├── AccessError              Kafka refused us (credentials, TLS, an ACL): an operator must act
    ├── DeadLetterGuardTripped   too many records dead-lettered: stop rather than drain the topic
    └── Abandoned                work given up at shutdown; its records are redelivered

``error_class`` on permanent errors is the dead-letter ``purge.error.class`` header value.
"""

from __future__ import annotations

from dataclasses import dataclass


class PurgeWorkerError(Exception):
    """Root of every error purge-worker raises on purpose."""


class ConfigError(PurgeWorkerError):
    """The configuration or the rules are invalid. The message names the file and key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class UsageError(PurgeWorkerError):
    """A command-line argument or input file is wrong."""


@dataclass(frozen=True)
class ApiErrorDetail:
    """One entry of the API envelope's ``errors`` list."""

    code: int
    message: str


class RetryableError(PurgeWorkerError):
    """A failure that may succeed if tried again later."""


class TransportError(RetryableError):
    """The request did not get an HTTP answer (connection error or timeout)."""


class ApiUnavailable(RetryableError):
    """The API answered with a retryable status (408, 409, 429, 5xx)."""

    def __init__(
        self, status: int, errors: tuple[ApiErrorDetail, ...] = (), message: str = ""
    ) -> None:
        self.status = status
        self.errors = errors
        text = message or "; ".join(f"{e.code}: {e.message}" for e in errors) or "no detail"
        super().__init__(f"HTTP {status}: {text}")

    @property
    def code(self) -> int | None:
        return self.errors[0].code if self.errors else None


class RateLimited(ApiUnavailable):
    """429 from the API. ``retry_after`` is the server's Retry-After in seconds, if it sent one."""

    def __init__(
        self, errors: tuple[ApiErrorDetail, ...] = (), retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(429, errors)


class PermanentError(PurgeWorkerError):
    """A failure that retrying cannot fix. ``error_class`` names it on the dead-letter topic."""

    error_class = "permanent"
    code: int | None = None


class InvalidEvent(PermanentError):
    error_class = "invalid_event"


class NoRuleMatched(PermanentError):
    error_class = "no_rule_matched"


class InvalidTarget(PermanentError):
    error_class = "invalid_target"


class UnknownZone(PermanentError):
    error_class = "unknown_zone"


# Cloudflare's codes by what they are about (see cloudflare-api.md in the README's sources).
AUTH_CODES = frozenset({6003, 6103, 6111, 9109, 10000})
BODY_CODES = frozenset({1014, 1092, 6007})
ZONE_CODES = frozenset({7000, 7003})


class ApiRejected(PermanentError):
    """The API refused the request (a 4xx other than 408/409/429)."""

    error_class = "api_rejected"

    @property
    def scope(self) -> str:
        """What the rejection is about, from the status and Cloudflare's codes (never the
        message's text): ``item`` (some item of the batch, or the batch's size: worth
        halving), ``auth``, ``zone``, ``body`` or ``request`` (nothing a smaller batch would
        change)."""
        codes = {e.code for e in self.errors}
        if self.status in (401, 403) or codes & AUTH_CODES:
            return "auth"
        if self.status == 404 or codes & ZONE_CODES:
            return "zone"
        if codes & BODY_CODES:
            return "body"
        return "item" if self.status == 400 else "request"

    def __init__(
        self, status: int, errors: tuple[ApiErrorDetail, ...] = (), message: str = ""
    ) -> None:
        self.status = status
        self.errors = errors
        self.code = errors[0].code if errors else None
        text = message or "; ".join(f"{e.code}: {e.message}" for e in errors) or "no detail"
        super().__init__(f"HTTP {status}: {text}")


class RetriesExhausted(PermanentError):
    """The retry budget ran out; ``last`` is the final retryable error."""

    error_class = "retries_exhausted"

    def __init__(self, last: BaseException, attempts: int) -> None:
        self.last = last
        self.attempts = attempts
        self.code = getattr(last, "code", None)
        super().__init__(f"gave up after {attempts} attempts: {last}")


class AccessError(PurgeWorkerError):
    """Kafka refused the worker: authentication failed, TLS did not verify, or an ACL denies an
    operation. Neither retryable (nothing changes by waiting) nor about a record: the worker
    stops and says which setting or ACL to fix."""


class DeadLetterGuardTripped(PurgeWorkerError):
    """The share of dead-lettered records passed the configured limit; the worker stops."""


class Abandoned(PurgeWorkerError):
    """A wait (retry backoff, rate budget) was cut short because the worker is stopping. Neither
    retryable nor permanent: the work is dropped unfinished and its records are redelivered."""
