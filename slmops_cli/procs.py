"""Run slmops programs as child processes: start, wait for readiness, stop cleanly.

Used by `slmops demo` and by the end-to-end tests, which both drive the real
programs as separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ProcessFailed(RuntimeError):
    """A child process exited early or a command failed; the message carries its output's tail."""


def slmops_cmd(*args: str) -> list[str]:
    """The command line that runs `slmops ARGS` with this interpreter."""
    return [sys.executable, "-m", "slmops_cli", *args]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def run_json(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600, prefix: Sequence[str] = ()
) -> Any:
    """Run `slmops ARGS --json` and return the parsed JSON it prints."""
    out = run(args, env=env, timeout=timeout, prefix=prefix)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise ProcessFailed(f"`slmops {' '.join(args)}` printed no JSON:\n{out[-2000:]}") from exc


def run(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600, prefix: Sequence[str] = ()
) -> str:
    """Run `slmops ARGS` (behind `prefix`, e.g. `ip netns exec NAME`); return stdout, or raise
    ProcessFailed with stderr's tail."""
    proc = subprocess.run(
        [*prefix, *slmops_cmd(*args)],
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
        raise ProcessFailed(f"`slmops {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


class Service:
    """A long-running `slmops ...` child with its output in a log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [*prefix, *slmops_cmd(*args)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(env),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
        """Poll `check` until it returns a value; fail fast if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value is not None and value is not False:
                return value
            if not self.alive():
                raise ProcessFailed(
                    f"{self.name} exited ({self.proc.returncode}) while waiting for {what}; log {self.log}:\n"
                    + _tail(self.log)
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name}: no {what} after {timeout:.0f} s; log {self.log}:\n" + _tail(self.log)
                )
            time.sleep(interval)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise ProcessFailed(f"no {what} after {timeout:.0f} s")
        time.sleep(interval)
