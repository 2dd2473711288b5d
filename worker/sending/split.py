"""The arithmetic of sharing an account's budget by demand: what each worker reports, the
max-min fair split every worker computes alike (``allocate``), the step from one epoch's split
to the next that never lets a second hold more than the budget (``next_shares``), what a member
may take within an epoch once every other gave its share back (``taken_back``), and the board
of every member's recent reports, and what carries them (``Exchange``). No I/O and no clock:
``worker.sending.shares`` drives it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple, Protocol

EPOCH = 1.0
CUTOFF = 0.4
REPORT_INTERVAL = 0.25
REPORT_TTL = 3.0
# What a worker absent from the snapshot may spend: it is not yet in anyone's split.
JOINING_SHARE = 0.001
# Each member's floor, so a new burst starts at once; together never more than MAX_FLOORS.
# What idle members hold, the hot one cannot spend: at 1 %, three replicas of one hot
# partition sent 1,440 URL/s of pro's 1,500; at 0.5 %, 1,455. A burst on an idle member starts
# at the floor for at most about a second (until the next split counts its demand).
FLOOR = 0.005
MAX_FLOORS = 0.05
# A member that wants w of the budget is given up to w * HEADROOM, so a steady stream keeps
# its pace while its rate wobbles.
HEADROOM = 1.25
# Shares are cut to this grain (down, so they never sum above 1).
QUANTUM = 0.001
# The epoch a joining member reports: it has been allowed JOINING_SHARE since it started.
JOINING_EPOCH = -1
# Flex use is measured over a longer span: a flex request is rare and the bucket is long.
FLEX_SPAN = 10.0


class Demand(NamedTuple):
    """What one worker wants of an account's budgets, as fractions of each (may exceed 1)."""

    urls: float
    flex: float


class Shares(NamedTuple):
    urls: float
    flex: float


class Report(NamedTuple):
    """One member's report for one account."""

    at: float  # wall-clock time it was sent
    demand: Demand
    # The epoch whose split the member applied last (None: not split by demand) and the share of
    # URLs it has been allowed since.
    epoch: int | None
    allowed: float
    left: bool = False  # the member stopped (cleanly): its last report


def news(old: Report | None, new: Report) -> bool:
    """Whether ``new`` tells the others something they act on within an epoch that ``old``
    did not: a share or epoch, a stop, wanting URL budget or no longer (a burst elsewhere waits
    for idle members to give theirs back, and for their word that they did). Such a report
    goes out at once."""
    if old is None:
        return True
    then = (old.epoch, old.allowed, old.left, old.demand.urls > 0)
    return then != (new.epoch, new.allowed, new.left, new.demand.urls > 0)


def allocate(wants: Mapping[str, float]) -> dict[str, float]:
    """Each member's share of one budget from what each wants: max-min fair (a member wanting
    less than an even split gets what it wants, the rest split evenly among the others), every
    member at least a floor, and what nobody wants spread evenly. The same input gives the same
    output on every worker (members in sorted order); the shares never sum above 1."""
    members = sorted(wants)
    if not members:
        return {}
    floor = floor_for(len(members))
    need = {m: max(floor, wants[m] * HEADROOM) if wants[m] > 0 else floor for m in members}
    out: dict[str, float] = {}
    left = 1.0
    open_ = members
    while open_:
        even = left / len(open_)
        small = [m for m in open_ if need[m] <= even]
        if not small:
            out.update(dict.fromkeys(open_, even))
            left = 0.0
            break
        for m in small:
            out[m] = need[m]
            left -= need[m]
        open_ = [m for m in open_ if need[m] > even]
    spread = max(0.0, left) / len(members)
    return {m: math.floor((out[m] + spread) / QUANTUM) * QUANTUM for m in members}


def next_shares(
    targets: Mapping[str, float],
    allowed: Mapping[str, float | None],
    gone: float = 0.0,
) -> dict[str, float]:
    """The URL shares for an epoch, from this epoch's ``targets`` (``allocate``) and what each
    member's report says it was allowed in the epoch now ending (None: the report does not say,
    e.g. it was sent before the member applied the last split). ``gone``: what members that
    stopped within the last second were allowed.

    A share that falls falls at once: the member's requests of the last second are within its
    old share anyway. A share that rises takes only what nobody was allowed last epoch, split in
    proportion to the rises; while any member's last share is unknown, none rises. So a second
    that straddles the boundary holds at most each member's larger share, and those add up to at
    most the budget. (For a member whose last share is unknown the result is its target: that
    member itself must take no more than it had.)"""
    known = [a for a in allowed.values() if a is not None]
    free = 1.0 - sum(known) - gone if len(known) == len(allowed) else 0.0
    base = {m: targets[m] if a is None else min(targets[m], a) for m, a in allowed.items()}
    gaps = {m: targets[m] - base[m] for m in targets if targets[m] > base[m]}
    scale = min(1.0, max(0.0, free) / sum(gaps.values())) if gaps else 0.0
    return {m: _down(base[m] + gaps.get(m, 0.0) * scale) for m in targets}


