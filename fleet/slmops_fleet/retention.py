"""Telemetry retention: the fleet keeps each device's telemetry within a configured bound.

Two bounds, either may be off (0): an age (`telemetry_max_age_s`, by the sample's own timestamp) and
a number of rows per device (`telemetry_max_rows_per_device`, the newest kept; this one also bounds
a device that stamps its samples in the future). What is past a bound is dropped, oldest first, and
counted. A sweep runs every `telemetry_retention_interval_s` on a worker thread, device by device, in
short transactions of at most `batch` rows with a pause between them, so ingest's inserts are never
held behind one long delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from slmops_fleet.store import Store

log = logging.getLogger(__name__)


@dataclass
class RetentionCounters:
    dropped_rows: int = 0  # samples dropped past a bound since the fleet started
    sweeps: int = 0
    last_sweep_s: float | None = None  # how long the last sweep took
    last_sweep_at: float | None = None  # when it ended (unix time)


class TelemetryRetention:
    """Drops the telemetry past the bounds: `sweep()` once, or `start()` to sweep every `interval_s`."""

    def __init__(
        self,
        store: Store,
        *,
        max_age_s: float,
        max_rows_per_device: int,
        interval_s: float,
        batch: int = 5000,
        pause_s: float = 0.01,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.max_rows = max_rows_per_device
        self.interval_s = interval_s
        self.batch = batch
        self.pause_s = pause_s
        self.counters = RetentionCounters()
        self._clock = clock
        self._stopping = threading.Event()
        self._sweeping = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_age_s > 0 or self.max_rows > 0

    def sweep(self) -> int:
        """Drop every device's samples past the bounds; returns how many were dropped."""
        with self._sweeping:
            return self._sweep()

    def _sweep(self) -> int:
        started = self._clock()
        before_ms = int((started - self.max_age_s) * 1000) if self.max_age_s > 0 else None
        dropped = 0
        for device_id in self.store.telemetry_device_ids():
            if self._stopping.is_set():
                break
            mark = self.store.telemetry_keep_mark(device_id, self.max_rows) if self.max_rows > 0 else None
            while not self._stopping.is_set():
                n = self.store.prune_telemetry(device_id, before_ms=before_ms, through=mark, batch=self.batch)
                dropped += n
                self.counters.dropped_rows += n
                if n < self.batch:
                    break
                self._stopping.wait(self.pause_s)  # let ingest's inserts in
        self.counters.sweeps += 1
        self.counters.last_sweep_at = self._clock()
        self.counters.last_sweep_s = round(self.counters.last_sweep_at - started, 3)
        if dropped:
            log.info("telemetry retention dropped %d samples in %.1f s", dropped, self.counters.last_sweep_s)
        return dropped

    def to_json(self) -> dict[str, Any]:
        return {"max_age_s": self.max_age_s, "max_rows_per_device": self.max_rows, **asdict(self.counters)}

    # --- the periodic task ------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="slmops-fleet-retention")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:
                log.exception("telemetry retention sweep failed; trying again in %.0f s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        # A sweep already on its thread ends at its next batch; the store must outlive it.
        if await asyncio.to_thread(self._sweeping.acquire, timeout=30):
            self._sweeping.release()
