"""Where the agent keeps what, inside its one state folder."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from slmops_agent.errors import StateDirLocked

SLOTS = ("a", "b")


@dataclass(frozen=True)
class StateLayout:
    """The state folder:

    credentials.json   device id, MQTT credentials, pinned signing keys (0600)
    trusted_keys       signing keys pinned for side-loading (`agent install --trust-key`)
    signing_keys.json  the key ring after the fleet's key statements (trusted, retired, sequence)
    device_key.pem     the device's Ed25519 private key (0600)
    state.json         the versioned update-state record
    current            symlink to the active slot (the record is the truth)
    slots/a, slots/b   unpacked packages (onnxruntime-genai folders)
    blobs/             content-addressed files, downloads (.partial + .bitmap)
    manifests/         signed manifests of the packages in the slots and of the target
    telemetry.db       the bounded telemetry queue
    providers.json     onnxruntime's execution providers, asked once per installed onnxruntime
    agent.sock         the gRPC Unix socket (default)
    grpc.addr          the TCP address the gRPC server listens on
    metrics.addr       host:port of the loopback HTTP server (/metrics)
    agent.lock         held by the running agent
    """

    root: Path

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def key_ring(self) -> Path:
        return self.root / "signing_keys.json"

    @property
    def trusted_keys(self) -> Path:
        return self.root / "trusted_keys"

    @property
    def device_key(self) -> Path:
        return self.root / "device_key.pem"

    @property
    def state_json(self) -> Path:
        return self.root / "state.json"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    def slot(self, name: str) -> Path:
        if name not in SLOTS:
            raise ValueError(f"no slot {name!r}")
        return self.slots / name

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def telemetry_db(self) -> Path:
        return self.root / "telemetry.db"

    @property
    def grpc_addr(self) -> Path:
        return self.root / "grpc.addr"

    @property
    def metrics_addr(self) -> Path:
        return self.root / "metrics.addr"

    @property
    def lock(self) -> Path:
        return self.root / "agent.lock"

    def create(self) -> None:
        for path in (self.root, self.slots, self.blobs, self.manifests):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)


class StateLock:
    """An exclusive advisory lock on the state folder, held while an agent process uses it."""

    def __init__(self, layout: StateLayout) -> None:
        self._path = layout.lock
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        f = self._path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise StateDirLocked(
                f"another agent (pid {holder or '?'}) is using {self._path.parent}; stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so that a crash leaves either the old or the new content: temp file, fsync, rename,
    fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
