"""The package an update installs: its verified manifest (with an adapter package's base), the files
its slot holds, what the runtime loads from it, and the checks a desired package must pass on this
device before anything is fetched."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slmops_agent.errors import NotFound, PackageRejected
from slmops_agent.runtime.model import ModelInfo
from slmops_agent.update.messages import Desired
from slmops_agent.update_record import SlotInfo
from slmops_protos.manifests import (
    BLOBS_DIR,
    DOWNGRADE_REFUSED,
    SIGNED_MANIFEST_FILE,
    PackageError,
    package_id,
    parse_signed_manifest,
    verify_signed_manifest,
)
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.providers import ort_provider_name

if TYPE_CHECKING:  # cryptography is imported when a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)


def resident_dir(pid: str) -> str:
    """Where a slot keeps the files of an adapter package it carries along (not its own package)."""
    return f"adapters/{pid[:16]}"


@dataclass
class Target:
    """A package and what its slot holds with it: for an adapter package, its base and the other
    adapter packages on that base the slot keeps (`resident`, each file under `resident_dir`)."""

    package_id: str
    manifest: manifest_pb2.Manifest
    blobs: dict[str, int]  # sha -> size
    base_id: str = ""  # an adapter package: its base model package
    base: manifest_pb2.Manifest | None = None
    resident: tuple[tuple[str, manifest_pb2.Manifest], ...] = ()

    @property
    def resident_ids(self) -> tuple[str, ...]:
        return tuple(pid for pid, _ in self.resident)

    @property
    def files(self) -> list[manifest_pb2.FileEntry]:
        """What the slot holds: the base's files, the resident adapters', then the package's own."""
        carried = [
            manifest_pb2.FileEntry(path=f"{resident_dir(pid)}/{f.path}", sha256=f.sha256, size=f.size)
            for pid, m in self.resident
            for f in m.files
        ]
        return [*(self.base.files if self.base is not None else ()), *carried, *self.manifest.files]

    @property
    def adapter(self) -> str:
        """The adapter TESTING activates ("" for a model package)."""
        return self.manifest.adapters[0].name if self.base is not None else ""

    def path_of(self, sha: str) -> str:
        """The slot path of a blob, for messages (its hash's start when the package has no such file)."""
        for f in self.files:
            if f.sha256 == sha:
                return f.path
        return sha[:12]

    def model_info(self, slot: str) -> ModelInfo:
        """What the runtime loads: the slot's model and its adapters (those shipped in the base, and
        an adapter package's own, whose files the slot holds next to the base's)."""
        manifest, pid = self.manifest, self.package_id
        model = self.base if self.base is not None else manifest
        model_id = self.base_id or pid
        files = [(a.name, a.path) for a in model.adapters if a.path and a.base_package_id in ("", model_id)]
        for rid, m in self.resident:
            files += [(a.name, f"{resident_dir(rid)}/{a.path}") for a in m.adapters if a.base_package_id == model_id]
        if self.base is not None:
            files += [(a.name, a.path) for a in manifest.adapters if a.path and a.base_package_id == model_id]
        return ModelInfo(
            name=manifest.name,
            version=manifest.version,
            package_id=pid,
            profile=model.profile.name,
            slot=slot,
            adapters=tuple(name for name, _ in files),
            adapter_files=tuple(files),
        )


