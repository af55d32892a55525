"""Write signed, content-addressed model packages.

A package folder holds:
    manifest.signed.pb   the SignedManifest (exact manifest bytes + Ed25519 signatures)
    manifest.json        the manifest as JSON, for people (not trusted by anyone)
    blobs/<sha256>       one file per distinct content
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from slmops_builder.keys import sign
from slmops_protos import __version__
from slmops_protos.manifests import (
    BLOBS_DIR,
    FORMAT_VERSION,
    MANIFEST_JSON_FILE,
    SIGNED_MANIFEST_FILE,
    PackageError,
    canonical_bytes,
    key_id,
    package_id,
    read_package,
    safe_relpath,
    sha256_file,
    validate_manifest,
    verify_signed_manifest,
)
from slmops_protos.package.v1 import manifest_pb2


@dataclass
class PackageSpec:
    """What goes into a manifest besides the files."""

    name: str
    version: str
    profile: manifest_pb2.HardwareProfile
    kind: str = "model"
    lineage: manifest_pb2.Lineage = field(default_factory=manifest_pb2.Lineage)
    evaluation: manifest_pb2.Evaluation = field(default_factory=manifest_pb2.Evaluation)
    golden_prompts: list[manifest_pb2.GoldenPrompt] = field(default_factory=list)
    adapters: list[manifest_pb2.Adapter] = field(default_factory=list)
    security_version: int = 0  # devices refuse a package below the highest they committed


@dataclass(frozen=True)
class WrittenPackage:
    path: Path
    package_id: str
    manifest: manifest_pb2.Manifest
    blob_bytes: int


def write_package(source_dir: Path, spec: PackageSpec, key: Ed25519PrivateKey, out_dir: Path) -> WrittenPackage:
    """Hash every file under `source_dir`, copy each distinct content into `out_dir/blobs/`,
    write and sign the manifest. `out_dir` is written to a temporary sibling first and
    renamed, so a failure leaves no partial package."""
    files = sorted(p for p in source_dir.rglob("*") if p.is_file())
    if not files:
        raise PackageError(f"no files to package in {source_dir}")
    manifest = manifest_pb2.Manifest(
        format_version=FORMAT_VERSION,
        name=spec.name,
        version=spec.version,
        kind=spec.kind,
        builder_version=__version__,
        created_unix_ms=int(time.time() * 1000),
        security_version=spec.security_version,
    )
    manifest.profile.CopyFrom(spec.profile)
    manifest.lineage.CopyFrom(spec.lineage)
    manifest.evaluation.CopyFrom(spec.evaluation)
    manifest.golden_prompts.extend(spec.golden_prompts)
    manifest.adapters.extend(spec.adapters)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / BLOBS_DIR).mkdir(parents=True)
    blob_bytes = 0
    try:
        for path in files:
            rel = path.relative_to(source_dir).as_posix()
            safe_relpath(rel)
            digest = sha256_file(path)
            size = path.stat().st_size
            manifest.files.add(path=rel, sha256=digest, size=size)
            blob = tmp / BLOBS_DIR / digest
            if not blob.exists():
                shutil.copyfile(path, blob)
                blob_bytes += size
        manifest.evaluation.size_bytes = manifest.evaluation.size_bytes or sum(f.size for f in manifest.files)
        validate_manifest(manifest)
        data = canonical_bytes(manifest)
        signed = sign(data, key)
        (tmp / SIGNED_MANIFEST_FILE).write_bytes(signed.SerializeToString())
        parsed = manifest_pb2.Manifest.FromString(data)
        (tmp / MANIFEST_JSON_FILE).write_text(
            json_format.MessageToJson(parsed, preserving_proto_field_name=True, indent=2) + "\n"
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WrittenPackage(out_dir, package_id(data), parsed, blob_bytes)


@dataclass(frozen=True)
class VerifiedPackage:
    path: Path
    package_id: str
    manifest: manifest_pb2.Manifest
    key_id: str


def read_manifest(path: Path) -> tuple[manifest_pb2.Manifest, str]:
    """The manifest of a package folder and its package id, WITHOUT checking the signature
    (for display only: use `verify_package` before trusting anything in it)."""
    signed, _ = read_package(path)
    manifest = manifest_pb2.Manifest()
    try:
        manifest.ParseFromString(signed.manifest)
    except DecodeError as exc:
        raise PackageError("manifest does not parse") from exc
    return manifest, package_id(signed.manifest)


def verify_package(path: Path, trusted_keys: Iterable[Ed25519PublicKey]) -> VerifiedPackage:
    """Check the signature with `trusted_keys`, then every blob's presence, size and SHA-256."""
    keys = list(trusted_keys)
    signed, blobs = read_package(path)
    manifest = verify_signed_manifest(signed, keys)
    trusted = {key_id(k) for k in keys}
    signer = next(s.key_id for s in signed.signatures if s.key_id in trusted)
    for f in manifest.files:
        blob = blobs / f.sha256
        if not blob.is_file():
            raise PackageError(f"blob of {f.path} is missing: {BLOBS_DIR}/{f.sha256}")
        if blob.stat().st_size != f.size:
            raise PackageError(f"blob of {f.path} has {blob.stat().st_size} bytes, manifest says {f.size}")
        if sha256_file(blob) != f.sha256:
            raise PackageError(f"blob of {f.path} does not match its SHA-256 (corrupt or tampered)")
    return VerifiedPackage(path, package_id(signed.manifest), manifest, signer)


def unpack_package(path: Path, dest: Path, trusted_keys: Iterable[Ed25519PublicKey]) -> Path:
    """Verify a package and write its files into `dest` (which must not exist): the folder
    onnxruntime-genai loads. Written to a temporary sibling and renamed."""
    verified = verify_package(path, trusted_keys)
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for f in verified.manifest.files:
            target = tmp / safe_relpath(f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path / BLOBS_DIR / f.sha256, target)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
