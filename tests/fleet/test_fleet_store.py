"""The store on SQLite and on PostgreSQL: migrations, enrollment races, rollouts, reports, telemetry."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from slmops_fleet.errors import Conflict, EnrollmentRefused, InvalidRequest, NotFound
from slmops_fleet.rollouts import rules
from slmops_fleet.store import Store
from slmops_fleet.store.devices import hash_secret
from slmops_fleet.store.records import BlobStatsDelta, NewPackage, ReportedUpdate, TelemetryRecord

PUB = "11" * 32


def _enroll(store: Store, token: str | None = None, name: str = "d") -> str:
    token = token or store.create_token(60)[0]
    return store.enroll(token, public_key=PUB, name=name, inventory={"arch": "x86_64"}, mqtt_password_hash="h").id


def _package(store: Store, pid: str = "a" * 64, files: list[tuple[str, str, int]] | None = None) -> str:
    files = files or [("model.onnx", "b" * 64, 100), ("genai_config.json", "c" * 64, 10)]
    store.add_package(NewPackage(pid, "m", "1.0.0", "model", "cpu-int4", "key", b"signed", files))
    return pid


def test_migrations_are_idempotent_and_at_head(store: Store) -> None:
    store.migrate()  # a second start migrates nothing and breaks nothing
    assert store.schema_revision() == "0008"
    assert store.ping()


def test_enrollment_token_is_single_use_and_expires(store: Store) -> None:
    token, expires = store.create_token(60)
    assert expires.tzinfo is not None
    device = store.enroll(token, public_key=PUB, name="n1", inventory={"cpu_count": 2}, mqtt_password_hash="h1")
    assert device.id.startswith("dev-") and device.name == "n1" and device.inventory == {"cpu_count": 2}
    with pytest.raises(EnrollmentRefused, match="already used"):
        _enroll(store, token)
    with pytest.raises(EnrollmentRefused, match="unknown"):
        _enroll(store, "no-such-token")
    short, _ = store.create_token(0.2)
    time.sleep(0.3)
    with pytest.raises(EnrollmentRefused, match="expired"):
        _enroll(store, short)
    assert [d.id for d in store.list_devices()] == [device.id]
    assert store.device_password_hashes() == {device.id: "h1"}


def test_a_failed_provisioning_keeps_nothing(store: Store) -> None:
    token, _ = store.create_token(60)

    def fail(_device_id: str) -> None:
        raise RuntimeError("broker down")

    with pytest.raises(RuntimeError):
        store.enroll(token, public_key=PUB, name="", inventory={}, mqtt_password_hash="h", before_commit=fail)
    assert store.list_devices() == []
    assert _enroll(store, token)  # the token was not used up


def test_concurrent_enrollments_with_one_token_create_one_device(store: Store) -> None:
    token, _ = store.create_token(60)
    results: list[str] = []
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        barrier.wait()
        try:
            results.append(_enroll(store, token))
        except EnrollmentRefused as exc:
            errors.append(exc.reason)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 1, (results, errors)
    assert errors == ["enrollment token is already used"] * 5
    assert [d.id for d in store.list_devices()] == results


def test_packages_blobs_and_prefix_lookup(store: Store) -> None:
    pid = _package(store)
    assert store.add_package(NewPackage(pid, "m", "1.0.0", "model", "", "", b"x", [("a", "b" * 64, 1)])) is False
    pkg = store.get_package(pid[:10])
    assert pkg.id == pid and pkg.file_count == 2 and pkg.size_bytes == 110
    assert pkg.missing_blobs == sorted(["b" * 64, "c" * 64]) and not pkg.complete
    assert store.blob_expected_size("b" * 64) == 100
    assert store.blob_expected_size("d" * 64) is None
    assert store.add_blob("b" * 64, 100, "blobs/" + "b" * 64)
    assert not store.add_blob("b" * 64, 100, "blobs/" + "b" * 64)
    assert store.get_package(pid).missing_blobs == ["c" * 64]
    with pytest.raises(NotFound):
        store.get_package("f" * 12)
    _package(store, "a" * 63 + "b")
    with pytest.raises(InvalidRequest, match="ambiguous"):
        store.get_package("a" * 20)


def test_rollouts_number_generations_and_settle(store: Store) -> None:
    with pytest.raises(Conflict):
        store.create_rollout(_package(store), "all")  # no devices yet
    d1, d2 = _enroll(store, name="one"), _enroll(store, name="two")
    pid = "a" * 64
    with pytest.raises(InvalidRequest, match="unknown device"):
        store.create_rollout(pid, [d1, "dev-nope"])
    with pytest.raises(NotFound):
        store.create_rollout("e" * 64, "all")

    r1, desired = store.create_rollout(pid, "all")
    assert sorted((d.device_id, d.generation) for d in desired) == sorted([(d1, 1), (d2, 1)])
    assert desired[0].signed_manifest == b"signed"
    assert r1.state == "in_progress" and r1.counts() == {"PENDING": 2}

    # Device 1 commits, device 2 is moved on by a second rollout before it finishes.
    base = {"target_package_id": pid, "active_slot": "b", "reason": "", "bytes_needed": 110, "bytes_received": 110}
    assert store.apply_reported(ReportedUpdate(d1, 1, "FETCHING", active_package_id="", active_version="", **base))
    assert store.get_rollout(r1.id).counts() == {"FETCHING": 1, "PENDING": 1}
    store.apply_reported(ReportedUpdate(d1, 1, "COMMITTED", active_package_id=pid, active_version="1.0.0", **base))
    r2, desired2 = store.create_rollout(pid, [d2])
    assert [(d.device_id, d.generation) for d in desired2] == [(d2, 2)]
    settled = store.get_rollout(r1.id)
    assert settled.state == "succeeded"
    assert {d.device_id: d.state for d in settled.devices} == {d1: "COMMITTED", d2: "SUPERSEDED"}
    assert settled.transitions[-1]["state"] == "succeeded"

    # A report about an older generation does not touch the newer rollout.
    store.apply_reported(ReportedUpdate(d2, 1, "ROLLED_BACK", active_package_id="", active_version="", **base))
    assert store.get_rollout(r2.id).state == "in_progress"
    store.apply_reported(
        ReportedUpdate(d2, 2, "ROLLED_BACK", active_package_id="", active_version="", **{**base, "reason": "bad"})
    )
    failed = store.get_rollout(r2.id)
    assert failed.state == "failed" and failed.devices[0].reason == "bad"

    dev1 = store.get_device(d1)
    assert dev1.state == "COMMITTED" and dev1.active_version == "1.0.0" and dev1.last_seen is not None
    assert dev1.desired_generation == 1 and store.get_device(d2).desired_generation == 2
    latest = {d.device_id: d.generation for d in store.latest_desired_states()}
    assert latest == {d1: 1, d2: 2}
    assert store.device_may_fetch(d1, "b" * 64) and not store.device_may_fetch(d1, "f" * 64)
    assert not store.apply_reported(
        ReportedUpdate("dev-unknown", 1, "IDLE", active_package_id="", active_version="", **base)
    )


def test_reports_applied_as_a_batch_settle_the_rollout_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingest worker applies the reports queued together in one transaction: in order, unknown
    devices flagged, and the rollout advanced once after them (not once per report)."""
    devices = [_enroll(store, name=f"d{i}") for i in range(3)]
    pid = _package(store)
    rollout, _ = store.create_rollout(pid, "all")
    base = {"target_package_id": pid, "active_slot": "b", "reason": "", "bytes_needed": 110, "bytes_received": 110}
    fetching = [ReportedUpdate(d, 1, "FETCHING", active_package_id="", active_version="", **base) for d in devices]
    done = [ReportedUpdate(d, 1, "COMMITTED", active_package_id=pid, active_version="1.0.0", **base) for d in devices]
    unknown = ReportedUpdate("dev-unknown", 1, "IDLE", active_package_id="", active_version="", **base)
    advanced: list[str] = []
    advance = rules.advance

    def counted(rollout: Any, storage: Any, now: Any, **kw: Any) -> Any:
        advanced.append(rollout.id)
        return advance(rollout, storage, now, **kw)

    monkeypatch.setattr(rules, "advance", counted)
    known = store.apply_reported_many([*fetching, unknown, *done])  # each device: FETCHING, then COMMITTED
    assert known == [True, True, True, False, True, True, True]
    assert advanced == [rollout.id]
    settled = store.get_rollout(rollout.id)
    assert settled.state == "succeeded" and settled.counts() == {"COMMITTED": 3}
    assert {store.get_device(d).state for d in devices} == {"COMMITTED"}


