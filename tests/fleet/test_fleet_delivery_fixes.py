"""Blob delivery under load and failure: the sender survives a broker that drops (paho raises for
messages it cannot send), a wave's requests spread over time share one broadcast, gaps are
gathered and sent after the broadcast (chunks several devices lack are broadcast once more, the
rest unicast), and blob requests are served while the report/telemetry worker is busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fleetkit import random_bytes
from paho.mqtt.enums import CallbackAPIVersion

from slmops_fleet.distribution import BlobDistributor
from slmops_fleet.mqtt import Ingest, _Handle
from slmops_fleet.store.records import BlobRecord
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics

CHUNK = 256 * 1024
TOPICS = Topics("slmops/v1")


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


def test_handle_wait_is_false_for_a_message_paho_could_not_send() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="never-connected")
    info = client.publish("t", b"x", qos=1)  # not connected: paho queues it with rc NO_CONN
    with pytest.raises(RuntimeError):
        info.is_published()
    assert _Handle(info).wait(0.1) is False


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


def test_blob_requests_are_served_while_the_ingest_worker_is_busy(blob: BlobRecord) -> None:
    """A report or telemetry write that takes long does not hold up a wave's blob requests."""

    class Store:
        def devices_may_fetch(self, asks: list[tuple[str, str]]) -> set[tuple[str, str]]:
            return {a for a in asks if a[0] != "dev-stranger"}

    class Distributor:
        def __init__(self) -> None:
            self.got: list[tuple[str, str]] = []

        def request(self, device_id: str, sha256: str, missing: Any, chunk_size: int) -> Any:
            from slmops_fleet.distribution import RequestOutcome

            self.got.append((device_id, sha256))
            return RequestOutcome("broadcast")

    release = threading.Event()
    dist = Distributor()
    ingest = Ingest(Store(), TOPICS, dist, republish=lambda: release.wait(10))  # type: ignore[arg-type]
    ingest.start()
    try:
        ingest.request_republish()  # keeps the report/telemetry worker busy
        for dev in ("dev-1", "dev-2", "dev-stranger"):
            req = fleet_pb2.BlobRequest(device_id=dev, blob_sha256=blob.sha256, chunk_size=CHUNK)
            ingest.on_message(TOPICS.blob_requests(dev), req.SerializeToString())
        deadline = time.monotonic() + 5
        while len(dist.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not release.is_set()
        assert dist.got == [("dev-1", blob.sha256), ("dev-2", blob.sha256)]
        assert not ingest.wait_idle(0.1)  # the republish is still running
        release.set()
        assert ingest.wait_idle(5)
        assert ingest.counters.blob_requests == 3
    finally:
        release.set()
        ingest.stop()


def test_a_full_ingest_queue_holds_the_network_thread_instead_of_dropping() -> None:
    """A burst larger than the queue waits for room (the broker keeps the rest); only a queue that
    stays full past `backpressure_s` drops, and counts it."""
    release = threading.Event()
    ingest = Ingest(
        None,  # type: ignore[arg-type]
        TOPICS,
        None,  # type: ignore[arg-type]
        republish=lambda: release.wait(10),
        queue_bound=1,
        backpressure_s=5.0,
    )
    ingest.start()
    try:
        ingest.request_republish()  # the worker takes it and blocks: the queue is empty again
        time.sleep(0.2)
        ingest.request_republish()  # fills the queue
        burst = threading.Thread(target=ingest.request_republish)  # must wait for room
        burst.start()
        time.sleep(0.3)
        assert burst.is_alive() and ingest.counters.dropped_queue_full == 0
        release.set()
        burst.join(5)
        assert not burst.is_alive() and ingest.wait_idle(5)
        assert ingest.counters.dropped_queue_full == 0
        release.clear()
        ingest.backpressure_s = 0.2
        ingest.request_republish()
        time.sleep(0.2)
        ingest.request_republish()
        ingest.request_republish()  # the queue stays full past the wait: dropped and counted
        assert ingest.counters.dropped_queue_full == 1
    finally:
        release.set()
        ingest.stop()


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
