"""Persisted snapshots: ``instance_snapshots`` holds, per instance, what the sync knows of
its stored chats, packed (a fingerprint per chat, the removed ones, the hashes of the last
list's elements), written in each tick's transaction with the state version it describes.
A new process reads one value per instance instead of every chat row.

Created empty: each instance's next tick writes its snapshot (from the rows, as before).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instance_snapshots",
        sa.Column("instance_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id_instance"],
            name=op.f("fk_instance_snapshots_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_instance_snapshots")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # the packed arrays are hashes, which do not compress: store them out of line
        # without trying to (every tick rewrites each instance's value)
        op.execute("ALTER TABLE instance_snapshots ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("instance_snapshots")
