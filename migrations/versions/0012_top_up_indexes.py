"""Indexes on ``(instance_id, change_seq)`` of ``chats`` and ``chat_aliases``, for the read
that tops a stale snapshot up: the rows of each instance written at or above its
snapshot's floor (``Store.load_since``).

Without them PostgreSQL answered that read, one statement per 500 instances, with a hash
join over a sequential scan of the whole table, so a takeover read the table once per
chunk: a cost that grew with the square of the fleet. With them it reads only the rows
written since each snapshot. Each index is one more entry to write per row written.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 15:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "chats": "ix_chats_instance_change_seq",
    "chat_aliases": "ix_chat_aliases_instance_change_seq",
}


def upgrade() -> None:
    for table, name in INDEXES.items():
        op.create_index(name, table, ["instance_id", "change_seq"], unique=False)


def downgrade() -> None:
    for table, name in INDEXES.items():
        op.drop_index(name, table_name=table)
