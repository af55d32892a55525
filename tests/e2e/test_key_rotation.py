"""Rollback protection and key rotation through the real processes (`slmops fleet serve` with its
embedded broker, two `slmops agent run`, the builder's and the fleet's CLIs):

- a rollout below the devices' committed security version is refused by each device on the manifest,
  reported to the fleet (the rollout's gates see the failures), and the devices keep serving;
- an operator's rollback to an older release of the same security version works;
- a key statement (new key trusted, old one retired) reaches the agent that was offline when it was
  applied, once it runs again; both then install a package signed by the new key, the fleet refuses
  one signed by the retired key, and so does the agent (a side-load on its own state folder)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops_builder.keys import generate_key
from slmops_cli.procs import ProcessFailed, Service, run, wait_until
from slmops_protos.manifests import DOWNGRADE_REFUSED, SIGNED_MANIFEST_FILE, key_id
from slmops_testing.packages import repackage
from slmops_testing.processes import AGENT_ENV, AgentProc, FleetProc, read_json

pytestmark = pytest.mark.timeout(400)


def _finished(fleet: FleetProc, rollout_id: str) -> dict[str, Any]:
    return dict(
        wait_until(
            lambda: (r := fleet.api("GET", f"/v1/rollouts/{rollout_id}").json())["state"] != "in_progress" and r,
            timeout=120,
            what=f"rollout {rollout_id} to finish",
        )
    )


def _ring(agent: AgentProc) -> dict[str, Any]:
    return read_json(agent.state_dir / "signing_keys.json") or {"sequence": 0}


def test_downgrade_refused_and_a_key_rotation_reaches_an_offline_agent(
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agents = [enroll_agent(fleet, tmp_path / f"agent-{n}", f"agent-{n}") for n in ("a", "b")]
    base = tiny_package_factory("1.0.0", out=tmp_path / "pkg-base")
    old_key = signing_key[0]
    v1 = repackage(base, tmp_path / "v1", old_key, version="1.0.0", security_version=1)
    v11 = repackage(base, tmp_path / "v11", old_key, version="1.1.0", security_version=1)
    v2 = repackage(base, tmp_path / "v2", old_key, version="2.0.0", security_version=2)
    assert fleet.cli("package", "upload", str(v2))["security_version"] == 2

    v1_id = fleet.release(v1)
    fleet.wait_committed(v1_id)
    v11_id = fleet.release(v11)
    fleet.wait_committed(v11_id)
    # the operator rolls back to 1.0.0: the same security version, so the devices take it
    fleet.cli("rollout", "create", "--package", v1_id, "--target", "all")
    fleet.wait_committed(v1_id)
    v2_id = fleet.release(v2)
    fleet.wait_committed(v2_id)

    # a downgrade below security version 2: refused on each device, reported, v2 keeps serving
    rollout = fleet.cli(
        "rollout", "create", "--package", v11_id, "--target", "all", "--waves", "1,100%", "--max-failures", "0"
    )
    done = _finished(fleet, rollout["id"])
    # the canary's refusal fails the gate: the rollout stops there, the other device never gets it
    assert done["state"] == "rolled_back", done["transitions"][-3:]
    assert "1 devices failed (1 rolled back" in done["reason"], done["reason"]
    canary = next(d for d in done["devices"] if d["wave"] == 0)
    other = next(d for d in done["devices"] if d["wave"] == 1)
    assert canary["state"] == "ROLLED_BACK" and DOWNGRADE_REFUSED in canary["reason"], canary
    assert other["state"] == "CANCELLED" and other["generation"] == 0
    fleet.wait_committed(v2_id)
    for agent in agents:
        assert agent.ask("Hi", "--max-new-tokens", "2")["package_id"] == v2_id
        assert (DOWNGRADE_REFUSED in agent.service.log.read_text()) == (agent.device_id == canary["device_id"])

    # rotation while agent b is offline
    a, b = agents
    b.service.stop()
    new_key = tmp_path / "keys" / "new.key"
    generate_key(new_key)
    statement = tmp_path / "rotate-1.bin"
    run(
        [
            "builder", "key-statement", "--sign-with", str(old_key), "--add", str(new_key) + ".pub",
            "--retire", str(signing_key[1]), "--sequence", "1", "--note", "rotation", "-o", str(statement),
        ]
    )  # fmt: skip
    applied = fleet.cli("keys", "apply", str(statement))
    new_id = applied["trusted"][0]["key_id"]
    assert applied["sequence"] == 1 and applied["retired"][0]["key_id"] != new_id
    assert fleet.cli("keys", "list")["sequence"] == 1
    wait_until(lambda: _ring(a)["sequence"] == 1, timeout=30, what="agent a applied the statement")
    assert _ring(b)["sequence"] == 0  # b was offline

    # the same statement again, or one signed by the retired key, is refused by the fleet
    replay = fleet.api("POST", "/v1/signing-keys/statements", content=statement.read_bytes())
    assert replay.status_code == 409 and "replay" in replay.json()["detail"]
    by_retired = tmp_path / "rotate-2.bin"
    run(
        [
            "builder", "key-statement", "--sign-with", str(old_key), "--add", str(old_key) + ".pub",
            "--sequence", "2", "-o", str(by_retired),
        ]
    )  # fmt: skip
    r = fleet.api("POST", "/v1/signing-keys/statements", content=by_retired.read_bytes())
    assert r.status_code == 400 and "retired key" in r.json()["detail"], r.text

    # b runs again: it gets the retained statement on reconnect
    b_service = Service(
        "agent-b2",
        ["agent", "run", "--state-dir", str(b.state_dir), "--grpc-port", "0"],
        b.service.log.with_name("agent-b2.log"),
        env=AGENT_ENV,
    )
    try:
        wait_until(lambda: _ring(b)["sequence"] == 1, timeout=60, what="agent b applied the statement on reconnect")
        ring_b = json.loads((b.state_dir / "signing_keys.json").read_text())
        assert len(ring_b["trusted"]) == 1 and key_id_of(ring_b["trusted"][0]) == new_id

        # a package signed by the retired key: refused by the fleet
        v3_old = repackage(base, tmp_path / "v3-old", old_key, version="3.0.0", security_version=2)
        r = fleet.api("POST", "/v1/packages", content=(v3_old / SIGNED_MANIFEST_FILE).read_bytes())
        assert r.status_code == 400 and "retired key" in r.json()["detail"], r.text
        # one signed by the new key: both devices install it
        v3 = repackage(base, tmp_path / "v3", new_key, version="3.0.0", security_version=2)
        v3_id = fleet.release(v3)
        fleet.wait_committed(v3_id)
    finally:
        b_service.stop()

    # and the device itself refuses the retired key's package (side-loaded into b's state folder)
    with pytest.raises(ProcessFailed, match="ROLLED_BACK: manifest signed by a retired key"):
        run(["agent", "install", str(v3_old), "--state-dir", str(b.state_dir)])


def key_id_of(hex_key: str) -> str:
    from slmops_protos.manifests import public_key_from_hex

    return key_id(public_key_from_hex(hex_key))
