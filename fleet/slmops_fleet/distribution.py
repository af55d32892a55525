"""Blob delivery: paced broadcasts that devices of a wave share, and unicast repairs.

- A whole-blob request starts a broadcast on `blobs/{sha}/chunks` after a short coalescing
  window; requests for the same blob (and chunk size) that arrive while it is pending or
  running join it: the broker does the fan-out, so a blob goes out about once per wave.
- A request for some chunks gets a unicast of exactly those on `devices/{id}/blobs`.
- One sender thread serves every transfer round-robin, one chunk at a time, paced to
  `rate` bytes/s in total, with at most `max_inflight` chunks published but not yet
  acknowledged by the broker, so neither the fleet's client nor the broker buffers much.
- Bytes and chunks sent are counted per blob (broadcast vs repair) and flushed to the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from slmops_fleet.codec import chunk_to_pb
from slmops_fleet.db import BlobRecord, BlobStatsDelta
from slmops_fleet.settings import MAX_CHUNK, MIN_CHUNK
from slmops_protos.topics import Topics, chunk_count

log = logging.getLogger(__name__)

BROADCAST = "broadcast"
REPAIR = "repair"


class PublishHandle(Protocol):
    def wait(self, timeout: float) -> bool:
        """True once the broker acknowledged the message (QoS 1)."""
        ...


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> PublishHandle: ...

    def wait_connected(self, timeout: float) -> bool: ...


@dataclass
class _Job:
    kind: str
    sha256: str
    size: int
    chunk_size: int
    count: int
    topic: str
    path: Path
    start_at: float
    pending: deque[int]
    members: set[str] = field(default_factory=set)
    started: bool = False
    sent_chunks: int = 0
    file: BinaryIO | None = None

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": self.count,
            "sent": self.sent_chunks,
            "remaining": len(self.pending),
            "devices": sorted(self.members),
            "started": self.started,
        }


@dataclass(frozen=True)
class RequestOutcome:
    action: str  # "broadcast", "joined", "repair", "merged" or "refused"
    detail: str = ""


class BlobDistributor:
    def __init__(
        self,
        topics: Topics,
        publisher: Publisher,
        *,
        blob_lookup: Callable[[str], BlobRecord | None],
        blob_path: Callable[[BlobRecord], Path],
        stats_sink: Callable[[dict[str, BlobStatsDelta]], None],
        default_chunk_size: int,
        rate: int,
        coalesce_window_s: float,
        max_inflight: int,
        ack_timeout_s: float = 30.0,
        disconnected_give_up_s: float = 60.0,
    ) -> None:
        self.topics = topics
        self.publisher = publisher
        self._blob_lookup = blob_lookup
        self._blob_path = blob_path
        self._stats_sink = stats_sink
        self.default_chunk_size = default_chunk_size
        self.rate = rate
        self.coalesce_window_s = coalesce_window_s
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self.disconnected_give_up_s = disconnected_give_up_s
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._broadcasts: dict[tuple[str, int], _Job] = {}
        self._repairs: dict[tuple[str, str, int], _Job] = {}
        self._rr = 0
        self._stats: dict[str, BlobStatsDelta] = {}
        self._stats_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_send = 0.0
        self._inflight: deque[PublishHandle] = deque()

    # --- requests (any thread) ---------------------------------------------------------------

    def request(
        self, device_id: str, sha256: str, missing: tuple[int, ...] | list[int], chunk_size: int
    ) -> RequestOutcome:
        cs = chunk_size or self.default_chunk_size
        if not MIN_CHUNK <= cs <= MAX_CHUNK:
            return self._refuse(device_id, sha256, f"chunk size {cs} is outside {MIN_CHUNK}..{MAX_CHUNK}")
        blob = self._blob_lookup(sha256)
        if blob is None:
            return self._refuse(device_id, sha256, "the fleet has no such blob")
        count = chunk_count(blob.size, cs)
        wanted = sorted({i for i in missing if 0 <= i < count})
        if missing and not wanted:
            return self._refuse(device_id, sha256, f"no valid chunk index (blob has {count} chunks)")
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                return RequestOutcome("refused", "the fleet is stopping")
            if wanted and len(wanted) < count:
                self._count(sha256, partial_requests=1)
                key = (device_id, sha256, cs)
                job = self._repairs.get(key)
                if job is not None:
                    have = set(job.pending)
                    job.pending.extend(i for i in wanted if i not in have)
                    return RequestOutcome("merged", f"{len(job.pending)} chunks queued")
                job = _Job(
                    REPAIR, sha256, blob.size, cs, count, self.topics.device_blobs(device_id),
                    self._blob_path(blob), now, deque(wanted), {device_id},
                )  # fmt: skip
                self._repairs[key] = job
                self._jobs.append(job)
                self._cond.notify_all()
                return RequestOutcome("repair", f"{len(wanted)} chunks")
            self._count(sha256, whole_requests=1)
            job = self._broadcasts.get((sha256, cs))
            if job is not None:
                job.members.add(device_id)
                return RequestOutcome("joined", f"at chunk {job.sent_chunks} of {count}")
            job = _Job(
                BROADCAST, sha256, blob.size, cs, count, self.topics.blob_chunks(sha256),
                self._blob_path(blob), now + self.coalesce_window_s, deque(range(count)), {device_id},
            )  # fmt: skip
            self._broadcasts[(sha256, cs)] = job
            self._jobs.append(job)
            self._count(sha256, broadcasts=1)
            self._cond.notify_all()
            return RequestOutcome("broadcast", f"{count} chunks in {self.coalesce_window_s:.1f} s")

    def _refuse(self, device_id: str, sha256: str, why: str) -> RequestOutcome:
        log.warning("blob request from %s for %s refused: %s", device_id, sha256[:12], why)
        return RequestOutcome("refused", why)

    def active(self) -> list[dict[str, object]]:
        with self._cond:
            return [j.describe() for j in self._jobs]

    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._inflight

    # --- stats --------------------------------------------------------------------------------

    def _count(self, sha256: str, **fields: int) -> None:
        with self._stats_lock:
            d = self._stats.setdefault(sha256, BlobStatsDelta())
            for k, v in fields.items():
                setattr(d, k, getattr(d, k) + v)

    def flush_stats(self) -> None:
        """Add the counters gathered since the last flush to the store (one flush at a time)."""
        with self._flush_lock:
            with self._stats_lock:
                pending, self._stats = self._stats, {}
            if not pending:
                return
            try:
                self._stats_sink(pending)
            except Exception:
                log.exception("could not store transfer counters; keeping them for the next flush")
                with self._stats_lock:
                    for sha, d in pending.items():
                        self._stats.setdefault(sha, BlobStatsDelta()).add(d)

    # --- the sender thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slmops-fleet-blob-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in self._jobs:
                self._close(job)
            self._jobs.clear()
            self._broadcasts.clear()
            self._repairs.clear()
        self.flush_stats()

    def _run(self) -> None:
        while True:
            picked = self._next_chunk()
            if picked is None:
                break
            job, index, last = picked
            try:
                self._send(job, index)
            except Exception:
                log.exception("sending chunk %d of blob %s failed; dropping this transfer", index, job.sha256[:12])
                self._drop(job)
                continue
            if last:
                self._finish(job)

    def _next_chunk(self) -> tuple[_Job, int, bool] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                ready = [j for j in self._jobs if j.start_at <= now and j.pending]
                if ready:
                    job = ready[self._rr % len(ready)]
                    self._rr += 1
                    if not job.started:
                        job.started = True
                        log.info(
                            "%s of blob %s: %d chunks to %s",
                            job.kind, job.sha256[:12], len(job.pending), ", ".join(sorted(job.members)),
                        )  # fmt: skip
                    index = job.pending.popleft()
                    last = not job.pending
                    if last:
                        # From here a new request starts a new transfer instead of joining this one.
                        self._unregister(job)
                    return job, index, last
                waits = [j.start_at - now for j in self._jobs if j.pending]
                self._cond.wait(timeout=max(0.01, min(waits)) if waits else None)

    def _unregister(self, job: _Job) -> None:
        if job.kind == BROADCAST:
            if self._broadcasts.get((job.sha256, job.chunk_size)) is job:
                del self._broadcasts[(job.sha256, job.chunk_size)]
        else:
            key = (next(iter(job.members)), job.sha256, job.chunk_size)
            if self._repairs.get(key) is job:
                del self._repairs[key]

    def _drop(self, job: _Job) -> None:
        with self._cond:
            self._unregister(job)
            if job in self._jobs:
                self._jobs.remove(job)
            self._close(job)

    def _finish(self, job: _Job) -> None:
        self._drain_inflight(0)
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._close(job)
        log.info("%s of blob %s done: %d chunks", job.kind, job.sha256[:12], job.sent_chunks)
        self.flush_stats()

    @staticmethod
    def _close(job: _Job) -> None:
        if job.file is not None:
            job.file.close()
            job.file = None

    def _read(self, job: _Job, index: int) -> bytes:
        if job.file is None:
            job.file = job.path.open("rb")
        job.file.seek(index * job.chunk_size)
        want = min(job.chunk_size, job.size - index * job.chunk_size)
        data = job.file.read(want)
        if len(data) != want:
            raise OSError(f"blob file {job.path} is shorter than its recorded size")
        return data

    def _pace(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        if self._next_send < now - 0.25:  # idle: allow a small burst, no debt
            self._next_send = now - 0.25
        wait = self._next_send - now
        if wait > 0:
            time.sleep(wait)
        self._next_send += nbytes / self.rate

    def _drain_inflight(self, keep: int) -> None:
        """Wait until at most `keep` chunks are unacknowledged."""
        while len(self._inflight) > keep:
            handle = self._inflight[0]
            if handle.wait(self.ack_timeout_s):
                self._inflight.popleft()
                continue
            if not self._wait_connected():
                log.warning("broker unreachable: giving up %d unacknowledged chunks", len(self._inflight))
                self._inflight.clear()
                return

    def _wait_connected(self) -> bool:
        deadline = time.monotonic() + self.disconnected_give_up_s
        while not self._stopping and time.monotonic() < deadline:
            if self.publisher.wait_connected(1.0):
                return True
        return False

    def _send(self, job: _Job, index: int) -> None:
        if not self.publisher.wait_connected(0) and not self._wait_connected():
            raise ConnectionError("not connected to the broker")
        data = self._read(job, index)
        payload = chunk_to_pb(job.sha256, index, job.count, job.size, job.chunk_size, data)
        self._drain_inflight(self.max_inflight - 1)
        self._pace(len(data))
        self._inflight.append(self.publisher.publish(job.topic, payload, qos=1))
        job.sent_chunks += 1
        if job.kind == BROADCAST:
            self._count(job.sha256, broadcast_bytes=len(data), broadcast_chunks=1)
        else:
            self._count(job.sha256, repair_bytes=len(data), repair_chunks=1)
