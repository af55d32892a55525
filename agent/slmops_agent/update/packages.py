"""The package an update installs: its verified manifest (with an adapter package's base), the files
its slot holds, what the runtime loads from it, and the checks a desired package must pass on this
device before anything is fetched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops_agent.errors import PackageRejected
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


@dataclass
class Target:
    package_id: str
    manifest: manifest_pb2.Manifest
    blobs: dict[str, int]  # sha -> size
    base_id: str = ""  # an adapter package: its base model package
    base: manifest_pb2.Manifest | None = None

    @property
    def files(self) -> list[manifest_pb2.FileEntry]:
        """What the slot holds: the base's files, then the package's own."""
        return [*(self.base.files if self.base is not None else ()), *self.manifest.files]

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
        adapters = [a for a in model.adapters if a.path and a.base_package_id in ("", model_id)]
        if self.base is not None:
            adapters += [a for a in manifest.adapters if a.path and a.base_package_id == model_id]
        return ModelInfo(
            name=manifest.name,
            version=manifest.version,
            package_id=pid,
            profile=model.profile.name,
            slot=slot,
            adapters=tuple(a.name for a in adapters),
            adapter_files=tuple((a.name, a.path) for a in adapters),
        )


class Manifests:
    """The verified manifests kept in manifests/ (one per package a slot holds or an update targets).

    A package about to be installed must be signed by a trusted key; one already installed (a slot's,
    or an adapter's base) also by a key retired since it was installed: retiring a key stops new
    installs, it does not stop the device serving what it runs."""

    def __init__(
        self, folder: Path, trusted_keys: list[Ed25519PublicKey], retired_keys: list[Ed25519PublicKey] | None = None
    ) -> None:
        self.folder = folder
        self.trusted_keys = trusted_keys
        self.retired_keys = retired_keys or []

    def set_keys(self, trusted: list[Ed25519PublicKey], retired: list[Ed25519PublicKey]) -> None:
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

    def target(self, pid: str, *, installed: bool = True) -> Target:
        """A package's target; `installed=False` for one still being installed (trusted keys only)."""
        if not pid:
            raise PackageRejected("the record names no target package")
        return self.target_of(pid, self.read(pid, installed=installed))

    def target_of(self, pid: str, manifest: manifest_pb2.Manifest) -> Target:
        """A package with, for an adapter package, its base's manifest (kept in manifests/ while it serves)."""
        base_id = manifest.adapters[0].base_package_id if manifest.kind == "adapter" and manifest.adapters else ""
        base = self.read(base_id) if base_id else None
        return Target(pid, manifest, {f.sha256: f.size for f in manifest.files}, base_id, base)

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
