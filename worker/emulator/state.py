"""The emulator's behaviour, independent of HTTP: validation, limits, settings, faults, records.

Each public method takes the parsed request and returns ``(status, envelope, headers)``. One lock
guards all state, so the threaded server can serve many requests at once safely.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.clock import Clock, SystemClock, rfc3339
from worker.cloudflare.tiers import PlanLimits, Tier, limits_for
from worker.emulator.edge import Edge

Reply = tuple[int, dict[str, Any], dict[str, str]]

ZONE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
VARIANT_KEYS = frozenset(
    {"avif", "bmp", "gif", "jp2", "jpeg", "jpg", "jpg2", "png", "tif", "tiff", "webp"}
)
SELECTORS = ("files", "tags", "hosts", "prefixes")
# A fault's latency: enough for any timeout test, never a handler asleep for good.
MAX_LATENCY_MS = 600_000
DEVICE_TYPES = frozenset({"mobile", "desktop", "tablet"})


def _same(given: str, expected: str) -> bool:
    """Compare secrets in constant time; bytes, since a header may hold any character."""
    return secrets.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _bad_cache_key(headers: Any) -> str | None:
    """What is wrong with a files object's cache-key headers, per the API's documentation."""
    if not isinstance(headers, dict):
        return "headers must be an object"
    for name, value in headers.items():
        if not isinstance(value, str):
            return f"{name} must be a string"
        if name.lower() == "cf-device-type" and value not in DEVICE_TYPES:
            return f"CF-Device-Type {value[:40]!r} is not mobile, desktop or tablet"
    return None


NO_SELECTOR = (
    'Request must contain one of "purge_everything", "files", "tags", "hosts" or "prefixes"'
)


def envelope(result: Any = None, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"success": not errors, "errors": errors or [], "messages": [], "result": result}


def error(status: int, code: int, message: str, **extra: Any) -> Reply:
    entry: dict[str, Any] = {"code": code, "message": message, **extra}
    return status, envelope(None, [entry]), {}


class _Bucket:
    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.clock = clock
        self.updated = clock.monotonic()

    def take(self, cost: float) -> float:
        """Take ``cost`` tokens if there are enough; else return seconds until there would be."""
        now = self.clock.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


def _left(bucket: _Bucket) -> dict[str, str]:
    """What an accepted flex request leaves of the bucket, as the API's ``Ratelimit`` headers
    say it: whole tokens left, and seconds until the bucket is full again."""
    full_in = math.ceil((bucket.capacity - bucket.tokens) / bucket.rate)
    window = math.ceil(bucket.capacity / bucket.rate)
    return {
        "Ratelimit": f'"default";r={int(bucket.tokens)};t={full_in}',
        "Ratelimit-Policy": f'"burst";q={int(bucket.capacity)};w={window}',
    }


class _UrlMeter:
    """URLs accepted in the last second; a request is refused when it would take that total
    past the plan's URLs per second (the server's per-second moving average)."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        self.capacity = per_second
        self.rate = per_second
        self.clock = clock
        self.accepted: deque[tuple[float, int]] = deque()

    def take(self, cost: float) -> float:
        """Accept ``cost`` URLs if the last second leaves room; else the seconds until it would."""
        now = self.clock.monotonic()
        while self.accepted and self.accepted[0][0] <= now - 1.0:
            self.accepted.popleft()
        in_window = sum(n for _, n in self.accepted)
        if in_window + cost <= self.capacity:
            self.accepted.append((now, int(cost)))
            return 0.0
        over, wait = in_window + cost - self.capacity, 1.0
        for at, n in self.accepted:
            over -= n
            if over <= 0:
                wait = at + 1.0 - now
                break
        return max(wait, 0.001)


@dataclass
class Account:
    plan: Tier
    limits: PlanLimits
    clock: Clock
    flex: _Bucket = field(init=False)
    urls: _UrlMeter = field(init=False)

    def __post_init__(self) -> None:
        self.refill()

    def refill(self) -> None:
        self.flex = _Bucket(self.limits.flex_refill_per_second, self.limits.flex_bucket, self.clock)
        self.urls = _UrlMeter(self.limits.urls_per_second, self.clock)


@dataclass
class ZoneSettings:
    cache_reserve: str = "off"
    regional: str = "off"
    smart: str = "off"
    variants: dict[str, list[str]] | None = None
    modified: dict[str, str] = field(default_factory=dict)
    clear_started: float | None = None


@dataclass
class Faults:
    status: int | None = None
    count: int = 0
    until: float = 0.0
    latency_ms: int = 0
    reject_items: set[str] = field(default_factory=set)
    reject_status: int = 400
    reject_code: int = 1012
    reject_message: str = "Invalid purge item"
    # Like a misconfigured proxy or base_url: error messages quote the request's headers, so
    # tests can prove that nothing the worker prints or writes carries the token.
    echo_headers: bool = False


