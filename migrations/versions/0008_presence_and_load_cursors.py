"""Presence periods of each chat (``chat_presence``) and the views that answer as of an
instant for the chats present then (``present_ephemeral_history``); an incremental-load
cursor on every table that changes (``change_seq``) and its safe upper bound
(``load_watermark``).

Presence is rebuilt from what the database already holds: a chat was in the list from
``chats.first_seen_at``, left it at each ``removed`` event and came back at each
``reappeared`` event (``chat_events``, since revision 0002), and ``chats.removed_at`` says
whether it is in the list now. What the rebuild cannot know, and what it does instead:

* a chat whose removals and returns happened before revision 0002 (no events): its
  absences before the last ``removed_at`` are unknown; its period runs from
  ``first_seen_at`` to ``removed_at`` (or stays open) as if it had stayed;
* a chat present now whose last event is a removal (its ``reappeared`` event is missing):
  when it came back is unknown; its last period starts at ``chats.updated_at`` (the
  return bumped it, a later change may have bumped it again), so it counts as absent for
  that unknown stretch rather than present;
* a chat removed now whose last event is not a removal: its period ends at
  ``removed_at``;
* ``sync_run_id``: the run of the ``created`` or ``reappeared`` event that opened the
  period (``NULL`` when there is none, or retention has pruned that run).

Existing rows get ``change_seq = 1``; every later write gets a larger number, so a first
incremental load from cursor 0 takes them all.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 12:00:00
"""

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the tables with an incremental cursor
CURSOR_TABLES = (
    "instances",
    "chats",
    "chat_aliases",
    "chat_ephemeral_history",
    "chat_events",
    "sync_runs",
)
#: PostgreSQL's number of the current write transaction (the column's default there)
PG_CHANGE_SEQ = "CAST(CAST(pg_current_xact_id() AS text) AS bigint)"

READABLE = """CASE {col}
        WHEN 0 THEN 'off'
        WHEN 86400 THEN '24 hours'
        WHEN 604800 THEN '7 days'
        WHEN 7776000 THEN '90 days'
        ELSE CAST({col} AS TEXT) || ' seconds'
    END"""

# each history period cut to the presence periods it overlaps; empty presence periods (a
# chat seen and missed at one clock reading) contain no instant and are left out
PRESENT_EPHEMERAL_HISTORY = f"""
CREATE VIEW present_ephemeral_history AS
SELECT
    h.id AS history_id,
    p.id AS presence_id,
    h.instance_id,
    h.chat_id,
    h.ephemeral_expiration,
    {READABLE.format(col="h.ephemeral_expiration")} AS ephemeral_setting,
    h.ephemeral_setting_at,
    CASE WHEN p.valid_from > h.valid_from THEN p.valid_from ELSE h.valid_from END
        AS valid_from,
    CASE
        WHEN h.valid_to IS NULL THEN p.valid_to
        WHEN p.valid_to IS NULL OR h.valid_to < p.valid_to THEN h.valid_to
        ELSE p.valid_to
    END AS valid_to
FROM chat_ephemeral_history h
JOIN chat_presence p
  ON p.instance_id = h.instance_id
 AND p.chat_id = h.chat_id
 AND (p.valid_to IS NULL OR (p.valid_to > p.valid_from AND h.valid_from < p.valid_to))
 AND (h.valid_to IS NULL OR p.valid_from < h.valid_to)
"""

# PostgreSQL: every transaction below the snapshot's xmin has ended, so a row whose
# change_seq is below it is final. SQLite: writers are serialised and a reader sees only
# committed rows, so everything it sees is final; the bound is the next number.
LOAD_WATERMARK = {
    "postgresql": """
CREATE VIEW load_watermark AS
SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint) AS watermark
""",
    "sqlite": "CREATE VIEW load_watermark AS SELECT 1 + MAX(\n"
    + ",\n".join(
        f"  (SELECT COALESCE(MAX(change_seq), 1) FROM {t})"
        for t in (*CURSOR_TABLES, "chat_presence")
    )
    + "\n) AS watermark\n",
}

