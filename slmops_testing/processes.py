"""Handles on the real processes of the end-to-end tests."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from slmops_cli.procs import Service, run_json, wait_until

# Agents in tests: one thread, telemetry every second, no start-up jitter, quick repairs.
AGENT_ENV = {
    "SLMOPS_AGENT_THREADS": "1",
    "SLMOPS_AGENT_TELEMETRY_INTERVAL_S": "1",
    "SLMOPS_AGENT_MQTT_CONNECT_JITTER_S": "0",
    "SLMOPS_AGENT_BLOB_STALL_S": "1",
}


@dataclass
class FleetProc:
    service: Service
    data_dir: Path
    info: dict[str, Any]
    prefix: tuple[str, ...] = ()  # where the admin CLI runs (e.g. `ip netns exec NAME`)

    @property
    def args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]

    def cli(self, *args: str) -> Any:
        """`slmops fleet ARGS --json` against this fleet."""
        return run_json(["fleet", *args, "--json", *self.args], prefix=self.prefix)

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.info['admin_token']}"}
        return httpx.request(method, self.info["url"] + path, headers=headers, timeout=30, **kw)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.cli("device", "list")}

    def release(self, package: Path) -> str:
        """Upload a package folder and roll it out to all devices; return its package id."""
        package_id: str = self.cli("package", "upload", str(package))["package_id"]
        self.cli("rollout", "create", "--package", package_id, "--target", "all")
        return package_id

    def wait_devices(self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 120) -> None:
        wait_until(lambda: all(check(d) for d in self.devices().values()), timeout=timeout, what=what)

    def wait_committed(self, package_id: str, timeout: float = 120) -> None:
        self.wait_devices(
            lambda d: d["state"] == "COMMITTED" and d["active_package_id"] == package_id,
            f"every device committed to {package_id[:12]}",
            timeout,
        )

    def blob_bytes_sent(self) -> dict[str, int]:
        stats = self.cli("stats")
        return {b["sha256"]: b["broadcast_bytes"] + b["repair_bytes"] for b in stats["blobs"]}


@dataclass
class AgentProc:
    service: Service
    state_dir: Path
    device_id: str
    credentials: dict[str, Any] = field(repr=False)
    prefix: tuple[str, ...] = ()  # where `agent ask` runs (e.g. `ip netns exec NAME`)

    def ask(self, prompt: str, *extra: str) -> dict[str, Any]:
        """`slmops agent ask --json` (over the agent's Unix socket unless `--target` is in `extra`)."""
        args = ["agent", "ask", prompt, "--state-dir", str(self.state_dir), "--json", *extra]
        return dict(run_json(args, prefix=self.prefix))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def healthy(url: str, ca_file: str | None = None) -> bool:
    """True when the fleet at `url` answers /healthz (an https:// one verified with `ca_file`)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    try:
        return httpx.get(f"{url}/healthz", timeout=2, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False
