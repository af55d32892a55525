"""Rollouts and desired states: the transactions that create a rollout, move it along (the rules of
`slmops_fleet.rollouts.rules` decide), let the operator control it and record what devices report.

Lock order everywhere: devices (by id), then rollouts, as device reports take them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.rollouts import rules
from slmops_fleet.rollouts.gates import GoldenPrompts
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.states import NO_WAVE, TERMINAL_TARGET_STATES, RolloutState, TargetState, WaveState
from slmops_fleet.rollouts.variants import Selection, Variant, select_variant
from slmops_fleet.store.database import Database, i64, new_id, utcnow
from slmops_fleet.store.devices import latest_desired
from slmops_fleet.store.groups import check_plan_groups, membership
from slmops_fleet.store.packages import golden_prompts, package_record
from slmops_fleet.store.records import (
    DesiredRecord,
    ReportedUpdate,
    RolloutRecord,
    RolloutTargetRecord,
    RolloutWaveRecord,
)
from slmops_fleet.store.schema import (
    DesiredStateRow,
    DeviceRow,
    PackageRow,
    ReleasePackageRow,
    ReleaseRow,
    RolloutDeviceRow,
    RolloutRow,
    RolloutWaveRow,
    TelemetrySampleRow,
)

log = logging.getLogger(__name__)


class _Storage:
    """`rules.RolloutStorage` for one rollout inside one transaction."""

    def __init__(self, s: Session, row: RolloutRow, now: datetime) -> None:
        self.s, self.row, self.now = s, row, now
        self._manifests: dict[str, bytes] = {}

    def wave(self, idx: int) -> RolloutWaveRow | None:
        return self.s.get(RolloutWaveRow, (self.row.id, idx))

    def waves(self) -> Sequence[RolloutWaveRow]:
        return self.s.scalars(select(RolloutWaveRow).where(RolloutWaveRow.rollout_id == self.row.id)).all()

    def targets(self) -> Sequence[RolloutDeviceRow]:
        return self.s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == self.row.id)).all()

    def waiting(self, idx: int) -> Sequence[RolloutDeviceRow]:
        return self.s.scalars(
            select(RolloutDeviceRow)
            .where(
                RolloutDeviceRow.rollout_id == self.row.id,
                RolloutDeviceRow.wave == idx,
                RolloutDeviceRow.state == TargetState.WAITING.value,
            )
            .order_by(RolloutDeviceRow.device_id)
        ).all()

    def current_desired(self, device_ids: Sequence[str]) -> dict[str, DesiredStateRow]:
        self.s.scalars(select(DeviceRow.id).where(DeviceRow.id.in_(device_ids)).with_for_update()).all()
        return latest_desired(self.s, device_ids)

    def give(self, device_id: str, generation: int, package_id: str) -> DesiredRecord:
        if package_id not in self._manifests:
            self._manifests[package_id] = (
                self.s.scalar(select(PackageRow.signed_manifest).where(PackageRow.id == package_id)) or b""
            )
        self.s.add(
            DesiredStateRow(
                device_id=device_id,
                generation=generation,
                package_id=package_id,
                rollout_id=self.row.id,
                created_at=self.now,
            )
        )
        return DesiredRecord(device_id, generation, package_id, self.row.id, self.now, self._manifests[package_id])

    def telemetry(
        self, device_ids: Sequence[str], since_ms: int, package_ids: set[str]
    ) -> Sequence[tuple[str, int, int, float]]:
        rows = self.s.execute(
            select(
                TelemetrySampleRow.device_id,
                TelemetrySampleRow.requests_total,
                TelemetrySampleRow.errors_total,
                TelemetrySampleRow.ttft_ms,
            )
            .where(
                TelemetrySampleRow.device_id.in_(device_ids),
                TelemetrySampleRow.timestamp_ms >= since_ms,
                TelemetrySampleRow.active_package_id.in_(package_ids),
            )
            .order_by(TelemetrySampleRow.device_id, TelemetrySampleRow.timestamp_ms, TelemetrySampleRow.seq)
        ).all()
        return [(d, req, err, t_ms) for d, req, err, t_ms in rows]


class RolloutQueries(Database):
    def create_rollout(
        self,
        package_id: str | None,
        target: str | list[str],
        plan: RolloutPlan | None = None,
        *,
        release_id: str | None = None,
        link: Callable[[Session, str], None] | None = None,
    ) -> tuple[RolloutRecord, list[DesiredRecord]]:
        """Plan the waves and start the first: its devices get a new desired state (generation + 1)
        naming the variant chosen for each (`select_variant`: of the release's packages, or the one
        package). Devices that can run no variant are kept as NO_VARIANT targets with the reason.
        Without a plan: one wave of every target device, no gates. `link(session, rollout_id)` runs
        in the transaction (a group's assignment records its rollout)."""
        plan = plan or RolloutPlan(waves=["100%"])
        now = utcnow()
        rollout_id = new_id("ro")
        with self.session(write=True) as s:
            if release_id is not None:
                candidates = list(
                    s.scalars(
                        select(PackageRow)
                        .join(ReleasePackageRow, ReleasePackageRow.package_id == PackageRow.id)
                        .where(ReleasePackageRow.release_id == release_id)
                    ).all()
                )
                if not candidates:
                    raise NotFound(f"unknown release id {release_id}")
            else:
                pkg = s.get(PackageRow, package_id) if package_id else None
                if pkg is None:
                    raise NotFound(f"unknown package id {package_id}")
                candidates = [pkg]
            variants = [package_record(s, r).variant() for r in candidates]
            if target == "all":
                device_ids = list(
                    s.scalars(select(DeviceRow.id).where(DeviceRow.revoked_at.is_(None)).order_by(DeviceRow.id)).all()
                )
                if not device_ids:
                    raise Conflict("no devices are enrolled (and not revoked); enroll one before rolling out")
            else:
                device_ids = sorted(set(target))
                if not device_ids:
                    raise InvalidRequest("target lists no devices")
            # Lock the target devices (PostgreSQL; SQLite serialises writers) so generations stay strictly
            # increasing under concurrent rollouts.
            locked = s.execute(
                select(DeviceRow.id, DeviceRow.revoked_at)
                .where(DeviceRow.id.in_(device_ids))
                .order_by(DeviceRow.id)
                .with_for_update()
            )
            found = {r.id: r.revoked_at for r in locked}
            unknown = [d for d in device_ids if d not in found]
            if unknown:
                raise InvalidRequest(f"unknown device ids: {', '.join(unknown)}")
            revoked = [d for d in device_ids if found[d] is not None]
            if revoked:
                raise InvalidRequest(f"revoked devices cannot be targeted: {', '.join(revoked)}")
            check_plan_groups(s, plan)
            groups = membership(s, device_ids)
            facts = {d: groups.facts(d) for d in device_ids}
            device_ids = rules.narrow(plan.selector, device_ids, facts)
            selections = self._select(s, device_ids, variants)
            layout = rules.lay_out(rollout_id, device_ids, selections, plan, facts)
            rollout = RolloutRow(
                id=rollout_id,
                package_id=layout.primary,
                release_id=release_id,
                target=target if target == "all" else device_ids,
                state=RolloutState.IN_PROGRESS,
                created_at=now,
                updated_at=now,
                transitions=[rules.transition(RolloutState.IN_PROGRESS, now, layout.note)],
                plan=plan.to_json(),
                current_wave=0,
            )
            superseded = add_rollout(s, rollout, layout, selections, now)
            if link is not None:
                link(s, rollout_id)
            desired = rules.start_wave(rollout, 0, _Storage(s, rollout, now), now)
            s.flush()
            for old in sorted(superseded):
                old_row = s.get(RolloutRow, old, with_for_update=True)
                if old_row is not None:
                    rules.advance(old_row, _Storage(s, old_row, now), now, drive=False)
            return self._rollout_record(s, rollout), desired

    def _select(self, s: Session, device_ids: Sequence[str], variants: Sequence[Variant]) -> dict[str, Selection]:
        """Each device's variant, from its reported inventory and the package it runs."""
        rows = s.scalars(select(DeviceRow).where(DeviceRow.id.in_(device_ids))).all() if device_ids else []
        active = {r.id: r.active_package_id or "" for r in rows}
        bases = dict(
            s.execute(
                select(PackageRow.id, PackageRow.base_package_id).where(
                    PackageRow.id.in_(set(active.values()) - {""}), PackageRow.kind == "adapter"
                )
            ).all()
        )
        return {
            r.id: select_variant(
                variants, inventory=dict(r.inventory or {}), active_base=bases.get(active[r.id]) or active[r.id]
            )
            for r in rows
        }

    # --- the driver's and the operator's side of a rollout ---------------------------------------

    def active_rollout_ids(self) -> list[str]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RolloutRow.id)
                    .where(RolloutRow.state == RolloutState.IN_PROGRESS.value)
                    .order_by(RolloutRow.created_at)
                ).all()
            )

    def advance_rollout(self, rollout_id: str, now: datetime | None = None) -> list[DesiredRecord]:
        """One step of the rollout driver: the desired states to publish (after this commits)."""
        now = now or utcnow()
        with self.session(write=True) as s:
            lock_rollout_devices(s, rollout_id)
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            out: list[DesiredRecord] = []
            for _ in range(4):  # a wave may pass and the next start in one step
                step = rules.advance(row, _Storage(s, row, now), now, drive=True)
                s.flush()
                out += step
                if not step:
                    break
            return out

    def control_rollout(self, rollout_id: str, action: str, reason: str = "") -> RolloutRecord:
        """pause | resume | cancel, by the operator."""
        now = utcnow()
        rules.check_action(action)
        with self.session(write=True) as s:
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            rules.control(row, action, reason, _Storage(s, row, now), now)
            s.flush()
            return self._rollout_record(s, row)

    def _rollout_record(self, s: Session, row: RolloutRow) -> RolloutRecord:
        pkg = s.get(PackageRow, row.package_id)
        release = s.get(ReleaseRow, row.release_id) if row.release_id else None
        targets = s.scalars(
            select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == row.id).order_by(RolloutDeviceRow.device_id)
        ).all()
        wave_rows = s.scalars(
            select(RolloutWaveRow).where(RolloutWaveRow.rollout_id == row.id).order_by(RolloutWaveRow.idx)
        ).all()
        waves = [
            RolloutWaveRecord(
                index=w.idx,
                size=w.size,
                state=w.state,
                started_at=w.started_at,
                completed_at=w.completed_at,
                finished_at=w.finished_at,
                reason=w.reason,
                counts=rules.count_states([t for t in targets if t.wave == w.idx]),
            )
            for w in wave_rows
        ]
        return RolloutRecord(
            id=row.id,
            package_id=row.package_id,
            package_name=pkg.name if pkg else "",
            package_version=pkg.version if pkg else "",
            target=row.target,
            state=row.state,
            created_at=row.created_at,
            updated_at=row.updated_at,
            transitions=list(row.transitions or []),
            devices=[
                RolloutTargetRecord(
                    t.device_id,
                    t.generation,
                    t.state,
                    t.reason,
                    t.updated_at,
                    t.wave,
                    t.previous_package_id,
                    t.package_id or (row.package_id if t.state != TargetState.NO_VARIANT else None),
                    t.test,
                    t.selection,
                )
                for t in targets
            ],
            plan=RolloutPlan.from_json(row.plan).to_json(),
            current_wave=row.current_wave or 0,
            reason=row.reason,
            waves=waves,
            release=f"{release.name}@{release.version}" if release else None,
            rollback_of=row.rollback_of,
            rolled_back_by=list(
                s.scalars(select(RolloutRow.id).where(RolloutRow.rollback_of == row.id).order_by(RolloutRow.created_at))
            ),
        )

    def list_rollouts(self) -> list[RolloutRecord]:
        with self.session() as s:
            rows = s.scalars(select(RolloutRow).order_by(RolloutRow.created_at, RolloutRow.id)).all()
            return [self._rollout_record(s, r) for r in rows]

    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFound(f"unknown rollout id {rollout_id}")
            return self._rollout_record(s, row)

    def latest_desired_states(self, device_ids: Sequence[str] | None = None) -> list[DesiredRecord]:
        """Every device's newest desired state (republished, retained, whenever the fleet connects), or
        those of `device_ids`."""
        with self.session() as s:
            revoked = set(s.scalars(select(DeviceRow.id).where(DeviceRow.revoked_at.is_not(None))).all())
            latest = {k: v for k, v in latest_desired(s, device_ids).items() if k not in revoked}
            manifests: dict[str, bytes] = {}
            out = []
            for d in latest.values():
                if d.package_id not in manifests:
                    manifests[d.package_id] = (
                        s.scalar(select(PackageRow.signed_manifest).where(PackageRow.id == d.package_id)) or b""
                    )
                out.append(
                    DesiredRecord(
                        d.device_id, d.generation, d.package_id, d.rollout_id, d.created_at, manifests[d.package_id]
                    )
                )
            return sorted(out, key=lambda r: r.device_id)

    # --- what devices report ----------------------------------------------------------------

    def apply_reported(self, rep: ReportedUpdate) -> bool:
        """Record a device's report; advance the rollout it is about. False for an unknown device."""
        return self.apply_reported_many([rep])[0]

    def apply_reported_many(self, reps: Sequence[ReportedUpdate]) -> list[bool]:
        """Record reports in order, in one transaction; each rollout that a report ended a target of
        is advanced once, after all of them (advancing reads every target of the rollout: once per
        report made a wave of N devices cost N^2). False for a report from an unknown device."""
        now = utcnow()
        known: list[bool] = []
        ended: set[str] = set()  # rollouts a report ended a target of
        golden: dict[str, GoldenPrompts | None] = {}  # package id -> what its TESTING can count
        with self.session(write=True) as s:
            # Lock the devices in id order first, so that workers applying reports at once cannot deadlock.
            devices = sorted({rep.device_id for rep in reps})
            s.scalars(
                select(DeviceRow.id).where(DeviceRow.id.in_(devices)).order_by(DeviceRow.id).with_for_update()
            ).all()
            for rep in reps:
                row = s.get(DeviceRow, rep.device_id, with_for_update=True)
                known.append(row is not None)
                if row is None:
                    continue
                if _stale(row, rep):
                    row.last_seen = now
                    continue
                row.last_seen = now
                row.reported_at = now
                row.state = rep.state
                row.reported_generation = i64(rep.generation)
                row.target_package_id = rep.target_package_id or None
                row.active_package_id = rep.active_package_id or None
                row.active_version = rep.active_version or None
                row.active_slot = rep.active_slot or None
                row.reason = rep.reason or None
                row.bytes_needed = i64(rep.bytes_needed)
                row.bytes_received = i64(rep.bytes_received)
                if rep.inventory:
                    row.inventory = rep.inventory
                desired = s.get(DesiredStateRow, (rep.device_id, rep.generation)) if rep.generation else None
                if desired is None or not desired.rollout_id:
                    continue
                target = s.get(RolloutDeviceRow, (desired.rollout_id, rep.device_id))
                if target is None:
                    continue
                bound = partial(_bounded_test, s, golden, rep, desired.package_id)
                if rules.report(target, rep.generation, rep.state, rep.reason, rep.test, now, bound=bound):
                    ended.add(desired.rollout_id)
            s.flush()
            for rollout_id in sorted(ended):
                rollout = s.get(RolloutRow, rollout_id, with_for_update=True)
                if rollout is not None:
                    rules.advance(rollout, _Storage(s, rollout, now), now, drive=False)
        return known


