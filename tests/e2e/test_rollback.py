"""Fleet rollback and fleet metrics through the real processes (`slmops fleet serve` with the embedded
broker or Mosquitto, two `slmops agent run`): v1 then v2 released, `rollout rollback` returns both devices to v1
from their other slot with no blob sent; `rollout status --watch` follows it to the end showing
what each device received; `/metrics`, parsed by prometheus_client's parser, agrees with the fleet's
own API; a rollout that changed nothing cannot be rolled back."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slmops_cli.procs import ProcessFailed, run, slmops_cmd, wait_until
from slmops_testing.brokers import start_mosquitto
from slmops_testing.processes import AgentProc, FleetProc

pytestmark = pytest.mark.timeout(400)


def _metrics(fleet: FleetProc, token: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels -> value} of every sample /metrics serves."""
    r = httpx.get(fleet.info["url"] + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _one(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    hits = [v for k, v in samples.items() if all((n, x) in k for n, x in labels.items())]
    assert len(hits) == 1, (labels, samples)
    return hits[0]


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_rollback_returns_every_device_from_its_other_slot_and_metrics_agree(
    broker: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_package_factory: Callable[..., Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    if broker == "mosquitto":
        mosquitto = start_mosquitto(tmp_path / "mosquitto")
        request.addfinalizer(mosquitto.stop)
        fleet = run_fleet(tmp_path / "fleet", [signing_key[1]], "--broker-url", mosquitto.url)
    else:
        fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agents = [enroll_agent(fleet, tmp_path / f"agent-{i}", f"agent-{i}") for i in (1, 2)]
    v1_id = fleet.release(tiny_package_factory("1.0.0", out=tmp_path / "pkg-v1"))
    fleet.wait_committed(v1_id)
    first = fleet.cli("rollout", "status", "latest")["id"]
    # The first rollout gave the devices their first package: nothing to go back to, and it says so.
    with pytest.raises(ProcessFailed, match="changed no device that a rollback could return"):
        fleet.cli("rollout", "rollback", first)

    v2_id = fleet.release(tiny_package_factory("1.1.0", search={"top_k": 5}, out=tmp_path / "pkg-v2"))
    fleet.wait_committed(v2_id)
    v2_rollout = fleet.cli("rollout", "status", "latest")["id"]
    before = fleet.cli("stats")["totals"]
    sent_before = fleet.blob_bytes_sent()

    back = fleet.cli("rollout", "rollback", v2_rollout)
    assert back["rollback_of"] == v2_rollout
    assert {d["device_id"] for d in back["devices"]} == {a.device_id for a in agents}
    assert {d["package_id"] for d in back["devices"]} == {v1_id}
    # --watch follows the rollback to its end and draws what each device received
    watch = subprocess.run(
        [*slmops_cmd("fleet", "rollout", "status", back["id"], "--watch", "--interval", "0.5", *fleet.args)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
    )
    assert watch.returncode == 0, watch.stderr
    assert "succeeded" in watch.stdout and "received" in watch.stdout, watch.stdout
    assert watch.stdout.count("nothing to fetch") >= 2, watch.stdout  # v1 was still in the other slot

    fleet.wait_committed(v1_id)
    for agent in agents:
        assert agent.ask("Hello", "--max-new-tokens", "4")["model_version"] == "1.0.0"
    # No blob was fetched: no request, no chunk, not a byte more than before the rollback.
    after = fleet.cli("stats")["totals"]
    assert fleet.blob_bytes_sent() == sent_before
    for key in ("whole_requests", "partial_requests", "broadcast_bytes", "repair_bytes"):
        assert after[key] == before[key], key
    for d in fleet.devices().values():
        assert d["bytes_needed"] == 0 and d["bytes_received"] == 0 and d["active_version"] == "1.0.0"

    # The history keeps both, linked both ways.
    rollouts = {r["id"]: r for r in fleet.cli("rollout", "list")}
    assert rollouts[v2_rollout]["rolled_back_by"] == [back["id"]] and rollouts[v2_rollout]["state"] == "succeeded"
    assert rollouts[back["id"]]["rollback_of"] == v2_rollout and rollouts[back["id"]]["state"] == "succeeded"
    listing = run(["fleet", "rollout", "list", *fleet.args], env={"COLUMNS": "250"})
    assert f"rollback of {v2_rollout}" in listing and f"rolled back by {back['id']}" in listing
    with pytest.raises(ProcessFailed, match=f"already rolled back by {back['id']}"):
        fleet.cli("rollout", "rollback", v2_rollout)

    # /metrics: a token is needed (a read-only one is enough); what it says matches the API.
    assert httpx.get(fleet.info["url"] + "/metrics", timeout=30).status_code == 401
    reader = fleet.cli("admin-token", "create", "scraper", "--role", "read-only")["token"]

    def on_v1(m: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> bool:
        reporting = m.get("slmops_fleet_package_devices_reporting", {})
        requests = m.get("slmops_fleet_package_requests", {})
        return any(("package_id", v1_id) in k and v == 2 for k, v in reporting.items()) and any(
            ("package_id", v1_id) in k and v >= 2 for k, v in requests.items()
        )

    wait_until(lambda: on_v1(_metrics(fleet, reader)), timeout=30, what="telemetry of both devices' requests on v1")
    m = _metrics(fleet, reader)
    status: dict[str, Any] = fleet.cli("status")
    stats = fleet.cli("stats")["totals"]
    assert {dict(k)["state"]: v for k, v in m["slmops_fleet_devices"].items()} == status["devices_by_state"]
    assert _one(m["slmops_fleet_devices_by_package"], package_id=v1_id, version="1.0.0") == 2
    assert {dict(k)["state"]: v for k, v in m["slmops_fleet_rollouts"].items()} == status["rollouts_by_state"]
    for kind in ("broadcast", "repair"):
        assert _one(m["slmops_fleet_blob_bytes_sent_total"], kind=kind) == stats[f"{kind}_bytes"]
        assert _one(m["slmops_fleet_blob_chunks_sent_total"], kind=kind) == stats[f"{kind}_chunks"]
    assert _one(m["slmops_fleet_blob_bytes_sent_total"], kind="broadcast") > 0
    waves = m["slmops_fleet_rollout_wave_devices"]
    assert _one(waves, rollout=back["id"], wave="1", state="COMMITTED") == 2
    assert _one(m["slmops_fleet_rollout_wave_size"], rollout=back["id"], wave="1") == 2
    assert _one(m["slmops_fleet_mqtt_messages_total"], direction="in") > 0
    assert _one(m["slmops_fleet_mqtt_messages_total"], direction="out") > 0
    assert _one(m["slmops_fleet_ingest_queue_depth"], queue="messages") >= 0
    assert m["slmops_fleet_ingest_telemetry_samples_total"][()] >= 2
    # each device's newest telemetry sample, summed per package: the request counters match the API's
    newest = [
        fleet.api("GET", f"/v1/devices/{a.device_id}/telemetry", params={"limit": 1}).json()["samples"][0]
        for a in agents
    ]
    assert _one(m["slmops_fleet_package_requests"], package_id=v1_id) == sum(x["requests_total"] for x in newest)
    assert _one(m["slmops_fleet_package_errors"], package_id=v1_id) == 0
    assert _one(m["slmops_fleet_package_memory_used_bytes"], package_id=v1_id) > 0
    assert _one(m["slmops_fleet_package_tokens_per_second"], package_id=v1_id) >= 0  # 0 while idle
    assert "slmops_fleet_package_ttft_ms" in m
    routes = {dict(k)["route"] for k in m["slmops_fleet_http_request_duration_seconds_count"]}
    assert {"/v1/rollouts/{rollout_id}/rollback", "/v1/devices", "unmatched"} <= routes
