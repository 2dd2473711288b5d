"""Planning in a second process, beside the loop.

In a backlog the loop is CPU-bound, and one Python process runs on one core at a time. The
loop keeps Kafka's client, the ledger, the pending set and the requests; decoding, rules and
routing (``Planner.planned``) run in a child process on another core, a poll's batch at a time,
while the loop reads the next batch and sends purges.

The child is forked before the worker starts any thread (``run`` starts it first), so it holds
the compiled config and plug-ins as they were loaded. What comes back is the plan without the
event (the loop needs only its id and times), its targets as numbers (``numbering``). The child
ignores SIGINT and SIGTERM: the worker stops it by closing the pipe, and a killed worker's pipe
closes too, so the child never outlives it.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from worker.errors import PurgeWorkerError
from worker.events import Record
from worker.planning.numbering import Numbered, Numbering
from worker.planning.planner import Planned, Planner, PlanningSettings
from worker.runtime import freeze_before_fork, tune_gc_thresholds

# How long the child may take to exit once its pipe is closed, before it is killed.
EXIT_WAIT = 1.0
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# The worker's to act on (it stops, then closes the pipe); the child ignores them.
TERMINAL_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Bytes each pipe holds (Linux's default ceiling for an unprivileged process). A poll's batch of
# records (about 400 KB in the benchmark's backlog) then goes in one write. With the default
# 64 KB, the worker blocked on every batch until the child's reader thread, competing for the
# child's GIL with its planning, took each 64 KB out (3 ms a batch, a tenth of the loop's time).
PIPE_BYTES = 1 << 20
# While the loop waits for plans, how often it looks up to do something else meanwhile.
WAIT_STEP = 0.005


def usable_cpus(cgroup: Path = CGROUP_CPU_MAX) -> float:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a pod's limit)."""
    cpus: float = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity it is
    return cpus


def wanted(setting: str, cpus: float | None = None) -> bool:
    """Whether ``delivery.planning`` asks for the planning process."""
    if setting == "auto":
        return (usable_cpus() if cpus is None else cpus) >= 2
    return setting == "process"


class PlannerDied(PurgeWorkerError):
    """The planning process ended: the worker stops (its unfinished records are redelivered)."""


class PlanningProcess:
    """The planning process, from the worker's side: batches of records out, plans back."""

    def __init__(self, settings: PlanningSettings) -> None:
        self._settings = settings
        self._conn: Connection | None = None  # plans come back on it
        self._out: Connection | None = None  # batches go out on it
        self._process: Any = None
        self._batches: deque[int] = deque()  # sizes of the batches sent and not yet answered
        self._numbered = Numbered()  # what the child numbered, to read its rows with

    def start(self) -> PlanningProcess:
        # What is buffered now would be written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        freeze_before_fork()
        context = multiprocessing.get_context("fork")
        # One pipe each way rather than a socket pair: a pipe's capacity can be raised.
        batches_in, batches_out = context.Pipe(duplex=False)
        plans_in, plans_out = context.Pipe(duplex=False)
        for conn in (batches_out, plans_out):
            _widen(conn)
        self._process = context.Process(
            target=_serve,
            args=(self._settings, batches_in, plans_out, (batches_out, plans_in)),
            name="purge-worker-planner",
            daemon=True,
        )
        # Signals wait (in both processes) until the child ignores them: a Ctrl-C at start-up
        # must stop the worker, not kill its planner first.
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
        batches_in.close()
        plans_out.close()
        self._conn, self._out = plans_in, batches_out
        return self

    @property
    def alive(self) -> bool:
        return self._conn is not None

    def submit(self, records: list[Record]) -> None:
        """Send a batch to be planned; its plans come back, in order, from ``collect``."""
        try:
            # Plain tuples: a named tuple crosses the pipe as a call to its class.
            self._live(self._out).send([tuple(record) for record in records])
        except OSError as exc:
            raise self._died(exc) from None
        self._batches.append(len(records))

    def ready(self, wait: float = 0.0) -> bool:
        """The oldest batch's plans are in (or the child ended: ``collect`` says so), waiting
        up to ``wait`` seconds for them."""
        try:
            return self._live(self._conn).poll(wait)
        except (EOFError, OSError) as exc:
            raise self._died(exc) from None

    def collect(self, meanwhile: Callable[[], None] | None = None) -> list[Planned]:
        """The plans of the oldest batch sent, in its order; waits for them, calling
        ``meanwhile`` every ``WAIT_STEP`` of the wait."""
        conn = self._live(self._conn)
        try:
            if meanwhile is not None:
                while not conn.poll(WAIT_STEP):
                    meanwhile()
            reset, new, rows = conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(exc) from None
        if len(rows) != self._batches.popleft():
            raise self._died(None)
        return self._numbered.plans(reset, new, rows)

    def close(self) -> None:
        """Stop the child (it exits when the pipe closes); batches not collected are dropped."""
        self._batches.clear()
        for conn in (self._out, self._conn):
            if conn is not None:
                conn.close()
        self._conn = self._out = None
        if self._process is not None:
            self._process.join(EXIT_WAIT)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(EXIT_WAIT)

    @staticmethod
    def _live(conn: Connection | None) -> Connection:
        """``conn`` (one of the two pipes' ends, opened and closed together), or ``PlannerDied``."""
        if conn is None:
            raise PlannerDied("the planning process is not running")
        return conn

    def _died(self, cause: BaseException | None) -> PlannerDied:
        code = self._process.exitcode if self._process is not None else None
        self.close()
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return PlannerDied(f"the planning process ended (exit code {code}){why}")


def _widen(conn: Connection) -> None:
    """Let ``conn``'s pipe hold ``PIPE_BYTES``. Over /proc/sys/fs/pipe-max-size, or not on
    Linux, the pipe keeps its default capacity."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _serve(
    settings: PlanningSettings,
    conn: Connection,
    plans: Connection,
    workers_ends: tuple[Connection, ...],
) -> None:
    """The child: plan every batch that comes on ``conn``, answer on ``plans``, until the pipe
    closes."""
    # The fork copied the worker's ends of the pipes too: holding them, the child would never
    # see the pipe close when the worker goes.
    for end in workers_ends:
        end.close()
    for signum in TERMINAL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)
    tune_gc_thresholds()
    planner = Planner(settings)
    numbers = Numbering()
    # A thread takes every batch off the pipe as it comes: the worker may send the next batch
    # while this one's plans are on their way back, and neither side must wait on the other.
    # Batches wait as the bytes they came as (half the memory of the records they hold: a
    # backlog is read up to ``stage.READ_AHEAD`` records ahead).
    batches: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(conn, batches), daemon=True).start()
    while (batch := batches.get()) is not None:
        records: list[tuple[Any, ...]] = ForkingPickler.loads(batch)
        del batch
        reset = numbers.start_batch()
        rows = [numbers.row(planner.planned(Record._make(r))) for r in records]
        try:
            plans.send((reset, numbers.take_new(), rows))
        except OSError:
            return
        sys.stdout.flush()  # a line logged while planning (a plug-in's bug) shows now


def _read(conn: Connection, batches: queue.SimpleQueue[bytes | None]) -> None:
    while True:
        try:
            batches.put(conn.recv_bytes())
        except (EOFError, OSError):
            batches.put(None)
            return
