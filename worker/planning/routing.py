"""Zone routing: which configured zone a target belongs to; a target for no zone is never sent."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from worker.errors import UnknownZone
from worker.targets import Kind, Target

# Hosts remembered by ``ZoneRouter`` before it starts over (a host is event data).
HOSTS_FOUND = 10_000


@dataclass(frozen=True)
class Zone:
    name: str
    id: str
    account: str
    hosts: tuple[str, ...]
    # Cache-key variants every URL of the zone is purged in (e.g. per CF-Device-Type).
    url_variants: tuple[tuple[str, tuple[str, ...]], ...] = ()


_UNSEEN = Zone("", "", "", ())


class ZoneRouter:
    def __init__(self, zones: Sequence[Zone]) -> None:
        self.zones = list(zones)
        self._exact: dict[str, Zone] = {}
        self._suffix: list[tuple[str, Zone]] = []
        self._named: dict[str, Zone] = {}
        for zone in zones:
            self._named[zone.name.lower()] = zone
            self._named[zone.id] = zone
            for host in zone.hosts:
                if host.startswith("*."):
                    self._suffix.append((host[1:].lower(), zone))
                else:
                    self._exact[host.lower()] = zone
        # Most specific suffix first.
        self._suffix.sort(key=lambda item: -len(item[0]))
        # Hosts found by suffix (None: by none), so each is looked for once: a site's pages
        # are mostly on a few hosts under a wildcard.
        self._found: dict[str, Zone | None] = {}

    def route(self, target: Target) -> Zone:
        """The zone for ``target``. Raises ``UnknownZone``."""
        if target.kind.names_its_zone:
            return self._by_name(target)
        host = target.hostname or ""
        zone = self._exact.get(host)
        if zone is None:
            zone = self._found.get(host, _UNSEEN)
            if zone is _UNSEEN:
                zone = next((z for suffix, z in self._suffix if host.endswith(suffix)), None)
                if len(self._found) >= HOSTS_FOUND:
                    self._found.clear()
                self._found[host] = zone
        if zone is None:
            raise UnknownZone(f"{target.value}: host {host!r} is in no configured zone")
        return zone

    def _by_name(self, target: Target) -> Zone:
        if target.zone:
            zone = self._named.get(target.zone.lower()) or self._exact.get(target.zone.lower())
            if zone is None:
                raise UnknownZone(f"{target}: zone {target.zone!r} is not configured")
            return zone
        if len(self.zones) == 1:
            return self.zones[0]
        raise UnknownZone(f"{target}: names no zone, and {len(self.zones)} zones are configured")

    @staticmethod
    def expand(zone: Zone, target: Target) -> list[Target]:
        """A URL without explicit headers, repeated for each of the zone's cache-key variants."""
        if target.kind is not Kind.FILES or target.headers or not zone.url_variants:
            return [target]
        names = [name for name, _ in zone.url_variants]
        combos = itertools.product(*(values for _, values in zone.url_variants))
        return [Target.url(target.value, dict(zip(names, combo, strict=True))) for combo in combos]
