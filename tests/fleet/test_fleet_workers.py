"""Several fleet workers on one PostgreSQL database: the schema upgrade under concurrency, who may run
beside whom, blobs in large objects, and a blob broadcast by one worker that the next one does not send
again (the workers together: tests/e2e/test_workers.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from slmops_fleet.desired_order import publish_newest_last
from slmops_fleet.errors import StartupError
from slmops_fleet.mqtt_client import FleetMqtt, MqttEndpoint
from slmops_fleet.process import FleetThread
from slmops_fleet.shared_blobs import PIECE, PostgresBlobStore
from slmops_fleet.store import Store
from slmops_fleet.store.records import DesiredRecord
from slmops_protos.topics import Topics
from slmops_testing.brokers import start_mosquitto
from slmops_testing.databases import fresh_pg_database
from slmops_testing.fleet_api import enroll_one_and_roll_out
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice

CHUNK_256K = 256 * 1024  # the chunk size of `fleet_settings`
_MIGRATE = (
    "import sys; from slmops_fleet.store import Store; s = Store(sys.argv[1]); s.migrate(); print(s.schema_revision())"
)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def test_two_workers_migrate_a_fresh_database_at_once(fresh_database: str) -> None:
    """Two processes upgrade an empty database together: one waits on the advisory lock, then finds
    the schema current; both end at the newest revision and neither fails on a table the other made."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, fresh_database],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    store = Store(fresh_database)
    try:
        head = store.schema_revision()
        assert head is not None
        assert {out.strip().splitlines()[-1] for out, _ in results} == {head}
        store.migrate()  # a later start: nothing to do
        assert store.schema_revision() == head
    finally:
        store.close()


# --- who may run beside whom ----------------------------------------------------------------------


@pytest.mark.mosquitto
def test_a_second_worker_with_the_same_worker_id_is_refused(
    pg_url: str, mosquitto_broker: Any, fleet_settings: Callable[..., Any]
) -> None:
    """Two workers given one --worker-id would take the broker session from each other: the second
    waits out the first one's lease (it might be a dead earlier process of its own), then refuses."""
    common = {"database_url": pg_url, "broker_url": mosquitto_broker.url, "worker_heartbeat_s": 0.3}
    with FleetThread(fleet_settings(worker_id="w1", **common)):
        with pytest.raises(StartupError, match="runs with the MQTT client id slmops-fleet-w1: give each worker"):
            FleetThread(fleet_settings(worker_id="w1", **common)).start()
        with FleetThread(fleet_settings(worker_id="w2", **common)) as second:  # its own id: one fleet
            assert httpx.get(second.url + "/healthz").status_code == 200


def test_the_embedded_broker_serves_one_worker(pg_url: str, fleet_settings: Callable[..., Any]) -> None:
    with (
        FleetThread(fleet_settings(database_url=pg_url)),
        pytest.raises(StartupError, match="the embedded broker serves one worker"),
    ):
        FleetThread(fleet_settings(database_url=pg_url)).start()


def test_a_cleanly_stopped_worker_restarts_at_once(pg_url: str, fleet_settings: Callable[..., Any]) -> None:
    """A worker's lease outlives a clean stop (marked stopped): the same worker takes it back at once."""
    settings = fleet_settings(database_url=pg_url)
    lease = "worker:" + settings.mqtt_client_id
    with FleetThread(settings) as first:
        assert first.server is not None and first.server.workers is not None
        holder = first.server.workers.holder
    store = Store(pg_url)
    try:
        assert store.lease_holder(lease)[0] == "stopped:" + holder  # type: ignore[index]
        with FleetThread(settings) as second:
            assert second.server is not None and second.server.workers is not None
            assert store.lease_holder(lease)[0] == second.server.workers.holder  # type: ignore[index]
    finally:
        store.close()


# --- blobs in PostgreSQL large objects -------------------------------------------------------------------


