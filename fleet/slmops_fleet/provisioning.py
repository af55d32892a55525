"""Device credentials and ACLs on the broker.

Every provisioner can add a device, remove it (revocation: its credentials are gone and its live
connections are closed at once) and set its password (credential rotation: the connections made
with the old one are closed, the device reconnects with the new one).

- `EmbeddedProvisioner`: the embedded broker's live registry.
- `DynsecProvisioner`: a Mosquitto 2 broker with the dynamic security plugin. The fleet connects
  as a dynsec admin and, per device, creates a role holding exactly the device's ACL and a client
  (username = client id = device id) with that role, over `$CONTROL/dynamic-security/v1`.
- `NoProvisioner`: the operator manages broker credentials (e.g. an anonymous test broker).
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from slmops_fleet.broker_access import CredentialRegistry
from slmops_fleet.errors import ProvisioningError
from slmops_fleet.settings import BrokerAddress
from slmops_fleet.store.devices import hash_secret
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE = DYNSEC_TOPIC + "/response"
FLEET_ROLE = "slmops-fleet"


class Provisioner(Protocol):
    manages_credentials: bool  # False: the operator keeps the broker's users (nothing to revoke or rotate)

    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...

    def set_password(self, device_id: str, password: str) -> None: ...

    def ensure_acl(self, device_id: str) -> bool: ...


class EmbeddedProvisioner:
    """`disconnect(device_id)` closes the device's live connections (`EmbeddedBroker.disconnect`)."""

    manages_credentials = True

    def __init__(self, registry: CredentialRegistry, disconnect: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.disconnect = disconnect

    def add_device(self, device_id: str, password: str) -> None:
        self.registry.add_device(device_id, hash_secret(password))

    def remove_device(self, device_id: str) -> None:
        self.registry.remove_device(device_id)
        if self.disconnect is not None:
            self.disconnect(device_id)

    def set_password(self, device_id: str, password: str) -> None:
        self.registry.add_device(device_id, hash_secret(password))
        if self.disconnect is not None:
            self.disconnect(device_id)

    def ensure_acl(self, device_id: str) -> bool:
        return False  # the registry asks `Topics` on every check: always this version's ACL


class NoProvisioner:
    manages_credentials = False

    def add_device(self, device_id: str, password: str) -> None:
        log.info("broker provisioning is off: give %s its broker credentials yourself", device_id)

    def remove_device(self, device_id: str) -> None:
        log.warning("broker provisioning is off: remove %s's broker credentials yourself", device_id)

    def set_password(self, device_id: str, password: str) -> None:
        log.warning("broker provisioning is off: set %s's new broker password yourself", device_id)

    def ensure_acl(self, device_id: str) -> bool:
        return False


def device_role(device_id: str) -> str:
    return f"slmops-device-{device_id}"


def device_acls(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    """The dynsec form of Topics.device_publish_acl / device_subscribe_acl."""
    acls: list[dict[str, Any]] = [
        {"acltype": "publishClientSend", "topic": t, "priority": 0, "allow": True}
        for t in topics.device_publish_acl(device_id)
    ]
    for t in topics.device_subscribe_acl(device_id):
        kind = "subscribePattern" if ("+" in t or "#" in t) else "subscribeLiteral"
        acls.append({"acltype": kind, "topic": t, "priority": 0, "allow": True})
    return acls


class DynsecProvisioner:
    """Talks to Mosquitto's dynamic security plugin as an admin client (thread-safe)."""

    manages_credentials = True

    def __init__(
        self, admin: BrokerAddress, topics: Topics, *, tls: ssl.SSLContext | None = None, timeout_s: float = 10.0
    ) -> None:
        if not admin.username:
            raise ValueError("the dynamic-security admin needs a username (mqtt://user:pass@host:port)")
        self.admin = admin
        self.topics = topics
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"slmops-fleet-dynsec-{secrets.token_hex(4)}",
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        c.username_pw_set(admin.username, admin.password)
        if tls is not None:
            c.tls_set_context(tls)
        c.reconnect_delay_set(1, 10)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c

    def start(self) -> None:
        self.client.connect_async(self.admin.host, self.admin.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(self.timeout_s):
            self.stop()
            why = self._refused or f"no answer from {self.admin.host}:{self.admin.port}"
            raise ProvisioningError(f"cannot reach the broker's dynamic security API as {self.admin.username}: {why}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused = f"broker refused the admin login ({reason})"
            return
        self._connected.set()
        client.subscribe(DYNSEC_RESPONSE, qos=1)

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: Any, reason_codes: Any, _p: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self._refused = f"{self.admin.username} may not use {DYNSEC_TOPIC} (is it a dynsec admin?)"
            return
        self._subscribed.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynamic-security response: %r", msg.payload[:200])
            return
        with self._lock:
            for r in responses:
                waiter = self._waiting.get(str(r.get("correlationData", "")))
                if waiter is not None:
                    waiter[1].append(r)
                    waiter[0].set()

    def command(self, command: dict[str, Any], *, ok_errors: tuple[str, ...] = ()) -> dict[str, Any]:
        """Send one dynsec command and return its response; ProvisioningError on an error not in ok_errors."""
        if not self._subscribed.wait(self.timeout_s):
            raise ProvisioningError(f"not connected to the broker's dynamic security API ({self._refused or 'down'})")
        corr = secrets.token_hex(8)
        event = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._waiting[corr] = (event, box)
        try:
            body = json.dumps({"commands": [{**command, "correlationData": corr}]})
            self.client.publish(DYNSEC_TOPIC, body, qos=1)
            if not event.wait(self.timeout_s):
                raise ProvisioningError(f"the broker did not answer {command['command']} in {self.timeout_s:.0f} s")
        finally:
            with self._lock:
                self._waiting.pop(corr, None)
        response = box[0]
        error = response.get("error")
        if error and not any(e in str(error) for e in ok_errors):
            raise ProvisioningError(f"broker refused {command['command']}: {error}")
        return response

    def client_roles(self, username: str) -> list[str]:
        response = self.command({"command": "getClient", "username": username})
        roles = response.get("data", {}).get("client", {}).get("roles", [])
        return [str(r.get("rolename")) for r in roles if isinstance(r, dict)]

    def ensure_fleet_access(self, username: str) -> None:
        """Give the fleet's own broker user every topic under the root (idempotent).

        Changing a client's roles makes Mosquitto disconnect that client's connections; when the
        fleet's user is this admin user, that includes this one, and the reply is lost. So the
        result is checked afterwards, over the reconnected session."""
        root = self.topics.root
        self.command(
            {
                "command": "createRole",
                "rolename": FLEET_ROLE,
                "acls": [
                    {"acltype": "publishClientSend", "topic": f"{root}/#", "priority": 0, "allow": True},
                    {"acltype": "publishClientReceive", "topic": f"{root}/#", "priority": 0, "allow": True},
                    {"acltype": "subscribePattern", "topic": f"{root}/#", "priority": 0, "allow": True},
                ],
            },
            ok_errors=("already exists",),
        )
        # Several fleet workers share device messages (mqtt_client: $share/<group>/...); Mosquitto checks a
        # shared subscription's ACL on the whole filter. Added on its own: the role may predate it.
        self.command(
            {
                "command": "addRoleACL",
                "rolename": FLEET_ROLE,
                "acltype": "subscribePattern",
                "topic": f"$share/+/{root}/#",
                "priority": 0,
                "allow": True,
            },
            ok_errors=("already exists",),
        )
        if FLEET_ROLE in self.client_roles(username):
            return
        try:
            self.command({"command": "addClientRole", "username": username, "rolename": FLEET_ROLE, "priority": 10})
        except ProvisioningError as exc:
            log.info("addClientRole for %s: %s; checking the result", username, exc.reason)
        if FLEET_ROLE not in self.client_roles(username):
            raise ProvisioningError(f"could not give the broker user {username} the {FLEET_ROLE} role")

    def add_device(self, device_id: str, password: str) -> None:
        role = device_role(device_id)
        self.command({"command": "createRole", "rolename": role, "acls": device_acls(self.topics, device_id)})
        try:
            self.command(
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "clientid": device_id,
                    "roles": [{"rolename": role, "priority": 0}],
                }
            )
        except ProvisioningError:
            self.command({"command": "deleteRole", "rolename": role}, ok_errors=("not found",))
            raise

    def remove_device(self, device_id: str) -> None:
        """Mosquitto closes the client's connections when it is deleted."""
        self.command({"command": "deleteClient", "username": device_id}, ok_errors=("not found",))
        self.command({"command": "deleteRole", "rolename": device_role(device_id)}, ok_errors=("not found",))

    def set_password(self, device_id: str, password: str) -> None:
        """Mosquitto (2.0) closes the client's connections when its password changes."""
        self.command({"command": "setClientPassword", "username": device_id, "password": password})

    def ensure_acl(self, device_id: str) -> bool:
        """Give the device's role every entry of this version's ACL (a device enrolled by an older fleet
        lacks the newer topics). If one was missing, its connections are closed (disable, enable), so
        that it subscribes again under the new ACL; returns whether one was."""
        added = False
        for acl in device_acls(self.topics, device_id):
            r = self.command(
                {"command": "addRoleACL", "rolename": device_role(device_id), **acl}, ok_errors=("already exists",)
            )
            added = added or not r.get("error")
        if added:
            log.info("ACL of %s brought up to date; its connections are closed to take it", device_id)
            self.command({"command": "disableClient", "username": device_id})
            self.command({"command": "enableClient", "username": device_id})
        return added
