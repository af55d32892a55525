"""The rollout rules at the store level: the wave machine stepped with a clock the test controls
(soak, timeouts, gates, revert, pause/resume/cancel, an old database migrated) and selected rollouts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from slmops_fleet.errors import Conflict, InvalidRequest
from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.store import Store
from slmops_fleet.store.database import utcnow
from slmops_fleet.store.records import NewPackage, ReportedUpdate, TelemetryRecord

# --- the store's wave machine, stepped by hand ----------------------------------------------------------


def _setup(store: Store, n: int) -> tuple[list[str], str, str]:
    ids = []
    for i in range(n):
        token = store.create_token(60)[0]
        ids.append(store.enroll(token, public_key="11" * 32, name=f"d{i}", inventory={}, mqtt_password_hash="h").id)
    old, new = "a" * 64, "b" * 64
    for pid, version in ((old, "1.0.0"), (new, "2.0.0")):
        store.add_package(NewPackage(pid, "m", version, "model", "cpu-int4", "k", b"m" + version.encode(), []))
    return ids, old, new


def _report(store: Store, device: str, generation: int, state: str, pid: str, reason: str = "") -> None:
    store.apply_reported(
        ReportedUpdate(device, generation, state, pid, pid if state == "COMMITTED" else "", "", "b", reason, 0, 0)
    )


def _finish(store: Store, desired: list[Any], state: str = "COMMITTED") -> None:
    for d in desired:
        _report(store, d.device_id, d.generation, state, d.package_id)


def test_waves_soak_and_timeout_with_a_controlled_clock(store: Store) -> None:
    _ids, old, new = _setup(store, 5)
    r0, first = store.create_rollout(old, "all")
    _finish(store, first)
    assert store.get_rollout(r0.id).state == "succeeded"

    plan = RolloutPlan(waves=["1", "3", "100%"], soak_s=60, wave_timeout_s=300)
    r, canary = store.create_rollout(new, "all", plan)
    assert [w.size for w in r.waves] == [1, 2, 2] and len(canary) == 1
    assert canary[0].generation == 2 and canary[0].signed_manifest == b"m2.0.0"
    assert r.counts() == {"PENDING": 1, "WAITING": 4}
    t0 = utcnow()
    assert store.advance_rollout(r.id, t0) == []  # the canary has not finished
    _finish(store, canary)
    rec = store.get_rollout(r.id)
    assert rec.waves[0].state == "soaking" and rec.state == "in_progress"
    assert store.advance_rollout(r.id, t0 + timedelta(seconds=30)) == []  # still soaking
    second = store.advance_rollout(r.id, t0 + timedelta(seconds=61))
    assert len(second) == 2 and {d.generation for d in second} == {2}
    rec = store.get_rollout(r.id)
    assert [w.state for w in rec.waves] == ["passed", "running", "pending"] and rec.current_wave == 1
    wave_of = {d.device_id: d.wave for d in rec.devices}
    assert {wave_of[d.device_id] for d in second} == {1} and wave_of[canary[0].device_id] == 0
    # One device of wave 2 commits, the other never answers: it times out, and without gates the rollout goes on.
    _report(store, second[0].device_id, 2, "COMMITTED", new)
    assert store.advance_rollout(r.id, t0 + timedelta(seconds=200)) == []
    started = store.get_rollout(r.id).waves[1].started_at
    assert started is not None
    assert store.advance_rollout(r.id, started + timedelta(seconds=301)) == []  # timed out: the soak begins
    rec = store.get_rollout(r.id)
    assert {d.device_id: d.state for d in rec.devices}[second[1].device_id] == "TIMED_OUT"
    assert rec.waves[1].state == "soaking"
    third = store.advance_rollout(r.id, started + timedelta(seconds=301 + 61))
    rec = store.get_rollout(r.id)
    assert len(third) == 2 and rec.waves[2].state == "running"
    _finish(store, third)
    store.advance_rollout(r.id, utcnow() + timedelta(seconds=120))
    rec = store.get_rollout(r.id)
    assert rec.state == "failed" and "1 timed out" in (rec.reason or "")  # no gates: a failure fails it at the end
    events = [t.get("event") for t in rec.transitions]
    assert events.count("wave_started") == 3 and events.count("wave_passed") == 3
    assert all(t["at"] and t["reason"] for t in rec.transitions)


def test_a_failing_gate_reverts_every_touched_device(store: Store) -> None:
    ids, old, new = _setup(store, 4)
    _, first = store.create_rollout(old, "all")
    _finish(store, first)
    plan = RolloutPlan(waves=["2", "100%"], gates=Gates(max_failures=0))
    r, canaries = store.create_rollout(new, "all", plan)
    _report(store, canaries[0].device_id, 2, "COMMITTED", new)
    _report(store, canaries[1].device_id, 2, "ROLLED_BACK", new, reason="golden prompt 2 differs")
    reverted = store.advance_rollout(r.id)
    assert sorted(d.device_id for d in reverted) == sorted(c.device_id for c in canaries)
    assert {(d.package_id, d.generation, d.rollout_id) for d in reverted} == {(old, 3, r.id)}
    assert {d.signed_manifest for d in reverted} == {b"m1.0.0"}
    rec = store.get_rollout(r.id)
    assert rec.state == "rolled_back" and "1 devices failed" in (rec.reason or "")
    assert [w.state for w in rec.waves] == ["failed", "cancelled"]
    states = {d.device_id: d.state for d in rec.devices}
    assert sorted(states.values()) == ["CANCELLED", "CANCELLED", "COMMITTED", "ROLLED_BACK"]
    assert rec.transitions[-1]["state"] == "rolled_back" and "previous package back" in rec.transitions[-1]["reason"]
    latest = {d.device_id: (d.package_id, d.generation) for d in store.latest_desired_states()}
    for c in canaries:
        assert latest[c.device_id] == (old, 3)
    for d in ids:
        if d not in {c.device_id for c in canaries}:
            assert latest[d] == (old, 1)  # never touched
    assert store.advance_rollout(r.id) == []  # nothing more happens
    # The reverted devices' reports for generation 3 do not reopen the rollout.
    _finish(store, reverted)
    assert store.get_rollout(r.id).state == "rolled_back"


def test_telemetry_gates_judge_after_the_soak(store: Store) -> None:
    _ids, old, new = _setup(store, 2)
    _, first = store.create_rollout(old, "all")
    _finish(store, first)
    plan = RolloutPlan(waves=["1", "100%"], gates=Gates(max_error_rate=0.2))
    r, canary = store.create_rollout(new, "all", plan)
    dev = canary[0].device_id
    now_ms = int(utcnow().timestamp() * 1000)
    samples = [
        TelemetryRecord(
            dev, seq=i, timestamp_ms=now_ms + i, requests_total=10 * i, errors_total=4 * i, active_package_id=new
        )
        for i in range(1, 4)
    ]
    samples.append(  # errors on the old package do not count against the new one
        TelemetryRecord(dev, seq=0, timestamp_ms=now_ms, requests_total=0, errors_total=0, active_package_id=old)
    )
    store.insert_telemetry(samples)
    _finish(store, canary)
    reverted = store.advance_rollout(r.id)
    rec = store.get_rollout(r.id)
    assert rec.state == "rolled_back" and "error rate 40.0% (8/20 requests)" in (rec.reason or "")
    assert [d.package_id for d in reverted] == [old]


def test_a_paused_wave_completes_but_its_clocks_stop(store: Store) -> None:
    _ids, _old, new = _setup(store, 3)
    r, canary = store.create_rollout(new, "all", RolloutPlan(waves=["1", "100%"], soak_s=60, wave_timeout_s=300))
    started = store.get_rollout(r.id).waves[0].started_at
    assert started is not None
    store.control_rollout(r.id, "pause", "hold")
    # Paused far past the wave timeout: nobody times out, nothing starts.
    assert store.advance_rollout(r.id, started + timedelta(seconds=900)) == []
    rec = store.get_rollout(r.id)
    assert rec.waves[0].state == "running" and rec.counts() == {"PENDING": 1, "WAITING": 2}
    # The canary answers while the rollout is paused: its wave completes and waits to soak.
    _finish(store, canary)
    rec = store.get_rollout(r.id)
    assert rec.state == "paused" and [w.state for w in rec.waves] == ["soaking", "pending"]
    assert store.advance_rollout(r.id, utcnow() + timedelta(seconds=900)) == []  # a paused soak never ends
    assert store.control_rollout(r.id, "resume").state == "in_progress"
    completed = store.get_rollout(r.id).waves[0].completed_at
    assert completed is not None
    assert store.advance_rollout(r.id, completed + timedelta(seconds=30)) == []
    assert len(store.advance_rollout(r.id, utcnow() + timedelta(seconds=61))) == 2


def test_pause_resume_cancel_rules(store: Store) -> None:
    _ids, old, new = _setup(store, 3)
    r, canary = store.create_rollout(new, "all", RolloutPlan(waves=["1", "100%"]))
    with pytest.raises(Conflict, match="only a rollout that is paused"):
        store.control_rollout(r.id, "resume")
    assert store.control_rollout(r.id, "pause", "look at the canary").state == "paused"
    _finish(store, canary)
    assert store.advance_rollout(r.id) == []  # paused: the next wave waits
    assert store.active_rollout_ids() == []
    assert store.control_rollout(r.id, "resume").state == "in_progress"
    assert len(store.advance_rollout(r.id)) == 2
    rec = store.control_rollout(r.id, "cancel")
    assert rec.state == "cancelled" and rec.transitions[-1]["reason"] == "cancel by the operator"
    with pytest.raises(Conflict, match="is cancelled"):
        store.control_rollout(r.id, "pause")
    with pytest.raises(InvalidRequest):
        store.control_rollout(r.id, "explode")
    with pytest.raises(InvalidRequest, match="must not shrink"):
        store.create_rollout(new, "all", RolloutPlan(waves=["2", "1", "100%"]))
    # Cancel before a wave: its devices never get a desired state.
    r2, c2 = store.create_rollout(old, "all", RolloutPlan(waves=["1", "100%"]))
    store.control_rollout(r2.id, "cancel")
    _finish(store, c2)
    assert store.advance_rollout(r2.id) == []
    rec = store.get_rollout(r2.id)
    assert sorted(d.state for d in rec.devices) == ["CANCELLED", "CANCELLED", "COMMITTED"]
    assert rec.state == "cancelled"


def test_a_rollout_made_before_waves_existed_migrates_and_finishes(tmp_path: Path) -> None:
    """A database at revision 0001 with an in-progress rollout: 0002 gives it one running wave."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from slmops_fleet.store.database import MIGRATIONS_DIR

    store = Store(f"sqlite:///{tmp_path}/old.db")
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
        now = utcnow().isoformat()
        pid = "c" * 64
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO devices (id, name, public_key, inventory, mqtt_password_hash, created_at, "
                    "reported_generation, bytes_needed, bytes_received, telemetry_dropped_total) "
                    "VALUES ('dev-old', '', :k, '{}', 'h', :now, 0, 0, 0, 0)"
                ),
                {"k": "11" * 32, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO packages (id, name, version, profile, kind, signed_manifest, signed_by, size_bytes, "
                    "created_at) VALUES (:p, 'm', '1.0.0', '', 'model', x'00', '', 0, :now)"
                ),
                {"p": pid, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO rollouts (id, package_id, target, state, created_at, updated_at, transitions) "
                    "VALUES ('ro-old', :p, '\"all\"', 'in_progress', :now, :now, '[]')"
                ),
                {"p": pid, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO rollout_devices (rollout_id, device_id, generation, state, updated_at) "
                    "VALUES ('ro-old', 'dev-old', 1, 'PENDING', :now)"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO desired_states (device_id, generation, package_id, rollout_id, created_at) "
                    "VALUES ('dev-old', 1, :p, 'ro-old', :now)"
                ),
                {"p": pid, "now": now},
            )
        store.migrate()
        assert store.schema_revision() == "0008"
        old = store.get_rollout("ro-old")
        assert [(w.size, w.state) for w in old.waves] == [(1, "running")] and old.plan["waves"] == ["100%"]
        assert store.active_rollout_ids() == ["ro-old"]
        _report(store, "dev-old", 1, "COMMITTED", pid)
        assert store.get_rollout("ro-old").state == "succeeded"
    finally:
        store.close()


