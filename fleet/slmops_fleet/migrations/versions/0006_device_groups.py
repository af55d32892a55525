"""Named device groups and the releases assigned to them (continuous targeting).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from slmops_fleet.store.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_groups",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("selector", sa.Text(), nullable=True),
        sa.Column("devices", sa.JSON(), nullable=True),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("assignment_id", sa.String(length=64), nullable=True),
        sa.Column("release_id", sa.String(length=64), nullable=True),
        sa.Column("package_id", sa.String(length=64), nullable=True),
        sa.Column("plan", sa.JSON(), nullable=True),
        sa.Column("assigned_at", UTCDateTime(), nullable=True),
        sa.Column("halted", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "group_rollouts",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("assignment_id", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id"),
    )
    op.create_index("ix_group_rollouts_assignment_id", "group_rollouts", ["assignment_id"])


def downgrade() -> None:
    op.drop_index("ix_group_rollouts_assignment_id", table_name="group_rollouts")
    op.drop_table("group_rollouts")
    op.drop_table("device_groups")
