"""Fleet rollback: a rollout that returns the devices another rollout changed names it.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("rollback_of", sa.String(length=64), nullable=True))
        batch.create_index("ix_rollouts_rollback_of", ["rollback_of"])


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_index("ix_rollouts_rollback_of")
        batch.drop_column("rollback_of")
