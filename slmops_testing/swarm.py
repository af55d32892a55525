"""A swarm of lean simulated devices, many per thread, speaking the real protocol
(benchmarks/fleet_bench.py runs one `swarm_worker` per process)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from slmops_agent.settings import AgentSettings
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics, chunk_count

# The agent's stall rule, with its defaults (SwarmDevice.tick).
STALL_MAX_S: float = AgentSettings.model_fields["blob_stall_max_s"].default
STALL_GAP_FACTOR: float = AgentSettings.model_fields["blob_stall_gap_factor"].default


@dataclass
class _Fetch:
    """A blob being fetched by a SwarmDevice: its chunk bitmap, and its SHA-256 computed as the
    chunks arrive in order (chunks that arrive early wait in `early`), so a device holds little."""

    sha256: str
    size: int
    chunk_size: int
    count: int
    bits: bytearray
    hasher: Any = field(default_factory=hashlib.sha256)
    next_index: int = 0
    early: dict[int, bytes] = field(default_factory=dict)
    received: int = 0
    last_progress: float = 0.0
    last_request: float = 0.0
    backoff: float = 1.0
    suspect: bool = False  # since the last request: a reconnect or a bad chunk (the agent's rule)

    @classmethod
    def new(cls, sha256: str, size: int, chunk_size: int, now: float, stall_s: float) -> _Fetch:
        count = chunk_count(size, chunk_size)
        return cls(sha256, size, chunk_size, count, bytearray((count + 7) // 8), last_progress=now, backoff=stall_s)

    def has(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def missing(self, limit: int) -> list[int]:
        return [i for i in range(self.count) if not self.has(i)][:limit]

    def add(self, index: int, data: bytes) -> bool:
        if index >= self.count or self.has(index):
            return False
        self.bits[index >> 3] |= 1 << (index & 7)
        self.received += 1
        if index != self.next_index:
            self.early[index] = data
            return True
        self.hasher.update(data)
        self.next_index += 1
        while self.next_index in self.early:
            self.hasher.update(self.early.pop(self.next_index))
            self.next_index += 1
        return True


class SwarmDevice:
    """A simulated device that speaks the real protocol with no thread of its own (a `Swarm` drives
    its paho client): it follows its retained desired state, checks the manifest's signature with
    the keys pinned at enrollment, asks for the blobs it lacks, keeps a chunk bitmap, checks each
    chunk's and each blob's SHA-256, asks for its gaps after `stall_s` without progress (backing
    off; marked `waiting` unless it reconnected or got a bad chunk since it last asked), and reports
    FETCHING then COMMITTED (or ROLLED_BACK) like the agent. It keeps no blob data."""

    def __init__(self, creds: dict[str, Any], *, stall_s: float = 1.0, on_event: Callable[..., None]) -> None:
        from slmops_protos.manifests import public_key_from_hex

        m = creds["mqtt"]
        self.device_id: str = creds["device_id"]
        self.host, self.port = str(m["host"]), int(m["port"])
        self.topics = Topics(m["topic_root"])
        self.keys = [public_key_from_hex(k) for k in creds["signing_keys"]]
        self.stall_s = stall_s
        self.on_event = on_event
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.username_pw_set(m["username"], m["password"])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.generation = 0
        self.state = fleet_pb2.IDLE
        self.active = ""
        self.active_version = ""
        self.target = ""
        self.target_version = ""
        self.reason = ""
        self.have: set[str] = set()
        self.fetches: dict[str, _Fetch] = {}
        self.bad_chunks = 0
        self.bytes_received = 0
        self.telemetry_seq = 0
        self.chunk_gap = 0.0  # the longest recent gap between chunks, fading (the agent's rule)
        self.last_chunk: float | None = None

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.on_event("refused", self.device_id, str(reason))
            return
        client.subscribe([(f, 1) for f in self.topics.device_subscribe_acl(self.device_id)])
        self._report()
        now = time.monotonic()
        for f in self.fetches.values():  # reconnected: ask for the gaps at once (what was on its way may be lost)
            f.last_request = now - f.backoff
            f.suspect = True
        self.on_event("connected", self.device_id)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.desired(self.device_id):
            self._on_desired(fleet_pb2.DesiredState.FromString(bytes(msg.payload)))
        elif msg.topic.endswith("/chunks") or msg.topic == self.topics.device_blobs(self.device_id):
            self._on_chunk(fleet_pb2.BlobChunk.FromString(bytes(msg.payload)))

    def _on_desired(self, d: fleet_pb2.DesiredState) -> None:
        from slmops_protos.manifests import PackageError, package_id, verify_signed_manifest

        if d.generation <= self.generation:
            return
        self.generation = d.generation
        if not d.model.package_id:
            self._report()
            return
        try:
            manifest = verify_signed_manifest(d.model.manifest, self.keys)
            if package_id(d.model.manifest.manifest) != d.model.package_id:
                raise PackageError("the package id does not match its manifest")
        except PackageError as exc:
            self._finish(fleet_pb2.ROLLED_BACK, exc.reason)
            return
        self.target, self.target_version = d.model.package_id, manifest.version
        if self.target == self.active:
            self._finish(fleet_pb2.COMMITTED)
            return
        now = time.monotonic()
        chunk_size = d.chunk_size or 512 * 1024
        self.chunk_gap, self.last_chunk = 0.0, None
        self.fetches = {
            f.sha256: _Fetch.new(f.sha256, f.size, chunk_size, now, self.stall_s)
            for f in manifest.files
            if f.sha256 not in self.have
        }
        self.state, self.reason = fleet_pb2.FETCHING, ""
        self._report()
        for f in list(self.fetches.values()):
            self._request(f, now)
        if not self.fetches:
            self._finish(fleet_pb2.COMMITTED)

    def _on_chunk(self, c: fleet_pb2.BlobChunk) -> None:
        f = self.fetches.get(c.blob_sha256)
        if f is None or c.chunk_size != f.chunk_size or c.count != f.count:
            return
        if hashlib.sha256(c.data).hexdigest() != c.chunk_sha256:
            self.bad_chunks += 1
            f.suspect = True
            return
        if not f.add(c.index, c.data):
            return
        self.bytes_received += len(c.data)
        now = time.monotonic()
        if self.last_chunk is not None:
            self.chunk_gap = max(min(now - self.last_chunk, STALL_MAX_S), 0.9 * self.chunk_gap)
        self.last_chunk = now
        f.backoff = self.stall_s
        for other in self.fetches.values():  # chunks are flowing: no blob of the package is stalled
            other.last_progress = now
        if f.received < f.count:
            return
        del self.fetches[f.sha256]
        if f.hasher.hexdigest() != f.sha256:
            self._finish(fleet_pb2.ROLLED_BACK, f"blob {f.sha256[:12]} fails its SHA-256 check")
            return
        self.have.add(f.sha256)
        if not self.fetches:
            self._finish(fleet_pb2.COMMITTED)

    def _finish(self, state: fleet_pb2.UpdateState.ValueType, reason: str = "") -> None:
        self.fetches = {}
        self.state, self.reason = state, reason
        if state == fleet_pb2.COMMITTED:
            self.active, self.active_version = self.target, self.target_version
        self._report()
        self.on_event("done", self.device_id, fleet_pb2.UpdateState.Name(state), self.target, time.time())

    def _request(self, f: _Fetch, now: float, *, waiting: bool = False) -> None:
        missing = f.missing(256) if f.received else []
        req = fleet_pb2.BlobRequest(
            device_id=self.device_id, blob_sha256=f.sha256, missing=missing, chunk_size=f.chunk_size, waiting=waiting
        )
        self.client.publish(self.topics.blob_requests(self.device_id), req.SerializeToString(), qos=1)
        f.last_request = now
        f.suspect = False

    def tick(self, now: float) -> None:
        """Ask for the gaps of a fetch that made no progress for its back-off time (doubling) and for
        twice the longest recent gap between chunks, up to STALL_MAX_S: the agent's rule and defaults."""
        for f in list(self.fetches.values()):
            wait = min(max(f.backoff, STALL_GAP_FACTOR * self.chunk_gap), STALL_MAX_S)
            if now - max(f.last_progress, f.last_request) >= wait:
                if f.last_request > f.last_progress:
                    f.backoff = min(f.backoff * 2, STALL_MAX_S)
                self._request(f, now, waiting=not f.suspect)

    def _report(self) -> None:
        needed = sum(f.size for f in self.fetches.values())
        msg = fleet_pb2.ReportedState(
            device_id=self.device_id,
            generation=self.generation,
            state=self.state,
            target_package_id=self.target,
            active_package_id=self.active,
            active_version=self.active_version,
            reason=self.reason,
            bytes_needed=needed,
            timestamp_unix_ms=int(time.time() * 1000),
        )
        self.client.publish(self.topics.reported(self.device_id), msg.SerializeToString(), qos=1)

    def send_telemetry(self, batches: int, samples: int) -> None:
        """`batches` TelemetryBatch messages of `samples` samples each, as the agent sends them."""
        for _ in range(batches):
            batch = fleet_pb2.TelemetryBatch(device_id=self.device_id)
            now_ms = int(time.time() * 1000)
            for _ in range(samples):
                self.telemetry_seq += 1
                batch.samples.add(
                    timestamp_unix_ms=now_ms,
                    cpu_percent=12.5,
                    memory_used_bytes=1 << 30,
                    memory_total_bytes=4 << 30,
                    requests_total=self.telemetry_seq,
                    tokens_per_s=150.0,
                    ttft_ms=40.0,
                    update_state=self.state,
                    active_package_id=self.active,
                    seq=self.telemetry_seq,
                )
            self.client.publish(self.topics.telemetry(self.device_id), batch.SerializeToString(), qos=1)