class EmulatorState:
    """Zones belong to accounts; each account has a plan and its own rate buckets."""

    def __init__(
        self,
        zones: dict[str, str],
        accounts: dict[str, Tier | str],
        *,
        token: str | None = "emulator-token",
        email: str | None = None,
        api_key: str | None = None,
        rate_limits: bool = True,
        files_cap: int | None = None,
        flex_cost_per_item: bool = False,
        clear_seconds: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.clock: Clock = clock or SystemClock()
        self.token = token
        self.email = email
        self.api_key = api_key
        self.rate_limits = rate_limits
        self.flex_cost_per_item = flex_cost_per_item
        self.clear_seconds = clear_seconds
        self.accounts: dict[str, Account] = {}
        for name, plan in accounts.items():
            limits = limits_for(plan)
            # The documented cap is 100 URLs a request below Enterprise.
            cap = files_cap or (500 if Tier(plan) is Tier.ENTERPRISE else 100)
            self.accounts[name] = Account(
                Tier(plan), limits.with_overrides(urls_per_request=cap), self.clock
            )
        for zone_id, account in zones.items():
            if not ZONE_ID_RE.match(zone_id):
                raise ValueError(f"zone id {zone_id!r} is not 32 hex characters")
            if account not in self.accounts:
                raise ValueError(f"zone {zone_id} names unknown account {account!r}")
        self.zones = dict(zones)
        self.settings = {z: ZoneSettings() for z in zones}
        self.faults = Faults()
        self.edge = Edge(self.now)
        self.purges: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []

    def now(self) -> str:
        return rfc3339(self.clock.time())

    # -- inspection -----------------------------------------------------------------------------

    def record_request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append(
                {"method": method, "path": path, "status": status, "received_at": self.now()}
            )

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            return list(self.purges), list(self.requests)

    def reset(self) -> None:
        with self._lock:
            self.edge = Edge(self.now)
            self.purges.clear()
            self.requests.clear()
            for account in self.accounts.values():
                account.refill()

    def set_faults(self, spec: dict[str, Any]) -> Reply:
        with self._lock:
            if spec.get("clear"):
                self.faults = Faults()
                self.edge.origin_status = 200
                return 200, envelope({"faults": "cleared"}), {}
            if "status" in spec:
                status = int(spec["status"])
                if not 400 <= status <= 599:
                    return error(400, 1001, "status must be 400..599")
                self.faults.status = status
                self.faults.count = int(spec.get("count", 0))
                seconds = float(spec.get("seconds", 0))
                self.faults.until = self.clock.monotonic() + seconds if seconds else 0.0
                if not self.faults.count and not seconds:
                    return error(400, 1001, "a status fault needs count or seconds")
            if "echo_headers" in spec:
                self.faults.echo_headers = bool(spec["echo_headers"])
            if "edge_status" in spec:  # what the zones' origin answers a cache miss with
                status = int(spec["edge_status"])
                if not 200 <= status <= 599:
                    return error(400, 1001, "edge_status must be 200..599")
                self.edge.origin_status = status
            if "latency_ms" in spec:
                latency = int(spec["latency_ms"])
                if not 0 <= latency <= MAX_LATENCY_MS:
                    return error(400, 1001, f"latency_ms must be 0..{MAX_LATENCY_MS}")
                self.faults.latency_ms = latency
            if "reject_items" in spec:
                self.faults.reject_items = {str(i) for i in spec["reject_items"]}
                self.faults.reject_status = int(spec.get("reject_status", 400))
                self.faults.reject_code = int(spec.get("reject_code", 1012))
                self.faults.reject_message = str(spec.get("reject_message", "Invalid purge item"))
            return 200, envelope({"faults": "set"}), {}

    def injected_fault(self) -> tuple[int, Reply | None]:
        """Latency to add, and the failure to answer with instead, if a fault applies now."""
        with self._lock:
            f = self.faults
            reply: Reply | None = None
            if f.status is not None:
                if f.count > 0:
                    f.count -= 1
                    reply = self._fault_reply(f.status)
                elif f.until and self.clock.monotonic() < f.until:
                    reply = self._fault_reply(f.status)
                else:
                    f.status = None
            return f.latency_ms, reply

    @staticmethod
    def _fault_reply(status: int) -> Reply:
        code, msg, headers = 10001, "Service unavailable (injected fault)", {}
        if status == 429:
            code, msg, headers = 1134, "Unable to purge, rate limit reached", {"Retry-After": "1"}
        return status, envelope(None, [{"code": code, "message": msg}]), headers

    # -- auth and routing -----------------------------------------------------------------------

    def authenticate(self, headers: dict[str, str]) -> Reply | None:
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme != "Bearer" or not value.strip():
                return error(
                    400,
                    6003,
                    "Invalid request headers",
                    error_chain=[
                        {"code": 6111, "message": "Invalid format for Authorization header"}
                    ],
                )
            if self.token is None or not _same(value.strip(), self.token):
                return error(403, 10000, "Authentication error")
            return None
        email, key = headers.get("x-auth-email"), headers.get("x-auth-key")
        if email is None and key is None:
            return error(
                400,
                6003,
                "Invalid request headers",
                error_chain=[{"code": 6103, "message": "Invalid format for X-Auth-Key header"}],
            )
        if (
            email is None
            or key is None
            or self.api_key is None
            or email != self.email
            or not _same(key, self.api_key)
        ):
            return error(403, 10000, "Authentication error")
        return None

    def zone(self, zone_id: str) -> Reply | None:
        if not ZONE_ID_RE.match(zone_id):
            return (
                400,
                envelope(
                    None,
                    [
                        {
                            "code": 7003,
                            "message": "Could not route to /zones/"
                            + zone_id[:64]
                            + ", perhaps your object identifier is invalid?",
                        },
                        {"code": 7000, "message": "No route for that URI"},
                    ],
                ),
                {},
            )
        if zone_id not in self.zones:
            return error(403, 10000, "Authentication error")
        return None

    # -- purge ----------------------------------------------------------------------------------

    def purge(self, zone_id: str, endpoint: str, body: Any) -> Reply:
        if not isinstance(body, dict):
            return error(400, 1012, NO_SELECTOR)
        everything = body.get("purge_everything")
        present = [s for s in SELECTORS if s in body]
        if everything is not None:
            if present or len(body) > 1:
                return error(400, 1092, "purge_everything must be the only field in the request")
            if everything is not True:
                return error(400, 1012, "purge_everything must be true")
            kind, items = "everything", []
        else:
            if len(present) != 1 or len(body) != 1:
                return error(400, 1012, NO_SELECTOR)
            kind = present[0]
            items = body[kind]
            if not isinstance(items, list):
                return error(400, 1014, f"'{kind}' must be an array")
            if not items:
                return error(400, 1012, f"'{kind}' is empty: nothing to purge")
            bad = self._validate_items(kind, items)
            if bad is not None:
                return bad
        account = self.accounts[self.zones[zone_id]]
        cap = (
            account.limits.urls_per_request
            if kind == "files"
            else account.limits.flex_items_per_request
        )
        if len(items) > cap:
            # No error code is documented for this case; the message is what clients see.
            return error(400, 400, f"cannot provide more than {cap} items in a single request")
        with self._lock:
            for item in items:
                key = item if isinstance(item, str) else item.get("url", "")
                if key in self.faults.reject_items:
                    f = self.faults
                    return error(f.reject_status, f.reject_code, f"{f.reject_message}: {key}")
            headers: dict[str, str] = {}
            if self.rate_limits:
                limited = self._take_budget(account, kind, len(items))
                if limited is not None:
                    return limited
                if kind != "files":
                    headers = _left(account.flex)
            purge_id = secrets.token_hex(16)
            self.purges.append(
                {
                    "zone_id": zone_id,
                    "kind": kind,
                    "items": items,
                    "endpoint": endpoint,
                    "received_at": self.now(),
                    "id": purge_id,
                }
            )
        self.edge.purge(kind, items)
        return 200, envelope({"id": purge_id}), headers

    def _take_budget(self, account: Account, kind: str, n: int) -> Reply | None:
        bucket: _Bucket | _UrlMeter
        if kind == "files":
            wait = account.urls.take(n)
            bucket = account.urls
        else:
            wait = account.flex.take(n if self.flex_cost_per_item else 1)
            bucket = account.flex
        if wait <= 0:
            return None
        status, env, _ = error(429, 1134, "Unable to purge, rate limit reached")
        reset = math.ceil(bucket.capacity / bucket.rate)
        return (
            status,
            env,
            {
                "Retry-After": str(max(1, math.ceil(wait))),
                "Ratelimit": f'"default";r=0;t={max(1, math.ceil(wait))}',
                "Ratelimit-Policy": f'"burst";q={int(bucket.capacity)};w={reset}',
            },
        )

    @staticmethod
    def _validate_items(kind: str, items: list[Any]) -> Reply | None:
        for item in items:
            if kind == "files":
                url = item.get("url") if isinstance(item, dict) else item
                if isinstance(item, dict) and not isinstance(url, str):
                    return error(400, 1012, 'files object is missing "url"')
                if (
                    not isinstance(url, str)
                    or not url.startswith(("http://", "https://"))
                    or "*" in url
                ):
                    return error(400, 1012, f"Invalid url: {str(url)[:100]}")
                headers = item.get("headers", {}) if isinstance(item, dict) else {}
                bad = _bad_cache_key(headers)
                if bad is not None:
                    return error(400, 1012, f"Invalid headers for {url[:100]}: {bad}")
            elif not isinstance(item, str) or not item:
                return error(400, 1012, f"Invalid {kind} entry: {str(item)[:100]}")
            elif kind == "tags" and (
                len(item) > 1024 or any(not 0x21 <= ord(c) <= 0x7E for c in item)
            ):
                return error(400, 1012, f"Invalid tag: {item[:100]}")
            elif kind == "prefixes" and (
                "://" in item or "?" in item or "#" in item or item.count("/") > 31
            ):
                return error(400, 1012, f"Invalid prefix: {item[:100]}")
            elif kind == "hosts" and ("/" in item or ":" in item):
                return error(400, 1012, f"Invalid host: {item[:100]}")
        return None

    # -- settings -------------------------------------------------------------------------------

    def setting(self, zone_id: str, name: str, method: str, body: Any) -> Reply:
        with self._lock:
            s = self.settings[zone_id]
            self._settle_clear(s)
            if name == "cache_reserve_clear":
                return self._clear(zone_id, s, method)
            handler = {
                "cache_reserve": ("cache_reserve", "cache_reserve", False),
                "regional_tiered_cache": ("tc_regional", "regional", False),
                "tiered_cache_smart_topology_enable": (
                    "tiered_cache_smart_topology_enable",
                    "smart",
                    True,
                ),
                "variants": ("variants", "variants", True),
            }.get(name)
            if handler is None:
                return error(404, 7003, f"Could not route to /zones/{zone_id}/cache/{name}")
            sid, attr, deletable = handler
            if method == "GET":
                return 200, envelope(self._setting_result(s, sid, attr)), {}
            if method == "DELETE":
                if not deletable:
                    return error(405, 10405, "Method not allowed for this setting")
                setattr(s, attr, None if attr == "variants" else "off")
                s.modified[sid] = self.now()
                return (
                    200,
                    envelope({"id": sid, "editable": True, "modified_on": s.modified[sid]}),
                    {},
                )
            if method != "PATCH":
                return error(405, 10405, "Method not allowed for this setting")
            value = body.get("value") if isinstance(body, dict) else None
            if attr == "variants":
                problem = _variants_problem(value)
                if problem:
                    return error(400, 1007, f"Invalid value for zone setting variants: {problem}")
            elif value not in ("on", "off"):
                return error(400, 1007, f'Invalid value for zone setting {sid}: use "on" or "off"')
            if attr == "cache_reserve" and value == "on" and s.clear_started is not None:
                return error(
                    400, 1153, "Cache Reserve cannot be enabled while a clear is in progress"
                )
            setattr(s, attr, value)
            s.modified[sid] = self.now()
            return 200, envelope(self._setting_result(s, sid, attr)), {}

    @staticmethod
    def _setting_result(s: ZoneSettings, sid: str, attr: str) -> dict[str, Any]:
        result: dict[str, Any] = {"id": sid, "editable": True, "value": getattr(s, attr) or {}}
        if attr == "variants" and s.variants is None:
            result["value"] = {}
        result["modified_on"] = s.modified.get(sid)
        return result

    def _settle_clear(self, s: ZoneSettings) -> None:
        if (
            s.clear_started is not None
            and self.clock.time() - s.clear_started >= self.clear_seconds
        ):
            s.modified["clear_done"] = rfc3339(s.clear_started + self.clear_seconds)
            s.modified["clear_start"] = rfc3339(s.clear_started)
            s.clear_started = None

    def _clear(self, zone_id: str, s: ZoneSettings, method: str) -> Reply:
        if method == "POST":
            if s.cache_reserve == "on":
                return error(400, 1152, "Turn off Cache Reserve sync to proceed with deletion.")
            if s.clear_started is None:
                s.clear_started = self.clock.time()
                s.modified.pop("clear_done", None)
        elif method != "GET":
            return error(405, 10405, "Method not allowed")
        if s.clear_started is not None:
            result = {
                "id": "cache_reserve_clear",
                "start_ts": rfc3339(s.clear_started),
                "state": "In-progress",
            }
        elif "clear_done" in s.modified:
            result = {
                "id": "cache_reserve_clear",
                "start_ts": s.modified["clear_start"],
                "state": "Completed",
                "end_ts": s.modified["clear_done"],
            }
        else:
            return error(404, 1142, "No Cache Reserve clear has been started for this zone")
        return 200, envelope(result), {}


def _variants_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "value must be an object of extension to MIME type list"
    for ext, types in value.items():
        if ext not in VARIANT_KEYS:
            return f"unknown extension {ext!r}"
        if not isinstance(types, list) or not all(isinstance(t, str) and "/" in t for t in types):
            return f"{ext} must be a list of MIME types"
    return None
