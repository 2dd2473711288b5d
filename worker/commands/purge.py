"""``purge-worker purge``: an ad-hoc purge with the worker's validation, batching and limits."""

from __future__ import annotations

import argparse
from typing import Any

from worker import app
from worker.clock import SystemClock
from worker.config.settings import Config
from worker.errors import InvalidTarget, UsageError
from worker.kafka.exchange import member_id
from worker.kafka.receipts import KafkaReceiptSink
from worker.observe import output
from worker.outcome.warming import Warmer
from worker.pending.coalescer import Coalescer
from worker.planning.planner import Planner, RecordPlan, Routed
from worker.planning.rules.outcome import RuleTarget
from worker.receipts import Purge, purge_receipt, source_of
from worker.sending.purger import Purger
from worker.targets import Kind, Mode, Target

# How long the purge waits at its end for its receipts to be written; a broker that is away costs
# the receipts (and one warning), never the purge.
RECEIPTS_WAIT = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", action="append", default=[], help="a URL (repeatable)")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a cache-key header sent with every --url (repeatable)",
    )
    p.add_argument("--tag", action="append", default=[], help="a cache tag (repeatable)")
    p.add_argument("--host", action="append", default=[], help="a host name (repeatable)")
    p.add_argument("--prefix", action="append", default=[], help="host/path prefix (repeatable)")
    p.add_argument("--everything", action="store_true", help="purge the whole zone (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --everything")
    p.add_argument("--zone", help="zone name or id, for --tag and --everything")
    p.add_argument(
        "--invalidate", action="store_true", help="mark stale and revalidate instead of deleting"
    )
    p.add_argument("--dry-run", action="store_true", help="print the requests, send nothing")
    p.add_argument(
        "--warm",
        action="store_true",
        help="after the purge, fetch each --url again (per the warming settings) and print "
        "what the edge answered",
    )


def targets_from(args: argparse.Namespace) -> list[Target]:
    headers = {}
    for h in args.header:
        name, sep, value = h.partition("=")
        if not sep:
            raise UsageError(f"--header {h!r}: expected NAME=VALUE")
        headers[name] = value
    try:
        targets = [Target.url(u, headers or None) for u in args.url]
        targets += [Target.tag(t, args.zone) for t in args.tag]
        targets += [Target.host(h) for h in args.host]
        targets += [Target.prefix(p) for p in args.prefix]
    except InvalidTarget as exc:
        raise UsageError(str(exc)) from None
    if args.everything:
        if not args.yes:
            raise UsageError("--everything empties the zone's cache: add --yes to confirm")
        if not args.zone:
            raise UsageError("--everything needs --zone")
        targets.append(Target.everything(args.zone))
    if not targets:
        raise UsageError("nothing to purge: give --url, --tag, --host, --prefix or --everything")
    return targets


def run(args: argparse.Namespace, config: Config) -> int:
    targets = targets_from(args)
    mode = Mode.INVALIDATE if args.invalidate else Mode.PURGE
    plan = Planner(config.planning).route(
        (RuleTarget(t, mode, "command line") for t in targets), RecordPlan()
    )
    if plan.errors or plan.dropped:
        raise UsageError(str((plan.errors or plan.dropped)[0]))
    clock = SystemClock()
    accounts = app.accounts(config, clock)
    # Every target pending at once, cut into requests as the worker's coalescer cuts them.
    coalescer = Coalescer(0, accounts.cap, clock)
    for routed in plan.targets:
        coalescer.add(routed.zone.id, routed.mode, routed.target, "command line")
    zones = {z.id: z for z in config.zones}
    purger = Purger(config.delivery.retry, clock)
    receipts = None if args.dry_run else _receipts(config)
    failed = 0
    warm: list[Routed] = []
    for batch in coalescer.flush_all():
        line: dict[str, Any] = {
            "zone": zones[batch.zone_id].name,
            "kind": batch.kind.value,
            "mode": mode.value,
            "items": [t.item() for t in batch.targets],
        }
        if args.dry_run:
            # Nothing is sent, so nothing is accepted: say what would go, and no more.
            output.json_line({**line, "dry_run": True, "would_send": len(batch.targets)})
            continue
        sent_at = clock.time()
        result = purger.send(accounts.destinations[batch.zone_id], batch.kind, mode, batch.targets)
        if receipts is not None and result.accepted:
            purge = Purge(
                zone=line["zone"],
                zone_id=batch.zone_id,
                mode=mode,
                kind=batch.kind,
                targets=tuple(result.accepted),
                sent_at=sent_at,
                accepted_at=clock.time(),
                request_ids=tuple(result.request_ids),
                events=(),
            )
            receipts.submit(
                *purge_receipt(purge, source_of(config.kafka.group_id), receipts.member)
            )
        output.json_line(
            {
                **line,
                "requests": result.requests,
                "accepted": len(result.accepted),
                "failed": [{"item": t.item(), "error": str(e)} for t, e in result.failed],
                "dry_run": False,
            }
        )
        failed += len(result.failed)
        if args.warm:
            accepted = set(result.accepted)
            warm += [
                r for r in plan.targets if r.target in accepted and r.target.kind is Kind.FILES
            ]
    accounts.close()
    if receipts is not None:
        receipts.close(RECEIPTS_WAIT)
    if warm and not args.dry_run:
        _warm(config, warm, clock)
    return 1 if failed else 0


def _receipts(config: Config) -> KafkaReceiptSink | None:
    """Where the purge's receipts go, as the worker's do: ``trace`` finds an ad-hoc purge too,
    and running workers' ledgers learn it (a record it covers then needs no request)."""
    topic = config.kafka.receipts_topic
    if not topic:
        return None
    return KafkaReceiptSink(config.kafka, topic, member_id(f"{config.kafka.group_id}/purge"))


def _warm(config: Config, urls: list[Routed], clock: SystemClock) -> None:
    """Fetch the purged URLs again, as the worker's warmer does, and print what each answered
    (``cache_status``: miss, expired or revalidated is the proof that the purge took effect)."""
    for line in Warmer(config.warming, clock).warm_now(urls):
        output.json_line({"warm": True, **line})
