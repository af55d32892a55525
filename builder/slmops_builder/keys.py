"""Ed25519 signing keys for packages: generate, load, sign; signed key statements (rotation)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops_protos.key_statements import (
    STATEMENT_CONTEXT,
    STATEMENT_FORMAT_VERSION,
    KeyStatementError,
    normalize_key,
)
from slmops_protos.manifests import key_id, public_key_bytes
from slmops_protos.package.v1 import manifest_pb2


class KeyFileError(ValueError):
    """A key file is missing or is not an Ed25519 key."""


def generate_key(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Write a new private key (PEM, mode 0600) to `path` and its public key to `path.pub`."""
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path(path).write_text(public_key_bytes(key.public_key()).hex() + "\n")
    return key


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"signing key not found: {path} (create one with 'slmops builder keygen')") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key file: the hex of the raw 32-byte key (as `keygen` writes it)."""
    try:
        text = path.read_text().strip()
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except FileNotFoundError:
        raise KeyFileError(f"public key not found: {path}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a hex Ed25519 public key") from exc


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> manifest_pb2.SignedManifest:
    signed = manifest_pb2.SignedManifest(manifest=manifest_bytes)
    signed.signatures.add(key_id=key_id(key.public_key()), signature=key.sign(manifest_bytes))
    return signed


def key_statement(
    sequence: int,
    signers: Sequence[Ed25519PrivateKey],
    *,
    add: Sequence[Ed25519PublicKey] = (),
    retire: Sequence[Ed25519PublicKey] = (),
    note: str = "",
) -> manifest_pb2.SignedKeyStatement:
    """A key statement (trust `add`, retire `retire`) numbered `sequence`, signed by each of `signers`."""
    if sequence < 1:
        raise KeyFileError("a key statement's sequence starts at 1 (see 'slmops fleet keys list')")
    if not signers:
        raise KeyFileError("a key statement needs at least one signing key")
    if not add and not retire:
        raise KeyFileError("a key statement adds or retires at least one key (--add, --retire)")
    try:
        adds = [normalize_key(public_key_bytes(k).hex()) for k in add]
        retires = [normalize_key(public_key_bytes(k).hex()) for k in retire]
    except KeyStatementError as exc:
        raise KeyFileError(exc.reason) from exc
    if set(adds) & set(retires):
        raise KeyFileError("a key cannot be added and retired by the same statement")
    statement = manifest_pb2.KeyStatement(
        format_version=STATEMENT_FORMAT_VERSION,
        sequence=sequence,
        issued_unix_ms=int(time.time() * 1000),
        add_keys=adds,
        retire_keys=retires,
        note=note,
    )
    data = statement.SerializeToString(deterministic=True)
    signed = manifest_pb2.SignedKeyStatement(statement=data)
    for key in signers:
        signed.signatures.add(key_id=key_id(key.public_key()), signature=key.sign(STATEMENT_CONTEXT + data))
    return signed
