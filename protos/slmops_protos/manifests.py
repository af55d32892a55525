"""Canonical manifest bytes, package ids and signature verification.

These few functions are part of the contract: the builder, the fleet and the agent
must agree on them byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from slmops_protos.package.v1 import manifest_pb2

if TYPE_CHECKING:  # cryptography is imported where a key is parsed (an idle agent need not load it)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT_VERSION = 1
SIGNED_MANIFEST_FILE = "manifest.signed.pb"
MANIFEST_JSON_FILE = "manifest.json"
BLOBS_DIR = "blobs"
# Per-file and per-package bounds a device enforces before it fetches anything.
MAX_FILE_BYTES = 16 * 1024**3
MAX_FILES = 4096
MAX_MANIFEST_BYTES = 4 * 1024**2
# How a device's report starts when it refuses a package below its committed security version.
DOWNGRADE_REFUSED = "security version downgrade refused"
_HEX = frozenset("0123456789abcdef")


class PackageError(ValueError):
    """A package or manifest is malformed, unsafe or not signed by a trusted key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def canonical_bytes(manifest: manifest_pb2.Manifest) -> bytes:
    """The manifest's canonical serialization: files and adapters sorted, deterministic maps."""
    m = manifest_pb2.Manifest()
    m.CopyFrom(manifest)
    files = sorted(m.files, key=lambda f: f.path)
    del m.files[:]
    m.files.extend(files)
    adapters = sorted(m.adapters, key=lambda a: a.name)
    del m.adapters[:]
    m.adapters.extend(adapters)
    return m.SerializeToString(deterministic=True)


def package_id(manifest_bytes: bytes) -> str:
    """A package is named by the SHA-256 of its manifest bytes."""
    return sha256_hex(manifest_bytes)


def key_id(public_key: Ed25519PublicKey) -> str:
    return sha256_hex(public_key_bytes(public_key))[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_hex(value: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError as exc:
        raise PackageError(f"not an Ed25519 public key in hex: {value[:20]!r}") from exc


def safe_relpath(path: str) -> PurePosixPath:
    """Refuse absolute paths, '..', empty parts, backslashes and control characters."""
    p = PurePosixPath(path)
    if (
        not path
        or p.is_absolute()
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or any(ord(c) < 32 for c in path)
        or len(path) > 512
    ):
        raise PackageError(f"unsafe file path in manifest: {path!r}")
    return p


def validate_manifest(manifest: manifest_pb2.Manifest) -> None:
    """Check what a device must check before it fetches or unpacks anything."""
    if manifest.format_version != FORMAT_VERSION:
        raise PackageError(f"unsupported manifest format_version {manifest.format_version}")
    if not manifest.name or not manifest.version:
        raise PackageError("manifest has no name or version")
    if manifest.kind not in ("model", "adapter"):
        raise PackageError(f"unknown package kind {manifest.kind!r}")
    if not manifest.files:
        raise PackageError("manifest lists no files")
    if len(manifest.files) > MAX_FILES:
        raise PackageError(f"manifest lists {len(manifest.files)} files (limit {MAX_FILES})")
    seen: set[str] = set()
    for f in manifest.files:
        safe_relpath(f.path)
        if f.path in seen:
            raise PackageError(f"file listed twice: {f.path}")
        seen.add(f.path)
        if not is_sha256_hex(f.sha256):
            raise PackageError(f"bad sha256 for {f.path}: {f.sha256!r}")
        if f.size > MAX_FILE_BYTES:
            raise PackageError(f"{f.path} is {f.size} bytes (limit {MAX_FILE_BYTES})")


def parse_signed_manifest(data: bytes) -> manifest_pb2.SignedManifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise PackageError(f"signed manifest is {len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
    signed = manifest_pb2.SignedManifest()
    try:
        signed.ParseFromString(data)
    except DecodeError as exc:
        raise PackageError("signed manifest does not parse") from exc
    return signed


def verify_signed_manifest(
    signed: manifest_pb2.SignedManifest,
    trusted_keys: Iterable[Ed25519PublicKey],
    retired_keys: Iterable[Ed25519PublicKey] = (),
) -> manifest_pb2.Manifest:
    """Return the manifest if a trusted key signed its exact bytes; raise PackageError otherwise
    (naming a retired key when only such keys signed it)."""
    from cryptography.exceptions import InvalidSignature

    keys = {key_id(k): k for k in trusted_keys}
    if not keys:
        raise PackageError("no trusted signing keys configured")
    if not signed.signatures:
        raise PackageError("manifest is not signed")
    for sig in signed.signatures:
        key = keys.get(sig.key_id)
        if key is None:
            continue
        try:
            key.verify(sig.signature, signed.manifest)
        except InvalidSignature:
            raise PackageError(f"bad signature by key {sig.key_id}") from None
        manifest = manifest_pb2.Manifest()
        try:
            manifest.ParseFromString(signed.manifest)
        except DecodeError as exc:
            raise PackageError("manifest does not parse") from exc
        validate_manifest(manifest)
        return manifest
    names = ", ".join(s.key_id for s in signed.signatures)
    retired = {key_id(k) for k in retired_keys} & {s.key_id for s in signed.signatures}
    if retired:
        raise PackageError(f"manifest signed by a retired key ({', '.join(sorted(retired))}), no trusted one")
    raise PackageError(f"manifest signed only by untrusted keys ({names})")


def read_package(path: Path) -> tuple[manifest_pb2.SignedManifest, Path]:
    """Return the signed manifest and the blob folder of a package folder."""
    signed_path = path / SIGNED_MANIFEST_FILE
    if not signed_path.is_file():
        raise PackageError(f"{path} is not a package folder (no {SIGNED_MANIFEST_FILE})")
    signed = parse_signed_manifest(signed_path.read_bytes())
    return signed, path / BLOBS_DIR
