"""Blob delivery.

Through a real fleet and real MQTT: a paced broadcast shared by a wave, a device that joins late and
repairs its gaps by unicast, and a second version that moves only its changed blob.

The distributor alone, with a publisher that records, under load and failure: the sender survives a
broker that drops (paho raises for messages it cannot send), a wave's requests spread over time share
one broadcast, gaps are gathered and sent after the broadcast (chunks several devices lack are
broadcast once more, the rest unicast), the sender and the requests follow the broker's backlog, and
two distributors on one database treat each other's recent broadcasts as their own."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_fleet.broadcast_record import BroadcastRecord
from slmops_fleet.distribution import BlobDistributor
from slmops_fleet.store import Store
from slmops_fleet.store.records import BlobRecord
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics
from slmops_testing.fleet_api import enroll_one_and_roll_out, upload
from slmops_testing.packages import package_blobs, random_bytes
from slmops_testing.simulated_devices import SimDevice

CHUNK = 256 * 1024
TOPICS = Topics("slmops/v1")


def _stats(admin: httpx.Client) -> dict[str, dict[str, int]]:
    return {b["sha256"]: b for b in admin.get("/v1/stats").json()["blobs"]}


@pytest.fixture
def paced_fleet(fleet_settings: Callable[..., Any]) -> Any:
    from slmops_fleet.process import FleetThread

    # 1.5 MiB/s: a 3 MiB blob takes about 2 s, long enough for a device to join it halfway.
    with FleetThread(fleet_settings(broadcast_rate=1536 * 1024, coalesce_window_s=0.3, max_inflight=4)) as running:
        yield running


def test_broadcast_late_joiner_repair_and_delta(paced_fleet: Any, fleet_package: Callable[..., Path]) -> None:
    fleet = paced_fleet
    files_v1 = {
        "model.onnx.data": random_bytes(3 * 1024 * 1024, 10),  # 12 chunks
        "model.onnx": random_bytes(600 * 1024, 11),  # 3 chunks
        "genai_config.json": b'{"search": {"max_length": 64}}',  # 1 chunk
    }
    v1 = fleet_package(files_v1, version="1.0.0")
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in files_v1.items()}
    big, mid, cfg = sha["model.onnx.data"], sha["model.onnx"], sha["genai_config.json"]
    assert set(package_blobs(v1)) == {big, mid, cfg}

    admin = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
    devices: list[SimDevice] = []
    try:
        pid1 = upload(admin, v1)["package_id"]
        creds = []
        for name in ("early", "late"):
            token = admin.post("/v1/tokens", json={}).json()["token"]
            body = {"token": token, "public_key": "ef" * 32, "name": name}
            creds.append(httpx.post(fleet.url + "/v1/enroll", json=body).json())
        assert admin.post("/v1/rollouts", json={"package_id": pid1, "target": "all"}).status_code == 200
        a, b = (SimDevice.enrolled(c) for c in creds)
        devices += [a, b]
        for d in (a, b):
            assert not d.connect().is_failure
            d.subscribe_device_topics()
            desired = d.desired()
            assert desired.model.package_id == pid1 and desired.chunk_size == CHUNK

        # Device A asks for every blob; B is subscribed to the chunks too but does not want them yet.
        for s in (big, mid, cfg):
            a.request_blob(s)
        a.wait_for(lambda: len(a.blob(big).chunks) >= 4, 30, "4 chunks of the big blob")
        assert len(a.blob(big).chunks) < 12, "the broadcast finished before the late device could join"
        b.request_blob(big)  # joins the running broadcast
        assert a.wait_blob(big) == files_v1["model.onnx.data"]
        assert a.wait_blob(mid) == files_v1["model.onnx"]
        assert a.wait_blob(cfg) == files_v1["genai_config.json"]
        assert all(v == "broadcast" for v in a.blob(big).via.values())

        # B kept what came after it joined; it asks for exactly the chunks it lacks, and gets them by unicast.
        time.sleep(0.5)
        missed = b.blob(big).missing()
        assert missed and len(missed) < 12, missed
        assert missed == list(range(len(missed))), "B lacks the chunks sent before it joined"
        b.request_blob(big, missing=missed)
        assert b.wait_blob(big) == files_v1["model.onnx.data"]
        via = b.blob(big).via
        assert sorted(i for i, v in via.items() if v == "repair") == missed
        assert a.messages_on(a.topics.device_blobs(b.device_id)) == []
        assert a.blob(big).bad == 0 and b.blob(big).bad == 0

        fleet.server.distributor.flush_stats()
        deadline = time.monotonic() + 10
        while not fleet.server.distributor.idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        st = _stats(admin)
        assert st[big]["broadcasts"] == 1 and st[big]["broadcast_chunks"] == 12
        assert st[big]["broadcast_bytes"] == len(files_v1["model.onnx.data"])
        assert st[big]["whole_requests"] == 2 and st[big]["partial_requests"] == 1
        assert st[big]["repair_chunks"] == len(missed) and st[big]["repair_bytes"] == len(missed) * CHUNK
        assert st[mid]["broadcast_chunks"] == 3 and st[mid]["repair_chunks"] == 0

        # A repair in another chunk size (512 KiB: its indexes name other bytes) is refused and counted;
        # the same chunks in the fleet's size are sent.
        a.blobs.pop(big)
        a.request_blob(big, missing=[0, 5], chunk_size=2 * CHUNK)
        a.request_blob(big, missing=[0, 5], chunk_size=CHUNK)
        a.wait_for(lambda: len(a.blob(big).chunks) == 2, 20, "two 256 KiB repair chunks")
        asm = a.blob(big)
        assert asm.chunk_size == CHUNK and asm.count == 12 and sorted(asm.chunks) == [0, 5]
        assert asm.chunks[5] == files_v1["model.onnx.data"][5 * CHUNK : 6 * CHUNK]
        assert fleet.server.ingest.blob_policy.counters.refused_chunk_size == 1

        # Version 2 changes one small file: only that blob moves, in one broadcast shared by both devices.
        before = _stats(admin)
        files_v2 = {**files_v1, "genai_config.json": b'{"search": {"max_length": 128}}'}
        v2 = fleet_package(files_v2, version="2.0.0")
        pid2 = upload(admin, v2)["package_id"]
        new_cfg = hashlib.sha256(files_v2["genai_config.json"]).hexdigest()
        assert admin.post("/v1/rollouts", json={"package_id": pid2, "target": "all"}).status_code == 200
        for d in (a, b):
            assert d.desired(generation=2).model.package_id == pid2
            d.request_blob(new_cfg)  # the only blob either device lacks
        for d in (a, b):
            assert d.wait_blob(new_cfg) == files_v2["genai_config.json"]
        # A blob that is not in a device's desired package is refused.
        a.request_blob(cfg)
        time.sleep(1.0)
        after = _stats(admin)
        assert after[new_cfg]["broadcasts"] == 1 and after[new_cfg]["whole_requests"] == 2
        for s in (big, mid, cfg):
            assert after[s] == before[s], f"blob {s[:12]} moved again"
        totals = admin.get("/v1/stats").json()["totals"]
        assert totals["broadcast_bytes"] == sum(len(x) for x in files_v1.values()) + len(files_v2["genai_config.json"])
    finally:
        for d in devices:
            d.close()
        admin.close()


def test_requests_for_blobs_outside_the_desired_package_move_nothing(fleet: Any) -> None:
    """A request from an id that is no enrolled device (only the fleet's own user can publish there)
    is refused before anything is read or sent."""
    registry = fleet.server.registry
    probe = SimDevice(
        "127.0.0.1",
        fleet.info.mqtt.port,
        username=registry.fleet_username,
        password=registry.fleet_password,
        client_id="probe",
    )
    try:
        assert not probe.connect().is_failure
        probe.device_id = "dev-ghost"
        probe.request_blob("a" * 64)
        deadline = time.monotonic() + 10
        while fleet.server.ingest.counters.blob_requests < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.server.ingest.counters.blob_requests == 1
        assert fleet.server.ingest.wait_idle(10)
        assert fleet.server.distributor.active() == []
        fleet.server.distributor.flush_stats()
        assert fleet.server.store.blob_stats() == []
    finally:
        probe.close()


@pytest.mark.mosquitto
def test_broadcast_and_repair_through_mosquitto(
    mosquitto_broker: Any, fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    from slmops_fleet.process import FleetThread

    data = random_bytes(5 * CHUNK // 2, 20)  # 3 chunks, the last one short
    folder = fleet_package({"weights.bin": data})
    sha = hashlib.sha256(data).hexdigest()
    with FleetThread(fleet_settings(broker_url=mosquitto_broker.url)) as fleet:
        admin = httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)
        dev: SimDevice | None = None
        try:
            pid, creds = enroll_one_and_roll_out(fleet, folder)
            dev = SimDevice.enrolled(creds)
            assert not dev.connect().is_failure
            dev.subscribe_device_topics()
            assert dev.desired().model.package_id == pid
            dev.request_blob(sha)
            assert dev.wait_blob(sha) == data
            assert set(dev.blob(sha).via.values()) == {"broadcast"}
            dev.blobs.pop(sha)
            dev.request_blob(sha, missing=[2])
            dev.wait_for(lambda: 2 in dev.blob(sha).chunks, 20, "repair chunk 2")
            assert dev.blob(sha).via == {2: "repair"} and dev.blob(sha).chunks[2] == data[2 * CHUNK :]
            dev.report(fleet_pb2.COMMITTED, 1, target_package_id=pid, active_package_id=pid, active_version="1.0.0")
            deadline = time.monotonic() + 10
            while admin.get("/v1/rollouts/latest").json()["state"] != "succeeded" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert admin.get("/v1/rollouts/latest").json()["state"] == "succeeded"
        finally:
            if dev is not None:
                dev.close()
            admin.close()


# --- the distributor alone, with a publisher that records ---------------------------------------------


class _Acked:
    def __init__(self, fail: str) -> None:
        self.fail = fail

    def wait(self, timeout: float) -> bool:
        if self.fail == "raise":
            raise RuntimeError("The client is not currently connected.")
        return not self.fail


class Recorder:
    """A publisher that keeps what the distributor publishes; the next `fail_next` handles are never
    acknowledged (`fail_how` "lost": wait() is False, as `_Handle` says for a message lost with the
    connection; "raise": wait() raises)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, fleet_pb2.BlobChunk]] = []
        self.fail_next = 0
        self.fail_how = "lost"
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Acked:
        with self.lock:
            self.sent.append((topic, fleet_pb2.BlobChunk.FromString(payload)))
            fail = self.fail_how if self.fail_next > 0 else ""
            self.fail_next -= bool(fail)
        return _Acked(fail)

    def wait_connected(self, timeout: float) -> bool:
        return True

    def chunks(self, topic: str) -> list[int]:
        with self.lock:
            return [c.index for t, c in self.sent if t == topic]


