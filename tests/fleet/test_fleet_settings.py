"""FleetSettings: environment, validation, derived paths; the CLI's fleet discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from slmops_fleet.client import FleetClientError, resolve_target
from slmops_fleet.settings import BrokerAddress, FleetSettings


def test_environment_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLMOPS_FLEET_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SLMOPS_FLEET_CHUNK_SIZE", str(1024 * 1024))
    monkeypatch.setenv("SLMOPS_FLEET_SIGNING_KEYS", json.dumps([str(tmp_path / "k.pub")]))
    # The CLI's variables share the prefix; the server ignores them.
    monkeypatch.setenv("SLMOPS_FLEET_URL", "http://x")
    monkeypatch.setenv("SLMOPS_FLEET_TOKEN", "t")
    s = FleetSettings()
    assert s.data_dir == tmp_path / "d" and s.chunk_size == 1024 * 1024
    assert s.signing_keys == [tmp_path / "k.pub"]
    assert s.embedded_broker and s.broker_port == 0 and s.http_host == "127.0.0.1"
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'd' / 'fleet.db'}"
    assert s.topic_root == "slmops/v1" and s.chunk_size == 1024 * 1024
    assert FleetSettings(chunk_size=300_000, topic_root="/a/b/").topic_root == "a/b"  # flags win over env


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 256 * 1024 - 1},
        {"chunk_size": 1024 * 1024 + 1},
        {"topic_root": "a/+/b"},
        {"topic_root": "$SYS"},
        {"broker_url": "http://host:1"},
        {"broker_url": "mqtt://host:notaport"},
        {"broker_provisioning": "acl-file"},
        {"http_port": 70000},
        {"log_level": "LOUD"},
        {"token_default_ttl_s": 100, "token_max_ttl_s": 10},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FleetSettings(**kwargs)  # type: ignore[arg-type]


def test_broker_url_parsing() -> None:
    a = BrokerAddress.parse("mqtt://fleet%40x:p%3Ass@broker.local:8883")
    assert (a.host, a.port, a.username, a.password) == ("broker.local", 8883, "fleet@x", "p:ss")
    b = BrokerAddress.parse("mqtt://127.0.0.1")
    assert (b.port, b.username, b.password) == (1883, None, None)


def test_cli_finds_the_fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SLMOPS_FLEET_URL", raising=False)
    monkeypatch.delenv("SLMOPS_FLEET_TOKEN", raising=False)
    with pytest.raises(FleetClientError, match="no running fleet found"):
        resolve_target(None, None, tmp_path)
    (tmp_path / "fleet.json").write_text(json.dumps({"url": "http://127.0.0.1:1/", "admin_token": "T"}))
    t = resolve_target(None, None, tmp_path)
    assert (t.url, t.token, t.source) == ("http://127.0.0.1:1", "T", str(tmp_path / "fleet.json"))
    assert resolve_target(None, "flag", tmp_path).token == "flag"
    monkeypatch.setenv("SLMOPS_FLEET_URL", "http://elsewhere:2")
    with pytest.raises(FleetClientError, match="no admin token"):
        resolve_target(None, None, tmp_path)  # fleet.json's token belongs to another URL
    (tmp_path / "admin-token").write_text("FILE\n")
    assert resolve_target(None, None, tmp_path).token == "FILE"
    monkeypatch.setenv("SLMOPS_FLEET_TOKEN", "ENV")
    assert resolve_target(None, None, tmp_path).token == "ENV"
