"""PostgreSQL's statements for a tick, as text: built here, run by ``PostgresStore``.

The hot statements go to PostgreSQL as driver SQL rather than through SQLAlchemy Core:
Core's per-execute work (cache lookup, bind processing per parameter set) costs more
than these statements' own round trips. Each function returns SQL text and its
parameters, so the statements can be read and tested without a database.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql

from etl.models import PG_CHANGE_SEQ, chats_t, events_t, history_t
from etl.sync.plan import FirstLoad, TickPlan
from etl.sync.rules import MAX_CLOCK_SKEW, first_valid_from_sql
from etl.sync.store.base import STORED_CHAT, UPSERT_UPDATES, SnapshotWrite

# The lock is taken in ``l`` (materialised, so exactly once) before ``b`` bumps the state;
# ON CONFLICT DO UPDATE and UPDATE work on the row's latest committed version, even one
# newer than the statement's snapshot, so the version returned is right, and so is the
# fence: a claim committed by another replica before this statement is seen, and one not
# yet committed holds the row, so this statement waits for it. ``b`` also says when the
# next tick is due and clears the failures (a tick that commits is not a failed one).
_LOCK = """
WITH l AS MATERIALIZED (
  SELECT pg_try_advisory_xact_lock(%(key)s) AS got,
         nextval(pg_get_serial_sequence('sync_runs', 'id')) AS run_id,
         {floor} AS floor{idle}
), b AS ({bump}
  RETURNING s.version, s.pending_removal_digest, s.pending_removal_streak
)"""
#: unfenced (no claim: one process, or ``etl sync --once``): creates the state row
_BUMP = """
  INSERT INTO instance_sync_state AS s
    (instance_id, pending_removal_streak, updated_at, version, next_due_at)
  SELECT %(iid)s, 0, %(now)s, 1, %(due)s FROM l WHERE l.got
  ON CONFLICT (instance_id) DO UPDATE SET version = s.version + 1,
    next_due_at = excluded.next_due_at, failures = 0, failure_kind = NULL"""
#: not a tick (an operator's command): the version only
_BUMP_VERSION = """
  INSERT INTO instance_sync_state AS s
    (instance_id, pending_removal_streak, updated_at, version)
  SELECT %(iid)s, 0, %(now)s, 1 FROM l WHERE l.got
  ON CONFLICT (instance_id) DO UPDATE SET version = s.version + 1"""
#: fenced: only while the claim the tick was made under is held (the row exists: the
#: claim made it)
_BUMP_FENCED = """
  UPDATE instance_sync_state AS s SET version = s.version + 1,
    next_due_at = %(due)s, failures = 0, failure_kind = NULL
  FROM l WHERE l.got AND s.instance_id = %(iid)s
    AND s.lease_owner = %(owner)s AND s.lease_epoch = %(epoch)s"""
_LOCK_COLUMNS = (
    "l.got, l.run_id, l.floor, b.version, b.pending_removal_digest, b.pending_removal_streak"
)
#: the ``load_watermark`` view (revision 0008) read in this statement's snapshot, which is
#: taken inside the tick's transaction (``Locked.floor``)
WATERMARK = "(SELECT watermark FROM load_watermark)"

#: the stored rows of some chats, with the open history period's start
LOAD_ROWS = """
SELECT c.chat_id, c.chat_type, c.name, c.archived, c.ephemeral_expiration,
       c.ephemeral_setting_at, c.removed_at, h.valid_from AS open_from
FROM chats c
LEFT OUTER JOIN chat_ephemeral_history h
  ON h.instance_id = c.instance_id AND h.chat_id = c.chat_id AND h.valid_to IS NULL
