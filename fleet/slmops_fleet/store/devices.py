"""Devices: enrollment tokens and the devices they enrolled, their tags and broker credentials."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from slmops_fleet.errors import EnrollmentRefused, Forbidden, InvalidRequest, NotFound
from slmops_fleet.rollouts.selectors import check_tags
from slmops_fleet.rollouts.waves import PlanError
from slmops_fleet.store.database import Database, new_id, utcnow
from slmops_fleet.store.groups import device_groups
from slmops_fleet.store.records import DeviceRecord
from slmops_fleet.store.schema import DesiredStateRow, DeviceRow, EnrollmentTokenRow


def hash_secret(secret: str) -> str:
    """Hash of a high-entropy secret (enrollment token, MQTT password): SHA-256 is enough, no KDF needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secrets_equal(secret: str, digest: str) -> bool:
    return secrets.compare_digest(hash_secret(secret), digest)


def device_record(
    row: DeviceRow, desired: DesiredStateRow | None, groups: tuple[list[str], str | None] = ([], None)
) -> DeviceRecord:
    """The record of a device; `groups`: its named groups and the one it follows (`device_groups`)."""
    return DeviceRecord(
        id=row.id,
        name=row.name,
        public_key=row.public_key,
        inventory=dict(row.inventory or {}),
        created_at=row.created_at,
        last_seen=row.last_seen,
        state=row.state,
        reported_generation=row.reported_generation or 0,
        target_package_id=row.target_package_id,
        active_package_id=row.active_package_id,
        active_version=row.active_version,
        active_slot=row.active_slot,
        reason=row.reason,
        bytes_needed=row.bytes_needed or 0,
        bytes_received=row.bytes_received or 0,
        reported_at=row.reported_at,
        telemetry_dropped_total=row.telemetry_dropped_total or 0,
        desired_generation=desired.generation if desired else 0,
        desired_package_id=desired.package_id if desired else None,
        tags=list(row.tags or []),
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        rotation_started_at=row.rotation_started_at,
        groups=list(groups[0]),
        follows_group=groups[1],
    )


def latest_desired(s: Session, device_ids: Sequence[str] | None = None) -> dict[str, DesiredStateRow]:
    """Each device's newest desired state (of `device_ids`, or of every device)."""
    latest = select(DesiredStateRow.device_id, func.max(DesiredStateRow.generation).label("g")).group_by(
        DesiredStateRow.device_id
    )
    if device_ids is not None:
        latest = latest.where(DesiredStateRow.device_id.in_(device_ids))
    sub = latest.subquery()
    rows = s.scalars(
        select(DesiredStateRow).join(
            sub, (DesiredStateRow.device_id == sub.c.device_id) & (DesiredStateRow.generation == sub.c.g)
        )
    ).all()
    return {r.device_id: r for r in rows}


class DeviceQueries(Database):
    # --- enrollment -------------------------------------------------------------------------

    def create_token(self, ttl_s: float) -> tuple[str, datetime]:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.session(write=True) as s:
            s.add(
                EnrollmentTokenRow(id=new_id("tok"), token_hash=hash_secret(token), created_at=now, expires_at=expires)
            )
        return token, expires

    def enroll(
        self,
        token: str,
        *,
        public_key: str,
        name: str,
        inventory: dict[str, Any],
        mqtt_password_hash: str,
        before_commit: Callable[[str], None] | None = None,
    ) -> DeviceRecord:
        """Claim `token` and create a device, atomically: the token is claimed by a conditional
        UPDATE, so of concurrent requests with one token exactly one wins. `before_commit(device_id)`
        runs inside the transaction (broker provisioning); if it raises, nothing is kept."""
        digest = hash_secret(token)
        device_id = new_id("dev")
        now = utcnow()
        with self.session(write=True) as s:
            # A revoked device's key may not come back under a new id (checked before the token is used).
            revoked = select(DeviceRow.id).where(DeviceRow.public_key == public_key, DeviceRow.revoked_at.is_not(None))
            if s.scalar(revoked.limit(1)) is not None:
                raise Forbidden("this device key belongs to a revoked device; make a new key to enroll again")
            claimed = s.execute(
                update(EnrollmentTokenRow)
                .where(
                    EnrollmentTokenRow.token_hash == digest,
                    EnrollmentTokenRow.used_at.is_(None),
                    EnrollmentTokenRow.expires_at > now,
                )
                .values(used_at=now, used_by=device_id)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                row = s.execute(
                    select(EnrollmentTokenRow.used_at, EnrollmentTokenRow.expires_at).where(
                        EnrollmentTokenRow.token_hash == digest
                    )
                ).first()
                if row is None:
                    raise EnrollmentRefused("enrollment token is unknown")
                if row.used_at is not None:
                    raise EnrollmentRefused("enrollment token is already used")
                raise EnrollmentRefused("enrollment token is expired")
            device = DeviceRow(
                id=device_id,
                name=name,
                public_key=public_key,
                inventory=inventory,
                mqtt_password_hash=mqtt_password_hash,
                created_at=now,
                reported_generation=0,
                bytes_needed=0,
                bytes_received=0,
                telemetry_dropped_total=0,
            )
            s.add(device)
            s.flush()
            if before_commit is not None:
                before_commit(device_id)
            return device_record(device, None)

    # --- devices ----------------------------------------------------------------------------

    def list_devices(self) -> list[DeviceRecord]:
        with self.session() as s:
            rows = s.scalars(select(DeviceRow).order_by(DeviceRow.created_at, DeviceRow.id)).all()
            desired = latest_desired(s)
            groups = device_groups(s, rows)
            return [device_record(r, desired.get(r.id), groups.get(r.id, ([], None))) for r in rows]

    def get_device(self, device_id: str) -> DeviceRecord:
        with self.session() as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            return self._device(s, row)

    @staticmethod
    def _device(s: Session, row: DeviceRow) -> DeviceRecord:
        groups = device_groups(s, [row]).get(row.id, ([], None))
        return device_record(row, latest_desired(s, [row.id]).get(row.id), groups)

    def update_device_tags(
        self, device_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> DeviceRecord:
        """Add and remove tags (a tag both added and removed is removed)."""
        try:
            check_tags([*add, *remove])
        except PlanError as exc:
            raise InvalidRequest(str(exc)) from exc
        with self.session(write=True) as s:
            row = s.get(DeviceRow, device_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown device {device_id}")
            try:
                row.tags = check_tags([t for t in [*(row.tags or []), *add] if t not in set(remove)])
            except PlanError as exc:
                raise InvalidRequest(str(exc)) from exc
            s.flush()
            return self._device(s, row)  # its groups now: a tag may have moved it into a group

    def device_password_hashes(self) -> dict[str, str]:
        """The broker password hash of every device that is not revoked."""
        with self.session() as s:
            rows = s.execute(select(DeviceRow.id, DeviceRow.mqtt_password_hash).where(DeviceRow.revoked_at.is_(None)))
            return {r.id: r.mqtt_password_hash for r in rows}
