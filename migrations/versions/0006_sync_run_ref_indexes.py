"""Indexes on the references to sync_runs, so retention can prune old runs cheaply.

Deleting a ``sync_runs`` row makes the database look for rows that reference it (foreign
keys from ``chat_ephemeral_history.sync_run_id`` and ``chat_events.sync_run_id``); without
an index that is a full scan of each table per deleted run.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 14:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chat_ephemeral_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_chat_ephemeral_history_sync_run_id", ["sync_run_id"], unique=False
        )
    with op.batch_alter_table("chat_events", schema=None) as batch_op:
        batch_op.create_index("ix_chat_events_sync_run_id", ["sync_run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("chat_events", schema=None) as batch_op:
        batch_op.drop_index("ix_chat_events_sync_run_id")
    with op.batch_alter_table("chat_ephemeral_history", schema=None) as batch_op:
        batch_op.drop_index("ix_chat_ephemeral_history_sync_run_id")
