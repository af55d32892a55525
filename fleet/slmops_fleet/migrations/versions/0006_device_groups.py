"""Named device groups and the releases assigned to them (continuous targeting); stored rollout
selectors rewritten for the selector language (a value with spaces or ( ) = ! < > is quoted now).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

from slmops_fleet.store.schema import UTCDateTime

_OLD_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_BARE = re.compile(r"[^\s(),\"'=!<>]+")

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
    rollouts = sa.table("rollouts", sa.column("id", sa.String()), sa.column("plan", sa.JSON()))
    bind = op.get_bind()
    for rollout_id, plan in bind.execute(sa.select(rollouts.c.id, rollouts.c.plan)).all():
        old = (plan or {}).get("selector") or ""
        new = _new_syntax(old)
        if new != old:
            bind.execute(rollouts.update().where(rollouts.c.id == rollout_id).values(plan={**plan, "selector": new}))


def _new_syntax(old: str) -> str:
    """A selector of the AND-only syntax before 0006 ('name=edge 1,tag=canary') in the selector
    language (name='edge 1',tag=canary); one that needs nothing quoted stays as it was."""
    terms = []
    changed = False
    for raw in old.split(","):
        m = _OLD_TERM.match(raw)
        if m is None:
            terms.append(raw)
            continue
        key, op_, value = m.groups()
        if value and (not _BARE.fullmatch(value) or value.upper() in {"AND", "OR", "NOT", "IN"}):
            quote = "'" if "'" not in value else '"'
            value = quote + value.replace(quote, "") + quote
            changed = True
        terms.append(f"{key}{op_}{value}")
    return ",".join(terms) if changed else old


def downgrade() -> None:
    op.drop_index("ix_group_rollouts_assignment_id", table_name="group_rollouts")
    op.drop_table("group_rollouts")
    op.drop_table("device_groups")
