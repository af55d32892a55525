"""Real processes for the end-to-end tests: `slmops fleet serve` and `slmops agent run`.

- `run_fleet(data_dir, trust_keys, *extra_args)` -> FleetProc  (stopped at the end of the test)
- `enroll_agent(fleet, state_dir, name)` -> AgentProc            (enrolled with a fresh token and running)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slmops_cli.procs import Service, run, wait_until
from slmops_testing.processes import AGENT_ENV, AgentProc, FleetProc, healthy, read_json


@pytest.fixture
def run_fleet(tmp_path: Path) -> Iterator[Callable[..., FleetProc]]:
    started: list[Service] = []

    def start(data_dir: Path, trust_keys: list[Path], *extra: str) -> FleetProc:
        keys = [arg for key in trust_keys for arg in ("--trust-key", str(key))]
        service = Service(
            "fleet",
            ["fleet", "serve", "--data-dir", str(data_dir), "--port", "0", "--broker-port", "0", *keys, *extra],
            tmp_path / "logs" / f"fleet-{len(started)}.log",
        )
        started.append(service)
        info_path = data_dir / "fleet.json"
        info = service.wait_for(lambda: read_json(info_path), timeout=60, what="fleet.json")
        service.wait_for(lambda: healthy(info["url"]), timeout=60, what="a healthy API")
        return FleetProc(service, data_dir, info)

    yield start
    for service in reversed(started):
        service.stop()


@pytest.fixture
def enroll_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[Service] = []

    def enroll(fleet: FleetProc, state_dir: Path, name: str) -> AgentProc:
        token = fleet.cli("token", "create")["token"]
        run(
            [
                "agent",
                "enroll",
                "--fleet",
                fleet.info["url"],
                "--token",
                token,
                "--state-dir",
                str(state_dir),
                "--name",
                name,
            ]
        )
        credentials = json.loads((state_dir / "credentials.json").read_text())
        service = Service(
            name,
            ["agent", "run", "--state-dir", str(state_dir), "--grpc-port", "0"],
            tmp_path / "logs" / f"{name}.log",
            env=AGENT_ENV,
        )
        started.append(service)
        service.wait_for((state_dir / "grpc.addr").exists, timeout=60, what="its gRPC address")
        agent = AgentProc(service, state_dir, credentials["device_id"], credentials)
        wait_until(
            lambda: fleet.devices().get(agent.device_id, {}).get("last_seen"),
            timeout=60,
            what=f"{name} connected to the fleet",
        )
        return agent

    yield enroll
    for service in reversed(started):
        service.stop()
