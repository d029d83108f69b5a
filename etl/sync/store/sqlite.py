"""SQLite: SQLAlchemy Core statements, the run row first.

``BEGIN IMMEDIATE`` (``etl.db``) takes the database's write lock when the transaction
starts, so the instance is already locked. History and event rows point at their run
with a foreign key checked at once, so the run row goes in first and gets its real end
time by an update at the end.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, update
from sqlalchemy.dialects import sqlite

from etl.models import chats_t, events_t, history_t, runs_t
from etl.sync.plan import TickPlan
from etl.sync.store.base import Locked, RunRow, Store

#: chats marked removed per statement
_REMOVED_CHUNK = 5000


class SQLiteStore(Store):
    dialect = "sqlite"
    insert = staticmethod(sqlite.insert)

    def __init__(self) -> None:
        super().__init__()
        self.mark_removed = (
            update(chats_t)
            .where(
                chats_t.c.instance_id == bindparam("iid"),
                chats_t.c.chat_id.in_(bindparam("ids", expanding=True)),
            )
            .values(removed_at=bindparam("now"), updated_at=bindparam("now"))
        )
        self.close_history = (
            update(history_t)
            .where(
                history_t.c.instance_id == bindparam("b_iid"),
                history_t.c.chat_id == bindparam("b_chat_id"),
                history_t.c.valid_to.is_(None),
            )
            .values(valid_to=bindparam("b_valid_to"))
        )

    def lock(self, conn: Connection, iid: int, now: datetime, read_ids: list[str] | None) -> Locked:
        # the transaction's BEGIN IMMEDIATE already holds the database's write lock
        version, guard = self.bump(conn, iid, now)
        return Locked(None, version, guard)

    def write_run(self, conn: Connection, locked: Locked, row: dict[str, Any]) -> int:
        return int(conn.execute(self.insert_run, row).scalar_one())

    def write_tick(self, conn: Connection, locked: Locked, plan: TickPlan, run: RunRow) -> int:
        run_id = self.write_run(conn, locked, run())
        iid = plan.instance_id
        self._write_chats(conn, plan)
        if plan.closes:
            conn.execute(
                self.close_history,
                [
                    {"b_iid": iid, "b_chat_id": c.chat_id, "b_valid_to": c.valid_to}
                    for c in plan.closes
                ],
            )
        for table, rows in (
            (history_t, plan.history_rows(run_id)),
            (events_t, plan.event_rows(run_id)),
        ):
            if rows:
                conn.execute(table.insert(), rows)
        end = run()  # the tick's real end time
        conn.execute(
            update(runs_t)
            .where(runs_t.c.id == run_id)
            .values(finished_at=end["finished_at"], duration_ms=end["duration_ms"])
        )
        return run_id

    def _write_chats(self, conn: Connection, plan: TickPlan) -> None:
        if plan.inserts:
            conn.execute(insert(chats_t), plan.inserts)
        if plan.upserts:
            conn.execute(self.upsert_chats, plan.upserts)
        ids = plan.removed
        for i in range(0, len(ids), _REMOVED_CHUNK):
            conn.execute(
                self.mark_removed,
                {"iid": plan.instance_id, "ids": ids[i : i + _REMOVED_CHUNK], "now": plan.now},
            )
