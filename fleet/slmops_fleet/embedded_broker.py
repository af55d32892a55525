"""The embedded MQTT broker: amqtt 0.12 in the fleet's event loop, on the configured address
(127.0.0.1 by default), over TLS when the fleet gives it a server context.

Authentication and topic ACLs are two small amqtt plugins (`broker_access`; loaded by class path in
the `plugins` config section, nothing else loaded: amqtt's default plugins add CPU to every
message) that consult the live `CredentialRegistry`:

- a device authenticates with its id and password, and must use its id as client id;
- it may publish only `Topics.device_publish_acl(id)` and subscribe only to filters that
  `Topics.device_subscribe_acl(id)` covers;
- the fleet's own internal user may do anything;
- a device's will (CONNECT) is refused unless it is on one of its own publish topics, not retained,
  at QoS 0 or 1 (amqtt publishes a will without the topic check);
- anonymous clients are refused;
- a packet larger than `max_packet_bytes` ends its connection before its body is read
  (`mqtt_limits.PacketSizeGate`); refusals are counted in `counters`.

Nothing may depend on amqtt's queue for offline clients (it loses binary messages after a
crash), so device sessions are marked to get no offline queue at all: a device that was away
converges through the retained desired state and its own chunk bitmap (and subscribes again on
every connect: its session does not outlive the connection).

Two amqtt 0.12 flaws are closed here: credentials are checked on the raw CONNECT before amqtt
sees it (amqtt deletes or takes over the session a CONNECT names before it authenticates), and
retained messages reach a client only through its own subscriptions (amqtt replays those
matching anyone's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from ssl import SSLContext
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import Session

from slmops_fleet.broker_access import FLEET_USERNAME, CredentialRegistry, DeviceAuthPlugin, DeviceTopicPlugin
from slmops_fleet.device_limits import WindowedLog
from slmops_fleet.errors import StartupError
from slmops_fleet.mqtt_limits import DEFAULT_MAX_PACKET, BrokerCounters, PacketSizeGate

log = logging.getLogger(__name__)

_MQTT_311 = 4  # the protocol level of MQTT 3.1.1, the only one amqtt speaks


class _ReplayReader(ReaderAdapter):
    """Reads through to a connection, first handing back bytes read earlier (the CONNECT packet)."""

    def __init__(self, inner: ReaderAdapter) -> None:
        self.inner = inner
        self.recorded = bytearray()
        self._recording = True
        self._replay = b""

    def replay(self) -> None:
        self._recording = False
        self._replay = bytes(self.recorded)
        self.recorded.clear()

    async def read(self, n: int = -1) -> bytes:
        if self._replay:
            if n == -1:
                head, self._replay = self._replay, b""
                return head + await self.inner.read(-1)
            head, self._replay = self._replay[:n], self._replay[n:]
            if len(head) < n:
                head += await self.inner.read(n - len(head))
            return head
        data = await self.inner.read(n)
        if self._recording:
            self.recorded += data
        return data

    def feed_eof(self) -> None:
        self.inner.feed_eof()


Subscribers = list[tuple[Session, int]]


class _Subscriptions(dict[str, Subscribers]):
    """amqtt's subscription table (topic filter -> subscribers), with two changes:

    - it is iterated over snapshots: amqtt 0.12 loops over it while awaiting its topic plugins, so
      a device that subscribed or went away meanwhile raised "dictionary changed size during
      iteration" and the message was lost for every subscriber after that point;
    - `matching` finds a topic's subscribers by one lookup of the topic itself plus the wildcard
      filters, instead of testing every filter: each device has filters of its own, so amqtt's scan
      made every message cost O(devices) (`_Broker._run_broadcast` uses it).
    """

    def __init__(self) -> None:
        super().__init__()
        self._wildcards: set[str] = set()

    def __setitem__(self, topic_filter: str, subscribers: Subscribers) -> None:
        super().__setitem__(topic_filter, subscribers)
        if "+" in topic_filter or "#" in topic_filter:
            self._wildcards.add(topic_filter)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        self._wildcards.discard(topic_filter)

    def clear(self) -> None:
        super().clear()
        self._wildcards.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.keys()))

    def items(self) -> list[tuple[str, Subscribers]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]

    def matching(self, topic: str, matches: Callable[[str, str], bool]) -> list[Subscribers]:
        """Snapshots of the subscribers of every filter that matches `topic` (`matches` is amqtt's
        own filter test, for the wildcard filters)."""
        found = [list(subs) for f in sorted(self._wildcards) if matches(topic, f) and (subs := self.get(f))]
        exact = self.get(topic)
        return [list(exact), *found] if exact else found


class _BroadcastQueue(asyncio.Queue[dict[str, Any]]):
    """amqtt's queue of messages to fan out, counting those the fleet published."""

    fleet_messages = 0

    @staticmethod
    def _from_fleet(item: dict[str, Any]) -> bool:
        return getattr(item.get("session"), "username", None) == FLEET_USERNAME

    def _put(self, item: dict[str, Any]) -> None:
        super()._put(item)
        self.fleet_messages += self._from_fleet(item)

    def _get(self) -> dict[str, Any]:
        item: dict[str, Any] = super()._get()
        self.fleet_messages -= self._from_fleet(item)
        return item