WHERE c.instance_id = %(iid)s AND c.chat_id = ANY(%(ids)s)
"""


#: the rows of some instances written at or above each one's floor (``load_since``): the
#: instance, then the columns ``Store.chats_since`` reads, in its order; parameters:
#: instance ids, floors (two arrays of the same length)
CHATS_SINCE = f"""
SELECT c.instance_id, {", ".join(f"c.{col.name}" for col in STORED_CHAT)}, c.current_chat_id
FROM unnest(%(ids)s::bigint[], %(floors)s::bigint[]) AS f (iid, floor)
JOIN chats c ON c.instance_id = f.iid AND c.change_seq >= f.floor
"""  # noqa: S608 (column names from the model; values are parameters)
ALIASES_SINCE = """
SELECT a.instance_id, a.alias_id, a.chat_id
FROM unnest(%(ids)s::bigint[], %(floors)s::bigint[]) AS f (iid, floor)
JOIN chat_aliases a ON a.instance_id = f.iid AND a.change_seq >= f.floor
"""

#: the bump of each kind of lock (``lock_sql``)
_BUMPS = {"tick": _BUMP, "fenced": _BUMP_FENCED, "version": _BUMP_VERSION}
#: a fenced tick's transaction ends if its client stalls in it for longer than the lease
#: (``Claim.idle_ms``): its row and advisory locks would hold up the instance's new owner
_IDLE = """,
         set_config('idle_in_transaction_session_timeout', %(idle)s, true) AS idle"""


@functools.cache
def lock_sql(bump: str, *, read: bool) -> str:
    """Try the instance's lock, reserve the run's id and bump the state, in one round
    trip. ``bump``: ``tick`` (a tick that commits: its next due time, no failures),
    ``fenced`` (the same, only under the tick's claim) or ``version`` (not a tick).
    ``read``: with ``LOAD_ROWS`` too, one row per stored chat read (the lock's columns
    repeated), or one row with a NULL ``chat_id`` when none is found or the lock was not
    free. A lock that was free but a bump that returned nothing (``version`` NULL) means
    the claim is no longer held."""
    ctes = _LOCK.format(bump=_BUMPS[bump], idle=_IDLE if bump == "fenced" else "", floor=WATERMARK)
    if not read:
        return f"{ctes}\nSELECT {_LOCK_COLUMNS}\nFROM l LEFT JOIN b ON true\n"
    return (
        f"{ctes}, r AS ({LOAD_ROWS})\nSELECT r.*, {_LOCK_COLUMNS}\n"
        "FROM l LEFT JOIN b ON true LEFT JOIN r ON l.got\n"
    )


#: try the lock again (reserving another run id, reading the floor), after another
#: writer held it
TRY_LOCK = (
    "SELECT pg_try_advisory_xact_lock(%s), nextval(pg_get_serial_sequence('sync_runs', 'id')), "
    + WATERMARK
)
#: wait for the lock
WAIT_LOCK = "SELECT pg_advisory_xact_lock(%s)"
#: the ``instances`` table's writers' lock
LOCK_REGISTRY = "SELECT pg_advisory_xact_lock(%s, %s)"

# Inserts take ``change_seq`` from the column's default (the transaction id); every update
# sets it, so that an incremental load sees the changed row again.
_UPSERT_CHATS_SUFFIX = (
    " ON CONFLICT (instance_id, chat_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in UPSERT_UPDATES)
    + f", change_seq = {PG_CHANGE_SEQ}"
)

# (the f-strings below insert PG_CHANGE_SEQ, this module's own SQL; values are parameters)
#: parameters: (now, now, instance id, chat ids)
_MARK_REMOVED = (
    f"UPDATE chats SET removed_at = %s, updated_at = %s, change_seq = {PG_CHANGE_SEQ} "  # noqa: S608
    "WHERE instance_id = %s AND chat_id = ANY(%s)"
)

#: parameters: (rows as JSON, instance id)
_CLOSE_HISTORY = f"""
UPDATE chat_ephemeral_history AS h SET valid_to = v.valid_to, change_seq = {PG_CHANGE_SEQ}
FROM json_to_recordset(%s::json) AS v (chat_id text, valid_to timestamptz)
WHERE h.instance_id = %s AND h.chat_id = v.chat_id AND h.valid_to IS NULL RETURNING 1
"""  # noqa: S608

#: parameters: (rows as JSON, instance id); a period never ends before it starts, even if
#: the clock stepped back
_CLOSE_PRESENCE = f"""
UPDATE chat_presence AS p
SET valid_to = GREATEST(v.valid_to, p.valid_from), change_seq = {PG_CHANGE_SEQ}
FROM json_to_recordset(%s::json) AS v (chat_id text, valid_to timestamptz)
WHERE p.instance_id = %s AND p.chat_id = v.chat_id AND p.valid_to IS NULL RETURNING 1
"""  # noqa: S608

#: parameters: (instance id, instance id, run id, rows as JSON); a period never starts
#: before the chat's previous one ended, even if the clock stepped back
_OPEN_PRESENCE = """
INSERT INTO chat_presence (instance_id, chat_id, valid_from, valid_to, sync_run_id)
SELECT %s, x.chat_id,
       GREATEST(x.valid_from, (SELECT MAX(q.valid_to) FROM chat_presence q
                               WHERE q.instance_id = %s AND q.chat_id = x.chat_id)),
       NULL, %s
FROM json_to_recordset(%s::json) AS x (chat_id text, valid_from timestamptz) RETURNING 1
"""


#: the persisted snapshot a tick leaves; parameters: (instance id, version, data, now,
#: floor)
_SAVE_SNAPSHOT = """
INSERT INTO instance_snapshots (instance_id, version, data, updated_at, change_seq_floor)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (instance_id) DO UPDATE
SET version = excluded.version, data = excluded.data, updated_at = excluded.updated_at,
  change_seq_floor = excluded.change_seq_floor
RETURNING 1
"""
#: the one at the version before moves on; parameters: (version, instance id, version - 1)
_BUMP_SNAPSHOT = """
UPDATE instance_snapshots SET version = %s WHERE instance_id = %s AND version = %s RETURNING 1
"""


def add_snapshot(stmt: CteStatement, snapshot: SnapshotWrite | None) -> None:
    """The tick's persisted snapshot, as a part of its statement (None: not persisted)."""
    if snapshot is None:
        return
    if snapshot.data is None:
        args = (snapshot.version, snapshot.instance_id, snapshot.version - 1)
        stmt.add("sn", "instance_snapshots", _BUMP_SNAPSHOT, *args)
    else:
        args2 = (
            snapshot.instance_id, snapshot.version, snapshot.data, snapshot.now, snapshot.floor
        )  # fmt: skip
        stmt.add("sn", "instance_snapshots", _SAVE_SNAPSHOT, *args2)


@functools.lru_cache(maxsize=512)
def values_sql(table: str, columns: tuple[str, ...], rows: int, suffix: str = "") -> str:
    """``INSERT INTO table (columns) VALUES (%s, ...), ... suffix``: ``rows`` rows."""
    names = ", ".join(f'"{c}"' for c in columns)
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    # names are this schema's own (never data); values go as bind parameters
    return f'INSERT INTO "{table}" ({names}) VALUES {", ".join([row] * rows)}{suffix}'  # noqa: S608


def values_params(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The columns (of the first row) and the flat parameters of ``values_sql``."""
    columns = tuple(rows[0])
    return columns, tuple(row[c] for row in rows for c in columns)


@functools.lru_cache(maxsize=128)
def json_insert_sql(table: Table, columns: tuple[str, ...], suffix: str = "") -> str:
    """``INSERT INTO table (columns) SELECT ... FROM json_to_recordset(%s::json)``: any
    number of rows as one JSON parameter (``json_rows``).

    One statement text whatever the row count: psycopg parses the placeholders of a long
    statement again on every execute, while one JSON text is dumped by orjson in C (arrays
    per column through ``unnest`` go through psycopg's slower list adapter).
    """
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    names = ", ".join(f'"{c}"' for c in columns)
    record = ", ".join(f'"{c}" {table.c[c].type.compile(dialect=dialect)}' for c in columns)
    # names and types are this schema's own (never data); the rows go as a bind parameter
    return (
        f'INSERT INTO "{table.name}" ({names}) SELECT {names} '  # noqa: S608
        f"FROM json_to_recordset(%s::json) AS x ({record}){suffix}"
    )


def json_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as the JSON parameter of ``json_insert_sql`` (datetimes as ISO 8601 with
    their offset, which ``timestamptz`` reads back exactly)."""
    return orjson.dumps(rows).decode()


@dataclass
class CteStatement:
    """One statement of data-modifying CTEs that ends with the ``sync_runs`` row.

    It selects the run's id, then the number of rows each counted part wrote (each part
    returns one row per row written), for ``written_listeners``.
    """

    parts: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    #: (part name, table) of the parts whose rows are counted
    counted: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, table: str | None, sql: str, *params: Any) -> None:
        """A part ``name AS (sql)`` (``sql`` may start with MATERIALIZED); ``table``: the
        table whose written rows it returns, one row each (None: not counted)."""
        body = sql if sql.startswith("MATERIALIZED") else f"({sql})"
        self.parts.append(f"{name} AS {body}")
        self.params.extend(params)
        if table is not None:
            self.counted.append((name, table))

    def add_rows(self, name: str, table: Table, rows: list[dict[str, Any]], suffix: str) -> None:
        """An INSERT of ``rows`` (one JSON parameter) as a part, unless there are none."""
        if rows:
            sql = json_insert_sql(table, tuple(rows[0]), suffix)
            self.add(name, table.name, f"{sql} RETURNING 1", json_rows(rows))

    def with_run(self, run: dict[str, Any]) -> tuple[str, tuple[Any, ...], list[str]]:
        """The whole statement with ``run`` as its ``sync_runs`` row: (SQL, parameters,
        the table of each count after the run's id)."""
        columns = tuple(run)
        parts = [*self.parts, f"s AS ({values_sql('sync_runs', columns, 1, ' RETURNING id')})"]
        counted = [*self.counted, ("s", "sync_runs")]
        # the names are this module's own; every value goes as a bind parameter
        counts = "".join(f", (SELECT count(*) FROM {n})" for n, _ in counted)  # noqa: S608
        sql = f"WITH {', '.join(parts)} SELECT (SELECT id FROM s){counts}"  # noqa: S608
        params = (*self.params, *(run[c] for c in columns))
        return sql, params, [table for _, table in counted]


def tick_statement(plan: TickPlan, run_id: int) -> CteStatement:
    """A tick's writes in one statement: the chats upsert, the removals, the history
    closes and new periods, the events (the run row is added by ``with_run``).

    The parts of one statement run in no set order, but one open history row per chat is
    a unique index checked row by row: so the new periods' ``SELECT`` waits on the count
    of the closed ones (an InitPlan, run to completion before the first row is inserted),
    and a closed row, updated by this very transaction, is no longer a conflict. The
    foreign keys from history and events to new chats are checked at the statement's end,
    when the chats are in.
    """
    w = CteStatement()
    iid, now = plan.instance_id, plan.now
    w.add_rows("c", chats_t, plan.chat_rows, _UPSERT_CHATS_SUFFIX)
    if plan.removed:
        w.add("r", "chats", f"{_MARK_REMOVED} RETURNING 1", now, now, iid, plan.removed)
    after_closes = ""
    if plan.closes:
        closes = json_rows([{"chat_id": c.chat_id, "valid_to": c.valid_to} for c in plan.closes])
        w.add("k", "chat_ephemeral_history", _CLOSE_HISTORY, closes, iid)
        after_closes = " WHERE (SELECT count(*) FROM k) >= 0"
    w.add_rows("h", history_t, plan.history_rows(run_id), after_closes)
    w.add_rows("e", events_t, plan.event_rows(run_id), "")
    _add_presence(w, plan, run_id)
    return w


def _add_presence(w: CteStatement, plan: TickPlan, run_id: int) -> None:
    """The presence closes and opens of a tick: different chats (one leaves the list, the
    other enters it), so the two parts never touch the same row."""
    iid = plan.instance_id
    if plan.presence_closes:
        closes = [{"chat_id": c.chat_id, "valid_to": c.valid_to} for c in plan.presence_closes]
        w.add("pc", "chat_presence", _CLOSE_PRESENCE, json_rows(closes), iid)
    if plan.presence_opens:
        opens = [{"chat_id": o.chat_id, "valid_from": o.valid_from} for o in plan.presence_opens]
        w.add("po", "chat_presence", _OPEN_PRESENCE, iid, iid, run_id, json_rows(opens))


#: the chats of a first load, as one JSON parameter (``ChatRecord``s as orjson dumps them)
_FIRST_LOAD_CHATS = """
SELECT * FROM json_to_recordset(%s::json) AS x (
  chat_id text, chat_type text, name text, archived boolean,
  ephemeral_expiration integer, ephemeral_setting_at timestamptz)
"""
#: parameters: instance id, now, now
_FIRST_LOAD_INSERT_CHATS = """
INSERT INTO chats (instance_id, chat_id, chat_type, name, archived, ephemeral_expiration,
                   ephemeral_setting_at, first_seen_at, updated_at, removed_at)
SELECT %s, chat_id, chat_type, name, archived, COALESCE(ephemeral_expiration, 0),
       ephemeral_setting_at, %s, %s, NULL FROM v RETURNING 1
"""
#: parameters: instance id, now + MAX_CLOCK_SKEW, now, run id (the rule's text is ours)
_FIRST_LOAD_HISTORY = f"""
INSERT INTO chat_ephemeral_history (instance_id, chat_id, ephemeral_expiration,
                                    ephemeral_setting_at, valid_from, valid_to, sync_run_id)
SELECT %s, chat_id, COALESCE(ephemeral_expiration, 0), ephemeral_setting_at,
       {first_valid_from_sql("ephemeral_setting_at", "%s", "%s")}, NULL, %s
FROM v RETURNING 1
"""  # noqa: S608
#: parameters: instance id, now, run id
_FIRST_LOAD_PRESENCE = """
INSERT INTO chat_presence (instance_id, chat_id, valid_from, valid_to, sync_run_id)
SELECT %s, chat_id, %s, NULL, %s FROM v RETURNING 1
"""
#: parameters: instance id, now, run id
_FIRST_LOAD_EVENTS = """
INSERT INTO chat_events (instance_id, chat_id, event_type, old_value, new_value,
                         occurred_at, sync_run_id)
SELECT %s, chat_id, 'created', NULL, name, %s, %s FROM v RETURNING 1
"""


def first_load_statement(load: FirstLoad, run_id: int) -> CteStatement:
    """A first load in one statement: the chats go once, as one JSON text that orjson
    dumps in C straight from the ``ChatRecord``s, and the database derives the chats,
    history and event rows from it, instead of this process building three rows per chat
    (see docs/benchmarks.md)."""
    iid, now = load.instance_id, load.now
    w = CteStatement()
    w.add("v", None, f"MATERIALIZED ({_FIRST_LOAD_CHATS})", orjson.dumps(load.chats).decode())
    w.add("c", "chats", _FIRST_LOAD_INSERT_CHATS, iid, now, now)
    if load.history:  # not on a platform without disappearing messages
        w.add(
            "h",
            "chat_ephemeral_history",
            _FIRST_LOAD_HISTORY,
            iid,
            now + MAX_CLOCK_SKEW,
            now,
            run_id,
        )
    w.add("e", "chat_events", _FIRST_LOAD_EVENTS, iid, now, run_id)
    w.add("p", "chat_presence", _FIRST_LOAD_PRESENCE, iid, now, run_id)
    return w
