"""The embedded MQTT broker: amqtt 0.12 in the fleet's event loop, on 127.0.0.1 only.

Authentication and topic ACLs are two small amqtt plugins (loaded by class path in the
`plugins` config section, nothing else loaded: amqtt's default plugins double the CPU per
message) that consult the live `CredentialRegistry`:

- a device authenticates with its id and password, and must use its id as client id;
- it may publish only `Topics.device_publish_acl(id)` and subscribe only to filters that
  `Topics.device_subscribe_acl(id)` covers;
- the fleet's own internal user may do anything;
- anonymous clients are refused.

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
import secrets
import socket
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from slmops_fleet.db import hash_secret, secrets_equal
from slmops_fleet.errors import StartupError
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

FLEET_USERNAME = "slmops-fleet"
_MQTT_311 = 4  # the protocol level of MQTT 3.1.1, the only one amqtt speaks


class Role(str, Enum):
    FLEET = "fleet"
    DEVICE = "device"


def filter_covered(requested: str, allowed: str) -> bool:
    """True if every topic the subscription filter `requested` can match is matched by `allowed`."""
    req = requested.split("/")
    alw = allowed.split("/")
    for i, level in enumerate(alw):
        if level == "#":
            return True
        if i >= len(req):
            return False
        if req[i] == "#":
            return False
        if level == "+":
            continue
        if req[i] != level or req[i] == "+":
            return False
    return len(req) == len(alw)


class CredentialRegistry:
    """Who may use the embedded broker: the fleet's internal user and every enrolled device.

    Loaded from the store at start and updated on every enrollment; thread-safe (enrollment runs
    in the API's worker threads, checks run in the event loop)."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self._devices: dict[str, str] = {}
        self.fleet_username = FLEET_USERNAME
        self.fleet_password = secrets.token_urlsafe(32)
        self._fleet_hash = hash_secret(self.fleet_password)

    def load(self, password_hashes: dict[str, str]) -> None:
        with self._lock:
            self._devices = dict(password_hashes)

    def add_device(self, device_id: str, password_hash: str) -> None:
        with self._lock:
            self._devices[device_id] = password_hash

    def remove_device(self, device_id: str) -> None:
        with self._lock:
            self._devices.pop(device_id, None)

    def __contains__(self, device_id: object) -> bool:
        with self._lock:
            return device_id in self._devices

    def authenticate(self, username: str | None, password: str | None, client_id: str | None) -> Role | None:
        if not username or password is None:
            return None
        if username == self.fleet_username:
            return Role.FLEET if secrets_equal(password, self._fleet_hash) else None
        with self._lock:
            digest = self._devices.get(username)
        if digest is None or not secrets_equal(password, digest):
            return None
        # A device's client id is its id: another client id could take over someone else's session.
        if client_id != username:
            log.warning("device %s refused: client id %r is not its device id", username, client_id)
            return None
        return Role.DEVICE

    def may_publish(self, username: str | None, topic: str) -> bool:
        if username == self.fleet_username:
            return True
        if not username or username not in self:
            return False
        return topic in self.topics.device_publish_acl(username)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        if username == self.fleet_username:
            return True
        if not username or username not in self:
            return False
        return any(filter_covered(topic_filter, allowed) for allowed in self.topics.device_subscribe_acl(username))


@dataclass
class _PluginConfig:
    registry: Any = None


class DeviceAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: fleet user or enrolled device with its password; no anonymous access."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        registry = getattr(self.config, "registry", None)
        if not isinstance(registry, CredentialRegistry):
            raise TypeError("DeviceAuthPlugin needs a CredentialRegistry in its config")
        self.registry: CredentialRegistry = registry

    async def authenticate(self, *, session: Session) -> bool | None:
        role = self.registry.authenticate(session.username, session.password, session.client_id)
        if role is None:
            log.info("MQTT connection refused for user %r (client %r)", session.username, session.client_id)
            return False
        if role is Role.DEVICE:
            # No offline queue for devices (see the module docstring); it also bounds broker memory.
            session.is_anonymous = True
        return True


class DeviceTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin: each device publishes and subscribes only within its ACL."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        registry = getattr(self.config, "registry", None)
        if not isinstance(registry, CredentialRegistry):
            raise TypeError("DeviceTopicPlugin needs a CredentialRegistry in its config")
        self.registry: CredentialRegistry = registry

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if action == Action.RECEIVE:
            return True  # subscriptions were checked when they were made
        if session is None or not topic:
            return False
        if action == Action.PUBLISH:
            ok = self.registry.may_publish(session.username, topic)
        elif action == Action.SUBSCRIBE:
            ok = self.registry.may_subscribe(session.username, topic)
        else:
            ok = False
        if not ok:
            log.info("MQTT %s on %r refused for %r", action, topic, session.username)
        return ok


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


class _Broker(Broker):
    """amqtt's Broker with one fix: on connect, amqtt 0.12 sends a client the retained messages
    matching *every* client's subscriptions (it loops over all filters), which leaks one device's
    retained desired state to another. Only the client's own subscriptions may deliver retained
    messages to it."""

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
    """amqtt on 127.0.0.1 with the fleet's auth and ACL plugins; runs in the caller's event loop."""

    HOST = "127.0.0.1"
    CONNECT_TIMEOUT_S = 10.0

    def __init__(self, registry: CredentialRegistry, *, port: int = 0, flag: str = "--broker-port") -> None:
        self.registry = registry
        self.requested_port = port
        self._flag = flag
        self._broker: _Broker | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port = 0

    def _config(self) -> dict[str, Any]:
        return {
            # "external": amqtt opens no socket itself; `start` binds ours and hands it connections.
            "listeners": {"default": {"type": "external"}},
            "timeout_disconnect_delay": 0,
            "plugins": {
                f"{__name__}.DeviceAuthPlugin": {"registry": self.registry},
                f"{__name__}.DeviceTopicPlugin": {"registry": self.registry},
            },
        }

    async def start(self) -> int:
        """Bind, start amqtt, and return the bound port."""
        sock = bind_listener(self.HOST, self.requested_port, what="MQTT broker", flag=self._flag)
        self.port = sock.getsockname()[1]
        self._broker = _Broker(self._config(), plugin_namespace=f"amqtt.slmops_fleet.{id(self)}")
        try:
            await self._broker.start()
            self._server = await asyncio.start_server(self._on_client, sock=sock)
        except BaseException:
            sock.close()
            raise
        log.info("embedded MQTT broker listening on %s:%d", self.HOST, self.port)
        return self.port

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._broker is not None
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        out = StreamWriterAdapter(writer)
        try:
            gate = _ReplayReader(StreamReaderAdapter(reader))
            if not await self._admit(gate, out):
                return
            gate.replay()
            await self._broker.external_connected(gate, out, "default")
        except (ConnectionError, OSError) as exc:  # the client went away; nothing to do
            log.info("MQTT client connection closed: %s", exc)
        except Exception:
            log.exception("MQTT client connection failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def _admit(self, gate: _ReplayReader, out: StreamWriterAdapter) -> bool:
        """Check the credentials in CONNECT before amqtt sees it: amqtt 0.12 deletes or takes over the
        session of the client id a CONNECT names *before* it authenticates, so without this gate an
        anonymous client could disconnect any device and drop its subscriptions."""
        try:
            connect = await asyncio.wait_for(ConnectPacket.from_stream(gate), timeout=self.CONNECT_TIMEOUT_S)
        except Exception as exc:  # garbage, a timeout or a closed socket: nothing to answer
            log.info("MQTT connection dropped before a valid CONNECT: %s", type(exc).__name__)
            return False
        if connect is None or connect.payload is None or connect.variable_header is None:
            return False
        if connect.proto_level != _MQTT_311:
            return True  # amqtt refuses it with "unacceptable protocol version" before touching any session
        if self.registry.authenticate(connect.username, connect.password, connect.client_id) is None:
            log.info("MQTT connection refused for user %r (client %r)", connect.username, connect.client_id)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(out)
            await out.close()
            return False
        return True

    @property
    def connected_clients(self) -> list[str]:
        if self._broker is None:
            return []
        return sorted(cid for cid, (s, _) in self._broker.sessions.items() if s.transitions.is_connected())

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
