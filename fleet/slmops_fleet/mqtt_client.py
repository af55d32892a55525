"""The fleet's MQTT client: one paho-mqtt threaded client, to the embedded or an external broker.

The client reconnects by itself with capped exponential back-off and full jitter, and subscribes
again on every connect; after each connect the fleet republishes every device's newest desired
state (retained, QoS 1): the embedded broker keeps retained messages only in memory, and
republishing is idempotent for devices (same generation). `on_message` runs in paho's network
thread: the fleet hands it to `slmops_fleet.ingest.Ingest` with the message's `ack`, which the
fleet calls once what the message says is committed (manual acknowledgement): a worker that dies
before it commits leaves the message unacknowledged in its broker session.

On an external broker the client speaks MQTT 5 with a persistent session (it asks for
`RECEIVE_MAXIMUM` messages in flight, so acknowledging after a commit does not throttle ingest),
and with a `share_group` it takes device reports, telemetry and credential acks through shared
subscriptions (`$share/<group>/...`): each goes to one of the fleet's workers. Blob requests stay
plain (every worker sees them; the one sending blobs serves them: `workers`). A `drain` client
takes over a dead worker's session: it unsubscribes at once (the broker routes nothing new to it),
receives what the session held, and `end_session` deletes the session.

Every topic the fleet subscribes to is a device's own publish topic, where nothing is retained
legitimately (agents never publish retained). A retained copy there is a device's retained will
or publish, which Mosquitto's ACLs cannot refuse (the embedded broker refuses such wills): it is
replayed to the fleet at every subscribe as if the device had just said it. Such a message
(delivered with the retain flag) is dropped, counted in `retained_cleared`, and the broker's copy
cleared.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 1000  # messages the broker may have in flight to the fleet, unacknowledged
SESSION_EXPIRY_S = 7 * 86400  # a worker's broker session outlives a restart (or a death: `workers` drains it)
Ack = Callable[[], None]


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
    tls: ssl.SSLContext | None = None  # verify the broker with it; None: plaintext


def fleet_subscriptions(topics: Topics, share_group: str) -> list[str]:
    """The topic filters the fleet subscribes to: with `share_group`, all but blob requests shared."""
    if not share_group:
        return topics.fleet_subscriptions()
    blob_requests = topics.blob_requests("+")
    return [t if t == blob_requests else f"$share/{share_group}/{t}" for t in topics.fleet_subscriptions()]


class FleetMqtt:
    """The fleet's paho client. `on_message(topic, payload, ack)` runs in paho's network thread; the
    handler must call `ack` once (it may from any thread)."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        topics: Topics,
        *,
        client_id: str,
        clean_session: bool,
        on_message: Callable[[str, bytes, Ack], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        keepalive_s: int = 30,
        reconnect_max_s: int = 30,
        max_inflight: int = 32,
        mqtt5: bool = False,
        share_group: str = "",
        drain: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.topics = topics
        self.subscriptions = fleet_subscriptions(topics, share_group)
        # The plain filters a session kept from a fleet that did not share them: each message would come twice.
        self._unshared = [t for t in topics.fleet_subscriptions() if t not in self.subscriptions]
        self.mqtt5 = mqtt5
        self.clean_session = clean_session
        self.drain = drain
        self.last_received = 0.0
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.keepalive_s = keepalive_s
        self.reconnect_max_s = reconnect_max_s
        self._connected = threading.Event()
        self._attempt = 0
        self._stopping = False
        self.last_error: str | None = None
        self.connects = 0
        self.retained_cleared = 0
        # what went through this client since it started (for /metrics)
        self.messages_received = self.bytes_received = 0
        self.messages_published = self.bytes_published = 0
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if mqtt5 else clean_session,
            protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=not drain,
            manual_ack=True,
        )
        if endpoint.username is not None:
            c.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls is not None:
            c.tls_set_context(endpoint.tls)
        c.max_inflight_messages_set(max_inflight)
        c.reconnect_delay_set(1, 1)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    # --- lifecycle ------------------------------------------------------------------------------

    def set_handlers(
        self, on_message: Callable[[str, bytes, Ack], None], on_connected: Callable[[], None] | None = None
    ) -> None:
        """Set the callbacks (before `start`)."""
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected

    def start(self) -> None:
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            props.SessionExpiryInterval = 0 if self.clean_session else SESSION_EXPIRY_S
            self.client.connect_async(
                self.endpoint.host,
                self.endpoint.port,
                keepalive=self.keepalive_s,
                clean_start=self.clean_session,
                properties=props,
            )
        else:
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

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect; `end_session` (MQTT 5) also deletes the broker session (a drained one)."""
        self._stopping = True
        props = None
        if end_session and self.mqtt5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self._connected.clear()

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Handle:
        """Thread-safe. While disconnected, QoS 1 messages wait in paho's queue and go out on reconnect."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self.messages_published += 1
        self.bytes_published += len(payload)
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

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("MQTT: %s (user %r)", self.last_error, self.endpoint.username)
            self._backoff()
            return
        self._attempt = 0
        self.last_error = None
        self.connects += 1
        if self.drain:  # the broker routes nothing new to this session; what it holds still comes
            client.unsubscribe(self.subscriptions)
        else:
            if self._unshared and flags.session_present:
                client.unsubscribe(self._unshared)
            client.subscribe([(t, 1) for t in self.subscriptions])
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

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reason_codes: Any, _props: Any) -> None:
        refused = [t for t, rc in zip(self.subscriptions, reason_codes, strict=False) if rc.is_failure]
        if refused and not self.drain:
            self.last_error = f"the broker refused the subscriptions {', '.join(refused)}"
            log.error("MQTT: %s (user %r: check its ACL)", self.last_error, self.endpoint.username)

    def _ack(self, mid: int, qos: int) -> Ack:
        """The message's acknowledgement; a no-op once the connection it came on is gone (a
        persistent session gets the message again, and a clean one lost it anyway: its packet id
        may name another message by then)."""
        connection = self.connects

        def ack() -> None:
            if qos > 0 and connection == self.connects and self._connected.is_set():
                self.client.ack(mid, qos)

        return ack

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages_received += 1
        self.bytes_received += len(msg.payload)
        self.last_received = time.monotonic()
        ack = self._ack(msg.mid, msg.qos)
        if self._on_message_cb is None:
            ack()
            return
        if not msg.payload:  # a retained message being cleared (ours, below): nothing a device said
            ack()
            return
        if msg.retain:  # a device's retained will or publish, replayed at subscribe (see the docstring)
            self.retained_cleared += 1
            log.warning("dropped a retained message on %s and cleared it: devices publish nothing retained", msg.topic)
            self.client.publish(msg.topic, b"", qos=1, retain=True)
            ack()
            return
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload), ack)
        except Exception:
            ack()
            log.exception("handling a message on %s failed", msg.topic)