class Manifests:
    """The verified manifests kept in manifests/ (one per package a slot holds or an update targets).

    A package about to be installed must be signed by a trusted key; one already installed (a slot's,
    or an adapter's base) also by a key retired since it was installed: retiring a key stops new
    installs, it does not stop the device serving what it runs."""

    def __init__(
        self,
        folder: Path,
        trusted_keys: Sequence[Ed25519PublicKey],
        retired_keys: Sequence[Ed25519PublicKey] | None = None,
    ) -> None:
        self.folder = folder
        self.trusted_keys = trusted_keys
        self.retired_keys = retired_keys or []

    def set_keys(self, trusted: Sequence[Ed25519PublicKey], retired: Sequence[Ed25519PublicKey]) -> None:
        self.trusted_keys, self.retired_keys = trusted, retired

    def read(self, pid: str, *, installed: bool = True) -> manifest_pb2.Manifest:
        path = self.folder / f"{pid}.pb"
        try:
            signed = parse_signed_manifest(path.read_bytes())
            if package_id(signed.manifest) != pid:
                raise PackageError(f"{path.name} does not hold package {pid[:12]}")
            if installed:
                return verify_signed_manifest(signed, [*self.trusted_keys, *self.retired_keys])
            return verify_signed_manifest(signed, self.trusted_keys, self.retired_keys)
        except FileNotFoundError:
            raise PackageRejected(f"the manifest of {pid[:12]} is missing") from None
        except PackageError as exc:
            raise PackageRejected(exc.reason) from exc

    def target(self, pid: str, *, installed: bool = True, resident: tuple[str, ...] = ()) -> Target:
        """A package's target; `installed=False` for one still being installed (trusted keys only)."""
        if not pid:
            raise PackageRejected("the record names no target package")
        return self.target_of(pid, self.read(pid, installed=installed), resident)

    def target_of(self, pid: str, manifest: manifest_pb2.Manifest, resident: tuple[str, ...] = ()) -> Target:
        """A package with, for an adapter package, its base's manifest and those of the `resident`
        adapter packages (all kept in manifests/ while they serve)."""
        base_id = manifest.adapters[0].base_package_id if manifest.kind == "adapter" and manifest.adapters else ""
        base = self.read(base_id) if base_id else None
        kept = tuple((rid, self.read(rid)) for rid in resident) if base_id else ()
        return Target(pid, manifest, {f.sha256: f.size for f in manifest.files}, base_id, base, kept)

    def keeps(self, manifest: manifest_pb2.Manifest, active: SlotInfo | None) -> tuple[str, ...]:
        """The adapter packages an adapter package joins: those the active slot serves on the same
        base, but for one of the same adapter name (which it updates) and those whose manifest is gone."""
        if manifest.kind != "adapter" or not manifest.adapters or active is None or not active.base_package_id:
            return ()
        adapter = manifest.adapters[0]
        if adapter.base_package_id != active.base_package_id:
            return ()
        kept: list[str] = []
        for pid in (*active.adapters, active.package_id):
            try:
                other = self.read(pid)
            except PackageRejected:
                log.warning("adapter package %s is no longer kept: its manifest does not read", pid[:12])
                continue
            if other.adapters and other.adapters[0].name != adapter.name and pid not in kept:
                kept.append(pid)
        return tuple(kept)

    def without_adapter(self, name: str, active: SlotInfo | None) -> tuple[str, tuple[str, ...]]:
        """The active slot without adapter `name`: (the package it then serves, the adapter packages
        it keeps besides). The last other adapter package takes its place; the base when none is left.
        NotFound when the slot serves no adapter of that name."""
        if active is None or not active.base_package_id:
            raise NotFound(f"adapter {name!r} is not installed (this device runs no adapter package)")
        named = {pid: self.read(pid) for pid in (*active.adapters, active.package_id)}
        keep = [pid for pid, m in named.items() if m.adapters[0].name != name]
        if len(keep) == len(named):
            have = ", ".join(m.adapters[0].name for m in named.values())
            raise NotFound(f"adapter {name!r} is not installed (adapter packages here: {have})")
        if not keep:
            return active.base_package_id, ()
        return keep[-1], tuple(keep[:-1])

    def check_desired(
        self,
        d: Desired,
        active: SlotInfo | None,
        *,
        providers: list[str] | None,
        memory_bytes: int | None,
        security_floor: int = 0,
    ) -> manifest_pb2.Manifest:
        """The desired package's verified manifest, if this device can run it (PackageRejected if not):
        signed by a trusted key, its security version not below `security_floor` (the highest this
        device committed), runnable here."""
        assert d.package_id is not None
        try:
            signed = parse_signed_manifest(d.signed_manifest)
            if package_id(signed.manifest) != d.package_id:
                raise PackageError(
                    f"package id {d.package_id[:12]} does not match its manifest ({package_id(signed.manifest)[:12]})"
                )
            manifest = verify_signed_manifest(signed, self.trusted_keys, self.retired_keys)
        except PackageError as exc:
            raise PackageRejected(exc.reason) from exc
        if manifest.security_version < security_floor:
            raise PackageRejected(
                f"{DOWNGRADE_REFUSED}: {manifest.name} {manifest.version} has security version "
                f"{manifest.security_version}, this device committed security version {security_floor}"
            )
        if manifest.kind == "adapter":
            self.check_adapter(manifest, active)
            return manifest
        if manifest.kind != "model":
            raise PackageRejected(f"{manifest.kind!r} packages are not supported by this agent")
        ep = manifest.profile.execution_provider.lower()
        if ep and ep != "cpu" and providers is not None:
            wanted = ort_provider_name(ep) or ep
            if wanted not in providers:
                raise PackageRejected(
                    f"the package needs execution provider {ep!r}; this device has {', '.join(providers)}"
                )
        need = manifest.profile.min_memory_bytes
        if need and memory_bytes and need > memory_bytes:
            raise PackageRejected(f"the package needs {need} bytes of memory; this device has {memory_bytes}")
        return manifest

    def check_adapter(self, manifest: manifest_pb2.Manifest, active: SlotInfo | None) -> None:
        """An adapter package runs only on its base: the active package or the active adapter's base."""
        if len(manifest.adapters) != 1 or not manifest.adapters[0].base_package_id:
            raise PackageRejected("an adapter package must name exactly one adapter bound to a base package")
        adapter = manifest.adapters[0]
        if adapter.path not in {f.path for f in manifest.files}:
            raise PackageRejected(f"adapter {adapter.name!r}: {adapter.path!r} is not one of the package's files")
        runs = (active.base_package_id or active.package_id) if active is not None else ""
        if adapter.base_package_id != runs:
            what = f"runs {runs[:12]} ({active.name} {active.version})" if active is not None else "runs no model"
            raise PackageRejected(
                f"adapter {adapter.name!r} is bound to base package {adapter.base_package_id[:12]}; this device {what}"
            )
        base = self.read(runs)
        clash = {f.path for f in base.files} & {f.path for f in manifest.files}
        if clash:
            raise PackageRejected(f"adapter files clash with the base package's: {', '.join(sorted(clash))}")


def read_package(package_dir: Path) -> tuple[manifest_pb2.SignedManifest, Path]:
    """A side-loaded package folder's signed manifest and its blobs folder."""
    path = package_dir / SIGNED_MANIFEST_FILE
    if not path.is_file():
        raise PackageRejected(f"{package_dir} is not a package folder (no {SIGNED_MANIFEST_FILE})")
    try:
        return parse_signed_manifest(path.read_bytes()), package_dir / BLOBS_DIR
    except PackageError as exc:
        raise PackageRejected(exc.reason) from exc


def read_package_id(package_dir: Path) -> str:
    """The id of a package folder's manifest (PackageRejected if it is not a package folder)."""
    signed, _ = read_package(package_dir)
    return package_id(signed.manifest)