@pytest.fixture
def blob(tmp_path: Path) -> BlobRecord:
    data = random_bytes(8 * CHUNK, 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    import hashlib

    return BlobRecord(hashlib.sha256(data).hexdigest(), len(data), str(path))


@pytest.fixture
def distributor(blob: BlobRecord) -> Iterator[Callable[..., tuple[BlobDistributor, Recorder]]]:
    made: list[BlobDistributor] = []

    def make(**kwargs: Any) -> tuple[BlobDistributor, Recorder]:
        rec = Recorder()
        args: dict[str, Any] = {
            "default_chunk_size": CHUNK,
            "rate": 0,
            "coalesce_window_s": 0.3,
            "max_inflight": 2,
            "disconnected_give_up_s": 1.0,
        }
        args.update(kwargs)
        d = BlobDistributor(
            TOPICS,
            rec,
            blob_lookup=lambda sha: blob if sha == blob.sha256 else None,
            blob_path=lambda b: Path(b.path),
            stats_sink=lambda _deltas: None,
            **args,
        )
        d.start()
        made.append(d)
        return d, rec

    yield make
    for d in made:
        d.stop()


def _wait_idle(d: BlobDistributor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not d.idle():
        assert time.monotonic() < deadline, f"transfers still active: {d.active()}"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["lost", "raise"])
def test_sender_outlives_failed_acknowledgements(distributor: Callable[..., Any], blob: BlobRecord, how: str) -> None:
    """The broker drops during a broadcast: no chunk is acknowledged; the sender carries on (or
    drops that transfer) and serves later requests."""
    d, rec = distributor()
    rec.fail_next, rec.fail_how = 100, how
    d.request("dev-a", blob.sha256, (), CHUNK)
    _wait_idle(d)
    sent = rec.chunks(TOPICS.blob_chunks(blob.sha256))
    assert sent == (list(range(8)) if how == "lost" else sent[:8]) and sent
    rec.fail_next = 0
    assert d.request("dev-a", blob.sha256, (3, 4), CHUNK).action == "gaps"
    _wait_idle(d)
    assert rec.chunks(TOPICS.device_blobs("dev-a")) == [3, 4]
    assert d._thread is not None and d._thread.is_alive()


def test_a_wave_spread_over_more_than_the_window_shares_one_broadcast(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    d, rec = distributor(coalesce_window_s=0.3, coalesce_max_s=5.0)
    for i in range(8):  # 1.4 s of requests, each within the window of the one before
        assert d.request(f"dev-{i}", blob.sha256, (), CHUNK).action == ("broadcast" if i == 0 else "joined")
        time.sleep(0.2)
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8))
    assert len(rec.sent) == 8

    # The window never stretches past coalesce_max_s after the first request.
    d2, rec2 = distributor(coalesce_window_s=0.3, coalesce_max_s=0.5)
    t0 = time.monotonic()
    for i in range(6):
        d2.request(f"dev-{i}", blob.sha256, (), CHUNK)
        time.sleep(0.2)
    assert rec2.sent and time.monotonic() - t0 >= 1.0


