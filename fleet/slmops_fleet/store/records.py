"""The records the store hands to the rest of the fleet: plain dataclasses, never ORM objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf.json_format import MessageToDict

from slmops_fleet.rollouts.variants import Variant
from slmops_protos.package.v1 import manifest_pb2


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
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    rotation_started_at: datetime | None = None  # a credential rotation the device has not confirmed
    groups: list[str] = field(default_factory=list)  # the named groups it is in now
    follows_group: str | None = None  # the assigned group whose release it follows

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "last_seen", "reported_at", "revoked_at", "rotation_started_at"):
            d[k] = _iso(d[k])
        d["status"] = "revoked" if self.revoked else "active"
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

    @property
    def security_version(self) -> int:
        """The manifest's (verified at upload): devices refuse packages below the highest they committed."""
        signed = manifest_pb2.SignedManifest.FromString(self.signed_manifest)
        return manifest_pb2.Manifest.FromString(signed.manifest).security_version

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
            "security_version": self.security_version,
            **self.provenance(),
        }

    def provenance(self) -> dict[str, Any]:
        """The signed manifest's lineage (base model, training data hashes, recipe, tools) and the
        builder's evaluation (quality figures), as JSON."""
        signed = manifest_pb2.SignedManifest.FromString(self.signed_manifest)
        manifest = manifest_pb2.Manifest.FromString(signed.manifest)
        return {
            "lineage": MessageToDict(manifest.lineage, preserving_proto_field_name=True),
            "evaluation": MessageToDict(manifest.evaluation, preserving_proto_field_name=True),
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
    rollback_of: str | None = None  # the rollout this one reverts
    rolled_back_by: list[str] = field(default_factory=list)  # the rollouts that revert this one

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
            "rollback_of": self.rollback_of,
            "rolled_back_by": self.rolled_back_by,
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


@dataclass(frozen=True)
class AdminTokenRecord:
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = _iso(self.created_at)
        d["revoked_at"] = _iso(self.revoked_at)
        return d


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    role: str
    client: str
    method: str
    path: str
    target: str
    status: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": _iso(self.at)}
