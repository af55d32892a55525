"""The ingest worker: blob requests are served while the report/telemetry worker is busy, and a full
queue holds the network thread (the broker keeps the rest of a burst) before anything is dropped."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from slmops_fleet.ingest import Ingest
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics

CHUNK = 256 * 1024
TOPICS = Topics("slmops/v1")
SHA = hashlib.sha256(b"a blob").hexdigest()


def test_blob_requests_are_served_while_the_ingest_worker_is_busy() -> None:
    """A report or telemetry write that takes long does not hold up a wave's blob requests."""

    class Store:
        def devices_may_fetch(self, asks: list[tuple[str, str]]) -> set[tuple[str, str]]:
            return {a for a in asks if a[0] != "dev-stranger"}

    class Distributor:
        def __init__(self) -> None:
            self.got: list[tuple[str, str]] = []

        def request(self, device_id: str, sha256: str, missing: Any, chunk_size: int, *, waiting: bool = False) -> Any:
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
            req = fleet_pb2.BlobRequest(device_id=dev, blob_sha256=SHA, chunk_size=CHUNK)
            ingest.on_message(TOPICS.blob_requests(dev), req.SerializeToString())
        deadline = time.monotonic() + 5
        while len(dist.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not release.is_set()
        assert dist.got == [("dev-1", SHA), ("dev-2", SHA)]
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