def test_concurrent_rollouts_keep_generations_strictly_increasing(store: Store) -> None:
    device = _enroll(store)
    pid = _package(store)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            store.create_rollout(pid, [device])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rollouts = store.list_rollouts()
    assert sorted(r.devices[0].generation for r in rollouts) == [1, 2, 3, 4]
    assert store.get_device(device).desired_generation == 4
    assert sum(r.state == "in_progress" for r in rollouts) == 1  # the newest; the others are superseded


def test_telemetry_is_batched_and_deduplicated(store: Store) -> None:
    d = _enroll(store)
    samples = [TelemetryRecord(d, seq=i, timestamp_ms=1000 + i, cpu_percent=float(i)) for i in range(50)]
    store.insert_telemetry(samples, {d: 3})
    store.insert_telemetry(samples[40:], {d: 4})  # QoS 1 delivered part of a batch twice
    store.insert_telemetry([TelemetryRecord("dev-ghost", 1, 1)], {})  # unknown devices are dropped
    got = store.telemetry(d, limit=1000)
    assert len(got) == 50 and got[0].seq == 49 and got[0].cpu_percent == 49.0
    assert store.get_device(d).telemetry_dropped_total == 4
    assert store.counts()["telemetry_samples"] == 50


def test_blob_stats_accumulate(store: Store) -> None:
    store.add_blob("b" * 64, 100, "blobs/b")
    store.add_blob_stats({"b" * 64: BlobStatsDelta(broadcast_bytes=10, broadcast_chunks=1, broadcasts=1)})
    store.add_blob_stats({"b" * 64: BlobStatsDelta(repair_bytes=5, repair_chunks=1, partial_requests=1)})
    (rec,) = store.blob_stats()
    assert rec.size == 100
    assert (rec.stats.broadcast_bytes, rec.stats.repair_bytes, rec.stats.partial_requests) == (10, 5, 1)


def test_password_hash_is_not_the_password() -> None:
    assert hash_secret("pw") != "pw" and len(hash_secret("pw")) == 64
