"""Failed ticks that could not be written to ``sync_runs`` because the database was
unreachable too: kept in memory, in order, and written after the next transaction that
succeeds. Bounded: past ``UNRECORDED_LIMIT`` the oldest are dropped (and counted)."""

from __future__ import annotations

import logging
import threading
from collections import deque

from etl.sync.outcome import SyncOutcome

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")

#: failed ticks kept in memory while the database is unreachable (each a few hundred bytes)
UNRECORDED_LIMIT = 20_000


class FailureBacklog:
    """The failed ticks waiting for the database. Thread-safe."""

    def __init__(self) -> None:
        self.limit = UNRECORDED_LIMIT
        self._pending: deque[SyncOutcome] = deque(maxlen=self.limit)
        self._dropped = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def defer(self, outcome: SyncOutcome, reason: str) -> None:
        """Log a failed tick now; keep it to be written when the database answers."""
        log.error(
            "instance %s: sync failed (%s) and could not be recorded yet (%s); it will be "
            "written to sync_runs when the database answers: %s",
            outcome.instance_id,
            outcome.error_kind,
            reason,
            outcome.error,
        )
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self._dropped += 1
            self._pending.append(outcome)

    def take(self) -> tuple[list[SyncOutcome], int]:
        """Everything kept (oldest first) and how many older ones were dropped."""
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
            dropped, self._dropped = self._dropped, 0
        return pending, dropped

    def put_back(self, pending: list[SyncOutcome], dropped: int) -> None:
        """What ``take`` gave, when it could not be written: back in front of anything
        newer, in order."""
        with self._lock:
            self._pending.extendleft(reversed(pending))
            self._dropped += dropped
