"""The update state machine: IDLE -> FETCHING -> VERIFYING -> STAGED -> TESTING -> COMMITTED,
ROLLED_BACK from any. One worker thread runs it; MQTT callbacks only enqueue events.

TESTING loads the staged slot and runs the manifest's golden prompts greedily within the latency
budget. A load failure, a failing prompt or a blown budget rolls back here, on the device. A prompt
whose output differs from the builder's reference does NOT: exact-match references legitimately
differ across precisions and providers, so the device commits, reports the count of matching
prompts (`ReportedState.test`) and the fleet's quality gate (`min_quality_score`) decides for the
whole wave, rolling the canaries back when they score below the threshold.

Adapter packages (kind "adapter", one `Adapter{name, base_package_id, path}`) are accepted only on
top of their base: the base must be the active package (or the base of the active adapter
package). Only the adapter's files are fetched; the inactive slot is staged with the base's files
plus the adapter's, loaded with the adapter (`ModelInfo.adapter_files`), and TESTING runs the
adapter's golden prompts with the adapter active. Committing flips slots as for a model; the
desired state that names the base again rolls the adapter back the same way.

Each state's record is saved (atomically) before its side effect runs; `recover()` applies the
recovery table at start-up. Two slots: the new package is staged in the inactive one and only
the COMMITTED record makes it the active one.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops_agent.errors import BlobError, ModelLoadError, PackageRejected
from slmops_agent.layout import StateLayout, fsync_dir, write_atomic
from slmops_agent.runtime import (
    DEFAULT_PROMPT,
    FinishReason,
    GenerationRequest,
    Limits,
    LoadedModel,
    ModelHost,
    ModelInfo,
    load_model,
)
from slmops_agent.settings import AgentSettings
from slmops_agent.state import (
    MAX_TEST_ATTEMPTS,
    MAX_TRANSITIONS_PER_TARGET,
    RECOVERY,
    TERMINAL,
    Recovery,
    SlotInfo,
    StateError,
    StateStore,
    TestSummary,
    UpdateRecord,
    UpdateState,
    check_transition,
)
from slmops_agent.store import BlobStore, Chunk, Download, InsufficientSpace
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.manifests import (
    BLOBS_DIR,
    SIGNED_MANIFEST_FILE,
    PackageError,
    package_id,
    parse_signed_manifest,
    safe_relpath,
    verify_signed_manifest,
)
from slmops_protos.package.v1 import manifest_pb2

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024 * 1024
_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# -- messages in and out (translated from/to protobuf here, at the edge) ----------------------
@dataclass(frozen=True)
class Desired:
    device_id: str
    generation: int
    package_id: str | None  # None: keep what runs
    signed_manifest: bytes = b""
    rollout_id: str = ""
    chunk_size: int = 0

    @classmethod
    def from_pb(cls, msg: fleet_pb2.DesiredState) -> Desired:
        has_model = msg.HasField("model") and bool(msg.model.package_id)
        return cls(
            device_id=msg.device_id,
            generation=msg.generation,
            package_id=msg.model.package_id if has_model else None,
            signed_manifest=msg.model.manifest.SerializeToString() if has_model else b"",
            rollout_id=msg.rollout_id,
            chunk_size=msg.chunk_size,
        )


@dataclass(frozen=True)
class Report:
    state: UpdateState
    generation: int
    target_package_id: str
    active_package_id: str
    active_version: str
    active_slot: str
    reason: str = ""
    bytes_needed: int = 0
    bytes_received: int = 0
    test: TestSummary | None = None

    def to_pb(self, device_id: str, inventory: fleet_pb2.Inventory | None = None) -> fleet_pb2.ReportedState:
        msg = fleet_pb2.ReportedState(
            device_id=device_id,
            generation=self.generation,
            state=self.state.to_pb(),
            target_package_id=self.target_package_id,
            active_package_id=self.active_package_id,
            active_version=self.active_version,
            reason=self.reason,
            bytes_needed=self.bytes_needed,
            bytes_received=self.bytes_received,
            timestamp_unix_ms=int(time.time() * 1000),
            active_slot=self.active_slot,
        )
        if inventory is not None:
            msg.inventory.CopyFrom(inventory)
        if self.test is not None:
            msg.test.CopyFrom(self.test.to_pb())
        return msg


@dataclass(frozen=True)
class BlobWant:
    """A BlobRequest: `missing` empty means the whole blob."""

    sha256: str
    missing: tuple[int, ...]
    chunk_size: int

    def to_pb(self, device_id: str) -> fleet_pb2.BlobRequest:
        return fleet_pb2.BlobRequest(
            device_id=device_id, blob_sha256=self.sha256, missing=self.missing, chunk_size=self.chunk_size
        )


def chunk_from_pb(msg: fleet_pb2.BlobChunk) -> Chunk:
    return Chunk(
        blob_sha256=msg.blob_sha256,
        index=msg.index,
        count=msg.count,
        blob_size=msg.blob_size,
        chunk_size=msg.chunk_size,
        chunk_sha256=msg.chunk_sha256,
        data=msg.data,
    )


@dataclass(frozen=True)
class SmokeResult:
    """One golden prompt run in TESTING (`matches`: None when the manifest has no reference)."""

    index: int
    matches: bool | None
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float


# -- internal events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _DesiredEvent:
    desired: Desired
    local_dir: Path | None = None


@dataclass(frozen=True)
class _ChunkEvent:
    chunk: Chunk


@dataclass(frozen=True)
class _ConnectedEvent:
    pass


@dataclass(frozen=True)
class _StopEvent:
    pass


_Event = _DesiredEvent | _ChunkEvent | _ConnectedEvent | _StopEvent


@dataclass
class _Target:
    package_id: str
    manifest: manifest_pb2.Manifest
    blobs: dict[str, int]  # sha -> size
    base_id: str = ""  # an adapter package: its base model package
    base: manifest_pb2.Manifest | None = None

    @property
    def files(self) -> list[manifest_pb2.FileEntry]:
        """What the slot holds: the base's files, then the package's own."""
        return [*(self.base.files if self.base is not None else ()), *self.manifest.files]

    @property
    def adapter(self) -> str:
        """The adapter TESTING activates ("" for a model package)."""
        return self.manifest.adapters[0].name if self.base is not None else ""


@dataclass
class _Fetch:
    download: Download
    last_progress: float
    last_request: float = float("-inf")
    backoff: float = 5.0
    failures: int = 0
    outstanding: set[int] = field(default_factory=set)  # chunk indexes asked for in the last repair request


class Updater:
    """Owns state.json, the blob store and the slots; hot-swaps the host's model on COMMITTED."""

    def __init__(
        self,
        layout: StateLayout,
        settings: AgentSettings,
        host: ModelHost,
        *,
        trusted_keys: list[Ed25519PublicKey],
        device_id: str = "",
        on_report: Callable[[Report], None] | None = None,
        on_blob_request: Callable[[BlobWant], None] | None = None,
        is_connected: Callable[[], bool] | None = None,
        loader: Callable[..., LoadedModel] = load_model,
        providers: list[str] | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        layout.create()
        self.layout = layout
        self.settings = settings
        self.host = host
        self.trusted_keys = trusted_keys
        self.device_id = device_id
        self.on_report = on_report
        self.on_blob_request = on_blob_request
        self.is_connected = is_connected or (lambda: True)
        self.loader = loader
        self.providers = providers
        self.memory_bytes = memory_bytes
        self.store = BlobStore(layout.blobs, flush_interval_s=settings.bitmap_flush_s)
        self.states = StateStore(layout.state_json)
        self.record = self.states.load()
        self.history: collections.deque[UpdateState] = collections.deque(maxlen=256)
        self.bad_chunks = 0
        self.requests_sent: collections.deque[BlobWant] = collections.deque(maxlen=1024)
        self._events: queue.Queue[_Event] = queue.Queue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._target: _Target | None = None
        self._fetches: dict[str, _Fetch] = {}
        self._wanted: frozenset[str] = frozenset()
        self._bytes_needed = 0
        self._last_progress_report = 0.0
        self._chunk_gap = 0.0  # the longest recent gap between new chunks of the download (s)
        self._last_chunk: float | None = None
        self._recovered = threading.Event()
        self.last_smoke_test: list[SmokeResult] = []

    # -- public, thread-safe -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slmops-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._events.put(_StopEvent())
        self._thread.join(timeout)
        self._thread = None

    def submit_desired(self, desired: Desired) -> None:
        self._events.put(_DesiredEvent(desired))

    def install_local(self, package_dir: Path) -> None:
        """Install a package folder from disk (side-load): the same checks and states as a fleet update."""
        signed, _ = _read_package(package_dir)
        desired = Desired(
            device_id=self.device_id,
            generation=self.record.generation,
            package_id=package_id(signed.manifest),
            signed_manifest=signed.SerializeToString(),
        )
        self._events.put(_DesiredEvent(desired, local_dir=package_dir))

    def submit_chunk(self, chunk: Chunk) -> None:
        if chunk.blob_sha256 in self._wanted:
            self._events.put(_ChunkEvent(chunk))

    def wants(self, sha256: str) -> bool:
        return sha256 in self._wanted

    def notify_connected(self) -> None:
        self._events.put(_ConnectedEvent())

    def current_report(self) -> Report:
        r = self.record
        active = r.active
        return Report(
            state=r.state,
            generation=r.generation,
            target_package_id=r.target_package_id,
            active_package_id=active.package_id if active else "",
            active_version=active.version if active else "",
            active_slot=r.active_slot,
            reason=r.reason,
            bytes_needed=self._bytes_needed if r.state is UpdateState.FETCHING else 0,
            bytes_received=self._bytes_received() if r.state is UpdateState.FETCHING else 0,
            test=r.test,
        )

    def wait_for(self, predicate: Callable[[UpdateRecord], bool], timeout: float) -> UpdateRecord:
        """Block until the record satisfies `predicate`; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.record):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"update state is {self.record.state.value} ({self.record.reason})")
                self._cond.wait(left)
            return self.record

    def wait_recovered(self, timeout: float) -> bool:
        return self._recovered.wait(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.recover()
        except Exception as exc:
            log.exception("recovery failed")
            if self.record.state not in TERMINAL:
                self._rollback(f"recovery after a restart failed: {type(exc).__name__}: {exc}")
        finally:
            self._recovered.set()
        while True:
            try:
                event: _Event | None = self._events.get(timeout=0.25)
            except queue.Empty:
                event = None
            if isinstance(event, _StopEvent):
                break
            try:
                if event is not None:
                    self._handle(event)
                self._tick()
            except Exception as exc:
                log.exception("update step failed")
                if self.record.state not in TERMINAL:
                    self._rollback(f"internal error: {type(exc).__name__}: {exc}")
        self._close_fetches()

    def _handle(self, event: _Event) -> None:
        if isinstance(event, _DesiredEvent):
            self._on_desired(event.desired, event.local_dir)
        elif isinstance(event, _ChunkEvent):
            self._on_chunk(event.chunk)
        elif isinstance(event, _ConnectedEvent):
            for f in self._fetches.values():
                f.last_request = float("-inf")
            self._report()

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Apply the recovery table for the state found in state.json, and load the active slot."""
        r = self.record
        action = RECOVERY[r.state]
        log.info("start-up in %s: %s", r.state.value, action.value)
        self._clean_staging_leftovers()
        self._point_current()
        self._load_active()
        if action in (Recovery.NOTHING, Recovery.FINISH_COMMIT):
            self._report()
            return
        if action is Recovery.FINISH_ROLLBACK:
            self._wipe_failed_slot()
            self._report()
            return
        try:
            self._target = self._load_target(r.target_package_id)
        except PackageRejected as exc:
            self._rollback(f"after a restart in {r.state.value}: {exc.reason}")
            return
        if action is Recovery.RESUME_FETCH:
            self._enter(UpdateState.FETCHING)
            self._fetch()
        elif action is Recovery.VERIFY_AGAIN:
            self._verify_stage_test()
        elif action is Recovery.STAGE_AGAIN:
            self._stage_test()
        elif action is Recovery.TEST_AGAIN_ONCE:
            if r.test_attempts >= MAX_TEST_ATTEMPTS:
                self._rollback(f"the agent stopped {r.test_attempts} times while testing the package")
            else:
                self._test_commit()

    def _load_active(self) -> None:
        r = self.record
        info = r.active
        if info is None:
            return
        try:
            self.host.swap(self._load_slot(r.active_slot, info))
            return
        except (ModelLoadError, PackageRejected) as exc:
            log.error("the active slot %s does not load: %s", r.active_slot, exc)
            reason = f"active slot {r.active_slot} failed to load: {exc}"
        other = r.inactive_slot
        other_info = r.slots.get(other)
        if other_info is not None and r.state in TERMINAL:
            try:
                loaded = self._load_slot(other, other_info)
            except (ModelLoadError, PackageRejected) as exc:
                log.error("the other slot %s does not load either: %s", other, exc)
            else:
                self._enter(UpdateState.ROLLED_BACK, active_slot=other, reason=reason + f"; serving slot {other}")
                self._point_current()
                self.host.swap(loaded)

    def _load_slot(self, slot: str, info: SlotInfo) -> LoadedModel:
        target = self._load_target(info.package_id)
        return self.loader(self.layout.slot(slot), self._model_info(target, slot), **self._load_options())

    # -- desired state ---------------------------------------------------------------------------
    def _on_desired(self, d: Desired, local_dir: Path | None) -> None:
        r = self.record
        if local_dir is None:
            if d.device_id and self.device_id and d.device_id != self.device_id:
                log.warning("dropped a desired state for device %s (this is %s)", d.device_id, self.device_id)
                return
            if d.generation <= r.generation:
                log.debug("ignored desired generation %d (handled %d)", d.generation, r.generation)
                return
        if d.package_id is None:
            self._save(replace(r, generation=d.generation, rollout_id=d.rollout_id))
            self._report()
            return
        try:
            manifest = self._check_desired(d)
        except PackageRejected as exc:
            log.warning("package %s rejected: %s", d.package_id[:12], exc.reason)
            self._abandon()
            self._rollback(
                exc.reason,
                generation=d.generation,
                rollout_id=d.rollout_id,
                target_package_id=d.package_id,
                target_version="",
                target_slot="",
                test=None,
            )
            return
        active = r.active
        if active is not None and active.package_id == d.package_id:
            self._abandon()
            self._enter(
                UpdateState.COMMITTED,
                generation=d.generation,
                rollout_id=d.rollout_id,
                target_package_id=d.package_id,
                target_version=active.version,
                target_slot=r.active_slot,
                reason="",
            )
            return
        if r.state is UpdateState.FETCHING and r.target_package_id == d.package_id and local_dir is None:
            self._save(replace(r, generation=d.generation, rollout_id=d.rollout_id))
            self._report()
            return
        self._abandon()
        self._start(d, manifest, local_dir)

    def _check_desired(self, d: Desired) -> manifest_pb2.Manifest:
        assert d.package_id is not None
        try:
            signed = parse_signed_manifest(d.signed_manifest)
            if package_id(signed.manifest) != d.package_id:
                raise PackageError(
                    f"package id {d.package_id[:12]} does not match its manifest ({package_id(signed.manifest)[:12]})"
                )
            manifest = verify_signed_manifest(signed, self.trusted_keys)
        except PackageError as exc:
            raise PackageRejected(exc.reason) from exc
        if manifest.kind == "adapter":
            self._check_adapter(manifest)
            return manifest
        if manifest.kind != "model":
            raise PackageRejected(f"{manifest.kind!r} packages are not supported by this agent")
        ep = manifest.profile.execution_provider.lower()
        if ep and ep != "cpu" and self.providers is not None:
            wanted = _PROVIDERS.get(ep, ep)
            if wanted not in self.providers:
                raise PackageRejected(
                    f"the package needs execution provider {ep!r}; this device has {', '.join(self.providers)}"
                )
        need = manifest.profile.min_memory_bytes
        if need and self.memory_bytes and need > self.memory_bytes:
            raise PackageRejected(f"the package needs {need} bytes of memory; this device has {self.memory_bytes}")
        return manifest

    def _check_adapter(self, manifest: manifest_pb2.Manifest) -> None:
        """An adapter package runs only on its base: the active package or the active adapter's base."""
        if len(manifest.adapters) != 1 or not manifest.adapters[0].base_package_id:
            raise PackageRejected("an adapter package must name exactly one adapter bound to a base package")
        adapter = manifest.adapters[0]
        if adapter.path not in {f.path for f in manifest.files}:
            raise PackageRejected(f"adapter {adapter.name!r}: {adapter.path!r} is not one of the package's files")
        active = self.record.active
        runs = (active.base_package_id or active.package_id) if active is not None else ""
        if adapter.base_package_id != runs:
            what = f"runs {runs[:12]} ({active.name} {active.version})" if active is not None else "runs no model"
            raise PackageRejected(
                f"adapter {adapter.name!r} is bound to base package {adapter.base_package_id[:12]}; this device {what}"
            )
        base = self._read_manifest(runs)
        clash = {f.path for f in base.files} & {f.path for f in manifest.files}
        if clash:
            raise PackageRejected(f"adapter files clash with the base package's: {', '.join(sorted(clash))}")

    def _start(self, d: Desired, manifest: manifest_pb2.Manifest, local_dir: Path | None) -> None:
        assert d.package_id is not None
        pid = d.package_id
        write_atomic(self.layout.manifests / f"{pid}.pb", d.signed_manifest)
        self._target = self._target_of(pid, manifest)
        r = self.record
        self._enter(
            UpdateState.FETCHING,
            generation=d.generation,
            rollout_id=d.rollout_id,
            target_package_id=pid,
            target_version=manifest.version,
            target_slot=r.inactive_slot,
            chunk_size=d.chunk_size or r.chunk_size or DEFAULT_CHUNK_SIZE,
            local_source=str(local_dir.absolute()) if local_dir is not None else "",
            reason="",
            test=None,
            test_attempts=0,
            transitions=1,
        )
        try:
            self.store.check_space(self.store.bytes_to_fetch(self._target.blobs), self.settings.disk_reserve_bytes)
        except InsufficientSpace as exc:
            self._rollback(str(exc))
            return
        self._fetch()

    def _fetch(self) -> None:
        """FETCHING's side effect: import a side-loaded package's blobs, or ask the fleet for the missing ones."""
        assert self._target is not None
        local = self.record.local_source
        if local:
            for f in self._target.manifest.files:
                try:
                    self.store.import_file(Path(local) / BLOBS_DIR / f.sha256, f.sha256, f.size)
                except FileNotFoundError:
                    self._rollback(f"{f.path}: blob {f.sha256[:12]} is missing from {local}")
                    return
                except BlobError as exc:
                    self._rollback(f"{f.path}: {exc}")
                    return
        self._open_fetches()
        if not self._fetches:
            self._after_fetch()

    # -- fetching --------------------------------------------------------------------------------
    def _open_fetches(self) -> None:
        assert self._target is not None
        chunk_size = self.record.chunk_size or DEFAULT_CHUNK_SIZE
        now = time.monotonic()
        self._fetches = {}
        for sha, size in self._target.blobs.items():
            if self.store.has(sha):
                continue
            download = self.store.open_download(sha, size, chunk_size)
            self._fetches[sha] = _Fetch(download, last_progress=now, backoff=self.settings.blob_stall_s)
        self._chunk_gap, self._last_chunk = 0.0, None
        self._bytes_needed = sum(f.download.size for f in self._fetches.values())
        self._wanted = frozenset(self._fetches)
        for sha, f in self._fetches.items():
            self._request(sha, f, time.monotonic())

    def _request(self, sha: str, f: _Fetch, now: float) -> None:
        d = f.download
        if d.received == 0:
            want = BlobWant(sha, (), d.chunk_size)
            f.outstanding = set()
        else:
            missing = tuple(d.missing(self.settings.blob_request_max_chunks))
            want = BlobWant(sha, missing, d.chunk_size)
            f.outstanding = set(missing)
        f.last_request = now
        self.requests_sent.append(want)
        if self.on_blob_request is not None and self.is_connected():
            try:
                self.on_blob_request(want)
            except Exception:
                log.exception("could not send a blob request")

    def _on_chunk(self, chunk: Chunk) -> None:
        f = self._fetches.get(chunk.blob_sha256)
        if f is None or self.record.state is not UpdateState.FETCHING:
            return
        try:
            new = f.download.write_chunk(chunk)
        except BlobError as exc:
            self.bad_chunks += 1
            log.debug("chunk dropped: %s", exc)
            return
        if not new:
            return
        now = time.monotonic()
        self._note_gap(now)
        for other in self._fetches.values():  # chunks of the package are flowing: none of its blobs is stalled
            other.last_progress = now
        f.backoff = self.settings.blob_stall_s
        repairing = bool(f.outstanding)
        f.outstanding.discard(chunk.index)
        if f.download.complete:
            self._finish_blob(chunk.blob_sha256, f)
            return
        if repairing and not f.outstanding and self.is_connected():
            self._request(chunk.blob_sha256, f, now)  # the repair batch is in: ask for the next one at once
        if now - self._last_progress_report >= 5.0:
            self._last_progress_report = now
            self._report()

    def _note_gap(self, now: float) -> None:
        """Follow the longest recent gap between chunks (a peak that fades by a tenth per chunk; a gap
        counts up to the longest stall wait): chunks of several blobs come in bursts."""
        last, self._last_chunk = self._last_chunk, now
        if last is not None:
            self._chunk_gap = max(min(now - last, self.settings.blob_stall_max_s), 0.9 * self._chunk_gap)

    def _finish_blob(self, sha: str, f: _Fetch) -> None:
        try:
            self.store.finish(f.download)
        except BlobError as exc:
            f.failures += 1
            path = self._path_of(sha)
            if f.failures >= self.settings.blob_verify_attempts:
                self._rollback(f"{path}: {exc} ({f.failures} times); the package's content does not match it")
                return
            log.warning("%s: %s; fetching it again", path, exc)
            f.download = self.store.open_download(sha, f.download.size, f.download.chunk_size)
            self._request(sha, f, time.monotonic())
            return
        del self._fetches[sha]
        self._wanted = frozenset(self._fetches)
        if not self._fetches:
            self._after_fetch()

    def _tick(self) -> None:
        if self.record.state is not UpdateState.FETCHING or not self._fetches:
            return
        now = time.monotonic()
        connected = self.is_connected()
        slow = self.settings.blob_stall_gap_factor * self._chunk_gap  # chunks come about this far apart
        for sha, f in list(self._fetches.items()):
            f.download.flush(force=False)
            if not connected:
                continue
            if now - max(f.last_progress, f.last_request) >= min(max(f.backoff, slow), self.settings.blob_stall_max_s):
                if f.last_request > float("-inf"):
                    f.backoff = min(f.backoff * 2, self.settings.blob_stall_max_s)
                self._request(sha, f, now)

    def _bytes_received(self) -> int:
        return self._bytes_needed - sum(f.download.size - f.download.bytes_received for f in self._fetches.values())

    def _close_fetches(self) -> None:
        for f in self._fetches.values():
            try:
                f.download.close()
            except OSError as exc:
                log.warning("could not flush a download: %s", exc)

    def _abandon(self) -> None:
        """Stop the download in progress (its partial files stay until the next clean-up)."""
        self._close_fetches()
        self._fetches = {}
        self._wanted = frozenset()
        self._target = None

    def _after_fetch(self) -> None:
        self._close_fetches()
        self._fetches = {}
        self._wanted = frozenset()
        self._verify_stage_test()

    # -- verifying, staging, testing, committing ------------------------------------------------
    def _verify_stage_test(self) -> None:
        assert self._target is not None
        self._enter(UpdateState.VERIFYING)
        for f in self._target.manifest.files:
            why = self.store.verify(f.sha256, f.size)
            if why is not None:
                self.store.remove(f.sha256)
                self._rollback(f"{f.path}: {why}")
                return
        self._stage_test()

    def _stage_test(self) -> None:
        assert self._target is not None
        r = self.record
        slot = r.target_slot
        if not slot or slot == r.active_slot:
            raise StateError(f"cannot stage into slot {slot!r} (active: {r.active_slot!r})")
        self._enter(UpdateState.STAGED, slots={**r.slots, slot: None})
        try:
            self._stage(slot, self._target.files)
        except (OSError, PackageError) as exc:
            self._rollback(f"staging into slot {slot} failed: {exc}")
            return
        self._test_commit()

    def _stage(self, slot: str, files: list[manifest_pb2.FileEntry]) -> None:
        dest = self.layout.slot(slot)
        tmp = dest.with_name(f"{slot}.staging")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        root = tmp.resolve()
        for f in files:
            rel = safe_relpath(f.path)
            out = tmp.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.parent.resolve().is_relative_to(root):
                raise PackageError(f"unsafe file path in manifest: {f.path!r}")
            src = self.store.path(f.sha256)
            try:
                os.link(src, out)
            except OSError:
                shutil.copyfile(src, out)
        fsync_dir(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def _test_commit(self) -> None:
        assert self._target is not None
        r = self.record
        self._enter(UpdateState.TESTING, test_attempts=r.test_attempts + 1)
        t0 = time.perf_counter()
        try:
            loaded = self._smoke_test(r.target_slot, self._target)
        except PackageRejected as exc:
            self._rollback(exc.reason, test=self._summary(False, time.perf_counter() - t0))
            return
        self._commit(loaded, self._summary(True, time.perf_counter() - t0))

    def _summary(self, passed: bool, seconds: float) -> TestSummary:
        judged = [s for s in self.last_smoke_test if s.matches is not None]
        return TestSummary(
            ran=True,
            passed=passed,
            prompts=len(self.last_smoke_test),
            judged=len(judged),
            matched=sum(1 for s in judged if s.matches),
            seconds=round(seconds, 3),
            adapter=self._target.adapter if self._target is not None else "",
        )

    def _smoke_test(self, slot: str, target: _Target) -> LoadedModel:
        budget = self.settings.smoke_test_budget_s
        self.last_smoke_test = []
        t0 = time.perf_counter()
        info = self._model_info(target, slot)
        try:
            loaded = self.loader(self.layout.slot(slot), info, **self._load_options())
        except ModelLoadError as exc:
            raise PackageRejected(f"TESTING: {exc}") from exc
        prompts = list(target.manifest.golden_prompts) or [manifest_pb2.GoldenPrompt(prompt=DEFAULT_PROMPT)]
        limits = Limits(self.settings.smoke_test_max_new_tokens, self.settings.max_new_tokens_limit)
        for i, gp in enumerate(prompts):
            left = budget - (time.perf_counter() - t0)
            cancel = threading.Event()
            timer = threading.Timer(max(0.0, left), cancel.set)
            timer.start()
            request = GenerationRequest(  # greedy, as the builder made the reference
                messages=(("user", gp.prompt),),
                max_new_tokens=min(gp.max_new_tokens or limits.default_max_new_tokens, limits.max_new_tokens_limit),
                temperature=0.0,
                adapter=target.adapter,
            )
            try:
                try:
                    result = loaded.generate(request, limits=limits, cancel=cancel)
                except Exception:  # no chat template: the raw prompt
                    result = loaded.generate(
                        replace(request, messages=(), prompt=gp.prompt), limits=limits, cancel=cancel
                    )
            except Exception as exc:
                raise PackageRejected(f"TESTING: golden prompt {i} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                timer.cancel()
            if result.finish_reason is FinishReason.CANCELLED:
                raise PackageRejected(f"TESTING: golden prompt {i} ran past the {budget:g} s latency budget")
            match = result.text.strip() == gp.reference.strip() if gp.reference else None
            self.last_smoke_test.append(
                SmokeResult(i, match, result.completion_tokens, result.ttft_ms, result.tokens_per_s)
            )
            if match is not None:
                log.info("golden prompt %d: %s the reference", i, "matches" if match else "differs from")
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            raise PackageRejected(f"TESTING: load and golden prompts took {elapsed:.2f} s (budget {budget:g} s)")
        log.info("TESTING passed in %.2f s (%d prompts)", elapsed, len(prompts))
        return loaded

    def _commit(self, loaded: LoadedModel, test: TestSummary) -> None:
        assert self._target is not None
        r = self.record
        slot = r.target_slot
        t = self._target
        profile = (t.base if t.base is not None else t.manifest).profile.name
        info = SlotInfo(t.package_id, t.manifest.name, t.manifest.version, profile, t.base_id)
        self._enter(
            UpdateState.COMMITTED, active_slot=slot, slots={**r.slots, slot: info}, reason="", test=test, report=False
        )
        self._point_current()
        self.host.swap(loaded)
        self._target = None
        self._gc()
        self._report()

    def _rollback(self, reason: str, **changes: Any) -> None:
        log.warning("ROLLED_BACK: %s", reason)
        self._abandon()
        self._enter(UpdateState.ROLLED_BACK, reason=reason, report=False, **changes)
        self._wipe_failed_slot()
        self._gc()
        self._report()

    # -- records, reports, files ----------------------------------------------------------------
    def crash(self) -> None:
        """Fault injection (settings.crash_after_state): die at once, as a power cut would."""
        os.kill(os.getpid(), signal.SIGKILL)

    def _enter(self, state: UpdateState, *, report: bool = True, **changes: Any) -> None:
        r = self.record
        if state is not r.state:
            check_transition(r.state, state)
        transitions = changes.pop("transitions", r.transitions + 1)
        if transitions > MAX_TRANSITIONS_PER_TARGET and state is not UpdateState.ROLLED_BACK:
            self._rollback(f"update loop: {transitions} state changes for one package")
            return
        self._save(replace(r, state=state, transitions=transitions, **changes))
        self.history.append(state)
        if self.settings.crash_after_state == state.value:
            log.warning("fault injection: crash after saving %s", state.value)
            self.crash()
        log.info("update state %s %s", state.value, self.record.reason)
        if report:
            self._report()

    def _save(self, record: UpdateRecord) -> None:
        saved = self.states.save(record)
        with self._cond:
            self.record = saved
            self._cond.notify_all()

    def _report(self) -> None:
        if self.on_report is None:
            return
        try:
            self.on_report(self.current_report())
        except Exception:
            log.exception("could not report the update state")

    def _point_current(self) -> None:
        """`current` -> slots/<active> (atomic symlink swap); absent while nothing is active."""
        link = self.layout.current
        slot = self.record.active_slot
        if not slot:
            if link.is_symlink():
                link.unlink()
            return
        target = os.path.join("slots", slot)
        if link.is_symlink() and os.readlink(link) == target:
            return
        tmp = link.with_name(".current.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def _wipe_failed_slot(self) -> None:
        r = self.record
        slot = r.target_slot
        if slot and slot != r.active_slot and r.slots.get(slot) is None:
            shutil.rmtree(self.layout.slot(slot), ignore_errors=True)
            shutil.rmtree(self.layout.slots / f"{slot}.staging", ignore_errors=True)

    def _clean_staging_leftovers(self) -> None:
        for entry in self.layout.slots.glob("*.staging"):
            shutil.rmtree(entry, ignore_errors=True)

    def _gc(self) -> None:
        """Keep the blobs and manifests of the packages in the slots (and of a target in progress)."""
        keep_ids = {s.package_id for s in self.record.slots.values() if s is not None}
        keep_ids |= {s.base_package_id for s in self.record.slots.values() if s is not None and s.base_package_id}
        if self._target is not None:
            keep_ids |= {self._target.package_id, self._target.base_id} - {""}
        keep_blobs: set[str] = set()
        for pid in keep_ids:
            try:
                keep_blobs.update(f.sha256 for f in self._read_manifest(pid).files)
            except PackageRejected:
                continue
        freed = self.store.gc(keep_blobs)
        for entry in self.layout.manifests.iterdir():
            if entry.name.endswith(".pb") and entry.name[:-3] not in keep_ids:
                entry.unlink(missing_ok=True)
        if freed:
            log.info("freed %d bytes of blobs no slot uses", freed)

    def _read_manifest(self, pid: str) -> manifest_pb2.Manifest:
        path = self.layout.manifests / f"{pid}.pb"
        try:
            signed = parse_signed_manifest(path.read_bytes())
            if package_id(signed.manifest) != pid:
                raise PackageError(f"{path.name} does not hold package {pid[:12]}")
            return verify_signed_manifest(signed, self.trusted_keys)
        except FileNotFoundError:
            raise PackageRejected(f"the manifest of {pid[:12]} is missing") from None
        except PackageError as exc:
            raise PackageRejected(exc.reason) from exc

    def _load_target(self, pid: str) -> _Target:
        if not pid:
            raise PackageRejected("the record names no target package")
        return self._target_of(pid, self._read_manifest(pid))

    def _target_of(self, pid: str, manifest: manifest_pb2.Manifest) -> _Target:
        """A package with, for an adapter package, its base's manifest (kept in manifests/ while it serves)."""
        base_id = manifest.adapters[0].base_package_id if manifest.kind == "adapter" and manifest.adapters else ""
        base = self._read_manifest(base_id) if base_id else None
        return _Target(pid, manifest, {f.sha256: f.size for f in manifest.files}, base_id, base)

    def _path_of(self, sha: str) -> str:
        if self._target is not None:
            for f in self._target.files:
                if f.sha256 == sha:
                    return f.path
        return sha[:12]

    def _load_options(self) -> dict[str, Any]:
        st = self.settings
        return {"threads": st.threads, "spinning": st.spinning, "max_batch": st.max_batch}

    @staticmethod
    def _model_info(target: _Target, slot: str) -> ModelInfo:
        """What the runtime loads: the slot's model and its adapters (those shipped in the base, and
        an adapter package's own, whose files the slot holds next to the base's)."""
        manifest, pid = target.manifest, target.package_id
        model = target.base if target.base is not None else manifest
        model_id = target.base_id or pid
        adapters = [a for a in model.adapters if a.path and a.base_package_id in ("", model_id)]
        if target.base is not None:
            adapters += [a for a in manifest.adapters if a.path and a.base_package_id == model_id]
        return ModelInfo(
            name=manifest.name,
            version=manifest.version,
            package_id=pid,
            profile=model.profile.name,
            slot=slot,
            adapters=tuple(a.name for a in adapters),
            adapter_files=tuple((a.name, a.path) for a in adapters),
        )


def _read_package(package_dir: Path) -> tuple[manifest_pb2.SignedManifest, Path]:
    path = package_dir / SIGNED_MANIFEST_FILE
    if not path.is_file():
        raise PackageRejected(f"{package_dir} is not a package folder (no {SIGNED_MANIFEST_FILE})")
    try:
        return parse_signed_manifest(path.read_bytes()), package_dir / BLOBS_DIR
    except PackageError as exc:
        raise PackageRejected(exc.reason) from exc


def read_package_id(package_dir: Path) -> str:
    """The id of a package folder's manifest (PackageRejected if it is not a package folder)."""
    signed, _ = _read_package(package_dir)
    return package_id(signed.manifest)
