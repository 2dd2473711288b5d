"""``purge-worker explain``: the purge plan one event produces, as JSON; purges nothing."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from worker.clock import SystemClock
from worker.config.settings import Config
from worker.errors import UsageError
from worker.events import Record
from worker.observe import output
from worker.pending.coalescer import Coalescer
from worker.planning.planner import Planner


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "event", nargs="?", default="-", help="event JSON file, or - for stdin (default)"
    )
    p.add_argument("--topic", help="the topic the event came from (default: the first configured)")
    p.add_argument("--key", help="the record key")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a record header, e.g. ce_type=article.published (repeatable)",
    )


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:  # noqa: PTH123 (plain read of a user-given path)
            return f.read()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def run(args: argparse.Namespace, config: Config) -> int:
    headers = []
    for h in args.header:
        name, sep, value = h.partition("=")
        if not sep:
            raise UsageError(f"--header {h!r}: expected NAME=VALUE")
        headers.append((name, value.encode()))
    topic = args.topic or config.kafka.topics[0]
    record = Record(
        topic, 0, 0, args.key.encode() if args.key else None, _read(args.event), tuple(headers)
    )
    plan_out, code = explain(record, config)
    output.json_line(plan_out, indent=2)
    if code:
        first, *more = plan_out["errors"]
        also = f' (and {len(more)} more: see "errors" above)' if more else ""
        output.line(
            f"purge-worker explain: the event would be dead-lettered: "
            f"{first['class']}: {first['message']}{also}",
            err=True,
        )
    return code


def explain(record: Record, config: Config) -> tuple[dict[str, Any], int]:
    """The plan as a JSON-able dict, and the exit code (2 when the event would be dead-lettered).

    The targets come from the same ``Planner`` that ``run`` uses, grouped into requests as the
    coalescer would group them when they are all pending at once."""
    # The API's clients, imported when an event is explained, not for `explain --help`.
    from worker import app  # noqa: PLC0415

    plan = Planner(config.planning).plan(record)
    out: dict[str, Any] = {"event": None, "rules_fired": plan.fired, "purges": [], "errors": []}
    if plan.event is not None:
        event = plan.event
        out["event"] = {"id": event.id, "type": event.type, "format": event.format}
        out["event"]["topic"] = event.topic
    for exc in plan.errors:
        out["errors"].append(
            {"class": exc.error_class, "message": str(exc), "action": "dead_letter"}
        )
    for exc in plan.dropped:
        out["errors"].append({"class": exc.error_class, "message": str(exc), "action": "drop"})
    accounts = app.accounts(config, SystemClock())
    zones = {z.id: z for z in config.zones}
    coalescer = Coalescer(0, accounts.cap, SystemClock())
    for routed in plan.targets:
        coalescer.add(routed.zone.id, routed.mode, routed.target, "explain")
    for batch in coalescer.flush_all():
        out["purges"].append(
            {
                "zone": zones[batch.zone_id].name,
                "zone_id": batch.zone_id,
                "mode": batch.mode.value,
                "kind": batch.kind.value,
                "items": [t.item() for t in batch.targets],
            }
        )
    accounts.close()
    # Fetched again once the record is purged (rules with ``warm``; warming.enabled).
    out["warm"] = [
        {
            "zone": routed.zone.name,
            "url": routed.target.value,
            "headers": dict(routed.target.headers),
        }
        if routed.target.headers
        else {"zone": routed.zone.name, "url": routed.target.value}
        for routed in plan.warm
    ]
    if plan.skipped:
        out["note"] = "no rule matched: the record would be skipped"
    out["dead_letter"] = bool(plan.errors)
    return out, 2 if plan.errors else 0
