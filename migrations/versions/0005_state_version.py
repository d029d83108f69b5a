"""instance_sync_state.version (lets a process trust its cached chat fingerprints); the
sync_run_id foreign keys become DEFERRABLE INITIALLY DEFERRED (the run row is written last).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 13:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


RUN_FKS = (
    ("chat_ephemeral_history", "fk_chat_ephemeral_history_sync_run_id_sync_runs"),
    ("chat_events", "fk_chat_events_sync_run_id_sync_runs"),
)


def _run_fks(*, deferred: bool) -> None:
    for table, name in RUN_FKS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(name, type_="foreignkey")
            batch_op.create_foreign_key(
                name,
                "sync_runs",
                ["sync_run_id"],
                ["id"],
                deferrable=True if deferred else None,
                initially="DEFERRED" if deferred else None,
            )


def upgrade() -> None:
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("version", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
    _run_fks(deferred=True)


def downgrade() -> None:
    _run_fks(deferred=False)
    with op.batch_alter_table("instance_sync_state", schema=None) as batch_op:
        batch_op.drop_column("version")
