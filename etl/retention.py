"""Retention of ``sync_runs``: delete rows older than N days, in short batches.

Each batch is its own transaction: pick the oldest ``batch_size`` runs below the cutoff
(index ``ix_sync_runs_started_at``), set ``chat_ephemeral_history.sync_run_id``,
``chat_presence.sync_run_id`` and ``chat_events.sync_run_id`` to NULL where they point at
those runs, then delete them. So
no reference ever dangles, the table stays bounded even when every tick changes
something, and no lock is held for longer than one batch. The history and event rows
themselves are kept; they only lose the link to a run that no longer exists (not a change
for an incremental load: their ``change_seq`` stays, as the warehouse keeps the run).

The run with the highest ``change_seq`` is never pruned: SQLite numbers each write one
above every number stored, and deleting the top one would let the next write reuse a
number a loader has already passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Engine, Table, delete, select, update

from etl.clock import utcnow
from etl.models import ChatEphemeralHistory, ChatEvent, ChatPresence, SyncRun

log = logging.getLogger(__name__)

runs_t = cast(Table, SyncRun.__table__)
history_t = cast(Table, ChatEphemeralHistory.__table__)
events_t = cast(Table, ChatEvent.__table__)
presence_t = cast(Table, ChatPresence.__table__)

#: the run kept whatever its age (the module's docstring says why)
_top_run = (
    select(runs_t.c.id)
    .order_by(runs_t.c.change_seq.desc(), runs_t.c.id.desc())
    .limit(1)
    .scalar_subquery()
)

#: PostgreSQL advisory lock key: one replica prunes at a time, the others skip
_LOCK_KEY = (4244, 0)


def _try_lock(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return True  # SQLite: BEGIN IMMEDIATE already serialises writers
    locked = conn.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s, %s)", _LOCK_KEY)
    return bool(locked.scalar())


def prune_sync_runs(
    engine: Engine,
    *,
    older_than_days: int,
    batch_size: int = 5000,
    now: datetime | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    pause_seconds: float = 0.0,
) -> int:
    """Delete ``sync_runs`` rows started more than ``older_than_days`` ago; return how many.

    Stops early (between batches) when ``should_stop()`` is true or when another process
    holds the pruning lock; the next call carries on.
    """
    if older_than_days <= 0:
        return 0
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    t0 = time.monotonic()
    total = batches = 0
    while not should_stop():
        with engine.begin() as conn:
            if not _try_lock(conn):
                log.info("retention: another process is pruning sync_runs; skipped")
                break
            ids = list(
                conn.execute(
                    select(runs_t.c.id)
                    .where(runs_t.c.started_at < cutoff, runs_t.c.id != _top_run)
                    .order_by(runs_t.c.started_at)
                    .limit(batch_size)
                ).scalars()
            )
            if not ids:
                break
            for child in (history_t, events_t, presence_t):
                conn.execute(
                    update(child).where(child.c.sync_run_id.in_(ids)).values(sync_run_id=None)
                )
            total += conn.execute(delete(runs_t).where(runs_t.c.id.in_(ids))).rowcount
            batches += 1
        if len(ids) < batch_size:
            break
        if pause_seconds:
            time.sleep(pause_seconds)  # let syncs take the write lock between batches
    if total:
        log.info(
            "retention: pruned %d sync_runs rows older than %d days (%d batches, %dms)",
            total,
            older_than_days,
            batches,
            int((time.monotonic() - t0) * 1000),
        )
    return total
