"""The fleet's database: the engine, one transaction per call, Alembic migrations applied at start.

SQLite (a file in the data folder) by default; PostgreSQL by URL. Every write that must be
atomic under concurrent requests (claiming an enrollment token, numbering desired-state
generations) is a conditional UPDATE or a row lock, so it holds on both.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"
INT64_MAX = (1 << 63) - 1
_WRITE = "slmops_write"
# The PostgreSQL advisory lock held around a schema upgrade, so that workers starting together
# migrate one at a time (the number is arbitrary, fixed: "slmops" in ASCII).
MIGRATION_LOCK = 0x736C6D6F7073


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def i64(value: int) -> int:
    return min(int(value), INT64_MAX)


class Database:
    """Thread-safe access to the fleet database (one short session per call)."""

    def __init__(self, url: str, *, engine: Engine | None = None, echo: bool = False) -> None:
        self.url = url
        self.engine = engine or self._create_engine(url, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @staticmethod
    def _create_engine(url: str, *, echo: bool) -> Engine:
        if url.startswith("sqlite"):
            engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                # The driver must not open transactions on its own: `_sqlite_begin` does, so that a
                # write transaction takes SQLite's write lock before it reads (BEGIN IMMEDIATE) and
                # read-then-write sequences cannot interleave.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

            return engine
        return create_engine(url, echo=echo, pool_pre_ping=True)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (programmatic Alembic, scripts in the package).

        On PostgreSQL the upgrade runs under a transaction-scoped advisory lock: a second worker
        starting at the same time waits for the first one's upgrade to commit, then finds the schema
        current and does nothing (SQLite's write lock, taken by the upgrade's first write, does the
        same there)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction. `write=True` for transactions that write: on SQLite they take the write
        lock up front; on PostgreSQL the row locks taken inside (FOR UPDATE) serialise them."""
        with self._sessions() as s:
            if write:
                s.connection(execution_options={_WRITE: True})  # begins the transaction with the option
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def ping(self) -> bool:
        try:
            with self.session() as s:
                s.execute(select(1))
            return True
        except Exception:
            log.exception("database ping failed")
            return False
