"""What one tick did: a ``SyncOutcome`` mirrors the ``sync_runs`` row it writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from etl.errors import ErrorKind

#: every line of a tick comes from one logger, "etl.sync", whichever part writes it
log = logging.getLogger("etl.sync")


@dataclass(slots=True)
class SyncOutcome:
    """What one tick did; mirrors a ``sync_runs`` row (``status == "skipped"`` writes none)."""

    instance_id: int
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    http_status: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    attempts: int = 0
    chats_received: int = 0
    chats_inserted: int = 0
    chats_updated: int = 0
    chats_removed: int = 0
    chats_rejected: int = 0
    ephemeral_changes: int = 0
    duration_ms: int = 0
    backoff_seconds: int | None = None
    sync_run_id: int | None = None
    ids_changed: int = 0
    #: getStateInstance's answer, when the tick asked it
    instance_state: str | None = None

    def row(self) -> dict[str, Any]:
        """The ``sync_runs`` row (without ``id``)."""
        return {
            "instance_id": self.instance_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "http_status": self.http_status,
            # the plain text: drivers and JSON see a str, not an enum member
            "error_kind": None if self.error_kind is None else str(self.error_kind),
            "error": self.error,
            "attempts": self.attempts,
            "chats_received": self.chats_received,
            "chats_inserted": self.chats_inserted,
            "chats_updated": self.chats_updated,
            "chats_removed": self.chats_removed,
            "chats_rejected": self.chats_rejected,
            "ephemeral_changes": self.ephemeral_changes,
            "duration_ms": self.duration_ms,
            "backoff_seconds": self.backoff_seconds,
            "ids_changed": self.ids_changed,
            "instance_state": self.instance_state,
        }


def log_outcome(o: SyncOutcome) -> None:
    """The log line of a tick that got a list (ok or anomaly)."""
    log.info(
        "instance %s: %s%s received=%d inserted=%d updated=%d removed=%d rejected=%d "
        "ephemeral_changes=%d attempts=%d in %dms",
        o.instance_id,
        o.status,
        f" ({o.error_kind})" if o.error_kind else "",
        o.chats_received,
        o.chats_inserted,
        o.chats_updated,
        o.chats_removed,
        o.chats_rejected,
        o.ephemeral_changes,
        o.attempts,
        o.duration_ms,
    )
