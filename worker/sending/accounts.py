"""The Cloudflare side per account: its settings, its API client and its rate limiter; per zone,
where its batches go; and what this worker wants of each account's budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from worker.clock import Clock
from worker.cloudflare.client import CloudflareClient
from worker.cloudflare.ratelimit import AccountRateLimiter
from worker.cloudflare.transport import RequestsTransport, Transport
from worker.config.settings import AccountConfig
from worker.errors import UnknownZone
from worker.planning.routing import Zone
from worker.sending.purger import Destination
from worker.sending.split import FLEX_SPAN, Demand
from worker.targets import Kind


class Accounts:
    def __init__(
        self,
        accounts: Mapping[str, AccountConfig],
        zones: Sequence[Zone],
        clock: Clock,
        *,
        base_url: str,
        transport: Callable[[], Transport] = RequestsTransport,
    ) -> None:
        """``transport`` makes each account's client its transport (``dry_run`` sends none)."""
        self.settings = accounts
        self.zones = tuple(zones)
        self._zones = {z.id: z for z in zones}
        self.clients: dict[str, CloudflareClient] = {}
        self.limiters: dict[str, AccountRateLimiter] = {}
        for name, account in accounts.items():
            self.clients[name] = CloudflareClient(
                account.credentials, base_url=base_url, transport=transport()
            )
            self.limiters[name] = AccountRateLimiter(
                account.limits, clock, flex_cost_per_item=account.flex_cost_per_item
            )
        self.destinations: Mapping[str, Destination] = {
            z.id: Destination(z.id, z.name, self.clients[z.account], self.limiters[z.account])
            for z in zones
        }

    def cap(self, zone_id: str, kind: Kind) -> int:
        """Items per request of ``kind`` for the zone's account."""
        return self.limiters[self._zones[zone_id].account].cap(kind)

    def zone(self, name_or_id: str | None) -> Zone:
        """A zone by name, id or host; the only zone when None. Raises ``UnknownZone``."""
        if name_or_id is None:
            if len(self.zones) == 1:
                return self.zones[0]
            raise UnknownZone(f"{len(self.zones)} zones are configured: name one with --zone")
        key = name_or_id.lower()
        for z in self.zones:
            if key in (z.name.lower(), z.id) or key in z.hosts:
                return z
        raise UnknownZone(f"zone {name_or_id!r} is not configured")

    def account_of(self, zone_id: str) -> str:
        return self._zones[zone_id].account

    def demand(self, pending: Mapping[tuple[str, Kind], int], now: float) -> dict[str, Demand]:
        """What this worker wants of each account's budgets, given the items ``pending`` per
        zone and kind: the URLs waiting and sent in the last second over the URL rate; the flex
        requests waiting over the bucket, plus the flex rate used over the refill rate."""
        urls: dict[str, float] = dict.fromkeys(self.limiters, 0.0)
        flex: dict[str, float] = dict.fromkeys(self.limiters, 0.0)
        for (zone_id, kind), items in pending.items():
            name = self.account_of(zone_id)
            if kind.metered_per_item:
                urls[name] += items
            else:
                flex[name] += math.ceil(items / self.cap(zone_id, kind))
        out = {}
        for name, limiter in self.limiters.items():
            limits = self.settings[name].limits
            sent_urls, sent_flex = limiter.used(now, FLEX_SPAN)
            out[name] = Demand(
                round((urls[name] + sent_urls) / limits.urls_per_second, 4),
                round(
                    flex[name] / limits.flex_bucket
                    + sent_flex / FLEX_SPAN / limits.flex_refill_per_second,
                    4,
                ),
            )
        return out

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
