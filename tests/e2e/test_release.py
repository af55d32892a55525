"""A release through the real processes (`slmops fleet serve`, two `slmops agent run`, the embedded
broker): each device gets the variant it can run, and a version whose golden prompts do not match
on the devices is stopped by the quality gate on its canary wave, which goes back to the old version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from slmops_cli.procs import wait_until
from slmops_protos.manifests import SIGNED_MANIFEST_FILE
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.packages import repackage
from slmops_testing.processes import AgentProc, FleetProc

pytestmark = pytest.mark.timeout(300)


def test_a_release_failing_the_quality_gate_rolls_its_canary_back(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agents = [enroll_agent(fleet, tmp_path / f"agent-{i}", f"agent-{i}") for i in (1, 2)]
    v1 = tiny_package_factory("1.0.0", out=tmp_path / "pkg-v1")
    v1_id = fleet.release(v1)  # a plain --package rollout: a one-package release
    fleet.wait_committed(v1_id)

    # Version 1.0.1: the same model, but references no device can reproduce; plus a CUDA variant of it.
    bad = repackage(v1, tmp_path / "pkg-bad", signing_key[0], version="1.0.1", references="never said")
    cuda = repackage(
        v1,
        tmp_path / "pkg-cuda",
        signing_key[0],
        version="1.0.1",
        profile=manifest_pb2.HardwareProfile(name="cuda-fp16", execution_provider="cuda", precision="fp16"),
    )
    ids = []
    for pkg in (bad, cuda):  # the same files as v1: only the manifests are new
        body = fleet.api("POST", "/v1/packages", content=(pkg / SIGNED_MANIFEST_FILE).read_bytes()).json()
        assert body["complete"], body
        ids.append(body["package_id"])
    bad_id, cuda_id = ids
    release = fleet.cli("release", "create", "tiny-llama", "1.0.1", "--package", bad_id, "--package", cuda_id)
    assert release["ref"] == "tiny-llama@1.0.1" and {p["id"] for p in release["packages"]} == {bad_id, cuda_id}
    assert [r["ref"] for r in fleet.cli("release", "list")] == ["tiny-llama@1.0.1"]

    rollout = fleet.cli(
        "rollout", "create", "--release", "tiny-llama@1.0.1", "--waves", "1,100%", "--min-quality-score", "0.5"
    )
    assert rollout["release"] == "tiny-llama@1.0.1" and [w["size"] for w in rollout["waves"]] == [1, 1]
    assert {d["package_id"] for d in rollout["devices"]} == {bad_id}  # CPU devices get the CPU variant

    done = wait_until(
        lambda: (r := fleet.api("GET", f"/v1/rollouts/{rollout['id']}").json())["state"] != "in_progress" and r,
        timeout=120,
        what="the rollout to stop",
    )
    assert done["state"] == "rolled_back", done["transitions"][-3:]
    assert "on-device quality score 0%" in done["reason"], done["reason"]
    canary = next(d for d in done["devices"] if d["wave"] == 0)
    other = next(d for d in done["devices"] if d["wave"] == 1)
    assert canary["state"] == "COMMITTED" and canary["test"]["ran"] and canary["test"]["passed"]
    assert canary["test"]["judged"] >= 1 and canary["test"]["matched"] == 0
    assert other["state"] == "CANCELLED" and other["generation"] == 0

    # The canary got v1 back (a new generation) and serves it again; the other never left v1.
    fleet.wait_committed(v1_id)
    devices = fleet.devices()
    assert devices[canary["device_id"]]["desired_generation"] == 3
    assert devices[other["device_id"]]["desired_generation"] == 1
    for agent in agents:
        assert agent.ask("Hi", "--max-new-tokens", "2")["package_id"] == v1_id

    # `explain`: the CPU variant was chosen, the CUDA one refused for want of the provider.
    explained = fleet.cli("rollout", "explain", rollout["id"], canary["device_id"])
    (device,) = explained["devices"]
    assert device["package_id"] == bad_id and device["reason"].startswith("cpu-int4: CPUExecutionProvider")
    verdicts = {c["package_id"]: c for c in device["candidates"]}
    assert verdicts[cuda_id]["ok"] is False and verdicts[cuda_id]["why"].startswith("needs CUDAExecutionProvider")
    assert verdicts[bad_id]["ok"] is True
