"""Packages (a verified manifest and its file list) and releases (packages grouped as NAME@VERSION)."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.rollouts.gates import GoldenPrompts
from slmops_fleet.rollouts.variants import check_release
from slmops_fleet.rollouts.waves import PlanError
from slmops_fleet.store.database import Database, new_id, utcnow
from slmops_fleet.store.records import NewPackage, PackageRecord, ReleaseRecord
from slmops_fleet.store.schema import BlobRow, PackageFileRow, PackageRow, ReleasePackageRow, ReleaseRow
from slmops_protos.manifests import PackageError, parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2


def golden_prompts(s: Session, package_id: str) -> GoldenPrompts | None:
    """What TESTING can count for a stored package, read from its manifest; None for an unknown id."""
    row = s.get(PackageRow, package_id)
    if row is None:
        return None
    try:
        manifest = manifest_pb2.Manifest.FromString(parse_signed_manifest(row.signed_manifest).manifest)
        golden = list(manifest.golden_prompts)
    except (PackageError, DecodeError):
        # The fleet verified the manifest on upload; one that does not parse lets no prompt be judged.
        golden = []
    # An agent runs one default prompt, without a reference, for a manifest that has none.
    return GoldenPrompts(prompts=max(1, len(golden)), judged=sum(1 for g in golden if g.reference))


def package_record(s: Session, row: PackageRow) -> PackageRecord:
    files = s.execute(select(PackageFileRow.sha256).where(PackageFileRow.package_id == row.id)).scalars().all()
    shas = sorted(set(files))
    have = set(s.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(shas))).all()) if shas else set()
    return PackageRecord(
        id=row.id,
        name=row.name,
        version=row.version,
        kind=row.kind,
        profile=row.profile,
        signed_by=row.signed_by,
        size_bytes=row.size_bytes,
        file_count=len(files),
        created_at=row.created_at,
        missing_blobs=[h for h in shas if h not in have],
        signed_manifest=row.signed_manifest,
        provider=row.provider or "cpu",
        precision=row.precision or "",
        min_memory_bytes=row.min_memory_bytes or 0,
        base_package_id=row.base_package_id,
        cpu_features=tuple(f for f in (row.cpu_features or "").split(",") if f),
    )


class PackageQueries(Database):
    def add_package(self, pkg: NewPackage) -> bool:
        """Store a verified package; returns False if it was already there (uploads are idempotent)."""
        try:
            return self._add_package(pkg)
        except IntegrityError:
            with self.session() as s:
                if s.get(PackageRow, pkg.id) is not None:  # a concurrent upload of the same package won
                    return False
            raise

    def _add_package(self, pkg: NewPackage) -> bool:
        with self.session(write=True) as s:
            if s.get(PackageRow, pkg.id) is not None:
                return False
            if pkg.kind == "adapter":
                if not pkg.base_package_id:
                    raise InvalidRequest("package rejected: an adapter package must name its base package")
                base = s.get(PackageRow, pkg.base_package_id)
                if base is None:
                    raise InvalidRequest(
                        f"package rejected: the adapter's base package {pkg.base_package_id} is unknown to this "
                        "fleet; upload the base first"
                    )
                if base.kind != "model":
                    raise InvalidRequest(
                        f"package rejected: the adapter's base {base.id[:12]} is a {base.kind} package"
                    )
            s.add(
                PackageRow(
                    id=pkg.id,
                    name=pkg.name,
                    version=pkg.version,
                    profile=pkg.profile,
                    kind=pkg.kind,
                    signed_manifest=pkg.signed_manifest,
                    signed_by=pkg.signed_by,
                    size_bytes=sum(size for _, _, size in pkg.files),
                    created_at=utcnow(),
                    provider=pkg.provider,
                    precision=pkg.precision,
                    min_memory_bytes=pkg.min_memory_bytes,
                    base_package_id=pkg.base_package_id,
                    cpu_features=",".join(pkg.cpu_features),
                )
            )
            s.flush()  # the package row before its files (foreign key)
            s.add_all(PackageFileRow(package_id=pkg.id, path=p, sha256=h, size=n) for p, h, n in pkg.files)
        return True

    def list_packages(self) -> list[PackageRecord]:
        with self.session() as s:
            rows = s.scalars(select(PackageRow).order_by(PackageRow.created_at, PackageRow.id)).all()
            return [package_record(s, r) for r in rows]

    def get_package(self, ref: str) -> PackageRecord:
        """A package by id or by a unique id prefix of at least 8 characters."""
        ref = ref.strip().lower()
        with self.session() as s:
            row = s.get(PackageRow, ref)
            if row is None and 8 <= len(ref) < 64 and all(c in "0123456789abcdef" for c in ref):
                matches = s.scalars(select(PackageRow).where(PackageRow.id.startswith(ref)).limit(2)).all()
                if len(matches) > 1:
                    raise InvalidRequest(f"package id prefix {ref} is ambiguous; give more characters")
                row = matches[0] if matches else None
            if row is None:
                raise NotFound(f"unknown package id {ref}")
            return package_record(s, row)

    # --- releases ------------------------------------------------------------------------------

    def create_release(self, name: str, version: str, package_ids: Sequence[str]) -> ReleaseRecord:
        """Group packages into release NAME@VERSION (`check_release` says which packages may be one)."""
        name, version = name.strip(), version.strip()
        if not name or not version or "@" in name or len(name) > 200 or len(version) > 128:
            raise InvalidRequest("a release needs a NAME (no '@', at most 200 characters) and a VERSION")
        refs = list(dict.fromkeys(package_ids))
        if not refs:
            raise InvalidRequest("a release needs at least one package")
        packages = [self.get_package(ref) for ref in refs]
        try:
            check_release([p.variant() for p in packages])
        except PlanError as exc:
            raise InvalidRequest(str(exc)) from exc
        now = utcnow()
        release_id = new_id("rel")
        try:
            with self.session(write=True) as s:
                s.add(ReleaseRow(id=release_id, name=name, version=version, created_at=now))
                s.flush()
                s.add_all(ReleasePackageRow(release_id=release_id, package_id=p.id) for p in packages)
        except IntegrityError:
            raise Conflict(f"release {name}@{version} exists already") from None
        return self.get_release(release_id)

    def _release_record(self, s: Session, row: ReleaseRow) -> ReleaseRecord:
        ids = s.scalars(select(ReleasePackageRow.package_id).where(ReleasePackageRow.release_id == row.id)).all()
        rows = s.scalars(select(PackageRow).where(PackageRow.id.in_(ids)).order_by(PackageRow.profile, PackageRow.id))
        return ReleaseRecord(row.id, row.name, row.version, row.created_at, [package_record(s, p) for p in rows])

    def get_release(self, ref: str) -> ReleaseRecord:
        """A release by id or NAME@VERSION."""
        with self.session() as s:
            row = s.get(ReleaseRow, ref)
            if row is None and "@" in ref:
                name, _, version = ref.rpartition("@")
                row = s.scalar(select(ReleaseRow).where(ReleaseRow.name == name, ReleaseRow.version == version))
            if row is None:
                raise NotFound(f"unknown release {ref} (give NAME@VERSION or a release id)")
            return self._release_record(s, row)

    def list_releases(self) -> list[ReleaseRecord]:
        with self.session() as s:
            rows = s.scalars(select(ReleaseRow).order_by(ReleaseRow.created_at, ReleaseRow.id)).all()
            return [self._release_record(s, r) for r in rows]
