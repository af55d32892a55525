"""The fleet's store: SQLAlchemy 2 models, Alembic migrations applied at start, and the
transactions the rest of the fleet needs (each returns plain dataclasses, never ORM objects).

SQLite (a file in the data folder) by default; PostgreSQL by URL. Every write that must be
atomic under concurrent requests (claiming an enrollment token, numbering desired-state
generations) is a conditional UPDATE or a row lock, so it holds on both.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
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
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from slmops_fleet.errors import Conflict, EnrollmentRefused, InvalidRequest, NotFound
from slmops_fleet.rollouts import (
    GateInput,
    PlanError,
    RolloutPlan,
    Selection,
    Variant,
    check_tags,
    counter_delta,
    evaluate_gates,
    parse_selector,
    parse_waves,
    plan_waves,
    select_variant,
    selector_matches,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_INT64_MAX = (1 << 63) - 1
_WRITE = "slmops_write"

# Rollout and per-device rollout states (stable names, stored in the database).
ROLLOUT_IN_PROGRESS = "in_progress"
ROLLOUT_PAUSED = "paused"
ROLLOUT_SUCCEEDED = "succeeded"
ROLLOUT_FAILED = "failed"
ROLLOUT_SUPERSEDED = "superseded"
ROLLOUT_ROLLED_BACK = "rolled_back"  # a gate failed: every touched device got its previous package back
ROLLOUT_CANCELLED = "cancelled"
ROLLOUT_ACTIVE = frozenset({ROLLOUT_IN_PROGRESS, ROLLOUT_PAUSED})
WAVE_PENDING = "pending"
WAVE_RUNNING = "running"  # desired states published; waiting for COMMITTED / ROLLED_BACK or the timeout
WAVE_SOAKING = "soaking"  # every device finished; waiting out the soak time before the gates
WAVE_PASSED = "passed"
WAVE_FAILED = "failed"
WAVE_CANCELLED = "cancelled"
TARGET_WAITING = "WAITING"  # in a wave that has not started
TARGET_PENDING = "PENDING"
TARGET_SUPERSEDED = "SUPERSEDED"
TARGET_TIMED_OUT = "TIMED_OUT"
TARGET_ABORTED = "ABORTED"  # still updating when the rollout was rolled back
TARGET_CANCELLED = "CANCELLED"  # its wave never started
TARGET_NO_VARIANT = "NO_VARIANT"  # the device can run none of the release's variants (reason says why)
TARGET_TERMINAL = frozenset(
    {
        "COMMITTED",
        "ROLLED_BACK",
        TARGET_SUPERSEDED,
        TARGET_TIMED_OUT,
        TARGET_ABORTED,
        TARGET_CANCELLED,
        TARGET_NO_VARIANT,
    }
)
NO_WAVE = -1  # the wave of a NO_VARIANT target
DRIVER_LEASE = "rollout-driver"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def hash_secret(secret: str) -> str:
    """Hash of a high-entropy secret (enrollment token, MQTT password): SHA-256 is enough, no KDF needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secrets_equal(secret: str, digest: str) -> bool:
    return secrets.compare_digest(hash_secret(secret), digest)


# The order of the tuples `Store.insert_telemetry` builds.
_TELEMETRY_COLUMNS = (
    "device_id", "seq", "timestamp_ms", "received_at", "cpu_percent", "memory_used_bytes", "memory_total_bytes",
    "disk_free_bytes", "temperature_c", "requests_total", "errors_total", "tokens_per_s", "ttft_ms", "queue_depth",
    "update_state", "active_package_id",
)  # fmt: skip


def _i64(value: int) -> int:
    return min(int(value), _INT64_MAX)


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


# --- records handed to the rest of the fleet -------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    name: str
    public_key: str
    inventory: dict[str, Any]
    created_at: datetime
    last_seen: datetime | None
    state: str | None
    reported_generation: int
    target_package_id: str | None
    active_package_id: str | None
    active_version: str | None
    active_slot: str | None
    reason: str | None
    bytes_needed: int
    bytes_received: int
    reported_at: datetime | None
    telemetry_dropped_total: int
    desired_generation: int = 0
    desired_package_id: str | None = None
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "last_seen", "reported_at"):
            d[k] = _iso(d[k])
        return d


@dataclass(frozen=True)
class PackageRecord:
    id: str
    name: str
    version: str
    kind: str
    profile: str
    signed_by: str
    size_bytes: int
    file_count: int
    created_at: datetime
    missing_blobs: list[str]
    signed_manifest: bytes = field(repr=False)
    provider: str = "cpu"
    precision: str = ""
    min_memory_bytes: int = 0
    base_package_id: str | None = None
    cpu_features: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing_blobs

    def variant(self) -> Variant:
        return Variant(
            package_id=self.id,
            kind=self.kind,
            profile=self.profile,
            provider=self.provider,
            precision=self.precision,
            min_memory_bytes=self.min_memory_bytes,
            base_package_id=self.base_package_id or "",
            cpu_features=self.cpu_features,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "profile": self.profile,
            "signed_by": self.signed_by,
            "size_bytes": self.size_bytes,
            "file_count": self.file_count,
            "created_at": _iso(self.created_at),
            "complete": self.complete,
            "missing_blobs": self.missing_blobs,
            "provider": self.provider,
            "precision": self.precision,
            "min_memory_bytes": self.min_memory_bytes,
            "cpu_features": list(self.cpu_features),
            "base_package_id": self.base_package_id,
        }


@dataclass(frozen=True)
class NewPackage:
    id: str
    name: str
    version: str
    kind: str
    profile: str
    signed_by: str
    signed_manifest: bytes
    files: list[tuple[str, str, int]]  # (path, sha256, size)
    provider: str = "cpu"
    precision: str = ""
    min_memory_bytes: int = 0
    base_package_id: str | None = None  # an adapter package's base (must be a stored model package)
    cpu_features: tuple[str, ...] = ()  # CPU flags a device must report to run it


@dataclass(frozen=True)
class ReleaseRecord:
    id: str
    name: str
    version: str
    created_at: datetime
    packages: list[PackageRecord]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "created_at": _iso(self.created_at),
            "packages": [p.to_json() for p in self.packages],
        }


@dataclass(frozen=True)
class BlobRecord:
    sha256: str
    size: int
    path: str


@dataclass(frozen=True)
class DesiredRecord:
    device_id: str
    generation: int
    package_id: str
    rollout_id: str | None
    created_at: datetime
    signed_manifest: bytes = field(repr=False)


@dataclass(frozen=True)
class RolloutTargetRecord:
    device_id: str
    generation: int
    state: str
    reason: str | None
    updated_at: datetime
    wave: int = 0
    previous_package_id: str | None = None
    package_id: str | None = None
    test: dict[str, Any] | None = None
    selection: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["updated_at"] = _iso(self.updated_at)
        del d["selection"]  # `explain` shows it
        return d


