"""The device's key ring: key statements from the fleet applied in order, saved atomically, refused
when untrusted, retired, replayed or retiring the last key; the ring survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_agent.credentials import Credentials, MqttCredentials
from slmops_agent.errors import AgentError
from slmops_agent.layout import StateLayout
from slmops_agent.signing_keys import KeyTrust, add_trusted_key, load_ring
from slmops_builder.keys import key_statement
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.key_statements import KeyRing
from slmops_protos.manifests import public_key_bytes


def _hex(key: Ed25519PrivateKey) -> str:
    return public_key_bytes(key.public_key()).hex()


def _creds(keys: list[str], sequence: int = 0) -> Credentials:
    return Credentials("dev-1", "http://fleet", MqttCredentials("h", 1, "dev-1", "p"), keys, key_sequence=sequence)


def _chain(*statements: object) -> fleet_pb2.KeyStatements:
    return fleet_pb2.KeyStatements(statements=list(statements))  # type: ignore[arg-type]


def test_statements_rotate_the_ring_and_it_survives_a_restart(tmp_path: Path) -> None:
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    layout = StateLayout(tmp_path)
    layout.create()
    creds = _creds([_hex(old)])
    seen: list[KeyRing] = []
    trust = KeyTrust(layout, creds, on_change=seen.append)
    s1 = key_statement(1, [old], add=[new.public_key()], retire=[old.public_key()])
    forged = key_statement(2, [stranger], add=[stranger.public_key()])
    by_retired = key_statement(2, [old], add=[stranger.public_key()])
    trust.on_statements(_chain(s1))
    assert trust.ring.trusted == (_hex(new),) and trust.ring.sequence == 1 and len(seen) == 1
    for bad, why in ((forged, "untrusted"), (by_retired, "retired key")):
        trust.on_statements(_chain(s1, bad))
        assert why in trust.last_refusal and trust.ring.sequence == 1
    trust.on_statements(_chain(s1))  # the retained chain again after a reconnect: nothing to do
    assert len(seen) == 1 and trust.refused == 2
    last = key_statement(2, [new], retire=[new.public_key()])
    trust.on_statements(_chain(s1, last))
    assert "last trusted key" in trust.last_refusal and trust.ring.trusted == (_hex(new),)
    # restart: the ring comes back from signing_keys.json, the enrollment pin stays retired
    again = load_ring(layout, creds)
    assert again == trust.ring
    with pytest.raises(AgentError, match="retired"):
        add_trusted_key(layout, _hex(old))


def test_a_device_enrolled_after_statements_skips_them(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    layout = StateLayout(tmp_path)
    layout.create()
    s1 = key_statement(1, [old], add=[new.public_key()], retire=[old.public_key()])
    trust = KeyTrust(layout, _creds([_hex(new)], sequence=1))  # what the fleet pins after statement 1
    trust.on_statements(_chain(s1))
    assert trust.refused == 0 and trust.ring.trusted == (_hex(new),)


def test_too_many_statements_in_one_message_are_refused(tmp_path: Path) -> None:
    from slmops_protos.key_statements import MAX_STATEMENTS

    old = Ed25519PrivateKey.generate()
    layout = StateLayout(tmp_path)
    layout.create()
    trust = KeyTrust(layout, _creds([_hex(old)]))
    one = key_statement(1, [old], add=[Ed25519PrivateKey.generate().public_key()])
    trust.on_statements(_chain(*[one] * (MAX_STATEMENTS + 1)))
    assert trust.refused == 1 and "limit" in trust.last_refusal and trust.ring.sequence == 0
    assert not layout.key_ring.exists()
