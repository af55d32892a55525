"""What the updater's worker thread takes from its queue: MQTT callbacks, the CLI and the servers only
enqueue these (`machine.Updater`)."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import Path

from slmops_agent.blob_store import Chunk
from slmops_agent.update.messages import Desired


@dataclass(frozen=True)
class DesiredEvent:
    desired: Desired
    local_dir: Path | None = None


@dataclass(frozen=True)
class ChunkEvent:
    chunk: Chunk


@dataclass(frozen=True)
class ConnectedEvent:
    pass


@dataclass(frozen=True)
class StopEvent:
    pass


@dataclass(frozen=True)
class RemoveAdapterEvent:
    name: str
    started: concurrent.futures.Future[str]  # the package the removal installs, or why it cannot


Event = DesiredEvent | ChunkEvent | ConnectedEvent | StopEvent | RemoveAdapterEvent
