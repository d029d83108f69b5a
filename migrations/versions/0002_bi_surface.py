"""BI surface: chat_events table and the chats_current, ephemeral_changes and
instance_sync_health views.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READABLE = """CASE {col}
        WHEN 0 THEN 'off'
        WHEN 86400 THEN '24 hours'
        WHEN 604800 THEN '7 days'
        WHEN 7776000 THEN '90 days'
        ELSE CAST({col} AS TEXT) || ' seconds'
    END"""

CHATS_CURRENT = f"""
CREATE VIEW chats_current AS
SELECT
    c.instance_id,
    i.label AS instance_label,
    c.chat_id,
    c.chat_type,
    c.name,
    c.archived,
    c.ephemeral_expiration,
    {READABLE.format(col="c.ephemeral_expiration")} AS ephemeral_setting,
    c.ephemeral_setting_at,
    c.first_seen_at,
    c.updated_at
FROM chats c
JOIN instances i ON i.id_instance = c.instance_id
WHERE c.removed_at IS NULL
"""

EPHEMERAL_CHANGES = f"""
CREATE VIEW ephemeral_changes AS
SELECT
    cur.id AS history_id,
    cur.instance_id,
    cur.chat_id,
    prev.ephemeral_expiration AS expiration_before,
    cur.ephemeral_expiration AS expiration_after,
    {READABLE.format(col="prev.ephemeral_expiration")} AS setting_before,
    {READABLE.format(col="cur.ephemeral_expiration")} AS setting_after,
    cur.valid_from AS changed_at,
    cur.sync_run_id
FROM chat_ephemeral_history cur
JOIN chat_ephemeral_history prev
  ON prev.instance_id = cur.instance_id
 AND prev.chat_id = cur.chat_id
 AND prev.valid_to = cur.valid_from
"""

# "success" = the API answered with a usable list (status ok or anomaly).
HEALTH = """
CREATE VIEW instance_sync_health AS
SELECT
    i.id_instance AS instance_id,
    i.label,
    i.enabled,
    (SELECT MAX(r.started_at) FROM sync_runs r
      WHERE r.instance_id = i.id_instance) AS last_run_at,
    (SELECT r.status FROM sync_runs r
      WHERE r.instance_id = i.id_instance
      ORDER BY r.started_at DESC, r.id DESC LIMIT 1) AS last_status,
    (SELECT MAX(r.started_at) FROM sync_runs r
      WHERE r.instance_id = i.id_instance AND r.status IN ('ok', 'anomaly')) AS last_success_at,
    (SELECT COUNT(*) FROM sync_runs r
      WHERE r.instance_id = i.id_instance AND r.status = 'failed'
        AND r.started_at > COALESCE(
          (SELECT MAX(s.started_at) FROM sync_runs s
            WHERE s.instance_id = i.id_instance AND s.status IN ('ok', 'anomaly')),
          {epoch})) AS consecutive_failures,
    (SELECT COUNT(*) FROM sync_runs r
      WHERE r.instance_id = i.id_instance AND r.started_at >= {since}) AS runs_24h,
    (SELECT CAST(SUM(CASE WHEN r.status IN ('ok', 'anomaly') THEN 1 ELSE 0 END) AS REAL)
            / NULLIF(COUNT(*), 0)
       FROM sync_runs r
      WHERE r.instance_id = i.id_instance AND r.started_at >= {since}) AS success_ratio_24h
FROM instances i
"""

HEALTH_BY_DIALECT = {
    "postgresql": HEALTH.format(
        since="now() - interval '24 hours'", epoch="'-infinity'::timestamptz"
    ),
    # SQLite stores UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'; datetime() yields the same prefix.
    "sqlite": HEALTH.format(since="datetime('now', '-1 day')", epoch="''"),
}

VIEWS = ("instance_sync_health", "ephemeral_changes", "chats_current")


def upgrade() -> None:
    op.create_table(
        "chat_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("old_value", sa.Text(), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sync_run_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id_instance"],
            name=op.f("fk_chat_events_instance_id_instances"),
        ),
        sa.ForeignKeyConstraint(
            ["sync_run_id"], ["sync_runs.id"], name=op.f("fk_chat_events_sync_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_events")),
    )
    with op.batch_alter_table("chat_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_chat_events_chat", ["instance_id", "chat_id", "occurred_at"], unique=False
        )
        batch_op.create_index("ix_chat_events_occurred_at", ["occurred_at"], unique=False)
    dialect = op.get_bind().dialect.name
    op.execute(CHATS_CURRENT)
    op.execute(EPHEMERAL_CHANGES)
    op.execute(HEALTH_BY_DIALECT[dialect])


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    with op.batch_alter_table("chat_events", schema=None) as batch_op:
        batch_op.drop_index("ix_chat_events_occurred_at")
        batch_op.drop_index("ix_chat_events_chat")
    op.drop_table("chat_events")
