"""Named leases: one holder at a time until expiry (the rollout driver's election)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from slmops_fleet.store.database import Database, utcnow
from slmops_fleet.store.schema import LeaseRow

log = logging.getLogger(__name__)


def new_holder() -> str:
    """A holder id for this process: "host:pid:random"."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def dead_here(holder: str) -> bool:
    """Whether `holder` ("host:pid:random") names a process of this host that no longer runs."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another holder of this very process (tests): alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LeaseQueries(Database):
    def acquire_lease(
        self, name: str, holder: str, ttl_s: float, now: datetime | None = None, *, take_from: str | None = None
    ) -> bool:
        """Take or renew lease `name` for `holder` until now + ttl_s; False while another holder's
        lease has not expired (unless that holder is `take_from`: one known to be dead). The row lock
        (PostgreSQL) or write lock (SQLite) serialises contenders; a concurrent first insert loses on
        the primary key."""
        now = now or utcnow()
        try:
            with self.session(write=True) as s:
                row = s.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    s.add(LeaseRow(name=name, holder=holder, expires_at=now + timedelta(seconds=ttl_s)))
                    return True
                if row.holder not in (holder, take_from) and row.expires_at > now:
                    return False
                if row.holder != holder:
                    log.info("lease %s: %s takes over from %s (until %s)", name, holder, row.holder, row.expires_at)
                row.holder, row.expires_at = holder, now + timedelta(seconds=ttl_s)
                return True
        except IntegrityError:
            return False

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up (a clean shutdown), so another process need not wait for it to expire."""
        with self.session(write=True) as s:
            row = s.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder == holder:
                s.delete(row)

    def leases_named(self, prefix: str) -> list[tuple[str, str, datetime]]:
        """(name, holder, expiry) of every lease whose name starts with `prefix`."""
        with self.session() as s:
            rows = s.scalars(select(LeaseRow).where(LeaseRow.name.startswith(prefix, autoescape=True))).all()
            return [(r.name, r.holder, r.expires_at) for r in rows]

    def lease_holder(self, name: str) -> tuple[str, datetime] | None:
        with self.session() as s:
            row = s.get(LeaseRow, name)
            return (row.holder, row.expires_at) if row is not None else None
