"""The package-signing keys the fleet trusts, and the key statements that rotate them.

The configured keys (`--trust-key`, `<data dir>/trusted-keys/*.pub`) are the start; every key
statement the fleet applied (the `key_statements` table, in sequence order) is folded over them
(`slmops_protos.key_statements`), so a key a statement retired stays retired even if it is still
configured, and every fleet process sharing the database trusts the same keys. Applying a statement
checks it against that ring (signed by a key trusted now, a sequence above the last, no retired key
back, one key left), records it, and publishes the whole chain retained on `{root}/keys`, which
every device reads when it connects (one offline now gets it on reconnect).
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops_fleet.distribution import Publisher
from slmops_fleet.errors import Conflict, InvalidRequest
from slmops_fleet.store import Store
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.key_statements import (
    MAX_STATEMENTS,
    KeyRing,
    KeyStatementError,
    apply_statement,
    fold_statements,
    hex_key_id,
    parse_signed_statement,
    statement_signer,
)
from slmops_protos.manifests import PackageError, parse_signed_manifest, public_key_bytes, verify_signed_manifest
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)


class SigningKeys:
    def __init__(self, configured: list[Ed25519PublicKey], store: Store, publisher: Publisher, topics: Topics) -> None:
        self.configured = [public_key_bytes(k).hex() for k in configured]
        self.store = store
        self.publisher = publisher
        self.topics = topics

    def ring(self) -> KeyRing:
        """The configured keys folded with every applied statement (each was checked when applied)."""
        return fold_statements(KeyRing.of(self.configured), self.store.key_statements())

    def trusted(self) -> list[Ed25519PublicKey]:
        return self.ring().public_keys()

    def trusted_hex(self) -> list[str]:
        return list(self.ring().trusted)

    def apply(self, data: bytes) -> dict[str, Any]:
        """Check and record a signed statement, publish the chain; the ring after it."""
        ring = self.ring()
        try:
            signed, statement = parse_signed_statement(data)
            if statement.sequence <= ring.sequence:
                raise Conflict(
                    f"key statement {statement.sequence} is a replay: statement {ring.sequence} is already applied"
                )
            signer = statement_signer(signed, ring)
            after, _ = apply_statement(ring, data)
        except KeyStatementError as exc:
            raise InvalidRequest(f"key statement refused: {exc.reason}") from exc
        if len(self.store.key_statements()) >= MAX_STATEMENTS:
            raise Conflict(f"this fleet holds {MAX_STATEMENTS} key statements already")
        self.store.add_key_statement(statement.sequence, signed.SerializeToString(), signer)
        log.info(
            "key statement %d (signed by %s) applied: trusting %s; retired %s",
            statement.sequence, signer, ", ".join(hex_key_id(k) for k in after.trusted),
            ", ".join(hex_key_id(k) for k in sorted(after.retired)) or "none",
        )  # fmt: skip
        self.publish()
        return {**after.to_json(), "applied": statement.sequence, "signed_by": signer}

    def publish(self) -> None:
        """The whole chain, retained (on apply and whenever the fleet's MQTT session connects)."""
        chain = self.store.key_statements()
        if not chain:
            return
        msg = fleet_pb2.KeyStatements(statements=[manifest_pb2.SignedKeyStatement.FromString(s) for s in chain])
        self.publisher.publish(self.topics.keys, msg.SerializeToString(), qos=1, retain=True)

    def describe(self) -> dict[str, Any]:
        """The ring, the configured keys and each statement (for `slmops fleet keys list`)."""
        ring = self.ring()
        statements = []
        for data in self.store.key_statements():
            signed, st = parse_signed_statement(data)
            statements.append(
                {
                    "sequence": st.sequence,
                    "issued_unix_ms": st.issued_unix_ms,
                    "add": [hex_key_id(k) for k in st.add_keys],
                    "retire": [hex_key_id(k) for k in st.retire_keys],
                    "signed_by": [s.key_id for s in signed.signatures],
                    "note": st.note,
                }
            )
        return {**ring.to_json(), "configured": [hex_key_id(k) for k in self.configured], "statements": statements}

    def check_package(self, signed_manifest: bytes) -> None:
        """Refuse to roll out a package no trusted key signed (its signer retired since its upload)."""
        ring = self.ring()
        try:
            verify_signed_manifest(parse_signed_manifest(signed_manifest), ring.public_keys(), ring.retired_keys())
        except PackageError as exc:
            raise Conflict(f"package refused: {exc.reason}") from exc