class Swarm:
    """Many SwarmDevices in one thread: one selector over their sockets (paho's external-loop API)."""

    def __init__(self, creds: list[dict[str, Any]], *, stall_s: float = 1.0, on_event: Callable[..., None]) -> None:
        import selectors

        self.selector = selectors.DefaultSelector()
        self.devices = [SwarmDevice(c, stall_s=stall_s, on_event=on_event) for c in creds]
        for d in self.devices:
            d.client.on_socket_open = self._opened
            d.client.on_socket_close = self._closed
            d.client.on_socket_register_write = self._want_write
            d.client.on_socket_unregister_write = self._written

    def _opened(self, client: paho.Client, _u: Any, sock: Any) -> None:
        import selectors

        self.selector.register(sock, selectors.EVENT_READ, client)

    def _closed(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _want_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        import selectors

        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _written(self, client: paho.Client, _u: Any, sock: Any) -> None:
        import selectors

        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)

    def connect(self) -> None:
        for d in self.devices:
            d.client.connect(d.host, d.port, keepalive=60)
            self.poll(0)

    def poll(self, timeout: float) -> None:
        import selectors

        for key, mask in self.selector.select(timeout):
            client: paho.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    def run(self, until: Callable[[], bool], *, tick_s: float = 0.25) -> None:
        """Serve every device's socket until `until()` is true; keep-alives and gap requests every `tick_s`."""
        next_tick = 0.0
        while not until():
            self.poll(0.02)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick_s
                for d in self.devices:
                    d.client.loop_misc()
                    d.tick(now)

    def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.client.disconnect()
            self.poll(0)
        self.selector.close()


def swarm_worker(creds: list[dict[str, Any]], conn: Any, stall_s: float = 1.0) -> None:
    """A process of the fleet benchmark: run a Swarm of `creds`, send its events to `conn` (a
    multiprocessing Connection), and obey ("telemetry", batches, samples) and ("stop",)."""
    events: list[tuple[Any, ...]] = []
    swarm = Swarm(creds, stall_s=stall_s, on_event=lambda *e: events.append(e))
    stopping = False

    def until() -> bool:
        nonlocal stopping
        if events:
            conn.send(list(events))
            events.clear()
        while conn.poll():
            command = conn.recv()
            if command[0] == "stop":
                stopping = True
            elif command[0] == "telemetry":
                for d in swarm.devices:
                    d.send_telemetry(command[1], command[2])
                conn.send([("telemetry_sent", len(swarm.devices) * command[1] * command[2])])
            elif command[0] == "counters":
                conn.send(
                    [
                        (
                            "counters",
                            sum(d.bad_chunks for d in swarm.devices),
                            sum(d.bytes_received for d in swarm.devices),
                        )
                    ]
                )
        return stopping

    swarm.connect()
    try:
        swarm.run(until)
    finally:
        swarm.close()
