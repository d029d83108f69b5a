"""A persisted snapshot's ``change_seq_floor``: every chat and alias row written after the
version the snapshot describes has a ``change_seq`` at least this. A process that finds
the snapshot stale (its version behind the state's) reads only the rows at or above the
floor and tops the snapshot up, instead of reading every chat row of the instance.

NULL in the snapshots written before this revision: those are used only while current,
as before.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "instance_snapshots", sa.Column("change_seq_floor", sa.BigInteger(), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("instance_snapshots") as batch:
        batch.drop_column("change_seq_floor")
