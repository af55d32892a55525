"""Inference counters for GetStatus, telemetry and /metrics."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from slmops_agent.runtime.requests import GenerationResult

TTFT_BUCKETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
CALLER_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True)
class MetricsSnapshot:
    requests_by_code: dict[str, int]
    ttft_buckets: tuple[tuple[float, int], ...]  # cumulative (upper bound ms, count), +inf last
    ttft_sum_ms: float
    ttft_count: int
    completion_tokens_total: int
    prompt_tokens_total: int
    decode_seconds_total: float
    last_tokens_per_s: float
    batches_total: int
    batched_requests_total: int


@dataclass
class Metrics:
    """Inference counters for GetStatus, telemetry and /metrics (thread-safe). Every request ends
    with one `outcome` (a status code name); errors_total counts the device's errors, not the caller's
    mistakes, cancellations or deadlines."""

    requests_total: int = 0
    errors_total: int = 0
    _ttft_sum: float = 0.0
    _ttft_n: int = 0
    _tps_sum: float = 0.0
    _tps_n: int = 0
    _by_code: dict[str, int] = field(default_factory=dict, repr=False)
    _ttft_hist: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_MS) + 1), repr=False)
    _ttft_total_ms: float = 0.0
    _ttft_total_n: int = 0
    _completion_tokens: int = 0
    _prompt_tokens: int = 0
    _decode_s: float = 0.0
    _last_tps: float = 0.0
    _batches: int = 0
    _batched_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self) -> None:
        with self._lock:
            self.requests_total += 1

    def outcome(self, code: str) -> None:
        with self._lock:
            self._by_code[code] = self._by_code.get(code, 0) + 1
            if code not in CALLER_CODES:
                self.errors_total += 1

    def result(self, result: GenerationResult) -> None:
        with self._lock:
            self._completion_tokens += result.completion_tokens
            self._prompt_tokens += result.prompt_tokens
            if result.completion_tokens > 0:
                self._ttft_sum += result.ttft_ms
                self._ttft_n += 1
                self._ttft_hist[bisect.bisect_left(TTFT_BUCKETS_MS, result.ttft_ms)] += 1
                self._ttft_total_ms += result.ttft_ms
                self._ttft_total_n += 1
            if result.tokens_per_s > 0:
                self._tps_sum += result.tokens_per_s
                self._tps_n += 1
                self._last_tps = result.tokens_per_s
                self._decode_s += (result.completion_tokens - 1) / result.tokens_per_s

    def batch(self, size: int) -> None:
        """A batch of `size` (> 1) requests started."""
        with self._lock:
            self._batches += 1
            self._batched_requests += size

    def window(self) -> tuple[float, float]:
        """Mean (tokens/s, TTFT ms) since the previous call."""
        with self._lock:
            tps = self._tps_sum / self._tps_n if self._tps_n else 0.0
            ttft = self._ttft_sum / self._ttft_n if self._ttft_n else 0.0
            self._ttft_sum = self._tps_sum = 0.0
            self._ttft_n = self._tps_n = 0
            return tps, ttft

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            cumulative, acc = [], 0
            for bound, n in zip((*TTFT_BUCKETS_MS, float("inf")), self._ttft_hist, strict=True):
                acc += n
                cumulative.append((bound, acc))
            return MetricsSnapshot(
                requests_by_code=dict(self._by_code),
                ttft_buckets=tuple(cumulative),
                ttft_sum_ms=self._ttft_total_ms,
                ttft_count=self._ttft_total_n,
                completion_tokens_total=self._completion_tokens,
                prompt_tokens_total=self._prompt_tokens,
                decode_seconds_total=self._decode_s,
                last_tokens_per_s=self._last_tps,
                batches_total=self._batches,
                batched_requests_total=self._batched_requests,
            )
