"""The ingest worker: turns what devices send over MQTT into store rows and blob transfers.

The paho network thread only parses payloads and queues them. The queues are bounded: when one is
full the network thread waits for room (up to `backpressure_s`, well inside the keepalive), so
paho stops reading and the broker holds the rest of the burst (QoS 1, nothing acknowledged is
lost to a burst); only past that wait is a message dropped and counted. One worker thread writes
reports and inserts telemetry in batches; blob requests have their own queue and thread, so that
a wave's requests reach the distributor together instead of one per report written.

Each message is acknowledged to the broker (`ack`, manual acknowledgement) only once what it says is
committed (or it was refused or dropped): a worker killed before its commit leaves it in its broker
session for a restart or another worker to take (`workers`). Applying one twice is harmless
(telemetry samples are unique per device and sequence number; a report sets states).
With several workers only the one sending blobs (`serves_blobs`) serves blob requests.

What one device may send is bounded before it is queued: a telemetry batch with more samples than
`max_telemetry_samples` is refused whole (no agent sends one; keeping part of it would store what a
broken or hostile device chose), and blob requests pass `device_limits.BlobRequestPolicy`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from slmops_fleet.codec import (
    BlobRequestIn,
    CredentialsAckIn,
    PayloadError,
    TelemetryIn,
    TooManySamples,
    blob_request_from_pb,
    credentials_ack_from_pb,
    reported_from_pb,
    telemetry_from_pb,
)
from slmops_fleet.device_limits import BlobRequestPolicy, WindowedLog
from slmops_fleet.distribution import BlobDistributor
from slmops_fleet.mqtt_client import Ack
from slmops_fleet.store import Store
from slmops_fleet.store.records import ReportedUpdate, TelemetryRecord
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class IngestCounters:
    reported: int = 0
    telemetry_batches: int = 0
    telemetry_samples: int = 0
    telemetry_refused: int = 0  # batches with more samples than `max_telemetry_samples`, refused whole
    blob_requests: int = 0
    malformed: int = 0
    unknown_device: int = 0
    dropped_queue_full: int = 0
    blob_requests_elsewhere: int = 0  # left to the worker that sends blobs


def _no_ack() -> None:
    return None


_REPUBLISH = object()


def _retrying(write: Callable[[], T], attempts: int = 4) -> T:
    """`write` (idempotent), tried again after a failure: a deadlock or a lost connection between fleet
    workers writing the same devices is worth a second try, not a lost report or sample."""
    for attempt in range(attempts - 1):
        try:
            return write()
        except Exception as exc:
            log.warning("a store write failed (%s); again", str(exc).splitlines()[0][:200])
            time.sleep(0.1 * 3**attempt)
    return write()


class Ingest:
    """Parses device messages (network thread) and applies them (one worker thread)."""

    def __init__(
        self,
        store: Store,
        topics: Topics,
        distributor: BlobDistributor,
        *,
        republish: Callable[[], None],
        on_credentials_ack: Callable[[CredentialsAckIn], object] | None = None,
        blob_policy: BlobRequestPolicy | None = None,
        max_telemetry_samples: int | None = None,
        serves_blobs: Callable[[], bool] | None = None,
        queue_bound: int = 10_000,
        telemetry_batch: int = 5000,
        report_batch: int = 500,
        telemetry_flush_s: float = 1.0,
        backpressure_s: float = 10.0,
    ) -> None:
        self.store = store
        self.topics = topics
        self.distributor = distributor
        self._republish = republish
        self._on_credentials_ack = on_credentials_ack
        self.blob_policy = blob_policy
        self.max_telemetry_samples = max_telemetry_samples
        self.serves_blobs = serves_blobs
        self._warn = WindowedLog(60.0)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_bound)
        self._requests: queue.Queue[Any] = queue.Queue(maxsize=queue_bound)
        self.telemetry_batch = telemetry_batch
        self.report_batch = report_batch
        self.telemetry_flush_s = telemetry_flush_s
        self.backpressure_s = backpressure_s
        self.counters = IngestCounters()
        self._thread: threading.Thread | None = None
        self._request_thread: threading.Thread | None = None
        self._stop = object()
        self._processed = threading.Condition()
        self._pending = 0

    # --- network thread -------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, ack: Ack = _no_ack) -> None:
        item = self._parse(topic, payload)
        if item is None or isinstance(item, BlobRequestIn):
            ack()  # refused or dropped, or a blob request (a device asks again after its stall timer)
            ack = _no_ack
        if item is not None:
            self._put(item, ack)

    def _parse(self, topic: str, payload: bytes) -> Any:
        device_id = self.topics.device_of(topic)
        if device_id is None:
            return None
        kind = topic.rsplit("/", 1)[-1]
        try:
            if kind == "reported":
                return reported_from_pb(device_id, payload)
            if kind == "telemetry":
                return telemetry_from_pb(device_id, payload, self.max_telemetry_samples)
            if kind == "blob-requests":
                item = blob_request_from_pb(device_id, payload)
                return self.blob_policy.admit(item) if self.blob_policy is not None else item
            if kind == "credentials-ack" and self._on_credentials_ack is not None:
                return credentials_ack_from_pb(device_id, payload)
            return None
        except TooManySamples as exc:
            self.counters.telemetry_refused += 1
            self._warn.warning(f"{device_id} telemetry", "refused a telemetry batch from %s: %s", device_id, exc)
        except PayloadError as exc:
            self.counters.malformed += 1
            log.warning("dropping a message on %s: %s", topic, exc)
        return None

    def queue_depths(self) -> tuple[int, int]:
        """Items waiting: (reports and telemetry, blob requests)."""
        return self._queue.qsize(), self._requests.qsize()

    def request_republish(self) -> None:
        self._put(_REPUBLISH, _no_ack)

    def _put(self, item: Any, ack: Ack) -> None:
        with self._processed:
            self._pending += 1
        try:
            target = self._requests if isinstance(item, BlobRequestIn) else self._queue
            target.put((item, ack), timeout=self.backpressure_s)
        except queue.Full:
            with self._processed:
                self._pending -= 1
            ack()
            self.counters.dropped_queue_full += 1
            log.warning("ingest queue full: dropped a %s", type(item).__name__)

    # --- worker thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slmops-fleet-ingest", daemon=True)
        self._thread.start()
        self._request_thread = threading.Thread(
            target=self._run_requests, name="slmops-fleet-blob-requests", daemon=True
        )
        self._request_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._queue.put((self._stop, _no_ack))
        self._requests.put((self._stop, _no_ack))
        self._thread.join(timeout)
        if self._request_thread is not None:
            self._request_thread.join(timeout)
        self._thread = self._request_thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far is applied (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._processed:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._processed.wait(left)
        return True

    def _run(self) -> None:
        samples: list[TelemetryRecord] = []
        dropped: dict[str, int] = {}
        acks: list[Ack] = []  # of the telemetry messages whose samples wait in `samples`
        held = 0  # telemetry messages whose samples wait in `samples`
        deadline = 0.0
        carry: Any = None  # an item taken from the queue while gathering reports, handled next
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if held else None
            ack: Ack = _no_ack
            if carry is not None:
                (item, ack), carry = carry, None
            else:
                try:
                    item, ack = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
            if isinstance(item, TelemetryIn):
                acks.append(ack)
                if not held:
                    deadline = time.monotonic() + self.telemetry_flush_s
                samples.extend(item.samples)
                dropped[item.device_id] = item.dropped_total
                held += 1
                self.counters.telemetry_batches += 1
                if len(samples) < self.telemetry_batch:
                    continue
            if held:  # the batch is full, its time is up, or another kind of message came
                self._flush_telemetry(samples, dropped)
                for done in acks:
                    done()
                samples, dropped, acks = [], {}, []
                self._done(held)
                held = 0
            if item is None or isinstance(item, TelemetryIn):
                continue
            if item is self._stop:
                return
            if isinstance(item, ReportedUpdate):
                carry = self._apply_reports(item, ack)
                continue
            try:
                self._apply(item)
            except Exception:
                log.exception("applying %s failed", type(item).__name__)
            finally:
                ack()
                self._done(1)

    def _apply_reports(self, first: ReportedUpdate, first_ack: Ack) -> Any:
        """Apply `first` and the reports queued right behind it in one store transaction (up to
        `report_batch`); return the (item, ack) that ended the run (None when the queue ran dry)."""
        reports, acks, after = [first], [first_ack], None
        while len(reports) < self.report_batch:
            try:
                item, ack = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, ReportedUpdate):
                after = (item, ack)
                break
            reports.append(item)
            acks.append(ack)
        try:
            known = _retrying(lambda: self.store.apply_reported_many(reports))
            self.counters.reported += len(reports)
            for rep, ok in zip(reports, known, strict=True):
                if not ok:
                    self.counters.unknown_device += 1
                    log.warning("report from unknown device %s ignored", rep.device_id)
        except Exception:
            log.exception("applying %d reports failed", len(reports))
        finally:
            for ack in acks:
                ack()
            self._done(len(reports))
        return after

    def _done(self, n: int) -> None:
        if n:
            with self._processed:
                self._pending -= n
                self._processed.notify_all()

    def _flush_telemetry(self, samples: list[TelemetryRecord], dropped: dict[str, int]) -> None:
        try:
            _retrying(lambda: self.store.insert_telemetry(samples, dropped))
            self.counters.telemetry_samples += len(samples)
        except Exception:
            log.exception("storing %d telemetry samples failed", len(samples))

    def _apply(self, item: Any) -> None:
        if item is _REPUBLISH:
            self._republish()
        elif isinstance(item, CredentialsAckIn) and self._on_credentials_ack is not None:
            self._on_credentials_ack(item)

    def _run_requests(self) -> None:
        """Blob requests, as many as are queued at a time: one store query checks them all."""
        while True:
            batch = [self._requests.get()[0]]
            while len(batch) < 1000:
                try:
                    batch.append(self._requests.get_nowait()[0])
                except queue.Empty:
                    break
            stop = any(item is self._stop for item in batch)
            requests: list[BlobRequestIn] = [item for item in batch if item is not self._stop]
            try:
                self._serve_requests(requests)
            except Exception:
                log.exception("serving %d blob requests failed", len(requests))
            finally:
                self._done(len(requests))
            if stop:
                return

    def _serve_requests(self, requests: list[BlobRequestIn]) -> None:
        self.counters.blob_requests += len(requests)
        if requests and self.serves_blobs is not None and not self.serves_blobs():
            self.counters.blob_requests_elsewhere += len(requests)
            for item in requests:  # should this worker serve them later (`in_flight`)
                self.distributor.noted(item.device_id, item.sha256, item.chunk_size)
            return
        allowed = self.store.devices_may_fetch([(r.device_id, r.sha256) for r in requests])
        for item in requests:
            if (item.device_id, item.sha256) not in allowed:
                log.warning(
                    "blob request from %s for %s refused: not in its desired package", item.device_id, item.sha256[:12]
                )
                continue
            outcome = self.distributor.request(
                item.device_id, item.sha256, item.missing, item.chunk_size, waiting=item.waiting
            )
            log.info(
                "blob request from %s for %s (%s): %s %s",
                item.device_id,
                item.sha256[:12],
                (f"{len(item.missing)} chunks" if item.missing else "whole") + (", waiting" if item.waiting else ""),
                outcome.action,
                outcome.detail,
            )
