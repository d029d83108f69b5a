"""The real Green-API: chat ids that change (chat_aliases, chats.current_chat_id), the
platform of an instance, the instance state and id changes of a run, and the operator's
acceptance of an id switch; chats_current shows the platform and the id in use.

Self-contained: it adds columns, one table, one index, and recreates the view
``chats_current`` (created by 0002) with two columns appended.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READABLE = """CASE c.ephemeral_expiration
        WHEN 0 THEN 'off'
        WHEN 86400 THEN '24 hours'
        WHEN 604800 THEN '7 days'
        WHEN 7776000 THEN '90 days'
        ELSE CAST(c.ephemeral_expiration AS TEXT) || ' seconds'
    END"""

_CHATS_CURRENT = """
CREATE VIEW chats_current AS
SELECT
    c.instance_id,
    i.label AS instance_label,
    c.chat_id,
    c.chat_type,
    c.name,
    c.archived,
    c.ephemeral_expiration,
    {readable} AS ephemeral_setting,
    c.ephemeral_setting_at,
    c.first_seen_at,
    c.updated_at{extra}
FROM chats c
JOIN instances i ON i.id_instance = c.instance_id
WHERE c.removed_at IS NULL
"""

#: 0002's view, restored by the downgrade
CHATS_CURRENT_0002 = _CHATS_CURRENT.format(readable=READABLE, extra="")
#: the same columns, then the platform and the id the API uses now
CHATS_CURRENT = _CHATS_CURRENT.format(
    readable=READABLE,
    extra=",\n    i.platform,\n    COALESCE(c.current_chat_id, c.chat_id) AS current_chat_id",
)


def upgrade() -> None:
    # in place on SQLite too (ADD COLUMN): rebuilding a table that others reference
    # (instances, chats, sync_runs) would fail on their foreign keys once it holds rows
    op.execute("DROP VIEW IF EXISTS chats_current")
    with op.batch_alter_table("instances", schema=None, recreate="never") as batch_op:
        batch_op.add_column(
            sa.Column("platform", sa.Text(), server_default=sa.text("'whatsapp'"), nullable=False)
        )
    with op.batch_alter_table("chats", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("current_chat_id", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_chats_current_chat_id",
            ["instance_id"],
            unique=False,
            postgresql_where=sa.text("current_chat_id IS NOT NULL"),
            sqlite_where=sa.text("current_chat_id IS NOT NULL"),
        )
    op.create_table(
        "chat_aliases",
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("alias_id", sa.Text(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_aliases_chat",
        ),
        sa.PrimaryKeyConstraint("instance_id", "alias_id", name=op.f("pk_chat_aliases")),
    )
    with op.batch_alter_table("chat_aliases", schema=None, recreate="never") as batch_op:
        batch_op.create_index("ix_chat_aliases_chat", ["instance_id", "chat_id"], unique=False)
    with op.batch_alter_table("sync_runs", schema=None, recreate="never") as batch_op:
        batch_op.add_column(
            sa.Column("ids_changed", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("instance_state", sa.Text(), nullable=True))
    with op.batch_alter_table("instance_sync_state", schema=None, recreate="never") as batch_op:
        batch_op.add_column(
            sa.Column("id_switch_accepted_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute(CHATS_CURRENT)


def downgrade() -> None:
    # SQLite (>= 3.35) drops these columns in place: rebuilding a table that others
    # reference (chats, instances, sync_runs) would fail on their foreign keys once it
    # holds rows
    op.execute("DROP VIEW IF EXISTS chats_current")
    with op.batch_alter_table("instance_sync_state", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("id_switch_accepted_at")
    with op.batch_alter_table("sync_runs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("instance_state")
        batch_op.drop_column("ids_changed")
    with op.batch_alter_table("chat_aliases", schema=None) as batch_op:
        batch_op.drop_index("ix_chat_aliases_chat")
    op.drop_table("chat_aliases")
    with op.batch_alter_table("chats", schema=None, recreate="never") as batch_op:
        batch_op.drop_index("ix_chats_current_chat_id")
        batch_op.drop_column("current_chat_id")
    with op.batch_alter_table("instances", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("platform")
    op.execute(CHATS_CURRENT_0002)