def last_allowed(
    live: Mapping[str, Report], newest: Mapping[str, Report], epoch: int
) -> dict[str, float | None]:
    """What each member of a split (its ``live`` snapshot) was allowed in the epoch before
    ``epoch``, for ``next_shares``. Taken from the member's newest report sent before the
    boundary (``newest``), which may be later than the snapshot's: an idle member that gave its
    share back after the cutoff. Within an epoch a share falls only once its member has sent
    nothing for a second (``ShareKeeper._promise``), and rises only by what every other member
    gave back, at least ``CUTOFF`` before the boundary (``taken_back``; a joiner's rises from an
    epoch of its own), so the newest report of the ending epoch bounds what the member can have
    in any second that straddles the boundary. None where that report is of an earlier epoch:
    the member may have risen since."""
    out: dict[str, float | None] = {}
    for member, old in live.items():
        report = newest.get(member, old)
        out[member] = report.allowed if report.epoch == epoch - 1 else None
    return out


def floor_for(members: int) -> float:
    """Each member's floor in a split among ``members``."""
    return min(FLOOR, MAX_FLOORS / max(1, members))


def wanted(reports: Mapping[str, Report], me: str) -> bool:
    """Whether another member's newest report (of ``reports``) wants URL budget."""
    return any(r.demand.urls > 0 and not r.left for m, r in reports.items() if m != me)


def gave_back(report: Report, epoch: int) -> bool:
    """Whether ``report`` says its member gave its URL share back for the rest of ``epoch``:
    nothing waiting, nothing sent for a second, at most a floor (``ShareKeeper._promise``). A
    member that said so does not rise again before the next boundary."""
    return (
        report.epoch == epoch
        and not report.left
        and report.demand.urls == 0
        and report.allowed <= FLOOR + 1e-9
    )


def taken_back(
    me: str, want: float, reports: Mapping[str, Report], epoch: int, now: float
) -> float:
    """The URL share member ``me``, wanting ``want``, may take before the next boundary: what
    the next split would give it (``allocate``), within what the others leave, once every one
    of them (their newest ``reports``) gave its share back this epoch; 0 while any has not, or
    when nobody else reported. Safe without a boundary: those members sent nothing in the
    second before they said so and at most their floor since, and will not rise before the
    boundary; no two members can take it, since one that gave back does not take. A member
    that left counts until two epochs after its last report."""
    others = {
        m: r for m, r in reports.items() if m != me and not (r.left and r.at <= now - 2 * EPOCH)
    }
    if not others or not all(gave_back(r, epoch) for r in others.values()):
        return 0.0
    target = allocate({**{m: r.demand.urls for m, r in others.items()}, me: want})[me]
    free = 1.0 - sum(r.allowed for r in others.values())
    return min(target, _down(free))


def _down(share: float) -> float:
    """``share`` cut down to the grain (``QUANTUM``), forgiving a float's last bit."""
    return math.floor(share / QUANTUM + 1e-9) * QUANTUM


class Board:
    """Every member's recent reports per account; thread-safe (the exchange writes, the loop
    reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # account key -> member -> its reports, oldest first
        self._reports: dict[str, dict[str, deque[Report]]] = {}

    def record(self, account: str, member: str, report: Report) -> None:
        with self._lock:
            history = self._reports.setdefault(account, {}).setdefault(member, deque())
            if history and report.at <= history[-1].at:
                return  # out of order or repeated
            history.append(report)
            # Keep what a snapshot of the next boundaries may still need.
            while len(history) > 1 and history[1].at <= report.at - CUTOFF - EPOCH:
                history.popleft()

    def heard(self, account: str, since: float) -> set[str]:
        """Members with a report sent after ``since`` (by their clocks, which may run ahead)."""
        return set(self.latest(account, since))

    def latest(self, account: str, since: float) -> dict[str, Report]:
        """Each member's newest report, of those heard since ``since``."""
        with self._lock:
            members = self._reports.get(account, {})
            return {m: h[-1] for m, h in members.items() if h and h[-1].at > since}

    def newest(self, account: str, boundary: float) -> dict[str, Report]:
        """Each member's latest report sent before ``boundary`` (by its clock: so sent before
        it applied that boundary's split)."""
        with self._lock:
            members = self._reports.get(account, {})
            out = {}
            for member, history in members.items():
                before = [r for r in history if r.at < boundary]
                if before:
                    out[member] = before[-1]
            return out

    def snapshot(self, account: str, boundary: float) -> dict[str, Report]:
        """Each member's latest report sent at least ``CUTOFF`` before ``boundary`` and less
        than ``REPORT_TTL`` before it (a member silent that long is presumed gone)."""
        out: dict[str, Report] = {}
        with self._lock:
            members = self._reports.get(account, {})
            for member, history in list(members.items()):
                latest = None
                for report in history:
                    if report.at <= boundary - CUTOFF:
                        latest = report
                if latest is not None and latest.at > boundary - REPORT_TTL:
                    out[member] = latest
                elif history[-1].at <= boundary - REPORT_TTL:
                    del members[member]
        return out


class Exchange(Protocol):
    """How reports travel between workers (``worker.kafka.exchange.KafkaBudgetExchange``)."""

    member: str
    board: Board
    # Wall-clock time this worker's first report went out (None: not yet).
    first_sent: float | None
    # Whether every report written before this worker started has been read.
    caught_up: bool
    # Whether every report written before this worker's first one has been read (its first
    # report read back from the one partition every report goes to).
    read_back: bool

    def publish(self, reports: Mapping[str, Report]) -> None:
        """What to report from now on, per account key (``at`` is set when sent). Never
        blocks."""

    def healthy(self) -> bool:
        """Whether reports went out and came in lately."""

    def close(self, timeout: float) -> None:
        """Stop; tell the others this worker is gone (its last reports, marked ``left``)."""
