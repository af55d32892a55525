"""Several fleet workers on one PostgreSQL database: the schema upgrade under concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from slmops_fleet.store import Store
from slmops_testing.databases import fresh_pg_database

_MIGRATE = (
    "import sys; from slmops_fleet.store import Store; s = Store(sys.argv[1]); s.migrate(); print(s.schema_revision())"
)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def test_two_workers_migrate_a_fresh_database_at_once(fresh_database: str) -> None:
    """Two processes upgrade an empty database together: one waits on the advisory lock, then finds
    the schema current; both end at the newest revision and neither fails on a table the other made."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, fresh_database],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    store = Store(fresh_database)
    try:
        head = store.schema_revision()
        assert head is not None
        assert {out.strip().splitlines()[-1] for out, _ in results} == {head}
        store.migrate()  # a later start: nothing to do
        assert store.schema_revision() == head
    finally:
        store.close()
