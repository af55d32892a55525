"""Helpers for the agent tests: settings for tests, DesiredState and chunk builders, a paho client
playing the fleet on a real broker."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from slmops_agent.credentials import Credentials, MqttCredentials
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import ModelInfo
from slmops_agent.runtime.requests import GenerationRequest, GenerationResult
from slmops_agent.settings import AgentSettings
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import package_id, parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.topics import Topics, chunk_count

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 1883
SMALL_CHUNK = 16 * 1024  # small chunks so the tiny model's blobs span several


def agent_settings(state_dir: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "grpc_address": "127.0.0.1:0",
        "threads": 1,
        "queue_bound": 4,
        "telemetry_interval_s": 0.2,
        "telemetry_batch": 50,
        "mqtt_connect_jitter_s": 0.0,
        "mqtt_reconnect_min_s": 1.0,
        "mqtt_reconnect_max_s": 2.0,
        "blob_stall_s": 0.5,
        "blob_stall_max_s": 2.0,
        "bitmap_flush_s": 0.0,
        "smoke_test_budget_s": 60.0,
        "shutdown_grace_s": 2.0,
        "disk_reserve_bytes": 0,
    }
    values.update(overrides)
    return AgentSettings(**values)


def spec(name: str, version: str) -> Any:
    from slmops_builder.packaging import PackageSpec

    return PackageSpec(
        name=name, version=version, profile=manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu")
    )


def signed_manifest(pkg: Path) -> manifest_pb2.SignedManifest:
    return parse_signed_manifest((pkg / "manifest.signed.pb").read_bytes())


def manifest_of(pkg: Path) -> manifest_pb2.Manifest:
    return manifest_pb2.Manifest.FromString(signed_manifest(pkg).manifest)


def pkg_id(pkg: Path) -> str:
    return package_id(signed_manifest(pkg).manifest)


def desired_for(
    pkg: Path | None, generation: int, device_id: str, *, chunk_size: int = SMALL_CHUNK, rollout: str = "r1"
) -> fleet_pb2.DesiredState:
    msg = fleet_pb2.DesiredState(
        device_id=device_id,
        generation=generation,
        rollout_id=rollout,
        issued_unix_ms=int(time.time() * 1000),
        chunk_size=chunk_size,
    )
    if pkg is not None:
        signed = signed_manifest(pkg)
        msg.model.package_id = package_id(signed.manifest)
        msg.model.manifest.CopyFrom(signed)
    return msg


def chunks_of(data: bytes, sha: str, chunk_size: int = SMALL_CHUNK) -> list[fleet_pb2.BlobChunk]:
    """The chunks the fleet would send for a blob with this content (announced as `sha`)."""
    count = chunk_count(len(data), chunk_size)
    out = []
    for i in range(count):
        piece = data[i * chunk_size : (i + 1) * chunk_size]
        out.append(
            fleet_pb2.BlobChunk(
                blob_sha256=sha,
                index=i,
                count=count,
                blob_size=len(data),
                chunk_size=chunk_size,
                chunk_sha256=hashlib.sha256(piece).hexdigest(),
                data=piece,
            )
        )
    return out


def save_credentials(
    state_dir: Path, device_id: str, topic_root: str, trusted: str, port: int = BROKER_PORT
) -> Credentials:
    state_dir.mkdir(parents=True, exist_ok=True)
    creds = Credentials(
        device_id=device_id,
        fleet_url="http://127.0.0.1:9",
        mqtt=MqttCredentials(host=BROKER_HOST, port=port, username=device_id, password="", topic_root=topic_root),
        signing_keys=[trusted],
    )
    creds.save(state_dir / "credentials.json")
    return creds


class FleetSim:
    """Plays the fleet over a real broker with paho: publishes DesiredState (retained), answers
    BlobRequests from package folders (whole: broadcast on blobs/<sha>/chunks; missing: unicast on
    devices/<id>/blobs), and records what devices report and send."""

    def __init__(self, topic_root: str, port: int = BROKER_PORT, *, client_id: str | None = None) -> None:
        self.topics = Topics(topic_root)
        self.blobs: dict[str, bytes] = {}
        self.tamper: dict[str, bytes] = {}  # sha -> the content actually sent
        self.drop: dict[str, set[int]] = {}  # sha -> chunk indexes never broadcast (repair still sends them)
        self.chunk_size = SMALL_CHUNK
        self.serve = True
        self.devices: set[str] = set()  # whose retained desired state close() clears
        self.reported: list[fleet_pb2.ReportedState] = []
        self.telemetry: list[fleet_pb2.TelemetryBatch] = []
        self.requests: list[fleet_pb2.BlobRequest] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fleet-{uuid.uuid4().hex[:8]}",
            clean_session=client_id is None,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(BROKER_HOST, port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the fleet simulator could not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics.fleet_subscriptions()])

    def add_package(self, pkg: Path) -> None:
        for blob in (pkg / "blobs").iterdir():
            self.blobs[blob.name] = blob.read_bytes()

    def set_desired(self, msg: fleet_pb2.DesiredState) -> None:
        self.devices.add(msg.device_id)
        self.client.publish(
            self.topics.desired(msg.device_id), msg.SerializeToString(), qos=1, retain=True
        ).wait_for_publish(10)

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        with self._cond:
            if topic.endswith("/reported"):
                self.reported.append(fleet_pb2.ReportedState.FromString(message.payload))
            elif topic.endswith("/telemetry"):
                self.telemetry.append(fleet_pb2.TelemetryBatch.FromString(message.payload))
            elif topic.endswith("/blob-requests"):
                req = fleet_pb2.BlobRequest.FromString(message.payload)
                self.requests.append(req)
                threading.Thread(target=self._answer, args=(req,), daemon=True).start()
            self._cond.notify_all()

    def _answer(self, req: fleet_pb2.BlobRequest) -> None:
        if not self.serve or req.blob_sha256 not in self.blobs:
            return
        data = self.tamper.get(req.blob_sha256, self.blobs[req.blob_sha256])
        chunks = chunks_of(data, req.blob_sha256, req.chunk_size or self.chunk_size)
        if req.missing:
            for i in req.missing:
                if i < len(chunks):
                    self.client.publish(self.topics.device_blobs(req.device_id), chunks[i].SerializeToString(), qos=1)
        else:
            dropped = self.drop.get(req.blob_sha256, set())
            for c in chunks:
                if c.index not in dropped:
                    self.client.publish(self.topics.blob_chunks(req.blob_sha256), c.SerializeToString(), qos=1)

    def wait(self, predicate: Callable[[FleetSim], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    states = [(r.generation, fleet_pb2.UpdateState.Name(r.state), r.reason) for r in self.reported]
                    raise AssertionError(f"timed out; reported so far: {states[-8:]}")
                self._cond.wait(min(left, 0.5))

    def wait_state(self, generation: int, state: str, timeout: float = 60.0) -> fleet_pb2.ReportedState:
        want = fleet_pb2.UpdateState.Value(state)
        self.wait(lambda s: any(r.generation == generation and r.state == want for r in s.reported), timeout)
        return next(r for r in self.reported if r.generation == generation and r.state == want)

    def states_for(self, generation: int) -> list[str]:
        with self._cond:
            return [fleet_pb2.UpdateState.Name(r.state) for r in self.reported if r.generation == generation]

    def telemetry_seqs(self) -> list[int]:
        with self._cond:
            return [s.seq for b in self.telemetry for s in b.samples]

    def close(self) -> None:
        for device in self.devices:  # clear retained desired states
            with contextlib.suppress(Exception):
                self.client.publish(self.topics.desired(device), b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


class AgentThread:
    """The whole agent (daemon.Agent) on its own event loop in a thread."""

    def __init__(self, settings: AgentSettings) -> None:
        import asyncio

        from slmops_agent.daemon import Agent

        self.agent = Agent(settings)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.addresses: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the agent did not start")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)

        def ready(addresses: list[str]) -> None:
            self.addresses = addresses
            self.ready.set()

        try:
            self.loop.run_until_complete(self.agent.serve(ready, signals=False))
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.agent.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the agent did not stop"


# --- a gRPC server on its own loop, the tiny model unpacked ---------------------------------------


def load_unpacked(pkg: Path, folder: Path, *, version: str = "1.0.0") -> Any:
    """Unpack a package's blobs into `folder` (files under their names) and load it (one thread)."""
    import json

    from slmops_agent.runtime.model import ModelInfo, load_model

    for f in json.loads((pkg / "manifest.json").read_text())["files"]:
        (folder / f["path"]).write_bytes((pkg / "blobs" / f["sha256"]).read_bytes())
    info = ModelInfo(name="tiny-llama", version=version, package_id="ab" * 32, profile="cpu-int4", slot="a")
    return load_model(folder, info, threads=1)


