"""CredentialKeeper: the broker password through a rotation, saved atomically in credentials.json
(the whole path, with a fleet and both brokers, is in tests/fleet/test_fleet_lifecycle.py and
tests/e2e/test_lifecycle.py)."""

from __future__ import annotations

import json
from pathlib import Path

from slmops_agent.credentials import CredentialKeeper, Credentials, MqttCredentials


def keeper(tmp_path: Path) -> CredentialKeeper:
    creds = Credentials("dev-1", "http://127.0.0.1:1", MqttCredentials("127.0.0.1", 1883, "dev-1", "old"))
    path = tmp_path / "credentials.json"
    creds.save(path)
    return CredentialKeeper(path, creds)


def on_disk(k: CredentialKeeper) -> tuple[str, str]:
    m = Credentials.load(k.path).mqtt
    return m.password, m.previous_password


def test_a_new_password_is_kept_with_the_old_until_it_works(tmp_path: Path) -> None:
    k = keeper(tmp_path)
    assert k.accept("dev-1", "new") and on_disk(k) == ("new", "old") and k.passwords() == ["new", "old"]
    assert k.accept("dev-1", "new") and on_disk(k) == ("new", "old")  # the same update again: nothing new
    k.connected_with("old")  # a fallback connection keeps both
    assert on_disk(k) == ("new", "old")
    k.connected_with("new")
    assert on_disk(k) == ("new", "") and k.passwords() == ["new"]
    assert json.loads(k.path.read_text())["version"] == 1 and k.path.stat().st_mode & 0o777 == 0o600


def test_a_second_update_before_the_first_worked_keeps_the_password_the_broker_knows(tmp_path: Path) -> None:
    k = keeper(tmp_path)
    k.accept("dev-1", "p2")
    k.accept("dev-1", "p3")
    assert on_disk(k) == ("p3", "old")


def test_updates_for_another_device_or_without_a_password_are_refused(tmp_path: Path) -> None:
    k = keeper(tmp_path)
    assert not k.accept("dev-2", "x")
    assert not k.accept("dev-1", "")
    assert not k.accept("dev-1", "x" * 201)
    assert on_disk(k) == ("old", "")
