"""Cloudflare's purge limits per plan, as documented (see README: "Rate limits").

Limits are per account and shared by every zone of the account. Figures marked "unconfirmed" in
the API notes are defaults the config can override, never assumptions baked into the code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from worker.targets import Kind


class Tier(enum.StrEnum):
    """A Cloudflare plan, the price tier that sets an account's purge limits (the config's
    ``plan`` key names one)."""

    FREE = "free"
    PRO = "pro"
    BUSINESS = "business"
    ENTERPRISE = "enterprise"


@dataclass(frozen=True)
class PlanLimits:
    # Tag, host, prefix and everything purges: a token bucket of requests.
    flex_refill_per_second: float
    flex_bucket: int
    flex_items_per_request: int
    # Single-file (URL) purges: metered per URL, as a per-second moving average.
    urls_per_second: float
    urls_per_request: int

    def per_request(self, kind: Kind) -> int:
        """The most items one request of ``kind`` may carry."""
        return self.urls_per_request if kind.metered_per_item else self.flex_items_per_request

    def with_overrides(self, **changes: float | int) -> PlanLimits:
        return replace(self, **changes)  # type: ignore[arg-type]


# Files per request: 100 is documented for non-enterprise plans, but some zones still see 30, and
# a cap that is too high fails every batch; 30 is the safe default (override per account).
DEFAULT_LIMITS: dict[Tier, PlanLimits] = {
    Tier.FREE: PlanLimits(5 / 60, 25, 100, 800, 30),
    Tier.PRO: PlanLimits(5, 25, 100, 1500, 30),
    Tier.BUSINESS: PlanLimits(10, 50, 100, 1500, 30),
    Tier.ENTERPRISE: PlanLimits(50, 500, 100, 3000, 500),
}


def limits_for(tier: Tier | str) -> PlanLimits:
    return DEFAULT_LIMITS[Tier(tier)]
