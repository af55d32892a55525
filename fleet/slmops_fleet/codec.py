"""Translation between the fleet's dataclasses and the `slmops.fleet.v1` MQTT payloads.
Protobuf is used here and nowhere else in the fleet."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from slmops_fleet.store.records import DesiredRecord, ReportedUpdate, TelemetryRecord
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import is_sha256_hex
from slmops_protos.package.v1 import manifest_pb2


class PayloadError(ValueError):
    """An MQTT payload does not parse or contradicts its topic."""


class TooManySamples(PayloadError):
    """A TelemetryBatch carries more samples than the fleet takes in one message."""


@dataclass(frozen=True)
class BlobRequestIn:
    device_id: str
    sha256: str
    missing: tuple[int, ...]
    chunk_size: int
    waiting: bool = False  # what it lacks may still be on its way (BlobRequest.waiting)


@dataclass(frozen=True)
class TelemetryIn:
    device_id: str
    samples: list[TelemetryRecord]
    dropped_total: int


@dataclass(frozen=True)
class CredentialsAckIn:
    device_id: str
    rotation_id: str


def _parse(message: Any, payload: bytes, what: str) -> Any:
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise PayloadError(f"{what} does not parse") from exc
    return message


def _check_device(topic_device: str, payload_device: str, what: str) -> None:
    # The broker ACL guarantees the topic; a payload naming another device is refused.
    if payload_device and payload_device != topic_device:
        raise PayloadError(f"{what} on {topic_device}'s topic names device {payload_device!r}")


def state_name(value: int) -> str:
    try:
        return fleet_pb2.UpdateState.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return "UPDATE_STATE_UNSPECIFIED"


def inventory_to_json(inv: fleet_pb2.Inventory) -> dict[str, Any]:
    return {
        "os": inv.os,
        "arch": inv.arch,
        "cpu_count": inv.cpu_count,
        "memory_bytes": inv.memory_bytes,
        "disk_free_bytes": inv.disk_free_bytes,
        "providers": list(inv.providers),
        "cpu_features": list(inv.cpu_features),
        "agent_version": inv.agent_version,
    }


def test_to_json(t: fleet_pb2.TestResult) -> dict[str, Any]:
    judged = min(t.judged, t.prompts) if t.prompts else t.judged
    return {
        "ran": t.ran,
        "passed": t.passed,
        "prompts": t.prompts,
        "judged": judged,
        "matched": min(t.matched, judged),
        "seconds": round(t.seconds, 3),
        "adapter": t.adapter[:200],
    }


def reported_from_pb(device_id: str, payload: bytes) -> ReportedUpdate:
    msg = _parse(fleet_pb2.ReportedState(), payload, "ReportedState")
    _check_device(device_id, msg.device_id, "ReportedState")
    return ReportedUpdate(
        device_id=device_id,
        generation=msg.generation,
        state=state_name(msg.state),
        target_package_id=msg.target_package_id,
        active_package_id=msg.active_package_id,
        active_version=msg.active_version[:128],
        active_slot=msg.active_slot[:8],
        reason=msg.reason[:4000],
        bytes_needed=msg.bytes_needed,
        bytes_received=msg.bytes_received,
        inventory=inventory_to_json(msg.inventory) if msg.HasField("inventory") else None,
        test=test_to_json(msg.test) if msg.HasField("test") else None,
    )


def telemetry_from_pb(device_id: str, payload: bytes, max_samples: int | None = None) -> TelemetryIn:
    """The batch's samples; TooManySamples past `max_samples`, before any of them is turned into a row."""
    msg = _parse(fleet_pb2.TelemetryBatch(), payload, "TelemetryBatch")
    _check_device(device_id, msg.device_id, "TelemetryBatch")
    if max_samples is not None and len(msg.samples) > max_samples:
        raise TooManySamples(f"TelemetryBatch carries {len(msg.samples)} samples (at most {max_samples} taken)")
    samples = [
        TelemetryRecord(
            device_id=device_id,
            seq=s.seq,
            timestamp_ms=s.timestamp_unix_ms,
            cpu_percent=s.cpu_percent,
            memory_used_bytes=s.memory_used_bytes,
            memory_total_bytes=s.memory_total_bytes,
            disk_free_bytes=s.disk_free_bytes,
            temperature_c=s.temperature_c if s.HasField("temperature_c") else None,
            requests_total=s.requests_total,
            errors_total=s.errors_total,
            tokens_per_s=s.tokens_per_s,
            ttft_ms=s.ttft_ms,
            queue_depth=s.queue_depth,
            update_state=state_name(s.update_state),
            active_package_id=s.active_package_id[:64],
        )
        for s in msg.samples
    ]
    return TelemetryIn(device_id, samples, msg.dropped_total)


def blob_request_from_pb(device_id: str, payload: bytes) -> BlobRequestIn:
    msg = _parse(fleet_pb2.BlobRequest(), payload, "BlobRequest")
    _check_device(device_id, msg.device_id, "BlobRequest")
    if not is_sha256_hex(msg.blob_sha256):
        raise PayloadError(f"BlobRequest names no valid blob: {msg.blob_sha256[:80]!r}")
    return BlobRequestIn(device_id, msg.blob_sha256, tuple(msg.missing), msg.chunk_size, msg.waiting)


def credentials_ack_from_pb(device_id: str, payload: bytes) -> CredentialsAckIn:
    msg = _parse(fleet_pb2.CredentialsAck(), payload, "CredentialsAck")
    _check_device(device_id, msg.device_id, "CredentialsAck")
    if not msg.rotation_id or len(msg.rotation_id) > 64:
        raise PayloadError("CredentialsAck names no valid rotation")
    return CredentialsAckIn(device_id, msg.rotation_id)


def credentials_update_to_pb(device_id: str, rotation_id: str, password: str) -> bytes:
    return fleet_pb2.CredentialsUpdate(
        device_id=device_id, rotation_id=rotation_id, password=password
    ).SerializeToString()


def desired_to_pb(d: DesiredRecord, chunk_size: int) -> bytes:
    msg = fleet_pb2.DesiredState(
        device_id=d.device_id,
        generation=d.generation,
        rollout_id=d.rollout_id or "",
        issued_unix_ms=int(d.created_at.timestamp() * 1000),
        chunk_size=chunk_size,
    )
    msg.model.package_id = d.package_id
    msg.model.manifest.CopyFrom(manifest_pb2.SignedManifest.FromString(d.signed_manifest))
    return msg.SerializeToString()


def chunk_to_pb(sha256: str, index: int, count: int, blob_size: int, chunk_size: int, data: bytes) -> bytes:
    return fleet_pb2.BlobChunk(
        blob_sha256=sha256,
        index=index,
        count=count,
        blob_size=blob_size,
        chunk_size=chunk_size,
        chunk_sha256=hashlib.sha256(data).hexdigest(),
        data=data,
    ).SerializeToString()