VIEWS = ("load_watermark", "present_ephemeral_history")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in CURSOR_TABLES:
        # a constant default: no table rewrite on PostgreSQL, a plain ADD COLUMN on SQLite
        op.add_column(
            table,
            sa.Column("change_seq", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        )
        if dialect == "postgresql":
            op.alter_column(table, "change_seq", server_default=sa.text(PG_CHANGE_SEQ))
        op.create_index(f"ix_{table}_change_seq", table, ["change_seq"], unique=False)
    _create_presence(dialect)
    _rebuild_presence(op.get_bind())
    op.execute(PRESENT_EPHEMERAL_HISTORY)
    op.execute(LOAD_WATERMARK[dialect])


def _create_presence(dialect: str) -> None:
    seq_default = PG_CHANGE_SEQ if dialect == "postgresql" else "1"
    op.create_table(
        "chat_presence",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sync_run_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "change_seq", sa.BigInteger(), server_default=sa.text(seq_default), nullable=False
        ),
        sa.CheckConstraint(
            "valid_to IS NULL OR valid_to >= valid_from",
            name=op.f("ck_chat_presence_valid_interval"),
        ),
        sa.ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_presence_chat",
        ),
        sa.ForeignKeyConstraint(
            ["sync_run_id"],
            ["sync_runs.id"],
            name=op.f("fk_chat_presence_sync_run_id_sync_runs"),
            deferrable=True,
            initially="DEFERRED",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_presence")),
    )
    op.create_index(
        "ix_chat_presence_chat", "chat_presence", ["instance_id", "chat_id", "valid_from"]
    )
    op.create_index("ix_chat_presence_sync_run_id", "chat_presence", ["sync_run_id"])
    op.create_index("ix_chat_presence_change_seq", "chat_presence", ["change_seq"])
    op.create_index(
        "uq_chat_presence_open",
        "chat_presence",
        ["instance_id", "chat_id"],
        unique=True,
        postgresql_where=sa.text("valid_to IS NULL"),
        sqlite_where=sa.text("valid_to IS NULL"),
    )


# -- the rebuild ---------------------------------------------------------------------------

_CHATS = sa.text(
    "SELECT chat_id, first_seen_at, updated_at, removed_at FROM chats "
    "WHERE instance_id = :iid ORDER BY chat_id"
)
_EVENTS = sa.text(
    "SELECT chat_id, event_type, occurred_at, sync_run_id FROM chat_events "
    "WHERE instance_id = :iid AND event_type IN ('created', 'removed', 'reappeared') "
    "ORDER BY chat_id, occurred_at, id"
)
_INSERT = sa.text(
    "INSERT INTO chat_presence (instance_id, chat_id, valid_from, valid_to, sync_run_id) "
    "VALUES (:instance_id, :chat_id, :valid_from, :valid_to, :sync_run_id)"
)
_BATCH = 5000


def _rebuild_presence(conn: sa.Connection) -> None:
    """The periods of every chat, one instance at a time (its chats and events in memory).

    Timestamps go back as the driver returned them (datetimes on PostgreSQL, the stored
    text on SQLite, which compares chronologically), so ``max`` compares like with like.
    """
    instances = [r[0] for r in conn.execute(sa.text("SELECT DISTINCT instance_id FROM chats"))]
    batch: list[dict[str, Any]] = []
    for iid in instances:
        events: dict[str, list[Any]] = {}
        for e in conn.execute(_EVENTS, {"iid": iid}):
            events.setdefault(e.chat_id, []).append(e)
        for chat in conn.execute(_CHATS, {"iid": iid}).all():
            for valid_from, valid_to, run in _periods(chat, events.get(chat.chat_id, [])):
                batch.append(
                    {
                        "instance_id": iid,
                        "chat_id": chat.chat_id,
                        "valid_from": valid_from,
                        "valid_to": valid_to,
                        "sync_run_id": run,
                    }
                )
            if len(batch) >= _BATCH:
                conn.execute(_INSERT, batch)
                batch = []
    if batch:
        conn.execute(_INSERT, batch)


def _periods(chat: Any, events: list[Any]) -> Iterator[tuple[Any, Any, int | None]]:
    """(valid_from, valid_to, sync_run_id) of one chat's presence periods, oldest first."""
    created = next((e for e in events if e.event_type == "created"), None)
    open_from, run = chat.first_seen_at, created.sync_run_id if created is not None else None
    last_to = None
    for e in events:
        if e.event_type == "removed" and open_from is not None:
            last_to = max(e.occurred_at, open_from)
            yield open_from, last_to, run
            open_from = None
        elif e.event_type == "reappeared" and open_from is None:
            open_from = e.occurred_at if last_to is None else max(e.occurred_at, last_to)
            run = e.sync_run_id
    if chat.removed_at is None and open_from is None:  # its return was not recorded
        open_from, run = max(chat.updated_at, last_to), None
    if chat.removed_at is not None and open_from is not None:  # nor was its removal
        yield open_from, max(chat.removed_at, open_from), run
        return
    if open_from is not None:
        yield open_from, None, run


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("chat_presence")
    for table in CURSOR_TABLES:
        op.drop_index(f"ix_{table}_change_seq", table_name=table)
        if dialect == "sqlite":
            # SQLite 3.35+ drops a column in place; a batch rebuild would drop and recreate
            # the parent tables that history and events reference
            op.execute(f"ALTER TABLE {table} DROP COLUMN change_seq")
        else:
            op.drop_column(table, "change_seq")