class ServerThread:
    """An AgentServer on its own event loop in a thread (the test talks to it with sync clients)."""

    def __init__(
        self,
        host: Any,
        socket_path: Path | None,
        addr_file: Path | None,
        *,
        tcp_address: str = "127.0.0.1:0",
        tls: Any = None,
        token: str | None = None,
    ) -> None:
        import asyncio

        from slmops_agent.server import AgentServer, AgentStatus

        self.server = AgentServer(
            host,
            socket_path=socket_path,
            tcp_address=tcp_address,
            addr_file=addr_file,
            status=lambda: AgentStatus(device_id="dev-x", update_state="COMMITTED", agent_version="0.1.0"),
            tls=tls,
            token=token,
        )
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(15)

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.addresses = self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serving(host: Any, *, addr_file: bool = True) -> Iterator[ServerThread]:
    """A ServerThread for `host` with its Unix socket (and address file) in a short folder under /tmp
    (socket paths are limited to 107 characters); stopped and removed afterwards."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
    server = ServerThread(host, folder / "agent.sock", folder / "grpc.addr" if addr_file else None)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


class PacedHost(ModelHost):
    """A ModelHost whose token loop hands on each piece after `pace_s` (a slow device), and keeps
    the futures. The tiny model makes ~20k tokens/s, far faster than a client could cancel."""

    pace_s = 0.0

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.futures: list[concurrent.futures.Future[GenerationResult]] = []

    def submit(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[ModelInfo], None] | None = None,
        client: str = "",
    ) -> concurrent.futures.Future[GenerationResult]:
        def paced(piece: str) -> None:
            if self.pace_s:
                time.sleep(self.pace_s)
            if on_text is not None:
                on_text(piece)

        future = super().submit(req, cancel=cancel, on_text=paced, on_start=on_start, client=client)
        self.futures.append(future)
        return future


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` every 5 ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
