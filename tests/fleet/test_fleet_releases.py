"""Releases at the store level (SQLite and PostgreSQL) with a clock the test controls: each device gets
its variant, adapters go to devices running their base, the on-device quality gates, and the rollout
driver's lease."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from test_fleet_rollout_variants import CPU_FP32, CPU_INT4, CPU_ONLY, CUDA_FP16, WITH_CUDA, GiB

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.rollouts.driver import DRIVER_LEASE, RolloutDriver
from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.variants import Variant
from slmops_fleet.store import Store
from slmops_fleet.store.database import utcnow
from slmops_fleet.store.records import NewPackage, ReportedUpdate
from slmops_protos.package.v1 import manifest_pb2


def _device(store: Store, name: str, inventory: dict[str, Any]) -> str:
    token = store.create_token(60)[0]
    return store.enroll(token, public_key="11" * 32, name=name, inventory=inventory, mqtt_password_hash="h").id


def _manifest(name: str) -> bytes:
    """Stored manifest bytes with two golden prompts that have references (what TESTING can judge)."""
    golden = [manifest_pb2.GoldenPrompt(prompt=f"p{i}", reference=f"r{i}") for i in range(2)]
    manifest = manifest_pb2.Manifest(name=name, golden_prompts=golden).SerializeToString()
    return manifest_pb2.SignedManifest(manifest=manifest).SerializeToString()


def _package(store: Store, v: Variant, version: str = "2.0.0", name: str = "m") -> str:
    store.add_package(
        NewPackage(
            v.package_id,
            name,
            version,
            v.kind,
            v.profile,
            "k",
            _manifest(f"{name} {v.profile} {version}"),
            [],
            provider=v.provider,
            precision=v.precision,
            min_memory_bytes=v.min_memory_bytes,
            base_package_id=v.base_package_id or None,
            cpu_features=v.cpu_features,
        )
    )
    return v.package_id


def _report(
    store: Store, device: str, generation: int, state: str, pid: str, test: dict[str, Any] | None = None
) -> None:
    active = pid if state == "COMMITTED" else ""
    store.apply_reported(ReportedUpdate(device, generation, state, pid, active, "", "b", "", 0, 0, None, test))


def _test(matched: int, judged: int = 2, passed: bool = True) -> dict[str, Any]:
    return {"ran": True, "passed": passed, "prompts": judged, "judged": judged, "matched": matched, "seconds": 0.1}


def test_a_release_gives_each_device_its_variant_and_explains(store: Store) -> None:
    gpu = _device(store, "gpu", WITH_CUDA)
    small = _device(store, "small", {**CPU_ONLY, "memory_bytes": 2 * GiB})
    tiny = _device(store, "tiny", {**CPU_ONLY, "memory_bytes": GiB // 2})
    for v in (CPU_INT4, CPU_FP32, CUDA_FP16):
        _package(store, v)
    rel = store.create_release("m", "2.0.0", [CUDA_FP16.package_id, CPU_INT4.package_id[:10], CPU_FP32.package_id])
    assert rel.ref == "m@2.0.0" and len(rel.packages) == 3
    assert store.get_release("m@2.0.0").id == rel.id and [r.id for r in store.list_releases()] == [rel.id]

    r, desired = store.create_rollout(None, "all", RolloutPlan(waves=["100%"]), release_id=rel.id)
    assert {d.device_id: d.package_id for d in desired} == {gpu: CUDA_FP16.package_id, small: CPU_INT4.package_id}
    assert r.release == "m@2.0.0" and r.counts() == {"NO_VARIANT": 1, "PENDING": 2}
    targets = {t.device_id: t for t in r.devices}
    assert targets[tiny].package_id is None and targets[tiny].wave == -1 and targets[tiny].generation == 0
    assert str(targets[tiny].reason).startswith("no runnable variant: cuda-fp16: ")
    assert [w.size for w in r.waves] == [2]
    selection = targets[small].selection
    assert selection is not None
    assert {c["profile"]: c["ok"] for c in selection["candidates"]} == {
        "cuda-fp16": False,
        "cpu-fp32": False,
        "cpu-int4": True,
    }
    assert "created: 2 devices in 1 waves (100%); 1 devices can run no variant" in r.transitions[0]["reason"]

    for d in desired:
        _report(store, d.device_id, d.generation, "COMMITTED", d.package_id)
    done = store.get_rollout(r.id)
    assert done.state == "succeeded" and done.reason is not None
    assert done.reason.endswith("1 without a runnable variant")

    # A rollout that no target device can run is refused, with the reasons.
    with pytest.raises(Conflict, match="none of the 1 target devices can run a variant"):
        store.create_rollout(None, [tiny], release_id=rel.id)


def test_release_rules(store: Store) -> None:
    for v in (CPU_INT4, CPU_FP32):
        _package(store, v)
    twin = Variant("d4" * 32, "model", "cpu-int4", "cpu", "int4")
    _package(store, twin)
    with pytest.raises(InvalidRequest, match="both for profile cpu-int4"):
        store.create_release("m", "2.0.0", [CPU_INT4.package_id, twin.package_id])
    with pytest.raises(NotFound):
        store.create_release("m", "2.0.0", ["9" * 64])
    with pytest.raises(InvalidRequest, match="NAME"):
        store.create_release("m@x", "2.0.0", [CPU_INT4.package_id])
    store.create_release("m", "2.0.0", [CPU_INT4.package_id, CPU_FP32.package_id])
    with pytest.raises(Conflict, match="exists already"):
        store.create_release("m", "2.0.0", [CPU_INT4.package_id])
    with pytest.raises(NotFound, match="NAME@VERSION"):
        store.get_release("m@9.9.9")

    # Adapter packages: the base must be a stored model package; a release does not mix kinds.
    with pytest.raises(InvalidRequest, match=r"base package .* is unknown"):
        _package(store, Variant("a1" * 32, "adapter", "", base_package_id="e" * 64))
    adapter = _package(store, Variant("a1" * 32, "adapter", "", base_package_id=CPU_INT4.package_id), "1.0.0", "lora")
    with pytest.raises(InvalidRequest, match="not both"):
        store.create_release("mixed", "1", [CPU_INT4.package_id, adapter])
    assert store.get_package(adapter).base_package_id == CPU_INT4.package_id


def test_an_adapter_goes_only_to_devices_that_run_its_base(store: Store) -> None:
    on_base, on_other = _device(store, "on-base", CPU_ONLY), _device(store, "on-other", CPU_ONLY)
    base, other = _package(store, CPU_INT4), _package(store, CPU_FP32)
    _, first = store.create_rollout(base, [on_base])
    _, second = store.create_rollout(other, [on_other])
    for d in first + second:
        _report(store, d.device_id, d.generation, "COMMITTED", d.package_id)
    adapter = _package(store, Variant("a1" * 32, "adapter", "", base_package_id=base), "1.0.0", "lora")
    r, desired = store.create_rollout(adapter, "all")
    assert [(d.device_id, d.package_id) for d in desired] == [(on_base, adapter)]
    target = next(t for t in r.devices if t.device_id == on_other)
    assert target.state == "NO_VARIANT" and target.reason is not None and f"runs {other[:12]}" in target.reason
    # A newer adapter for the same base goes to the device that runs the first adapter.
    _report(store, on_base, desired[0].generation, "COMMITTED", adapter)
    adapter2 = _package(store, Variant("a2" * 32, "adapter", "", base_package_id=base), "1.1.0", "lora")
    _, desired2 = store.create_rollout(adapter2, [on_base])
    assert [(d.device_id, d.package_id) for d in desired2] == [(on_base, adapter2)]


def _two_waves(store: Store, gates: Gates) -> tuple[str, str, str, Any, list[Any]]:
    for i in range(3):
        _device(store, f"d{i}", CPU_ONLY)
    old, new = _package(store, CPU_INT4, "1.0.0"), _package(store, CPU_FP32)
    _, first = store.create_rollout(old, "all")
    for d in first:
        _report(store, d.device_id, d.generation, "COMMITTED", d.package_id)
    r, canary = store.create_rollout(new, "all", RolloutPlan(waves=["1", "100%"], gates=gates))
    return old, new, canary[0].device_id, r, canary


def test_canaries_scoring_below_the_quality_gate_roll_back(store: Store) -> None:
    old, new, canary, r, desired = _two_waves(store, Gates(min_quality_score=0.5))
    # The canary commits (a reference mismatch does not roll back on the device) and reports 0 of 2.
    _report(store, canary, desired[0].generation, "COMMITTED", new, _test(0))
    target = next(t for t in store.get_rollout(r.id).devices if t.device_id == canary)
    assert target.test is not None and target.test["matched"] == 0 and target.test["judged"] == 2
    revert = store.advance_rollout(r.id)
    assert [(d.device_id, d.generation, d.package_id) for d in revert] == [(canary, 3, old)]
    done = store.get_rollout(r.id)
    assert done.state == "rolled_back" and [w.state for w in done.waves] == ["failed", "cancelled"]
    assert done.reason == (
        "wave 1: on-device quality score 0% (0/2 golden prompts matched the reference on 1 devices), "
        "at least 50% required"
    )
    assert sorted(t.state for t in done.devices) == ["CANCELLED", "CANCELLED", "COMMITTED"]


def test_a_report_counts_no_more_golden_prompts_than_its_package_holds(store: Store) -> None:
    _old, new, canary, r, desired = _two_waves(store, Gates(min_quality_score=0.5))
    claim = {"ran": True, "passed": True, "prompts": 10**6, "judged": 10**6, "matched": 10**6, "seconds": 0.1}
    _report(store, canary, desired[0].generation, "COMMITTED", new, claim)
    target = next(t for t in store.get_rollout(r.id).devices if t.device_id == canary)
    assert target.test == {**claim, "prompts": 2, "judged": 2, "matched": 2}


def test_canaries_that_score_well_pass_and_unhealthy_ones_fail(store: Store) -> None:
    _old, new, canary, r, desired = _two_waves(store, Gates(min_quality_score=0.5, min_health_pass_rate=1.0))
    _report(store, canary, desired[0].generation, "COMMITTED", new, _test(1))
    nxt = store.advance_rollout(r.id)
    assert len(nxt) == 2 and store.get_rollout(r.id).waves[0].reason == "gates passed"
    # A device whose TESTING failed (it rolled back on its own) fails the health gate.
    failing, passing = nxt
    _report(store, failing.device_id, failing.generation, "ROLLED_BACK", new, _test(0, passed=False))
    store.advance_rollout(r.id)
    done = store.get_rollout(r.id)
    assert done.state == "rolled_back", done.reason
    assert done.reason is not None and "health-check pass rate 50% (1/2 devices passed TESTING)" in done.reason
    assert passing.device_id  # the other device of wave 2 was still updating: ABORTED and reverted
    assert {t.device_id: t.state for t in done.devices}[passing.device_id] == "ABORTED"


def test_one_rollout_driver_at_a_time(store: Store) -> None:
    """Two fleet processes share one database: two stores (two engines, two connection pools)."""
    other = Store(store.url)
    try:
        t0 = utcnow()
        assert store.acquire_lease(DRIVER_LEASE, "fleet-a", 10, now=t0)
        assert not other.acquire_lease(DRIVER_LEASE, "fleet-b", 10, now=t0 + timedelta(seconds=1))
        assert store.acquire_lease(DRIVER_LEASE, "fleet-a", 10, now=t0 + timedelta(seconds=5))  # renewed
        assert not other.acquire_lease(DRIVER_LEASE, "fleet-b", 10, now=t0 + timedelta(seconds=14))
        assert other.acquire_lease(DRIVER_LEASE, "fleet-b", 10, now=t0 + timedelta(seconds=16))  # a expired
        assert not store.acquire_lease(DRIVER_LEASE, "fleet-a", 10, now=t0 + timedelta(seconds=17))
        holder = store.lease_holder(DRIVER_LEASE)
        assert holder is not None and holder[0] == "fleet-b"
        other.release_lease(DRIVER_LEASE, "fleet-b")
        assert store.acquire_lease(DRIVER_LEASE, "fleet-a", 10, now=t0 + timedelta(seconds=18))

        # The drivers: only the lease holder advances (and publishes) rollouts.
        for i in range(2):
            _device(store, f"d{i}", CPU_ONLY)
        old, new = _package(store, CPU_INT4, "1.0.0"), _package(store, CPU_FP32)
        _, first = store.create_rollout(old, "all")
        for d in first:
            _report(store, d.device_id, d.generation, "COMMITTED", d.package_id)
        store.release_lease(DRIVER_LEASE, "fleet-a")
        r, _canary = store.create_rollout(new, "all", RolloutPlan(waves=["1", "100%"]))
        _report(store, _canary[0].device_id, _canary[0].generation, "COMMITTED", new)
        published: dict[str, list[Any]] = {"a": [], "b": []}
        a = RolloutDriver(store, published["a"].extend, holder="fleet-a", lease_ttl_s=30)
        b = RolloutDriver(other, published["b"].extend, holder="fleet-b", lease_ttl_s=30)
        assert a.step() == 1 and a.leading  # wave 2's one device
        assert b.step() == 0 and not b.leading
        assert len(published["a"]) == 1 and published["b"] == []
        assert store.get_rollout(r.id).waves[1].state == "running"
    finally:
        other.close()


def test_concurrent_lease_contenders_elect_one(store: Store) -> None:
    import threading

    stores = [Store(store.url) for _ in range(4)]
    wins: list[str] = []
    barrier = threading.Barrier(len(stores))

    def contend(i: int) -> None:
        barrier.wait()
        if stores[i].acquire_lease("race", f"h{i}", 30):
            wins.append(f"h{i}")

    try:
        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for s in stores:
            s.close()
    assert len(wins) == 1, wins
    holder = store.lease_holder("race")
    assert holder is not None and holder[0] == wins[0]


def test_the_api_refuses_bad_release_and_rollout_requests(admin: Any) -> None:
    assert admin.post("/v1/rollouts", json={"target": "all"}).status_code == 400
    both = admin.post("/v1/rollouts", json={"package_id": "a" * 64, "release": "m@1", "target": "all"})
    assert both.status_code == 400 and "exactly one" in both.json()["detail"]
    assert admin.post("/v1/rollouts", json={"release": "m@1", "target": "all"}).status_code == 404
    missing = admin.post("/v1/releases", json={"name": "m", "version": "1", "package_ids": ["f" * 64]})
    assert missing.status_code == 404 and "unknown package" in missing.json()["detail"]
    assert admin.post("/v1/releases", json={"name": "m", "version": "1", "package_ids": []}).status_code == 422
    assert admin.get("/v1/releases/m@1").status_code == 404
    assert admin.get("/v1/releases").json() == {"releases": []}
    assert admin.get("/v1/rollouts/ro-nope/explain").status_code == 404
    gates = {"min_quality_score": 1.5}
    assert admin.post("/v1/rollouts", json={"package_id": "a" * 64, "gates": gates}).status_code == 422


def test_a_dead_holder_on_this_host_is_taken_over_at_once(store: Store) -> None:
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}:{int(gone.stdout)}:0000"
    assert store.acquire_lease(DRIVER_LEASE, dead, 600)
    driver = RolloutDriver(store, lambda _r: None, holder="fleet-new", lease_ttl_s=30)
    assert driver.step() == 0 and driver.leading
    holder = store.lease_holder(DRIVER_LEASE)
    assert holder is not None and holder[0] == "fleet-new"
    # A live holder elsewhere is waited for.
    assert store.acquire_lease(DRIVER_LEASE, "other-host:1:abcd", 600, now=utcnow() + timedelta(seconds=31))
    assert RolloutDriver(store, lambda _r: None, holder="fleet-3").step() == 0
    holder = store.lease_holder(DRIVER_LEASE)
    assert holder is not None and holder[0] == "other-host:1:abcd"


def test_cpu_features_survive_the_store(store: Store) -> None:
    vnni = Variant("v4" * 32, "model", "cpu-int4-vnni", "cpu", "int4", GiB, cpu_features=("avx512_vnni",))
    _package(store, vnni)
    assert store.get_package(vnni.package_id).variant().cpu_features == ("avx512_vnni",)
    assert store.get_package(vnni.package_id).to_json()["cpu_features"] == ["avx512_vnni"]