def add_rollout(
    s: Session, rollout: RolloutRow, layout: rules.Layout, selections: dict[str, Selection], now: datetime
) -> set[str]:
    """Store a new rollout with its waves and targets (`layout`); the targets that earlier rollouts
    had not finished on these devices become SUPERSEDED. Returns the ids of those earlier rollouts."""
    s.add(rollout)
    s.flush()
    runnable = [d for wave in layout.waves for d in wave]
    # Earlier rollouts lose these devices, whether their wave has started or not.
    superseded = set(
        s.scalars(
            select(RolloutDeviceRow.rollout_id).where(
                RolloutDeviceRow.device_id.in_(runnable),
                RolloutDeviceRow.rollout_id != rollout.id,
                RolloutDeviceRow.state.not_in(TERMINAL_TARGET_STATES),
            )
        ).all()
    )
    if superseded:
        s.execute(
            update(RolloutDeviceRow)
            .where(
                RolloutDeviceRow.device_id.in_(runnable),
                RolloutDeviceRow.rollout_id.in_(superseded),
                RolloutDeviceRow.state.not_in(TERMINAL_TARGET_STATES),
            )
            .values(state=TargetState.SUPERSEDED.value, reason=f"superseded by {rollout.id}", updated_at=now)
            .execution_options(synchronize_session=False)
        )
    for idx, members in enumerate(layout.waves):
        s.add(RolloutWaveRow(rollout_id=rollout.id, idx=idx, size=len(members), state=WaveState.PENDING))
        for device_id in members:
            sel = selections[device_id]
            s.add(
                RolloutDeviceRow(
                    rollout_id=rollout.id,
                    device_id=device_id,
                    generation=0,
                    state=TargetState.WAITING,
                    updated_at=now,
                    wave=idx,
                    package_id=sel.package_id,
                    selection=sel.to_json(),
                )
            )
    for device_id in layout.unrunnable:
        sel = selections[device_id]
        s.add(
            RolloutDeviceRow(
                rollout_id=rollout.id,
                device_id=device_id,
                generation=0,
                state=TargetState.NO_VARIANT,
                reason=sel.reason,
                updated_at=now,
                wave=NO_WAVE,
                selection=sel.to_json(),
            )
        )
    s.flush()
    return superseded


