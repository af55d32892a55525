"""The record of broadcast chunks that the fleet's workers share through the database, so that the
worker serving blob requests treats the chunks another worker broadcast as its own
(`in_flight.DeliveryLog`): after the worker that led a rollout dies, its successor does not send
again what is still on its way to the devices, and sends what the dead one never got out.

- Writes: each chunk of a broadcast the broker acknowledged is kept (blob sha256, chunk size, chunk
  index, when) and written in one statement as acknowledgements come, at most every `flush_every_s`
  (0.25 s: a worker killed loses at most that much of the record), and at the end of each transfer
  before it is seen to end.
- Reads: only for a request about a blob of which the worker's own log holds no recent send, at
  most every `refresh_s` per blob and chunk size; only the chunks acknowledged less than the
  distributor's `in_flight_max_s` ago come back, turned into this process's monotonic clock.

Times cross processes as wall-clock times: the workers' clocks must agree to well under that window
(NTP does). A failed write keeps its chunks for the next one; a failed read counts as no record
(the request is then answered as if no other worker had sent anything).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from slmops_fleet.store.broadcasts import ChunkSent
from slmops_fleet.store.database import utcnow

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (blob sha256, chunk size)


class BroadcastRecord:
    def __init__(
        self,
        write: Callable[[Sequence[ChunkSent]], None],
        read: Callable[[str, int, datetime], dict[int, datetime]],
        *,
        flush_every_s: float = 0.25,
        refresh_s: float = 1.0,
    ) -> None:
        self._write = write
        self._read = read
        self.flush_every_s = flush_every_s
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._pending: list[ChunkSent] = []
        self._flushed_at = float("-inf")
        self._read_at: dict[Key, float] = {}

    def acked(self, key: Key, index: int) -> None:
        """The broker acknowledged the broadcast of a chunk (now)."""
        with self._lock:
            self._pending.append((key[0], key[1], index, utcnow()))

    def flush(self, *, force: bool = False) -> None:
        """Write the chunks acknowledged since the last write (at most every `flush_every_s` unless
        `force`)."""
        now = time.monotonic()
        with self._lock:
            if not self._pending or (not force and now - self._flushed_at < self.flush_every_s):
                return
            batch, self._pending = self._pending, []
            self._flushed_at = now
        try:
            self._write(batch)
        except Exception:
            log.exception("could not record %d broadcast chunks; keeping them for the next write", len(batch))
            with self._lock:
                self._pending[:0] = batch

    def recent(self, key: Key, window_s: float) -> dict[int, float] | None:
        """The chunks of the blob any worker broadcast less than `window_s` ago, with when (this
        process's monotonic clock); None when the blob's record was read less than `refresh_s` ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._read_at.get(key, float("-inf")) < self.refresh_s:
                return None
            self._read_at = {k: at for k, at in self._read_at.items() if now - at < self.refresh_s}
            self._read_at[key] = now
        wall = utcnow()
        try:
            rows = self._read(key[0], key[1], wall - timedelta(seconds=window_s))
        except Exception:
            log.exception("could not read the broadcast record of blob %s", key[0][:12])
            return {}
        return {index: now - (wall - at).total_seconds() for index, at in rows.items()}