def test_gaps_wait_for_the_broadcast_then_shared_gaps_are_broadcast_once(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    d, rec = distributor(rate=4 * CHUNK, coalesce_window_s=0.2)  # 8 chunks take about 2 s
    bcast = TOPICS.blob_chunks(blob.sha256)
    d.request("dev-a", blob.sha256, (), CHUNK)
    # Gaps the broadcast still has to send need nothing more.
    assert d.request("dev-b", blob.sha256, (5, 6), CHUNK).action == "covered"
    deadline = time.monotonic() + 10
    while len(rec.chunks(bcast)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Three devices that missed the first chunks; 0 and 1 are lacked by more than one of them.
    assert d.request("dev-b", blob.sha256, (0, 1), CHUNK).action == "gaps"
    assert d.request("dev-c", blob.sha256, (0, 1, 2), CHUNK).action == "gaps"
    assert d.request("dev-d", blob.sha256, (1,), CHUNK).action == "gaps"
    assert rec.chunks(TOPICS.device_blobs("dev-c")) == [], "gaps must wait for the broadcast to end"
    _wait_idle(d)
    assert rec.chunks(bcast) == [*range(8), 0, 1]  # the broadcast, then the shared gaps once
    assert rec.chunks(TOPICS.device_blobs("dev-c")) == [2]  # only dev-c lacks chunk 2
    assert rec.chunks(TOPICS.device_blobs("dev-b")) == [] and rec.chunks(TOPICS.device_blobs("dev-d")) == []
    assert [t for t, c in rec.sent if t == bcast][-2:] == [bcast, bcast]


def test_a_whole_request_absorbs_waiting_gaps(distributor: Callable[..., Any], blob: BlobRecord) -> None:
    d, rec = distributor(coalesce_window_s=0.3)
    d.request("dev-a", blob.sha256, (2,), CHUNK)
    d.request("dev-b", blob.sha256, (), CHUNK)  # a full broadcast sends chunk 2 anyway
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8))
    assert rec.chunks(TOPICS.device_blobs("dev-a")) == []


