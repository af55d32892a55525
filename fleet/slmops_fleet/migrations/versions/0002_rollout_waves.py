"""Rollout waves, gates, pause/resume/cancel: the plan and current wave of a rollout, each target
device's wave and previous package, one row per wave; device tags for rollout selectors.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from slmops_fleet.store.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("plan", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("current_wave", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wave", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("previous_package_id", sa.String(length=64), nullable=True))
    op.create_table(
        "rollout_waves",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "idx"),
    )
    # Rollouts made before waves existed: one wave holding every target device.
    op.execute(
        "INSERT INTO rollout_waves (rollout_id, idx, size, state, started_at, completed_at, finished_at, reason) "
        "SELECT r.id, 0, (SELECT count(*) FROM rollout_devices d WHERE d.rollout_id = r.id), "
        "CASE WHEN r.state = 'in_progress' THEN 'running' ELSE 'passed' END, r.created_at, NULL, NULL, NULL "
        "FROM rollouts r"
    )


def downgrade() -> None:
    op.drop_table("rollout_waves")
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.drop_column("previous_package_id")
        batch_op.drop_column("wave")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("reason")
        batch_op.drop_column("current_wave")
        batch_op.drop_column("plan")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("tags")
