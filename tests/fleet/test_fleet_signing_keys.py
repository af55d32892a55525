"""Package-signing key rotation on a real fleet (FleetThread, SQLite, the embedded broker and
Mosquitto): a signed key statement is checked, recorded, listed and published retained to every
device; replays and statements signed by untrusted or retired keys are refused; packages signed by a
retired key are refused at upload and at rollout; devices enrolled later pin the new keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_builder.keys import generate_key, key_statement, load_private_key
from slmops_cli.procs import run
from slmops_fleet.errors import Conflict
from slmops_fleet.store import Store
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.key_statements import KeyRing, apply_chain
from slmops_protos.manifests import key_id, public_key_bytes
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import make_package, random_bytes
from slmops_testing.simulated_devices import SimDevice


def _admin(fleet: Any) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}, timeout=30)


def _post(admin: httpx.Client, data: bytes) -> httpx.Response:
    return admin.post("/v1/signing-keys/statements", content=data, headers={"Content-Type": "application/octet-stream"})


def _retained_chain(fleet: Any, creds: dict[str, Any]) -> fleet_pb2.KeyStatements:
    """What a device that connects now gets on the keys topic."""
    dev = SimDevice.enrolled(creds)
    try:
        assert not dev.connect().is_failure
        assert dev.subscribe(dev.topics.keys), "a device may subscribe to the keys topic"
        dev.wait_for(lambda: bool(dev.messages_on(dev.topics.keys)), 10, "the retained key statements")
        (msg,) = dev.messages_on(dev.topics.keys)
        assert msg.retain
        return fleet_pb2.KeyStatements.FromString(msg.payload)
    finally:
        dev.close()


def _rotate(
    fleet: Any, admin: httpx.Client, signing_key: tuple[Path, Path], tmp_path: Path, fleet_package: Callable[..., Path]
) -> Ed25519PrivateKey:
    """Rotate from the session's key to a new one; return the new key."""
    old = load_private_key(signing_key[0])
    new_path = tmp_path / "new.key"
    new = generate_key(new_path)
    stranger = Ed25519PrivateKey.generate()
    before = upload(admin, fleet_package({"m.bin": random_bytes(3000, 1)}, version="1.0.0"))
    device = enroll(fleet, new_token(admin)).json()
    assert device["key_sequence"] == 0

    s1 = key_statement(1, [old], add=[new.public_key()], retire=[old.public_key()], note="yearly rotation")
    r = _post(admin, s1.SerializeToString())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] == 1 and body["signed_by"] == key_id(old.public_key())
    assert [k["key_id"] for k in body["trusted"]] == [key_id(new.public_key())]
    assert [k["key_id"] for k in body["retired"]] == [key_id(old.public_key())]

    # refused: a replay, a statement by the retired key, one by a key never trusted, junk; nothing changes
    for data, status, why in (
        (s1.SerializeToString(), 409, "replay"),
        (key_statement(2, [old], add=[stranger.public_key()]).SerializeToString(), 400, "retired key"),
        (key_statement(2, [stranger], add=[stranger.public_key()]).SerializeToString(), 400, "untrusted keys"),
        (b"\x00junk", 400, "does not parse"),
        (b"\x00" * (64 * 1024 + 1), 413, "limit"),
    ):
        r = _post(admin, data)
        assert r.status_code == status and why in r.json()["detail"], r.text
    listed = admin.get("/v1/signing-keys").json()
    assert listed["sequence"] == 1 and [s["note"] for s in listed["statements"]] == ["yearly rotation"]
    assert [k["key_id"] for k in listed["trusted"]] == [key_id(new.public_key())]
    assert admin.get("/v1/status").json()["trusted_keys"] == [key_id(new.public_key())]

    # the statement waits retained for every device, also one that connects only now
    chain = _retained_chain(fleet, device)
    ring, applied, why = apply_chain(
        KeyRing.of(device["signing_keys"]), [s.SerializeToString() for s in chain.statements]
    )
    assert (applied, why) == (1, "") and ring.trusted == (public_key_bytes(new.public_key()).hex(),)

    # packages: signed by the retired key refused at upload; one stored before cannot be rolled out
    r = admin.post(
        "/v1/packages", content=(fleet_package({"m.bin": random_bytes(10, 2)}) / "manifest.signed.pb").read_bytes()
    )
    assert r.status_code == 400 and "retired key" in r.json()["detail"], r.text
    r = admin.post("/v1/rollouts", json={"package_id": before["package_id"], "target": "all"})
    assert r.status_code == 409 and "retired key" in r.json()["detail"], r.text
    by_new = make_package({"m.bin": random_bytes(3000, 3)}, tmp_path / "by-new", new_path, version="2.0.0")
    assert upload(admin, by_new)["signed_by"] == key_id(new.public_key())
    # a device enrolled now pins the new key and the statement's sequence
    later = enroll(fleet, new_token(admin)).json()
    assert later["signing_keys"] == [public_key_bytes(new.public_key()).hex()]
    assert later["key_sequence"] == 1
    return new


def test_key_rotation_on_the_embedded_broker(
    fleet: Any,
    admin: httpx.Client,
    signing_key: tuple[Path, Path],
    tmp_path: Path,
    fleet_package: Callable[..., Path],
) -> None:
    new = _rotate(fleet, admin, signing_key, tmp_path, fleet_package)
    # the fleet keeps what it applied: after a restart the ring is the same and it publishes it again,
    # also when the operator no longer configures the retired key
    settings = fleet.server.settings.model_copy(update={"signing_keys": []})
    fleet.stop()
    from slmops_fleet.process import FleetThread

    with FleetThread(settings) as again, _admin(again) as a2:
        listed = a2.get("/v1/signing-keys").json()
        assert listed["sequence"] == 1 and listed["configured"] == []
        assert [k["key_id"] for k in listed["trusted"]] == [key_id(new.public_key())]
        table = run(["fleet", "keys", "list", "--fleet", again.url, "--token", again.admin_token])
        assert key_id(new.public_key()) in table and "retired" in table and "yearly rotation" in table
        device = enroll(again, new_token(a2)).json()
        assert len(_retained_chain(again, device).statements) == 1


@pytest.mark.mosquitto
def test_key_rotation_on_mosquitto(
    mosquitto_broker: Any,
    fleet_settings: Callable[..., Any],
    signing_key: tuple[Path, Path],
    tmp_path: Path,
    fleet_package: Callable[..., Path],
) -> None:
    from slmops_fleet.process import FleetThread

    with FleetThread(fleet_settings(broker_url=mosquitto_broker.url)) as fleet, _admin(fleet) as admin:
        _rotate(fleet, admin, signing_key, tmp_path, fleet_package)


def test_the_store_refuses_a_statement_at_or_below_the_last(store: Store) -> None:
    store.add_key_statement(1, b"one", "k1")
    store.add_key_statement(5, b"five", "k1")
    for seq in (5, 3):
        with pytest.raises(Conflict, match="already applied"):
            store.add_key_statement(seq, b"again", "k1")
    assert store.key_statements() == [b"one", b"five"]
