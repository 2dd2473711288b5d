"""Send one batch of same-kind targets to one zone: rate-limited, retried, bisected on rejection.

A rejection about an item (a 400 that is not about the token, the zone or the body) is
bisected: halving the batch until the bad items stand alone purges everything else and pins
the rejection on the records that produced them, k bad items in n costing about k·log2(n)
requests. When both halves of a refused batch are accepted, no item was bad: the batch was too
large for the API (its per-request cap went down, which it says with no documented code), and
the account remembers the smaller size. Any other rejection fails the batch as it is: no smaller
request would fare better.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog

from worker.clock import Clock
from worker.cloudflare.client import CloudflareClient
from worker.cloudflare.meters import Ticket
from worker.cloudflare.ratelimit import AccountRateLimiter
from worker.cloudflare.retry import RetryPolicy, call_with_retries
from worker.errors import ApiRejected, PermanentError, RateLimited, RetriesExhausted
from worker.observe import metrics
from worker.targets import Kind, Mode, Target

log = structlog.get_logger("worker.sending.purger")


@dataclass(frozen=True)
class Destination:
    """Where a batch goes: the zone, and the account whose client and budget it uses."""

    zone_id: str
    zone_name: str
    client: CloudflareClient
    limiter: AccountRateLimiter


class _Request(NamedTuple):
    """One batch's destination, selector and mode, as its requests are sent."""

    dest: Destination
    kind: Kind
    mode: Mode


class _Reserved(NamedTuple):
    """The rate budget for a first attempt, already taken by the caller."""

    ticket: Ticket | None


@dataclass
class BatchResult:
    accepted: list[Target] = field(default_factory=list)
    failed: list[tuple[Target, PermanentError]] = field(default_factory=list)
    requests: int = 0
    # The API's ids of the requests that were accepted (for receipts).
    request_ids: list[str] = field(default_factory=list)


class Purger:
    """Thread-safe if the clients and limiters are (they are). ``send`` blocks until done."""

    def __init__(self, policy: RetryPolicy, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._cancel = threading.Event()

    def abandon(self) -> None:
        """Stopping: every retry backoff and budget wait ends now with ``Abandoned``."""
        self._cancel.set()

    def send(
        self,
        dest: Destination,
        kind: Kind,
        mode: Mode,
        targets: Sequence[Target],
        *,
        reserved: bool = False,
        ticket: Ticket | None = None,
    ) -> BatchResult:
        """Purge ``targets``; ``reserved`` means the caller already took the rate budget for the
        first attempt, with ``ticket`` (retries and halves take their own)."""
        result = BatchResult()
        first = _Reserved(ticket) if reserved else None
        self._send(_Request(dest, kind, mode), list(targets), result, first)
        return result

    def _send(
        self,
        req: _Request,
        targets: list[Target],
        out: BatchResult,
        reserved: _Reserved | None = None,
    ) -> bool:
        """Send ``targets``, halving on an item rejection; True if all were accepted."""
        try:
            self._send_with_retries(req, targets, out, reserved)
            out.accepted.extend(targets)
            return True
        except ApiRejected as exc:
            if exc.scope != "item" or len(targets) < 2:
                out.failed.extend((t, exc) for t in targets)
                return False
            mid = len(targets) // 2
            first = self._send(req, targets[:mid], out)
            second = self._send(req, targets[mid:], out)
            if first and second:
                self._learn_cap(req, len(targets), mid + len(targets) % 2, exc)
            return False
        except (RetriesExhausted, PermanentError) as exc:
            out.failed.extend((t, exc) for t in targets)
            return False

    def _learn_cap(self, req: _Request, refused: int, size: int, exc: ApiRejected) -> None:
        """A batch of ``refused`` items was refused and its halves accepted: the API's cap is
        below it. Cut no request that large again for this account."""
        req.dest.limiter.learn_cap(req.kind, size)
        metrics.CAP_REJECTED.labels(req.kind.value).inc()
        log.error(
            "per-request cap rejected: sending smaller requests from now on",
            zone=req.dest.zone_name,
            kind=req.kind.value,
            items=refused,
            new_cap=size,
            error=str(exc),
        )

    def _send_with_retries(
        self,
        req: _Request,
        targets: list[Target],
        out: BatchResult,
        reserved: _Reserved | None,
    ) -> None:
        dest, kind, mode = req
        items = [t.item() for t in targets]
        first = [reserved]

        def attempt() -> None:
            if first[0] is not None:
                first[0], held = None, first[0].ticket
            else:
                waited, held = dest.limiter.acquire_ticket(kind, len(items), self._cancel)
                if waited:
                    metrics.LIMITER_WAIT.inc(waited)
            out.requests += 1
            try:
                request_id = self._attempt(dest, kind, mode, items, held)
                if request_id:
                    out.request_ids.append(request_id)
            finally:
                dest.limiter.completed(held)

        def on_retry(exc: BaseException, attempt_no: int, sleep: float) -> None:
            metrics.RETRIES.labels(kind.value).inc()
            log.warning(
                "purge retry",
                zone=dest.zone_name,
                kind=kind.value,
                items=len(items),
                attempt=attempt_no,
                sleep=round(sleep, 3),
                error=str(exc),
            )

        call_with_retries(attempt, self._policy, self._clock, on_retry, self._cancel)

    def _attempt(
        self,
        dest: Destination,
        kind: Kind,
        mode: Mode,
        items: Sequence[object],
        ticket: Ticket | None = None,
    ) -> str | None:
        """One request (its budget taken as ``ticket``); returns the API's request id."""
        started = time.perf_counter()
        status: int | None = None
        try:
            accepted = dest.client.purge(dest.zone_id, kind, list(items), mode)
            status = 200
        except RateLimited as exc:
            status = 429
            metrics.RATE_LIMITED.inc()
            dest.limiter.on_rate_limited(kind, exc.retry_after)
            raise
        except Exception as exc:
            status = getattr(exc, "status", None)
            raise
        finally:
            metrics.REQUESTS.labels(dest.zone_name, kind.value, metrics.status_class(status)).inc()
            metrics.REQUEST_SECONDS.labels(kind.value).observe(time.perf_counter() - started)
        dest.limiter.on_success()
        # What the API says is left: the model follows it (before this request's ticket ends).
        dest.limiter.learn_left(kind, accepted.remaining, accepted.reset_seconds, ticket)
        metrics.ITEMS_SENT.labels(kind.value).inc(len(items))
        log.info(
            "purge accepted",
            zone=dest.zone_name,
            kind=kind.value,
            mode=mode.value,
            items=len(items),
            request_id=accepted.request_id,
            purge_id=accepted.id,
        )
        return accepted.request_id
