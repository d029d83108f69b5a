"""Initial schema: instances, chats, chat_ephemeral_history (SCD2), sync_runs, instance_sync_state.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 11:03:50.817235
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "instances",
        sa.Column("id_instance", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("api_url", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id_instance", name=op.f("pk_instances")),
    )
    op.create_table(
        "chats",
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("chat_type", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("ephemeral_expiration", sa.Integer(), nullable=False),
        sa.Column("ephemeral_setting_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id_instance"], name=op.f("fk_chats_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("instance_id", "chat_id", name=op.f("pk_chats")),
    )
    op.create_table(
        "instance_sync_state",
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("pending_removal_digest", sa.Text(), nullable=True),
        sa.Column("pending_removal_streak", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id_instance"],
            name=op.f("fk_instance_sync_state_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_instance_sync_state")),
    )
    op.create_table(
        "sync_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_kind", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("chats_received", sa.Integer(), nullable=False),
        sa.Column("chats_inserted", sa.Integer(), nullable=False),
        sa.Column("chats_updated", sa.Integer(), nullable=False),
        sa.Column("chats_removed", sa.Integer(), nullable=False),
        sa.Column("chats_rejected", sa.Integer(), nullable=False),
        sa.Column("ephemeral_changes", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('ok', 'anomaly', 'failed')", name=op.f("ck_sync_runs_status")
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id_instance"],
            name=op.f("fk_sync_runs_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sync_runs_instance_started", ["instance_id", "started_at"], unique=False
        )
        batch_op.create_index("ix_sync_runs_started_at", ["started_at"], unique=False)

    op.create_table(
        "chat_ephemeral_history",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=False),
        sa.Column("ephemeral_expiration", sa.Integer(), nullable=False),
        sa.Column("ephemeral_setting_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sync_run_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "valid_to IS NULL OR valid_to > valid_from",
            name=op.f("ck_chat_ephemeral_history_valid_interval"),
        ),
        sa.ForeignKeyConstraint(
            ["instance_id", "chat_id"],
            ["chats.instance_id", "chats.chat_id"],
            name="fk_chat_ephemeral_history_chat",
        ),
        sa.ForeignKeyConstraint(
            ["sync_run_id"],
            ["sync_runs.id"],
            name=op.f("fk_chat_ephemeral_history_sync_run_id_sync_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_ephemeral_history")),
    )
    with op.batch_alter_table("chat_ephemeral_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_chat_ephemeral_history_chat", ["instance_id", "chat_id", "valid_from"], unique=False
        )
        batch_op.create_index(
            "uq_chat_ephemeral_history_open",
            ["instance_id", "chat_id"],
            unique=True,
            postgresql_where=sa.text("valid_to IS NULL"),
            sqlite_where=sa.text("valid_to IS NULL"),
        )


def downgrade() -> None:

    with op.batch_alter_table("chat_ephemeral_history", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_chat_ephemeral_history_open",
            postgresql_where=sa.text("valid_to IS NULL"),
            sqlite_where=sa.text("valid_to IS NULL"),
        )
        batch_op.drop_index("ix_chat_ephemeral_history_chat")

    op.drop_table("chat_ephemeral_history")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_sync_runs_started_at")
        batch_op.drop_index("ix_sync_runs_instance_started")

    op.drop_table("sync_runs")
    op.drop_table("instance_sync_state")
    op.drop_table("chats")
    op.drop_table("instances")
