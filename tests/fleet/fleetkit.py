"""Helpers for the fleet's tests: small signed packages, a simulated device (a real paho client
with enrolled credentials), MQTT probes for ACL checks, and a swarm of lean simulated devices
(many per thread, speaking the real protocol) for benchmarks/fleet_bench.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from slmops_agent.settings import AgentSettings
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.topics import Topics, chunk_count

# The agent's stall rule, with its defaults (SwarmDevice.tick).
STALL_MAX_S: float = AgentSettings.model_fields["blob_stall_max_s"].default
STALL_GAP_FACTOR: float = AgentSettings.model_fields["blob_stall_gap_factor"].default

# --- packages -----------------------------------------------------------------------------------------


def random_bytes(n: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (fast enough for a few MiB)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:n])


def make_package(
    files: dict[str, bytes],
    out: Path,
    key_path: Path,
    *,
    name: str = "fleet-test",
    version: str = "1.0.0",
    adapter_of: str = "",
) -> Path:
    """A signed package folder of `files` (the fleet does not care whether they are a model). With
    `adapter_of` (a base package id) it is an adapter package whose first file is the adapter."""
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    src = out.with_name(out.name + ".src")
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    spec = PackageSpec(
        name=name,
        version=version,
        profile=manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu", precision="int4"),
    )
    if adapter_of:
        spec.kind = "adapter"
        spec.adapters = [manifest_pb2.Adapter(name=name, base_package_id=adapter_of, path=next(iter(files)))]
    return write_package(src, spec, load_private_key(key_path), out).path


def package_blobs(folder: Path) -> dict[str, int]:
    """sha256 -> size of every blob in a package folder."""
    return {p.name: p.stat().st_size for p in (folder / "blobs").iterdir()}


# --- a simulated device ---------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class BlobAssembly:
    """Chunks of one blob as a device keeps them: each checked against its own SHA-256."""

    sha256: str
    count: int = 0
    size: int = 0
    chunk_size: int = 0
    chunks: dict[int, bytes] = field(default_factory=dict)
    via: dict[int, str] = field(default_factory=dict)  # index -> "broadcast" or "repair"
    bad: int = 0

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.chunks]

    def complete(self) -> bool:
        return self.count > 0 and not self.missing()

    def data(self) -> bytes:
        return b"".join(self.chunks[i] for i in range(self.count))


class SimDevice:
    """A device as the fleet sees it: a paho threaded client with the enrolled credentials."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        client_id: str | None = None,
        topic_root: str = "slmops/v1",
        device_id: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.device_id = device_id or username or ""
        self.topics = Topics(topic_root)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else (username or ""),
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 2)
        self._cond = threading.Condition()
        self.connack: Any = None
        self.received: list[Received] = []
        self.blobs: dict[str, BlobAssembly] = {}
        self.wanted: set[str] = set()
        self._suback: dict[int, list[Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    @classmethod
    def enrolled(cls, creds: dict[str, Any], **kwargs: Any) -> SimDevice:
        m = creds["mqtt"]
        args: dict[str, Any] = {
            "username": m["username"],
            "password": m["password"],
            "topic_root": m["topic_root"],
            "device_id": creds["device_id"],
        }
        args.update(kwargs)
        return cls(m["host"], m["port"], **args)

    # connection ---------------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> Any:
        """Connect and return the CONNACK reason code (check `.is_failure`)."""
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self.connack is not None, timeout)
        if self.connack is None:
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port}")
        if self.connack.is_failure:
            self.client.loop_stop()
        return self.connack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            self.connack = reason
            self._cond.notify_all()

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        with self._cond:
            self._suback[mid] = codes
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, timeout: float = 10.0) -> bool:
        """True if the broker granted the subscription."""
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None, f"subscribing to {topic_filter} failed at once ({_rc})"
        with self._cond:
            self._cond.wait_for(lambda: mid in self._suback, timeout)
            codes = self._suback.get(mid)
        if codes is None:
            raise TimeoutError(f"no SUBACK for {topic_filter}")
        return not codes[0].is_failure

    def subscribe_device_topics(self) -> None:
        for f in self.topics.device_subscribe_acl(self.device_id):
            assert self.subscribe(f), f"subscription to {f} refused"

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)

    # messages ---------------------------------------------------------------------------------------

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.received.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            if msg.topic.endswith("/chunks") or msg.topic == self.topics.device_blobs(self.device_id):
                chunk = fleet_pb2.BlobChunk.FromString(bytes(msg.payload))
                if chunk.blob_sha256 in self.wanted:
                    self._keep(chunk, "repair" if msg.topic.endswith("/blobs") else "broadcast")
            self._cond.notify_all()

    def _keep(self, chunk: fleet_pb2.BlobChunk, via: str) -> None:
        asm = self.blobs.setdefault(chunk.blob_sha256, BlobAssembly(chunk.blob_sha256))
        asm.count, asm.size, asm.chunk_size = chunk.count, chunk.blob_size, chunk.chunk_size
        if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
            asm.bad += 1
            return
        if chunk.index not in asm.chunks:
            asm.chunks[chunk.index] = chunk.data
            asm.via[chunk.index] = via

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"{self.device_id}: no {what} after {timeout} s")

    def messages_on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.received if m.topic == topic]

    def desired(self, timeout: float = 10.0, generation: int = 1) -> fleet_pb2.DesiredState:
        topic = self.topics.desired(self.device_id)

        def newest() -> fleet_pb2.DesiredState | None:
            msgs = [m for m in self.received if m.topic == topic]
            if not msgs:
                return None
            d = fleet_pb2.DesiredState.FromString(msgs[-1].payload)
            return d if d.generation >= generation else None

        self.wait_for(lambda: newest() is not None, timeout, f"desired state generation {generation}")
        with self._cond:
            d = newest()
        assert d is not None
        return d

    # device -> fleet ----------------------------------------------------------------------------------

    def want(self, sha256: str) -> None:
        with self._cond:
            self.wanted.add(sha256)

    def request_blob(self, sha256: str, missing: list[int] | None = None, chunk_size: int = 0) -> None:
        self.want(sha256)
        req = fleet_pb2.BlobRequest(
            device_id=self.device_id, blob_sha256=sha256, missing=missing or [], chunk_size=chunk_size
        )
        self.publish(self.topics.blob_requests(self.device_id), req.SerializeToString())

    def report(self, state: int, generation: int, **fields: Any) -> None:
        msg = fleet_pb2.ReportedState(
            device_id=self.device_id,
            generation=generation,
            state=state,  # type: ignore[arg-type]
            timestamp_unix_ms=int(time.time() * 1000),
            **fields,
        )
        self.publish(self.topics.reported(self.device_id), msg.SerializeToString())

    def blob(self, sha256: str) -> BlobAssembly:
        with self._cond:
            return self.blobs.setdefault(sha256, BlobAssembly(sha256))

    def wait_blob(self, sha256: str, timeout: float = 30.0) -> bytes:
        self.wait_for(lambda: self.blob(sha256).complete(), timeout, f"complete blob {sha256[:12]}")
        return self.blob(sha256).data()