def test_blobs_in_large_objects_reach_another_worker_and_are_checked(pg_url: str, tmp_path: Path) -> None:
    store = Store(pg_url)
    store.migrate()
    try:
        data = os.urandom(3 * PIECE + 123)
        sha = hashlib.sha256(data).hexdigest()
        a = PostgresBlobStore(tmp_path / "a" / "blobs", store.engine)
        a.create()
        writer = a.writer(sha, len(data))
        writer.write(data)
        writer.commit()
        location = a.keep(writer)
        assert store.add_blob(sha, len(data), location)
        # The same upload taken by another worker at the same time: recorded once, its copy dropped.
        b = PostgresBlobStore(tmp_path / "b" / "blobs", store.engine)
        b.create()
        second = b.writer(sha, len(data))
        second.write(data)
        second.commit()
        extra = b.keep(second)
        assert not store.add_blob(sha, len(data), extra)
        b.discard(extra)
        with store.engine.connect() as conn:
            oid = int(extra.removeprefix("pg-lo:"))
            assert not conn.exec_driver_sql("SELECT 1 FROM pg_largeobject_metadata WHERE oid = %s", (oid,)).all()

        rec = store.get_blob(sha)
        assert rec is not None and rec.path == location and a.holds(rec)
        c = PostgresBlobStore(tmp_path / "c" / "blobs", store.engine)  # a worker that never saw the upload
        assert c.ensure_local(rec)
        assert c.local_path(rec).read_bytes() == data

        # A large object that no longer holds the blob's bytes is not cached (nor sent).
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT lo_put(%s, 0, %s)", (int(location.removeprefix("pg-lo:")), b"tampered"))
        d = PostgresBlobStore(tmp_path / "d" / "blobs", store.engine)
        assert not d.ensure_local(rec)
        assert not d.local_path(rec).exists() and not list(d.incoming.iterdir())
    finally:
        store.close()


# --- shared subscriptions ---------------------------------------------------------------------------------


@pytest.mark.mosquitto
def test_a_kept_session_of_an_unshared_fleet_does_not_deliver_twice(tmp_path: Path) -> None:
    """A fleet that subscribed plainly kept its broker session; the same worker now sharing the device
    topics drops the plain filters, so a report reaches it once, not once per filter."""
    broker = start_mosquitto(tmp_path / "mosquitto", anonymous=True)
    topics = Topics()
    endpoint = MqttEndpoint(broker.host, broker.port, None, None)
    got: list[str] = []

    def handle(topic: str, _payload: bytes, ack: Callable[[], None]) -> None:
        got.append(topic)
        ack()

    try:
        old = FleetMqtt(endpoint, topics, client_id="slmops-fleet-x", clean_session=False, mqtt5=True)
        old.set_handlers(handle)
        old.start()
        assert old.wait_connected(10)
        old.stop()
        new = FleetMqtt(endpoint, topics, client_id="slmops-fleet-x", clean_session=False, mqtt5=True, share_group="g")
        new.set_handlers(handle)
        new.start()
        assert new.wait_connected(10)
        time.sleep(0.5)  # the (un)subscriptions take effect
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1")
        device.connect(broker.host, broker.port)
        device.loop_start()
        device.publish(topics.reported("dev-1"), b"x", qos=1).wait_for_publish(5)
        device.publish(topics.blob_requests("dev-1"), b"y", qos=1).wait_for_publish(5)
        time.sleep(1.0)
        device.loop_stop()
        new.stop()
        assert sorted(got) == [topics.blob_requests("dev-1"), topics.reported("dev-1")]
    finally:
        broker.stop()


# --- desired states published by several workers -----------------------------------------------------


class _Acked:
    def __init__(self, acked: bool) -> None:
        self.acked = acked

    def wait(self, timeout: float) -> bool:
        return self.acked


def _desired(device_id: str, generation: int) -> DesiredRecord:
    return DesiredRecord(device_id, generation, "pkg", None, datetime.now(timezone.utc), b"")


