"""A device's lifecycle in the store: revocation (the row stays, for audit) and credential rotation
(the new password is kept only until the device confirms it)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update

from slmops_fleet.errors import Conflict, NotFound
from slmops_fleet.rollouts.states import TERMINAL_TARGET_STATES, TargetState
from slmops_fleet.store.database import Database, new_id, utcnow
from slmops_fleet.store.devices import device_record, hash_secret, latest_desired
from slmops_fleet.store.records import DeviceRecord
from slmops_fleet.store.schema import DeviceRow, RolloutDeviceRow


@dataclass(frozen=True)
class PendingRotation:
    device_id: str
    rotation_id: str
    password: str


class LifecycleQueries(Database):
    def revoke_device(
        self, device_id: str, *, by: str, before_commit: Callable[[], None] | None = None
    ) -> tuple[DeviceRecord, bool]:
        """Mark a device revoked (when and by whom) and cancel its unfinished rollout targets.
        `before_commit` (taking its broker credentials away) runs inside the transaction: if it
        raises, nothing changes. Returns (the device, whether it was revoked just now); revoking a
        revoked device changes nothing."""
        with self.session(write=True) as s:
            row = s.get(DeviceRow, device_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            if row.revoked_at is not None:
                return device_record(row, latest_desired(s, [device_id]).get(device_id)), False
            now = utcnow()
            row.revoked_at = now
            row.revoked_by = by[:200]
            row.rotation_id = row.rotation_password = None
            row.rotation_started_at = None
            s.execute(
                update(RolloutDeviceRow)
                .where(
                    RolloutDeviceRow.device_id == device_id,
                    RolloutDeviceRow.state.not_in(TERMINAL_TARGET_STATES),
                )
                .values(state=TargetState.CANCELLED.value, reason=f"device revoked by {by}", updated_at=now)
                .execution_options(synchronize_session=False)
            )
            s.flush()
            if before_commit is not None:
                before_commit()
            return device_record(row, latest_desired(s, [device_id]).get(device_id)), True

    def start_rotation(self, device_id: str) -> PendingRotation:
        """The device's pending rotation, made now with a fresh password if none is pending (asking
        again while one is pending gives the same one: the device may have saved it already)."""
        with self.session(write=True) as s:
            row = s.get(DeviceRow, device_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            if row.revoked_at is not None:
                raise Conflict(f"device {device_id} is revoked; its credentials cannot be rotated")
            if row.rotation_id is None or row.rotation_password is None:
                row.rotation_id = new_id("rot")
                row.rotation_password = secrets.token_urlsafe(32)
                row.rotation_started_at = utcnow()
            return PendingRotation(device_id, row.rotation_id, row.rotation_password)

    def confirm_rotation(
        self, device_id: str, rotation_id: str, *, before_commit: Callable[[str], None] | None = None
    ) -> bool:
        """The device saved the new password of `rotation_id`: it becomes the device's only password.
        `before_commit(password)` (setting it on the broker) runs inside the transaction. False (and
        nothing changes) when that rotation is not the device's pending one."""
        with self.session(write=True) as s:
            row = s.get(DeviceRow, device_id, with_for_update=True)
            if row is None or row.revoked_at is not None or row.rotation_password is None:
                return False
            if not secrets.compare_digest((row.rotation_id or "").encode(), rotation_id.encode()):
                return False
            password = row.rotation_password
            row.mqtt_password_hash = hash_secret(password)
            row.rotation_id = row.rotation_password = None
            row.rotation_started_at = None
            s.flush()
            if before_commit is not None:
                before_commit(password)
            return True

    def pending_rotations(self) -> list[PendingRotation]:
        with self.session() as s:
            rows = s.execute(
                select(DeviceRow.id, DeviceRow.rotation_id, DeviceRow.rotation_password).where(
                    DeviceRow.rotation_id.is_not(None), DeviceRow.revoked_at.is_(None)
                )
            ).all()
            return [PendingRotation(r.id, r.rotation_id, r.rotation_password) for r in rows if r.rotation_password]
