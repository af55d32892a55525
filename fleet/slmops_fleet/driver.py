"""The rollout driver: one asyncio task in the fleet process that moves rollouts along.

Every tick (or at once when woken) it asks the store to advance each in-progress rollout (start a
wave, time out devices, complete a wave, wait out its soak, check the gates, abort and revert) and
publishes the desired states each step returns, after the step's transaction committed. A crash
between the commit and the publish loses nothing: the fleet republishes every device's newest
desired state whenever its MQTT session connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from slmops_fleet.db import DesiredRecord, Store

log = logging.getLogger(__name__)


class RolloutDriver:
    def __init__(self, store: Store, publish: Callable[[list[DesiredRecord]], None], *, tick_s: float = 1.0) -> None:
        self.store = store
        self.publish = publish
        self.tick_s = tick_s
        self.steps = 0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def step(self) -> int:
        """Advance every in-progress rollout once; returns the desired states published."""
        published = 0
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

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="slmops-fleet-rollouts")

    def wake(self) -> None:
        """Run a step now (thread-safe): after an operator's pause, resume or cancel."""
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
