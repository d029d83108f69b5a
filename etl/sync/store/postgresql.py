"""PostgreSQL: an advisory lock per instance, and every write of a tick in one statement.

The lock, the reservation of the run's id, the state bump and (in a steady tick) the
read-back of the chats that may have changed share one round trip; the writes and the
run row share a second one (``pg_sql``). Foreign keys to ``sync_runs`` are deferred, so
the run row can be written last, with its real end time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, literal_column
from sqlalchemy.dialects import postgresql

from etl.models import PG_CHANGE_SEQ
from etl.sync.guards import GuardState
from etl.sync.plan import FirstLoad, StoredChat, TickPlan
from etl.sync.store import pg_sql
from etl.sync.store.base import (
    Locked,
    RunRow,
    SnapshotWrite,
    Store,
    TickState,
    fenced_lock,
    written_listeners,
)

#: the lock wait was logged as "etl.db" when the lock lived there; kept for log filters
log = logging.getLogger("etl.db")


def instance_lock_key(instance_id: int) -> int:
    """The advisory lock key of one instance's writers: the id itself, in the single
    ``bigint`` key space (the two-``int`` form would need ``id % 2**31``, and two ids can
    share that; the two key spaces never meet, so the registry's and retention's two-int
    keys cannot collide with it)."""
    return instance_id


#: the advisory lock key of the ``instances`` table's writers
REGISTRY_LOCK_KEY = (4243, 0)


class PostgresStore(Store):
    dialect = "postgresql"
    reads_with_lock = True
    insert = staticmethod(postgresql.insert)

    def lock(
        self,
        conn: Connection,
        iid: int,
        now: datetime,
        read_ids: list[str] | None,
        state: TickState | None,
    ) -> Locked:
        """One round trip when the lock is free (the usual case); a wait for the lock goes
        the long way, and reads nothing.

        The rows are read in the statement's snapshot, taken just before the lock: they
        are what ``load_rows`` would read after it unless another writer committed in
        between, and such a writer bumped the version, so the caller's snapshot check
        (``version - 1``) throws them away.
        """
        params: dict[str, Any] = {"key": instance_lock_key(iid), "iid": iid, "now": now}
        bump = "version"
        if state is not None:
            bump = "tick" if state.claim is None else "fenced"
            params["due"] = state.due
            if state.claim is not None:
                claim = state.claim
                params |= {"owner": claim.owner, "epoch": claim.epoch, "idle": str(claim.idle_ms)}
        stored: dict[str, StoredChat] | None = None
        if read_ids:
            sql = pg_sql.lock_sql(bump, read=True)
            found = conn.exec_driver_sql(sql, {**params, "ids": read_ids}).all()
            row = found[0]
            stored = {r.chat_id: cast(StoredChat, r) for r in found if r.chat_id is not None}
        else:
            row = conn.exec_driver_sql(pg_sql.lock_sql(bump, read=False), params).one()
        if row.got:
            if row.version is None:  # the lock was free, the claim is gone
                return fenced_lock(int(row.run_id))
            for listener in written_listeners:
                listener("instance_sync_state", 1)
            guard = GuardState(row.pending_removal_digest, row.pending_removal_streak)
            return Locked(int(row.run_id), int(row.version), guard, stored, floor=int(row.floor))
        run_id, floor = self._wait_for_lock(conn, iid)
        bumped = self.bump(conn, iid, now, state)
        if bumped is None:
            return fenced_lock(run_id)
        return Locked(run_id, *bumped, floor=floor)

    @staticmethod
    def _wait_for_lock(conn: Connection, iid: int) -> tuple[int, int]:
        """Take the lock another writer held (a wait is logged); returns a run id reserved
        in the same round trip as the new try, and the floor (``Locked.floor``)."""
        key = (instance_lock_key(iid),)
        got, run_id, floor = conn.exec_driver_sql(pg_sql.TRY_LOCK, key).one()
        if not got:
            log.info("instance %s: another process is syncing it; waiting", iid)
            conn.exec_driver_sql(pg_sql.WAIT_LOCK, key)
        return int(run_id), int(floor)

    def lock_registry(self, conn: Connection) -> None:
        conn.exec_driver_sql(pg_sql.LOCK_REGISTRY, REGISTRY_LOCK_KEY)

    def change_seq(self, conn: Connection) -> Any:
        # the transaction id, evaluated by the statement (also each cursor column's default)
        return literal_column(PG_CHANGE_SEQ)

    def _read(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        return list(conn.exec_driver_sql(pg_sql.LOAD_ROWS, params))

    def load_since(
        self, conn: Connection, floors: Mapping[int, int]
    ) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
        # every instance of the chunk in one statement each for chats and aliases
        params = {"ids": list(floors), "floors": list(floors.values())}
        out: tuple[dict[int, list[Any]], dict[int, list[Any]]] = ({}, {})
        for sql, found in zip((pg_sql.CHATS_SINCE, pg_sql.ALIASES_SINCE), out, strict=True):
            for row in conn.exec_driver_sql(sql, params):
                found.setdefault(row[0], []).append(row[1:])
        return out

    def write_run(
        self,
        conn: Connection,
        locked: Locked,
        row: dict[str, Any],
        snapshot: SnapshotWrite | None = None,
    ) -> int:
        values = {**row, "id": locked.run_id} if locked.run_id is not None else row
        if snapshot is not None:
            stmt = pg_sql.CteStatement()
            pg_sql.add_snapshot(stmt, snapshot)
            return self._execute(conn, stmt, values)
        columns, params = pg_sql.values_params([values])
        sql = pg_sql.values_sql("sync_runs", columns, 1, " RETURNING id")
        return int(conn.exec_driver_sql(sql, params).scalar_one())

    def write_tick(
        self,
        conn: Connection,
        locked: Locked,
        plan: TickPlan,
        run: RunRow,
        snapshot: SnapshotWrite | None,
    ) -> int:
        run_id = _reserved(locked)
        stmt = pg_sql.tick_statement(plan, run_id)
        pg_sql.add_snapshot(stmt, snapshot)
        return self._execute(conn, stmt, {**run(), "id": run_id})

    def write_first_load(
        self,
        conn: Connection,
        locked: Locked,
        load: FirstLoad,
        run: RunRow,
        snapshot: SnapshotWrite | None,
    ) -> int:
        run_id = _reserved(locked)
        stmt = pg_sql.first_load_statement(load, run_id)
        pg_sql.add_snapshot(stmt, snapshot)
        return self._execute(conn, stmt, {**run(), "id": run_id})

    @staticmethod
    def _execute(conn: Connection, stmt: pg_sql.CteStatement, run: dict[str, Any]) -> int:
        sql, params, tables = stmt.with_run(run)
        row = conn.exec_driver_sql(sql, params).one()
        for table, n in zip(tables, row[1:], strict=True):
            for listener in written_listeners:
                listener(table, int(n))
        return int(row[0])


def _reserved(locked: Locked) -> int:
    if locked.run_id is None:  # every lock on PostgreSQL reserves one
        raise RuntimeError("no sync_runs id was reserved for this tick")
    return locked.run_id