def test_tags_and_selected_rollouts(store: Store) -> None:
    ids, old, _new = _setup(store, 3)
    d = store.update_device_tags(ids[0], add=["canary", "lab", "canary"])
    assert d.tags == ["canary", "lab"]
    assert store.update_device_tags(ids[0], add=["x"], remove=["lab", "x"]).tags == ["canary"]
    assert store.get_device(ids[0]).tags == ["canary"] and store.list_devices()[1].tags == []
    with pytest.raises(InvalidRequest, match="must be 1-64"):
        store.update_device_tags(ids[1], add=["bad tag"])
    with pytest.raises(InvalidRequest, match="at most 32"):
        store.update_device_tags(ids[1], add=[f"t{i}" for i in range(33)])
    assert store.get_device(ids[1]).tags == []
    r, desired = store.create_rollout(old, "all", RolloutPlan(waves=["100%"], selector="tag=canary"))
    assert [x.device_id for x in desired] == [ids[0]] and [x.device_id for x in r.devices] == [ids[0]]
    assert r.plan["selector"] == "tag=canary"
    with pytest.raises(Conflict, match="matches none of the 2 target devices"):
        store.create_rollout(old, ids[1:], RolloutPlan(waves=["100%"], selector="tag=canary"))
    assert len(store.list_rollouts()) == 1
