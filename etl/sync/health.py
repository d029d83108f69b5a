"""Each instance's health in this process: failures in a row, and when it is due again.

An instance that keeps failing is polled at doubling intervals instead of every interval:
from the first failure for kinds that retrying soon will not cure, after
``backoff_after_transient_failures`` in a row for transient ones, never for database
failures (the instance is fine; our side is not). ``ERROR_KINDS`` says which is which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from etl.config import Instance
from etl.errors import Backoff, error_kind
from etl.sync.outcome import SyncOutcome

if TYPE_CHECKING:  # the store imports the sync's parts
    from etl.sync.store import Store

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")


def backoff_seconds(instance: Instance, failures: int, kind: str | None) -> int | None:
    """Delay before the next sync after ``failures`` consecutive failed ticks, or None
    for the normal interval. Doubles per failure, capped at ``backoff_max_seconds``."""
    known = error_kind(kind)
    rule = known.info.backoff if known is not None else Backoff.AFTER_N
    if failures <= 0 or rule == Backoff.NEVER:
        return None
    if rule == Backoff.FIRST:
        exponent = failures
    else:
        exponent = failures - instance.backoff_after_transient_failures + 1
    if exponent <= 0:
        return None
    interval = instance.interval_seconds
    cap = max(interval, instance.backoff_max_seconds)
    delay = min(cap, interval * 2 ** min(exponent, 30))
    return delay if delay > interval else None


@dataclass(slots=True)
class _Health:
    failures: int = 0
    kind: str | None = None
    next_due: float = 0.0  # on the monotonic clock


class HealthBook:
    """Consecutive failures and the next due time of every instance this process syncs."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self._health: dict[int, _Health] = {}

    def due(self, instance: Instance) -> bool:
        """False while the instance is backing off after failures (the daemon skips it)."""
        health = self._health.get(instance.id_instance)
        return health is None or self.monotonic() >= health.next_due

    def consecutive_failures(self, instance_id: int) -> int:
        health = self._health.get(instance_id)
        return health.failures if health else 0

    def note(self, instance: Instance, outcome: SyncOutcome) -> None:
        """Count the tick and decide the instance's next due time; sets the outcome's
        ``backoff_seconds``."""
        health = self._health.setdefault(instance.id_instance, _Health())
        if outcome.status == "failed":
            health.failures += 1
            health.kind = outcome.error_kind
        else:
            health.failures, health.kind = 0, None
        outcome.backoff_seconds = backoff_seconds(instance, health.failures, health.kind)
        # a little early, so scheduler jitter never makes us skip the tick that is due
        delay = outcome.backoff_seconds or 0
        health.next_due = self.monotonic() + max(0.0, delay - 1.0)
        if outcome.backoff_seconds:
            log.warning(
                "instance %s: %d consecutive failures (%s), backing off: next sync in %ds",
                instance.id_instance,
                health.failures,
                health.kind,
                outcome.backoff_seconds,
            )

    def restore(
        self,
        instance: Instance,
        failures: int,
        kind: str | None,
        next_due_at: datetime | None,
        now: datetime,
    ) -> None:
        """Take over an instance's failures in a row and its next due time, as its state
        row keeps them (after a restart, or from the replica that held it before)."""
        if failures <= 0:
            self._health.pop(instance.id_instance, None)
            return
        health = _Health(failures, kind)
        if next_due_at is not None and backoff_seconds(instance, failures, kind) is not None:
            wait = (next_due_at - now).total_seconds()
            # a little early, as in ``note``
            health.next_due = self.monotonic() + max(0.0, wait - 1.0)
        self._health[instance.id_instance] = health

    def forget(self, instance_id: int) -> None:
        self._health.pop(instance_id, None)


def restore_backoff(
    engine: Engine,
    store: Store,
    health: HealthBook,
    instances: Sequence[Instance],
    now: datetime,
) -> dict[int, tuple[datetime | None, int]]:
    """Resume each instance's backoff from its state row (its failures in a row and when
    it is due), after a restart; returns when each is due (None: never synced) and its
    failures in a row."""
    by_id = {i.id_instance: i for i in instances}
    ids = list(by_id)
    due: dict[int, tuple[datetime | None, int]] = {}
    chunk = store.read_chunk
    with engine.connect() as conn:
        for start in range(0, len(ids), chunk):
            for row in store.load_health(conn, ids[start : start + chunk]):
                inst = by_id[row.instance_id]
                health.restore(inst, row.failures, row.failure_kind, row.next_due_at, now)
                due[row.instance_id] = (row.next_due_at, row.failures)
    return due
