"""Blob delivery: paced broadcasts that devices of a wave share, and unicast repairs.

- A whole-blob request starts a broadcast on `blobs/{sha}/chunks` after a coalescing window
  that each further request extends (up to `coalesce_max_s` after the first one, later while the
  broker says it is still delivering, up to `in_flight_max_s`); requests for the same blob
  (all in the fleet's chunk size: `device_limits`) that come while it is pending or running join
  it: the broker does the fan-out, so a blob goes out about once per wave. A device that joins a
  running broadcast keeps the rest of it and asks for its gaps afterwards.
- Requests for some chunks (gaps) are gathered per blob: chunks that a pending or running
  broadcast of the blob will still send are dropped from them, and the rest wait until no
  broadcast of the blob runs and the coalescing window has passed. Then chunks that several
  devices lack are broadcast once more (only those chunks), and the others go by unicast on
  `devices/{id}/blobs`.
- A device's newest gap request replaces its earlier one (it lists what the device lacks now).
  Chunks that may still be on their way to the device (`in_flight.DeliveryLog`: broadcast after it
  started fetching, while the broker reports it is still delivering, or, where the broker cannot
  say, after every chunk the device has when it marks its request `waiting`) are dropped from its
  requests; a whole-blob request for which every chunk is on its way is answered by nothing, one for
  which some are is gathered as gaps for the others. The device asks again after its stall timer
  if they never come.
- One sender thread serves every transfer round-robin, one chunk at a time, paced to
  `rate` bytes/s in total, with at most `max_inflight` chunks published but not yet
  acknowledged by the broker, so neither the fleet's client nor the broker buffers much. Where
  the broker tells its backlog, the sender also waits while more deliveries are unacknowledged
  than devices are connected (about one chunk per device), so a broadcast goes no faster than
  the devices take it in.
- Bytes and chunks sent are counted per blob (broadcast vs repair) and flushed to the store; with
  several workers the broadcast chunks are recorded there too (`broadcast_record`).
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

from slmops_fleet.broadcast_record import BroadcastRecord
from slmops_fleet.codec import chunk_to_pb
from slmops_fleet.in_flight import DeliveryLog
from slmops_fleet.settings import MAX_CHUNK, MIN_CHUNK
from slmops_fleet.store.records import BlobRecord, BlobStatsDelta
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
    full: bool = True  # a broadcast of every chunk (whole-blob requests may join it)
    first_request: float = 0.0
    started: bool = False
    sent_chunks: int = 0
    sending: int | None = None  # the chunk taken from `pending` and not yet published
    file: BinaryIO | None = None

    def to_send(self) -> set[int]:
        """The chunks this job will still publish."""
        return {*self.pending, *(() if self.sending is None else (self.sending,))}

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": self.count,
            "sent": self.sent_chunks,
            "remaining": len(self.to_send()),
            "devices": sorted(self.members),
            "started": self.started,
        }


@dataclass
class _Gaps:
    """Chunks of one blob (at one chunk size) that devices asked for, waiting to be sent."""

    blob: BlobRecord
    chunk_size: int
    count: int
    since: float
    wants: dict[str, set[int]] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        return {
            "kind": "gaps",
            "sha256": self.blob.sha256,
            "chunk_size": self.chunk_size,
            "chunks": self.count,
            "remaining": len(set().union(*self.wants.values())),
            "devices": sorted(self.wants),
            "started": False,
        }


@dataclass(frozen=True)
class RequestOutcome:
    action: str  # "broadcast", "joined", "gaps", "covered" or "refused"
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
        coalesce_max_s: float | None = None,
        rebroadcast_min_devices: int = 2,
        ack_timeout_s: float = 30.0,
        disconnected_give_up_s: float = 60.0,
        broker_backlog: Callable[[], tuple[int, int]] | None = None,
        idle_backlog: int = 16,
        min_paced_backlog: int = 64,
        settle_s: float = 2.0,
        in_flight_max_s: float = 60.0,
        record: BroadcastRecord | None = None,
    ) -> None:
        self.topics = topics
        self.publisher = publisher
        self._blob_lookup = blob_lookup
        self._blob_path = blob_path
        self._stats_sink = stats_sink
        self.default_chunk_size = default_chunk_size
        self.rate = rate
        self.coalesce_window_s = coalesce_window_s
        self.coalesce_max_s = max(coalesce_window_s, coalesce_max_s if coalesce_max_s is not None else 0.0)
        self.rebroadcast_min_devices = rebroadcast_min_devices
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self.disconnected_give_up_s = disconnected_give_up_s
        self._broker_backlog = broker_backlog
        self.idle_backlog = idle_backlog
        self.min_paced_backlog = min_paced_backlog
        self.in_flight_max_s = in_flight_max_s
        self._log = DeliveryLog(
            backlog_known=broker_backlog is not None, settle_s=settle_s, in_flight_max_s=in_flight_max_s
        )
        self._record = record  # the broadcasts of every worker on the database (several workers)
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []
        self._broadcasts: dict[tuple[str, int], _Job] = {}  # full broadcasts, by (sha256, chunk size)
        self._rebroadcasts: dict[tuple[str, int], _Job] = {}  # broadcasts of some chunks
        self._repairs: dict[tuple[str, str, int], _Job] = {}  # unicasts, by (device, sha256, chunk size)
        self._gaps: dict[tuple[str, int], _Gaps] = {}
        self._blobs: dict[str, BlobRecord] = {}  # blobs are immutable: found once, kept
        self._rr = 0
        self._stats: dict[str, BlobStatsDelta] = {}
        self._stats_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_send = 0.0
        # Chunks published and not yet acknowledged, with the broadcast send they were (for `unsent`).
        self._inflight: deque[tuple[PublishHandle, tuple[str, int] | None, int, float]] = deque()

    # --- requests (any thread) ---------------------------------------------------------------

    def request(
        self,
        device_id: str,
        sha256: str,
        missing: tuple[int, ...] | list[int],
        chunk_size: int,
        *,
        waiting: bool = False,
    ) -> RequestOutcome:
        """Serve a device's request for a blob (`missing` empty: the whole blob); `waiting`: the device
        says what it lacks may still be on its way (`BlobRequest.waiting`)."""
        cs = chunk_size or self.default_chunk_size
        if not MIN_CHUNK <= cs <= MAX_CHUNK:
            return self._refuse(device_id, sha256, f"chunk size {cs} is outside {MIN_CHUNK}..{MAX_CHUNK}")
        blob = self._blobs.get(sha256) or self._blob_lookup(sha256)
        if blob is None:
            return self._refuse(device_id, sha256, "the fleet has no such blob")
        count = chunk_count(blob.size, cs)
        wanted = sorted({i for i in missing if 0 <= i < count})
        if missing and not wanted:
            return self._refuse(device_id, sha256, f"no valid chunk index (blob has {count} chunks)")
        now = time.monotonic()
        key = (sha256, cs)
        self._merge_record(key, now)
        with self._cond:
            if self._stopping:
                return RequestOutcome("refused", "the fleet is stopping")
            self._blobs[sha256] = blob
            first = self._log.asked(key, device_id, now)
            if wanted and len(wanted) < count:
                self._count(sha256, partial_requests=1)
                return self._add_gaps(device_id, blob, cs, count, wanted, now, trusted=waiting)
            self._count(sha256, whole_requests=1)
            if self._log.has_sent(key):
                self._busy()  # refreshes when the broker was last seen busy
            if self._log.all_on_the_way(key, count, device_id, now):
                return RequestOutcome("covered", "a broadcast of every chunk is still being delivered")
            job = self._broadcasts.get(key)
            if job is None and not self._log.backlog_known and (waiting or first):
                on_way = self._log.on_the_way(key, device_id, now, have=set(), trusted=True)
                if len(on_way) == count:
                    return RequestOutcome("covered", "every chunk was broadcast since it started fetching")
                if on_way:  # the rest as gaps, gathered with other devices'
                    return self._add_gaps(device_id, blob, cs, count, list(range(count)), now, trusted=True)
            if job is not None:
                job.members.add(device_id)
                if not job.started:  # another device of the wave: wait a little longer for the rest
                    job.start_at = min(now + self.coalesce_window_s, job.first_request + self.coalesce_max_s)
                    return RequestOutcome("joined", "before it started")
                return RequestOutcome("joined", f"at chunk {job.sent_chunks} of {count}")
            job = _Job(
                BROADCAST, sha256, blob.size, cs, count, self.topics.blob_chunks(sha256),
                self._blob_path(blob), now + self.coalesce_window_s, deque(range(count)), {device_id},
                first_request=now,
            )  # fmt: skip
            gaps = self._gaps.pop(key, None)  # the broadcast sends every chunk they lack
            if gaps is not None:
                job.members.update(gaps.wants)
            self._broadcasts[key] = job
            self._jobs.append(job)
            self._count(sha256, broadcasts=1)
            self._cond.notify_all()
            return RequestOutcome("broadcast", f"{count} chunks in {self.coalesce_window_s:.1f} s or more")

    def noted(self, device_id: str, sha256: str, chunk_size: int) -> None:
        """A request another worker serves: note since when the device keeps the blob's chunks."""
        with self._cond:
            self._log.noted((sha256, chunk_size or self.default_chunk_size), device_id, time.monotonic())

    def _merge_record(self, key: tuple[str, int], now: float) -> None:
        """Take in the chunks other workers broadcast, for a blob this worker sent nothing of lately."""
        if self._record is None:
            return
        with self._cond:
            if self._log.has_sent(key, now):
                return
        sent = self._record.recent(key, self.in_flight_max_s)
        if sent:
            with self._cond:
                self._log.merge(key, sent)

    def fetch_started(self, device_id: str, generation: int) -> None:
        """The fleet published the device's desired state `generation`: chunks it broadcasts from now on
        reach the device after that state, so the device keeps them (once per generation)."""
        with self._cond:
            self._log.fetch_started(device_id, generation)

    def _add_gaps(
        self, device_id: str, blob: BlobRecord, cs: int, count: int, wanted: list[int], now: float, *, trusted: bool
    ) -> RequestOutcome:
        """Keep a device's gaps, less what a broadcast or a unicast already queued will send it and
        what may still be on its way to it (`trusted`: the request is marked waiting)."""
        key = (blob.sha256, cs)
        queued: set[int] = set()
        for job in (self._broadcasts.get(key), self._rebroadcasts.get(key), self._repairs.get((device_id, *key))):
            if job is not None:
                queued.update(job.to_send())
        if self._log.has_sent(key):
            self._busy()  # refreshes when the broker was last seen busy
            have = set(range(count)).difference(wanted)
            queued.update(self._log.on_the_way(key, device_id, now, have=have, trusted=trusted))
        left = {i for i in wanted if i not in queued}
        gaps = self._gaps.get(key)
        if not left:
            if gaps is not None:
                gaps.wants.pop(device_id, None)  # what it asked for before is on its way too
            return RequestOutcome("covered", f"{len(wanted)} chunks already queued or just sent")
        if gaps is None:
            gaps = self._gaps[key] = _Gaps(blob, cs, count, now)
            self._cond.notify_all()
        gaps.wants[device_id] = left
        return RequestOutcome("gaps", f"{len(left)} chunks")

    def _busy(self, *, pacing: bool = False) -> bool:
        """True while the broker is still delivering (more than `idle_backlog` deliveries pending), or,
        with `pacing`, while more deliveries are pending than devices are connected."""
        if self._broker_backlog is None:
            return False
        try:
            pending, connected = self._broker_backlog()
        except Exception:  # never let a probe stop the sender
            log.exception("could not read the broker's backlog")
            return False
        if pending > self.idle_backlog:
            self._log.last_busy = time.monotonic()
        return pending > (max(self.min_paced_backlog, connected) if pacing else self.idle_backlog)

    def _refuse(self, device_id: str, sha256: str, why: str) -> RequestOutcome:
        log.warning("blob request from %s for %s refused: %s", device_id, sha256[:12], why)
        return RequestOutcome("refused", why)

    def active(self) -> list[dict[str, object]]:
        with self._cond:
            return [j.describe() for j in self._jobs] + [g.describe() for g in self._gaps.values()]

    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._gaps and not self._inflight

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
            self._rebroadcasts.clear()
            self._repairs.clear()
            self._gaps.clear()
        self.flush_stats()
        if self._record is not None:
            self._record.flush(force=True)

    def _run(self) -> None:
        while True:
            picked = self._next_chunk()
            if picked is None:
                break
            job, index = picked
            try:
                last = self._send(job, index)
            except Exception:
                log.exception("sending chunk %d of blob %s failed; dropping this transfer", index, job.sha256[:12])
                self._drop(job)
                continue
            if last:
                try:
                    self._finish(job)
                except Exception:  # the sender must outlive any one transfer
                    log.exception("finishing the transfer of blob %s failed", job.sha256[:12])

    def _next_chunk(self) -> tuple[_Job, int] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                self._dispatch_gaps(now)
                ready = [j for j in self._jobs if j.start_at <= now and j.pending]
                due = [j for j in ready if self._broadcasts.get((j.sha256, j.chunk_size)) is j and not j.started]
                due = [j for j in due if now < j.first_request + self.in_flight_max_s]
                if due and self._busy():
                    # The broker is still delivering (the desired states that make devices ask, another
                    # broadcast): the requests of devices that get them later still join this one.
                    ready = [j for j in ready if j not in due]
                    if not ready:
                        self._cond.wait(timeout=0.1)
                        continue
                if ready:
                    job = ready[self._rr % len(ready)]
                    self._rr += 1
                    if not job.started:
                        job.started = True
                        log.info(
                            "%s of blob %s: %d chunks to %s",
                            job.kind, job.sha256[:12], len(job.pending), ", ".join(sorted(job.members)),
                        )  # fmt: skip
                    job.sending = job.pending.popleft()
                    return job, job.sending
                waits = [j.start_at - now for j in self._jobs if j.pending]
                waits += [max(0.1, g.since + self.coalesce_window_s - now) for g in self._gaps.values()]
                self._cond.wait(timeout=max(0.01, min(waits)) if waits else None)

    def _dispatch_gaps(self, now: float) -> None:
        """Send gathered gaps once no broadcast of their blob runs and the window has passed: chunks
        that `rebroadcast_min_devices` or more devices lack are broadcast again, the others unicast."""
        waiting = [
            key for key, g in self._gaps.items()
            if key not in self._broadcasts and key not in self._rebroadcasts and now >= g.since + self.coalesce_window_s
        ]  # fmt: skip
        if not waiting:
            return
        held = self._busy()  # a busy broker may still deliver what they ask for
        for key in waiting:
            gaps = self._gaps[key]
            if held and now < gaps.since + self.in_flight_max_s:
                continue
            del self._gaps[key]
            sha256, cs = key
            wanting: dict[int, int] = {}
            for chunks in gaps.wants.values():
                for i in chunks:
                    wanting[i] = wanting.get(i, 0) + 1
            shared = {i for i, n in wanting.items() if n >= self.rebroadcast_min_devices}
            path = self._blob_path(gaps.blob)
            if shared:
                job = _Job(
                    BROADCAST, sha256, gaps.blob.size, cs, gaps.count, self.topics.blob_chunks(sha256), path, now,
                    deque(sorted(shared)), {d for d, chunks in gaps.wants.items() if chunks & shared}, full=False,
                )  # fmt: skip
                self._rebroadcasts[key] = job
                self._jobs.append(job)
                self._count(sha256, broadcasts=1)
            for device_id, chunks in gaps.wants.items():
                alone = sorted(chunks - shared)
                if not alone:
                    continue
                repair = self._repairs.get((device_id, *key))
                if repair is not None:
                    have = repair.to_send()
                    repair.pending.extend(i for i in alone if i not in have)
                    continue
                repair = _Job(
                    REPAIR, sha256, gaps.blob.size, cs, gaps.count, self.topics.device_blobs(device_id), path, now,
                    deque(alone), {device_id},
                )  # fmt: skip
                self._repairs[(device_id, *key)] = repair
                self._jobs.append(repair)

    def _unregister(self, job: _Job) -> None:
        if job.kind == BROADCAST:
            registry = self._broadcasts if job.full else self._rebroadcasts
            if registry.get((job.sha256, job.chunk_size)) is job:
                del registry[(job.sha256, job.chunk_size)]
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
        if self._record is not None:  # recorded before the transfer is seen to end
            self._record.flush(force=True)
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
            try:
                acked = self._inflight[0][0].wait(self.ack_timeout_s)
            except Exception as exc:  # a publisher that raises for a message it could not send
                log.warning("a chunk was not acknowledged: %s", exc)
                acked = False
            if acked:
                _, key, index, _ = self._inflight.popleft()
                if key is not None and self._record is not None:
                    self._record.acked(key, index)
                    self._record.flush()  # at most every `flush_every_s`
                continue
            if not self._wait_connected():
                log.warning("broker unreachable: giving up %d unacknowledged chunks", len(self._inflight))
                while self._inflight:
                    self._unsent(self._inflight.popleft())
                return
            # Connected again, but this chunk was never acknowledged (lost with the old connection, or
            # the broker is slow): stop waiting for it; devices ask for the chunks they lack.
            self._unsent(self._inflight.popleft())

    def _unsent(self, entry: tuple[PublishHandle, tuple[str, int] | None, int, float]) -> None:
        _, key, index, at = entry
        if key is not None:
            with self._cond:
                self._log.unsent(key, index, at)

    def _wait_for_broker(self) -> None:
        """Wait while the broker's backlog is about a chunk per device or more (at most `ack_timeout_s`)."""
        deadline = time.monotonic() + self.ack_timeout_s
        while not self._stopping and time.monotonic() < deadline and self._busy(pacing=True):
            time.sleep(0.05)

    def _wait_connected(self) -> bool:
        deadline = time.monotonic() + self.disconnected_give_up_s
        while not self._stopping and time.monotonic() < deadline:
            if self.publisher.wait_connected(1.0):
                return True
        return False

    def _send(self, job: _Job, index: int) -> bool:
        """Publish one chunk; True when it was the job's last. The job takes new members (and a
        repair new chunks) until its last chunk is published (the sender may wait for the broker
        first): a request that comes meanwhile joins it rather than starting another transfer of the
        same chunks, and one that comes after it finds the chunk's send time."""
        if not self.publisher.wait_connected(0) and not self._wait_connected():
            raise ConnectionError("not connected to the broker")
        data = self._read(job, index)
        payload = chunk_to_pb(job.sha256, index, job.count, job.size, job.chunk_size, data)
        self._drain_inflight(self.max_inflight - 1)
        self._wait_for_broker()
        self._pace(len(data))
        handle = self.publisher.publish(job.topic, payload, qos=1)
        with self._cond:
            job.sent_chunks += 1
            job.sending = None
            key = (job.sha256, job.chunk_size) if job.kind == BROADCAST else None
            at = self._log.sent(key, index) if key is not None else 0.0
            self._inflight.append((handle, key, index, at))
            last = not job.pending
            if last:  # from here a new request starts a new transfer instead of joining this one
                self._unregister(job)
        if job.kind == BROADCAST:
            self._count(job.sha256, broadcast_bytes=len(data), broadcast_chunks=1)
        else:
            self._count(job.sha256, repair_bytes=len(data), repair_chunks=1)
        return last
