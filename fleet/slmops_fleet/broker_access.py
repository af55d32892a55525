"""Who may use the embedded broker, and for what: the live `CredentialRegistry` (the fleet's own
user and every enrolled device with its password hash), the per-device topic ACLs it checks
(from `Topics.device_publish_acl` / `device_subscribe_acl`), the rule for a CONNECT's will, and
the two amqtt plugins (auth and topic filtering) that consult it inside `embedded_broker`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from slmops_fleet.store.devices import hash_secret, secrets_equal
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

FLEET_USERNAME = "slmops-fleet"


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

    def will_refused(self, username: str | None, *, topic: str | None, retain: bool, qos: int) -> str:
        """Why a CONNECT's will is refused ("" when it is allowed). amqtt publishes a will (and keeps it
        when retained) without asking the topic plugin, so a device's will is checked here: none, or
        one on its own publish topics, never retained, at QoS 0 or 1."""
        if topic is None or username == self.fleet_username:
            return ""
        if retain:
            return f"a retained will (on {topic!r})"
        if qos > 1:
            return f"a will at QoS {qos}"
        if not self.may_publish(username, topic):
            return f"a will on {topic!r}, outside its publish ACL"
        return ""

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
