"""``purge-worker trace``: which purges covered a URL, tag, host or prefix, or what became of an
event: read from the receipts topic over a time span (``--since``/``--until``), oldest first.

A URL is covered by a purge of that URL (any cache-key variant, unless ``--header`` names one),
of its host, of a prefix above it, or of its zone's everything. A warm request after a purge tells
whether the edge then missed (the purge took effect) or still hit. Exit 0 when something was
found, 1 when nothing was (like ``grep``), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from tqdm import tqdm

from worker.clock import parse_rfc3339, rfc3339
from worker.commands.purge import targets_from
from worker.config.settings import Config
from worker.errors import UsageError
from worker.kafka.reader import scan
from worker.observe import output
from worker.pending.cover import bare, covers, netloc
from worker.planning.planner import Planner, RecordPlan
from worker.planning.rules.outcome import RuleTarget
from worker.receipts import DEAD_LETTERED, PURGED, WARMED, events_of, read
from worker.targets import Kind, Mode, Target

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ITSELF = {
    Kind.FILES: "the URL",
    Kind.TAGS: "the tag",
    Kind.HOSTS: "the host",
    Kind.PREFIXES: "the prefix",
    Kind.EVERYTHING: "everything in the zone",
}
# Receipt kinds that may cover a URL without naming it.
_COVERING = (b'"kind":"hosts"', b'"kind":"prefixes"', b'"kind":"everything"')


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--url", help="a URL: the purges that covered it, and its warm checks")
    what.add_argument("--tag", help="a cache tag (with --zone if several zones use it)")
    what.add_argument("--host", help="a host name")
    what.add_argument("--prefix", help="a host/path prefix")
    what.add_argument("--event-id", help="an event's id: its purges or its dead letter")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --url: only this cache-key variant (repeatable)",
    )
    p.add_argument("--zone", help="with --tag: the zone (name or id)")
    p.add_argument(
        "--since",
        default="24h",
        help="from this time (RFC 3339) or this long ago (90s, 15m, 24h, 7d)",
    )
    p.add_argument("--until", help="up to this time or this long ago (default: now)")
    p.add_argument("--json", action="store_true", help="one JSON object per receipt found")


@dataclass(frozen=True)
class Query:
    """What is traced, and how to tell a receipt about it."""

    target: Target | None
    zone_id: str | None  # the target's zone, when a configured zone takes it
    event_id: str | None
    any_variant: bool  # a URL without --header: every cache-key variant of it

    def prefilter(self, raw: bytes) -> bool:
        """A cheap test on the raw receipt: can it be about this at all?"""
        if self.event_id is not None:
            return _json(self.event_id) in raw
        assert self.target is not None
        if _json(self.target.value) in raw:
            return True
        return self.target.kind is not Kind.TAGS and any(k in raw for k in _COVERING)

    def why(self, receipt: dict[str, Any]) -> str | None:
        """How the receipt concerns this (None: it does not)."""
        if self.event_id is not None:
            ids = [e.get("id") for e in events_of(receipt)]
            return "for this event" if self.event_id in ids else None
        t = self.target
        assert t is not None
        data, kind = receipt["data"], receipt["type"]
        if kind == WARMED:
            if t.kind is not Kind.FILES or data.get("url") != t.value:
                return None
            return "warm check" if self._variant(data.get("headers")) else None
        if kind != PURGED:
            return None
        items = data.get("items") or []
        same_zone = self.zone_id is None or data.get("zone_id") == self.zone_id
        if data.get("kind") == t.kind.value and same_zone:
            for item in items:
                if self._same(item):
                    return _ITSELF[t.kind]
        if t.kind in (Kind.TAGS, Kind.EVERYTHING) or not same_zone:
            return None
        path = bare(t.value) if t.kind is Kind.FILES else t.value
        if data.get("kind") == "everything" and self.zone_id is not None:
            return "everything in the zone"
        host = netloc(path)
        if data.get("kind") == "hosts" and t.kind is not Kind.HOSTS and host in items:
            return "its host"
        if data.get("kind") == "prefixes" and t.kind is not Kind.HOSTS:
            for item in items:
                if isinstance(item, str) and item != t.value and covers(item, path):
                    return f"prefix {item}"
        return None

    def _same(self, item: Any) -> bool:
        t = self.target
        assert t is not None
        if isinstance(item, dict):
            return item.get("url") == t.value and self._variant(item.get("headers"))
        return item == t.value and (self.any_variant or not t.headers)

    def _variant(self, headers: Any) -> bool:
        t = self.target
        assert t is not None
        if self.any_variant:
            return True
        pairs = tuple(headers.items()) if isinstance(headers, dict) else ()
        return sorted(pairs) == sorted(t.headers)


def run(args: argparse.Namespace, config: Config) -> int:
    topic = config.kafka.receipts_topic
    if not topic:
        raise UsageError("kafka.receipts_topic is null: this worker writes no receipts to trace")
    now = time.time()
    since = _moment(args.since, now, "--since")
    until = now if args.until is None else _moment(args.until, now, "--until")
    if until < since:
        raise UsageError(f"--until ({rfc3339(until)}) is before --since ({rfc3339(since)})")
    query = _query(args, config)
    bar = tqdm(unit="rec", desc="trace", file=sys.stderr) if sys.stderr.isatty() else None

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total, bar.n = total, done
            bar.refresh()

    found = []
    try:
        for at_ms, value in scan(
            config.kafka, topic, since, query.prefilter, progress=progress, until=until
        ):
            receipt = read(value)
            if receipt is None:
                continue
            why = query.why(receipt)
            if why is not None:
                found.append((at_ms, why, receipt))
    finally:
        if bar is not None:
            bar.close()
    found.sort(key=lambda f: (f[2].get("time", ""), f[0]))
    for _, why, receipt in found:
        if args.json:
            output.json_line({"matched": why, "receipt": receipt})
        else:
            output.line(_describe(why, receipt))
    # On stderr, with --json too: stdout stays one JSON object per line.
    span = f"from {rfc3339(since)} to {rfc3339(until)}"
    purges = sum(1 for _, _, r in found if r["type"] == PURGED)
    output.line(f"{len(found)} receipts ({purges} purges) in {topic} {span}", err=True)
    return 0 if found else 1


def _query(args: argparse.Namespace, config: Config) -> Query:
    if args.event_id is not None:
        if args.header:
            raise UsageError("--header goes with --url")
        return Query(None, None, args.event_id, False)
    if args.header and not args.url:
        raise UsageError("--header goes with --url")
    picked = argparse.Namespace(
        url=[args.url] if args.url else [],
        header=args.header,
        tag=[args.tag] if args.tag else [],
        host=[args.host] if args.host else [],
        prefix=[args.prefix] if args.prefix else [],
        everything=False,
        yes=False,
        zone=args.zone,
    )
    (target,) = targets_from(picked)
    plan = Planner(config.planning).route([RuleTarget(target, Mode.PURGE, "trace")], RecordPlan())
    zone_id = plan.targets[0].zone.id if plan.targets else None
    if target.kind is Kind.TAGS and args.zone is None:
        zone_id = None  # a tag without a zone: any zone's purge of it
    return Query(target, zone_id, None, target.kind is Kind.FILES and not args.header)


def _moment(text: str, now: float, flag: str) -> float:
    ago = _AGO.match(text.strip())
    if ago:
        return now - float(ago.group(1)) * _UNIT[ago.group(2)]
    at = parse_rfc3339(text)
    if at is None:
        raise UsageError(
            f"{flag} {text!r}: expected a time like 2026-11-27T10:00:00Z or a span like 15m, "
            "24h, 7d"
        )
    return at


def _json(text: str) -> bytes:
    """``text`` as it appears inside a receipt's JSON (without the quotes)."""
    return msgspec.json.encode(text)[1:-1]


