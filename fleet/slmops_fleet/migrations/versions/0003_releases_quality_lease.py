"""Releases (the variants of one model version), hardware-aware selection, on-device quality, one
rollout driver: each package's execution provider, precision, memory need and adapter base; releases
and their packages; a rollout's release, each target's chosen package, selection and TESTING result;
the lease that elects the rollout driver.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from slmops_fleet.store.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=False, server_default="cpu"))
        batch_op.add_column(sa.Column("precision", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("min_memory_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("base_package_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cpu_features", sa.String(length=1024), nullable=False, server_default=""))
    _backfill_packages()
    op.create_table(
        "releases",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_releases_name_version"),
    )
    op.create_table(
        "release_packages",
        sa.Column("release_id", sa.String(length=64), nullable=False),
        sa.Column("package_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["package_id"], ["packages.id"]),
        sa.PrimaryKeyConstraint("release_id", "package_id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("release_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("package_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("selection", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("test", sa.JSON(), nullable=True))
    # Targets of rollouts made before selection existed got the rollout's one package.
    op.execute(
        "UPDATE rollout_devices SET package_id = "
        "(SELECT r.package_id FROM rollouts r WHERE r.id = rollout_devices.rollout_id)"
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def _backfill_packages() -> None:
    """Read the profile of the packages already stored from their signed manifests (one that does not
    parse keeps the defaults: a CPU package with no memory need)."""
    from google.protobuf.message import DecodeError

    from slmops_protos.package.v1 import manifest_pb2

    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, signed_manifest FROM packages")).all()
    for pid, blob in rows:
        try:
            signed = manifest_pb2.SignedManifest.FromString(bytes(blob))
            m = manifest_pb2.Manifest.FromString(signed.manifest)
        except DecodeError:
            continue
        base = next((a.base_package_id for a in m.adapters if a.base_package_id), None) if m.kind == "adapter" else None
        conn.execute(
            sa.text(
                "UPDATE packages SET provider = :p, precision = :q, min_memory_bytes = :m, base_package_id = :b, "
                "cpu_features = :f WHERE id = :id"
            ),
            {
                "p": (m.profile.execution_provider or "cpu").lower(),
                "q": m.profile.precision.lower(),
                "m": m.profile.min_memory_bytes,
                "b": base,
                "f": ",".join(sorted({f.strip().lower() for f in m.profile.cpu_features if f.strip()})),
                "id": pid,
            },
        )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.drop_column("test")
        batch_op.drop_column("selection")
        batch_op.drop_column("package_id")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("release_id")
    op.drop_table("release_packages")
    op.drop_table("releases")
    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.drop_column("cpu_features")
        batch_op.drop_column("base_package_id")
        batch_op.drop_column("min_memory_bytes")
        batch_op.drop_column("precision")
        batch_op.drop_column("provider")
