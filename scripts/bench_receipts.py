"""What receipts cost: ``make bench``'s backlog, catch-up (enterprise, pro) and ingest parts, run
with receipts off and on by the same code and formulas as ``make bench`` (``scripts/bench.py``).

One broker and one backlog serve every drain, each drain a consumer group (and a receipts topic)
of its own. Off and on alternate in pairs whose order flips from pair to pair (off-on, on-off,
off-on), so a drift of the machine over the run (page cache, the broker's JVM warming up) lands
on both modes alike; each figure is the median of ``PAIRS`` drains with its spread.
Prints one JSON line per drain and a Markdown table.

    python scripts/bench_receipts.py        # `make bench-receipts`; alone, ~5 minutes
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = 3
PARTS = ("enterprise", "pro", "ingest")


def order(pair: int) -> tuple[bool, bool]:
    """Receipts off then on in even pairs, on then off in odd ones."""
    return (False, True) if pair % 2 == 0 else (True, False)


def main() -> int:
    from scripts import bench
    from scripts.bench import _git, machine
    from scripts.kafka_broker import Broker

    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    bench.compiled()
    broker = Broker().start()
    try:
        backlog = bench.aged_backlog(broker.bootstrap)
        for part in PARTS:
            plan = None if part == "ingest" else part
            for pair in range(PAIRS):
                for receipts in order(pair):
                    tag = f"-{'on' if receipts else 'off'}{pair}"
                    r = bench.catch_up(broker.bootstrap, backlog, plan, receipts=receipts, run=tag)
                    runs.setdefault((part, receipts), []).append(r)
                    line = {"part": part, "receipts": receipts, "pair": pair, **r}
                    print(json.dumps(line), flush=True)
    finally:
        broker.cleanup()

    commit = _git("rev-parse", "--short", "HEAD")
    print(f"\n`python scripts/bench_receipts.py` on {machine()}, commit {commit}: ")
    print(f"{PAIRS} drains per mode, alternating; median (min to max).\n")
    print("| part | figure | receipts off | receipts on | on ÷ off (medians) |")
    print("|---|---|---|---|---|")
    for part in PARTS:
        for key in ("wall_s", "ratio", "items_sent"):
            off = [r[key] for r in runs[part, False]]
            on = [r[key] for r in runs[part, True]]
            a, b = statistics.median(off), statistics.median(on)
            print(f"| {part} | {key} | {_spread(off)} | {_spread(on)} | {b / a:.3f} |")
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"


if __name__ == "__main__":
    sys.exit(main())
