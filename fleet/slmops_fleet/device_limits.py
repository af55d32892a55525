"""What one device's messages may ask of the fleet, checked on the network thread before they are
queued: a broken or hostile device must not make the fleet do work for every device.

- Blob requests use the fleet's chunk size (`settings.chunk_size`, which every desired state
  carries, so an agent asks in it). The distributor keys its broadcasts by blob and chunk size: a
  whole-blob request naming another size would start one more broadcast of the same blob to every
  device of the wave, once per size named. A whole-blob request is therefore answered in the fleet's
  size whatever size it names (it joins the blob's broadcast). A request for some chunks names them
  by index in the size it gives, and indexes of another size name other bytes: it is refused.
- Blob requests are rate-limited per device (a token bucket): what a device may ask for costs the
  fleet a store query and may cost a unicast of the chunks listed, so one device cannot keep the
  request worker busy for the others. An agent asks once per blob when it starts fetching and again
  only after a stall or a finished repair batch, far below the default rate.
- What is refused or dropped is counted; each device's warning is logged at most once per window so
  that a flood does not flood the log too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from slmops_fleet.codec import BlobRequestIn

log = logging.getLogger(__name__)


class WindowedLog:
    """Logs a warning about a key (a device) at most once per `window_s`; the next one tells how many
    were left out meanwhile."""

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._silenced: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log `message % args` unless `key` was logged less than a window ago; True if it was logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.window_s:
                self._silenced[key] = self._silenced.get(key, 0) + 1
                return False
            if len(self._last) > 10_000:  # a key not seen for a window would be logged anyway
                self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
                self._silenced = {k: n for k, n in self._silenced.items() if k in self._last}
            self._last[key] = now
            silenced = self._silenced.pop(key, 0)
        if silenced:
            log.warning(message + " (%d more like it since the last one)", *args, silenced)
        else:
            log.warning(message, *args)
        return True


@dataclass
class BlobRequestCounters:
    resized: int = 0  # whole-blob requests naming another chunk size, answered in the fleet's
    refused_chunk_size: int = 0  # requests for some chunks in another chunk size, refused
    rate_limited: int = 0  # requests dropped by the device's token bucket


class BlobRequestPolicy:
    """Admits a device's blob requests: the fleet's chunk size always, at most `rate` per second per
    device on average with bursts of `burst`."""

    def __init__(
        self,
        chunk_size: int,
        *,
        rate: float,
        burst: int,
        log_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chunk_size = chunk_size
        self.rate = rate
        self.burst = float(burst)
        self.counters = BlobRequestCounters()
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, when they were counted)
        self._next_prune = 0.0
        self._lock = threading.Lock()
        self._warn = WindowedLog(log_window_s, clock=clock)

    def admit(self, req: BlobRequestIn) -> BlobRequestIn | None:
        """The request to serve (in the fleet's chunk size), or None when it is dropped."""
        if not self._take(req.device_id):
            self.counters.rate_limited += 1
            self._warn.warning(
                f"{req.device_id} rate",
                "blob requests from %s dropped: more than %g a second (bursts of %d)",
                req.device_id, self.rate, int(self.burst),
            )  # fmt: skip
            return None
        if req.chunk_size in (0, self.chunk_size):
            return req if req.chunk_size else replace(req, chunk_size=self.chunk_size)
        if req.missing:
            self.counters.refused_chunk_size += 1
            self._warn.warning(
                f"{req.device_id} chunk size",
                "blob request from %s for %s refused: chunks of %d bytes named; the fleet sends %d-byte chunks",
                req.device_id, req.sha256[:12], req.chunk_size, self.chunk_size,
            )  # fmt: skip
            return None
        self.counters.resized += 1
        return replace(req, chunk_size=self.chunk_size)

    def _take(self, device_id: str) -> bool:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(device_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[device_id] = (tokens - 1.0 if ok else tokens, now)
            if now >= self._next_prune:
                self._prune(now)
            return ok

    def _prune(self, now: float) -> None:
        """Forget the buckets that have filled up again (a new one starts full): one entry per device
        that asked within about `burst / rate` seconds is kept."""
        self._next_prune = now + 60.0
        self._buckets = {
            d: (tokens, at) for d, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate < self.burst
        }
