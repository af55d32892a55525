"""A throwaway PostgreSQL database on the machine's server (trust auth, user postgres), dropped after.

`fresh_pg_database()` yields its SQLAlchemy URL; the server is `SLMOPS_TEST_PG_URL` (default
postgresql+psycopg://postgres@127.0.0.1:5432/test, whose database the admin connection uses).
A test that needs a truly empty database (migrations) or one shared by several fleet processes
uses it; `pytest.skip` when no server answers.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

PG_BASE_URL = os.environ.get("SLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_admin() -> Iterator[Any]:
    """An autocommit psycopg connection to the machine's PostgreSQL (`pytest.skip` when none answers)."""
    import psycopg

    plain = PG_BASE_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(plain, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server reachable at {plain}: {str(exc).splitlines()[0]}")
    with admin:
        yield admin


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    name = f"slmops_test_{secrets.token_hex(6)}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_BASE_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
