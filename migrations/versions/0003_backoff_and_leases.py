"""Backoff visible in sync_runs; lease columns for several replicas on one PostgreSQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backoff_seconds", sa.Integer(), nullable=True))
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("backoff_seconds")
