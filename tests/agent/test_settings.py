from __future__ import annotations

from pathlib import Path

import pytest

from slmops_agent.settings import AgentSettings, SettingsValidationError, free_cores, load_settings


def test_defaults_derive_from_the_state_dir(tmp_path: Path) -> None:
    s = AgentSettings(state_dir=tmp_path / "st")
    assert s.state_dir == (tmp_path / "st").absolute()
    assert s.socket_path == s.state_dir / "agent.sock"
    assert s.grpc_address == "127.0.0.1:50051"
    assert 1 <= s.threads <= (__import__("os").cpu_count() or 1)


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLMOPS_AGENT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SLMOPS_AGENT_THREADS", "3")
    monkeypatch.setenv("SLMOPS_AGENT_GRPC_ADDRESS", "127.0.0.1:0")
    s = load_settings(threads=None)  # None: a flag that was not given
    assert s.state_dir == tmp_path and s.threads == 3 and s.grpc_address.endswith(":0")
    assert load_settings(threads=2).threads == 2  # a flag beats the environment


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("grpc_address", "nohostport"),
        ("grpc_address", "127.0.0.1:70000"),
        ("threads", 0),
        ("queue_bound", 0),
        ("log_level", "LOUD"),
        ("telemetry_interval_s", 0),
        ("unknown_setting", 1),
        ("spinning", "sometimes"),
        ("stream_group_s", -0.1),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(SettingsValidationError):
        AgentSettings(state_dir=tmp_path, **{field: value})


def test_free_cores_is_at_least_one() -> None:
    assert free_cores() >= 1


def test_spinning_is_auto_by_default_and_takes_booleans(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert AgentSettings(state_dir=tmp_path).spinning == "auto"
    for text, value in (("1", True), ("false", False), ("auto", "auto")):
        monkeypatch.setenv("SLMOPS_AGENT_SPINNING", text)
        assert AgentSettings(state_dir=tmp_path).spinning == value