class Backlog:
    """The embedded broker's (pending deliveries, connected clients), set by the test."""

    def __init__(self, pending: int, connected: int) -> None:
        self.pending, self.connected = pending, connected

    def __call__(self) -> tuple[int, int]:
        return self.pending, self.connected


def test_the_sender_waits_while_the_broker_holds_about_a_chunk_per_device(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    backlog = Backlog(pending=150, connected=100)  # more deliveries unacknowledged than devices
    # in_flight_max_s: a broadcast waits at most this long to start while the broker is busy.
    d, rec = distributor(coalesce_window_s=0.0, broker_backlog=backlog, in_flight_max_s=0.1)
    d.request("dev-a", blob.sha256, (), CHUNK)
    time.sleep(0.5)
    assert rec.sent == [], "the broker still holds a chunk per device: nothing more may go out"
    backlog.pending = 100  # one per device: the next chunk may go
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8))


def test_gaps_the_broker_is_still_delivering_are_covered(distributor: Callable[..., Any], blob: BlobRecord) -> None:
    """With 1,000 devices amqtt takes seconds to fan a chunk out: a device asks for chunks that are
    on their way. Those are not sent again; a device that joined after them gets them; a device's
    newest request replaces its older one."""
    backlog = Backlog(pending=0, connected=1000)
    d, rec = distributor(coalesce_window_s=0.1, broker_backlog=backlog, settle_s=0.3)
    bcast, late = TOPICS.blob_chunks(blob.sha256), TOPICS.device_blobs("dev-late")
    d.request("dev-a", blob.sha256, (), CHUNK)
    d.request("dev-b", blob.sha256, (), CHUNK)
    _wait_idle(d)
    assert rec.chunks(bcast) == list(range(8))
    backlog.pending = 40  # still delivering them, under a chunk per device
    # The broker is still busy with them: asked before they arrived (dev-b's stall timer fired
    # before any chunk reached it: it asks for the whole blob again).
    assert d.request("dev-a", blob.sha256, (6, 7), CHUNK).action == "covered"
    assert d.request("dev-b", blob.sha256, (), CHUNK).action == "covered"
    # A device that first asked after they went out will not get them from that broadcast.
    assert d.request("dev-late", blob.sha256, (0, 1, 2), CHUNK).action == "gaps"
    assert d.request("dev-late", blob.sha256, (1, 2), CHUNK).action == "gaps"  # it got chunk 0 meanwhile
    time.sleep(0.5)
    assert rec.chunks(late) == [], "gaps wait while the broker is delivering"
    backlog.pending = 0
    _wait_idle(d)
    assert rec.chunks(late) == [1, 2] and rec.chunks(bcast) == list(range(8))
    # Once the broker has been idle for settle_s, a device that still lacks a chunk gets it.
    time.sleep(0.4)
    assert d.request("dev-b", blob.sha256, (7,), CHUNK).action == "gaps"
    _wait_idle(d)
    assert rec.chunks(TOPICS.device_blobs("dev-b")) == [7]


