"""A running fleet for the web console's tests: a few simulated devices (real paho clients on the
fleet's embedded broker) that send telemetry, named groups, a release with lineage, and a rollout in
waves whose devices report only when the test says so (`ConsoleFleet.commit`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import httpx

from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice

LINEAGE = manifest_pb2.Lineage(
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    base_model_sha256="5e" * 32,
    dataset_sha256=["d1" * 32],
    recipe_sha256="7c" * 32,
    engine="onnxruntime-genai",
    quantization_method="rtn",
)
EVALUATION = manifest_pb2.Evaluation(metrics={"perplexity": 12.5, "decode_tps": 140.0, "golden_match": 0.92})


def make_release_package(key: Path, out: Path, version: str) -> Path:
    """A signed package with the lineage and the builder's evaluation a release page shows."""
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    src = out.with_name(out.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(random_bytes(4000, len(version)))
    spec = PackageSpec(
        name="console-demo",
        version=version,
        profile=manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu", precision="int4"),
        lineage=LINEAGE,
        evaluation=EVALUATION,
    )
    return write_package(src, spec, load_private_key(key), out).path


def send_telemetry(device: SimDevice, samples: int, *, seq0: int = 0, spacing_ms: int = 5000) -> None:
    """`samples` samples ending now, `spacing_ms` apart, with values that move (a plot is not flat)."""
    now = int(time.time() * 1000)
    batch = fleet_pb2.TelemetryBatch(device_id=device.device_id)
    for i in range(samples):
        wave = math.sin(i / 2)
        batch.samples.add(
            seq=seq0 + i + 1,
            timestamp_unix_ms=now - (samples - 1 - i) * spacing_ms,
            cpu_percent=30 + 10 * wave,
            memory_used_bytes=int((1.5 + 0.2 * wave) * 2**30),
            memory_total_bytes=4 << 30,
            requests_total=10 * (i + 1),
            errors_total=i // 4,
            tokens_per_s=120 + 20 * wave,
            ttft_ms=45 + 5 * wave,
        )
    device.publish(device.topics.telemetry(device.device_id), batch.SerializeToString())


class ConsoleFleet:
    def __init__(self, thread: Any, key: Path, workdir: Path, devices: int = 3) -> None:
        self.thread = thread
        self.admin = httpx.Client(
            base_url=thread.url, headers={"Authorization": f"Bearer {thread.admin_token}"}, timeout=30
        )
        self.devices: list[SimDevice] = []
        for i in range(devices):
            dev = SimDevice.enrolled(enroll(thread, new_token(self.admin), name=f"edge-{i}").json())
            assert not dev.connect().is_failure
            assert dev.subscribe(dev.topics.desired(dev.device_id))
            self.devices.append(dev)
            send_telemetry(dev, 12)
        r = self.admin.post(f"/v1/devices/{self.devices[0].device_id}/tags", json={"add": ["canary"]})
        assert r.status_code == 200, r.text
        for group in (  # named groups: edge-0 in "canaries", edge-1 and edge-2 in "lab", nobody in "kiosks"
            {"name": "canaries", "selector": "tag=canary"},
            {"name": "lab", "devices": [d.device_id for d in self.devices[1:3]]},
            {"name": "kiosks", "selector": "tag=kiosk", "priority": 5},
        ):
            r = self.admin.post("/v1/groups", json=group)
            assert r.status_code == 200, r.text
        self.package = upload(self.admin, make_release_package(key, workdir / "pkg" / "package", "1.0.0"))
        r = self.admin.post("/v1/releases", json={"name": "console-demo", "version": "1.0.0", "package_ids": [
            self.package["package_id"]]})  # fmt: skip
        assert r.status_code == 200, r.text
        self.release = r.json()

    def read_only_token(self, name: str = "viewer") -> str:
        r = self.admin.post("/v1/admin-tokens", json={"name": name, "role": "read-only"})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    def start_rollout(self) -> dict[str, Any]:
        """The release to every device in two waves (1 device, then the rest), gated on no failure."""
        r = self.admin.post(
            "/v1/rollouts",
            json={"release": "console-demo@1.0.0", "waves": ["1", "100%"], "gates": {"max_failures": 0}},
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        r = self.admin.get(f"/v1/rollouts/{rollout_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def commit(self, rollout_id: str, wave: int) -> None:
        """Every device of `wave` (0-based) reports COMMITTED to its newest desired state."""
        by_id = {d.device_id: d for d in self.devices}
        for target in self.rollout(rollout_id)["devices"]:
            if target["wave"] != wave:
                continue
            dev = by_id[target["device_id"]]
            desired = dev.desired(generation=target["generation"])
            dev.report(
                fleet_pb2.COMMITTED,
                desired.generation,
                target_package_id=desired.model.package_id,
                active_package_id=desired.model.package_id,
                active_version="1.0.0",
            )

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        self.admin.close()
