"""Key statements (package-signing key rotation): the builder writes them, `slmops_protos.key_statements`
checks and folds them the same way for the fleet and the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_builder.keys import KeyFileError, generate_key, key_statement, public_path
from slmops_protos.key_statements import (
    STATEMENT_CONTEXT,
    KeyRing,
    KeyStatementError,
    apply_chain,
    apply_statement,
    fold_statements,
    hex_key_id,
)
from slmops_protos.manifests import key_id, public_key_bytes, verify_signed_manifest
from slmops_protos.package.v1 import manifest_pb2


def _hex(key: Ed25519PrivateKey) -> str:
    return public_key_bytes(key.public_key()).hex()


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.generate() for name in ("old", "new", "newer", "stranger")}


def _statement(seq: int, signer: Ed25519PrivateKey, *, add=(), retire=()) -> bytes:  # type: ignore[no-untyped-def]
    return key_statement(
        seq, [signer], add=[k.public_key() for k in add], retire=[k.public_key() for k in retire]
    ).SerializeToString()


def test_rotation_adds_then_retires(keys: dict[str, Ed25519PrivateKey]) -> None:
    ring = KeyRing.of([_hex(keys["old"])])
    ring, statement = apply_statement(ring, _statement(1, keys["old"], add=[keys["new"]], retire=[keys["old"]]))
    assert statement.sequence == 1
    assert ring.trusted == (_hex(keys["new"]),)
    assert ring.retired == {_hex(keys["old"])}
    assert ring.sequence == 1
    # the new key signs the next one
    ring, _ = apply_statement(ring, _statement(2, keys["new"], add=[keys["newer"]]))
    assert ring.trusted == (_hex(keys["new"]), _hex(keys["newer"]))


def test_refusals(keys: dict[str, Ed25519PrivateKey]) -> None:
    ring = KeyRing.of([_hex(keys["old"])])
    first = _statement(1, keys["old"], add=[keys["new"]], retire=[keys["old"]])
    after, _ = apply_statement(ring, first)
    with pytest.raises(KeyStatementError, match="untrusted keys"):
        apply_statement(ring, _statement(1, keys["stranger"], add=[keys["stranger"]]))
    with pytest.raises(KeyStatementError, match="signed by a retired key"):
        apply_statement(after, _statement(2, keys["old"], add=[keys["stranger"]]))
    with pytest.raises(KeyStatementError, match="replay"):
        apply_statement(after, first)
    with pytest.raises(KeyStatementError, match="replay"):
        apply_statement(after, _statement(1, keys["new"], add=[keys["newer"]]))
    with pytest.raises(KeyStatementError, match="adds retired key"):
        apply_statement(after, _statement(2, keys["new"], add=[keys["old"]]))
    with pytest.raises(KeyStatementError, match="last trusted key"):
        apply_statement(after, _statement(2, keys["new"], retire=[keys["new"]]))
    with pytest.raises(KeyStatementError, match="does not parse"):
        apply_statement(ring, b"\xff\xffjunk")


def test_a_tampered_statement_or_a_manifest_signature_is_refused(keys: dict[str, Ed25519PrivateKey]) -> None:
    ring = KeyRing.of([_hex(keys["old"])])
    signed = key_statement(1, [keys["old"]], add=[keys["new"].public_key()])
    tampered = manifest_pb2.SignedKeyStatement()
    tampered.CopyFrom(signed)
    st = manifest_pb2.KeyStatement.FromString(signed.statement)
    st.add_keys[0] = _hex(keys["stranger"])
    tampered.statement = st.SerializeToString()
    with pytest.raises(KeyStatementError, match="bad signature"):
        apply_statement(ring, tampered.SerializeToString())
    # a signature over the bare bytes (as a manifest is signed) does not count for a statement
    bare = manifest_pb2.SignedKeyStatement(statement=signed.statement)
    bare.signatures.add(key_id=key_id(keys["old"].public_key()), signature=keys["old"].sign(signed.statement))
    with pytest.raises(KeyStatementError, match="bad signature"):
        apply_statement(ring, bare.SerializeToString())
    # and a statement's signature is not a manifest signature
    as_manifest = manifest_pb2.SignedManifest(manifest=STATEMENT_CONTEXT + signed.statement)
    as_manifest.signatures.add(key_id=signed.signatures[0].key_id, signature=signed.signatures[0].signature)
    with pytest.raises(Exception, match="manifest"):
        verify_signed_manifest(as_manifest, [keys["old"].public_key()])


def test_chain_skips_what_was_applied_and_stops_at_a_bad_one(keys: dict[str, Ed25519PrivateKey]) -> None:
    s1 = _statement(1, keys["old"], add=[keys["new"]], retire=[keys["old"]])
    s2 = _statement(2, keys["new"], add=[keys["newer"]])
    s3 = _statement(3, keys["old"], add=[keys["stranger"]])  # signed by a key retired in 1
    ring, applied, why = apply_chain(KeyRing.of([_hex(keys["old"])]), [s1, s2, s3])
    assert (applied, ring.sequence) == (2, 2)
    assert "retired key" in why
    # a device that applied 1 already (or enrolled after it) applies only 2
    ring1, _ = apply_statement(KeyRing.of([_hex(keys["old"])]), s1)
    again, applied, why = apply_chain(ring1, [s1, s2])
    assert (applied, why, again.sequence) == (1, "", 2)
    # the fleet folds recorded statements without their signers (its configured keys may change)
    folded = fold_statements(KeyRing.of([_hex(keys["newer"])]), [s1, s2])
    assert set(folded.trusted) == {_hex(keys["new"]), _hex(keys["newer"])}
    assert hex_key_id(_hex(keys["old"])) in json.dumps(folded.to_json())


def test_builder_statement_checks_its_input(keys: dict[str, Ed25519PrivateKey]) -> None:
    with pytest.raises(KeyFileError, match="sequence starts at 1"):
        key_statement(0, [keys["old"]], add=[keys["new"].public_key()])
    with pytest.raises(KeyFileError, match="adds or retires"):
        key_statement(1, [keys["old"]])
    with pytest.raises(KeyFileError, match="added and retired"):
        key_statement(1, [keys["old"]], add=[keys["new"].public_key()], retire=[keys["new"].public_key()])


def test_builder_cli_writes_a_statement(tmp_path: Path) -> None:
    from slmops_cli.main import app

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key(old)
    generate_key(new)
    out = tmp_path / "rotate.bin"
    args = ["builder", "key-statement", "--sign-with", str(old), "--add", str(public_path(new))]
    args += ["--retire", str(public_path(old)), "--sequence", "1", "-o", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sequence"] == 1 and len(data["add"]) == 1 and len(data["retire"]) == 1
    from slmops_builder.keys import load_private_key

    ring, _ = apply_statement(KeyRing.of([_hex(load_private_key(old))]), out.read_bytes())
    assert ring.trusted == (_hex(load_private_key(new)),)
    bad = CliRunner().invoke(app, [*args[:6], "--sequence", "0", "-o", str(out)])
    assert bad.exit_code == 1 and "sequence starts at 1" in bad.output
