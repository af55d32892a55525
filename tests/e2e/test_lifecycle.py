"""A device's lifecycle through the real processes (`slmops fleet serve`, `slmops agent run`), on the
embedded broker and on Mosquitto with dynamic security:

- credentials rotated while the agent runs: it saves and confirms the new password, reconnects with
  it, the old one is refused, and a release still reaches it and commits;
- rotated while the agent is offline and the fleet is SIGKILLed before the agent comes back: the
  pending rotation survives, the agent gets it when it reconnects with its old password;
- revoked: the agent is cut off and refused (its saved credentials no longer connect), its record
  stays, revoked in `slmops fleet device list`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slmops_cli.procs import Service, wait_until
from slmops_testing.brokers import MosquittoBroker, start_mosquitto
from slmops_testing.processes import AGENT_ENV, AgentProc, FleetProc
from slmops_testing.simulated_devices import SimDevice


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """The extra `fleet serve` arguments of each broker (a Mosquitto of the test's own)."""
    if request.param == "embedded":
        yield []
        return
    broker: MosquittoBroker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield ["--broker-url", broker.url]
    finally:
        broker.stop()


def saved(agent_dir: Path) -> dict[str, Any]:
    return dict(json.loads((agent_dir / "credentials.json").read_text())["mqtt"])


def connects(creds: dict[str, Any], password: str) -> bool:
    """Whether the broker takes the device's id with `password` (closed at once)."""
    dev = SimDevice.enrolled(creds, password=password)
    try:
        return not dev.connect().is_failure
    finally:
        dev.close()


def rotation_done(fleet: FleetProc, device_id: str) -> bool:
    return fleet.api("GET", f"/v1/devices/{device_id}").json()["rotation_started_at"] is None


def run_agent(tmp_path: Path, agent: AgentProc, name: str) -> Service:
    return Service(
        name,
        ["agent", "run", "--state-dir", str(agent.state_dir), "--grpc-port", "0"],
        tmp_path / "logs" / f"{name}.log",
        env=AGENT_ENV,
    )


def test_rotate_and_revoke_a_running_agent(
    tmp_path: Path,
    broker_args: list[str],
    signing_key: tuple[Path, Path],
    tiny_package_factory: Callable[..., Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]], *broker_args)
    agent = enroll_agent(fleet, tmp_path / "agent", "agent-1")
    old = saved(agent.state_dir)["password"]

    rotation = fleet.cli("device", "rotate-credentials", agent.device_id)
    assert rotation["state"] == "pending" and rotation["rotation_id"].startswith("rot-")
    # the agent saved it, confirmed it, was switched over, and forgot the old one once the new one worked
    wait_until(
        lambda: (m := saved(agent.state_dir))["password"] != old and not m["previous_password"],
        timeout=30,
        what="the agent on its new password",
    )
    wait_until(lambda: rotation_done(fleet, agent.device_id), timeout=30, what="the rotation confirmed")
    new = saved(agent.state_dir)["password"]
    assert (agent.state_dir / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert not connects(agent.credentials, old)

    # the agent keeps working over its new credentials: a release reaches it and commits
    package_id = fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "pkg"))
    fleet.wait_committed(package_id)
    assert saved(agent.state_dir)["password"] == new

    # revoked: cut off, refused, kept on record
    revoked = fleet.cli("device", "revoke", agent.device_id)
    assert revoked["status"] == "revoked" and revoked["revoked_by"] == "owner"
    listed = fleet.devices()[agent.device_id]
    assert listed["status"] == "revoked" and listed["active_package_id"] == package_id
    assert not connects(agent.credentials, new)
    log = agent.service.log
    wait_until(lambda: "refused" in log.read_text(), timeout=15, what="the agent refused by the broker")
    assert agent.service.alive()  # it keeps serving locally


def test_an_offline_agent_gets_its_rotation_after_the_fleet_crashed(
    tmp_path: Path,
    broker_args: list[str],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]], *broker_args)
    agent = enroll_agent(fleet, tmp_path / "agent", "agent-1")
    old = saved(agent.state_dir)["password"]
    agent.service.stop()

    fleet.cli("device", "rotate-credentials", agent.device_id)
    fleet.service.kill()  # before the agent could take it
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]], *broker_args)
    assert not rotation_done(fleet, agent.device_id)
    assert connects(agent.credentials, old)  # until the device confirms, its old password works

    again = run_agent(tmp_path, agent, "agent-1-again")
    try:
        wait_until(
            lambda: (m := saved(agent.state_dir))["password"] != old and not m["previous_password"],
            timeout=60,
            what="the agent on its new password",
        )
        wait_until(lambda: rotation_done(fleet, agent.device_id), timeout=30, what="the rotation confirmed")
        assert not connects(agent.credentials, old)
        seen = fleet.devices()[agent.device_id]["last_seen"]
        wait_until(
            lambda: fleet.devices()[agent.device_id]["last_seen"] != seen, timeout=30, what="the agent reporting"
        )
    finally:
        again.stop()
