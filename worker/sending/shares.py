"""Shares of each account's rate budget that follow demand, across every worker spending it.

Cloudflare meters purges per account, and every worker of every group purging for the account
spends the same budget. Splitting it by partition count strands it: a replica holding a hot
partition waits while idle replicas hold budget they cannot use. So each worker publishes, four
times a second, what it wants of each account's two budgets (URLs and flex requests, as fractions
of the account's rate: what it is waiting to send plus what it sent lately), and every worker
shares the budget out with the same function (``allocate``: max-min fair, a small floor for the
idle, what nobody wants spread evenly).

Shares move only at epoch boundaries, wall-clock multiples of ``EPOCH``, and every worker
computes the split for a boundary from the same snapshot: each member's latest report sent at
least ``CUTOFF`` before it. Cloudflare meters URLs over a moving second, so a window that straddles
a boundary holds requests sent under the old shares and the new ones. Each report therefore also
says what share of URLs the member was allowed in the epoch now ending (its newest report before
the boundary counts: an idle member gives back its even share when its loop next looks, often
after the cutoff); a share that falls falls at once, and shares that rise take only what the old
shares leave free (``next_shares``), so that in every second the members' old-or-new shares add
up to at most the budget. Within an epoch, idle members give their share back as soon as another
wants budget, and a member that wants more takes what all the others gave back (``taken_back``)
without waiting for the boundary. What this needs: clocks within a few hundred milliseconds of
each other (NTP), reports delivered within ``CUTOFF``, and each worker applying a boundary's
split within a few hundred milliseconds of it (the loop wakes for it).

A worker not yet in a snapshot spends almost nothing (``JOINING_SHARE``); one silent for
``REPORT_TTL`` no longer counts; without the exchange, each worker shares by partitions.
Reports go by Kafka (``worker.kafka.exchange``); the arithmetic is in ``worker.sending.split``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import structlog

from worker.clock import Clock
from worker.observe import metrics
from worker.sending.accounts import Accounts
from worker.sending.applied import AppliedShares
from worker.sending.split import (
    CUTOFF,
    EPOCH,
    FLOOR,
    HEADROOM,
    JOINING_EPOCH,
    JOINING_SHARE,
    REPORT_INTERVAL,
    REPORT_TTL,
    Demand,
    Exchange,
    Report,
    Shares,
    allocate,
    floor_for,
    gave_back,
    last_allowed,
    next_shares,
    taken_back,
    wanted,
)
from worker.targets import Kind

log = structlog.get_logger("worker.sending")


class ShareKeeper:
    """Decides this worker's share of each account's budgets and gives it to the limiters: a
    fixed share (replay); else the demand split at each epoch boundary while the exchange works;
    else this worker's part of the partitions. The group's configured ``share`` of an account
    caps whatever is decided. Only the worker's loop calls it."""

    def __init__(
        self,
        accounts: Accounts,
        clock: Clock,
        *,
        exchange: Exchange | None = None,
        fixed: float | None = None,
    ) -> None:
        self._accounts = accounts
        self._clock = clock
        self._exchange = exchange
        self._fixed = fixed
        self._keys = {name: a.budget_key for name, a in accounts.settings.items()}
        self._epoch = -math.inf
        self._demand_at = -math.inf
        self._started = clock.time()
        self._partitions: tuple[int, int] = (0, 0)
        self._mode = "none"
        self._demand: dict[str, Demand] = {}
        self._members: dict[str, int] = {}  # workers in the last split, per account
        # Per account: whether another worker's reports were heard lately (a lone worker spends
        # the plan's whole URL figure only while nobody else is), and joiners that held back.
        self._heard: dict[str, bool] = dict.fromkeys(accounts.limiters, False)
        self._given = AppliedShares(accounts, self._heard)
        self._held: set[str] = set()
        self._gave: dict[str, int | None] = {}  # per account: the epoch it said it gave back
        # Per account: the epoch of the split last applied (None: not split by demand) and the
        # share of URLs allowed since, in the exchange's terms (before the group's cap).
        self._allowed: dict[str, tuple[int | None, float]] = dict.fromkeys(
            accounts.limiters, (JOINING_EPOCH, JOINING_SHARE)
        )
        if fixed is not None:
            self._mode = "fixed"
            self._given.apply_all(Shares(fixed, fixed), "fixed", 0)
        elif exchange is not None:
            # Nobody counts this worker until its first report is in a snapshot.
            self._mode = "joining"
            self._given.apply_all(Shares(JOINING_SHARE, JOINING_SHARE), "joining", 0)
            # Reported at once: a lone worker takes the budget ``CUTOFF`` after its first report.
            self._publish(exchange)

    @property
    def mode(self) -> str:
        """How shares are decided now: fixed, joining, demand, partitions (or none yet)."""
        return self._mode

    def next_change(self) -> float | None:
        """Wall-clock time at which shares may change next: the next boundary, or sooner the next
        report when this worker may give its share back (None: only with the assignment)."""
        if self._fixed is not None or self._exchange is None:
            return None
        boundary = (math.floor(self._clock.time() / EPOCH) + 1) * EPOCH
        shared = [a for n, (_, a) in self._allowed.items() if self._members.get(n, 1) > 1]
        if self._mode == "demand" and max(shared, default=0.0) > FLOOR:
            # Idle with more than a floor: look again soon, to give it back to a burst elsewhere.
            return min(boundary, self._demand_at + REPORT_INTERVAL / 2)
        return boundary

    def update(
        self, pending: Callable[[], Mapping[tuple[str, Kind], int]], assigned: int, total: int
    ) -> None:
        """Look again: ``pending()`` gives the items pending per zone and kind; ``assigned`` of
        ``total`` partitions are this worker's. Cheap when nothing is due."""
        if self._fixed is not None:
            return
        now = self._clock.time()
        exchange = self._exchange
        if exchange is not None:
            epoch = math.floor(now / EPOCH)
            # At a boundary too: what the split's report says of the demand must be fresh.
            if now - self._demand_at >= REPORT_INTERVAL / 2 or epoch > self._epoch:
                self._demand_at = now
                self._report(exchange, pending())
            if exchange.healthy():
                self._mode = "demand"
                if epoch > self._epoch:
                    self._epoch = epoch
                    self._by_demand(exchange, epoch)
                self._alone(exchange, now, epoch)
                self._take_back(exchange, now, epoch)
                return
            if self._mode == "joining" and now - self._started < REPORT_TTL:
                return  # still connecting: taking a partition share now could overrun others
        if (self._mode != "partitions" or (assigned, total) != self._partitions) and total:
            if self._mode == "demand":
                log.warning("budget exchange silent; sharing the budget by partitions")
            self._mode = "partitions"
            self._partitions = (assigned, total)
            self._epoch = -math.inf
            part = max(assigned / total, JOINING_SHARE)
            self._allowed = dict.fromkeys(self._accounts.limiters, (None, part))
            self._given.apply_all(Shares(part, part), "partitions", 0)

    def _alone(self, exchange: Exchange, now: float, epoch: int) -> None:
        """A joining worker that has heard no other worker on an account in the last few
        seconds of reports takes the whole of it at once instead of waiting for a boundary, as
        soon as it has read every report written before its own first one: its first report
        read back from the topic's one partition, or ``CUTOFF`` (the delivery bound) after it
        went out. A worker starting just after this one then hears this one's report before it
        may take anything."""
        first = exchange.first_sent
        if first is None:
            return
        waited = now >= first + CUTOFF and exchange.caught_up
        if not (waited or exchange.read_back):
            return
        for name, key in self._keys.items():
            if self._allowed[name][0] != JOINING_EPOCH:
                continue
            if exchange.board.heard(key, now - REPORT_TTL) - {exchange.member}:
                if waited and name not in self._held:
                    # A worker alone until now spends the whole URL figure; it drops to less
                    # when it hears this one, but its last second may still be full.
                    self._held.add(name)
                    self._accounts.limiters[name].hold_window()
                continue
            self._allowed[name] = (epoch, 1.0)
            self._members[name] = 1
            self._given.apply(name, Shares(1.0, 1.0), "demand", 1, hold=False)
            self._accounts.limiters[name].idle_account()  # nobody reported for seconds
            self._publish(exchange)

    def _take_back(self, exchange: Exchange, now: float, epoch: int) -> None:
        """Wanting more than its share, take before the boundary what every other member gave
        back this epoch (``taken_back``): a burst that began after a boundary's cutoff would
        otherwise spend a whole epoch at the share the split spread to it while the idle ones
        hold their floors. Not in the last ``CUTOFF`` of an epoch: the next split must read it."""
        if now > (epoch + 1) * EPOCH - CUTOFF:
            return
        for name, key in self._keys.items():
            at, allowed = self._allowed[name]
            want = self._demand.get(name, Demand(0.0, 0.0)).urls
            if at != epoch or self._gave.get(name) == epoch or want * HEADROOM <= allowed:
                continue  # said it gave back (another may count on it), or has enough
            latest = exchange.board.latest(key, now - REPORT_TTL)
            share = taken_back(exchange.member, want, latest, epoch, now)
            if share <= allowed:
                continue
            self._allowed[name] = (epoch, share)
            self._given.set_urls(name, share, "taken back")
            self._publish(exchange)

    def _report(self, exchange: Exchange, pending: Mapping[tuple[str, Kind], int]) -> None:
        self._demand = self._accounts.demand(pending, self._clock.monotonic())
        now = self._clock.time()
        for name, d in self._demand.items():
            metrics.BUDGET_DEMAND.labels(name, "urls").set(d.urls)
            metrics.BUDGET_DEMAND.labels(name, "flex").set(d.flex)
            latest = exchange.board.latest(self._keys[name], now - REPORT_TTL)
            alone = self._members.get(name, 1) <= 1
            if self._mode == "demand" and alone:
                # Alone, until a report says otherwise: then at once, not at the next split.
                self._heard[name] = bool(latest.keys() - {exchange.member})
                if self._heard[name]:
                    self._accounts.limiters[name].set_alone(False)
            epoch, allowed = self._allowed[name]
            # Give back only what another wants (alone, it keeps the account): while nobody does,
            # an idle member keeps what the split spread to it, so a burst starts there.
            idle = epoch == self._epoch and d.urls == 0 and not alone
            if self._mode == "demand" and idle and wanted(latest, exchange.member):
                self._promise(name, allowed)
        self._publish(exchange)

    def _promise(self, name: str, allowed: float) -> None:
        """Nothing waiting and nothing sent for a second: keep to the floor until the next
        boundary, and say so, so the others may give the rest to a burst at the boundary (a
        lower share is always safe to take at once; it is not raised before the boundary)."""
        floor = floor_for(self._members.get(name, 1))
        if allowed <= floor:
            return
        self._allowed[name] = (self._allowed[name][0], floor)
        self._given.set_urls(name, floor, "given back")

    def _publish(self, exchange: Exchange) -> None:
        keys, idle = self._keys, Demand(0.0, 0.0)
        reports = {
            name: Report(0.0, self._demand.get(name, idle), *self._allowed[name])
            for name in self._accounts.limiters
        }
        for name, report in reports.items():
            if report.epoch is not None and gave_back(report, report.epoch):  # no rise this epoch
                self._gave[name] = report.epoch
        exchange.publish({keys[name]: report for name, report in reports.items()})

    def _by_demand(self, exchange: Exchange, epoch: int) -> None:
        boundary = epoch * EPOCH
        me = exchange.member
        for name, key in self._keys.items():
            snapshot = exchange.board.snapshot(key, boundary)
            live = {m: r for m, r in snapshot.items() if not r.left}
            if me not in live:
                self._allowed[name] = (JOINING_EPOCH, JOINING_SHARE)
                self._given.apply(name, Shares(JOINING_SHARE, JOINING_SHARE), "joining", 0)
                continue
            targets = allocate({m: r.demand.urls for m, r in live.items()})
            flex = allocate({m: r.demand.flex for m, r in live.items()})
            # A joining member's share is known only to itself (it may have taken the whole
            # account, alone, after its last report): nobody else rises this epoch.
            allowed = last_allowed(live, exchange.board.newest(key, boundary), epoch)
            # Members that stopped within the last second may have requests in its window.
            gone = sum(
                r.allowed for r in snapshot.values() if r.left and r.at > boundary - 2 * EPOCH
            )
            urls = next_shares(targets, allowed, gone)[me]
            if allowed[me] is None:  # the others could not know this worker's last share
                urls = min(urls, self._allowed[name][1])
            idle = self._demand.get(name, Demand(0.0, 0.0)).urls == 0
            if (
                len(live) > 1
                and idle
                and wanted(exchange.board.latest(key, boundary - REPORT_TTL), me)
            ):
                # Give back at once what the split spreads to it (``_promise``): the burst
                # elsewhere may take it this epoch, not the next (``_take_back``).
                urls = min(urls, floor_for(len(live)))
            self._allowed[name] = (epoch, urls)
            self._members[name] = len(live)
            self._given.apply(name, Shares(urls, flex[me]), "demand", len(live), hold=False)
        self._publish(exchange)

    def close(self, timeout: float) -> None:
        """The worker sends no more purges: withdraw from the exchange."""
        if self._exchange is not None:
            self._exchange.close(timeout)

    def shares(self) -> dict[str, Shares]:
        """What each account's limiter was last given."""
        return self._given.shares()
