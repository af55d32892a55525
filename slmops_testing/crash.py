"""Real processes for crash tests and benchmarks/crash_bench.py: a fleet with a paced broadcast,
an agent that can be killed and restarted, packages whose transfer spans many chunks, and the
device's download progress read from its persisted chunk bitmap.

- `start_fleet(data_dir, log, trust_key, *extra)` -> FleetProc (`slmops fleet serve`, paced 256 KiB chunks)
- `enroll(fleet, state_dir, logs, mqtt_port=None)` -> Agent (enrolled, not started; `.start(**env)`,
  `.kill()`, `.stop()`, `.state()`, `.answer()`)
- `padded_package(tiny, out, key, version, pad_bytes)` -> (folder, package id, padding blob sha)
- `release`, `wait_device`, `blob_stats`, `bitmap_progress`, `wait_mid_transfer`
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from slmops_cli.procs import Service, run, wait_until
from slmops_fleet.client import FleetClient
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc
from slmops_protos.manifests import SIGNED_MANIFEST_FILE, package_id, parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2
from slmops_testing.packages import repackage
from slmops_testing.processes import AGENT_ENV, FleetProc, healthy, read_json

CHUNK = 256 * 1024
RATE = 512 * 1024  # bytes/s of the fleet's paced broadcast: a 2 MiB padding takes ~4 s
PAD = "padding.bin"
# Chunk bitmaps flushed on every chunk, so the test sees the device's progress as it happens.
ENV = {**AGENT_ENV, "SLMOPS_AGENT_BITMAP_FLUSH_S": "0", "SLMOPS_AGENT_SHUTDOWN_GRACE_S": "1"}


# --- packages: the tiny model plus a padding file, so a transfer spans many chunks --------------


def padded_package(tiny: Path, out: Path, key: Path, version: str, pad_bytes: int) -> tuple[Path, str, str]:
    """The tiny model's package with `padding.bin` (`pad_bytes` fresh random bytes) added, signed
    again as `version`. Returns (folder, package id, the padding blob's SHA-256)."""
    path = repackage(tiny, out, key, version=version, extra_files={PAD: os.urandom(pad_bytes)})
    signed = parse_signed_manifest((path / SIGNED_MANIFEST_FILE).read_bytes())
    files = manifest_pb2.Manifest.FromString(signed.manifest).files
    return path, package_id(signed.manifest), next(f.sha256 for f in files if f.path == PAD)


def bitmap_progress(state_dir: Path, sha256: str) -> tuple[int, int] | None:
    """(chunks on disk, chunks in the blob) from the agent's persisted bitmap, None if there is none."""
    try:
        head, _, bits = (state_dir / "blobs" / f"{sha256}.bitmap").read_bytes().partition(b"\n")
        count = int(json.loads(head)["count"])
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return sum(bin(b).count("1") for b in bits), count


def wait_mid_transfer(state_dir: Path, sha256: str, timeout: float = 60) -> tuple[int, int]:
    """Until some of the chunks of `sha256` are on the device's disk and at least two are still missing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = bitmap_progress(state_dir, sha256)
        if p is not None and 0 < p[0] < p[1] - 1:
            return p
        time.sleep(0.02)
    raise AssertionError(f"never caught the download of {sha256[:12]} half done: {bitmap_progress(state_dir, sha256)}")


# --- real processes ---------------------------------------------------------------------------------


@dataclass
class Agent:
    """`slmops agent run` on an enrolled state folder, restartable."""

    state_dir: Path
    device_id: str
    logs: Path
    service: Service | None = None
    runs: int = 0

    def start(self, **env: str) -> Agent:
        (self.state_dir / "grpc.addr").unlink(missing_ok=True)
        self.runs += 1
        self.service = Service(
            f"agent-{self.runs}",
            ["agent", "run", "--state-dir", str(self.state_dir), "--grpc-port", "0"],
            self.logs / f"{self.state_dir.name}-{self.runs}.log",
            env={**ENV, **env},
        )
        self.service.wait_for((self.state_dir / "grpc.addr").exists, timeout=60, what="its gRPC address")
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def kill(self) -> None:
        assert self.service is not None
        self.service.kill()
        self.service.proc.wait(10)

    def state(self) -> str:
        return str(json.loads((self.state_dir / "state.json").read_text())["state"])

    def answer(self) -> str:
        """The model version that answers a one-token request; "" while nothing is loaded (UNAVAILABLE)."""
        target = (self.state_dir / "grpc.addr").read_text().strip()
        request = agent_pb2.GenerateRequest(prompt="Hi", max_new_tokens=1)
        with grpc.insecure_channel(target) as channel:
            try:
                return agent_pb2_grpc.InferenceStub(channel).GenerateUnary(request, timeout=30).model_version
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    return ""
                raise


def client_of(fleet: FleetProc) -> FleetClient:
    return FleetClient(fleet.info["url"], fleet.info["admin_token"], timeout=30)


def release(fleet: FleetProc, package: Path) -> str:
    with client_of(fleet) as client:
        pid: str = client.upload_package(package)["package_id"]
        client.create_rollout(pid, "all")
    return pid


def wait_device(
    fleet: FleetProc, device_id: str, state: str, package_id: str, timeout: float = 90
) -> dict[str, object]:
    """Until the fleet's view of the device is `state` with `package_id` active (or, for
    ROLLED_BACK, targeted); returns the device."""
    key = "target_package_id" if state == "ROLLED_BACK" else "active_package_id"
    with client_of(fleet) as client:

        def done() -> dict[str, object] | None:
            d = client.get_device(device_id)
            return d if d["state"] == state and d[key] == package_id else None

        return wait_until(done, timeout=timeout, what=f"{device_id} {state} on {package_id[:12]}")


def blob_stats(fleet: FleetProc, sha256: str) -> dict[str, int]:
    with client_of(fleet) as client:
        return next(b for b in client.stats()["blobs"] if b["sha256"] == sha256)


def start_fleet(data_dir: Path, log: Path, trust_key: Path, *extra: str, rate: int = RATE) -> FleetProc:
    """`slmops fleet serve` on `data_dir` (the same data folder keeps its ports across restarts),
    broadcasting 256 KiB chunks paced to `rate` bytes/s."""
    args = ["fleet", "serve", "--data-dir", str(data_dir), "--port", "0", "--broker-port", "0"]
    args += ["--trust-key", str(trust_key), "--chunk-size", str(CHUNK), "--broadcast-rate", str(rate)]
    service = Service("fleet", [*args, *extra], log)
    info_path = data_dir / "fleet.json"
    info_path.unlink(missing_ok=True)
    info = service.wait_for(lambda: read_json(info_path), timeout=60, what="fleet.json")
    service.wait_for(lambda: healthy(str(info["url"])), timeout=60, what="a healthy API")
    return FleetProc(service, data_dir, info)


def enroll(fleet: FleetProc, state_dir: Path, logs: Path, mqtt_port: int | None = None) -> Agent:
    """An enrolled Agent, not started; `mqtt_port` points its credentials at another port (a proxy)."""
    token = client_of(fleet).create_token()["token"]
    run(["agent", "enroll", "--fleet", fleet.info["url"], "--token", token, "--state-dir", str(state_dir)])
    creds_path = state_dir / "credentials.json"
    creds = json.loads(creds_path.read_text())
    if mqtt_port is not None:
        creds["mqtt"]["port"] = mqtt_port
        creds_path.write_text(json.dumps(creds))
    return Agent(state_dir, creds["device_id"], logs)
