"""Package variants for the release and quality-gate tests: an existing package folder signed again
with other golden references, another version or another profile (the files stay the same)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from slmops_protos.manifests import SIGNED_MANIFEST_FILE, parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2


def repackage(
    pkg: Path,
    out: Path,
    key_path: Path,
    *,
    version: str | None = None,
    references: str | None = None,
    profile: manifest_pb2.HardwareProfile | None = None,
) -> Path:
    """`pkg`'s files and manifest, re-signed into `out`; `references` replaces every golden prompt's
    reference answer (a package whose answers can never match on a device)."""
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
    )
    with tempfile.TemporaryDirectory(prefix="repackage-") as tmp:
        src = Path(tmp)
        for f in m.files:
            dest = src / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pkg / "blobs" / f.sha256, dest)
        return write_package(src, spec, load_private_key(key_path), out).path