class _CountedHandler:
    """A device's protocol handler whose deliveries (`mqtt_publish`, a QoS 1 one ends with the
    device's PUBACK or amqtt's 5 s timeout) are counted from the moment amqtt creates them."""

    def __init__(self, handler: Any, broker: _Broker) -> None:
        self._handler = handler
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def mqtt_publish(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        self._broker.device_deliveries += 1
        return self._deliver(self._handler.mqtt_publish(*args, **kwargs))

    async def _deliver(self, publish: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await publish
        finally:
            self._broker.device_deliveries -= 1


class _Broker(Broker):
    """amqtt's Broker with two fixes: on connect, amqtt 0.12 sends a client the retained messages
    matching *every* client's subscriptions (it loops over all filters), which leaks one device's
    retained desired state to another: only the client's own subscriptions may deliver retained
    messages to it. Its subscription table is iterated over snapshots and indexed (`_Subscriptions`,
    `_run_broadcast`). It also counts its deliveries to devices and the fleet's messages waiting for
    the fan-out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Subscriptions()
        self._broadcast_queue = _BroadcastQueue()
        self.device_deliveries = 0  # messages to devices amqtt has started and not finished

    def _get_handler(self, session: Session) -> Any:
        handler = super()._get_handler(session)
        if handler is None or session.username == FLEET_USERNAME:
            return handler
        return _CountedHandler(handler, self)

    @property
    def fleet_messages_queued(self) -> int:
        """The fleet's messages (desired states, chunks) that amqtt has not fanned out yet."""
        queue = self._broadcast_queue
        return queue.fleet_messages if isinstance(queue, _BroadcastQueue) else 0

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """amqtt 0.12's `_run_broadcast`, with the subscribers found by `_Subscriptions.matching`
        (one lookup, not a scan of every device's filters) from a snapshot."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        assert isinstance(self._subscriptions, _Subscriptions)
        for subscriptions in self._subscriptions.matching(topic, self._matches):
            for target_session, sub_qos in subscriptions:
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if (
                    not connected
                    and not target_session.clean_session
                    and qos in (QOS_1, QOS_2)
                    and not target_session.is_anonymous
                ):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if not connected:
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(
                        asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False))
                    )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        subscribers = self.subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


def bind_listener(host: str, port: int, *, what: str, flag: str) -> socket.socket:
    """A listening TCP socket; a clear StartupError naming the port and the flag if it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"{what} port {port} on {host} is already in use; choose another with {flag} (0 picks a free one)"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class EmbeddedBroker:
    """amqtt with the fleet's auth and ACL plugins on `host` (TLS with `ssl`); runs in the caller's
    event loop."""

    CONNECT_TIMEOUT_S = 10.0
    BACKLOG_REFRESH_S = 0.1

    def __init__(
        self,
        registry: CredentialRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: SSLContext | None = None,
        flag: str = "--broker-port",
        max_packet_bytes: int = DEFAULT_MAX_PACKET,
    ) -> None:
        self.registry = registry
        self.host = host
        self.max_packet_bytes = max_packet_bytes
        self.counters = BrokerCounters()
        self._warn = WindowedLog(60.0)
        self.requested_port = port
        self._ssl = ssl
        self._flag = flag
        self._broker: _Broker | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port = 0
        self._backlog = (0, 0)
        self._backlog_at = float("-inf")
        self._device_writers: dict[asyncio.StreamWriter, str] = {}  # the devices' connections -> device id
        self._loop: asyncio.AbstractEventLoop | None = None

    def _config(self) -> dict[str, Any]:
        return {
            # "external": amqtt opens no socket itself; `start` binds ours and hands it connections.
            "listeners": {"default": {"type": "external"}},
            "timeout_disconnect_delay": 0,
            "plugins": {
                f"{DeviceAuthPlugin.__module__}.DeviceAuthPlugin": {"registry": self.registry},
                f"{DeviceTopicPlugin.__module__}.DeviceTopicPlugin": {"registry": self.registry},
            },
        }

    async def start(self) -> int:
        """Bind, start amqtt, and return the bound port."""
        sock = bind_listener(self.host, self.requested_port, what="MQTT broker", flag=self._flag)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._broker = _Broker(self._config(), plugin_namespace=f"amqtt.slmops_fleet.{id(self)}")
        try:
            await self._broker.start()
            tls: dict[str, Any] = (
                {"ssl": self._ssl, "ssl_handshake_timeout": self.CONNECT_TIMEOUT_S} if self._ssl else {}
            )
            self._server = await asyncio.start_server(self._on_client, sock=sock, **tls)
        except BaseException:
            sock.close()
            raise
        log.info("embedded MQTT broker listening on %s:%d%s", self.host, self.port, " (TLS)" if self._ssl else "")
        return self.port

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._broker is not None
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        out = StreamWriterAdapter(writer)
        peer = writer.get_extra_info("peername")
        who = [f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client"]

        def oversized(length: int) -> None:
            self.counters.oversized_packets += 1
            self._warn.warning(
                who[0], "MQTT connection of %s dropped: it announced a packet of %d bytes (at most %d)",
                who[0], length, self.max_packet_bytes,
            )  # fmt: skip

        try:
            gate = _ReplayReader(PacketSizeGate(StreamReaderAdapter(reader), self.max_packet_bytes, oversized))
            admitted, username = await self._admit(gate, out)
            if not admitted:
                return
            who[0] = username or who[0]
            if username != FLEET_USERNAME:
                self._device_writers[writer] = username or ""
            gate.replay()
            await self._broker.external_connected(gate, out, "default")
        except (ConnectionError, OSError) as exc:  # the client went away; nothing to do
            log.info("MQTT client connection closed: %s", exc)
        except Exception:
            log.exception("MQTT client connection failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            self._device_writers.pop(writer, None)
            writer.close()

    async def _admit(self, gate: _ReplayReader, out: StreamWriterAdapter) -> tuple[bool, str | None]:
        """Check the credentials in CONNECT before amqtt sees it: amqtt 0.12 deletes or takes over the
        session of the client id a CONNECT names *before* it authenticates, so without this gate an
        anonymous client could disconnect any device and drop its subscriptions. Returns (admitted,
        the CONNECT's username)."""
        try:
            connect = await asyncio.wait_for(ConnectPacket.from_stream(gate), timeout=self.CONNECT_TIMEOUT_S)
        except Exception as exc:  # garbage, a timeout or a closed socket: nothing to answer
            log.info("MQTT connection dropped before a valid CONNECT: %s", type(exc).__name__)
            return False, None
        if connect is None or connect.payload is None or connect.variable_header is None:
            return False, None
        if connect.proto_level != _MQTT_311:
            return True, None  # amqtt refuses it with "unacceptable protocol version" before touching any session
        if self.registry.authenticate(connect.username, connect.password, connect.client_id) is None:
            log.info("MQTT connection refused for user %r (client %r)", connect.username, connect.client_id)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(out)
            await out.close()
            return False, None
        refused = self.registry.will_refused(
            connect.username,
            topic=connect.will_topic if connect.will_flag else None,
            retain=connect.will_retain_flag,
            qos=connect.will_qos,
        )
        if refused:
            self.counters.wills_refused += 1
            log.warning("MQTT connection refused for %r: %s", connect.username, refused)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(out)
            await out.close()
            return False, None
        return True, connect.username

    def disconnect(self, device_id: str) -> None:
        """Close every connection of `device_id` at once (revoked, or its password changed); its next
        CONNECT meets the registry as it is now. Safe to call from another thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._abort_connections, device_id)

    def _abort_connections(self, device_id: str) -> None:
        for writer, username in list(self._device_writers.items()):
            if username == device_id:
                log.info("closing the MQTT connection of %s", device_id)
                writer.transport.abort()

    def backlog(self) -> tuple[int, int]:
        """(messages to devices amqtt has not finished delivering, plus the fleet's messages it has not
        fanned out yet; connected devices). amqtt fans a message out as one task per subscriber,
        and a QoS 1 delivery ends when the device acknowledges it (or after amqtt's 5 s timeout); it
        buffers without bound. So this is the backlog between the fleet and the devices; the
        devices' requests and reports (to the fleet) do not count. Read at most every
        `BACKLOG_REFRESH_S` (the blob sender polls it); safe to call from another thread."""
        broker = self._broker
        if broker is None:
            return 0, 0
        now = time.monotonic()
        if now - self._backlog_at < self.BACKLOG_REFRESH_S:
            return self._backlog
        while True:
            try:
                sessions = [s for s, _ in list(broker.sessions.values())]
                break
            except RuntimeError:  # mutated during the copy: copy again
                continue
        devices = sum(1 for s in sessions if s.username != FLEET_USERNAME and s.transitions.is_connected())
        # amqtt stops waiting for a PUBACK after 5 s, though the message may still sit in the
        # connection's write buffer: a device with bytes not yet written counts as a delivery too.
        writing = sum(1 for w in list(self._device_writers) if w.transport.get_write_buffer_size() > 0)
        self._backlog = (broker.fleet_messages_queued + broker.device_deliveries + writing, devices)
        self._backlog_at = now
        return self._backlog

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), timeout=10)
            except Exception:
                log.exception("embedded broker did not shut down cleanly")
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            except asyncio.TimeoutError:
                log.warning("embedded broker listener did not close in time")
        self._server = None
        self._broker = None
