"""The fleet's /metrics through a real fleet (FleetThread: uvicorn, the embedded broker, SQLite) with
simulated devices sending real telemetry over MQTT: who may read it, and the device telemetry summed
per package and per tag, parsed by prometheus_client's own parser."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from test_fleet_rollout_rules import _finish, _setup

from slmops_fleet.process import FleetThread
from slmops_fleet.store import Store
from slmops_fleet.store.database import utcnow
from slmops_fleet.store.metrics import FRESH_S
from slmops_fleet.store.records import TelemetryRecord
from slmops_fleet.store.schema import TelemetrySampleRow
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _check_documented(m: Samples) -> None:
    """Every metric served is in README.md's table."""
    documented = set(re.findall(r"`(slmops_fleet_[a-z_]+)", (Path(__file__).parents[2] / "README.md").read_text()))
    for name in m:
        base = re.sub(r"_(bucket|count|sum|created)$", "", name)
        prefix = re.match(r"slmops_fleet_(tag|group)_", base)
        family = base if base in documented or prefix is None else prefix.group(0)
        assert family in documented, f"{name} is not in README.md's metrics table"


def test_metrics_need_a_token_unless_opened(
    fleet: Any, admin: httpx.Client, fleet_settings: Callable[..., Any]
) -> None:
    url = fleet.url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    reader = admin.post("/v1/admin-tokens", json={"name": "prometheus", "role": "read-only"}).json()["token"]
    r = httpx.get(url, headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 200 and "slmops_fleet_devices" in r.text
    # the wrong token's requests were timed too, under no route of their own
    m = _parse(httpx.get(url, headers={"Authorization": f"Bearer {reader}"}).text)
    counts = m["slmops_fleet_http_request_duration_seconds_count"]
    assert counts[(("method", "GET"), ("route", "unmatched"), ("status", "401"))] == 2
    assert counts[(("method", "GET"), ("route", "/metrics"), ("status", "200"))] >= 1
    _check_documented(m)
    with FleetThread(fleet_settings(metrics_open=True)) as open_fleet:
        assert httpx.get(open_fleet.url + "/metrics").status_code == 200
        assert httpx.get(open_fleet.url + "/v1/devices").status_code == 401  # only /metrics is opened


def test_device_telemetry_is_summed_per_package_and_tag(fleet: Any, admin: httpx.Client) -> None:
    devices: list[SimDevice] = []
    try:
        tags = {"a": ["canary", "eu"], "b": ["canary"], "c": []}
        for name, (tps, ttft, requests, errors, memory) in {
            "a": (10.0, 100.0, 5, 1, 1000),
            "b": (20.0, 300.0, 7, 0, 3000),
            "c": (40.0, 50.0, 1, 0, 500),
        }.items():
            creds = enroll(fleet, new_token(admin), name).json()
            dev = SimDevice.enrolled(creds)
            assert not dev.connect().is_failure
            devices.append(dev)
            if tags[name]:
                admin.post(f"/v1/devices/{dev.device_id}/tags", json={"add": tags[name]}).raise_for_status()
            batch = fleet_pb2.TelemetryBatch(device_id=dev.device_id)
            # an older sample, then the newest: only the newest counts
            batch.samples.add(timestamp_unix_ms=1000, seq=1, tokens_per_s=999.0, requests_total=999)
            batch.samples.add(
                timestamp_unix_ms=2000,
                seq=2,
                tokens_per_s=tps,
                ttft_ms=ttft,
                requests_total=requests,
                errors_total=errors,
                memory_used_bytes=memory,
                # a package id the fleet does not hold: counted as "unknown", never a label of its own
                active_package_id="" if name != "c" else "f" * 64,
            )
            dev.publish(dev.topics.telemetry(dev.device_id), batch.SerializeToString())
        _wait_stored(fleet, 6)
        m = _parse(admin.get("/metrics").text)

        def figure(name: str, **labels: str) -> float:
            hits = [v for k, v in m[name].items() if all((n, x) in k for n, x in labels.items())]
            assert len(hits) == 1, (name, labels, m[name])
            return hits[0]

        assert figure("slmops_fleet_tag_devices_reporting", tag="canary") == 2
        assert figure("slmops_fleet_tag_tokens_per_second", tag="canary") == 30.0
        assert figure("slmops_fleet_tag_ttft_ms", tag="canary") == 200.0  # the mean of the devices'
        assert figure("slmops_fleet_tag_requests", tag="canary") == 12
        assert figure("slmops_fleet_tag_errors", tag="canary") == 1
        assert figure("slmops_fleet_tag_memory_used_bytes", tag="canary") == 4000
        assert figure("slmops_fleet_tag_tokens_per_second", tag="eu") == 10.0
        # no package yet: the devices count under the empty package id
        assert figure("slmops_fleet_package_devices_reporting", package_id="") == 2
        assert figure("slmops_fleet_package_tokens_per_second", package_id="") == 30.0
        assert figure("slmops_fleet_package_tokens_per_second", package_id="unknown") == 40.0
        assert not any("f" * 64 in str(k) for family in m.values() for k in family)
        assert figure("slmops_fleet_devices_by_package", package_id="") == 3
        assert figure("slmops_fleet_devices", state="NEW") == 3
        assert figure("slmops_fleet_ingest_telemetry_samples_total") == 6
        assert figure("slmops_fleet_mqtt_messages_total", direction="in") >= 3
        _check_documented(m)
    finally:
        for dev in devices:
            dev.close()


def _wait_stored(fleet: Any, samples: int) -> None:
    """Until the fleet has stored `samples` telemetry samples: the broker acknowledges a device's publish
    before the fleet has the message, so an idle ingest queue alone does not say it arrived."""
    deadline = time.monotonic() + 15
    while fleet.server.ingest.counters.telemetry_samples < samples:
        assert time.monotonic() < deadline, f"{samples} telemetry samples not stored in 15 s"
        time.sleep(0.05)


def _report(dev: SimDevice, tokens_per_s: float, ttft_ms: float, memory: int) -> None:
    batch = fleet_pb2.TelemetryBatch(device_id=dev.device_id)
    batch.samples.add(
        timestamp_unix_ms=1000, seq=1, tokens_per_s=tokens_per_s, ttft_ms=ttft_ms, memory_used_bytes=memory
    )
    dev.publish(dev.topics.telemetry(dev.device_id), batch.SerializeToString())


def test_device_telemetry_is_summed_per_group(
    fleet: Any, admin: httpx.Client, fleet_package: Callable[..., Path]
) -> None:
    """A device counts under each named group it is a member of; members and followers match the API."""
    devices: dict[str, SimDevice] = {}
    try:
        for name in ("a", "b", "c", "d"):
            dev = SimDevice.enrolled(enroll(fleet, new_token(admin), name).json())
            assert not dev.connect().is_failure
            devices[name] = dev
        ids = {name: dev.device_id for name, dev in devices.items()}
        for name in ("a", "b"):
            admin.post(f"/v1/devices/{ids[name]}/tags", json={"add": ["kiosk"]}).raise_for_status()
        for body in (
            {"name": "kiosks", "selector": "tag=kiosk"},
            {"name": "lab", "devices": [ids["b"], ids["c"], ids["d"]]},
            {"name": "nobody", "selector": "tag=none-has-it"},
        ):
            admin.post("/v1/groups", json=body).raise_for_status()
        v2 = upload(admin, fleet_package({"model.onnx": random_bytes(2000, 3)}, version="2.0.0"))["package_id"]
        admin.post("/v1/groups/kiosks/assign", json={"package_id": v2}).raise_for_status()
        admin.post(f"/v1/devices/{ids['d']}/revoke").raise_for_status()  # in no group now
        for name, (tps, ttft, memory) in {
            "a": (10.0, 100.0, 1000),
            "b": (20.0, 300.0, 3000),
            "c": (5.0, 50.0, 7),
        }.items():
            _report(devices[name], tps, ttft, memory)
        _wait_stored(fleet, 3)
        m = _parse(admin.get("/metrics").text)
        _check_documented(m)

        def figure(name: str, group: str) -> float | None:
            return m.get(name, {}).get((("group", group),))

        groups = {g["name"]: g for g in admin.get("/v1/groups").json()["groups"]}
        assert groups["lab"]["members"] == sorted([ids["b"], ids["c"]])
        for name, g in groups.items():
            assert figure("slmops_fleet_group_members", name) == len(g["members"])
        assert figure("slmops_fleet_group_following", "kiosks") == len(groups["kiosks"]["assignment"]["following"]) == 2
        assert figure("slmops_fleet_group_following", "lab") is None  # no assignment: no followers to count
        assert figure("slmops_fleet_group_devices_reporting", "kiosks") == 2
        assert figure("slmops_fleet_group_tokens_per_second", "kiosks") == 30.0
        assert figure("slmops_fleet_group_ttft_ms", "kiosks") == 200.0
        assert figure("slmops_fleet_group_memory_used_bytes", "kiosks") == 4000
        # b is in both groups: it counts under each, though it follows kiosks only
        assert figure("slmops_fleet_group_devices_reporting", "lab") == 2
        assert figure("slmops_fleet_group_tokens_per_second", "lab") == 25.0
        assert figure("slmops_fleet_group_memory_used_bytes", "lab") == 3007
        assert figure("slmops_fleet_group_devices_reporting", "nobody") is None

        # the device JSON says the same: its named groups and the assigned group it follows
        listed = {d["id"]: d for d in admin.get("/v1/devices").json()["devices"]}
        assert [(listed[ids[n]]["groups"], listed[ids[n]]["follows_group"]) for n in "abcd"] == [
            (["kiosks"], "kiosks"),
            (["kiosks", "lab"], "kiosks"),
            (["lab"], None),
            ([], None),
        ]
        one = admin.get(f"/v1/devices/{ids['b']}").json()
        assert (one["groups"], one["follows_group"]) == (["kiosks", "lab"], "kiosks")
        for name, g in groups.items():
            assert g["members"] == sorted(i for i, d in listed.items() if name in d["groups"])
        # tagging moves a device into a group at once, in the answer and in the next scrape
        tagged = admin.post(f"/v1/devices/{ids['c']}/tags", json={"add": ["kiosk"]}).json()
        assert (tagged["groups"], tagged["follows_group"]) == (["kiosks", "lab"], "kiosks")
        m = _parse(admin.get("/metrics").text)
        assert figure("slmops_fleet_group_members", "kiosks") == 3
        assert figure("slmops_fleet_group_tokens_per_second", "kiosks") == 35.0
    finally:
        for dev in devices.values():
            dev.close()


def test_the_snapshot_on_sqlite_and_postgresql(store: Store) -> None:
    """What /metrics reads, on both databases: devices by package, waves, and only each device's newest
    sample that arrived recently."""
    ids, old, new = _setup(store, 3)
    _r0, first = store.create_rollout(old, "all")
    _finish(store, first)
    r1, second = store.create_rollout(new, [ids[0], ids[1]])
    _finish(store, second[:1])
    store.insert_telemetry(
        [
            TelemetryRecord(d, seq=s, timestamp_ms=s, tokens_per_s=float(s), active_package_id=old)
            for d in ids
            for s in (1, 2)
        ]
    )
    with store.session(write=True) as s:  # ids[2]'s newest sample arrived long ago: it no longer counts
        s.execute(
            update(TelemetrySampleRow)
            .where(TelemetrySampleRow.device_id == ids[2])
            .values(received_at=utcnow() - timedelta(seconds=FRESH_S + 60))
        )
    store.create_group("pair", devices=[ids[0], ids[2]])
    store.create_group("none", selector="tag=absent")
    snap = store.metrics_snapshot()
    assert snap.group_members == {"none": 0, "pair": 2} and snap.group_following == {}
    assert {x.device_id: x.groups for x in snap.samples} == {ids[0]: ["pair"], ids[1]: []}
    assert snap.devices_by_package == {new: 1, old: 2} and snap.packages[new] == ("m", "2.0.0")
    assert sorted((x.device_id, x.tokens_per_s) for x in snap.samples) == sorted([(ids[0], 2.0), (ids[1], 2.0)])
    wave = next(w for w in snap.waves if w.rollout_id == r1.id)
    assert (wave.wave, wave.size, wave.targets) == (1, 2, {"COMMITTED": 1, "PENDING": 1})
