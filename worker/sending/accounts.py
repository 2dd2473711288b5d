"""Builds the Cloudflare side from a config: one client and one rate limiter per account."""

from __future__ import annotations

from collections.abc import Mapping

from worker.clock import Clock
from worker.cloudflare.client import CloudflareClient
from worker.cloudflare.ratelimit import AccountRateLimiter
from worker.config import Config
from worker.errors import UnknownZone
from worker.planning.routing import Zone
from worker.sending.purger import Destination
from worker.targets import Kind


class Accounts:
    """Clients, limiters and destinations for every configured account and zone."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self._zones = {z.id: z for z in config.zones}
        self.clients: dict[str, CloudflareClient] = {}
        self.limiters: dict[str, AccountRateLimiter] = {}
        for name, account in config.accounts.items():
            self.clients[name] = CloudflareClient(account.credentials, base_url=config.base_url)
            self.limiters[name] = AccountRateLimiter(
                account.limits, clock, flex_cost_per_item=account.flex_cost_per_item
            )
        self.destinations: Mapping[str, Destination] = {
            z.id: Destination(z.id, z.name, self.clients[z.account], self.limiters[z.account])
            for z in config.zones
        }

    def cap(self, zone_id: str, kind: Kind) -> int:
        """Items per request of ``kind`` for the zone's account."""
        return self.limiters[self._zones[zone_id].account].cap(kind)

    def zone(self, name_or_id: str | None) -> Zone:
        """A zone by name, id or host; the only zone when None. Raises ``UnknownZone``."""
        zones = self.config.zones
        if name_or_id is None:
            if len(zones) == 1:
                return zones[0]
            raise UnknownZone(f"{len(zones)} zones are configured: name one with --zone")
        key = name_or_id.lower()
        for z in zones:
            if key in (z.name.lower(), z.id) or key in z.hosts:
                return z
        raise UnknownZone(f"zone {name_or_id!r} is not configured")

    def account_of(self, zone_id: str) -> str:
        return self._zones[zone_id].account

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
