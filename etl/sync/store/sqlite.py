"""SQLite: SQLAlchemy Core statements, the run row first.

``BEGIN IMMEDIATE`` (``etl.db``) takes the database's write lock when the transaction
starts, so the instance is already locked. History and event rows point at their run
with a foreign key checked at once, so the run row goes in first and gets its real end
time by an update at the end.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import sqlite

from etl.models import UTCDateTime, chats_t, events_t, history_t, presence_t, runs_t
from etl.sync.plan import TickPlan
from etl.sync.store.base import Locked, RunRow, SnapshotWrite, Store, TickState, fenced_lock

#: chats marked removed per statement
_REMOVED_CHUNK = 5000
#: the next ``change_seq``: one above every number stored (the view's definition)
_NEXT_CHANGE_SEQ = text("SELECT watermark FROM load_watermark")


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
            .values(
                removed_at=bindparam("now"),
                updated_at=bindparam("now"),
                change_seq=bindparam("seq"),
            )
        )
        self.close_history = (
            update(history_t)
            .where(
                history_t.c.instance_id == bindparam("b_iid"),
                history_t.c.chat_id == bindparam("b_chat_id"),
                history_t.c.valid_to.is_(None),
            )
            .values(valid_to=bindparam("b_valid_to"), change_seq=bindparam("b_seq"))
        )
        self._build_presence()

    def _build_presence(self) -> None:
        """A period never ends before it starts, nor starts before the chat's previous one
        ended, even if the clock stepped back (SQLite's two-argument ``max``; the stored
        text compares chronologically)."""
        at = UTCDateTime()
        self.close_presence = (
            update(presence_t)
            .where(
                presence_t.c.instance_id == bindparam("b_iid"),
                presence_t.c.chat_id == bindparam("b_chat_id"),
                presence_t.c.valid_to.is_(None),
            )
            .values(
                valid_to=func.max(bindparam("b_valid_to", type_=at), presence_t.c.valid_from),
                change_seq=bindparam("b_seq"),
            )
        )
        q = presence_t.alias("q")
        ended = (
            select(func.max(q.c.valid_to))
            .where(q.c.instance_id == bindparam("p_iid"), q.c.chat_id == bindparam("p_chat_id"))
            .scalar_subquery()
        )
        start = bindparam("p_from", type_=at)
        self.open_presence = insert(presence_t).values(
            instance_id=bindparam("p_iid"),
            chat_id=bindparam("p_chat_id"),
            valid_from=func.max(start, func.coalesce(ended, start)),
            valid_to=None,
            sync_run_id=bindparam("p_run"),
            change_seq=bindparam("p_seq"),
        )

    def lock(
        self,
        conn: Connection,
        iid: int,
        now: datetime,
        read_ids: list[str] | None,
        state: TickState | None,
    ) -> Locked:
        # the transaction's BEGIN IMMEDIATE already holds the database's write lock, so the
        # next change_seq stays this transaction's until it commits; every later writer
        # numbers its rows above it (this tick's run row holds it), so one above it is the
        # floor (a top-up does not read this tick's own rows again)
        bumped = self.bump(conn, iid, now, state)
        seq = self.change_seq(conn)
        if bumped is None:
            return fenced_lock(None, seq)
        version, guard = bumped
        return Locked(None, version, guard, change_seq=seq, floor=seq + 1)

    def change_seq(self, conn: Connection) -> Any:
        return int(conn.execute(_NEXT_CHANGE_SEQ).scalar_one())

    def _seq(self, conn: Connection, locked: Locked) -> int:
        return locked.change_seq if locked.change_seq is not None else self.change_seq(conn)

    def write_run(
        self,
        conn: Connection,
        locked: Locked,
        row: dict[str, Any],
        snapshot: SnapshotWrite | None = None,
    ) -> int:
        seq = self._seq(conn, locked)
        self.save_snapshot(conn, snapshot)
        return int(conn.execute(self.insert_run, {**row, "change_seq": seq}).scalar_one())

    def write_tick(
        self,
        conn: Connection,
        locked: Locked,
        plan: TickPlan,
        run: RunRow,
        snapshot: SnapshotWrite | None,
    ) -> int:
        self.save_snapshot(conn, snapshot)
        seq = self._seq(conn, locked)
        run_id = int(conn.execute(self.insert_run, {**run(), "change_seq": seq}).scalar_one())
        iid = plan.instance_id
        self._write_chats(conn, plan, seq)
        if plan.closes:
            conn.execute(
                self.close_history,
                [
                    {"b_iid": iid, "b_chat_id": c.chat_id, "b_valid_to": c.valid_to, "b_seq": seq}
                    for c in plan.closes
                ],
            )
        for table, rows in (
            (history_t, plan.history_rows(run_id)),
            (events_t, plan.event_rows(run_id)),
        ):
            if rows:
                conn.execute(table.insert().values(change_seq=seq), rows)
        self._write_presence(conn, plan, run_id, seq)
        end = run()  # the tick's real end time
        conn.execute(
            update(runs_t)
            .where(runs_t.c.id == run_id)
            .values(finished_at=end["finished_at"], duration_ms=end["duration_ms"])
        )
        return run_id

    def _write_chats(self, conn: Connection, plan: TickPlan, seq: int) -> None:
        if plan.inserts:
            conn.execute(insert(chats_t).values(change_seq=seq), plan.inserts)
        if plan.upserts:
            conn.execute(self.upsert_chats, [{**r, "change_seq": seq} for r in plan.upserts])
        ids = plan.removed
        for i in range(0, len(ids), _REMOVED_CHUNK):
            conn.execute(
                self.mark_removed,
                {
                    "iid": plan.instance_id,
                    "ids": ids[i : i + _REMOVED_CHUNK],
                    "now": plan.now,
                    "seq": seq,
                },
            )

    def _write_presence(self, conn: Connection, plan: TickPlan, run_id: int, seq: int) -> None:
        iid = plan.instance_id
        if plan.presence_closes:
            conn.execute(
                self.close_presence,
                [
                    {"b_iid": iid, "b_chat_id": c.chat_id, "b_valid_to": c.valid_to, "b_seq": seq}
                    for c in plan.presence_closes
                ],
            )
        if plan.presence_opens:
            conn.execute(
                self.open_presence,
                [
                    {
                        "p_iid": iid,
                        "p_chat_id": o.chat_id,
                        "p_from": o.valid_from,
                        "p_run": run_id,
                        "p_seq": seq,
                    }
                    for o in plan.presence_opens
                ],
            )
