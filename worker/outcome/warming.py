"""Fetches purged URLs again through Cloudflare, and reads from the answer whether the purge took
effect.

After a record whose rules say ``warm`` is purged, each URL to warm (once per cache-key variant,
with the same headers) waits ``warming.delay_seconds`` and is then fetched, with at most
``concurrency`` requests at a time and ``requests_per_second`` per zone. The first visitor after
a purge pays the origin round trip; with Tiered Cache one warm request fills the upper tier for
every location. The answer's ``CF-Cache-Status`` is the proof: ``MISS``, ``EXPIRED`` or
``REVALIDATED`` right after a purge means it took effect; ``HIT`` means it did not (a custom
cache key the rule does not match, a variant left out, the wrong zone), which is logged as a
warning and counted.

Best effort by design: ``submit`` never blocks, a full queue drops its oldest URL (counted), and
nothing here can delay a purge, fail a record or hold back a commit. Requests run on threads of
their own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

import structlog

from worker.clock import Clock
from worker.config.model import WarmingSettings
from worker.observe import metrics
from worker.planning.planner import Routed

if TYPE_CHECKING:
    import requests

log = structlog.get_logger("worker.outcome.warming")

# A warm request reads at most this much of the body: the edge fills its cache from the origin
# whatever the client reads, so there is no need to download large pages.
MAX_BODY = 1 << 20
# Longest a thread sleeps before looking again (stopping, new work).
MAX_WAIT = 0.5


# The values Cloudflare documents for CF-Cache-Status. Anything else (a proxy's own, garbage) is
# "other": the header's value becomes a metric label, and label sets must stay bounded.
CACHE_STATUSES = frozenset(
    ("hit", "miss", "expired", "stale", "bypass", "revalidated", "updating", "dynamic", "none")
)


def _cache_status(header: str | None) -> str:
    value = (header or "none").strip().lower()
    return value if value in CACHE_STATUSES else "other"


class WarmJob(NamedTuple):
    due: float  # monotonic time it may go
    zone_id: str
    zone: str  # name, for metrics and logs
    url: str
    headers: tuple[tuple[str, str], ...]


# Told of each warm request's answer (its job, HTTP status, cache status): the receipts.
Warmed = Callable[["WarmJob", int | None, str], None]


class Warmer:
    def __init__(
        self, settings: WarmingSettings, clock: Clock, on_warmed: Warmed | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._on_warmed = on_warmed
        self._cond = threading.Condition()
        self._queues: dict[str, deque[WarmJob]] = {}
        self._queued: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
        self._size = 0
        self._next_at: dict[str, float] = {}
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, name=f"warm-{i}", daemon=True)
            for i in range(settings.concurrency)
        ]

    def start(self) -> Warmer:
        for t in self._threads:
            t.start()
        return self

    @property
    def queued(self) -> int:
        return self._size

    def submit(self, urls: Iterable[Routed]) -> int:
        """Queue ``urls`` to warm after the delay; never blocks. Returns how many were queued
        (a URL already waiting is not queued twice)."""
        added = 0
        due = self._clock.monotonic() + self._settings.delay_seconds
        with self._cond:
            for zone, _, target in urls:
                key = (zone.id, target.value, target.headers)
                if key in self._queued:
                    continue
                if self._size >= self._settings.queue_size:
                    self._drop_oldest()
                self._queued.add(key)
                self._queues.setdefault(zone.id, deque()).append(
                    WarmJob(due, zone.id, zone.name, target.value, target.headers)
                )
                self._size += 1
                added += 1
            metrics.WARM_QUEUE.set(self._size)
            self._cond.notify_all()
        return added

    def _drop_oldest(self) -> None:
        zone = min((q[0].due, z) for z, q in self._queues.items() if q)[1]
        job = self._queues[zone].popleft()
        self._queued.discard((job.zone_id, job.url, job.headers))
        self._size -= 1
        metrics.WARM_DROPPED.labels(job.zone).inc()

    def close(self, timeout: float = 0.5) -> None:
        """Stop; URLs still waiting are not warmed (warming is best effort)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=timeout / len(self._threads))

    # -- the threads ------------------------------------------------------------------------------

    def _run(self) -> None:
        import requests  # noqa: PLC0415 (loaded where used: most workers never warm)

        session = requests.Session()
        try:
            while (job := self._next()) is not None:
                status, cache = self._fetch(session, job)
                if self._on_warmed is not None:
                    self._on_warmed(job, status, cache)
        finally:
            session.close()

    def _next(self) -> WarmJob | None:
        """The oldest job that is due, on a zone whose pace allows a request now; waits."""
        pace = 1.0 / self._settings.requests_per_second
        with self._cond:
            while not self._stop:
                now = self._clock.monotonic()
                ready = [
                    (q[0].due, z)
                    for z, q in self._queues.items()
                    if q and q[0].due <= now and self._next_at.get(z, 0.0) <= now
                ]
                if ready:
                    zone = min(ready)[1]
                    job = self._queues[zone].popleft()
                    self._queued.discard((job.zone_id, job.url, job.headers))
                    self._size -= 1
                    self._next_at[zone] = max(now, self._next_at.get(zone, 0.0)) + pace
                    metrics.WARM_QUEUE.set(self._size)
                    return job
                waits = [
                    max(q[0].due, self._next_at.get(z, 0.0)) - now
                    for z, q in self._queues.items()
                    if q
                ]
                self._cond.wait(min([MAX_WAIT, *waits]))
        return None

    def warm_now(self, urls: list[Routed]) -> list[dict[str, object]]:
        """Warm ``urls`` from this thread, after the delay and at the zone's pace; what each
        answered (for ``purge --warm``)."""
        import requests  # noqa: PLC0415 (as in ``_run``)

        pace = 1.0 / self._settings.requests_per_second
        self._clock.sleep(self._settings.delay_seconds)
        out: list[dict[str, object]] = []
        with requests.Session() as session:
            for i, (zone, _, target) in enumerate(urls):
                if i:
                    self._clock.sleep(pace)
                job = WarmJob(0.0, zone.id, zone.name, target.value, target.headers)
                status, cache = self._fetch(session, job)
                line: dict[str, object] = {"zone": zone.name, "url": target.value}
                if target.headers:
                    line["headers"] = dict(target.headers)
                out.append({**line, "status": status, "cache_status": cache})
        return out

    def _fetch(self, session: requests.Session, job: WarmJob) -> tuple[int | None, str]:
        """GET one URL as a visitor would; count and log what the edge said."""
        import requests  # noqa: PLC0415 (as in ``_run``)

        s = self._settings
        headers = {**dict(job.headers), "User-Agent": s.user_agent}
        url = job.url
        if s.via:
            parts = urlsplit(job.url)
            query = f"?{parts.query}" if parts.query else ""
            url = s.via.rstrip("/") + (parts.path or "/") + query
            headers["Host"] = parts.netloc
        try:
            with session.get(
                url, headers=headers, timeout=s.timeout_seconds, allow_redirects=False, stream=True
            ) as resp:
                read = 0
                for chunk in resp.iter_content(65536):
                    read += len(chunk)
                    if read >= MAX_BODY:
                        break
                cache = _cache_status(resp.headers.get("CF-Cache-Status"))
                status = resp.status_code
        except requests.RequestException as exc:
            metrics.WARM_REQUESTS.labels(job.zone, "error").inc()
            log.info("warm request failed", zone=job.zone, url=job.url, error=type(exc).__name__)
            return None, "error"
        metrics.WARM_REQUESTS.labels(job.zone, cache).inc()
        if cache == "hit":
            metrics.WARM_HIT_AFTER_PURGE.labels(job.zone).inc()
            log.warning(
                "purge did not take effect: HIT right after it",
                zone=job.zone,
                url=job.url,
                headers=dict(job.headers) or None,
            )
        elif status >= 500:
            log.info("warm request: origin error", zone=job.zone, url=job.url, status=status)
        return status, cache
