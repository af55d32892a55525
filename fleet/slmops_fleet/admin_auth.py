"""Who may call the fleet's admin API, and what each role may do.

- The token in `<data dir>/admin-token` (made at the first start) is the **owner**: role `admin`.
- Named tokens (`slmops fleet admin-token create NAME --role ROLE`) are kept hashed in the store and
  can be revoked; their roles:
  - `read-only`: GET (and HEAD) only, except the admin-token list;
  - `operator`: everything a fleet is operated with (tokens for enrollment, packages, releases,
    rollouts, device tags, revocation, credential rotation), but not the admin tokens;
  - `admin`: everything, admin tokens included.

`AdminAuth.identify` resolves a bearer token to a `Principal`; `refusal` says why a principal may
not make a request (before its body is read, by `http_guard.RequestGuard`). `AdminAuth` also makes,
lists and revokes the named tokens and reads the audit log for the API.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from slmops_fleet.errors import InvalidRequest
from slmops_fleet.store import Store

log = logging.getLogger(__name__)

OWNER_NAME = "owner"
READ_METHODS = frozenset({"GET", "HEAD"})
ADMIN_TOKENS_PATH = "/v1/admin-tokens"


class Role(str, Enum):
    READ_ONLY = "read-only"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


ROLE_NAMES = tuple(r.value for r in Role)


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def required_role(method: str, path: str) -> Role:
    """The least role a request needs."""
    if path == ADMIN_TOKENS_PATH or path.startswith(ADMIN_TOKENS_PATH + "/"):
        return Role.ADMIN
    return Role.READ_ONLY if method.upper() in READ_METHODS else Role.OPERATOR


def refusal(principal: Principal, method: str, path: str) -> str:
    """Why `principal` may not make this request ("" when it may)."""
    need = required_role(method, path)
    if principal.role.rank >= need.rank:
        return ""
    return f"the {principal.role.value} token {principal.name!r} may not {method.upper()} {path} (needs {need.value})"


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


class AdminAuth:
    def __init__(self, owner_token: str, store: Store) -> None:
        self.owner_token = owner_token
        self.store = store

    def identify(self, authorization: str | None) -> Principal | None:
        """The principal of an Authorization header, or None (missing, unknown or revoked token).
        May query the store: call it off the event loop."""
        token = bearer_token(authorization)
        if token is None or len(token) > 512:
            return None
        if hmac.compare_digest(token.encode(), self.owner_token.encode()):
            return Principal(OWNER_NAME, Role.ADMIN)
        record = self.store.admin_token_for(token)
        if record is None:
            return None
        try:
            return Principal(record.name, Role(record.role))
        except ValueError:
            return None  # a role this version does not know grants nothing

    # --- managing the named tokens, reading the audit log ----------------------------------------

    def create_token(self, name: str, role: str, *, by: Principal) -> dict[str, Any]:
        if role not in ROLE_NAMES:
            raise InvalidRequest(f"unknown role {role[:40]!r}: one of {', '.join(ROLE_NAMES)}")
        if name == OWNER_NAME:
            raise InvalidRequest(f"{OWNER_NAME!r} names the token in the data folder; choose another name")
        token, record = self.store.create_admin_token(name, role, created_by=by.name)
        log.info("admin token %s (%s) created by %s", name, role, by.name)
        return {**record.to_json(), "token": token}

    def list_tokens(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.store.list_admin_tokens()]

    def revoke_token(self, name: str, *, by: Principal) -> dict[str, Any]:
        record, now = self.store.revoke_admin_token(name)
        if now:
            log.warning("admin token %s revoked by %s", record.name, by.name)
        return {**record.to_json(), "revoked_now": now}

    def audit(self, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.store.list_audit(since=since, limit=limit)]