@dataclass(frozen=True)
class RolloutWaveRecord:
    index: int
    size: int
    state: str
    started_at: datetime | None
    completed_at: datetime | None
    finished_at: datetime | None
    reason: str | None
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("started_at", "completed_at", "finished_at"):
            d[k] = _iso(d[k])
        return d


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    package_id: str
    package_name: str
    package_version: str
    target: Any
    state: str
    created_at: datetime
    updated_at: datetime
    transitions: list[dict[str, Any]]
    devices: list[RolloutTargetRecord]
    plan: dict[str, Any] = field(default_factory=dict)
    current_wave: int = 0
    reason: str | None = None
    waves: list[RolloutWaveRecord] = field(default_factory=list)
    release: str | None = None  # NAME@VERSION when the rollout names a release

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            out[d.state] = out.get(d.state, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package_id": self.package_id,
            "package_name": self.package_name,
            "package_version": self.package_version,
            "release": self.release,
            "target": self.target,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "reason": self.reason,
            "plan": self.plan,
            "current_wave": self.current_wave,
            "waves": [w.to_json() for w in self.waves],
            "transitions": self.transitions,
            "counts": self.counts(),
            "devices": [d.to_json() for d in self.devices],
        }


@dataclass(frozen=True)
class ReportedUpdate:
    """A device's ReportedState, translated at the MQTT edge."""

    device_id: str
    generation: int
    state: str
    target_package_id: str
    active_package_id: str
    active_version: str
    active_slot: str
    reason: str
    bytes_needed: int
    bytes_received: int
    inventory: dict[str, Any] | None = None
    test: dict[str, Any] | None = None  # TESTING's result: ran, passed, prompts, judged, matched, seconds, adapter


@dataclass(frozen=True)
class TelemetryRecord:
    device_id: str
    seq: int
    timestamp_ms: int
    cpu_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    disk_free_bytes: int = 0
    temperature_c: float | None = None
    requests_total: int = 0
    errors_total: int = 0
    tokens_per_s: float = 0.0
    ttft_ms: float = 0.0
    queue_depth: int = 0
    update_state: str = ""
    active_package_id: str = ""


@dataclass
class BlobStatsDelta:
    broadcast_bytes: int = 0
    broadcast_chunks: int = 0
    repair_bytes: int = 0
    repair_chunks: int = 0
    broadcasts: int = 0
    whole_requests: int = 0
    partial_requests: int = 0

    def add(self, other: BlobStatsDelta) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def is_zero(self) -> bool:
        return not any(asdict(self).values())


@dataclass(frozen=True)
class BlobStatsRecord:
    sha256: str
    size: int
    stats: BlobStatsDelta

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, **asdict(self.stats)}


