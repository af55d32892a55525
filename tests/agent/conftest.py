"""Agent-only fixtures: test settings, the tiny packages (v1, v2 differing only in genai_config.json,
one signed by an untrusted key), a paho client playing the fleet on the machine's Mosquitto
(127.0.0.1:1883, a unique topic root per test), a private Mosquitto tests may stop and start, the tiny
model loaded once per run (`model`) and the update rig (`rig`)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import FleetSim, agent_settings, load_unpacked, spec
from update_rig import Rig

from slmops_agent.runtime.model import LoadedModel
from slmops_agent.settings import AgentSettings
from slmops_testing.brokers import MosquittoBroker, start_mosquitto


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder under /tmp (Unix socket paths are limited to 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_settings() -> Callable[..., AgentSettings]:
    return agent_settings


@pytest.fixture(scope="session")
def trusted_hex(signing_key: tuple[Path, Path]) -> str:
    return signing_key[1].read_text().strip()


@pytest.fixture(scope="session")
def pkg_v1(tiny_package_factory: Any) -> Path:
    return tiny_package_factory("1.0.0")


@pytest.fixture(scope="session")
def pkg_v2(tiny_package_factory: Any) -> Path:
    """v2 differs from v1 only in genai_config.json (its search options)."""
    return tiny_package_factory("2.0.0", search={"top_k": 7})


@pytest.fixture(scope="session")
def other_key_pkg(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid package signed by a key the device does not trust."""
    from slmops_builder.keys import generate_key
    from slmops_builder.packaging import write_package

    base = tmp_path_factory.mktemp("other-key")
    key = generate_key(base / "other.key")
    source = tmp_path_factory.mktemp("other-src")
    (source / "genai_config.json").write_text("{}")
    return write_package(
        source,
        spec("evil", "9.0.0"),
        key,
        base / "package",
    ).path


@pytest.fixture(scope="session")
def model(pkg_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny v1 package unpacked and loaded once for the whole run (hosts swap it in; none closes it)."""
    return load_unpacked(pkg_v1, tmp_path_factory.mktemp("unpacked"))


@pytest.fixture
def rig(tmp_path: Path, trusted_hex: str) -> Iterator[Rig]:
    """An updater with its own state folder and model host, started; stopped and closed afterwards."""
    r = Rig(tmp_path / "state", trusted_hex)
    r.updater.start()
    try:
        yield r
    finally:
        r.updater.stop()
        r.host.close()


@pytest.fixture
def topic_root() -> str:
    return f"test-agent/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fleet_sim(topic_root: str) -> Iterator[FleetSim]:
    sim = FleetSim(topic_root)
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = start_mosquitto(tmp_path / "broker", anonymous=True)
    try:
        yield broker
    finally:
        broker.stop()
