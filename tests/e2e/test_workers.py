"""Two fleet workers (`slmops fleet serve` twice, each its own data folder) on one PostgreSQL database
and one Mosquitto: one fleet. Two real agents and a swarm of simulated devices (enrolled through
either worker) go through a release in waves with gates while they send telemetry; every call
alternates between the workers. Then a second release, and the worker leading the rollout is
SIGKILLed in the middle of a wave's broadcast: the other worker takes the rollout over and every
device commits, the killed worker's broker session is drained (no telemetry sample lost or stored
twice), and each blob went out about once per wave.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import create_engine, text

from slmops_cli.procs import wait_until
from slmops_testing import crash
from slmops_testing.brokers import MosquittoBroker, start_mosquitto
from slmops_testing.crash import CHUNK, Agent, blob_stats, client_of, padded_package
from slmops_testing.databases import fresh_pg_database
from slmops_testing.fleet_api import INVENTORY
from slmops_testing.processes import FleetProc
from slmops_testing.swarm import Swarm

pytestmark = [pytest.mark.timeout(420), pytest.mark.mosquitto]

SWARM = 24  # simulated devices
WAVES = ["1", "50%", "100%"]
PAD = 8 * CHUNK  # 2 MiB: each wave's broadcast takes about 4 s at crash.RATE


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


class SwarmThread:
    """The simulated devices in a thread; each sends a telemetry batch of 2 samples every 0.3 s
    while `telemetry` is set."""

    def __init__(self, creds: list[dict[str, Any]]) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.swarm = Swarm(creds, stall_s=1.0, on_event=lambda *e: self.events.append(e))
        self.telemetry = threading.Event()
        self._stop = threading.Event()
        self._next = 0.0
        self.thread = threading.Thread(target=self._run, name="swarm", daemon=True)

    def _until(self) -> bool:
        now = time.monotonic()
        if self.telemetry.is_set() and now >= self._next:
            self._next = now + 0.3
            for d in self.swarm.devices:
                d.send_telemetry(1, 2)
        return self._stop.is_set()

    def _run(self) -> None:
        self.swarm.connect()
        try:
            self.swarm.run(self._until, tick_s=0.1)
        finally:
            self.swarm.close()

    def start(self) -> SwarmThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def sent(self) -> dict[str, int]:
        return {d.device_id: d.telemetry_seq for d in self.swarm.devices}


def enroll_simulated(fleet: FleetProc, name: str) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    token = client_of(fleet).create_token()["token"]
    body = {"token": token, "public_key": key, "name": name, "inventory": INVENTORY}
    response = httpx.post(fleet.info["url"] + "/v1/enroll", json=body, timeout=60)
    response.raise_for_status()
    return dict(response.json())


def leader_pid(database: str) -> int:
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            holder = conn.execute(text("SELECT holder FROM leases WHERE name = 'rollout-driver'")).scalar_one()
    finally:
        engine.dispose()
    return int(holder.split(":")[1])


def stored_telemetry(database: str) -> dict[str, tuple[int, int, int]]:
    """device -> (rows, distinct sequence numbers, highest sequence number)."""
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT device_id, count(*), count(DISTINCT seq), max(seq) "
                    "FROM telemetry_samples GROUP BY device_id"
                )
            ).all()
    finally:
        engine.dispose()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def worker_leases(database: str) -> list[str]:
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT name FROM leases WHERE name LIKE 'worker:%'")).all()]
    finally:
        engine.dispose()


def wait_all_committed(fleet: FleetProc, package_id: str, devices: int, rollout_id: str) -> None:
    def done() -> bool:
        listed = client_of(fleet).list_devices()
        return len(listed) == devices and all(
            d["state"] == "COMMITTED" and d["active_package_id"] == package_id for d in listed
        )

    try:
        wait_until(done, timeout=150, what=f"every device COMMITTED on {package_id[:12]}")
    except Exception:
        states = [(d["id"], d["state"], d["reported_generation"]) for d in client_of(fleet).list_devices()]
        rollout = client_of(fleet).get_rollout(rollout_id)
        print(f"devices: {states}\nrollout: {rollout['state']} waves {rollout['waves']}")
        raise


def test_two_workers_one_fleet_and_one_killed_mid_rollout(
    tmp_path: Path,
    broker: MosquittoBroker,
    database: str,
    signing_key: tuple[Path, Path],
    tiny_package_factory: Callable[..., Path],
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    started: list[FleetProc] = []
    agents: list[Agent] = []
    swarm: SwarmThread | None = None

    def start(name: str) -> FleetProc:
        fleet = crash.start_fleet(
            tmp_path / name, tmp_path / "logs" / f"{name}.log", signing_key[1],
            "--broker-url", broker.url, "--database-url", database, "--worker-id", name,
            "--admin-token-file", str(token_file),
        )  # fmt: skip
        started.append(fleet)
        return fleet

    try:
        w1, w2 = start("w1"), start("w2")
        assert w1.info["admin_token"] == w2.info["admin_token"] == token_file.read_text().strip()
        workers = [w1, w2]

        # Enrollment through either worker: two real agents, a swarm of simulated devices.
        for i in range(2):
            agents.append(crash.enroll(workers[i], tmp_path / f"agent-{i}", tmp_path / "logs").start())
        creds = [enroll_simulated(workers[i % 2], f"sim-{i}") for i in range(SWARM)]
        swarm = SwarmThread(creds).start()
        swarm.telemetry.set()
        devices = SWARM + len(agents)
        wait_until(lambda: len(client_of(w2).list_devices()) == devices, timeout=30, what="every device listed")

        # Release 1: uploaded through one worker, rolled out through the other, in waves with gates.
        tiny = tiny_package_factory("1.0.0", out=tmp_path / "tiny")
        gates = {"max_failures": 0, "min_success_rate": 1.0}
        pkg1, pid1, pad1 = padded_package(tiny, tmp_path / "v1", signing_key[0], "1.0.0", PAD)
        assert client_of(w2).upload_package(pkg1)["package_id"] == pid1
        rollout1 = client_of(w1).create_rollout(pid1, "all", waves=WAVES, soak_s=0.5, gates=gates)
        wait_all_committed(w2, pid1, devices, rollout1["id"])
        wait_until(
            lambda: client_of(w1).get_rollout(rollout1["id"])["state"] == "succeeded", timeout=30, what="rollout 1"
        )
        sent1 = blob_stats(w2, pad1)
        print(f"release 1, padding blob: {sent1}")
        # Both workers receive every blob request; only the rollout driver's holder serves them.
        assert 1 <= sent1["broadcasts"] <= len(WAVES), sent1
        assert sent1["broadcast_bytes"] <= len(WAVES) * PAD, sent1

        # Release 2, and the worker leading the rollout is SIGKILLed in the middle of wave 2's broadcast.
        pkg2, pid2, pad2 = padded_package(tiny, tmp_path / "v2", signing_key[0], "2.0.0", PAD)
        assert client_of(w1).upload_package(pkg2)["package_id"] == pid2
        rollout2 = client_of(w2).create_rollout(pid2, "all", waves=WAVES, soak_s=0.5, gates=gates)

        def second_wave_fetching() -> bool:
            fetching = [d for d in swarm.swarm.devices if d.target == pid2 and d.fetches]
            return len(fetching) >= 3

        wait_until(second_wave_fetching, timeout=60, what="wave 2 fetching", interval=0.05)
        time.sleep(1.5)
        leader = leader_pid(database)
        killed = next(w for w in workers if w.service.pid == leader)
        survivor = next(w for w in workers if w is not killed)
        killed.service.kill()
        print(f"SIGKILLed worker {killed.data_dir.name} (pid {leader}) in wave 2's broadcast")

        wait_all_committed(survivor, pid2, devices, rollout2["id"])
        wait_until(
            lambda: client_of(survivor).get_rollout(rollout2["id"])["state"] == "succeeded",
            timeout=30,
            what="rollout 2 through the surviving worker",
        )
        for agent in agents:
            assert agent.answer() == "2.0.0"
        sent2 = blob_stats(survivor, pad2)
        print(f"release 2, padding blob (the killed worker's unflushed counts lost): {sent2}")
        # Once per wave, plus the wave whose broadcast the killed worker left half sent.
        assert sent2["broadcasts"] <= len(WAVES) + 1, sent2
        assert sent2["broadcast_bytes"] <= (len(WAVES) + 1) * PAD, sent2

        # The killed worker's broker session was drained and ended by the survivor.
        gone = "worker:slmops-fleet-" + killed.data_dir.name
        wait_until(lambda: gone not in worker_leases(database), timeout=60, what="the dead worker's session drained")

        # Telemetry: every sample each simulated device sent is stored once.
        swarm.telemetry.clear()
        time.sleep(0.5)
        sent = swarm.sent()

        def all_stored() -> dict[str, tuple[int, int, int]] | None:
            rows = stored_telemetry(database)
            return rows if all(rows.get(d, (0, 0, 0))[0] >= n for d, n in sent.items()) else None

        try:
            rows = wait_until(all_stored, timeout=60, what="every telemetry sample stored")
        finally:
            rows = stored_telemetry(database)
            lost = {d: n - rows.get(d, (0, 0, 0))[0] for d, n in sent.items() if rows.get(d, (0, 0, 0))[0] != n}
            print(f"telemetry: {sum(sent.values())} samples sent by {len(sent)} devices; differences {lost}")
        for device_id, n in sent.items():
            assert rows[device_id] == (n, n, n), (device_id, rows[device_id], n)
        for agent in agents:  # the real agents' samples: none stored twice
            count, distinct, _ = rows[agent.device_id]
            assert count == distinct > 0
    finally:
        if swarm is not None:
            swarm.stop()
        for agent in agents:
            agent.stop()
        for fleet in reversed(started):
            if fleet.service.alive():
                fleet.service.stop()