# --- ACL checks, the same on every broker ---------------------------------------------------------------


def check_device_isolation(
    host: str,
    port: int,
    topics: Topics,
    a: dict[str, Any],
    b: dict[str, Any],
    observer: tuple[str, str],
    *,
    retained_b_desired: bool = True,
) -> None:
    """Device A (enrollment response `a`) cannot subscribe to or publish on device B's topics;
    wrong passwords, anonymous clients and borrowed client ids are refused. `observer` is a
    (username, password) allowed to subscribe to everything under the root."""
    a_id, b_id = a["device_id"], b["device_id"]
    a_pw = a["mqtt"]["password"]

    # Refused logins.
    for kwargs in (
        {"username": a_id, "password": a_pw + "x"},  # wrong password
        {"username": None, "password": None, "client_id": "anon-" + os.urandom(3).hex()},  # anonymous
        {"username": a_id, "password": a_pw, "client_id": b_id},  # A's credentials with B's client id
        {"username": "dev-nobody", "password": "x"},  # unknown user
        {"username": a_id, "password": b["mqtt"]["password"]},  # B's password for A
    ):
        probe = SimDevice(host, port, topic_root=topics.root, **kwargs)
        try:
            assert probe.connect().is_failure, f"broker accepted {kwargs.get('username')!r} {kwargs.get('client_id')!r}"
        finally:
            probe.close()

    watcher = SimDevice(
        host,
        port,
        username=observer[0],
        password=observer[1],
        client_id="observer-" + os.urandom(3).hex(),
        topic_root=topics.root,
    )
    dev_a = SimDevice.enrolled(a)
    try:
        assert not watcher.connect().is_failure
        assert watcher.subscribe(f"{topics.root}/#")
        assert not dev_a.connect().is_failure

        # Subscriptions: exactly A's own filters.
        for f in topics.device_subscribe_acl(a_id):
            assert dev_a.subscribe(f), f"A may subscribe to {f}"
        assert dev_a.subscribe(topics.blob_chunks("a" * 64)), "a single blob's chunks are covered by blobs/+/chunks"
        for f in (
            topics.desired(b_id),
            topics.device_blobs(b_id),
            topics.reported(b_id),
            topics.telemetry(a_id),  # devices never read telemetry, not even their own
            f"{topics.root}/devices/+/desired",
            f"{topics.root}/devices/+/blobs",
            f"{topics.root}/#",
            f"{topics.root}/blobs/#",
            "#",
        ):
            assert not dev_a.subscribe(f), f"A must not subscribe to {f}"

        # Retained desired states: A sees its own only, never B's.
        if retained_b_desired:
            time.sleep(0.5)
            assert not dev_a.messages_on(topics.desired(b_id)), "B's retained desired state leaked to A"
            assert dev_a.messages_on(topics.desired(a_id)), "A did not get its own retained desired state"

        # Publishing: A's own reported/telemetry/blob-requests reach the fleet side; B's and others' do not.
        marker = os.urandom(8)
        allowed = topics.device_publish_acl(a_id)
        forbidden = [
            *topics.device_publish_acl(b_id),
            topics.desired(a_id),
            topics.desired(b_id),
            topics.device_blobs(b_id),
            topics.blob_chunks("b" * 64),
        ]
        for t in allowed + forbidden:
            dev_a.client.publish(t, marker + t.encode(), qos=1)
        watcher.wait_for(
            lambda: all(any(m.payload == marker + t.encode() for m in watcher.received) for t in allowed),
            10,
            "A's allowed publications",
        )
        time.sleep(1.0)
        with watcher._cond:
            leaked = [m.topic for m in watcher.received if m.payload.startswith(marker) and m.topic in forbidden]
        assert not leaked, f"A published on topics outside its ACL: {leaked}"
    finally:
        dev_a.close()
        watcher.close()


