"""Fixtures for the fleet's tests.

- `mosquitto_broker`      -> MosquittoBroker: a real `mosquitto -c generated.conf` on a free port on
                             127.0.0.1 (persistence with autosave_interval 1, message_size_limit,
                             max_queued/inflight bytes, the dynamic security plugin with a generated
                             admin, anonymous off); `.url` is mqtt://admin:pass@127.0.0.1:port;
                             `.stop()`, `.kill()`, `.restart()`. Torn down after the test.
- `pg_url`                -> a PostgreSQL SQLAlchemy URL whose search_path is a fresh schema (dropped
                             afterwards); skips only when no server answers at 127.0.0.1:5432.
- `fleet_package`         -> make(files, *, name=..., version=..., golden=...) -> a signed package folder
                             of `files` (signed with the session's `signing_key`).
- `fleet_settings`        -> make(**overrides) -> FleetSettings in a fresh data folder, trusting `signing_key`.
- `fleet`                 -> a running FleetThread with the embedded broker (function scope).
- `admin`                 -> an httpx.Client on the `fleet` with the admin token.
- `any_fleet`             -> a running FleetThread on the embedded broker, then (a second parameter) on
                             the test's own Mosquitto with dynamic security.
- `owner`                 -> an httpx.Client on `any_fleet` with its owner's admin token.
- `console_fleet`         -> a ConsoleFleet (slmops_testing/console_fleet.py): a running fleet with three
                             simulated devices that sent telemetry and a release, for the web console.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_fleet.store import Store
from slmops_testing.brokers import MosquittoBroker, start_mosquitto
from slmops_testing.databases import PG_BASE_URL, pg_admin
from slmops_testing.packages import make_package


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto 2 with dynamic security on a free port (see MosquittoBroker)."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


# --- PostgreSQL --------------------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL on the machine's PostgreSQL whose search_path is a fresh schema; dropped afterwards."""
    schema = f"slmops_test_{secrets.token_hex(6)}"
    with pg_admin() as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            sep = "&" if "?" in PG_BASE_URL else "?"
            yield f"{PG_BASE_URL}{sep}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- packages and a running fleet ----------------------------------------------------------------------


@pytest.fixture
def fleet_package(signing_key: tuple[Path, Path], tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def make(files: dict[str, bytes], *, name: str = "fleet-test", version: str = "1.0.0", **kwargs: Any) -> Path:
        out = tmp_path / f"pkg-{next(counter)}" / "package"
        return make_package(files, out, signing_key[0], name=name, version=version, **kwargs)

    return make


@pytest.fixture
def fleet_settings(signing_key: tuple[Path, Path], tmp_path: Path) -> Callable[..., Any]:
    from slmops_fleet.settings import FleetSettings

    counter = iter(range(1_000_000))

    def make(**overrides: Any) -> FleetSettings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"fleet-{next(counter)}",
            "signing_keys": [signing_key[1]],
            "chunk_size": 256 * 1024,
            "coalesce_window_s": 0.3,
            "broadcast_rate": 0,
        }
        values.update(overrides)
        return FleetSettings(**values)

    return make


@pytest.fixture
def fleet(fleet_settings: Callable[..., Any]) -> Iterator[Any]:
    from slmops_fleet.process import FleetThread

    with FleetThread(fleet_settings()) as running:
        yield running


@pytest.fixture
def admin(fleet: Any) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def any_fleet(request: pytest.FixtureRequest, fleet_settings: Callable[..., Any]) -> Iterator[Any]:
    from slmops_fleet.process import FleetThread

    if request.param == "mosquitto":
        settings = fleet_settings(broker_url=request.getfixturevalue("mosquitto_broker").url)
    else:
        settings = fleet_settings()
    with FleetThread(settings) as fleet:
        yield fleet


@pytest.fixture
def owner(any_fleet: Any) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=any_fleet.url, headers={"Authorization": f"Bearer {any_fleet.admin_token}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated fleet store on SQLite and on PostgreSQL."""
    url = str(request.getfixturevalue("pg_url")) if request.param == "postgresql" else f"sqlite:///{tmp_path}/fleet.db"
    s = Store(url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def console_fleet(fleet_settings: Callable[..., Any], signing_key: tuple[Path, Path], tmp_path: Path) -> Iterator[Any]:
    from slmops_fleet.process import FleetThread
    from slmops_testing.console_fleet import ConsoleFleet

    with FleetThread(fleet_settings(rollout_tick_s=0.1)) as thread:
        fleet = ConsoleFleet(thread, signing_key[0], tmp_path)
        try:
            yield fleet
        finally:
            fleet.close()
