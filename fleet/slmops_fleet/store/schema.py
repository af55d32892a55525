"""The fleet database's schema: SQLAlchemy 2 rows (Alembic migrations in `slmops_fleet.migrations`
bring a database to it) and `UTCDateTime`, the timezone-aware datetime column of every backend."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = String(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        from sqlalchemy import DateTime

        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(timezone.utc)
        return value.isoformat(timespec="microseconds") if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


ID = String(64)
SHA = String(64)


class Base(DeclarativeBase):
    pass


class EnrollmentTokenRow(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    used_by: Mapped[str | None] = mapped_column(ID, nullable=True)


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    public_key: Mapped[str] = mapped_column(String(64))
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mqtt_password_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The latest ReportedState.
    state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reported_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    target_package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)
    active_package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)
    active_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    active_slot: Mapped[str | None] = mapped_column(String(8), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes_needed: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    telemetry_dropped_total: Mapped[int] = mapped_column(BigInteger, default=0)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    # Lifecycle (`slmops_fleet.lifecycle`): a revoked device keeps its row (audit) but no credentials.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # A credential rotation the device has not confirmed yet: its new password, kept only until then
    # (the fleet sends it again whenever its MQTT session connects).
    rotation_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    rotation_password: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rotation_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PackageRow(Base):
    __tablename__ = "packages"

    id: Mapped[str] = mapped_column(SHA, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(128))
    profile: Mapped[str] = mapped_column(String(128), default="")
    kind: Mapped[str] = mapped_column(String(32))
    signed_manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signed_by: Mapped[str] = mapped_column(String(64), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    provider: Mapped[str] = mapped_column(String(32), default="cpu", server_default="cpu")
    precision: Mapped[str] = mapped_column(String(32), default="", server_default="")
    min_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    base_package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)
    cpu_features: Mapped[str] = mapped_column(String(1024), default="", server_default="")  # comma-separated


class ReleaseRow(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_releases_name_version"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ReleasePackageRow(Base):
    __tablename__ = "release_packages"

    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"), primary_key=True)


class LeaseRow(Base):
    """A named lease: one holder at a time until `expires_at` (the rollout driver's election)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class KeyStatementRow(Base):
    """A key statement the fleet applied (`slmops_protos.key_statements`), kept for ever: the
    trusted keys are the configured ones folded with every statement in sequence order."""

    __tablename__ = "key_statements"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    statement: Mapped[bytes] = mapped_column(LargeBinary)  # the SignedKeyStatement's bytes
    signed_by: Mapped[str] = mapped_column(String(16))
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PackageFileRow(Base):
    __tablename__ = "package_files"
    __table_args__ = (Index("ix_package_files_sha256", "sha256"),)

    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    sha256: Mapped[str] = mapped_column(SHA)
    size: Mapped[int] = mapped_column(BigInteger)


class BlobRow(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(512))  # relative to the data folder
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BlobStatsRow(Base):
    __tablename__ = "blob_stats"

    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    broadcast_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    broadcast_chunks: Mapped[int] = mapped_column(BigInteger, default=0)
    repair_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    repair_chunks: Mapped[int] = mapped_column(BigInteger, default=0)
    broadcasts: Mapped[int] = mapped_column(BigInteger, default=0)
    whole_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    partial_requests: Mapped[int] = mapped_column(BigInteger, default=0)


class BroadcastChunkRow(Base):
    """When a worker's broadcast of a chunk was last acknowledged by the broker (`store.broadcasts`)."""

    __tablename__ = "broadcast_chunks"

    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    chunk_size: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    acked_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"))
    target: Mapped[Any] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    transitions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    current_wave: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    release_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    rollback_of: Mapped[str | None] = mapped_column(ID, nullable=True, index=True)  # the rollout it reverts


class GroupRow(Base):
    """A named group of devices (a selector or a list) and the release assigned to it, if any."""

    __tablename__ = "device_groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    selector: Mapped[str | None] = mapped_column(Text, nullable=True)
    devices: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    assignment_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    release_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    halted: Mapped[str | None] = mapped_column(Text, nullable=True)  # why the assignment stopped applying


class GroupRolloutRow(Base):
    """The rollouts an assignment made: the first and each follow-up for devices that joined later."""

    __tablename__ = "group_rollouts"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    assignment_id: Mapped[str] = mapped_column(ID, index=True)
    group_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RolloutWaveRow(Base):
    __tablename__ = "rollout_waves"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class RolloutDeviceRow(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    wave: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    previous_package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)
    package_id: Mapped[str | None] = mapped_column(SHA, nullable=True)  # the variant chosen for the device
    selection: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # Selection.to_json()
    test: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the device's TESTING result


class DesiredStateRow(Base):
    __tablename__ = "desired_states"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"))
    rollout_id: Mapped[str | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TelemetrySampleRow(Base):
    __tablename__ = "telemetry_samples"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_device_ts", "device_id", "timestamp_ms"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cpu_percent: Mapped[float] = mapped_column(Float, default=0.0)
    memory_used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    requests_total: Mapped[int] = mapped_column(BigInteger, default=0)
    errors_total: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_ms: Mapped[float] = mapped_column(Float, default=0.0)
    queue_depth: Mapped[int] = mapped_column(Integer, default=0)
    update_state: Mapped[str] = mapped_column(String(32), default="")
    active_package_id: Mapped[str] = mapped_column(String(64), default="")


class AdminTokenRow(Base):
    """A named admin token with a role (`slmops_fleet.admin_auth.Role`); only its hash is kept."""

    __tablename__ = "admin_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(64), default="")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditRow(Base):
    """One admin action (or an enrollment): who, what, when, and how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    client: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    target: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[int] = mapped_column(Integer)
