"""What receipts cost: ``make bench``'s backlog, catch-up (enterprise, pro) and ingest parts, run
with receipts off and on, each on a fresh broker, by the same code and formulas as ``make bench``
(``scripts/bench.py``). Prints one JSON line per mode and a Markdown table.

    python scripts/bench_receipts.py        # `make bench-receipts`; alone, ~10 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("off", "on")


def measure() -> dict[str, Any]:
    """The three parts, as this process's ``BENCH_RECEIPTS`` says, on a broker of their own."""
    from scripts import bench
    from scripts.kafka_broker import Broker

    broker = Broker().start()
    try:
        backlog = bench.Backlog(broker.bootstrap)
        out: dict[str, Any] = {
            plan or "ingest": bench.catch_up(broker.bootstrap, backlog, plan)
            for plan in ("enterprise", "pro", None)
        }
        out["bare_read_s"] = backlog.bare_read_s
        return out
    finally:
        broker.cleanup()


def one(mode: str) -> dict[str, Any]:
    """``measure`` in a process of its own, with ``BENCH_RECEIPTS=mode``."""
    env = {**os.environ, "BENCH_RECEIPTS": mode}
    proc = subprocess.run(
        [sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=False
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"receipts {mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def main() -> int:
    if sys.argv[1:] == ["--one"]:
        print("RESULT " + json.dumps(measure()), flush=True)
        return 0
    from scripts.bench import _git, machine

    results = {}
    for mode in MODES:
        results[mode] = one(mode)
        print(json.dumps({"receipts": mode, **results[mode]}), flush=True)
    commit = _git("rev-parse", "--short", "HEAD")
    print(f"\n`python scripts/bench_receipts.py` on {machine()}, commit {commit}.\n")
    print("| part | figure | receipts off | receipts on | on ÷ off |")
    print("|---|---|---|---|---|")
    for part in ("enterprise", "pro", "ingest"):
        off, on = results["off"][part], results["on"][part]
        for key in ("wall_s", "ratio", "items_sent"):
            a, b = off.get(key), on.get(key)
            if a and b is not None:
                print(f"| {part} | {key} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
