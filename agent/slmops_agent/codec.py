"""Translation between the agent's plain values and protobuf, at its two edges: the fleet's MQTT
messages (`slmops.fleet.v1`) and the local gRPC API (`slmops.agent.v1`). The rest of the agent
works with dataclasses; the telemetry queue keeps its samples as the messages they are sent as."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from slmops_agent.blob_store import Chunk
from slmops_agent.inventory import Inventory
from slmops_agent.runtime.constraints import Constraint, ConstraintKind
from slmops_agent.runtime.model import ModelInfo
from slmops_agent.runtime.requests import FinishReason, GenerationRequest, GenerationResult
from slmops_agent.update.messages import BlobWant, Desired, Report
from slmops_agent.update_record import TestSummary
from slmops_protos.agent.v1 import agent_pb2
from slmops_protos.fleet.v1 import fleet_pb2

if TYPE_CHECKING:
    from slmops_agent.server import AgentStatus
    from slmops_agent.telemetry import Sample


# -- the fleet's messages (MQTT) -----------------------------------------------------------------
def desired_from_pb(msg: fleet_pb2.DesiredState) -> Desired:
    has_model = msg.HasField("model") and bool(msg.model.package_id)
    return Desired(
        device_id=msg.device_id,
        generation=msg.generation,
        package_id=msg.model.package_id if has_model else None,
        signed_manifest=msg.model.manifest.SerializeToString() if has_model else b"",
        rollout_id=msg.rollout_id,
        chunk_size=msg.chunk_size,
    )


def chunk_from_pb(msg: fleet_pb2.BlobChunk) -> Chunk:
    return Chunk(
        blob_sha256=msg.blob_sha256,
        index=msg.index,
        count=msg.count,
        blob_size=msg.blob_size,
        chunk_size=msg.chunk_size,
        chunk_sha256=msg.chunk_sha256,
        data=msg.data,
    )


def report_to_pb(
    report: Report, device_id: str, inventory: fleet_pb2.Inventory | None = None
) -> fleet_pb2.ReportedState:
    msg = fleet_pb2.ReportedState(
        device_id=device_id,
        generation=report.generation,
        state=report.state.to_pb(),
        target_package_id=report.target_package_id,
        active_package_id=report.active_package_id,
        active_version=report.active_version,
        reason=report.reason,
        bytes_needed=report.bytes_needed,
        bytes_received=report.bytes_received,
        timestamp_unix_ms=int(time.time() * 1000),
        active_slot=report.active_slot,
    )
    if inventory is not None:
        msg.inventory.CopyFrom(inventory)
    if report.test is not None:
        msg.test.CopyFrom(summary_to_pb(report.test))
    return msg


def summary_to_pb(test: TestSummary) -> fleet_pb2.TestResult:
    return fleet_pb2.TestResult(
        ran=test.ran,
        passed=test.passed,
        prompts=test.prompts,
        judged=test.judged,
        matched=test.matched,
        seconds=test.seconds,
        adapter=test.adapter,
    )


def blob_want_to_pb(want: BlobWant, device_id: str) -> fleet_pb2.BlobRequest:
    return fleet_pb2.BlobRequest(
        device_id=device_id,
        blob_sha256=want.sha256,
        missing=want.missing,
        chunk_size=want.chunk_size,
        waiting=want.waiting,
    )


def inventory_to_pb(inventory: Inventory) -> fleet_pb2.Inventory:
    return fleet_pb2.Inventory(
        os=inventory.os,
        arch=inventory.arch,
        cpu_count=inventory.cpu_count,
        memory_bytes=inventory.memory_bytes,
        disk_free_bytes=inventory.disk_free_bytes,
        providers=inventory.providers,
        cpu_features=inventory.cpu_features,
        agent_version=inventory.agent_version,
    )


def sample_to_pb(sample: Sample, seq: int = 0) -> fleet_pb2.TelemetrySample:
    msg = fleet_pb2.TelemetrySample(
        timestamp_unix_ms=sample.timestamp_unix_ms,
        cpu_percent=sample.cpu_percent,
        memory_used_bytes=sample.memory_used_bytes,
        memory_total_bytes=sample.memory_total_bytes,
        disk_free_bytes=sample.disk_free_bytes,
        requests_total=sample.requests_total,
        errors_total=sample.errors_total,
        tokens_per_s=sample.tokens_per_s,
        ttft_ms=sample.ttft_ms,
        queue_depth=sample.queue_depth,
        update_state=sample.update_state.to_pb(),
        active_package_id=sample.active_package_id,
        seq=seq,
    )
    if sample.temperature_c is not None:
        msg.temperature_c = sample.temperature_c
    return msg


# -- the local inference API (gRPC) -------------------------------------------------------------
def request_from_pb(msg: agent_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=msg.prompt,
        messages=tuple((m.role, m.content) for m in msg.messages),
        max_new_tokens=msg.max_new_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        adapter=msg.adapter,
        model_version=msg.model_version,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else None,
        constraint=_constraint_from_pb(msg),
    )


def _constraint_from_pb(msg: agent_pb2.GenerateRequest) -> Constraint | None:
    which = msg.WhichOneof("constraint")
    return None if which is None else Constraint(ConstraintKind(which), getattr(msg, which))


_FINISH = {
    FinishReason.LENGTH: agent_pb2.LENGTH,
    FinishReason.STOP: agent_pb2.STOP,
    FinishReason.CANCELLED: agent_pb2.CANCELLED,
}


def final_to_pb(result: GenerationResult, *, text: str) -> agent_pb2.GenerateResponse:
    return agent_pb2.GenerateResponse(
        text=text,
        finish_reason=_FINISH[result.finish_reason],
        usage=agent_pb2.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        timings=agent_pb2.Timings(
            time_to_first_token_ms=result.ttft_ms, tokens_per_second=result.tokens_per_s, total_ms=result.total_ms
        ),
        model_version=result.model_version,
        package_id=result.package_id,
    )


def text_to_pb(text: str, info: ModelInfo) -> agent_pb2.GenerateResponse:
    """A streamed piece of text, with the model that answers."""
    return agent_pb2.GenerateResponse(text=text, model_version=info.version, package_id=info.package_id)


def model_info_to_pb(info: ModelInfo, *, active: bool) -> agent_pb2.ModelInfo:
    return agent_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        package_id=info.package_id,
        profile=info.profile,
        slot=info.slot,
        active=active,
        adapters=list(info.adapters),
    )


def models_to_pb(infos: list[ModelInfo], active_package_id: str) -> agent_pb2.ListModelsResponse:
    return agent_pb2.ListModelsResponse(
        models=[
            model_info_to_pb(i, active=bool(active_package_id) and i.package_id == active_package_id) for i in infos
        ]
    )


def status_to_pb(
    status: AgentStatus, active: ModelInfo | None, *, queue_depth: int, requests_total: int, errors_total: int
) -> agent_pb2.GetStatusResponse:
    """GetStatus's answer: the agent's status with the serving model (`active`) and the host's counters."""
    msg = agent_pb2.GetStatusResponse(
        device_id=status.device_id,
        update_state=status.update_state,
        active_slot=active.slot if active is not None else status.active_slot,
        queue_depth=queue_depth,
        requests_total=requests_total,
        errors_total=errors_total,
        agent_version=status.agent_version,
        uptime_s=status.uptime_s,
    )
    if active is not None:
        msg.active_model.CopyFrom(model_info_to_pb(active, active=True))
    return msg
