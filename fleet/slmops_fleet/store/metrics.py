"""What `/metrics` reads from the database at scrape time, in one read transaction: devices by active
package, each recent rollout's waves with their targets' states, and each device's newest telemetry
sample with its tags and named groups (summed per package, per tag and per group by
`slmops_fleet.metrics`), when it arrived in the last `FRESH_S` seconds: a device silent longer no
longer counts in the sums; and each named group's members (and followers, for an assigned group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select

from slmops_fleet.rollouts.states import ACTIVE_ROLLOUT_STATES
from slmops_fleet.store.database import Database, utcnow
from slmops_fleet.store.groups import membership
from slmops_fleet.store.schema import DeviceRow, PackageRow, RolloutDeviceRow, RolloutRow, RolloutWaveRow
from slmops_fleet.store.schema import TelemetrySampleRow as Sample

RECENT_ROLLOUTS = 10  # finished rollouts shown beside the running ones
FRESH_S = 300.0  # a device's newest sample counts while it arrived this recently (agents send every 10 s)


@dataclass(frozen=True)
class WaveFigures:
    rollout_id: str
    wave: int  # from 1
    state: str
    size: int
    targets: dict[str, int]  # target state -> devices


@dataclass(frozen=True)
class DeviceSample:
    """A device's newest telemetry sample and what it is labelled by."""

    device_id: str
    package_id: str
    tags: list[str]
    tokens_per_s: float
    ttft_ms: float
    requests_total: int
    errors_total: int
    memory_used_bytes: int
    groups: list[str] = field(default_factory=list)  # the named groups it is in


@dataclass(frozen=True)
class MetricsSnapshot:
    packages: dict[str, tuple[str, str]]  # package id -> (name, version), of the packages devices run
    devices_by_package: dict[str, int]  # active package id ("" for none) -> devices not revoked
    revoked: int
    waves: list[WaveFigures] = field(default_factory=list)
    samples: list[DeviceSample] = field(default_factory=list)
    group_members: dict[str, int] = field(default_factory=dict)  # every named group -> devices in it
    group_following: dict[str, int] = field(default_factory=dict)  # assigned group -> devices following it


class MetricsQueries(Database):
    def metrics_snapshot(self) -> MetricsSnapshot:
        with self.session() as s:
            live = DeviceRow.revoked_at.is_(None)
            by_package = {
                pid or "": n
                for pid, n in s.execute(
                    select(DeviceRow.active_package_id, func.count()).where(live).group_by(DeviceRow.active_package_id)
                ).all()
            }
            revoked = s.scalar(select(func.count()).select_from(DeviceRow).where(DeviceRow.revoked_at.is_not(None)))
            recent = (
                select(RolloutRow.id)
                .order_by(RolloutRow.created_at.desc(), RolloutRow.id.desc())
                .limit(RECENT_ROLLOUTS)
            )
            rollout_ids = list(
                s.scalars(
                    select(RolloutRow.id).where(
                        or_(RolloutRow.state.in_(ACTIVE_ROLLOUT_STATES), RolloutRow.id.in_(recent.scalar_subquery()))
                    )
                ).all()
            )
            counts: dict[tuple[str, int], dict[str, int]] = {}
            for rid, wave, state, n in s.execute(
                select(RolloutDeviceRow.rollout_id, RolloutDeviceRow.wave, RolloutDeviceRow.state, func.count())
                .where(RolloutDeviceRow.rollout_id.in_(rollout_ids))
                .group_by(RolloutDeviceRow.rollout_id, RolloutDeviceRow.wave, RolloutDeviceRow.state)
            ).all():
                counts.setdefault((rid, wave), {})[state] = n
            waves = [
                WaveFigures(w.rollout_id, w.idx + 1, w.state, w.size, counts.get((w.rollout_id, w.idx), {}))
                for w in s.scalars(
                    select(RolloutWaveRow)
                    .where(RolloutWaveRow.rollout_id.in_(rollout_ids))
                    .order_by(RolloutWaveRow.rollout_id, RolloutWaveRow.idx)
                ).all()
            ]
            # one index seek per device (the (device_id, seq) unique index), not a scan of every sample
            newest_seq = select(func.max(Sample.seq)).where(Sample.device_id == DeviceRow.id).scalar_subquery()
            newest = select(DeviceRow.id.label("device_id"), newest_seq.label("seq")).where(live).subquery()
            rows = s.execute(
                select(Sample, DeviceRow.tags, DeviceRow.active_package_id)
                .join(newest, (Sample.device_id == newest.c.device_id) & (Sample.seq == newest.c.seq))
                .join(DeviceRow, DeviceRow.id == Sample.device_id)
                .where(Sample.received_at >= utcnow() - timedelta(seconds=FRESH_S))
            ).all()
            members = membership(s)
            samples = [
                DeviceSample(
                    x.device_id,
                    x.active_package_id or active or "",
                    [str(t) for t in (tags or [])],
                    float(x.tokens_per_s or 0.0),
                    float(x.ttft_ms or 0.0),
                    int(x.requests_total or 0),
                    int(x.errors_total or 0),
                    int(x.memory_used_bytes or 0),
                    members.groups_of(x.device_id) if x.device_id in members.devices else [],
                )
                for x, tags, active in rows
            ]
            ids = (set(by_package) | {x.package_id for x in samples}) - {""}
            packages = {
                pid: (name, version)
                for pid, name, version in s.execute(
                    select(PackageRow.id, PackageRow.name, PackageRow.version).where(PackageRow.id.in_(ids))
                ).all()
            }
            return MetricsSnapshot(
                packages,
                by_package,
                int(revoked or 0),
                waves,
                samples,
                {g: len(members.members(g)) for g in members.groups},
                {g.name: len(members.owned(g.name)) for g in members.groups.values() if g.assigned},
            )
