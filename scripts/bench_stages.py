"""Run the worker with a clock on each stage of its loop: ``make bench``'s breakdown of a drain.

    python scripts/bench_stages.py OUT.json RECORDS run -c worker.yaml

The worker runs as ``purge-worker run`` does, against the real broker and the emulator. Each
stage's method on the loop's thread is wrapped to add up its wall time and its thread CPU
(``time.thread_time``), its own time apart from the stages it calls. When the loop starts to
drain (the bench stops the worker once every offset is committed), OUT.json gets the totals, the
CPU of the worker's other threads and of its planning process, and when the first record and
the RECORDS-th record were read (wall-clock seconds since the epoch). Two counts beside the
clocks: the records whose targets met the pending stage one by one (``PendingTargets.pend``: a
record whose targets are not all known purged yet; the others are finished at once), and each
purge request's wall time on its thread (``Purger.send``).

A clock costs about a microsecond a call, and the loop makes a few hundred such calls a drain;
the counter on ``pend`` about 0.04 µs a call (measured alone), over a few tens of thousands.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (module, class, method, what the bench calls it), in the order a record meets them.
STAGES = [
    (
        "worker.intake.stage",
        "Intake",
        "poll",
        "Kafka poll: kafka-python's fetch, the worker's reading of records",
    ),
    ("worker.planning.stage", "Planning", "submit", "records to the planning process"),
    ("worker.planning.process", "PlanningProcess", "collect", "plans back (waiting included)"),
    (
        "worker.loop",
        "Loop",
        "_pend",
        "plans applied: records that wait for nothing finished, the others' targets pended",
    ),
    ("worker.loop", "Loop", "_send_and_settle", "sending, and settling what ended"),
    ("worker.loop", "Loop", "_follow_shares", "budget shares and lag"),
    ("worker.outcome.stage", "Outcome", "finish", "finishing records that waited for purges"),
    ("worker.outcome.commit", "CommitPolicy", "maybe_commit", "committing"),
    ("worker.loop", "Loop", "step", "the rest: opening a poll's records, status, back-pressure"),
]


class Clocks:
    """Own wall and CPU time per stage, on the loop's thread only."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # label: [wall, cpu, calls]
        self._stack: list[list[float]] = []  # per open call: [wall, cpu] of the stages inside
        self._loop_thread = threading.main_thread()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)  # a renamed stage fails the bench here, loudly
        totals = self.totals.setdefault(label, [0.0, 0.0, 0.0])

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._loop_thread:
                return original(*args, **kwargs)
            inner = [0.0, 0.0]
            self._stack.append(inner)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                self._stack.pop()
                totals[0] += wall - inner[0]
                totals[1] += cpu - inner[1]
                totals[2] += 1
                if self._stack:
                    self._stack[-1][0] += wall
                    self._stack[-1][1] += cpu

        setattr(owner, name, timed)


def child_cpu() -> float | None:
    """CPU seconds of the planning process (the worker's one child), or None without one."""
    pid = os.getpid()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            return None
        fields = Path(f"/proc/{children[0]}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_pended() -> list[int]:
    """A counter of ``PendingTargets.pend`` calls (one a record, on the loop's thread)."""
    stage = importlib.import_module("worker.pending.stage").PendingTargets
    pend, calls = stage.pend, [0]

    @functools.wraps(pend)
    def counted(self: Any, owner: Any, plan: Any) -> int:
        calls[0] += 1
        return pend(self, owner, plan)  # type: ignore[no-any-return]

    stage.pend = counted
    return calls


def time_requests() -> list[float]:
    """Each purge request's wall time on the thread that sent it (``Purger.send``)."""
    purger = importlib.import_module("worker.sending.purger").Purger
    send, walls = purger.send, []

    @functools.wraps(send)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return send(*args, **kwargs)
        finally:
            walls.append(time.perf_counter() - started)  # one append: atomic across threads

    purger.send = timed
    return walls


def main() -> None:
    out, records, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    clocks = Clocks()
    for module, cls, name, label in STAGES:
        clocks.wrap(getattr(importlib.import_module(module), cls), name, label)
    marks: dict[str, float] = {"imported": time.time()}
    read = 0
    intake = importlib.import_module("worker.intake.stage").Intake
    polled = intake.poll

    def poll(self: Any, timeout: float) -> Any:
        nonlocal read
        batch = polled(self, timeout)
        if batch and "first_record" not in marks:
            marks["first_record"] = time.time()
            # What start-up cost the loop's thread and the process, up to the first records.
            marks["first_record_thread_cpu_s"] = time.thread_time()
            marks["first_record_process_cpu_s"] = time.process_time()
        read += len(batch)
        if read >= records and "all_read" not in marks:
            marks["all_read"] = time.time()
        return batch

    intake.poll = poll
    pended, requests = count_pended(), time_requests()
    loop = importlib.import_module("worker.loop").Loop
    drain = loop.drain

    def drained(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Before the drain closes the planning process: everything up to the last commit.
        report = {
            "marks": marks,
            "stages": clocks.totals,
            "loop_thread_cpu_s": time.thread_time(),
            "process_cpu_s": time.process_time(),
            "planning_process_cpu_s": child_cpu(),
            "pended_records": pended[0],
            "request_wall_s": requests,
        }
        out.write_text(json.dumps(report))
        return drain(self, *args, **kwargs)

    loop.drain = drained
    from worker.cli import main as cli

    sys.argv = ["purge-worker", *argv]
    raise SystemExit(cli())


if __name__ == "__main__":
    main()
