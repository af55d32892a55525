"""The update rig: an `Updater` on a real state folder and a `ModelHost`, fed DesiredState messages and
blob chunks directly (no fleet, no broker). Shared by the update-machine and hot-swap tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_helpers import agent_settings, chunks_of, desired_for

from slmops_agent.codec import chunk_from_pb, desired_from_pb
from slmops_agent.layout import StateLayout
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.requests import Limits
from slmops_agent.settings import AgentSettings
from slmops_agent.update.machine import Updater
from slmops_agent.update.messages import BlobWant, Report
from slmops_agent.update_record import UpdateRecord
from slmops_protos.states import UpdateState

DEVICE = "dev-test"


class Feeder:
    """Answers the updater's blob requests with chunks, as the fleet would."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.tamper: dict[str, bytes] = {}
        self.drop: dict[str, set[int]] = {}
        self.serve = True
        self.pace_s = 0.0  # > 0: each blob's first request gets its chunks this far apart, the only answer
        self.chunk_size: int | None = None  # chunks in this size whatever a request names (the fleet's)
        self.paced: set[str] = set()
        self.requests: list[BlobWant] = []
        self.updater: Updater | None = None

    def add(self, pkg: Path) -> None:
        for blob in (pkg / "blobs").iterdir():
            self.blobs[blob.name] = blob.read_bytes()

    def __call__(self, want: BlobWant) -> None:
        self.requests.append(want)
        if not self.serve or self.updater is None or want.sha256 not in self.blobs:
            return
        data = self.tamper.get(want.sha256, self.blobs[want.sha256])
        size = self.chunk_size or want.chunk_size
        if self.chunk_size and want.missing and want.chunk_size != self.chunk_size:
            return  # the fleet refuses chunk indexes in another chunk size
        chunks = chunks_of(data, want.sha256, size)
        dropped = self.drop.get(want.sha256, set()) if not want.missing else set()
        send = [c for c in chunks if (not want.missing or c.index in want.missing) and c.index not in dropped]
        if self.pace_s:  # one slow broadcast per blob; later requests are only counted
            if want.sha256 not in self.paced:
                self.paced.add(want.sha256)
                threading.Thread(target=self._paced, args=(self.updater, send), daemon=True).start()
            return
        for c in send:
            self.updater.submit_chunk(chunk_from_pb(c))

    def _paced(self, updater: Updater, chunks: list[Any]) -> None:
        for c in chunks:
            time.sleep(self.pace_s)
            updater.submit_chunk(chunk_from_pb(c))


class Rig:
    def __init__(self, state_dir: Path, trusted: str, **overrides: Any) -> None:
        from slmops_protos.manifests import public_key_from_hex

        self.state_dir = state_dir
        self.settings: AgentSettings = agent_settings(state_dir, **overrides)
        self.host = ModelHost(queue_bound=4, limits=Limits(8, 64))
        self.reports: list[Report] = []
        self.feeder = Feeder()
        self.trusted = [public_key_from_hex(trusted)]
        self.retired: list[Any] = []  # keys retired by a key statement (what the agent passes on)
        self.updater = self.new_updater()

    def new_updater(self, **overrides: Any) -> Updater:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        u = Updater(
            StateLayout(self.state_dir),
            settings,
            self.host,
            trusted_keys=self.trusted,
            retired_keys=self.retired,
            device_id=DEVICE,
            on_report=self.reports.append,
            on_blob_request=self.feeder,
            providers=["CPUExecutionProvider"],
        )
        self.feeder.updater = u
        self.updater = u
        return u

    def desired(self, pkg: Path | None, generation: int, **kw: Any) -> None:
        self.updater.submit_desired(desired_from_pb(desired_for(pkg, generation, DEVICE, **kw)))

    def wait(self, predicate: Callable[[UpdateRecord], bool], timeout: float = 60) -> UpdateRecord:
        return self.updater.wait_for(predicate, timeout)

    def wait_done(self, generation: int, timeout: float = 60) -> UpdateRecord:
        record = self.wait(
            lambda r: r.generation == generation and r.state in (UpdateState.COMMITTED, UpdateState.ROLLED_BACK),
            timeout,
        )
        deadline = time.monotonic() + 10  # the final report follows the record (after the hot swap)
        while time.monotonic() < deadline and not any(
            r.generation == generation and r.state is record.state for r in self.reports
        ):
            time.sleep(0.01)
        return record

    def serving(self) -> str:
        model = self.host.model
        return model.info.version if model is not None else ""

    def states(self, generation: int) -> list[str]:
        """The states reported for a generation (progress reports of one state count once)."""
        out: list[str] = []
        for r in self.reports:
            if r.generation == generation and (not out or out[-1] != r.state.value):
                out.append(r.state.value)
        return out


def install(rig: Rig, pkg: Path, generation: int) -> UpdateRecord:
    rig.feeder.add(pkg)
    rig.desired(pkg, generation)
    return rig.wait_done(generation)
