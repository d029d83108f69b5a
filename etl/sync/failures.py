"""Failed ticks: each one a ``failed`` ``sync_runs`` row in a transaction of its own, with
the instance's failures in a row and next due time in its state row (its backoff); kept in
memory (``backlog``) while the database itself is unreachable, and written once it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl.config import Instance
from etl.errors import ErrorKind
from etl.redact import redact
from etl.sync.backlog import FailureBacklog
from etl.sync.health import HealthBook
from etl.sync.outcome import SyncOutcome
from etl.sync.store import Claim, Store

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")


def log_failure(outcome: SyncOutcome) -> None:
    log.warning(
        "instance %s: sync failed kind=%s http=%s attempts=%d in %dms: %s",
        outcome.instance_id,
        outcome.error_kind,
        outcome.http_status,
        outcome.attempts,
        outcome.duration_ms,
        outcome.error,
    )


class FailureLog:
    """Records the failed ticks of one syncer."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        health: HealthBook,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.store = store
        self.health = health
        self.clock = clock
        #: failed ticks not yet in ``sync_runs`` because the database was unreachable too
        self.backlog = FailureBacklog()

    def write(self, instance: Instance, outcome: SyncOutcome, claim: Claim | None) -> None:
        """Record a failed tick in its own transaction, with the instance's failures and
        next due time in its state row (fenced by ``claim``: a replica that lost the
        instance says nothing of it any more); keep it for later if even that fails."""
        iid = instance.id_instance
        delay = outcome.backoff_seconds or instance.interval_seconds
        try:
            with self.engine.begin() as conn:
                outcome.sync_run_id = self.store.write_failure(conn, outcome.row())
                self.store.note_failure(
                    conn,
                    iid,
                    failures=self.health.consecutive_failures(iid),
                    kind=None if outcome.error_kind is None else str(outcome.error_kind),
                    due=outcome.started_at + timedelta(seconds=delay),
                    now=self.clock(),
                    claim=claim,
                )
        except SQLAlchemyError as exc:
            self.defer(outcome, type(exc).__name__)
            return
        log_failure(outcome)
        self.flush()

    def defer(self, outcome: SyncOutcome, reason: str) -> None:
        """A failed tick that cannot be written now: log it, write it when the database
        answers again (after the next transaction that succeeds)."""
        self.backlog.defer(outcome, reason)

    def unreachable(self, instance: Instance, error: str) -> SyncOutcome:
        """A tick that never started because the database could not be reached."""
        now = self.clock()
        return SyncOutcome(
            instance.id_instance,
            "failed",
            now,
            finished_at=now,
            error_kind=ErrorKind.DATABASE,
            error=redact(error),
            duration_ms=0,
        )

    def flush(self) -> int:
        """Write the failed ticks kept while the database was away; returns how many."""
        if not self.backlog:  # the common case, without the lock
            return 0
        pending, dropped = self.backlog.take()
        if not pending:
            return 0
        try:
            with self.engine.begin() as conn:
                self.store.write_failures(conn, [o.row() for o in pending])
        except SQLAlchemyError as exc:
            self.backlog.put_back(pending, dropped)
            log.warning(
                "could not yet write %d failed ticks to sync_runs: %s",
                len(pending),
                type(exc).__name__,
            )
            return 0
        log.info(
            "wrote %d failed ticks kept while the database was unreachable to sync_runs%s",
            len(pending),
            f" ({dropped} older ones were dropped, over the limit of {self.backlog.limit})"
            if dropped
            else "",
        )
        return len(pending)