def test_a_newer_desired_state_another_worker_committed_is_published_last() -> None:
    """This worker published generation 5 of dev-1 while another worker committed (and published) 6:
    once 5 is acknowledged, the check finds 6 and publishes it again, so the broker retains 6."""
    sent: list[tuple[str, int]] = []
    db = {"dev-1": _desired("dev-1", 6), "dev-2": _desired("dev-2", 3)}

    def publish(d: DesiredRecord) -> _Acked:
        sent.append((d.device_id, d.generation))
        return _Acked(True)

    again = publish_newest_last([_desired("dev-1", 5), _desired("dev-2", 3)], publish, lambda ids: [db[i] for i in ids])
    assert again == 1
    assert sent == [("dev-1", 5), ("dev-2", 3), ("dev-1", 6)]


def test_desired_states_not_acknowledged_are_left_to_the_republish_on_reconnect() -> None:
    asked: list[list[str]] = []

    def latest(ids: list[str]) -> list[DesiredRecord]:
        asked.append(ids)
        return []

    again = publish_newest_last([_desired("dev-1", 5)], lambda d: _Acked(False), latest, ack_timeout_s=0.1)
    assert again == 0 and asked == []


# --- a blob's broadcast across workers -----------------------------------------------------------------


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.mosquitto
def test_a_worker_taking_over_does_not_resend_what_the_other_just_broadcast(
    pg_url: str, mosquitto_broker: Any, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    """Two workers on PostgreSQL and Mosquitto: the rollout driver's holder broadcasts a blob and stops;
    the other takes the rollout over and answers the device's waiting request for the whole blob with
    nothing (every chunk was broadcast moments ago, after the device asked: the shared record says
    so), then its request after a reconnect (not waiting) with a broadcast of every chunk."""
    data = random_bytes(4 * CHUNK_256K, 31)
    sha = hashlib.sha256(data).hexdigest()
    folder = fleet_package({"weights.bin": data})
    common = {"database_url": pg_url, "broker_url": mosquitto_broker.url, "worker_heartbeat_s": 0.3}
    first = FleetThread(fleet_settings(worker_id="w1", rollout_tick_s=0.2, **common)).start()
    second: FleetThread | None = None
    dev: SimDevice | None = None
    store = Store(pg_url)
    try:
        assert first.server is not None and first.server.driver is not None
        _wait(lambda: first.server.driver.leading, "the first worker to lead")  # type: ignore[union-attr]
        second = FleetThread(fleet_settings(worker_id="w2", rollout_tick_s=0.2, **common)).start()
        assert second.server is not None and second.server.ingest is not None
        ingest, distributor = second.server.ingest, second.server.distributor
        assert distributor is not None
        pid, creds = enroll_one_and_roll_out(first, folder)
        dev = SimDevice.enrolled(creds)
        assert not dev.connect().is_failure
        dev.subscribe_device_topics()
        assert dev.desired().model.package_id == pid

        dev.request_blob(sha)  # the leader broadcasts; the other worker notes the request
        assert dev.wait_blob(sha) == data
        _wait(lambda: ingest.counters.blob_requests_elsewhere == 1, "the second worker to note the request")
        first.stop()
        _wait(lambda: second.server.driver.leading, "the second worker to take over")  # type: ignore[union-attr]

        def broadcast_chunks() -> int:
            return sum(b.stats.broadcast_chunks for b in store.blob_stats() if b.sha256 == sha)

        assert broadcast_chunks() == 4
        dev.blobs.pop(sha)
        dev.request_blob(sha, waiting=True)  # as after its stall timer, the chunks still on their way
        _wait(lambda: ingest.counters.blob_requests == 2, "the second worker to serve the request")
        time.sleep(1.0)  # well past the coalescing window: a broadcast would have started
        assert distributor.idle() and dev.blob(sha).chunks == {}
        distributor.flush_stats()
        assert broadcast_chunks() == 4

        dev.request_blob(sha)  # after a reconnect: answered at once
        assert dev.wait_blob(sha) == data
        _wait(lambda: distributor.idle(), "the broadcast to end")
        assert broadcast_chunks() == 8
    finally:
        if dev is not None:
            dev.close()
        if second is not None:
            second.stop()
        first.stop()
        store.close()
