"""Fixtures for the fleet's tests.

- `mosquitto_broker`      -> MosquittoBroker: a real `mosquitto -c generated.conf` on a free port on
                             127.0.0.1 (persistence with autosave_interval 1, message_size_limit,
                             max_queued/inflight bytes, the dynamic security plugin with a generated
                             admin, anonymous off); `.url` is mqtt://admin:pass@127.0.0.1:port;
                             `.stop()`, `.kill()`, `.restart()`. Torn down after the test.
- `pg_url`                -> a PostgreSQL SQLAlchemy URL whose search_path is a fresh schema (dropped
                             afterwards); skips only when no server answers at 127.0.0.1:5432.
- `fleet_package`         -> make(files, *, name=..., version=...) -> a signed package folder of `files`
                             (signed with the session's `signing_key`).
- `fleet_settings`        -> make(**overrides) -> FleetSettings in a fresh data folder, trusting `signing_key`.
- `fleet`                 -> a running FleetThread with the embedded broker (function scope).
- `admin`                 -> an httpx.Client on the `fleet` with the admin token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetkit import free_port, make_package

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
PG_BASE_URL = os.environ.get("SLMOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# --- Mosquitto ------------------------------------------------------------------------------------------


@dataclass
class MosquittoBroker:
    host: str
    port: int
    admin_username: str
    admin_password: str
    workdir: Path
    conf: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """mqtt://admin:password@host:port: the fleet's --broker-url (and --broker-admin-url)."""
        return f"mqtt://{self.admin_username}:{self.admin_password}@{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.process.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: what the broker had not autosaved (autosave_interval 1) is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(workdir: Path, *, port: int | None = None) -> MosquittoBroker:
    """A Mosquitto 2 broker with dynamic security, persistence and size limits, in `workdir`."""
    if not Path(MOSQUITTO).exists() or not DYNSEC_PLUGIN.exists():
        pytest.fail(f"these tests need mosquitto 2 with its dynamic security plugin ({MOSQUITTO}, {DYNSEC_PLUGIN})")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    dynsec = workdir / "dynamic-security.json"
    admin, password = "slmops-admin", secrets.token_urlsafe(16)
    subprocess.run(
        [MOSQUITTO_CTRL, "dynsec", "init", str(dynsec), admin, password],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    port = port or free_port()
    conf = workdir / "generated.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous false",
                "persistence true",
                f"persistence_location {data}/",
                "autosave_interval 1",
                "message_size_limit 8388608",
                "max_inflight_bytes 16777216",
                "max_queued_bytes 268435456",
                "max_queued_messages 100000",
                f"plugin {DYNSEC_PLUGIN}",
                f"plugin_opt_config_file {dynsec}",
                # Started as root it would drop to user `mosquitto`, which cannot read this folder.
                "user root",
                "log_dest stdout",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
            ]
        )
    )
    broker = MosquittoBroker("127.0.0.1", port, admin, password, workdir, conf, workdir / "mosquitto.log")
    broker.start()
    return broker


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
    import psycopg

    plain = PG_BASE_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(plain, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server reachable at {plain}: {str(exc).splitlines()[0]}")
    schema = f"slmops_test_{secrets.token_hex(6)}"
    with admin:
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

    def make(files: dict[str, bytes], *, name: str = "fleet-test", version: str = "1.0.0") -> Path:
        return make_package(
            files, tmp_path / f"pkg-{next(counter)}" / "package", signing_key[0], name=name, version=version
        )

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
    from slmops_fleet.server import FleetThread

    with FleetThread(fleet_settings()) as running:
        yield running


@pytest.fixture
def admin(fleet: Any) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30
    ) as client:
        yield client
