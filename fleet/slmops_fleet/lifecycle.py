"""A device's lifecycle after enrollment: revocation and credential rotation.

**Revoke** (`slmops fleet device revoke ID`): in one store transaction the device is marked revoked
(when, by whom), its unfinished rollout targets are cancelled, and the broker takes its credentials
away (the embedded broker and Mosquitto's dynamic security both close its live connections at once);
if the broker cannot, nothing changes. Its row, reports and telemetry stay; it is never targeted
again, its desired state is no longer republished (the retained one is cleared), and its key cannot
enroll again. Revoking twice changes nothing (the broker is asked again, harmlessly).

**Rotate** (`slmops fleet device rotate-credentials ID`), in this order, each step safe to repeat:
1. the store keeps a pending rotation (an id and the new password) until the device confirms it;
   asking again while one is pending gives the same one;
2. the broker's ACL of the device is brought up to date (on Mosquitto, a device enrolled by an older
   fleet lacks the credentials topics: they are added and its connection closed, so it subscribes
   again); the fleet publishes a `CredentialsUpdate` on the device's `credentials` topic, retained (the
   device may be offline: it gets it when it reconnects with its old password; the fleet publishes
   every pending one again whenever its own MQTT session connects);
3. the agent saves the new password atomically (keeping the one it last connected with until the new
   one has worked) and answers a `CredentialsAck`;
4. on the ack the store makes the new password the device's only one and, in the same transaction,
   the broker switches to it (both brokers close the connections made with the old one, so the
   device reconnects with the new one at once); the retained update is cleared.
The old password works until the device confirms; there is no deadline after which a device is
locked out (revoke a device that is lost). A crash anywhere leaves either the old password valid
with the update still pending (sent again), or the new one in force and saved on the device.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from slmops_fleet.codec import CredentialsAckIn, credentials_update_to_pb
from slmops_fleet.distribution import Publisher
from slmops_fleet.errors import Conflict, ProvisioningError, Unavailable
from slmops_fleet.provisioning import Provisioner
from slmops_fleet.store import Store
from slmops_fleet.store.lifecycle import PendingRotation
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)


class DeviceLifecycle:
    def __init__(self, store: Store, provisioner: Provisioner, publisher: Publisher, topics: Topics) -> None:
        self.store = store
        self.provisioner = provisioner
        self.publisher = publisher
        self.topics = topics

    def revoke(self, device_id: str, *, by: str) -> dict[str, Any]:
        def take_credentials() -> None:
            try:
                self.provisioner.remove_device(device_id)
            except ProvisioningError as exc:
                raise Unavailable(f"cannot remove the device's broker credentials: {exc.reason}") from exc

        device, now = self.store.revoke_device(device_id, by=by, before_commit=take_credentials)
        if not now:
            take_credentials()  # already revoked: make sure the broker agrees (a restored broker)
        self.publisher.publish(self.topics.desired(device_id), b"", qos=1, retain=True)
        self.publisher.publish(self.topics.credentials(device_id), b"", qos=1, retain=True)
        if now:
            log.warning("device %s revoked by %s", device_id, by)
        if not self.provisioner.manages_credentials:
            log.warning("remove the broker user of %s yourself: this fleet does not manage the broker's", device_id)
        return {
            **device.to_json(),
            "revoked_now": now,
            "broker_credentials_removed": self.provisioner.manages_credentials,
        }

    def rotate(self, device_id: str) -> dict[str, Any]:
        if not self.provisioner.manages_credentials:
            raise Conflict("this fleet does not manage the broker's users (--broker-provisioning none): rotate there")
        pending = self.store.start_rotation(device_id)
        try:
            self.provisioner.ensure_acl(device_id)  # it may have been enrolled before the credentials topics
        except ProvisioningError as exc:
            raise Unavailable(f"cannot update the device's broker ACL: {exc.reason}") from exc
        self._send(pending)
        device = self.store.get_device(device_id)
        log.info("credential rotation %s of %s sent", pending.rotation_id, device_id)
        return {
            "device_id": device_id,
            "rotation_id": pending.rotation_id,
            "state": "pending",
            "started_at": device.to_json()["rotation_started_at"],
        }

    def confirmed(self, ack: CredentialsAckIn) -> bool:
        """The device's CredentialsAck (ingest's worker thread): switch the broker to the new password."""
        try:
            done = self.store.confirm_rotation(
                ack.device_id,
                ack.rotation_id,
                before_commit=lambda password: self.provisioner.set_password(ack.device_id, password),
            )
        except ProvisioningError as exc:
            log.error(
                "rotation %s of %s: the broker did not take the new password (%s); the old one stays valid, "
                "run `slmops fleet device rotate-credentials %s` again",
                ack.rotation_id, ack.device_id, exc.reason, ack.device_id,
            )  # fmt: skip
            return False
        if not done:
            log.info("credentials ack from %s for rotation %s ignored: not pending", ack.device_id, ack.rotation_id)
            return False
        self.publisher.publish(self.topics.credentials(ack.device_id), b"", qos=1, retain=True)
        self.store.add_audit(
            actor=ack.device_id,
            role="device",
            client="mqtt",
            method="ACK",
            path=self.topics.credentials_ack(ack.device_id),
            target=ack.rotation_id,
            status=200,
        )
        log.info("device %s confirmed rotation %s: its old password is refused now", ack.device_id, ack.rotation_id)
        return True

    def update_acls(self, stop: threading.Event) -> int:
        """Bring the broker ACL of every device that is not revoked up to this version's (on Mosquitto a
        device's role is made at enrollment: one made by an older fleet lacks newer topics such as
        `keys`, so key statements would never reach it). Run once at start, in the background; returns
        how many devices needed it. A broker that stops answering ends the pass (the next start
        resumes it)."""
        updated = 0
        for device_id in self.store.device_password_hashes():
            if stop.is_set():
                break
            try:
                updated += self.provisioner.ensure_acl(device_id)
            except ProvisioningError as exc:
                log.warning("bringing the devices' broker ACLs up to date stopped at %s: %s", device_id, exc.reason)
                break
        if updated:
            log.info("brought the broker ACL of %d devices up to date (they reconnect to take it)", updated)
        return updated

    def republish_rotations(self) -> None:
        """Every pending rotation again (the fleet's MQTT session connected: the broker may have lost them)."""
        pending = self.store.pending_rotations()
        for p in pending:
            self._send(p)
        if pending:
            log.info("republished %d pending credential rotations", len(pending))

    def _send(self, p: PendingRotation) -> None:
        payload = credentials_update_to_pb(p.device_id, p.rotation_id, p.password)
        self.publisher.publish(self.topics.credentials(p.device_id), payload, qos=1, retain=True)
