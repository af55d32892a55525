"""A simulated device as the fleet sees it (`SimDevice`: a real paho client with enrolled credentials)
and the ACL probe that every broker must pass (`check_device_isolation`)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics


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

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT (a crash or a cut cable): the broker publishes the will."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
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

    def request_blob(
        self, sha256: str, missing: list[int] | None = None, chunk_size: int = 0, *, waiting: bool = False
    ) -> None:
        """Ask for a blob (`missing` empty: all of it); `waiting`: what it lacks may still be on its way."""
        self.want(sha256)
        req = fleet_pb2.BlobRequest(
            device_id=self.device_id, blob_sha256=sha256, missing=missing or [], chunk_size=chunk_size, waiting=waiting
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
            topics.credentials(b_id),  # B's new broker password
            topics.credentials_ack(a_id),
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
            topics.credentials(a_id),  # only the fleet gives passwords
            topics.credentials(b_id),
            topics.device_blobs(b_id),
            topics.blob_chunks("b" * 64),
            topics.keys,  # only the fleet states which signing keys devices trust
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


def check_hostile_wills(
    host: str,
    port: int,
    topics: Topics,
    a: dict[str, Any],
    b: dict[str, Any],
    observer: tuple[str, str],
    *,
    refused: bool,
) -> None:
    """Device A connects with a will on device B's topics (retained and not), then drops its connection
    without a DISCONNECT: nothing may reach B's topics, live or retained. `refused`: the broker refuses
    such a CONNECT outright (the embedded broker); otherwise it may accept it but must not deliver the
    will (Mosquitto checks a will against the ACL when it publishes it)."""
    a_id, b_id = a["device_id"], b["device_id"]
    marker = b"will-" + os.urandom(6)
    wills = [
        (topics.reported(b_id), False),
        (topics.reported(b_id), True),
        (topics.desired(b_id), True),  # a retained desired state with a huge generation would pin B
        (topics.telemetry(b_id), False),
    ]
    watcher = SimDevice(host, port, username=observer[0], password=observer[1],
                        client_id="will-watch-" + os.urandom(3).hex(), topic_root=topics.root)  # fmt: skip
    try:
        assert not watcher.connect().is_failure
        assert watcher.subscribe(f"{topics.root}/#")
        for topic, retain in wills:
            probe = SimDevice.enrolled(a, client_id=a_id)
            probe.client.will_set(topic, marker + topic.encode(), qos=1, retain=retain)
            try:
                connack = probe.connect()
                if refused:
                    assert connack.is_failure, f"a will on {topic!r} (retain={retain}) was accepted"
                elif not connack.is_failure:
                    probe.drop()
            finally:
                probe.client.loop_stop()
        time.sleep(1.0)
        with watcher._cond:
            live = [m.topic for m in watcher.received if m.payload.startswith(marker)]
        assert not live, f"A's will reached {live}"
    finally:
        watcher.close()
    # Nothing retained either: a fresh subscriber to B's topics gets no will.
    late = SimDevice(host, port, username=observer[0], password=observer[1],
                     client_id="will-late-" + os.urandom(3).hex(), topic_root=topics.root)  # fmt: skip
    try:
        assert not late.connect().is_failure
        assert late.subscribe(f"{topics.root}/devices/{b_id}/#")
        time.sleep(1.0)
        with late._cond:
            kept = [m.topic for m in late.received if m.payload.startswith(marker)]
        assert not kept, f"A's will was retained on {kept}"
    finally:
        late.close()
