"""The agent's protobuf edge (`codec`): the fleet's messages and the gRPC API's, both ways, without
a model or a broker."""

from __future__ import annotations

from agent_helpers import chunks_of

from slmops_agent.codec import (
    blob_want_to_pb,
    chunk_from_pb,
    desired_from_pb,
    final_to_pb,
    models_to_pb,
    report_to_pb,
    request_from_pb,
    sample_to_pb,
    status_to_pb,
)
from slmops_agent.runtime.model import ModelInfo
from slmops_agent.runtime.requests import FinishReason, GenerationResult
from slmops_agent.server import AgentStatus
from slmops_agent.telemetry import Sample
from slmops_agent.update.messages import BlobWant, Report
from slmops_agent.update_record import TestSummary as SmokeSummary  # not a test class for pytest
from slmops_protos.agent.v1 import agent_pb2
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.states import UpdateState


def test_a_desired_state_without_a_model_keeps_what_runs() -> None:
    d = desired_from_pb(fleet_pb2.DesiredState(device_id="d1", generation=3, rollout_id="r", chunk_size=7))
    assert (d.device_id, d.generation, d.package_id, d.signed_manifest, d.rollout_id, d.chunk_size) == (
        "d1",
        3,
        None,
        b"",
        "r",
        7,
    )


def test_a_desired_model_carries_its_signed_manifest() -> None:
    msg = fleet_pb2.DesiredState(device_id="d1", generation=4)
    msg.model.package_id = "ab" * 32
    msg.model.manifest.manifest = b"canonical manifest bytes"
    d = desired_from_pb(msg)
    assert d.package_id == "ab" * 32 and d.signed_manifest == msg.model.manifest.SerializeToString()


def test_chunks_and_blob_requests() -> None:
    (pb,) = chunks_of(b"hello", "cd" * 32, chunk_size=8)
    chunk = chunk_from_pb(pb)
    assert (chunk.blob_sha256, chunk.index, chunk.count, chunk.blob_size, chunk.data) == ("cd" * 32, 0, 1, 5, b"hello")
    want = blob_want_to_pb(BlobWant("cd" * 32, (1, 3), 8), "d1")
    assert (want.device_id, want.blob_sha256, list(want.missing), want.chunk_size) == ("d1", "cd" * 32, [1, 3], 8)


def test_a_report_carries_its_state_test_and_inventory() -> None:
    test = SmokeSummary(ran=True, passed=True, prompts=2, judged=1, matched=1, seconds=0.5, adapter="a")
    report = Report(UpdateState.COMMITTED, 5, "t", "p", "1.0", "b", test=test)
    msg = report_to_pb(report, "d1", fleet_pb2.Inventory(os="linux"))
    assert msg.state == fleet_pb2.COMMITTED and (msg.device_id, msg.generation, msg.active_slot) == ("d1", 5, "b")
    assert (msg.test.prompts, msg.test.judged, msg.test.matched, msg.test.adapter) == (2, 1, 1, "a")
    assert msg.inventory.os == "linux" and msg.timestamp_unix_ms > 0
    assert not report_to_pb(Report(UpdateState.IDLE, 0, "", "", "", ""), "d1").HasField("test")


def test_a_sample_leaves_out_an_unknown_temperature() -> None:
    sample = Sample(1, 2.0, 3, 4, 5, None, 6, 7, 8.0, 9.0, 1, UpdateState.FETCHING, "p")
    msg = sample_to_pb(sample, seq=11)
    assert not msg.HasField("temperature_c") and msg.update_state == fleet_pb2.FETCHING and msg.seq == 11
    assert sample_to_pb(Sample(1, 2.0, 3, 4, 5, 41.5, 6, 7, 8.0, 9.0, 1, UpdateState.IDLE, "p")).temperature_c == 41.5


def test_a_generate_request_keeps_unset_fields_unset() -> None:
    req = request_from_pb(agent_pb2.GenerateRequest(prompt="hi", stop=["x"]))
    assert (req.temperature, req.top_p, req.top_k, req.seed, req.repetition_penalty) == (None,) * 5
    req = request_from_pb(agent_pb2.GenerateRequest(prompt="hi", temperature=0.0, seed=0))
    assert req.temperature == 0.0 and req.seed == 0 and req.stop == ()


def test_results_models_and_status() -> None:
    result = GenerationResult("t", FinishReason.CANCELLED, 3, 2, 1.5, 10.0, 20.0, "1.0", "p")
    msg = final_to_pb(result, text="")
    assert msg.finish_reason == agent_pb2.CANCELLED and msg.usage.completion_tokens == 2 and msg.text == ""
    infos = [ModelInfo(name="m", package_id="p1", slot="a"), ModelInfo(name="m", package_id="p2", slot="b")]
    assert [m.active for m in models_to_pb(infos, "p2").models] == [False, True]
    assert [m.active for m in models_to_pb(infos, "").models] == [False, False]
    status = status_to_pb(
        AgentStatus(device_id="d1", active_slot="b"), None, queue_depth=1, requests_total=2, errors_total=0
    )
    assert (status.device_id, status.active_slot, status.queue_depth) == ("d1", "b", 1)
    assert not status.HasField("active_model")
    status = status_to_pb(AgentStatus(), infos[0], queue_depth=0, requests_total=0, errors_total=0)
    assert status.active_slot == "a" and status.active_model.active and status.active_model.package_id == "p1"