def _describe(why: str, r: dict[str, Any]) -> str:
    d, at = r["data"], r.get("time", "?")
    if r["type"] == WARMED:
        cache = str(d.get("cache_status", "?"))
        verdict = {
            "hit": "HIT: the purge did not take effect",
            "miss": "MISS: the purge took effect",
            "expired": "EXPIRED: the purge took effect",
            "revalidated": "REVALIDATED: the purge took effect",
        }.get(cache, cache)
        return f"{at}  warmed         {d.get('url')}  {verdict} (status {d.get('status')})"
    if r["type"] == DEAD_LETTERED:
        e = d.get("event") or {}
        return (
            f"{at}  dead-lettered  {d.get('error_class')}: {d.get('reason')}  "
            f"({e.get('topic')}[{e.get('partition')}]@{e.get('offset')}, "
            f"to {d.get('dead_letter_topic')})"
        )
    events = events_of(r)
    named = ", ".join(
        f"{e.get('id') or '-'} {e.get('topic')}[{e.get('partition')}]@{e.get('offset')}"
        for e in events[:5]
    )
    more = f" and {len(events) - 5} more" if len(events) > 5 else ""
    requests = ",".join(d.get("request_ids") or []) or "-"
    done = "invalidated" if d.get("mode") == "invalidate" else "purged"
    return (
        f"{at}  {done:<13}  {d.get('zone')} {d.get('kind')} "
        f"({len(d.get('items') or [])} items; matched: {why})  sent {d.get('sent_at')}  "
        f"request {requests}  events: {named or '-'}{more}"
    )