def test_a_broadcast_waits_to_start_while_the_broker_is_delivering(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    """The desired states of a big wave reach devices over seconds: the broadcast waits for the
    broker to drain, so the requests of the late ones join it instead of starting another."""
    backlog = Backlog(pending=500, connected=1000)
    d, rec = distributor(coalesce_window_s=0.1, coalesce_max_s=0.2, broker_backlog=backlog)
    assert d.request("dev-0", blob.sha256, (), CHUNK).action == "broadcast"
    time.sleep(0.5)  # past coalesce_max_s
    assert rec.sent == []
    assert d.request("dev-1", blob.sha256, (), CHUNK).action == "joined"
    backlog.pending = 0
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8))
    assert len(rec.sent) == 8


def test_a_request_slower_than_the_broadcast_it_asked_for_is_covered(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    """A slow broker hands the fleet a device's first request after the broadcast went out; the
    device's desired state went out before the broadcast, so the broadcast's chunks reach it after
    that state, and it keeps them: nothing is sent again while the broker is busy delivering."""
    backlog = Backlog(pending=0, connected=1000)
    d, rec = distributor(coalesce_window_s=0.1, broker_backlog=backlog)
    d.fetch_started("dev-slow", 1)
    d.fetch_started("dev-late", 0)
    d.request("dev-a", blob.sha256, (), CHUNK)
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8))
    d.fetch_started("dev-late", 1)  # its desired state goes out after the broadcast
    backlog.pending = 900
    assert d.request("dev-slow", blob.sha256, (), CHUNK).action == "covered"
    assert d.request("dev-late", blob.sha256, (), CHUNK).action == "broadcast"


