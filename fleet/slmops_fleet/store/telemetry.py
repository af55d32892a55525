"""Telemetry samples (batched inserts, the newest samples of a device, retention) and the fleet's counts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, tuple_, update

from slmops_fleet.store.database import INT64_MAX, Database, i64, utcnow
from slmops_fleet.store.records import TelemetryRecord
from slmops_fleet.store.schema import BlobRow, DeviceRow, PackageRow, RolloutRow, TelemetrySampleRow

# The order of the tuples `Store.insert_telemetry` builds.
_TELEMETRY_COLUMNS = (
    "device_id", "seq", "timestamp_ms", "received_at", "cpu_percent", "memory_used_bytes", "memory_total_bytes",
    "disk_free_bytes", "temperature_c", "requests_total", "errors_total", "tokens_per_s", "ttft_ms", "queue_depth",
    "update_state", "active_package_id",
)  # fmt: skip


class TelemetryQueries(Database):
    def insert_telemetry(self, samples: Iterable[TelemetryRecord], dropped: dict[str, int] | None = None) -> int:
        """Insert samples, ignoring ones already stored (QoS 1 may deliver a batch twice): one
        INSERT ... ON CONFLICT DO NOTHING executed for the whole batch, in one transaction, with
        plain tuples (SQLAlchemy's per-row parameter processing would cost more than SQLite's
        insert). Returns rows offered."""
        now = utcnow()
        samples = list(samples)
        with self.session(write=True) as s:
            devices = {t.device_id for t in samples} | set(dropped or {})
            # The device rows locked first, in id order (FOR NO KEY UPDATE, as the UPDATE below takes): fleet
            # workers writing reports and telemetry of the same devices at once then wait, never deadlock.
            mine = select(DeviceRow.id).where(DeviceRow.id.in_(devices)).order_by(DeviceRow.id)
            known = set(s.scalars(mine.with_for_update(key_share=True)).all()) if devices else set()
            received = self._received_at(now)
            top = INT64_MAX
            rows = [
                (
                    t.device_id,
                    min(t.seq, top),
                    t.timestamp_ms,
                    received,
                    t.cpu_percent,
                    min(t.memory_used_bytes, top),
                    min(t.memory_total_bytes, top),
                    min(t.disk_free_bytes, top),
                    t.temperature_c,
                    min(t.requests_total, top),
                    min(t.errors_total, top),
                    t.tokens_per_s,
                    t.ttft_ms,
                    t.queue_depth,
                    t.update_state,
                    t.active_package_id,
                )
                for t in samples
                if t.device_id in known
            ]
            conn = s.connection()
            if rows:
                conn.exec_driver_sql(self._telemetry_insert_sql(), rows)
            if known:
                seen = update(DeviceRow).where(DeviceRow.id == bindparam("device"))
                conn.execute(seen.values(last_seen=now), [{"device": d} for d in sorted(known)])
                counted = [{"device": d, "dropped": i64(n)} for d, n in sorted((dropped or {}).items()) if d in known]
                if counted:
                    conn.execute(seen.values(telemetry_dropped_total=bindparam("dropped")), counted)
        return len(rows)

    def _received_at(self, now: datetime) -> Any:
        """`now` as the driver takes it for telemetry_samples.received_at."""
        process = TelemetrySampleRow.__table__.c.received_at.type.bind_processor(self.engine.dialect)
        return process(now) if process is not None else now

    def _telemetry_insert_sql(self) -> str:
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(self.engine.dialect.paramstyle)
        if self.engine.dialect.name not in ("sqlite", "postgresql") or mark is None:
            raise NotImplementedError(f"database {self.engine.dialect.name} is not supported")
        columns = ", ".join(_TELEMETRY_COLUMNS)
        marks = ", ".join([mark] * len(_TELEMETRY_COLUMNS))
        return f"INSERT INTO telemetry_samples ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        with self.session() as s:
            rows = s.scalars(
                select(TelemetrySampleRow)
                .where(TelemetrySampleRow.device_id == device_id)
                .order_by(TelemetrySampleRow.timestamp_ms.desc(), TelemetrySampleRow.seq.desc())
                .limit(limit)
            ).all()
            return [
                TelemetryRecord(
                    device_id=r.device_id,
                    seq=r.seq,
                    timestamp_ms=r.timestamp_ms,
                    cpu_percent=r.cpu_percent,
                    memory_used_bytes=r.memory_used_bytes,
                    memory_total_bytes=r.memory_total_bytes,
                    disk_free_bytes=r.disk_free_bytes,
                    temperature_c=r.temperature_c,
                    requests_total=r.requests_total,
                    errors_total=r.errors_total,
                    tokens_per_s=r.tokens_per_s,
                    ttft_ms=r.ttft_ms,
                    queue_depth=r.queue_depth,
                    update_state=r.update_state,
                    active_package_id=r.active_package_id,
                )
                for r in rows
            ]

    def telemetry_series(self, device_id: str | None, since_ms: int, bucket_ms: int) -> list[dict[str, Any]]:
        """Samples from `since_ms` on (of one device, or of the whole fleet) in buckets of `bucket_ms`,
        oldest first: the mean tokens/s, time to first token, CPU and memory used, the highest
        request and error counters, the devices reporting and the samples in each bucket."""
        t = TelemetrySampleRow
        bucket = (t.timestamp_ms // bucket_ms) * bucket_ms
        query = (
            select(
                bucket.label("t"),
                func.avg(t.tokens_per_s),
                func.avg(t.ttft_ms),
                func.avg(t.cpu_percent),
                func.avg(t.memory_used_bytes),
                func.max(t.requests_total),
                func.max(t.errors_total),
                func.count(func.distinct(t.device_id)),
                func.count(),
            )
            .where(t.timestamp_ms >= since_ms)
            .group_by(bucket)
            .order_by(bucket)
        )
        if device_id is not None:
            query = query.where(t.device_id == device_id)
        names = ("t", "tokens_per_s", "ttft_ms", "cpu_percent", "memory_used_bytes", "requests_total",
                 "errors_total", "devices", "samples")  # fmt: skip
        with self.session() as s:
            return [
                {k: (float(v) if isinstance(v, float) else int(v or 0)) for k, v in zip(names, row, strict=True)}
                for row in s.execute(query).all()
            ]

    def telemetry_latest(self, since_ms: int) -> dict[str, dict[str, Any]]:
        """Per device with samples from `since_ms` on: its mean tokens/s over them, its highest memory
        used and total, and its newest sample's time."""
        t = TelemetrySampleRow
        query = (
            select(
                t.device_id,
                func.avg(t.tokens_per_s),
                func.max(t.memory_used_bytes),
                func.max(t.memory_total_bytes),
                func.max(t.timestamp_ms),
            )
            .where(t.timestamp_ms >= since_ms)
            .group_by(t.device_id)
        )
        with self.session() as s:
            return {
                row[0]: {
                    "tokens_per_s": float(row[1] or 0.0),
                    "memory_used_bytes": int(row[2] or 0),
                    "memory_total_bytes": int(row[3] or 0),
                    "timestamp_ms": int(row[4] or 0),
                }
                for row in s.execute(query).all()
            }

    def telemetry_device_ids(self) -> list[str]:
        """Every device that may have telemetry (retention walks them one by one)."""
        with self.session() as s:
            return list(s.scalars(select(DeviceRow.id).order_by(DeviceRow.id)).all())

    def telemetry_keep_mark(self, device_id: str, keep: int) -> tuple[int, int] | None:
        """(timestamp_ms, id) of the device's `keep`-th newest sample: older ones are past a bound of
        `keep` rows. None when it has at most `keep`. Ordered by id within a timestamp, so samples that
        all name one timestamp are bounded too."""
        t = TelemetrySampleRow
        with self.session() as s:
            row = s.execute(
                select(t.timestamp_ms, t.id)
                .where(t.device_id == device_id)
                .order_by(t.timestamp_ms.desc(), t.id.desc())
                .offset(keep)
                .limit(1)
            ).first()
        return None if row is None else (int(row[0]), int(row[1]))

    def prune_telemetry(
        self, device_id: str, *, before_ms: int | None, through: tuple[int, int] | None, batch: int | None
    ) -> int:
        """Delete at most `batch` (None: all) of the device's samples timestamped before `before_ms`, or
        at or before the (timestamp_ms, id) mark `through`, in one statement and one short transaction.
        Returns rows deleted."""
        t = TelemetrySampleRow
        past = []
        if before_ms is not None:
            past.append(t.timestamp_ms < before_ms)
        if through is not None:
            past.append(tuple_(t.timestamp_ms, t.id) <= tuple_(*through))
        if not past:
            return 0
        victims = select(t.id).where(t.device_id == device_id, or_(*past))
        if batch is not None:
            victims = victims.limit(batch)
        with self.session(write=True) as s:
            result = s.execute(delete(t).where(t.id.in_(victims)).execution_options(synchronize_session=False))
            return int(getattr(result, "rowcount", 0) or 0)

    def counts(self) -> dict[str, Any]:
        with self.session() as s:
            by_state = dict(
                s.execute(select(func.coalesce(DeviceRow.state, "NEW"), func.count()).group_by(DeviceRow.state)).all()
            )
            rollouts = dict(s.execute(select(RolloutRow.state, func.count()).group_by(RolloutRow.state)).all())
            return {
                "devices": sum(by_state.values()),
                "devices_by_state": by_state,
                "packages": s.scalar(select(func.count()).select_from(PackageRow)) or 0,
                "blobs": s.scalar(select(func.count()).select_from(BlobRow)) or 0,
                "blob_bytes": s.scalar(select(func.coalesce(func.sum(BlobRow.size), 0))) or 0,
                "rollouts": sum(rollouts.values()),
                "rollouts_by_state": rollouts,
                "telemetry_samples": s.scalar(select(func.count()).select_from(TelemetrySampleRow)) or 0,
            }