# --- the store ----------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def _transition(state: str, now: datetime, reason: str, *, event: str = "", wave: int = -1) -> dict[str, Any]:
    out: dict[str, Any] = {"state": state, "at": now.isoformat(), "reason": reason}
    if event:
        out["event"] = event
    if wave >= 0:
        out["wave"] = wave + 1
    return out


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def _paused_for(transitions: Sequence[dict[str, Any]], since: datetime, now: datetime) -> timedelta:
    """How long the rollout was paused between `since` and `now`: the wave timeout and the soak
    count only running time, so an operator's pause never times a device out or ends a soak."""
    total = timedelta()
    paused_at: datetime | None = None
    for t in transitions:
        at = datetime.fromisoformat(t["at"])
        if t["state"] == ROLLOUT_PAUSED and paused_at is None:
            paused_at = at
        elif t["state"] != ROLLOUT_PAUSED and paused_at is not None:
            total += max(timedelta(), min(at, now) - max(paused_at, since))
            paused_at = None
    if paused_at is not None:
        total += max(timedelta(), now - max(paused_at, since))
    return total


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def _count_states(targets: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in targets:
        out[t.state] = out.get(t.state, 0) + 1
    return dict(sorted(out.items()))


class Store:
    """Thread-safe access to the fleet database (one short session per call)."""

    def __init__(self, url: str, *, engine: Engine | None = None, echo: bool = False) -> None:
        self.url = url
        self.engine = engine or self._create_engine(url, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @staticmethod
    def _create_engine(url: str, *, echo: bool) -> Engine:
        if url.startswith("sqlite"):
            engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                # The driver must not open transactions on its own: `_sqlite_begin` does, so that a
                # write transaction takes SQLite's write lock before it reads (BEGIN IMMEDIATE) and
                # read-then-write sequences cannot interleave.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

            return engine
        return create_engine(url, echo=echo, pool_pre_ping=True)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (programmatic Alembic, scripts in the package)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction. `write=True` for transactions that write: on SQLite they take the write
        lock up front; on PostgreSQL the row locks taken inside (FOR UPDATE) serialise them."""
        with self._sessions() as s:
            if write:
                s.connection(execution_options={_WRITE: True})  # begins the transaction with the option
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> bool:
        try:
            with self.session() as s:
                s.execute(select(1))
            return True
        except Exception:
            log.exception("database ping failed")
            return False

    # --- enrollment -------------------------------------------------------------------------

    def create_token(self, ttl_s: float) -> tuple[str, datetime]:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.session(write=True) as s:
            s.add(
                EnrollmentTokenRow(id=_new_id("tok"), token_hash=hash_secret(token), created_at=now, expires_at=expires)
            )
        return token, expires

    def enroll(
        self,
        token: str,
        *,
        public_key: str,
        name: str,
        inventory: dict[str, Any],
        mqtt_password_hash: str,
        before_commit: Callable[[str], None] | None = None,
    ) -> DeviceRecord:
        """Claim `token` and create a device, atomically: the token is claimed by a conditional
        UPDATE, so of concurrent requests with one token exactly one wins. `before_commit(device_id)`
        runs inside the transaction (broker provisioning); if it raises, nothing is kept."""
        digest = hash_secret(token)
        device_id = _new_id("dev")
        now = utcnow()
        with self.session(write=True) as s:
            claimed = s.execute(
                update(EnrollmentTokenRow)
                .where(
                    EnrollmentTokenRow.token_hash == digest,
                    EnrollmentTokenRow.used_at.is_(None),
                    EnrollmentTokenRow.expires_at > now,
                )
                .values(used_at=now, used_by=device_id)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                row = s.execute(
                    select(EnrollmentTokenRow.used_at, EnrollmentTokenRow.expires_at).where(
                        EnrollmentTokenRow.token_hash == digest
                    )
                ).first()
                if row is None:
                    raise EnrollmentRefused("enrollment token is unknown")
                if row.used_at is not None:
                    raise EnrollmentRefused("enrollment token is already used")
                raise EnrollmentRefused("enrollment token is expired")
            device = DeviceRow(
                id=device_id,
                name=name,
                public_key=public_key,
                inventory=inventory,
                mqtt_password_hash=mqtt_password_hash,
                created_at=now,
                reported_generation=0,
                bytes_needed=0,
                bytes_received=0,
                telemetry_dropped_total=0,
            )
            s.add(device)
            s.flush()
            if before_commit is not None:
                before_commit(device_id)
            return self._device_record(device, None)

    # --- devices ----------------------------------------------------------------------------

    @staticmethod
    def _device_record(row: DeviceRow, desired: DesiredStateRow | None) -> DeviceRecord:
        return DeviceRecord(
            id=row.id,
            name=row.name,
            public_key=row.public_key,
            inventory=dict(row.inventory or {}),
            created_at=row.created_at,
            last_seen=row.last_seen,
            state=row.state,
            reported_generation=row.reported_generation or 0,
            target_package_id=row.target_package_id,
            active_package_id=row.active_package_id,
            active_version=row.active_version,
            active_slot=row.active_slot,
            reason=row.reason,
            bytes_needed=row.bytes_needed or 0,
            bytes_received=row.bytes_received or 0,
            reported_at=row.reported_at,
            telemetry_dropped_total=row.telemetry_dropped_total or 0,
            desired_generation=desired.generation if desired else 0,
            desired_package_id=desired.package_id if desired else None,
            tags=list(row.tags or []),
        )

    def _latest_desired(self, s: Session, device_ids: Sequence[str] | None = None) -> dict[str, DesiredStateRow]:
        latest = select(DesiredStateRow.device_id, func.max(DesiredStateRow.generation).label("g")).group_by(
            DesiredStateRow.device_id
        )
        if device_ids is not None:
            latest = latest.where(DesiredStateRow.device_id.in_(device_ids))
        sub = latest.subquery()
        rows = s.scalars(
            select(DesiredStateRow).join(
                sub, (DesiredStateRow.device_id == sub.c.device_id) & (DesiredStateRow.generation == sub.c.g)
            )
        ).all()
        return {r.device_id: r for r in rows}

    def list_devices(self) -> list[DeviceRecord]:
        with self.session() as s:
            rows = s.scalars(select(DeviceRow).order_by(DeviceRow.created_at, DeviceRow.id)).all()
            desired = self._latest_desired(s)
            return [self._device_record(r, desired.get(r.id)) for r in rows]

    def get_device(self, device_id: str) -> DeviceRecord:
        with self.session() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            return self._device_record(row, self._latest_desired(s, [device_id]).get(device_id))

    def update_device_tags(
        self, device_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> DeviceRecord:
        """Add and remove tags (a tag both added and removed is removed)."""
        try:
            check_tags([*add, *remove])
        except PlanError as exc:
            raise InvalidRequest(str(exc)) from exc
        with self.session(write=True) as s:
            row = s.get(DeviceRow, device_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            try:
                row.tags = check_tags([t for t in [*(row.tags or []), *add] if t not in set(remove)])
            except PlanError as exc:
                raise InvalidRequest(str(exc)) from exc
            s.flush()
            return self._device_record(row, self._latest_desired(s, [device_id]).get(device_id))

    def device_password_hashes(self) -> dict[str, str]:
        with self.session() as s:
            return {r.id: r.mqtt_password_hash for r in s.execute(select(DeviceRow.id, DeviceRow.mqtt_password_hash))}

    def device_password_hash(self, device_id: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(DeviceRow.mqtt_password_hash).where(DeviceRow.id == device_id))

    def device_exists(self, device_id: str) -> bool:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(DeviceRow).where(DeviceRow.id == device_id)) == 1

    # --- packages and blobs -----------------------------------------------------------------

    def add_package(self, pkg: NewPackage) -> bool:
        """Store a verified package; returns False if it was already there (uploads are idempotent)."""
        try:
            return self._add_package(pkg)
        except IntegrityError:
            with self.session() as s:
                if s.get(PackageRow, pkg.id) is not None:  # a concurrent upload of the same package won
                    return False
            raise

    def _add_package(self, pkg: NewPackage) -> bool:
        with self.session(write=True) as s:
            if s.get(PackageRow, pkg.id) is not None:
                return False
            if pkg.kind == "adapter":
                if not pkg.base_package_id:
                    raise InvalidRequest("package rejected: an adapter package must name its base package")
                base = s.get(PackageRow, pkg.base_package_id)
                if base is None:
                    raise InvalidRequest(
                        f"package rejected: the adapter's base package {pkg.base_package_id} is unknown to this "
                        "fleet; upload the base first"
                    )
                if base.kind != "model":
                    raise InvalidRequest(
                        f"package rejected: the adapter's base {base.id[:12]} is a {base.kind} package"
                    )
            s.add(
                PackageRow(
                    id=pkg.id,
                    name=pkg.name,
                    version=pkg.version,
                    profile=pkg.profile,
                    kind=pkg.kind,
                    signed_manifest=pkg.signed_manifest,
                    signed_by=pkg.signed_by,
                    size_bytes=sum(size for _, _, size in pkg.files),
                    created_at=utcnow(),
                    provider=pkg.provider,
                    precision=pkg.precision,
                    min_memory_bytes=pkg.min_memory_bytes,
                    base_package_id=pkg.base_package_id,
                    cpu_features=",".join(pkg.cpu_features),
                )
            )
            s.flush()  # the package row before its files (foreign key)
            s.add_all(PackageFileRow(package_id=pkg.id, path=p, sha256=h, size=n) for p, h, n in pkg.files)
        return True

    def _package_record(self, s: Session, row: PackageRow) -> PackageRecord:
        files = s.execute(select(PackageFileRow.sha256).where(PackageFileRow.package_id == row.id)).scalars().all()
        shas = sorted(set(files))
        have = set(s.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(shas))).all()) if shas else set()
        return PackageRecord(
            id=row.id,
            name=row.name,
            version=row.version,
            kind=row.kind,
            profile=row.profile,
            signed_by=row.signed_by,
            size_bytes=row.size_bytes,
            file_count=len(files),
            created_at=row.created_at,
            missing_blobs=[h for h in shas if h not in have],
            signed_manifest=row.signed_manifest,
            provider=row.provider or "cpu",
            precision=row.precision or "",
            min_memory_bytes=row.min_memory_bytes or 0,
            base_package_id=row.base_package_id,
            cpu_features=tuple(f for f in (row.cpu_features or "").split(",") if f),
        )

    def list_packages(self) -> list[PackageRecord]:
        with self.session() as s:
            rows = s.scalars(select(PackageRow).order_by(PackageRow.created_at, PackageRow.id)).all()
            return [self._package_record(s, r) for r in rows]

    def get_package(self, ref: str) -> PackageRecord:
        """A package by id or by a unique id prefix of at least 8 characters."""
        ref = ref.strip().lower()
        with self.session() as s:
            row = s.get(PackageRow, ref)
            if row is None and 8 <= len(ref) < 64 and all(c in "0123456789abcdef" for c in ref):
                matches = s.scalars(select(PackageRow).where(PackageRow.id.startswith(ref)).limit(2)).all()
                if len(matches) > 1:
                    raise InvalidRequest(f"package id prefix {ref} is ambiguous; give more characters")
                row = matches[0] if matches else None
            if row is None:
                raise NotFound(f"unknown package id {ref}")
            return self._package_record(s, row)

    # --- releases ------------------------------------------------------------------------------

    def create_release(self, name: str, version: str, package_ids: Sequence[str]) -> ReleaseRecord:
        """Group packages into release NAME@VERSION. Either model variants (one per hardware profile)
        or adapter packages (one per base package): a device gets one package of a release."""
        name, version = name.strip(), version.strip()
        if not name or not version or "@" in name or len(name) > 200 or len(version) > 128:
            raise InvalidRequest("a release needs a NAME (no '@', at most 200 characters) and a VERSION")
        refs = list(dict.fromkeys(package_ids))
        if not refs:
            raise InvalidRequest("a release needs at least one package")
        packages = [self.get_package(ref) for ref in refs]
        kinds = {p.kind for p in packages}
        if len(kinds) > 1:
            raise InvalidRequest("a release holds model variants or adapter packages, not both")
        key = (lambda p: p.base_package_id) if kinds == {"adapter"} else (lambda p: p.profile)
        seen: dict[Any, str] = {}
        for p in packages:
            k = key(p)
            if k in seen:
                what = f"base {str(k)[:12]}" if kinds == {"adapter"} else f"profile {k or '(none)'}"
                raise InvalidRequest(f"packages {seen[k][:12]} and {p.id[:12]} are both for {what}")
            seen[k] = p.id
        now = utcnow()
        release_id = _new_id("rel")
        try:
            with self.session(write=True) as s:
                s.add(ReleaseRow(id=release_id, name=name, version=version, created_at=now))
                s.flush()
                s.add_all(ReleasePackageRow(release_id=release_id, package_id=p.id) for p in packages)
        except IntegrityError:
            raise Conflict(f"release {name}@{version} exists already") from None
        return self.get_release(release_id)

    def _release_record(self, s: Session, row: ReleaseRow) -> ReleaseRecord:
        ids = s.scalars(select(ReleasePackageRow.package_id).where(ReleasePackageRow.release_id == row.id)).all()
        rows = s.scalars(select(PackageRow).where(PackageRow.id.in_(ids)).order_by(PackageRow.profile, PackageRow.id))
        return ReleaseRecord(row.id, row.name, row.version, row.created_at, [self._package_record(s, p) for p in rows])

    def get_release(self, ref: str) -> ReleaseRecord:
        """A release by id or NAME@VERSION."""
        with self.session() as s:
            row = s.get(ReleaseRow, ref)
            if row is None and "@" in ref:
                name, _, version = ref.rpartition("@")
                row = s.scalar(select(ReleaseRow).where(ReleaseRow.name == name, ReleaseRow.version == version))
            if row is None:
                raise NotFound(f"unknown release {ref} (give NAME@VERSION or a release id)")
            return self._release_record(s, row)

    def list_releases(self) -> list[ReleaseRecord]:
        with self.session() as s:
            rows = s.scalars(select(ReleaseRow).order_by(ReleaseRow.created_at, ReleaseRow.id)).all()
            return [self._release_record(s, r) for r in rows]

    # --- the rollout driver's lease -------------------------------------------------------------

    def acquire_lease(
        self, name: str, holder: str, ttl_s: float, now: datetime | None = None, *, take_from: str | None = None
    ) -> bool:
        """Take or renew lease `name` for `holder` until now + ttl_s; False while another holder's
        lease has not expired (unless that holder is `take_from`: one known to be dead). The row lock
        (PostgreSQL) or write lock (SQLite) serialises contenders; a concurrent first insert loses on
        the primary key."""
        now = now or utcnow()
        try:
            with self.session(write=True) as s:
                row = s.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    s.add(LeaseRow(name=name, holder=holder, expires_at=now + _seconds(ttl_s)))
                    return True
                if row.holder not in (holder, take_from) and row.expires_at > now:
                    return False
                if row.holder != holder:
                    log.info("lease %s: %s takes over from %s (until %s)", name, holder, row.holder, row.expires_at)
                row.holder, row.expires_at = holder, now + _seconds(ttl_s)
                return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (a clean shutdown), so another process need not wait for it to expire."""
        with self.session(write=True) as s:
            row = s.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder == holder:
                s.delete(row)

    def lease_holder(self, name: str) -> tuple[str, datetime] | None:
        with self.session() as s:
            row = s.get(LeaseRow, name)
            return (row.holder, row.expires_at) if row is not None else None

    def blob_expected_size(self, sha256: str) -> int | None:
        """The size the manifests give a blob, or None if no package lists it."""
        with self.session() as s:
            return s.scalar(select(PackageFileRow.size).where(PackageFileRow.sha256 == sha256).limit(1))

    def get_blob(self, sha256: str) -> BlobRecord | None:
        with self.session() as s:
            row = s.get(BlobRow, sha256)
            return BlobRecord(row.sha256, row.size, row.path) if row else None

    def add_blob(self, sha256: str, size: int, path: str) -> bool:
        """Record a stored blob; False if it was already recorded."""
        try:
            with self.session(write=True) as s:
                if s.get(BlobRow, sha256) is not None:
                    return False
                s.add(BlobRow(sha256=sha256, size=size, path=path, created_at=utcnow()))
        except IntegrityError:
            if self.get_blob(sha256) is not None:  # a concurrent upload of the same blob won
                return False
            raise
        return True

    def device_may_fetch(self, device_id: str, sha256: str) -> bool:
        """A device may ask for the blobs of the package its newest desired state names."""
        return (device_id, sha256) in self.devices_may_fetch([(device_id, sha256)])

    def devices_may_fetch(self, asks: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (device id, blob sha256) pairs of `asks` whose blob is in the device's desired package."""
        asks = set(asks)
        if not asks:
            return set()
        with self.session() as s:
            desired = self._latest_desired(s, sorted({d for d, _ in asks}))
            packages = {row.package_id for row in desired.values() if row.package_id}
            if not packages:
                return set()
            files = set(
                s.execute(
                    select(PackageFileRow.package_id, PackageFileRow.sha256).where(
                        PackageFileRow.package_id.in_(packages),
                        PackageFileRow.sha256.in_(sorted({sha for _, sha in asks})),
                    )
                ).all()
            )
        return {(d, sha) for d, sha in asks if d in desired and (desired[d].package_id, sha) in files}

    def add_blob_stats(self, deltas: dict[str, BlobStatsDelta]) -> None:
        with self.session(write=True) as s:
            for sha, d in deltas.items():
                if d.is_zero():
                    continue
                row = s.get(BlobStatsRow, sha, with_for_update=True)
                if row is None:
                    row = BlobStatsRow(sha256=sha, **asdict(BlobStatsDelta()))
                    s.add(row)
                for k, v in asdict(d).items():
                    setattr(row, k, getattr(row, k) + v)

    def blob_stats(self) -> list[BlobStatsRecord]:
        with self.session() as s:
            rows = s.execute(
                select(BlobStatsRow, BlobRow.size).outerjoin(BlobRow, BlobRow.sha256 == BlobStatsRow.sha256)
            )
            out = []
            for st, size in rows:
                delta = BlobStatsDelta(
                    broadcast_bytes=st.broadcast_bytes,
                    broadcast_chunks=st.broadcast_chunks,
                    repair_bytes=st.repair_bytes,
                    repair_chunks=st.repair_chunks,
                    broadcasts=st.broadcasts,
                    whole_requests=st.whole_requests,
                    partial_requests=st.partial_requests,
                )
                out.append(BlobStatsRecord(st.sha256, size or 0, delta))
            return sorted(out, key=lambda r: r.sha256)

    # --- rollouts and desired states --------------------------------------------------------

    def create_rollout(
        self,
        package_id: str | None,
        target: str | list[str],
        plan: RolloutPlan | None = None,
        *,
        release_id: str | None = None,
    ) -> tuple[RolloutRecord, list[DesiredRecord]]:
        """Plan the waves and start the first: its devices get a new desired state (generation + 1)
        naming the variant chosen for each (`select_variant`: of the release's packages, or the one
        package). Devices that can run no variant are kept as NO_VARIANT targets with the reason.
        Without a plan: one wave of every target device, no gates."""
        plan = plan or RolloutPlan(waves=["100%"])
        now = utcnow()
        rollout_id = _new_id("ro")
        with self.session(write=True) as s:
            if release_id is not None:
                candidates = list(
                    s.scalars(
                        select(PackageRow)
                        .join(ReleasePackageRow, ReleasePackageRow.package_id == PackageRow.id)
                        .where(ReleasePackageRow.release_id == release_id)
                    ).all()
                )
                if not candidates:
                    raise NotFound(f"unknown release id {release_id}")
            else:
                pkg = s.get(PackageRow, package_id) if package_id else None
                if pkg is None:
                    raise NotFound(f"unknown package id {package_id}")
                candidates = [pkg]
            variants = [self._package_record(s, r).variant() for r in candidates]
            if target == "all":
                device_ids = list(s.scalars(select(DeviceRow.id).order_by(DeviceRow.id)).all())
                if not device_ids:
                    raise Conflict("no devices are enrolled; enroll one before rolling out")
            else:
                device_ids = sorted(set(target))
                if not device_ids:
                    raise InvalidRequest("target lists no devices")
            # Lock the target devices (PostgreSQL; SQLite serialises writers) so generations stay strictly
            # increasing under concurrent rollouts.
            found = set(
                s.scalars(
                    select(DeviceRow.id).where(DeviceRow.id.in_(device_ids)).order_by(DeviceRow.id).with_for_update()
                ).all()
            )
            unknown = [d for d in device_ids if d not in found]
            if unknown:
                raise InvalidRequest(f"unknown device ids: {', '.join(unknown)}")
            if plan.selector:
                terms = parse_selector(plan.selector)
                rows = s.scalars(select(DeviceRow).where(DeviceRow.id.in_(device_ids))).all()
                chosen = {
                    r.id
                    for r in rows
                    if selector_matches(
                        terms, device_id=r.id, name=r.name, tags=r.tags or [], inventory=dict(r.inventory or {})
                    )
                }
                if not chosen:
                    raise Conflict(
                        f"the selector {plan.selector!r} matches none of the {len(device_ids)} target devices"
                    )
                device_ids = [d for d in device_ids if d in chosen]
            selections = self._select(s, device_ids, variants)
            runnable = [d for d in device_ids if selections[d].package_id]
            unrunnable = [d for d in device_ids if not selections[d].package_id]
            if not runnable:
                why = "; ".join(f"{d}: {selections[d].reason}" for d in unrunnable[:3])
                raise Conflict(f"none of the {len(device_ids)} target devices can run a variant ({why})")
            try:
                waves = plan_waves(runnable, parse_waves(plan.waves), rollout_id)
            except PlanError as exc:
                raise InvalidRequest(str(exc)) from exc
            chosen_counts: dict[str, int] = {}
            for d in runnable:
                pid = selections[d].package_id or ""
                chosen_counts[pid] = chosen_counts.get(pid, 0) + 1
            primary = min(chosen_counts, key=lambda p: (-chosen_counts[p], p))  # what most devices get
            created = f"created: {len(runnable)} devices in {len(waves)} waves ({', '.join(plan.waves)})"
            if unrunnable:
                created += f"; {len(unrunnable)} devices can run no variant"
            rollout = RolloutRow(
                id=rollout_id,
                package_id=primary,
                release_id=release_id,
                target=target if target == "all" else device_ids,
                state=ROLLOUT_IN_PROGRESS,
                created_at=now,
                updated_at=now,
                transitions=[_transition(ROLLOUT_IN_PROGRESS, now, created)],
                plan=plan.to_json(),
                current_wave=0,
            )
            s.add(rollout)
            s.flush()
            # Earlier rollouts lose these devices, whether their wave has started or not.
            superseded = set(
                s.scalars(
                    select(RolloutDeviceRow.rollout_id).where(
                        RolloutDeviceRow.device_id.in_(runnable),
                        RolloutDeviceRow.rollout_id != rollout_id,
                        RolloutDeviceRow.state.not_in(TARGET_TERMINAL),
                    )
                ).all()
            )
            if superseded:
                s.execute(
                    update(RolloutDeviceRow)
                    .where(
                        RolloutDeviceRow.device_id.in_(runnable),
                        RolloutDeviceRow.rollout_id.in_(superseded),
                        RolloutDeviceRow.state.not_in(TARGET_TERMINAL),
                    )
                    .values(state=TARGET_SUPERSEDED, reason=f"superseded by {rollout_id}", updated_at=now)
                    .execution_options(synchronize_session=False)
                )
            for idx, members in enumerate(waves):
                s.add(RolloutWaveRow(rollout_id=rollout_id, idx=idx, size=len(members), state=WAVE_PENDING))
                for device_id in members:
                    sel = selections[device_id]
                    s.add(
                        RolloutDeviceRow(
                            rollout_id=rollout_id,
                            device_id=device_id,
                            generation=0,
                            state=TARGET_WAITING,
                            updated_at=now,
                            wave=idx,
                            package_id=sel.package_id,
                            selection=sel.to_json(),
                        )
                    )
            for device_id in unrunnable:
                sel = selections[device_id]
                s.add(
                    RolloutDeviceRow(
                        rollout_id=rollout_id,
                        device_id=device_id,
                        generation=0,
                        state=TARGET_NO_VARIANT,
                        reason=sel.reason,
                        updated_at=now,
                        wave=NO_WAVE,
                        selection=sel.to_json(),
                    )
                )
            s.flush()
            desired = self._start_wave(s, rollout, 0, now)
            s.flush()
            for old in sorted(superseded):
                old_row = s.get(RolloutRow, old, with_for_update=True)
                if old_row is not None:
                    self._advance(s, old_row, now, drive=False)
            return self._rollout_record(s, rollout), desired

    def _select(self, s: Session, device_ids: Sequence[str], variants: Sequence[Variant]) -> dict[str, Selection]:
        """Each device's variant, from its reported inventory and the package it runs."""
        rows = s.scalars(select(DeviceRow).where(DeviceRow.id.in_(device_ids))).all() if device_ids else []
        active = {r.id: r.active_package_id or "" for r in rows}
        bases = dict(
            s.execute(
                select(PackageRow.id, PackageRow.base_package_id).where(
                    PackageRow.id.in_(set(active.values()) - {""}), PackageRow.kind == "adapter"
                )
            ).all()
        )
        return {
            r.id: select_variant(
                variants, inventory=dict(r.inventory or {}), active_base=bases.get(active[r.id]) or active[r.id]
            )
            for r in rows
        }

    def _start_wave(self, s: Session, row: RolloutRow, idx: int, now: datetime) -> list[DesiredRecord]:
        """Give the waiting devices of wave `idx` their new desired state."""
        wave = s.get(RolloutWaveRow, (row.id, idx))
        assert wave is not None
        targets = s.scalars(
            select(RolloutDeviceRow)
            .where(
                RolloutDeviceRow.rollout_id == row.id,
                RolloutDeviceRow.wave == idx,
                RolloutDeviceRow.state == TARGET_WAITING,
            )
            .order_by(RolloutDeviceRow.device_id)
        ).all()
        ids = [t.device_id for t in targets]
        if ids:
            s.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(ids)).with_for_update()).all()
        current = self._latest_desired(s, ids) if ids else {}
        manifests: dict[str, bytes] = {}
        desired: list[DesiredRecord] = []
        for t in targets:
            pid = t.package_id or row.package_id
            if pid not in manifests:
                manifests[pid] = s.scalar(select(PackageRow.signed_manifest).where(PackageRow.id == pid)) or b""
            prev = current.get(t.device_id)
            t.generation = (prev.generation if prev else 0) + 1
            t.previous_package_id = prev.package_id if prev else None
            t.state = TARGET_PENDING
            t.updated_at = now
            s.add(
                DesiredStateRow(
                    device_id=t.device_id,
                    generation=t.generation,
                    package_id=pid,
                    rollout_id=row.id,
                    created_at=now,
                )
            )
            desired.append(DesiredRecord(t.device_id, t.generation, pid, row.id, now, manifests[pid]))
        wave.state = WAVE_RUNNING
        wave.started_at = now
        row.current_wave = idx
        self._record(row, now, f"wave {idx + 1} started: {len(desired)} devices", event="wave_started", wave=idx)
        return desired

    @staticmethod
    def _record(
        row: RolloutRow, now: datetime, reason: str, *, state: str | None = None, event: str = "", wave: int = -1
    ) -> None:
        if state is not None:
            row.state = state
        row.updated_at = now
        row.transitions = [
            *list(row.transitions or []),
            _transition(row.state, now, reason, event=event, wave=wave),
        ]

    def _advance(self, s: Session, row: RolloutRow, now: datetime, *, drive: bool) -> list[DesiredRecord]:
        """Move an in-progress rollout along as far as it can go now; returns desired states to publish.

        `drive=False` (a device report, a new rollout) does only what needs no publishing: time outs,
        wave completion, gates that pass, the final state. Starting a wave and aborting are the
        driver's (`drive=True`), which publishes what this returns. A paused rollout only lets its
        running wave complete: no time outs, gates, soak end or next wave until it resumes."""
        if row.state not in ROLLOUT_ACTIVE:
            return []
        paused = row.state == ROLLOUT_PAUSED
        plan = RolloutPlan.from_json(row.plan)
        wave = s.get(RolloutWaveRow, (row.id, row.current_wave))
        if wave is None:
            return []
        if wave.state == WAVE_PENDING:
            return self._start_wave(s, row, wave.idx, now) if drive and not paused else []
        targets = list(s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == row.id)).all())
        in_wave = [t for t in targets if t.wave == wave.idx]
        if wave.state == WAVE_RUNNING:
            open_targets = [t for t in in_wave if t.state not in TARGET_TERMINAL]
            started = wave.started_at or row.created_at
            clock = now - _paused_for(row.transitions or [], started, now)
            if (
                not paused
                and open_targets
                and plan.wave_timeout_s is not None
                and clock >= started + _seconds(plan.wave_timeout_s)
            ):
                for t in open_targets:
                    t.reason = f"no COMMITTED or ROLLED_BACK within {plan.wave_timeout_s:g} s (last: {t.state})"
                    t.state = TARGET_TIMED_OUT
                    t.updated_at = now
                open_targets = []
        if drive and not paused and plan.gates.any:
            result = evaluate_gates(plan.gates, self._gate_input(s, row, targets, telemetry=False), install_only=True)
            if not result.ok:
                return self._abort(s, row, targets, now, f"wave {wave.idx + 1}: {result.reason}")
        if wave.state == WAVE_RUNNING:
            if open_targets:
                return []
            wave.state = WAVE_SOAKING
            wave.completed_at = now
            counts = ", ".join(f"{n} {st.lower()}" for st, n in _count_states(in_wave).items()) or "no devices"
            self._record(row, now, f"wave {wave.idx + 1} complete: {counts}", event="wave_completed", wave=wave.idx)
        if wave.state != WAVE_SOAKING or paused:
            return []
        completed = wave.completed_at or now
        if now - _paused_for(row.transitions or [], completed, now) < completed + _seconds(plan.soak_s):
            return []
        result = evaluate_gates(plan.gates, self._gate_input(s, row, targets, telemetry=True))
        if not result.ok:
            return self._abort(s, row, targets, now, f"wave {wave.idx + 1}: {result.reason}") if drive else []
        wave.state = WAVE_PASSED
        wave.finished_at = now
        wave.reason = result.reason
        self._record(row, now, f"wave {wave.idx + 1} passed: {result.reason}", event="wave_passed", wave=wave.idx)
        last = s.scalar(select(func.max(RolloutWaveRow.idx)).where(RolloutWaveRow.rollout_id == row.id)) or 0
        if wave.idx < last:
            row.current_wave = wave.idx + 1
            return self._start_wave(s, row, wave.idx + 1, now) if drive else []
        states = [t.state for t in targets]
        committed = states.count("COMMITTED")
        failures = states.count("ROLLED_BACK") + states.count(TARGET_TIMED_OUT)
        superseded = states.count(TARGET_SUPERSEDED)
        if failures and (not plan.gates.any or committed == 0):
            new = ROLLOUT_FAILED
        elif committed:
            new = ROLLOUT_SUCCEEDED
        else:
            new = ROLLOUT_SUPERSEDED
        reason = f"{committed} committed, {states.count('ROLLED_BACK')} rolled back, {superseded} superseded"
        if states.count(TARGET_TIMED_OUT):
            reason += f", {states.count(TARGET_TIMED_OUT)} timed out"
        if states.count(TARGET_NO_VARIANT):
            reason += f", {states.count(TARGET_NO_VARIANT)} without a runnable variant"
        row.reason = reason
        self._record(row, now, reason, state=new)
        return []

    def _gate_input(
        self, s: Session, row: RolloutRow, targets: Sequence[RolloutDeviceRow], *, telemetry: bool
    ) -> GateInput:
        touched = [t for t in targets if t.generation > 0 and t.state not in (TARGET_SUPERSEDED, TARGET_CANCELLED)]
        states = [t.state for t in touched]
        tests = [t.test for t in touched if t.test and t.test.get("ran")]
        scored = [x for x in tests if int(x.get("judged") or 0) > 0]
        requests = errors = 0
        ttft: list[float] = []
        if telemetry and touched:
            first = s.scalar(select(func.min(RolloutWaveRow.started_at)).where(RolloutWaveRow.rollout_id == row.id))
            since_ms = int((first or row.created_at).timestamp() * 1000)
            samples = s.execute(
                select(
                    TelemetrySampleRow.device_id,
                    TelemetrySampleRow.requests_total,
                    TelemetrySampleRow.errors_total,
                    TelemetrySampleRow.ttft_ms,
                )
                .where(
                    TelemetrySampleRow.device_id.in_([t.device_id for t in touched]),
                    TelemetrySampleRow.timestamp_ms >= since_ms,
                    TelemetrySampleRow.active_package_id.in_({t.package_id or row.package_id for t in touched}),
                )
                .order_by(TelemetrySampleRow.device_id, TelemetrySampleRow.timestamp_ms, TelemetrySampleRow.seq)
            ).all()
            per_device: dict[str, list[tuple[int, int]]] = {}
            for device_id, req, err, t_ms in samples:
                per_device.setdefault(device_id, []).append((req, err))
                if t_ms and t_ms > 0:
                    ttft.append(float(t_ms))
            for series in per_device.values():
                requests += counter_delta([r for r, _ in series])
                errors += counter_delta([e for _, e in series])
        return GateInput(
            committed=states.count("COMMITTED"),
            rolled_back=states.count("ROLLED_BACK"),
            timed_out=states.count(TARGET_TIMED_OUT),
            in_flight=sum(1 for st in states if st not in TARGET_TERMINAL),
            requests=requests,
            errors=errors,
            ttft_samples=ttft,
            tests_ran=len(tests),
            tests_passed=sum(1 for x in tests if x.get("passed")),
            scored=len(scored),
            golden_judged=sum(int(x.get("judged") or 0) for x in scored),
            golden_matched=sum(int(x.get("matched") or 0) for x in scored),
        )

    def _abort(
        self, s: Session, row: RolloutRow, targets: Sequence[RolloutDeviceRow], now: datetime, reason: str
    ) -> list[DesiredRecord]:
        """A gate failed: every device this rollout touched gets its previous package back (a new
        generation), devices of waves not started are cancelled, the rollout is `rolled_back`."""
        touched = [t for t in targets if t.generation > 0 and t.state != TARGET_SUPERSEDED]
        ids = [t.device_id for t in touched]
        if ids:
            s.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(ids)).with_for_update()).all()
        latest = self._latest_desired(s, ids) if ids else {}
        manifests: dict[str, bytes] = {}
        desired: list[DesiredRecord] = []
        kept: list[str] = []
        for t in targets:
            if t.state == TARGET_WAITING:
                t.state, t.reason, t.updated_at = TARGET_CANCELLED, "the rollout was rolled back before its wave", now
                continue
            if t.generation == 0 or t.state == TARGET_SUPERSEDED:
                continue
            cur = latest.get(t.device_id)
            if cur is None or cur.generation != t.generation or cur.rollout_id != row.id:
                continue  # something newer owns the device now
            if t.state not in TARGET_TERMINAL:
                t.state = TARGET_ABORTED
            t.updated_at = now
            if t.previous_package_id is None:
                kept.append(t.device_id)
                t.reason = _join(t.reason, "no previous package to return to")
                continue
            generation = cur.generation + 1
            s.add(
                DesiredStateRow(
                    device_id=t.device_id,
                    generation=generation,
                    package_id=t.previous_package_id,
                    rollout_id=row.id,
                    created_at=now,
                )
            )
            if t.previous_package_id not in manifests:
                manifests[t.previous_package_id] = (
                    s.scalar(select(PackageRow.signed_manifest).where(PackageRow.id == t.previous_package_id)) or b""
                )
            t.reason = _join(t.reason, f"reverted to {t.previous_package_id[:12]} (generation {generation})")
            desired.append(
                DesiredRecord(
                    t.device_id, generation, t.previous_package_id, row.id, now, manifests[t.previous_package_id]
                )
            )
        for w in s.scalars(select(RolloutWaveRow).where(RolloutWaveRow.rollout_id == row.id)).all():
            if w.idx == row.current_wave:
                w.state, w.finished_at, w.reason = WAVE_FAILED, now, reason
            elif w.state == WAVE_PENDING:
                w.state = WAVE_CANCELLED
        row.reason = reason
        detail = f"{reason}; {len(desired)} devices get their previous package back"
        if kept:
            detail += f", {len(kept)} had none"
        self._record(row, now, detail, state=ROLLOUT_ROLLED_BACK, event="aborted", wave=row.current_wave)
        return desired

    # --- the driver's and the operator's side of a rollout ---------------------------------------

    def active_rollout_ids(self) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RolloutRow.id).where(RolloutRow.state == ROLLOUT_IN_PROGRESS).order_by(RolloutRow.created_at)
                ).all()
            )

    def advance_rollout(self, rollout_id: str, now: datetime | None = None) -> list[DesiredRecord]:
        """One step of the rollout driver: the desired states to publish (after this commits)."""
        now = now or utcnow()
        with self.session(write=True) as s:
            # Lock order everywhere: devices (by id), then rollouts, as device reports take them.
            s.scalars(
                select(DeviceRow.id)
                .where(
                    DeviceRow.id.in_(
                        select(RolloutDeviceRow.device_id).where(RolloutDeviceRow.rollout_id == rollout_id)
                    )
                )
                .order_by(DeviceRow.id)
                .with_for_update()
            ).all()
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            out: list[DesiredRecord] = []
            for _ in range(4):  # a wave may pass and the next start in one step
                step = self._advance(s, row, now, drive=True)
                s.flush()
                out += step
                if not step:
                    break
            return out

    def control_rollout(self, rollout_id: str, action: str, reason: str = "") -> RolloutRecord:
        """pause | resume | cancel, by the operator."""
        now = utcnow()
        allowed = {
            "pause": ({ROLLOUT_IN_PROGRESS}, ROLLOUT_PAUSED),
            "resume": ({ROLLOUT_PAUSED}, ROLLOUT_IN_PROGRESS),
            "cancel": (set(ROLLOUT_ACTIVE), ROLLOUT_CANCELLED),
        }
        if action not in allowed:
            raise InvalidRequest(f"unknown rollout action {action!r}: pause, resume or cancel")
        sources, new = allowed[action]
        with self.session(write=True) as s:
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            if row.state not in sources:
                raise Conflict(
                    f"rollout {rollout_id} is {row.state}; only a rollout that is {' or '.join(sorted(sources))} "
                    f"can be {'cancelled' if action == 'cancel' else action + 'd'}"
                )
            why = reason or f"{action} by the operator"
            if action == "cancel":
                for t in s.scalars(
                    select(RolloutDeviceRow).where(
                        RolloutDeviceRow.rollout_id == rollout_id, RolloutDeviceRow.state == TARGET_WAITING
                    )
                ).all():
                    t.state, t.reason, t.updated_at = TARGET_CANCELLED, "the rollout was cancelled before its wave", now
                for w in s.scalars(select(RolloutWaveRow).where(RolloutWaveRow.rollout_id == rollout_id)).all():
                    if w.state in (WAVE_PENDING, WAVE_RUNNING, WAVE_SOAKING):
                        w.state, w.finished_at, w.reason = WAVE_CANCELLED, now, why
                row.reason = why
            self._record(row, now, why, state=new, event=action, wave=row.current_wave)
            s.flush()
            return self._rollout_record(s, row)

    def _rollout_record(self, s: Session, row: RolloutRow) -> RolloutRecord:
        pkg = s.get(PackageRow, row.package_id)
        release = s.get(ReleaseRow, row.release_id) if row.release_id else None
        targets = s.scalars(
            select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == row.id).order_by(RolloutDeviceRow.device_id)
        ).all()
        wave_rows = s.scalars(
            select(RolloutWaveRow).where(RolloutWaveRow.rollout_id == row.id).order_by(RolloutWaveRow.idx)
        ).all()
        waves = [
            RolloutWaveRecord(
                index=w.idx,
                size=w.size,
                state=w.state,
                started_at=w.started_at,
                completed_at=w.completed_at,
                finished_at=w.finished_at,
                reason=w.reason,
                counts=_count_states([t for t in targets if t.wave == w.idx]),
            )
            for w in wave_rows
        ]
        return RolloutRecord(
            id=row.id,
            package_id=row.package_id,
            package_name=pkg.name if pkg else "",
            package_version=pkg.version if pkg else "",
            target=row.target,
            state=row.state,
            created_at=row.created_at,
            updated_at=row.updated_at,
            transitions=list(row.transitions or []),
            devices=[
                RolloutTargetRecord(
                    t.device_id,
                    t.generation,
                    t.state,
                    t.reason,
                    t.updated_at,
                    t.wave,
                    t.previous_package_id,
                    t.package_id or (row.package_id if t.state != TARGET_NO_VARIANT else None),
                    t.test,
                    t.selection,
                )
                for t in targets
            ],
            plan=RolloutPlan.from_json(row.plan).to_json(),
            current_wave=row.current_wave or 0,
            reason=row.reason,
            waves=waves,
            release=f"{release.name}@{release.version}" if release else None,
        )

    def list_rollouts(self) -> list[RolloutRecord]:
        with self.session() as s:
            rows = s.scalars(select(RolloutRow).order_by(RolloutRow.created_at, RolloutRow.id)).all()
            return [self._rollout_record(s, r) for r in rows]

    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            return self._rollout_record(s, row)

    def latest_desired_states(self) -> list[DesiredRecord]:
        """Every device's newest desired state (republished, retained, whenever the fleet connects)."""
        with self.session() as s:
            latest = self._latest_desired(s)
            manifests: dict[str, bytes] = {}
            out = []
            for d in latest.values():
                if d.package_id not in manifests:
                    manifests[d.package_id] = (
                        s.scalar(select(PackageRow.signed_manifest).where(PackageRow.id == d.package_id)) or b""
                    )
                out.append(
                    DesiredRecord(
                        d.device_id, d.generation, d.package_id, d.rollout_id, d.created_at, manifests[d.package_id]
                    )
                )
            return sorted(out, key=lambda r: r.device_id)

    # --- what devices report ----------------------------------------------------------------

    def apply_reported(self, rep: ReportedUpdate) -> bool:
        """Record a device's report; advance the rollout it is about. False for an unknown device."""
        return self.apply_reported_many([rep])[0]

    def apply_reported_many(self, reps: Sequence[ReportedUpdate]) -> list[bool]:
        """Record reports in order, in one transaction; each rollout that a report ended a target of
        is advanced once, after all of them (advancing reads every target of the rollout: once per
        report made a wave of N devices cost N^2). False for a report from an unknown device."""
        now = utcnow()
        known: list[bool] = []
        ended: set[str] = set()  # rollouts a report ended a target of
        with self.session(write=True) as s:
            for rep in reps:
                row = s.get(DeviceRow, rep.device_id, with_for_update=True)
                known.append(row is not None)
                if row is None:
                    continue
                row.last_seen = now
                row.reported_at = now
                row.state = rep.state
                row.reported_generation = _i64(rep.generation)
                row.target_package_id = rep.target_package_id or None
                row.active_package_id = rep.active_package_id or None
                row.active_version = rep.active_version or None
                row.active_slot = rep.active_slot or None
                row.reason = rep.reason or None
                row.bytes_needed = _i64(rep.bytes_needed)
                row.bytes_received = _i64(rep.bytes_received)
                if rep.inventory:
                    row.inventory = rep.inventory
                desired = s.get(DesiredStateRow, (rep.device_id, rep.generation)) if rep.generation else None
                if desired is None or not desired.rollout_id:
                    continue
                target = s.get(RolloutDeviceRow, (desired.rollout_id, rep.device_id))
                if (
                    target is not None
                    and target.generation == rep.generation
                    and target.state not in TARGET_TERMINAL
                    and target.state != rep.state
                ):
                    target.state = rep.state
                    target.reason = rep.reason or None
                    target.updated_at = now
                    if rep.test is not None:
                        target.test = rep.test
                    if rep.state in TARGET_TERMINAL:
                        ended.add(desired.rollout_id)
            s.flush()
            for rollout_id in sorted(ended):
                rollout = s.get(RolloutRow, rollout_id, with_for_update=True)
                if rollout is not None:
                    self._advance(s, rollout, now, drive=False)
        return known

    def insert_telemetry(self, samples: Iterable[TelemetryRecord], dropped: dict[str, int] | None = None) -> int:
        """Insert samples, ignoring ones already stored (QoS 1 may deliver a batch twice): one
        INSERT ... ON CONFLICT DO NOTHING executed for the whole batch, in one transaction, with
        plain tuples (SQLAlchemy's per-row parameter processing would cost more than SQLite's
        insert). Returns rows offered."""
        now = utcnow()
        samples = list(samples)
        with self.session(write=True) as s:
            devices = {t.device_id for t in samples} | set(dropped or {})
            known = set(s.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(devices))).all()) if devices else set()
            received = self._received_at(now)
            top = _INT64_MAX
            rows = [
                (
                    t.device_id,
                    min(t.seq, top),
                    t.timestamp_ms,
                    received,
                    t.cpu_percent,
                    min(t.memory_used_bytes, top),
                    min(t.memory_total_bytes, top),
                    min(t.disk_free_bytes, top),
                    t.temperature_c,
                    min(t.requests_total, top),
                    min(t.errors_total, top),
                    t.tokens_per_s,
                    t.ttft_ms,
                    t.queue_depth,
                    t.update_state,
                    t.active_package_id,
                )
                for t in samples
                if t.device_id in known
            ]
            conn = s.connection()
            if rows:
                conn.exec_driver_sql(self._telemetry_insert_sql(), rows)
            if known:
                seen = update(DeviceRow).where(DeviceRow.id == bindparam("device"))
                conn.execute(seen.values(last_seen=now), [{"device": d} for d in sorted(known)])
                counted = [{"device": d, "dropped": _i64(n)} for d, n in sorted((dropped or {}).items()) if d in known]
                if counted:
                    conn.execute(seen.values(telemetry_dropped_total=bindparam("dropped")), counted)
        return len(rows)

    def _received_at(self, now: datetime) -> Any:
        """`now` as the driver takes it for telemetry_samples.received_at."""
        process = TelemetrySampleRow.__table__.c.received_at.type.bind_processor(self.engine.dialect)
        return process(now) if process is not None else now

    def _telemetry_insert_sql(self) -> str:
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(self.engine.dialect.paramstyle)
        if self.engine.dialect.name not in ("sqlite", "postgresql") or mark is None:
            raise NotImplementedError(f"database {self.engine.dialect.name} is not supported")
        columns = ", ".join(_TELEMETRY_COLUMNS)
        marks = ", ".join([mark] * len(_TELEMETRY_COLUMNS))
        return f"INSERT INTO telemetry_samples ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        with self.session() as s:
            rows = s.scalars(
                select(TelemetrySampleRow)
                .where(TelemetrySampleRow.device_id == device_id)
                .order_by(TelemetrySampleRow.timestamp_ms.desc(), TelemetrySampleRow.seq.desc())
                .limit(limit)
            ).all()
            return [
                TelemetryRecord(
                    device_id=r.device_id,
                    seq=r.seq,
                    timestamp_ms=r.timestamp_ms,
                    cpu_percent=r.cpu_percent,
                    memory_used_bytes=r.memory_used_bytes,
                    memory_total_bytes=r.memory_total_bytes,
                    disk_free_bytes=r.disk_free_bytes,
                    temperature_c=r.temperature_c,
                    requests_total=r.requests_total,
                    errors_total=r.errors_total,
                    tokens_per_s=r.tokens_per_s,
                    ttft_ms=r.ttft_ms,
                    queue_depth=r.queue_depth,
                    update_state=r.update_state,
                    active_package_id=r.active_package_id,
                )
                for r in rows
            ]

    def counts(self) -> dict[str, Any]:
        with self.session() as s:
            by_state = dict(
                s.execute(select(func.coalesce(DeviceRow.state, "NEW"), func.count()).group_by(DeviceRow.state)).all()
            )
            rollouts = dict(s.execute(select(RolloutRow.state, func.count()).group_by(RolloutRow.state)).all())
            return {
                "devices": sum(by_state.values()),
                "devices_by_state": by_state,
                "packages": s.scalar(select(func.count()).select_from(PackageRow)) or 0,
                "blobs": s.scalar(select(func.count()).select_from(BlobRow)) or 0,
                "blob_bytes": s.scalar(select(func.coalesce(func.sum(BlobRow.size), 0))) or 0,
                "rollouts": sum(rollouts.values()),
                "rollouts_by_state": rollouts,
                "telemetry_samples": s.scalar(select(func.count()).select_from(TelemetrySampleRow)) or 0,
            }