def test_a_request_while_the_last_chunk_waits_for_the_broker_joins_its_broadcast(tmp_path: Path) -> None:
    """A one-chunk blob (an adapter): the sender has taken its only chunk and waits for a busy broker.
    Requests that come meanwhile join that broadcast instead of starting another (1,000 devices on
    the embedded broker: the adapter's chunk went out 4-5 times)."""
    import hashlib

    data = random_bytes(CHUNK // 2, 3)
    path = tmp_path / "adapter"
    path.write_bytes(data)
    small = BlobRecord(hashlib.sha256(data).hexdigest(), len(data), str(path))
    rec, backlog = Recorder(), Backlog(pending=150, connected=100)
    d = BlobDistributor(
        TOPICS, rec, blob_lookup=lambda sha: small if sha == small.sha256 else None, blob_path=lambda b: Path(b.path),
        stats_sink=lambda _deltas: None, default_chunk_size=CHUNK, rate=0, coalesce_window_s=0.0, max_inflight=2,
        broker_backlog=backlog, in_flight_max_s=0.1,
    )  # fmt: skip
    d.start()
    try:
        assert d.request("dev-0", small.sha256, (), CHUNK).action == "broadcast"
        deadline = time.monotonic() + 5
        while not any(job["started"] for job in d.active()):  # the start is held for in_flight_max_s
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        assert rec.sent == [], "the chunk waits for the broker"
        assert d.request("dev-1", small.sha256, (), CHUNK).action == "joined"
        assert d.request("dev-2", small.sha256, (), CHUNK).action == "joined"
        backlog.pending = 0
        _wait_idle(d)
        assert rec.chunks(TOPICS.blob_chunks(small.sha256)) == [0]
    finally:
        d.stop()


def test_a_request_right_after_a_broadcast_is_covered_before_the_broker_reports_it(
    distributor: Callable[..., Any], blob: BlobRecord
) -> None:
    """The broker's backlog counts a chunk only once it has it: a device whose request comes just
    after the broadcast (its desired state went out before) is covered for `settle_s` even while
    the backlog still reads idle; later it gets the blob again."""
    backlog = Backlog(pending=0, connected=1000)
    d, rec = distributor(coalesce_window_s=0.0, broker_backlog=backlog, settle_s=0.5)
    d.fetch_started("dev-b", 1)
    d.request("dev-a", blob.sha256, (), CHUNK)
    _wait_idle(d)
    assert d.request("dev-b", blob.sha256, (), CHUNK).action == "covered"
    time.sleep(0.6)
    assert d.request("dev-b", blob.sha256, (), CHUNK).action == "broadcast"
    _wait_idle(d)
    assert rec.chunks(TOPICS.blob_chunks(blob.sha256)) == list(range(8)) * 2


def test_another_workers_recent_broadcast_counts_as_this_ones_and_the_rest_is_sent(
    distributor: Callable[..., Any], blob: BlobRecord, tmp_path: Path
) -> None:
    """Two distributors on one database (the record of broadcast chunks they share): the chunks the
    first one's broker acknowledged are on their way for the second one too, which sends the devices
    waiting for the whole blob only the chunks the first never got out; once the window has passed,
    a device still waiting gets every chunk again (nothing waits forever)."""
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    store.migrate()
    try:
        first, sent1 = distributor(record=BroadcastRecord(store.add_broadcast_chunks, store.broadcast_chunks_since))
        second, sent2 = distributor(
            record=BroadcastRecord(store.add_broadcast_chunks, store.broadcast_chunks_since), in_flight_max_s=3.0
        )
        topic = TOPICS.blob_chunks(blob.sha256)
        for device in ("dev-a", "dev-b"):
            second.noted(device, blob.sha256, CHUNK)  # the second worker does not serve them (yet)
            first.request(device, blob.sha256, (), CHUNK)
        sent1.fail_next = 4  # chunks 0-3 are never acknowledged: they may not have gone out
        _wait_idle(first)
        assert sent1.chunks(topic) == list(range(8))

        for device in ("dev-a", "dev-b"):
            assert second.request(device, blob.sha256, (), CHUNK, waiting=True).action == "gaps"
        _wait_idle(second)
        assert sent2.chunks(topic) == [0, 1, 2, 3]  # once, for both devices
        assert second.request("dev-a", blob.sha256, (), CHUNK, waiting=True).action == "covered"

        time.sleep(3.1)  # every chunk is older than the second's in_flight_max_s
        assert second.request("dev-a", blob.sha256, (), CHUNK, waiting=True).action == "broadcast"
        _wait_idle(second)
        assert sent2.chunks(topic) == [0, 1, 2, 3, *range(8)]
    finally:
        store.close()
