"""The emulator's edge: the zones' hosts served from a cache that accepted purges empty.

A GET for a URL is a ``MISS`` (fetched from the "origin" and stored) the first time, then a
``HIT`` until a purge covers it, then a ``MISS`` once more. The cache is kept per URL and
cache-key headers (device type, country, language, Origin), as a zone with a custom cache key
keeps it, so purging one variant leaves the others cached: exactly the mistake warming is meant
to catch. Purges evict by URL (the variant named by the purge's headers), by tag (tags a test
assigns, as an origin's ``Cache-Tag`` header would), by host, by prefix, and everything.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

# Request headers that make up the cache key (a zone's custom cache key, as purge-by-URL with
# headers names them).
KEY_HEADERS = ("cf-device-type", "cf-ipcountry", "accept-language", "origin")

Variant = tuple[tuple[str, str], ...]


def _split(url: str) -> str:
    """``https://Host/p?q`` -> ``host/p?q``; the scheme is not part of the cache key here."""
    rest = url.split("://", 1)[-1]
    host, _, path = rest.partition("/")
    return f"{host.lower()}/{path}"


def _variant(headers: Mapping[str, str]) -> Variant:
    lowered = {k.lower(): v for k, v in headers.items()}
    return tuple((h, lowered[h]) for h in KEY_HEADERS if h in lowered)


class Edge:
    def __init__(self, now: Any) -> None:
        self._now = now  # () -> RFC 3339 text, for the log
        self._lock = threading.Lock()
        self._cached: set[tuple[str, Variant]] = set()
        self._tags: dict[str, set[str]] = {}  # bare URL -> tags
        self.origin_status = 200
        self.log: list[dict[str, Any]] = []

    def get(self, host: str, path: str, headers: Mapping[str, str]) -> tuple[int, str]:
        """Serve a GET: the status and the ``CF-Cache-Status`` it answers with."""
        key = (f"{host.lower()}{path}", _variant(headers))
        with self._lock:
            if key in self._cached:
                status, cache = 200, "HIT"
            else:
                status, cache = self.origin_status, "MISS"
                if status == 200:
                    self._cached.add(key)
            self.log.append(
                {
                    "url": key[0],
                    "headers": dict(key[1]),
                    "user_agent": headers.get("user-agent", ""),
                    "status": status,
                    "cache_status": cache,
                    "received_at": self._now(),
                }
            )
        return status, cache

    def set_tags(self, url: str, tags: list[str]) -> None:
        with self._lock:
            self._tags[_split(url)] = {t.lower() for t in tags}

    def purge(self, kind: str, items: list[Any]) -> None:
        """Evict what an accepted purge covers."""
        with self._lock:
            if kind == "everything":
                self._cached.clear()
                return
            if kind == "files":
                for item in items:
                    url, headers = (
                        (item, {})
                        if isinstance(item, str)
                        else (item["url"], item.get("headers") or {})
                    )
                    self._cached.discard((_split(url), _variant(headers)))
                return
            wanted = {str(i).lower() for i in items}
            self._cached = {key for key in self._cached if not self._covers(kind, wanted, key[0])}

    def _covers(self, kind: str, wanted: set[str], url: str) -> bool:
        if kind == "tags":
            return bool(self._tags.get(url, set()) & wanted)
        if kind == "hosts":
            return url.split("/", 1)[0] in wanted
        # prefixes: "host/path", on a path boundary
        return any(
            url.startswith(p) and (len(url) == len(p) or p.endswith("/") or url[len(p)] in "/?")
            for p in wanted
        )
