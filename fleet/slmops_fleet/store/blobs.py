"""Blobs: the stored files of packages, which device may fetch which, and delivery statistics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from slmops_fleet.store.database import Database, utcnow
from slmops_fleet.store.devices import latest_desired
from slmops_fleet.store.records import BlobRecord, BlobStatsDelta, BlobStatsRecord
from slmops_fleet.store.schema import BlobRow, BlobStatsRow, PackageFileRow


class BlobQueries(Database):
    def blob_expected_size(self, sha256: str) -> int | None:
        """The size the manifests give a blob, or None if no package lists it."""
        with self.session() as s:
            return s.scalar(select(PackageFileRow.size).where(PackageFileRow.sha256 == sha256).limit(1))

    def get_blob(self, sha256: str) -> BlobRecord | None:
        with self.session() as s:
            row = s.get(BlobRow, sha256)
            return BlobRecord(row.sha256, row.size, row.path) if row else None

    def add_blob(self, sha256: str, size: int, path: str) -> bool:
        """Record a stored blob; False if it was already recorded."""
        try:
            with self.session(write=True) as s:
                if s.get(BlobRow, sha256) is not None:
                    return False
                s.add(BlobRow(sha256=sha256, size=size, path=path, created_at=utcnow()))
        except IntegrityError:
            if self.get_blob(sha256) is not None:  # a concurrent upload of the same blob won
                return False
            raise
        return True

    def device_may_fetch(self, device_id: str, sha256: str) -> bool:
        """A device may ask for the blobs of the package its newest desired state names."""
        return (device_id, sha256) in self.devices_may_fetch([(device_id, sha256)])

    def devices_may_fetch(self, asks: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (device id, blob sha256) pairs of `asks` whose blob is in the device's desired package."""
        asks = set(asks)
        if not asks:
            return set()
        with self.session() as s:
            desired = latest_desired(s, sorted({d for d, _ in asks}))
            packages = {row.package_id for row in desired.values() if row.package_id}
            if not packages:
                return set()
            files = set(
                s.execute(
                    select(PackageFileRow.package_id, PackageFileRow.sha256).where(
                        PackageFileRow.package_id.in_(packages),
                        PackageFileRow.sha256.in_(sorted({sha for _, sha in asks})),
                    )
                ).all()
            )
        return {(d, sha) for d, sha in asks if d in desired and (desired[d].package_id, sha) in files}

    def add_blob_stats(self, deltas: dict[str, BlobStatsDelta]) -> None:
        with self.session(write=True) as s:
            for sha, d in deltas.items():
                if d.is_zero():
                    continue
                row = s.get(BlobStatsRow, sha, with_for_update=True)
                if row is None:
                    row = BlobStatsRow(sha256=sha, **asdict(BlobStatsDelta()))
                    s.add(row)
                for k, v in asdict(d).items():
                    setattr(row, k, getattr(row, k) + v)

    def blob_stats(self) -> list[BlobStatsRecord]:
        with self.session() as s:
            rows = s.execute(
                select(BlobStatsRow, BlobRow.size).outerjoin(BlobRow, BlobRow.sha256 == BlobStatsRow.sha256)
            )
            out = []
            for st, size in rows:
                delta = BlobStatsDelta(
                    broadcast_bytes=st.broadcast_bytes,
                    broadcast_chunks=st.broadcast_chunks,
                    repair_bytes=st.repair_bytes,
                    repair_chunks=st.repair_chunks,
                    broadcasts=st.broadcasts,
                    whole_requests=st.whole_requests,
                    partial_requests=st.partial_requests,
                )
                out.append(BlobStatsRecord(st.sha256, size or 0, delta))
            return sorted(out, key=lambda r: r.sha256)
