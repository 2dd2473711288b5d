"""``purge-worker replay``: re-drive records from a dead-letter topic.

Two modes: ``--mode purge`` (default) runs them through the loop again, so fixed rules take
effect, within the account's rate budget; ``--mode republish`` puts the original record back on its
topic (or ``--to``) for the workers to take. Filters, ``--max``, ``--dry-run``; a progress bar on a
terminal, periodic lines otherwise; a summary at the end.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import structlog
from tqdm import tqdm

from worker import app
from worker.clock import SystemClock, parse_rfc3339
from worker.config.settings import Config
from worker.errors import DeadLetterGuardTripped, RetryableError, UsageError
from worker.events import Record
from worker.kafka.dead_letters import KafkaDeadLetterSink, Republisher
from worker.kafka.reader import DeadLetterReader
from worker.observe import output
from worker.outcome.dead_letters import DeadLetterSink, DeadLetterWrite, ReplayFilter, describe
from worker.outcome.warming import Warmer
from worker.runtime import tune_gc

log = structlog.get_logger("worker.replay")
PLAIN_PROGRESS_SECONDS = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="the dead-letter topic to read")
    p.add_argument(
        "--mode",
        choices=["purge", "republish"],
        default="purge",
        help="purge again through the rules (default), or republish the original record",
    )
    p.add_argument("--to", help="republish to this topic instead of each record's original topic")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        help="only this purge.error.class (repeatable)",
    )
    p.add_argument("--since", help="only records that failed at or after this time (RFC 3339)")
    p.add_argument("--until", help="only records that failed before this time (RFC 3339)")
    p.add_argument("--original-topic", help="only records first read from this topic")
    p.add_argument("--max", type=int, default=None, help="stop after this many matching records")
    p.add_argument(
        "--group",
        help="consumer group for the replay's progress "
        "(default: <kafka.group_id>.replay); a new group starts from the beginning",
    )
    p.add_argument(
        "--budget-share",
        type=float,
        default=0.5,
        help="share of each account's rate budget the replay may use (default 0.5)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would happen; change nothing")
    p.add_argument(
        "--warm",
        action="store_true",
        help="warm the URLs of rules with `warm` after their purge (off by default: a replay "
        "may purge many pages at once)",
    )


class _Progress:
    def __init__(self, total: int, reader: DeadLetterReader) -> None:
        self.reader = reader
        self.bar = (
            tqdm(total=total, unit="rec", desc="replay", file=sys.stderr)
            if sys.stderr.isatty()
            else None
        )
        self.last = time.monotonic()
        self.started = self.last

    def update(self) -> None:
        c = self.reader.counts
        if self.bar is not None:
            self.bar.n = c.scanned
            self.bar.set_postfix(replayed=c.replayed, skipped=c.skipped, failed=c.failed_again)
            self.bar.refresh()
        elif time.monotonic() - self.last >= PLAIN_PROGRESS_SECONDS:
            self.last = time.monotonic()
            rate = c.scanned / max(1e-9, self.last - self.started)
            print(
                f"replay: scanned {c.scanned}, replayed {c.replayed}, skipped {c.skipped}, "
                f"failed again {c.failed_again} ({rate:.0f} rec/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _CountingSink:
    """Counts records dead-lettered again, and passes them on."""

    def __init__(self, inner: DeadLetterSink, reader: DeadLetterReader) -> None:
        self.inner = inner
        self.reader = reader

    def submit(self, record: Record, headers: list[tuple[str, bytes]]) -> DeadLetterWrite:
        write = self.inner.submit(record, headers)
        return _Counted(write, self.reader)

    def close(self, timeout: float = 10.0) -> None:
        self.inner.close(timeout)


class _Counted:
    """Counts a record as failed again once its dead-letter write is confirmed."""

    def __init__(self, inner: DeadLetterWrite, reader: DeadLetterReader) -> None:
        self.inner = inner
        self.reader = reader
        self.counted = False

    def done(self) -> bool:
        return self.inner.done()

    def error(self) -> RetryableError | None:
        error = self.inner.error()
        if error is None and not self.counted:
            self.counted = True
            self.reader.counts.failed_again += 1
        return error


def run(args: argparse.Namespace, config: Config) -> int:
    if args.max is not None and args.max < 1:
        raise UsageError("--max must be at least 1")
    if not 0 < args.budget_share <= 1:
        raise UsageError("--budget-share must be in (0, 1]")
    if args.to and args.mode != "republish":
        raise UsageError("--to only applies to --mode republish")
    flt = ReplayFilter(
        classes=frozenset(args.classes),
        since=_time(args.since) if args.since else None,
        until=_time(args.until) if args.until else None,
        original_topic=args.original_topic,
    )
    group = args.group or f"{config.kafka.group_id}.replay"
    if not args.dry_run and args.mode == "purge" and config.missing_credentials():
        raise UsageError(config.missing_credentials()[0])
    reader = DeadLetterReader(config.kafka, args.source, group, flt, args.max)
    progress = _Progress(reader.total, reader)
    stop = threading.Event()
    interrupted = False
    try:
        if args.dry_run:
            _dry_run(reader, progress, args)
        elif args.mode == "republish":
            _republish(reader, progress, config, args.to, stop)
        else:
            _purge(reader, progress, config, args.budget_share, stop, warm=args.warm)
    except KeyboardInterrupt:
        interrupted = True
        output.line(
            "replay: interrupted; progress so far is committed, run again to resume", err=True
        )
    finally:
        progress.close()
    c = reader.counts
    summary: dict[str, Any] = {
        "scanned": c.scanned,
        "matched": c.matched,
        "replayed": c.replayed,
        "skipped": c.skipped,
        "failed_again": c.failed_again,
        "by_class": c.by_class,
        "dry_run": args.dry_run,
        "mode": args.mode,
    }
    output.json_line(summary)
    if interrupted:
        return 130  # what a shell expects of a command stopped by Ctrl-C
    return 1 if c.failed_again else 0


def _time(text: str) -> float:
    """``--since``/``--until``: an RFC 3339 time, with ``Z`` or an offset."""
    at = parse_rfc3339(text)
    if at is None:
        raise UsageError(f"{text!r} is not a time like 2026-11-27T10:00:00Z (with Z or an offset)")
    return at


def _dry_run(reader: DeadLetterReader, progress: _Progress, args: argparse.Namespace) -> None:
    while not reader.exhausted:
        for record in reader.poll(0.5, 500):
            target = args.to or (record.origin or record).topic
            action = f"republish to {target}" if args.mode == "republish" else "purge again"
            output.json_line({**describe(record), "would": action})
        progress.update()
    reader.close()


def _republish(
    reader: DeadLetterReader,
    progress: _Progress,
    config: Config,
    to: str | None,
    stop: threading.Event,
) -> None:
    republisher = Republisher(config.kafka)
    try:
        while not reader.exhausted and not stop.is_set():
            for record in reader.poll(0.5, 500):
                origin = record.origin or record
                republisher.send(to or origin.topic, record.key, record.value, origin.headers)
                reader.counts.replayed += 1
            # Everything scanned so far is either confirmed republished or filtered out.
            reader.commit_scanned()
            progress.update()
    finally:
        republisher.close(timeout=1)
        reader.close(timeout=1)


def _purge(
    reader: DeadLetterReader,
    progress: _Progress,
    config: Config,
    share: float,
    stop: threading.Event,
    *,
    warm: bool = False,
) -> None:
    clock = SystemClock()
    warmer = Warmer(config.warming, clock).start() if warm and config.rules.warms else None
    # Replayed records that fail again go back to the dead-letter topic they came from.
    kafka = config.kafka.model_copy(update={"dead_letter_topic": reader.topic})
    sink = _CountingSink(KafkaDeadLetterSink(kafka), reader)
    # The replay's share of the budget is fixed: the workers keep the rest.
    loop = app.build_loop(
        replace(config, kafka=kafka), reader, sink, clock, fixed_share=share, warmer=warmer
    )
    loop.status.running = True

    counts = reader.counts

    def account() -> None:
        # Finished records either purged (replayed) or went back to the dead-letter topic.
        counts.replayed = counts.matched - len(loop.outcome.records) - counts.failed_again

    try:
        tune_gc()
        while not stop.is_set() and not (reader.exhausted and loop.idle):
            loop.step()
            account()
            progress.update()
    except DeadLetterGuardTripped as exc:
        log.error("replay stopped: dead-letter guard tripped", reason=str(exc))
    except KeyboardInterrupt:
        # Ctrl-C means now: commit what is finished, abandon the rest (a rerun redoes it).
        loop.drain(deadline_seconds=0)
        account()
        raise
    loop.drain()
    account()
    if warmer is not None:
        # What was purged last is still waiting for its delay: give it that long, then stop.
        clock.sleep(config.warming.delay_seconds)
        warmer.close(timeout=config.warming.timeout_seconds)
