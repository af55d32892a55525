"""Telemetry retention: each device's telemetry kept within an age and a number of rows, the oldest
dropped in small batches and counted; on SQLite and PostgreSQL, and in a running fleet beside ingest
(every batch a device sends still lands while retention runs, and the counts show in /v1/status and
`slmops fleet status`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from click.testing import CliRunner

from slmops_cli.main import app
from slmops_fleet.retention import TelemetryRetention
from slmops_fleet.store import Store
from slmops_fleet.store.records import TelemetryRecord
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.fleet_api import new_token
from slmops_testing.simulated_devices import SimDevice

PUB = "ab" * 32
NOW = 1_800_000_000.0  # the sweeps' clock, in seconds
DAY_MS = 86_400_000


def _device(store: Store, name: str) -> str:
    token = store.create_token(60)[0]
    return store.enroll(token, public_key=PUB, name=name, inventory={}, mqtt_password_hash="h").id


def _samples(device: str, timestamps: list[int], first_seq: int = 0) -> list[TelemetryRecord]:
    return [TelemetryRecord(device, seq=first_seq + i, timestamp_ms=ts) for i, ts in enumerate(timestamps)]


def _retention(store: Store, **kwargs: Any) -> TelemetryRetention:
    values: dict[str, Any] = {"max_age_s": 0, "max_rows_per_device": 0, "interval_s": 1, "clock": lambda: NOW}
    values.update(kwargs)
    return TelemetryRetention(store, **values)


def test_samples_past_the_age_are_dropped_oldest_first(store: Store) -> None:
    a, b = _device(store, "a"), _device(store, "b")
    now_ms = int(NOW * 1000)
    store.insert_telemetry(_samples(a, [now_ms - d * DAY_MS for d in range(10)]))  # 0..9 days old
    store.insert_telemetry(_samples(b, [now_ms - 1000] * 3))
    retention = _retention(store, max_age_s=7 * 86400, batch=1)  # one row per transaction
    assert retention.sweep() == 2  # 8 and 9 days old; 7 days is the bound itself
    assert sorted((now_ms - t.timestamp_ms) // DAY_MS for t in store.telemetry(a, 100)) == list(range(8))
    assert len(store.telemetry(b, 100)) == 3
    assert retention.sweep() == 0
    assert retention.to_json() | {"last_sweep_s": None} == {
        "max_age_s": 7 * 86400, "max_rows_per_device": 0, "dropped_rows": 2, "sweeps": 2,
        "last_sweep_s": None, "last_sweep_at": NOW,
    }  # fmt: skip


def test_each_device_keeps_its_newest_rows(store: Store) -> None:
    a, b, c = _device(store, "a"), _device(store, "b"), _device(store, "c")
    store.insert_telemetry(_samples(a, list(range(1000, 1250))))
    store.insert_telemetry(_samples(b, [5000] * 120))  # one timestamp for all: bounded by arrival too
    store.insert_telemetry(_samples(c, list(range(10))))
    retention = _retention(store, max_rows_per_device=100, batch=30)
    assert retention.sweep() == 150 + 20
    kept_a = store.telemetry(a, 1000)
    assert len(kept_a) == 100 and min(t.timestamp_ms for t in kept_a) == 1150
    kept_b = store.telemetry(b, 1000)
    assert len(kept_b) == 100 and min(t.seq for t in kept_b) == 20  # the first 20 to arrive went
    assert len(store.telemetry(c, 1000)) == 10
    assert store.counts()["telemetry_samples"] == 210
    # Both bounds: the age drops more of c's, the row count more of a's.
    store.insert_telemetry(_samples(a, list(range(2000, 2050)), first_seq=1000))
    both = _retention(store, max_rows_per_device=100, max_age_s=NOW - 0.005)  # older than 5 ms: gone
    assert both.sweep() == 50 + 5
    assert len(store.telemetry(a, 1000)) == 100 and len(store.telemetry(c, 1000)) == 5


def test_retention_runs_beside_ingest_and_shows_in_status(fleet_settings: Callable[..., Any]) -> None:
    """A device sends 40 batches of 50 samples while retention sweeps every 0.1 s with a bound of 300
    rows: every batch is taken in, the device's rows stay near the bound, and what was dropped is
    counted in /v1/status and in `slmops fleet status`."""
    from slmops_fleet.process import FleetThread

    settings = fleet_settings(telemetry_max_rows_per_device=300, telemetry_retention_interval_s=0.1)
    with FleetThread(settings) as fleet:
        headers = {"Authorization": f"Bearer {fleet.admin_token}"}
        with httpx.Client(base_url=fleet.url, headers=headers, timeout=30) as admin:
            r = httpx.post(fleet.url + "/v1/enroll", json={"token": new_token(admin), "public_key": PUB})
            creds = r.json()
            dev = SimDevice.enrolled(creds)
            assert not dev.connect().is_failure
            try:
                seq, start_ms = 0, int(time.time() * 1000) - 10_000  # within the default 30-day age
                for _ in range(40):
                    samples = []
                    for _ in range(50):
                        samples.append(fleet_pb2.TelemetrySample(timestamp_unix_ms=start_ms + seq, seq=seq))
                        seq += 1
                    batch = fleet_pb2.TelemetryBatch(device_id=creds["device_id"], samples=samples)
                    dev.publish(dev.topics.telemetry(creds["device_id"]), batch.SerializeToString())
                    time.sleep(0.02)
            finally:
                dev.close()
            ingest = fleet.server.ingest
            assert ingest.wait_idle(20)
            assert ingest.counters.telemetry_samples == 2000 and ingest.counters.telemetry_refused == 0
            deadline = time.monotonic() + 10
            while (n := fleet.server.store.counts()["telemetry_samples"]) > 300:
                assert time.monotonic() < deadline, f"{n} samples kept"
                time.sleep(0.05)
            newest = fleet.server.store.telemetry(creds["device_id"], 1)
            assert newest[0].seq == 1999
            status = admin.get("/v1/status").json()
        limits = status["limits"]
        assert limits["telemetry_dropped_by_retention"] == 1700 == limits["retention"]["dropped_rows"]
        assert limits["retention"]["max_rows_per_device"] == 300 and limits["retention"]["sweeps"] > 0
        assert limits["mqtt_oversized_packets"] == 0 and limits["blob_requests_rate_limited"] == 0
        env = {"SLMOPS_FLEET_URL": fleet.url, "SLMOPS_FLEET_TOKEN": fleet.admin_token}
        out = CliRunner().invoke(app, ["fleet", "status"], env=env, terminal_width=200)
        assert out.exit_code == 0, out.output
        assert "1700 samples dropped" in out.output and "refused: wills outside a device's ACL" in out.output
        out = CliRunner().invoke(app, ["fleet", "status", "--json"], env=env)
        assert json.loads(out.output)["limits"]["telemetry_dropped_by_retention"] == 1700
