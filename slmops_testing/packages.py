"""Signed package folders for tests and benchmarks: packages of given files (`make_package`, with
deterministic `random_bytes`), their blobs, and an existing package signed again with other golden
references, another version or another profile (`repackage`: the release and quality-gate tests)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from slmops_protos.manifests import SIGNED_MANIFEST_FILE, parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2


def random_bytes(n: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (fast enough for a few MiB)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:n])


def make_package(
    files: dict[str, bytes],
    out: Path,
    key_path: Path,
    *,
    name: str = "fleet-test",
    version: str = "1.0.0",
    adapter_of: str = "",
    golden: list[tuple[str, str]] | None = None,
    security_version: int = 0,
) -> Path:
    """A signed package folder of `files` (the fleet does not care whether they are a model). With
    `adapter_of` (a base package id) it is an adapter package whose first file is the adapter;
    `golden` lists its golden prompts as (prompt, reference)."""
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    src = out.with_name(out.name + ".src")
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    spec = PackageSpec(
        name=name,
        version=version,
        profile=manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu", precision="int4"),
        golden_prompts=[manifest_pb2.GoldenPrompt(prompt=p, reference=r) for p, r in golden or []],
        security_version=security_version,
    )
    if adapter_of:
        spec.kind = "adapter"
        spec.adapters = [manifest_pb2.Adapter(name=name, base_package_id=adapter_of, path=next(iter(files)))]
    return write_package(src, spec, load_private_key(key_path), out).path


def package_blobs(folder: Path) -> dict[str, int]:
    """sha256 -> size of every blob in a package folder."""
    return {p.name: p.stat().st_size for p in (folder / "blobs").iterdir()}


def repackage(
    pkg: Path,
    out: Path,
    key_path: Path,
    *,
    version: str | None = None,
    references: str | None = None,
    profile: manifest_pb2.HardwareProfile | None = None,
    extra_files: dict[str, bytes] | None = None,
    security_version: int | None = None,
) -> Path:
    """`pkg`'s files and manifest, re-signed into `out` (with `key_path`); `references` replaces every
    golden prompt's reference answer (a package whose answers can never match on a device);
    `extra_files` (path -> bytes) are added to the package's files; `security_version` replaces the
    manifest's."""
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    signed = parse_signed_manifest((pkg / SIGNED_MANIFEST_FILE).read_bytes())
    m = manifest_pb2.Manifest.FromString(signed.manifest)
    golden = [manifest_pb2.GoldenPrompt() for _ in m.golden_prompts]
    for new, old in zip(golden, m.golden_prompts, strict=True):
        new.CopyFrom(old)
        if references is not None:
            new.reference = references
    spec = PackageSpec(
        name=m.name,
        version=version or m.version,
        profile=profile or m.profile,
        kind=m.kind,
        lineage=m.lineage,
        evaluation=m.evaluation,
        golden_prompts=golden,
        adapters=list(m.adapters),
        security_version=m.security_version if security_version is None else security_version,
    )
    with tempfile.TemporaryDirectory(prefix="repackage-") as tmp:
        src = Path(tmp)
        for f in m.files:
            dest = src / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pkg / "blobs" / f.sha256, dest)
        for rel, data in (extra_files or {}).items():
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return write_package(src, spec, load_private_key(key_path), out).path
