"""Whether onnxruntime's threads may spin (`runtime.spinning`)."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.mark.parametrize(
    ("threads", "cores", "others_busy", "spin"),
    [
        (2, 2, 0.05, True),  # an idle 2-core device: every thread has its core
        (2, 2, 0.45, True),
        (2, 2, 0.6, False),
        (2, 2, 1.0, False),  # one busy process: a spinning thread would fight it
        (4, 8, 3.5, True),
        (4, 8, 5.0, False),
    ],
)
def test_spinning_pays_only_when_every_thread_has_a_free_core(
    threads: int, cores: int, others_busy: float, spin: bool
) -> None:
    from slmops_agent.runtime.spinning import spinning_pays

    assert spinning_pays(threads, cores, others_busy) is spin


def test_auto_spinning_measures_the_other_processes() -> None:
    """A process that keeps a core busy counts; this process's own work does not; with it running,
    "auto" does not spin on every core. One thread never spins (no pool)."""
    import os
    import subprocess
    import sys

    from slmops_agent.runtime.spinning import others_busy_cores, resolve_spinning

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert others_busy_cores(0.5) >= 0.6
        assert resolve_spinning("auto", os.cpu_count() or 1) is False
    finally:
        hog.kill()
        hog.wait()
    baseline = others_busy_cores(0.4)
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spinner.start()  # this process keeping a core busy is not "the others"
    try:
        assert others_busy_cores(0.4) < baseline + 0.6
    finally:
        stop.set()
        spinner.join()
    assert resolve_spinning("auto", 1) is False and resolve_spinning(True, 2) is True
