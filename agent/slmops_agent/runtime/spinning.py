"""Whether onnxruntime's intra-op threads may spin while they wait for work: decided from how busy
the machine's other processes keep its cores."""

from __future__ import annotations

import os
import time
from typing import Literal

Spinning = bool | Literal["auto"]
SPIN_SAMPLE_S = 0.2
SPIN_MARGIN_CORES = 0.5


def others_busy_cores(interval: float = SPIN_SAMPLE_S) -> float:
    """How many cores the other processes of the machine keep busy, sampled over `interval` (this
    process's own CPU time taken out)."""
    import psutil

    me = psutil.Process()

    def sample() -> tuple[float, float]:
        t = psutil.cpu_times()
        own = me.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0), own.user + own.system

    busy0, own0 = sample()
    t0 = time.monotonic()
    time.sleep(interval)
    busy1, own1 = sample()
    elapsed = max(time.monotonic() - t0, 1e-3)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed


def spinning_pays(threads: int, cores: int, others_busy: float) -> bool:
    """Spinning threads decode much faster on cores nobody else wants and collapse when another
    process wants one of them (benchmarks/README.md): spin only when every thread has a core the
    others leave free."""
    return cores - others_busy >= threads - SPIN_MARGIN_CORES


def resolve_spinning(spinning: Spinning, threads: int) -> bool:
    """`spinning` as a bool: "auto" decides now from how busy the machine's other processes are."""
    if spinning != "auto":
        return bool(spinning)
    if threads <= 1:  # no pool: nothing would spin
        return False
    return spinning_pays(threads, os.cpu_count() or 1, others_busy_cores())
