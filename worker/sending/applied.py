"""What each account's limiter is given: the share decided for this worker, capped by the group's
configured ``share`` of the account, with the share gauges, and a log line when it has moved
visibly (every epoch may nudge it by a hair). ``worker.sending.shares`` decides; this applies."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from worker.observe import metrics
from worker.sending.accounts import Accounts
from worker.sending.split import Shares

log = structlog.get_logger("worker.sending")

# A move smaller than this is not logged.
LOGGED_MOVE = 0.05


class AppliedShares:
    """``heard``: per account, whether another worker reported on it lately (kept by the
    caller): a worker alone follows what the API says is left."""

    def __init__(self, accounts: Accounts, heard: Mapping[str, bool]) -> None:
        self._accounts = accounts
        self._heard = heard
        self._applied: dict[str, Shares] = {}
        self._logged: dict[str, tuple[Shares, str]] = {}

    def apply_all(self, shares: Shares, how: str, workers: int) -> None:
        for name in self._accounts.limiters:
            self.apply(name, shares, how, workers)

    def apply(
        self, name: str, shares: Shares, how: str, workers: int, *, hold: bool = True
    ) -> None:
        """Give the limiter ``shares`` (capped by the group's ``share``). ``hold``: URL budget
        gained is spendable only a window later (see ``set_share``); the demand split needs no
        hold, since it gives a worker only what nobody was allowed in the last second."""
        cap = self._accounts.settings[name].share
        limiter = self._accounts.limiters[name]
        # Alone with the whole account: what the API says is left is all this worker's.
        alone = how == "demand" and workers == 1 and cap >= 1.0 and not self._heard[name]
        limiter.set_alone(alone)
        shares = Shares(min(1.0, shares.urls) * cap, min(1.0, shares.flex) * cap)
        if self._applied.get(name) == shares:
            return
        self._applied[name] = shares
        limiter.set_share(shares.urls, shares.flex, hold=hold)
        metrics.BUDGET_SHARE.labels(name, "urls").set(shares.urls)
        metrics.BUDGET_SHARE.labels(name, "flex").set(shares.flex)
        self._log(name, shares, how, workers)

    def set_urls(self, name: str, share: float, how: str) -> None:
        """Within an epoch only the URL share moves, and nobody else may spend what it gains
        (``ShareKeeper._promise``, ``ShareKeeper._take_back``): no hold."""
        applied, cap = self._applied[name], self._accounts.settings[name].share
        shares = Shares(share * cap, applied.flex)
        self._applied[name] = shares
        self._accounts.limiters[name].set_share(shares.urls, shares.flex, hold=False)
        metrics.BUDGET_SHARE.labels(name, "urls").set(shares.urls)
        self._log(name, shares, how, 0)

    def _log(self, name: str, shares: Shares, how: str, workers: int) -> None:
        logged = self._logged.get(name)
        if logged is not None and logged[1] == how:
            moved = max(abs(a - b) for a, b in zip(shares, logged[0], strict=True))
            if moved < LOGGED_MOVE:
                return
        self._logged[name] = (shares, how)
        log.info(
            "rate budget share",
            account=name,
            share=round(shares.urls, 3),
            flex_share=round(shares.flex, 3),
            decided_by=how,
            workers=workers or None,
        )

    def shares(self) -> dict[str, Shares]:
        """What each account's limiter was last given."""
        return dict(self._applied)