# --- a swarm: many lean simulated devices in one thread ---------------------------------------------------


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
    off), and reports FETCHING then COMMITTED (or ROLLED_BACK) like the agent. It keeps no blob data."""

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
        for f in self.fetches.values():  # reconnected: ask for the gaps at once
            f.last_request = now - f.backoff
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

    def _request(self, f: _Fetch, now: float) -> None:
        missing = f.missing(256) if f.received else []
        req = fleet_pb2.BlobRequest(
            device_id=self.device_id, blob_sha256=f.sha256, missing=missing, chunk_size=f.chunk_size
        )
        self.client.publish(self.topics.blob_requests(self.device_id), req.SerializeToString(), qos=1)
        f.last_request = now

    def tick(self, now: float) -> None:
        """Ask for the gaps of a fetch that made no progress for its back-off time (doubling) and for
        twice the longest recent gap between chunks, up to STALL_MAX_S: the agent's rule and defaults."""
        for f in list(self.fetches.values()):
            wait = min(max(f.backoff, STALL_GAP_FACTOR * self.chunk_gap), STALL_MAX_S)
            if now - max(f.last_progress, f.last_request) >= wait:
                if f.last_request > f.last_progress:
                    f.backoff = min(f.backoff * 2, STALL_MAX_S)
                self._request(f, now)

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
