"""The agent's MQTT link to the fleet (paho-mqtt threaded client, MQTT 3.1.1).

Client id = username = device id, persistent session (clean_session False), automatic
reconnect with capped exponential back-off; a random wait before the first connect and a
per-device minimum delay spread a fleet's reconnects after a broker restart. Subscriptions
are made again on every connect. Payloads are slmops.fleet.v1 protobuf messages; a malformed
one is logged and dropped.

With a `CredentialKeeper`, a `CredentialsUpdate` from the fleet is saved and confirmed with a
`CredentialsAck`; the next connection uses the new password, and a refused one tries the other.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError, Message
from paho.mqtt.enums import CallbackAPIVersion

from slmops_agent.credentials import CredentialKeeper, Credentials
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import is_sha256_hex
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

ACK_POLL_S = 0.1  # how often a telemetry publish that waits for its ack checks the connection


class AgentMqtt:
    def __init__(
        self,
        creds: Credentials,
        *,
        on_desired: Callable[[fleet_pb2.DesiredState], None],
        on_chunk: Callable[[fleet_pb2.BlobChunk], None],
        wants_blob: Callable[[str], bool],
        on_connected: Callable[[], None] | None = None,
        keeper: CredentialKeeper | None = None,
        on_keys: Callable[[fleet_pb2.KeyStatements], None] | None = None,
        keepalive_s: int = 30,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        connect_jitter_s: float = 2.0,
    ) -> None:
        self.creds = creds
        self.device_id = creds.device_id
        self.topics = Topics(creds.mqtt.topic_root)
        self.on_desired = on_desired
        self.on_chunk = on_chunk
        self.wants_blob = wants_blob
        self.on_connected = on_connected
        self.keeper = keeper
        self.on_keys = on_keys
        self.keepalive_s = keepalive_s
        self.connect_jitter_s = connect_jitter_s
        self.connected = threading.Event()
        self.dropped_messages = 0
        self.connects = 0
        self._chunk_prefix = f"{self.topics.root}/blobs/"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=True,
        )
        self._username = creds.mqtt.username or self.device_id
        self._password = keeper.passwords()[0] if keeper is not None else creds.mqtt.password
        client.username_pw_set(self._username, self._password)
        if creds.mqtt.tls:
            # the broker is verified with the CA given at enrollment (its name too)
            client.tls_set_context(ssl.create_default_context(cadata=creds.mqtt.ca_pem))
        # paho doubles the delay from min to max; a per-device minimum keeps a fleet from reconnecting in step
        low = max(1, round(reconnect_min_s * (1 + random.random())))
        client.reconnect_delay_set(min_delay=low, max_delay=max(low, round(reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.connect_jitter_s > 0:
            time.sleep(random.uniform(0, self.connect_jitter_s))
        self.client.connect_async(self.creds.mqtt.host, self.creds.mqtt.port, keepalive=self.keepalive_s)
        self.client.loop_start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the session and its subscriptions stay on the broker)."""
        self._stopping = True
        with contextlib.suppress(Exception):  # already disconnected
            self.client.disconnect()
        self.client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def is_connected(self) -> bool:
        return self.connected.is_set()

    # -- callbacks (paho's network thread; never raise) -----------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect to %s:%s refused: %s", self.creds.mqtt.host, self.creds.mqtt.port, reason_code)
            self._try_other_password()
            return
        self.connects += 1
        if self.keeper is not None:
            self.keeper.connected_with(self._password)
            self._use_password(self.keeper.passwords()[0])  # the next connection tries the newest first
        client.subscribe(
            [
                (self.topics.desired(self.device_id), 1),
                (self.topics.device_blobs(self.device_id), 1),
                (self.topics.all_blob_chunks, 1),
                (self.topics.credentials(self.device_id), 1),
                *([(self.topics.keys, 1)] if self.on_keys is not None else []),
            ]
        )
        self.connected.set()
        log.info("MQTT connected to %s:%s as %s", self.creds.mqtt.host, self.creds.mqtt.port, self.device_id)
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("on_connected failed")

    def _use_password(self, password: str) -> None:
        if password != self._password:
            self._password = password
            self.client.username_pw_set(self._username, password)

    def _try_other_password(self) -> None:
        """During a rotation the broker knows one of two passwords: the next attempt tries the other."""
        if self.keeper is None:
            return
        options = self.keeper.passwords()
        if len(options) > 1:
            self._use_password(options[(options.index(self._password) + 1) % 2 if self._password in options else 0])

    def _on_credentials(self, payload: bytes | bytearray) -> None:
        if not payload or self.keeper is None:
            return  # a cleared retained message, or nobody to keep a password
        update = _parse(fleet_pb2.CredentialsUpdate, payload)
        if update is None or not update.rotation_id:
            self._drop(self.topics.credentials(self.device_id), "not a CredentialsUpdate")
            return
        if not self.keeper.accept(update.device_id, update.password):
            return
        self._use_password(self.keeper.passwords()[0])
        ack = fleet_pb2.CredentialsAck(device_id=self.device_id, rotation_id=update.rotation_id)
        self.client.publish(self.topics.credentials_ack(self.device_id), ack.SerializeToString(), qos=1)
        log.info("credential rotation %s saved and confirmed", update.rotation_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._route(message.topic, message.payload)
        except Exception:
            self.dropped_messages += 1
            log.exception("message on %s dropped", message.topic)

    def _route(self, topic: str, payload: bytes | bytearray) -> None:
        if topic == self.topics.desired(self.device_id):
            if not payload:  # a cleared retained message
                return
            desired = _parse(fleet_pb2.DesiredState, payload)
            if desired is None:
                self._drop(topic, "not a DesiredState")
                return
            self.on_desired(desired)
            return
        if topic == self.topics.credentials(self.device_id):
            self._on_credentials(payload)
            return
        if topic == self.topics.device_blobs(self.device_id):
            chunk = _parse(fleet_pb2.BlobChunk, payload)
            if chunk is None:
                self._drop(topic, "not a BlobChunk")
                return
            self.on_chunk(chunk)
            return
        if topic == self.topics.keys and self.on_keys is not None:
            if not payload:  # a cleared retained message
                return
            statements = _parse(fleet_pb2.KeyStatements, payload)
            if statements is None:
                self._drop(topic, "not KeyStatements")
                return
            self.on_keys(statements)
            return
        if topic.startswith(self._chunk_prefix) and topic.endswith("/chunks"):
            sha = topic[len(self._chunk_prefix) : -len("/chunks")]
            if not is_sha256_hex(sha) or not self.wants_blob(sha):
                return  # a blob this device does not need (or a bad topic): ignore cheaply
            chunk = _parse(fleet_pb2.BlobChunk, payload)
            if chunk is None or chunk.blob_sha256 != sha:
                self._drop(topic, "not a BlobChunk of this blob")
                return
            self.on_chunk(chunk)
            return
        log.debug("message on unexpected topic %s ignored", topic)

    def _drop(self, topic: str, why: str) -> None:
        self.dropped_messages += 1
        log.warning("malformed message on %s dropped: %s", topic, why)

    # -- publishing ----------------------------------------------------------------------------
    def publish_reported(self, msg: fleet_pb2.ReportedState) -> None:
        self.client.publish(self.topics.reported(self.device_id), msg.SerializeToString(), qos=1)

    def publish_blob_request(self, msg: fleet_pb2.BlobRequest) -> None:
        self.client.publish(self.topics.blob_requests(self.device_id), msg.SerializeToString(), qos=1)

    def publish_telemetry(self, msg: fleet_pb2.TelemetryBatch, timeout_s: float) -> bool:
        """Publish a batch and wait for the broker's acknowledgement; True only if acknowledged. The
        wait ends early when the connection drops (the ack cannot come before a reconnect, and the
        caller keeps the batch), so a broker that goes away never stalls the sampler for the timeout."""
        if not self.is_connected():
            return False
        info = self.client.publish(self.topics.telemetry(self.device_id), msg.SerializeToString(), qos=1)
        deadline = time.monotonic() + timeout_s
        try:
            while not info.is_published() and self.is_connected() and (left := deadline - time.monotonic()) > 0:
                info.wait_for_publish(min(ACK_POLL_S, left))
        except (RuntimeError, ValueError) as exc:
            log.debug("telemetry batch not sent: %s", exc)
            return False
        return info.is_published()


def _parse(cls: type[Any], payload: bytes | bytearray) -> Any:
    msg: Message = cls()
    try:
        msg.ParseFromString(bytes(payload))
    except DecodeError:
        return None
    return msg
