"""The fleet's MQTT side: one paho-mqtt threaded client (to the embedded or an external broker)
and the ingest worker that turns what devices send into store rows and blob transfers.

- The client reconnects by itself with capped exponential back-off and full jitter, and
  subscribes again on every connect; after each connect the fleet republishes every device's
  newest desired state (retained, QoS 1): the embedded broker keeps retained messages only in
  memory, and republishing is idempotent for devices (same generation).
- The paho network thread only parses payloads and queues them. The queues are bounded: when one
  is full the network thread waits for room (up to `backpressure_s`, well inside the keepalive),
  so paho stops reading and the broker holds the rest of the burst (QoS 1, nothing acknowledged
  is lost to a burst); only past that wait is a message dropped and counted. One worker thread
  writes reports and inserts telemetry in batches; blob requests have their own queue and thread, so that a wave's
  requests reach the distributor together instead of one per report written.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from slmops_fleet.codec import (
    BlobRequestIn,
    PayloadError,
    TelemetryIn,
    blob_request_from_pb,
    reported_from_pb,
    telemetry_from_pb,
)
from slmops_fleet.distribution import BlobDistributor
from slmops_fleet.store import Store
from slmops_fleet.store.records import ReportedUpdate, TelemetryRecord
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)


class _Handle:
    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    def wait(self, timeout: float) -> bool:
        """False if the message is not acknowledged within `timeout`, or never will be (paho raises
        for a message it could not send: not connected, queue full)."""
        try:
            if self._info.is_published():
                return True
            self._info.wait_for_publish(timeout)
            return self._info.is_published()
        except (RuntimeError, ValueError):
            return False


@dataclass(frozen=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None
    password: str | None


class FleetMqtt:
    """The fleet's paho client. `on_message(topic, payload)` runs in paho's network thread."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        topics: Topics,
        *,
        client_id: str,
        clean_session: bool,
        on_message: Callable[[str, bytes], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        keepalive_s: int = 30,
        reconnect_max_s: int = 30,
        max_inflight: int = 32,
    ) -> None:
        self.endpoint = endpoint
        self.topics = topics
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.keepalive_s = keepalive_s
        self.reconnect_max_s = reconnect_max_s
        self._connected = threading.Event()
        self._attempt = 0
        self._stopping = False
        self.last_error: str | None = None
        self.connects = 0
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if endpoint.username is not None:
            c.username_pw_set(endpoint.username, endpoint.password)
        c.max_inflight_messages_set(max_inflight)
        c.reconnect_delay_set(1, 1)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        self.client = c

    # --- lifecycle ------------------------------------------------------------------------------

    def set_handlers(
        self, on_message: Callable[[str, bytes], None], on_connected: Callable[[], None] | None = None
    ) -> None:
        """Set the callbacks (before `start`)."""
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected

    def start(self) -> None:
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self.keepalive_s)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        if timeout <= 0:
            return self._connected.is_set()
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def unacknowledged(self) -> int:
        """Messages the fleet published that the broker has not acknowledged yet (paho's queue,
        with those past its in-flight window: a rollout's desired states wait there)."""
        return len(self.client._out_messages)

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Handle:
        """Thread-safe. While disconnected, QoS 1 messages wait in paho's queue and go out on reconnect."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish on %s failed: %s", topic, paho.error_string(info.rc))
        return _Handle(info)

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _backoff(self) -> None:
        """Capped exponential back-off with full jitter, so a fleet does not reconnect in lockstep."""
        self._attempt += 1
        cap = max(1, min(self.reconnect_max_s, 2 ** min(self._attempt, 16)))
        delay = random.randint(1, cap)
        self.client.reconnect_delay_set(delay, delay)

    def _on_connect(self, client: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("MQTT: %s (user %r)", self.last_error, self.endpoint.username)
            self._backoff()
            return
        self._attempt = 0
        self.last_error = None
        self.connects += 1
        client.subscribe([(t, 1) for t in self.topics.fleet_subscriptions()])
        self._connected.set()
        log.info("MQTT connected to %s:%d", self.endpoint.host, self.endpoint.port)
        if self._on_connected_cb is not None:
            self._on_connected_cb()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if not self._stopping:
            self.last_error = f"disconnected: {reason}"
            log.warning("MQTT disconnected from %s:%d (%s)", self.endpoint.host, self.endpoint.port, reason)
            self._backoff()

    def _on_connect_fail(self, _c: paho.Client, _u: Any) -> None:
        self.last_error = f"cannot connect to {self.endpoint.host}:{self.endpoint.port}"
        log.warning("MQTT: %s", self.last_error)
        self._backoff()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message_cb is None:
            return
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("handling a message on %s failed", msg.topic)


@dataclass
class IngestCounters:
    reported: int = 0
    telemetry_batches: int = 0
    telemetry_samples: int = 0
    blob_requests: int = 0
    malformed: int = 0
    unknown_device: int = 0
    dropped_queue_full: int = 0


_REPUBLISH = object()


class Ingest:
    """Parses device messages (network thread) and applies them (one worker thread)."""

    def __init__(
        self,
        store: Store,
        topics: Topics,
        distributor: BlobDistributor,
        *,
        republish: Callable[[], None],
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

    def on_message(self, topic: str, payload: bytes) -> None:
        device_id = self.topics.device_of(topic)
        if device_id is None:
            return
        kind = topic.rsplit("/", 1)[-1]
        try:
            item: Any
            if kind == "reported":
                item = reported_from_pb(device_id, payload)
            elif kind == "telemetry":
                item = telemetry_from_pb(device_id, payload)
            elif kind == "blob-requests":
                item = blob_request_from_pb(device_id, payload)
            else:
                return
        except PayloadError as exc:
            self.counters.malformed += 1
            log.warning("dropping a message on %s: %s", topic, exc)
            return
        self._put(item)

    def request_republish(self) -> None:
        self._put(_REPUBLISH)

    def _put(self, item: Any) -> None:
        with self._processed:
            self._pending += 1
        try:
            (self._requests if isinstance(item, BlobRequestIn) else self._queue).put(item, timeout=self.backpressure_s)
        except queue.Full:
            with self._processed:
                self._pending -= 1
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
        self._queue.put(self._stop)
        self._requests.put(self._stop)
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
        held = 0  # telemetry messages whose samples wait in `samples`
        deadline = 0.0
        carry: Any = None  # an item taken from the queue while gathering reports, handled next
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if held else None
            if carry is not None:
                item, carry = carry, None
            else:
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
            if isinstance(item, TelemetryIn):
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
                samples, dropped = [], {}
                self._done(held)
                held = 0
            if item is None or isinstance(item, TelemetryIn):
                continue
            if item is self._stop:
                return
            if isinstance(item, ReportedUpdate):
                carry = self._apply_reports(item)
                continue
            try:
                self._apply(item)
            except Exception:
                log.exception("applying %s failed", type(item).__name__)
            finally:
                self._done(1)

    def _apply_reports(self, first: ReportedUpdate) -> Any:
        """Apply `first` and the reports queued right behind it in one store transaction (up to
        `report_batch`); return the item that ended the run (None when the queue ran dry)."""
        reports, after = [first], None
        while len(reports) < self.report_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, ReportedUpdate):
                after = item
                break
            reports.append(item)
        try:
            known = self.store.apply_reported_many(reports)
            self.counters.reported += len(reports)
            for rep, ok in zip(reports, known, strict=True):
                if not ok:
                    self.counters.unknown_device += 1
                    log.warning("report from unknown device %s ignored", rep.device_id)
        except Exception:
            log.exception("applying %d reports failed", len(reports))
        finally:
            self._done(len(reports))
        return after

    def _done(self, n: int) -> None:
        if n:
            with self._processed:
                self._pending -= n
                self._processed.notify_all()

    def _flush_telemetry(self, samples: list[TelemetryRecord], dropped: dict[str, int]) -> None:
        try:
            self.store.insert_telemetry(samples, dropped)
            self.counters.telemetry_samples += len(samples)
        except Exception:
            log.exception("storing %d telemetry samples failed", len(samples))

    def _apply(self, item: Any) -> None:
        if item is _REPUBLISH:
            self._republish()

    def _run_requests(self) -> None:
        """Blob requests, as many as are queued at a time: one store query checks them all."""
        while True:
            batch = [self._requests.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._requests.get_nowait())
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
        allowed = self.store.devices_may_fetch([(r.device_id, r.sha256) for r in requests])
        for item in requests:
            if (item.device_id, item.sha256) not in allowed:
                log.warning(
                    "blob request from %s for %s refused: not in its desired package", item.device_id, item.sha256[:12]
                )
                continue
            outcome = self.distributor.request(item.device_id, item.sha256, item.missing, item.chunk_size)
            log.info(
                "blob request from %s for %s (%s): %s %s",
                item.device_id,
                item.sha256[:12],
                f"{len(item.missing)} chunks" if item.missing else "whole",
                outcome.action,
                outcome.detail,
            )
