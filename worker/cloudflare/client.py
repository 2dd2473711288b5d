"""A small, typed client for Cloudflare's Cache API over a one-method transport.

Every method makes exactly one request and translates the outcome at this boundary: no answer
is ``TransportError`` (from the transport), a retryable status ``ApiUnavailable`` or
``RateLimited``, any other 4xx ``ApiRejected``, classified by status and Cloudflare's error
codes. Retrying is the caller's choice (see ``retry.py``). Methods block for the duration of
the request.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.cloudflare.auth import Credentials
from worker.cloudflare.transport import Request, RequestsTransport, Response, Transport
from worker.config.model import DEFAULT_BASE_URL
from worker.errors import (
    ApiErrorDetail,
    ApiRejected,
    ApiUnavailable,
    RateLimited,
)
from worker.observe.logs import REDACTED
from worker.targets import Kind, Mode

RETRYABLE_STATUSES = frozenset({408, 409}) | frozenset(range(500, 600))


class CacheSetting(enum.StrEnum):
    """The cache settings endpoints, by their path under ``/zones/{id}/cache/``."""

    CACHE_RESERVE = "cache_reserve"
    REGIONAL_TIERED = "regional_tiered_cache"
    SMART_TIERED = "tiered_cache_smart_topology_enable"
    VARIANTS = "variants"


@dataclass(frozen=True)
class ApiResponse:
    status: int
    result: Any
    request_id: str | None
    # From a ``Ratelimit: "default";r=<remaining>;t=<seconds to reset>`` header, if any.
    remaining: int | None = None
    reset_seconds: float | None = None


@dataclass(frozen=True)
class PurgeAccepted:
    """The API accepted the purge (accepted is not yet evicted)."""

    id: str
    request_id: str | None
    # What the API said is left of its rate limit, and when it resets (None: it did not say).
    remaining: int | None = None
    reset_seconds: float | None = None


@dataclass(frozen=True)
class SettingValue:
    id: str
    value: Any
    editable: bool | None
    modified_on: str | None


@dataclass(frozen=True)
class ClearStatus:
    state: str
    start_ts: str | None
    end_ts: str | None


class CloudflareClient:
    def __init__(
        self,
        credentials: Credentials,
        *,
        base_url: str = DEFAULT_BASE_URL,
        transport: Transport | None = None,
    ) -> None:
        self._credentials = credentials
        self.base_url = base_url.rstrip("/")
        self._transport = transport or RequestsTransport()

    def __repr__(self) -> str:
        return f"CloudflareClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self._transport.close()

    # -- purge ---------------------------------------------------------------------------------

    def purge(
        self, zone_id: str, kind: Kind, items: list[Any], mode: Mode = Mode.PURGE
    ) -> PurgeAccepted:
        """Send one purge request; ``items`` must already fit the per-request cap."""
        body: dict[str, Any] = (
            {"purge_everything": True} if kind is Kind.EVERYTHING else {kind.value: items}
        )
        resp = self.request("POST", f"/zones/{zone_id}/{mode.endpoint}", body)
        result = resp.result if isinstance(resp.result, dict) else {}
        return PurgeAccepted(
            str(result.get("id", "")), resp.request_id, resp.remaining, resp.reset_seconds
        )

    # -- settings ------------------------------------------------------------------------------

    def get_setting(self, zone_id: str, setting: CacheSetting) -> SettingValue:
        return _setting(self.request("GET", f"/zones/{zone_id}/cache/{setting}").result)

    def edit_setting(self, zone_id: str, setting: CacheSetting, value: Any) -> SettingValue:
        resp = self.request("PATCH", f"/zones/{zone_id}/cache/{setting}", {"value": value})
        return _setting(resp.result)

    def delete_setting(self, zone_id: str, setting: CacheSetting) -> SettingValue:
        return _setting(self.request("DELETE", f"/zones/{zone_id}/cache/{setting}").result)

    def cache_reserve_clear_status(self, zone_id: str) -> ClearStatus:
        return _clear(self.request("GET", f"/zones/{zone_id}/cache/cache_reserve_clear").result)

    def cache_reserve_clear_start(self, zone_id: str) -> ClearStatus:
        resp = self.request("POST", f"/zones/{zone_id}/cache/cache_reserve_clear", {})
        return _clear(resp.result)

    def verify_token(self) -> str:
        """The token's status (``active`` for a live token)."""
        result = self.request("GET", "/user/tokens/verify").result
        return str(result.get("status", "")) if isinstance(result, dict) else ""

    # -- transport -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> ApiResponse:
        """One request; raises the error types of ``worker.errors`` (see module docstring)."""
        request = Request(method, self.base_url + path, self._credentials.headers(), body)
        return _interpret(method, path, self._transport.handle(request), self._scrub)

    def _scrub(self, text: str) -> str:
        """``text`` without this client's secrets: a proxy or a wrong ``base_url`` may quote the
        request's headers in its error, and error texts travel to logs, output and dead letters."""
        for secret in self._credentials.secrets():
            text = text.replace(secret, REDACTED)
        return text


def _interpret(method: str, path: str, resp: Response, scrub: Callable[[str], str]) -> ApiResponse:
    request_id = resp.headers.get("cf-ray") or resp.headers.get("x-request-id")
    try:
        envelope = resp.json()
    except ValueError:
        envelope = None
    errors: tuple[ApiErrorDetail, ...] = ()
    if isinstance(envelope, dict):
        errors = tuple(
            ApiErrorDetail(_code(e.get("code")), scrub(str(e.get("message", ""))))
            for e in envelope.get("errors") or []
            if isinstance(e, dict)
        )
    status = resp.status
    if status == 429:
        raise RateLimited(errors, _retry_after(resp.headers.get("retry-after")))
    if status in RETRYABLE_STATUSES:
        raise ApiUnavailable(status, errors, "" if errors else f"{method} {path}")
    if status >= 400:
        raise ApiRejected(status, errors, "" if errors else f"{method} {path}")
    if not isinstance(envelope, dict) or not envelope.get("success", False):
        raise ApiRejected(status, errors, f"{method} {path}: response is not a success envelope")
    remaining, reset = ratelimit_header(resp.headers.get("ratelimit"))
    return ApiResponse(status, envelope.get("result"), request_id, remaining, reset)


def ratelimit_header(value: str | None) -> tuple[int | None, float | None]:
    """``"default";r=3;t=12`` -> (3, 12.0); anything unreadable -> (None, None)."""
    if not value:
        return None, None
    params: dict[str, str] = {}
    for part in value.split(";")[1:]:
        key, _, raw = part.strip().partition("=")
        params[key.strip()] = raw.strip()
    try:
        remaining, reset = int(params["r"]), float(params["t"])
    except (KeyError, ValueError):
        return None, None
    if remaining < 0 or not math.isfinite(reset) or reset < 0:
        return None, None
    return remaining, min(reset, 3600.0)


def _code(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, math.ceil(seconds)) if math.isfinite(seconds) else None


def _setting(result: Any) -> SettingValue:
    data = result if isinstance(result, dict) else {}
    return SettingValue(
        str(data.get("id", "")), data.get("value"), data.get("editable"), data.get("modified_on")
    )


def _clear(result: Any) -> ClearStatus:
    data = result if isinstance(result, dict) else {}
    return ClearStatus(str(data.get("state", "")), data.get("start_ts"), data.get("end_ts"))
