"""Telemetry: a sampler thread, a bounded SQLite queue (`telemetry.db`), delivery over MQTT.

Samples are written to the queue first and deleted only after the broker acknowledged the
batch that carried them (QoS 1 PUBACK), so nothing is lost while the broker is away. Past the
bound the oldest samples are dropped and the drop is counted (`dropped_total`, persisted).
Delivery is at least once: a batch whose acknowledgement was lost is sent again, and the
fleet de-duplicates by (device id, seq).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmops_agent.codec import sample_to_pb
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.states import UpdateState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    timestamp_unix_ms: int
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_free_bytes: int
    temperature_c: float | None
    requests_total: int
    errors_total: int
    tokens_per_s: float
    ttft_ms: float
    queue_depth: int
    update_state: UpdateState
    active_package_id: str


class TelemetryQueue:
    """Samples waiting for delivery, oldest first, at most `bound` of them."""

    def __init__(self, path: Path, bound: int) -> None:
        self.path = path
        self.bound = bound
        self._lock = threading.Lock()
        import sqlite3  # only an enrolled agent queues telemetry

        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped_total', 0)")

    def put(self, sample: Sample) -> int:
        """Queue a sample; return its seq. Drops (and counts) the oldest past the bound."""
        body = sample_to_pb(sample).SerializeToString()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("INSERT INTO samples (body) VALUES (?)", (body,)).lastrowid or 0
                (count,) = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
                excess = count - self.bound
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM samples WHERE seq IN (SELECT seq FROM samples ORDER BY seq LIMIT ?)", (excess,)
                    )
                    self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (excess,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(seq)

    def peek(self, limit: int) -> list[fleet_pb2.TelemetrySample]:
        with self._lock:
            rows = self._db.execute("SELECT seq, body FROM samples ORDER BY seq LIMIT ?", (limit,)).fetchall()
        out = []
        for seq, body in rows:
            msg = fleet_pb2.TelemetrySample.FromString(body)
            msg.seq = seq
            out.append(msg)
        return out

    def delete_upto(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM samples WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
        return int(count)

    @property
    def dropped_total(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT value FROM meta WHERE key = 'dropped_total'").fetchone()
        return int(value)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_temperature() -> float | None:
    import psutil

    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    for name in ("coretemp", "k10temp", "cpu_thermal", "cpu-thermal", "soc_thermal", "acpitz"):
        if sensors.get(name):
            return float(max(s.current for s in sensors[name]))
    for readings in sensors.values():
        if readings:
            return float(max(s.current for s in readings))
    return None


class Telemetry:
    """The sampler thread: every `interval_s` a sample into the queue, then delivery while connected."""

    def __init__(
        self,
        queue: TelemetryQueue,
        *,
        device_id: str,
        interval_s: float,
        batch: int,
        collect: Callable[[], Sample],
        publish: Callable[[fleet_pb2.TelemetryBatch, float], bool],
        is_connected: Callable[[], bool],
        ack_timeout_s: float = 10.0,
    ) -> None:
        self.queue = queue
        self.device_id = device_id
        self.interval_s = interval_s
        self.batch = batch
        self.collect = collect
        self.publish = publish
        self.is_connected = is_connected
        self.ack_timeout_s = ack_timeout_s
        self.batches_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slmops-telemetry", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Take a last sample and try to deliver what is queued within the timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + self.ack_timeout_s + 5)
            self._thread = None
        try:
            self.sample()
        except Exception:
            log.exception("last telemetry sample failed")
        self.flush(deadline=time.monotonic() + flush_timeout_s)

    def sample(self) -> int:
        return self.queue.put(self.collect())

    def flush(self, deadline: float | None = None) -> int:
        """Send queued samples in batches while connected; return how many were acknowledged."""
        sent = 0
        while self.is_connected() and (deadline is None or time.monotonic() < deadline):
            samples = self.queue.peek(self.batch)
            if not samples:
                break
            msg = fleet_pb2.TelemetryBatch(
                device_id=self.device_id, samples=samples, dropped_total=self.queue.dropped_total
            )
            timeout = (
                self.ack_timeout_s
                if deadline is None
                else max(0.1, min(self.ack_timeout_s, deadline - time.monotonic()))
            )
            if not self.publish(msg, timeout):
                break
            self.queue.delete_upto(samples[-1].seq)
            self.batches_sent += 1
            sent += len(samples)
        return sent

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_at:
                next_at = now + self.interval_s
                try:
                    self.sample()
                except Exception:
                    log.exception("telemetry sample failed")
            try:
                self.flush()
            except Exception:
                log.exception("telemetry delivery failed")
            self._stop.wait(max(0.05, min(1.0, next_at - time.monotonic())))