def _stale(row: DeviceRow, rep: ReportedUpdate) -> bool:
    """Whether `rep` is older than what the device row holds: for an older desired generation, or a
    step before the end the row already has for the same one. Several fleet workers apply a device's
    reports (shared subscriptions), so they may commit out of order."""
    if 0 < rep.generation < (row.reported_generation or 0):
        return True
    return (
        rep.generation == row.reported_generation
        and row.state in TERMINAL_TARGET_STATES
        and rep.state not in TERMINAL_TARGET_STATES
    )


def _bounded_test(
    s: Session, golden: dict[str, GoldenPrompts | None], rep: ReportedUpdate, package_id: str, test: dict[str, Any]
) -> dict[str, Any]:
    """A report's TESTING result, its counts bounded by the package the report is about (`golden`
    keeps each package's counts for the rest of the transaction)."""
    if package_id not in golden:
        golden[package_id] = golden_prompts(s, package_id)
    limit = golden[package_id]
    if limit is None:
        return test
    bounded = limit.bound(test)
    if bounded != test:
        log.warning(
            "device %s reported %s of %s judged golden prompts matched (%s run) for package %s, which holds %d "
            "(%d with a reference): counted as %d of %d",
            rep.device_id, test.get("matched"), test.get("judged"), test.get("prompts"), package_id[:12],
            limit.prompts, limit.judged, bounded["matched"], bounded["judged"],
        )  # fmt: skip
    return bounded


def lock_rollout_devices(s: Session, rollout_id: str) -> None:
    """Lock the rollout's target devices in id order (PostgreSQL; SQLite serialises writers) before
    its row, as every writer of a rollout does, so two of them never wait on each other."""
    s.scalars(
        select(DeviceRow.id)
        .where(DeviceRow.id.in_(select(RolloutDeviceRow.device_id).where(RolloutDeviceRow.rollout_id == rollout_id)))
        .order_by(DeviceRow.id)
        .with_for_update()
    ).all()
