"""Admin tokens (named, with a role, stored hashed, revocable) and the audit log of admin actions."""

from __future__ import annotations

import re
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.store.database import Database, new_id, utcnow
from slmops_fleet.store.devices import hash_secret
from slmops_fleet.store.records import AdminTokenRecord, AuditRecord
from slmops_fleet.store.schema import AdminTokenRow, AuditRow

TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _token_record(row: AdminTokenRow) -> AdminTokenRecord:
    return AdminTokenRecord(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
    )


def _audit_record(row: AuditRow) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        at=row.at,
        actor=row.actor,
        role=row.role,
        client=row.client,
        method=row.method,
        path=row.path,
        target=row.target,
        status=row.status,
    )


class AdminQueries(Database):
    # --- admin tokens ---------------------------------------------------------------------------

    def create_admin_token(self, name: str, role: str, *, created_by: str) -> tuple[str, AdminTokenRecord]:
        """A new token (returned once, only its hash is kept) named `name` with `role`."""
        if not TOKEN_NAME.match(name):
            raise InvalidRequest(f"bad token name {name[:80]!r}: 1-64 letters, digits, '.', '_' or '-'")
        token = "slm_" + secrets.token_urlsafe(32)
        row = AdminTokenRow(
            id=new_id("adm"),
            name=name,
            role=role,
            token_hash=hash_secret(token),
            created_at=utcnow(),
            created_by=created_by[:64],
        )
        try:
            with self.session(write=True) as s:
                s.add(row)
        except IntegrityError:
            raise Conflict(f"an admin token named {name!r} exists already (names are never reused)") from None
        return token, _token_record(row)

    def admin_token_for(self, token: str) -> AdminTokenRecord | None:
        """The live (not revoked) token whose secret is `token`, if any."""
        with self.session() as s:
            row = s.scalar(
                select(AdminTokenRow).where(
                    AdminTokenRow.token_hash == hash_secret(token), AdminTokenRow.revoked_at.is_(None)
                )
            )
            return _token_record(row) if row is not None else None

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        with self.session() as s:
            rows = s.scalars(select(AdminTokenRow).order_by(AdminTokenRow.created_at, AdminTokenRow.name)).all()
            return [_token_record(r) for r in rows]

    def revoke_admin_token(self, name: str) -> tuple[AdminTokenRecord, bool]:
        """Revoke a token by name (or id); (the token, whether it was revoked just now)."""
        with self.session(write=True) as s:
            row = s.scalar(
                select(AdminTokenRow).where((AdminTokenRow.name == name) | (AdminTokenRow.id == name)).with_for_update()
            )
            if row is None:
                raise NotFound(f"no admin token named {name!r}")
            if row.revoked_at is not None:
                return _token_record(row), False
            row.revoked_at = utcnow()
            s.flush()
            return _token_record(row), True

    # --- audit log --------------------------------------------------------------------------------

    def add_audit(
        self, *, actor: str, role: str, client: str, method: str, path: str, target: str, status: int
    ) -> None:
        with self.session(write=True) as s:
            s.add(
                AuditRow(
                    at=utcnow(),
                    actor=actor[:64],
                    role=role[:32],
                    client=client[:64],
                    method=method[:8],
                    path=path[:512],
                    target=target[:200],
                    status=status,
                )
            )

    def list_audit(self, *, since: datetime | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The newest `limit` entries (from `since` on), oldest first."""
        with self.session() as s:
            q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if since is not None:
                q = q.where(AuditRow.at >= since)
            return [_audit_record(r) for r in reversed(s.scalars(q).all())]
