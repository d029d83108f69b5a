"""Fenced leases and backoff in the database: an instance is owned by a replica under a
fencing epoch (``instance_sync_state.lease_epoch``) for as long as that replica's own lease
(``replicas.lease_until``) is renewed; each instance's next due time and its failures in a
row (``next_due_at``, ``failures``, ``failure_kind``) are kept with it, so that whichever
replica holds it, or a restarted one, honours its backoff.

The per-instance ``lease_until`` goes: a lease is the replica's now. Existing rows keep
their owner with epoch 0; no replica row has a lease yet, so every instance is free to be
claimed when the replicas start (they are stopped for the upgrade).

``failures`` and ``failure_kind`` are rebuilt from ``sync_runs``: the failed runs after
the instance's last run that did not fail, and the kind of the latest. What the rebuild
cannot know: when the next tick was due (``next_due_at`` stays NULL, so each failing
instance is polled once at start, then backs off from its count as before); runs that
retention has pruned are not counted.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FAILURES = """
UPDATE instance_sync_state SET
  failures = (
    SELECT COUNT(*) FROM sync_runs r
    WHERE r.instance_id = instance_sync_state.instance_id AND r.status = 'failed'
      AND NOT EXISTS (
        SELECT 1 FROM sync_runs o
        WHERE o.instance_id = r.instance_id AND o.status <> 'failed'
          AND o.started_at > r.started_at)),
  failure_kind = (
    SELECT r.error_kind FROM sync_runs r
    WHERE r.instance_id = instance_sync_state.instance_id
    ORDER BY r.started_at DESC, r.id DESC LIMIT 1)
"""
_NO_KIND = "UPDATE instance_sync_state SET failure_kind = NULL WHERE failures = 0"


def upgrade() -> None:
    # instance_sync_state is referenced by no other table: SQLite may rebuild it
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("next_due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("failure_kind", sa.Text(), nullable=True))
        batch_op.drop_column("lease_until")
        batch_op.create_index("ix_instance_sync_state_lease_owner", ["lease_owner"], unique=False)
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.execute(_FAILURES)
    op.execute(_NO_KIND)


def downgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.drop_column("lease_until")
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_sync_state_lease_owner")
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_column("failure_kind")
        batch_op.drop_column("failures")
        batch_op.drop_column("next_due_at")
        batch_op.drop_column("lease_epoch")
