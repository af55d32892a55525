"""Package-signing key rotation: the key statements the fleet applied.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from slmops_fleet.store.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_statements",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("signed_by", sa.String(length=16), nullable=False),
        sa.Column("applied_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sequence"),
    )


def downgrade() -> None:
    op.drop_table("key_statements")
