"""The rollout driver: one asyncio task in the fleet process that moves rollouts along.

Every tick (or at once when woken) it gives the devices that joined an assigned group their
release (`store.targeting`), asks the store to advance each in-progress rollout (start a
wave, time out devices, complete a wave, wait out its soak, check the gates, abort and revert) and
publishes the desired states each step returns, after the step's transaction committed. A crash
between the commit and the publish loses nothing: the fleet republishes every device's newest
desired state whenever its MQTT session connects.

One driver at a time: several fleet processes may share one PostgreSQL database (stateless API and
telemetry workers), but only the holder of the database lease `rollout-driver` advances rollouts.
Each step renews the lease (expiry `lease_ttl_s` ahead); a process that finds another holder's
lease unexpired skips its step, and takes over once that lease expires (its holder died) or was
given back (a clean stop). A holder on the same host whose process is gone (a fleet restarted after
a crash) is taken over at once. Holder ids are "host:pid:random". Device reports still move a
rollout in any process (`drive=False`: no publishing), and the operator's commands work everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from slmops_fleet.store import Store
from slmops_fleet.store.leases import dead_here, new_holder
from slmops_fleet.store.records import DesiredRecord

log = logging.getLogger(__name__)

DRIVER_LEASE = "rollout-driver"


class RolloutDriver:
    def __init__(
        self,
        store: Store,
        publish: Callable[[list[DesiredRecord]], None],
        *,
        tick_s: float = 1.0,
        lease_ttl_s: float | None = None,
        holder: str | None = None,
        targeting_s: float = 5.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s if lease_ttl_s is not None else max(10.0, 5 * tick_s)
        self.holder = holder or new_holder()
        self.leading = False
        self.steps = 0
        self.targeting_s = targeting_s  # how often to look for devices that joined an assigned group
        self._targeting_due = True
        self._targeting_at = 0.0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def step(self) -> int:
        """Advance every in-progress rollout once, if this process holds the driver's lease; returns
        the desired states published."""
        leading = self.store.acquire_lease(DRIVER_LEASE, self.holder, self.lease_ttl_s)
        if not leading:
            current = self.store.lease_holder(DRIVER_LEASE)
            if current is not None and dead_here(current[0]):
                leading = self.store.acquire_lease(DRIVER_LEASE, self.holder, self.lease_ttl_s, take_from=current[0])
        if leading != self.leading:
            log.info(
                "rollout driver %s: %s", self.holder, "leading" if leading else "standing by (another holds the lease)"
            )
            self.leading = leading
        if not leading:
            return 0
        published = self._targeting()
        for rollout_id in self.store.active_rollout_ids():
            try:
                records = self.store.advance_rollout(rollout_id)
            except Exception:
                log.exception("rollout %s: the driver's step failed; trying again next tick", rollout_id)
                continue
            if records:
                self.publish(records)
                published += len(records)
                log.info("rollout %s: published %d desired states", rollout_id, len(records))
        self.steps += 1
        return published

    def _targeting(self) -> int:
        """Continuous targeting: follow-up rollouts for devices that joined an assigned group, when
        woken for it (an enrollment, new tags) or every `targeting_s` (new inventory)."""
        if not self._targeting_due and time.monotonic() - self._targeting_at < self.targeting_s:
            return 0
        self._targeting_due = False
        self._targeting_at = time.monotonic()
        try:
            records = self.store.reconcile_groups()
        except Exception:
            log.exception("continuous targeting's step failed; trying again")
            self._targeting_due = True
            return 0
        if records:
            self.publish(records)
        return len(records)

    def renew(self) -> None:
        """Renew the lease while this process leads, beside a step that may run longer than the lease
        (publishing a wave's desired states waits for the broker): another worker must not take over
        a driver that is only busy. Called by the worker's heartbeat (`workers.Workers.renewals`)."""
        if self.leading:
            self.leading = self.store.acquire_lease(DRIVER_LEASE, self.holder, self.lease_ttl_s)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="slmops-fleet-rollouts")

    def wake(self, *, targeting: bool = False) -> None:
        """Run a step now (thread-safe): after an operator's pause, resume or cancel; with `targeting`,
        look for devices that joined an assigned group in it (an enrollment, new tags)."""
        if targeting:
            self._targeting_due = True
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.to_thread(self.step)
            except Exception:
                log.exception("the rollout driver's step failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.leading:
            self.leading = False
            try:
                await asyncio.to_thread(self.store.release_lease, DRIVER_LEASE, self.holder)
            except Exception:
                log.exception("could not give the rollout driver's lease back; it expires by itself")
