"""Signing keys, package writing and verification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slmops_builder.keys import KeyFileError, generate_key, load_private_key, load_public_key, public_path, sign
from slmops_builder.packaging import PackageSpec, read_manifest, unpack_package, verify_package, write_package
from slmops_builder.profiles import get_profile
from slmops_protos.manifests import (
    SIGNED_MANIFEST_FILE,
    PackageError,
    read_package,
    sha256_file,
    verify_signed_manifest,
)
from slmops_protos.package.v1 import manifest_pb2


def _spec(version: str = "1.0.0") -> PackageSpec:
    return PackageSpec(name="demo", version=version, profile=get_profile("cpu-int4").to_pb())


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("same content")
    (src / "sub" / "b.txt").write_text("same content")
    (src / "c.bin").write_bytes(os.urandom(1000))
    return src


def test_keygen_files_and_modes(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k" / "signing.key")
    priv = tmp_path / "k" / "signing.key"
    assert priv.stat().st_mode & 0o777 == 0o600
    assert load_private_key(priv).public_key() == load_public_key(public_path(priv))
    assert len(public_path(priv).read_text().strip()) == 64
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key(priv)
    generate_key(priv, overwrite=True)
    assert load_private_key(priv).public_key() != key.public_key()


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found"):
        load_private_key(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_private_key(junk)
    with pytest.raises(KeyFileError, match="not a hex Ed25519"):
        load_public_key(junk)
    with pytest.raises(KeyFileError, match="not found"):
        load_public_key(tmp_path / "missing.pub")


def test_sign_and_tamper(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k")
    other = generate_key(tmp_path / "other")
    data = b"manifest bytes"
    signed = sign(
        manifest_pb2.Manifest(format_version=1, name="x", version="1.0.0", kind="model").SerializeToString(), key
    )
    # A manifest without files fails validation even when the signature is good.
    with pytest.raises(PackageError, match="no files"):
        verify_signed_manifest(signed, [key.public_key()])
    signed = sign(data, key)
    tampered = manifest_pb2.SignedManifest()
    tampered.CopyFrom(signed)
    tampered.manifest = data + b"!"
    with pytest.raises(PackageError, match="bad signature"):
        verify_signed_manifest(tampered, [key.public_key()])
    with pytest.raises(PackageError, match="untrusted"):
        verify_signed_manifest(signed, [other.public_key()])


def test_write_package_dedups_and_verifies(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    src = _source(tmp_path)
    key = load_private_key(signing_key[0])
    written = write_package(src, _spec(), key, tmp_path / "pkg")
    assert sorted(f.path for f in written.manifest.files) == ["a.txt", "c.bin", "sub/b.txt"]
    blobs = sorted(p.name for p in (written.path / "blobs").iterdir())
    assert len(blobs) == 2  # a.txt and sub/b.txt share one blob
    assert written.blob_bytes == len("same content") + 1000
    verified = verify_package(written.path, [load_public_key(signing_key[1])])
    assert verified.package_id == written.package_id
    manifest, pid = read_manifest(written.path)
    assert pid == written.package_id and manifest.name == "demo"
    out = unpack_package(written.path, tmp_path / "unpacked", [load_public_key(signing_key[1])])
    assert (out / "sub" / "b.txt").read_text() == "same content"
    assert sha256_file(out / "c.bin") == sha256_file(src / "c.bin")


def test_tampered_package_is_rejected(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    written = write_package(_source(tmp_path), _spec(), load_private_key(signing_key[0]), tmp_path / "pkg")
    keys = [load_public_key(signing_key[1])]
    signed_path = written.path / SIGNED_MANIFEST_FILE
    original = signed_path.read_bytes()

    # 1. flip a byte of the manifest bytes (the signature no longer matches)
    signed, _ = read_package(written.path)
    signed.manifest = signed.manifest.replace(b"demo", b"dEmo")
    signed_path.write_bytes(signed.SerializeToString())
    with pytest.raises(PackageError, match="bad signature"):
        verify_package(written.path, keys)

    # 2. flip a byte of the signature
    signed, _ = read_package(written.path)
    signed.CopyFrom(manifest_pb2.SignedManifest.FromString(original))
    sig = bytearray(signed.signatures[0].signature)
    sig[0] ^= 1
    signed.signatures[0].signature = bytes(sig)
    signed_path.write_bytes(signed.SerializeToString())
    with pytest.raises(PackageError, match="bad signature"):
        verify_package(written.path, keys)

    # 3. garbage instead of a signed manifest
    signed_path.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(PackageError):
        verify_package(written.path, keys)

    # 4. good manifest, corrupted blob, then a missing blob
    signed_path.write_bytes(original)
    verify_package(written.path, keys)
    blob = next(p for p in (written.path / "blobs").iterdir() if p.stat().st_size == 1000)
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its SHA-256"):
        verify_package(written.path, keys)
    blob.unlink()
    with pytest.raises(PackageError, match="missing"):
        verify_package(written.path, keys)
    with pytest.raises(PackageError):
        unpack_package(written.path, tmp_path / "never", keys)
    assert not (tmp_path / "never").exists()


def test_unsafe_path_refused_without_partial_output(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    key = load_private_key(signing_key[0])
    src = _source(tmp_path)
    good = write_package(src, _spec(), key, tmp_path / "pkg")
    before = sorted(p.relative_to(good.path) for p in good.path.rglob("*"))
    (src / "zz\x01bad").write_text("control character in the name")
    with pytest.raises(PackageError, match="unsafe file path"):
        write_package(src, _spec("2.0.0"), key, tmp_path / "pkg")
    # The earlier package is untouched and no temporary folder is left.
    assert sorted(p.relative_to(good.path) for p in good.path.rglob("*")) == before
    verify_package(good.path, [load_public_key(signing_key[1])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "src"]
    with pytest.raises(PackageError, match="unsafe file path"):
        write_package(src, _spec(), key, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_empty_source_refused(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="no files"):
        write_package(tmp_path / "empty", _spec(), load_private_key(signing_key[0]), tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_not_a_package(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    with pytest.raises(PackageError, match="not a package folder"):
        verify_package(tmp_path, [load_public_key(signing_key[1])])


def test_the_security_version_is_signed_into_the_manifest(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    spec = _spec()
    spec.security_version = 3
    written = write_package(_source(tmp_path), spec, load_private_key(signing_key[0]), tmp_path / "pkg")
    verified = verify_package(written.path, [load_public_key(signing_key[1])])
    assert verified.manifest.security_version == 3
    assert read_manifest(written.path)[0].security_version == 3
